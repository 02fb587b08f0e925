//! End-to-end tests of the overlays' addresses and names, with a real XMPP server: automatic
//! group addresses (distinct, remembered, moved on a collision), no traffic across overlays,
//! DNS names and address translation between friends, group membership taken away, and keys
//! pinned on first use until the user trusts a new one. Every scenario runs on Prosody and on
//! ejabberd, each with the config that docs/servers.md gives.
//!
//! Run as root: they create network namespaces and TUN devices.

use ipnet::IpNet;
use ipop_lab::{NetnsResolver, Node, ServerKind, wait_until};
use serde_json::Value;
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

mod common;
use common::*;

on_both_servers! {
    one_device_in_two_groups_has_no_cross_talk: "xcross";
    six_devices_get_distinct_automatic_addresses_that_survive_restarts: "xsix";
    a_forced_collision_is_resolved: "xclash";
    friends_reach_each_other_by_dns_name_and_tcp_is_translated: "xdns";
    a_member_removed_from_the_group_loses_its_links_within_5_s: "xremove";
    a_device_with_a_new_key_is_refused_until_trusted: "xpin";
    on_demand_links_open_with_the_first_packet_and_close_when_idle: "xdemand";
}

/// How long a new member's link may take to carry pings.
const LINK_TIMEOUT: Duration = Duration::from_secs(15);

/// A `[[groups]]` section for `room` in `subnet`, with an automatic address.
fn auto_group(room: &str, subnet: &str, create: bool) -> String {
    format!("[[groups]]\nroom = \"{room}\"\nsubnet = \"{subnet}\"\ncreate = {create}\n")
}

fn room(name: &str) -> String {
    format!("{name}@conference.{DOMAIN}")
}

fn jid(user: &str) -> String {
    format!("{user}@{DOMAIN}")
}

/// The overlay named `name` (a room, or `social`) in a status.
fn overlay<'a>(status: &'a Value, name: &str) -> Option<&'a Value> {
    status["overlays"]
        .as_array()?
        .iter()
        .find(|o| o["name"].as_str() == Some(name))
}

/// This device's own address of the given family in the overlay `name`, from its status.
/// Waits for the daemon to answer, since it may have just started.
fn own_address(node: &Node, name: &str, v4: bool) -> IpAddr {
    let what = format!("node {}'s own address in {name}", node.name);
    wait_until(Duration::from_secs(10), &what, || {
        let status = node.status()?;
        overlay(&status, name)
            .and_then(|o| o["addresses"].as_array())
            .into_iter()
            .flatten()
            .filter_map(|a| a.as_str()?.parse::<IpNet>().ok())
            .map(|n| n.addr())
            .find(|a| a.is_ipv4() == v4)
            .ok_or_else(|| status.to_string())
    })
}

fn own_v4(node: &Node, name: &str) -> Ipv4Addr {
    match own_address(node, name, true) {
        IpAddr::V4(a) => a,
        IpAddr::V6(a) => panic!("{a} is not IPv4"),
    }
}

/// The addresses `node`'s status lists for the device of `jid` in the overlay `name`.
fn peer_addresses(status: &Value, name: &str, jid: &str) -> Vec<IpAddr> {
    overlay(status, name)
        .and_then(|o| o["peers"].as_array())
        .into_iter()
        .flatten()
        .filter(|p| p["jid"].as_str() == Some(jid))
        .flat_map(|p| p["addresses"].as_array().into_iter().flatten())
        .filter_map(|a| a.as_str()?.parse::<IpNet>().ok())
        .map(|n| n.addr())
        .collect()
}

/// Whether the device of `jid` is listed as connected in any overlay of `status`.
fn connected_to(status: &Value, jid: &str) -> bool {
    status["overlays"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|o| o["peers"].as_array().into_iter().flatten())
        .any(|p| p["jid"].as_str() == Some(jid) && p["state"] == "connected")
}

fn drops(status: &Value, reason: &str) -> u64 {
    status["drops"][reason].as_u64().unwrap_or(0)
}

fn pings(node: &Node, addr: IpAddr) -> bool {
    node.ping(addr, 1).status.success()
}

fn wait_pings(node: &Node, addr: IpAddr, what: &str) {
    wait_until(LINK_TIMEOUT, what, || {
        if pings(node, addr) {
            Ok(())
        } else {
            Err(format!("no reply from {addr}"))
        }
    });
}

/// `getent DATABASE NAME` in the node's namespace: its exit code and the addresses it printed.
fn getent(node: &Node, database: &str, name: &str) -> (Option<i32>, Vec<IpAddr>) {
    let out = node.ns().try_exec(&["getent", database, name]);
    let addrs = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect::<BTreeSet<IpAddr>>()
        .into_iter()
        .collect();
    (out.status.code(), addrs)
}

/// Sends `data` over a new TCP connection from `client`'s namespace to `to`, where `server`
/// listens on `listen`; returns the peer address the server saw and the bytes it received.
fn tcp_transfer(
    server: &Node,
    listen: SocketAddr,
    client: &Node,
    to: SocketAddr,
    data: &[u8],
) -> (SocketAddr, Vec<u8>) {
    let listener = server
        .ns()
        .run_in(move || TcpListener::bind(listen))
        .unwrap_or_else(|e| panic!("cannot listen on {listen}: {e}"));
    std::thread::scope(|scope| {
        let accepted = scope.spawn(move || {
            let (mut stream, peer) = accept_within(&listener, Duration::from_secs(10));
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .expect("read timeout");
            let mut got = Vec::new();
            stream.read_to_end(&mut got).expect("read what was sent");
            (peer, got)
        });
        let mut stream = client
            .ns()
            .run_in(move || TcpStream::connect_timeout(&to, Duration::from_secs(5)))
            .unwrap_or_else(|e| panic!("cannot connect to {to}: {e}"));
        stream.write_all(data).expect("send");
        drop(stream);
        accepted.join().expect("the server thread")
    })
}

/// Accepts one connection, or panics after `timeout` (so that a failed connect cannot hang the
/// test).
fn accept_within(listener: &TcpListener, timeout: Duration) -> (TcpStream, SocketAddr) {
    listener
        .set_nonblocking(true)
        .expect("non-blocking listener");
    let (stream, peer) = wait_until(timeout, "a TCP connection", || {
        listener.accept().map_err(|e| e.to_string())
    });
    stream.set_nonblocking(false).expect("blocking stream");
    (stream, peer)
}

fn one_device_in_two_groups_has_no_cross_talk(kind: ServerKind, tag: &str) {
    let mut w = World::on(kind, tag, 4);
    let (g1, g2) = (room("g1"), room("g2"));
    let carol_overlays = format!(
        "{}\n{}",
        auto_group(&g1, "10.81.0.0/24", true),
        auto_group(&g2, "10.82.0.0/24", true)
    );
    w.server.register("carol", &password("carol"));
    w.server.register("dave", &password("dave"));
    w.server.register("erin", &password("erin"));
    w.configure(0, "carol", "desk", &carol_overlays);
    w.configure(1, "dave", "laptop", &auto_group(&g1, "10.81.0.0/24", false));
    w.configure(2, "erin", "tablet", &auto_group(&g2, "10.82.0.0/24", false));
    w.node(0).start();
    xmpp_online(w.node(0));
    group_member(&w.lab.nodes[0], "add", &g1, &jid("dave"));
    group_member(&w.lab.nodes[0], "add", &g2, &jid("erin"));
    w.node(1).start();
    w.node(2).start();

    let (carol, dave, erin) = (&w.lab.nodes[0], &w.lab.nodes[1], &w.lab.nodes[2]);
    let carol_g1 = own_address(carol, &g1, true);
    let carol_g1_v6 = own_address(carol, &g1, false);
    let carol_g2 = own_address(carol, &g2, true);
    let carol_g2_v6 = own_address(carol, &g2, false);
    let erin_g2 = own_address(erin, &g2, true);
    wait_pings(dave, carol_g1, "dave's device to ping carol's g1 address");
    assert!(pings(dave, carol_g1_v6), "dave cannot ping carol's g1 ULA");
    wait_pings(erin, carol_g2, "erin's device to ping carol's g2 address");
    assert!(pings(erin, carol_g2_v6), "erin cannot ping carol's g2 ULA");

    // Dave's kernel has no route into g2: his device only has g1's prefixes.
    assert!(!pings(dave, carol_g2), "dave reached carol's g2 address");
    // Even when Dave routes g2 into the tunnel himself, his ipop has no peer owning those
    // addresses: Carol's peer entry on Dave's side holds only her g1 addresses (the overlays
    // that authorise Dave), so the packets are dropped before encryption and counted as
    // `no_route` on Dave's side. `wrong_overlay` is Carol's guard for a decrypted packet from
    // Dave to one of her g2 addresses, which Dave's ipop never encrypts in the first place.
    let g2_v6 = IpNet::new(carol_g2_v6, 64).expect("prefix").trunc();
    dave.ns()
        .ip(&["route", "add", "10.82.0.0/24", "dev", "ipop0"]);
    dave.ns()
        .ip(&["-6", "route", "add", &g2_v6.to_string(), "dev", "ipop0"]);
    let before = drops(&dave.status().expect("dave's status"), "no_route");
    for target in [carol_g2, carol_g2_v6, erin_g2] {
        assert!(!pings(dave, target), "dave reached {target} in g2");
    }
    let d = dave.status().expect("dave's status");
    assert!(
        drops(&d, "no_route") >= before + 3,
        "dave's device does not count its packets into g2 as no_route: {d}"
    );
    assert!(
        peer_by_jid(&d, &jid("erin")).is_none(),
        "dave's device lists erin's: {d}"
    );
    let c = carol.status().expect("carol's status");
    let g2_peers: Vec<&Value> = overlay(&c, &g2)
        .and_then(|o| o["peers"].as_array())
        .into_iter()
        .flatten()
        .collect();
    assert!(
        g2_peers.iter().all(|p| p["jid"] == jid("erin").as_str()),
        "carol's g2 lists someone else than erin: {c}"
    );
    assert_eq!(
        drops(&c, "wrong_overlay"),
        0,
        "a packet for another overlay reached carol: {c}"
    );
    assert!(
        !peer_addresses(&c, &g1, &jid("dave")).is_empty(),
        "carol's g1 does not list dave's addresses: {c}"
    );
    w.lab.stop_all();
}

fn six_devices_get_distinct_automatic_addresses_that_survive_restarts(kind: ServerKind, tag: &str) {
    const USERS: [&str; 6] = ["amy", "ben", "cho", "dov", "eli", "fay"];
    let mut w = World::on(kind, tag, 6);
    let lab = room("six");
    let subnet: ipnet::Ipv4Net = "10.84.0.0/24".parse().expect("subnet");
    for (i, user) in USERS.iter().enumerate() {
        w.server.register(user, &password(user));
        w.configure(i, user, "pc", &auto_group(&lab, "10.84.0.0/24", i == 0));
    }
    w.node(0).start();
    xmpp_online(w.node(0));
    for user in &USERS[1..] {
        group_member(&w.lab.nodes[0], "add", &lab, &jid(user));
    }
    for i in 1..USERS.len() {
        w.node(i).start();
    }
    // Two keys may hash to one address: it is settled once the devices see each other.
    for (i, user) in USERS.iter().enumerate() {
        let others: Vec<String> = USERS
            .iter()
            .filter(|u| *u != user)
            .map(|u| jid(u))
            .collect();
        w.node(i)
            .wait_status(LINK_TIMEOUT, "links to the five others", |s| {
                others.iter().all(|o| connected_to(s, o))
            });
    }

    let addresses: Vec<Ipv4Addr> = (0..USERS.len())
        .map(|i| own_v4(&w.lab.nodes[i], &lab))
        .collect();
    let distinct: BTreeSet<&Ipv4Addr> = addresses.iter().collect();
    assert_eq!(distinct.len(), USERS.len(), "addresses: {addresses:?}");
    for a in &addresses {
        assert!(
            subnet.contains(a) && *a != subnet.network() && *a != subnet.broadcast(),
            "{a} is not a host address of {subnet}"
        );
    }
    let ring = |w: &World| {
        for (i, (node, user)) in w.lab.nodes.iter().zip(USERS).enumerate() {
            for step in [1, 2] {
                let j = (i + step) % USERS.len();
                wait_pings(
                    node,
                    IpAddr::V4(addresses[j]),
                    &format!("{user}'s device to ping {}'s", USERS[j]),
                );
            }
        }
    };
    ring(&w);

    for (i, user) in USERS.iter().enumerate() {
        let status = w.node(i).stop();
        assert!(status.success(), "{user}'s daemon ended with {status}");
    }
    for i in 0..USERS.len() {
        w.node(i).start();
    }
    for (i, a) in addresses.iter().enumerate() {
        assert_eq!(
            own_v4(&w.lab.nodes[i], &lab),
            *a,
            "{}'s address changed across a restart",
            USERS[i]
        );
    }
    ring(&w);
    w.lab.stop_all();
}

fn a_forced_collision_is_resolved(kind: ServerKind, tag: &str) {
    let mut w = World::on(kind, tag, 2);
    let clash = room("clash");
    let contested: Ipv4Addr = "10.83.0.7".parse().expect("address");
    w.server.register("carol", &password("carol"));
    w.server.register("david", &password("david"));
    w.configure(
        0,
        "carol",
        "desk",
        &auto_group(&clash, "10.83.0.0/24", true),
    );
    w.configure(
        1,
        "david",
        "laptop",
        &auto_group(&clash, "10.83.0.0/24", false),
    );
    // Both devices remember the same address from an earlier run.
    for node in &w.lab.nodes[..2] {
        let dir = node.dir.join("state");
        std::fs::create_dir_all(&dir).expect("state dir");
        std::fs::write(
            dir.join("state.json"),
            format!("{{\"groups\": {{\"{clash}\": \"{contested}\"}}}}"),
        )
        .expect("write state.json");
    }
    w.node(0).start();
    xmpp_online(w.node(0));
    assert_eq!(own_v4(&w.lab.nodes[0], &clash), contested);
    group_member(&w.lab.nodes[0], "add", &clash, &jid("david"));
    w.node(1).start();

    // carol@example.org/desk sorts before david@example.org/laptop: Carol keeps it.
    let moved = wait_until(
        Duration::from_secs(10),
        "david's device to move",
        || match own_v4(&w.lab.nodes[1], &clash) {
            a if a == contested => Err(a.to_string()),
            a => Ok(a),
        },
    );
    assert!(
        "10.83.0.0/24"
            .parse::<ipnet::Ipv4Net>()
            .expect("subnet")
            .contains(&moved),
        "{moved} is outside the subnet"
    );
    let (carol, david) = (&w.lab.nodes[0], &w.lab.nodes[1]);
    assert_eq!(own_v4(carol, &clash), contested, "carol's device moved");
    let log = std::fs::read_to_string(david.log_path()).expect("david's log");
    assert!(
        log.lines()
            .any(|l| l.contains("this device's address moved")
                && l.contains(&format!("old={contested}"))
                && l.contains(&format!("new={moved}"))),
        "david's log does not say it moved from {contested} to {moved}"
    );
    let log = std::fs::read_to_string(carol.log_path()).expect("carol's log");
    assert!(
        !log.contains("this device's address moved"),
        "carol's log says it moved"
    );
    wait_pings(
        david,
        IpAddr::V4(contested),
        "david's device to ping carol's",
    );
    wait_pings(carol, IpAddr::V4(moved), "carol's device to ping david's");

    let status = w.node(1).stop();
    assert!(status.success(), "david's daemon ended with {status}");
    w.node(1).start();
    assert_eq!(
        own_v4(&w.lab.nodes[1], &clash),
        moved,
        "david's device forgot its new address"
    );
    wait_pings(
        &w.lab.nodes[1],
        IpAddr::V4(contested),
        "david's device to ping carol's after the restart",
    );
    assert_eq!(own_v4(&w.lab.nodes[0], &clash), contested);
    w.lab.stop_all();
}

/// Alice's laptop and Bob's phone, friends with the default `[social]` section, linked.
fn linked_friends(kind: ServerKind, tag: &str) -> World {
    let (w, _alice, _bob) = start_friends_on(kind, tag, "[social]\n", "[social]\n");
    wait_social_ping(
        &w.lab.nodes[0],
        &jid("bob"),
        LINK_TIMEOUT,
        "alice's device to ping bob's",
    );
    w
}

fn friends_reach_each_other_by_dns_name_and_tcp_is_translated(kind: ServerKind, tag: &str) {
    // Both number their friends in the default 172.31.0.0/16 and are 172.31.0.1 in it.
    let mut w = linked_friends(kind, tag);
    let (a, b) = (&w.lab.nodes[0], &w.lab.nodes[1]);
    let alice_own = own_address(a, "social", true);
    let bob_own = own_address(b, "social", true);
    let status = a.status().expect("alice's status");
    let bob_as_seen = peer_addresses(&status, "social", &jid("bob"));
    let bob_v4 = *bob_as_seen.iter().find(|x| x.is_ipv4()).expect("bob's v4");
    let bob_v6 = *bob_as_seen.iter().find(|x| x.is_ipv6()).expect("bob's ULA");
    assert_eq!(
        bob_v6,
        own_address(b, "social", false),
        "IPv6 unique local addresses are not translated"
    );
    let status = b.status().expect("bob's status");
    let alice_as_seen = peer_addresses(&status, "social", &jid("alice"));
    let alice_v4 = *alice_as_seen
        .iter()
        .find(|x| x.is_ipv4())
        .expect("alice's v4");

    let _resolver = NetnsResolver::new(a.ns(), alice_own);
    // The daemon brings its names up to date with its links twice a second.
    wait_until(
        Duration::from_secs(2),
        "bob's device to have a name on alice's",
        || match getent(a, "ahostsv4", "phone.bob.example.org.ipop") {
            (Some(0), _) => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    for name in ["phone.bob.example.org.ipop", "bob.example.org.ipop"] {
        assert_eq!(
            getent(a, "ahostsv4", name),
            (Some(0), vec![bob_v4]),
            "{name}"
        );
        assert_eq!(
            getent(a, "ahostsv6", name),
            (Some(0), vec![bob_v6]),
            "{name}"
        );
    }
    for unknown in ["tablet.bob.example.org.ipop", "carol.example.org.ipop"] {
        assert_eq!(
            getent(a, "hosts", unknown),
            (Some(2), Vec::new()),
            "{unknown}"
        );
    }
    for family in ["-4", "-6"] {
        let out = a.ns().try_exec(&[
            "ping",
            family,
            "-n",
            "-c",
            "1",
            "-W",
            "2",
            "phone.bob.example.org.ipop",
        ]);
        assert!(
            out.status.success(),
            "ping {family} by name failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let (seen, got) = tcp_transfer(
        b,
        SocketAddr::new(bob_own, 7001),
        a,
        SocketAddr::new(bob_v4, 7001),
        &data,
    );
    assert_eq!(
        seen.ip(),
        alice_v4,
        "bob's side sees alice's connection from {seen}, not from the address bob's status lists for her"
    );
    assert!(got == data, "bytes from alice to bob arrived changed");
    let (seen, got) = tcp_transfer(
        a,
        SocketAddr::new(alice_own, 7002),
        b,
        SocketAddr::new(alice_v4, 7002),
        &data,
    );
    assert_eq!(
        seen.ip(),
        bob_v4,
        "alice's side sees bob's connection from {seen}, not from the address alice's status lists for him"
    );
    assert!(got == data, "bytes from bob to alice arrived changed");
    w.lab.stop_all();
}

fn a_member_removed_from_the_group_loses_its_links_within_5_s(kind: ServerKind, tag: &str) {
    let mut w = World::on(kind, tag, 2);
    let lab = room("lab");
    w.server.register("carol", &password("carol"));
    w.server.register("david", &password("david"));
    w.configure(0, "carol", "desk", &auto_group(&lab, "10.85.0.0/24", true));
    w.configure(
        1,
        "david",
        "laptop",
        &auto_group(&lab, "10.85.0.0/24", false),
    );
    w.node(0).start();
    xmpp_online(w.node(0));
    group_member(&w.lab.nodes[0], "add", &lab, &jid("david"));
    w.node(1).start();
    let (carol, david) = (&w.lab.nodes[0], &w.lab.nodes[1]);
    let carol_addr = own_address(carol, &lab, true);
    let david_addr = own_address(david, &lab, true);
    wait_pings(david, carol_addr, "david's device to ping carol's");
    wait_pings(carol, david_addr, "carol's device to ping david's");

    group_member(carol, "remove", &lab, &jid("david"));
    wait_until(
        Duration::from_secs(5),
        "both devices to drop the link",
        || {
            let c = carol.status()?;
            let d = david.status()?;
            if connected_to(&c, &jid("david")) || connected_to(&d, &jid("carol")) {
                Err(format!("carol: {c}\ndavid: {d}"))
            } else {
                Ok(())
            }
        },
    );
    std::thread::sleep(Duration::from_secs(3));
    assert!(!pings(david, carol_addr), "david still reaches carol");
    assert!(!pings(carol, david_addr), "carol still reaches david");
    w.lab.stop_all();
}

fn a_device_with_a_new_key_is_refused_until_trusted(kind: ServerKind, tag: &str) {
    let mut w = linked_friends(kind, tag);
    let bob_addr = social_addr(&w.lab.nodes[0], &jid("bob")).expect("bob's address");

    // Bob's device comes back with a new key and the same config.
    let status = w.node(1).stop();
    assert!(status.success(), "bob's daemon ended with {status}");
    let new_key = w.lab.spare_key("bob-new-key");
    std::fs::copy(
        w.lab.dir.path().join("bob-new-key").join("ipop.key"),
        w.lab.nodes[1].dir.join("ipop.key"),
    )
    .expect("replace bob's key");
    w.node(1).public_key = new_key.clone();
    w.node(1).start();

    let untrusted = |node: &mut Node| {
        node.wait_status(Duration::from_secs(15), "bob's device untrusted", |s| {
            s["overlays"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|o| o["peers"].as_array().into_iter().flatten())
                .any(|p| p["jid"] == jid("bob").as_str() && p["state"] == "untrusted")
        })
    };
    let s = untrusted(w.node(0));
    let bob_entry = overlay(&s, "social")
        .and_then(|o| o["peers"].as_array())
        .into_iter()
        .flatten()
        .find(|p| p["jid"] == jid("bob").as_str())
        .expect("bob listed in alice's social overlay");
    assert_eq!(bob_entry["state"], "untrusted", "{s}");
    assert_eq!(bob_entry["id"], new_key.as_str(), "{s}");
    let reason = bob_entry["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("ipop trust bob@example.org/phone"),
        "the reason does not say what to run: {reason}"
    );
    assert!(drops(&s, "key_not_trusted") >= 1, "{s}");
    assert!(!connected_to(&s, &jid("bob")), "{s}");
    assert!(
        !pings(&w.lab.nodes[0], bob_addr),
        "alice reaches bob's device"
    );

    // The pin survives a restart of Alice's daemon.
    let status = w.node(0).stop();
    assert!(status.success(), "alice's daemon ended with {status}");
    w.node(0).start();
    xmpp_online(w.node(0));
    let s = untrusted(w.node(0));
    assert!(drops(&s, "key_not_trusted") >= 1, "{s}");
    assert!(
        !pings(&w.lab.nodes[0], bob_addr),
        "alice reaches bob's device"
    );

    let out = ipop(&w.lab.nodes[0], &["trust", "bob@example.org/phone"]);
    assert!(
        out.status.success(),
        "ipop trust failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_social_ping(
        &w.lab.nodes[0],
        &jid("bob"),
        LINK_TIMEOUT,
        "alice's device to ping bob's once trusted",
    );
    let s = w.node(0).status().expect("alice's status");
    let bob_entry = peer_by_jid(&s, &jid("bob")).expect("bob listed");
    assert_eq!(bob_entry["state"], "connected", "{s}");
    assert_eq!(bob_entry["id"], new_key.as_str(), "{s}");
    assert!(
        social_ping(&w.lab.nodes[1], &jid("alice")),
        "bob's device cannot ping alice's"
    );
    w.lab.stop_all();
}

/// The state `status` shows for the device of `jid` in the overlay `name`.
fn state_in<'a>(status: &'a Value, name: &str, jid: &str) -> Option<&'a str> {
    overlay(status, name)?["peers"]
        .as_array()?
        .iter()
        .find(|p| p["jid"].as_str() == Some(jid))?["state"]
        .as_str()
}

/// The round-trip time a successful `ping` printed for its first reply.
fn first_reply_time(out: &std::process::Output) -> Option<Duration> {
    let text = String::from_utf8_lossy(&out.stdout);
    let ms: f64 = text
        .lines()
        .find(|l| l.contains("icmp_seq=1 "))?
        .split("time=")
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(Duration::from_secs_f64(ms / 1000.0))
}

fn on_demand_links_open_with_the_first_packet_and_close_when_idle(kind: ServerKind, tag: &str) {
    let mut w = World::on(kind, tag, 3);
    let lab = room("demand");
    let idle = Duration::from_secs(5);
    let on_demand = |create: bool| {
        format!(
            "{}links = \"on-demand\"\nidle_timeout = \"5s\"\n",
            auto_group(&lab, "10.86.0.0/24", create)
        )
    };
    let users = ["carol", "david", "erin"];
    for (i, user) in users.iter().enumerate() {
        w.server.register(user, &password(user));
        w.configure(i, user, "laptop", &on_demand(i == 0));
    }
    w.node(0).start();
    xmpp_online(w.node(0));
    for user in &users[1..] {
        group_member(&w.lab.nodes[0], "add", &lab, &jid(user));
    }
    w.node(1).start();
    w.node(2).start();

    // Everyone sees the others, with their addresses, and links with nobody.
    for (i, user) in users.iter().enumerate() {
        let others: Vec<String> = users
            .iter()
            .filter(|u| *u != user)
            .map(|u| jid(u))
            .collect();
        let s = w
            .node(i)
            .wait_status(LINK_TIMEOUT, "the others listed idle", |s| {
                others.iter().all(|o| {
                    state_in(s, &lab, o) == Some("idle") && !peer_addresses(s, &lab, o).is_empty()
                })
            });
        for o in &others {
            let p = peer_by_jid(&s, o).expect("listed");
            assert!(
                p["endpoint"].is_null() && p["rx_bytes"] == 0 && p["tx_bytes"] == 0,
                "{user}'s device has a link to {o}: {s}"
            );
        }
    }
    let (carol, david) = (&w.lab.nodes[0], &w.lab.nodes[1]);
    let status = carol.status().expect("carol's status");
    let david_v4 = *peer_addresses(&status, &lab, &jid("david"))
        .iter()
        .find(|a| a.is_ipv4())
        .expect("david's address in carol's status");
    assert_eq!(david_v4, own_address(david, &lab, true));

    // Names resolve without a link.
    let _resolver = NetnsResolver::new(carol.ns(), own_address(carol, &lab, true));
    wait_until(
        Duration::from_secs(2),
        "david's idle device to have a name on carol's",
        || match getent(carol, "ahostsv4", "laptop.david.example.org.ipop") {
            (Some(0), a) if a == vec![david_v4] => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );

    // One echo request, the first packet for David's device: it opens the link and is
    // answered. Had it been dropped while the link came up, this ping would fail.
    let started = std::time::Instant::now();
    let out = carol
        .ns()
        .try_exec(&["ping", "-n", "-c", "1", "-W", "5", &david_v4.to_string()]);
    let wall = started.elapsed();
    assert!(
        out.status.success(),
        "the first echo request to david's idle device went unanswered: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let setup = first_reply_time(&out).expect("ping printed the reply's time");
    eprintln!(
        "on-demand link set-up, first packet to first reply: {:.1} ms (ping ran {:.1} ms)",
        setup.as_secs_f64() * 1000.0,
        wall.as_secs_f64() * 1000.0
    );
    assert!(
        setup < Duration::from_secs(1),
        "the first reply took {setup:?} (target under 1 s on a LAN)"
    );
    let c = carol.status().expect("carol's status");
    assert_eq!(state_in(&c, &lab, &jid("david")), Some("connected"), "{c}");
    assert_eq!(state_in(&c, &lab, &jid("erin")), Some("idle"), "{c}");
    let e = w.lab.nodes[2].status().expect("erin's status");
    assert_eq!(state_in(&e, &lab, &jid("carol")), Some("idle"), "{e}");
    assert_eq!(state_in(&e, &lab, &jid("david")), Some("idle"), "{e}");

    // No data for the idle time: both ends close the link.
    let closed_by = std::time::Instant::now();
    for (i, other) in [(0, "david"), (1, "carol")] {
        w.node(i)
            .wait_status(idle + Duration::from_secs(10), "the link idle again", |s| {
                state_in(s, &lab, &jid(other)) == Some("idle")
                    && peer_by_jid(s, &jid(other)).is_some_and(|p| p["endpoint"].is_null())
            });
    }
    eprintln!(
        "the idle link closed on both ends {:.1} s after the last ping",
        closed_by.elapsed().as_secs_f64()
    );
    let logs = [&w.lab.nodes[0], &w.lab.nodes[1]]
        .map(|n| std::fs::read_to_string(n.log_path()).expect("log"))
        .concat();
    assert!(
        logs.contains("no data on the on-demand link for its idle time"),
        "neither side says it closed the link for want of data"
    );

    // Traffic opens it again, from either side.
    let carol_v4 = own_address(&w.lab.nodes[0], &lab, true);
    assert!(
        pings(&w.lab.nodes[1], carol_v4),
        "david's device cannot reach carol's once the link went idle"
    );
    w.lab.stop_all();
}
