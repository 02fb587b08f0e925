//! Harness for ipop's end-to-end tests in Linux network namespaces (run as root).
//!
//! - [`Netns`]: a namespace that deletes itself and kills what runs in it on drop;
//!   [`Netns::run_in`] runs Rust code (sockets) inside it.
//! - [`veth`], [`Lan`]: links between namespaces, hosts with `10.0.0.i/24` and `fd00::i/64`.
//! - [`Daemon`]: a process with a log file, stopped on drop, whose log is printed when a test
//!   fails.
//! - [`TestDir`]: a temporary directory, kept (and its path printed) when a test fails.
//! - [`Lab`], [`Node`], [`Config`]: ipop nodes on a LAN, their configs, keys, daemons and
//!   `ipop status --json`; [`wait_until`] polls for a condition.
//! - [`Prosody`]: a private Prosody (own CA, certificate, config, data and port) on loopback or
//!   inside a namespace, stopped on drop.
//! - [`Ejabberd`]: the same with ejabberd; [`XmppServer`] is what both offer, so that a test can
//!   run on either ([`ServerKind`]).
//! - [`Coturn`]: a private coturn (STUN/TURN, time-limited credentials, TLS when asked) on
//!   loopback or inside a namespace, stopped on drop.
//! - [`TestCa`]: a CA for the servers of a test; Prosody and coturn can share one.
//! - [`NetnsHosts`]: host names that resolve inside one namespace (`/etc/netns/NAME/hosts`);
//!   [`NetnsResolver`]: the name server programs there ask (`/etc/netns/NAME/resolv.conf`).
//! - [`Dnsmasq`]: a DNS server with a test's A and SRV records, for XMPP servers that federate.
//! - [`XmppUser`]: a scripted chat-client user (befriend, chat, group rooms) with a blocking API.
//! - [`RawXmpp`]: a raw XMPP client that sends bytes no well-behaved client would (stanzas
//!   20 000 deep, 64 KiB attributes) and reads back elements of any depth.
//! - [`flood()`]: forged WireGuard handshake initiations at a steady rate from several source
//!   addresses ([`add_sources`]), bounded in count and time; also the `ipop-flood` binary.
//! - [`scale`]: the scale benchmark (`bench/scale.sh`, the `ipop-scale` binary): N devices in
//!   one group room and one with N friends, on a server with its stock rate limits.
//! - [`NatLab`]: a fake internet with a [`Server`] on it and [`Device`]s behind nftables NAT
//!   [`Router`]s of each [`Nat`] type (full cone, port-restricted cone, symmetric, UDP blocked).
//! - [`machine_stopped_during`]: how long the whole machine was stopped (a virtual machine
//!   paused by its host) in an interval, so that timing checks do not blame ipop for it.
//! - [`MiniUpnpd`]: Debian's miniupnpd on a [`Router`], mapping ports for its LAN by UPnP IGD,
//!   NAT-PMP and PCP ([`UpnpMapping`]), stopped on drop.
//!
//! Names carry the PID of the creating process (`ipl-<pid>-<n>-<tag>`), so tests run in
//! parallel, and namespaces left behind by a killed run are swept on the next run.

mod ca;
mod coturn;
mod delay;
mod dir;
mod dnsmasq;
mod ejabberd;
mod flood;
mod hosts;
mod icmp;
mod ipop;
mod machine;
mod miniupnpd;
mod nat;
mod net;
mod netns;
mod nsenter;
mod process;
mod prosody;
mod raw_xmpp;
pub mod scale;
mod server;
mod xmpp_tls;
mod xmpp_user;

use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

pub use ca::{ServerCertificate, TestCa};
pub use coturn::{
    COTURN_READY_TIMEOUT, COTURN_REALM, Coturn, CoturnBuilder, rest_credentials, sweep_stale_coturn,
};
pub use delay::UdpDelay;
pub use dir::TestDir;
pub use dnsmasq::Dnsmasq;
pub use ejabberd::{
    EJABBERD_READY_TIMEOUT, EJABBERD_STOP_TIMEOUT, Ejabberd, EjabberdBuilder, sweep_stale_ejabberd,
};
pub use flood::{Flood, FloodReport, Forgery, INITIATION_LEN, add_sources, flood};
pub use hosts::{NetnsHosts, NetnsResolver, sweep_stale_hosts};
pub use ipop::{
    Config, Lab, Node, Peer, find_peer, generate_key, peer_field, status_json, status_peers,
};
pub use machine::stopped_during as machine_stopped_during;
pub use miniupnpd::{MINIUPNPD_READY_TIMEOUT, Mapping as UpnpMapping, MiniUpnpd, MiniUpnpdBuilder};
pub use nat::{
    Device, INTERNET_PREFIX_LEN, Nat, NatLab, NatLabBuilder, Router, SERVER_ALT_IP, SERVER_IP,
    Server, Site,
};
pub use net::{Host, Lan, host_letter, ifname, veth};
pub use netns::{LinkCounters, Netns, exists as netns_exists, sweep_stale};
pub use process::{Daemon, STOP_TIMEOUT, log_tail};
pub use prosody::{
    ExternalService, PROSODY_READY_TIMEOUT, Prosody, ProsodyBuilder, sweep_stale_prosody,
};
pub use raw_xmpp::{RAW_STEP_TIMEOUT, RawElement, RawError, RawTag, RawXmpp, RawXmppBuilder};
pub use server::{ServerKind, XmppServer};
pub use tokio_xmpp::jid::{BareJid, FullJid, Jid};
pub use tokio_xmpp::parsers::roster::Subscription;
/// The XMPP library [`XmppUser`] is built on, for tests that look at raw stanzas.
pub use tokio_xmpp::{self, Stanza};
pub use xmpp_tls::TCP_CONNECT_TIMEOUT;
pub use xmpp_user::{Occupant, XMPP_LOGIN_TIMEOUT, XMPP_STEP_TIMEOUT, XmppUser, XmppUserBuilder};

/// Prefix of every namespace and directory this harness creates.
pub const PREFIX: &str = "ipl-";

/// How often [`wait_until`] polls.
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// A number unique within this process.
fn next_id() -> u32 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Keeps at most 8 ASCII alphanumerics of a tag, so names stay short and shell-safe.
fn sanitize_tag(tag: &str) -> String {
    tag.chars()
        .filter(char::is_ascii_alphanumeric)
        .take(8)
        .collect()
}

/// Runs a command and returns its output.
///
/// # Panics
/// When it cannot start or exits non-zero; the message says what it was for and carries its
/// output.
pub fn run_checked(cmd: &mut Command, purpose: &str) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot {purpose}: cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "cannot {purpose}: {cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Calls `f` every [`POLL_INTERVAL`] until it returns `Ok`, and returns that value.
///
/// `f` returns `Err(observation)` while the condition does not hold; the observation (say, the
/// last status) goes into the panic message.
///
/// # Panics
/// When `timeout` passes first: the message names `what` and the last observation.
pub fn wait_until<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match f() {
            Ok(value) => return value,
            Err(last) if Instant::now() >= deadline => {
                panic!("timed out after {timeout:?} waiting for {what}; last observed: {last}")
            }
            Err(_) => thread::sleep(POLL_INTERVAL),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_sanitized() {
        assert_eq!(sanitize_tag("wrong key!"), "wrongkey");
        assert_eq!(sanitize_tag("a-very-long-tag"), "averylon");
    }

    #[test]
    fn wait_until_returns_the_value_once_ready() {
        let mut calls = 0;
        let v = wait_until(Duration::from_secs(5), "the third call", || {
            calls += 1;
            if calls == 3 {
                Ok(calls)
            } else {
                Err(format!("call {calls}"))
            }
        });
        assert_eq!(v, 3);
    }

    #[test]
    #[should_panic(expected = "waiting for the moon; last observed: still night")]
    fn wait_until_names_what_it_waited_for() {
        wait_until::<()>(Duration::from_millis(250), "the moon", || {
            Err("still night".to_owned())
        });
    }
}
