//! End-to-end tests of ipop with a real XMPP server: Prosody or ejabberd runs on a host of the
//! LAN, users are registered and make friends (or groups) the way people do, over XMPP, and
//! ipop daemons in other namespaces find each other and link with no static peers configured.
//! Every scenario runs on both servers, each with the config that docs/servers.md gives.
//!
//! Run as root: they create network namespaces and TUN devices.

use ipop_core::osn::{LinkOffer, Signal};
use ipop_lab::Jid;
use ipop_lab::tokio_xmpp::IqRequest;
use ipop_lab::tokio_xmpp::minidom::Element;
use ipop_lab::tokio_xmpp::minidom::rxml::NcName;
use ipop_lab::tokio_xmpp::parsers::presence::{Presence, Type as PresenceType};
use ipop_lab::{ServerKind, Subscription, XmppUser, wait_until};
use serde_json::Value;
use std::time::{Duration, Instant};

mod common;
use common::*;

on_both_servers! {
    friends_devices_link_and_ping_within_3_s: "xfriend";
    a_stranger_gets_no_link_and_both_sides_count_the_refusal: "xeve";
    a_friend_announcing_another_devices_key_is_refused_and_that_device_keeps_its_link: "xclaim";
    a_wrong_password_fails_clearly_within_15_s: "xbadpw";
    the_chat_client_still_gets_messages_sent_to_the_bare_jid: "xchat";
    carol_creates_a_group_david_is_added_and_their_devices_ping: "xgroup";
    links_survive_an_xmpp_outage_and_new_devices_join_after_it: "xoutage";
    unfriending_tears_the_link_down_on_both_sides_within_5_s: "xunfr";
    a_users_own_devices_link_with_each_other: "xown";
}

fn friends_devices_link_and_ping_within_3_s(kind: ServerKind, tag: &str) {
    let (mut w, _alice, _bob) =
        start_friends_on(kind, tag, &social("10.78.0.1/16"), &social("10.78.0.2/16"));
    xmpp_online(w.node(0));
    xmpp_online(w.node(1));
    let both_up = Instant::now();
    wait_until(
        Duration::from_secs(3),
        "alice's device to ping bob's",
        || {
            if social_ping(&w.lab.nodes[0], "bob@example.org") {
                Ok(())
            } else {
                Err("no reply".to_owned())
            }
        },
    );
    let took = both_up.elapsed();
    assert!(
        social_ping(&w.lab.nodes[1], "alice@example.org"),
        "bob's device cannot ping alice's"
    );
    eprintln!("first ping reply {took:?} after both devices were online");

    let status = w.node(0).status().expect("status");
    let bob_peer = peer_by_jid(&status, "bob@example.org").expect("bob listed");
    assert_eq!(bob_peer["device"], "phone");
    assert_eq!(bob_peer["state"], "connected");
    assert_eq!(bob_peer["path"], "direct");
    let pair = bob_peer["pair"].as_str().unwrap_or_default();
    assert!(
        pair.starts_with("host ") && pair.contains(" -> host "),
        "pair {pair}"
    );
    assert_eq!(status["xmpp"]["jid"], "alice@example.org/laptop");
    w.lab.stop_all();
}

fn a_stranger_gets_no_link_and_both_sides_count_the_refusal(kind: ServerKind, tag: &str) {
    let mut w = World::on(kind, tag, 2);
    let mut alice = w.user("alice");
    let mut eve = w.user("eve");
    // Eve asks to see Alice's presence and Alice's chat client agrees, one way only: Eve sees
    // Alice's devices, but the subscription is not mutual, so they are not friends.
    let alice_jid = alice.jid().clone();
    let eve_jid = eve.jid().clone();
    eve.send(
        Presence::new(PresenceType::Subscribe)
            .with_to(alice_jid.clone())
            .into(),
    );
    std::thread::sleep(Duration::from_millis(500));
    alice.send(
        Presence::new(PresenceType::Subscribed)
            .with_to(eve_jid.clone())
            .into(),
    );
    wait_until(
        Duration::from_secs(5),
        "eve to see alice one way",
        || match eve.subscription(&alice_jid) {
            Some(Subscription::To) => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    w.configure(0, "alice", "laptop", &social("10.78.0.1/16"));
    w.configure(1, "eve", "pc", &social("10.78.0.5/16"));
    w.node(0).start();
    w.node(1).start();
    xmpp_online(w.node(0));
    xmpp_online(w.node(1));
    // Eve's device sees Alice's but must refuse it. Eve then offers a link from her chat
    // client, as a tampered ipop would: Alice's device must refuse it.
    let eve_key: ipop_core::PublicKey = w.lab.nodes[1].public_key.parse().expect("eve's key");
    let offer = Signal::Initiate {
        session: "eve-was-here".to_owned(),
        offer: LinkOffer {
            key: eve_key,
            ufrag: "evee".to_owned(),
            pwd: "eve-password-long-enough".to_owned(),
            candidates: Vec::new(),
        },
    };
    let (jingle, _) = ipop_xmpp::jingle::to_element(&offer, &Jid::from(eve.full_jid()));
    let alice_device: Jid = format!("alice@{DOMAIN}/laptop").parse().expect("jid");
    let answer = eve
        .try_iq(Some(alice_device), IqRequest::Set(jingle))
        .expect("alice's device answers");
    assert!(
        answer
            .as_ref()
            .is_err_and(|e| e.contains("service-unavailable")),
        "a stranger's offer must get service-unavailable, as if no ipop ran there: {answer:?}"
    );
    std::thread::sleep(Duration::from_secs(4));
    assert!(
        !social_ping(&w.lab.nodes[1], "alice@example.org"),
        "eve reached alice's device"
    );
    let a = w.node(0).status().expect("alice status");
    assert!(
        peer_by_jid(&a, "eve@example.org").is_none(),
        "alice lists eve: {a}"
    );
    // The XMPP binding refuses it before the core sees it, as a device without ipop would.
    assert!(
        a["xmpp"]["drops"]["jingle-from-stranger"].as_u64() >= Some(1),
        "alice's device does not count eve's offer as refused: {a}"
    );
    let log = std::fs::read_to_string(w.lab.nodes[0].log_path()).expect("log");
    assert!(
        log.contains("refused a link offer"),
        "alice's log does not say why"
    );
    let e = w.node(1).status().expect("eve status");
    let alice = peer_by_jid(&e, "alice@example.org").expect("eve lists alice, not linked");
    assert_eq!(alice["state"], "refused", "{e}");
    assert!(
        alice["reason"]
            .as_str()
            .is_some_and(|r| r.contains("not authorised")),
        "{e}"
    );
    assert!(
        e["drops"]["device_not_authorised"].as_u64() >= Some(1),
        "eve's device does not count alice's as refused: {e}"
    );
    let log = std::fs::read_to_string(w.lab.nodes[1].log_path()).expect("log");
    assert!(log.contains("not authorised"), "eve's log does not say why");
    w.lab.stop_all();
}

/// The presence with which an ipop device announces `key` (see docs/protocol.md), with the
/// negative priority ipop uses.
fn ipop_presence(key: &ipop_core::PublicKey) -> Presence {
    let attr = NcName::try_from("key").expect("an attribute name");
    let ipop = Element::builder("ipop", ipop_xmpp::NS_IPOP)
        .attr(attr, key.to_string())
        .build();
    let mut presence = Presence::available().with_payloads(vec![ipop]);
    presence.priority = ipop_lab::tokio_xmpp::parsers::presence::Priority(-1);
    presence
}

fn a_friend_announcing_another_devices_key_is_refused_and_that_device_keeps_its_link(
    kind: ServerKind,
    tag: &str,
) {
    let mut w = World::on(kind, tag, 3);
    let mut alice = w.user("alice");
    let mut bob = w.user("bob");
    let mut carol = w.user("carol");
    alice.befriend(&mut bob);
    alice.befriend(&mut carol);
    w.configure(0, "alice", "laptop", &social("10.78.0.1/16"));
    w.configure(1, "bob", "phone", &social("10.78.0.2/16"));
    w.configure(2, "carol", "tablet", &social("10.78.0.3/16"));
    for i in 0..3 {
        w.node(i).start();
    }
    for friend in ["bob@example.org", "carol@example.org"] {
        wait_social_ping(
            &w.lab.nodes[0],
            friend,
            Duration::from_secs(15),
            &format!("alice's device to ping {friend}'s"),
        );
    }
    let carol_addr = social_addr(&w.lab.nodes[0], "carol@example.org").expect("carol's address");
    let carol_key: ipop_core::PublicKey = w.lab.nodes[2].public_key.parse().expect("carol's key");

    // Alice pings Carol's device at 20/s while Bob, her friend, announces ipop with Carol's
    // device's key from another resource of his, as a tampered client would.
    let mut pinger = w.lab.nodes[0].ns().command("ping");
    pinger.args(["-q", "-n", "-i", "0.05", "-c", "100", "-W", "1"]);
    pinger.arg(carol_addr.to_string());
    let mut fake = XmppUser::builder(w.server.as_ref(), "bob", &password("bob"))
        .resource("fake")
        .netns(w.server_ns())
        .initial_presence(None)
        .connect();
    let out = std::thread::scope(|scope| {
        let flood = scope.spawn(move || pinger.output());
        std::thread::sleep(Duration::from_secs(1));
        fake.send(ipop_presence(&carol_key).into());
        flood.join().expect("ping thread")
    })
    .expect("ping runs");
    let summary = String::from_utf8_lossy(&out.stdout);
    let loss: f64 = summary
        .split(", ")
        .find_map(|part| part.strip_suffix("% packet loss"))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no loss figure in ping's output: {summary}"));
    eprintln!("pings to carol's device while bob's client claimed its key: {loss}% loss");
    // One late reply is the machine's doing; a link torn down and set up again loses far more.
    assert!(
        loss <= 1.0,
        "alice's pings to carol's device were lost: {summary}"
    );

    let s = w.node(0).wait_status(
        Duration::from_secs(10),
        "alice's device to count the claimed key",
        |s| s["drops"]["key_claimed_by_other"].as_u64() >= Some(1),
    );
    let peers: Vec<&Value> = s["overlays"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|o| o["peers"].as_array().into_iter().flatten())
        .collect();
    let carol_entry = peer_by_jid(&s, "carol@example.org").expect("carol listed");
    assert_eq!(carol_entry["state"], "connected", "{s}");
    assert_eq!(carol_entry["device"], "tablet", "{s}");
    assert_eq!(carol_entry["id"], carol_key.to_string().as_str(), "{s}");
    let fakes: Vec<&&Value> = peers.iter().filter(|p| p["device"] == "fake").collect();
    assert!(
        fakes.iter().all(
            |p| p["state"] == "refused" && p["addresses"].as_array().is_some_and(Vec::is_empty)
        ),
        "bob's fake device is linked: {s}"
    );
    let reason = fakes
        .first()
        .and_then(|p| p["reason"].as_str())
        .unwrap_or_default();
    assert!(
        reason.contains("carol@example.org/tablet")
            && reason.contains("ipop trust bob@example.org/fake"),
        "status does not say whose key it is and how to move it: {s}"
    );
    assert!(
        peer_by_jid(&s, "bob@example.org").is_some_and(|p| p["state"] == "connected"),
        "bob's phone lost its link: {s}"
    );
    assert!(
        social_ping(&w.lab.nodes[0], "carol@example.org"),
        "alice's device cannot ping carol's any more"
    );
    let log = std::fs::read_to_string(w.lab.nodes[0].log_path()).expect("log");
    assert!(
        log.lines().any(|l| l.contains(
            "refusing a device that announces the key pinned for carol@example.org/tablet"
        ) && l.contains("ipop trust bob@example.org/fake")),
        "alice's log does not say why"
    );
    let state = w.lab.nodes[0].dir.join("state").join("state.json");
    let text = std::fs::read_to_string(&state).expect("state.json");
    let saved: Value = serde_json::from_str(&text).expect("state.json is JSON");
    assert_eq!(
        saved["pins"]["carol@example.org/tablet"],
        carol_key.to_string().as_str(),
        "{text}"
    );
    assert!(
        saved["pins"].get("bob@example.org/fake").is_none(),
        "a pin for bob's fake device: {text}"
    );
    w.lab.stop_all();
}

fn a_wrong_password_fails_clearly_within_15_s(kind: ServerKind, tag: &str) {
    let mut w = World::on(kind, tag, 1);
    w.server.register("alice", "the-real-one");
    w.configure(0, "alice", "laptop", &social("10.78.0.1/16"));
    let started = Instant::now();
    w.node(0).start();
    let status = wait_until(Duration::from_secs(15), "ipop up to give up", || {
        w.lab.nodes[0]
            .exited()
            .ok_or_else(|| "still running".to_owned())
    });
    assert!(
        !status.success(),
        "ipop up exited with success on a wrong password"
    );
    assert!(started.elapsed() < Duration::from_secs(15));
    let log = std::fs::read_to_string(w.lab.nodes[0].log_path()).expect("log");
    assert!(
        log.contains("wrong password"),
        "the log does not say why: {log}"
    );
}

fn the_chat_client_still_gets_messages_sent_to_the_bare_jid(kind: ServerKind, tag: &str) {
    let mut w = World::on(kind, tag, 1);
    let mut alice_chat = w.user("alice");
    alice_chat.set_presence(5);
    let mut bob = w.user("bob");
    alice_chat.befriend(&mut bob);
    w.configure(0, "alice", "laptop", &social("10.78.0.1/16"));
    w.node(0).start();
    xmpp_online(w.node(0));
    let to = alice_chat.jid().clone();
    bob.send_chat(&to, "lunch?");
    let got = alice_chat.recv_chat(Duration::from_secs(5));
    assert_eq!(got.map(|(_, text)| text), Some("lunch?".to_owned()));
    w.lab.stop_all();
}

fn carol_creates_a_group_david_is_added_and_their_devices_ping(kind: ServerKind, tag: &str) {
    let mut w = World::on(kind, tag, 2);
    w.server.register("carol", &password("carol"));
    w.server.register("david", &password("david"));
    let room = format!("lab@conference.{DOMAIN}");
    w.configure(0, "carol", "desk", &group(&room, "10.79.0.1/24", true));
    w.configure(1, "david", "laptop", &group(&room, "10.79.0.2/24", false));
    w.node(0).start();
    xmpp_online(w.node(0));

    group_member(&w.lab.nodes[0], "add", &room, "david@example.org");

    w.node(1).start();
    xmpp_online(w.node(1));
    wait_ping(
        &w.lab.nodes[1],
        "10.79.0.1",
        Duration::from_secs(10),
        "david's device to ping carol's",
    );
    assert!(
        ping_ok(&w.lab.nodes[0], "10.79.0.2"),
        "carol's device cannot ping david's"
    );
    let status = w.node(0).status().expect("status");
    let overlay = &status["overlays"][0];
    assert_eq!(overlay["kind"], "group");
    assert_eq!(overlay["name"], room.as_str());
    assert_eq!(overlay["peers"][0]["jid"], "david@example.org");
    w.lab.stop_all();
}

fn links_survive_an_xmpp_outage_and_new_devices_join_after_it(kind: ServerKind, tag: &str) {
    let mut w = World::on(kind, tag, 3);
    let mut alice = w.user("alice");
    let mut bob = w.user("bob");
    let mut carol = w.user("carol");
    alice.befriend(&mut bob);
    alice.befriend(&mut carol);
    w.configure(0, "alice", "laptop", &social("10.78.0.1/16"));
    w.configure(1, "bob", "phone", &social("10.78.0.2/16"));
    w.configure(2, "carol", "tablet", &social("10.78.0.3/16"));
    w.node(0).start();
    w.node(1).start();
    wait_social_ping(
        &w.lab.nodes[0],
        "bob@example.org",
        Duration::from_secs(10),
        "alice's device to ping bob's",
    );

    // 2500 pings at 100 per second, with the XMPP server down for 20 s in the middle.
    let bob_addr = social_addr(&w.lab.nodes[0], "bob@example.org").expect("bob's address");
    let mut pinger = w.lab.nodes[0].ns().command("ping");
    pinger.args(["-q", "-i", "0.01", "-c", "2500", "-W", "1"]);
    pinger.arg(bob_addr.to_string());
    let stop_server = std::thread::scope(|scope| {
        let flood = scope.spawn(move || pinger.output());
        std::thread::sleep(Duration::from_secs(2));
        w.server.stop();
        std::thread::sleep(Duration::from_secs(20));
        w.server.start();
        flood.join().expect("ping thread")
    });
    let out = stop_server.expect("ping runs");
    let summary = String::from_utf8_lossy(&out.stdout);
    let loss: f64 = summary
        .split(", ")
        .find_map(|part| part.strip_suffix("% packet loss"))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no loss figure in ping's output: {summary}"));
    eprintln!("ping flood across the outage: {loss}% loss");
    assert!(
        loss < 1.0,
        "lost {loss}% of pings during the XMPP outage: {summary}"
    );

    // After the server is back, a new device comes up and links with alice's.
    w.node(2).start();
    xmpp_online(w.node(2));
    wait_social_ping(
        &w.lab.nodes[2],
        "alice@example.org",
        Duration::from_secs(45),
        "carol's new device to ping alice's",
    );
    w.lab.stop_all();
}

fn unfriending_tears_the_link_down_on_both_sides_within_5_s(kind: ServerKind, tag: &str) {
    let (mut w, mut alice, mut bob) =
        start_friends_on(kind, tag, &social("10.78.0.1/16"), &social("10.78.0.2/16"));
    wait_social_ping(
        &w.lab.nodes[0],
        "bob@example.org",
        Duration::from_secs(10),
        "alice's device to ping bob's",
    );

    bob.unfriend(&mut alice);
    let linked = |status: &Value, jid: &str| {
        peer_by_jid(status, jid).is_some_and(|p| p["state"] == "connected")
    };
    wait_until(
        Duration::from_secs(5),
        "both devices to drop the link",
        || {
            let a = w.lab.nodes[0].status()?;
            let b = w.lab.nodes[1].status()?;
            if linked(&a, "bob@example.org") || linked(&b, "alice@example.org") {
                Err(format!("alice: {a}\nbob: {b}"))
            } else {
                Ok(())
            }
        },
    );
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        !social_ping(&w.lab.nodes[0], "bob@example.org"),
        "the link came back"
    );
    w.lab.stop_all();
}

fn a_users_own_devices_link_with_each_other(kind: ServerKind, tag: &str) {
    let mut w = World::on(kind, tag, 2);
    w.server.register("alice", &password("alice"));
    w.configure(0, "alice", "laptop", &social("10.78.0.1/16"));
    w.configure(1, "alice", "phone", &social("10.78.0.2/16"));
    w.node(0).start();
    w.node(1).start();
    wait_social_ping(
        &w.lab.nodes[0],
        "alice@example.org",
        Duration::from_secs(10),
        "the laptop to ping the phone",
    );
    let status = w.node(1).status().expect("status");
    let peer = peer_by_jid(&status, "alice@example.org").expect("the laptop is listed");
    assert_eq!(peer["device"], "laptop");
    w.lab.stop_all();
}
