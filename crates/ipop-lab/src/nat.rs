//! A NAT lab: a fake IPv4 internet with a server on it, and devices behind NAT routers whose
//! behaviour (full cone, port-restricted cone, symmetric, UDP blocked) is built with nftables.
//!
//! ```text
//!   server ns: eth0 198.18.0.10, .11        device ns (Nat::None): eth0 198.18.0.(100+k)
//!        |                                        |
//!   ===== internet ns: bridge br0 for 198.18.0.0/15 (no address of its own) =====
//!        |                                        |
//!   router ns: wan 198.18.0.(100+k)          router ns: wan 198.18.0.(100+k)
//!              lan 192.168.r.1/24                       lan 192.168.r.1/24
//!        |                                        |
//!   device ns: eth0 192.168.r.2              switch ns: bridge br0 -- device nss .2, .3, ...
//! ```
//!
//! Each router's rules are the nftables table `ip ipop_lab` in its namespace. Endpoint-
//! independent mapping uses dynamic maps filled after source NAT: `@eim` (internal ip.port →
//! public ip.port), `@hp` (public ip.port → internal ip.port) and `@used` (public ports in use).
//! A full cone forwards inbound UDP through `@hp`; so does hairpinning, which then source-NATs
//! through `@eim`. Everything else from the internet is dropped unless conntrack knows it as a
//! reply, or is UDP to the router itself from an endpoint of the set `@stun` (empty unless the
//! router runs miniupnpd, whose STUN test needs it: [`crate::MiniUpnpd`]). `k` counts routers
//! and public devices in order, `r` counts routers (from 1).
//! A router's IPv4 forwarding is on and reverse-path filtering is loose; IPv6 is off in every
//! namespace of the lab.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4};
use std::process::Stdio;
use std::thread;

use crate::net::{Host, host_letter, ifname};
use crate::netns::Netns;

/// The server's address on the fake internet.
pub const SERVER_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 10);
/// The server's second address, for tests that tell mappings or filters by remote address (and
/// for a STUN server's alternate address).
pub const SERVER_ALT_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 11);
/// Prefix length of the fake internet, `198.18.0.0/15` (RFC 2544's benchmarking range).
pub const INTERNET_PREFIX_LEN: u8 = 15;

/// nftables table of a router.
const TABLE: &str = "ipop_lab";
/// The set of STUN server endpoints (`ipv4_addr . inet_service`) whose UDP the router's
/// `input` chain takes on the WAN side even when conntrack does not know it as an answer: empty
/// unless miniupnpd runs ([`stun_replies`]).
const STUN_SET: &str = "stun";
/// How long the `@eim`, `@hp` and `@used` entries live after their last packet: the kernel's
/// default timeout of an established UDP flow.
const MAPPING_TIMEOUT_SECS: u32 = 120;
/// Router interface names (each router has its own namespace, so the names can repeat).
const WAN: &str = "wan";
const LAN: &str = "lan";
/// A device's (and the server's) interface.
const ETH: &str = "eth0";
const BRIDGE: &str = "br0";

/// How a device reaches the internet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Nat {
    /// No router: the device sits on the internet with a public address.
    None,
    /// Endpoint-independent mapping and filtering: once an internal endpoint has sent a UDP
    /// packet, anyone on the internet can send to its public endpoint.
    FullCone,
    /// Endpoint-independent mapping (an internal endpoint keeps its first public port whatever
    /// the destination; the port is preserved when free) with address-and-port-dependent
    /// filtering: only endpoints it has sent to get through.
    PortRestrictedCone,
    /// Address-and-port-dependent mapping: a new random public port for every destination.
    Symmetric,
    /// A [`Nat::PortRestrictedCone`] that drops every UDP packet it would forward; TCP passes.
    /// [`Router::set_udp_blocked`] lifts (or restores) the block at runtime.
    UdpBlocked,
}

/// A place on the internet: a NAT router with its LAN of devices, or (with [`Nat::None`])
/// devices directly on the internet.
#[derive(Clone, Debug)]
pub struct Site {
    nat: Nat,
    devices: u8,
    hairpin: bool,
}

impl Site {
    /// One device, hairpinning off.
    #[must_use]
    pub fn new(nat: Nat) -> Site {
        Site {
            nat,
            devices: 1,
            hairpin: false,
        }
    }

    /// `n` devices (at least one); behind a router they share a LAN (a bridge in a switch
    /// namespace of its own).
    #[must_use]
    pub fn devices(mut self, n: u8) -> Site {
        self.devices = n;
        self
    }

    /// Whether a device reaches another device of the same LAN through the router's public
    /// address and the other's mapping (UDP), seeing it come from the sender's own mapping.
    /// Off by default, as at most home routers: such packets are dropped.
    #[must_use]
    pub fn hairpin(mut self, on: bool) -> Site {
        self.hairpin = on;
        self
    }
}

impl From<Nat> for Site {
    fn from(nat: Nat) -> Site {
        Site::new(nat)
    }
}

/// The server host on the internet, where tests run Prosody, coturn and the like.
#[derive(Debug)]
pub struct Server {
    pub ns: Netns,
    /// [`SERVER_IP`].
    pub ip: Ipv4Addr,
    /// [`SERVER_ALT_IP`], on the same interface.
    pub alt_ip: Ipv4Addr,
}

/// A device: an internet host ([`Nat::None`]) or a host on a router's LAN, with IPv4 only.
/// Its [`Host`] can become an ipop node (`ipop_lab::Node::new`).
#[derive(Debug)]
pub struct Device {
    /// `a`, `b`, ... in the order of sites and their devices.
    pub name: String,
    /// The namespace, interface `eth0` and IPv4 address (on the LAN, or public); `ipv6` is
    /// `::`, since IPv6 is off in the lab.
    pub host: Host,
    /// The index of its router in [`NatLab::routers`], `None` on the internet.
    pub router: Option<usize>,
    /// The address the internet sees: the router's public address, or the device's own.
    pub public_ip: Ipv4Addr,
}

/// A NAT router: a namespace with a WAN interface on the internet and a LAN interface, and its
/// nftables table.
#[derive(Debug)]
pub struct Router {
    ns: Netns,
    /// The LAN's bridge when the router serves several devices; dropped after `ns`.
    switch: Option<Netns>,
    nat: Nat,
    public_ip: Ipv4Addr,
    lan_ip: Ipv4Addr,
    hairpin: bool,
    udp_blocked: bool,
    /// How many times [`Router::rebind`] gave the router new public ports.
    rebinds: u16,
}

/// The public ports of a router after its `n`th rebinding (from 1): a range of its own, so that
/// no new mapping can reuse an old public port.
fn rebound_ports(n: u16) -> (u16, u16) {
    let first = 20_000 + (n.min(40) - 1) * 1_000;
    (first, first + 999)
}

impl Router {
    #[must_use]
    pub fn ns(&self) -> &Netns {
        &self.ns
    }

    /// The type it was built with.
    #[must_use]
    pub fn nat(&self) -> Nat {
        self.nat
    }

    /// Its WAN address, which every device behind it shares.
    #[must_use]
    pub fn public_ip(&self) -> Ipv4Addr {
        self.public_ip
    }

    /// Its address on the LAN (`192.168.r.1`), the devices' default gateway.
    #[must_use]
    pub fn lan_ip(&self) -> Ipv4Addr {
        self.lan_ip
    }

    #[must_use]
    pub fn hairpin(&self) -> bool {
        self.hairpin
    }

    /// Whether it drops every forwarded UDP packet now.
    #[must_use]
    pub fn udp_blocked(&self) -> bool {
        self.udp_blocked
    }

    /// Blocks or unblocks all forwarded UDP (whatever the NAT type); mappings are kept. An
    /// unblocked [`Nat::UdpBlocked`] router behaves as a [`Nat::PortRestrictedCone`].
    ///
    /// # Panics
    /// When nftables refuses the new rules.
    pub fn set_udp_blocked(&mut self, blocked: bool) {
        self.udp_blocked = blocked;
        self.apply();
    }

    /// Rebinds every mapping, as a NAT that reboots or a carrier NAT that reassigns ports does:
    /// from now on new mappings take public ports from a range no mapping used before, the
    /// endpoint-independent maps are emptied and the conntrack table flushed (`conntrack -F`),
    /// so the next packet of every flow gets a new public port. Returns the new port range.
    ///
    /// # Panics
    /// When nftables refuses the rules or `conntrack -F` fails.
    pub fn rebind(&mut self) -> (u16, u16) {
        self.rebinds += 1;
        self.apply();
        for map in ["eim", "hp", "used"] {
            let kind = if map == "used" { "set" } else { "map" };
            self.ns.exec(&["nft", "flush", kind, "ip", TABLE, map]);
        }
        let out = self.ns.try_exec(&["conntrack", "-F"]);
        assert!(
            out.status.success(),
            "conntrack -F in router {}: {}",
            self.ns.name(),
            String::from_utf8_lossy(&out.stderr)
        );
        rebound_ports(self.rebinds)
    }

    /// The router's connection-tracking entries (`/proc/net/nf_conntrack` in its namespace, one
    /// line per entry): its NAT mappings, for debugging.
    ///
    /// # Errors
    /// When the table cannot be read (a kernel without `CONFIG_NF_CONNTRACK_PROCFS`).
    pub fn conntrack(&self) -> std::io::Result<Vec<String>> {
        let text = self
            .ns
            .run_in(|| std::fs::read_to_string("/proc/thread-self/net/nf_conntrack"))?;
        Ok(text.lines().map(str::to_owned).collect())
    }

    /// `nft list table ip ipop_lab` in the router: its rules with their counters and the
    /// elements of its mapping maps, for debugging (or nft's error message).
    #[must_use]
    pub fn ruleset(&self) -> String {
        let out = self.ns.try_exec(&["nft", "list", "table", "ip", TABLE]);
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    fn lan_cidr(&self) -> String {
        let [a, b, c, _] = self.lan_ip.octets();
        format!("{a}.{b}.{c}.0/24")
    }

    /// Loads the router's table. The table, maps and chains are declared (a no-op when they
    /// exist), the chains flushed and refilled in one transaction, so map entries survive.
    fn apply(&self) {
        let script = self.ruleset_script();
        let mut child = self
            .ns
            .command("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run nft in {}: {e}", self.ns.name()));
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(script.as_bytes())
                .unwrap_or_else(|e| panic!("cannot write rules to nft: {e}"));
        }
        let out = child
            .wait_with_output()
            .unwrap_or_else(|e| panic!("cannot wait for nft: {e}"));
        assert!(
            out.status.success(),
            "nft refused the rules of router {} ({}):\n{}\nrules:\n{script}",
            self.ns.name(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn ruleset_script(&self) -> String {
        let public = self.public_ip;
        let lan = self.lan_cidr();
        let t = MAPPING_TIMEOUT_SECS;
        let endpoint_independent = self.nat != Nat::Symmetric;
        let mut pre = String::new();
        let mut post = String::new();
        // Writing to a String cannot fail.
        if self.nat == Nat::FullCone {
            // Anyone may send to a public endpoint that has a mapping.
            let _ = writeln!(
                pre,
                "iifname {WAN} ip daddr {public} meta l4proto udp dnat ip to ip daddr . udp dport map @hp"
            );
        }
        if self.hairpin {
            let _ = writeln!(
                pre,
                "iifname {LAN} ip daddr {public} meta l4proto udp dnat ip to ip daddr . udp dport map @hp"
            );
            // Looped-back packets leave through the LAN again, from the sender's own mapping.
            let hairpinned = format!("oifname {LAN} ip saddr {lan} ct status dnat");
            if endpoint_independent {
                let _ = writeln!(
                    post,
                    "{hairpinned} meta l4proto udp snat ip to ip saddr . udp sport map @eim"
                );
                let _ = writeln!(
                    post,
                    "{hairpinned} meta l4proto udp udp sport @used snat ip to {public} random"
                );
                let _ = writeln!(post, "{hairpinned} snat ip to {public}");
            } else {
                let _ = writeln!(post, "{hairpinned} snat ip to {public} fully-random");
            }
        }
        let outbound = format!("oifname {WAN} ip saddr {lan}");
        // After a rebinding, only mappings in the new range are recorded: the flows of the old
        // mappings, until conntrack forgets them, must not put them back in the maps.
        let (ports, recorded) = if self.rebinds == 0 {
            (String::new(), String::new())
        } else {
            let (first, last) = rebound_ports(self.rebinds);
            (
                format!(" to :{first}-{last}"),
                format!(" udp sport {first}-{last}"),
            )
        };
        if endpoint_independent {
            // Reuse the public endpoint an internal endpoint got first; a source port that is
            // another endpoint's public port already is not preserved.
            let _ = writeln!(
                post,
                "{outbound} meta l4proto udp snat ip to ip saddr . udp sport map @eim"
            );
            let _ = writeln!(
                post,
                "{outbound} meta l4proto udp udp sport @used masquerade{ports} random"
            );
            if self.rebinds > 0 {
                let _ = writeln!(post, "{outbound} meta l4proto udp masquerade{ports}");
            }
            let _ = writeln!(post, "{outbound} masquerade");
        } else {
            if self.rebinds > 0 {
                let _ = writeln!(
                    post,
                    "{outbound} meta l4proto udp masquerade{ports} fully-random"
                );
            }
            let _ = writeln!(post, "{outbound} masquerade fully-random");
        }
        let block = if self.udp_blocked {
            "meta l4proto udp counter drop".to_owned()
        } else {
            String::new()
        };
        // Without hairpinning, UDP from the LAN to the public address is silently dropped.
        let hairpin_off = if self.hairpin {
            String::new()
        } else {
            format!("iifname {LAN} ip daddr {public} meta l4proto udp counter drop")
        };
        format!(
            "table ip {TABLE} {{
  map eim {{ type ipv4_addr . inet_service : ipv4_addr . inet_service; flags dynamic,timeout; }}
  map hp {{ type ipv4_addr . inet_service : ipv4_addr . inet_service; flags dynamic,timeout; }}
  set used {{ type inet_service; flags dynamic,timeout; }}
  set {STUN_SET} {{ type ipv4_addr . inet_service; }}
  chain prerouting {{ type nat hook prerouting priority dstnat; policy accept; }}
  chain postrouting {{ type nat hook postrouting priority srcnat; policy accept; }}
  chain record {{ type filter hook postrouting priority 300; policy accept; }}
  chain forward {{ type filter hook forward priority filter; policy drop; }}
  chain input {{ type filter hook input priority filter; policy accept; }}
}}
flush chain ip {TABLE} prerouting
flush chain ip {TABLE} postrouting
flush chain ip {TABLE} record
flush chain ip {TABLE} forward
flush chain ip {TABLE} input
table ip {TABLE} {{
  chain prerouting {{
{pre}  }}
  chain postrouting {{
{post}  }}
  chain record {{
    ip saddr {public} ct direction original ct status snat meta l4proto udp{recorded} update @eim {{ ct original ip saddr . ct original proto-src timeout {t}s : ip saddr . udp sport }}
    ip saddr {public} ct direction original ct status snat meta l4proto udp{recorded} update @hp {{ ip saddr . udp sport timeout {t}s : ct original ip saddr . ct original proto-src }}
    ip saddr {public} ct direction original ct status snat meta l4proto udp{recorded} update @used {{ udp sport timeout {t}s }}
  }}
  chain forward {{
    {block}
    ct state established,related accept
    iifname {LAN} oifname {WAN} accept
    ct status dnat accept
    counter
  }}
  chain input {{
    iifname {WAN} ct state established,related accept
    iifname {WAN} icmp type echo-request accept
    iifname {WAN} ip saddr . udp sport @{STUN_SET} accept
    iifname {WAN} counter drop
    {hairpin_off}
  }}
}}
"
        )
    }
}

/// A fake internet (a bridge in a namespace of its own), a [`Server`] on it and devices at
/// [`Site`]s: behind NAT routers or directly on it. Everything is deleted on drop; when the
/// thread is panicking, each router's rules and conntrack entries are printed first.
///
/// Addresses: the server has [`SERVER_IP`] and [`SERVER_ALT_IP`]; routers' WAN sides and public
/// devices take `198.18.0.101`, `.102`, ... in order; router `r` (from 1) serves
/// `192.168.r.0/24` as `.1`, its devices are `.2`, `.3`, ... with it as default route. Public
/// devices and routers reach only the internet's `/15`: there is no default route there.
#[derive(Debug)]
pub struct NatLab {
    /// Dropped first.
    pub devices: Vec<Device>,
    pub routers: Vec<Router>,
    pub server: Server,
    /// Holds the internet's bridge `br0`.
    pub internet: Netns,
}

impl NatLab {
    /// A lab with one device per entry of `nats`, each behind its own router (or on the
    /// internet for [`Nat::None`]), hairpinning off. Namespaces are tagged with `tag`.
    ///
    /// # Panics
    /// When the lab cannot be built (not root, `nft` missing, ...).
    #[must_use]
    pub fn new(tag: &str, nats: &[Nat]) -> NatLab {
        nats.iter()
            .fold(NatLab::builder(tag), |builder, nat| builder.site(*nat))
            .build()
    }

    #[must_use]
    pub fn builder(tag: &str) -> NatLabBuilder {
        NatLabBuilder {
            tag: tag.to_owned(),
            sites: Vec::new(),
        }
    }

    /// The device named `name`.
    ///
    /// # Panics
    /// When there is none (or it was taken out of [`NatLab::devices`]).
    #[must_use]
    pub fn device(&self, name: &str) -> &Device {
        self.devices
            .iter()
            .find(|d| d.name == name)
            .unwrap_or_else(|| panic!("the lab has no device {name}"))
    }

    /// The router that device `name` is behind.
    ///
    /// # Panics
    /// When there is no such device or it is on the internet.
    #[must_use]
    pub fn router_of(&self, name: &str) -> &Router {
        let index = self
            .device(name)
            .router
            .unwrap_or_else(|| panic!("device {name} is on the internet, behind no router"));
        &self.routers[index]
    }

    /// Like [`NatLab::router_of`], to change the router ([`Router::set_udp_blocked`]).
    ///
    /// # Panics
    /// When there is no such device or it is on the internet.
    pub fn router_of_mut(&mut self, name: &str) -> &mut Router {
        let index = self
            .device(name)
            .router
            .unwrap_or_else(|| panic!("device {name} is on the internet, behind no router"));
        &mut self.routers[index]
    }

    /// The names of every namespace of the lab (devices still in it included).
    #[must_use]
    pub fn netns_names(&self) -> Vec<String> {
        let mut names = vec![
            self.internet.name().to_owned(),
            self.server.ns.name().to_owned(),
        ];
        for router in &self.routers {
            names.push(router.ns.name().to_owned());
            names.extend(router.switch.iter().map(|s| s.name().to_owned()));
        }
        names.extend(self.devices.iter().map(|d| d.host.ns.name().to_owned()));
        names
    }
}

impl Drop for NatLab {
    fn drop(&mut self) {
        if !thread::panicking() {
            return;
        }
        for router in &self.routers {
            let conntrack = match router.conntrack() {
                Ok(lines) => lines.join("\n"),
                Err(e) => format!("(cannot read: {e})"),
            };
            eprintln!(
                "ipop-lab: NAT router {} ({:?}, public {}, UDP blocked: {}):\n{}conntrack:\n{conntrack}",
                router.ns.name(),
                router.nat,
                router.public_ip,
                router.udp_blocked,
                router.ruleset()
            );
        }
    }
}

/// Builds a [`NatLab`] site by site (see [`NatLab::builder`]).
#[derive(Debug)]
pub struct NatLabBuilder {
    tag: String,
    sites: Vec<Site>,
}

impl NatLabBuilder {
    /// Adds a site: a [`Nat`] (one device) or a [`Site`].
    #[must_use]
    pub fn site(mut self, site: impl Into<Site>) -> NatLabBuilder {
        self.sites.push(site.into());
        self
    }

    /// Creates the namespaces, links, addresses, routes and rules.
    ///
    /// # Panics
    /// When a site is invalid (no devices, hairpinning without a router, too many sites) or
    /// the lab cannot be set up.
    #[must_use]
    pub fn build(self) -> NatLab {
        let tag = &self.tag;
        let internet = new_ns(&format!("{tag}net"));
        add_bridge(&internet);
        let server_ns = new_ns(&format!("{tag}srv"));
        attach(&internet, "srv", &server_ns, ETH);
        for ip in [SERVER_IP, SERVER_ALT_IP] {
            server_ns.add_address(ETH, &format!("{ip}/{INTERNET_PREFIX_LEN}"));
        }
        let mut lab = NatLab {
            devices: Vec::new(),
            routers: Vec::new(),
            server: Server {
                ns: server_ns,
                ip: SERVER_IP,
                alt_ip: SERVER_ALT_IP,
            },
            internet,
        };
        // Routers' WAN sides and public devices, in order: 198.18.0.101, .102, ...
        let mut public_ips = (101..=254).map(|i| Ipv4Addr::new(198, 18, 0, i));
        let mut next_public = || {
            public_ips
                .next()
                .expect("at most 154 routers and public devices")
        };
        for site in &self.sites {
            assert!(site.devices >= 1, "a site needs at least one device");
            if site.nat == Nat::None {
                assert!(!site.hairpin, "hairpinning needs a router");
                for _ in 0..site.devices {
                    let (name, ns) = new_device_ns(tag, lab.devices.len());
                    let public_ip = next_public();
                    attach(&lab.internet, &format!("d{name}"), &ns, ETH);
                    ns.add_address(ETH, &format!("{public_ip}/{INTERNET_PREFIX_LEN}"));
                    lab.devices
                        .push(device(name, ns, public_ip, None, public_ip));
                }
            } else {
                let public_ip = next_public();
                lab.add_router(tag, site, public_ip);
            }
        }
        lab
    }
}

impl NatLab {
    /// Adds a router for `site` with its LAN and devices.
    fn add_router(&mut self, tag: &str, site: &Site, public_ip: Ipv4Addr) {
        let index = self.routers.len();
        let r = u8::try_from(index + 1)
            .ok()
            .filter(|r| *r < 255)
            .expect("at most 254 routers");
        assert!(site.devices <= 253, "at most 253 devices on a LAN");
        let lan_ip = Ipv4Addr::new(192, 168, r, 1);
        let ns = new_ns(&format!("{tag}r{r}"));
        set_sysctls(
            &ns,
            &[
                ("net/ipv4/ip_forward", "1"),
                ("net/ipv4/conf/all/rp_filter", "2"),
                ("net/ipv4/conf/default/rp_filter", "2"),
                ("net/ipv4/conf/all/send_redirects", "0"),
                ("net/ipv4/conf/default/send_redirects", "0"),
            ],
        );
        attach(&self.internet, &format!("r{r}"), &ns, WAN);
        ns.add_address(WAN, &format!("{public_ip}/{INTERNET_PREFIX_LEN}"));
        let hosts: Vec<(String, Netns)> = (0..usize::from(site.devices))
            .map(|i| new_device_ns(tag, self.devices.len() + i))
            .collect();
        let switch = if let [(_, dev)] = &hosts[..] {
            link(&ns, LAN, dev, ETH);
            None
        } else {
            let switch = new_ns(&format!("{tag}s{r}"));
            add_bridge(&switch);
            attach(&switch, "rt", &ns, LAN);
            for (name, dev) in &hosts {
                attach(&switch, name, dev, ETH);
            }
            Some(switch)
        };
        ns.add_address(LAN, &format!("{lan_ip}/24"));
        let router = Router {
            ns,
            switch,
            nat: site.nat,
            public_ip,
            lan_ip,
            hairpin: site.hairpin,
            udp_blocked: site.nat == Nat::UdpBlocked,
            rebinds: 0,
        };
        router.apply();
        self.routers.push(router);
        for ((name, dev), octet) in hosts.into_iter().zip(2u8..) {
            let ip = Ipv4Addr::new(192, 168, r, octet);
            dev.add_address(ETH, &format!("{ip}/24"));
            dev.ip(&["route", "add", "default", "via", &lan_ip.to_string()]);
            self.devices
                .push(device(name, dev, ip, Some(index), public_ip));
        }
    }
}

/// Lets UDP from the STUN server `endpoints` in through the WAN side of the router whose
/// namespace is `router_ns` (`on`), or stops it again, by adding them to (removing them from)
/// its set `stun`; the rest of its rules are left alone.
///
/// An RFC 5780 test (miniupnpd's at start: [`crate::MiniUpnpd`]) asks the server to answer from
/// its other address and port. Those answers come from endpoints the router never sent to, so
/// conntrack does not take them for replies and the `input` chain would drop them, and the test
/// would conclude that the router sits behind a restrictive NAT. Only the router's own sockets
/// see them: forwarded traffic does not pass `input`.
///
/// # Errors
/// nft's message when it fails (say, the namespace is gone).
pub(crate) fn stun_replies(
    router_ns: &str,
    endpoints: &[SocketAddrV4],
    on: bool,
) -> Result<(), String> {
    let elements: Vec<String> = endpoints
        .iter()
        .map(|e| format!("{} . {}", e.ip(), e.port()))
        .collect();
    let verb = if on { "add" } else { "delete" };
    let out = std::process::Command::new("ip")
        .args([
            "netns", "exec", router_ns, "nft", verb, "element", "ip", TABLE, STUN_SET,
        ])
        .arg(format!("{{ {} }}", elements.join(", ")))
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run nft in {router_ns}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "nft {verb} element {TABLE} {STUN_SET} in {router_ns} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The name (`a`, `b`, ...) and namespace of the device with this index (from 0) in the lab.
fn new_device_ns(tag: &str, index: usize) -> (String, Netns) {
    let name = host_letter(
        u8::try_from(index + 1)
            .ok()
            .filter(|n| *n < 255)
            .expect("at most 254 devices"),
    );
    let ns = new_ns(&format!("{tag}{name}"));
    (name, ns)
}

fn device(
    name: String,
    ns: Netns,
    ipv4: Ipv4Addr,
    router: Option<usize>,
    public_ip: Ipv4Addr,
) -> Device {
    Device {
        name,
        host: Host {
            ns,
            ifname: ETH.to_owned(),
            ipv4,
            ipv6: Ipv6Addr::UNSPECIFIED,
        },
        router,
        public_ip,
    }
}

/// A namespace with IPv6 off (the lab is IPv4 only; no router solicitations or DAD either).
fn new_ns(tag: &str) -> Netns {
    let ns = Netns::new(tag);
    set_sysctls(
        &ns,
        &[
            ("net/ipv6/conf/all/disable_ipv6", "1"),
            ("net/ipv6/conf/default/disable_ipv6", "1"),
        ],
    );
    ns
}

/// Writes `/proc/sys/KEY` values from inside `ns` (network sysctls are per namespace).
fn set_sysctls(ns: &Netns, settings: &[(&str, &str)]) {
    let name = ns.name();
    ns.run_in(|| {
        for (key, value) in settings {
            std::fs::write(format!("/proc/sys/{key}"), value)
                .unwrap_or_else(|e| panic!("cannot set {key} = {value} in {name}: {e}"));
        }
    });
}

fn add_bridge(ns: &Netns) {
    ns.ip(&[
        "link",
        "add",
        BRIDGE,
        "type",
        "bridge",
        "stp_state",
        "0",
        "forward_delay",
        "0",
        "mcast_snooping",
        "0",
    ]);
    ns.ip(&["link", "set", "dev", BRIDGE, "up"]);
}

/// A veth pair named `in_a` in `a` and `in_b` in `b`, both up. Each end is created under a
/// unique name and renamed in its own namespace, so that names may repeat across namespaces.
fn link(a: &Netns, in_a: &str, b: &Netns, in_b: &str) {
    let (tmp_a, tmp_b) = (ifname(), ifname());
    a.ip(&[
        "link",
        "add",
        &tmp_a,
        "type",
        "veth",
        "peer",
        "name",
        &tmp_b,
        "netns",
        b.name(),
    ]);
    a.ip(&["link", "set", "dev", &tmp_a, "name", in_a]);
    b.ip(&["link", "set", "dev", &tmp_b, "name", in_b]);
    a.ip(&["link", "set", "dev", in_a, "up"]);
    b.ip(&["link", "set", "dev", in_b, "up"]);
}

/// Plugs `ns` into the bridge of `switch`: `ns` gets interface `ifname`, the switch port is
/// named `port`.
fn attach(switch: &Netns, port: &str, ns: &Netns, ifname: &str) {
    link(switch, port, ns, ifname);
    switch.ip(&["link", "set", "dev", port, "master", BRIDGE]);
}
