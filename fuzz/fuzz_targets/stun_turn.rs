//! STUN and TURN messages into the core's STUN Binding client and TURN allocation clients (one
//! over UDP, one over TCP through the stream framer), with the passing of time and the calls the
//! engine makes (permissions, channels, data to peers, release) in between.
//!
//! The input is a script of steps, each `[op][length: u16 BE][payload]`. The low three bits of
//! `op` choose the step; for messages from a server, further bits choose the source address
//! (the server, the server as an IPv4-mapped IPv6 address, or a stranger) and may make the
//! payload an answer to a request the client sent: the transaction ID of the latest (or the one
//! before) is written into it, and it may be signed with MESSAGE-INTEGRITY for the credentials
//! that request used. The fuzzer can then reach every state of the clients, authenticated or not.
//!
//! Besides never panicking: data handed on lies within the datagram and comes from a peer that
//! a permission was asked for; wrapping data for a relay never needs more room than documented; the stream
//! framer cuts the same frames whether a stream arrives at once or in small pieces, and never
//! overflows when it is drained after each read of at most 64 KiB.
#![no_main]

use bytecodec::{DecodeExt, EncodeExt};
use ipop_core::demux::{STUN_MAGIC_COOKIE, classify};
use ipop_core::osn::IceTransport;
use ipop_core::stun::{StunBinding, transaction_id};
use ipop_core::turn::{
    FramingError, MAX_OVERHEAD, MAX_STREAM_FRAME, StreamFramer, TurnAllocation, TurnCredentials,
    TurnError, TurnInput, stream_frame_len,
};
use libfuzzer_sys::fuzz_target;
use std::collections::{HashSet, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};
use stun_codec::rfc5389::attributes::{
    ErrorCode, Fingerprint, MessageIntegrity, Nonce, Realm, Software, UnknownAttributes, Username,
    XorMappedAddress,
};
use stun_codec::rfc5766::attributes::{
    ChannelNumber, Lifetime, RequestedTransport, XorPeerAddress, XorRelayAddress,
};
use stun_codec::{Message, MessageDecoder, MessageEncoder};

// The attributes of STUN and TURN answers, to sign them.
stun_codec::define_attribute_enums!(
    Attribute,
    AttributeDecoder,
    AttributeEncoder,
    [
        Username,
        MessageIntegrity,
        ErrorCode,
        UnknownAttributes,
        Realm,
        Nonce,
        XorMappedAddress,
        Software,
        Fingerprint,
        ChannelNumber,
        Lifetime,
        XorPeerAddress,
        XorRelayAddress,
        RequestedTransport
    ]
);

const STUN_SERVER: SocketAddr = addr(10, 3478);
const TURN_UDP: SocketAddr = addr(20, 3478);
const TURN_TCP: SocketAddr = addr(30, 3478);
const STRANGER: SocketAddr = addr(99, 3478);
const USERNAME: &str = "1700000000:alice";
const PASSWORD: &str = "c2VjcmV0";
/// Steps beyond this are ignored: longer scripts explore nothing new.
const MAX_STEPS: usize = 64;
/// Requests remembered per client, to answer.
const REMEMBERED: usize = 4;
/// The piece sizes in which the second framer gets the stream.
const PIECES: [usize; 5] = [1, 7, 64, 3, 500];

const fn addr(last: u8, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, last)), port)
}

/// A client of the harness.
#[derive(Clone, Copy)]
enum Client {
    Binding,
    Udp,
    Tcp,
}

struct Harness {
    now: Instant,
    binding: StunBinding,
    udp: TurnAllocation,
    tcp: TurnAllocation,
    password: String,
    /// The stream from the TCP server, at once …
    whole: StreamFramer,
    /// … and in small pieces: both must cut the same frames.
    pieces: StreamFramer,
    /// Whether the stream broke: the next bytes come on a new connection.
    broken: bool,
    /// The peers asked for on the UDP and the TCP allocation (permissions and channels), and not
    /// removed since: data may come from them only.
    asked: [HashSet<IpAddr>; 2],
    /// The latest requests of each client (binding, UDP, TCP), newest first.
    sent: [VecDeque<Vec<u8>>; 3],
}

fuzz_target!(|data: &[u8]| {
    let mut h = Harness::new();
    let mut rest = data;
    for _ in 0..MAX_STEPS {
        let Some((&op, tail)) = rest.split_first() else {
            break;
        };
        let (len, tail) = match tail.split_first_chunk::<2>() {
            Some((len, tail)) => (usize::from(u16::from_be_bytes(*len)), tail),
            None => (tail.len(), tail),
        };
        let (payload, tail) = tail.split_at(len.min(tail.len()));
        h.step(op, payload);
        rest = tail;
    }
});

impl Harness {
    fn new() -> Self {
        let now = Instant::now();
        let credentials = TurnCredentials {
            username: USERNAME.to_owned(),
            password: PASSWORD.to_owned(),
        };
        let mut h = Harness {
            now,
            binding: StunBinding::new(STUN_SERVER, now, 1),
            udp: TurnAllocation::new(TURN_UDP, IceTransport::Udp, credentials.clone(), now, 2),
            tcp: TurnAllocation::new(TURN_TCP, IceTransport::Tcp, credentials, now, 3),
            password: PASSWORD.to_owned(),
            whole: StreamFramer::new(),
            pieces: StreamFramer::new(),
            broken: false,
            asked: Default::default(),
            sent: Default::default(),
        };
        h.drain();
        h
    }

    fn step(&mut self, op: u8, payload: &[u8]) {
        let source = (op >> 3) & 3;
        let answer = op & 0x20 != 0;
        let sign = op & 0x40 != 0;
        let older = usize::from(op >> 7);
        let now = self.now;
        match op & 7 {
            0 => {
                let m = self.shape(Client::Binding, payload, answer, sign, older);
                let _ = (transaction_id(&m), classify(&m));
                self.binding
                    .handle_response(now, from(STUN_SERVER, source), &m);
            }
            1 => {
                let m = self.shape(Client::Udp, payload, answer, sign, older);
                let input = self.udp.handle_input(now, from(TURN_UDP, source), &m);
                check_input(&self.asked[0], &m, input);
            }
            2 => self.stream(payload, source, answer, sign, older),
            3 => {
                let mut ms = [0u8; 4];
                let n = payload.len().min(3);
                ms[4 - n..].copy_from_slice(&payload[..n]);
                self.now += Duration::from_millis(u64::from(u32::from_be_bytes(ms)));
                self.binding.handle_timeout(self.now);
                self.udp.handle_timeout(self.now);
                self.tcp.handle_timeout(self.now);
            }
            4 => {
                let ip = peer(payload).ip();
                let (a, asked) = self.allocation(source);
                if op & 0x20 == 0 {
                    if a.create_permission(now, ip).is_ok() {
                        asked.insert(ip);
                    }
                } else {
                    a.remove_permission(now, ip);
                    asked.remove(&ip);
                }
            }
            5 => {
                let to = peer(payload);
                let (a, asked) = self.allocation(source);
                if a.bind_channel(now, to).is_ok() {
                    asked.insert(to.ip());
                }
            }
            6 => {
                let to = peer(payload);
                let data = payload.get(peer_len(payload)..).unwrap_or_default();
                let (a, _) = self.allocation(source);
                let _ = a.channel(to);
                let _ = a.has_permission(to.ip());
                let mut out = vec![0; data.len() + MAX_OVERHEAD];
                let result = a.encapsulate(to, data, &mut out);
                assert_ne!(result, Err(TurnError::BufferTooSmall));
            }
            _ => {
                let a = if source & 1 == 0 {
                    &mut self.udp
                } else {
                    &mut self.tcp
                };
                if op & 0x20 == 0 {
                    a.release(now);
                } else {
                    // New credentials (XEP-0215 renewed them): the payload is the password.
                    self.password = String::from_utf8_lossy(payload).into_owned();
                    a.set_credentials(TurnCredentials {
                        username: USERNAME.to_owned(),
                        password: self.password.clone(),
                    });
                }
            }
        }
        self.drain();
    }

    /// The UDP or the TCP allocation, with the peers asked for on it.
    fn allocation(&mut self, source: u8) -> (&mut TurnAllocation, &mut HashSet<IpAddr>) {
        if source & 1 == 0 {
            (&mut self.udp, &mut self.asked[0])
        } else {
            (&mut self.tcp, &mut self.asked[1])
        }
    }

    /// Bytes from the TCP server: through both framers, the frames of the whole to the client.
    fn stream(&mut self, bytes: &[u8], source: u8, answer: bool, sign: bool, older: usize) {
        let _ = stream_frame_len(bytes);
        if self.broken {
            self.whole = StreamFramer::new();
            self.pieces = StreamFramer::new();
            self.broken = false;
        }
        let pushed = self.whole.push(bytes);
        assert_ne!(
            pushed,
            Err(FramingError::Overflow),
            "drained after each read"
        );
        let (frames, end) = drain_frames(&mut self.whole);
        let (mut piece_frames, mut piece_end) = (Vec::new(), Ok(()));
        let mut at = 0;
        for size in PIECES.iter().cycle() {
            if at >= bytes.len() || piece_end.is_err() {
                break;
            }
            let piece = &bytes[at..(at + size).min(bytes.len())];
            at += piece.len();
            let pushed = self.pieces.push(piece);
            assert_ne!(
                pushed,
                Err(FramingError::Overflow),
                "drained after each read"
            );
            let (more, end) = drain_frames(&mut self.pieces);
            piece_frames.extend(more);
            piece_end = end;
        }
        assert_eq!(frames, piece_frames, "the same frames from pieces");
        assert_eq!(end, piece_end, "the same end from pieces");
        match end {
            Ok(()) => assert!(self.whole.buffered() < MAX_STREAM_FRAME),
            Err(_) => self.broken = true,
        }
        for frame in frames {
            assert!(frame.len() <= MAX_STREAM_FRAME);
            let m = self.shape(Client::Tcp, &frame, answer, sign, older);
            let input = self.tcp.handle_input(self.now, from(TURN_TCP, source), &m);
            check_input(&self.asked[1], &m, input);
        }
    }

    /// The payload as a message from a server: with `answer`, an answer to a request of
    /// `client` (its transaction ID and the magic cookie written in); with `sign`, signed for
    /// the credentials of that request.
    fn shape(
        &self,
        client: Client,
        payload: &[u8],
        answer: bool,
        sign: bool,
        older: usize,
    ) -> Vec<u8> {
        let mut m = payload.to_vec();
        let Some(request) = self.sent[client as usize].get(older) else {
            return m;
        };
        if answer && m.len() >= 20 && m[0] < 0x40 {
            m[4..8].copy_from_slice(&STUN_MAGIC_COOKIE);
            m[8..20].copy_from_slice(&request[8..20]);
        }
        if sign && let Some(signed) = signed(&m, request, &self.password) {
            m = signed;
        }
        m
    }

    /// Takes what the clients want to send and report, as the engine does after every input.
    fn drain(&mut self) {
        while let Some((to, request)) = self.binding.poll_transmit() {
            assert_eq!(to, STUN_SERVER);
            remember(&mut self.sent[Client::Binding as usize], request);
        }
        while self.binding.poll_event().is_some() {}
        let _ = (
            self.binding.poll_timeout(),
            self.binding.mapped_address(),
            self.binding.state().to_string(),
        );
        let sent = &mut self.sent;
        for (a, client) in [(&mut self.udp, Client::Udp), (&mut self.tcp, Client::Tcp)] {
            while let Some((to, request)) = a.poll_transmit() {
                assert_eq!(to, a.server());
                remember(&mut sent[client as usize], request);
            }
            while a.poll_event().is_some() {}
            let _ = (a.poll_timeout(), a.mapped_address(), a.state().to_string());
            assert_eq!(
                a.relayed_address().is_some(),
                *a.state() == ipop_core::turn::TurnState::Allocated,
                "a relayed address while allocated, and only then"
            );
        }
    }
}

fn remember(sent: &mut VecDeque<Vec<u8>>, request: Vec<u8>) {
    if request.len() >= 20 {
        sent.push_front(request);
        sent.truncate(REMEMBERED);
    }
}

/// Data from a relay lies within the datagram and comes from a peer that a permission was asked
/// for (the server may relay before its answer to CreatePermission arrives).
fn check_input(asked: &HashSet<IpAddr>, m: &[u8], input: TurnInput) {
    if let TurnInput::Data { peer, payload } = input {
        assert!(payload.start <= payload.end && payload.end <= m.len());
        assert!(
            asked.contains(&peer.ip()),
            "data from {peer}, never asked for"
        );
    }
}

/// The frames a framer has whole, and how it stands after them.
fn drain_frames(f: &mut StreamFramer) -> (Vec<Vec<u8>>, Result<(), FramingError>) {
    let mut frames = Vec::new();
    loop {
        match f.next_frame() {
            Ok(Some(frame)) => frames.push(frame.to_vec()),
            Ok(None) => return (frames, Ok(())),
            Err(e) => return (frames, Err(e)),
        }
    }
}

/// The server's address, that address written as IPv4-mapped IPv6 (a dual-stack socket reports
/// it so), or a stranger's.
fn from(server: SocketAddr, source: u8) -> SocketAddr {
    match source {
        1 => match server.ip() {
            IpAddr::V4(v4) => SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), server.port()),
            IpAddr::V6(_) => server,
        },
        2 => STRANGER,
        _ => server,
    }
}

/// A peer address from the start of `payload`: 18 bytes make an IPv6 address and port, 6 an
/// IPv4 one; less is padded.
fn peer(payload: &[u8]) -> SocketAddr {
    let mut b = [0u8; 18];
    let n = payload.len().min(18);
    b[..n].copy_from_slice(&payload[..n]);
    if peer_len(payload) == 18 {
        let mut ip = [0u8; 16];
        ip.copy_from_slice(&b[..16]);
        SocketAddr::new(
            IpAddr::V6(Ipv6Addr::from(ip)),
            u16::from_be_bytes([b[16], b[17]]),
        )
    } else {
        SocketAddr::new(
            IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3])),
            u16::from_be_bytes([b[4], b[5]]),
        )
    }
}

/// How many bytes of `payload` [`peer`] reads: an IPv6 peer when the first byte is odd.
fn peer_len(payload: &[u8]) -> usize {
    if payload.first().is_some_and(|b| b & 1 == 1) && payload.len() >= 18 {
        18
    } else {
        6
    }
}

/// `m` signed with MESSAGE-INTEGRITY for the username and realm of `request` (a request that
/// carries none needs no signed answer), if both decode.
fn signed(m: &[u8], request: &[u8], password: &str) -> Option<Vec<u8>> {
    let request: Message<Attribute> = MessageDecoder::new()
        .decode_from_bytes(request)
        .ok()?
        .ok()?;
    let username = request.get_attribute::<Username>()?.clone();
    let realm = request.get_attribute::<Realm>()?.clone();
    let message: Message<Attribute> = MessageDecoder::new().decode_from_bytes(m).ok()?.ok()?;
    let mut out =
        Message::<Attribute>::new(message.class(), message.method(), message.transaction_id());
    for attribute in message.attributes() {
        if !matches!(
            attribute,
            Attribute::MessageIntegrity(_) | Attribute::Fingerprint(_)
        ) {
            out.add_attribute(attribute.clone());
        }
    }
    let integrity =
        MessageIntegrity::new_long_term_credential(&out, &username, &realm, password).ok()?;
    out.add_attribute(integrity);
    MessageEncoder::new().encode_into_bytes(out).ok()
}
