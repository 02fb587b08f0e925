//! What `ipop status` shows: the JSON contract that scripts rely on, and its rendering for people.

use ipnet::IpNet;
use ipop_core::osn::{Candidate, CandidateKind, DeviceId, OverlayId};
use ipop_core::{Engine, LinkState, LinkStatus, PeerStatus, Unlinked, UnlinkedReason};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write;
use std::time::{Duration, Instant};

/// The whole status of a running daemon. `overlays` is the stable top level that scripts read.
#[derive(Debug, Serialize, Deserialize)]
pub struct Status {
    pub interface: String,
    pub public_key: String,
    pub fingerprint: String,
    pub listen_port: u16,
    pub uptime_s: f64,
    /// The XMPP session, when an account is configured.
    pub xmpp: Option<XmppInfo>,
    pub overlays: Vec<Overlay>,
    /// STUN and TURN servers in use, from the config and from the XMPP server
    /// (`kind transport host address`).
    #[serde(default)]
    pub ice_servers: Vec<String>,
    /// Packets dropped since start, by reason.
    pub drops: BTreeMap<String, u64>,
    /// The longest the packet loop went without waiting in the last minute, in seconds.
    #[serde(default)]
    pub loop_stall_max_s: f64,
    /// The port mapping on the home router (`[nat] port_mapping`).
    #[serde(default)]
    pub port_mapping: Option<crate::portmap::PortMapStatus>,
    /// This device as a relay for others (`[relay] enabled`).
    #[serde(default)]
    pub relay: Option<RelayStatus>,
    /// How the NAT in front of this device maps its port, as two or more STUN servers saw it:
    /// `independent` (one mapping for every destination), `dependent` (a new one for each:
    /// this side punches with extra sockets), or `unknown`.
    #[serde(default)]
    pub nat_mapping: String,
    /// What hole punching did since start ([`ipop_core::punch`]).
    #[serde(default)]
    pub punching: Punching,
    /// The prefixes this device routes for its overlays (`advertise_routes`), by overlay.
    #[serde(default)]
    pub advertised_routes: BTreeMap<String, Vec<String>>,
    /// The prefixes other devices route for the overlays, and what this device made of each.
    #[serde(default)]
    pub routes: Vec<Route>,
    /// The exit internet traffic goes through, when one is chosen or offered.
    #[serde(default)]
    pub exit: Option<Exit>,
}

/// The exit in use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exit {
    /// `none`, `auto` or the chosen `JID/DEVICE`.
    pub choice: String,
    /// The device whose exit is in use.
    pub in_use: Option<String>,
    /// `active` (traffic goes through it), `blocking` (it is not up: internet traffic is
    /// dropped), `direct` (it is not up: traffic goes the host's own way) or `off`.
    pub state: String,
    /// The devices that offer to be an exit.
    pub offered: Vec<String>,
    /// The exit's DNS responder (`IP:PORT`) while this device's DNS goes through it.
    #[serde(default)]
    pub dns: Option<String>,
}

/// The exit as status shows it: none when no exit is chosen or offered. `dns` is the exit's
/// responder while DNS goes through it.
pub fn exit(
    engine: &Engine,
    fallback: crate::config::ExitFallback,
    dns: Option<std::net::SocketAddr>,
) -> Option<Exit> {
    let e = engine.exit_status();
    let choice = match &e.choice {
        ipop_core::ExitChoice::Off => "none".to_owned(),
        ipop_core::ExitChoice::Auto => "auto".to_owned(),
        ipop_core::ExitChoice::Device(d) => d.to_string(),
    };
    if e.choice == ipop_core::ExitChoice::Off && e.offered.is_empty() {
        return None;
    }
    let state = match (&e.choice, e.up, fallback) {
        (ipop_core::ExitChoice::Off, ..) => "off",
        (_, true, _) => "active",
        (_, false, crate::config::ExitFallback::Block) => "blocking",
        (_, false, crate::config::ExitFallback::Direct) => "direct",
    };
    Some(Exit {
        choice,
        in_use: e.in_use.map(|d| d.to_string()),
        state: state.to_owned(),
        offered: e.offered.iter().map(ToString::to_string).collect(),
        dns: dns.map(|d| d.to_string()),
    })
}

/// A prefix a device routes for an overlay, as this device takes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub prefix: String,
    /// The device that routes it, `JID/DEVICE`.
    pub via: String,
    pub overlay: String,
    /// `accepted`, `not_accepted` (the overlay's `accept_routes` is off) or `refused`.
    pub state: String,
    /// This device's address that what it sends there leaves from, when accepted.
    pub source: Option<String>,
    /// Why it was refused.
    pub reason: Option<String>,
}

/// What became of the prefixes devices route, as status shows it.
pub fn routes(engine: &Engine) -> Vec<Route> {
    engine
        .routes()
        .iter()
        .map(|r| {
            let (state, source, reason) = match &r.state {
                ipop_core::RouteState::Accepted { source } => {
                    ("accepted", Some(source.to_string()), None)
                }
                ipop_core::RouteState::NotAccepted => ("not_accepted", None, None),
                ipop_core::RouteState::Refused(why) => ("refused", None, Some(why.clone())),
            };
            Route {
                prefix: r.prefix.to_string(),
                via: r.device.to_string(),
                overlay: r.overlay.to_string(),
                state: state.to_owned(),
                source,
                reason,
            }
        })
        .collect()
}

/// Hole punching's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Punching {
    /// Extra sockets opened to punch from.
    pub sockets: u64,
    /// Probes sent, from those sockets and to the other side's ports.
    pub probes: u64,
    /// Links whose punching found a direct path, and those whose punching found none.
    pub punched: u64,
    pub failed: u64,
}

impl From<ipop_core::punch::PunchStats> for Punching {
    fn from(p: ipop_core::punch::PunchStats) -> Self {
        Punching {
            sockets: p.sockets,
            probes: p.probes,
            punched: p.punched,
            failed: p.failed,
        }
    }
}

/// What this device relays for others.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RelayStatus {
    /// Where the others reach it, as its presence announces; none when it cannot relay.
    pub endpoint: Option<String>,
    /// Why it does not relay.
    pub problem: Option<String>,
    pub max_pairs: usize,
    pub pair_rate_mbit: u64,
    pub total_rate_mbit: u64,
    pub pairs: Vec<RelayPair>,
    /// Datagrams dropped by reason: `relay_unauthenticated`, `relay_over_rate`, ...
    pub drops: BTreeMap<String, u64>,
}

/// One pair of devices the relay forwards for.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RelayPair {
    /// The relay's port for the pair.
    pub port: u16,
    /// Each side: `JID/DEVICE at ip:port` (the device it registered as), or not registered.
    pub ends: Vec<String>,
    pub forwarded: u64,
    pub bytes: u64,
    pub over_rate: u64,
}

/// The longest stalls of a loop over the last minute, kept per second.
pub struct StallWindow {
    start: Instant,
    /// For each second modulo 60: which second it is, and the longest stall in it.
    seconds: [(u64, Duration); 60],
}

impl Default for StallWindow {
    fn default() -> Self {
        StallWindow {
            start: Instant::now(),
            seconds: [(u64::MAX, Duration::ZERO); 60],
        }
    }
}

impl StallWindow {
    /// Notes a stall of `stall` that ended at `now`.
    pub fn record(&mut self, now: Instant, stall: Duration) {
        let second = now.saturating_duration_since(self.start).as_secs();
        let slot = &mut self.seconds[(second % 60) as usize];
        if slot.0 != second {
            *slot = (second, Duration::ZERO);
        }
        slot.1 = slot.1.max(stall);
    }

    /// The longest stall that ended in the minute before `now`.
    pub fn max(&self, now: Instant) -> Duration {
        let second = now.saturating_duration_since(self.start).as_secs();
        self.seconds
            .iter()
            .filter(|(s, _)| *s <= second && second - *s < 60)
            .map(|(_, d)| *d)
            .max()
            .unwrap_or_default()
    }
}

/// The XMPP session as status shows it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct XmppInfo {
    /// `connecting`, `online` or `reconnecting`.
    pub state: String,
    pub jid: Option<String>,
    pub server: Option<String>,
    pub reconnects: u64,
    /// How many of the reconnections resumed the stream (XEP-0198), losing nothing.
    #[serde(default)]
    pub resumptions: u64,
    /// Stanzas dropped, by reason.
    pub drops: BTreeMap<String, u64>,
    /// Stanzas sent to the server and received from it since start.
    #[serde(default)]
    pub stanzas_sent: u64,
    #[serde(default)]
    pub stanzas_received: u64,
    /// Bytes on the connections to the server since start, TLS included.
    #[serde(default)]
    pub bytes_sent: u64,
    #[serde(default)]
    pub bytes_received: u64,
    /// Link signals (Jingle IQs) sent, and well-formed ones received from devices.
    #[serde(default)]
    pub signals_sent: u64,
    #[serde(default)]
    pub signals_received: u64,
    /// Link offers sent, and those of them that went to a device that had one before.
    #[serde(default)]
    pub link_offers: u64,
    #[serde(default)]
    pub link_offers_repeated: u64,
    /// Signals that failed, by why: `refused`, `timeout`, `unsent`.
    #[serde(default)]
    pub signal_failures: BTreeMap<String, u64>,
    /// Signals never sent because a later one made them moot or was merged into them while
    /// they waited in the send queue.
    #[serde(default)]
    pub signals_coalesced: u64,
    /// Stanzas waiting in the send queue (paced under the server's rate limit), and the
    /// longest any waited there, in milliseconds.
    #[serde(default)]
    pub send_queue: u64,
    #[serde(default)]
    pub send_wait_max_ms: u64,
    /// The group rooms, joined or not.
    #[serde(default)]
    pub rooms: Vec<RoomInfo>,
}

/// A group room as status shows it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RoomInfo {
    pub room: String,
    pub joined: bool,
    /// Why this device is not in the room: still joining, refused, removed.
    pub problem: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Overlay {
    pub name: String,
    pub kind: String,
    pub addresses: Vec<String>,
    pub peers: Vec<Peer>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Peer {
    /// The peer's public key.
    pub id: String,
    pub fingerprint: String,
    pub name: Option<String>,
    pub jid: Option<String>,
    pub device: Option<String>,
    pub addresses: Vec<String>,
    pub state: String,
    pub path: Option<String>,
    pub endpoint: Option<String>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub last_handshake_s: Option<f64>,
    /// Why the link is not up, when this side knows.
    pub reason: Option<String>,
    /// The candidate pair ICE chose, `local -> remote`, each as `type address`.
    #[serde(default)]
    pub pair: Option<String>,
    /// Round-trip time of the chosen pair, in milliseconds.
    #[serde(default)]
    pub rtt_ms: Option<f64>,
    /// For a relayed path: the relay, `HOST over TRANSPORT` (ours) or the peer's.
    #[serde(default)]
    pub via: Option<String>,
    /// While the link is not up: the candidates of the attempt, `local|remote type address`.
    #[serde(default)]
    pub candidates_tried: Vec<String>,
    /// The device is offline on XMPP: its link lives on WireGuard alone, and closes after
    /// 3 minutes without a handshake or data from it.
    #[serde(default)]
    pub offline_on_xmpp: bool,
}

impl Peer {
    /// How people know the peer: `jid/device` for a device of the social network, else the
    /// name from the config, else the key's fingerprint.
    pub fn label(&self) -> String {
        match (&self.jid, &self.device, &self.name) {
            (Some(jid), Some(device), _) => format!("{jid}/{device}"),
            (_, _, Some(name)) => name.clone(),
            (Some(jid), None, None) => jid.clone(),
            _ => self.fingerprint.clone(),
        }
    }

    fn from_link(l: &LinkStatus) -> Self {
        // A WireGuard session alone is not enough: while an ICE restart looks for a new path,
        // the link is not up even though the session has not expired.
        let connected = !l.restarting
            && l.peer
                .as_ref()
                .is_some_and(|p| p.state == LinkState::Connected);
        let reason = if connected {
            None
        } else if l.offline {
            Some(
                "the device is offline on XMPP, so the link cannot be negotiated again; it \
                 closes after 3 minutes without a handshake or data from the device"
                    .to_owned(),
            )
        } else {
            l.last_error
                .clone()
                .or_else(|| {
                    l.peer
                        .as_ref()
                        .and_then(|p| p.problem.as_ref())
                        .map(ToString::to_string)
                })
                .or_else(|| Some(describe_phase(l.phase).to_owned()))
        };
        let relayed = l.pair.as_ref().is_some_and(|(a, b)| {
            a.kind == CandidateKind::Relayed || b.kind == CandidateKind::Relayed
        });
        let mapped = l
            .pair
            .as_ref()
            .is_some_and(|(local, _)| local.kind == CandidateKind::Mapped);
        let punched = l.punched;
        let candidate = |c: &Candidate| format!("{} {}", c.kind.as_str(), c.address);
        let candidates_tried = if connected {
            Vec::new()
        } else {
            let (local, remote) = &l.tried;
            local
                .iter()
                .map(|c| format!("local {}", candidate(c)))
                .chain(remote.iter().map(|c| format!("remote {}", candidate(c))))
                .collect()
        };
        Peer {
            id: l.key.to_string(),
            fingerprint: l.key.fingerprint(),
            name: None,
            jid: Some(l.device.user.clone()),
            device: Some(l.device.device.clone()),
            addresses: l.addresses.iter().map(ToString::to_string).collect(),
            state: match l.phase {
                _ if connected => "connected",
                ipop_core::LinkPhase::Idle => "idle",
                _ => "connecting",
            }
            .to_owned(),
            path: connected.then(|| {
                match (relayed, mapped, punched) {
                    (true, _, _) => "relay",
                    (false, true, _) => "mapped",
                    (false, false, true) => "punched",
                    (false, false, false) => "direct",
                }
                .to_owned()
            }),
            endpoint: l
                .peer
                .as_ref()
                .and_then(|p| p.endpoint)
                .map(|e| e.to_string()),
            rx_bytes: l.peer.as_ref().map_or(0, |p| p.rx_bytes),
            tx_bytes: l.peer.as_ref().map_or(0, |p| p.tx_bytes),
            last_handshake_s: l.peer.as_ref().and_then(|p| p.last_handshake).map(seconds),
            reason,
            pair: l
                .pair
                .as_ref()
                .map(|(a, b)| format!("{} -> {}", candidate(a), candidate(b))),
            rtt_ms: l.rtt.map(|d| (d.as_secs_f64() * 10_000.0).round() / 10.0),
            via: l.relay.clone(),
            candidates_tried,
            offline_on_xmpp: l.offline,
        }
    }

    /// A member of an overlay with no ipop device online.
    fn offline(user: &str) -> Self {
        Peer {
            jid: Some(user.to_owned()),
            state: "offline".to_owned(),
            reason: Some("no ipop device of this user is online".to_owned()),
            ..Peer::default()
        }
    }

    /// A device that is announced but not linked; `me` is this device.
    fn from_unlinked(u: &Unlinked, me: Option<&DeviceId>) -> Self {
        let (state, reason) = match &u.reason {
            UnlinkedReason::KeyClaimedByOther { holder } if Some(holder) == me => (
                "refused",
                format!(
                    "it announces this device's own key ({}), which no other device may use",
                    u.key.fingerprint()
                ),
            ),
            UnlinkedReason::KeyClaimedByOther { holder } => (
                "refused",
                format!(
                    "it announces key {}, which belongs to {holder}: a key belongs to one \
                     device. If the key did move to this device, `ipop trust {}` moves it (the \
                     pin and the link of {holder} go)",
                    u.key.fingerprint(),
                    u.device
                ),
            ),
            UnlinkedReason::KeyNotTrusted { pinned } => (
                "untrusted",
                format!(
                    "it announces key {}, not the key {} pinned for it; compare fingerprints \
                     with its owner, then run `ipop trust {}`",
                    u.key.fingerprint(),
                    pinned.fingerprint(),
                    u.device
                ),
            ),
            UnlinkedReason::NotAuthorised => (
                "refused",
                "its user is not authorised: not a mutual roster friend, not a member of the group"
                    .to_owned(),
            ),
        };
        Peer {
            id: u.key.to_string(),
            fingerprint: u.key.fingerprint(),
            jid: Some(u.device.user.clone()),
            device: Some(u.device.device.clone()),
            state: state.to_owned(),
            reason: Some(reason),
            ..Peer::default()
        }
    }

    fn from_core(p: PeerStatus) -> Self {
        let connected = p.state == LinkState::Connected;
        Peer {
            id: p.public_key.to_string(),
            fingerprint: p.public_key.fingerprint(),
            name: p.name,
            jid: None,
            device: None,
            addresses: p.addresses.iter().map(ToString::to_string).collect(),
            state: p.state.as_str().to_owned(),
            path: connected.then(|| "direct".to_owned()),
            endpoint: p.endpoint.map(|e| e.to_string()),
            rx_bytes: p.rx_bytes,
            tx_bytes: p.tx_bytes,
            last_handshake_s: p.last_handshake.map(seconds),
            reason: p.problem.map(|r| r.to_string()),
            pair: None,
            rtt_ms: None,
            via: None,
            candidates_tried: Vec::new(),
            offline_on_xmpp: false,
        }
    }

    /// The state as the table shows it.
    fn state_shown(&self) -> String {
        if self.offline_on_xmpp {
            format!("{} (peer offline on XMPP)", self.state)
        } else {
            self.state.clone()
        }
    }
}

fn seconds(d: std::time::Duration) -> f64 {
    (d.as_secs_f64() * 10.0).round() / 10.0
}

fn describe_phase(phase: ipop_core::LinkPhase) -> &'static str {
    match phase {
        ipop_core::LinkPhase::Idle => {
            "on demand: a link is set up when traffic for the device comes, and closed when idle"
        }
        ipop_core::LinkPhase::Waiting => "waiting for the device's link offer",
        ipop_core::LinkPhase::Offered => "link offered, waiting for the answer",
        ipop_core::LinkPhase::Checking => "looking for a network path (ICE)",
        ipop_core::LinkPhase::Connected => "path found, WireGuard handshake under way",
    }
}

/// Every overlay with its peers: the static one (the config's peers, when there are any),
/// then the social overlay and the groups with this device's addresses in each. A device that
/// is online but not linked (its key is not trusted, its user not authorised) is listed with
/// the reason.
pub fn overlays(engine: &Engine, static_addresses: &[IpNet]) -> Vec<Overlay> {
    let mut all = Vec::new();
    let statics = engine.static_peers();
    if !statics.is_empty() || !static_addresses.is_empty() {
        all.push(Overlay {
            name: "static".to_owned(),
            kind: "static".to_owned(),
            addresses: static_addresses.iter().map(ToString::to_string).collect(),
            peers: statics.into_iter().map(Peer::from_core).collect(),
        });
    }
    let links = engine.links();
    let unlinked = engine.unlinked();
    for own in engine.own_addresses() {
        let id = &own.overlay;
        let nets = [IpNet::V4(own.v4.trunc()), IpNet::V6(own.v6.trunc())];
        let here = |a: &String| {
            a.parse::<IpNet>()
                .is_ok_and(|n| nets.iter().any(|o| o.contains(&n.addr())))
        };
        let mut peers: Vec<Peer> = links
            .iter()
            .filter(|l| l.overlays.contains(id))
            .map(Peer::from_link)
            .collect();
        peers.extend(
            unlinked
                .iter()
                .filter(|u| u.overlays.contains(id))
                .map(|u| Peer::from_unlinked(u, engine.me())),
        );
        for p in &mut peers {
            p.addresses.retain(here);
            // IPv4 first: the table shows the first address, and IPv6 may be off.
            p.addresses.sort_by_key(|a| a.contains(':'));
        }
        let me = engine.me().map(|d| d.user.as_str());
        let members = engine.overlays().find(|(o, _)| *o == id).map(|(_, m)| m);
        for user in members.into_iter().flatten() {
            let listed = peers.iter().any(|p| p.jid.as_deref() == Some(user));
            if !listed && Some(user.as_str()) != me {
                peers.push(Peer::offline(user));
            }
        }
        all.push(Overlay {
            name: id.to_string(),
            kind: match id {
                OverlayId::Social => "social",
                OverlayId::Group(_) => "group",
            }
            .to_owned(),
            addresses: vec![own.v4.to_string(), own.v6.to_string()],
            peers,
        });
    }
    all
}

/// The STUN and TURN servers in use, one line each.
pub fn ice_servers(engine: &Engine) -> Vec<String> {
    engine
        .servers()
        .map(|s| {
            let kind = match s.kind {
                ipop_core::osn::IceServerKind::Stun => "stun",
                ipop_core::osn::IceServerKind::Turn => "turn",
            };
            let transport = match s.transport {
                ipop_core::osn::IceTransport::Udp => "udp",
                ipop_core::osn::IceTransport::Tcp => "tcp",
                ipop_core::osn::IceTransport::Tls => "tls",
            };
            format!("{kind} {transport} {} {}", s.host, s.address)
        })
        .collect()
}

pub fn drops(engine: &Engine) -> BTreeMap<String, u64> {
    engine
        .drops()
        .iter()
        .map(|(reason, n)| (reason.as_str().to_owned(), n))
        .collect()
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// The port mapping in one line: what maps where, or why nothing does.
fn render_port_mapping(m: &crate::portmap::PortMapStatus) -> String {
    let or_dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".to_owned());
    match m.state.as_str() {
        "mapped" => {
            let mut line = format!(
                "{} {} -> {}  gateway {}  renews in {} s",
                or_dash(&m.protocol),
                or_dash(&m.external),
                or_dash(&m.internal),
                or_dash(&m.gateway),
                m.renew_in_s.unwrap_or(0)
            );
            if let Some(problem) = &m.problem {
                line.push_str(&format!("  ({problem})"));
            }
            line
        }
        "none" => format!("none: {}", or_dash(&m.problem)),
        other => other.to_owned(),
    }
}

/// Renders the status as a compact table per overlay, for people.
pub fn render(s: &Status) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "interface {}  port {}  key {}  up {:.0}s  loop stall {:.1}ms",
        s.interface,
        s.listen_port,
        s.fingerprint,
        s.uptime_s,
        s.loop_stall_max_s * 1000.0
    );
    if let Some(x) = &s.xmpp {
        let _ = writeln!(
            out,
            "xmpp {}  as {}  via {}  reconnects {} ({} resumed)  send queue {} (longest wait \
             {} ms)",
            x.state,
            x.jid.as_deref().unwrap_or("-"),
            x.server.as_deref().unwrap_or("-"),
            x.reconnects,
            x.resumptions,
            x.send_queue,
            x.send_wait_max_ms
        );
        for r in x.rooms.iter().filter(|r| !r.joined) {
            let _ = writeln!(
                out,
                "room {}  not joined: {}",
                r.room,
                r.problem.as_deref().unwrap_or("joining")
            );
        }
    }
    if let Some(m) = &s.port_mapping {
        let _ = writeln!(out, "port mapping {}", render_port_mapping(m));
    }
    let p = &s.punching;
    let mapping = match s.nat_mapping.as_str() {
        "dependent" => Some("dependent: a new port for each destination; links to cone NATs punch"),
        "independent" => Some("independent: one port for every destination"),
        _ => None,
    };
    if let Some(mapping) = mapping {
        let _ = writeln!(out, "nat mapping {mapping}");
    }
    if p.probes > 0 {
        let _ = writeln!(
            out,
            "punching {} punched, {} failed  ({} sockets, {} probes)",
            p.punched, p.failed, p.sockets, p.probes
        );
    }
    if let Some(e) = &s.exit {
        let through = e.in_use.as_deref().unwrap_or("none");
        let what = match e.state.as_str() {
            "active" => "internet traffic goes through it".to_owned(),
            "blocking" => "not up: internet traffic is dropped".to_owned(),
            "direct" => "not up: internet traffic goes the host's own way".to_owned(),
            _ => format!("offered by {}", e.offered.join(", ")),
        };
        let _ = writeln!(out, "exit {through} ({})  {what}", e.choice);
        if let Some(dns) = &e.dns {
            let _ = writeln!(
                out,
                "exit dns  names outside the overlays are asked at {dns}"
            );
        }
    }
    for (overlay, prefixes) in &s.advertised_routes {
        let _ = writeln!(out, "routing {} for {overlay}", prefixes.join(", "));
    }
    for r in &s.routes {
        let what = match (r.state.as_str(), &r.source, &r.reason) {
            ("accepted", Some(source), _) => format!("accepted, from {source}"),
            ("refused", _, Some(why)) => format!("refused: {why}"),
            ("not_accepted", ..) => "not taken (accept_routes is off)".to_owned(),
            (other, ..) => other.to_owned(),
        };
        let _ = writeln!(
            out,
            "route {} via {} ({})  {what}",
            r.prefix, r.via, r.overlay
        );
    }
    if let Some(r) = &s.relay {
        match (&r.endpoint, &r.problem) {
            (Some(e), _) => {
                let _ = writeln!(
                    out,
                    "relay at {e}  {} of {} pairs",
                    r.pairs.len(),
                    r.max_pairs
                );
            }
            (None, problem) => {
                let _ = writeln!(
                    out,
                    "relay off: {}",
                    problem.as_deref().unwrap_or("no endpoint")
                );
            }
        }
        for p in &r.pairs {
            let _ = writeln!(
                out,
                "  pair on port {}: {}  {} datagrams, {} over the rate",
                p.port,
                p.ends.join(" <-> "),
                p.forwarded,
                p.over_rate
            );
        }
    }
    for o in &s.overlays {
        let _ = writeln!(
            out,
            "\noverlay {} ({})  {}",
            o.name,
            o.kind,
            o.addresses.join(" ")
        );
        if o.peers.is_empty() {
            let _ = writeln!(out, "  no peers");
            continue;
        }
        let rows: Vec<[String; 8]> = o
            .peers
            .iter()
            .map(|p| {
                [
                    p.label(),
                    p.addresses
                        .first()
                        .cloned()
                        .unwrap_or_else(|| "-".to_owned()),
                    p.state_shown(),
                    match (&p.path, &p.via, &p.endpoint) {
                        (Some(path), Some(via), _) => format!("{path} via {via}"),
                        (Some(path), None, Some(e)) => format!("{path} {e}"),
                        (None, _, Some(e)) => format!("- {e}"),
                        _ => "-".to_owned(),
                    },
                    p.rtt_ms
                        .map(|r| format!("{r:.1} ms"))
                        .unwrap_or_else(|| "-".to_owned()),
                    bytes(p.rx_bytes),
                    bytes(p.tx_bytes),
                    p.last_handshake_s
                        .map(|t| format!("{t:.0}s ago"))
                        .unwrap_or_else(|| "never".to_owned()),
                ]
            })
            .collect();
        let header = [
            "PEER",
            "ADDRESS",
            "STATE",
            "PATH",
            "RTT",
            "RX",
            "TX",
            "HANDSHAKE",
        ];
        let mut widths = header.map(str::len);
        for r in &rows {
            for (w, c) in widths.iter_mut().zip(r) {
                *w = (*w).max(c.len());
            }
        }
        let line = |cells: &[String]| {
            let mut l = String::from(" ");
            for (c, w) in cells.iter().zip(widths) {
                let _ = write!(l, " {c:<w$}");
            }
            l.trim_end().to_owned()
        };
        let _ = writeln!(out, "{}", line(&header.map(str::to_owned)));
        for (r, p) in rows.iter().zip(&o.peers) {
            let _ = writeln!(out, "{}", line(r));
            // An idle on-demand link is no problem: its state says it all.
            if let Some(reason) = p.reason.as_ref().filter(|_| p.state != "idle") {
                let _ = writeln!(out, "    why not connected: {reason}");
            }
            if !p.candidates_tried.is_empty() {
                let _ = writeln!(out, "    candidates: {}", p.candidates_tried.join(", "));
            }
        }
    }
    let dropped: Vec<String> = s
        .drops
        .iter()
        // The kernel's own multicast on the interface is expected, not a problem: only
        // `--json` shows it.
        .filter(|(r, n)| **n > 0 && r.as_str() != "multicast")
        .map(|(r, n)| format!("{r}={n}"))
        .collect();
    if !dropped.is_empty() {
        let _ = writeln!(out, "\ndropped packets: {}", dropped.join(" "));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Status {
        Status {
            interface: "ipop0".into(),
            public_key: "k".into(),
            fingerprint: "aaaa-bbbb-cccc-dddd-eeee".into(),
            listen_port: 51820,
            uptime_s: 12.0,
            loop_stall_max_s: 0.0021,
            port_mapping: None,
            relay: None,
            nat_mapping: String::new(),
            punching: Default::default(),
            advertised_routes: BTreeMap::new(),
            routes: Vec::new(),
            exit: None,
            xmpp: None,
            ice_servers: Vec::new(),
            overlays: vec![Overlay {
                name: "static".into(),
                kind: "static".into(),
                addresses: vec!["10.77.0.1/24".into()],
                peers: vec![Peer {
                    id: "key".into(),
                    fingerprint: "1111-2222-3333-4444-5555".into(),
                    name: Some("bob".into()),
                    jid: None,
                    device: None,
                    addresses: vec!["10.77.0.2/32".into()],
                    state: "connecting".into(),
                    path: None,
                    endpoint: Some("10.0.0.2:51820".into()),
                    rx_bytes: 0,
                    tx_bytes: 3 * 1024 * 1024,
                    last_handshake_s: None,
                    reason: Some("no handshake response".into()),
                    pair: None,
                    rtt_ms: None,
                    via: None,
                    candidates_tried: vec!["local host 10.0.0.1:51820".into()],
                    offline_on_xmpp: false,
                }],
            }],
            drops: BTreeMap::from([("no_route".into(), 3), ("spoofed_source".into(), 0)]),
        }
    }

    #[test]
    fn the_loop_stall_is_the_longest_of_the_last_minute() {
        let mut w = StallWindow::default();
        let t0 = Instant::now();
        w.record(t0, Duration::from_millis(7));
        w.record(t0 + Duration::from_secs(30), Duration::from_millis(2));
        assert_eq!(
            w.max(t0 + Duration::from_secs(30)),
            Duration::from_millis(7)
        );
        assert_eq!(
            w.max(t0 + Duration::from_secs(61)),
            Duration::from_millis(2)
        );
        // The slot of second 0 is reused by second 60, without the old stall.
        w.record(t0 + Duration::from_secs(60), Duration::from_millis(1));
        assert_eq!(
            w.max(t0 + Duration::from_secs(91)),
            Duration::from_millis(1)
        );
        assert_eq!(w.max(t0 + Duration::from_secs(200)), Duration::ZERO);
    }

    #[test]
    fn json_has_the_documented_shape() {
        let v = serde_json::to_value(sample()).expect("serialises");
        let peer = &v["overlays"][0]["peers"][0];
        for key in [
            "id",
            "addresses",
            "state",
            "path",
            "endpoint",
            "rx_bytes",
            "tx_bytes",
            "last_handshake_s",
            "offline_on_xmpp",
        ] {
            assert!(peer.get(key).is_some(), "peer lacks {key}");
        }
        for key in ["name", "kind", "addresses", "peers"] {
            assert!(v["overlays"][0].get(key).is_some(), "overlay lacks {key}");
        }
    }

    #[test]
    fn table_shows_peer_state_and_why() {
        let t = render(&sample());
        assert!(
            t.contains("bob") && t.contains("connecting") && t.contains("3.0 MiB"),
            "{t}"
        );
        assert!(t.contains("candidates: local host 10.0.0.1:51820"), "{t}");
        assert!(
            t.contains("why not connected: no handshake response"),
            "{t}"
        );
        assert!(
            t.contains("no_route=3") && !t.contains("spoofed_source"),
            "{t}"
        );
    }

    #[test]
    fn table_shows_the_port_mapping_or_why_there_is_none() {
        let mut s = sample();
        assert!(!render(&s).contains("port mapping"));
        s.port_mapping = Some(crate::portmap::PortMapStatus {
            state: "mapped".into(),
            protocol: Some("PCP".into()),
            gateway: Some("192.168.1.1".into()),
            internal: Some("192.168.1.2:51820".into()),
            external: Some("203.0.113.7:51820".into()),
            renew_in_s: Some(3599),
            problem: None,
            renewals: 0,
        });
        let t = render(&s);
        assert!(
            t.contains(
                "port mapping PCP 203.0.113.7:51820 -> 192.168.1.2:51820  gateway 192.168.1.1  \
                 renews in 3599 s\n"
            ),
            "{t}"
        );
        s.port_mapping = Some(crate::portmap::PortMapStatus {
            state: "none".into(),
            problem: Some("the gateway 192.168.1.1 refused or did not answer: PCP: x".into()),
            ..Default::default()
        });
        assert!(
            render(&s).contains("port mapping none: the gateway 192.168.1.1 refused"),
            "{}",
            render(&s)
        );
    }

    #[test]
    fn table_shows_the_nat_mapping_when_known_and_what_punching_did() {
        let mut s = sample();
        s.nat_mapping = "unknown".into();
        assert!(!render(&s).contains("nat mapping"), "{}", render(&s));
        assert!(!render(&s).contains("punching"));
        s.nat_mapping = "dependent".into();
        s.punching = Punching {
            sockets: 256,
            probes: 640,
            punched: 1,
            failed: 0,
        };
        let t = render(&s);
        assert!(
            t.contains("nat mapping dependent: a new port for each destination"),
            "{t}"
        );
        assert!(
            t.contains("punching 1 punched, 0 failed  (256 sockets, 640 probes)\n"),
            "{t}"
        );
    }

    #[test]
    fn table_shows_what_the_device_relays_or_why_it_does_not() {
        let mut s = sample();
        s.relay = Some(RelayStatus {
            endpoint: Some("203.0.113.7:51821".into()),
            max_pairs: 16,
            pairs: vec![RelayPair {
                port: 40001,
                ends: vec![
                    "alice@example.org/laptop at 198.51.100.1:1024".into(),
                    "(not registered)".into(),
                ],
                forwarded: 12,
                bytes: 1200,
                over_rate: 0,
            }],
            ..RelayStatus::default()
        });
        let t = render(&s);
        assert!(
            t.contains("relay at 203.0.113.7:51821  1 of 16 pairs\n"),
            "{t}"
        );
        assert!(
            t.contains(
                "  pair on port 40001: alice@example.org/laptop at 198.51.100.1:1024 <-> \
                 (not registered)  12 datagrams, 0 over the rate"
            ),
            "{t}"
        );
        s.relay = Some(RelayStatus {
            problem: Some("no public IPv4 address".into()),
            ..RelayStatus::default()
        });
        assert!(render(&s).contains("relay off: no public IPv4 address"));
    }

    #[test]
    fn table_shows_a_link_kept_while_the_peer_is_offline_on_xmpp() {
        let mut s = sample();
        let bob = &mut s.overlays[0].peers[0];
        bob.state = "connected".into();
        bob.path = Some("direct".into());
        bob.reason = None;
        bob.offline_on_xmpp = true;
        let v = serde_json::to_value(&s).expect("serialises");
        let peer = &v["overlays"][0]["peers"][0];
        assert_eq!(peer["state"], "connected");
        assert_eq!(peer["offline_on_xmpp"], true);
        let t = render(&s);
        let row = t.lines().find(|l| l.contains("bob")).expect("bob listed");
        assert!(row.contains("connected (peer offline on XMPP)"), "{t}");
        s.overlays[0].peers[0].offline_on_xmpp = false;
        assert!(!render(&s).contains("offline on XMPP"));
    }

    #[test]
    fn table_shows_the_relay_rtt_and_offline_members() {
        let mut s = sample();
        let bob = &mut s.overlays[0].peers[0];
        bob.state = "connected".into();
        bob.path = Some("relay".into());
        bob.via = Some("turn.example.org over tcp".into());
        bob.rtt_ms = Some(12.3);
        bob.reason = None;
        bob.candidates_tried.clear();
        s.overlays[0].peers.push(Peer::offline("carol@example.org"));
        let t = render(&s);
        assert!(t.contains("relay via turn.example.org over tcp"), "{t}");
        assert!(t.contains("12.3 ms"), "{t}");
        let carol = t
            .lines()
            .find(|l| l.contains("carol@example.org"))
            .expect("carol listed");
        assert!(carol.contains("offline"), "{t}");
        assert!(t.contains("no ipop device of this user is online"), "{t}");
    }
}
