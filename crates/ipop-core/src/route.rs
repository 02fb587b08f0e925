//! The routing table: which peer an overlay address belongs to.

use ipnet::IpNet;
use std::collections::HashMap;
use std::net::IpAddr;

/// Maps overlay addresses to peer indices, longest prefix first. Host routes (/32, /128), the
/// common case, are found by hash; wider prefixes by a scan of a list kept longest-first.
#[derive(Debug, Default)]
pub struct RouteTable {
    hosts: HashMap<IpAddr, usize>,
    prefixes: Vec<(IpNet, usize)>,
}

impl RouteTable {
    /// Adds a route. Returns the peer that already owns exactly this prefix, if any.
    pub fn insert(&mut self, net: IpNet, peer: usize) -> Result<(), usize> {
        let net = net.trunc();
        if net.prefix_len() == net.max_prefix_len() {
            if let Some(&owner) = self.hosts.get(&net.addr()) {
                return Err(owner);
            }
            self.hosts.insert(net.addr(), peer);
            return Ok(());
        }
        if let Some(&(_, owner)) = self.prefixes.iter().find(|(n, _)| *n == net) {
            return Err(owner);
        }
        let at = self
            .prefixes
            .partition_point(|(n, _)| n.prefix_len() >= net.prefix_len());
        self.prefixes.insert(at, (net, peer));
        Ok(())
    }

    /// Removes the route for exactly `net`.
    pub fn remove(&mut self, net: IpNet) {
        let net = net.trunc();
        if net.prefix_len() == net.max_prefix_len() {
            self.hosts.remove(&net.addr());
        } else {
            self.prefixes.retain(|(n, _)| *n != net);
        }
    }

    /// The peer that owns `addr`, by longest prefix.
    pub fn lookup(&self, addr: IpAddr) -> Option<usize> {
        if let Some(&peer) = self.hosts.get(&addr) {
            return Some(peer);
        }
        self.prefixes
            .iter()
            .find(|(n, _)| n.contains(&addr))
            .map(|&(_, p)| p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().expect("test prefix")
    }
    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    #[test]
    fn longest_prefix_wins() {
        let mut t = RouteTable::default();
        t.insert(net("10.0.0.0/8"), 1).unwrap();
        t.insert(net("10.1.0.0/16"), 2).unwrap();
        t.insert(net("10.1.2.3/32"), 3).unwrap();
        t.insert(net("fd00::/64"), 4).unwrap();
        assert_eq!(t.lookup(ip("10.9.9.9")), Some(1));
        assert_eq!(t.lookup(ip("10.1.9.9")), Some(2));
        assert_eq!(t.lookup(ip("10.1.2.3")), Some(3));
        assert_eq!(t.lookup(ip("fd00::7")), Some(4));
        assert_eq!(t.lookup(ip("192.168.0.1")), None);
        assert_eq!(t.lookup(ip("fd01::1")), None);
        t.remove(net("10.1.0.0/16"));
        t.remove(net("10.1.2.3/32"));
        assert_eq!(t.lookup(ip("10.1.2.3")), Some(1));
    }

    #[test]
    fn a_prefix_has_one_owner() {
        let mut t = RouteTable::default();
        t.insert(net("10.0.0.2/32"), 1).unwrap();
        assert_eq!(t.insert(net("10.0.0.2/32"), 2), Err(1));
        t.insert(net("10.0.0.0/24"), 1).unwrap();
        assert_eq!(t.insert(net("10.0.0.9/24"), 2), Err(1));
    }
}
