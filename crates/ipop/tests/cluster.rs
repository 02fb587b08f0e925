//! ipop on a two-node ejabberd cluster: each node runs in its own namespace, the second joins
//! the first with `ejabberdctl join_cluster` (Erlang distribution between them, shared
//! Mnesia). Alice's device logs in to one node and Bob's to the other; they are friends and
//! share a group room, and both links carry pings.
//!
//! Run as root: it creates network namespaces and TUN devices.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use ipop_lab::{Ejabberd, Lab, TestCa, XmppUser, wait_until};

mod common;
use common::*;

/// How long a link may take to carry pings once both devices run.
const LINK_TIMEOUT: Duration = Duration::from_secs(20);

/// The node of the cluster that holds `jid`'s session, if any.
fn session_node(server: &Ejabberd, jid: &str) -> Option<String> {
    server
        .sessions()
        .into_iter()
        .find(|(session, _)| session == jid)
        .map(|(_, node)| node)
}

#[test]
fn friends_and_a_group_link_across_two_nodes_of_an_ejabberd_cluster() {
    let started = Instant::now();
    let mut lab = Lab::new(BIN, "xclust", 4);
    let ca = TestCa::new("ipop-lab test CA for an ejabberd cluster");
    let node = |i: usize| {
        let host = &lab.nodes[i].host;
        (&host.ns, IpAddr::V4(host.ipv4))
    };
    let (ns, ip) = node(2);
    let first = Ejabberd::builder(DOMAIN)
        .in_netns(ns, ip)
        .ca(&ca)
        .clustered()
        .start();
    let (ns, ip) = node(3);
    let mut second = Ejabberd::builder(DOMAIN)
        .in_netns(ns, ip)
        .ca(&ca)
        .cluster_of(&first)
        .start();
    second.join_cluster(&first);
    eprintln!(
        "cluster of {} and {} up after {:.1} s",
        first.node(),
        second.node(),
        started.elapsed().as_secs_f64()
    );

    // Accounts live in the shared database: each user is made on one node and logs in to
    // the other.
    first.register("bob", &password("bob"));
    second.register("alice", &password("alice"));
    let mut alice = XmppUser::builder(&first, "alice", &password("alice"))
        .resource("chat")
        .netns(lab.nodes[2].ns())
        .connect();
    let mut bob = XmppUser::builder(&second, "bob", &password("bob"))
        .resource("chat")
        .netns(lab.nodes[3].ns())
        .connect();
    alice.befriend(&mut bob);

    let room = format!("lab@conference.{DOMAIN}");
    configure(
        &lab.nodes[0],
        &first,
        "alice",
        "laptop",
        &format!(
            "{}\n{}",
            social("10.78.0.1/16"),
            group(&room, "10.79.0.1/24", true)
        ),
    );
    configure(
        &lab.nodes[1],
        &second,
        "bob",
        "phone",
        &format!(
            "{}\n{}",
            social("10.78.0.2/16"),
            group(&room, "10.79.0.2/24", false)
        ),
    );
    lab.nodes[0].start();
    xmpp_online(&mut lab.nodes[0]);
    group_member(&lab.nodes[0], "add", &room, "bob@example.org");
    let bob_started = Instant::now();
    lab.nodes[1].start();
    xmpp_online(&mut lab.nodes[1]);

    // Each device is on its own node of the cluster.
    for (jid, server, other) in [
        ("alice@example.org/laptop", &first, &second),
        ("bob@example.org/phone", &second, &first),
    ] {
        let on = wait_until(Duration::from_secs(5), "the session listed", || {
            session_node(other, jid).ok_or_else(|| format!("{:?}", other.sessions()))
        });
        assert_eq!(on, server.node(), "{jid} is connected to {on}");
    }

    wait_social_ping(
        &lab.nodes[0],
        "bob@example.org",
        LINK_TIMEOUT,
        "alice's device to ping bob's as a friend, across the cluster",
    );
    assert!(
        social_ping(&lab.nodes[1], "alice@example.org"),
        "bob's device cannot ping alice's as a friend"
    );
    wait_ping(
        &lab.nodes[1],
        "10.79.0.1",
        LINK_TIMEOUT,
        "bob's device to ping alice's in the group, across the cluster",
    );
    assert!(
        ping_ok(&lab.nodes[0], "10.79.0.2"),
        "alice's device cannot ping bob's in the group"
    );
    eprintln!(
        "friend and group links carry pings {:.1} s after bob's device started",
        bob_started.elapsed().as_secs_f64()
    );

    let status = lab.nodes[0].status().expect("alice's status");
    let kinds: Vec<&str> = status["overlays"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|o| {
            o["peers"].as_array().is_some_and(|peers| {
                peers
                    .iter()
                    .any(|p| p["jid"] == "bob@example.org" && p["state"] == "connected")
            })
        })
        .filter_map(|o| o["kind"].as_str())
        .collect();
    assert_eq!(
        kinds,
        ["social", "group"],
        "alice's device is not linked with bob's in both overlays: {status}"
    );
    lab.stop_all();
}
