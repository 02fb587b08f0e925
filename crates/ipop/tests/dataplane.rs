//! End to end: ipop daemons in network namespaces on one LAN, with real TUN devices and real
//! traffic. Needs root (namespaces, veths, TUN devices), `ip` and `ping`.

use std::io::{Read, Write};
use std::net::{
    IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket,
};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ipop_lab::{Lab, LinkCounters, Node, peer_field, wait_until};

const IPOP: &str = env!("CARGO_BIN_EXE_ipop");
const PORT: u16 = 51820;
/// Time for two daemons on one LAN to start and link up.
const LINK_UP: Duration = Duration::from_secs(10);

fn pair(lab: &mut Lab) -> (&mut Node, &mut Node) {
    let [a, b] = &mut lab.nodes[..] else {
        panic!("two nodes expected");
    };
    (a, b)
}

fn output_text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Pings `to`'s IPv4 overlay address from `from` until one ping gets through. Fails at once if
/// either daemon exits.
fn wait_ping(from: &mut Node, to: &mut Node, timeout: Duration) {
    let addr = IpAddr::V4(to.overlay_v4);
    let what = format!("{addr} ({}) to answer a ping from {}", to.name, from.name);
    wait_until(timeout, &what, || {
        from.assert_running(&format!("the wait for {what}"));
        to.assert_running(&format!("the wait for {what}"));
        let out = from.ping(addr, 1);
        if out.status.success() {
            Ok(())
        } else {
            Err(output_text(&out))
        }
    });
}

fn assert_ping(from: &Node, to: IpAddr) {
    let out = from.ping(to, 3);
    assert!(
        out.status.success(),
        "ping -c 3 {to} from {} failed:\n{}",
        from.name,
        output_text(&out)
    );
}

/// Two nodes that name each other with their endpoints, running.
fn two_nodes(tag: &str) -> Lab {
    let mut lab = Lab::new(IPOP, tag, 2);
    lab.start_mesh(PORT);
    lab
}

#[test]
fn two_nodes_ping_over_ipv4_and_ipv6() {
    let mut lab = two_nodes("ping");
    let (a, b) = pair(&mut lab);
    wait_ping(a, b, LINK_UP);
    for (from, to) in [(&*a, &*b), (&*b, &*a)] {
        assert_ping(from, IpAddr::V4(to.overlay_v4));
        assert_ping(from, IpAddr::V6(to.overlay_v6));
    }
    let status = a.wait_peer_state(b, "connected", Duration::from_secs(2));
    assert_eq!(
        peer_field(&status, &b.public_key, "endpoint"),
        Some(format!("{}:{PORT}", b.host.ipv4).as_str()),
        "a should reach b at its configured endpoint: {status}"
    );
    lab.stop_all();
}

/// A deterministic pseudo-random buffer (xorshift64*), so that misplaced or repeated segments
/// cannot compare equal.
fn pseudo_random(len: usize) -> Vec<u8> {
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut data = Vec::with_capacity(len + 8);
    while data.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        data.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    data.truncate(len);
    data
}

/// Sends `len` pseudo-random bytes over one TCP connection from `from` to `to` at `to_addr`,
/// checks that they arrive intact, and returns how long the transfer took.
fn transfer(from: &Node, to: &Node, to_addr: IpAddr, len: usize) -> Duration {
    const IO_TIMEOUT: Duration = Duration::from_secs(15);
    let server_addr = SocketAddr::new(to_addr, 5001);
    let (ready_tx, ready_rx) = mpsc::channel();
    let server = to.ns().spawn_in(move || -> Result<Vec<u8>, String> {
        let listener = TcpListener::bind(server_addr).map_err(|e| format!("bind: {e}"))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| format!("nonblocking: {e}"))?;
        // The test waits for this before it connects; a closed channel fails it there.
        let _ = ready_tx.send(());
        let deadline = Instant::now() + IO_TIMEOUT;
        let mut stream = loop {
            match listener.accept() {
                Ok((stream, _)) => break stream,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        return Err("no connection came".to_owned());
                    }
                    std::thread::sleep(Duration::from_millis(20));
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
        .expect("the server should listen on its overlay address");

    let data = pseudo_random(len);
    let start = Instant::now();
    from.ns()
        .run_in(|| -> std::io::Result<()> {
            let mut stream = TcpStream::connect_timeout(&server_addr, Duration::from_secs(5))?;
            stream.set_write_timeout(Some(IO_TIMEOUT))?;
            stream.write_all(&data)?;
            stream.shutdown(Shutdown::Write)
        })
        .expect("the sender should send the whole stream over the overlay");
    let received = server
        .join()
        .expect("the server thread should not panic")
        .expect("the receiver should receive the whole stream");
    let elapsed = start.elapsed();
    assert_eq!(received.len(), data.len(), "received length");
    if let Some(offset) = received.iter().zip(&data).position(|(r, d)| r != d) {
        panic!("the received stream differs from the sent one at byte {offset}");
    }
    elapsed
}

#[test]
fn tcp_transfer_of_20_mb_arrives_intact() {
    const LEN: usize = 20 << 20;
    let mut lab = two_nodes("tcp");
    let (a, b) = pair(&mut lab);
    wait_ping(a, b, LINK_UP);
    let elapsed = transfer(a, b, IpAddr::V4(b.overlay_v4), LEN);
    eprintln!(
        "20 MiB over the overlay in {elapsed:?} ({:.0} Mbit/s, debug build)",
        (LEN * 8) as f64 / elapsed.as_secs_f64() / 1e6
    );
    lab.stop_all();
}

/// `node`'s TUN device's counters: its received packets and bytes are what ipop wrote to it.
fn tun(node: &Node) -> LinkCounters {
    node.ns().link_counters("ipop0")
}

#[test]
fn receiver_merges_tcp_segments_into_at_most_one_tun_write_per_8_packets() {
    const LEN: usize = 24 << 20;
    const MTU: u64 = 1420;
    let mut lab = two_nodes("gro");
    let (a, b) = pair(&mut lab);
    wait_ping(a, b, LINK_UP);
    for to in [IpAddr::V4(b.overlay_v4), IpAddr::V6(b.overlay_v6)] {
        let before = tun(b);
        let elapsed = transfer(a, b, to, LEN);
        let after = tun(b);
        let writes = after.rx_packets - before.rx_packets;
        let bytes = after.rx_bytes - before.rx_bytes;
        // Each WireGuard datagram carries at most one MTU-sized packet, so at least this many
        // came in.
        let packets = bytes.div_ceil(MTU);
        eprintln!(
            "to {to}: {LEN} bytes in {elapsed:?}; the receiver wrote {bytes} bytes to its TUN \
             device in {writes} writes, for at least {packets} packets: {:.3} writes per packet",
            writes as f64 / packets as f64
        );
        assert!(
            bytes >= LEN as u64,
            "the TUN device took {bytes} bytes, less than the {LEN} sent"
        );
        assert!(
            writes * 8 <= packets,
            "{writes} TUN writes for at least {packets} packets to {to}: more than 1 per 8"
        );
    }
    lab.stop_all();
}

/// UDP that the TUN device hands over one packet at a time (QUIC, calls, games: no offload
/// merges it) still leaves in UDP GSO trains when the application sends in bursts, is merged
/// again into UDP GSO writes to the receiver's TUN device, and arrives whole and in order.
#[test]
fn udp_sent_a_datagram_at_a_time_travels_in_trains_and_arrives_in_order() {
    const BURSTS: u32 = 50;
    const BURST: u32 = 40;
    const COUNT: u32 = BURSTS * BURST;
    const SIZE: usize = 1200;
    let payload = |seq: u32| -> Vec<u8> {
        let mut p = vec![0u8; SIZE];
        p[..4].copy_from_slice(&seq.to_be_bytes());
        for (i, byte) in p.iter_mut().enumerate().skip(4) {
            *byte = (seq as usize * 31 + i) as u8;
        }
        p
    };
    let mut lab = two_nodes("udptrain");
    let (a, b) = pair(&mut lab);
    wait_ping(a, b, LINK_UP);
    for to in [IpAddr::V4(b.overlay_v4), IpAddr::V6(b.overlay_v6)] {
        let server_addr = SocketAddr::new(to, 5002);
        let (ready_tx, ready_rx) = mpsc::channel();
        let server = b.ns().spawn_in(move || -> Result<Vec<u32>, String> {
            let socket = UdpSocket::bind(server_addr).map_err(|e| format!("bind: {e}"))?;
            // Room for every datagram, so that a receiver slowed down by the machine loses none.
            nix::sys::socket::setsockopt(
                &socket,
                nix::sys::socket::sockopt::RcvBufForce,
                &(16 << 20),
            )
            .map_err(|e| format!("SO_RCVBUFFORCE: {e}"))?;
            socket
                .set_read_timeout(Some(Duration::from_secs(2)))
                .map_err(|e| format!("timeout: {e}"))?;
            let _ = ready_tx.send(());
            let mut seqs = Vec::new();
            let mut buf = vec![0u8; 2048];
            while seqs.len() < COUNT as usize {
                let n = match socket.recv(&mut buf) {
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(format!("receive: {e}")),
                };
                let seq = u32::from_be_bytes(buf[..4].try_into().expect("4 bytes"));
                if buf[..n] != payload(seq)[..] {
                    return Err(format!("datagram {seq} arrived altered ({n} bytes)"));
                }
                seqs.push(seq);
            }
            Ok(seqs)
        });
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("the receiver should bind its overlay address");

        let sent_before = a.ns().link_counters(&a.host.ifname).tx_packets;
        let writes_before = tun(b).rx_packets;
        a.ns()
            .run_in(|| -> std::io::Result<()> {
                let socket = UdpSocket::bind(SocketAddr::new(
                    if to.is_ipv4() {
                        Ipv4Addr::UNSPECIFIED.into()
                    } else {
                        Ipv6Addr::UNSPECIFIED.into()
                    },
                    0,
                ))?;
                for burst in 0..BURSTS {
                    for seq in burst * BURST..(burst + 1) * BURST {
                        socket.send_to(&payload(seq), server_addr)?;
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                Ok(())
            })
            .expect("the sender should send every datagram");
        let seqs = server
            .join()
            .expect("the receiver thread should not panic")
            .expect("the receiver should read what came");
        // Datagrams a sent on its LAN interface, a UDP GSO train counting as one.
        let on_the_lan = a.ns().link_counters(&a.host.ifname).tx_packets - sent_before;
        let writes = tun(b).rx_packets - writes_before;
        eprintln!(
            "to {to}: {COUNT} datagrams of {SIZE} bytes in bursts of {BURST}: {} arrived; the \
             sender put {on_the_lan} packets (GSO trains) on its LAN, the receiver wrote its TUN \
             device {writes} times",
            seqs.len()
        );
        assert_eq!(
            seqs,
            (0..COUNT).collect::<Vec<_>>(),
            "every datagram to {to} arrives, in order"
        );
        assert!(
            on_the_lan * 2 <= u64::from(COUNT),
            "{on_the_lan} packets on the LAN for {COUNT} datagrams to {to}: not in trains"
        );
        assert!(
            writes * 2 <= u64::from(COUNT),
            "{writes} TUN writes on the receiver for {COUNT} datagrams to {to}: not merged"
        );
    }
    lab.stop_all();
}

#[test]
fn peer_restarted_on_a_new_port_is_reached_again_within_5_s() {
    const NEW_PORT: u16 = 51999;
    let mut lab = two_nodes("restart");
    let mut b_config = lab.mesh_configs(PORT).swap_remove(1);
    let (a, b) = pair(&mut lab);
    wait_ping(a, b, LINK_UP);

    let exit = b.stop();
    assert!(
        exit.success(),
        "ipop b should exit cleanly on SIGTERM, got {exit}"
    );
    // a still names b's old endpoint; b names a's, and now listens elsewhere.
    b_config.listen_port = NEW_PORT;
    b.write_config(&b_config);
    let restarted = Instant::now();
    b.start();
    wait_ping(a, b, Duration::from_secs(5));
    let elapsed = restarted.elapsed();
    eprintln!("a reached b again {elapsed:?} after b restarted on port {NEW_PORT}");
    assert!(
        elapsed <= Duration::from_secs(5),
        "a reached b only {elapsed:?} after b restarted"
    );
    let new_endpoint = format!("{}:{NEW_PORT}", b.host.ipv4);
    let b_key = b.public_key.clone();
    a.wait_status(
        Duration::from_secs(2),
        &format!("b at its new endpoint {new_endpoint}"),
        |s| peer_field(s, &b_key, "endpoint") == Some(new_endpoint.as_str()),
    );
    assert_ping(a, IpAddr::V6(b.overlay_v6));
    lab.stop_all();
}

#[test]
fn peer_with_the_wrong_key_gets_no_link_and_status_says_why() {
    let mut lab = Lab::new(IPOP, "wrongkey", 2);
    let wrong_key = lab.spare_key("wrong");
    let mut configs = lab.mesh_configs(PORT);
    // a is told a wrong key for b; b has a's right key.
    configs[0].peers[0].public_key.clone_from(&wrong_key);
    let (a, b) = pair(&mut lab);
    a.write_config(&configs[0]);
    b.write_config(&configs[1]);
    a.start();
    b.start();

    // Traffic both ways makes both sides try handshakes.
    for (from, to) in [(&*a, &*b), (&*b, &*a)] {
        let out = from.ping(IpAddr::V4(to.overlay_v4), 3);
        assert!(
            !out.status.success(),
            "ping from {} to {} must fail when a has the wrong key for b:\n{}",
            from.name,
            to.name,
            output_text(&out)
        );
    }

    let a_key = a.public_key.clone();
    for (node, peer_id) in [(a, wrong_key.as_str()), (b, a_key.as_str())] {
        let status = node.wait_status(
            Duration::from_secs(10),
            "a reason that mentions the key",
            |s| {
                peer_field(s, peer_id, "reason")
                    .is_some_and(|reason| reason.to_lowercase().contains("key"))
            },
        );
        let state = peer_field(&status, peer_id, "state");
        assert!(
            state.is_some() && state != Some("connected"),
            "node {} should list the peer as not connected: {status}",
            node.name
        );
    }
    lab.stop_all();
}
