//! The TUN device: created, addressed and brought up through the kernel's own interfaces
//! (ioctl and netlink, via tun-rs), never by running `ip`. It disappears with the process.

use anyhow::Context;
use ipnet::{IpNet, Ipv6Net};
use std::net::IpAddr;
use tun_rs::{AsyncDevice, DeviceBuilder};

/// Creates the TUN device `name` with `addresses` (the kernel adds a route for each prefix), sets
/// its MTU, brings it up with segmentation offload when the kernel offers it, and routes `routes`
/// (peer prefixes outside the interface's own) into it. The overlays' IPv6 addresses in
/// `ula` are added when the host has IPv6: where it is disabled, the overlays run on IPv4 alone.
pub fn create(
    name: &str,
    addresses: &[IpNet],
    ula: &[Ipv6Net],
    routes: &[IpNet],
    mtu: u16,
) -> anyhow::Result<AsyncDevice> {
    let mut v4 = addresses.iter().filter_map(|a| match a {
        IpNet::V4(n) => Some(*n),
        IpNet::V6(_) => None,
    });
    let v6: Vec<(std::net::Ipv6Addr, u8)> = addresses
        .iter()
        .filter_map(|a| match a {
            IpNet::V6(n) => Some((n.addr(), n.prefix_len())),
            IpNet::V4(_) => None,
        })
        .collect();
    let mut builder = DeviceBuilder::new().name(name).mtu(mtu).offload(true);
    let first_v4 = v4.next();
    if let Some(n) = first_v4 {
        builder = builder.ipv4(n.addr(), n.prefix_len(), None);
    }
    if !v6.is_empty() {
        builder = builder.ipv6_tuple(&v6);
    }
    let device = builder.build_async().map_err(|e| {
        let hint = if e.kind() == std::io::ErrorKind::PermissionDenied {
            " (creating a network interface needs root or the CAP_NET_ADMIN capability)"
        } else {
            ""
        };
        anyhow::anyhow!("cannot create TUN device {name}: {e}{hint}")
    })?;
    for n in v4 {
        device
            .add_address_v4(n.addr(), n.prefix_len())
            .with_context(|| format!("cannot add address {n} to {name}"))?;
    }
    for n in ula {
        if let Err(e) = device.add_address_v6(n.addr(), n.prefix_len()) {
            tracing::warn!(
                address = %n,
                "no IPv6 overlay address on {name}: {e} (is IPv6 disabled on this host? \
                 net.ipv6.conf.default.disable_ipv6); the overlays run on IPv4"
            );
        }
    }
    let index = device
        .if_index()
        .with_context(|| format!("cannot read the index of {name}"))?;
    for net in routes {
        crate::netlink::add_route(index, *net)
            .with_context(|| format!("cannot route {net} into {name}"))?;
    }
    Ok(device)
}

/// The host's addresses, each with its interface's prefix length, but the tunnel's own, the
/// loopback's and link-local ones.
fn interface_addresses(tunnel: &str) -> Vec<IpNet> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for a in addrs {
        if a.interface_name == tunnel {
            continue;
        }
        let Some(address) = a.address else { continue };
        let mask = a.netmask;
        let net = if let Some(ip) = address.as_sockaddr_in() {
            let prefix = mask
                .and_then(|m| m.as_sockaddr_in().map(|m| m.ip()))
                .and_then(|m| ipnet::ipv4_mask_to_prefix(m).ok())
                .unwrap_or(32);
            ipnet::Ipv4Net::new(ip.ip(), prefix).ok().map(IpNet::from)
        } else if let Some(ip) = address.as_sockaddr_in6() {
            let prefix = mask
                .and_then(|m| m.as_sockaddr_in6().map(|m| m.ip()))
                .and_then(|m| ipnet::ipv6_mask_to_prefix(m).ok())
                .unwrap_or(128);
            ipnet::Ipv6Net::new(ip.ip(), prefix).ok().map(IpNet::from)
        } else {
            None
        };
        let Some(net) = net else { continue };
        let ip = net.addr();
        let useless = ip.is_loopback()
            || ip.is_unspecified()
            || match ip {
                IpAddr::V4(v4) => v4.is_link_local(),
                IpAddr::V6(v6) => v6.is_unicast_link_local(),
            };
        if !useless {
            out.push(net);
        }
    }
    out
}

/// The host's addresses that peers might reach: every interface's but the tunnel's own, the
/// loopback's and link-local ones.
pub fn host_addresses(tunnel: &str) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = Vec::new();
    for ip in interface_addresses(tunnel).iter().map(IpNet::addr) {
        if !out.contains(&ip) {
            out.push(ip);
        }
    }
    out
}

/// The networks of the host's interfaces but the tunnel's and the loopback's: what the
/// routes that peers offer must not cover.
pub fn host_networks(tunnel: &str) -> Vec<IpNet> {
    let mut out: Vec<IpNet> = Vec::new();
    for net in interface_addresses(tunnel).iter().map(IpNet::trunc) {
        if !out.contains(&net) {
            out.push(net);
        }
    }
    out
}

/// The peer prefixes that the interface's own prefixes do not cover, each once.
pub fn extra_routes<'a>(interface: &[IpNet], peers: impl Iterator<Item = &'a IpNet>) -> Vec<IpNet> {
    let mut routes: Vec<IpNet> = Vec::new();
    for net in peers {
        let net = net.trunc();
        let covered = interface.iter().any(|own| own.trunc().contains(&net));
        if !covered && !routes.contains(&net) {
            routes.push(net);
        }
    }
    routes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter()
            .map(|s| s.parse().expect("test prefix"))
            .collect()
    }

    #[test]
    fn only_prefixes_outside_the_interface_get_routes() {
        let own = nets(&["10.77.0.1/24", "fd77::1/64"]);
        let peers = nets(&[
            "10.77.0.2/32",
            "10.88.0.0/16",
            "10.88.0.5/16",
            "fd77::2/128",
            "fd99::/64",
        ]);
        assert_eq!(
            extra_routes(&own, peers.iter()),
            nets(&["10.88.0.0/16", "fd99::/64"])
        );
    }
}
