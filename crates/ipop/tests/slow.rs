//! A slow XMPP server at start: `ipop up` logs in, warns about what has not come yet, and goes
//! on linking with what has.

use std::time::Duration;

mod common;
use common::*;

#[test]
fn a_room_join_that_never_completes_is_a_warning_and_friends_still_link() {
    let mut w = World::new("slowroom", 2);
    let mut alice = w.user("alice");
    let mut bob = w.user("bob");
    alice.befriend(&mut bob);
    // The "room" is a user account on the server's own domain: Prosody drops presence to an
    // account's resource that is not online, so the join is never answered.
    w.server.register("nobody", &password("nobody"));
    let overlays = format!(
        "{}\n{}",
        social("10.82.0.1/16"),
        group("nobody@example.org", "10.83.0.1/24", false)
    );
    w.configure(0, "alice", "laptop", &overlays);
    w.configure(1, "bob", "phone", &social("10.82.0.2/16"));
    w.node(0).start();
    w.node(1).start();
    // Past the 12 s login timeout, which used to end `ipop up` here.
    wait_social_ping(
        &w.lab.nodes[0],
        "bob@example.org",
        Duration::from_secs(30),
        "alice's device to ping bob's while its room join hangs",
    );
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        w.node(0).exited().is_none(),
        "ipop up exited; log {}",
        w.lab.nodes[0].log_path().display()
    );
    let status = w.node(0).status().expect("status");
    assert_eq!(status["xmpp"]["state"], "online", "{status:#}");
    let rooms = status["xmpp"]["rooms"].as_array().expect("rooms listed");
    assert_eq!(rooms.len(), 1, "{status:#}");
    assert_eq!(rooms[0]["room"], "nobody@example.org");
    assert_eq!(rooms[0]["joined"], false, "{status:#}");
    let text = ipop(&w.lab.nodes[0], &["status"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("room nobody@example.org  not joined: joining"),
        "{text}"
    );
    let log = std::fs::read_to_string(w.lab.nodes[0].log_path()).expect("log");
    assert!(
        log.contains("still waiting for joining the room nobody@example.org"),
        "no warning in the log:\n{log}"
    );
    w.lab.stop_all();
}
