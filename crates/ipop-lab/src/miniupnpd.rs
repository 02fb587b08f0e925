//! Port mapping on a lab router: Debian's miniupnpd (package `miniupnpd-nftables`) serving
//! UPnP IGD, NAT-PMP and PCP to the router's LAN, as a home router does.
//!
//! Two things stand between miniupnpd and the lab:
//! - It refuses to map ports when its WAN address is reserved ("Reserved / private IP address
//!   ... Port forwarding is impossible"), and the lab's internet is 198.18.0.0/15. Told to check
//!   its address with STUN (`ext_perform_stun`), it runs an RFC 5780 test at start: four
//!   Binding requests from four sockets, asking for answers from the same endpoint, the other
//!   address, the other port and both. coturn on the lab server answers them when it listens
//!   on both server addresses ([`crate::CoturnBuilder::alt_ip`]). When all four answers arrive
//!   and the mapped address is its own, miniupnpd takes itself for a host behind a "full-cone
//!   NAT 1:1" and maps ports ("Port forwarding is now enabled"). The answers from the other
//!   address or port are not replies to anything conntrack saw, so the router's `input` chain
//!   would drop them: while miniupnpd runs, the router takes UDP from the STUN server's four
//!   endpoints (its set `@stun`, see [`crate::NatLab`]).
//! - Its nftables backend writes rules into chains that must exist; it creates no table. They
//!   are the table `inet miniupnpd` (the layout of Debian's `/etc/miniupnpd/nft_init.sh`):
//!
//!   ```text
//!   table inet miniupnpd {
//!     chain forward { type filter hook forward priority filter; jump miniupnpd }
//!     chain miniupnpd { }              # miniupnpd: accept what a mapping lets in
//!     chain prerouting { type nat hook prerouting priority dstnat - 1; jump prerouting_miniupnpd }
//!     chain prerouting_miniupnpd { }   # miniupnpd: one DNAT rule per mapping
//!     chain postrouting { type nat hook postrouting priority srcnat - 1; jump postrouting_miniupnpd }
//!     chain postrouting_miniupnpd { }  # miniupnpd: PCP PEER source NAT
//!   }
//!   ```
//!
//!   The NAT chains run just before the router's own (`ip ipop_lab`, at `dstnat` and `srcnat`),
//!   so a mapping's DNAT wins over the lab's rules; the lab's `forward` chain accepts DNATed
//!   traffic (`ct status dnat`), and the answers leave from the mapping's public port since
//!   conntrack undoes the DNAT.
//!
//! miniupnpd does not delete its rules when it stops (SIGTERM: "shutting down MiniUPnPd"; it
//! keeps them, with its lease file, for its next start): [`MiniUpnpd`]'s drop stops it by PID,
//! then deletes the table, which takes the mappings with it, and closes the router to the STUN
//! server again. A mapping that a client deletes (NAT-PMP lifetime 0, UPnP
//! `DeletePortMapping`) goes at once.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::dir::TestDir;
use crate::nat::{Router, SERVER_ALT_IP, SERVER_IP, stun_replies};
use crate::netns;
use crate::process::{Daemon, STOP_TIMEOUT, log_tail};

/// How long [`MiniUpnpdBuilder::start`] waits for the STUN test and the listeners.
pub const MINIUPNPD_READY_TIMEOUT: Duration = Duration::from_secs(15);
/// The table miniupnpd writes its rules into.
const TABLE: &str = "miniupnpd";
/// Its chains in [`TABLE`]: filter, DNAT and SNAT rules.
const FORWARD_CHAIN: &str = "miniupnpd";
const NAT_CHAIN: &str = "prerouting_miniupnpd";
const POSTROUTING_CHAIN: &str = "postrouting_miniupnpd";
/// Lines of its log in a panic message.
const LOG_LINES: usize = 40;
/// What its log says once it maps ports.
const FORWARDING_ENABLED: &str = "Port forwarding is now enabled";
/// What its log says when it will not map ports.
const FORWARDING_OFF: [&str; 2] = [
    "Port forwarding is impossible",
    "Port forwarding is now disabled",
];

/// Options for a [`MiniUpnpd`] on a router ([`Router::miniupnpd`]).
#[derive(Debug)]
pub struct MiniUpnpdBuilder<'a> {
    router: &'a Router,
    stun: SocketAddr,
    upnp: bool,
    natpmp: bool,
    pcp: bool,
}

impl Router {
    /// miniupnpd for this router, checking its address with the STUN server `stun`: coturn on
    /// the lab's server, started with [`crate::CoturnBuilder::alt_ip`] so that it answers from
    /// both server addresses.
    #[must_use]
    pub fn miniupnpd(&self, stun: SocketAddr) -> MiniUpnpdBuilder<'_> {
        MiniUpnpdBuilder {
            router: self,
            stun,
            upnp: true,
            natpmp: true,
            pcp: true,
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

    /// Whether PCP requests reach it; on by default. miniupnpd serves PCP and NAT-PMP together
    /// ([`MiniUpnpdBuilder::natpmp`]); off, its table drops PCP requests (version 2 in the
    /// first byte on port 5351) in the router's `input`, so that it speaks NAT-PMP only, as an
    /// older router does.
    #[must_use]
    pub fn pcp(mut self, on: bool) -> Self {
        self.pcp = on;
        self
    }

    /// Creates its table, lets the STUN server's answers in, starts miniupnpd in the router's
    /// namespace and waits until its log says port forwarding is on and its listeners are up.
    ///
    /// # Panics
    /// When the table or the config cannot be written, miniupnpd cannot start, exits, says it
    /// will not forward ports, or is not ready within [`MINIUPNPD_READY_TIMEOUT`]; the message
    /// carries its log. Whatever was set up is undone as the panic unwinds.
    #[must_use]
    pub fn start(self) -> MiniUpnpd {
        let ns = self.router.ns().name().to_owned();
        let lan = self.router.lan_ip();
        let dir = TestDir::new("miniupnpd");
        let conf = dir.path().join("miniupnpd.conf");
        std::fs::write(&conf, self.config_text(&dir))
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", conf.display()));
        create_table(&ns, self.pcp);
        // From here on, dropping it (a panic included) undoes what was done.
        let mut upnpd = MiniUpnpd {
            daemon: None,
            ns,
            lan,
            stun_endpoints: Vec::new(),
            log: dir.path().join("miniupnpd.log"),
            _dir: dir,
        };
        let endpoints = stun_endpoints(self.stun);
        if let Err(e) = stun_replies(&upnpd.ns, &endpoints, true) {
            panic!("cannot let the STUN answers in: {e}");
        }
        upnpd.stun_endpoints = endpoints;
        let mut cmd = self.router.ns().command("miniupnpd");
        // A pid file of its own: with the default one, a second router's miniupnpd would take
        // the first for itself and refuse to start. `-d`: in the foreground, logging to stderr.
        cmd.arg("-f")
            .arg(&conf)
            .arg("-P")
            .arg(upnpd._dir.path().join("miniupnpd.pid"))
            .arg("-d");
        upnpd.daemon = Some(Daemon::spawn("miniupnpd", cmd, &upnpd.log));
        let mut expected = vec![FORWARDING_ENABLED];
        if self.natpmp {
            expected.push("Listening for NAT-PMP/PCP traffic");
        }
        if self.upnp {
            expected.push("HTTP listening on port");
        }
        upnpd.wait_ready(&expected);
        upnpd
    }

    /// The config file's text; the lease file goes into `dir`.
    fn config_text(&self, dir: &TestDir) -> String {
        let [a, b, c, _] = self.router.lan_ip().octets();
        let yes_no = |on: bool| if on { "yes" } else { "no" };
        format!(
            "# Written by ipop-lab for one test.\n\
             ext_ifname=wan\n\
             listening_ip=lan\n\
             ext_perform_stun=yes\n\
             ext_stun_host={stun_ip}\n\
             ext_stun_port={stun_port}\n\
             enable_upnp={upnp}\n\
             enable_natpmp={natpmp}\n\
             secure_mode=yes\n\
             system_uptime=yes\n\
             lease_file={lease}\n\
             upnp_table_name={TABLE}\n\
             upnp_nat_table_name={TABLE}\n\
             upnp_forward_chain={FORWARD_CHAIN}\n\
             upnp_nat_chain={NAT_CHAIN}\n\
             upnp_nat_postrouting_chain={POSTROUTING_CHAIN}\n\
             allow 1024-65535 {a}.{b}.{c}.0/24 1024-65535\n\
             deny 0-65535 0.0.0.0/0 0-65535\n",
            stun_ip = self.stun.ip(),
            stun_port = self.stun.port(),
            upnp = yes_no(self.upnp),
            natpmp = yes_no(self.natpmp),
            lease = dir.path().join("leases").display(),
        )
    }
}

/// A port mapping miniupnpd set up (one DNAT rule of its table).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    /// `udp` or `tcp`.
    pub protocol: &'static str,
    /// The port on the router's public address.
    pub external_port: u16,
    /// Where the router sends what arrives there.
    pub internal: SocketAddrV4,
}

/// A running miniupnpd on a lab router. Dropping it stops the process (SIGTERM, then SIGKILL
/// after [`STOP_TIMEOUT`], by PID), deletes its table and closes the router to the STUN server
/// again; when the thread is panicking, its log is printed and its directory kept.
#[derive(Debug)]
pub struct MiniUpnpd {
    /// Stopped first; `None` only while starting.
    daemon: Option<Daemon>,
    /// The router's namespace.
    ns: String,
    lan: Ipv4Addr,
    /// The STUN server endpoints let in through the router's `input` chain.
    stun_endpoints: Vec<SocketAddrV4>,
    log: PathBuf,
    /// Config, log, pid and lease files; dropped last.
    _dir: TestDir,
}

impl MiniUpnpd {
    /// The port mappings in force: the DNAT rules of its table, read from nftables' JSON.
    ///
    /// # Panics
    /// When nft cannot list its chain or prints something other than nftables' JSON.
    #[must_use]
    pub fn mappings(&self) -> Vec<Mapping> {
        let out = nft(&self.ns, &["-j", "list", "chain", "inet", TABLE, NAT_CHAIN]);
        assert!(
            out.status.success(),
            "cannot list miniupnpd's rules in {}: {}",
            self.ns,
            String::from_utf8_lossy(&out.stderr)
        );
        parse_mappings(&String::from_utf8_lossy(&out.stdout))
            .unwrap_or_else(|e| panic!("cannot read miniupnpd's rules in {}: {e}", self.ns))
    }

    /// Its DNAT chain as `nft list chain` prints it, for messages.
    ///
    /// # Panics
    /// When nft cannot list the chain.
    #[must_use]
    pub fn rules(&self) -> String {
        let out = nft(&self.ns, &["list", "chain", "inet", TABLE, NAT_CHAIN]);
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

    /// The PID of the miniupnpd process.
    ///
    /// # Panics
    /// Never once [`MiniUpnpdBuilder::start`] has returned.
    #[must_use]
    pub fn pid(&self) -> u32 {
        self.daemon
            .as_ref()
            .map(Daemon::pid)
            .expect("miniupnpd runs from start to drop")
    }

    /// The last `n` lines of its log (its stderr: it runs in the foreground with `-d`).
    #[must_use]
    pub fn log_tail(&self, n: usize) -> String {
        log_tail(&self.log, n)
    }

    /// Stops it and cleans up, as dropping it does.
    pub fn stop(self) {
        drop(self);
    }

    /// Waits until the log has every line of `expected`.
    ///
    /// # Panics
    /// When it says it will not forward ports, exits, or the time is up.
    fn wait_ready(&mut self, expected: &[&str]) {
        let deadline = Instant::now() + MINIUPNPD_READY_TIMEOUT;
        loop {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            if expected.iter().all(|line| text.contains(line)) {
                return;
            }
            let refused = FORWARDING_OFF.iter().any(|line| text.contains(line));
            let exited = self.daemon.as_mut().and_then(Daemon::try_wait);
            if refused || exited.is_some() || Instant::now() >= deadline {
                let why = match exited {
                    Some(status) => format!("it exited ({status})"),
                    None if refused => "it will not forward ports".to_owned(),
                    None => format!("timed out after {MINIUPNPD_READY_TIMEOUT:?}"),
                };
                panic!(
                    "miniupnpd in {} is not ready to map ports ({why}; waited for {expected:?}); \
                     log {}:\n{}",
                    self.ns,
                    self.log.display(),
                    log_tail(&self.log, LOG_LINES)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for MiniUpnpd {
    fn drop(&mut self) {
        if let Some(mut daemon) = self.daemon.take() {
            let (status, killed) = daemon.stop_within(STOP_TIMEOUT);
            if killed {
                eprintln!(
                    "ipop-lab: miniupnpd in {} ignored SIGTERM for {STOP_TIMEOUT:?} and was \
                     killed ({status}); log {}",
                    self.ns,
                    self.log.display()
                );
            }
            // Dropping the daemon prints its log in a failing test.
            drop(daemon);
        }
        // With the lab dropped first, the namespace (and all in it) is gone already.
        if !netns::exists(&self.ns) {
            return;
        }
        let out = nft(&self.ns, &["delete", "table", "inet", TABLE]);
        if !out.status.success() {
            eprintln!(
                "ipop-lab: cannot delete table inet {TABLE} in {}: {}",
                self.ns,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        if !self.stun_endpoints.is_empty()
            && let Err(e) = stun_replies(&self.ns, &self.stun_endpoints, false)
        {
            eprintln!("ipop-lab: cannot close the router to the STUN server again: {e}");
        }
    }
}

/// The endpoints an RFC 5780 test against `stun` gets answers from: its port and the next one,
/// on its address and on the lab server's other address.
fn stun_endpoints(stun: SocketAddr) -> Vec<SocketAddrV4> {
    let IpAddr::V4(ip) = stun.ip() else {
        panic!("miniupnpd's STUN server must have an IPv4 address (the lab is IPv4), not {stun}");
    };
    let alt = if ip == SERVER_ALT_IP {
        SERVER_IP
    } else {
        SERVER_ALT_IP
    };
    let port = stun.port();
    let next = port
        .checked_add(1)
        .unwrap_or_else(|| panic!("a STUN server on port {port} has no next port"));
    [ip, alt]
        .into_iter()
        .flat_map(|ip| [port, next].map(|port| SocketAddrV4::new(ip, port)))
        .collect()
}

/// The mappings in `nft -j list chain` output (nftables' JSON): each DNAT rule matches the
/// protocol and the external port and names the internal endpoint, as miniupnpd 2.3 writes
/// `iif "wan" @nh,72,8 0x11 th dport 51820 dnat ip to 192.168.1.2:51820` (the IP header's
/// protocol byte, 17 for UDP, 6 for TCP). Rules of any other shape are skipped.
fn parse_mappings(json: &str) -> Result<Vec<Mapping>, String> {
    let doc: Value = serde_json::from_str(json).map_err(|e| format!("not JSON ({e}): {json}"))?;
    let items = doc["nftables"]
        .as_array()
        .ok_or_else(|| format!("no \"nftables\" array in {json}"))?;
    Ok(items
        .iter()
        .filter_map(|item| item["rule"]["expr"].as_array())
        .filter_map(|exprs| mapping_of(exprs))
        .collect())
}

/// The mapping a DNAT rule's expressions describe.
fn mapping_of(exprs: &[Value]) -> Option<Mapping> {
    let mut protocol = None;
    let mut external_port = None;
    let mut internal = None;
    for expr in exprs {
        let m = &expr["match"];
        let (left, right) = (&m["left"], &m["right"]);
        let payload = &left["payload"];
        // The protocol: miniupnpd's `@nh,72,8` (the IP header's protocol byte), or what nft
        // may print instead, `ip protocol` or `meta l4proto`.
        let protocol_byte =
            payload["base"] == "nh" && payload["offset"] == 72 && payload["len"] == 8;
        if protocol_byte
            || payload["protocol"] == "ip" && payload["field"] == "protocol"
            || left["meta"]["key"] == "l4proto"
        {
            protocol = ip_protocol(right).or(protocol);
        } else if payload["field"] == "dport" {
            external_port = right.as_u64().and_then(|p| u16::try_from(p).ok());
            protocol = ip_protocol(&payload["protocol"]).or(protocol);
        }
        let dnat = &expr["dnat"];
        if let (Some(addr), Some(port)) = (dnat["addr"].as_str(), dnat["port"].as_u64()) {
            internal = Some(SocketAddrV4::new(
                addr.parse().ok()?,
                u16::try_from(port).ok()?,
            ));
        }
    }
    Some(Mapping {
        protocol: protocol?,
        external_port: external_port?,
        internal: internal?,
    })
}

/// `udp` or `tcp` from a protocol number or name in nftables' JSON.
fn ip_protocol(value: &Value) -> Option<&'static str> {
    match (value.as_u64(), value.as_str()) {
        (Some(17), _) | (_, Some("udp")) => Some("udp"),
        (Some(6), _) | (_, Some("tcp")) => Some("tcp"),
        _ => None,
    }
}

/// `nft ARGS` in namespace `ns`.
///
/// # Panics
/// When nft cannot be started.
fn nft(ns: &str, args: &[&str]) -> Output {
    Command::new("ip")
        .args(["netns", "exec", ns, "nft"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run nft in {ns}: {e}"))
}

/// Creates [`TABLE`] with the chains miniupnpd writes into (see the module doc).
///
/// # Panics
/// When nft refuses it.
fn create_table(ns: &str, pcp: bool) {
    // The first byte of a UDP payload is bits 64..72 past the transport header's start.
    let no_pcp = if pcp {
        ""
    } else {
        "  chain input { type filter hook input priority filter - 1; policy accept; udp dport 5351 @th,64,8 2 counter drop; }\n"
    };
    let script = format!(
        "table inet {TABLE} {{
{no_pcp}
  chain {FORWARD_CHAIN} {{ }}
  chain {NAT_CHAIN} {{ }}
  chain {POSTROUTING_CHAIN} {{ }}
  chain forward {{ type filter hook forward priority filter; policy accept; jump {FORWARD_CHAIN}; }}
  chain prerouting {{ type nat hook prerouting priority dstnat - 1; policy accept; jump {NAT_CHAIN}; }}
  chain postrouting {{ type nat hook postrouting priority srcnat - 1; policy accept; jump {POSTROUTING_CHAIN}; }}
}}
"
    );
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            if let Some(mut stdin) = child.stdin.take() {
                std::io::Write::write_all(&mut stdin, script.as_bytes())?;
            }
            child.wait_with_output()
        })
        .unwrap_or_else(|e| panic!("cannot run nft in {ns}: {e}"));
    assert!(
        out.status.success(),
        "nft refused miniupnpd's table in {ns} ({}):\n{}\nrules:\n{script}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mappings_are_read_from_the_dnat_rules() {
        // `nft -j list chain inet miniupnpd prerouting_miniupnpd` with miniupnpd 2.3.1's rules
        // for a NAT-PMP UDP mapping and a TCP one, and a rule of another shape.
        let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
            {"chain": {"family": "inet", "table": "miniupnpd", "name": "prerouting_miniupnpd"}},
            {"rule": {"family": "inet", "table": "miniupnpd", "chain": "prerouting_miniupnpd",
              "handle": 14, "expr": [
                {"match": {"op": "==", "left": {"meta": {"key": "iif"}}, "right": "wan"}},
                {"match": {"op": "==", "left": {"payload": {"base": "nh", "offset": 72, "len": 8}}, "right": 17}},
                {"match": {"op": "==", "left": {"payload": {"protocol": "th", "field": "dport"}}, "right": 60421}},
                {"dnat": {"family": "ip", "addr": "192.168.1.2", "port": 60421}}]}},
            {"rule": {"family": "inet", "table": "miniupnpd", "chain": "prerouting_miniupnpd",
              "handle": 15, "expr": [
                {"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": 8080}},
                {"dnat": {"family": "ip", "addr": "192.168.1.3", "port": 80}}]}},
            {"rule": {"family": "inet", "table": "miniupnpd", "chain": "prerouting_miniupnpd",
              "handle": 16, "expr": [{"counter": {"packets": 0, "bytes": 0}}]}}]}"#;
        assert_eq!(
            parse_mappings(json).expect("nftables JSON"),
            [
                Mapping {
                    protocol: "udp",
                    external_port: 60421,
                    internal: "192.168.1.2:60421".parse().unwrap(),
                },
                Mapping {
                    protocol: "tcp",
                    external_port: 8080,
                    internal: "192.168.1.3:80".parse().unwrap(),
                },
            ]
        );
        assert!(parse_mappings("table inet miniupnpd {}").is_err());
    }

    #[test]
    fn the_stun_test_is_answered_from_two_addresses_and_two_ports() {
        let stun = SocketAddr::new(IpAddr::V4(SERVER_IP), 3478);
        let endpoints: Vec<String> = stun_endpoints(stun)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            endpoints,
            [
                "198.18.0.10:3478",
                "198.18.0.10:3479",
                "198.18.0.11:3478",
                "198.18.0.11:3479"
            ]
        );
    }
}
