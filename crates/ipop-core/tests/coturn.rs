//! The sans-IO STUN Binding and TURN clients against a real coturn on loopback (started per
//! test by ipop-lab, with time-limited credentials), driven over std sockets: UDP, and TCP
//! through the stream framer.

use ipop_core::osn::IceTransport;
use ipop_core::stun::{BINDING_REFRESH, BindingEvent, BindingState, StunBinding};
use ipop_core::turn::{
    MAX_OVERHEAD, StreamFramer, TurnAllocation, TurnCredentials, TurnEvent, TurnInput, TurnState,
};
use ipop_lab::{Coturn, rest_credentials};
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

/// How long one step (allocate, bind a channel, …) may take on loopback.
const STEP: Duration = Duration::from_secs(5);
/// How long to wait for a datagram that should not come.
const SILENCE: Duration = Duration::from_millis(500);

fn seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    u64::from(std::process::id()) << 32 | u64::from(nanos)
}

fn credentials(coturn: &Coturn, name: &str) -> TurnCredentials {
    let (username, password) = coturn.credentials(name, Duration::from_secs(3600));
    TurnCredentials { username, password }
}

fn udp_socket() -> UdpSocket {
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind a UDP socket");
    socket
        .set_read_timeout(Some(Duration::from_millis(20)))
        .expect("set a read timeout");
    socket
}

/// The client's transport to the server.
enum Wire {
    Udp(UdpSocket),
    Tcp(TcpStream, StreamFramer),
}

/// What the client received from peers through the relay.
#[derive(Debug, PartialEq, Eq)]
struct Relayed {
    peer: SocketAddr,
    payload: Vec<u8>,
    /// Whether it came as ChannelData (else as a Data indication).
    channel: bool,
}

/// A [`TurnAllocation`] driven over a real socket. Its clock is real time plus an offset that
/// tests move forward to reach refresh times without waiting for them.
struct Client {
    turn: TurnAllocation,
    wire: Wire,
    offset: Duration,
    received: Vec<Relayed>,
    events: Vec<TurnEvent>,
}

impl Client {
    fn udp(coturn: &Coturn, socket: UdpSocket, credentials: TurnCredentials) -> Client {
        let turn = TurnAllocation::new(
            coturn.addr(),
            IceTransport::Udp,
            credentials,
            Instant::now(),
            seed(),
        );
        Client::with(turn, Wire::Udp(socket))
    }

    fn tcp(coturn: &Coturn, credentials: TurnCredentials) -> Client {
        let stream = TcpStream::connect(coturn.addr()).expect("connect to coturn over TCP");
        stream
            .set_read_timeout(Some(Duration::from_millis(20)))
            .expect("set a read timeout");
        let turn = TurnAllocation::new(
            coturn.addr(),
            IceTransport::Tcp,
            credentials,
            Instant::now(),
            seed(),
        );
        Client::with(turn, Wire::Tcp(stream, StreamFramer::new()))
    }

    fn with(turn: TurnAllocation, wire: Wire) -> Client {
        Client {
            turn,
            wire,
            offset: Duration::ZERO,
            received: Vec::new(),
            events: Vec::new(),
        }
    }

    fn now(&self) -> Instant {
        Instant::now() + self.offset
    }

    fn send(&mut self, to: SocketAddr, bytes: &[u8]) {
        match &mut self.wire {
            Wire::Udp(socket) => {
                socket.send_to(bytes, to).expect("send to coturn");
            }
            Wire::Tcp(stream, _) => stream.write_all(bytes).expect("write to coturn"),
        }
    }

    /// Sends `payload` to `peer` through the relay.
    fn send_to_peer(&mut self, peer: SocketAddr, payload: &[u8]) {
        let mut out = vec![0; payload.len() + MAX_OVERHEAD];
        let n = self
            .turn
            .encapsulate(peer, payload, &mut out)
            .expect("encapsulate");
        let server = self.turn.server();
        self.send(server, &out[..n]);
    }

    /// Receives for up to 20 ms and feeds what came to the allocation.
    fn receive(&mut self) {
        let server = self.turn.server();
        let now = self.now();
        let mut buf = vec![0; 65536];
        match &mut self.wire {
            Wire::Udp(socket) => match socket.recv_from(&mut buf) {
                Ok((n, from)) => {
                    let datagram = &buf[..n];
                    match self.turn.handle_input(now, from, datagram) {
                        TurnInput::Data { peer, payload } => self.received.push(Relayed {
                            peer,
                            payload: datagram[payload].to_vec(),
                            channel: datagram[0] & 0xC0 == 0x40,
                        }),
                        TurnInput::Handled => {}
                        TurnInput::NotOurs => panic!("a datagram from {from} that is not TURN"),
                    }
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) => panic!("receive from coturn: {e}"),
            },
            Wire::Tcp(stream, framer) => {
                match stream.read(&mut buf) {
                    Ok(0) => panic!("coturn closed the TCP connection"),
                    Ok(n) => framer.push(&buf[..n]).expect("a TURN stream"),
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                    Err(e) => panic!("read from coturn: {e}"),
                }
                while let Some(frame) = framer.next_frame().expect("a TURN stream") {
                    match self.turn.handle_input(now, server, frame) {
                        TurnInput::Data { peer, payload } => self.received.push(Relayed {
                            peer,
                            payload: frame[payload].to_vec(),
                            channel: frame[0] & 0xC0 == 0x40,
                        }),
                        TurnInput::Handled => {}
                        TurnInput::NotOurs => panic!("a frame that is not TURN"),
                    }
                }
            }
        }
    }

    /// Runs the client (sends what it asks for, receives, drives its timers) until `done`.
    fn run_until(&mut self, what: &str, done: impl Fn(&Client) -> bool) {
        let deadline = Instant::now() + STEP;
        loop {
            while let Some((to, bytes)) = self.turn.poll_transmit() {
                self.send(to, &bytes);
            }
            while let Some(event) = self.turn.poll_event() {
                self.events.push(event);
            }
            if done(self) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {STEP:?} waiting for {what}; state: {}; events: {:?}; stats: {:?}",
                self.turn.state(),
                self.events,
                self.turn.stats()
            );
            self.receive();
            let now = self.now();
            self.turn.handle_timeout(now);
        }
    }

    fn allocate(&mut self) {
        self.run_until("the allocation", |c| {
            c.turn.state() != &TurnState::Allocating
        });
        assert_eq!(self.turn.state(), &TurnState::Allocated);
    }

    /// Waits until a payload came from the relay.
    fn expect_from_relay(&mut self) -> Relayed {
        self.run_until("data from the relay", |c| !c.received.is_empty());
        self.received.remove(0)
    }
}

/// A peer on the far side of the relay.
fn expect_at_peer(peer: &UdpSocket) -> (Vec<u8>, SocketAddr) {
    peer.set_read_timeout(Some(STEP))
        .expect("set a read timeout");
    let mut buf = [0; 2048];
    let (n, from) = peer.recv_from(&mut buf).expect("data relayed to the peer");
    (buf[..n].to_vec(), from)
}

#[test]
fn stun_binding_reports_the_mapped_address_and_binds_again() {
    let coturn = Coturn::start_local();
    let socket = udp_socket();
    let local = socket.local_addr().expect("local address");
    let mut offset = Duration::ZERO;
    let mut binding = StunBinding::new(coturn.addr(), Instant::now(), seed());
    let mut buf = [0; 2048];
    let mut run = |binding: &mut StunBinding, offset: Duration, answers: u64| {
        let deadline = Instant::now() + STEP;
        while binding.stats().responses < answers {
            assert!(
                Instant::now() < deadline,
                "no Binding answer: {:?}",
                binding.state()
            );
            while let Some((to, bytes)) = binding.poll_transmit() {
                socket.send_to(&bytes, to).expect("send");
            }
            if let Ok((n, from)) = socket.recv_from(&mut buf) {
                assert!(binding.handle_response(Instant::now() + offset, from, &buf[..n]));
            }
            binding.handle_timeout(Instant::now() + offset);
        }
    };
    run(&mut binding, offset, 1);
    assert_eq!(binding.mapped_address(), Some(local));
    assert_eq!(*binding.state(), BindingState::Done { mapped: local });
    assert_eq!(binding.poll_event(), Some(BindingEvent::Mapped(local)));

    offset += BINDING_REFRESH;
    binding.handle_timeout(Instant::now() + offset);
    run(&mut binding, offset, 2);
    assert_eq!(binding.mapped_address(), Some(local));
    assert_eq!(binding.poll_event(), None, "the same mapping is no news");
}

#[test]
fn udp_allocation_relays_both_ways_refreshes_and_releases() {
    let coturn = Coturn::start_local();
    let socket = udp_socket();
    let local = socket.local_addr().expect("local address");
    let spare = socket.try_clone().expect("clone the socket");
    let mut client = Client::udp(&coturn, socket, credentials(&coturn, "alice"));

    // Allocate: 401 with REALM and NONCE, then the signed request.
    client.allocate();
    assert_eq!(client.turn.stats().transmits, 2, "the 401 exchange");
    let relayed = client.turn.relayed_address().expect("a relayed address");
    assert_eq!(relayed.ip(), coturn.relay_ip());
    assert!(coturn.relay_ports().contains(&relayed.port()), "{relayed}");
    assert_eq!(client.turn.mapped_address(), Some(local));
    assert_eq!(
        client.events,
        [TurnEvent::Allocated {
            relayed,
            mapped: Some(local)
        }]
    );

    // A permission, then data both ways as Send and Data indications.
    let peer = udp_socket();
    let peer_addr = peer.local_addr().expect("peer address");
    client
        .turn
        .create_permission(client.now(), peer_addr.ip())
        .expect("permission");
    client.run_until("the permission", |c| c.turn.has_permission(peer_addr.ip()));
    client.send_to_peer(peer_addr, b"via a send indication");
    assert_eq!(
        expect_at_peer(&peer),
        (b"via a send indication".to_vec(), relayed)
    );
    peer.send_to(b"via a data indication", relayed)
        .expect("send to the relay");
    assert_eq!(
        client.expect_from_relay(),
        Relayed {
            peer: peer_addr,
            payload: b"via a data indication".to_vec(),
            channel: false
        }
    );

    // A channel, then data both ways as ChannelData.
    client
        .turn
        .bind_channel(client.now(), peer_addr)
        .expect("channel");
    client.run_until("the channel", |c| c.turn.channel(peer_addr).is_some());
    let channel = client.turn.channel(peer_addr).expect("bound");
    assert!(client.events.contains(&TurnEvent::ChannelBound {
        peer: peer_addr,
        channel
    }));
    let check_channel = |client: &mut Client, round: &str| {
        let out = format!("to the peer over channel {channel:#x}, {round}");
        client.send_to_peer(peer_addr, out.as_bytes());
        assert_eq!(expect_at_peer(&peer), (out.into_bytes(), relayed));
        let back = format!("from the peer, {round}");
        peer.send_to(back.as_bytes(), relayed)
            .expect("send to the relay");
        assert_eq!(
            client.expect_from_relay(),
            Relayed {
                peer: peer_addr,
                payload: back.into_bytes(),
                channel: true
            }
        );
    };
    check_channel(&mut client, "first");

    // 490 s later (by the client's clock): the allocation, the permission and the channel are
    // all refreshed, and the server accepts every refresh.
    let answered = client.turn.stats().responses;
    client.offset = Duration::from_secs(490);
    let now = client.now();
    client.turn.handle_timeout(now);
    client.run_until("three refreshes", |c| {
        c.turn.stats().responses >= answered + 3
    });
    assert_eq!(client.turn.state(), &TurnState::Allocated);
    assert_eq!(client.turn.stats().responses, answered + 3);
    assert!(
        client.turn.poll_timeout().expect("next refresh") > client.now() + Duration::from_secs(200)
    );
    check_channel(&mut client, "after the refreshes");

    // Release: the relay stops (coturn deletes the allocation on its next timer tick, within a
    // second or so), and then the address can allocate again without a 437.
    let now = client.now();
    client.turn.release(now);
    client.run_until("the release", |c| c.turn.state() != &TurnState::Releasing);
    assert_eq!(client.turn.state(), &TurnState::Released);
    assert_eq!(client.events.last(), Some(&TurnEvent::Released));
    spare
        .set_read_timeout(Some(SILENCE))
        .expect("set a read timeout");
    let released = Instant::now();
    let mut buf = [0; 2048];
    loop {
        peer.send_to(b"after the release", relayed)
            .expect("send to the old relay");
        if spare.recv_from(&mut buf).is_err() {
            break;
        }
        assert!(
            released.elapsed() < STEP,
            "the released relay still forwards after {STEP:?}"
        );
    }
    let mut again = Client::udp(&coturn, spare, credentials(&coturn, "alice"));
    again.allocate();
    assert_eq!(
        again.turn.stats().transmits,
        2,
        "no stale allocation in the way"
    );
}

#[test]
fn wrong_and_expired_credentials_fail_with_a_reason() {
    let coturn = Coturn::start_local();
    let (username, _) = coturn.credentials("mallory", Duration::from_secs(3600));
    let wrong = TurnCredentials {
        username,
        password: "bm90IHRoZSBwYXNzd29yZA==".to_owned(),
    };
    let (username, password) = rest_credentials(coturn.secret(), "late", 1_000_000_000);
    let expired = TurnCredentials { username, password };
    for credentials in [wrong, expired] {
        let mut client = Client::udp(&coturn, udp_socket(), credentials);
        client.run_until("a verdict", |c| c.turn.state() != &TurnState::Allocating);
        let TurnState::Failed { reason } = client.turn.state() else {
            panic!("{}", client.turn.state());
        };
        assert!(reason.contains("refused the credentials"), "{reason}");
        assert!(
            client.turn.stats().transmits <= 4,
            "{:?}",
            client.turn.stats()
        );
    }
}

#[test]
fn stale_nonces_are_renewed() {
    let coturn = Coturn::builder()
        .stale_nonce(Duration::from_secs(1))
        .start();
    let mut client = Client::udp(&coturn, udp_socket(), credentials(&coturn, "bob"));
    client.allocate();
    std::thread::sleep(Duration::from_millis(2100));
    let peer = udp_socket();
    let peer_addr = peer.local_addr().expect("peer address");
    let answered = client.turn.stats().responses;
    client
        .turn
        .create_permission(client.now(), peer_addr.ip())
        .expect("permission");
    client.run_until("the permission", |c| c.turn.has_permission(peer_addr.ip()));
    assert_eq!(
        client.turn.stats().responses,
        answered + 2,
        "438 Stale Nonce, then success with the new nonce"
    );
    client.send_to_peer(peer_addr, b"hello");
    assert_eq!(expect_at_peer(&peer).0, b"hello");
}

#[test]
fn an_allocation_left_behind_on_our_address_is_cleared() {
    let coturn = Coturn::start_local();
    let socket = udp_socket();
    let spare = socket.try_clone().expect("clone the socket");
    let mut first = Client::udp(&coturn, socket, credentials(&coturn, "carol"));
    first.allocate();
    let relayed = first.turn.relayed_address();
    // The process "restarts": the allocation is forgotten, not released.
    drop(first);
    let mut second = Client::udp(&coturn, spare, credentials(&coturn, "carol"));
    second.allocate();
    let stats = second.turn.stats();
    // Allocate (437), Refresh with lifetime 0 (401), signed (success), Allocate (success, or
    // 437 while coturn has not deleted the old one yet, then again a second later).
    assert!(stats.transmits >= 4, "{stats:?}");
    assert!(second.turn.relayed_address().is_some(), "{relayed:?}");
}

#[test]
fn tcp_allocation_through_the_stream_framer() {
    let coturn = Coturn::start_local();
    let mut client = Client::tcp(&coturn, credentials(&coturn, "dave"));
    client.allocate();
    let relayed = client.turn.relayed_address().expect("a relayed address");
    let peer = udp_socket();
    let peer_addr = peer.local_addr().expect("peer address");
    client
        .turn
        .bind_channel(client.now(), peer_addr)
        .expect("channel");
    client.run_until("the channel", |c| c.turn.channel(peer_addr).is_some());
    // Five bytes: ChannelData padded to eight on the stream, both ways.
    for round in 0..3 {
        let out = format!("out{round}");
        client.send_to_peer(peer_addr, out.as_bytes());
        assert_eq!(expect_at_peer(&peer), (out.into_bytes(), relayed));
        let back = format!("in-{round}");
        peer.send_to(back.as_bytes(), relayed)
            .expect("send to the relay");
        assert_eq!(
            client.expect_from_relay(),
            Relayed {
                peer: peer_addr,
                payload: back.into_bytes(),
                channel: true
            }
        );
    }
    let now = client.now();
    client.turn.release(now);
    client.run_until("the release", |c| c.turn.state() != &TurnState::Releasing);
    assert_eq!(client.turn.state(), &TurnState::Released);
}
