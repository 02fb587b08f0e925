//! The XMPP server goes away while two friends' devices ping each other at 100 per second:
//! crashed (`kill -9`) and restarted at once, stopped for 20 s, or down for 45 s with one
//! device cut off from it 30 s longer than the other. Each scenario runs on Prosody and on
//! ejabberd. Links must carry on (under 1 % of the pings lost), and the devices must come back
//! online by themselves.
//!
//! A network flap cuts one device's connection to a server that keeps sessions for resumption
//! (XEP-0198) while a friend's device comes online and signals it: within the server's window
//! the stream is resumed and every signal arrives; beyond it the device opens a fresh session.
//!
//! Run as root: they create network namespaces and TUN devices.

use std::net::IpAddr;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use ipop_lab::{Node, ServerKind};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

mod common;
use common::*;

const ALICE: &str = "alice@example.org";
const BOB: &str = "bob@example.org";
const CAROL: &str = "carol@example.org";

/// The most pings an outage may cost, in percent.
const MAX_LOSS_PERCENT: f64 = 1.0;

/// How soon after the server accepts connections again a device must be online after a crash.
const ONLINE_AFTER_CRASH: Duration = Duration::from_secs(5);

/// How long a test waits for a device to come back online: the longest reconnect back-off
/// (30 s) plus one login. A device not back by then is reported as such.
const ONLINE_WAIT: Duration = Duration::from_secs(35);

/// How long pings go on once both devices are back online: time for a device that resyncs
/// its roster after the reconnection to do so, and for a link it wrongly closes to lose pings.
const PINGS_AFTER: Duration = Duration::from_secs(10);

/// How often the devices' status is read.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);

/// The upper bound of a flood's length, whatever happens.
const FLOOD_MAX: Duration = Duration::from_secs(180);

// ---- (b) a crash and an immediate restart ----

#[test]
fn prosody_killed_and_restarted_devices_back_online_within_5_s_and_links_intact() {
    crash_and_restart(ServerKind::Prosody, "okillp");
}

#[test]
fn ejabberd_killed_and_restarted_devices_back_online_within_5_s_and_links_intact() {
    crash_and_restart(ServerKind::Ejabberd, "okille");
}

fn crash_and_restart(kind: ServerKind, tag: &str) {
    let mut w = linked_friends(kind, tag);
    let World { lab, server } = &mut w;
    let mut watch = Watch::new(&lab.nodes);
    let flood = Flood::start(&lab.nodes[0], BOB);
    watch.observe_for(Duration::from_secs(2));
    let before = watch.latest();

    server.kill();
    let killed_at = Instant::now();
    server.start();
    let accepted_at = Instant::now();
    eprintln!(
        "{kind} killed and accepting connections again {:?} later",
        accepted_at - killed_at
    );
    let back = watch.until_back_online(&before, accepted_at, ONLINE_WAIT);
    watch.observe_for(PINGS_AFTER);
    let loss = flood.finish();

    eprintln!("{kind} crash: {loss}");
    watch.report(&before, killed_at, accepted_at);
    watch.print_back(&back, "the server accepted connections again");
    assert!(
        loss.percent() < MAX_LOSS_PERCENT,
        "{kind} crash: {loss}; want under {MAX_LOSS_PERCENT}%"
    );
    for (i, back) in back.iter().enumerate() {
        let device = watch.name(i);
        match back {
            Some(took) => assert!(
                *took <= ONLINE_AFTER_CRASH,
                "{kind} crash: {device} came back online {took:?} after the server accepted \
                 connections; want at most {ONLINE_AFTER_CRASH:?}"
            ),
            None => panic!(
                "{kind} crash: {device} was not back online {ONLINE_WAIT:?} after the server \
                 accepted connections (xmpp.state {:?}, reconnects {} before the crash)",
                watch.latest()[i].xmpp_state,
                before[i].reconnects
            ),
        }
    }
    watch.assert_same_link(&before, &format!("{kind} crash"));
    lab.stop_all();
}

// ---- (c) a graceful stop of 20 s ----

#[test]
fn prosody_stopped_for_20_s_loses_under_1_percent_of_pings() {
    stop_for_20_s(ServerKind::Prosody, "ostopp");
}

#[test]
fn ejabberd_stopped_for_20_s_loses_under_1_percent_of_pings() {
    stop_for_20_s(ServerKind::Ejabberd, "ostope");
}

fn stop_for_20_s(kind: ServerKind, tag: &str) {
    let mut w = linked_friends(kind, tag);
    let World { lab, server } = &mut w;
    let mut watch = Watch::new(&lab.nodes);
    let flood = Flood::start(&lab.nodes[0], BOB);
    watch.observe_for(Duration::from_secs(2));
    let before = watch.latest();

    let stopping_at = Instant::now();
    server.stop();
    eprintln!("{kind} stopped {:?} after SIGTERM", stopping_at.elapsed());
    watch.observe_for(Duration::from_secs(20));
    server.start();
    let accepted_at = Instant::now();
    let back = watch.until_back_online(&before, accepted_at, ONLINE_WAIT);
    watch.observe_for(PINGS_AFTER);
    let loss = flood.finish();

    eprintln!("{kind} stopped for 20 s: {loss}");
    watch.report(&before, stopping_at, accepted_at);
    watch.print_back(&back, "the server accepted connections again");
    assert!(
        loss.percent() < MAX_LOSS_PERCENT,
        "{kind} stopped for 20 s: {loss}; want under {MAX_LOSS_PERCENT}%"
    );
    assert_back(&watch, &back, &format!("{kind} stopped for 20 s"));
    lab.stop_all();
}

// ---- (c) a 45 s outage, one device back 30 s after the other ----

#[test]
fn prosody_outage_of_45_s_with_one_device_back_30_s_later_loses_under_1_percent() {
    staggered_outage(ServerKind::Prosody, "ostagp");
}

#[test]
fn ejabberd_outage_of_45_s_with_one_device_back_30_s_later_loses_under_1_percent() {
    staggered_outage(ServerKind::Ejabberd, "ostage");
}

/// The server stops for 15 s; when it starts again, bob's device cannot reach it for 30 s
/// more (nftables in its namespace rejects connections to the c2s port), so alice's device
/// is back on XMPP 30 s before bob's, and bob's is off it for 45 s.
fn staggered_outage(kind: ServerKind, tag: &str) {
    let mut w = linked_friends(kind, tag);
    let World { lab, server } = &mut w;
    let c2s = server.c2s_addr();
    let mut watch = Watch::new(&lab.nodes);
    let flood = Flood::start(&lab.nodes[0], BOB);
    watch.observe_for(Duration::from_secs(2));
    let before = watch.latest();

    let stopping_at = Instant::now();
    server.stop();
    watch.observe_for(Duration::from_secs(15));
    let block = Block::xmpp(&lab.nodes[1], c2s);
    server.start();
    let accepted_at = Instant::now();
    watch.observe_for(Duration::from_secs(30));
    drop(block);
    let unblocked_at = Instant::now();
    eprintln!(
        "{kind} down {:?}; bob's device cut off from it {:?} in all",
        accepted_at - stopping_at,
        unblocked_at - stopping_at
    );
    let back = watch.until_back_online(&before, unblocked_at, ONLINE_WAIT);
    watch.observe_for(PINGS_AFTER);
    let loss = flood.finish();

    eprintln!("{kind} 45 s outage, bob's device back 30 s after alice's: {loss}");
    watch.report(&before, stopping_at, accepted_at);
    let alice_back = watch.first_online_since(0, &before[0], accepted_at);
    let bob_back = watch.first_online_since(1, &before[1], accepted_at);
    watch.print_one_back(
        0,
        alice_back.map(|at| at - accepted_at),
        "the server accepted connections again",
    );
    watch.print_one_back(
        1,
        bob_back.map(|at| at.saturating_duration_since(unblocked_at)),
        "nftables let it reach the server again",
    );
    assert!(
        loss.percent() < MAX_LOSS_PERCENT,
        "{kind} 45 s outage with staggered reconnections: {loss}; want under \
         {MAX_LOSS_PERCENT}%"
    );
    let what = format!("{kind} 45 s outage");
    assert_back(&watch, &back, &what);
    assert!(
        alice_back.is_some_and(|at| at < unblocked_at),
        "{what}: alice's device did not reconnect while bob's was cut off (back at {:?} \
         after the restart), so the reconnections were not staggered",
        alice_back.map(|at| at - accepted_at)
    );
    assert!(
        bob_back.is_some_and(|at| at >= unblocked_at),
        "{what}: bob's device reconnected while nftables cut it off from the server"
    );
    lab.stop_all();
}

// ---- (d) a network flap: the stream resumed, or a fresh session after the window ----

/// How long the test's Prosody keeps a dropped session for its client to resume.
const RESUMPTION_WINDOW: Duration = Duration::from_secs(20);

/// When, after the flap began, carol's device starts: late enough that the signals it sends
/// alice's device while the flap lasts are answered within their 10 s timeout once it is back.
const CAROL_STARTS: Duration = Duration::from_secs(5);

/// How soon after the flap ends the device must be back online: the reconnect back-off while
/// connections are refused (at most 3 s) plus a login.
const ONLINE_AFTER_FLAP: Duration = Duration::from_secs(6);

#[test]
fn prosody_network_flap_of_10_s_resumes_the_stream_and_every_signal_arrives() {
    network_flap(Duration::from_secs(10), "oflaps");
}

#[test]
fn prosody_network_flap_longer_than_the_resumption_window_opens_a_fresh_session() {
    network_flap(RESUMPTION_WINDOW + Duration::from_secs(10), "oflapl");
}

/// Alice's and bob's devices are linked and ping each other; alice's device's connection to
/// Prosody is reset and its new connections refused for `flap`. Meanwhile carol, alice's
/// friend, starts her device, which signals alice's. Within [`RESUMPTION_WINDOW`] alice's
/// device must resume its stream and receive what carol's sent it while away; beyond it, it
/// must open a fresh session. Either way the link to bob's device stays the same WireGuard
/// session, and alice's and carol's devices link once alice's is back.
fn network_flap(flap: Duration, tag: &str) {
    let lab = ipop_lab::Lab::new(BIN, tag, 4);
    let host = &lab.nodes[3].host;
    let prosody = ipop_lab::Prosody::builder(DOMAIN)
        .in_netns(&host.ns, IpAddr::V4(host.ipv4))
        .resumption_window(RESUMPTION_WINDOW)
        .start();
    let mut w = World {
        lab,
        server: Box::new(prosody),
    };
    let (mut alice, mut bob, mut carol) = (w.user("alice"), w.user("bob"), w.user("carol"));
    alice.befriend(&mut bob);
    alice.befriend(&mut carol);
    w.configure(0, "alice", "laptop", &social("10.78.0.1/16"));
    w.configure(1, "bob", "phone", &social("10.78.0.2/16"));
    w.configure(2, "carol", "tablet", &social("10.78.0.3/16"));
    drop((alice, bob, carol));
    for i in 0..2 {
        w.node(i).start();
        xmpp_online(w.node(i));
    }
    let World { lab, server } = &mut w;
    let (nodes, others) = lab.nodes.split_at_mut(2);
    let (nodes, carol) = (&*nodes, &mut others[0]);
    wait_social_ping(
        &nodes[0],
        BOB,
        Duration::from_secs(15),
        "alice's device to ping bob's",
    );
    wait_social_ping(
        &nodes[1],
        ALICE,
        Duration::from_secs(15),
        "bob's device to ping alice's",
    );

    let mut watch = Watch::new(nodes);
    let flood = Flood::start(&nodes[0], BOB);
    watch.observe_for(Duration::from_secs(2));
    let before = watch.latest();
    let alice_before = XmppCounts::read(&nodes[0]);

    let cut = Block::cut(&nodes[0], server.c2s_addr());
    let cut_at = Instant::now();
    watch.observe_for(CAROL_STARTS);
    carol.start();
    watch.observe_for(flap.saturating_sub(cut_at.elapsed()));
    let carol_sent = XmppCounts::read(carol).signals_sent;
    drop(cut);
    let unblocked_at = Instant::now();
    let back = watch.until_one_back_online(0, &before[0], unblocked_at, ONLINE_WAIT);
    let alice_back = XmppCounts::read(&nodes[0]);
    let what = format!("a network flap of {flap:?}");
    watch.report(&before, cut_at, unblocked_at);
    watch.print_one_back(0, back, "the flap ended");
    wait_social_ping(
        &nodes[0],
        CAROL,
        Duration::from_secs(20),
        "alice's device to ping carol's after the flap",
    );
    eprintln!(
        "alice's and carol's devices linked {:?} after the flap",
        unblocked_at.elapsed()
    );
    watch.observe_for(Duration::from_secs(2));
    let loss = flood.finish();
    let alice_after = XmppCounts::read(&nodes[0]);

    eprintln!("{what}: {loss}");
    eprintln!(
        "alice's device: reconnects {} -> {}, resumptions {} -> {}, signals received {} -> {}; \
         carol's device sent {carol_sent} during the flap",
        alice_before.reconnects,
        alice_after.reconnects,
        alice_before.resumptions,
        alice_after.resumptions,
        alice_before.signals_received,
        alice_after.signals_received
    );
    let took = back.unwrap_or_else(|| {
        panic!(
            "{what}: alice's device was not back online {ONLINE_WAIT:?} after the flap (xmpp.state \
             {:?})",
            watch.latest()[0].xmpp_state
        )
    });
    assert!(
        took <= ONLINE_AFTER_FLAP,
        "{what}: alice's device came back online {took:?} after the flap; want at most \
         {ONLINE_AFTER_FLAP:?}"
    );
    assert_eq!(
        alice_back.reconnects,
        alice_before.reconnects + 1,
        "{what}: alice's device should have come back once"
    );
    if flap < RESUMPTION_WINDOW {
        assert_eq!(
            alice_back.resumptions,
            alice_before.resumptions + 1,
            "{what}: alice's device opened a fresh session; the server should have resumed its \
             stream"
        );
        assert!(
            carol_sent > 0,
            "{what}: carol's device sent alice's no signal during the flap, so nothing tested \
             their delivery"
        );
        assert!(
            alice_after.signals_received - alice_before.signals_received >= carol_sent,
            "{what}: carol's device sent {carol_sent} signals to alice's while it was away, and \
             alice's received {} in all since: some were lost",
            alice_after.signals_received - alice_before.signals_received
        );
    } else {
        assert_eq!(
            alice_back.resumptions, alice_before.resumptions,
            "{what}: the server resumed a stream that it should have dropped after \
             {RESUMPTION_WINDOW:?}"
        );
    }
    assert!(
        loss.percent() < MAX_LOSS_PERCENT,
        "{what}: {loss}; want under {MAX_LOSS_PERCENT}%"
    );
    watch.assert_same_link(&before, &what);
    lab.stop_all();
}

/// A device's XMPP counters from its status.
struct XmppCounts {
    reconnects: u64,
    resumptions: u64,
    signals_sent: u64,
    signals_received: u64,
}

impl XmppCounts {
    fn read(node: &Node) -> XmppCounts {
        let status = node
            .status()
            .unwrap_or_else(|e| panic!("no status from {}: {e}", node.name));
        let count = |key: &str| {
            status["xmpp"][key]
                .as_u64()
                .unwrap_or_else(|| panic!("no xmpp.{key} in the status: {status}"))
        };
        XmppCounts {
            reconnects: count("reconnects"),
            resumptions: count("resumptions"),
            signals_sent: count("signals_sent"),
            signals_received: count("signals_received"),
        }
    }
}

// ---- helpers ----

/// Alice's laptop and Bob's phone, friends on `kind`, linked: each pings the other. The chat
/// clients that made them friends are gone, so that only the devices use the server.
fn linked_friends(kind: ServerKind, tag: &str) -> World {
    let (mut w, _, _) =
        start_friends_on(kind, tag, &social("10.78.0.1/16"), &social("10.78.0.2/16"));
    xmpp_online(w.node(0));
    xmpp_online(w.node(1));
    wait_social_ping(
        &w.lab.nodes[0],
        BOB,
        Duration::from_secs(15),
        "alice's device to ping bob's",
    );
    wait_social_ping(
        &w.lab.nodes[1],
        ALICE,
        Duration::from_secs(15),
        "bob's device to ping alice's",
    );
    w
}

/// Each device is back online, with a message naming the one that is not.
fn assert_back(watch: &Watch, back: &[Option<Duration>], what: &str) {
    for (i, back) in back.iter().enumerate() {
        assert!(
            back.is_some(),
            "{what}: {} was not back online {ONLINE_WAIT:?} after it could reach the server \
             again (xmpp.state {:?})",
            watch.name(i),
            watch.latest()[i].xmpp_state
        );
    }
}

/// `ping -i 0.01` (100 per second) from a device to its friend's device, until
/// [`Flood::finish`] (or [`FLOOD_MAX`]).
struct Flood {
    child: Option<Child>,
    to: IpAddr,
    started: Instant,
}

impl Flood {
    fn start(from: &Node, friend: &str) -> Flood {
        let to = social_addr(from, friend).unwrap_or_else(|| panic!("{friend} has no address"));
        let max = FLOOD_MAX.as_secs();
        let mut cmd = from.ns().command("ping");
        cmd.args(["-q", "-n", "-i", "0.01", "-W", "1"])
            .args(["-c", &(max * 100).to_string(), "-w", &max.to_string()])
            .arg(to.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = cmd.spawn().expect("start ping");
        Flood {
            child: Some(child),
            to,
            started: Instant::now(),
        }
    }

    /// Stops the pings (SIGINT, as Ctrl-C) and reads ping's count of them.
    fn finish(mut self) -> Loss {
        let child = self.child.take().expect("a flood finishes once");
        if let Ok(pid) = i32::try_from(child.id()) {
            // It may have ended at its deadline: ESRCH is fine.
            let _ = kill(Pid::from_raw(pid), Signal::SIGINT);
        }
        let out = child.wait_with_output().expect("wait for ping");
        let took = self.started.elapsed();
        let summary = String::from_utf8_lossy(&out.stdout);
        let count = |what: &str| -> u64 {
            summary
                .split([',', '\n'])
                .find_map(|part| part.trim().strip_suffix(what)?.trim().parse().ok())
                .unwrap_or_else(|| {
                    panic!(
                        "no '{what}' count in ping's output: {summary}{}",
                        String::from_utf8_lossy(&out.stderr)
                    )
                })
        };
        let loss = Loss {
            sent: count("packets transmitted"),
            received: count("received"),
            took,
        };
        assert!(loss.sent > 0, "ping to {} sent nothing: {summary}", self.to);
        loss
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Child::kill sends SIGKILL to ping's PID only.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Pings sent and answered, over how long.
struct Loss {
    sent: u64,
    received: u64,
    took: Duration,
}

impl Loss {
    fn percent(&self) -> f64 {
        let lost = self.sent.saturating_sub(self.received);
        // Counts of pings are far below 2^52: exact as f64.
        100.0 * lost as f64 / self.sent as f64
    }
}

impl std::fmt::Display for Loss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.2}% of pings lost ({} of {} unanswered, sent in {:.1} s)",
            self.percent(),
            self.sent.saturating_sub(self.received),
            self.sent,
            self.took.as_secs_f64()
        )
    }
}

/// nftables in a device's namespace rejects (TCP reset) its connections to the XMPP server,
/// until dropped. Resets the device sends still go out, so that a connection it aborts is
/// closed at the server's end too.
struct Block<'a> {
    node: &'a Node,
}

const BLOCK_TABLE: &str = "ipop_test_block";

impl<'a> Block<'a> {
    /// A network flap: the block, and the device's connection to the server aborted at once,
    /// as a link going down breaks it (the kernel destroys the socket and resets the
    /// connection, so both ends know).
    fn cut(node: &'a Node, server: std::net::SocketAddr) -> Block<'a> {
        let block = Block::xmpp(node, server);
        node.ns().exec(&[
            "ss",
            "--kill",
            "--tcp",
            "dst",
            &server.ip().to_string(),
            "dport",
            "=",
            &server.port().to_string(),
        ]);
        block
    }

    fn xmpp(node: &'a Node, server: std::net::SocketAddr) -> Block<'a> {
        let family = if server.is_ipv4() { "ip" } else { "ip6" };
        let rules = format!(
            "add table inet {BLOCK_TABLE}; \
             add chain inet {BLOCK_TABLE} out {{ type filter hook output priority 0; }}; \
             add rule inet {BLOCK_TABLE} out {family} daddr {} tcp dport {} tcp flags & rst == 0 \
             reject with tcp reset",
            server.ip(),
            server.port()
        );
        node.ns().exec(&["nft", &rules]);
        Block { node }
    }
}

impl Drop for Block<'_> {
    fn drop(&mut self) {
        let out = self
            .node
            .ns()
            .try_exec(&["nft", "delete", "table", "inet", BLOCK_TABLE]);
        assert!(
            out.status.success() || std::thread::panicking(),
            "cannot lift the block: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// What a device's status says of its XMPP session and of its link to the friend's device.
#[derive(Clone, Debug, Default)]
struct Sample {
    at: Option<Instant>,
    /// `xmpp.state`, or why the status could not be read.
    xmpp_state: String,
    reconnects: u64,
    link: Option<Link>,
}

#[derive(Clone, Debug, PartialEq)]
struct Link {
    /// The friend device's public key.
    id: String,
    state: String,
    rx: u64,
    tx: u64,
}

impl Sample {
    fn read(node: &Node, friend: &str) -> Sample {
        let at = Some(Instant::now());
        let status = match node.status() {
            Ok(status) => status,
            Err(e) => {
                return Sample {
                    at,
                    xmpp_state: format!("(no status: {e})"),
                    ..Sample::default()
                };
            }
        };
        Sample {
            at,
            xmpp_state: status["xmpp"]["state"]
                .as_str()
                .unwrap_or("(none)")
                .to_owned(),
            reconnects: status["xmpp"]["reconnects"].as_u64().unwrap_or(0),
            link: peer_by_jid(&status, friend).map(|peer| Link {
                id: text(&peer["id"]),
                state: text(&peer["state"]),
                rx: peer["rx_bytes"].as_u64().unwrap_or(0),
                tx: peer["tx_bytes"].as_u64().unwrap_or(0),
            }),
        }
    }

    fn online(&self) -> bool {
        self.xmpp_state == "online"
    }

    /// Online on a session opened after `before` was taken.
    fn online_again(&self, before: &Sample) -> bool {
        self.online() && self.reconnects > before.reconnects
    }

    fn at(&self) -> Instant {
        self.at.expect("a sample read from a device")
    }
}

fn text(value: &Value) -> String {
    value.as_str().unwrap_or_default().to_owned()
}

/// The two devices' status, read every [`SAMPLE_EVERY`] while the test waits.
struct Watch<'a> {
    devices: [(&'a Node, &'static str, &'static str); 2],
    samples: [Vec<Sample>; 2],
}

impl<'a> Watch<'a> {
    fn new(nodes: &'a [Node]) -> Watch<'a> {
        let mut watch = Watch {
            devices: [
                (&nodes[0], BOB, "alice's device"),
                (&nodes[1], ALICE, "bob's device"),
            ],
            samples: [Vec::new(), Vec::new()],
        };
        watch.sample();
        watch
    }

    fn name(&self, i: usize) -> &'static str {
        self.devices[i].2
    }

    fn sample(&mut self) {
        for (i, (node, friend, _)) in self.devices.iter().enumerate() {
            self.samples[i].push(Sample::read(node, friend));
        }
    }

    fn latest(&self) -> [Sample; 2] {
        [0, 1].map(|i| self.samples[i].last().cloned().unwrap_or_default())
    }

    fn observe_for(&mut self, span: Duration) {
        let end = Instant::now() + span;
        while Instant::now() < end {
            std::thread::sleep(SAMPLE_EVERY.min(end.saturating_duration_since(Instant::now())));
            self.sample();
        }
    }

    /// When device `i` was first seen online on a new session at or after `since`.
    fn first_online_since(&self, i: usize, before: &Sample, since: Instant) -> Option<Instant> {
        self.samples[i]
            .iter()
            .find(|s| s.at() >= since && s.online_again(before))
            .map(Sample::at)
    }

    /// Samples until both devices are online on a new session, or `timeout` after `since`;
    /// returns how long after `since` each came back (`None`: not within the timeout).
    fn until_back_online(
        &mut self,
        before: &[Sample; 2],
        since: Instant,
        timeout: Duration,
    ) -> [Option<Duration>; 2] {
        let back = |watch: &Watch, i: usize| {
            watch.samples[i]
                .iter()
                .find(|s| s.online_again(&before[i]))
                .map(|s| s.at().saturating_duration_since(since))
        };
        let end = since + timeout;
        loop {
            let now = [back(self, 0), back(self, 1)];
            if now.iter().all(Option::is_some) || Instant::now() >= end {
                return now;
            }
            std::thread::sleep(SAMPLE_EVERY);
            self.sample();
        }
    }

    /// Samples until device `i` is online on a new session, or `timeout` after `since`;
    /// returns how long after `since` it came back.
    fn until_one_back_online(
        &mut self,
        i: usize,
        before: &Sample,
        since: Instant,
        timeout: Duration,
    ) -> Option<Duration> {
        let end = since + timeout;
        loop {
            let back = self.first_online_since(i, before, since);
            if back.is_some() || Instant::now() >= end {
                return back.map(|at| at - since);
            }
            std::thread::sleep(SAMPLE_EVERY);
            self.sample();
        }
    }

    /// The link each device had to its friend's before the outage is the same WireGuard
    /// session now: listed with the same key throughout, its byte counters never went back
    /// (a new session starts them from zero), and it is connected.
    fn assert_same_link(&self, before: &[Sample; 2], what: &str) {
        for (i, before) in before.iter().enumerate() {
            let name = self.name(i);
            let first = before
                .link
                .clone()
                .unwrap_or_else(|| panic!("{what}: {name} had no link before the outage"));
            let mut last = first.clone();
            for sample in self.samples[i].iter().filter(|s| s.at() > before.at()) {
                let Some(link) = &sample.link else {
                    panic!(
                        "{what}: {name} stopped listing its friend's device {:?} after the \
                         outage began",
                        sample.at().saturating_duration_since(before.at())
                    );
                };
                assert_eq!(
                    link.id, first.id,
                    "{what}: {name} lists another key for its friend's device"
                );
                assert!(
                    link.rx >= last.rx && link.tx >= last.tx,
                    "{what}: {name}'s link counters went back from rx {} tx {} to rx {} tx {} \
                     {:?} after the outage began: a new session replaced the link",
                    last.rx,
                    last.tx,
                    link.rx,
                    link.tx,
                    sample.at().saturating_duration_since(before.at())
                );
                last = link.clone();
            }
            assert!(
                last.rx > first.rx && last.tx > first.tx,
                "{what}: {name}'s link carried nothing after the outage began ({first:?} -> \
                 {last:?})"
            );
            assert_eq!(
                last.state, "connected",
                "{what}: {name}'s link is not connected at the end"
            );
        }
    }

    /// Prints when each device came back online (`back`, as from
    /// [`Watch::until_back_online`]).
    fn print_back(&self, back: &[Option<Duration>; 2], since: &str) {
        for (i, back) in back.iter().enumerate() {
            self.print_one_back(i, *back, since);
        }
    }

    fn print_one_back(&self, i: usize, back: Option<Duration>, since: &str) {
        match back {
            Some(took) => eprintln!("{} back online {took:?} after {since}", self.name(i)),
            None => eprintln!(
                "{} not back online {ONLINE_WAIT:?} after {since}",
                self.name(i)
            ),
        }
    }

    /// Prints each device's changes of XMPP state and link state, with times relative to the
    /// start of the outage, and when the server accepted connections again.
    fn report(&self, before: &[Sample; 2], outage_at: Instant, accepted_at: Instant) {
        let t = |at: Instant| -> String {
            if at >= outage_at {
                format!("+{:.1}s", (at - outage_at).as_secs_f64())
            } else {
                format!("-{:.1}s", (outage_at - at).as_secs_f64())
            }
        };
        eprintln!("server accepted connections again at {}", t(accepted_at));
        for (i, before) in before.iter().enumerate() {
            eprintln!(
                "{} (reconnects before the outage: {}):",
                self.name(i),
                before.reconnects
            );
            let mut shown: Option<(String, Option<String>, u64)> = None;
            for sample in &self.samples[i] {
                let now = (
                    sample.xmpp_state.clone(),
                    sample.link.as_ref().map(|l| l.state.clone()),
                    sample.reconnects,
                );
                if shown.as_ref() != Some(&now) {
                    eprintln!(
                        "  {} xmpp {} (reconnects {}), link {}",
                        t(sample.at()),
                        now.0,
                        now.2,
                        sample
                            .link
                            .as_ref()
                            .map_or("(not listed)".to_owned(), |l| format!(
                                "{} rx {} tx {}",
                                l.state, l.rx, l.tx
                            ))
                    );
                    shown = Some(now);
                }
            }
        }
    }
}

#[test]
fn loss_counts_unanswered_pings() {
    let loss = Loss {
        sent: 2000,
        received: 1990,
        took: Duration::from_millis(20_040),
    };
    assert!((loss.percent() - 0.5).abs() < 1e-9);
    assert_eq!(
        loss.to_string(),
        "0.50% of pings lost (10 of 2000 unanswered, sent in 20.0 s)"
    );
}
