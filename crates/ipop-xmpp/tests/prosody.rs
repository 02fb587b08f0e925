//! The binding against a real Prosody: login and its failures, the social overlay with
//! friends and own devices, signals, group rooms, a chat client next to ipop, reconnection.

mod common;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use common::{
    ChatClient, DOMAIN, config_for, expect, expect_within, free_port, group, members, prosody,
};
use hmac::{Hmac, Mac};
use ipop_core::PublicKey;
use ipop_core::osn::{
    Candidate, CandidateKind, Claim, DeviceId, IceServer, IceServerKind, IceTransport, LinkOffer,
    OsnEvent, Outgoing, OverlayId, Signal, TerminateReason,
};
use ipop_lab::{ExternalService, Prosody};
use ipop_xmpp::{DropReason, Error, GroupConfig, LoginError, State, connect};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio_xmpp::Stanza;
use tokio_xmpp::jid::Jid;
use tokio_xmpp::minidom::Element;
use tokio_xmpp::parsers::data_forms::{DataForm, DataFormType, Field, FieldType};
use tokio_xmpp::parsers::iq::Iq;
use tokio_xmpp::parsers::message::{Lang, Message, MessageType};
use tokio_xmpp::parsers::muc::Muc;
use tokio_xmpp::parsers::ns;
use tokio_xmpp::parsers::presence::{Presence, Type as PresenceType};
use tokio_xmpp::parsers::stanza_error::DefinedCondition;

fn device(user: &str, device: &str) -> DeviceId {
    DeviceId::new(format!("{user}@localhost"), device)
}

fn users(names: &[&str]) -> Vec<String> {
    let mut users: Vec<String> = names.iter().map(|n| format!("{n}@localhost")).collect();
    users.sort();
    users
}

fn offer(key: u8) -> LinkOffer {
    LinkOffer {
        key: PublicKey([key; 32]),
        ufrag: "ufrag".to_owned(),
        pwd: "a-password-of-22-chars".to_owned(),
        candidates: vec![Candidate {
            foundation: "1".to_owned(),
            component: 1,
            priority: 2_130_706_431,
            address: "127.0.0.1:40000".parse().expect("addr"),
            kind: CandidateKind::Host,
            related: None,
        }],
    }
}

fn is_device_up(event: &OsnEvent, overlay: &OverlayId, who: &DeviceId) -> Option<PublicKey> {
    match event {
        OsnEvent::DeviceUp {
            overlay: o,
            device,
            key,
            relay: None,
            ..
        } if o == overlay && device == who => Some(*key),
        _ => None,
    }
}

fn claim(address: [u8; 4], fixed: bool) -> Option<Claim> {
    Some(Claim {
        address: Ipv4Addr::from(address),
        fixed,
    })
}

/// The claim of a device that comes up in an overlay.
fn claim_of(event: &OsnEvent, overlay: &OverlayId, who: &DeviceId) -> Option<Option<Claim>> {
    match event {
        OsnEvent::DeviceUp {
            overlay: o,
            device,
            claim,
            ..
        } if o == overlay && device == who => Some(*claim),
        _ => None,
    }
}

/// The overlay and claim of a device that comes up in any overlay.
fn claim_anywhere(event: &OsnEvent, who: &DeviceId) -> Option<(OverlayId, Option<Claim>)> {
    match event {
        OsnEvent::DeviceUp {
            overlay,
            device,
            claim,
            ..
        } if device == who => Some((overlay.clone(), *claim)),
        _ => None,
    }
}

/// The next two times a device comes up, in any overlay: overlays and claims, sorted by
/// overlay.
async fn two_claims(
    events: &mut UnboundedReceiver<OsnEvent>,
    who: &DeviceId,
) -> Vec<(OverlayId, Option<Claim>)> {
    let mut ups = Vec::new();
    expect(events, "two claims", |e| {
        ups.push(claim_anywhere(e, who)?);
        (ups.len() == 2).then_some(())
    })
    .await;
    ups.sort_by(|a, b| a.0.cmp(&b.0));
    ups
}

/// Mutual presence subscription, as two people do it in their chat clients.
async fn befriend(a: &mut ChatClient, b: &mut ChatClient) {
    let subscribe_from = |who: &ChatClient| {
        let jid = who.jid.clone();
        move |s: &Stanza| match s {
            Stanza::Presence(p)
                if p.type_ == PresenceType::Subscribe
                    && p.from.as_ref().map(Jid::to_bare) == Some(jid.clone()) =>
            {
                Some(())
            }
            _ => None,
        }
    };
    a.send(Presence::subscribe().with_to(b.jid.clone()).into())
        .await;
    b.expect("subscription request", subscribe_from(a)).await;
    b.send(Presence::subscribed().with_to(a.jid.clone()).into())
        .await;
    b.send(Presence::subscribe().with_to(a.jid.clone()).into())
        .await;
    a.expect("subscription request", subscribe_from(b)).await;
    a.send(Presence::subscribed().with_to(b.jid.clone()).into())
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_succeeds_and_every_failure_names_its_cause_in_time() {
    let server = prosody();
    server.register("alice", "pw-alice");

    let (session, mut events) = connect(config_for(&server, "alice", "pw-alice", "laptop", 1))
        .await
        .expect("login");
    let me = expect(&mut events, "Online", |e| match e {
        OsnEvent::Online { me } => Some(me.clone()),
        _ => None,
    })
    .await;
    assert_eq!(me, device("alice", "laptop"));
    let social = expect(&mut events, "social members", |e| {
        members(e, &OverlayId::Social)
    })
    .await;
    assert_eq!(social, users(&["alice"]));
    let status = session.status();
    assert_eq!(status.state, State::Online);
    assert_eq!(status.bound.as_deref(), Some("alice@localhost/laptop"));
    assert_eq!(status.reconnects, 0);

    let short = Duration::from_secs(5);
    let fails = |user: &str, password: &str, edit: &dyn Fn(&mut ipop_xmpp::XmppConfig)| {
        let mut cfg = config_for(&server, user, password, "laptop", 1);
        cfg.login_timeout = short;
        edit(&mut cfg);
        async move {
            let started = Instant::now();
            let error = connect(cfg).await.err().expect("login must fail");
            assert!(
                started.elapsed() <= short + Duration::from_millis(500),
                "{error}"
            );
            error
        }
    };

    let wrong_password = fails("alice", "nope", &|_| {}).await;
    assert!(
        matches!(&wrong_password, LoginError::AuthFailed { condition, .. } if condition == "not-authorized"),
        "{wrong_password}"
    );
    assert!(wrong_password.to_string().contains("wrong password"));

    let no_account = fails("mallory", "pw", &|_| {}).await;
    assert!(
        matches!(no_account, LoginError::AuthFailed { .. }),
        "{no_account}"
    );

    let closed_port = free_port();
    let unreachable = fails("alice", "pw-alice", &|cfg| {
        cfg.server = Some(("127.0.0.1".to_owned(), closed_port));
    })
    .await;
    assert!(
        matches!(&unreachable, LoginError::Unreachable { server, .. } if server.ends_with(&closed_port.to_string())),
        "{unreachable}"
    );

    let untrusted = fails("alice", "pw-alice", &|cfg| cfg.extra_ca = None).await;
    assert!(
        matches!(&untrusted, LoginError::Certificate { reason, .. } if reason.contains("unknown authority")),
        "{untrusted}"
    );

    // A server that accepts the connection and never says a word.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("listener");
    let silent_port = silent.local_addr().expect("addr").port();
    let timed_out = fails("alice", "pw-alice", &|cfg| {
        cfg.server = Some(("127.0.0.1".to_owned(), silent_port));
        cfg.login_timeout = Duration::from_secs(1);
    })
    .await;
    assert!(
        matches!(timed_out, LoginError::Timeout { after: Some(d), .. } if d == Duration::from_secs(1)),
        "{timed_out}"
    );
    drop(silent);

    // This server offers no STUN/TURN (no XEP-0215): the status says so, the core hears nothing.
    let deadline = Instant::now() + common::WAIT;
    while session.status().external_services_problem.is_none() {
        assert!(Instant::now() < deadline, "{:?}", session.status());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = session.status();
    assert!(status.external_services.is_empty(), "{status:?}");
    assert!(status.drops.is_empty(), "{status:?}");
    while let Ok(event) = events.try_recv() {
        assert!(!matches!(event, OsnEvent::IceServers(_)), "{event:?}");
    }

    session.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_tls_login_works() {
    let mut server = prosody();
    server.register("alice", "pw-alice");
    // ipop-lab's Prosody has no direct TLS port: give it one.
    let port = free_port();
    let config = std::fs::read_to_string(server.config_path()).expect("read config");
    let edited = config.replace(
        "c2s_direct_tls_ports = { }",
        &format!("c2s_direct_tls_ports = {{ {port} }}"),
    );
    assert_ne!(
        config, edited,
        "the Prosody config has no empty c2s_direct_tls_ports"
    );
    std::fs::write(server.config_path(), edited).expect("write config");
    server.stop();
    server.start();

    let mut cfg = config_for(&server, "alice", "pw-alice", "laptop", 1);
    cfg.direct_tls = true;
    cfg.server = Some(("127.0.0.1".to_owned(), port));
    let (session, mut events) = connect(cfg).await.expect("login with direct TLS");
    expect(&mut events, "Online", |e| match e {
        OsnEvent::Online { .. } => Some(()),
        _ => None,
    })
    .await;
    assert_eq!(session.status().server, format!("127.0.0.1:{port}"));
    session.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn friends_and_own_devices_meet_and_signal_while_chat_goes_to_the_chat_client() {
    let server = prosody();
    server.register("alice", "pw-alice");
    server.register("bob", "pw-bob");
    let social = OverlayId::Social;

    // Alice's ipop is up before she and Bob become friends: the roster push must update it.
    let (alice, mut alice_events) = connect(config_for(&server, "alice", "pw-alice", "laptop", 1))
        .await
        .expect("alice logs in");
    assert_eq!(
        expect(&mut alice_events, "social members", |e| members(e, &social)).await,
        users(&["alice"])
    );

    let mut alice_chat = ChatClient::connect(&server, "alice", "pw-alice", "chat", Some(5)).await;
    let mut bob_chat = ChatClient::connect(&server, "bob", "pw-bob", "chat", Some(0)).await;
    befriend(&mut alice_chat, &mut bob_chat).await;
    assert_eq!(
        expect(&mut alice_events, "social members with bob", |e| {
            members(e, &social).filter(|m| m.len() == 2)
        })
        .await,
        users(&["alice", "bob"])
    );

    let (bob, mut bob_events) = connect(config_for(&server, "bob", "pw-bob", "desktop", 2))
        .await
        .expect("bob logs in");
    assert_eq!(
        expect(&mut bob_events, "bob's social members", |e| members(
            e, &social
        ))
        .await,
        users(&["alice", "bob"])
    );
    let key = expect(&mut bob_events, "alice's device", |e| {
        is_device_up(e, &social, &device("alice", "laptop"))
    })
    .await;
    assert_eq!(key, PublicKey([1; 32]));
    let key = expect(&mut alice_events, "bob's device", |e| {
        is_device_up(e, &social, &device("bob", "desktop"))
    })
    .await;
    assert_eq!(key, PublicKey([2; 32]));

    // A link negotiation, both ways.
    let initiate = Signal::Initiate {
        session: "s1".to_owned(),
        offer: offer(1),
    };
    alice.send(Outgoing::new(device("bob", "desktop"), initiate.clone()));
    let (from, signal) = expect(&mut bob_events, "alice's initiate", |e| match e {
        OsnEvent::Signal { from, signal } => Some((from.clone(), signal.clone())),
        _ => None,
    })
    .await;
    assert_eq!(from, device("alice", "laptop"));
    assert_eq!(signal, initiate);
    let accept = Signal::Accept {
        session: "s1".to_owned(),
        offer: offer(2),
    };
    bob.send(Outgoing::new(device("alice", "laptop"), accept.clone()));
    let signal = expect(&mut alice_events, "bob's accept", |e| match e {
        OsnEvent::Signal { signal, .. } => Some(signal.clone()),
        _ => None,
    })
    .await;
    assert_eq!(signal, accept);

    // A signal to a device that is not there fails, and says so.
    alice.send(Outgoing::new(
        device("bob", "phone"),
        Signal::Terminate {
            session: "s2".to_owned(),
            reason: TerminateReason::Done,
        },
    ));
    let (to, session, reason) = expect(&mut alice_events, "a failed signal", |e| match e {
        OsnEvent::SignalFailed {
            to,
            session,
            reason,
        } => Some((to.clone(), session.clone(), reason.clone())),
        _ => None,
    })
    .await;
    assert_eq!((to, session.as_str()), (device("bob", "phone"), "s2"));
    assert!(reason.contains("unavailable"), "{reason}");

    // What the session costs the server is counted: stanzas and bytes each way, the signals
    // and the refused one, and a second offer to the same device as repeated.
    let again = Signal::Initiate {
        session: "s3".to_owned(),
        offer: offer(1),
    };
    alice.send(Outgoing::new(device("bob", "desktop"), again.clone()));
    let signal = expect(&mut bob_events, "alice's second initiate", |e| match e {
        OsnEvent::Signal { signal, .. } => Some(signal.clone()),
        _ => None,
    })
    .await;
    assert_eq!(signal, again);
    let traffic = alice.status().traffic;
    assert_eq!(
        (
            traffic.signals_sent,
            traffic.offers_sent,
            traffic.offers_repeated,
            traffic.signals_refused,
            traffic.signals_timed_out,
        ),
        (3, 2, 1, 1, 0),
        "{traffic:?}"
    );
    assert!(
        traffic.stanzas_sent >= 3 && traffic.stanzas_received >= 3,
        "{traffic:?}"
    );
    // Every stanza is at least a few dozen bytes, and TLS adds to them.
    assert!(
        traffic.bytes_sent > 30 * traffic.stanzas_sent
            && traffic.bytes_received > 30 * traffic.stanzas_received,
        "{traffic:?}"
    );

    // Hostile or foreign input: a malformed Jingle IQ is refused and counted; service
    // discovery shows the ipop feature.
    let alice_laptop = Jid::new("alice@localhost/laptop").expect("jid");
    let bad = bob_chat
        .iq(Iq::Set {
            from: None,
            to: Some(alice_laptop.clone()),
            id: "bad-1".to_owned(),
            payload: "<jingle xmlns='urn:xmpp:jingle:1' action='session-initiate' sid='x'/>"
                .parse::<Element>()
                .expect("xml"),
        })
        .await;
    assert_eq!(bad, Err(DefinedCondition::BadRequest));
    let info = bob_chat
        .iq(Iq::Get {
            from: None,
            to: Some(alice_laptop.clone()),
            id: "disco-1".to_owned(),
            payload: Element::bare("query", ns::DISCO_INFO),
        })
        .await
        .expect("disco answered")
        .expect("disco payload");
    assert!(String::from(&info).contains("urn:ipop:0"));

    // Chat to Alice's bare JID reaches her chat client, never ipop (priority -1).
    let mut hello = Message::new(Some(Jid::from(alice_chat.jid.clone())));
    hello.type_ = MessageType::Chat;
    hello.bodies.insert(Lang(String::new()), "hello".to_owned());
    bob_chat.send(hello.into()).await;
    alice_chat
        .expect("bob's message", |s| match s {
            Stanza::Message(m) if m.bodies.values().any(|b| b == "hello") => Some(()),
            _ => None,
        })
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let drops = alice.status().drops;
    assert!(
        !drops.iter().any(|(r, _)| *r == DropReason::Message),
        "ipop got a chat message: {drops:?}"
    );
    assert!(
        drops.contains(&(DropReason::MalformedJingle, 1)),
        "{drops:?}"
    );

    // Alice's other device is a peer too.
    let (phone, _phone_events) = connect(config_for(&server, "alice", "pw-alice", "phone", 3))
        .await
        .expect("alice's phone logs in");
    let key = expect(&mut alice_events, "alice's phone", |e| {
        is_device_up(e, &social, &device("alice", "phone"))
    })
    .await;
    assert_eq!(key, PublicKey([3; 32]));

    // Leaving is seen.
    bob.shutdown().await;
    expect(&mut alice_events, "bob's device down", |e| match e {
        OsnEvent::DeviceDown { overlay, device: d }
            if *overlay == social && *d == device("bob", "desktop") =>
        {
            Some(())
        }
        _ => None,
    })
    .await;

    phone.shutdown().await;
    alice.shutdown().await;
    alice_chat.end().await;
    bob_chat.end().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_room_is_created_members_are_added_join_and_are_removed() {
    let server = prosody();
    server.register("alice", "pw-alice");
    server.register("bob", "pw-bob");
    let room = "lab@conference.localhost";
    let lab = OverlayId::Group(room.to_owned());

    let mut cfg = config_for(&server, "alice", "pw-alice", "laptop", 1);
    cfg.social = false;
    cfg.groups = vec![group("lab", true)];
    let (alice, mut alice_events) = connect(cfg).await.expect("alice creates the room");
    assert_eq!(
        expect(&mut alice_events, "lab members", |e| members(e, &lab)).await,
        users(&["alice"])
    );
    assert!(alice.status().rooms[0].joined);

    let bob_cfg = || {
        let mut cfg = config_for(&server, "bob", "pw-bob", "desktop", 2);
        cfg.social = false;
        cfg.groups = vec![group("lab", false)];
        cfg
    };
    let refused = connect(bob_cfg())
        .await
        .err()
        .expect("bob is no member yet");
    assert!(
        matches!(&refused, LoginError::RoomRefused { room: r, why } if r == room && why.contains("not a member")),
        "{refused}"
    );

    assert_eq!(
        alice
            .add_member("elsewhere@conference.localhost", "bob@localhost")
            .await,
        Err(Error::NotAGroup(
            "elsewhere@conference.localhost".to_owned()
        ))
    );
    alice
        .add_member(room, "bob@localhost")
        .await
        .expect("alice adds bob");
    let (bob, mut bob_events) = connect(bob_cfg()).await.expect("bob joins");
    assert_eq!(
        expect(&mut bob_events, "lab members", |e| members(e, &lab)).await,
        users(&["alice", "bob"])
    );
    assert_eq!(
        expect(&mut bob_events, "alice's device", |e| {
            is_device_up(e, &lab, &device("alice", "laptop"))
        })
        .await,
        PublicKey([1; 32])
    );
    assert_eq!(
        expect(&mut alice_events, "lab members with bob", |e| {
            members(e, &lab).filter(|m| m.len() == 2)
        })
        .await,
        users(&["alice", "bob"])
    );
    assert_eq!(
        expect(&mut alice_events, "bob's device", |e| {
            is_device_up(e, &lab, &device("bob", "desktop"))
        })
        .await,
        PublicKey([2; 32])
    );

    // A signal through the group works like one between friends.
    alice.send(Outgoing::new(
        device("bob", "desktop"),
        Signal::Candidates {
            session: "g1".to_owned(),
            candidates: offer(1).candidates,
        },
    ));
    expect(&mut bob_events, "candidates", |e| match e {
        OsnEvent::Signal { from, .. } if *from == device("alice", "laptop") => Some(()),
        _ => None,
    })
    .await;

    // Revocation: Bob is removed from the room and from the overlay, on both sides.
    alice
        .remove_member(room, "bob@localhost")
        .await
        .expect("alice removes bob");
    assert_eq!(
        expect(&mut alice_events, "lab members without bob", |e| {
            members(e, &lab).filter(|m| m.len() == 1)
        })
        .await,
        users(&["alice"])
    );
    expect(&mut alice_events, "bob's device down", |e| match e {
        OsnEvent::DeviceDown { overlay, device: d }
            if *overlay == lab && *d == device("bob", "desktop") =>
        {
            Some(())
        }
        _ => None,
    })
    .await;
    assert_eq!(
        expect(&mut bob_events, "bob out of the overlay", |e| {
            members(e, &lab).filter(Vec::is_empty)
        })
        .await,
        Vec::<String>::new()
    );
    let problem = bob.status().rooms[0].problem.clone().unwrap_or_default();
    assert!(problem.contains("revoked"), "{problem}");

    // A room that does not exist is not created without `create`.
    let mut cfg = config_for(&server, "bob", "pw-bob", "desktop", 2);
    cfg.groups = vec![group("nowhere", false)];
    let missing = connect(cfg).await.err().expect("no such room");
    assert!(missing.to_string().contains("does not exist"), "{missing}");

    bob.shutdown().await;
    alice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_that_hides_real_jids_is_refused() {
    let server = prosody();
    server.register("dave", "pw-dave");
    server.register("alice", "pw-alice");

    // Dave creates an open room that shows real JIDs to moderators only.
    let mut dave = ChatClient::connect(&server, "dave", "pw-dave", "chat", None).await;
    let occupant = Jid::new("anon@conference.localhost/dave").expect("jid");
    dave.send(
        Presence::available()
            .with_to(occupant.clone())
            .with_payloads(vec![Muc::new().into()])
            .into(),
    )
    .await;
    dave.expect("room created", |s| match s {
        Stanza::Presence(p) if p.from.as_ref() == Some(&occupant) => Some(()),
        _ => None,
    })
    .await;
    let form = DataForm::new(
        DataFormType::Submit,
        "http://jabber.org/protocol/muc#roomconfig",
        vec![Field::new("muc#roomconfig_whois", FieldType::TextSingle).with_value("moderators")],
    );
    dave.iq(Iq::Set {
        from: None,
        to: Some(Jid::new("anon@conference.localhost").expect("jid")),
        id: "config-1".to_owned(),
        payload: Element::builder("query", "http://jabber.org/protocol/muc#owner")
            .append(Element::from(form))
            .build(),
    })
    .await
    .expect("room configured");

    let mut cfg = config_for(&server, "alice", "pw-alice", "laptop", 1);
    cfg.groups = vec![group("anon", false)];
    let refused = connect(cfg).await.err().expect("refused");
    assert!(
        matches!(&refused, LoginError::RoomRefused { why, .. } if why.contains("hides real JIDs")),
        "{refused}"
    );
    dave.end().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_server_restart_the_session_comes_back_with_the_full_picture() {
    let mut server = prosody();
    server.register("alice", "pw-alice");
    server.register("bob", "pw-bob");
    {
        let mut alice_chat =
            ChatClient::connect(&server, "alice", "pw-alice", "chat", Some(0)).await;
        let mut bob_chat = ChatClient::connect(&server, "bob", "pw-bob", "chat", Some(0)).await;
        befriend(&mut alice_chat, &mut bob_chat).await;
        alice_chat.end().await;
        bob_chat.end().await;
    }
    let social = OverlayId::Social;
    let lab = OverlayId::Group("lab@conference.localhost".to_owned());
    let mut cfg = config_for(&server, "alice", "pw-alice", "laptop", 1);
    cfg.groups = vec![group("lab", true)];
    let (alice, mut events) = connect(cfg).await.expect("alice logs in");
    let (bob, _bob_events) = connect(config_for(&server, "bob", "pw-bob", "desktop", 2))
        .await
        .expect("bob logs in");
    expect(&mut events, "bob's device", |e| {
        is_device_up(e, &social, &device("bob", "desktop"))
    })
    .await;

    server.stop();
    expect(&mut events, "Offline", |e| {
        (*e == OsnEvent::Offline).then_some(())
    })
    .await;
    assert_eq!(alice.status().state, State::Reconnecting);
    alice.send(Outgoing::new(
        device("bob", "desktop"),
        Signal::Terminate {
            session: "s9".to_owned(),
            reason: TerminateReason::Done,
        },
    ));
    let reason = expect(&mut events, "a signal failed while offline", |e| match e {
        OsnEvent::SignalFailed { reason, .. } => Some(reason.clone()),
        _ => None,
    })
    .await;
    assert!(reason.contains("not connected"), "{reason}");
    server.start();

    expect(&mut events, "Online again", |e| match e {
        OsnEvent::Online { .. } => Some(()),
        _ => None,
    })
    .await;
    let mut social_members = None;
    let mut lab_members = None;
    let mut bob_up = false;
    expect(&mut events, "the full picture", |e| {
        if let Some(m) = members(e, &social) {
            social_members = Some(m);
        }
        if let Some(m) = members(e, &lab) {
            lab_members = Some(m);
        }
        bob_up |= is_device_up(e, &social, &device("bob", "desktop")).is_some();
        (bob_up && social_members.is_some() && lab_members.is_some()).then_some(())
    })
    .await;
    assert_eq!(social_members, Some(users(&["alice", "bob"])));
    assert_eq!(lab_members, Some(users(&["alice"])));
    let status = alice.status();
    assert_eq!((status.state, status.reconnects), (State::Online, 1));

    bob.shutdown().await;
    alice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_members_see_each_others_claims_and_their_changes_also_over_a_restart() {
    let mut server = prosody();
    server.register("alice", "pw-alice");
    server.register("bob", "pw-bob");
    let room = "claims@conference.localhost";
    let lab = OverlayId::Group(room.to_owned());
    let alice_laptop = device("alice", "laptop");
    let bob_desktop = device("bob", "desktop");

    let mut cfg = config_for(&server, "alice", "pw-alice", "laptop", 1);
    cfg.social = false;
    cfg.groups = vec![GroupConfig {
        claim: claim([10, 20, 0, 1], true),
        ..group("claims", true)
    }];
    let (alice, mut alice_events) = connect(cfg).await.expect("alice creates the room");
    alice
        .add_member(room, "bob@localhost")
        .await
        .expect("alice adds bob");
    let mut cfg = config_for(&server, "bob", "pw-bob", "desktop", 2);
    cfg.social = false;
    cfg.groups = vec![GroupConfig {
        claim: claim([10, 20, 0, 2], false),
        ..group("claims", false)
    }];
    let (bob, mut bob_events) = connect(cfg).await.expect("bob joins");

    assert_eq!(
        expect(&mut bob_events, "alice's claim", |e| claim_of(
            e,
            &lab,
            &alice_laptop
        ))
        .await,
        claim([10, 20, 0, 1], true)
    );
    assert_eq!(
        expect(&mut alice_events, "bob's claim", |e| claim_of(
            e,
            &lab,
            &bob_desktop
        ))
        .await,
        claim([10, 20, 0, 2], false)
    );

    // Bob moves: Alice hears of it at once, and of a withdrawn claim too.
    bob.announce(lab.clone(), claim([10, 20, 0, 3], false));
    assert_eq!(
        expect(&mut alice_events, "bob's new claim", |e| claim_of(
            e,
            &lab,
            &bob_desktop
        ))
        .await,
        claim([10, 20, 0, 3], false)
    );
    bob.announce(lab.clone(), None);
    assert_eq!(
        expect(&mut alice_events, "bob without a claim", |e| claim_of(
            e,
            &lab,
            &bob_desktop
        ))
        .await,
        None
    );
    bob.announce(lab.clone(), claim([10, 20, 0, 4], false));
    assert_eq!(
        expect(&mut alice_events, "bob's claim again", |e| claim_of(
            e,
            &lab,
            &bob_desktop
        ))
        .await,
        claim([10, 20, 0, 4], false)
    );

    // A claim changed while offline is the one the room sees after the reconnect, and the
    // claims from the configuration do not come back.
    server.stop();
    for events in [&mut alice_events, &mut bob_events] {
        expect(events, "Offline", |e| {
            (*e == OsnEvent::Offline).then_some(())
        })
        .await;
    }
    bob.announce(lab.clone(), claim([10, 20, 0, 5], false));
    server.start();
    assert_eq!(
        expect(&mut alice_events, "bob's claim after the restart", |e| {
            claim_of(e, &lab, &bob_desktop)
        })
        .await,
        claim([10, 20, 0, 5], false)
    );
    assert_eq!(
        expect(&mut bob_events, "alice's claim after the restart", |e| {
            claim_of(e, &lab, &alice_laptop)
        })
        .await,
        claim([10, 20, 0, 1], true)
    );
    let drops = alice.status().drops;
    assert!(
        !drops
            .iter()
            .any(|(r, _)| matches!(r, DropReason::BadPresenceClaim | DropReason::BadPresenceKey)),
        "{drops:?}"
    );

    bob.shutdown().await;
    alice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn friends_see_each_others_social_claims_apart_from_their_group_claims() {
    let server = prosody();
    server.register("alice", "pw-alice");
    server.register("bob", "pw-bob");
    let mut bob_chat = {
        let mut alice_chat =
            ChatClient::connect(&server, "alice", "pw-alice", "chat", Some(0)).await;
        let mut bob_chat = ChatClient::connect(&server, "bob", "pw-bob", "chat", Some(0)).await;
        befriend(&mut alice_chat, &mut bob_chat).await;
        alice_chat.end().await;
        bob_chat
    };
    let social = OverlayId::Social;
    let room = "lab@conference.localhost";
    let lab = OverlayId::Group(room.to_owned());
    let alice_laptop = device("alice", "laptop");
    let bob_desktop = device("bob", "desktop");

    let mut cfg = config_for(&server, "alice", "pw-alice", "laptop", 1);
    cfg.social_claim = claim([10, 78, 0, 1], false);
    cfg.groups = vec![GroupConfig {
        claim: claim([10, 20, 0, 1], false),
        ..group("lab", true)
    }];
    let (alice, mut alice_events) = connect(cfg).await.expect("alice logs in");
    alice
        .add_member(room, "bob@localhost")
        .await
        .expect("alice adds bob");
    let mut cfg = config_for(&server, "bob", "pw-bob", "desktop", 2);
    cfg.social_claim = claim([10, 78, 0, 2], true);
    cfg.groups = vec![GroupConfig {
        claim: claim([10, 20, 0, 2], false),
        ..group("lab", false)
    }];
    let (bob, mut bob_events) = connect(cfg).await.expect("bob logs in");

    // Each overlay carries its own claim.
    assert_eq!(
        two_claims(&mut alice_events, &bob_desktop).await,
        vec![
            (social.clone(), claim([10, 78, 0, 2], true)),
            (lab.clone(), claim([10, 20, 0, 2], false)),
        ]
    );
    assert_eq!(
        two_claims(&mut bob_events, &alice_laptop).await,
        vec![
            (social.clone(), claim([10, 78, 0, 1], false)),
            (lab.clone(), claim([10, 20, 0, 1], false)),
        ]
    );

    // A new social claim reaches friends and stays out of the room; a new group claim reaches
    // the room and stays out of the roster. Bob sees exactly these two changes.
    alice.announce(social.clone(), claim([10, 78, 0, 9], true));
    alice.announce(lab.clone(), claim([10, 20, 0, 7], false));
    assert_eq!(
        two_claims(&mut bob_events, &alice_laptop).await,
        vec![
            (social.clone(), claim([10, 78, 0, 9], true)),
            (lab.clone(), claim([10, 20, 0, 7], false)),
        ]
    );

    // A friend's device whose claim does not parse is a peer without a claim, and counted.
    bob_chat
        .send(
            Presence::available()
                .with_payloads(vec![
                    format!(
                        "<ipop xmlns='urn:ipop:0' key='{}' address='10.78.0.300'/>",
                        PublicKey([4; 32])
                    )
                    .parse::<Element>()
                    .expect("xml"),
                ])
                .into(),
        )
        .await;
    assert_eq!(
        expect(
            &mut alice_events,
            "bob's chat device without a claim",
            |e| { claim_of(e, &social, &device("bob", "chat")) }
        )
        .await,
        None
    );
    assert!(
        alice
            .status()
            .drops
            .contains(&(DropReason::BadPresenceClaim, 1)),
        "{:?}",
        alice.status()
    );

    bob.shutdown().await;
    alice.shutdown().await;
    bob_chat.end().await;
}

/// The TURN REST credentials Prosody derives from a shared secret (coturn's `use-auth-secret`):
/// the username starts with the expiry in Unix seconds, the password is
/// base64(HMAC-SHA1(secret, username)). Returns the expiry.
fn check_turn_credentials(server: &IceServer, secret: &str) -> u64 {
    let username = server
        .username
        .as_deref()
        .unwrap_or_else(|| panic!("TURN credentials: {server:?}"));
    let expiry: u64 = username
        .split(':')
        .next()
        .and_then(|e| e.parse().ok())
        .unwrap_or_else(|| panic!("username <expiry>[:…]: {username:?}"));
    let mut mac = Hmac::<sha1::Sha1>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(username.as_bytes());
    let expected = BASE64.encode(mac.finalize().into_bytes());
    assert_eq!(
        server.password.as_deref(),
        Some(expected.as_str()),
        "{username}"
    );
    expiry
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

fn ice_servers(event: &OsnEvent) -> Option<Vec<IceServer>> {
    match event {
        OsnEvent::IceServers(servers) => Some(servers.clone()),
        _ => None,
    }
}

/// The one IPv4 server of a kind and transport.
fn ipv4_server(servers: &[IceServer], kind: IceServerKind, transport: IceTransport) -> &IceServer {
    let found: Vec<&IceServer> = servers
        .iter()
        .filter(|s| s.kind == kind && s.transport == transport && s.address.is_ipv4())
        .collect();
    assert_eq!(
        found.len(),
        1,
        "one {kind:?} over {transport:?} in {servers:#?}"
    );
    found[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stun_and_turn_come_from_the_xmpp_server_with_credentials_renewed_before_expiry() {
    const SECRET: &str = "turn-shared-secret";
    // Renewed 30 s before expiry: 10 s after each answer.
    const TTL: u32 = 40;
    let service =
        |kind: &str, transport: &str, host: &str, port: u16, secret: bool| ExternalService {
            kind: kind.to_owned(),
            transport: transport.to_owned(),
            host: host.to_owned(),
            port,
            secret: secret.then(|| SECRET.to_owned()),
            ttl: secret.then_some(TTL),
        };
    let mut server = Prosody::builder(DOMAIN)
        .external_services(vec![
            service("stun", "udp", "127.0.0.1", 3478, false),
            service("turn", "udp", "127.0.0.1", 3478, true),
            // A name that ipop looks up.
            service("turn", "tcp", "localhost", 3478, true),
            // Prosody gives no credentials to `turns`: those of `turn` on the same host apply.
            service("turns", "tcp", "127.0.0.1", 5349, true),
            // A type ipop does not use: skipped, not counted.
            service("ftp", "tcp", "127.0.0.1", 21, false),
        ])
        .start();
    server.register("alice", "pw-alice");
    let (alice, mut events) = connect(config_for(&server, "alice", "pw-alice", "laptop", 1))
        .await
        .expect("alice logs in");

    let check = |servers: &[IceServer]| -> u64 {
        let stun = ipv4_server(servers, IceServerKind::Stun, IceTransport::Udp);
        assert_eq!(stun.address.to_string(), "127.0.0.1:3478");
        assert_eq!((&stun.username, &stun.password), (&None, &None));
        let udp = ipv4_server(servers, IceServerKind::Turn, IceTransport::Udp);
        assert_eq!(udp.address.to_string(), "127.0.0.1:3478");
        let tcp = ipv4_server(servers, IceServerKind::Turn, IceTransport::Tcp);
        assert_eq!(
            (tcp.host.as_str(), tcp.address.to_string()),
            ("localhost", "127.0.0.1:3478".to_owned())
        );
        let tls = ipv4_server(servers, IceServerKind::Turn, IceTransport::Tls);
        assert_eq!(tls.address.to_string(), "127.0.0.1:5349");
        assert_eq!(
            (&tls.username, &tls.password),
            (&udp.username, &udp.password)
        );
        let expiry = check_turn_credentials(udp, SECRET);
        check_turn_credentials(tcp, SECRET);
        let now = unix_now();
        assert!(
            now < expiry && expiry <= now + u64::from(TTL) + 2,
            "expiry {expiry}, now {now}"
        );
        assert!(
            servers.len() <= 5 && !servers.iter().any(|s| s.address.port() == 21),
            "{servers:#?}"
        );
        expiry
    };

    let first = expect(&mut events, "STUN/TURN servers", ice_servers).await;
    let received = Instant::now();
    let first_expiry = check(&first);
    let status = alice.status();
    assert_eq!(status.external_services.len(), first.len(), "{status:?}");
    assert_eq!(status.external_services_problem, None);
    assert!(
        status
            .external_services
            .iter()
            .filter(|s| s.kind == IceServerKind::Turn)
            .all(|s| s.credentials && s.expires.is_some()),
        "{status:?}"
    );
    assert!(status.drops.is_empty(), "{status:?}");

    // Fresh credentials before the old ones expire.
    let renewed = expect_within(
        &mut events,
        Duration::from_secs(TTL.into()) - Duration::from_secs(10),
        "renewed STUN/TURN servers",
        ice_servers,
    )
    .await;
    let renewed_expiry = check(&renewed);
    assert!(
        renewed_expiry > first_expiry,
        "{renewed_expiry} > {first_expiry}"
    );
    assert!(
        received.elapsed() >= Duration::from_secs(8),
        "renewed after {:?}, not at once",
        received.elapsed()
    );

    // And again after a reconnect.
    server.stop();
    expect(&mut events, "Offline", |e| {
        (*e == OsnEvent::Offline).then_some(())
    })
    .await;
    server.start();
    expect(&mut events, "Online again", |e| match e {
        OsnEvent::Online { .. } => Some(()),
        _ => None,
    })
    .await;
    let again = expect(
        &mut events,
        "STUN/TURN servers after reconnecting",
        ice_servers,
    )
    .await;
    check(&again);
    assert!(alice.status().drops.is_empty(), "{:?}", alice.status());

    alice.shutdown().await;
}

/// The signal `bob` receives next from Alice's laptop, as (session, action, candidates).
async fn next_signal(events: &mut UnboundedReceiver<OsnEvent>) -> (String, &'static str, usize) {
    expect(events, "a signal from alice", |e| match e {
        OsnEvent::Signal { from, signal } if *from == device("alice", "laptop") => {
            Some(match signal {
                Signal::Initiate { session, offer } => {
                    (session.clone(), "initiate", offer.candidates.len())
                }
                Signal::Accept { session, offer } => {
                    (session.clone(), "accept", offer.candidates.len())
                }
                Signal::Candidates {
                    session,
                    candidates,
                } => (session.clone(), "candidates", candidates.len()),
                Signal::Punch { session } => (session.clone(), "punch", 0),
                Signal::Terminate { session, .. } => (session.clone(), "terminate", 0),
            })
        }
        _ => None,
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paced_session_sends_the_most_urgent_first_and_never_an_offer_ended_in_its_queue() {
    let server = prosody();
    server.register("alice", "pw-alice");
    server.register("bob", "pw-bob");
    let mut alice_chat = ChatClient::connect(&server, "alice", "pw-alice", "chat", Some(0)).await;
    let mut bob_chat = ChatClient::connect(&server, "bob", "pw-bob", "chat", Some(0)).await;
    befriend(&mut alice_chat, &mut bob_chat).await;

    // Alice's session may send 2 000 B/s with no burst to speak of: a signal of ~600 bytes
    // leaves the queue about every 0.3 s.
    const RATE: u32 = 2_000;
    let mut cfg = config_for(&server, "alice", "pw-alice", "laptop", 1);
    cfg.send_rate = RATE;
    cfg.send_burst = 1;
    let (alice, mut alice_events) = connect(cfg).await.expect("alice logs in");
    let (bob, mut bob_events) = connect(config_for(&server, "bob", "pw-bob", "desktop", 2))
        .await
        .expect("bob logs in");
    expect(&mut alice_events, "bob's device", |e| {
        is_device_up(e, &OverlayId::Social, &device("bob", "desktop"))
    })
    .await;
    // Let the login's own stanzas leave the queue,
    let deadline = Instant::now() + common::WAIT;
    while alice.status().traffic.send_queue > 0 {
        assert!(Instant::now() < deadline, "{:?}", alice.status().traffic);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // and the last of them be paid for: one stanza's worth of debt at most, 0.3 s.
    tokio::time::sleep(Duration::from_secs(1)).await;

    let bob_desktop = device("bob", "desktop");
    let send = |signal: Signal, urgent: bool| {
        alice.send(Outgoing {
            to: bob_desktop.clone(),
            signal,
            urgent,
        });
    };
    let initiate = |session: &str| Signal::Initiate {
        session: session.to_owned(),
        offer: offer(1),
    };
    let started = Instant::now();
    // Five offers of links wanted in the background: the first leaves at once.
    for i in 1..=5 {
        send(initiate(&format!("b{i}")), false);
    }
    // A sixth ends before it could leave: neither goes.
    send(initiate("b6"), false);
    send(
        Signal::Terminate {
            session: "b6".to_owned(),
            reason: TerminateReason::Done,
        },
        false,
    );
    // A candidate found for the fifth joins its offer.
    send(
        Signal::Candidates {
            session: "b5".to_owned(),
            candidates: offer(1).candidates,
        },
        false,
    );
    // An offer that traffic waits for, and an answer to an offer of Bob's, queued last.
    send(initiate("u1"), true);
    send(
        Signal::Accept {
            session: "a1".to_owned(),
            offer: offer(1),
        },
        false,
    );

    let mut seen = Vec::new();
    for _ in 0..7 {
        seen.push(next_signal(&mut bob_events).await);
    }
    let took = started.elapsed();
    let order: Vec<(&str, &str, usize)> = seen
        .iter()
        .map(|(s, action, n)| (s.as_str(), *action, *n))
        .collect();
    assert_eq!(
        order,
        [
            ("b1", "initiate", 1),
            ("a1", "accept", 1),
            ("u1", "initiate", 1),
            ("b2", "initiate", 1),
            ("b3", "initiate", 1),
            ("b4", "initiate", 1),
            ("b5", "initiate", 2),
        ],
        "the answer first, then the urgent offer, then the rest in order; b6 never"
    );
    let traffic = alice.status().traffic;
    assert_eq!(traffic.signals_coalesced, 3, "{traffic:?}");
    assert_eq!(traffic.signals_sent, 7, "{traffic:?}");
    assert_eq!(traffic.signals_timed_out, 0, "{traffic:?}");
    // Six more signals after the first, each well over 300 bytes, at 2 000 B/s.
    let least = Duration::from_secs_f64(6.0 * 300.0 / f64::from(RATE));
    assert!(took >= least, "seven signals in {took:?}: not paced");
    assert!(traffic.send_wait_max_ms >= 500, "{traffic:?}");

    // Nothing more comes: the ended offer was never sent.
    let quiet = tokio::time::timeout(Duration::from_secs(1), async {
        next_signal(&mut bob_events).await
    })
    .await;
    assert!(quiet.is_err(), "unexpected {quiet:?}");

    // Three answers queue at Alice's; Bob ends the third's session before it can leave: it
    // never does.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for i in 1..=3 {
        send(
            Signal::Accept {
                session: format!("x{i}"),
                offer: offer(1),
            },
            false,
        );
    }
    bob.send(Outgoing::new(
        device("alice", "laptop"),
        Signal::Terminate {
            session: "x3".to_owned(),
            reason: TerminateReason::Done,
        },
    ));
    let mut seen = vec![
        next_signal(&mut bob_events).await,
        next_signal(&mut bob_events).await,
    ];
    let quiet = tokio::time::timeout(Duration::from_secs(2), async {
        next_signal(&mut bob_events).await
    })
    .await;
    if let Ok(third) = quiet {
        seen.push(third);
    }
    let sessions: Vec<&str> = seen.iter().map(|(s, _, _)| s.as_str()).collect();
    assert_eq!(
        sessions,
        ["x1", "x2"],
        "the answer to an ended session went out"
    );
    assert_eq!(alice.status().traffic.signals_coalesced, 4);
    alice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_server_stricter_than_its_pace_a_session_keeps_what_waits_in_its_own_queue() {
    // Debian's stock Prosody reads 10 kB/s from each client; Alice's session is told to send
    // without a pace of its own, as if it trusted a far looser server.
    let server = Prosody::builder(DOMAIN).stock_limits(true).start();
    server.register("alice", "pw-alice");
    server.register("bob", "pw-bob");
    let mut alice_chat = ChatClient::connect(&server, "alice", "pw-alice", "chat", Some(0)).await;
    let mut bob_chat = ChatClient::connect(&server, "bob", "pw-bob", "chat", Some(0)).await;
    befriend(&mut alice_chat, &mut bob_chat).await;
    let mut cfg = config_for(&server, "alice", "pw-alice", "laptop", 1);
    cfg.send_rate = 0;
    let (alice, _alice_events) = connect(cfg).await.expect("alice logs in");
    let (bob, mut bob_events) = connect(config_for(&server, "bob", "pw-bob", "desktop", 2))
        .await
        .expect("bob logs in");
    // Let the server's burst allowance refill after the logins.
    tokio::time::sleep(Duration::from_secs(3)).await;

    // 150 offers of about 600 bytes each, some 90 kB: at 10 kB/s beyond the server's burst
    // they take several seconds to get through. Then an answer to an offer of Bob's.
    const OFFERS: usize = 150;
    let bob_desktop = device("bob", "desktop");
    for i in 0..OFFERS {
        alice.send(Outgoing {
            to: bob_desktop.clone(),
            signal: Signal::Initiate {
                session: format!("b{i}"),
                offer: offer(1),
            },
            urgent: false,
        });
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let queued = alice.status().traffic.send_queue;
    alice.send(Outgoing {
        to: bob_desktop.clone(),
        signal: Signal::Accept {
            session: "a1".to_owned(),
            offer: offer(1),
        },
        urgent: false,
    });
    let started = Instant::now();
    let mut offers_before = 0;
    loop {
        let (session, action, _) = next_signal(&mut bob_events).await;
        if action == "accept" {
            assert_eq!(session, "a1");
            break;
        }
        offers_before += 1;
    }
    let took = started.elapsed();
    // Without the window, the answer would wait at the server behind every offer written
    // before it: 150 of them, several seconds.
    assert!(
        queued > 100,
        "only {queued} of {OFFERS} offers waited in the session's queue: the server's socket \
         buffers held the rest"
    );
    assert!(
        offers_before < 40,
        "{offers_before} offers reached Bob before the answer queued after them (in {took:?})"
    );
    // The rest still arrive, in order, none lost and none timed out.
    let mut rest = Vec::new();
    while rest.len() < OFFERS - offers_before {
        rest.push(next_signal(&mut bob_events).await.0);
    }
    let expected: Vec<String> = (offers_before..OFFERS).map(|i| format!("b{i}")).collect();
    assert_eq!(rest, expected);
    let traffic = alice.status().traffic;
    assert_eq!(traffic.signals_timed_out, 0, "{traffic:?}");
    assert_eq!(traffic.send_queue, 0, "{traffic:?}");
    eprintln!(
        "{queued} of {OFFERS} offers waited in the queue; the answer queued after them reached \
         Bob after {offers_before} offers, in {took:?}; longest wait {} ms",
        traffic.send_wait_max_ms
    );
    alice.shutdown().await;
    bob.shutdown().await;
}
