//! The TUN device: created, addressed and brought up through the kernel's own interfaces
//! (ioctl and netlink, via tun-rs), never by running `ip`. It disappears with the process.

use anyhow::Context;
use ipnet::IpNet;
use tun_rs::{AsyncDevice, DeviceBuilder};

/// Creates the TUN device `name` with `addresses` (the kernel adds a route for each prefix), sets
/// its MTU and brings it up, with segmentation offload when the kernel offers it.
pub fn create(name: &str, addresses: &[IpNet], mtu: u16) -> anyhow::Result<AsyncDevice> {
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
    Ok(device)
}
