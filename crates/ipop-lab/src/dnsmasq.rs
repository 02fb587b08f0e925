//! A DNS server for a test: dnsmasq answering A and SRV records that the test gives, and nothing
//! else (no upstream, no `/etc/hosts`), on one address inside a namespace. What XMPP servers
//! look up to reach each other (`_xmpp-server._tcp.DOMAIN`, then the target's address) comes
//! from here.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::dir::TestDir;
use crate::netns::Netns;
use crate::nsenter::NsHandle;
use crate::process::{Daemon, log_tail};
use crate::server::wait_accepting;

/// How long [`Dnsmasq::start`] waits for it to answer.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// A running dnsmasq, stopped on drop.
#[derive(Debug)]
pub struct Dnsmasq {
    /// Declared first: stopped before the directory goes.
    _daemon: Option<Daemon>,
    addr: IpAddr,
    log: PathBuf,
    _dir: TestDir,
}

impl Dnsmasq {
    /// Serves, on port 53 of `ip` inside `ns`, the A records `hosts` (name, address) and the
    /// SRV records `srv` (service name such as `_xmpp-server._tcp.example.org`, target, port).
    ///
    /// # Panics
    /// When dnsmasq is missing (Debian package `dnsmasq-base`) or does not come up.
    #[must_use]
    pub fn start(
        ns: &Netns,
        ip: IpAddr,
        hosts: &[(&str, IpAddr)],
        srv: &[(&str, &str, u16)],
    ) -> Dnsmasq {
        let dir = TestDir::new("dnsmasq");
        let log = dir.path().join("dnsmasq.log");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns.name(), "dnsmasq"])
            .args([
                "--keep-in-foreground",
                "--conf-file=/dev/null",
                "--no-resolv",
            ])
            .args([
                "--no-hosts",
                "--bind-interfaces",
                "--user=root",
                "--pid-file",
            ])
            .arg(format!("--listen-address={ip}"))
            .arg("--log-queries")
            .arg(format!("--log-facility={}", log.display()));
        for (name, address) in hosts {
            cmd.arg(format!("--host-record={name},{address}"));
        }
        for (service, target, port) in srv {
            cmd.arg(format!("--srv-host={service},{target},{port}"));
        }
        let mut daemon = Some(Daemon::spawn("dnsmasq", cmd, &log));
        let handle = NsHandle::of(ns);
        wait_accepting(
            "dnsmasq",
            Some(&handle),
            SocketAddr::new(ip, 53),
            READY_TIMEOUT,
            &mut daemon,
            || log_tail(&log, 20),
        );
        Dnsmasq {
            _daemon: daemon,
            addr: ip,
            log,
            _dir: dir,
        }
    }

    /// The address it answers on (port 53).
    #[must_use]
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// Its log, with every query.
    #[must_use]
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}
