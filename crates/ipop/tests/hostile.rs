//! End-to-end tests of a device under attack over XMPP. A stranger who knows a user's JID, and
//! nothing else, has the server forward what no client would send: stanzas nested 20 000 deep,
//! 64 KiB attributes and text, and well-formed link offers. The device stays online, keeps its
//! links and leaves no trace of the stranger. The stranger speaks through ipop-lab's raw XMPP
//! client.
//!
//! Run as root: they create network namespaces and TUN devices.

use ipop_core::osn::{Candidate, CandidateKind, LinkOffer, Signal};
use ipop_lab::{Jid, RawElement, RawError, RawXmpp, log_tail, wait_until};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::*;

const ALICE: &str = "alice@example.org";
const ALICE_DEVICE: &str = "alice@example.org/laptop";
const BOB: &str = "bob@example.org";

/// How deep the deep stanzas nest below their top element.
const DEPTH: usize = 20_000;
/// The size of a long attribute value or text node.
const TOKEN: usize = 64 * 1024;
/// The least size of a stanza that is large but breaks no bound.
const WIDE: usize = 100_000;
/// How long the IQs of the attack may take to be answered, all together.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// Prosody's c2s stanza size limit (`c2s_stanza_size_limit`, 256 KiB by default; the lab's
/// config leaves it so): every hostile stanza stays under it, so the server forwards it.
const SERVER_STANZA_LIMIT: usize = 256 * 1024;

/// Registers `name`, a user nobody has befriended, and logs in with the raw client from the
/// server's host.
fn stranger(w: &World, name: &str) -> RawXmpp {
    w.server.register(name, &password(name));
    RawXmpp::builder(w.server.c2s_addr(), DOMAIN, w.server.ca_cert_der())
        .netns(w.server_ns())
        .login(name, &password(name))
        .unwrap_or_else(|e| panic!("{name} cannot log in: {e}"))
}

/// What makes a stanza break a bound of the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Hostile {
    /// Nested [`DEPTH`] levels deep (140 kB).
    Deep,
    /// An attribute value of [`TOKEN`] bytes.
    LongAttribute,
    /// A text node of [`TOKEN`] bytes.
    LongText,
}

impl Hostile {
    /// The drop reason the device counts it under.
    fn reason(self) -> &'static str {
        match self {
            Hostile::Deep => "xml-too-deep",
            Hostile::LongAttribute | Hostile::LongText => "xml-token-too-large",
        }
    }

    /// A presence to `to`.
    fn presence(self, to: &str, id: &str) -> String {
        let payload = match self {
            Hostile::Deep => nest(),
            Hostile::LongAttribute => format!(
                "<c xmlns='http://jabber.org/protocol/caps' hash='sha-1' node='{}' ver='x'/>",
                "n".repeat(TOKEN)
            ),
            Hostile::LongText => format!("<status>{}</status>", "t".repeat(TOKEN)),
        };
        format!("<presence to='{to}' id='{id}'>{payload}</presence>")
    }

    /// A Jingle IQ set to `to`, from the device `from`.
    fn jingle(self, to: &str, id: &str, from: &str) -> String {
        let jingle = match self {
            Hostile::Deep => format!(
                "<jingle xmlns='urn:xmpp:jingle:1' action='session-initiate' sid='{id}' \
                 initiator='{from}'>{}</jingle>",
                nest()
            ),
            Hostile::LongAttribute => format!(
                "<jingle xmlns='urn:xmpp:jingle:1' action='session-initiate' sid='{}' \
                 initiator='{from}'/>",
                "s".repeat(TOKEN)
            ),
            Hostile::LongText => format!(
                "<jingle xmlns='urn:xmpp:jingle:1' action='session-terminate' sid='{id}'>\
                 <reason><success/><text>{}</text></reason></jingle>",
                "t".repeat(TOKEN)
            ),
        };
        format!("<iq type='set' to='{to}' id='{id}'>{jingle}</iq>")
    }
}

/// [`DEPTH`] nested elements.
fn nest() -> String {
    format!(
        "<x xmlns='urn:example:deep'>{}{}",
        "<x>".repeat(DEPTH - 1),
        "</x>".repeat(DEPTH)
    )
}

/// A presence to `to` of at least [`WIDE`] bytes of small elements, within every bound.
fn wide_presence(to: &str, id: &str) -> String {
    let payload: String = (0..WIDE / 100)
        .map(|n| format!("<x xmlns='urn:example:wide' n='{n}'>{}</x>", "w".repeat(70)))
        .collect();
    format!("<presence to='{to}' id='{id}'>{payload}</presence>")
}

/// A stanza of the attack.
struct Sent {
    id: String,
    /// The bound it breaks; none for a wide presence.
    kind: Option<Hostile>,
    /// An IQ (to the device), else a presence (to the bare JID).
    iq: bool,
    xml: String,
}

/// The attack: 50 stanzas, presences to Alice's bare JID and Jingle IQs to her device in turn,
/// of every hostile kind.
fn attack(from: &str) -> Vec<Sent> {
    const PRESENCES: [Option<Hostile>; 4] = [
        Some(Hostile::Deep),
        Some(Hostile::LongAttribute),
        Some(Hostile::LongText),
        None,
    ];
    const IQS: [Hostile; 3] = [Hostile::Deep, Hostile::LongAttribute, Hostile::LongText];
    (0..50)
        .map(|i| {
            let id = format!("hostile-{i}");
            let iq = i % 2 == 1;
            let (kind, xml) = if iq {
                let kind = IQS[(i / 2) % IQS.len()];
                (Some(kind), kind.jingle(ALICE_DEVICE, &id, from))
            } else {
                let kind = PRESENCES[(i / 2) % PRESENCES.len()];
                let xml = match kind {
                    Some(kind) => kind.presence(ALICE, &id),
                    None => wide_presence(ALICE, &id),
                };
                (kind, xml)
            };
            let size = xml.len();
            let big = match kind {
                Some(Hostile::Deep) => size >= 140_000,
                Some(Hostile::LongAttribute | Hostile::LongText) => size > TOKEN,
                None => size >= WIDE,
            };
            assert!(
                big && size < SERVER_STANZA_LIMIT,
                "{id} ({kind:?}) has {size} bytes"
            );
            Sent { id, kind, iq, xml }
        })
        .collect()
}

/// How many stanzas of the attack break a bound counted as `reason`.
fn breaking(stanzas: &[Sent], reason: &str) -> u64 {
    let n = stanzas
        .iter()
        .filter(|s| s.kind.is_some_and(|k| k.reason() == reason))
        .count();
    u64::try_from(n).unwrap_or(u64::MAX)
}

/// The drop reasons of the attack.
const REASONS: [&str; 2] = ["xml-too-deep", "xml-token-too-large"];

/// What `ping -q` says at the end.
#[derive(Debug)]
struct PingSummary {
    transmitted: u64,
    /// How long it ran, in ms.
    time_ms: u64,
    loss_percent: f64,
    /// min, avg, max in ms; none when nothing came back.
    rtt: Option<(f64, f64, f64)>,
}

fn ping_summary(stdout: &str) -> PingSummary {
    let counts = stdout
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .unwrap_or_else(|| panic!("no packet counts in ping's output: {stdout}"));
    let transmitted = counts
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no transmitted count in {counts:?}"));
    let loss_percent = counts
        .split(", ")
        .find_map(|part| part.strip_suffix("% packet loss"))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no loss figure in {counts:?}"));
    let time_ms = counts
        .split(", ")
        .find_map(|part| part.strip_prefix("time ")?.strip_suffix("ms"))
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("no duration in {counts:?}"));
    let rtt = stdout
        .lines()
        .find_map(|l| l.strip_prefix("rtt min/avg/max/mdev = "))
        .map(|figures| {
            let ms: Vec<f64> = figures
                .split([' ', '/'])
                .filter_map(|n| n.parse().ok())
                .collect();
            match ms[..] {
                [min, avg, max, ..] => (min, avg, max),
                _ => panic!("no RTT figures in {figures:?}"),
            }
        });
    PingSummary {
        transmitted,
        time_ms,
        loss_percent,
        rtt,
    }
}

#[test]
fn ping_summaries_are_read() {
    let ok = ping_summary(
        "PING 10.78.0.2 (10.78.0.2) 56(84) bytes of data.\n\n--- 10.78.0.2 ping statistics ---\n\
         1500 packets transmitted, 1499 received, 0.0666667% packet loss, time 15012ms\n\
         rtt min/avg/max/mdev = 0.301/0.912/12.480/0.520 ms, pipe 2\n",
    );
    assert_eq!((ok.transmitted, ok.time_ms), (1500, 15012));
    assert!((ok.loss_percent - 0.066_666_7).abs() < 1e-9);
    assert_eq!(ok.rtt, Some((0.301, 0.912, 12.48)));
    let none = ping_summary(
        "--- 10.78.0.2 ping statistics ---\n\
         616 packets transmitted, 0 received, +75 errors, 100% packet loss, time 6160ms\n",
    );
    assert_eq!(
        (none.transmitted, none.loss_percent, none.rtt),
        (616, 100.0, None)
    );
}

fn count(status: &Value, reason: &str) -> u64 {
    status["xmpp"]["drops"][reason].as_u64().unwrap_or(0)
}

/// (a) Alice's laptop and Bob's phone are friends and linked; Mallory, a stranger, sends 50
/// hostile stanzas to Alice's bare JID and to her device while Alice pings Bob at 100/s.
#[test]
fn a_strangers_hostile_stanzas_leave_the_device_online_and_its_link_untouched() {
    let (mut w, alice_chat, bob_chat) =
        start_friends("hhostile", &social("10.78.0.1/16"), &social("10.78.0.2/16"));
    // The chat clients were for befriending; the presences to Alice's bare JID are for her
    // device alone.
    drop((alice_chat, bob_chat));
    wait_social_ping(
        &w.lab.nodes[0],
        BOB,
        Duration::from_secs(10),
        "alice's device to ping bob's",
    );
    let bob_addr = social_addr(&w.lab.nodes[0], BOB).expect("bob's address");
    let before = w.node(0).status().expect("alice's status");
    assert_eq!(before["xmpp"]["state"], "online", "{before}");
    let reconnects = before["xmpp"]["reconnects"]
        .as_u64()
        .unwrap_or_else(|| panic!("status shows no xmpp.reconnects: {before}"));
    let mut mallory = stranger(&w, "mallory");
    let stanzas = attack(mallory.jid());

    // 100 pings a second until the attack is over; at most 120 s of them.
    let mut pinger = w.lab.nodes[0].ns().command("ping");
    pinger
        .args([
            "-q", "-n", "-i", "0.01", "-c", "12000", "-w", "130", "-W", "1",
        ])
        .arg(bob_addr.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut ping = pinger.spawn().expect("ping starts");
    std::thread::sleep(Duration::from_secs(1));

    let started = Instant::now();
    for s in &stanzas {
        mallory
            .send_raw(s.xml.as_bytes())
            .unwrap_or_else(|e| panic!("mallory cannot send {}: {e}", s.id));
    }
    let sent_in = started.elapsed();
    // The answers to the IQs, by id, until all have come, the time is up or the device is gone.
    let iqs: Vec<&Sent> = stanzas.iter().filter(|s| s.iq).collect();
    let mut answers = BTreeMap::<String, RawElement>::new();
    let answers_until = Instant::now() + ANSWER_TIMEOUT;
    while answers.len() < iqs.len() {
        let Some(left) = answers_until.checked_duration_since(Instant::now()) else {
            break;
        };
        match mallory.recv(left.min(Duration::from_secs(1))) {
            Ok(e) if e.name() == "iq" && matches!(e.attr("type"), Some("result" | "error")) => {
                if let Some(id) = e.attr("id").filter(|id| iqs.iter().any(|s| s.id == *id)) {
                    answers.insert(id.to_owned(), e);
                }
            }
            Ok(_) => {}
            Err(RawError::Timeout { .. }) if w.lab.nodes[0].exited().is_none() => {}
            Err(RawError::Timeout { .. }) => break,
            Err(e) => panic!("mallory's stream failed: {e}"),
        }
    }
    let answered_in = started.elapsed();
    std::thread::sleep(Duration::from_secs(2));

    // SIGINT makes ping print its summary; it is ours, stopped by its PID.
    let still_pinging = matches!(ping.try_wait(), Ok(None));
    if still_pinging {
        let interrupted = Command::new("kill")
            .args(["-INT", &ping.id().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(interrupted, "cannot interrupt ping");
    }
    let out = ping.wait_with_output().expect("ping ends");
    let ping = ping_summary(&String::from_utf8_lossy(&out.stdout));

    let exited = w.node(0).exited();
    let mut after = w.lab.nodes[0].status();
    if exited.is_none() {
        // Presences get no answer: give the device a moment to count the last ones.
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline
            && after.as_ref().is_ok_and(|s| {
                REASONS
                    .iter()
                    .any(|r| count(s, r) < count(&before, r) + breaking(&stanzas, r))
            })
        {
            std::thread::sleep(Duration::from_millis(500));
            after = w.lab.nodes[0].status();
        }
    }

    let bytes: usize = stanzas.iter().map(|s| s.xml.len()).sum();
    let by_kind = |kind: Option<Hostile>, iq: bool| {
        stanzas
            .iter()
            .filter(|s| s.kind == kind && s.iq == iq)
            .count()
    };
    eprintln!(
        "mallory sent {} stanzas ({bytes} bytes) in {sent_in:?}: presences to {ALICE}: {} deep, \
         {} long attribute, {} long text, {} wide; Jingle IQs to {ALICE_DEVICE}: {} deep, {} long \
         attribute, {} long text; last IQ answer after {answered_in:?}",
        stanzas.len(),
        by_kind(Some(Hostile::Deep), false),
        by_kind(Some(Hostile::LongAttribute), false),
        by_kind(Some(Hostile::LongText), false),
        by_kind(None, false),
        by_kind(Some(Hostile::Deep), true),
        by_kind(Some(Hostile::LongAttribute), true),
        by_kind(Some(Hostile::LongText), true),
    );
    let answer_text = |s: &Sent| match answers.get(&s.id) {
        Some(e) => format!(
            "{} {}",
            e.attr("type").unwrap_or("?"),
            e.error_condition().unwrap_or("")
        ),
        None => "no answer".to_owned(),
    };
    let mut answer_counts = BTreeMap::<String, usize>::new();
    for s in &iqs {
        *answer_counts.entry(answer_text(s)).or_default() += 1;
    }
    eprintln!("answers to mallory's {} IQs: {answer_counts:?}", iqs.len());
    let rtt = ping.rtt.map_or_else(
        || "no reply".to_owned(),
        |(min, avg, max)| format!("RTT min {min} avg {avg} max {max} ms"),
    );
    eprintln!(
        "pings to bob's device across the attack (asked 100/s): {} sent in {} ms, {}% lost, {rtt}",
        ping.transmitted, ping.time_ms, ping.loss_percent
    );
    match &after {
        Ok(s) => eprintln!(
            "alice's device after the attack: xmpp {}, reconnects {} (before {}), link to bob {}, \
             xmpp drops {}",
            s["xmpp"]["state"],
            s["xmpp"]["reconnects"],
            before["xmpp"]["reconnects"],
            peer_by_jid(s, BOB).map_or(Value::Null, |p| p["state"].clone()),
            s["xmpp"]["drops"]
        ),
        Err(e) => eprintln!("alice's device after the attack: no status: {e}"),
    }

    let log = w.lab.nodes[0].log_path();
    if let Some(status) = exited {
        panic!(
            "alice's daemon died under the attack ({status}); the end of {}:\n{}",
            log.display(),
            log_tail(&log, 15)
        );
    }
    assert!(
        still_pinging,
        "ping ended before the attack did: the pings do not cover it"
    );
    let after = after.unwrap_or_else(|e| panic!("alice's device gives no status: {e}"));
    assert_eq!(
        after["xmpp"]["state"],
        "online",
        "alice's device is not online on XMPP after the attack; the end of {}:\n{}",
        log.display(),
        log_tail(&log, 15)
    );
    assert_eq!(
        after["xmpp"]["reconnects"].as_u64(),
        Some(reconnects),
        "alice's device lost its XMPP connection during the attack; the end of {}:\n{}",
        log.display(),
        log_tail(&log, 15)
    );
    assert_eq!(
        peer_by_jid(&after, BOB).map(|p| p["state"].clone()),
        Some(Value::from("connected")),
        "alice's link to bob: {after}"
    );
    assert!(
        ping.loss_percent < 1.0,
        "{}% of the pings to bob were lost during the attack",
        ping.loss_percent
    );
    // A packet thread held by parsing shows as seconds of RTT (3.2 s before the guard). Below
    // that, what a busy machine's scheduler adds (92 ms seen with a CPU hog and builds beside
    // the test) is not the daemon's: the loop's own stalls are held under the lab's bound when it
    // stops the daemons.
    let max_rtt = ping.rtt.map_or(f64::INFINITY, |(_, _, max)| max);
    assert!(
        max_rtt < 500.0,
        "a ping to bob took {max_rtt} ms during the attack"
    );
    let wrong: Vec<String> = iqs
        .iter()
        .filter(|s| {
            !answers.get(&s.id).is_some_and(|e| {
                e.attr("type") == Some("error") && e.error_condition() == Some("policy-violation")
            })
        })
        .map(|s| format!("{} ({:?}): {}", s.id, s.kind, answer_text(s)))
        .collect();
    assert!(
        wrong.is_empty(),
        "hostile IQs not answered with a policy-violation error: {wrong:#?}"
    );
    for reason in REASONS {
        let sent = breaking(&stanzas, reason);
        let counted = count(&after, reason).saturating_sub(count(&before, reason));
        assert!(
            counted >= sent,
            "alice's device counted {counted} drops as {reason}, mallory sent {sent} such \
             stanzas: {}",
            after["xmpp"]["drops"]
        );
    }
    w.lab.stop_all();
}

/// Waits until the file at `path` exists and has not changed for 2 s, and returns it.
fn settled(path: &Path) -> Vec<u8> {
    let mut last: Option<(Vec<u8>, Instant)> = None;
    wait_until(
        Duration::from_secs(20),
        &format!("{} to settle", path.display()),
        || {
            let now = std::fs::read(path).map_err(|e| e.to_string())?;
            match &last {
                Some((seen, since))
                    if *seen == now && since.elapsed() >= Duration::from_secs(2) =>
                {
                    Ok(now)
                }
                Some((seen, _)) if *seen == now => Err("unchanged, not for long".to_owned()),
                _ => {
                    last = Some((now, Instant::now()));
                    Err("changed".to_owned())
                }
            }
        },
    )
}

/// (e) Mallory, a stranger, announces ipop with a key in a presence to Alice's device, and
/// offers it a link.
#[test]
fn a_strangers_offer_gets_an_error_and_leaves_state_json_unchanged() {
    let (mut w, _alice_chat, _bob_chat) =
        start_friends("hoffer", &social("10.78.0.1/16"), &social("10.78.0.2/16"));
    wait_social_ping(
        &w.lab.nodes[0],
        BOB,
        Duration::from_secs(10),
        "alice's device to ping bob's",
    );
    let state = w.lab.nodes[0].dir.join("state").join("state.json");
    let before = settled(&state);
    assert!(
        String::from_utf8_lossy(&before).contains("bob@example.org/phone"),
        "alice's state has no pin for bob's device: {}",
        String::from_utf8_lossy(&before)
    );
    let status_before = w.node(0).status().expect("alice's status");

    let mut mallory = stranger(&w, "mallory");
    let me: Jid = mallory.jid().parse().expect("mallory's JID");
    let key: ipop_core::PublicKey = w.lab.spare_key("mallory").parse().expect("a WireGuard key");
    // The presence of an ipop device (docs/protocol.md), directed to Alice's.
    let presence = format!(
        "<presence to='{ALICE_DEVICE}'><priority>-1</priority><ipop xmlns='{}' key='{key}'/></presence>",
        ipop_xmpp::NS_IPOP
    );
    let offer = Signal::Initiate {
        session: "mallory-1".to_owned(),
        offer: LinkOffer {
            key,
            ufrag: "mllr".to_owned(),
            pwd: "mallory-password-long-enough".to_owned(),
            candidates: vec![Candidate {
                foundation: "1".to_owned(),
                component: 1,
                priority: 2_130_706_431,
                address: "10.0.0.66:51820".parse().expect("an address"),
                kind: CandidateKind::Host,
                related: None,
            }],
        },
    };
    let (jingle, _) = ipop_xmpp::jingle::to_element(&offer, &me);
    mallory
        .send_raw(presence.as_bytes())
        .expect("mallory sends her presence");
    mallory
        .send_raw(
            format!(
                "<iq type='set' id='offer-1' to='{ALICE_DEVICE}'>{}</iq>",
                String::from(&jingle)
            )
            .as_bytes(),
        )
        .expect("mallory sends her offer");
    let answer = mallory.wait_iq("offer-1", Duration::from_secs(10));

    // Long enough for the daemon to write any change, and for anything else it would send.
    let mut later = Vec::new();
    let until = Instant::now() + Duration::from_secs(5);
    while let Some(left) = until.checked_duration_since(Instant::now()) {
        match mallory.recv(left) {
            Ok(e) => later.push(e),
            Err(RawError::Timeout { .. }) => break,
            Err(e) => panic!("mallory's stream failed: {e}"),
        }
    }
    let after = std::fs::read(&state).expect("alice's state.json");
    let status = w.node(0).status().expect("alice's status");

    match &answer {
        Ok(e) => eprintln!("the answer to mallory's offer: {e}"),
        Err(e) => eprintln!("the answer to mallory's offer: {e}"),
    }
    for e in &later {
        eprintln!("mallory got later: {e}");
    }
    eprintln!(
        "alice's state.json: {} bytes before, {} after, {}",
        before.len(),
        after.len(),
        if before == after {
            "identical"
        } else {
            "changed"
        }
    );
    eprintln!(
        "alice's device counts: jingle-from-stranger {} (xmpp), device_not_authorised {}",
        count(&status, "jingle-from-stranger"),
        status["drops"]["device_not_authorised"]
    );

    let answer = answer.unwrap_or_else(|e| panic!("no answer to mallory's offer: {e}"));
    assert!(
        answer.attr("type") == Some("error")
            && matches!(
                answer.error_condition(),
                Some("service-unavailable" | "forbidden")
            ),
        "a stranger's offer must get service-unavailable or forbidden, got {answer}"
    );
    // Nothing else either (a session-terminate, say): it would tell that ipop runs there.
    let told: Vec<String> = later
        .iter()
        .filter(|e| e.attr("from").is_some_and(|from| from.starts_with(ALICE)))
        .map(ToString::to_string)
        .collect();
    assert!(
        told.is_empty(),
        "alice's device sent the stranger more than the error: {told:#?}"
    );
    assert!(
        before == after,
        "alice's state.json changed:\nbefore: {}\nafter: {}",
        String::from_utf8_lossy(&before),
        String::from_utf8_lossy(&after)
    );
    assert!(
        count(&status, "jingle-from-stranger") > count(&status_before, "jingle-from-stranger"),
        "alice's device does not count the stranger's offer: {}",
        status["xmpp"]["drops"]
    );
    let refused = |s: &Value| s["drops"]["device_not_authorised"].as_u64().unwrap_or(0);
    assert!(
        refused(&status) > refused(&status_before),
        "alice's device does not count the stranger's device: {}",
        status["drops"]
    );
    w.lab.stop_all();
}
