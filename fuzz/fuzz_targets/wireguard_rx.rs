//! Datagrams through the core's receive path, `Engine::handle_udp` as the daemon calls it: the
//! demultiplexer, the ICE agents' STUN parsing, and the node's WireGuard sessions with two
//! peers, one static and one of the social overlay whose addresses are translated.
//!
//! The input is a script of steps, each `[op][length: u16 BE][payload]`. Besides raw datagrams,
//! the two peers are real WireGuard sessions: a step can have a peer send a handshake
//! initiation (possibly with bytes flipped), or send the payload as an IP packet through its
//! tunnel once the handshake is done, so that decrypted packets of the fuzzer's choosing reach
//! the inner-source check and the translation. Other steps pass time, deliver what the node
//! sends to the peers, and send packets from the TUN side.
//!
//! Besides never panicking: a packet handed to the TUN device comes from an address the sending
//! peer owns (in our numbering, for the translated peer).
#![no_main]

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey as WgPublicKey, StaticSecret};
use ipnet::IpNet;
use ipop_core::turn::MAX_OVERHEAD;
use ipop_core::{Destinations, Engine, Mapping, Memory, Node, PeerConfig, PublicKey, packet};
use libfuzzer_sys::fuzz_target;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const OURS: [u8; 32] = [1; 32];
const LOCAL: SocketAddr = addr(1, 51820);
const STRANGER: SocketAddr = addr(99, 4000);
/// Steps beyond this are ignored.
const MAX_STEPS: usize = 32;
/// Control datagrams passed back and forth per exchange.
const MAX_EXCHANGE: usize = 16;
/// The most a datagram or packet can be, with WireGuard's overhead.
const BUFFER: usize = 65535 + 32;

const fn addr(last: u8, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, last)), port)
}

/// A peer: its identity, where it sends from, and what it may send as.
struct PeerSpec {
    secret: [u8; 32],
    at: SocketAddr,
    /// Its addresses in our numbering: the inner sources accepted from it.
    sources: &'static [&'static str],
}

/// A static peer, as in `[[peers]]`.
const STATIC: PeerSpec = PeerSpec {
    secret: [2; 32],
    at: addr(2, 51820),
    sources: &["10.0.0.2/32", "fd00::2/128"],
};
/// A friend in the social overlay: it is 10.99.0.7 in the tunnel and 10.88.0.5 to us; we are
/// 10.99.0.1 in the tunnel.
const FRIEND: PeerSpec = PeerSpec {
    secret: [3; 32],
    at: addr(3, 40000),
    sources: &["10.88.0.5/32", "fd00::5/128"],
};
const PEERS: [&PeerSpec; 2] = [&STATIC, &FRIEND];

struct Harness {
    now: Instant,
    engine: Engine,
    /// The peers' own sessions with us, made when first needed (each costs key agreements).
    peers: [Option<Tunn>; 2],
    out: Vec<u8>,
    scratch: Vec<u8>,
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

/// Peer `p`'s session with us.
fn session(p: usize) -> Tunn {
    Tunn::new(
        StaticSecret::from(PEERS[p].secret),
        WgPublicKey::from(keys()[0].0),
        None,
        None,
        p as u32 + 1,
        None,
    )
}

/// The public keys of this node and the two peers, derived once: key derivations are most of
/// the cost of an input.
fn keys() -> &'static [PublicKey; 3] {
    static KEYS: OnceLock<[PublicKey; 3]> = OnceLock::new();
    KEYS.get_or_init(|| {
        [OURS, STATIC.secret, FRIEND.secret].map(|s| PublicKey::from_secret(&StaticSecret::from(s)))
    })
}

fn nets(list: &[&str]) -> Vec<IpNet> {
    list.iter().map(|n| n.parse().expect("a prefix")).collect()
}

impl Harness {
    fn new() -> Self {
        let static_peer = PeerConfig {
            name: Some("static".to_owned()),
            public_key: keys()[1],
            endpoint: Some(STATIC.at),
            addresses: nets(STATIC.sources),
            mapped: Vec::new(),
            destinations: None,
            keepalive: Some(25),
            roaming: true,
        };
        let friend = PeerConfig {
            name: Some("friend".to_owned()),
            public_key: keys()[2],
            endpoint: None,
            addresses: nets(&["fd00::5/128"]),
            mapped: vec![Mapping {
                local: Ipv4Addr::new(10, 88, 0, 5),
                remote: Ipv4Addr::new(10, 99, 0, 7),
                own: Ipv4Addr::new(10, 99, 0, 1),
            }],
            destinations: Some(Destinations {
                own: vec![IpAddr::V4(Ipv4Addr::new(10, 99, 0, 1))],
                routed: nets(&["192.168.50.0/24"]),
            }),
            keepalive: None,
            roaming: false,
        };
        let node =
            Node::new(StaticSecret::from(OURS), vec![static_peer, friend]).expect("a valid node");
        Harness {
            now: Instant::now(),
            engine: Engine::new(node, Vec::new(), Memory::default(), 1, 2),
            peers: [None, None],
            out: vec![0; BUFFER],
            scratch: vec![0; BUFFER],
        }
    }

    fn step(&mut self, op: u8, payload: &[u8]) {
        let p = usize::from(op >> 7);
        match op & 7 {
            0 => {
                let from = match (op >> 3) & 3 {
                    0 => STATIC.at,
                    1 => FRIEND.at,
                    _ => STRANGER,
                };
                self.receive(from, None, payload);
            }
            1 => {
                let Some(mut init) = self.handshake(p) else {
                    return;
                };
                for (b, x) in init.iter_mut().zip(payload) {
                    *b ^= x;
                }
                self.receive(PEERS[p].at, Some(p), &init);
                self.exchange();
            }
            2 => {
                let tunn = self.peers[p].get_or_insert_with(|| session(p));
                let datagram = match tunn.encapsulate(payload, &mut self.scratch) {
                    TunnResult::WriteToNetwork(d) => d.to_vec(),
                    _ => return,
                };
                self.receive(PEERS[p].at, Some(p), &datagram);
                self.exchange();
            }
            3 => {
                let mut ms = [0u8; 4];
                let n = payload.len().min(3);
                ms[4 - n..].copy_from_slice(&payload[..n]);
                self.now += Duration::from_millis(u64::from(u32::from_be_bytes(ms)));
                self.engine.handle_timeout(self.now);
                self.exchange();
            }
            4 => {
                let mut packet = payload.to_vec();
                let mut out = vec![0; (packet.len() + 32 + MAX_OVERHEAD).max(152)];
                let _ = self.engine.handle_tun(&mut packet, &mut out);
                self.exchange();
            }
            _ => self.exchange(),
        }
    }

    /// A fresh handshake initiation from peer `p`.
    fn handshake(&mut self, p: usize) -> Option<Vec<u8>> {
        let mut buf = vec![0; 148];
        let tunn = self.peers[p].get_or_insert_with(|| session(p));
        match tunn.format_handshake_initiation(&mut buf, true) {
            TunnResult::WriteToNetwork(init) => Some(init.to_vec()),
            _ => None,
        }
    }

    /// A datagram from `from` (sent by peer `sender`, if one of them sent it) into the engine;
    /// a packet that comes out for the TUN device must come from an address of the sender.
    fn receive(&mut self, from: SocketAddr, sender: Option<usize>, datagram: &[u8]) {
        let delivered = self
            .engine
            .handle_udp(self.now, LOCAL, from, datagram, &mut self.out);
        let Some(len) = delivered else {
            return;
        };
        let sender = sender.expect("only the peers' sessions can deliver packets");
        let (src, _) = packet::addresses(&self.out[..len]).expect("an IP packet");
        assert!(
            nets(PEERS[sender].sources).iter().any(|n| n.contains(&src)),
            "a packet from {src} delivered from peer {sender}"
        );
    }

    /// Delivers what the engine sends to the peers, and their answers back, until both are
    /// quiet.
    fn exchange(&mut self) {
        for _ in 0..MAX_EXCHANGE {
            let Some(t) = self.engine.poll_transmit() else {
                return;
            };
            let Some(p) = PEERS.iter().position(|s| s.at == t.destination) else {
                continue;
            };
            let tunn = self.peers[p].get_or_insert_with(|| session(p));
            let mut replies = Vec::new();
            let mut result = tunn.decapsulate(Some(LOCAL.ip()), &t.payload, &mut self.scratch);
            while let TunnResult::WriteToNetwork(reply) = result {
                replies.push(reply.to_vec());
                result = tunn.decapsulate(None, &[], &mut self.scratch);
            }
            for reply in replies {
                self.receive(PEERS[p].at, Some(p), &reply);
            }
        }
    }
}
