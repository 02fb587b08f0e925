//! Datagrams into a friend's relay (`ipop_core::peer_relay::RelayServer`): its control port and
//! its pairs' ports, from strangers and from sides that registered with the relay's token, with
//! the passing of time and the ending of idle pairs in between.
//!
//! The input is a script of steps, each `[op][length: u8][payload]`. The low three bits of `op`
//! choose the step; further bits choose the source address (one of four) and, for the steps
//! that register, the session and the side. Registrations made with the right token let the
//! fuzzer reach forwarding; the rest of its datagrams are arbitrary.
//!
//! Besides never panicking: a datagram is forwarded only from an address that registered as
//! one side of the pair whose port it came to, and only to the address the other side
//! registered from; the pairs never outnumber the limit; a pair's port is one the relay
//! opened and has not closed.
#![no_main]

use ipop_core::peer_relay::{PairVerdict, RelayClient, RelayLimits, RelayServer, Side, TOKEN_LEN};
use libfuzzer_sys::fuzz_target;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

const TOKEN: [u8; TOKEN_LEN] = [0x42; TOKEN_LEN];
const LIMITS: RelayLimits = RelayLimits {
    max_pairs: 3,
    pair_rate: 50_000,
    total_rate: 120_000,
};

fn source(bits: u8) -> SocketAddr {
    SocketAddr::from(([203, 0, 113, 1 + (bits & 3)], 1000 + u16::from(bits & 3)))
}

fuzz_target!(|data: &[u8]| {
    let start = Instant::now();
    let mut now = start;
    let control: SocketAddr = "198.51.100.9:3479".parse().unwrap();
    let mut server = RelayServer::new(TOKEN, LIMITS, now);
    let mut next_port = 40_000u16;
    let mut open: HashSet<u16> = HashSet::new();
    // Where each side of each port registered from, as the relay answered it.
    let mut registered: HashMap<(u16, usize), SocketAddr> = HashMap::new();
    let mut rest = data;
    let mut seed = 0;
    while let [op, len, tail @ ..] = rest {
        let len = usize::from(*len).min(tail.len());
        let (payload, after) = tail.split_at(len);
        rest = after;
        let from = source(op >> 3);
        match op & 7 {
            // Arbitrary bytes to the control port.
            0 => {
                let _ = server.handle_control(now, from, payload, || {
                    next_port += 1;
                    open.insert(next_port);
                    Some(next_port)
                });
            }
            // A registration with the right token, through both of its steps.
            1 | 2 => {
                seed += 1;
                let session = format!("s{}", (op >> 5) & 3);
                let side = if op & 1 == 1 {
                    Side::Initiator
                } else {
                    Side::Responder
                };
                let mut client =
                    RelayClient::new(now, control, &TOKEN, &session, side, "fuzz", seed);
                for _ in 0..2 {
                    let Some((to, bytes)) = client.poll_transmit() else {
                        break;
                    };
                    let answer = if to == control {
                        server.handle_control(now, from, &bytes, || {
                            next_port += 1;
                            open.insert(next_port);
                            Some(next_port)
                        })
                    } else {
                        match server.handle_pair(now, to.port(), from, &bytes) {
                            PairVerdict::Reply(answer) => {
                                let index = usize::from(side == Side::Responder);
                                registered.insert((to.port(), index), from);
                                Some(answer)
                            }
                            _ => None,
                        }
                    };
                    match answer {
                        Some(answer) => {
                            client.handle_response(now, to, &answer);
                        }
                        None => break,
                    }
                }
            }
            // Arbitrary bytes to a pair's port.
            3 | 4 => {
                let port = 40_001 + u16::from(op >> 5);
                if let PairVerdict::Forward(to) = server.handle_pair(now, port, from, payload) {
                    assert!(
                        open.contains(&port),
                        "forwarded on port {port}, never opened"
                    );
                    let a = registered.get(&(port, 0));
                    let b = registered.get(&(port, 1));
                    assert!(
                        (a == Some(&from) && b == Some(&to))
                            || (b == Some(&from) && a == Some(&to)),
                        "forwarded {from} -> {to} on {port}: sides {a:?} {b:?}"
                    );
                }
            }
            // Time passes.
            5 => {
                now += Duration::from_millis(u64::from(payload.first().copied().unwrap_or(0)) * 100)
            }
            // Idle pairs end.
            _ => {
                for port in server.expire(now) {
                    assert!(open.remove(&port), "closed port {port} twice");
                    registered.retain(|(p, _), _| *p != port);
                }
            }
        }
        assert!(server.pairs().len() <= LIMITS.max_pairs);
    }
});
