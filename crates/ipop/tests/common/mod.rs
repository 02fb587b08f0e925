//! What the end-to-end tests with a real XMPP server share: a LAN with Prosody or ejabberd on
//! one of its hosts, XMPP users, device configs, and reading addresses from `ipop status` to
//! ping them.

// Each test binary includes this module and uses a part of it.
#![allow(dead_code)]

use ipop_lab::{Lab, Node, ServerKind, XmppServer, XmppUser, wait_until};
use serde_json::Value;
use std::net::IpAddr;
use std::process::Output;
use std::time::Duration;

pub const BIN: &str = env!("CARGO_BIN_EXE_ipop");
pub const DOMAIN: &str = "example.org";

/// A LAN of `devices` ipop nodes plus one host that runs the XMPP server.
pub struct World {
    pub lab: Lab,
    pub server: Box<dyn XmppServer>,
}

impl World {
    /// A LAN with Prosody.
    pub fn new(tag: &str, devices: u8) -> World {
        World::on(ServerKind::Prosody, tag, devices)
    }

    /// A LAN with this XMPP server.
    pub fn on(kind: ServerKind, tag: &str, devices: u8) -> World {
        let lab = Lab::new(BIN, tag, devices + 1);
        let host = &lab.nodes[usize::from(devices)].host;
        let server = kind.start_in(&host.ns, &host.ipv4.to_string(), DOMAIN);
        World { lab, server }
    }

    /// Registers `name` and logs in as that user's chat client.
    pub fn user(&self, name: &str) -> XmppUser {
        self.server.register(name, &password(name));
        let server = self.server_ns();
        XmppUser::builder(&*self.server, name, &password(name))
            .resource("chat")
            .netns(server)
            .connect()
    }

    pub fn server_ns(&self) -> &ipop_lab::Netns {
        let last = self.lab.nodes.len() - 1;
        self.lab.nodes[last].ns()
    }

    /// Writes node `i`'s config: the XMPP account `user` as device `device`, and `overlays`
    /// (the `[social]` and `[[groups]]` sections).
    pub fn configure(&self, i: usize, user: &str, device: &str, overlays: &str) {
        configure(&self.lab.nodes[i], &*self.server, user, device, overlays);
    }

    pub fn node(&mut self, i: usize) -> &mut Node {
        &mut self.lab.nodes[i]
    }
}

/// Alice's laptop and Bob's phone, friends, with these `[social]` sections, both started, on
/// Prosody. The chat clients come back for tests that change the friendship later.
pub fn start_friends(
    tag: &str,
    alice_social: &str,
    bob_social: &str,
) -> (World, XmppUser, XmppUser) {
    start_friends_on(ServerKind::Prosody, tag, alice_social, bob_social)
}

/// [`start_friends`] on this XMPP server.
pub fn start_friends_on(
    kind: ServerKind,
    tag: &str,
    alice_social: &str,
    bob_social: &str,
) -> (World, XmppUser, XmppUser) {
    let mut w = World::on(kind, tag, 2);
    let mut alice = w.user("alice");
    let mut bob = w.user("bob");
    alice.befriend(&mut bob);
    w.configure(0, "alice", "laptop", alice_social);
    w.configure(1, "bob", "phone", bob_social);
    w.node(0).start();
    w.node(1).start();
    (w, alice, bob)
}

/// Writes `node`'s config: the XMPP account `user` on `server` as device `device`, and
/// `overlays` (the `[social]` and `[[groups]]` sections).
pub fn configure(node: &Node, server: &dyn XmppServer, user: &str, device: &str, overlays: &str) {
    let mut config = node.config(51820);
    config.addresses.clear();
    config.extra = format!(
        "[xmpp]\njid = \"{user}@{DOMAIN}\"\npassword = \"{pw}\"\nserver = \"{addr}\"\nca_file = {ca:?}\ndevice = \"{device}\"\n\n{overlays}",
        pw = password(user),
        addr = server.c2s_addr(),
        ca = server.ca_cert_path(),
    );
    node.write_config(&config);
}

pub fn password(user: &str) -> String {
    format!("pw-{user}-secret")
}

/// A `[social]` section: this device is `cidr`'s address, and numbers its friends' devices
/// in `cidr`'s subnet.
pub fn social(cidr: &str) -> String {
    let net: ipnet::Ipv4Net = cidr.parse().expect("test prefix");
    format!(
        "[social]\nsubnet = \"{}\"\naddress = \"{}\"\n",
        net.trunc(),
        net.addr()
    )
}

/// A `[[groups]]` section with this device at `cidr`'s address in `cidr`'s subnet.
pub fn group(room: &str, cidr: &str, create: bool) -> String {
    let net: ipnet::Ipv4Net = cidr.parse().expect("test prefix");
    format!(
        "[[groups]]\nroom = \"{room}\"\nsubnet = \"{}\"\naddress = \"{}\"\ncreate = {create}\n",
        net.trunc(),
        net.addr()
    )
}

/// The IPv4 address that `node` gives the device of `jid` in the social overlay, if linked.
pub fn social_addr(node: &Node, jid: &str) -> Option<IpAddr> {
    let status = node.status().ok()?;
    status["overlays"]
        .as_array()?
        .iter()
        .filter(|o| o["kind"] == "social")
        .flat_map(|o| o["peers"].as_array().into_iter().flatten())
        .filter(|p| p["jid"].as_str() == Some(jid))
        .flat_map(|p| p["addresses"].as_array().into_iter().flatten())
        .filter_map(|a| a.as_str()?.parse::<ipnet::IpNet>().ok())
        .map(|n| n.addr())
        .find(IpAddr::is_ipv4)
}

/// Whether `node` reaches the device of `jid` in the social overlay.
pub fn social_ping(node: &Node, jid: &str) -> bool {
    social_addr(node, jid).is_some_and(|a| node.ping(a, 1).status.success())
}

pub fn wait_social_ping(node: &Node, jid: &str, timeout: Duration, what: &str) {
    wait_until(timeout, what, || {
        if social_ping(node, jid) {
            Ok(())
        } else {
            Err("no reply".to_owned())
        }
    });
}

/// The peer with this JID in any overlay of a status, if listed.
pub fn peer_by_jid<'a>(status: &'a Value, jid: &str) -> Option<&'a Value> {
    status["overlays"]
        .as_array()?
        .iter()
        .flat_map(|o| o["peers"].as_array().into_iter().flatten())
        .find(|p| p["jid"].as_str() == Some(jid))
}

pub fn ping_ok(node: &Node, addr: &str) -> bool {
    let addr: IpAddr = addr.parse().expect("test address");
    node.ping(addr, 1).status.success()
}

pub fn wait_ping(node: &Node, addr: &str, timeout: Duration, what: &str) {
    wait_until(timeout, what, || {
        if ping_ok(node, addr) {
            Ok(())
        } else {
            Err("no reply".to_owned())
        }
    });
}

/// Waits until the daemon answers `ipop status` with its XMPP session online.
pub fn xmpp_online(node: &mut Node) {
    node.wait_status(Duration::from_secs(15), "the XMPP session online", |s| {
        s["xmpp"]["state"] == "online"
    });
}

/// Runs `ipop ARGS -c CONFIG` in the node's namespace, as its user would on that device.
pub fn ipop(node: &Node, args: &[&str]) -> Output {
    node.ns()
        .command(BIN)
        .args(args)
        .arg("-c")
        .arg(node.config_path())
        .output()
        .expect("ipop runs")
}

/// Runs `ipop group add|remove ROOM JID` on the room owner's device, and checks that it worked.
pub fn group_member(owner: &Node, verb: &str, room: &str, jid: &str) {
    let out = ipop(owner, &["group", verb, room, jid]);
    assert!(
        out.status.success(),
        "ipop group {verb} {room} {jid} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs each scenario on both servers: for `name: "tag";`, the function `name(kind, tag)`
/// becomes the tests `name::on_prosody` and `name::on_ejabberd` (`cargo test on_ejabberd`
/// runs every scenario on ejabberd). The tag, at most 7 characters, names the namespaces.
#[allow(unused_macros)]
macro_rules! on_both_servers {
    ($($scenario:ident: $tag:literal;)*) => {$(
        mod $scenario {
            #[test]
            fn on_prosody() {
                super::$scenario(ipop_lab::ServerKind::Prosody, concat!($tag, "p"));
            }

            #[test]
            fn on_ejabberd() {
                super::$scenario(ipop_lab::ServerKind::Ejabberd, concat!($tag, "e"));
            }
        }
    )*};
}
#[allow(unused_imports)]
pub(crate) use on_both_servers;
