//! Links between namespaces: veth pairs and a bridged LAN of hosts.

use std::net::{Ipv4Addr, Ipv6Addr};

use crate::netns::Netns;
use crate::next_id;

/// A fresh interface name, unique in this process and across processes: `ipl<pid>v<n>`, at most
/// 15 bytes (the kernel's limit).
#[must_use]
pub fn ifname() -> String {
    let name = format!(
        "ipl{}v{}",
        std::process::id() % 1_000_000,
        next_id() % 100_000
    );
    debug_assert!(name.len() <= 15, "interface name {name} is too long");
    name
}

/// Creates a veth pair with one end in `a` and the other in `b`, both up. Returns the names of
/// the ends, in `a` and in `b`.
pub fn veth(a: &Netns, b: &Netns) -> (String, String) {
    let (in_a, in_b) = (ifname(), ifname());
    a.ip(&[
        "link",
        "add",
        &in_a,
        "type",
        "veth",
        "peer",
        "name",
        &in_b,
        "netns",
        b.name(),
    ]);
    a.ip(&["link", "set", &in_a, "up"]);
    b.ip(&["link", "set", &in_b, "up"]);
    (in_a, in_b)
}

/// A host on a [`Lan`]: its namespace, its interface on the LAN and its underlay addresses.
#[derive(Debug)]
pub struct Host {
    pub ns: Netns,
    pub ifname: String,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
}

/// Hosts on one Ethernet segment: a bridge in a namespace of its own, and a veth from it to each
/// host. Host `i` (from 1) has `10.0.0.i/24` and `fd00::i/64`.
#[derive(Debug)]
pub struct Lan {
    /// Dropped before the switch.
    pub hosts: Vec<Host>,
    pub switch: Netns,
}

impl Lan {
    /// A LAN of `n` hosts (at most 250), whose namespaces are tagged `<tag><letter>`.
    ///
    /// # Panics
    /// When a namespace or link cannot be set up.
    #[must_use]
    pub fn new(tag: &str, n: u8) -> Lan {
        assert!((1..=250).contains(&n), "a LAN holds 1 to 250 hosts");
        let switch = Netns::new(&format!("{tag}sw"));
        let bridge = "br0";
        switch.ip(&[
            "link",
            "add",
            bridge,
            "type",
            "bridge",
            "stp_state",
            "0",
            "forward_delay",
            "0",
            "mcast_snooping",
            "0",
        ]);
        switch.ip(&["link", "set", bridge, "up"]);
        let mut lan = Lan {
            hosts: Vec::with_capacity(usize::from(n)),
            switch,
        };
        for i in 1..=n {
            let ns = Netns::new(&format!("{tag}{}", host_letter(i)));
            let (port, ifname) = veth(&lan.switch, &ns);
            lan.switch.ip(&["link", "set", &port, "master", bridge]);
            let ipv4 = Ipv4Addr::new(10, 0, 0, i);
            let ipv6 = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, u16::from(i));
            ns.add_address(&ifname, &format!("{ipv4}/24"));
            ns.add_address(&ifname, &format!("{ipv6}/64"));
            lan.hosts.push(Host {
                ns,
                ifname,
                ipv4,
                ipv6,
            });
        }
        lan
    }
}

/// `a` for host 1, `b` for host 2, ...; past `z`, the number.
#[must_use]
pub fn host_letter(i: u8) -> String {
    if (1..=26).contains(&i) {
        char::from(b'a' + i - 1).to_string()
    } else {
        i.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    fn assert_ping(from: &Host, to: IpAddr) {
        let out = from.ns.ping(to, 1);
        assert!(
            out.status.success(),
            "ping {to} from {} failed: {}{}",
            from.ns.name(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn interface_names_are_unique_and_short() {
        let (a, b) = (ifname(), ifname());
        assert_ne!(a, b);
        assert!(a.len() <= 15 && b.len() <= 15);
    }

    #[test]
    fn veth_links_two_namespaces() {
        let a = Netns::new("va");
        let b = Netns::new("vb");
        let (in_a, in_b) = veth(&a, &b);
        a.add_address(&in_a, "192.168.9.1/24");
        b.add_address(&in_b, "192.168.9.2/24");
        let out = a.ping("192.168.9.2".parse().expect("address"), 1);
        assert!(out.status.success(), "{out:?}");
    }

    #[test]
    fn lan_hosts_ping_each_other_over_ipv4_and_ipv6() {
        let lan = Lan::new("lan", 3);
        let [a, b, c] = &lan.hosts[..] else {
            panic!("three hosts expected");
        };
        assert_eq!(b.ipv4, Ipv4Addr::new(10, 0, 0, 2));
        assert_ping(a, IpAddr::V4(b.ipv4));
        assert_ping(a, IpAddr::V6(b.ipv6));
        assert_ping(c, IpAddr::V4(a.ipv4));
        assert_ping(c, IpAddr::V6(b.ipv6));
    }

    #[test]
    fn no_route_outside_the_lan() {
        let lan = Lan::new("iso", 1);
        let out = lan.hosts[0]
            .ns
            .ping(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 9)), 1);
        assert!(!out.status.success(), "nobody has 10.0.0.9");
    }
}
