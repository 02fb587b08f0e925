//! The XMPP harness against a real ejabberd (run as root: namespaces, ejabberd's own user).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use ipop_lab::{BareJid, Ejabberd, Netns, ServerKind, Subscription, XmppServer, XmppUser, veth};

/// Whether a process with this PID exists (a zombie counts as gone).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z")
    })
}

/// The PIDs inside a namespace.
fn pids_in(ns: &Netns) -> Vec<u32> {
    let out = Command::new("ip")
        .args(["netns", "pids", ns.name()])
        .output()
        .expect("run ip netns pids");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|pid| pid.parse().ok())
        .filter(|pid| running(*pid))
        .collect()
}

/// The TCP ports listening inside a namespace.
fn listening(ns: &Netns) -> String {
    String::from_utf8_lossy(&ns.exec(&["ss", "-Htln"]).stdout).into_owned()
}

/// A server namespace and a client namespace joined by a veth: 10.0.0.254 and 10.0.0.1.
fn two_namespaces() -> (Netns, Netns) {
    let server_ns = Netns::new("ejsrv");
    let client_ns = Netns::new("ejcli");
    let (in_server, in_client) = veth(&server_ns, &client_ns);
    server_ns.add_address(&in_server, "10.0.0.254/24");
    client_ns.add_address(&in_client, "10.0.0.1/24");
    (server_ns, client_ns)
}

#[test]
fn chat_users_on_ejabberd_befriend_and_share_a_members_only_room() {
    let (server_ns, client_ns) = two_namespaces();
    let started = Instant::now();
    let server = Ejabberd::start_in(&server_ns, "10.0.0.254", "example.org");
    eprintln!(
        "ejabberd accepted connections {:?} after start",
        started.elapsed()
    );
    assert_eq!(server.kind(), ServerKind::Ejabberd);
    assert_eq!(server.c2s_addr().ip().to_string(), "10.0.0.254");
    let pid = server.pid().expect("running");
    assert!(
        pids_in(&server_ns).contains(&pid),
        "ejabberd (pid {pid}) should run inside {}",
        server_ns.name()
    );
    let owner = std::fs::metadata(format!("/proc/{pid}"))
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
        .expect("the VM's /proc entry");
    assert_ne!(owner, 0, "ejabberd runs as its own user, not as root");

    server.register("alice", "pw-a");
    server.register("bob", "pw-b");
    let connect = |user: &str, password: &str| {
        XmppUser::builder(&server, user, password)
            .netns(&client_ns)
            .connect()
    };
    let mut alice = connect("alice", "pw-a");
    let mut bob = connect("bob", "pw-b");
    alice.befriend(&mut bob);
    assert_eq!(alice.subscription(bob.jid()), Some(Subscription::Both));
    assert_eq!(bob.subscription(alice.jid()), Some(Subscription::Both));
    alice.send_chat(bob.jid(), "over ejabberd");
    let got = bob.recv_chat(Duration::from_secs(10));
    assert_eq!(got.map(|(_, text)| text), Some("over ejabberd".to_owned()));

    let room = alice.create_room_members_only("vpn");
    assert_eq!(room.as_str(), "vpn@conference.example.org");
    let refused = bob.join("vpn");
    assert!(
        matches!(&refused, Err(e) if e.starts_with("registration-required")),
        "a non-member must be refused: {refused:?}"
    );
    alice.add_member("vpn", bob.jid());
    assert_eq!(alice.members("vpn"), vec![bob.jid().clone()]);
    let occupants = bob.join("vpn").expect("a member may join");
    let alice_seen = occupants
        .iter()
        .find(|o| o.nick == "alice")
        .unwrap_or_else(|| panic!("the owner should be listed: {occupants:?}"));
    assert_eq!(
        alice_seen.jid.as_ref(),
        Some(&alice.full_jid()),
        "the room is non-anonymous: members see real JIDs"
    );

    // The VM started no epmd: the only listeners are the c2s port and the distribution port
    // on loopback.
    let ports = listening(&server_ns);
    assert!(!ports.contains(":4369 "), "epmd listens: {ports}");
    assert_eq!(ports.lines().count(), 2, "{ports}");
}

#[test]
fn ejabberd_comes_back_after_a_kill_and_a_stop_with_its_accounts_and_leaves_nothing() {
    let (server_ns, client_ns) = two_namespaces();
    let mut server = Ejabberd::start_in(&server_ns, "10.0.0.254", "restart.example");
    let dir = server.dir().to_owned();
    let addr = server.c2s_addr();
    server.register("alice", "pw-a");
    server.register("bob", "pw-b");
    let connect = |server: &Ejabberd, user: &str, password: &str| {
        XmppUser::builder(server, user, password)
            .netns(&client_ns)
            .connect()
    };
    let mut alice = connect(&server, "alice", "pw-a");
    {
        let mut bob = connect(&server, "bob", "pw-b");
        alice.befriend(&mut bob);
    }

    // A stop writes everything out; a crash loses what Mnesia had not yet written (up to 2 s
    // of changes), so the kill comes after the stop.
    let stopping = Instant::now();
    server.stop();
    eprintln!("ejabberd stopped {:?} after SIGTERM", stopping.elapsed());
    assert!(!server.is_running());
    server.start();
    assert_eq!(server.c2s_addr(), addr, "the port stays the same");
    // Alice's chat client logs in again by itself (backing off from 1 s).
    alice.wait_logins(2, Duration::from_secs(40));
    let mut bob = connect(&server, "bob", "pw-b");
    assert_eq!(bob.subscription(alice.jid()), Some(Subscription::Both));
    bob.send_chat(alice.jid(), "welcome back");
    let got = alice.recv_chat(Duration::from_secs(10));
    assert_eq!(got.map(|(_, text)| text), Some("welcome back".to_owned()));
    drop((alice, bob));

    let pid = server.pid().expect("running");
    server.kill();
    assert!(!server.is_running());
    assert!(!running(pid), "the VM (pid {pid}) is gone after kill");
    assert!(
        pids_in(&server_ns).is_empty(),
        "nothing of ejabberd is left in its namespace: {:?}",
        pids_in(&server_ns)
    );
    let started = Instant::now();
    server.start();
    eprintln!(
        "ejabberd accepted connections again {:?} after a kill",
        started.elapsed()
    );
    assert_eq!(server.c2s_addr(), addr, "the port stays the same");
    let mut alice = connect(&server, "alice", "pw-a");
    let bob_jid = BareJid::new("bob@restart.example").expect("a JID");
    assert_eq!(
        alice.subscription(&bob_jid),
        Some(Subscription::Both),
        "the roster survives a crash"
    );
    drop(alice);

    let pid = server.pid().expect("running");
    let mut below = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("the VM's tasks") {
        let children = task.expect("a task").path().join("children");
        let list = std::fs::read_to_string(children).unwrap_or_default();
        below.extend(
            list.split_whitespace()
                .filter_map(|c| c.parse::<u32>().ok()),
        );
    }
    assert!(!below.is_empty(), "the VM runs erl_child_setup");
    drop(server);
    for pid in below.iter().chain([&pid]) {
        assert!(!running(*pid), "process {pid} outlived the drop");
    }
    assert!(!Path::new(&dir).exists(), "{} is removed", dir.display());
    assert!(pids_in(&server_ns).is_empty());
}
