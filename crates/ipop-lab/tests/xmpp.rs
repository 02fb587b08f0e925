//! The XMPP harness against a real Prosody (run as root: namespaces, Prosody as root).

use std::process::Command;
use std::time::Duration;

use ipop_lab::tokio_xmpp::IqRequest;
use ipop_lab::tokio_xmpp::minidom::Element;
use ipop_lab::tokio_xmpp::parsers::presence::Type as PresenceType;
use ipop_lab::{
    BareJid, ExternalService, Jid, Netns, Prosody, Stanza, Subscription, TestDir,
    XMPP_LOGIN_TIMEOUT, XmppUser, veth,
};

/// Long enough for a stanza to cross loopback many times over.
const QUIET: Duration = Duration::from_millis(1500);

fn chat_from(user: &mut XmppUser) -> (Jid, String) {
    user.recv_chat(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("{} received no chat message", user.jid()))
}

#[test]
fn prosody_starts_and_a_user_logs_in() {
    let server = Prosody::start_local("example.org");
    server.register("alice", "pw-alice");
    let mut alice = XmppUser::connect(&server, "alice", "pw-alice");
    assert_eq!(alice.jid().as_str(), "alice@example.org");
    assert_eq!(alice.full_jid().to_bare(), *alice.jid());
    assert_eq!(alice.logins(), 1);
    assert!(alice.roster().is_empty(), "a new account has no contacts");

    let wrong = XmppUser::builder(&server, "alice", "not-her-password")
        .login_timeout(Duration::from_secs(3))
        .try_connect();
    let Err(e) = wrong else {
        panic!("a wrong password must not log in");
    };
    assert!(e.contains("did not log in"), "{e}");
}

#[test]
fn prosody_files_live_in_the_given_directory_and_go_with_it() {
    let dir = TestDir::new("pdir");
    let mut server = Prosody::builder("files.example").dir(dir.path()).start();
    assert!(server.dir().starts_with(dir.path()));
    assert!(server.ca_cert_path().exists());
    assert!(server.config_path().exists());
    let pid = server.pid().expect("a running Prosody has a PID");
    assert!(server.is_running());
    server.stop();
    assert!(!server.is_running());
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "Prosody (pid {pid}) should be gone after stop"
    );
}

#[test]
fn befriending_makes_both_rosters_show_both_and_unfriending_undoes_it() {
    let server = Prosody::start_local("friends.example");
    server.register("alice", "pw-a");
    server.register("bob", "pw-b");
    let mut alice = XmppUser::connect(&server, "alice", "pw-a");
    let mut bob = XmppUser::connect(&server, "bob", "pw-b");

    alice.befriend(&mut bob);
    assert_eq!(alice.subscription(bob.jid()), Some(Subscription::Both));
    assert_eq!(bob.subscription(alice.jid()), Some(Subscription::Both));
    // Friends see each other's presence.
    let bob_jid = bob.jid().clone();
    let seen = alice.wait_for(Duration::from_secs(5), |stanza| match stanza {
        Stanza::Presence(p) if p.from.as_ref().map(Jid::to_bare) == Some(bob_jid.clone()) => {
            Some(())
        }
        _ => None,
    });
    assert!(seen.is_some(), "alice should have received bob's presence");

    alice.befriend(&mut bob);
    assert_eq!(alice.roster().len(), 1, "befriending twice adds nothing");

    alice.unfriend(&mut bob);
    assert_eq!(alice.subscription(bob.jid()), None);
    assert_ne!(bob.subscription(alice.jid()), Some(Subscription::Both));
}

#[test]
fn chat_to_a_bare_jid_reaches_the_chat_client_not_the_vpn_resource() {
    let server = Prosody::start_local("chat.example");
    server.register("alice", "pw-a");
    server.register("bob", "pw-b");
    let mut alice = XmppUser::connect(&server, "alice", "pw-a");
    let mut bob_vpn = XmppUser::builder(&server, "bob", "pw-b")
        .resource("vpn")
        .initial_presence(Some(-1))
        .connect();
    let mut bob_chat = XmppUser::builder(&server, "bob", "pw-b")
        .resource("chat")
        .connect();
    bob_chat.set_presence(5);
    assert_eq!(bob_chat.full_jid().resource().as_str(), "chat");

    let bob: BareJid = bob_chat.jid().clone();
    alice.send_chat(&bob, "hello bob");
    let (from, text) = chat_from(&mut bob_chat);
    assert_eq!(text, "hello bob");
    assert_eq!(from.to_bare(), *alice.jid());
    assert_eq!(
        bob_vpn.recv_chat(QUIET),
        None,
        "a negative-priority resource must not get chat sent to the bare JID"
    );

    // And back, to the full JID the message came from.
    bob_chat.send_chat(alice.jid(), "hi alice");
    assert_eq!(chat_from(&mut alice).1, "hi alice");
}

#[test]
fn prosody_in_a_namespace_is_reachable_from_another_over_a_veth() {
    let server_ns = Netns::new("xsrv");
    let client_ns = Netns::new("xcli");
    let (in_server, in_client) = veth(&server_ns, &client_ns);
    server_ns.add_address(&in_server, "10.0.0.254/24");
    client_ns.add_address(&in_client, "10.0.0.1/24");

    let server = Prosody::start_in(&server_ns, "10.0.0.254", "lan.example");
    assert_eq!(server.c2s_addr().ip().to_string(), "10.0.0.254");
    assert_eq!(server.netns_name(), Some(server_ns.name()));
    let pid = server.pid().expect("running").to_string();
    let pids = Command::new("ip")
        .args(["netns", "pids", server_ns.name()])
        .output()
        .expect("run ip netns pids");
    assert!(
        String::from_utf8_lossy(&pids.stdout)
            .split_whitespace()
            .any(|p| p == pid),
        "Prosody (pid {pid}) should run inside {}",
        server_ns.name()
    );

    server.register("alice", "pw-a");
    server.register("bob", "pw-b");
    let mut alice = XmppUser::builder(&server, "alice", "pw-a")
        .netns(&client_ns)
        .connect();
    let mut bob = XmppUser::builder(&server, "bob", "pw-b")
        .netns(&client_ns)
        .connect();
    alice.befriend(&mut bob);
    alice.send_chat(bob.jid(), "over the veth");
    assert_eq!(chat_from(&mut bob).1, "over the veth");

    // From the caller's namespace, where 10.0.0.254 does not exist, nothing connects.
    let lonely = Netns::new("xnone");
    let outside = XmppUser::builder(&server, "alice", "pw-a")
        .netns(&lonely)
        .login_timeout(Duration::from_secs(2))
        .try_connect();
    let Err(e) = outside else {
        panic!("a namespace without a route to the server must not log in");
    };
    assert!(e.contains("10.0.0.254"), "{e}");
}

#[test]
fn stop_and_start_keep_users_and_rosters_and_clients_log_in_again() {
    let mut server = Prosody::start_local("restart.example");
    server.register("alice", "pw-a");
    server.register("bob", "pw-b");
    let mut alice = XmppUser::connect(&server, "alice", "pw-a");
    let mut bob = XmppUser::connect(&server, "bob", "pw-b");
    alice.befriend(&mut bob);
    drop(bob);
    let addr = server.c2s_addr();

    server.stop();
    assert!(!server.is_running());
    server.start();
    assert_eq!(server.c2s_addr(), addr, "the port stays the same");

    // The existing session comes back by itself (tokio-xmpp reconnects with back-off).
    alice.wait_logins(2, XMPP_LOGIN_TIMEOUT + Duration::from_secs(30));
    let mut bob = XmppUser::connect(&server, "bob", "pw-b");
    assert_eq!(bob.subscription(alice.jid()), Some(Subscription::Both));
    assert_eq!(alice.subscription(bob.jid()), Some(Subscription::Both));
    // Alice re-sent her presence after logging in again: messages to her bare JID arrive.
    bob.send_chat(alice.jid(), "welcome back");
    assert_eq!(chat_from(&mut alice).1, "welcome back");
}

#[test]
fn members_only_room_admits_members_only() {
    let server = Prosody::start_local("muc.example");
    for user in ["owner", "carol", "dave"] {
        server.register(user, "pw");
    }
    let mut owner = XmppUser::connect(&server, "owner", "pw");
    let mut carol = XmppUser::connect(&server, "carol", "pw");
    let mut dave = XmppUser::connect(&server, "dave", "pw");

    let room = owner.create_room_members_only("vpn");
    assert_eq!(room.as_str(), "vpn@conference.muc.example");
    let refused = carol.join("vpn");
    assert!(
        matches!(&refused, Err(e) if e.starts_with("registration-required")),
        "a non-member must be refused: {refused:?}"
    );

    owner.add_member("vpn", carol.jid());
    assert_eq!(owner.members("vpn"), vec![carol.jid().clone()]);
    let occupants = carol.join("vpn").expect("a member may join");
    let owner_seen = occupants
        .iter()
        .find(|o| o.nick == "owner")
        .unwrap_or_else(|| panic!("the owner should be listed: {occupants:?}"));
    assert_eq!(
        owner_seen.jid.as_ref(),
        Some(&owner.full_jid()),
        "the room is non-anonymous: members see real JIDs"
    );
    assert!(dave.join("vpn").is_err(), "dave is still no member");

    owner.remove_member("vpn", carol.jid());
    assert!(owner.members("vpn").is_empty());
    let kicked = carol.wait_for(Duration::from_secs(5), |stanza| match stanza {
        Stanza::Presence(p)
            if p.type_ == PresenceType::Unavailable
                && p.from.as_ref().map(Jid::to_bare) == Some(room.clone()) =>
        {
            Some(())
        }
        _ => None,
    });
    assert!(kicked.is_some(), "carol should be removed from the room");
    assert!(carol.join("vpn").is_err(), "carol is no member any more");
}

#[test]
fn new_rooms_stay_locked_until_configured_unless_locking_is_off() {
    let locked = Prosody::start_local("locked.example");
    let open = Prosody::builder("open.example").room_locking(false).start();
    for server in [&locked, &open] {
        server.register("owner", "pw");
        server.register("carol", "pw");
    }

    let mut owner = XmppUser::connect(&locked, "owner", "pw");
    let mut carol = XmppUser::connect(&locked, "carol", "pw");
    owner
        .join("raw")
        .expect("joining a missing room creates it");
    let refused = carol.join("raw");
    assert!(
        matches!(&refused, Err(e) if e.starts_with("item-not-found")),
        "an unconfigured room is locked: {refused:?}"
    );

    let mut owner = XmppUser::connect(&open, "owner", "pw");
    let mut carol = XmppUser::connect(&open, "carol", "pw");
    owner
        .join("raw")
        .expect("joining a missing room creates it");
    let occupants = carol
        .join("raw")
        .expect("without locking a new room is open at once");
    assert_eq!(occupants.len(), 2, "{occupants:?}");
}

#[test]
fn external_services_are_announced() {
    let server = Prosody::builder("ext.example")
        .external_services(vec![
            ExternalService {
                kind: "stun".to_owned(),
                transport: "udp".to_owned(),
                host: "127.0.0.1".to_owned(),
                port: 3478,
                secret: None,
                ttl: None,
            },
            ExternalService {
                kind: "turn".to_owned(),
                transport: "udp".to_owned(),
                host: "127.0.0.1".to_owned(),
                port: 3478,
                secret: Some("testsecret".to_owned()),
                ttl: Some(600),
            },
        ])
        .start();
    server.register("alice", "pw");
    let mut alice = XmppUser::connect(&server, "alice", "pw");
    let query = Element::builder("services", "urn:xmpp:extdisco:2").build();
    let domain = Jid::new(server.domain()).expect("a domain JID");
    let reply = alice
        .iq(Some(domain), IqRequest::Get(query))
        .expect("a list of services");
    let services: Vec<&Element> = reply.children().collect();
    assert_eq!(services.len(), 2, "{reply:?}");
    let turn = services
        .iter()
        .find(|s| s.attr("type") == Some("turn"))
        .unwrap_or_else(|| panic!("a TURN service: {reply:?}"));
    assert_eq!(turn.attr("port"), Some("3478"));
    assert!(
        turn.attr("username").is_some() && turn.attr("password").is_some(),
        "time-limited TURN credentials: {reply:?}"
    );
}

#[test]
fn prosody_comes_back_after_a_kill_with_its_accounts() {
    let mut server = Prosody::start_local("crash.example");
    server.register("alice", "pw-a");
    let addr = server.c2s_addr();
    let pid = server.pid().expect("running");
    server.kill();
    assert!(!server.is_running());
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "Prosody (pid {pid}) should be gone after kill"
    );
    server.start();
    assert_eq!(server.c2s_addr(), addr, "the port stays the same");
    let alice = XmppUser::connect(&server, "alice", "pw-a");
    assert_eq!(alice.logins(), 1);
}
