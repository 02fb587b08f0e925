//! The configuration file: one TOML file per device.
//!
//! Every error names the file, the line and the key, and says what was expected. Unknown keys
//! are errors, so that a typo never silently falls back to a default.

use anyhow::Context;
use ipnet::{IpNet, Ipv4Net};
use ipop_core::demand::DEFAULT_IDLE_TIMEOUT;
use ipop_core::osn::{DeviceId, IceServer, IceServerKind, IceTransport, OverlayId};
use ipop_core::{ExitChoice, LinkPolicy, OverlayConfig, PeerConfig, PublicKey};
use serde::{Deserialize, Deserializer};
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

/// Where `ipop` looks for its configuration when `-c` is not given.
pub const DEFAULT_PATH: &str = "/etc/ipop/ipop.toml";
/// The TUN device's MTU unless configured: 1500 minus the IPv6, UDP and WireGuard overhead.
pub const DEFAULT_MTU: u16 = 1420;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub device: Device,
    #[serde(default)]
    pub interface: Interface,
    /// The XMPP account: without it, only static peers are linked.
    pub xmpp: Option<Xmpp>,
    pub social: Option<Social>,
    #[serde(default)]
    pub groups: Vec<Group>,
    #[serde(default)]
    pub peers: Vec<Peer>,
    #[serde(default)]
    pub dns: Dns,
    /// STUN and TURN servers of the user's own, besides those the XMPP server offers.
    #[serde(default)]
    pub nat: Nat,
    /// Prometheus metrics over HTTP: without this section, none are served.
    pub metrics: Option<Metrics>,
    /// Forwarding for friends and fellow members that have no direct path between them.
    #[serde(default)]
    pub relay: Relay,
    /// The directory relative paths are resolved against: the config file's own.
    #[serde(skip)]
    pub dir: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Device {
    #[serde(default = "default_key_file")]
    pub private_key_file: PathBuf,
    /// Pinned keys and chosen addresses, kept across restarts (relative to the config file).
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    pub log_level: Option<String>,
    pub control_socket: Option<PathBuf>,
    /// The exit that internet traffic goes through: `"auto"` or `"JID/DEVICE"`.
    #[serde(default, deserialize_with = "exit_choice")]
    pub exit: ExitChoice,
    /// What internet traffic does while the exit is not up.
    #[serde(default, deserialize_with = "exit_fallback")]
    pub exit_fallback: ExitFallback,
    /// Whether names outside the overlays' suffix are resolved through the exit in use, when
    /// it answers DNS.
    #[serde(default = "yes")]
    pub exit_dns: bool,
}

impl Default for Device {
    fn default() -> Self {
        Device {
            private_key_file: default_key_file(),
            state_dir: default_state_dir(),
            log_level: None,
            control_socket: None,
            exit: ExitChoice::Off,
            exit_fallback: ExitFallback::Block,
            exit_dns: true,
        }
    }
}

/// What internet traffic does while the exit in use is not up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ExitFallback {
    /// It is dropped: nothing leaves outside the exit.
    #[default]
    Block,
    /// It goes the host's own way until the exit is back.
    Direct,
}

/// Reads an exit choice: `"auto"`, `"JID/DEVICE"`, or `"none"`.
pub fn parse_exit(s: &str) -> Result<ExitChoice, String> {
    match s {
        "none" | "" => Ok(ExitChoice::Off),
        "auto" => Ok(ExitChoice::Auto),
        _ => match s.split_once('/') {
            Some((user, device)) if user.contains('@') && !device.is_empty() => {
                Ok(ExitChoice::Device(DeviceId::new(user, device)))
            }
            _ => Err(format!(
                "{s:?} is not \"auto\", \"none\" or JID/DEVICE like \"bob@example.org/nas\""
            )),
        },
    }
}

fn exit_choice<'de, D: Deserializer<'de>>(d: D) -> Result<ExitChoice, D::Error> {
    parse_exit(&String::deserialize(d)?).map_err(serde::de::Error::custom)
}

fn exit_fallback<'de, D: Deserializer<'de>>(d: D) -> Result<ExitFallback, D::Error> {
    match String::deserialize(d)?.as_str() {
        "block" => Ok(ExitFallback::Block),
        "direct" => Ok(ExitFallback::Direct),
        other => Err(serde::de::Error::custom(format!(
            "{other:?} is not \"block\" or \"direct\""
        ))),
    }
}

fn default_key_file() -> PathBuf {
    PathBuf::from("ipop.key")
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/ipop")
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Interface {
    #[serde(default = "default_interface", deserialize_with = "interface_name")]
    pub name: String,
    #[serde(default, deserialize_with = "parsed_list")]
    pub addresses: Vec<IpNet>,
    #[serde(default = "default_mtu", deserialize_with = "mtu")]
    pub mtu: u16,
    #[serde(default)]
    pub listen_port: u16,
}

/// How ipop logs in to XMPP. Its `Debug` leaves the password out.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Xmpp {
    /// The account, a bare JID like `alice@example.org`.
    #[serde(deserialize_with = "bare_jid")]
    pub jid: String,
    /// The password inline, or read from a file, or printed by a command: exactly one, unless
    /// the device logs in with a client certificate.
    pub password: Option<String>,
    pub password_file: Option<PathBuf>,
    pub password_command: Option<String>,
    /// `host:port` of the server when DNS SRV records are absent.
    pub server: Option<String>,
    #[serde(default)]
    pub tls: Tls,
    /// An extra CA certificate (PEM) to trust for a private server, besides the system's.
    pub ca_file: Option<PathBuf>,
    /// A client certificate and its private key (PEM), to log in with SASL EXTERNAL instead
    /// of a password: both or neither.
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    /// This device's name, the XMPP resource. Default: the host name.
    pub device: Option<String>,
    /// The most bytes per second the session sends (0: no pacing), and the most at once.
    #[serde(default = "default_send_rate")]
    pub send_rate: u32,
    #[serde(default = "default_send_burst")]
    pub send_burst: u32,
}

impl fmt::Debug for Xmpp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Xmpp")
            .field("jid", &self.jid)
            .field("password", &self.password.as_ref().map(|_| REDACTED))
            .field("password_file", &self.password_file)
            .field("password_command", &self.password_command)
            .field("server", &self.server)
            .field("tls", &self.tls)
            .field("ca_file", &self.ca_file)
            .field("client_cert", &self.client_cert)
            .field("client_key", &self.client_key)
            .field("device", &self.device)
            .field("send_rate", &self.send_rate)
            .field("send_burst", &self.send_burst)
            .finish()
    }
}

/// What `Debug` prints in place of a password.
const REDACTED: &str = "<redacted>";

fn default_send_rate() -> u32 {
    ipop_xmpp::DEFAULT_SEND_RATE
}

fn default_send_burst() -> u32 {
    ipop_xmpp::DEFAULT_SEND_BURST
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tls {
    /// STARTTLS on the client port (5222).
    #[default]
    Starttls,
    /// TLS from the first byte (XEP-0368, port 5223).
    Direct,
}

/// The social overlay: this device, the user's other devices and the devices of friends.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Social {
    #[serde(default = "yes")]
    pub enabled: bool,
    /// This device's own numbering space: it gives each friend's device an address in it.
    #[serde(default = "default_social_subnet", deserialize_with = "parsed")]
    pub subnet: Ipv4Net,
    /// This device's own address in the subnet. Default: the subnet's first address.
    #[serde(default, deserialize_with = "parsed_some")]
    pub address: Option<Ipv4Addr>,
    /// Links to every device, on demand, or on demand from a number of devices.
    #[serde(default, deserialize_with = "link_policy")]
    pub links: LinkPolicy,
    /// How long an on-demand link stays up without data.
    #[serde(default = "default_idle_timeout", deserialize_with = "duration")]
    pub idle_timeout: Duration,
    /// Prefixes this device routes for its friends' devices (a subnet router).
    #[serde(default, deserialize_with = "prefixes")]
    pub advertise_routes: Vec<IpNet>,
    /// Take the prefixes friends' devices route.
    #[serde(default)]
    pub accept_routes: bool,
    /// Offer friends' devices to send their internet traffic through this one.
    #[serde(default)]
    pub exit: bool,
}

/// The social subnet unless configured: the one IPOP's SocialVPN used.
pub const DEFAULT_SOCIAL_SUBNET: &str = "172.31.0.0/16";

fn default_social_subnet() -> Ipv4Net {
    DEFAULT_SOCIAL_SUBNET.parse().unwrap_or_default()
}

/// The names of peers in DNS, answered on this device's overlay addresses.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dns {
    #[serde(default = "yes")]
    pub enabled: bool,
    /// The top-level name under which peers are named: `laptop.bob.example.org.ipop`.
    #[serde(default = "default_dns_suffix", deserialize_with = "dns_suffix")]
    pub suffix: String,
    /// The UDP port the responder listens on.
    #[serde(default = "default_dns_port")]
    pub port: u16,
}

impl Default for Dns {
    fn default() -> Self {
        Dns {
            enabled: true,
            suffix: default_dns_suffix(),
            port: default_dns_port(),
        }
    }
}

fn default_dns_suffix() -> String {
    "ipop".to_owned()
}

fn default_dns_port() -> u16 {
    53
}

fn dns_suffix<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let s = String::deserialize(d)?
        .trim_matches('.')
        .to_ascii_lowercase();
    let ok = !s.is_empty()
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if ok {
        Ok(s)
    } else {
        Err(serde::de::Error::custom(format!(
            "{s:?} is not a DNS suffix: expected labels of letters, digits and '-', like \"ipop\" or \"vpn.example\""
        )))
    }
}

/// NAT traversal: servers, and port mapping on the home router.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Nat {
    /// STUN servers, `host:port`.
    #[serde(default)]
    pub stun: Vec<String>,
    #[serde(default)]
    pub turn: Vec<Turn>,
    /// Ask the default gateway for a UDP port mapping (PCP, NAT-PMP, UPnP IGD).
    #[serde(default = "yes")]
    pub port_mapping: bool,
    /// The lifetime each mapping is asked for; it is renewed at half of it.
    #[serde(
        default = "default_port_mapping_lifetime",
        deserialize_with = "port_mapping_lifetime"
    )]
    pub port_mapping_lifetime: Duration,
}

impl Default for Nat {
    fn default() -> Nat {
        Nat {
            stun: Vec::new(),
            turn: Vec::new(),
            port_mapping: true,
            port_mapping_lifetime: default_port_mapping_lifetime(),
        }
    }
}

fn default_port_mapping_lifetime() -> Duration {
    crate::portmap::LIFETIME
}

/// A mapping's lifetime: from 20 s (renewed every 10 s) to a day (what PCP allows).
fn port_mapping_lifetime<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let lifetime = duration(d)?;
    if !(Duration::from_secs(20)..=Duration::from_secs(86_400)).contains(&lifetime) {
        return Err(serde::de::Error::custom(format!(
            "{lifetime:?} is not between 20s and 24h"
        )));
    }
    Ok(lifetime)
}

/// A TURN server with long-term credentials. Its `Debug` leaves the password out.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Turn {
    /// `host:port`.
    pub server: String,
    #[serde(default)]
    pub transport: TurnTransport,
    pub username: String,
    pub password: String,
}

impl fmt::Debug for Turn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Turn")
            .field("server", &self.server)
            .field("transport", &self.transport)
            .field("username", &self.username)
            .field("password", &REDACTED)
            .finish()
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TurnTransport {
    #[default]
    Udp,
    Tcp,
    Tls,
}

/// This device as a relay for its friends and fellow group members.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Relay {
    #[serde(default)]
    pub enabled: bool,
    /// The UDP port registrations come to; 0: the interface's listen port plus one.
    #[serde(default)]
    pub port: u16,
    /// Where the others reach that port, when it is not this device's own public address (a
    /// port forward on the router): `ip:port`.
    #[serde(default, deserialize_with = "optional_socket_address")]
    pub endpoint: Option<SocketAddr>,
    /// Pairs of devices forwarded for at once.
    #[serde(default = "default_relay_pairs")]
    pub max_pairs: usize,
    /// Mbit/s for one pair, both ways together.
    #[serde(default = "default_relay_pair_rate")]
    pub pair_rate: u64,
    /// Mbit/s for all pairs together.
    #[serde(default = "default_relay_total_rate")]
    pub total_rate: u64,
}

impl Default for Relay {
    fn default() -> Relay {
        Relay {
            enabled: false,
            port: 0,
            endpoint: None,
            max_pairs: default_relay_pairs(),
            pair_rate: default_relay_pair_rate(),
            total_rate: default_relay_total_rate(),
        }
    }
}

fn default_relay_pairs() -> usize {
    16
}

fn default_relay_pair_rate() -> u64 {
    100
}

fn default_relay_total_rate() -> u64 {
    400
}

fn optional_socket_address<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<SocketAddr>, D::Error> {
    socket_address(d).map(Some)
}

/// Where the daemon serves Prometheus metrics.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    /// The HTTP listener's IP address and port; the metrics are at `/metrics`.
    #[serde(deserialize_with = "socket_address")]
    pub listen: SocketAddr,
}

/// A group overlay: every member of one multi-user chat room.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Group {
    /// The room, e.g. `lab@conference.example.org`.
    #[serde(deserialize_with = "bare_jid")]
    pub room: String,
    /// The group's IPv4 subnet, the same on every member's device.
    #[serde(deserialize_with = "parsed")]
    pub subnet: Ipv4Net,
    /// This device's address in the subnet. Default: chosen automatically and kept.
    #[serde(default, deserialize_with = "parsed_some")]
    pub address: Option<Ipv4Addr>,
    /// Create the room (members-only, real JIDs visible) if it does not exist.
    #[serde(default)]
    pub create: bool,
    /// Links to every device, on demand, or on demand from a number of devices.
    #[serde(default, deserialize_with = "link_policy")]
    pub links: LinkPolicy,
    /// How long an on-demand link stays up without data.
    #[serde(default = "default_idle_timeout", deserialize_with = "duration")]
    pub idle_timeout: Duration,
    /// Prefixes this device routes for the group's devices (a subnet router).
    #[serde(default, deserialize_with = "prefixes")]
    pub advertise_routes: Vec<IpNet>,
    /// Take the prefixes the group's devices route.
    #[serde(default)]
    pub accept_routes: bool,
    /// Offer the group's devices to send their internet traffic through this one.
    #[serde(default)]
    pub exit: bool,
}

/// `routes`, and the default routes when the device is an exit.
fn with_exit(routes: &[IpNet], exit: bool) -> Vec<IpNet> {
    let mut all = routes.to_vec();
    if exit {
        all.push(IpNet::V4(ipnet::Ipv4Net::default()));
        all.push(IpNet::V6(ipnet::Ipv6Net::default()));
    }
    all
}

/// Reads a list of prefixes (`"192.168.50.0/24"`), each without host bits and none a default
/// route.
fn prefixes<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<IpNet>, D::Error> {
    let list = Vec::<String>::deserialize(d)?;
    let mut out = Vec::new();
    for s in list {
        let net: IpNet = s.parse().map_err(|_| {
            serde::de::Error::custom(format!("{s:?} is not a prefix like \"192.168.50.0/24\""))
        })?;
        if net.trunc() != net {
            return Err(serde::de::Error::custom(format!(
                "{s:?} has host bits set: did you mean \"{}\"?",
                net.trunc()
            )));
        }
        if net.prefix_len() == 0 {
            return Err(serde::de::Error::custom(format!(
                "{s:?} is a default route: routing all traffic is an exit node's job"
            )));
        }
        if out.len() >= 16 {
            return Err(serde::de::Error::custom("at most 16 prefixes"));
        }
        out.push(net);
    }
    Ok(out)
}

fn default_idle_timeout() -> Duration {
    DEFAULT_IDLE_TIMEOUT
}

fn link_policy<'de, D: Deserializer<'de>>(d: D) -> Result<LinkPolicy, D::Error> {
    let s = String::deserialize(d)?;
    [LinkPolicy::All, LinkPolicy::OnDemand, LinkPolicy::Auto]
        .into_iter()
        .find(|p| p.as_str() == s)
        .ok_or_else(|| {
            serde::de::Error::custom(format!(
                "{s:?} is not a link policy: expected \"all\", \"on-demand\" or \"auto\""
            ))
        })
}

/// Reads a duration written as numbers with units, like `"10m"`, `"90s"` or `"1h30m"`.
fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s).ok_or_else(|| {
        serde::de::Error::custom(format!(
            "{s:?} is not a duration: expected numbers with units s, m or h, like \"10m\", \"90s\" or \"1h30m\", of at least one second"
        ))
    })
}

fn parse_duration(s: &str) -> Option<Duration> {
    let mut total: u64 = 0;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit())?;
        let n: u64 = rest[..digits].parse().ok()?;
        let unit = match rest[digits..].chars().next()? {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            _ => return None,
        };
        total = total.checked_add(n.checked_mul(unit)?)?;
        rest = &rest[digits + 1..];
    }
    (total > 0).then_some(Duration::from_secs(total))
}

/// Whether `s` looks like `host:port` (a bracketed IPv6 address is a host too).
pub fn is_host_port(s: &str) -> bool {
    s.rsplit_once(':')
        .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
}

fn yes() -> bool {
    true
}

/// Whether `s` is a bare JID, `user@domain`.
pub fn is_bare_jid(s: &str) -> bool {
    matches!(s.split_once('@'), Some((local, domain))
        if !local.is_empty() && !domain.is_empty() && !domain.contains(['@', '/']) && !s.contains(char::is_whitespace))
}

fn bare_jid<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let s = String::deserialize(d)?;
    if is_bare_jid(&s) {
        Ok(s)
    } else {
        Err(serde::de::Error::custom(format!(
            "{s:?} is not a bare JID: expected user@domain, like \"alice@example.org\""
        )))
    }
}

impl Default for Interface {
    fn default() -> Self {
        Interface {
            name: default_interface(),
            addresses: Vec::new(),
            mtu: DEFAULT_MTU,
            listen_port: 0,
        }
    }
}

fn default_interface() -> String {
    "ipop0".to_owned()
}

fn default_mtu() -> u16 {
    DEFAULT_MTU
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Peer {
    pub name: Option<String>,
    #[serde(deserialize_with = "parsed")]
    pub public_key: PublicKey,
    pub endpoint: Option<SocketAddr>,
    #[serde(default, deserialize_with = "parsed_list")]
    pub addresses: Vec<IpNet>,
    pub keepalive: Option<u16>,
}

/// Reads a value through its `FromStr`, so the error says what the text should look like.
fn parsed<'de, D: Deserializer<'de>, T>(d: D) -> Result<T, D::Error>
where
    T: FromStr,
    T::Err: std::fmt::Display,
{
    let s = String::deserialize(d)?;
    s.parse()
        .map_err(|e| serde::de::Error::custom(format!("{s:?}: {e}")))
}

fn parsed_some<'de, D: Deserializer<'de>, T>(d: D) -> Result<Option<T>, D::Error>
where
    T: FromStr,
    T::Err: std::fmt::Display,
{
    parsed(d).map(Some)
}

fn parsed_list<'de, D: Deserializer<'de>, T>(d: D) -> Result<Vec<T>, D::Error>
where
    T: FromStr,
    T::Err: std::fmt::Display,
{
    Vec::<String>::deserialize(d)?
        .into_iter()
        .map(|s| {
            s.parse().map_err(|e| {
                serde::de::Error::custom(format!(
                    "{s:?}: {e} (expected an address with its prefix length, like \"10.77.0.1/24\")"
                ))
            })
        })
        .collect()
}

fn socket_address<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let s = String::deserialize(d)?;
    s.parse().map_err(|_| {
        serde::de::Error::custom(format!(
            "{s:?} is not an IP address and port: expected one like \"127.0.0.1:9469\" or \"[::1]:9469\""
        ))
    })
}

fn interface_name<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let s = String::deserialize(d)?;
    let ok = !s.is_empty()
        && s.len() < 16
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(s)
    } else {
        Err(serde::de::Error::custom(format!(
            "{s:?} is not an interface name: expected 1 to 15 letters, digits, '-', '_' or '.'"
        )))
    }
}

fn mtu<'de, D: Deserializer<'de>>(d: D) -> Result<u16, D::Error> {
    let v = u16::deserialize(d)?;
    if (1280..=9000).contains(&v) {
        Ok(v)
    } else {
        Err(serde::de::Error::custom(format!(
            "MTU {v} is out of range: expected 1280 (the IPv6 minimum) to 9000"
        )))
    }
}

impl Config {
    /// Reads and checks a config file.
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        let mut config =
            Self::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        config.dir = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        Ok(config)
    }

    /// Parses config text; errors carry the line, the key and what was expected.
    pub fn parse(text: &str) -> Result<Config, String> {
        let config: Config = toml::from_str(text).map_err(|e| describe(text, &e))?;
        config.check()?;
        Ok(config)
    }

    fn check(&self) -> Result<(), String> {
        if self.interface.addresses.is_empty() && self.overlays().is_empty() {
            return Err("no overlay: set [social], a [[groups]] entry, or [interface] addresses with [[peers]]".into());
        }
        self.check_subnets()?;
        if let Some(x) = &self.xmpp {
            let sources = [
                x.password.is_some(),
                x.password_file.is_some(),
                x.password_command.is_some(),
            ];
            match (&x.client_cert, &x.client_key) {
                (Some(_), Some(_)) => {
                    if sources.iter().any(|s| *s) {
                        return Err("[xmpp]: a device that logs in with client_cert needs no \
                             password; remove password, password_file or password_command"
                            .into());
                    }
                }
                (None, None) => {
                    if sources.iter().filter(|s| **s).count() != 1 {
                        return Err("[xmpp]: set exactly one of password, password_file and \
                             password_command (or client_cert and client_key)"
                            .into());
                    }
                }
                (Some(_), None) => {
                    return Err("[xmpp] client_cert: set client_key, its private key, too".into());
                }
                (None, Some(_)) => {
                    return Err("[xmpp] client_key: set client_cert, its certificate, too".into());
                }
            }
            if let Some(server) = &x.server
                && !is_host_port(server)
            {
                return Err(format!("[xmpp] server: {server:?} is not host:port"));
            }
        } else if self.social.as_ref().is_some_and(|s| s.enabled) || !self.groups.is_empty() {
            return Err("[social] and [[groups]] need an [xmpp] account".into());
        }
        for server in &self.nat.stun {
            if !is_host_port(server) {
                return Err(format!("[nat] stun: {server:?} is not host:port"));
            }
        }
        for turn in &self.nat.turn {
            if !is_host_port(&turn.server) {
                return Err(format!(
                    "[[nat.turn]] server: {:?} is not host:port",
                    turn.server
                ));
            }
        }
        for (i, peer) in self.peers.iter().enumerate() {
            if peer.addresses.is_empty() {
                return Err(format!(
                    "[[peers]] #{} ({}): addresses is empty: packets could neither go to nor come from this peer",
                    i + 1,
                    peer.name.as_deref().unwrap_or("unnamed")
                ));
            }
        }
        Ok(())
    }

    /// Every prefix this device routes for an overlay, each once: the default routes too when
    /// it is an exit.
    pub fn advertised_routes(&self) -> Vec<IpNet> {
        let mut all: Vec<IpNet> = Vec::new();
        for o in self.overlays() {
            for net in o.advertise {
                if !all.contains(&net) {
                    all.push(net);
                }
            }
        }
        all
    }

    /// The overlays of this device with their subnets, social first, as the engine takes them.
    pub fn overlays(&self) -> Vec<OverlayConfig> {
        let social = self
            .social
            .iter()
            .filter(|s| s.enabled)
            .map(|s| OverlayConfig {
                id: OverlayId::Social,
                subnet: s.subnet,
                address: s.address,
                links: s.links,
                idle_timeout: s.idle_timeout,
                advertise: with_exit(&s.advertise_routes, s.exit),
                accept_routes: s.accept_routes,
            });
        let groups = self.groups.iter().map(|g| OverlayConfig {
            id: OverlayId::Group(g.room.clone()),
            subnet: g.subnet,
            address: g.address,
            links: g.links,
            idle_timeout: g.idle_timeout,
            advertise: with_exit(&g.advertise_routes, g.exit),
            accept_routes: g.accept_routes,
        });
        social.chain(groups).collect()
    }

    /// Each overlay's subnet must hold its address and overlap no other subnet, and a room is
    /// named once.
    fn check_subnets(&self) -> Result<(), String> {
        let mut seen: Vec<(String, IpNet)> = self
            .interface
            .addresses
            .iter()
            .map(|a| ("[interface] addresses".to_owned(), a.trunc()))
            .collect();
        for (i, o) in self.overlays().into_iter().enumerate() {
            let name = match &o.id {
                OverlayId::Social => "[social]".to_owned(),
                OverlayId::Group(room) => format!("[[groups]] {room}"),
            };
            if let Some(a) = o.address
                && !ipop_core::address::is_host(o.subnet, a)
            {
                return Err(format!(
                    "{name}: address {a} is not a host address of subnet {}",
                    o.subnet
                ));
            }
            if self.overlays()[..i].iter().any(|p| p.id == o.id) {
                return Err(format!("{name} is configured twice"));
            }
            let net = IpNet::V4(o.subnet.trunc());
            if let Some((other, _)) = seen
                .iter()
                .find(|(_, n)| n.contains(&net.network()) || net.contains(&n.network()))
            {
                return Err(format!(
                    "{name}: subnet {net} overlaps {other}; every overlay needs its own subnet"
                ));
            }
            seen.push((name, net));
        }
        Ok(())
    }

    /// Where the daemon keeps what must survive a restart: pinned keys, chosen addresses.
    pub fn state_dir(&self) -> PathBuf {
        self.resolve(&self.device.state_dir)
    }

    /// The STUN and TURN servers of the `[nat]` section, resolved. A name that does not resolve
    /// is an error that names it.
    pub fn ice_servers(&self) -> anyhow::Result<Vec<IceServer>> {
        use std::net::ToSocketAddrs;
        let resolve = |server: &str| -> anyhow::Result<(String, SocketAddr)> {
            let address = server
                .to_socket_addrs()
                .with_context(|| format!("[nat]: cannot resolve {server}"))?
                .next()
                .with_context(|| format!("[nat]: {server} has no address"))?;
            let host = server.rsplit_once(':').map_or(server, |(h, _)| h);
            Ok((host.trim_matches(['[', ']']).to_owned(), address))
        };
        let mut out = Vec::new();
        for server in &self.nat.stun {
            let (host, address) = resolve(server)?;
            out.push(IceServer {
                kind: IceServerKind::Stun,
                host,
                address,
                transport: IceTransport::Udp,
                username: None,
                password: None,
            });
        }
        for t in &self.nat.turn {
            let (host, address) = resolve(&t.server)?;
            out.push(IceServer {
                kind: IceServerKind::Turn,
                host,
                address,
                transport: match t.transport {
                    TurnTransport::Udp => IceTransport::Udp,
                    TurnTransport::Tcp => IceTransport::Tcp,
                    TurnTransport::Tls => IceTransport::Tls,
                },
                username: Some(t.username.clone()),
                password: Some(t.password.clone()),
            });
        }
        Ok(out)
    }

    /// The XMPP password, from wherever the config says it is.
    pub fn xmpp_password(&self, x: &Xmpp) -> anyhow::Result<String> {
        if let Some(p) = &x.password {
            return Ok(p.clone());
        }
        if let Some(f) = &x.password_file {
            let path = self.resolve(f);
            check_private(&path, PASSWORD_FILE)?;
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("[xmpp] password_file: cannot read {}", path.display()))?;
            return Ok(text.trim_end_matches(['\n', '\r']).to_owned());
        }
        if let Some(cmd) = &x.password_command {
            let out = std::process::Command::new("sh")
                .arg("-c")
                .arg(cmd)
                .output()
                .with_context(|| format!("[xmpp] password_command: cannot run {cmd:?}"))?;
            if !out.status.success() {
                anyhow::bail!("[xmpp] password_command {cmd:?} failed ({})", out.status);
            }
            let text = String::from_utf8(out.stdout)
                .map_err(|_| anyhow::anyhow!("[xmpp] password_command {cmd:?} printed no text"))?;
            return Ok(text.trim_end_matches(['\n', '\r']).to_owned());
        }
        anyhow::bail!("[xmpp]: no password configured")
    }

    /// A path from the config, resolved against the config file's directory.
    pub fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.dir.join(p)
        }
    }

    pub fn key_path(&self) -> PathBuf {
        self.resolve(&self.device.private_key_file)
    }

    /// The files of secrets the config names, with what errors call them: the private key
    /// file, and the password file if there is one.
    pub fn secret_files(&self) -> Vec<(&'static str, PathBuf)> {
        let password_file = self.xmpp.as_ref().and_then(|x| x.password_file.as_ref());
        let client_key = self.xmpp.as_ref().and_then(|x| x.client_key.as_ref());
        std::iter::once((PRIVATE_KEY_FILE, self.key_path()))
            .chain(password_file.map(|f| (PASSWORD_FILE, self.resolve(f))))
            .chain(client_key.map(|f| (CLIENT_KEY_FILE, self.resolve(f))))
            .collect()
    }

    /// The secrets written in the config file itself: `[xmpp] password`, `[[nat.turn]]
    /// password`.
    pub fn inline_secrets(&self) -> Vec<&'static str> {
        let xmpp = self.xmpp.as_ref().is_some_and(|x| x.password.is_some());
        let turn = !self.nat.turn.is_empty();
        [(xmpp, "[xmpp] password"), (turn, "[[nat.turn]] password")]
            .into_iter()
            .filter_map(|(present, what)| present.then_some(what))
            .collect()
    }

    /// A warning when the config file at `path` holds secrets ([`Config::inline_secrets`]) and
    /// other users may read it. Not refused, as a file of secrets is: a config file is often
    /// world-readable by habit, and the secrets can move to files of their own.
    pub fn open_inline_secrets(&self, path: &Path) -> Option<String> {
        let secrets = self.inline_secrets();
        let mode = std::fs::metadata(path).ok()?.permissions().mode();
        let xmpp_inline = self.xmpp.as_ref().is_some_and(|x| x.password.is_some());
        (!secrets.is_empty() && mode & 0o077 != 0).then(|| {
            format!(
                "{} holds {} and is open to other users (mode {:04o}): run `chmod 600 {}`{}",
                path.display(),
                secrets.join(" and "),
                mode & 0o7777,
                shell_word(&path.to_string_lossy()),
                if xmpp_inline {
                    ", or move the XMPP password to `password_file`"
                } else {
                    ""
                }
            )
        })
    }

    /// Refuses to go on when a file of secrets is missing or open to other users (see
    /// [`check_private`]).
    pub fn check_secret_files(&self) -> anyhow::Result<()> {
        self.secret_files()
            .iter()
            .try_for_each(|(what, path)| check_private(path, what))
    }

    pub fn control_socket(&self) -> PathBuf {
        match &self.device.control_socket {
            Some(p) => self.resolve(p),
            None => PathBuf::from(format!("/run/ipop/{}.sock", self.interface.name)),
        }
    }

    pub fn peer_configs(&self) -> Vec<PeerConfig> {
        self.peers
            .iter()
            .map(|p| PeerConfig {
                name: p.name.clone(),
                public_key: p.public_key,
                endpoint: p.endpoint,
                addresses: p.addresses.clone(),
                mapped: Vec::new(),
                destinations: None,
                keepalive: Some(p.keepalive.unwrap_or(25)),
                roaming: true,
            })
            .collect()
    }
}

/// Turns a TOML error into "line L, key K: message", quoting the line.
fn describe(text: &str, e: &toml::de::Error) -> String {
    let message = e.message().trim_end();
    let Some(span) = e.span() else {
        return message.to_owned();
    };
    let start = span.start.min(text.len());
    let line_no = text[..start].matches('\n').count() + 1;
    let line = text.lines().nth(line_no - 1).unwrap_or("").trim();
    let key = line
        .split_once('=')
        .map(|(k, _)| k.trim())
        .filter(|k| !k.is_empty() && !k.starts_with('['));
    match key {
        Some(k) => format!("line {line_no}, key `{k}`: {message}\n  | {line}"),
        None => format!("line {line_no}: {message}\n  | {line}"),
    }
}

/// What errors call the file of `[device] private_key_file`.
const PRIVATE_KEY_FILE: &str = "private key file";
/// What errors call the file of `[xmpp] password_file`.
const PASSWORD_FILE: &str = "[xmpp] password_file";
/// What errors call the file of `[xmpp] client_key`.
const CLIENT_KEY_FILE: &str = "[xmpp] client_key";

/// Refuses a file of secrets (`what`, for the message) that users other than its owner may
/// read, write or execute, as ssh refuses such a private key: the error names the file and the
/// `chmod` that fixes it.
pub fn check_private(path: &Path, what: &str) -> anyhow::Result<()> {
    let mode = std::fs::metadata(path)
        .with_context(|| format!("cannot read {what} {}", path.display()))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        anyhow::bail!(
            "{what} {} is open to other users (mode {:04o}); only its owner may read it: run `chmod 600 {}`",
            path.display(),
            mode & 0o7777,
            shell_word(&path.to_string_lossy())
        );
    }
    Ok(())
}

/// `s` as one word for a POSIX shell: as it is when that is safe, else single-quoted.
fn shell_word(s: &str) -> String {
    let plain = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-+,:@%=".contains(&b));
    if plain {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// Reads the device's secret key file, which only its owner may read ([`check_private`]).
pub fn read_secret(path: &Path) -> anyhow::Result<boringtun::x25519::StaticSecret> {
    check_private(path, PRIVATE_KEY_FILE)?;
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read private key file {}", path.display()))?;
    ipop_core::key::parse_secret(&text)
        .map_err(|e| anyhow::anyhow!("private key file {}: {e}", path.display()))
}

/// Where `ipop init` writes the XMPP password, next to the config file.
pub const PASSWORD_FILE_NAME: &str = "xmpp.pass";

/// An XMPP account and its overlays, as `ipop init` writes them into a config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    /// A bare JID.
    pub jid: String,
    /// The device name (XMPP resource); `None`: the host name.
    pub device: Option<String>,
    /// `host:port`; `None`: DNS SRV records.
    pub server: Option<String>,
    /// Whether the social overlay is on.
    pub social: bool,
    pub group: Option<NewGroup>,
}

/// A group overlay for [`Account`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewGroup {
    /// The room's bare JID.
    pub room: String,
    pub subnet: Ipv4Net,
    /// Whether this device creates the room when it does not exist.
    pub create: bool,
}

/// A TOML basic string holding `s`, quoted and escaped.
fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

/// The commented config that `ipop init` writes for an XMPP account: the key in `ipop.key` and
/// the password in [`PASSWORD_FILE_NAME`], both next to it; the other settings commented out
/// with their defaults.
pub fn xmpp_template(account: &Account) -> String {
    let or_comment = |value: Option<&String>, example: &str| match value {
        Some(v) => toml_string(v),
        None => format!("{example:?}"),
    };
    let set = |on: bool| if on { "" } else { "# " };
    let server = or_comment(account.server.as_ref(), "xmpp.example.org:5222");
    let device = or_comment(account.device.as_ref(), "laptop");
    let social = if account.social {
        ""
    } else {
        "# Uncomment to link with them too.\n# "
    };
    let group = match &account.group {
        Some(g) => format!(
            "[[groups]]\nroom = {}\nsubnet = \"{}\"\n{}create = true\n",
            toml_string(&g.room),
            g.subnet,
            set(g.create),
        ),
        None => "# Uncomment and name the room to join one.\n\
                 # [[groups]]\n\
                 # room = \"lab@conference.example.org\"\n\
                 # subnet = \"10.79.0.0/24\"\n\
                 # create = true\n"
            .to_owned(),
    };
    format!(
        r#"# ipop configuration for {jid}. Reference: docs/config.md. Unknown keys are errors.

[device]
# This device's WireGuard private key (base64), relative to this file. Only its owner may read
# it (mode 0600): ipop refuses it otherwise.
private_key_file = "ipop.key"
# Log level: error, warn, info, debug or trace. The RUST_LOG environment variable overrides it.
log_level = "info"
# Keys pinned for the devices this one links with, and chosen addresses.
# state_dir = "/var/lib/ipop"

[xmpp]
# The account this device logs in with; its server needs what docs/servers.md describes.
jid = {jid_value}
# The password, in a file that only its owner may read (mode 0600), relative to this file. Or
# instead: password_command = "pass show xmpp".
password_file = "{PASSWORD_FILE_NAME}"
# host:port of the server, when the domain has no DNS SRV record.
{server_set}server = {server}
# "direct" for TLS from the first byte (usually port 5223); the default is STARTTLS.
# tls = "direct"
# A CA certificate (PEM) to trust for a private server, besides the system's.
# ca_file = "my-ca.pem"
# This device's name, the XMPP resource, and the first label of its DNS name. Default: the host
# name.
{device_set}device = {device}

# Your own devices and your friends' (contacts with a mutual subscription). This device numbers
# them in its subnet; they need not agree on one.
{social}[social]
# subnet = "{DEFAULT_SOCIAL_SUBNET}"
# Links to every device ("all"), only while traffic flows ("on-demand"), or to every device
# while fewer than 24 are online and on demand from there ("auto").
# links = "auto"

# Everyone in a members-only room (real JIDs visible): every member's device links with every
# other, with an address in the group's subnet, the same subnet on every member's device. With
# create, this device makes the room when it does not exist; its owner adds members with
# `ipop group add ROOM JID`.
{group}
# Prometheus metrics at http://ADDRESS:PORT/metrics (peers, links, traffic, drops). Off unless set.
# [metrics]
# listen = "127.0.0.1:9469"
"#,
        jid = account.jid,
        jid_value = toml_string(&account.jid),
        server_set = set(account.server.is_some()),
        device_set = set(account.device.is_some()),
    )
}

/// The commented config that `ipop init --static` writes. Addresses are derived from the
/// device's key so that two devices set up with the defaults do not collide.
pub fn template(public: &PublicKey) -> String {
    let k = public.0;
    let host4 = format!("10.77.{}.{}", k[0], k[1].clamp(1, 254));
    let host6 = format!(
        "fd77::{:x}:{:x}",
        u16::from_be_bytes([k[2], k[3]]),
        u16::from_be_bytes([k[4], k[5]]).max(1)
    );
    format!(
        r#"# ipop configuration. Reference: docs/config.md. Unknown keys are errors.

[device]
# This device's WireGuard private key (base64), relative to this file. Keep it secret (mode 0600).
private_key_file = "ipop.key"
# Log level: error, warn, info, debug or trace. The RUST_LOG environment variable overrides it.
log_level = "info"
# Where `ipop status` reaches the running daemon. Default: /run/ipop/<interface name>.sock
# control_socket = "/run/ipop/ipop0.sock"

[interface]
# The virtual network interface (TUN device) that ipop creates.
name = "ipop0"
# This device's overlay addresses, with the prefix routed into the overlay.
addresses = ["{host4}/16", "{host6}/64"]
# MTU of the interface: 1420 fits WireGuard over IPv6 in a 1500-byte path.
mtu = 1420
# UDP port for the tunnels (IPv4 and IPv6); 0 picks a free one.
listen_port = 51820

# Static peers, like wg-quick's: a public key, where to reach it, and its overlay addresses.
# [[peers]]
# name = "laptop"
# public_key = "BASE64 PUBLIC KEY (from `ipop key` on that device)"
# endpoint = "192.0.2.10:51820"
# addresses = ["10.77.0.2/32", "fd77::2/128"]
# keepalive = 25

# Prometheus metrics at http://ADDRESS:PORT/metrics (peers, links, traffic, drops). Off unless set.
# [metrics]
# listen = "127.0.0.1:9469"
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "[interface]\naddresses = [\"10.77.0.1/24\"]\n";

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::parse(MINIMAL).expect("valid");
        assert_eq!(c.interface.name, "ipop0");
        assert_eq!(c.interface.mtu, DEFAULT_MTU);
        assert_eq!(c.interface.listen_port, 0);
        assert_eq!(c.device.private_key_file, PathBuf::from("ipop.key"));
        assert_eq!(c.control_socket(), PathBuf::from("/run/ipop/ipop0.sock"));
    }

    #[test]
    fn template_is_a_valid_config() {
        let c = Config::parse(&template(&PublicKey([7; 32]))).expect("template parses");
        assert_eq!(c.interface.addresses.len(), 2);
        assert!(c.peers.is_empty());
    }

    #[test]
    fn xmpp_templates_are_valid_configs() {
        let group = NewGroup {
            room: "lab@conference.example.org".to_owned(),
            subnet: "10.79.0.0/24".parse().expect("subnet"),
            create: true,
        };
        let social_only = Account {
            jid: "alice@example.org".to_owned(),
            device: None,
            server: None,
            social: true,
            group: None,
        };
        let c = Config::parse(&xmpp_template(&social_only)).expect("social template parses");
        let x = c.xmpp.as_ref().expect("[xmpp]");
        assert_eq!(x.jid, "alice@example.org");
        assert_eq!(x.password_file, Some(PathBuf::from(PASSWORD_FILE_NAME)));
        assert_eq!((x.server.as_ref(), x.device.as_ref()), (None, None));
        assert_eq!(c.device.private_key_file, PathBuf::from("ipop.key"));
        assert_eq!(c.overlays().len(), 1);
        assert!(c.groups.is_empty() && c.peers.is_empty());

        let everything = Account {
            device: Some("desk \"2\"".to_owned()),
            server: Some("[2001:db8::1]:5222".to_owned()),
            group: Some(group.clone()),
            ..social_only.clone()
        };
        let c = Config::parse(&xmpp_template(&everything)).expect("full template parses");
        let x = c.xmpp.as_ref().expect("[xmpp]");
        assert_eq!(x.device.as_deref(), Some("desk \"2\""));
        assert_eq!(x.server.as_deref(), Some("[2001:db8::1]:5222"));
        assert_eq!(c.overlays().len(), 2);
        assert_eq!(c.groups[0].room, "lab@conference.example.org");
        assert!(c.groups[0].create);

        let group_only = Account {
            social: false,
            group: Some(NewGroup {
                create: false,
                ..group
            }),
            ..social_only
        };
        let text = xmpp_template(&group_only);
        let c = Config::parse(&text).expect("group template parses");
        assert!(c.social.is_none());
        assert_eq!(c.overlays().len(), 1);
        assert!(!c.groups[0].create);
        // The commented-out lines are settings that parse when uncommented.
        let uncommented = text
            .replace("# [social]", "[social]")
            .replace("# create = true", "create = true")
            .replace("# server =", "server =")
            .replace("# device =", "device =")
            .replace("# [metrics]\n# listen", "[metrics]\nlisten");
        let c = Config::parse(&uncommented).expect("uncommented template parses");
        assert!(c.social.is_some() && c.groups[0].create && c.metrics.is_some());
        assert!(
            c.xmpp
                .is_some_and(|x| x.server.is_some() && x.device.is_some())
        );
    }

    #[test]
    fn secret_files_open_to_others_are_refused_with_the_chmod() {
        let dir = ipop_lab::TestDir::new("config-private");
        let key = dir.path().join("ipop.key");
        let pass = dir.path().join("my pass");
        let chmod = |p: &Path, mode: u32| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod");
        };
        std::fs::write(&key, format!("{}\n", "A".repeat(43) + "=")).expect("write key");
        std::fs::write(&pass, "pw\n").expect("write password");
        let text = "[device]\nprivate_key_file = \"ipop.key\"\n\
             [xmpp]\njid = \"a@b\"\npassword_file = \"my pass\"\n[social]\n";
        let path = dir.path().join("ipop.toml");
        std::fs::write(&path, text).expect("write config");
        let c = Config::load(&path).expect("config");
        let x = c.xmpp.as_ref().expect("[xmpp]");

        chmod(&key, 0o600);
        chmod(&pass, 0o400);
        c.check_secret_files().expect("private files pass");
        assert_eq!(c.xmpp_password(x).expect("password"), "pw");
        read_secret(&key).expect("key");

        for mode in [0o640, 0o604, 0o620, 0o644, 0o700 | 0o001] {
            chmod(&key, mode);
            let e = c.check_secret_files().expect_err("open key").to_string();
            let want = format!(
                "private key file {} is open to other users (mode {mode:04o})",
                key.display()
            );
            assert!(e.contains(&want), "{e}");
            assert!(e.contains(&format!("`chmod 600 {}`", key.display())), "{e}");
            let Err(e) = read_secret(&key) else {
                panic!("a key file of mode {mode:04o} is read");
            };
            let e = e.to_string();
            assert!(e.contains(&want), "{e}");
        }
        chmod(&key, 0o600);
        chmod(&pass, 0o644);
        let e = c
            .check_secret_files()
            .expect_err("open password")
            .to_string();
        let quoted = format!("'{}'", pass.display());
        assert!(
            e.contains("[xmpp] password_file") && e.contains(&format!("`chmod 600 {quoted}`")),
            "{e}"
        );
        let e = c.xmpp_password(x).expect_err("open password").to_string();
        assert!(e.contains(&format!("chmod 600 {quoted}")), "{e}");

        std::fs::remove_file(&key).expect("remove key");
        let e = c.check_secret_files().expect_err("no key").to_string();
        assert!(e.contains("cannot read private key file"), "{e}");
        assert_eq!(shell_word("it's"), "'it'\\''s'");
    }

    #[test]
    fn a_client_certificate_comes_with_its_key_and_without_a_password() {
        let with = |xmpp: &str| Config::parse(&format!("[xmpp]\njid = \"a@b\"\n{xmpp}[social]\n"));
        let c = with("client_cert = \"a.crt\"\nclient_key = \"a.key\"\n").expect("cert login");
        let x = c.xmpp.as_ref().expect("[xmpp]");
        assert_eq!(x.client_cert.as_deref(), Some(Path::new("a.crt")));
        assert!(
            c.secret_files()
                .iter()
                .any(|(what, p)| *what == "[xmpp] client_key" && p.ends_with("a.key")),
            "the key is a file of secrets"
        );
        for (xmpp, want) in [
            (
                "client_cert = \"a.crt\"\n",
                "[xmpp] client_cert: set client_key",
            ),
            (
                "client_key = \"a.key\"\n",
                "[xmpp] client_key: set client_cert",
            ),
            (
                "client_cert = \"a.crt\"\nclient_key = \"a.key\"\npassword = \"p\"\n",
                "needs no password",
            ),
            (
                "",
                "set exactly one of password, password_file and password_command",
            ),
        ] {
            let e = with(xmpp).expect_err(xmpp).to_string();
            assert!(e.contains(want), "{xmpp:?}: {e}");
        }
    }

    #[test]
    fn a_config_file_with_passwords_open_to_others_is_warned_of() {
        let dir = ipop_lab::TestDir::new("config-inline");
        let path = dir.path().join("ipop.toml");
        let chmod = |mode: u32| {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        };
        let with_password = "[xmpp]\njid = \"a@b\"\npassword = \"pw\"\n[social]\n\
            [[nat.turn]]\nserver = \"turn.example.org:3478\"\nusername = \"u\"\npassword = \"t\"\n";
        std::fs::write(&path, with_password).expect("write config");
        let c = Config::load(&path).expect("config");
        chmod(0o644);
        let warning = c.open_inline_secrets(&path).expect("a warning");
        assert!(
            warning.contains("holds [xmpp] password and [[nat.turn]] password")
                && warning.contains("(mode 0644)")
                && warning.contains(&format!("`chmod 600 {}`", path.display())),
            "{warning}"
        );
        chmod(0o600);
        assert_eq!(c.open_inline_secrets(&path), None);

        std::fs::write(
            &path,
            "[xmpp]\njid = \"a@b\"\npassword_file = \"p\"\n[social]\n",
        )
        .expect("write config");
        chmod(0o644);
        let c = Config::load(&path).expect("config");
        assert!(c.inline_secrets().is_empty());
        assert_eq!(c.open_inline_secrets(&path), None);
    }

    #[test]
    fn debug_leaves_passwords_out() {
        let text = "[xmpp]\njid = \"a@b\"\npassword = \"xmpp-secret-1\"\n[social]\n\
            [[nat.turn]]\nserver = \"turn.example.org:3478\"\nusername = \"u\"\npassword = \"turn-secret-2\"\n";
        let c = Config::parse(text).expect("valid");
        for debug in [
            format!("{c:?}"),
            format!("{:?}", c.xmpp),
            format!("{:?}", c.nat.turn),
        ] {
            assert!(
                !debug.contains("xmpp-secret-1") && !debug.contains("turn-secret-2"),
                "{debug}"
            );
            assert!(debug.contains("<redacted>"), "{debug}");
        }
        assert!(format!("{:?}", c.xmpp).contains("a@b"));
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let e = Config::parse("[interface]\naddresses = [\"10.77.0.1/24\"]\nmtuu = 1400\n")
            .unwrap_err();
        assert!(e.contains("line 3"), "{e}");
        assert!(e.contains("mtuu"), "{e}");
    }

    #[test]
    fn bad_values_say_what_was_expected() {
        let e =
            Config::parse("[interface]\naddresses = [\"10.77.0.1/24\"]\nmtu = 100\n").unwrap_err();
        assert!(
            e.contains("line 3") && e.contains("key `mtu`") && e.contains("1280"),
            "{e}"
        );

        let e = Config::parse("[interface]\naddresses = [\"10.77.0.300/24\"]\n").unwrap_err();
        assert!(
            e.contains("line 2") && e.contains("addresses") && e.contains("10.77.0.300"),
            "{e}"
        );

        let bad_key =
            format!("{MINIMAL}[[peers]]\npublic_key = \"AAAA\"\naddresses = [\"10.77.0.2/32\"]\n");
        let e = Config::parse(&bad_key).unwrap_err();
        assert!(
            e.contains("line 4") && e.contains("public_key") && e.contains("32 bytes"),
            "{e}"
        );

        let e = Config::parse("[interface]\nname = \"a name with spaces\"\naddresses = []\n")
            .unwrap_err();
        assert!(e.contains("key `name`"), "{e}");
    }

    #[test]
    fn xmpp_social_and_groups() {
        let text = "[xmpp]\njid = \"alice@example.org\"\npassword = \"pw\"\nserver = \"10.0.0.254:5222\"\n\
            [social]\n\
            [[groups]]\nroom = \"lab@conference.example.org\"\nsubnet = \"10.79.0.0/24\"\naddress = \"10.79.0.1\"\ncreate = true\n";
        let c = Config::parse(text).expect("valid");
        assert_eq!(c.xmpp.as_ref().map(|x| x.tls), Some(Tls::Starttls));
        let overlays = c.overlays();
        assert_eq!(overlays.len(), 2);
        assert_eq!(overlays[0].subnet.to_string(), DEFAULT_SOCIAL_SUBNET);
        assert_eq!(overlays[0].address, None);
        assert_eq!(overlays[1].address, Some("10.79.0.1".parse().unwrap()));
        assert!(c.groups[0].create);
        assert_eq!(c.dns.suffix, "ipop");

        let e = Config::parse("[xmpp]\njid = \"alice\"\npassword = \"x\"\n[social]\n").unwrap_err();
        assert!(
            e.contains("line 2") && e.contains("key `jid`") && e.contains("bare JID"),
            "{e}"
        );
        let e = Config::parse("[xmpp]\njid = \"a@b\"\n[social]\n").unwrap_err();
        assert!(e.contains("exactly one of password"), "{e}");
        let e = Config::parse("[social]\n").unwrap_err();
        assert!(e.contains("need an [xmpp] account"), "{e}");
        let e = Config::parse("[xmpp]\njid = \"a@b\"\npassword = \"p\"\ntls = \"ssl\"\n[social]\n")
            .unwrap_err();
        assert!(
            e.contains("line 4") && e.contains("tls") && e.contains("starttls"),
            "{e}"
        );
    }

    #[test]
    fn overlay_subnets_are_checked() {
        let xmpp = "[xmpp]\njid = \"a@b\"\npassword = \"p\"\n";
        let group = |subnet: &str, address: &str| {
            format!("[[groups]]\nroom = \"g@c.b\"\nsubnet = \"{subnet}\"\n{address}")
        };
        let e =
            Config::parse(&format!("{xmpp}[social]\n{}", group("172.31.8.0/24", ""))).unwrap_err();
        assert!(e.contains("overlaps [social]"), "{e}");
        let e = Config::parse(&format!(
            "{xmpp}{}",
            group("10.9.0.0/24", "address = \"10.8.0.1\"\n")
        ))
        .unwrap_err();
        assert!(
            e.contains("10.8.0.1 is not a host address of subnet 10.9.0.0/24"),
            "{e}"
        );
        let e = Config::parse(&format!(
            "{xmpp}{}",
            group("10.9.0.0/24", "address = \"10.9.0.1/24\"\n")
        ))
        .unwrap_err();
        assert!(e.contains("line 7") && e.contains("key `address`"), "{e}");
        let e = Config::parse(&format!("{xmpp}[dns]\nsuffix = \"bad suffix\"\n[social]\n"))
            .unwrap_err();
        assert!(e.contains("key `suffix`"), "{e}");
        let twice = format!(
            "{xmpp}{}{}",
            group("10.9.0.0/24", ""),
            group("10.10.0.0/24", "")
        );
        let e = Config::parse(&twice).unwrap_err();
        assert!(e.contains("configured twice"), "{e}");
    }

    #[test]
    fn link_policies_and_idle_timeouts() {
        let xmpp = "[xmpp]\njid = \"a@b\"\npassword = \"p\"\n";
        let c = Config::parse(&format!(
            "{xmpp}[social]\n[[groups]]\nroom = \"g@c.b\"\nsubnet = \"10.9.0.0/24\"\n"
        ))
        .expect("valid");
        for o in c.overlays() {
            assert_eq!(o.links, LinkPolicy::Auto);
            assert_eq!(o.idle_timeout, Duration::from_secs(600));
        }
        let c = Config::parse(&format!(
            "{xmpp}[social]\nlinks = \"all\"\nidle_timeout = \"1h30m\"\n[[groups]]\nroom = \"g@c.b\"\nsubnet = \"10.9.0.0/24\"\nlinks = \"on-demand\"\nidle_timeout = \"45s\"\n"
        ))
        .expect("valid");
        let o = c.overlays();
        assert_eq!(
            (o[0].links, o[0].idle_timeout),
            (LinkPolicy::All, Duration::from_secs(5400))
        );
        assert_eq!(
            (o[1].links, o[1].idle_timeout),
            (LinkPolicy::OnDemand, Duration::from_secs(45))
        );

        let e = Config::parse(&format!("{xmpp}[social]\nlinks = \"some\"\n")).unwrap_err();
        assert!(
            e.contains("line 5") && e.contains("key `links`") && e.contains("on-demand"),
            "{e}"
        );
        for bad in [
            "10",
            "ten minutes",
            "10x",
            "0s",
            "m",
            "99999999999999999999h",
            "",
        ] {
            let e = Config::parse(&format!(
                "{xmpp}[[groups]]\nroom = \"g@c.b\"\nsubnet = \"10.9.0.0/24\"\nidle_timeout = \"{bad}\"\n"
            ))
            .unwrap_err();
            assert!(
                e.contains("line 7") && e.contains("key `idle_timeout`") && e.contains("10m"),
                "{bad}: {e}"
            );
        }
        let e = Config::parse(&format!("{xmpp}[social]\nidle_timeout = 600\n")).unwrap_err();
        assert!(
            e.contains("line 5") && e.contains("key `idle_timeout`"),
            "{e}"
        );
    }

    #[test]
    fn port_mapping_is_on_by_default_and_its_lifetime_is_bounded() {
        let c = Config::parse(MINIMAL).expect("valid");
        assert!(c.nat.port_mapping);
        assert_eq!(c.nat.port_mapping_lifetime, Duration::from_secs(7200));
        let c = Config::parse(&format!(
            "{MINIMAL}[nat]\nport_mapping = false\nport_mapping_lifetime = \"1m\"\n"
        ))
        .expect("valid");
        assert!(!c.nat.port_mapping);
        assert_eq!(c.nat.port_mapping_lifetime, Duration::from_secs(60));
        for bad in ["10s", "25h"] {
            let e = Config::parse(&format!(
                "{MINIMAL}[nat]\nport_mapping_lifetime = \"{bad}\"\n"
            ))
            .unwrap_err();
            assert!(
                e.contains("line 4")
                    && e.contains("key `port_mapping_lifetime`")
                    && e.contains("between 20s and 24h"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn nat_servers() {
        let text = format!(
            "{MINIMAL}[nat]\nstun = [\"stun.example.org:3478\"]\n[[nat.turn]]\nserver = \"turn.example.org:3478\"\ntransport = \"tcp\"\nusername = \"u\"\npassword = \"p\"\n"
        );
        let c = Config::parse(&text).expect("valid");
        assert_eq!(c.nat.stun, vec!["stun.example.org:3478"]);
        assert_eq!(c.nat.turn[0].transport, TurnTransport::Tcp);
        let e = Config::parse(&format!("{MINIMAL}[nat]\nstun = [\"nohost\"]\n")).unwrap_err();
        assert!(e.contains("[nat] stun") && e.contains("host:port"), "{e}");
    }

    #[test]
    fn metrics_listen_address() {
        assert!(Config::parse(MINIMAL).expect("valid").metrics.is_none());
        let c = Config::parse(&format!("{MINIMAL}[metrics]\nlisten = \"[::1]:9469\"\n"))
            .expect("valid");
        assert_eq!(
            c.metrics.map(|m| m.listen),
            Some("[::1]:9469".parse().expect("address"))
        );

        let uncommented =
            template(&PublicKey([7; 32])).replace("# [metrics]\n# listen", "[metrics]\nlisten");
        let c = Config::parse(&uncommented).expect("the template's metrics lines parse");
        assert_eq!(
            c.metrics.map(|m| m.listen),
            Some("127.0.0.1:9469".parse().expect("address"))
        );

        let e =
            Config::parse(&format!("{MINIMAL}[metrics]\nlisten = \"localhost\"\n")).unwrap_err();
        assert!(
            e.contains("line 4") && e.contains("key `listen`") && e.contains("127.0.0.1:9469"),
            "{e}"
        );
        let e = Config::parse(&format!(
            "{MINIMAL}[metrics]\nlisten = \"127.0.0.1:9469\"\npath = \"/m\"\n"
        ))
        .unwrap_err();
        assert!(e.contains("line 5") && e.contains("path"), "{e}");
    }

    #[test]
    fn missing_sections_and_empty_addresses_are_errors() {
        assert!(Config::parse("").unwrap_err().contains("no overlay"));
        assert!(
            Config::parse("[interface]\naddresses = []\n")
                .unwrap_err()
                .contains("no overlay")
        );
    }

    /// `docs/config.md` is the reference of this file: every ```toml block in it is a config
    /// that parses, every key is described under the heading of its section and set in some
    /// block, and the block under "## A full example" sets them all (but the other two
    /// password sources).
    ///
    /// The key list is made from the config structs by patterns that name every field. A new
    /// field therefore stops this test from compiling until its struct's `keys!` line names it;
    /// then the test fails until docs/config.md describes the key and its examples set it. A key
    /// the code no longer reads fails the examples that set it (unknown keys are errors).
    #[test]
    fn the_reference_documents_every_key() {
        /// `(heading, key)` for every field of `$ty`, whose section heading is `$heading`. It
        /// does not compile unless every field is named: an error here ("pattern requires `..`")
        /// means a struct has a field that its line does not name yet.
        macro_rules! keys {
            ($heading:literal, $ty:ident, [$($field:ident),* $(,)?]) => {{
                let _names_every_field = |v: &$ty| {
                    let $ty { $($field: _),* } = v;
                };
                vec![$(($heading, stringify!($field))),*]
            }};
        }
        let _names_every_section = |c: &Config| {
            // A new section needs a `keys!` line below (`dir` is not read from the file).
            let Config {
                device: _,
                interface: _,
                xmpp: _,
                social: _,
                groups: _,
                peers: _,
                dns: _,
                nat: _,
                metrics: _,
                relay: _,
                dir: _,
            } = c;
        };
        let keys = [
            keys!(
                "[device]",
                Device,
                [
                    private_key_file,
                    state_dir,
                    log_level,
                    control_socket,
                    exit,
                    exit_fallback,
                    exit_dns
                ]
            ),
            keys!(
                "[interface]",
                Interface,
                [name, addresses, mtu, listen_port]
            ),
            keys!(
                "[xmpp]",
                Xmpp,
                [
                    jid,
                    password,
                    password_file,
                    password_command,
                    server,
                    tls,
                    ca_file,
                    client_cert,
                    client_key,
                    device,
                    send_rate,
                    send_burst
                ]
            ),
            keys!(
                "[social]",
                Social,
                [
                    enabled,
                    subnet,
                    address,
                    links,
                    idle_timeout,
                    advertise_routes,
                    accept_routes,
                    exit
                ]
            ),
            keys!(
                "[[groups]]",
                Group,
                [
                    room,
                    subnet,
                    address,
                    create,
                    links,
                    idle_timeout,
                    advertise_routes,
                    accept_routes,
                    exit
                ]
            ),
            keys!("[dns]", Dns, [enabled, suffix, port]),
            keys!(
                "[nat]",
                Nat,
                [stun, turn, port_mapping, port_mapping_lifetime]
            ),
            keys!(
                "[[nat.turn]]",
                Turn,
                [server, transport, username, password]
            ),
            keys!("[metrics]", Metrics, [listen]),
            keys!(
                "[relay]",
                Relay,
                [enabled, port, endpoint, max_pairs, pair_rate, total_rate]
            ),
            keys!(
                "[[peers]]",
                Peer,
                [name, public_key, endpoint, addresses, keepalive]
            ),
        ]
        .concat();
        // Exactly one password source can be set: the full example sets `password`.
        let alternatives = [
            ("[xmpp]", "password_file"),
            ("[xmpp]", "password_command"),
            ("[xmpp]", "client_cert"),
            ("[xmpp]", "client_key"),
        ];

        let doc = include_str!("../../../docs/config.md");
        let blocks: Vec<toml::Value> = doc
            .split("```toml\n")
            .skip(1)
            .map(|block| {
                let block = block.split("```").next().unwrap_or_default();
                if let Err(e) = Config::parse(block) {
                    panic!("docs/config.md: a block does not parse: {e}\n{block}");
                }
                toml::Value::Table(block.parse().expect("TOML"))
            })
            .collect();
        let full = doc
            .split_once("## A full example")
            .and_then(|(_, rest)| rest.split("```toml\n").nth(1))
            .and_then(|block| block.split("```").next())
            .expect("docs/config.md has a full example");
        let full = toml::Value::Table(full.parse().expect("TOML"));

        /// Whether `value` sets the key at `path`, in any table of an array of tables.
        fn sets(value: &toml::Value, path: &[&str]) -> bool {
            match (value, path) {
                (_, []) => true,
                (toml::Value::Array(items), _) => items.iter().any(|v| sets(v, path)),
                (toml::Value::Table(t), [first, rest @ ..]) => {
                    t.get(*first).is_some_and(|v| sets(v, rest))
                }
                _ => false,
            }
        }
        for (heading, key) in keys {
            let marker = format!("### `{heading}`\n");
            let start = doc
                .find(&marker)
                .unwrap_or_else(|| panic!("docs/config.md has no heading {marker:?}"));
            let section = &doc[start + marker.len()..];
            let section = &section[..section.find("\n#").unwrap_or(section.len())];
            assert!(
                section.contains(&format!("\n| `{key}` |")),
                "docs/config.md does not describe `{key}` under {heading}"
            );
            let mut path: Vec<&str> = heading.trim_matches(['[', ']']).split('.').collect();
            path.push(key);
            assert!(
                blocks.iter().any(|b| sets(b, &path)),
                "no example in docs/config.md sets {heading} {key}"
            );
            assert!(
                alternatives.contains(&(heading, key)) || sets(&full, &path),
                "the full example in docs/config.md does not set {heading} {key}"
            );
        }
    }
}
