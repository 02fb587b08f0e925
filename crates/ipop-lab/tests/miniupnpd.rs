//! miniupnpd on a NAT lab router (run as root): a device behind a symmetric NAT asks for a UDP
//! port mapping with Debian's clients (`natpmpc` for NAT-PMP, `upnpc` for UPnP IGD), the
//! mapping shows in the router's rules and forwards UDP from the internet to the device (the
//! answers leave from the mapped port), and it is gone once deleted.

use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::process::Output;
use std::time::{Duration, Instant};

use ipop_lab::{Coturn, MiniUpnpd, Nat, NatLab, UpnpMapping, netns_exists};

/// How long a socket waits for a datagram that should come.
const ARRIVAL_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a socket waits for a datagram that should not come.
const SILENCE: Duration = Duration::from_millis(700);

/// A lab with one device behind a symmetric NAT, coturn on the server answering RFC 5780 tests
/// and miniupnpd on the router. Fields drop in order: miniupnpd, coturn, the lab.
struct World {
    upnpd: MiniUpnpd,
    _coturn: Coturn,
    lab: NatLab,
}

impl World {
    fn new(tag: &str, upnp: bool, natpmp: bool) -> World {
        let lab = NatLab::builder(tag).site(Nat::Symmetric).build();
        let coturn = Coturn::builder()
            .in_netns(&lab.server.ns, IpAddr::V4(lab.server.ip))
            .alt_ip(IpAddr::V4(lab.server.alt_ip))
            .start();
        let t0 = Instant::now();
        let upnpd = lab.routers[0]
            .miniupnpd(coturn.addr())
            .upnp(upnp)
            .natpmp(natpmp)
            .start();
        eprintln!(
            "miniupnpd ready in {:?}; log:\n{}",
            t0.elapsed(),
            upnpd.log_tail(20)
        );
        World {
            upnpd,
            _coturn: coturn,
            lab,
        }
    }

    /// A UDP socket on the device, on a port of the system's choosing.
    fn device_socket(&self) -> UdpSocket {
        let socket = self.lab.devices[0]
            .host
            .ns
            .run_in(|| UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)))
            .expect("a UDP socket on the device");
        socket
            .set_read_timeout(Some(ARRIVAL_TIMEOUT))
            .expect("a read timeout");
        socket
    }

    /// A UDP socket on the server's main address.
    fn server_socket(&self) -> UdpSocket {
        let ip = self.lab.server.ip;
        let socket = self
            .lab
            .server
            .ns
            .run_in(|| UdpSocket::bind((ip, 0)))
            .expect("a UDP socket on the server");
        socket
            .set_read_timeout(Some(ARRIVAL_TIMEOUT))
            .expect("a read timeout");
        socket
    }

    /// Runs a command on the device and returns its stdout.
    ///
    /// # Panics
    /// When it fails.
    fn on_device(&self, args: &[&str]) -> String {
        let out: Output = self.lab.devices[0].host.ns.try_exec(args);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{args:?} on the device failed ({}):\n{stdout}{}\nminiupnpd:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.upnpd.log_tail(20)
        );
        eprintln!("$ {}\n{stdout}", args.join(" "));
        stdout
    }

    /// Runs a command in the router's namespace and returns its stdout.
    ///
    /// # Panics
    /// When it fails.
    fn on_router(&self, args: &[&str]) -> String {
        let out = self.lab.routers[0].ns().exec(args);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn public_ip(&self) -> Ipv4Addr {
        self.lab.routers[0].public_ip()
    }

    /// Checks that UDP from a new socket on the server to `public` reaches `inner` on the
    /// device, from the server's endpoint, and that the device's answer reaches the server from
    /// `public`.
    fn assert_forwards(&self, inner: &UdpSocket, public: SocketAddrV4) {
        let server = self.server_socket();
        let server_addr = server.local_addr().expect("the server socket's address");
        server
            .send_to(b"hello through the mapping", public)
            .expect("send from the server");
        let mut buf = [0u8; 64];
        let (n, from) = inner.recv_from(&mut buf).unwrap_or_else(|e| {
            panic!(
                "nothing from the server reached the device through {public}: {e}\n{}\n{}",
                self.upnpd.rules(),
                self.lab.routers[0].ruleset()
            )
        });
        assert_eq!(&buf[..n], b"hello through the mapping");
        assert_eq!(from, server_addr, "DNAT keeps the sender's endpoint");
        inner.send_to(b"hello back", from).expect("answer");
        let (n, from) = server
            .recv_from(&mut buf)
            .unwrap_or_else(|e| panic!("the device's answer did not reach the server: {e}"));
        assert_eq!(&buf[..n], b"hello back");
        assert_eq!(
            from,
            SocketAddr::V4(public),
            "the answer leaves from the mapping"
        );
    }

    /// Checks that UDP from a new socket on the server to `public` does not reach `inner`.
    fn assert_blocked(&self, inner: &UdpSocket, public: SocketAddrV4) {
        let server = self.server_socket();
        server
            .send_to(b"no mapping any more", public)
            .expect("send from the server");
        inner
            .set_read_timeout(Some(SILENCE))
            .expect("a read timeout");
        let mut buf = [0u8; 64];
        match inner.recv_from(&mut buf) {
            Ok((n, from)) => panic!(
                "{n} bytes from {from} reached the device through {public} without a mapping\n{}",
                self.upnpd.rules()
            ),
            Err(e) => assert!(
                matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
                "{e}"
            ),
        }
    }
}

/// The number after `key` in `text` (a client's output).
fn number_after(text: &str, key: &str) -> u16 {
    text.split(key)
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|word| word.parse().ok())
        .unwrap_or_else(|| panic!("no number after {key:?} in:\n{text}"))
}

#[test]
fn natpmp_maps_a_udp_port_that_forwards_until_deleted() {
    let t0 = Instant::now();
    let w = World::new("mupmp", false, true);
    let device_ip = w.lab.devices[0].host.ipv4;
    let gateway = w.upnpd.lan_ip().to_string();
    let inner = w.device_socket();
    let iport = inner.local_addr().expect("address").port();
    assert_eq!(w.upnpd.mappings(), [], "{}", w.upnpd.rules());

    // No UPnP (no HTTP server) when it is off.
    let tcp = w.on_router(&["ss", "-Htlnp"]);
    assert!(!tcp.contains("miniupnpd"), "{tcp}");
    let udp = w.on_router(&["ss", "-Hulnp"]);
    assert!(
        udp.contains(":5351 "),
        "NAT-PMP and PCP on port 5351: {udp}"
    );
    let public = w.on_device(&["natpmpc", "-g", &gateway]);
    assert!(
        public.contains(&format!("Public IP address : {}", w.public_ip())),
        "{public}"
    );
    let port = iport.to_string();
    let out = w.on_device(&["natpmpc", "-g", &gateway, "-a", &port, &port, "udp", "3600"]);
    let eport = number_after(&out, "Mapped public port");
    assert_eq!(number_after(&out, "to local port"), iport, "{out}");
    assert_eq!(
        w.upnpd.mappings(),
        [UpnpMapping {
            protocol: "udp",
            external_port: eport,
            internal: SocketAddrV4::new(device_ip, iport),
        }],
        "{}",
        w.upnpd.rules()
    );
    let public = SocketAddrV4::new(w.public_ip(), eport);
    w.assert_forwards(&inner, public);

    // Lifetime 0 deletes the mapping.
    let eport_arg = eport.to_string();
    w.on_device(&[
        "natpmpc", "-g", &gateway, "-a", &eport_arg, &port, "udp", "0",
    ]);
    assert_eq!(w.upnpd.mappings(), [], "{}", w.upnpd.rules());
    w.assert_blocked(&inner, public);

    // Dropping it stops miniupnpd and leaves the router as it was.
    let pid = w.upnpd.pid();
    let router_ns = w.lab.routers[0].ns().name().to_owned();
    let World {
        upnpd,
        _coturn: coturn,
        lab,
    } = w;
    upnpd.stop();
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "miniupnpd (pid {pid}) stopped"
    );
    let table = lab.routers[0]
        .ns()
        .try_exec(&["nft", "list", "table", "inet", "miniupnpd"]);
    assert!(!table.status.success(), "the table is deleted");
    let stun = lab.routers[0]
        .ns()
        .exec(&["nft", "list", "set", "ip", "ipop_lab", "stun"]);
    let stun = String::from_utf8_lossy(&stun.stdout);
    assert!(
        !stun.contains("elements"),
        "no STUN endpoint is let in any more:\n{stun}"
    );
    drop(coturn);
    drop(lab);
    assert!(!netns_exists(&router_ns), "the lab is gone");
    eprintln!("test took {:?}", t0.elapsed());
}

#[test]
fn upnp_maps_a_udp_port_that_forwards_until_deleted() {
    let t0 = Instant::now();
    let w = World::new("muupnp", true, false);
    let device_ip = w.lab.devices[0].host.ipv4;
    let inner = w.device_socket();
    let iport = inner.local_addr().expect("address").port();
    // No NAT-PMP or PCP when they are off.
    let udp = w.on_router(&["ss", "-Hulnp"]);
    assert!(!udp.contains(":5351 "), "{udp}");
    // Found by SSDP (multicast on the LAN), then SOAP over HTTP. `-i`: miniupnpc (since 2.2)
    // takes an IGD whose external address is reserved, as the lab's 198.18.0.0/15 is, for "not
    // connected" and gives up unless told to go on.
    let status = w.on_device(&["upnpc", "-i", "-m", "eth0", "-s"]);
    assert!(
        status.contains(&format!("ExternalIPAddress = {}", w.public_ip())),
        "{status}"
    );
    // The other calls skip the 2 s of discovery.
    let desc = status
        .lines()
        .find_map(|line| line.trim().strip_prefix("desc: "))
        .unwrap_or_else(|| panic!("no device description URL in:\n{status}"))
        .to_owned();
    let port = iport.to_string();
    let ip = device_ip.to_string();
    let out = w.on_device(&[
        "upnpc", "-i", "-u", &desc, "-a", &ip, &port, &port, "UDP", "3600",
    ]);
    assert!(
        out.contains(&format!(
            "external {}:{port} UDP is redirected to internal {ip}:{port}",
            w.public_ip()
        )),
        "{out}"
    );
    assert_eq!(
        w.upnpd.mappings(),
        [UpnpMapping {
            protocol: "udp",
            external_port: iport,
            internal: SocketAddrV4::new(device_ip, iport),
        }],
        "{}",
        w.upnpd.rules()
    );
    let public = SocketAddrV4::new(w.public_ip(), iport);
    w.assert_forwards(&inner, public);
    let listed = w.on_device(&["upnpc", "-i", "-u", &desc, "-l"]);
    assert!(
        listed.contains(&format!("UDP {port}->{ip}:{port}")),
        "{listed}"
    );

    w.on_device(&["upnpc", "-i", "-u", &desc, "-d", &port, "UDP"]);
    assert_eq!(w.upnpd.mappings(), [], "{}", w.upnpd.rules());
    w.assert_blocked(&inner, public);
    eprintln!("test took {:?}", t0.elapsed());
}
