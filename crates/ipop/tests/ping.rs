//! `ipop ping JID/DEVICE` between two friends' devices on a LAN whose links are on demand: the
//! first probe sets the link up, every probe is answered through the tunnel and the path is
//! named; a device this one does not link with is refused with the reason. (The relayed path:
//! `crates/ipop/tests/nat.rs`.)
//!
//! Run as root: the test creates network namespaces and TUN devices.

use ipop_lab::wait_until;
use std::time::Duration;

mod common;
use common::*;

const BOB: &str = "bob@example.org";

fn on_demand(cidr: &str) -> String {
    format!("{}links = \"on-demand\"\n", social(cidr))
}

#[test]
fn ping_sets_up_an_idle_link_names_its_path_and_refuses_strangers() {
    let (mut w, _alice, _bob) = start_friends(
        "ping",
        &on_demand("10.78.0.1/16"),
        &on_demand("10.78.0.2/16"),
    );
    xmpp_online(w.node(0));
    xmpp_online(w.node(1));
    let alice = &w.lab.nodes[0];
    wait_until(
        Duration::from_secs(15),
        "alice's device to list bob's phone, idle",
        || {
            let status = alice.status()?;
            match peer_by_jid(&status, BOB).and_then(|p| p["state"].as_str()) {
                Some("idle") => Ok(()),
                other => Err(format!("bob's phone is {other:?}: {status}")),
            }
        },
    );

    let out = ipop(alice, &["ping", "bob@example.org/phone", "-n", "3"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let why = format!(
        "{}\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{stdout}");
    assert!(out.status.success(), "ipop ping: {why}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(
        lines[0].contains("no link yet (on demand); the first probe sets it up"),
        "{why}"
    );
    let phone = &w.lab.nodes[1].host;
    let endpoints = [
        format!(" ms via direct {}:51820 ", phone.ipv4),
        format!(" ms via direct [{}]:51820 ", phone.ipv6),
    ];
    for seq in 1..=3 {
        let line = lines
            .iter()
            .find(|l| l.starts_with(&format!("probe {seq}: reply in ")))
            .unwrap_or_else(|| panic!("no reply line for probe {seq}: {why}"));
        assert!(
            endpoints.iter().any(|e| line.contains(e.as_str())),
            "probe {seq} answered through the direct path to bob's phone: {why}"
        );
    }
    assert!(
        stdout.contains("bob@example.org/phone: 3 probes, 3 replies; rtt min/avg/max "),
        "{why}"
    );
    let status = alice.status().expect("alice's status");
    assert_eq!(
        peer_by_jid(&status, BOB).and_then(|p| p["state"].as_str()),
        Some("connected"),
        "the probes set the link up: {status}"
    );

    for (device, refusal) in [
        (
            "carol@example.org/tablet",
            "carol@example.org/tablet is not a device this one links with",
        ),
        ("bob@example.org/laptop", "not a device this one links with"),
        ("bob@example.org", "is not JID/DEVICE"),
    ] {
        let out = ipop(alice, &["ping", device, "-n", "1"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(refusal),
            "ipop ping {device}: {}\n{stderr}",
            out.status
        );
    }
}
