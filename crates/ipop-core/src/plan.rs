//! This device's addresses in each overlay, the addresses it gives its peers, and what it
//! remembers across restarts (addresses chosen, friends numbered, keys pinned).

use crate::address::{self, SocialNumbers};
use crate::demand::LinkPolicy;
use crate::key::PublicKey;
use crate::node::Mapping;
use crate::osn::{Claim, DeviceId, OverlayId};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use std::collections::{BTreeMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

/// An overlay this device is in, as its config sets it up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverlayConfig {
    pub id: OverlayId,
    /// The IPv4 subnet: a group's (the same on every member), or the social overlay's (this
    /// device's own numbering space for its friends' devices).
    pub subnet: Ipv4Net,
    /// This device's IPv4 address in the overlay when the config sets it. Otherwise, the first
    /// address of the subnet in the social overlay, and one chosen automatically in a group.
    pub address: Option<Ipv4Addr>,
    /// Which links the overlay keeps: to every device, or on demand.
    pub links: LinkPolicy,
    /// How long an on-demand link stays up without data.
    pub idle_timeout: Duration,
    /// The prefixes this device routes for the overlay's devices (a subnet router).
    pub advertise: Vec<IpNet>,
    /// Whether the prefixes the overlay's devices route are taken.
    pub accept_routes: bool,
}

impl OverlayConfig {
    /// Whether this device offers to be the overlay's exit: it routes a default route.
    pub fn is_exit(&self) -> bool {
        self.advertise.iter().any(|r| r.prefix_len() == 0)
    }
}

/// What the engine keeps across restarts; the daemon stores it in its state directory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Memory {
    /// The key first seen for each device (trust on first use).
    pub pins: BTreeMap<DeviceId, PublicKey>,
    /// This device's address in each group, by room.
    pub group_addresses: BTreeMap<String, Ipv4Addr>,
    /// How this device numbers the devices of the social overlay.
    pub social_numbers: BTreeMap<DeviceId, Ipv4Addr>,
}

/// This device's addresses in one overlay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnAddresses {
    pub overlay: OverlayId,
    /// The IPv4 address with the overlay's prefix length.
    pub v4: Ipv4Net,
    /// The IPv6 unique local address, with /64.
    pub v6: Ipv6Net,
    /// Whether the config set the IPv4 address.
    pub fixed: bool,
}

/// Something the daemon must act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EngineEvent {
    /// Another device of a group claimed our address there, and kept it: we moved.
    AddressChanged {
        overlay: OverlayId,
        old: Ipv4Addr,
        new: Ipv4Addr,
    },
}

/// The addresses of one peer as the node routes and checks them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerAddresses {
    pub addresses: Vec<IpNet>,
    pub mapped: Vec<Mapping>,
    pub destinations: Vec<IpAddr>,
    /// The prefixes this device routes for the overlays it shares with the peer.
    pub routed: Vec<IpNet>,
}

struct Own {
    id: OverlayId,
    subnet: Ipv4Net,
    claim: Claim,
    ula: Ipv6Net,
    v6: Ipv6Addr,
    /// The prefixes this device routes for the overlay.
    advertise: Vec<IpNet>,
}

/// The address plans of every overlay of this device.
pub(crate) struct Plans {
    own: Vec<Own>,
    social: Option<SocialNumbers>,
    pub(crate) memory: Memory,
    version: u64,
    events: VecDeque<EngineEvent>,
}

impl Plans {
    pub(crate) fn new(key: &PublicKey, overlays: Vec<OverlayConfig>, mut memory: Memory) -> Self {
        let mut own = Vec::new();
        let mut social = None;
        for o in overlays {
            let (ula, address) = match &o.id {
                OverlayId::Social => {
                    let a = o.address.unwrap_or_else(|| address::first_host(o.subnet));
                    social = Some(SocialNumbers::new(o.subnet, a, &memory.social_numbers));
                    (address::social_ula_prefix(), a)
                }
                OverlayId::Group(room) => {
                    let saved = memory
                        .group_addresses
                        .get(room)
                        .copied()
                        .filter(|a| address::is_host(o.subnet, *a));
                    let a = o.address.or(saved).or_else(|| {
                        let seed = [room.as_bytes(), &key.0].concat();
                        address::pick(o.subnet, &seed, |_| false)
                    });
                    let Some(a) = a else { continue };
                    if o.address.is_none() {
                        memory.group_addresses.insert(room.clone(), a);
                    }
                    (address::ula_prefix(room), a)
                }
            };
            own.push(Own {
                v6: address::ula_address(ula, key),
                advertise: o.advertise,
                id: o.id,
                subnet: o.subnet,
                claim: Claim {
                    address,
                    fixed: o.address.is_some(),
                },
                ula,
            });
        }
        if let Some(s) = &social {
            memory.social_numbers = s.numbers().clone();
        }
        Plans {
            own,
            social,
            memory,
            version: 0,
            events: VecDeque::new(),
        }
    }

    /// Counts up whenever [`Plans::memory`] changes.
    pub(crate) fn version(&self) -> u64 {
        self.version
    }

    pub(crate) fn remembered(&mut self) {
        self.version += 1;
    }

    pub(crate) fn poll_event(&mut self) -> Option<EngineEvent> {
        self.events.pop_front()
    }

    /// The networks of this device's overlays: each IPv4 subnet and IPv6 ULA prefix.
    pub(crate) fn own_networks(&self) -> Vec<(OverlayId, IpNet)> {
        self.own
            .iter()
            .flat_map(|o| {
                [
                    (o.id.clone(), o.subnet.into()),
                    (o.id.clone(), o.ula.into()),
                ]
            })
            .collect()
    }

    /// This device's address in `overlay` of the family of `v4` or not: the source of what it
    /// sends to a prefix routed there.
    pub(crate) fn source_in(&self, overlay: &OverlayId, v4: bool) -> Option<IpAddr> {
        let own = self.own.iter().find(|o| &o.id == overlay)?;
        Some(if v4 {
            IpAddr::V4(own.claim.address)
        } else {
            IpAddr::V6(own.v6)
        })
    }

    pub(crate) fn own_addresses(&self) -> Vec<OwnAddresses> {
        self.own
            .iter()
            .map(|o| OwnAddresses {
                overlay: o.id.clone(),
                v4: Ipv4Net::new(o.claim.address, o.subnet.prefix_len())
                    .unwrap_or_else(|_| Ipv4Net::from(o.claim.address)),
                v6: Ipv6Net::new(o.v6, o.ula.prefix_len()).unwrap_or_else(|_| Ipv6Net::from(o.v6)),
                fixed: o.claim.fixed,
            })
            .collect()
    }

    pub(crate) fn claims(&self) -> Vec<(OverlayId, Claim)> {
        self.own.iter().map(|o| (o.id.clone(), o.claim)).collect()
    }

    /// Settles every claim on one of our group addresses: where the other device keeps it,
    /// we move to an address nobody claims. `claims` are every other device's claims.
    pub(crate) fn resolve(&mut self, me: &DeviceId, claims: &[(DeviceId, OverlayId, Claim)]) {
        for own in &mut self.own {
            let OverlayId::Group(room) = &own.id else {
                continue;
            };
            let contest = claims.iter().find(|(d, o, c)| {
                o == &own.id
                    && c.address == own.claim.address
                    && !address::keeps_address(me, own.claim, d, *c)
            });
            let Some((winner, _, _)) = contest else {
                continue;
            };
            let taken = |a: Ipv4Addr| {
                a == own.claim.address
                    || claims
                        .iter()
                        .any(|(_, o, c)| o == &own.id && c.address == a)
            };
            let seed = [room.as_bytes(), me.to_string().as_bytes()].concat();
            let Some(new) = address::pick(own.subnet, &seed, taken) else {
                tracing::warn!(%room, address = %own.claim.address, %winner, "our address in the group is taken and the subnet has no free address");
                continue;
            };
            let old = own.claim.address;
            tracing::warn!(%room, %old, %new, %winner, "our address in the group is also claimed by a device that keeps it; moving");
            own.claim.address = new;
            self.memory.group_addresses.insert(room.clone(), new);
            self.version += 1;
            self.events.push_back(EngineEvent::AddressChanged {
                overlay: own.id.clone(),
                old,
                new,
            });
        }
    }

    /// The addresses of `device` (with `key`), through the `overlays` that authorise it, with
    /// the claims it made in each.
    pub(crate) fn peer(
        &mut self,
        device: &DeviceId,
        key: &PublicKey,
        overlays: &[(OverlayId, Option<Claim>)],
    ) -> PeerAddresses {
        let mut p = PeerAddresses::default();
        for (overlay, claim) in overlays {
            let Some(own) = self.own.iter().find(|o| &o.id == overlay) else {
                continue;
            };
            p.addresses
                .push(IpAddr::V6(address::ula_address(own.ula, key)).into());
            p.destinations.push(IpAddr::V6(own.v6));
            for net in &own.advertise {
                if !p.routed.contains(net) {
                    p.routed.push(*net);
                }
            }
            let Some(claim) = claim else { continue };
            match overlay {
                OverlayId::Social => {
                    let Some(social) = self.social.as_mut() else {
                        continue;
                    };
                    let known = social.get(device).is_some();
                    let Some(local) = social.number(device) else {
                        tracing::warn!(%device, subnet = %social.subnet(), "the social subnet is full; the device gets no IPv4 address");
                        continue;
                    };
                    if !known {
                        self.memory.social_numbers = social.numbers().clone();
                        self.version += 1;
                    }
                    p.mapped.push(Mapping {
                        local,
                        remote: claim.address,
                        own: own.claim.address,
                    });
                    p.destinations.push(IpAddr::V4(own.claim.address));
                }
                OverlayId::Group(_) => {
                    if address::is_host(own.subnet, claim.address)
                        && claim.address != own.claim.address
                    {
                        p.addresses.push(IpAddr::V4(claim.address).into());
                        p.destinations.push(IpAddr::V4(own.claim.address));
                    }
                }
            }
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(room: &str, subnet: &str, address: Option<&str>) -> OverlayConfig {
        OverlayConfig {
            id: OverlayId::Group(room.to_owned()),
            subnet: subnet.parse().unwrap(),
            address: address.map(|a| a.parse().unwrap()),
            links: LinkPolicy::All,
            idle_timeout: crate::demand::DEFAULT_IDLE_TIMEOUT,
            advertise: Vec::new(),
            accept_routes: false,
        }
    }

    fn social() -> OverlayConfig {
        OverlayConfig {
            id: OverlayId::Social,
            subnet: "172.31.0.0/16".parse().unwrap(),
            address: None,
            links: LinkPolicy::All,
            idle_timeout: crate::demand::DEFAULT_IDLE_TIMEOUT,
            advertise: Vec::new(),
            accept_routes: false,
        }
    }

    fn claim(a: &str, fixed: bool) -> Claim {
        Claim {
            address: a.parse().unwrap(),
            fixed,
        }
    }

    #[test]
    fn automatic_group_addresses_are_remembered_and_reused() {
        let key = PublicKey([7; 32]);
        let p = Plans::new(
            &key,
            vec![group("g@c.x", "10.20.0.0/24", None)],
            Memory::default(),
        );
        let a = p.claims()[0].1;
        assert!(!a.fixed);
        assert!(address::is_host("10.20.0.0/24".parse().unwrap(), a.address));
        assert_eq!(p.memory.group_addresses.get("g@c.x"), Some(&a.address));
        let q = Plans::new(
            &PublicKey([8; 32]),
            vec![group("g@c.x", "10.20.0.0/24", None)],
            p.memory.clone(),
        );
        assert_eq!(
            q.claims()[0].1,
            a,
            "the remembered address wins over the hash"
        );
    }

    #[test]
    fn own_addresses_carry_prefixes() {
        let p = Plans::new(
            &PublicKey([7; 32]),
            vec![social(), group("g@c.x", "10.20.0.0/24", Some("10.20.0.9"))],
            Memory::default(),
        );
        let own = p.own_addresses();
        assert_eq!(own[0].v4.to_string(), "172.31.0.1/16");
        assert_eq!(own[1].v4.to_string(), "10.20.0.9/24");
        assert!(own[1].fixed);
        assert_eq!(own[1].v6.prefix_len(), 64);
        assert_ne!(own[0].v6.trunc(), own[1].v6.trunc());
    }

    #[test]
    fn the_loser_of_a_collision_moves_once_and_says_so() {
        let me = DeviceId::new("zed@x", "pc");
        let other = DeviceId::new("amy@x", "pc");
        let mut p = Plans::new(
            &PublicKey([7; 32]),
            vec![group("g@c.x", "10.20.0.0/24", None)],
            Memory::default(),
        );
        let mine = p.claims()[0].1;
        let room = OverlayId::Group("g@c.x".into());
        let claims = vec![(other.clone(), room.clone(), mine)];
        p.resolve(&me, &claims);
        let moved = p.claims()[0].1;
        assert_ne!(moved.address, mine.address);
        assert_eq!(
            p.poll_event(),
            Some(EngineEvent::AddressChanged {
                overlay: room.clone(),
                old: mine.address,
                new: moved.address
            })
        );
        assert_eq!(p.memory.group_addresses.get("g@c.x"), Some(&moved.address));
        p.resolve(&me, &claims);
        assert_eq!(p.poll_event(), None, "settled");
        // The winner does not move.
        let mut w = Plans::new(
            &PublicKey([9; 32]),
            vec![group(
                "g@c.x",
                "10.20.0.0/24",
                Some(&mine.address.to_string()),
            )],
            Memory::default(),
        );
        w.resolve(
            &other,
            &[(me, room, claim(&mine.address.to_string(), false))],
        );
        assert_eq!(w.poll_event(), None);
    }

    #[test]
    fn peers_get_addresses_only_in_the_overlays_that_authorise_them() {
        let mut p = Plans::new(
            &PublicKey([7; 32]),
            vec![social(), group("g@c.x", "10.20.0.0/24", Some("10.20.0.1"))],
            Memory::default(),
        );
        let bob = DeviceId::new("bob@x", "pc");
        let key = PublicKey([2; 32]);
        let g = OverlayId::Group("g@c.x".into());
        let only_group = p.peer(&bob, &key, &[(g.clone(), Some(claim("10.20.0.5", false)))]);
        assert!(only_group.mapped.is_empty());
        assert!(
            only_group
                .addresses
                .contains(&"10.20.0.5/32".parse().unwrap())
        );
        assert!(
            only_group
                .destinations
                .contains(&"10.20.0.1".parse().unwrap())
        );
        assert!(
            !only_group
                .destinations
                .contains(&"172.31.0.1".parse().unwrap())
        );
        let outside = p.peer(&bob, &key, &[(g, Some(claim("10.99.0.5", false)))]);
        assert_eq!(outside.addresses.len(), 1, "only the ULA: {outside:?}");
        let social = p.peer(
            &bob,
            &key,
            &[(OverlayId::Social, Some(claim("172.31.0.1", false)))],
        );
        let m = social.mapped[0];
        assert_eq!(m.remote, "172.31.0.1".parse::<Ipv4Addr>().unwrap());
        assert_eq!(m.own, "172.31.0.1".parse::<Ipv4Addr>().unwrap());
        assert_ne!(m.local, m.own);
        assert_eq!(p.memory.social_numbers.get(&bob), Some(&m.local));
        assert_eq!(p.version(), 1);
    }
}
