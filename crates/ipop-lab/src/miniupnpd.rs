//! Port mapping on a lab router: Debian's miniupnpd (package `miniupnpd-nftables`) serving
//! UPnP IGD, NAT-PMP and PCP to the router's LAN, as a home router does.
//!
//! Two things stand between miniupnpd and the lab:
//! - It refuses to map ports when its WAN address is reserved, and the lab's internet is
//!   198.18.0.0/15. Told to check its address with STUN (`ext_perform_stun`), it runs an RFC 5780
//!   test against the lab server's coturn (which answers from two addresses and two ports:
//!   [`crate::CoturnBuilder::alt_ip`]) and maps ports once every answer came back to the
//!   address it sent from. For the answers from the other address and port to get in, the router's
//!   `input` chain takes UDP from the server ([`crate::Router`] does it while miniupnpd runs).
//! - Its nftables backend writes rules into chains that must exist. They are the table
//!   `inet miniupnpd`: a `forward` filter chain, and NAT chains that run just before the
//!   router's own (`dstnat - 1` and `srcnat - 1`), so that a mapping's DNAT wins over the lab's
//!   rules. The lab's `forward` chain already accepts DNATed traffic.
//!
//! miniupnpd deletes its rules when it stops; the table goes on drop.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use crate::dir::TestDir;
use crate::nat::Router;
use crate::process::{Daemon, log_tail};

/// How long [`MiniUpnpdBuilder::start`] waits for the STUN test and the listeners.
const READY_TIMEOUT: Duration = Duration::from_secs(15);
/// The table miniupnpd writes its rules into.
const TABLE: &str = "miniupnpd";
/// Lines of its log in a panic message.
const LOG_LINES: usize = 40;

/// Options for a [`MiniUpnpd`] on a router ([`Router::miniupnpd`]).
#[derive(Debug)]
pub struct MiniUpnpdBuilder<'a> {
    router: &'a mut Router,
    stun: SocketAddr,
    upnp: bool,
    natpmp: bool,
}

impl Router {
    /// miniupnpd for this router, checking its address with the STUN server `stun` (coturn on
    /// the lab's server, answering on both server addresses).
    pub fn miniupnpd(&mut self, stun: SocketAddr) -> MiniUpnpdBuilder<'_> {
        MiniUpnpdBuilder {
            router: self,
            stun,
            upnp: true,
            natpmp: true,
        }
    }
}

impl MiniUpnpdBuilder<'_> {
    /// Whether it serves UPnP IGD (SSDP and SOAP over HTTP); on by default.
    #[must_use]
    pub fn upnp(mut self, on: bool) -> Self {
        self.upnp = on;
        self
    }

    /// Whether it serves NAT-PMP and PCP (one switch in miniupnpd); on by default.
    #[must_use]
    pub fn natpmp(mut self, on: bool) -> Self {
        self.natpmp = on;
        self
    }

    /// Creates its table, opens the router to the STUN answers, starts miniupnpd and waits
    /// until it says port forwarding is on and its listeners are up.
    ///
    /// # Panics
    /// When miniupnpd is missing, exits, says it cannot forward ports, or is not ready within
    /// 15 s; the message carries its log.
    #[must_use]
    pub fn start(self) -> MiniUpnpd {
        let ns = self.router.ns().name().to_owned();
        let lan = self.router.lan_ip();
        self.router.set_stun_replies(true);
        create_table(&ns);
        let dir = TestDir::new("miniupnpd");
        let conf = dir.path().join("miniupnpd.conf");
        let [a, b, c, _] = lan.octets();
        let yes_no = |on: bool| if on { "yes" } else { "no" };
        let text = format!(
            "ext_ifname=wan\nlistening_ip=lan\n\
             ext_perform_stun=yes\next_stun_host={stun_ip}\next_stun_port={stun_port}\n\
             enable_upnp={upnp}\nenable_natpmp={natpmp}\n\
             secure_mode=yes\nsystem_uptime=yes\n\
             lease_file={lease}\n\
             upnp_table_name={TABLE}\nupnp_nat_table_name={TABLE}\n\
             upnp_forward_chain=miniupnpd\nupnp_nat_chain=prerouting_miniupnpd\n\
             upnp_nat_postrouting_chain=postrouting_miniupnpd\n\
             allow 1024-65535 {a}.{b}.{c}.0/24 1024-65535\n\
             deny 0-65535 0.0.0.0/0 0-65535\n",
            stun_ip = self.stun.ip(),
            stun_port = self.stun.port(),
            upnp = yes_no(self.upnp),
            natpmp = yes_no(self.natpmp),
            lease = dir.path().join("leases").display(),
        );
        std::fs::write(&conf, text)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", conf.display()));
        let log = dir.path().join("miniupnpd.log");
        let mut cmd = Command::new("ip");
        // A pid file of its own: with the default one, a second router's miniupnpd would
        // take the first for itself and refuse to start.
        cmd.args(["netns", "exec", &ns, "miniupnpd", "-f"])
            .arg(&conf)
            .arg("-P")
            .arg(dir.path().join("miniupnpd.pid"))
            .arg("-d");
        let mut daemon = Daemon::spawn("miniupnpd", cmd, &log);
        let mut expected = vec!["Port forwarding is now enabled"];
        if self.natpmp {
            expected.push("Listening for NAT-PMP/PCP traffic");
        }
        if self.upnp {
            expected.push("HTTP listening on port");
        }
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if expected.iter().all(|line| text.contains(line)) {
                break;
            }
            let broken = [
                "Port forwarding is impossible",
                "Port forwarding is now disabled",
            ]
            .iter()
            .any(|line| text.contains(line));
            if broken || daemon.try_wait().is_some() || Instant::now() >= deadline {
                drop_table(&ns);
                panic!(
                    "miniupnpd in {ns} is not ready to map ports (waited for {expected:?}):\n{}",
                    log_tail(&log, LOG_LINES)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        MiniUpnpd {
            daemon: Some(daemon),
            ns,
            lan,
            log,
            _dir: dir,
        }
    }
}

/// A port mapping miniupnpd set up (one DNAT rule of its table).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    /// `udp` or `tcp`.
    pub protocol: &'static str,
    pub external_port: u16,
    pub internal: SocketAddrV4,
}

/// A running miniupnpd, stopped on drop (by PID), its table deleted.
#[derive(Debug)]
pub struct MiniUpnpd {
    daemon: Option<Daemon>,
    /// The router's namespace.
    ns: String,
    lan: Ipv4Addr,
    log: PathBuf,
    _dir: TestDir,
}

impl MiniUpnpd {
    /// The port mappings in force: the DNAT rules of its table.
    ///
    /// # Panics
    /// When nft cannot list the table.
    #[must_use]
    pub fn mappings(&self) -> Vec<Mapping> {
        parse_mappings(&self.rules())
    }

    /// Its DNAT chain as `nft list chain` prints it, for messages.
    ///
    /// # Panics
    /// When nft cannot list the chain.
    #[must_use]
    pub fn rules(&self) -> String {
        let out = nft(
            &self.ns,
            &["list", "chain", "inet", TABLE, "prerouting_miniupnpd"],
        );
        assert!(
            out.status.success(),
            "cannot list miniupnpd's rules in {}: {}",
            self.ns,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The router's LAN address, where it listens.
    #[must_use]
    pub fn lan_ip(&self) -> Ipv4Addr {
        self.lan
    }

    /// The last `n` lines of its log.
    #[must_use]
    pub fn log_tail(&self, n: usize) -> String {
        log_tail(&self.log, n)
    }

    /// Stops it (SIGTERM, by PID) and deletes its table.
    pub fn stop(mut self) {
        self.shut();
    }

    fn shut(&mut self) {
        if let Some(daemon) = self.daemon.take() {
            drop(daemon);
            drop_table(&self.ns);
        }
    }
}

impl Drop for MiniUpnpd {
    fn drop(&mut self) {
        self.shut();
    }
}

/// The mappings in `nft list chain` output: each DNAT rule names the protocol, the external
/// port (`dport`) and the internal endpoint (`dnat ip to A:P`), as in
/// `iif "wan" @nh,72,8 0x11 th dport 51820 dnat ip to 192.168.1.2:51820`.
fn parse_mappings(text: &str) -> Vec<Mapping> {
    text.lines()
        .filter_map(|line| {
            let words: Vec<&str> = line.split_whitespace().collect();
            let after = |key: &str| {
                words
                    .iter()
                    .position(|w| *w == key)
                    .and_then(|i| words.get(i + 1))
            };
            // miniupnpd matches the IP header's protocol byte: `@nh,72,8 0x11` is UDP.
            let protocol = match after("@nh,72,8").copied() {
                Some("0x11") => "udp",
                Some("0x6" | "0x06") => "tcp",
                _ if words.contains(&"udp") => "udp",
                _ => "tcp",
            };
            let external_port = after("dport")?.parse().ok()?;
            let to = words.iter().position(|w| *w == "dnat")?;
            let internal = words[to..]
                .iter()
                .find_map(|w| w.parse::<SocketAddrV4>().ok())?;
            Some(Mapping {
                protocol,
                external_port,
                internal,
            })
        })
        .collect()
}

/// `nft ARGS` in namespace `ns`.
fn nft(ns: &str, args: &[&str]) -> Output {
    Command::new("ip")
        .args(["netns", "exec", ns, "nft"])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run nft in {ns}: {e}"))
}

fn create_table(ns: &str) {
    let script = format!(
        "table inet {TABLE} {{
  chain forward {{ type filter hook forward priority filter; policy accept; jump miniupnpd; }}
  chain miniupnpd {{ }}
  chain prerouting {{ type nat hook prerouting priority -101; policy accept; jump prerouting_miniupnpd; }}
  chain postrouting {{ type nat hook postrouting priority 99; policy accept; jump postrouting_miniupnpd; }}
  chain prerouting_miniupnpd {{ }}
  chain postrouting_miniupnpd {{ }}
}}
"
    );
    let path = std::env::temp_dir().join(format!("ipop-lab-{ns}-{TABLE}.nft"));
    std::fs::write(&path, script)
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    let out = nft(ns, &["-f", &path.to_string_lossy()]);
    let _ = std::fs::remove_file(&path);
    assert!(
        out.status.success(),
        "nft refused miniupnpd's table in {ns}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn drop_table(ns: &str) {
    let _ = nft(ns, &["delete", "table", "inet", TABLE]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mappings_are_read_from_the_dnat_rules() {
        let text = "table inet miniupnpd {\n\tchain prerouting_miniupnpd {\n\
            \t\tiif \"wan\" @nh,72,8 0x11 th dport 51820 dnat ip to 192.168.1.2:51820\n\
            \t\tiif \"wan\" @nh,72,8 0x6 th dport 8080 dnat ip to 192.168.1.3:80\n\t}\n}\n";
        assert_eq!(
            parse_mappings(text),
            [
                Mapping {
                    protocol: "udp",
                    external_port: 51820,
                    internal: "192.168.1.2:51820".parse().unwrap(),
                },
                Mapping {
                    protocol: "tcp",
                    external_port: 8080,
                    internal: "192.168.1.3:80".parse().unwrap(),
                },
            ]
        );
    }
}
