//! Address plans: where a device's own addresses come from in each overlay, and how it numbers
//! the devices of its friends.
//!
//! * IPv6: every overlay has a unique local /64 (RFC 4193) derived from its name (the social
//!   overlay's from a fixed name, a group's from its room), and a device's address in it is the
//!   prefix plus 64 bits derived from the device's key. Nothing to choose, nothing to collide.
//! * IPv4 in a group: an address in the group's subnet, set in the config or chosen from a hash
//!   of the device's key, kept across restarts, and moved when another device claims it (see
//!   [`keeps_address`]).
//! * IPv4 in the social overlay: the device has its own address in its own subnet and numbers
//!   every friend's device in that subnet ([`SocialNumbers`]). Packets are translated at the
//!   tunnel boundary, so two friends need not agree on anything.

use crate::key::PublicKey;
use crate::osn::{Claim, DeviceId};
use blake2::{Blake2s256, Digest};
use ipnet::{Ipv4Net, Ipv6Net};
use std::collections::{BTreeMap, HashSet};
use std::net::{Ipv4Addr, Ipv6Addr};

/// The name the social overlay's unique local prefix is derived from.
const SOCIAL_NAME: &str = "urn:ipop:social";

fn digest(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Blake2s256::new();
    for p in parts {
        h.update((p.len() as u32).to_be_bytes());
        h.update(p);
    }
    h.finalize().into()
}

/// The unique local /64 of an overlay named `name`: `fd` and a 40-bit global ID from a hash of
/// the name, subnet 0.
pub fn ula_prefix(name: &str) -> Ipv6Net {
    let d = digest(&[b"ula", name.as_bytes()]);
    let mut octets = [0u8; 16];
    octets[0] = 0xfd;
    octets[1..6].copy_from_slice(&d[..5]);
    Ipv6Net::new(Ipv6Addr::from(octets), 64).unwrap_or_default()
}

/// The social overlay's unique local /64.
pub fn social_ula_prefix() -> Ipv6Net {
    ula_prefix(SOCIAL_NAME)
}

/// A device's address in the /64 `prefix`: the prefix and 64 bits from a hash of its key.
pub fn ula_address(prefix: Ipv6Net, key: &PublicKey) -> Ipv6Addr {
    let d = digest(&[b"iid", &key.0]);
    let mut octets = prefix.network().octets();
    octets[8..].copy_from_slice(&d[..8]);
    Ipv6Addr::from(octets)
}

/// The addresses of `subnet` a device may have: all of them but the network and broadcast
/// addresses (for prefixes up to /30).
fn hosts(subnet: Ipv4Net) -> (u32, u32) {
    let first = u32::from(subnet.network());
    let last = u32::from(subnet.broadcast());
    if subnet.prefix_len() <= 30 {
        (first + 1, last - 1)
    } else {
        (first, last)
    }
}

/// The first address `subnet` gives a device: the default own address in the social overlay.
pub fn first_host(subnet: Ipv4Net) -> Ipv4Addr {
    Ipv4Addr::from(hosts(subnet).0)
}

/// Whether a device may have `addr` in `subnet`.
pub fn is_host(subnet: Ipv4Net, addr: Ipv4Addr) -> bool {
    let (first, last) = hosts(subnet);
    (first..=last).contains(&u32::from(addr))
}

/// Picks an address in `subnet` for the thing named by `seed`: the address a hash of the seed
/// points at, or the next one that is not `taken`. `None` when every address is taken.
pub fn pick(subnet: Ipv4Net, seed: &[u8], taken: impl Fn(Ipv4Addr) -> bool) -> Option<Ipv4Addr> {
    let (first, last) = hosts(subnet);
    let count = u64::from(last - first) + 1;
    let d = digest(&[b"pick", seed]);
    let start = u64::from_be_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]]) % count;
    (0..count)
        .map(|i| Ipv4Addr::from(first + ((start + i) % count) as u32))
        .find(|a| !taken(*a))
}

/// When two devices claim one address in a group, whether `me` keeps it. A configured
/// (fixed) address beats a chosen one; between equals, the device that sorts first keeps it.
/// Both sides reach the same verdict, so exactly one moves.
pub fn keeps_address(me: &DeviceId, mine: Claim, other: &DeviceId, theirs: Claim) -> bool {
    match (mine.fixed, theirs.fixed) {
        (true, false) => true,
        (false, true) => false,
        _ => me < other,
    }
}

/// How this device numbers other devices in its social subnet: one address each, kept for as
/// long as the numbering is kept (the daemon stores it across restarts).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocialNumbers {
    subnet: Ipv4Net,
    own: Ipv4Addr,
    numbers: BTreeMap<DeviceId, Ipv4Addr>,
    used: HashSet<Ipv4Addr>,
}

impl SocialNumbers {
    /// A numbering of `subnet` in which this device is `own`, starting from `saved` (entries
    /// outside the subnet, on `own`, or duplicated are dropped).
    pub fn new(subnet: Ipv4Net, own: Ipv4Addr, saved: &BTreeMap<DeviceId, Ipv4Addr>) -> Self {
        let mut n = SocialNumbers {
            subnet,
            own,
            numbers: BTreeMap::new(),
            used: HashSet::new(),
        };
        for (device, &addr) in saved {
            if is_host(subnet, addr) && addr != own && n.used.insert(addr) {
                n.numbers.insert(device.clone(), addr);
            }
        }
        n
    }

    /// The number of `device`, given one if it has none. `None` when the subnet is full.
    pub fn number(&mut self, device: &DeviceId) -> Option<Ipv4Addr> {
        if let Some(&a) = self.numbers.get(device) {
            return Some(a);
        }
        let seed = device.to_string();
        let addr = pick(self.subnet, seed.as_bytes(), |a| {
            a == self.own || self.used.contains(&a)
        })?;
        self.used.insert(addr);
        self.numbers.insert(device.clone(), addr);
        Some(addr)
    }

    /// The number of `device`, if it has one.
    pub fn get(&self, device: &DeviceId) -> Option<Ipv4Addr> {
        self.numbers.get(device).copied()
    }

    pub fn numbers(&self) -> &BTreeMap<DeviceId, Ipv4Addr> {
        &self.numbers
    }

    pub fn subnet(&self) -> Ipv4Net {
        self.subnet
    }

    pub fn own(&self) -> Ipv4Addr {
        self.own
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn dev(n: &str) -> DeviceId {
        DeviceId::new(format!("{n}@example.org"), "laptop")
    }

    #[test]
    fn ula_prefixes_are_unique_local_and_differ_by_name() {
        let a = ula_prefix("lab@conference.example.org");
        let b = ula_prefix("ops@conference.example.org");
        assert_eq!(a.prefix_len(), 64);
        assert_eq!(a.network().octets()[0], 0xfd);
        assert_ne!(a, b);
        assert_eq!(a, ula_prefix("lab@conference.example.org"));
        assert_ne!(social_ula_prefix(), a);
    }

    #[test]
    fn a_device_address_is_in_the_prefix_and_follows_the_key() {
        let p = ula_prefix("lab@conference.example.org");
        let a = ula_address(p, &PublicKey([1; 32]));
        let b = ula_address(p, &PublicKey([2; 32]));
        assert!(p.contains(&a) && p.contains(&b));
        assert_ne!(a, b);
        assert_eq!(a, ula_address(p, &PublicKey([1; 32])));
    }

    #[test]
    fn picks_skip_network_broadcast_and_taken_addresses() {
        let subnet = net("10.20.0.0/30");
        let mut seen = Vec::new();
        for _ in 0..2 {
            let a = pick(subnet, b"x", |a| seen.contains(&a)).unwrap();
            assert!(is_host(subnet, a), "{a}");
            seen.push(a);
        }
        assert_eq!(pick(subnet, b"x", |a| seen.contains(&a)), None);
        assert_eq!(
            first_host(net("172.31.0.0/16")),
            Ipv4Addr::new(172, 31, 0, 1)
        );
        assert!(!is_host(subnet, Ipv4Addr::new(10, 20, 0, 0)));
        assert!(!is_host(subnet, Ipv4Addr::new(10, 20, 0, 3)));
    }

    #[test]
    fn exactly_one_side_keeps_a_contested_address() {
        let auto = Claim {
            address: Ipv4Addr::new(10, 20, 0, 5),
            fixed: false,
        };
        let fixed = Claim {
            fixed: true,
            ..auto
        };
        let (a, b) = (dev("alice"), dev("bob"));
        for (ca, cb) in [(auto, auto), (fixed, auto), (auto, fixed), (fixed, fixed)] {
            assert_ne!(keeps_address(&a, ca, &b, cb), keeps_address(&b, cb, &a, ca));
        }
        assert!(!keeps_address(&a, auto, &b, fixed));
        assert!(keeps_address(&a, auto, &b, auto));
    }

    #[test]
    fn social_numbers_are_unique_stable_and_fill_the_subnet() {
        let subnet = net("10.9.0.0/28");
        let own = first_host(subnet);
        let mut n = SocialNumbers::new(subnet, own, &BTreeMap::new());
        let mut all = HashSet::new();
        for i in 0..13 {
            let a = n.number(&dev(&format!("u{i}"))).unwrap();
            assert!(is_host(subnet, a) && a != own);
            assert!(all.insert(a), "{a} given twice");
        }
        assert_eq!(n.number(&dev("one-too-many")), None);
        let again = SocialNumbers::new(subnet, own, n.numbers());
        assert_eq!(again.numbers(), n.numbers());
        assert_eq!(again.get(&dev("u3")), n.get(&dev("u3")));
    }

    #[test]
    fn saved_numbers_outside_the_subnet_or_duplicated_are_dropped() {
        let subnet = net("10.9.0.0/24");
        let own = first_host(subnet);
        let saved: BTreeMap<_, _> = [
            (dev("a"), Ipv4Addr::new(10, 9, 0, 7)),
            (dev("b"), Ipv4Addr::new(10, 9, 0, 7)),
            (dev("c"), Ipv4Addr::new(192, 168, 0, 1)),
            (dev("d"), own),
        ]
        .into_iter()
        .collect();
        let n = SocialNumbers::new(subnet, own, &saved);
        assert_eq!(n.numbers().len(), 1);
        assert_eq!(n.get(&dev("a")), Some(Ipv4Addr::new(10, 9, 0, 7)));
    }
}
