//! Internet traffic through an exit: policy routing sends everything into the tunnel but
//! ipop's own datagrams and its connections to the servers it needs, so the tunnel never
//! carries itself.
//!
//! - ipop's UDP sockets (links, STUN, TURN over UDP, hole punching) carry the firewall mark
//!   [`MARK`]; unmarked traffic is looked up in a routing table of ipop's own, [`TABLE`], whose
//!   default route leads into the tunnel (rule priority 5181), as wg-quick does.
//! - Every route of the main table but its default ones still applies (priority 5180,
//!   `suppress_prefixlength 0`): the LAN and anything the host routes on purpose stay off the
//!   tunnel.
//! - The XMPP server and the STUN and TURN servers are looked up in the main table (one rule
//!   each, priority 5179): their TCP connections, opened before the exit came up or while it
//!   is up, keep going the host's own way.
//!
//! The rules are changed with `ip` on the keeper's worker thread, never on the packet loop.

use std::net::IpAddr;
use std::process::Command;

/// The firewall mark of ipop's own UDP sockets.
pub const MARK: u32 = 0x5182;
/// The routing table whose default route leads into the tunnel.
const TABLE: &str = "5182";
const PRIORITY_SERVERS: &str = "5179";
const PRIORITY_MAIN: &str = "5180";
const PRIORITY_TUNNEL: &str = "5181";

/// The policy routing of this device's exit, while it is on.
pub struct ExitRouting {
    interface: String,
    /// The servers kept off the tunnel, while the routing is on.
    on: Option<Vec<IpAddr>>,
}

impl ExitRouting {
    pub fn new(interface: &str) -> Self {
        ExitRouting {
            interface: interface.to_owned(),
            on: None,
        }
    }

    /// Routes internet traffic into the tunnel (`on`), keeping `servers` off it, or back the
    /// host's own way. Does nothing when that is how things stand.
    pub fn set(&mut self, on: bool, mut servers: Vec<IpAddr>) {
        servers.sort();
        servers.dedup();
        let wanted = on.then_some(servers);
        if wanted == self.on {
            return;
        }
        self.remove();
        if let Some(servers) = wanted {
            self.install(&servers);
            self.on = Some(servers);
        }
    }

    fn install(&self, servers: &[IpAddr]) {
        let dev = self.interface.as_str();
        let mark = format!("{MARK:#x}");
        for family in ["-4", "-6"] {
            run(&[
                family, "route", "replace", "default", "dev", dev, "table", TABLE,
            ]);
            run(&[
                family,
                "rule",
                "add",
                "priority",
                PRIORITY_MAIN,
                "lookup",
                "main",
                "suppress_prefixlength",
                "0",
            ]);
            run(&[
                family,
                "rule",
                "add",
                "priority",
                PRIORITY_TUNNEL,
                "not",
                "fwmark",
                &mark,
                "lookup",
                TABLE,
            ]);
        }
        for server in servers {
            let family = if server.is_ipv4() { "-4" } else { "-6" };
            let to = server.to_string();
            run(&[
                family,
                "rule",
                "add",
                "priority",
                PRIORITY_SERVERS,
                "to",
                &to,
                "lookup",
                "main",
            ]);
        }
        tracing::info!(?servers, "internet traffic goes through the exit");
    }

    fn remove(&mut self) {
        if self.on.take().is_none() {
            return;
        }
        for family in ["-4", "-6"] {
            for priority in [PRIORITY_TUNNEL, PRIORITY_MAIN, PRIORITY_SERVERS] {
                // One rule per server shares a priority: delete until none is left.
                for _ in 0..64 {
                    if !quiet(&[family, "rule", "del", "priority", priority]) {
                        break;
                    }
                }
            }
            quiet(&[family, "route", "flush", "table", TABLE]);
        }
        tracing::info!("internet traffic goes the host's own way");
    }
}

impl Drop for ExitRouting {
    fn drop(&mut self) {
        self.remove();
    }
}

/// Runs `ip` with `args`, logging a failure.
fn run(args: &[&str]) {
    if let Err(e) = ip(args) {
        tracing::warn!("ip {}: {e}", args.join(" "));
    }
}

/// Runs `ip` with `args`: whether it succeeded.
fn quiet(args: &[&str]) -> bool {
    ip(args).is_ok()
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim_end().to_owned())
    }
}
