//! Routes through rtnetlink: what `ip route add PREFIX dev IFACE [src ADDRESS]` and
//! `ip route del` do, without running `ip`.

use ipnet::IpNet;
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage,
    NetlinkPayload,
};
use netlink_packet_route::route::{
    RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::constants::NETLINK_ROUTE;
use netlink_sys::{Socket, SocketAddr};
use std::io;
use std::net::IpAddr;

/// Routes `net` into the interface with index `ifindex` (main table), replacing a route to the
/// same prefix if one exists, and waits for the kernel's answer.
pub fn add_route(ifindex: u32, net: IpNet) -> io::Result<()> {
    change_route(true, ifindex, net, None)
}

/// As [`add_route`], with `source` as the preferred source address of what leaves by it.
pub fn add_route_from(ifindex: u32, net: IpNet, source: IpAddr) -> io::Result<()> {
    change_route(true, ifindex, net, Some(source))
}

/// Removes the route to `net` through the interface with index `ifindex`.
pub fn delete_route(ifindex: u32, net: IpNet) -> io::Result<()> {
    change_route(false, ifindex, net, None)
}

fn change_route(add: bool, ifindex: u32, net: IpNet, source: Option<IpAddr>) -> io::Result<()> {
    let net = net.trunc();
    let mut route = RouteMessage::default();
    route.header.address_family = match net {
        IpNet::V4(_) => AddressFamily::Inet,
        IpNet::V6(_) => AddressFamily::Inet6,
    };
    route.header.destination_prefix_length = net.prefix_len();
    route.header.table = RouteHeader::RT_TABLE_MAIN;
    route.header.protocol = RouteProtocol::Static;
    route.header.scope = RouteScope::Link;
    route.header.kind = RouteType::Unicast;
    route.attributes = vec![
        RouteAttribute::Destination(net.addr().into()),
        RouteAttribute::Oif(ifindex),
    ];
    if let Some(source) = source {
        route
            .attributes
            .push(RouteAttribute::PrefSource(source.into()));
    }
    let mut header = NetlinkHeader::default();
    let message = if add {
        header.flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE;
        RouteNetlinkMessage::NewRoute(route)
    } else {
        header.flags = NLM_F_REQUEST | NLM_F_ACK;
        RouteNetlinkMessage::DelRoute(route)
    };
    let mut request = NetlinkMessage::new(header, NetlinkPayload::from(message));
    request.finalize();
    let mut buf = vec![0; request.header.length as usize];
    request.serialize(&mut buf);

    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    socket.send(&buf, 0)?;
    let mut answer = vec![0; 8192];
    let n = socket.recv(&mut &mut answer[..], 0)?;
    let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&answer[..n])
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
    match reply.payload {
        NetlinkPayload::Error(e) if e.code.is_some() => Err(e.to_io()),
        _ => Ok(()),
    }
}
