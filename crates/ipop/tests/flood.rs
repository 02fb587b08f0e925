//! End to end: a device under a flood of forged WireGuard handshake initiations, 20 000 a
//! second from several source addresses, some of them with a valid MAC1. Its link keeps
//! passing ping and TCP, and a new peer still links to it. Needs root (namespaces, veths, TUN
//! devices), `ip` and `ping`.

use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use base64::Engine as _;
use ipop_lab::{Flood, Forgery, Lab, Node, add_sources, flood, wait_until};
use serde_json::Value;

const IPOP: &str = env!("CARGO_BIN_EXE_ipop");
const PORT: u16 = 51820;
/// Time for two daemons on one LAN to start and link up.
const LINK_UP: Duration = Duration::from_secs(10);
/// Forged initiations a second.
const RATE: u32 = 20_000;
/// The most the flood lasts; it stops once the checks made during it are done. A new peer
/// needs one handshake retry (5 s) after its cookie reply to link under it.
const FLOOD: Duration = Duration::from_secs(60);
const SOURCES: u8 = 5;
/// The TCP transfer during the flood.
const TRANSFER: usize = 4 << 20;
const IO_TIMEOUT: Duration = Duration::from_secs(20);

fn output_text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The number of replies in ping's summary line ("10 packets transmitted, 9 received, ...").
fn received(out: &std::process::Output) -> u32 {
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|line| {
            let (_, rest) = line.split_once(" transmitted, ")?;
            rest.split_once(' ')?.0.parse().ok()
        })
        .unwrap_or(0)
}

fn wait_ping(from: &mut Node, to: IpAddr, name: &str, timeout: Duration) {
    let what = format!("{to} ({name}) to answer a ping from {}", from.name);
    wait_until(timeout, &what, || {
        from.assert_running(&format!("the wait for {what}"));
        let out = from.ping(to, 1);
        if out.status.success() {
            Ok(())
        } else {
            Err(output_text(&out))
        }
    });
}

fn drops(status: &Value, reason: &str) -> u64 {
    status["drops"][reason].as_u64().unwrap_or(0)
}

/// Sends `len` pseudo-random bytes over TCP from `from` to `to`'s overlay address and checks
/// that they arrive intact; returns how long it took.
fn transfer(from: &Node, to: &Node, len: usize) -> Result<Duration, String> {
    let server_addr = SocketAddr::new(IpAddr::V4(to.overlay_v4), 5001);
    let (ready_tx, ready_rx) = mpsc::channel();
    let server = to.ns().spawn_in(move || -> Result<Vec<u8>, String> {
        let listener = TcpListener::bind(server_addr).map_err(|e| format!("bind: {e}"))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| format!("nonblocking: {e}"))?;
        let _ = ready_tx.send(());
        let deadline = Instant::now() + IO_TIMEOUT;
        let mut stream = loop {
            match listener.accept() {
                Ok((stream, _)) => break stream,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        return Err("no connection came".to_owned());
                    }
                    thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(format!("accept: {e}")),
            }
        };
        stream
            .set_nonblocking(false)
            .and_then(|()| stream.set_read_timeout(Some(IO_TIMEOUT)))
            .map_err(|e| format!("socket options: {e}"))?;
        let mut received = Vec::with_capacity(len);
        stream
            .read_to_end(&mut received)
            .map_err(|e| format!("read after {} bytes: {e}", received.len()))?;
        Ok(received)
    });
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .map_err(|_| "the server did not listen".to_owned())?;
    let data: Vec<u8> = (0..len as u64)
        .map(|i| (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8)
        .collect();
    let start = Instant::now();
    from.ns()
        .run_in(|| -> std::io::Result<()> {
            let mut stream = TcpStream::connect_timeout(&server_addr, Duration::from_secs(5))?;
            stream.set_write_timeout(Some(IO_TIMEOUT))?;
            stream.write_all(&data)?;
            stream.shutdown(Shutdown::Write)
        })
        .map_err(|e| format!("send: {e}"))?;
    let got = server
        .join()
        .map_err(|_| "the server thread panicked".to_owned())??;
    let elapsed = start.elapsed();
    if got != data {
        return Err(format!(
            "{} bytes arrived, not the {len} sent, or they differ",
            got.len()
        ));
    }
    Ok(elapsed)
}

/// Stops the flood when dropped, also when the test fails before it stops it.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// a is flooded from d's five addresses; b is a's peer, linked before the flood; c is a new
/// peer, started during the flood, that calls a (a knows c's key, not where it is).
#[test]
fn a_flooded_device_keeps_its_link_and_links_with_a_new_peer() {
    let mut lab = Lab::new(IPOP, "flood", 4);
    let [a, b, c, d] = &mut lab.nodes[..] else {
        panic!("four nodes expected");
    };
    let mut config = a.config(PORT);
    config.peers = vec![b.as_peer(Some(PORT)), c.as_peer(None)];
    a.write_config(&config);
    for node in [&*b, &*c] {
        let mut config = node.config(PORT);
        config.peers = vec![a.as_peer(Some(PORT))];
        node.write_config(&config);
    }
    a.start();
    b.start();
    wait_ping(b, IpAddr::V4(a.overlay_v4), "a", LINK_UP);
    let before = a.status().expect("a's status");
    assert_eq!(
        (
            drops(&before, "handshake_bad_mac"),
            drops(&before, "handshake_under_load")
        ),
        (0, 0),
        "no flood yet: {before}"
    );

    let target_key: [u8; 32] = base64::engine::general_purpose::STANDARD
        .decode(&a.public_key)
        .expect("a's public key is base64")
        .try_into()
        .expect("a's public key is 32 bytes");
    let stop = Arc::new(AtomicBool::new(false));
    let _stop_on_failure = StopOnDrop(Arc::clone(&stop));
    let spec = Flood {
        target: SocketAddr::new(IpAddr::V4(a.host.ipv4), PORT),
        target_key,
        sources: add_sources(&d.host, SOURCES),
        rate: RATE,
        duration: FLOOD,
        max_datagrams: u64::from(RATE) * FLOOD.as_secs(),
        stop: Some(Arc::clone(&stop)),
        forgery: Forgery::Both,
    };
    let flooding = d.ns().spawn_in(move || flood(&spec));
    let flood_start = Instant::now();
    thread::sleep(Duration::from_millis(500));
    c.start();

    // The link keeps passing ping and TCP.
    let out = b.ping(IpAddr::V4(a.overlay_v4), 10);
    let replies = received(&out);
    eprintln!("ping b -> a during the flood: {replies}/10 replies");
    assert!(
        replies >= 8,
        "ping from b to a during the flood:\n{}",
        output_text(&out)
    );
    let took = transfer(b, a, TRANSFER).expect("b sends to a during the flood");
    eprintln!(
        "{} MiB from b to a during the flood in {took:?} ({:.0} Mbit/s, debug build)",
        TRANSFER >> 20,
        (TRANSFER * 8) as f64 / took.as_secs_f64() / 1e6
    );

    // A new peer links to the flooded device, while the flood goes on.
    wait_ping(c, IpAddr::V4(a.overlay_v4), "a", Duration::from_secs(20));
    eprintln!("c reached a {:?} into the flood", flood_start.elapsed());
    let during = a.status().expect("a's status");
    let during_secs = flood_start.elapsed().as_secs();
    assert!(
        !flooding.is_finished(),
        "the flood should last until the checks are done"
    );
    stop.store(true, Ordering::Relaxed);
    let report = flooding
        .join()
        .expect("the flood should not panic")
        .expect("the flood's sources bind");
    eprintln!(
        "flood: {report:?}, {:.0} datagrams/s; a's drops during it: handshake_bad_mac {}, \
         handshake_under_load {}, handshake_not_for_us {}",
        report.rate(),
        drops(&during, "handshake_bad_mac"),
        drops(&during, "handshake_under_load"),
        drops(&during, "handshake_not_for_us"),
    );
    assert!(
        report.rate() >= f64::from(RATE) * 0.75,
        "the flood should reach most of its rate: {report:?}"
    );
    // Forged MACs cost a MAC check; valid ones under load got cookie replies, not answers.
    assert!(
        drops(&during, "handshake_bad_mac") > 0 && drops(&during, "handshake_under_load") > 0,
        "a should count the flood: {during}"
    );
    assert!(report.cookie_replies > 0, "{report:?}");
    assert_eq!(report.other_replies, 0, "{report:?}");
    // At most 100 a second of the valid-MAC1 ones cost a key operation.
    let allowed = 100 * (during_secs + 2);
    assert!(
        drops(&during, "handshake_not_for_us") <= allowed,
        "more key operations than the limit allows: {during}"
    );

    // After the flood, both links work.
    for node in [&*b, &*c] {
        let out = node.ping(IpAddr::V4(a.overlay_v4), 3);
        assert!(
            out.status.success(),
            "ping from {} to a after the flood:\n{}",
            node.name,
            output_text(&out)
        );
    }
    lab.stop_all();
}
