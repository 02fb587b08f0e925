//! The NAT lab's routers behave as their NAT type says, checked with real UDP and TCP sockets
//! (run as root: namespaces, nftables).

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use ipop_lab::{Device, Nat, NatLab, Netns, SERVER_ALT_IP, SERVER_IP, Server, Site, netns_exists};

/// How long a test waits for a packet that should arrive.
const ARRIVES: Duration = Duration::from_secs(2);
/// How long a test waits before it concludes that a packet was dropped.
const DROPPED: Duration = Duration::from_millis(400);
/// How often the reflector's threads look at their stop flag.
const TICK: Duration = Duration::from_millis(50);

/// The reflector's UDP endpoints: two ports on the server's address, one on its second address.
const S1: SocketAddrV4 = SocketAddrV4::new(SERVER_IP, 3478);
const S2: SocketAddrV4 = SocketAddrV4::new(SERVER_IP, 3479);
const S3: SocketAddrV4 = SocketAddrV4::new(SERVER_ALT_IP, 3478);

/// A STUN-like reflector on the server: on UDP `S1`, `S2` and `S3` it answers `map` with the
/// source address it saw (`ip:port`), and `map via IP:PORT` the same way but from its endpoint
/// `IP:PORT` (to send from an endpoint the client has not contacted). On TCP `S1` it writes the
/// address it saw and closes. Stopped on drop.
struct Reflector {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Reflector {
    fn start(server: &Server) -> Reflector {
        let (sockets, listener) = server.ns.run_in(|| {
            let sockets: Vec<UdpSocket> = [S1, S2, S3]
                .iter()
                .map(|addr| UdpSocket::bind(addr).expect("bind a reflector socket"))
                .collect();
            let listener = TcpListener::bind(S1).expect("bind the TCP reflector");
            (sockets, listener)
        });
        let sockets = Arc::new(sockets);
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads: Vec<JoinHandle<()>> = (0..sockets.len())
            .map(|i| {
                let (sockets, stop) = (Arc::clone(&sockets), Arc::clone(&stop));
                thread::spawn(move || reflect_udp(&sockets, i, &stop))
            })
            .collect();
        let tcp_stop = Arc::clone(&stop);
        threads.push(thread::spawn(move || reflect_tcp(&listener, &tcp_stop)));
        Reflector { stop, threads }
    }
}

impl Drop for Reflector {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            // A reflector thread that panicked has nothing more to report than the test does.
            let _ = thread.join();
        }
    }
}

fn reflect_udp(sockets: &[UdpSocket], i: usize, stop: &AtomicBool) {
    let socket = &sockets[i];
    socket
        .set_read_timeout(Some(TICK))
        .expect("set a read timeout");
    let mut buf = [0u8; 512];
    while !stop.load(Ordering::Relaxed) {
        let Ok((n, from)) = socket.recv_from(&mut buf) else {
            continue;
        };
        let request = String::from_utf8_lossy(&buf[..n]);
        let reply_from = match request.strip_prefix("map via ") {
            Some(via) => {
                let via: SocketAddr = via.parse().expect("an endpoint after `map via`");
                sockets
                    .iter()
                    .find(|s| s.local_addr().ok() == Some(via))
                    .expect("a reflector endpoint after `map via`")
            }
            None => socket,
        };
        reply_from
            .send_to(from.to_string().as_bytes(), from)
            .expect("send a reflector reply");
    }
}

fn reflect_tcp(listener: &TcpListener, stop: &AtomicBool) {
    listener
        .set_nonblocking(true)
        .expect("make accept non-blocking");
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((mut stream, from)) => {
                // The client may have gone; nothing to do about it.
                let _ = stream.write_all(from.to_string().as_bytes());
            }
            Err(_) => thread::sleep(TICK),
        }
    }
}

/// A UDP socket bound in `ns` to `0.0.0.0:port` (0: any port).
fn udp_socket(ns: &Netns, port: u16) -> UdpSocket {
    ns.run_in(|| UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)).expect("bind a UDP socket"))
}

/// Sends `payload` from `socket` to `to` and returns the first datagram that arrives within
/// `wait`, with its source.
fn exchange(
    socket: &UdpSocket,
    to: SocketAddrV4,
    payload: &str,
    wait: Duration,
) -> Option<(String, SocketAddr)> {
    socket.send_to(payload.as_bytes(), to).expect("send UDP");
    recv(socket, wait)
}

fn recv(socket: &UdpSocket, wait: Duration) -> Option<(String, SocketAddr)> {
    socket.set_read_timeout(Some(wait)).expect("set a timeout");
    let mut buf = [0u8; 512];
    let (n, from) = socket.recv_from(&mut buf).ok()?;
    Some((String::from_utf8_lossy(&buf[..n]).into_owned(), from))
}

/// The public endpoint the reflector at `server` sees for `socket`, asked with `request`; `None`
/// when no reply arrives.
fn mapping_via(socket: &UdpSocket, server: SocketAddrV4, request: &str) -> Option<SocketAddrV4> {
    let (reply, _) = exchange(socket, server, request, DROPPED)?;
    Some(
        reply
            .parse()
            .expect("the reflector replies with an ip:port"),
    )
}

/// The public endpoint the reflector at `server` sees for `socket`.
fn mapping(socket: &UdpSocket, server: SocketAddrV4) -> SocketAddrV4 {
    let (reply, from) = exchange(socket, server, "map", ARRIVES)
        .unwrap_or_else(|| panic!("no reply from the reflector at {server}"));
    assert_eq!(
        from,
        SocketAddr::V4(server),
        "the reply comes from where it went"
    );
    reply
        .parse()
        .expect("the reflector replies with an ip:port")
}

/// Whether a datagram sent from `from` to `to` arrives at `receiver`, and from which source.
fn deliver(from: &UdpSocket, to: SocketAddrV4, receiver: &UdpSocket) -> Option<SocketAddr> {
    from.send_to(b"hello", to).expect("send UDP");
    recv(receiver, ARRIVES).map(|(_, source)| source)
}

/// Whether nothing sent from `from` to `to` arrives at `receiver` within [`DROPPED`].
fn dropped(from: &UdpSocket, to: SocketAddrV4, receiver: &UdpSocket) -> bool {
    from.send_to(b"hello", to).expect("send UDP");
    recv(receiver, DROPPED).is_none()
}

fn v4(addr: SocketAddr) -> SocketAddrV4 {
    match addr {
        SocketAddr::V4(a) => a,
        SocketAddr::V6(a) => panic!("{a} is not IPv4"),
    }
}

/// Where a socket of a device on the internet sends from.
fn stranger_addr(socket: &UdpSocket, device: &Device) -> SocketAddr {
    let port = socket.local_addr().expect("a bound socket").port();
    SocketAddr::V4(SocketAddrV4::new(device.public_ip, port))
}

fn assert_pings(device: &Device, to: Ipv4Addr) {
    let out = device.host.ns.ping(IpAddr::V4(to), 1);
    assert!(
        out.status.success(),
        "device {} cannot ping {to}: {}",
        device.name,
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn full_cone_keeps_one_mapping_and_lets_anyone_send_to_it() {
    let lab = NatLab::new("fcone", &[Nat::FullCone, Nat::None]);
    let _reflector = Reflector::start(&lab.server);
    let (a, outsider) = (lab.device("a"), lab.device("b"));
    let socket = udp_socket(&a.host.ns, 40000);
    let m1 = mapping(&socket, S1);
    assert_eq!(*m1.ip(), a.public_ip);
    assert_eq!(*m1.ip(), lab.router_of("a").public_ip());
    assert_eq!(m1.port(), 40000, "the source port is preserved");
    assert_eq!(
        mapping_via(&socket, S1, &format!("map via {S2}")),
        Some(m1),
        "a reply from an endpoint not contacted gets in"
    );
    assert_eq!(mapping(&socket, S2), m1, "mapping is endpoint-independent");
    assert_eq!(mapping(&socket, S3), m1, "mapping is address-independent");

    let stranger = udp_socket(&outsider.host.ns, 0);
    let source = deliver(&stranger, m1, &socket)
        .expect("unsolicited UDP from another internet host reaches the device");
    assert_eq!(source, stranger_addr(&stranger, outsider));
    let source = deliver(&socket, v4(source), &stranger).expect("the device answers");
    assert_eq!(v4(source), m1, "the answer leaves from the same mapping");
}

#[test]
fn port_restricted_cone_keeps_one_mapping_but_filters_endpoints_not_contacted() {
    let lab = NatLab::new("prcone", &[Nat::PortRestrictedCone, Nat::None]);
    let _reflector = Reflector::start(&lab.server);
    let (a, outsider) = (lab.device("a"), lab.device("b"));
    let socket = udp_socket(&a.host.ns, 40000);
    let m1 = mapping(&socket, S1);
    assert_eq!(m1, SocketAddrV4::new(a.public_ip, 40000));
    assert_eq!(
        mapping_via(&socket, S1, &format!("map via {S2}")),
        None,
        "another port of a contacted address is filtered"
    );
    assert_eq!(
        mapping_via(&socket, S1, &format!("map via {S3}")),
        None,
        "another address is filtered"
    );
    let stranger = udp_socket(&outsider.host.ns, 0);
    assert!(dropped(&stranger, m1, &socket), "a stranger is filtered");

    assert_eq!(mapping(&socket, S2), m1, "mapping is endpoint-independent");
    assert_eq!(mapping(&socket, S3), m1, "mapping is address-independent");
    assert_eq!(
        mapping_via(&socket, S1, &format!("map via {S2}")),
        Some(m1),
        "an endpoint the device has sent to gets in"
    );
    let stranger_at = stranger_addr(&stranger, outsider);
    let seen = deliver(&socket, v4(stranger_at), &stranger).expect("the device reaches out");
    assert_eq!(
        v4(seen),
        m1,
        "and its packet opens the filter for the stranger"
    );
    let source = deliver(&stranger, m1, &socket).expect("once contacted, the stranger gets in");
    assert_eq!(source, stranger_at);

    let conntrack = lab
        .router_of("a")
        .conntrack()
        .expect("read the router's conntrack table");
    assert!(
        conntrack.iter().any(|entry| entry.contains("udp")
            && entry.contains(&format!(
                "src={} dst={SERVER_IP} sport=40000 dport=3478",
                a.host.ipv4
            ))
            && entry.contains(&format!("dst={} sport=3478 dport=40000", a.public_ip))),
        "the mapping shows in the router's conntrack table: {conntrack:#?}"
    );
}

#[test]
fn symmetric_nat_maps_each_destination_to_a_new_port() {
    let lab = NatLab::new("sym", &[Nat::Symmetric]);
    let _reflector = Reflector::start(&lab.server);
    let a = lab.device("a");
    let socket = udp_socket(&a.host.ns, 40000);
    let m1 = mapping(&socket, S1);
    assert_eq!(
        mapping(&socket, S1),
        m1,
        "one destination keeps its mapping"
    );
    assert_eq!(
        mapping_via(&socket, S1, &format!("map via {S2}")),
        None,
        "an endpoint not contacted is filtered"
    );
    let m2 = mapping(&socket, S2);
    let m3 = mapping(&socket, S3);
    for m in [m1, m2, m3] {
        assert_eq!(*m.ip(), a.public_ip);
    }
    assert!(
        m1.port() != m2.port() && m2.port() != m3.port() && m1.port() != m3.port(),
        "every destination gets its own port: {m1}, {m2}, {m3}"
    );
}

#[test]
fn udp_blocked_router_passes_tcp_and_udp_once_unblocked() {
    let mut lab = NatLab::new("noudp", &[Nat::UdpBlocked]);
    let _reflector = Reflector::start(&lab.server);
    let a = lab.device("a");
    let public_ip = a.public_ip;
    let socket = udp_socket(&a.host.ns, 40000);
    assert_eq!(mapping_via(&socket, S1, "map"), None, "UDP is blocked");
    let seen = tcp_mapping(&a.host.ns).expect("TCP passes");
    assert_eq!(*seen.ip(), public_ip, "TCP is NATed");

    let router = lab.router_of_mut("a");
    assert!(router.udp_blocked());
    router.set_udp_blocked(false);
    assert!(!router.udp_blocked());
    let m1 = mapping(&socket, S1);
    assert_eq!(m1, SocketAddrV4::new(public_ip, 40000));
    assert_eq!(
        mapping(&socket, S2),
        m1,
        "unblocked, it is a port-restricted cone"
    );
    assert_eq!(mapping_via(&socket, S1, &format!("map via {S3}")), None);

    lab.router_of_mut("a").set_udp_blocked(true);
    assert_eq!(mapping_via(&socket, S1, "map"), None, "blocked again");
}

/// The public endpoint the TCP reflector sees for a connection from `ns`.
fn tcp_mapping(ns: &Netns) -> std::io::Result<SocketAddrV4> {
    ns.run_in(|| {
        let mut stream = TcpStream::connect_timeout(&SocketAddr::V4(S1), ARRIVES)?;
        let mut seen = String::new();
        stream.read_to_string(&mut seen)?;
        Ok(seen.parse().expect("the reflector writes an ip:port"))
    })
}

#[test]
fn devices_behind_one_router_share_its_address_and_reach_each_other_on_the_lan() {
    let lab = NatLab::builder("shared")
        .site(Site::new(Nat::PortRestrictedCone).devices(2))
        .build();
    let _reflector = Reflector::start(&lab.server);
    let (a, b) = (lab.device("a"), lab.device("b"));
    assert_eq!(a.router, b.router);
    assert_eq!(a.public_ip, b.public_ip);
    assert_pings(a, b.host.ipv4);
    assert_pings(b, SERVER_IP);
    // The same local port on both: the second one to go out cannot keep it.
    let (sa, sb) = (udp_socket(&a.host.ns, 40000), udp_socket(&b.host.ns, 40000));
    let source =
        deliver(&sa, SocketAddrV4::new(b.host.ipv4, 40000), &sb).expect("a reaches b on the LAN");
    assert_eq!(
        source,
        SocketAddr::V4(SocketAddrV4::new(a.host.ipv4, 40000))
    );

    let ma = mapping(&sa, S1);
    let mb = mapping(&sb, S1);
    assert_eq!(ma, SocketAddrV4::new(a.public_ip, 40000));
    assert_eq!(*mb.ip(), a.public_ip);
    assert_ne!(mb.port(), ma.port(), "two devices, two public ports");
    assert_eq!(
        mapping(&sb, S2),
        mb,
        "b's mapping is endpoint-independent too"
    );
    assert_eq!(mapping(&sa, S2), ma);

    assert!(
        dropped(&sa, mb, &sb),
        "without hairpinning, a cannot reach b through b's mapping"
    );
}

#[test]
fn hairpinning_router_loops_packets_back_between_mappings() {
    let lab = NatLab::builder("hairpin")
        .site(Site::new(Nat::PortRestrictedCone).devices(2).hairpin(true))
        .build();
    assert!(lab.routers[0].hairpin());
    let _reflector = Reflector::start(&lab.server);
    let (a, b) = (lab.device("a"), lab.device("b"));
    let (sa, sb) = (udp_socket(&a.host.ns, 40000), udp_socket(&b.host.ns, 40001));
    let (ma, mb) = (mapping(&sa, S1), mapping(&sb, S1));
    let source = deliver(&sa, mb, &sb).expect("a reaches b through b's mapping");
    assert_eq!(v4(source), ma, "b sees a's public mapping");
    let source = deliver(&sb, ma, &sa).expect("b reaches a through a's mapping");
    assert_eq!(v4(source), mb);
}

#[test]
fn lans_are_unreachable_from_the_internet_even_with_a_route() {
    let lab = NatLab::new("closed", &[Nat::FullCone, Nat::PortRestrictedCone]);
    let server = &lab.server;
    let from_server = udp_socket(&server.ns, 40000);
    for device in &lab.devices {
        let router = lab.router_of(&device.name);
        let [x, y, z, _] = device.host.ipv4.octets();
        server.ns.ip(&[
            "route",
            "add",
            &format!("{x}.{y}.{z}.0/24"),
            "via",
            &router.public_ip().to_string(),
        ]);
        // The device has a mapping: it has sent to the server from the same socket.
        let socket = udp_socket(&device.host.ns, 40000);
        let seen = deliver(&socket, SocketAddrV4::new(SERVER_IP, 40000), &from_server)
            .expect("the device reaches the server");
        assert_eq!(*v4(seen).ip(), device.public_ip);
        assert!(
            dropped(
                &from_server,
                SocketAddrV4::new(device.host.ipv4, 40000),
                &socket
            ),
            "UDP to the LAN address of device {} gets through {:?}",
            device.name,
            router.nat()
        );
        assert!(
            !server
                .ns
                .ping(IpAddr::V4(device.host.ipv4), 1)
                .status
                .success(),
            "the server pings device {} through {:?}",
            device.name,
            router.nat()
        );
        assert!(
            server
                .ns
                .ping(IpAddr::V4(router.public_ip()), 1)
                .status
                .success(),
            "the router's public address answers pings"
        );
    }
}

#[test]
fn every_device_reaches_the_server_and_the_lab_leaves_nothing_behind() {
    let lab = NatLab::new(
        "all",
        &[
            Nat::None,
            Nat::FullCone,
            Nat::PortRestrictedCone,
            Nat::Symmetric,
            Nat::UdpBlocked,
        ],
    );
    let reflector = Reflector::start(&lab.server);
    assert_eq!(lab.devices.len(), 5);
    assert_eq!(lab.routers.len(), 4);
    for device in &lab.devices {
        assert_pings(device, SERVER_IP);
        assert_pings(device, SERVER_ALT_IP);
        let seen = tcp_mapping(&device.host.ns)
            .unwrap_or_else(|e| panic!("device {} cannot use TCP: {e}", device.name));
        assert_eq!(*seen.ip(), device.public_ip, "device {}", device.name);
    }
    let names = lab.netns_names();
    assert_eq!(names.len(), 2 + 4 + 5);
    assert!(names.iter().all(|name| netns_exists(name)));
    drop(reflector);
    drop(lab);
    assert_gone(&names);
}

#[test]
fn a_failing_test_leaves_nothing_behind() {
    let mut names = Vec::new();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let lab = NatLab::builder("boom")
            .site(Site::new(Nat::Symmetric).devices(2))
            .build();
        names = lab.netns_names();
        panic!("a deliberate failure inside a NAT lab test");
    }));
    assert!(outcome.is_err());
    assert_eq!(
        names.len(),
        2 + 2 + 2,
        "internet, server, router, switch, devices"
    );
    assert_gone(&names);
}

fn assert_gone(names: &[String]) {
    let out = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("run ip netns list");
    let list = String::from_utf8_lossy(&out.stdout);
    for name in names {
        assert!(!netns_exists(name), "namespace {name} is left behind");
        assert!(
            !list
                .lines()
                .any(|line| line.split_whitespace().next() == Some(name)),
            "`ip netns list` still shows {name}"
        );
    }
}
