//! Hole punching between a NAT that keeps one mapping for every destination (the "easy" side:
//! a full or port-restricted cone) and one that maps every destination to a new random port
//! (the "hard" side: a symmetric NAT), by the birthday paradox.
//!
//! ICE alone cannot link such a pair: the hard side's server-reflexive port is good for the
//! STUN server only, and the easy side's NAT lets in nothing from a port it has not sent to.
//! So both sides spend a bounded budget:
//!
//! - the hard side opens [`SOCKETS`] extra sockets and sends a probe from each to the easy
//!   side's server-reflexive endpoint: its NAT now holds that many random ports, each open to
//!   exactly that endpoint (the probes themselves die at the easy side's NAT);
//! - the easy side then sends probes from its one mapping to the hard side's public address, at
//!   up to [`PROBES`] distinct random ports, [`BURST`] every [`BURST_EVERY`].
//!
//! A probe that lands on one of the hard side's ports reaches the socket behind it, and the
//! easy side's NAT has let that port in since the probe left. The hard side then offers that
//! socket to ICE as a host candidate of the session, and the connectivity checks from it pass
//! both NATs. Over the 64 512 ports a NAT picks from, each probe finds one of 256 with a chance
//! of 1 in 252: half the time within 175 probes, with 2048 probes in all but 3 of 10 000 tries.
//!
//! A probe is a STUN Binding indication (no answer is due) whose transaction ID is derived from
//! the Jingle session ID, which only the two ends know: it cannot be mistaken for anything else
//! and says which session it serves. The hard side asks the easy side to spray with a signal
//! of its own ([`crate::osn::Signal::Punch`]), once its sockets have sent their probes.
//!
//! Nothing here touches a socket or reads the clock.

use crate::demux::STUN_MAGIC_COOKIE;
use blake2::{Blake2s256, Digest};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

/// Extra sockets the hard side opens for one session.
pub const SOCKETS: usize = 256;
/// Most probes the easy side sends for one session.
pub const PROBES: usize = 2048;
/// Probes sent together, and how often: about 1300 a second, so that the whole budget goes out
/// in 1.6 s.
pub const BURST: usize = 64;
pub const BURST_EVERY: Duration = Duration::from_millis(50);
/// How long the hard side keeps sockets that no probe reached.
pub const SOCKET_LIFETIME: Duration = Duration::from_secs(10);
/// The easy side probes for one link at most this often: a device that asks for probes again
/// and again cannot turn this one into a stream of datagrams at an address of its choosing.
pub const SPRAY_INTERVAL: Duration = Duration::from_secs(30);
/// How long a session looks for a direct path before it punches.
pub const PUNCH_AFTER: Duration = Duration::from_millis(1500);

/// The ports a NAT allocates from (Linux picks from these for a source port of 1024 or more).
const FIRST_PORT: u32 = 1024;
const PORTS: u32 = 65536 - FIRST_PORT;

/// How the NAT in front of this device maps one internal endpoint, as the STUN servers saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatMapping {
    /// Fewer than two STUN servers answered: nothing to compare.
    Unknown,
    /// Every server saw the same address and port (no NAT, or a cone NAT).
    Independent,
    /// Servers saw different ports or addresses: the NAT maps each destination anew
    /// (symmetric). This side opens sockets to punch.
    Dependent,
}

impl NatMapping {
    pub fn as_str(self) -> &'static str {
        match self {
            NatMapping::Unknown => "unknown",
            NatMapping::Independent => "independent",
            NatMapping::Dependent => "dependent",
        }
    }

    /// What the mapped addresses that the STUN servers reported for one socket tell.
    pub fn from_observations(mapped: impl IntoIterator<Item = SocketAddr>) -> Self {
        let mut seen = mapped.into_iter();
        let Some(first) = seen.next() else {
            return NatMapping::Unknown;
        };
        let mut compared = false;
        for other in seen {
            if other != first {
                return NatMapping::Dependent;
            }
            compared = true;
        }
        if compared {
            NatMapping::Independent
        } else {
            NatMapping::Unknown
        }
    }
}

/// What hole punching did since start, on either side.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PunchStats {
    /// Extra sockets opened (the hard side).
    pub sockets: u64,
    /// Probes sent, from the extra sockets and sprayed.
    pub probes: u64,
    /// Sessions whose punching found a direct path.
    pub punched: u64,
    /// Sessions whose punching found none.
    pub failed: u64,
}

/// The probe datagram of a session: a bare STUN Binding indication. A datagram is the
/// session's probe when it is these 20 bytes exactly.
pub fn probe(session: &str) -> [u8; 20] {
    let mut p = [0u8; 20];
    // Binding (method 0x001) as an indication (class bits 01): 0x0011; no attributes.
    p[..2].copy_from_slice(&0x0011u16.to_be_bytes());
    p[4..8].copy_from_slice(&STUN_MAGIC_COOKIE);
    p[8..].copy_from_slice(&probe_id(session));
    p
}

fn probe_id(session: &str) -> [u8; 12] {
    let digest = Blake2s256::new()
        .chain_update(b"ipop punch probe\0")
        .chain_update(session.as_bytes())
        .finalize();
    let mut id = [0u8; 12];
    id.copy_from_slice(&digest[..12]);
    id
}

/// The easy side's probes to one address: distinct ports in a random order, paced.
#[derive(Debug, Clone)]
pub struct Sprayer {
    target: IpAddr,
    /// The ports come from the permutation `i -> (step * i + offset) mod PORTS`, which visits
    /// every port once when `step` is coprime with `PORTS` (2^10 * 3^2 * 7).
    step: u32,
    offset: u32,
    sent: usize,
    next: Instant,
}

impl Sprayer {
    /// Probes to `target`, starting now; `seed` must be random.
    pub fn new(target: IpAddr, now: Instant, seed: u64) -> Self {
        let mut step = ((seed >> 32) as u32 % PORTS) | 1;
        while step.is_multiple_of(3) || step.is_multiple_of(7) {
            step = (step + 2) % PORTS;
        }
        Sprayer {
            target,
            step,
            offset: (seed as u32) % PORTS,
            sent: 0,
            next: now,
        }
    }

    pub fn target(&self) -> IpAddr {
        self.target
    }

    /// How many probes went out.
    pub fn sent(&self) -> usize {
        self.sent
    }

    /// Whether the whole budget went out.
    pub fn done(&self) -> bool {
        self.sent >= PROBES
    }

    /// When the next burst is due, unless the budget is spent.
    pub fn poll_timeout(&self) -> Option<Instant> {
        (!self.done()).then_some(self.next)
    }

    /// The destinations of the burst due at `now`, if one is.
    pub fn poll_burst(&mut self, now: Instant) -> Vec<SocketAddr> {
        if self.done() || now < self.next {
            return Vec::new();
        }
        let end = (self.sent + BURST).min(PROBES);
        let burst = (self.sent..end)
            .map(|i| {
                let index =
                    (u64::from(self.step) * i as u64 + u64::from(self.offset)) % u64::from(PORTS);
                // Below 65536 by construction.
                let port = u16::try_from(FIRST_PORT + index as u32).unwrap_or(u16::MAX);
                SocketAddr::new(self.target, port)
            })
            .collect();
        self.sent = end;
        self.next = now + BURST_EVERY;
        burst
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn a_probe_is_a_stun_indication_that_names_its_session_only() {
        let p = probe("0123456789abcdef");
        assert_eq!(crate::demux::classify(&p), crate::demux::DatagramKind::Stun);
        assert_eq!(
            crate::stun::transaction_id(&p).map(|id| id.as_bytes().to_vec()),
            Some(p[8..].to_vec())
        );
        assert_eq!(p, probe("0123456789abcdef"));
        assert_ne!(p, probe("0123456789abcdee"));
    }

    #[test]
    fn the_spray_visits_distinct_ports_in_paced_bursts_within_budget() {
        let t0 = Instant::now();
        for seed in [0u64, 1, 0x1234_5678_9abc_def0, u64::MAX, 3 << 32, 21 << 32] {
            let mut s = Sprayer::new("198.18.0.7".parse().unwrap(), t0, seed);
            let mut ports = HashSet::new();
            let mut now = t0;
            let mut bursts = 0;
            while let Some(due) = s.poll_timeout() {
                assert!(s.poll_burst(due - Duration::from_millis(1)).is_empty() || due == t0);
                now = now.max(due);
                let burst = s.poll_burst(now);
                assert!(!burst.is_empty() && burst.len() <= BURST);
                for a in burst {
                    assert_eq!(a.ip(), s.target());
                    assert!(a.port() >= 1024);
                    assert!(ports.insert(a.port()), "port {} twice", a.port());
                }
                bursts += 1;
            }
            assert_eq!(ports.len(), PROBES);
            assert_eq!(s.sent(), PROBES);
            assert_eq!(bursts, PROBES.div_ceil(BURST));
            assert!(s.poll_burst(now + Duration::from_secs(60)).is_empty());
        }
    }

    #[test]
    fn the_mapping_is_dependent_when_two_servers_disagree_and_unknown_with_one() {
        let a: SocketAddr = "198.18.0.1:40000".parse().unwrap();
        let b: SocketAddr = "198.18.0.1:40001".parse().unwrap();
        assert_eq!(NatMapping::from_observations([]), NatMapping::Unknown);
        assert_eq!(NatMapping::from_observations([a]), NatMapping::Unknown);
        assert_eq!(
            NatMapping::from_observations([a, a]),
            NatMapping::Independent
        );
        assert_eq!(
            NatMapping::from_observations([a, a, b]),
            NatMapping::Dependent
        );
    }
}
