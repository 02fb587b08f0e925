//! A flood of forged WireGuard handshake initiations: 148-byte datagrams of the initiation
//! type, at a steady rate, from several source addresses, bounded in count and in time.
//!
//! Two forgeries: random bytes (MAC1 is wrong, so a device that checks it first spends almost
//! nothing), and random bytes with a MAC1 made for the target's public key, which anyone who
//! knows that key can make. The second kind passes the MAC1 check; only a device under load
//! that asks for cookies keeps it from costing a key operation, and it answers each one with a
//! cookie reply, which the flood counts.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use blake2::digest::Mac;
use blake2::digest::consts::U16;
use blake2::{Blake2s256, Blake2sMac, Digest};

use crate::net::Host;

/// The length of a WireGuard handshake initiation.
pub const INITIATION_LEN: usize = 148;
/// WireGuard's message type for a handshake initiation.
const HANDSHAKE_INIT: u8 = 1;
/// WireGuard's message type for a cookie reply, and its length.
const COOKIE_REPLY: u8 = 3;
const COOKIE_REPLY_LEN: usize = 64;
/// Where MAC1 starts: it covers everything before it.
const MAC1_OFFSET: usize = INITIATION_LEN - 32;
/// Distinct forged messages of each kind, made before the flood and sent in turn, so that the
/// sending loop costs no hashing.
const POOL: usize = 1024;
/// How often the sending loop catches up with its rate and reads replies.
const STEP: Duration = Duration::from_millis(1);

/// What the forged initiations look like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forgery {
    /// Random bytes after the type: MAC1 is wrong.
    Random,
    /// Random bytes with a MAC1 made for the target's public key.
    ValidMac1,
    /// The two in turn.
    Both,
}

impl Forgery {
    /// `random`, `mac1` or `both`.
    #[must_use]
    pub fn parse(s: &str) -> Option<Forgery> {
        match s {
            "random" => Some(Forgery::Random),
            "mac1" => Some(Forgery::ValidMac1),
            "both" => Some(Forgery::Both),
            _ => None,
        }
    }
}

/// A flood to send with [`flood`].
#[derive(Debug, Clone)]
pub struct Flood {
    pub target: SocketAddr,
    /// The target's WireGuard public key, for [`Forgery::ValidMac1`].
    pub target_key: [u8; 32],
    /// Addresses to send from, in turn: they must be on an interface of the namespace the
    /// flood runs in (see [`add_sources`]).
    pub sources: Vec<IpAddr>,
    /// Datagrams per second, over all sources.
    pub rate: u32,
    /// The flood stops after this long ...
    pub duration: Duration,
    /// ... or after this many datagrams, whichever comes first ...
    pub max_datagrams: u64,
    /// ... or as soon as this is set, when there is one.
    pub stop: Option<Arc<AtomicBool>>,
    pub forgery: Forgery,
}

/// What a flood did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FloodReport {
    /// Datagrams sent.
    pub sent: u64,
    /// Of which with a valid MAC1.
    pub sent_valid_mac1: u64,
    /// Sends that failed (a full socket buffer, say).
    pub failed: u64,
    /// Cookie replies that came back to the sources.
    pub cookie_replies: u64,
    /// Other datagrams that came back.
    pub other_replies: u64,
    pub elapsed: Duration,
}

impl FloodReport {
    /// Datagrams sent per second.
    #[must_use]
    pub fn rate(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.sent as f64 / secs
        } else {
            0.0
        }
    }
}

/// A small generator (xorshift64*) for the forged bytes.
struct Rng(u64);

impl Rng {
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let v = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// The key MAC1 is made with for messages to `public_key`: HASH("mac1----" || key).
fn mac1_key(public_key: &[u8; 32]) -> [u8; 32] {
    let mut hash = Blake2s256::new();
    hash.update(b"mac1----");
    hash.update(public_key);
    hash.finalize().into()
}

/// A forged handshake initiation: the type, three zero bytes, random bytes, and MAC1 made with
/// `mac1_key` when one is given (random otherwise). MAC2 is zero, as from a sender without a
/// cookie.
fn forge(rng: &mut Rng, mac1_key: Option<&[u8; 32]>) -> [u8; INITIATION_LEN] {
    let mut msg = [0u8; INITIATION_LEN];
    rng.fill(&mut msg[4..INITIATION_LEN - 16]);
    msg[0] = HANDSHAKE_INIT;
    if let Some(key) = mac1_key {
        // A 32-byte key is always a valid BLAKE2s key.
        if let Ok(mut mac) = <Blake2sMac<U16> as Mac>::new_from_slice(key) {
            mac.update(&msg[..MAC1_OFFSET]);
            msg[MAC1_OFFSET..MAC1_OFFSET + 16].copy_from_slice(&mac.finalize().into_bytes());
        }
    }
    msg
}

/// Adds `count` (at most 50) more IPv4 addresses to `host`'s LAN interface, `10.0.0.201` up,
/// for a flood to come from, and returns them.
#[must_use]
pub fn add_sources(host: &Host, count: u8) -> Vec<IpAddr> {
    assert!((1..=50).contains(&count), "1 to 50 flood sources");
    (0..count)
        .map(|i| {
            let ip = Ipv4Addr::new(10, 0, 0, 201 + i);
            host.ns.add_address(&host.ifname, &format!("{ip}/24"));
            IpAddr::V4(ip)
        })
        .collect()
}

/// Sends `spec`'s flood from the calling thread, which must be in the namespace whose
/// addresses `spec.sources` are, and reads what comes back to the sources.
///
/// # Errors
/// When a source address cannot be bound.
pub fn flood(spec: &Flood) -> io::Result<FloodReport> {
    let sockets = spec
        .sources
        .iter()
        .map(|ip| {
            let s = UdpSocket::bind(SocketAddr::new(*ip, 0))?;
            s.set_nonblocking(true)?;
            Ok(s)
        })
        .collect::<io::Result<Vec<_>>>()?;
    if sockets.is_empty() {
        return Ok(FloodReport::default());
    }
    let seed = u64::from(std::process::id()) << 32
        | u64::from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos()),
        );
    let mut rng = Rng(seed | 1);
    let key = mac1_key(&spec.target_key);
    let random: Vec<_> = (0..POOL).map(|_| forge(&mut rng, None)).collect();
    let valid: Vec<_> = (0..POOL).map(|_| forge(&mut rng, Some(&key))).collect();
    let mut report = FloodReport::default();
    let mut reply = [0u8; 2048];
    let start = Instant::now();
    let end = start + spec.duration;
    loop {
        let now = Instant::now();
        let stopped = spec
            .stop
            .as_ref()
            .is_some_and(|s| s.load(Ordering::Relaxed));
        if now >= end || report.sent >= spec.max_datagrams || stopped {
            break;
        }
        let elapsed = now.duration_since(start).as_secs_f64();
        let due = ((elapsed * f64::from(spec.rate)) as u64 + 1).min(spec.max_datagrams);
        while report.sent < due {
            let n = report.sent as usize;
            let with_mac1 = match spec.forgery {
                Forgery::Random => false,
                Forgery::ValidMac1 => true,
                Forgery::Both => n % 2 == 1,
            };
            let msg = if with_mac1 {
                &valid[(n / 2) % POOL]
            } else {
                &random[(n / 2) % POOL]
            };
            match sockets[n % sockets.len()].send_to(msg, spec.target) {
                Ok(_) if with_mac1 => report.sent_valid_mac1 += 1,
                Ok(_) => {}
                Err(_) => report.failed += 1,
            }
            report.sent += 1;
        }
        for s in &sockets {
            while let Ok((len, _)) = s.recv_from(&mut reply) {
                if len == COOKIE_REPLY_LEN && reply[..4] == [COOKIE_REPLY, 0, 0, 0] {
                    report.cookie_replies += 1;
                } else {
                    report.other_replies += 1;
                }
            }
        }
        thread::sleep(STEP);
    }
    report.elapsed = start.elapsed();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forged_initiations_have_the_type_length_and_mac1_asked_for() {
        let mut rng = Rng(7);
        let target = [9u8; 32];
        let key = mac1_key(&target);
        let valid = forge(&mut rng, Some(&key));
        let random = forge(&mut rng, None);
        for msg in [&valid, &random] {
            assert_eq!(msg[..4], [HANDSHAKE_INIT, 0, 0, 0]);
            assert_eq!(msg[INITIATION_LEN - 16..], [0u8; 16]);
        }
        let mut mac = <Blake2sMac<U16> as Mac>::new_from_slice(&key).expect("key");
        mac.update(&valid[..MAC1_OFFSET]);
        assert!(
            mac.verify_slice(&valid[MAC1_OFFSET..MAC1_OFFSET + 16])
                .is_ok()
        );
        let mut mac = <Blake2sMac<U16> as Mac>::new_from_slice(&key).expect("key");
        mac.update(&random[..MAC1_OFFSET]);
        assert!(
            mac.verify_slice(&random[MAC1_OFFSET..MAC1_OFFSET + 16])
                .is_err()
        );
        assert_ne!(
            valid[4..MAC1_OFFSET],
            forge(&mut rng, Some(&key))[4..MAC1_OFFSET]
        );
    }

    #[test]
    fn a_flood_keeps_its_rate_and_its_bounds() {
        let sink = UdpSocket::bind("127.0.0.1:0").expect("bind");
        sink.set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        let spec = Flood {
            target: sink.local_addr().expect("address"),
            target_key: [1; 32],
            sources: vec![IpAddr::V4(Ipv4Addr::LOCALHOST); 3],
            rate: 2000,
            duration: Duration::from_millis(500),
            max_datagrams: 1_000_000,
            stop: None,
            forgery: Forgery::Both,
        };
        let report = flood(&spec).expect("flood");
        assert!(
            (800..=1100).contains(&report.sent),
            "about 1000 in 0.5 s at 2000/s: {report:?}"
        );
        assert_eq!(report.sent_valid_mac1, report.sent / 2);
        assert!(report.elapsed < Duration::from_secs(2), "{report:?}");
        let mut buf = [0u8; 256];
        let mut sources = std::collections::HashSet::new();
        for _ in 0..30 {
            let (len, from) = sink.recv_from(&mut buf).expect("a forged initiation");
            assert_eq!((len, buf[0]), (INITIATION_LEN, HANDSHAKE_INIT));
            sources.insert(from);
        }
        assert_eq!(sources.len(), 3, "sent from every source");
        let bounded = flood(&Flood {
            max_datagrams: 50,
            duration: Duration::from_secs(10),
            ..spec.clone()
        })
        .expect("flood");
        assert_eq!(bounded.sent, 50);
        assert!(bounded.elapsed < Duration::from_secs(1), "{bounded:?}");
        let stop = Arc::new(AtomicBool::new(false));
        let stopper = {
            let stop = Arc::clone(&stop);
            thread::spawn(move || {
                thread::sleep(Duration::from_millis(200));
                stop.store(true, Ordering::Relaxed);
            })
        };
        let stopped = flood(&Flood {
            duration: Duration::from_secs(10),
            stop: Some(stop),
            ..spec
        })
        .expect("flood");
        stopper.join().expect("the stopper");
        assert!(stopped.elapsed < Duration::from_secs(2), "{stopped:?}");
    }
}
