//! End-to-end NAT traversal: devices behind nftables NAT routers on a fake internet, with
//! Prosody and coturn on a server there. Each test checks reachability (ping and TCP both ways)
//! and the path `ipop status --json` reports.
//!
//! Run as root: they create network namespaces, NAT rules and TUN devices.

use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use ipop_lab::{
    Coturn, Daemon, Dnsmasq, ExternalService, MiniUpnpd, Nat, NatLab, Netns, NetnsHosts,
    NetnsResolver, Prosody, SERVER_ALT_IP, Site, TestCa, TestDir, UdpDelay, XmppUser, generate_key,
    status_json, wait_until,
};
use serde_json::Value;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_ipop");
const DOMAIN: &str = "example.org";
/// The TURN server's host name: its certificate for TLS is for this name.
const TURN_HOST: &str = "turn.example.org";

/// One ipop device of the lab: its namespace (borrowed from the lab), files and daemon.
struct Device {
    user: String,
    dir: PathBuf,
    daemon: Option<Daemon>,
    address: String,
    /// More lines for its `[device]` section.
    device_keys: String,
}

/// Where devices learn their STUN and TURN servers.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Servers {
    /// The `[nat]` section of their config.
    Config,
    /// Only the XMPP server (XEP-0215, with time-limited TURN credentials).
    Xmpp,
}

/// Fields drop in order: daemons first, then the servers, the lab, the directory.
struct World {
    devices: Vec<Device>,
    coturn: Coturn,
    prosody: Prosody,
    lab: NatLab,
    servers: Servers,
    /// Kept (and named) when a test fails.
    _dir: TestDir,
}

fn password(user: &str) -> String {
    format!("pw-{user}-secret")
}

impl World {
    /// A lab with `sites`, Prosody and coturn on its server, and one user per device, all
    /// friends of the first.
    fn new(tag: &str, sites: Vec<Site>) -> World {
        World::with_servers(tag, sites, Servers::Config)
    }

    /// As [`World::new`], with the STUN/TURN servers given as `servers` says.
    fn with_servers(tag: &str, sites: Vec<Site>, servers: Servers) -> World {
        let mut builder = NatLab::builder(tag);
        for site in sites {
            builder = builder.site(site);
        }
        let lab = builder.build();
        // Like a real server's, its default route leads somewhere: relaying toward a device's
        // private LAN address gets lost on the way instead of failing at once.
        lab.server
            .ns
            .ip(&["route", "add", "default", "via", "198.18.0.1"]);
        let dir = TestDir::new(tag);
        let server_ip = IpAddr::V4(lab.server.ip);
        // One CA for both servers: a device's `ca_file` covers the XMPP and the TURN server.
        let ca = TestCa::new("ipop-lab test CA");
        // On both server addresses: miniupnpd's STUN test (RFC 5780) needs answers from two.
        let coturn = Coturn::builder()
            .in_netns(&lab.server.ns, server_ip)
            .alt_ip(IpAddr::V4(SERVER_ALT_IP))
            .tls(&ca, TURN_HOST)
            .dir(dir.path())
            .start();
        let mut prosody = Prosody::builder(DOMAIN)
            .in_netns(&lab.server.ns, server_ip)
            .ca(&ca);
        if servers == Servers::Xmpp {
            let service = |kind: &str, transport: &str| ExternalService {
                kind: kind.to_owned(),
                transport: transport.to_owned(),
                host: server_ip.to_string(),
                port: coturn.addr().port(),
                secret: (kind == "turn").then(|| coturn.secret().to_owned()),
                ttl: Some(3600),
            };
            prosody = prosody.external_services(vec![
                service("stun", "udp"),
                service("turn", "udp"),
                service("turn", "tcp"),
            ]);
        }
        let prosody = prosody.start();
        let users: Vec<String> = (0..lab.devices.len()).map(|i| format!("user{i}")).collect();
        for u in &users {
            prosody.register(u, &password(u));
        }
        let connect = |u: &str| {
            XmppUser::builder(&prosody, u, &password(u))
                .resource("chat")
                .netns(&lab.server.ns)
                .connect()
        };
        let mut first = connect(&users[0]);
        for u in &users[1..] {
            first.befriend(&mut connect(u));
        }
        let mut devices = Vec::new();
        for (i, user) in users.into_iter().enumerate() {
            let dir = dir.path().join(&user);
            let _public_key = generate_key(Path::new(BIN), &dir);
            devices.push(Device {
                user,
                dir,
                daemon: None,
                address: format!("10.78.0.{}", i + 1),
                device_keys: String::new(),
            });
        }
        let world = World {
            devices,
            coturn,
            prosody,
            lab,
            servers,
            _dir: dir,
        };
        for i in 0..world.devices.len() {
            world.write_config(i);
        }
        world
    }

    /// Makes the users of devices `i` and `j` friends (World::new befriends the first user
    /// with every other).
    fn befriend(&self, i: usize, j: usize) {
        let connect = |k: usize| {
            let u = &self.devices[k].user;
            XmppUser::builder(&self.prosody, u, &password(u))
                .resource("chat")
                .netns(&self.lab.server.ns)
                .connect()
        };
        connect(i).befriend(&mut connect(j));
    }

    fn ns(&self, i: usize) -> &Netns {
        &self.lab.devices[i].host.ns
    }

    fn config(&self, i: usize) -> PathBuf {
        self.devices[i].dir.join("ipop.toml")
    }

    fn write_config(&self, i: usize) {
        let d = &self.devices[i];
        let nat = match self.servers {
            Servers::Xmpp => String::new(),
            Servers::Config => {
                let (username, password) =
                    self.coturn.credentials(&d.user, Duration::from_secs(3600));
                let turn = self.coturn.addr();
                format!(
                    "[nat]\nstun = [\"{turn}\"]\n\n\
                     [[nat.turn]]\nserver = \"{turn}\"\nusername = \"{username}\"\npassword = \"{password}\"\n\n\
                     [[nat.turn]]\nserver = \"{turn}\"\ntransport = \"tcp\"\nusername = \"{username}\"\npassword = \"{password}\"\n"
                )
            }
        };
        self.write_config_with(i, &nat);
    }

    /// Device `i`'s config, with `nat` (its STUN and TURN servers) at the end.
    fn write_config_with(&self, i: usize, nat: &str) {
        let d = &self.devices[i];
        let text = format!(
            "[device]\nlog_level = \"debug\"\ncontrol_socket = {sock:?}\nstate_dir = \"state\"\n{keys}\n\
             [interface]\nlisten_port = 51820\n\n\
             [xmpp]\njid = \"{user}@{DOMAIN}\"\npassword = \"{pw}\"\nserver = \"{xmpp}\"\nca_file = {ca:?}\ndevice = \"dev\"\n\n\
             [social]\nsubnet = \"10.78.0.0/16\"\naddress = \"{addr}\"\n\n{nat}",
            sock = d.dir.join("ctl.sock"),
            keys = d.device_keys,
            user = d.user,
            pw = password(&d.user),
            xmpp = self.prosody.c2s_addr(),
            ca = self.prosody.ca_cert_path(),
            addr = d.address,
        );
        std::fs::write(self.config(i), text).expect("config written");
    }

    /// Config lines that give device `i` one TURN server, reached over TLS by its host name.
    fn turn_over_tls_only(&self, i: usize) -> String {
        let (username, password) = self
            .coturn
            .credentials(&self.devices[i].user, Duration::from_secs(3600));
        let port = self.coturn.tls_addr().expect("coturn serves TLS").port();
        format!(
            "[[nat.turn]]\nserver = \"{TURN_HOST}:{port}\"\ntransport = \"tls\"\nusername = \"{username}\"\npassword = \"{password}\"\n"
        )
    }

    fn start(&mut self, i: usize) {
        let mut cmd = self.ns(i).command(BIN);
        cmd.arg("up").arg("-c").arg(self.config(i));
        let log = self.devices[i].dir.join("ipop.log");
        self.devices[i].daemon = Some(Daemon::spawn(&format!("ipop {i}"), cmd, &log));
    }

    fn status(&self, i: usize) -> Result<Value, String> {
        status_json(self.ns(i), Path::new(BIN), &self.config(i))
    }

    fn peer<'a>(status: &'a Value, user: &str) -> Option<&'a Value> {
        let jid = format!("{user}@{DOMAIN}");
        status["overlays"]
            .as_array()?
            .iter()
            .flat_map(|o| o["peers"].as_array().into_iter().flatten())
            .find(|p| p["jid"].as_str() == Some(jid.as_str()))
    }

    /// The address device `i` gives device `j` in the social overlay, once linked.
    fn addr_of(&self, i: usize, j: usize) -> Option<IpAddr> {
        let status = self.status(i).ok()?;
        World::peer(&status, &self.devices[j].user)?["addresses"]
            .as_array()?
            .iter()
            .filter_map(|a| a.as_str()?.parse::<ipnet::IpNet>().ok())
            .map(|n| n.addr())
            .find(IpAddr::is_ipv4)
    }

    /// Waits until device `i` pings device `j` over the overlay, then checks TCP both ways
    /// and returns the path `i` reports for `j`.
    fn link(&self, i: usize, j: usize, timeout: Duration) -> (String, Value) {
        wait_until(timeout, &format!("device {i} to ping device {j}"), || {
            let ok = self
                .addr_of(i, j)
                .is_some_and(|target| self.ns(i).ping(target, 1).status.success());
            if ok {
                Ok(())
            } else {
                let show = |k: usize| self.status(k).map(|s| s.to_string()).unwrap_or_else(|e| e);
                Err(format!("device {i}: {}\ndevice {j}: {}", show(i), show(j)))
            }
        });
        self.tcp(i, j);
        self.tcp(j, i);
        let status = self.status(i).expect("status");
        let peer = World::peer(&status, &self.devices[j].user)
            .cloned()
            .unwrap_or(Value::Null);
        (peer["path"].as_str().unwrap_or("none").to_owned(), peer)
    }

    /// Waits until device `i` shows the path `want` to device `j`, and returns its peer entry.
    /// A relayed pair may answer first, and carry the first packets; ICE moves to a better pair
    /// once its checks pass (on a busy machine, after the first ping and TCP got through).
    fn settled(&self, i: usize, j: usize, want: &str) -> Value {
        wait_until(
            Duration::from_secs(10),
            &format!("device {i}'s path to device {j} to be {want}"),
            || {
                let status = self.status(i)?;
                match World::peer(&status, &self.devices[j].user) {
                    Some(p) if p["path"] == want => Ok(p.clone()),
                    p => Err(format!("{p:?}")),
                }
            },
        )
    }

    /// 1 MB over TCP from device `i` to device `j`, compared byte for byte.
    fn tcp(&self, i: usize, j: usize) {
        self.tcp_bytes(i, j, 1_000_000);
    }

    /// `len` bytes over TCP from device `i` to device `j`, compared byte for byte.
    fn tcp_bytes(&self, i: usize, j: usize, len: u32) {
        let addr: IpAddr = self.devices[j].address.parse().expect("address");
        let seen_as = self.addr_of(i, j).expect("device j has an address");
        let data: Vec<u8> = (0..len).map(|n| (n * 7 + n / 251) as u8).collect();
        let listener = self
            .ns(j)
            .run_in(move || TcpListener::bind((addr, 0)).expect("listen"));
        let port = listener.local_addr().expect("port").port();
        let expected = data.clone();
        let receiver = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().expect("accept");
            conn.set_read_timeout(Some(Duration::from_secs(10)))
                .expect("read timeout");
            let mut got = Vec::new();
            conn.read_to_end(&mut got).expect("read through the tunnel");
            got
        });
        self.ns(i).run_in(move || {
            let mut conn =
                TcpStream::connect_timeout(&(seen_as, port).into(), Duration::from_secs(5))
                    .expect("connect through the tunnel");
            conn.set_write_timeout(Some(Duration::from_secs(10)))
                .expect("write timeout");
            conn.write_all(&data).expect("send through the tunnel");
        });
        let got = receiver.join().expect("receiver");
        assert!(
            got == expected,
            "TCP data from device {i} to {j} arrived changed"
        );
    }
}

/// Starts both devices of a two-device world and returns the path (and the peer entry) device 0
/// reports for device 1 once they ping each other and TCP works both ways.
fn linked(w: &mut World, timeout: Duration) -> (String, Value) {
    w.start(0);
    w.start(1);
    w.link(0, 1, timeout)
}

#[test]
fn cone_to_cone_is_direct() {
    let mut w = World::new(
        "ncone",
        vec![
            Site::new(Nat::PortRestrictedCone),
            Site::new(Nat::PortRestrictedCone),
        ],
    );
    linked(&mut w, Duration::from_secs(20));
    let peer = w.settled(0, 1, "direct");
    assert!(
        peer["pair"].as_str().unwrap_or_default().contains("srflx"),
        "{peer}"
    );
}

#[test]
fn symmetric_to_symmetric_goes_through_the_relay() {
    let mut w = World::new(
        "nsym",
        vec![Site::new(Nat::Symmetric), Site::new(Nat::Symmetric)],
    );
    let (path, peer) = linked(&mut w, Duration::from_secs(30));
    assert_eq!(path, "relay", "{peer}");
}

/// `ipop ping` names the relay as the path that answers, with the relay's address.
#[test]
fn ipop_ping_shows_the_relayed_path() {
    let mut w = World::new(
        "nping",
        vec![Site::new(Nat::Symmetric), Site::new(Nat::Symmetric)],
    );
    let (path, peer) = linked(&mut w, Duration::from_secs(30));
    assert_eq!(path, "relay", "{peer}");
    let out = w
        .ns(0)
        .command(BIN)
        .args([
            "ping",
            &format!("{}@{DOMAIN}/dev", w.devices[1].user),
            "-n",
            "2",
            "-c",
        ])
        .arg(w.config(0))
        .output()
        .expect("run ipop ping");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let why = format!(
        "{}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{why}");
    let relay = w.coturn.addr().ip().to_string();
    for seq in 1..=2 {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(&format!("probe {seq}: reply in ")))
            .unwrap_or_else(|| panic!("no reply to probe {seq}: {why}"));
        assert!(
            line.contains(" ms via relay ") && line.contains(&relay),
            "probe {seq} through the relay at {relay}: {why}"
        );
    }
    assert!(stdout.contains("2 probes, 2 replies"), "{why}");
}

/// With one STUN server, the symmetric side cannot tell what its NAT is, and does not punch:
/// the pair goes through the relay (see the punching test, with two).
#[test]
fn port_restricted_cone_to_symmetric_with_one_stun_server_goes_through_the_relay() {
    let mut w = World::new(
        "nprsym",
        vec![
            Site::new(Nat::PortRestrictedCone),
            Site::new(Nat::Symmetric),
        ],
    );
    let (path, peer) = linked(&mut w, Duration::from_secs(30));
    assert_eq!(path, "relay", "{peer}");
}

#[test]
fn udp_blocked_to_cone_goes_through_the_relay_over_tcp() {
    let mut w = World::new(
        "nblk",
        vec![
            Site::new(Nat::UdpBlocked),
            Site::new(Nat::PortRestrictedCone),
        ],
    );
    let (path, peer) = linked(&mut w, Duration::from_secs(30));
    assert_eq!(path, "relay", "{peer}");
}

/// With nothing but a TURN server over TLS, named by its host name and checked against the CA
/// the device trusts for its XMPP server.
#[test]
fn udp_blocked_to_cone_goes_through_the_relay_over_tls() {
    let mut w = World::new(
        "ntls",
        vec![
            Site::new(Nat::UdpBlocked),
            Site::new(Nat::PortRestrictedCone),
        ],
    );
    let _hosts = NetnsHosts::new(w.ns(0), &[(TURN_HOST, IpAddr::V4(w.lab.server.ip))]);
    w.write_config_with(0, &w.turn_over_tls_only(0));
    let (path, peer) = linked(&mut w, Duration::from_secs(30));
    assert_eq!(path, "relay", "{peer}");
    let relay = format!("relay {}:", w.coturn.relay_ip());
    assert!(
        peer["pair"]
            .as_str()
            .unwrap_or_default()
            .starts_with(&relay),
        "{peer}"
    );
    let status = w.status(0).expect("status");
    let tls = w.coturn.tls_addr().expect("coturn serves TLS");
    assert_eq!(
        status["ice_servers"],
        serde_json::json!([format!("turn tls {TURN_HOST} {tls}")]),
        "{status}"
    );
    let log_path = w.devices[0].dir.join("ipop.log");
    let log = std::fs::read_to_string(&log_path).expect("log");
    assert!(
        log.contains("connected to the TURN server over TLS"),
        "{} does not say the TLS connection is up",
        log_path.display()
    );
}

#[test]
fn a_relayed_link_moves_to_a_direct_path_once_udp_is_let_through() {
    let mut w = World::new(
        "nupg",
        vec![
            Site::new(Nat::UdpBlocked),
            Site::new(Nat::PortRestrictedCone),
        ],
    );
    let (path, peer) = linked(&mut w, Duration::from_secs(30));
    assert_eq!(path, "relay", "{peer}");

    let name = w.lab.devices[0].name.clone();
    w.lab.router_of_mut(&name).set_udp_blocked(false);
    let user = w.devices[1].user.clone();
    wait_until(
        Duration::from_secs(60),
        "the link to move to a direct path",
        || {
            let status = w.status(0)?;
            let peer = World::peer(&status, &user).cloned().unwrap_or(Value::Null);
            if peer["path"] == "direct" {
                Ok(())
            } else {
                Err(peer.to_string())
            }
        },
    );
    w.link(0, 1, Duration::from_secs(5));
    w.settled(0, 1, "direct");
}

/// A NAT router that forgets its UDP mappings (a reboot, a timeout, a carrier NAT's whim) gives
/// the device new public ports: the link carries on over the new mapping with the same
/// WireGuard session, found again by ICE.
#[test]
fn a_link_survives_its_nat_forgetting_the_mapping() {
    let mut w = World::new(
        "nflush",
        vec![Site::new(Nat::Symmetric), Site::new(Nat::FullCone)],
    );
    linked(&mut w, Duration::from_secs(20));
    let peer = w.settled(0, 1, "direct");
    let target = w.addr_of(0, 1).expect("device 1's address");
    let sent_before = peer["tx_bytes"].as_u64().unwrap_or_default();
    let endpoint_before = World::peer(&w.status(1).expect("status"), &w.devices[0].user)
        .map(|p| p["endpoint"].to_string())
        .unwrap_or_default();

    let name = w.lab.devices[0].name.clone();
    let router = w.lab.router_of_mut(&name).ns();
    let flushed = router.try_exec(&["conntrack", "-D", "-p", "udp"]);
    assert!(
        flushed.status.success() || String::from_utf8_lossy(&flushed.stderr).contains("deleted"),
        "conntrack: {}",
        String::from_utf8_lossy(&flushed.stderr)
    );
    let forgot = std::time::Instant::now();
    wait_until(
        Duration::from_secs(50),
        "pings to get through again",
        || {
            if w.ns(0).ping(target, 1).status.success()
                && w.ns(1)
                    .ping(w.addr_of(1, 0).expect("device 0's address"), 1)
                    .status
                    .success()
            {
                Ok(())
            } else {
                Err(w.status(0).map(|s| s.to_string()).unwrap_or_else(|e| e))
            }
        },
    );
    eprintln!(
        "link back {:?} after the NAT forgot its mappings",
        forgot.elapsed()
    );
    let (_, peer) = w.link(0, 1, Duration::from_secs(5));
    // The same WireGuard peer: its counters went on.
    let sent_after = peer["tx_bytes"].as_u64().unwrap_or_default();
    assert!(sent_after > sent_before + 1_000_000, "{peer}");
    // Device 1 now reaches device 0 at its new public port.
    let endpoint_after = World::peer(&w.status(1).expect("status"), &w.devices[0].user)
        .map(|p| p["endpoint"].to_string())
        .unwrap_or_default();
    assert_ne!(
        endpoint_after, endpoint_before,
        "the mapping did not change"
    );
}

/// The other way round: when one NAT router starts dropping UDP, the direct path dies and,
/// once ICE gives up on it (about 20 s), the link carries on through the TURN relay over TCP,
/// without being torn down.
#[test]
fn a_direct_link_moves_to_the_relay_over_tcp_once_udp_is_blocked() {
    let mut w = World::new(
        "ndown",
        vec![
            Site::new(Nat::PortRestrictedCone),
            Site::new(Nat::PortRestrictedCone),
        ],
    );
    linked(&mut w, Duration::from_secs(20));
    let peer = w.settled(0, 1, "direct");
    let target = w.addr_of(0, 1).expect("device 1's address");
    let sent_before = peer["tx_bytes"].as_u64().unwrap_or_default();
    assert!(sent_before > 1_000_000, "{peer}");

    let name = w.lab.devices[0].name.clone();
    w.lab.router_of_mut(&name).set_udp_blocked(true);
    let blocked = std::time::Instant::now();
    assert!(
        !w.ns(0).ping(target, 1).status.success(),
        "pings still get through with UDP blocked"
    );
    wait_until(
        Duration::from_secs(45),
        "pings to get through again",
        || {
            if w.ns(0).ping(target, 1).status.success() {
                Ok(())
            } else {
                Err(w.status(0).map(|s| s.to_string()).unwrap_or_else(|e| e))
            }
        },
    );
    let gap = blocked.elapsed();
    assert!(gap < Duration::from_secs(40), "pings stopped for {gap:?}");
    let (path, peer) = w.link(0, 1, Duration::from_secs(5));
    assert_eq!(path, "relay", "{peer}");
    // The same WireGuard peer: its counters went on.
    let sent_after = peer["tx_bytes"].as_u64().unwrap_or_default();
    assert!(sent_after > sent_before + 1_000_000, "{peer}");
}

#[test]
fn stun_and_turn_servers_can_come_from_the_xmpp_server_alone() {
    let mut w = World::with_servers(
        "nx215",
        vec![Site::new(Nat::Symmetric), Site::new(Nat::Symmetric)],
        Servers::Xmpp,
    );
    let (path, peer) = linked(&mut w, Duration::from_secs(30));
    assert_eq!(path, "relay", "{peer}");
    let status = w.status(0).expect("status");
    let servers = status["ice_servers"].to_string();
    assert!(
        servers.contains("turn udp") && servers.contains("turn tcp"),
        "{servers}"
    );
}

/// Runs miniupnpd on device 0's router, serving UPnP IGD and, with `natpmp`, NAT-PMP and (with
/// `pcp`) PCP.
fn port_mapping_router(w: &mut World, natpmp: bool, pcp: bool) -> MiniUpnpd {
    let stun = w.coturn.addr();
    let name = w.lab.devices[0].name.clone();
    w.lab
        .router_of_mut(&name)
        .miniupnpd(stun)
        .natpmp(natpmp)
        .pcp(pcp)
        .start()
}

/// Between two symmetric NATs, the device whose router maps its port (by `protocol`) links
/// directly through the mapping: it shows the path as `mapped`, the other side sees the
/// mapping's public endpoint, and the router forgets the mapping once ipop stops.
fn linked_through_the_mapping(w: &mut World, upnp: &MiniUpnpd, protocol: &str) {
    linked(w, Duration::from_secs(30));
    // A relayed pair may answer first; ICE moves to the better pair once its checks pass.
    let user = w.devices[1].user.clone();
    let t0 = std::time::Instant::now();
    wait_until(
        Duration::from_secs(10),
        "the path through the mapping",
        || {
            let status = w.status(0)?;
            let peer = World::peer(&status, &user).cloned().unwrap_or(Value::Null);
            if peer["path"] == "mapped" {
                Ok(())
            } else {
                Err(peer.to_string())
            }
        },
    );
    eprintln!(
        "on the path through the mapping {:.2} s after the link first answered",
        t0.elapsed().as_secs_f64()
    );
    let (path, peer) = w.link(0, 1, Duration::from_secs(5));
    assert_eq!(path, "mapped", "{peer}");
    let lan = w.lab.devices[0].host.ipv4;
    let internal = SocketAddrV4::new(lan, 51820);
    let mappings = upnp.mappings();
    let mapping = mappings
        .iter()
        .find(|m| m.protocol == "udp" && m.internal == internal)
        .unwrap_or_else(|| {
            panic!(
                "no UDP mapping to {internal} on the router: {mappings:?}\n{}",
                upnp.rules()
            )
        });
    let public = w.lab.router_of(&w.lab.devices[0].name).public_ip();
    let external = SocketAddr::from((public, mapping.external_port));
    let status = w.status(0).expect("status");
    let m = &status["port_mapping"];
    assert_eq!(m["state"], "mapped", "{m}");
    assert_eq!(m["protocol"], protocol, "{m}");
    assert_eq!(m["external"], external.to_string(), "{m}");
    assert!(
        peer["pair"]
            .as_str()
            .unwrap_or_default()
            .starts_with(&format!("mapped {external} ")),
        "{peer}"
    );
    let other = w.status(1).expect("status");
    let seen = World::peer(&other, &w.devices[0].user)
        .cloned()
        .unwrap_or_default();
    assert_eq!(seen["path"], "direct", "{seen}");
    assert!(
        seen["pair"]
            .as_str()
            .unwrap_or_default()
            .ends_with(&format!(" srflx {external}")),
        "{seen}"
    );
    let out = w
        .ns(0)
        .command(BIN)
        .args(["ping", &format!("{user}@{DOMAIN}/dev"), "-n", "1", "-c"])
        .arg(w.config(0))
        .output()
        .expect("run ipop ping");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success()
            && stdout.contains(" ms via mapped ")
            && stdout.contains(&format!("(mapped {external} -> ")),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let daemon = w.devices[0].daemon.take().expect("device 0 runs");
    assert!(daemon.stop().success());
    let left = upnp.mappings();
    assert!(
        !left.iter().any(|m| m.internal == internal),
        "ipop stopped, yet the router still maps {left:?}\n{}",
        upnp.log_tail(20)
    );
}

/// Without the mapping the same pair goes through the relay:
/// `symmetric_to_symmetric_goes_through_the_relay`.
#[test]
fn a_symmetric_nat_that_maps_the_port_by_pcp_links_directly() {
    let mut w = World::new(
        "npcp",
        vec![Site::new(Nat::Symmetric), Site::new(Nat::Symmetric)],
    );
    let upnp = port_mapping_router(&mut w, true, true);
    linked_through_the_mapping(&mut w, &upnp, "PCP");
}

/// A router that answers NAT-PMP but not PCP: ipop falls back to NAT-PMP.
#[test]
fn a_symmetric_nat_that_maps_the_port_by_nat_pmp_links_directly() {
    let mut w = World::new(
        "nnpmp",
        vec![Site::new(Nat::Symmetric), Site::new(Nat::Symmetric)],
    );
    let upnp = port_mapping_router(&mut w, true, false);
    linked_through_the_mapping(&mut w, &upnp, "NAT-PMP");
}

/// With NAT-PMP and PCP off on the router, ipop falls back to UPnP IGD.
#[test]
fn a_symmetric_nat_that_maps_the_port_by_upnp_links_directly() {
    let mut w = World::new(
        "nupnp",
        vec![Site::new(Nat::Symmetric), Site::new(Nat::Symmetric)],
    );
    let upnp = port_mapping_router(&mut w, false, false);
    linked_through_the_mapping(&mut w, &upnp, "UPnP");
}

/// A mapping asked for 20 s is renewed every 10 s and outlives its first lease; when the device
/// gets a new address on its LAN (as from a new DHCP lease), the port is mapped to the new
/// address and the old mapping goes.
#[test]
fn a_port_mapping_is_renewed_and_follows_a_new_address() {
    let mut w = World::new(
        "nrenew",
        vec![Site::new(Nat::Symmetric), Site::new(Nat::Symmetric)],
    );
    let config = std::fs::read_to_string(w.config(0)).expect("config");
    let config = config.replace("[nat]\n", "[nat]\nport_mapping_lifetime = \"20s\"\n");
    std::fs::write(w.config(0), config).expect("config written");
    let upnp = port_mapping_router(&mut w, false, false);
    linked(&mut w, Duration::from_secs(30));
    let (old, ifname) = {
        let host = &w.lab.devices[0].host;
        (host.ipv4, host.ifname.clone())
    };
    let internal = |ip: std::net::Ipv4Addr| SocketAddrV4::new(ip, 51820);
    let mapped_to = |ip: std::net::Ipv4Addr| {
        upnp.mappings()
            .iter()
            .any(|m| m.protocol == "udp" && m.internal == internal(ip))
    };
    // The mapping is asked for beside the link, which may answer first through the relay.
    wait_until(Duration::from_secs(10), "the port mapped", || {
        if mapped_to(old) {
            Ok(())
        } else {
            Err(upnp.rules())
        }
    });
    // Past the first lease: still mapped, by renewals.
    std::thread::sleep(Duration::from_secs(25));
    let status = w.status(0).expect("status");
    let m = &status["port_mapping"];
    assert!(m["renewals"].as_u64().unwrap_or(0) >= 2, "{m}");
    assert!(mapped_to(old), "{m}\n{}", upnp.rules());
    assert!(
        w.ns(0)
            .ping(w.addr_of(0, 1).expect("address"), 1)
            .status
            .success()
    );

    let gateway = w.lab.router_of(&w.lab.devices[0].name).lan_ip();
    let [a, b, c, _] = old.octets();
    let new = std::net::Ipv4Addr::new(a, b, c, 77);
    w.ns(0)
        .ip(&["addr", "del", &format!("{old}/24"), "dev", &ifname]);
    w.ns(0)
        .ip(&["addr", "add", &format!("{new}/24"), "dev", &ifname]);
    w.ns(0)
        .ip(&["route", "replace", "default", "via", &gateway.to_string()]);
    let moved = std::time::Instant::now();
    w.link(0, 1, Duration::from_secs(30));
    let relinked = moved.elapsed().as_secs_f64();
    wait_until(
        Duration::from_secs(10),
        "the port mapped to the new address",
        || {
            let status = w.status(0)?;
            let m = &status["port_mapping"];
            if m["internal"] == internal(new).to_string() && mapped_to(new) {
                Ok(())
            } else {
                Err(format!("{m}\n{}", upnp.rules()))
            }
        },
    );
    let remapped = moved.elapsed().as_secs_f64();
    // Deleting the old mapping from the new address may be refused (miniupnpd's secure mode):
    // then it lapses with its lease.
    wait_until(Duration::from_secs(30), "the old mapping to go", || {
        if mapped_to(old) {
            Err(upnp.rules())
        } else {
            Ok(())
        }
    });
    eprintln!(
        "after the address changed: linked again in {relinked:.1} s, the port mapped to the new \
         address in {remapped:.1} s, the old mapping gone in {:.1} s",
        moved.elapsed().as_secs_f64()
    );
    // The XMPP connection from the old address was dropped at once, not after its timeout.
    let xmpp = &w.status(0).expect("status")["xmpp"];
    assert!(xmpp["reconnects"].as_u64().unwrap_or(0) >= 1, "{xmpp}");
}

/// Two devices behind symmetric NATs, with no TURN server, link through a friend's device on
/// an open address that relays (`[relay] enabled`): ping and 5 MB over TCP both ways. The
/// relay shows the pair; a device whose user is not the relay's friend gets nothing from it.
#[test]
fn two_symmetric_nats_link_through_a_friends_relay() {
    let mut w = World::new(
        "nrly",
        vec![
            Site::new(Nat::Symmetric),
            Site::new(Nat::Symmetric),
            Site::new(Nat::None),
            Site::new(Nat::Symmetric),
        ],
    );
    // The relay (device 2) is a friend of devices 0 and 1; device 3 is device 0's friend only.
    w.befriend(1, 2);
    let stun = format!("[nat]\nstun = [\"{}\"]\n", w.coturn.addr());
    for i in [0, 1, 3] {
        w.write_config_with(i, &stun);
    }
    w.write_config_with(
        2,
        &format!("{stun}\n[relay]\nenabled = true\nmax_pairs = 4\n"),
    );
    w.start(2);
    let relay_endpoint = format!("{}:51821", w.lab.devices[2].public_ip);
    wait_until(Duration::from_secs(20), "the relay to be up", || {
        let status = w.status(2)?;
        match status["relay"]["endpoint"].as_str() {
            Some(e) if e == relay_endpoint => Ok(()),
            _ => Err(status["relay"].to_string()),
        }
    });
    w.start(0);
    w.start(1);
    w.start(3);
    let (path, peer) = w.link(0, 1, Duration::from_secs(40));
    assert_eq!(path, "relay", "{peer}");
    let relay_device = format!("{}@{DOMAIN}/dev", w.devices[2].user);
    assert!(
        peer["via"]
            .as_str()
            .unwrap_or_default()
            .starts_with(&format!(
                "the peer relay {relay_device} at {}:",
                w.lab.devices[2].public_ip
            )),
        "{peer}"
    );
    w.tcp_bytes(0, 1, 5_000_000);
    w.tcp_bytes(1, 0, 5_000_000);
    let relay = w.status(2).expect("status")["relay"].clone();
    let (a, b) = (
        format!("{}@{DOMAIN}/dev at ", w.devices[0].user),
        format!("{}@{DOMAIN}/dev at ", w.devices[1].user),
    );
    let pair = relay["pairs"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| {
            let ends = p["ends"].to_string();
            ends.contains(&a) && ends.contains(&b)
        })
        .unwrap_or_else(|| panic!("the relay shows no pair of devices 0 and 1: {relay}"));
    assert!(pair["forwarded"].as_u64().unwrap_or(0) > 3_000, "{pair}");

    // Device 3 is not the relay's friend: it never heard the relay's token, and a registration
    // with any other is dropped unanswered.
    let user3 = format!("{}@{DOMAIN}/dev", w.devices[3].user);
    let to_relay: std::net::SocketAddr = relay_endpoint.parse().expect("endpoint");
    let mut guess = ipop_core::peer_relay::RelayClient::new(
        std::time::Instant::now(),
        to_relay,
        &[0x5a; ipop_core::peer_relay::TOKEN_LEN],
        "any-session",
        ipop_core::peer_relay::Side::Initiator,
        &user3,
        3,
    );
    let (_, registration) = guess.poll_transmit().expect("a registration");
    let answered = w.ns(3).run_in(move || {
        let socket = std::net::UdpSocket::bind("0.0.0.0:0").expect("socket");
        socket
            .set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        socket.send_to(&registration, to_relay).expect("send");
        socket.recv_from(&mut [0u8; 1500]).is_ok()
    });
    assert!(
        !answered,
        "the relay answered a device that is not its user's friend"
    );
    let relay = w.status(2).expect("status")["relay"].clone();
    assert!(
        relay["drops"]["relay_unauthenticated"]
            .as_u64()
            .unwrap_or(0)
            >= 1,
        "{relay}"
    );
    assert!(
        !relay["pairs"].to_string().contains(&user3),
        "device 3 registered with the relay: {relay}"
    );
    let status = w.status(0).expect("status");
    let three = World::peer(&status, &w.devices[3].user)
        .cloned()
        .unwrap_or_default();
    assert_ne!(three["state"], "connected", "{three}");
}

/// A port-restricted cone and a symmetric NAT get a direct path by hole punching, in at most
/// 10 s, when each device has two STUN servers to tell its NAT by (coturn's two addresses).
/// The symmetric side opens 256 sockets toward the cone's mapping; the cone side probes the
/// symmetric side's ports until one lands. `IPOP_PUNCH_RUNS` (default 3) sets how many times
/// the pair links anew; every run must punch, and the figures are printed.
#[test]
fn a_port_restricted_cone_and_a_symmetric_nat_punch_a_direct_path() {
    let runs: usize = std::env::var("IPOP_PUNCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let mut w = World::new(
        "npunch",
        vec![
            Site::new(Nat::PortRestrictedCone),
            Site::new(Nat::Symmetric),
        ],
    );
    let [main, alt, ..] = w.coturn.stun_addrs()[..] else {
        panic!("coturn answers on two addresses");
    };
    for i in 0..2 {
        let (username, password) = w
            .coturn
            .credentials(&w.devices[i].user, Duration::from_secs(3600));
        w.write_config_with(
            i,
            &format!(
                "[nat]\nstun = [\"{main}\", \"{alt}\"]\n\n\
                 [[nat.turn]]\nserver = \"{main}\"\nusername = \"{username}\"\npassword = \"{password}\"\n"
            ),
        );
    }
    let mut times = Vec::new();
    let mut probes = Vec::new();
    for run in 0..runs {
        let started = std::time::Instant::now();
        w.start(0);
        w.start(1);
        // The hard side's view: the path it punched, through one of its extra sockets.
        let peer = wait_until(
            Duration::from_secs(10),
            &format!("run {run}: a punched path"),
            || {
                let status = w.status(1)?;
                match World::peer(&status, &w.devices[0].user) {
                    Some(p) if p["path"] == "punched" => Ok(p.clone()),
                    p => Err(format!("{p:?}\n{status}")),
                }
            },
        );
        let took = started.elapsed();
        let (path, seen) = w.link(0, 1, Duration::from_secs(10));
        assert_eq!(path, "punched", "run {run}: the cone side sees {seen}");
        let (hard, easy) = (w.status(1).expect("status"), w.status(0).expect("status"));
        assert_eq!(hard["nat_mapping"], "dependent", "{hard}");
        // Opening 256 sockets does not hold up the packet loop.
        let stall = hard["loop_stall_max_s"].as_f64().unwrap_or(f64::NAN);
        assert!(stall < 0.010, "loop stall {stall} s");
        assert_eq!(easy["nat_mapping"], "independent", "{easy}");
        // The pair leaves from the socket that a probe reached, not the listening port...
        let pair = peer["pair"].as_str().unwrap_or_default().to_owned();
        assert!(
            pair.starts_with("host ") && !pair.contains(":51820 ->"),
            "{pair}"
        );
        // ...and the other 255 sockets are closed.
        let pid = w.devices[1]
            .daemon
            .as_ref()
            .map(Daemon::pid)
            .expect("running");
        let sockets = w.ns(1).command("ss").args(["-uanp"]).output().expect("ss");
        let listing = String::from_utf8_lossy(&sockets.stdout).into_owned();
        let ours: Vec<&str> = listing
            .lines()
            .filter(|l| l.contains(&format!("pid={pid},")))
            .collect();
        let extra = ours
            .iter()
            .filter_map(|l| l.split_whitespace().nth(3))
            .filter(|local| local.starts_with("0.0.0.0:") && *local != "0.0.0.0:51820")
            .count();
        assert_eq!(extra, 1, "the daemon's UDP sockets:\n{}", ours.join("\n"));
        let (h, e) = (&hard["punching"], &easy["punching"]);
        assert_eq!(h["punched"], 1, "{h}");
        assert_eq!(h["sockets"], 256, "{h}");
        assert_eq!(e["punched"], 1, "{e}");
        let sent = h["probes"].as_u64().unwrap_or(0) + e["probes"].as_u64().unwrap_or(0);
        eprintln!(
            "run {run}: punched in {:.2} s with {sent} probes ({} sprayed)",
            took.as_secs_f64(),
            e["probes"]
        );
        times.push(took.as_secs_f64());
        probes.push(sent);
        for d in &mut w.devices {
            d.daemon = None;
        }
    }
    times.sort_by(f64::total_cmp);
    probes.sort_unstable();
    eprintln!(
        "punching: {runs}/{runs} runs direct; time median {:.2} s, max {:.2} s; probes median {}, max {}",
        times[runs / 2],
        times[runs - 1],
        probes[runs / 2],
        probes[runs - 1]
    );
}

/// Two symmetric NATs that both a TURN server and a friend's relay could link: the TURN server
/// sits behind a delay line (25 ms each way, as a far-away server would), the friend on the same
/// fake internet answers within a millisecond. The link goes through the friend's relay, which
/// answered faster; once the friend is gone it moves to the TURN server, at its round-trip time.
#[test]
fn a_friends_relay_that_answers_faster_than_the_turn_server_is_preferred() {
    let mut w = World::new(
        "nrtt",
        vec![
            Site::new(Nat::Symmetric),
            Site::new(Nat::Symmetric),
            Site::new(Nat::None),
        ],
    );
    w.befriend(1, 2);
    let far = UdpDelay::start(
        &w.lab.server.ns,
        SocketAddr::new(IpAddr::V4(SERVER_ALT_IP), 0),
        w.coturn.addr(),
        Duration::from_millis(25),
    );
    for i in [0, 1] {
        let (username, password) = w
            .coturn
            .credentials(&w.devices[i].user, Duration::from_secs(3600));
        w.write_config_with(
            i,
            &format!(
                "[nat]\n[[nat.turn]]\nserver = \"{}\"\nusername = \"{username}\"\npassword = \"{password}\"\n",
                far.addr()
            ),
        );
    }
    w.write_config_with(
        2,
        &format!(
            "[nat]\nstun = [\"{}\"]\n\n[relay]\nenabled = true\n",
            w.coturn.addr()
        ),
    );
    w.start(2);
    wait_until(Duration::from_secs(20), "the relay to be up", || {
        let status = w.status(2)?;
        status["relay"]["endpoint"]
            .as_str()
            .map(|_| ())
            .ok_or_else(|| status["relay"].to_string())
    });
    w.start(0);
    w.start(1);
    let through_friend = format!("the peer relay {}@{DOMAIN}/dev", w.devices[2].user);
    let peer = wait_until(
        Duration::from_secs(20),
        "the link to go through the friend's relay",
        || {
            let status = w.status(0)?;
            match World::peer(&status, &w.devices[1].user) {
                Some(p)
                    if p["via"]
                        .as_str()
                        .unwrap_or_default()
                        .starts_with(&through_friend) =>
                {
                    Ok(p.clone())
                }
                p => Err(format!("{p:?}")),
            }
        },
    );
    let (path, _) = w.link(0, 1, Duration::from_secs(10));
    assert_eq!(path, "relay", "{peer}");
    let rtt = |peer: &Value| peer["rtt_ms"].as_f64().unwrap_or(f64::NAN);
    assert!(rtt(&peer) < 20.0, "{peer}");

    // Without the friend, the TURN server carries the link, 100 ms a round trip.
    w.devices[2].daemon = None;
    let peer = wait_until(
        Duration::from_secs(40),
        "the link to move to the TURN server",
        || {
            let status = w.status(0)?;
            match World::peer(&status, &w.devices[1].user) {
                Some(p)
                    if p["path"] == "relay"
                        && !p["via"]
                            .as_str()
                            .unwrap_or_default()
                            .starts_with("the peer relay")
                        && rtt(p) >= 50.0 =>
                {
                    Ok(p.clone())
                }
                p => Err(format!("{p:?}")),
            }
        },
    );
    eprintln!("through the TURN server: {peer}");
    let (path, _) = w.link(0, 1, Duration::from_secs(10));
    assert_eq!(path, "relay");
}

/// A subnet router: device 1 routes its LAN, where host 2 runs no ipop, for its friends.
/// Device 0, a friend that accepts routes, reaches host 2 by ping and TCP, and host 2 sees the
/// connection come from device 1's LAN address (masqueraded). Device 3 accepts routes too, but
/// is not device 1's friend: it gets no route, and host 2 stays out of its reach.
#[test]
fn a_subnet_router_gives_a_friend_its_lan_and_a_stranger_nothing() {
    let mut w = World::new(
        "nsubnet",
        vec![
            Site::new(Nat::PortRestrictedCone),
            Site::new(Nat::PortRestrictedCone).devices(2),
            Site::new(Nat::PortRestrictedCone),
        ],
    );
    let router_lan = w.lab.devices[1].host.ipv4;
    let host = w.lab.devices[2].host.ipv4;
    let prefix = ipnet::Ipv4Net::new(router_lan, 24).expect("prefix").trunc();
    let stun = format!("[nat]\nstun = [\"{}\"]\n", w.coturn.addr());
    // Keys before the [nat] header belong to [social].
    w.write_config_with(1, &format!("advertise_routes = [\"{prefix}\"]\n\n{stun}"));
    for i in [0, 3] {
        w.write_config_with(i, &format!("accept_routes = true\n\n{stun}"));
    }
    let forwarding = |w: &World| {
        w.ns(1)
            .run_in(|| std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward"))
            .expect("ip_forward")
    };
    let forwarding_before = forwarding(&w);
    w.start(1);
    w.start(0);
    w.start(3);
    let router = format!("{}@{DOMAIN}/dev", w.devices[1].user);
    let route = wait_until(
        Duration::from_secs(20),
        "device 0 to take the route",
        || {
            let status = w.status(0)?;
            status["routes"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|r| r["prefix"] == prefix.to_string() && r["state"] == "accepted")
                .cloned()
                .ok_or_else(|| status["routes"].to_string())
        },
    );
    assert_eq!(route["via"], router.as_str(), "{route}");
    assert_eq!(route["source"], w.devices[0].address.as_str(), "{route}");
    let status = w.status(1).expect("status");
    assert_eq!(
        status["advertised_routes"]["social"][0],
        prefix.to_string(),
        "{status}"
    );
    wait_until(Duration::from_secs(20), "device 0 to ping host 2", || {
        if w.ns(0).ping(IpAddr::V4(host), 1).status.success() {
            Ok(())
        } else {
            Err(w.status(0).map(|s| s.to_string()).unwrap_or_else(|e| e))
        }
    });
    // 1 MB of TCP from device 0 to host 2, which sees it come from the router's LAN address.
    let listener = w
        .ns(2)
        .run_in(move || TcpListener::bind((host, 0)).expect("listen"));
    let port = listener.local_addr().expect("port").port();
    let receiver = std::thread::spawn(move || {
        let (mut conn, from) = listener.accept().expect("accept");
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("read timeout");
        let mut got = Vec::new();
        conn.read_to_end(&mut got).expect("read through the router");
        (got, from)
    });
    let data: Vec<u8> = (0..1_000_000u32).map(|n| (n * 7 + n / 251) as u8).collect();
    let sent = data.clone();
    w.ns(0).run_in(move || {
        let mut conn = TcpStream::connect_timeout(&(host, port).into(), Duration::from_secs(5))
            .expect("connect through the router");
        conn.write_all(&sent).expect("send through the router");
    });
    let (got, from) = receiver.join().expect("receiver");
    assert!(got == data, "TCP data arrived changed");
    assert_eq!(from.ip(), IpAddr::V4(router_lan), "not masqueraded");

    // Device 3 accepts routes, but device 1 is not its user's friend.
    let status = w.status(3).expect("status");
    assert!(
        !status["routes"].to_string().contains(&prefix.to_string()),
        "{status}"
    );
    assert!(
        !w.ns(3).ping(IpAddr::V4(host), 2).status.success(),
        "device 3 reaches host 2"
    );

    // Stopped, the router leaves its forwarding as it found it.
    assert_eq!(forwarding(&w).trim(), "1");
    w.devices[1].daemon = None;
    assert_eq!(forwarding(&w), forwarding_before);
    let tables = w
        .ns(1)
        .command("nft")
        .args(["list", "tables"])
        .output()
        .expect("nft");
    let tables = String::from_utf8_lossy(&tables.stdout);
    assert!(!tables.contains("ipop-"), "{tables}");
}

/// The address a host on the fake internet sees a TCP connection from device `i` come from.
fn seen_from_internet(w: &World, i: usize) -> Result<IpAddr, String> {
    let listener = w
        .lab
        .server
        .ns
        .run_in(|| TcpListener::bind((SERVER_ALT_IP, 0)).map_err(|e| format!("listen: {e}")))?;
    let port = listener.local_addr().map_err(|e| e.to_string())?.port();
    let accept = std::thread::spawn(move || {
        listener
            .set_nonblocking(false)
            .and_then(|()| listener.accept())
            .map(|(_, from)| from.ip())
    });
    let connected = w.ns(i).run_in(move || {
        TcpStream::connect_timeout(&(SERVER_ALT_IP, port).into(), Duration::from_secs(2))
            .map(|mut c| c.write_all(b"hello"))
    });
    match connected {
        Ok(Ok(())) => accept
            .join()
            .map_err(|_| "accept panicked".to_owned())?
            .map_err(|e| e.to_string()),
        Ok(Err(e)) | Err(e) => {
            // Unblock the accept.
            let _ = w
                .lab
                .server
                .ns
                .run_in(move || TcpStream::connect((SERVER_ALT_IP, port)));
            let _ = accept.join();
            Err(format!("connect: {e}"))
        }
    }
}

/// Sends `COUNT` datagrams of 1200 bytes from device `i` to a UDP server on the fake internet,
/// in bursts of 40 (as a QUIC or media sender would), and returns where they came from and the
/// sequence numbers that arrived whole, in arrival order.
fn udp_burst_to_internet(w: &World, i: usize) -> Result<(IpAddr, Vec<u32>), String> {
    const COUNT: u32 = 400;
    const BURST: u32 = 40;
    let payload = |seq: u32| -> Vec<u8> {
        let mut p = vec![0u8; 1200];
        p[..4].copy_from_slice(&seq.to_be_bytes());
        for (k, byte) in p.iter_mut().enumerate().skip(4) {
            *byte = (seq as usize * 13 + k) as u8;
        }
        p
    };
    let server = w.lab.server.ns.run_in(|| -> Result<UdpSocket, String> {
        let socket = UdpSocket::bind((SERVER_ALT_IP, 0)).map_err(|e| format!("bind: {e}"))?;
        // Room for every datagram, so that a receiver slowed down by the machine loses none.
        nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::RcvBufForce, &(8 << 20))
            .map_err(|e| format!("SO_RCVBUFFORCE: {e}"))?;
        socket
            .set_read_timeout(Some(Duration::from_secs(2)))
            .map_err(|e| format!("timeout: {e}"))?;
        Ok(socket)
    })?;
    let to = server.local_addr().map_err(|e| e.to_string())?;
    w.ns(i)
        .run_in(|| -> std::io::Result<()> {
            let socket = UdpSocket::bind("0.0.0.0:0")?;
            for burst in 0..COUNT / BURST {
                for seq in burst * BURST..(burst + 1) * BURST {
                    socket.send_to(&payload(seq), to)?;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            Ok(())
        })
        .map_err(|e| format!("send: {e}"))?;
    let mut seqs = Vec::new();
    let mut from = None;
    let mut buf = vec![0u8; 2048];
    while seqs.len() < COUNT as usize {
        let (n, source) = match server.recv_from(&mut buf) {
            Ok(got) => got,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(format!("receive: {e}")),
        };
        let seq = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
        if buf[..n] != payload(seq)[..] {
            return Err(format!("datagram {seq} arrived altered ({n} bytes)"));
        }
        from = Some(source.ip());
        seqs.push(seq);
    }
    Ok((from.ok_or("no datagram arrived")?, seqs))
}

/// Asks the DNS server at `server` (port 53) for the A records of `name` from device `i`'s
/// namespace, as `dig @server name` would: the response code and the addresses.
fn ask_dns(w: &World, i: usize, server: IpAddr, name: &str) -> (ResponseCode, Vec<IpAddr>) {
    let mut query = Message::query();
    query.metadata.id = 0x5a17;
    query.metadata.recursion_desired = true;
    query.add_query(Query::query(
        Name::from_ascii(name).expect("a name"),
        RecordType::A,
    ));
    let bytes = query.to_vec().expect("a query");
    let answer = w.ns(i).run_in(move || {
        let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
        socket.set_read_timeout(Some(Duration::from_secs(5)))?;
        socket.send_to(&bytes, (server, 53))?;
        let mut buf = [0u8; 2048];
        let len = socket.recv(&mut buf)?;
        Ok::<_, std::io::Error>(buf[..len].to_vec())
    });
    let answer = answer.unwrap_or_else(|e| panic!("no DNS answer from {server}: {e}"));
    let response = Message::from_vec(&answer).expect("a DNS response");
    let addrs = response
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            _ => None,
        })
        .collect();
    (response.metadata.response_code, addrs)
}

/// Runs `ipop exit CHOICE` on device `i`.
fn set_exit(w: &World, i: usize, choice: &str) {
    let out = w
        .ns(i)
        .command(BIN)
        .args(["exit", choice, "-c"])
        .arg(w.config(i))
        .output()
        .expect("ipop exit");
    assert!(
        out.status.success(),
        "ipop exit {choice}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An exit node: device 1 offers its friends to send their internet traffic through it. Before
/// device 0 takes it, a host on the fake internet sees device 0's connections come from its own
/// router; once it does (`ipop exit`), from device 1's public address. XMPP stays up
/// meanwhile: its connection never goes through the tunnel. DNS goes through the exit too:
/// device 0's responder forwards a name outside the overlays to device 1's, which asks its
/// host's resolver on the fake internet, and that resolver sees the query come from the
/// exit's public address.
#[test]
fn an_exit_node_carries_a_friends_internet_traffic_and_not_its_own_underlay() {
    let mut w = World::new(
        "nexit",
        vec![
            Site::new(Nat::PortRestrictedCone),
            Site::new(Nat::PortRestrictedCone),
        ],
    );
    let stun = format!("[nat]\nstun = [\"{}\"]\n", w.coturn.addr());
    // The exit's host resolves names with a DNS server on the fake internet.
    let far = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 80));
    let resolver = Dnsmasq::start(
        &w.lab.server.ns,
        IpAddr::V4(SERVER_ALT_IP),
        &[("www.internet.test", far)],
        &[],
    );
    let _resolv_conf = NetnsResolver::new(w.ns(1), resolver.addr());
    w.write_config_with(1, &format!("exit = true\n\n{stun}"));
    w.write_config_with(0, &stun);
    w.start(1);
    w.start(0);
    w.link(0, 1, Duration::from_secs(20));
    let own = IpAddr::V4(w.lab.devices[0].public_ip);
    let exit = IpAddr::V4(w.lab.devices[1].public_ip);
    assert_eq!(seen_from_internet(&w, 0), Ok(own));
    // Without an exit, device 0's responder answers for the overlays only.
    let responder: IpAddr = w.devices[0].address.parse().expect("an address");
    assert_eq!(
        ask_dns(&w, 0, responder, "www.internet.test."),
        (ResponseCode::Refused, vec![])
    );
    let reconnects = |w: &World| w.status(0).expect("status")["xmpp"]["reconnects"].clone();
    let before = reconnects(&w);

    let device = format!("{}@{DOMAIN}/dev", w.devices[1].user);
    set_exit(&w, 0, &device);
    wait_until(Duration::from_secs(10), "the exit to be active", || {
        let status = w.status(0)?;
        if status["exit"]["state"] == "active" && status["exit"]["in_use"] == device.as_str() {
            Ok(())
        } else {
            Err(status["exit"].to_string())
        }
    });
    let seen = wait_until(Duration::from_secs(10), "traffic through the exit", || {
        seen_from_internet(&w, 0).and_then(|ip| {
            if ip == exit {
                Ok(ip)
            } else {
                Err(format!("seen from {ip}"))
            }
        })
    });
    assert_eq!(seen, exit);
    // UDP in bursts (QUIC, calls) reaches the internet through the exit whole and in order,
    // although the exit merges the datagrams into UDP GSO writes to its TUN device, which its
    // kernel must split again as it forwards and masquerades them.
    let written_before = w.ns(1).link_counters("ipop0").rx_packets;
    let (from, seqs) = udp_burst_to_internet(&w, 0).expect("UDP through the exit");
    let written = w.ns(1).link_counters("ipop0").rx_packets - written_before;
    eprintln!(
        "UDP through the exit: {} of 400 datagrams arrived from {from}; the exit wrote its TUN \
         device {written} times",
        seqs.len()
    );
    assert_eq!(from, exit, "the datagrams left through the exit");
    assert_eq!(
        seqs,
        (0..400).collect::<Vec<_>>(),
        "every datagram, in order"
    );
    assert!(
        written * 2 <= 400,
        "the exit wrote its TUN device {written} times for 400 datagrams: not merged"
    );
    // DNS through the exit: answered by the exit's resolver, which saw the exit ask.
    let answer = wait_until(
        Duration::from_secs(10),
        "DNS through the exit",
        || match ask_dns(&w, 0, responder, "www.internet.test.") {
            (ResponseCode::NoError, addrs) if !addrs.is_empty() => Ok(addrs),
            other => Err(format!("{other:?}; status {}", w.status(0)?["exit"])),
        },
    );
    assert_eq!(answer, [far]);
    let log = resolver.log();
    assert!(
        log.contains(&format!("query[A] www.internet.test from {exit}")),
        "the resolver saw the query come from elsewhere than the exit {exit}:\n{log}"
    );
    // At the address device 0 knows the exit by (in the social overlay, its own numbering).
    let peer = peer_entry(&w, 0, 1);
    let exit_at = peer["addresses"]
        .as_array()
        .and_then(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .find(|a| !a.contains(':'))
        })
        .map(|a| a.trim_end_matches("/32").to_owned())
        .unwrap_or_else(|| panic!("no IPv4 address for the exit in {peer}"));
    assert_eq!(
        w.status(0).expect("status")["exit"]["dns"],
        format!("{exit_at}:53").as_str()
    );
    // The overlay, XMPP and the link keep working with the exit on.
    w.tcp(0, 1);
    std::thread::sleep(Duration::from_secs(3));
    let status = w.status(0).expect("status");
    assert_eq!(status["xmpp"]["state"], "online", "{status}");
    assert_eq!(
        reconnects(&w),
        before,
        "XMPP reconnected while the exit was on"
    );
    let exit_status = w.status(1).expect("status");
    assert_eq!(exit_status["advertised_routes"]["social"][0], "0.0.0.0/0");

    // Off again: the host's own way.
    set_exit(&w, 0, "none");
    let seen = wait_until(
        Duration::from_secs(10),
        "traffic the host's own way",
        || {
            seen_from_internet(&w, 0).and_then(|ip| {
                if ip == own {
                    Ok(ip)
                } else {
                    Err(format!("seen from {ip}"))
                }
            })
        },
    );
    assert_eq!(seen, own);
    // And DNS is the overlays' only again.
    wait_until(
        Duration::from_secs(5),
        "DNS no longer through the exit",
        || match ask_dns(&w, 0, responder, "www.internet.test.") {
            (ResponseCode::Refused, _) => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    assert_eq!(w.status(0).expect("status")["exit"]["dns"], Value::Null);
}

/// Two exits, and two devices that use whichever is fastest (`auto`): device 0 blocks its
/// internet traffic while no exit is up (the default), device 3 lets it go its own way
/// (`exit_fallback = "direct"`). When the exit in use fails (killed), the other replaces it
/// within 5 s; when both are gone, device 0 reaches nothing on the internet and device 3 goes
/// direct.
#[test]
fn a_failed_exit_is_replaced_and_without_one_traffic_blocks_or_goes_direct() {
    let mut w = World::new(
        "nexits",
        vec![
            Site::new(Nat::PortRestrictedCone),
            Site::new(Nat::PortRestrictedCone),
            Site::new(Nat::PortRestrictedCone),
            Site::new(Nat::PortRestrictedCone),
        ],
    );
    w.befriend(3, 1);
    w.befriend(3, 2);
    let stun = format!("[nat]\nstun = [\"{}\"]\n", w.coturn.addr());
    for i in [1, 2] {
        w.write_config_with(i, &format!("exit = true\n\n{stun}"));
    }
    w.devices[0].device_keys = "exit = \"auto\"\n".to_owned();
    w.devices[3].device_keys =
        "exit = \"auto\"\nexit_fallback = \"direct\"\nexit_dns = false\n".to_owned();
    for i in [0, 3] {
        w.write_config_with(i, &stun);
    }
    for i in [1, 2, 0, 3] {
        w.start(i);
    }
    let public = |i: usize| IpAddr::V4(w.lab.devices[i].public_ip);
    let exit_of = |w: &World, i: usize| -> Result<usize, String> {
        let status = w.status(i)?;
        let e = &status["exit"];
        if e["state"] != "active" {
            return Err(e.to_string());
        }
        (1..=2)
            .find(|&j| e["in_use"] == format!("{}@{DOMAIN}/dev", w.devices[j].user).as_str())
            .ok_or_else(|| e.to_string())
    };
    let first = wait_until(Duration::from_secs(30), "device 0 to use an exit", || {
        exit_of(&w, 0)
    });
    wait_until(Duration::from_secs(30), "device 3 to use an exit", || {
        exit_of(&w, 3)
    });
    wait_until(
        Duration::from_secs(10),
        "traffic through the exit",
        || match seen_from_internet(&w, 0) {
            Ok(ip) if ip == public(first) => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    let other = 3 - first;
    // Device 0's names go through its exit (the default); device 3 keeps its own
    // (`exit_dns = false`): its responder refuses a name outside the overlays, as it would
    // without an exit.
    let dns_of = |i: usize| w.status(i).expect("status")["exit"]["dns"].clone();
    assert!(dns_of(0).is_string(), "{}", dns_of(0));
    assert_eq!(dns_of(3), Value::Null);
    let responder: IpAddr = w.devices[3].address.parse().expect("an address");
    assert_eq!(
        ask_dns(&w, 3, responder, "www.internet.test.").0,
        ResponseCode::Refused
    );

    // The exit in use dies, during pings to the internet at 5/s: the other one carries them
    // within 5 s.
    let pings = pings_to(&w, 0, IpAddr::V4(SERVER_ALT_IP));
    std::thread::sleep(Duration::from_secs(2));
    let killed = unix_now();
    if let Some(d) = w.devices[first].daemon.as_mut() {
        d.kill();
    }
    let (replaced, gap) = recovery(pings, killed);
    eprintln!(
        "a failed exit was replaced: replies again {replaced:.2} s after, longest gap {gap:.2} s"
    );
    assert!(
        replaced <= 5.0,
        "replies again {replaced:.2} s after the exit died"
    );
    assert_eq!(exit_of(&w, 0), Ok(other));
    assert_eq!(seen_from_internet(&w, 0), Ok(public(other)));

    // No exit left, while device 0 pings the internet: it blocks, device 3 goes its own way.
    let pings = pings_to(&w, 0, IpAddr::V4(SERVER_ALT_IP));
    std::thread::sleep(Duration::from_secs(1));
    if let Some(d) = w.devices[other].daemon.as_mut() {
        d.kill();
    }
    wait_until(Duration::from_secs(15), "device 0 to block", || {
        let status = w.status(0)?;
        (status["exit"]["state"] == "blocking")
            .then_some(())
            .ok_or_else(|| status["exit"].to_string())
    });
    assert!(
        seen_from_internet(&w, 0).is_err(),
        "device 0 reached the internet without an exit"
    );
    let _ = pings.wait_with_output();
    let seen =
        wait_until(
            Duration::from_secs(15),
            "device 3 to go direct",
            || match seen_from_internet(&w, 3) {
                Ok(ip) if ip == public(3) => Ok(ip),
                other => Err(format!("{other:?}")),
            },
        );
    assert_eq!(seen, public(3));
    let status = w.status(3).expect("status");
    assert_eq!(status["exit"]["state"], "direct", "{status}");
}

/// A symmetric NAT's mapping toward a peer is unknown until it sends; only a full-cone NAT on
/// the other side lets that first packet in (a port-restricted one needs the relay).
#[test]
fn full_cone_to_symmetric_is_direct() {
    let mut w = World::new(
        "nmix",
        vec![Site::new(Nat::FullCone), Site::new(Nat::Symmetric)],
    );
    linked(&mut w, Duration::from_secs(30));
    w.settled(0, 1, "direct");
}

#[test]
fn two_devices_behind_one_nat_link_directly() {
    let mut w = World::new("nsame", vec![Site::new(Nat::PortRestrictedCone).devices(2)]);
    linked(&mut w, Duration::from_secs(20));
    let peer = w.settled(0, 1, "direct");
    assert!(
        peer["pair"]
            .as_str()
            .unwrap_or_default()
            .starts_with("host "),
        "{peer}"
    );
}

/// Pings from device `i` to device `j` at 5/s for 12 s, in the background.
fn start_pings(w: &World, i: usize, j: usize) -> std::process::Child {
    let target = w.addr_of(i, j).expect("device j's address");
    pings_to(w, i, target)
}

/// Pings `target` from device `i` 5 times a second, for 12 s at most.
fn pings_to(w: &World, i: usize, target: IpAddr) -> std::process::Child {
    const SECONDS_OF_PINGS: u32 = 12;
    w.ns(i)
        .command("ping")
        .args(["-n", "-D", "-i", "0.2", "-W", "1"])
        .args(["-c", &(SECONDS_OF_PINGS * 5).to_string()])
        .args(["-w", &(SECONDS_OF_PINGS + 5).to_string()])
        .arg(target.to_string())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("ping starts")
}

/// Now, in seconds since 1970 (ping's `-D` timestamps).
fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64()
}

/// Waits for the pings of [`start_pings`] to end; returns how long after `disrupted` (from
/// [`unix_now`]) the first reply came, not counting the time the whole machine was stopped
/// (see [`ipop_lab::machine_stopped_during`]), and the longest gap between two replies, in
/// seconds.
fn recovery(pings: std::process::Child, disrupted: f64) -> (f64, f64) {
    let out = pings.wait_with_output().expect("ping ends");
    let text = String::from_utf8_lossy(&out.stdout);
    // Reply lines: "[1733343434.123456] 64 bytes from 10.78.0.2: icmp_seq=7 ttl=64 time=0.5 ms".
    let replies: Vec<f64> = text
        .lines()
        .filter(|l| l.contains("bytes from"))
        .filter_map(|l| l.strip_prefix('[')?.split(']').next()?.parse().ok())
        .collect();
    let first_after = replies
        .iter()
        .find(|&&t| t > disrupted)
        .unwrap_or_else(|| panic!("no reply after the disruption:\n{text}"));
    let longest_gap = replies.windows(2).map(|p| p[1] - p[0]).fold(0.0, f64::max);
    let at = |t: f64| std::time::UNIX_EPOCH + Duration::from_secs_f64(t);
    let stopped = ipop_lab::machine_stopped_during(at(disrupted), at(*first_after));
    if !stopped.is_zero() {
        eprintln!("the machine was stopped for {stopped:.2?} of the recovery: not counted");
    }
    (first_after - disrupted - stopped.as_secs_f64(), longest_gap)
}

/// The peer entry device `i` shows for device `j`.
fn peer_entry(w: &World, i: usize, j: usize) -> Value {
    World::peer(&w.status(i).expect("status"), &w.devices[j].user)
        .cloned()
        .unwrap_or(Value::Null)
}

/// Seconds since the last WireGuard handshake with the peer, as status shows it.
fn handshake_age(peer: &Value) -> f64 {
    peer["last_handshake_s"]
        .as_f64()
        .unwrap_or_else(|| panic!("no handshake age in {peer}"))
}

/// A NAT router rebinds in the middle of a ping at 5/s: every mapping gets a new public port,
/// conntrack is flushed. The other device (behind a full cone, which lets the new port in)
/// hears the same WireGuard session from the new port and follows it: replies resume within
/// 2 s, with no new handshake. First the router of one
/// device rebinds, then the other's: one of them runs the ICE agent that nominates (it moves to
/// the new port by ICE's triggered checks), the other's peer can only follow it by roaming off
/// the path gone quiet.
#[test]
fn a_link_follows_its_nat_rebinding_within_2_seconds_with_the_same_session() {
    let mut w = World::new(
        "nrebind",
        vec![Site::new(Nat::FullCone), Site::new(Nat::FullCone)],
    );
    linked(&mut w, Duration::from_secs(20));
    w.settled(0, 1, "direct");
    let age_before = handshake_age(&peer_entry(&w, 0, 1));
    let asked = std::time::Instant::now();

    for (rebound, other) in [(0, 1), (1, 0)] {
        let endpoint_before = peer_entry(&w, other, rebound)["endpoint"].to_string();
        let name = w.lab.devices[rebound].name.clone();
        let pings = start_pings(&w, rebound, other);
        std::thread::sleep(Duration::from_secs(3));
        let ports = w.lab.router_of_mut(&name).rebind();
        let (recovery, gap) = recovery(pings, unix_now());
        eprintln!(
            "device {rebound}'s NAT rebound: replies resumed after {recovery:.2} s; longest gap {gap:.2} s"
        );
        assert!(recovery < 2.0, "replies resumed after {recovery:.2} s");

        // The other device now reaches it at a port of the new range.
        let endpoint_after = peer_entry(&w, other, rebound)["endpoint"].to_string();
        assert_ne!(
            endpoint_after, endpoint_before,
            "the mapping did not change"
        );
        let port: u16 = endpoint_after
            .trim_matches('"')
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("endpoint {endpoint_after}"));
        assert!(
            (ports.0..=ports.1).contains(&port),
            "{endpoint_after} is not in the new range {ports:?}"
        );
        // Status shows the path it follows, not the dead one.
        let entry = peer_entry(&w, other, rebound);
        let pair = entry["pair"].as_str().unwrap_or_default();
        assert!(pair.ends_with(endpoint_after.trim_matches('"')), "{entry}");
    }
    // The same session: its handshake aged with the clock.
    let age_after = handshake_age(&peer_entry(&w, 0, 1));
    let elapsed = asked.elapsed().as_secs_f64();
    assert!(
        age_after + 1.0 >= age_before + elapsed,
        "a new handshake: {age_before:.1} s old before, {age_after:.1} s old {elapsed:.1} s later"
    );
    w.tcp(0, 1);
    w.tcp(1, 0);
}

/// A device's address on its LAN changes in the middle of a ping at 5/s: a new host address
/// replaces the old one and the default route moves to it. Its packets leave from the new
/// address (through a new NAT mapping); the other device follows: replies resume within 2 s.
#[test]
fn a_link_follows_a_new_underlay_address_within_2_seconds() {
    let mut w = World::new(
        "naddr",
        vec![Site::new(Nat::PortRestrictedCone), Site::new(Nat::FullCone)],
    );
    linked(&mut w, Duration::from_secs(20));
    w.settled(0, 1, "direct");
    let endpoint_before = peer_entry(&w, 1, 0)["endpoint"].to_string();
    let age_before = handshake_age(&peer_entry(&w, 0, 1));
    let asked = std::time::Instant::now();

    let host = &w.lab.devices[0].host;
    let gateway = w.lab.router_of(&w.lab.devices[0].name).lan_ip();
    let old = format!("{}/24", host.ipv4);
    let [a, b, c, _] = host.ipv4.octets();
    let new = format!("{a}.{b}.{c}.77");
    let pings = start_pings(&w, 0, 1);
    std::thread::sleep(Duration::from_secs(3));
    // As a new DHCP lease does: the old address goes (and the default route with it), the new
    // one comes, and the default route with it.
    host.ns.ip(&["addr", "del", &old, "dev", &host.ifname]);
    host.ns
        .ip(&["addr", "add", &format!("{new}/24"), "dev", &host.ifname]);
    host.ns
        .ip(&["route", "replace", "default", "via", &gateway.to_string()]);
    let (recovery, gap) = recovery(pings, unix_now());
    eprintln!("replies resumed {recovery:.2} s after the address changed; longest gap {gap:.2} s");
    assert!(recovery < 2.0, "replies resumed after {recovery:.2} s");
    let endpoint_after = peer_entry(&w, 1, 0)["endpoint"].to_string();
    assert_ne!(
        endpoint_after, endpoint_before,
        "the mapping did not change"
    );
    let age_after = handshake_age(&peer_entry(&w, 0, 1));
    let elapsed = asked.elapsed().as_secs_f64();
    assert!(
        age_after + 1.0 >= age_before + elapsed,
        "a new handshake: {age_before:.1} s old before, {age_after:.1} s old {elapsed:.1} s later"
    );
    w.tcp(0, 1);
    w.tcp(1, 0);
}
