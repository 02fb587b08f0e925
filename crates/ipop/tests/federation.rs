//! Federation: friends, and a group, on two XMPP servers. Two Prosody servers, for `a.example`
//! and `b.example`, run on the lab's fake internet and link to each other over TLS
//! (server-to-server, certificates from one CA, no dialback), finding each other through DNS
//! (`_xmpp-server._tcp` SRV records from a dnsmasq). Alice and carol have accounts on the
//! first, bob and dave on the second; alice is bob's friend and carol is dave's, and bob is a
//! member of alice's room on `conference.a.example`.
//!
//! Alice's and bob's devices sit behind full-cone NATs and link directly; carol's and dave's sit
//! behind symmetric NATs and link through coturn. Every device shows its friends with their own
//! domain, and carol's device names dave's under `b.example`.
//!
//! Run as root: the test creates network namespaces and TUN devices.

use ipop_lab::{
    Coturn, Daemon, Dnsmasq, Nat, NatLab, Netns, NetnsResolver, Prosody, SERVER_ALT_IP, SERVER_IP,
    Site, TestCa, TestDir, XmppUser, generate_key, status_json, wait_until,
};
use serde_json::Value;
use std::fs::Permissions;
use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_ipop");
const A: &str = "a.example";
const B: &str = "b.example";
const ROOM: &str = "lab@conference.a.example";
/// How long a link may take to come up: longer than on one server, since every signal crosses
/// the server-to-server link.
const LINK_TIMEOUT: Duration = Duration::from_secs(40);

fn password(user: &str) -> String {
    format!("pw-{user}-secret")
}

struct Device {
    jid: String,
    /// Which server the account is on: 0 for `a.example`, 1 for `b.example`.
    server: usize,
    dir: PathBuf,
    daemon: Option<Daemon>,
}

struct Federation {
    devices: Vec<Device>,
    coturn: Coturn,
    servers: [Prosody; 2],
    dns: Dnsmasq,
    _resolver: NetnsResolver,
    lab: NatLab,
    _dir: TestDir,
}

impl Federation {
    fn new(tag: &str) -> Federation {
        let lab = NatLab::builder(tag)
            .site(Site::new(Nat::FullCone))
            .site(Site::new(Nat::FullCone))
            .site(Site::new(Nat::Symmetric))
            .site(Site::new(Nat::Symmetric))
            .build();
        lab.server
            .ns
            .ip(&["route", "add", "default", "via", "198.18.0.1"]);
        let dir = TestDir::new(tag);
        let (ip_a, ip_b) = (IpAddr::V4(SERVER_IP), IpAddr::V4(SERVER_ALT_IP));
        let dns = Dnsmasq::start(
            &lab.server.ns,
            ip_a,
            &[
                (A, ip_a),
                ("conference.a.example", ip_a),
                (B, ip_b),
                ("conference.b.example", ip_b),
            ],
            &[
                ("_xmpp-server._tcp.a.example", A, 5269),
                ("_xmpp-server._tcp.b.example", B, 5269),
            ],
        );
        let resolver = NetnsResolver::new(&lab.server.ns, dns.addr());
        let ca = TestCa::new("ipop-lab test CA");
        let coturn = Coturn::builder()
            .in_netns(&lab.server.ns, ip_a)
            .dir(dir.path())
            .start();
        let server = |domain: &str, ip: IpAddr| {
            Prosody::builder(domain)
                .in_netns(&lab.server.ns, ip)
                .ca(&ca)
                .federation()
                .dir(dir.path())
                .start()
        };
        let servers = [server(A, ip_a), server(B, ip_b)];
        let accounts = [("alice", 0), ("bob", 1), ("carol", 0), ("dave", 1)];
        for (user, s) in accounts {
            servers[s].register(user, &password(user));
        }
        let chat = |user: &str, s: usize| {
            XmppUser::builder(&servers[s], user, &password(user))
                .resource("chat")
                .netns(&lab.server.ns)
                .connect()
        };
        let [mut alice, mut bob, mut carol, mut dave] = accounts.map(|(u, s)| chat(u, s));
        alice.befriend(&mut bob);
        carol.befriend(&mut dave);
        let devices = accounts
            .iter()
            .map(|(user, s)| {
                let dir = dir.path().join(user);
                let _public_key = generate_key(Path::new(BIN), &dir);
                Device {
                    jid: servers[*s].jid(user),
                    server: *s,
                    dir,
                    daemon: None,
                }
            })
            .collect();
        let world = Federation {
            devices,
            coturn,
            servers,
            dns,
            _resolver: resolver,
            lab,
            _dir: dir,
        };
        for i in 0..world.devices.len() {
            world.write_config(i);
        }
        world
    }

    fn ns(&self, i: usize) -> &Netns {
        &self.lab.devices[i].host.ns
    }

    fn config(&self, i: usize) -> PathBuf {
        self.devices[i].dir.join("ipop.toml")
    }

    /// Device `i`'s config: its account, the social overlay, the group for alice's and bob's
    /// devices, and coturn for STUN and TURN.
    fn write_config(&self, i: usize) {
        let d = &self.devices[i];
        let server = &self.servers[d.server];
        let (username, turn_password) = self.coturn.credentials(&d.jid, Duration::from_secs(3600));
        let turn = self.coturn.addr();
        let group = if i < 2 {
            format!(
                "[[groups]]\nroom = \"{ROOM}\"\nsubnet = \"10.79.0.0/24\"\naddress = \"10.79.0.{}\"\ncreate = {}\n\n",
                i + 1,
                i == 0
            )
        } else {
            String::new()
        };
        let text = format!(
            "[device]\nlog_level = \"debug\"\ncontrol_socket = {sock:?}\nstate_dir = \"state\"\n\n\
             [interface]\nlisten_port = 51820\n\n\
             [xmpp]\njid = \"{jid}\"\npassword = \"{pw}\"\nserver = \"{c2s}\"\nca_file = {ca:?}\ndevice = \"dev\"\n\n\
             [social]\nsubnet = \"10.78.0.0/16\"\naddress = \"10.78.0.{n}\"\n\n{group}\
             [nat]\nstun = [\"{turn}\"]\n\n\
             [[nat.turn]]\nserver = \"{turn}\"\nusername = \"{username}\"\npassword = \"{turn_password}\"\n",
            sock = d.dir.join("ctl.sock"),
            jid = d.jid,
            pw = password(d.jid.split('@').next().unwrap_or_default()),
            c2s = server.c2s_addr(),
            ca = server.ca_cert_path(),
            n = i + 1,
        );
        let path = self.config(i);
        std::fs::write(&path, text)
            .and_then(|()| std::fs::set_permissions(&path, Permissions::from_mode(0o600)))
            .expect("config written");
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

    /// Device `j` as device `i` lists it in `overlay`, if it does.
    fn peer(&self, i: usize, overlay: &str, j: usize) -> Option<Value> {
        let status = self.status(i).ok()?;
        status["overlays"]
            .as_array()?
            .iter()
            .find(|o| o["name"].as_str() == Some(overlay))?["peers"]
            .as_array()?
            .iter()
            .find(|p| p["jid"].as_str() == Some(self.devices[j].jid.as_str()))
            .cloned()
    }

    /// The IPv4 address device `i` gives device `j` in `overlay`.
    fn addr_of(&self, i: usize, overlay: &str, j: usize) -> Option<IpAddr> {
        self.peer(i, overlay, j)?["addresses"]
            .as_array()?
            .iter()
            .filter_map(|a| a.as_str()?.parse::<ipnet::IpNet>().ok())
            .map(|n| n.addr())
            .find(IpAddr::is_ipv4)
    }

    /// Waits until device `i` pings device `j` in `overlay`; returns the path `i` reports.
    fn link(&self, i: usize, overlay: &str, j: usize) -> String {
        wait_until(
            LINK_TIMEOUT,
            &format!("device {i} to ping device {j} in {overlay}"),
            || {
                let ok = self
                    .addr_of(i, overlay, j)
                    .is_some_and(|to| self.ns(i).ping(to, 1).status.success());
                if ok {
                    Ok(())
                } else {
                    let show =
                        |k: usize| self.status(k).map(|s| s.to_string()).unwrap_or_else(|e| e);
                    Err(format!("device {i}: {}\ndevice {j}: {}", show(i), show(j)))
                }
            },
        );
        let peer = self.peer(i, overlay, j).unwrap_or(Value::Null);
        peer["path"].as_str().unwrap_or("none").to_owned()
    }

    /// `ipop group add ROOM JID` on device `i`, repeated until the room exists and takes it.
    fn add_member(&self, i: usize, jid: &str) {
        let config = self.config(i);
        wait_until(
            Duration::from_secs(20),
            &format!("{jid} to become a member of {ROOM}"),
            || {
                let out = self
                    .ns(i)
                    .command(BIN)
                    .args(["group", "add", ROOM, jid, "-c"])
                    .arg(&config)
                    .output()
                    .map_err(|e| e.to_string())?;
                if out.status.success() {
                    Ok(())
                } else {
                    Err(String::from_utf8_lossy(&out.stderr).into_owned())
                }
            },
        );
    }
}

#[test]
fn friends_and_a_group_across_two_servers_link_directly_and_through_the_relay() {
    let mut w = Federation::new("fed");
    for i in 0..w.devices.len() {
        w.start(i);
    }
    let bob = w.devices[1].jid.clone();
    w.add_member(0, &bob);

    assert_eq!(
        w.link(0, "social", 1),
        "direct",
        "alice@a.example's device to bob@b.example's, both behind full-cone NATs"
    );
    assert_eq!(w.link(1, "social", 0), "direct");
    assert_eq!(
        w.link(2, "social", 3),
        "relay",
        "carol@a.example's device to dave@b.example's, both behind symmetric NATs"
    );
    assert_eq!(w.link(3, "social", 2), "relay");
    w.link(0, ROOM, 1);
    w.link(1, ROOM, 0);

    // Each device is on its own server, and lists its friends with theirs.
    for (i, own, friend) in [(0, A, 1), (1, B, 0), (2, A, 3), (3, B, 2)] {
        let status = w.status(i).expect("status");
        let bound = status["xmpp"]["jid"].as_str().unwrap_or_default();
        assert!(
            bound.ends_with(&format!("@{own}/dev")),
            "device {i} bound {bound}"
        );
        assert!(
            w.peer(i, "social", friend).is_some(),
            "device {i}: {status}"
        );
    }
    // The servers found each other through DNS, as on the internet.
    let queries = w.dns.log();
    for srv in ["_xmpp-server._tcp.a.example", "_xmpp-server._tcp.b.example"] {
        assert!(
            queries.contains(&format!("query[SRV] {srv}")),
            "no SRV query for {srv}:\n{queries}"
        );
    }
    let room = w
        .peer(1, ROOM, 0)
        .expect("bob's device lists alice's in the group");
    assert_eq!(room["jid"].as_str(), Some("alice@a.example"), "{room}");

    // Carol's device names dave's under his domain, through its own DNS responder.
    let dave = w
        .addr_of(2, "social", 3)
        .expect("dave's address on carol's device");
    let own: IpAddr = "10.78.0.3".parse().expect("carol's address");
    let _resolver = NetnsResolver::new(w.ns(2), own);
    let name = "dev.dave.b.example.ipop";
    wait_until(
        Duration::from_secs(5),
        &format!("{name} on carol's device"),
        || {
            let out = w.ns(2).try_exec(&["getent", "ahostsv4", name]);
            let first = String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .next()
                .map(str::to_owned);
            match first {
                Some(a) if a == dave.to_string() => Ok(()),
                other => Err(format!("{other:?}, want {dave}")),
            }
        },
    );
}
