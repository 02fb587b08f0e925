//! A subnet router's forwarding: what comes out of the tunnel for a prefix this device routes
//! for an overlay (`advertise_routes`) is forwarded by the kernel, masqueraded behind this
//! device's own address on the way out, so that the hosts on that network answer without a
//! route back to the overlays. Nothing else that comes out of the tunnel is forwarded.
//!
//! The core has already checked, before a packet reaches the tunnel device, that it came from
//! a device of an overlay in which this device routes the prefix; the nftables rules here are
//! the second line. They live in a table of their own (`inet ipop-INTERFACE`), written with
//! `nft` in one transaction and deleted when ipop stops; IP forwarding is switched on and put
//! back as it was.

use anyhow::{Context, bail};
use ipnet::IpNet;
use std::io::Write;
use std::process::{Command, Stdio};

/// The kernel's forwarding switches, by address family.
const FORWARD_V4: &str = "/proc/sys/net/ipv4/ip_forward";
const FORWARD_V6: &str = "/proc/sys/net/ipv6/conf/all/forwarding";

/// Forwarding for the prefixes this device routes, while it lives.
pub struct Forwarding {
    table: String,
    /// Forwarding switches turned on, with the value they had.
    restore: Vec<(&'static str, String)>,
}

impl Forwarding {
    /// Forwards from `interface` to `prefixes` what comes from `sources` (the overlays'
    /// networks), and masquerades it.
    pub fn start(
        interface: &str,
        prefixes: &[IpNet],
        sources: &[IpNet],
    ) -> anyhow::Result<Forwarding> {
        let table = format!("ipop-{interface}");
        let script = ruleset(&table, interface, prefixes, sources);
        nft(&script).with_context(|| {
            format!("cannot set up forwarding to {prefixes:?} (nftables table inet {table})")
        })?;
        let mut forwarding = Forwarding {
            table,
            restore: Vec::new(),
        };
        for (switch, wanted) in [
            (FORWARD_V4, prefixes.iter().any(|p| p.addr().is_ipv4())),
            (FORWARD_V6, prefixes.iter().any(|p| p.addr().is_ipv6())),
        ] {
            if !wanted {
                continue;
            }
            let before =
                std::fs::read_to_string(switch).with_context(|| format!("cannot read {switch}"))?;
            if before.trim() != "1" {
                std::fs::write(switch, "1").with_context(|| format!("cannot turn on {switch}"))?;
                forwarding.restore.push((switch, before.trim().to_owned()));
            }
        }
        tracing::info!(?prefixes, %interface, "forwarding for the overlays, masqueraded");
        Ok(forwarding)
    }
}

impl Drop for Forwarding {
    fn drop(&mut self) {
        if let Err(e) = nft(&format!("delete table inet {}\n", self.table)) {
            tracing::warn!("cannot delete the nftables table {}: {e:#}", self.table);
        }
        for (switch, before) in &self.restore {
            if let Err(e) = std::fs::write(switch, before) {
                tracing::warn!("cannot put {switch} back to {before}: {e}");
            }
        }
    }
}

/// The table: forwarding from the tunnel only from `sources` to `prefixes`, masqueraded on the
/// way out.
fn ruleset(table: &str, interface: &str, prefixes: &[IpNet], sources: &[IpNet]) -> String {
    let set = |nets: &[IpNet], v4: bool| {
        nets.iter()
            .filter(|p| p.addr().is_ipv4() == v4)
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut accept = String::new();
    for (family, v4) in [("ip", true), ("ip6", false)] {
        let (to, from) = (set(prefixes, v4), set(sources, v4));
        if !to.is_empty() && !from.is_empty() {
            accept.push_str(&format!(
                "    iifname \"{interface}\" {family} saddr {{ {from} }} {family} daddr {{ {to} }} accept\n"
            ));
        }
    }
    // Adding the table first makes the delete succeed whether or not a stale one is there.
    format!(
        "add table inet {table}\n\
         delete table inet {table}\n\
         table inet {table} {{\n\
         \x20 chain forward {{\n\
         \x20   type filter hook forward priority filter; policy accept;\n\
         {accept}\
         \x20   iifname \"{interface}\" drop\n\
         \x20 }}\n\
         \x20 chain postrouting {{\n\
         \x20   type nat hook postrouting priority srcnat; policy accept;\n\
         \x20   iifname \"{interface}\" oifname != \"{interface}\" masquerade\n\
         \x20 }}\n\
         }}\n"
    )
}

/// Runs `nft -f -` with `script`.
fn nft(script: &str) -> anyhow::Result<()> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run nft (is the nftables package installed?)")?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(script.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "nft said: {}",
            String::from_utf8_lossy(&out.stderr).trim_end()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_forwards_from_the_tunnel_only_to_the_routed_prefixes() {
        let prefixes: Vec<IpNet> = vec![
            "192.168.50.0/24".parse().unwrap(),
            "10.9.0.0/16".parse().unwrap(),
            "fd12::/64".parse().unwrap(),
        ];
        let sources: Vec<IpNet> = vec![
            "172.31.0.0/16".parse().unwrap(),
            "fd00:1::/64".parse().unwrap(),
        ];
        let r = ruleset("ipop-ipop0", "ipop0", &prefixes, &sources);
        assert!(r.contains(
            "iifname \"ipop0\" ip saddr { 172.31.0.0/16 } ip daddr { 192.168.50.0/24, 10.9.0.0/16 } accept"
        ));
        assert!(r.contains(
            "iifname \"ipop0\" ip6 saddr { fd00:1::/64 } ip6 daddr { fd12::/64 } accept"
        ));
        let accept = r.find("accept\n").unwrap();
        let drop = r.find("iifname \"ipop0\" drop").unwrap();
        assert!(accept < drop, "the drop comes after the accepts:\n{r}");
        assert!(r.contains("iifname \"ipop0\" oifname != \"ipop0\" masquerade"));
        assert!(r.starts_with("add table inet ipop-ipop0\ndelete table inet ipop-ipop0\n"));
        let v4_only = ruleset("t", "ipop0", &prefixes[..1], &sources);
        assert!(!v4_only.contains("ip6 daddr"));
    }
}
