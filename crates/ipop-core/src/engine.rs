//! The engine: the social network decides who may link, link sessions are negotiated over it,
//! ICE finds a path, WireGuard carries the packets.
//!
//! For every device that an overlay authorises and that announced ipop with a key, the engine
//! keeps one link. The device whose ID sorts first opens the session (a `Signal::Initiate` with
//! its key, addresses, ICE credentials and candidates); the other accepts with its own. Both run
//! an ICE agent over the shared UDP socket; the pair it nominates becomes the WireGuard
//! endpoint. Everything is checked on both sides: the peer's user must be authorised by an
//! overlay, and the key in its offer must be the key its device announced.
//!
//! A device heard (authenticated by WireGuard) from another address or relay than the chosen
//! path, once that path has been quiet for a second, is followed there at once: a NAT that
//! rebinds or a new underlay address costs about a second (see [`crate::node::ROAM_QUIET`]).
//!
//! When the chosen path stops working and ICE has no other (the agent reports
//! `Disconnected`: every pair went unanswered for its ICE timeout, about 20 s; or, while the
//! tunnel sends and nothing comes back, the nominated pair's checks, then once a second, went
//! unanswered for 3.5 s: within 5 s of the last answer), the link restarts ICE: a new session with new credentials and the current candidates, offered in a
//! new `Signal::Initiate` that the other side accepts in place of the old session. The
//! WireGuard peer stays through it, so its session keys carry on over the new path.
//!
//! Presence is not the link. A device whose presence vanishes while WireGuard still hears from
//! it (a handshake or authenticated data within 3 minutes) keeps its link, shown as offline on
//! XMPP; the link closes when WireGuard has heard nothing for 3 minutes, or at once when the
//! device's user is no longer authorised, or when the device announces another key. One
//! deadline, the earliest of those devices', wakes the engine to check.
//!
//! Keys belong to one device. A key is pinned for a device when an overlay first authorises
//! the device and a link is wanted (never for a device nobody authorised); a key pinned for one
//! device, or this device's own key, is refused for any other. Announcements from devices that
//! no overlay authorises are kept in memory only, a bounded number of them, and refusals are
//! logged at most once a minute per user or device.

use crate::demand::{AUTO_THRESHOLD, Held, LinkPolicy, Wanted};
use crate::demux::{DatagramKind, classify};
use crate::ice;
use crate::key::PublicKey;
use crate::node::{
    Destinations, DropReason, Drops, LinkState, Node, NodeError, PeerConfig, PeerStatus, Transmit,
    Unsent,
};
use crate::osn::{
    Candidate, CandidateKind, Claim, DeviceId, IceServer, IceServerKind, IceTransport, LinkOffer,
    OsnEvent, Outgoing, OverlayId, RelayOffer, Signal, TerminateReason,
};
use crate::peer_relay::{ClientEvent, RelayClient, Side};
use crate::plan::{EngineEvent, Memory, OverlayConfig, OwnAddresses, Plans};
use crate::punch::{self, NatMapping, PunchStats, Sprayer};
use crate::stun::{BindingEvent, StunBinding};
use crate::turn::{CHANNEL_DATA_HEADER, TurnAllocation, TurnCredentials, TurnEvent, TurnInput};
use ipnet::IpNet;
use is::stun::{StunMessage, StunPacket};
use is::{IceAgent, IceAgentEvent, IceCreds};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

/// How long the device that sorts second waits for the other's offer before making its own.
const ANSWER_GRACE: Duration = Duration::from_secs(3);
/// How long the device that sorts first waits before its offer to a device that came online in
/// a burst (another device of the same `auto` overlay came online within this time before it):
/// the devices of a room come in one after the other when everyone starts at once, and the
/// overlay may reach the threshold of on-demand links before the wait is over, so the offers
/// of links that would rest at once are never made. A device that comes alone is offered at
/// once.
const AUTO_SETTLE: Duration = Duration::from_millis(500);
/// A session not accepted within this time is abandoned and retried.
const SESSION_TIMEOUT: Duration = Duration::from_secs(15);
/// A session whose ICE found no path within this time is abandoned and retried.
const ICE_TIMEOUT: Duration = Duration::from_secs(20);
/// Retry back-off bounds.
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// An offer from a device whose presence has not arrived yet is kept this long.
const PENDING_OFFER_TTL: Duration = Duration::from_secs(10);
/// Most candidates taken from one offer.
const MAX_CANDIDATES: usize = 32;
/// WireGuard keepalive on social links: keeps NAT mappings open.
const KEEPALIVE_S: u16 = 25;
/// How long the side that did not open a session waits, once its path is lost, for the other
/// side to restart ICE before it restarts on its own.
const RESTART_GRACE: Duration = Duration::from_secs(3);
/// A link to a device that is offline on XMPP lives while WireGuard hears from the device: a
/// handshake or authenticated data within this time.
const SILENCE_LIMIT: Duration = Duration::from_secs(180);
/// A refusal is logged at most once per user (or device) per this time.
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(60);
/// Most users and devices whose last refusal log is remembered.
const REFUSAL_LOG_SUBJECTS: usize = 1024;
/// Most announcements kept from devices that no overlay authorises (in memory only): for
/// status, and for a membership that arrives after the presence.
const MAX_STRANGERS: usize = 256;
/// Most offers kept waiting for their device's presence.
const MAX_PENDING: usize = 64;

/// Where a link to a device stands, for status and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkPhase {
    /// On demand, at rest: no session and no WireGuard peer until traffic for the device
    /// enters the TUN device, or the device offers a link.
    Idle,
    /// Waiting for the other device's offer, or for the next attempt.
    Waiting,
    /// Our offer is out; waiting for the answer.
    Offered,
    /// Offers exchanged; ICE is looking for a path.
    Checking,
    /// ICE chose a path; WireGuard runs over it.
    Connected,
}

/// One link as `ipop status` shows it.
#[derive(Debug, Clone)]
pub struct LinkStatus {
    pub device: DeviceId,
    pub key: PublicKey,
    pub overlays: Vec<OverlayId>,
    /// The addresses this device reaches the device at, linked or not.
    pub addresses: Vec<IpNet>,
    pub phase: LinkPhase,
    pub peer: Option<PeerStatus>,
    /// The candidate pair ICE chose: local, then remote.
    pub pair: Option<(Candidate, Candidate)>,
    /// Round-trip time of the chosen pair's connectivity checks.
    pub rtt: Option<Duration>,
    /// The TURN relay the chosen pair goes through, for people: our relay's server and
    /// transport, or the peer's relayed address.
    pub relay: Option<String>,
    /// The candidates of the current (or last failed) attempt, local then remote.
    pub tried: (Vec<Candidate>, Vec<Candidate>),
    pub last_error: Option<String>,
    /// The path was lost and an ICE restart looks for another: the WireGuard session may still
    /// look fresh, but nothing gets through until the restart finds a path.
    pub restarting: bool,
    /// The device is offline on XMPP: WireGuard alone keeps the link, until it hears nothing
    /// from the device for 3 minutes.
    pub offline: bool,
    /// The chosen pair was found by hole punching ([`crate::punch`]).
    pub punched: bool,
}

struct Session {
    id: String,
    initiator: bool,
    agent: IceAgent,
    answered: bool,
    started: Instant,
    nominated: Option<(SocketAddr, SocketAddr)>,
    /// When the agent reported that no path works any more, after it had chosen one (or when
    /// the social network came back since, to restart through it).
    lost: Option<Instant>,
    /// Whether this session restarts ICE for a link whose path was lost.
    restart: bool,
    /// Consent freshness of the nominated pair while traffic goes out unanswered.
    consent: ice::Consent,
    /// Hole punching to or from a NAT that maps each destination anew ([`punch`]).
    punch: Punch,
    /// This session's probe datagram.
    probe: [u8; 20],
    /// Whether punching found the path this session uses.
    punched: bool,
}

/// Where a session stands in hole punching ([`punch`]).
#[derive(Debug, Default)]
enum Punch {
    #[default]
    Idle,
    /// The hard side asked the data plane for sockets `set`, to probe `targets` from.
    Opening { set: u64, targets: Vec<SocketAddr> },
    /// The hard side's sockets wait for a probe until `until`.
    Open { ports: Vec<u16>, until: Instant },
    /// The easy side probes the hard side's ports.
    Spraying(Sprayer),
    /// Punched, given up, or not possible.
    Over,
}

/// What the data plane is asked to do with its extra UDP sockets, which the hard side of hole
/// punching probes from ([`punch`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SocketOrder {
    /// Open `count` IPv4 UDP sockets on ports the system picks, and report their ports with
    /// [`Engine::sockets_opened`] and `set`.
    Open { set: u64, count: usize },
    /// Close these sockets.
    Close { ports: Vec<u16> },
}

/// An encrypted datagram that [`Engine::handle_tun`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wire {
    pub destination: SocketAddr,
    pub len: usize,
    /// It goes over the TCP connection to a TURN server rather than over UDP.
    pub stream: bool,
    /// It leaves from the extra socket with this port rather than the main one.
    pub source: Option<u16>,
}

impl Session {
    /// Whether this session punched or is punching, on either side.
    fn punch_started(&self) -> bool {
        !matches!(self.punch, Punch::Idle)
    }

    /// The session's candidates, local then remote.
    fn candidates(&self) -> (Vec<Candidate>, Vec<Candidate>) {
        let read = |c: is::Candidate| ice::from_agent(&c);
        (
            self.agent.local_candidates().filter_map(read).collect(),
            self.agent.remote_candidates().filter_map(read).collect(),
        )
    }
}

struct Link {
    key: PublicKey,
    session: Option<Session>,
    peer: Option<usize>,
    next_attempt: Instant,
    backoff: Duration,
    last_error: Option<String>,
    /// The candidates of the last failed attempt.
    tried: (Vec<Candidate>, Vec<Candidate>),
    /// The device is offline on XMPP (its presence is gone from every overlay): no signal
    /// reaches it, so nothing is retried or restarted, and WireGuard alone keeps the link.
    offline: bool,
    /// The device's addresses as this device reaches it (host routes), linked or not: for
    /// status, names, and the traffic that opens an on-demand link.
    addresses: Vec<IpNet>,
    /// Whether the link is kept whatever the traffic, or on demand.
    wanted: Wanted,
    /// At rest: no session, no WireGuard peer, nothing retried, until traffic for the device
    /// (or its offer) comes.
    idle: bool,
    /// When the link was last in use apart from the data WireGuard carried: when it opened, or
    /// when traffic was last held for it.
    used: Instant,
    /// Whether traffic was held for it since the last [`Engine::handle_timeout`].
    demanded: bool,
    /// The port of the extra socket that hole punching found a path through, kept while the
    /// link is: every session of the link offers it as a host candidate.
    socket: Option<u16>,
    /// When this device last probed the other's ports for it.
    sprayed: Option<Instant>,
}

/// A device as its presences describe it: its key, and the overlays it was seen through.
#[derive(Clone)]
struct Announced {
    key: PublicKey,
    via: BTreeMap<OverlayId, Seen>,
    /// The refusal last counted for this key, so that one refusal is counted once.
    refused: Option<UnlinkedReason>,
}

impl Announced {
    fn new(key: PublicKey) -> Self {
        Announced {
            key,
            via: BTreeMap::new(),
            refused: None,
        }
    }

    /// Whether its presence is gone from every overlay it was seen through.
    fn offline(&self) -> bool {
        !self.via.values().any(|s| s.present)
    }
}

/// A device as seen through one overlay.
#[derive(Clone, Copy)]
struct Seen {
    /// The address it claims there.
    claim: Option<Claim>,
    /// Whether its presence there is current. A presence lost while WireGuard still hears from
    /// the device is kept, not present, until WireGuard falls silent.
    present: bool,
}

/// A prefix that a device routes for an overlay (a subnet router), and what this device made
/// of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteStatus {
    pub prefix: IpNet,
    pub device: DeviceId,
    pub overlay: OverlayId,
    pub state: RouteState,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteState {
    /// Routed into the tunnel, to the device; what this device sends there leaves from
    /// `source`, its own address in the overlay.
    Accepted { source: IpAddr },
    /// The overlay does not take routes (`accept_routes` is off).
    NotAccepted,
    /// Refused, for the reason given: it overlaps an overlay, this device's own network, or a
    /// prefix another device routes.
    Refused(String),
}

/// Which device's exit this device sends its internet traffic through.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum ExitChoice {
    /// None: internet traffic goes the host's own way.
    #[default]
    Off,
    /// This device, when it offers to be an exit.
    Device(DeviceId),
    /// The exit with the lowest round-trip time among those whose link is up; another one
    /// when it fails.
    Auto,
}

/// The exit in use, as status shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitStatus {
    pub choice: ExitChoice,
    /// The device whose default routes are taken.
    pub in_use: Option<DeviceId>,
    /// Whether its link is up: traffic flows through it.
    pub up: bool,
    /// The devices that offer to be an exit, to this device.
    pub offered: Vec<DeviceId>,
    /// The port on which the exit in use answers DNS, when it does.
    pub dns: Option<u16>,
}

/// Whether two prefixes share an address.
fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// What the engine makes of an announced device.
enum Verdict {
    /// A link with this key is wanted; `pin` when the key is not pinned yet.
    Link { key: PublicKey, pin: bool },
    /// The device is authorised, its key is not accepted.
    Refused(UnlinkedReason),
    /// No overlay it was seen through authorises its user.
    NotAuthorised,
    /// Not announced (or its presence lost with no live link).
    Gone,
}

/// A device that is online but not linked, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unlinked {
    pub device: DeviceId,
    /// The key it announces.
    pub key: PublicKey,
    pub overlays: Vec<OverlayId>,
    pub reason: UnlinkedReason,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnlinkedReason {
    /// It announces another key than the one pinned for it; `ipop trust` accepts the new one.
    KeyNotTrusted { pinned: PublicKey },
    /// It announces a key that belongs to another device: the key pinned for `holder`, or this
    /// device's own key when `holder` is this device. `ipop trust` moves the key to it (not
    /// this device's own).
    KeyClaimedByOther { holder: DeviceId },
    /// Its user is not authorised by the overlays it was seen in.
    NotAuthorised,
}

/// The engine: OSN state, link sessions, ICE agents and the WireGuard node.
pub struct Engine {
    node: Node,
    key: PublicKey,
    plans: Plans,
    me: Option<DeviceId>,
    /// Whether the social network session is up: ICE restarts wait for it.
    online: bool,
    hosts: Vec<SocketAddr>,
    members: BTreeMap<OverlayId, BTreeSet<String>>,
    /// Announced devices that an overlay they were seen through authorises, whatever their key.
    devices: BTreeMap<DeviceId, Announced>,
    /// Announced devices that no overlay authorises: in memory only, at most `MAX_STRANGERS`.
    strangers: BTreeMap<DeviceId, Announced>,
    /// The device each pinned key belongs to.
    holders: HashMap<PublicKey, DeviceId>,
    /// Devices with a presence lost while their link was alive.
    absent: BTreeSet<DeviceId>,
    /// When the first of them may have been silent for too long: one deadline for them all.
    absent_due: Option<Instant>,
    /// When a refusal was last logged, by user or device.
    refusal_logs: HashMap<String, Instant>,
    links: BTreeMap<DeviceId, Link>,
    pending: HashMap<DeviceId, (String, LinkOffer, Instant)>,
    /// The link policy and idle time of each overlay, as configured.
    policies: BTreeMap<OverlayId, (LinkPolicy, Duration)>,
    /// How many devices are online in each overlay whose policy is `auto`, this one included.
    sizes: BTreeMap<OverlayId, usize>,
    /// How many other devices count as online in each overlay (present there, their user a
    /// member), kept as presences come and go so that a presence costs no walk over all
    /// devices; counted anew when the members change.
    online_in: HashMap<OverlayId, usize>,
    /// The device each address of a link belongs to, linked or not: a packet that no peer
    /// takes finds here the link it waits for.
    by_address: HashMap<IpAddr, DeviceId>,
    /// Packets that wait for their link to come up.
    held: Held,
    /// Links that traffic was held for since the last [`Engine::handle_timeout`].
    demanded: Vec<DeviceId>,
    /// When each `auto` overlay grew by a device, over the last [`AUTO_SETTLE`].
    arrivals: HashMap<OverlayId, VecDeque<Instant>>,
    /// Counts up whenever the addresses of a link change: what the daemon's DNS names follow,
    /// with the node's version.
    addresses_version: u64,
    signals: VecDeque<Outgoing>,
    transmits: VecDeque<Transmit>,
    drops: Drops,
    rng: u64,
    /// Seeds the STUN and TURN clients' transaction IDs (which hash it with a counter).
    secret: u64,
    clients: u64,
    offered_servers: Vec<IceServer>,
    config_servers: Vec<IceServer>,
    /// Local candidates found after start (server-reflexive, relayed).
    gathered: Vec<is::Candidate>,
    /// The port mapping the home router grants (internal, external), offered as a candidate.
    port_mapping: Option<(SocketAddr, SocketAddr)>,
    /// Devices that offered to relay for us (in their presence), by device.
    relay_offers: BTreeMap<DeviceId, RelayOffer>,
    /// Exits that answer DNS for the devices they carry: on which port.
    exit_dns: BTreeMap<DeviceId, u16>,
    /// Our registrations with those relays: one per session and relay.
    peer_relays: Vec<PeerRelay>,
    bindings: Vec<StunBinding>,
    relays: Vec<TurnAllocation>,
    gathering_due: bool,
    /// The time of the last [`Engine::handle_timeout`].
    clock: Option<Instant>,
    /// Whether something besides WireGuard data came in since the last
    /// [`Engine::handle_timeout`], which then has work to do whatever the timers say.
    kicked: bool,
    /// The earliest timer of the links and the STUN and TURN clients, while it holds: only
    /// what the social network, STUN or the timers bring changes it, not WireGuard data.
    timers: Option<Option<Instant>>,
    /// Room to copy a datagram before it is wrapped for a relay.
    relay_scratch: Vec<u8>,
    /// The prefixes devices route, by device and overlay (only devices that route some).
    advertised: BTreeMap<DeviceId, BTreeMap<OverlayId, Vec<IpNet>>>,
    /// The overlays whose devices' routes are taken (`accept_routes`).
    accepting: BTreeSet<OverlayId>,
    /// What became of every routed prefix, in the order they were settled.
    routes: Vec<RouteStatus>,
    /// Counts up whenever `routes` changes: the daemon's routes on the TUN device follow.
    routes_version: u64,
    /// The networks of this device's own interfaces, which no routed prefix may cover.
    local_networks: Vec<IpNet>,
    /// Which exit this device wants, and the one whose default routes it takes.
    exit: ExitChoice,
    exit_in_use: Option<DeviceId>,
    /// Orders for the data plane's extra sockets.
    socket_orders: VecDeque<SocketOrder>,
    /// The extra sockets open, by port, and the device each serves.
    extra_ports: HashMap<u16, DeviceId>,
    /// Peer endpoints reached from an extra socket (a punched path), and its port.
    punched: HashMap<SocketAddr, u16>,
    punch_stats: PunchStats,
    /// How many devices' links were settled: tests check that an event looks at few.
    #[cfg(test)]
    settled: usize,
}

impl Engine {
    /// An engine around `node`, in `overlays`, starting from what it remembered last time.
    /// `seed` feeds session identifiers and retry jitter, which others see; `secret` feeds the
    /// STUN transaction IDs, which must stay unpredictable. Both must be random.
    pub fn new(
        node: Node,
        overlays: Vec<OverlayConfig>,
        memory: Memory,
        seed: u64,
        secret: u64,
    ) -> Self {
        let key = node.public_key();
        let mut holders: HashMap<PublicKey, DeviceId> = HashMap::new();
        for (device, pinned) in &memory.pins {
            match holders.get(pinned) {
                Some(first) => {
                    tracing::warn!(%device, holder = %first, key = %pinned.fingerprint(), "a key is pinned for two devices; the first keeps it, `ipop trust` moves it");
                }
                None => {
                    holders.insert(*pinned, device.clone());
                }
            }
        }
        let policies = overlays
            .iter()
            .map(|o| (o.id.clone(), (o.links, o.idle_timeout)))
            .collect();
        let accepting = overlays
            .iter()
            .filter(|o| o.accept_routes)
            .map(|o| o.id.clone())
            .collect();
        Engine {
            key,
            node,
            plans: Plans::new(&key, overlays, memory),
            policies,
            sizes: BTreeMap::new(),
            online_in: HashMap::new(),
            by_address: HashMap::new(),
            held: Held::default(),
            demanded: Vec::new(),
            arrivals: HashMap::new(),
            addresses_version: 0,
            me: None,
            online: false,
            hosts: Vec::new(),
            members: BTreeMap::new(),
            devices: BTreeMap::new(),
            strangers: BTreeMap::new(),
            holders,
            absent: BTreeSet::new(),
            absent_due: None,
            refusal_logs: HashMap::new(),
            links: BTreeMap::new(),
            pending: HashMap::new(),
            signals: VecDeque::new(),
            transmits: VecDeque::new(),
            drops: Drops::default(),
            rng: seed | 1,
            secret,
            clients: 0,
            offered_servers: Vec::new(),
            config_servers: Vec::new(),
            gathered: Vec::new(),
            port_mapping: None,
            relay_offers: BTreeMap::new(),
            exit_dns: BTreeMap::new(),
            peer_relays: Vec::new(),
            bindings: Vec::new(),
            relays: Vec::new(),
            gathering_due: false,
            clock: None,
            kicked: true,
            timers: None,
            relay_scratch: vec![0; 65535 + 32],
            advertised: BTreeMap::new(),
            accepting,
            routes: Vec::new(),
            routes_version: 0,
            local_networks: Vec::new(),
            exit: ExitChoice::Off,
            exit_in_use: None,
            socket_orders: VecDeque::new(),
            extra_ports: HashMap::new(),
            punched: HashMap::new(),
            punch_stats: PunchStats::default(),
            #[cfg(test)]
            settled: 0,
        }
    }

    pub fn node(&self) -> &Node {
        &self.node
    }

    /// Counts up whenever a peer is added or removed, or the addresses of a link change:
    /// what the daemon's DNS names follow.
    pub fn addresses_version(&self) -> u64 {
        self.node.version().wrapping_add(self.addresses_version)
    }

    /// Notes that something other than WireGuard data changed the engine's state: the next
    /// [`Engine::handle_timeout`] is due at once, and the timers are looked at again.
    fn kick(&mut self) {
        self.kicked = true;
        self.timers = None;
    }

    /// Whether [`Engine::handle_timeout`] has work to do at `now`: something came in that
    /// it follows up, or a timer has expired. The loop calls it only then.
    pub fn is_due(&mut self, now: Instant) -> bool {
        self.kicked || self.poll_timeout().is_some_and(|t| t <= now)
    }

    /// The local addresses (with the UDP port) offered as host candidates.
    pub fn set_host_candidates(&mut self, hosts: Vec<SocketAddr>) {
        self.kick();
        self.hosts = hosts;
    }

    /// Data path, TUN side: see [`Node::handle_tun`]. A datagram for a peer reached through a
    /// TURN relay is wrapped for the relay (ChannelData) and goes to the TURN server.
    ///
    /// `out` must hold at least `packet.len() + 32 + turn::MAX_OVERHEAD` bytes, and 152 (a
    /// handshake initiation in ChannelData). A datagram for a bound TURN channel is encrypted
    /// behind room for the ChannelData header, which is then written in front of it: nothing is
    /// copied.
    pub fn handle_tun(&mut self, packet: &mut [u8], out: &mut [u8]) -> Option<Wire> {
        let relays = &self.relays;
        let sent = self
            .node
            .handle_tun_with_headroom(packet, out, |peer, via| {
                match via.and_then(|r| relays.get(r)) {
                    Some(relay) if relay.frames_in_place(peer) => CHANNEL_DATA_HEADER,
                    _ => 0,
                }
            });
        let o = match sent {
            Ok(o) => o,
            Err(Unsent::Handled) => return None,
            Err(Unsent::NoRoute(dst)) => {
                self.hold(dst, packet, DropReason::NoRoute);
                return None;
            }
            Err(Unsent::NoEndpoint(dst)) => {
                self.hold(dst, packet, DropReason::NoEndpoint);
                return None;
            }
        };
        let Some(r) = o.via else {
            let source = if self.punched.is_empty() {
                None
            } else {
                self.punched.get(&o.destination).copied()
            };
            return Some(Wire {
                destination: o.destination,
                len: o.len,
                stream: false,
                source,
            });
        };
        let Some(relay) = self.relays.get_mut(r) else {
            self.drops.count(DropReason::NoEndpoint);
            return None;
        };
        let framed = if o.start == CHANNEL_DATA_HEADER {
            relay.frame_in_place(o.destination, out, o.len)
        } else {
            // No channel yet: a Send indication, whose header is longer, around a copy.
            self.relay_scratch[..o.len].copy_from_slice(&out[o.start..o.start + o.len]);
            relay.encapsulate(o.destination, &self.relay_scratch[..o.len], out)
        };
        match framed {
            Ok(n) => Some(Wire {
                destination: relay.server(),
                len: n,
                stream: relay.transport() != IceTransport::Udp,
                source: None,
            }),
            Err(e) => {
                tracing::debug!(peer = %o.destination, "cannot relay: {e}");
                self.drops.count(DropReason::NoEndpoint);
                None
            }
        }
    }

    /// A packet from the TUN device that no peer with an endpoint takes. When it is for a
    /// device with a link that is not up (on demand at rest, or still being set up), it is
    /// held until the link is up, and an on-demand link at rest opens; otherwise it is dropped
    /// and counted as `unsent` says.
    #[cold]
    fn hold(&mut self, dst: IpAddr, packet: &[u8], unsent: DropReason) {
        let routed = || {
            self.routes
                .iter()
                .filter(|r| matches!(r.state, RouteState::Accepted { .. }))
                .find(|r| r.prefix.contains(&dst))
                .map(|r| &r.device)
        };
        let Some(device) = self.by_address.get(&dst).or_else(routed) else {
            self.drops.count(unsent);
            return;
        };
        let Some(link) = self.links.get_mut(device).filter(|l| !l.offline) else {
            self.drops.count(unsent);
            return;
        };
        if !self.held.push(device, packet) {
            self.drops.count(DropReason::LinkQueueFull);
        }
        if !link.demanded {
            link.demanded = true;
            self.demanded.push(device.clone());
            self.kicked = true;
            self.timers = None;
        }
    }

    /// Sends the packets held for links whose WireGuard session is now up. (Not before: handed
    /// to a session still in its handshake, a packet would start handshakes of its own, which
    /// cross the other side's when both devices start at once.)
    fn release_held(&mut self) {
        if self.held.is_empty() {
            return;
        }
        let ready: Vec<DeviceId> = self
            .held
            .devices()
            .filter(|d| {
                self.links
                    .get(*d)
                    .and_then(|l| l.peer)
                    .is_some_and(|i| self.node.has_session(i))
            })
            .cloned()
            .collect();
        for device in ready {
            for mut packet in self.held.take(&device) {
                let mut out = vec![0u8; packet.len() + 32 + 148];
                match self
                    .node
                    .handle_tun_with_headroom(&mut packet, &mut out, |_, _| 0)
                {
                    Ok(o) => self.transmits.push_back(Transmit {
                        destination: o.destination,
                        via: o.via,
                        stream: false,
                        source: None,
                        payload: out[o.start..o.start + o.len].to_vec(),
                    }),
                    Err(Unsent::Handled) => {}
                    Err(Unsent::NoRoute(_) | Unsent::NoEndpoint(_)) => {
                        self.drops.count(DropReason::LinkNotUp);
                    }
                }
            }
        }
    }

    /// Data path, network side: STUN goes to the ICE agents, the rest to WireGuard (see
    /// [`Node::handle_udp`]). `local` is the address the datagram arrived at.
    pub fn handle_udp(
        &mut self,
        now: Instant,
        local: SocketAddr,
        from: SocketAddr,
        datagram: &[u8],
        out: &mut [u8],
    ) -> Option<usize> {
        if let Some(r) = self
            .relays
            .iter()
            .position(|a| a.server() == from && a.transport() == IceTransport::Udp)
        {
            return self.handle_from_relay(now, r, from, datagram, out);
        }
        if classify(datagram) == DatagramKind::Stun {
            self.kick();
            if self.take_probe(now, local, from, datagram) {
                return None;
            }
            if let Some(id) = crate::stun::transaction_id(datagram) {
                if let Some(b) = self.bindings.iter_mut().find(|b| b.owns_transaction(&id)) {
                    b.handle_response(now, from, datagram);
                    self.drive_gathering(now);
                    return None;
                }
                if let Some(r) = self
                    .peer_relays
                    .iter_mut()
                    .find(|r| r.client.owns_transaction(&id))
                {
                    r.client.handle_response(now, from, datagram);
                    self.drive_peer_relays();
                    return None;
                }
            }
            self.handle_stun(now, local, from, datagram);
            return None;
        }
        let delivered = self.node.handle_udp(from, None, datagram, out);
        self.follow_roams(now, Some(local));
        self.release_held();
        delivered
    }

    /// Takes note of peers that roamed off a quiet path: a relay they now come through gets
    /// a channel, and the move is logged. The agent keeps its nominated pair; only a new
    /// nomination (a working pair) moves the endpoint again, so it never goes back to the
    /// dead path on its own. `local` is where the datagram that moved it arrived, unless it came
    /// through a relay: a peer heard on an extra socket is answered from it.
    fn follow_roams(&mut self, now: Instant, local: Option<SocketAddr>) {
        while let Some((index, endpoint, via)) = self.node.poll_roamed() {
            match local.filter(|l| via.is_none() && self.extra_ports.contains_key(&l.port())) {
                Some(l) => self.punched.insert(endpoint, l.port()),
                None => self.punched.remove(&endpoint),
            };
            if let Some(relay) = via.and_then(|r| self.relays.get_mut(r))
                && let Err(e) = relay.bind_channel(now, endpoint)
            {
                tracing::debug!(%endpoint, "no TURN channel: {e}");
            }
            let relayed = via
                .and_then(|r| self.relays.get(r))
                .and_then(TurnAllocation::relayed_address);
            let Some((device, link)) = self.links.iter_mut().find(|(_, l)| l.peer == Some(index))
            else {
                continue;
            };
            tracing::info!(%device, %endpoint, relayed = via.is_some(), "the path went quiet and the device was heard elsewhere: following it");
            // The session's pair follows, for status: our relayed address when it came through
            // our relay, else the local address of the old pair unless that was a relay's,
            // else a host candidate of the same family.
            if let Some(s) = link.session.as_mut()
                && let Some((old, _)) = s.nominated
            {
                let was_relayed = self.relays.iter().any(|a| a.relayed_address() == Some(old));
                let host = || {
                    s.agent
                        .local_candidates()
                        .find(|c| {
                            c.kind() == is::CandidateKind::Host
                                && c.addr().is_ipv4() == endpoint.is_ipv4()
                        })
                        .map(|c| c.addr())
                };
                let source = relayed.or(if was_relayed { host() } else { Some(old) });
                if let Some(source) = source {
                    s.nominated = Some((source, endpoint));
                }
            }
        }
    }

    /// A frame from the TCP connection to the TURN server `server`; as
    /// [`Engine::handle_udp`].
    pub fn handle_stream(
        &mut self,
        now: Instant,
        server: SocketAddr,
        frame: &[u8],
        out: &mut [u8],
    ) -> Option<usize> {
        let r = self
            .relays
            .iter()
            .position(|a| a.server() == server && a.transport() != IceTransport::Udp)?;
        self.handle_from_relay(now, r, server, frame, out)
    }

    /// The TURN servers this engine reaches over a stream, TCP or TLS: the daemon keeps a
    /// connection to each (TLS checks the certificate against the server's `host`).
    pub fn stream_servers(&self) -> Vec<IceServer> {
        self.servers()
            .filter(|s| {
                s.transport != IceTransport::Udp
                    && self
                        .relays
                        .iter()
                        .any(|a| a.server() == s.address && a.transport() == s.transport)
            })
            .cloned()
            .collect()
    }

    /// A datagram from a TURN server: an answer for the allocation, or data from a peer.
    fn handle_from_relay(
        &mut self,
        now: Instant,
        r: usize,
        from: SocketAddr,
        datagram: &[u8],
        out: &mut [u8],
    ) -> Option<usize> {
        let input = self.relays[r].handle_input(now, from, datagram);
        if !matches!(input, TurnInput::Data { .. }) {
            self.kick();
        }
        match input {
            TurnInput::NotOurs => {
                // A TURN server answers STUN Binding requests too.
                if let Some(id) = crate::stun::transaction_id(datagram)
                    && let Some(b) = self.bindings.iter_mut().find(|b| b.owns_transaction(&id))
                {
                    b.handle_response(now, from, datagram);
                } else {
                    self.drops.count(DropReason::UnknownStun);
                }
                self.drive_gathering(now);
                None
            }
            TurnInput::Handled => {
                self.drive_gathering(now);
                None
            }
            TurnInput::Data { peer, payload } => {
                let inner = datagram.get(payload)?;
                match classify(inner) {
                    DatagramKind::Stun => {
                        self.kick();
                        let relayed = self.relays[r].relayed_address()?;
                        self.handle_stun(now, relayed, peer, inner);
                        None
                    }
                    _ => {
                        let delivered = self.node.handle_udp(peer, Some(r), inner, out);
                        self.follow_roams(now, None);
                        self.release_held();
                        delivered
                    }
                }
            }
        }
    }

    fn handle_stun(&mut self, now: Instant, local: SocketAddr, from: SocketAddr, datagram: &[u8]) {
        let Ok(message) = StunMessage::parse(datagram) else {
            self.drops.count(DropReason::MalformedStun);
            return;
        };
        let Some(device) = self
            .links
            .iter()
            .find(|(_, l)| {
                l.session
                    .as_ref()
                    .is_some_and(|s| s.agent.accepts_message(&message))
            })
            .map(|(d, _)| d.clone())
        else {
            self.drops.count(DropReason::UnknownStun);
            return;
        };
        let Some(link) = self.links.get_mut(&device) else {
            return;
        };
        let Some(session) = link.session.as_mut() else {
            return;
        };
        session.agent.handle_packet(
            now,
            StunPacket {
                proto: is::Protocol::Udp,
                source: from,
                destination: local,
                message,
            },
        );
        session.agent.handle_timeout(now);
        // Only this link's agent has anything new to say.
        self.drive_device(now, &device);
        self.release_held();
    }

    /// What the social network reports.
    pub fn handle_osn(&mut self, now: Instant, event: OsnEvent) {
        self.kick();
        match event {
            OsnEvent::Online { me } => {
                tracing::info!(device = %me, "social network session up");
                self.me = Some(me);
                self.online = true;
                // Links that lost their path meanwhile restart now, the side that opened each
                // session first (see `restart_due`).
                for s in self.links.values_mut().filter_map(|l| l.session.as_mut()) {
                    if s.lost.is_some() {
                        s.lost = Some(now);
                    }
                }
                self.reconcile(now);
            }
            OsnEvent::Offline => {
                tracing::info!("social network session down; links stay up");
                self.online = false;
            }
            OsnEvent::Members { overlay, users } => {
                self.members.insert(overlay, users.into_iter().collect());
                self.sort_devices();
                self.count_all();
                self.count_devices(now);
                self.reconcile(now);
                if !self.advertised.is_empty() {
                    self.plan_routes();
                }
            }
            OsnEvent::DeviceUp {
                overlay,
                device,
                key,
                claim,
                relay,
                routes,
                exit_dns,
            } => {
                match exit_dns {
                    Some(port) => self.exit_dns.insert(device.clone(), port),
                    None => self.exit_dns.remove(&device),
                };
                let before = self
                    .advertised
                    .get(&device)
                    .and_then(|by| by.get(&overlay))
                    .cloned()
                    .unwrap_or_default();
                if routes.is_empty() {
                    if let Some(by) = self.advertised.get_mut(&device) {
                        by.remove(&overlay);
                        if by.is_empty() {
                            self.advertised.remove(&device);
                        }
                    }
                } else {
                    self.advertised
                        .entry(device.clone())
                        .or_default()
                        .insert(overlay.clone(), routes.clone());
                }
                let routing = !before.is_empty() || !routes.is_empty();
                match relay {
                    Some(offer) if self.is_authorised_user(&device.user) => {
                        self.relay_offers.insert(device.clone(), offer);
                    }
                    _ => {
                        self.relay_offers.remove(&device);
                    }
                }
                self.device_up(now, overlay, device, key, claim);
                if routing {
                    self.plan_routes();
                }
            }
            OsnEvent::DeviceDown { overlay, device } => {
                self.relay_offers.remove(&device);
                self.exit_dns.remove(&device);
                self.device_down(now, &overlay, &device);
                if self.advertised.contains_key(&device) {
                    self.plan_routes();
                }
            }
            OsnEvent::Signal { from, signal } => self.handle_signal(now, from, signal),
            OsnEvent::IceServers(servers) => {
                tracing::info!(
                    count = servers.len(),
                    "STUN/TURN servers from the social network"
                );
                self.offered_servers = servers;
                self.gathering_due = true;
            }
            OsnEvent::SignalFailed {
                to,
                session,
                reason,
            } => {
                if self.is_current_session(&to, &session) {
                    if self.links.get(&to).is_some_and(|l| l.offline) {
                        // It cannot be signalled again either: WireGuard decides.
                        tracing::debug!(device = %to, "signalling failed while the device is offline on XMPP: {reason}");
                    } else {
                        self.fail(now, &to, &format!("signalling failed: {reason}"));
                    }
                }
            }
        }
    }

    /// A device announced ipop with `key` through `overlay`: only that device is looked at.
    fn device_up(
        &mut self,
        now: Instant,
        overlay: OverlayId,
        device: DeviceId,
        key: PublicKey,
        claim: Option<Claim>,
    ) {
        if self.me.as_ref() == Some(&device) {
            return;
        }
        let counted = self.counted_in(&device);
        let seen = Seen {
            claim,
            present: true,
        };
        let authorised = self
            .members
            .get(&overlay)
            .is_some_and(|users| users.contains(&device.user));
        if !authorised {
            if self.members.contains_key(&overlay) {
                self.drops.count(DropReason::DeviceNotAuthorised);
                if self.may_log(now, &device.user) {
                    tracing::info!(%device, %overlay, "not linking: the device announced ipop, but its user is not authorised by this overlay");
                }
            }
            if !self.devices.contains_key(&device) {
                self.remember_stranger(device, key, overlay, seen);
                return;
            }
        }
        let before = self.strangers.remove(&device);
        let entry = self
            .devices
            .entry(device.clone())
            .or_insert_with(|| before.unwrap_or_else(|| Announced::new(key)));
        if entry.key != key {
            // Another key than before: what was seen with the old one no longer holds.
            *entry = Announced::new(key);
        }
        entry.via.insert(overlay, seen);
        if entry.via.values().all(|s| s.present) {
            self.absent.remove(&device);
        }
        if let Some(link) = self.links.get_mut(&device)
            && link.offline
        {
            link.offline = false;
            tracing::info!(%device, "the device is back online on XMPP");
            // A path lost meanwhile is restarted now, the side that opened the session first.
            if let Some(s) = link.session.as_mut()
                && s.lost.is_some()
            {
                s.lost = Some(now);
            }
        }
        self.recount(&device, counted);
        self.count_devices(now);
        self.settle(now, &device);
    }

    /// Keeps an announcement from a device that no overlay authorises, in memory and while
    /// there is room: status lists it, and a membership that arrives later finds it.
    fn remember_stranger(
        &mut self,
        device: DeviceId,
        key: PublicKey,
        overlay: OverlayId,
        seen: Seen,
    ) {
        if !self.strangers.contains_key(&device) && self.strangers.len() >= MAX_STRANGERS {
            return;
        }
        let entry = self
            .strangers
            .entry(device)
            .or_insert_with(|| Announced::new(key));
        if entry.key != key {
            *entry = Announced::new(key);
        }
        entry.via.insert(overlay, seen);
    }

    /// The presence of `device` in `overlay` is gone. While WireGuard vouches for its link, the
    /// device only goes absent there; otherwise it is forgotten there.
    fn device_down(&mut self, now: Instant, overlay: &OverlayId, device: &DeviceId) {
        if let Some(entry) = self.strangers.get_mut(device) {
            entry.via.remove(overlay);
            if entry.via.is_empty() {
                self.strangers.remove(device);
            }
            return;
        }
        let alive = self.alive_until(now, device);
        let counted = self.counted_in(device);
        let Some(entry) = self.devices.get_mut(device) else {
            return;
        };
        let Some(seen) = entry.via.get_mut(overlay) else {
            return;
        };
        match alive {
            Some(until) => {
                seen.present = false;
                let offline = entry.offline();
                self.absent.insert(device.clone());
                self.absent_due = Some(self.absent_due.map_or(until, |t| t.min(until)));
                if offline && let Some(link) = self.links.get_mut(device) {
                    link.offline = true;
                    tracing::info!(%device, "the device is offline on XMPP; its link stays while WireGuard hears from it");
                }
            }
            None => {
                entry.via.remove(overlay);
                if entry.via.is_empty() {
                    self.devices.remove(device);
                }
            }
        }
        self.recount(device, counted);
        self.count_devices(now);
        self.settle(now, device);
    }

    /// Until when WireGuard vouches for the link to `device`: `SILENCE_LIMIT` after it last
    /// heard from the device, if that is still to come.
    fn alive_until(&self, now: Instant, device: &DeviceId) -> Option<Instant> {
        let heard = self.node.last_heard(self.links.get(device)?.peer?)?;
        let until = heard + SILENCE_LIMIT;
        (until > now).then_some(until)
    }

    /// Forgets the lost presences of devices whose links WireGuard no longer vouches for, and
    /// closes those links when no presence is left; sets the next deadline from the others.
    fn expire_absent(&mut self, now: Instant) {
        self.absent_due = None;
        let mut silent = Vec::new();
        for device in std::mem::take(&mut self.absent) {
            if !self.devices.contains_key(&device) {
                continue;
            }
            match self.alive_until(now, &device) {
                Some(until) => {
                    self.absent_due = Some(self.absent_due.map_or(until, |t| t.min(until)));
                    self.absent.insert(device);
                }
                None => silent.push(device),
            }
        }
        for device in silent {
            let counted = self.counted_in(&device);
            let Some(entry) = self.devices.get_mut(&device) else {
                continue;
            };
            entry.via.retain(|_, s| s.present);
            if entry.via.is_empty() {
                self.devices.remove(&device);
                if self.links.contains_key(&device) {
                    let why = "WireGuard heard nothing from it for 3 minutes while it was offline on XMPP";
                    tracing::info!(%device, "closing link: {why}");
                    self.drop_link(now, &device, why);
                }
            }
            self.recount(&device, counted);
            self.settle(now, &device);
        }
        self.count_devices(now);
        if !self.advertised.is_empty() {
            self.plan_routes();
        }
    }

    /// Settles what becomes of every prefix that devices route: taken where the overlay
    /// accepts routes and the prefix overlaps no overlay, no network of this device and no
    /// prefix taken before it (devices in order of their IDs, so that the outcome does not
    /// depend on who came online first). The links of the devices whose routes changed get
    /// them.
    fn plan_routes(&mut self) {
        let own = self.plans.own_networks();
        let mut planned: Vec<RouteStatus> = Vec::new();
        for (device, by_overlay) in &self.advertised {
            let Some(entry) = self.devices.get(device) else {
                continue;
            };
            for (overlay, prefixes) in by_overlay {
                let authorised = entry.via.contains_key(overlay)
                    && self
                        .members
                        .get(overlay)
                        .is_some_and(|users| users.contains(&device.user));
                if !authorised {
                    continue;
                }
                for prefix in prefixes {
                    if prefix.prefix_len() == 0 {
                        // An exit's default route: taken from the exit in use, in the first
                        // overlay it offers itself in.
                        let in_use = self.exit_in_use.as_ref() == Some(device)
                            && !planned.iter().any(|r| {
                                r.prefix == *prefix
                                    && matches!(r.state, RouteState::Accepted { .. })
                            });
                        let state = match self
                            .plans
                            .source_in(overlay, prefix.addr().is_ipv4())
                            .filter(|_| in_use)
                        {
                            Some(source) => RouteState::Accepted { source },
                            None => RouteState::NotAccepted,
                        };
                        planned.push(RouteStatus {
                            prefix: *prefix,
                            device: device.clone(),
                            overlay: overlay.clone(),
                            state,
                        });
                        continue;
                    }
                    let taken = planned.iter().find(|r| {
                        matches!(r.state, RouteState::Accepted { .. })
                            && r.prefix.prefix_len() > 0
                            && overlaps(&r.prefix, prefix)
                    });
                    let state = if !self.accepting.contains(overlay) {
                        RouteState::NotAccepted
                    } else if let Some((o, net)) = own.iter().find(|(_, n)| overlaps(n, prefix)) {
                        RouteState::Refused(format!("overlaps {net} of the {o} overlay"))
                    } else if let Some(net) =
                        self.local_networks.iter().find(|n| overlaps(n, prefix))
                    {
                        RouteState::Refused(format!("overlaps {net}, a network of this device"))
                    } else if let Some(r) = taken {
                        RouteState::Refused(format!(
                            "overlaps {}, routed by {}",
                            r.prefix, r.device
                        ))
                    } else {
                        match self.plans.source_in(overlay, prefix.addr().is_ipv4()) {
                            Some(source) => RouteState::Accepted { source },
                            None => RouteState::Refused("no address in the overlay".to_owned()),
                        }
                    };
                    planned.push(RouteStatus {
                        prefix: *prefix,
                        device: device.clone(),
                        overlay: overlay.clone(),
                        state,
                    });
                }
            }
        }
        if planned == self.routes {
            return;
        }
        let accepted = |r: &&RouteStatus| matches!(r.state, RouteState::Accepted { .. });
        let touched: BTreeSet<DeviceId> = self
            .routes
            .iter()
            .chain(&planned)
            .filter(accepted)
            .map(|r| r.device.clone())
            .collect();
        for r in planned.iter().filter(|r| !self.routes.contains(r)) {
            tracing::info!(prefix = %r.prefix, device = %r.device, overlay = %r.overlay, state = ?r.state, "a routed prefix");
        }
        self.routes = planned;
        self.routes_version += 1;
        // A prefix that moves from one device to another is taken only once the first let
        // go of it: a second pass gives it to the second when it came first.
        let passes = if touched.len() > 1 { 2 } else { 1 };
        for _ in 0..passes {
            for device in &touched {
                self.set_peer_addresses(device);
            }
        }
    }

    /// The devices that offer to be an exit: they route the default routes for an overlay that
    /// authorises them.
    fn exit_offers(&self) -> Vec<DeviceId> {
        self.advertised
            .iter()
            .filter(|(device, by_overlay)| {
                let Some(entry) = self.devices.get(*device) else {
                    return false;
                };
                by_overlay.iter().any(|(overlay, prefixes)| {
                    prefixes.iter().any(|p| p.prefix_len() == 0)
                        && entry.via.contains_key(overlay)
                        && self
                            .members
                            .get(overlay)
                            .is_some_and(|users| users.contains(&device.user))
                })
            })
            .map(|(device, _)| device.clone())
            .collect()
    }

    /// Whether the link to `device` carries traffic: the device is online, its WireGuard
    /// session is up and ICE has not lost its path.
    fn link_up(&self, device: &DeviceId) -> bool {
        self.links.get(device).is_some_and(|l| {
            !l.offline
                && l.peer
                    .and_then(|i| self.node.peer(i))
                    .is_some_and(|p| p.state == LinkState::Connected)
                && l.session.as_ref().is_none_or(|s| s.lost.is_none())
        })
    }

    /// The exit to use now. A chosen device while it offers; with `auto`, the exit in use
    /// while its link is up and its path answers, else the one with the lowest round-trip time
    /// among those whose link is up, else (to open a link) the first that offers. An exit in
    /// use whose path has left traffic unanswered for [`EXIT_FAILOVER`] is replaced before ICE
    /// gives the path up: internet traffic waits on it.
    fn choose_exit(&self) -> Option<DeviceId> {
        let offers = self.exit_offers();
        match &self.exit {
            ExitChoice::Off => None,
            ExitChoice::Device(d) => offers.contains(d).then(|| d.clone()),
            ExitChoice::Auto => {
                if let Some(current) = &self.exit_in_use
                    && offers.contains(current)
                    && self.exit_usable(current)
                {
                    return Some(current.clone());
                }
                let rtt = |d: &DeviceId| {
                    self.links
                        .get(d)
                        .and_then(|l| l.session.as_ref())
                        .and_then(|s| s.agent.nominated_pair_rtt())
                        .unwrap_or(Duration::MAX)
                };
                offers
                    .iter()
                    .filter(|d| self.exit_usable(d))
                    .min_by_key(|d| (rtt(d), (*d).clone()))
                    .or_else(|| offers.first())
                    .cloned()
            }
        }
    }

    /// Whether the exit `device` carries traffic: its link is up, and its path has not left
    /// traffic unanswered for [`EXIT_FAILOVER`].
    fn exit_usable(&self, device: &DeviceId) -> bool {
        let failing = self
            .links
            .get(device)
            .and_then(|l| l.session.as_ref())
            .zip(self.clock)
            .is_some_and(|(s, now)| s.consent.unanswered_for(now) >= EXIT_FAILOVER);
        self.link_up(device) && !failing
    }

    /// Takes another exit when the choice says so.
    fn follow_exit(&mut self) {
        let chosen = self.choose_exit();
        if chosen != self.exit_in_use {
            tracing::info!(from = ?self.exit_in_use, to = ?chosen, "the exit in use changes");
            self.exit_in_use = chosen;
            self.plan_routes();
        }
    }

    /// Which exit to send internet traffic through.
    pub fn set_exit(&mut self, choice: ExitChoice) {
        self.exit = choice;
        self.kick();
        self.follow_exit();
    }

    /// The exit in use.
    pub fn exit_status(&self) -> ExitStatus {
        ExitStatus {
            choice: self.exit.clone(),
            in_use: self.exit_in_use.clone(),
            up: self
                .exit_in_use
                .as_ref()
                .is_some_and(|d| self.exit_usable(d)),
            offered: self.exit_offers(),
            dns: self
                .exit_in_use
                .as_ref()
                .and_then(|d| self.exit_dns.get(d).copied()),
        }
    }

    /// The addresses of the link to `device` (its host routes first), if there is one.
    pub fn link_addresses(&self, device: &DeviceId) -> &[IpNet] {
        self.links.get(device).map_or(&[], |l| &l.addresses)
    }

    /// The prefixes this device takes from `device`.
    fn accepted_from<'a>(&'a self, device: &'a DeviceId) -> impl Iterator<Item = IpNet> + 'a {
        self.routes
            .iter()
            .filter(move |r| &r.device == device && matches!(r.state, RouteState::Accepted { .. }))
            .map(|r| r.prefix)
    }

    /// What became of the prefixes devices route.
    pub fn routes(&self) -> &[RouteStatus] {
        &self.routes
    }

    /// Counts up whenever [`Engine::routes`] changes.
    pub fn routes_version(&self) -> u64 {
        self.routes_version
    }

    /// The networks of this device's own interfaces (its LANs), which routed prefixes must
    /// not cover.
    pub fn set_local_networks(&mut self, mut networks: Vec<IpNet>) {
        networks.sort();
        networks.dedup();
        if networks != self.local_networks {
            self.local_networks = networks;
            if !self.advertised.is_empty() {
                self.plan_routes();
            }
        }
    }

    /// After a change of members: devices that no overlay authorises any more become strangers
    /// (their lost presences forgotten), strangers that one now authorises become devices.
    fn sort_devices(&mut self) {
        let authorises =
            |members: &BTreeMap<OverlayId, BTreeSet<String>>, device: &DeviceId, a: &Announced| {
                a.via
                    .keys()
                    .any(|o| members.get(o).is_some_and(|u| u.contains(&device.user)))
            };
        let promoted: Vec<DeviceId> = self
            .strangers
            .iter()
            .filter(|(d, a)| authorises(&self.members, d, a))
            .map(|(d, _)| d.clone())
            .collect();
        let demoted: Vec<DeviceId> = self
            .devices
            .iter()
            .filter(|(d, a)| !authorises(&self.members, d, a))
            .map(|(d, _)| d.clone())
            .collect();
        for device in promoted {
            if let Some(a) = self.strangers.remove(&device) {
                self.devices.insert(device, a);
            }
        }
        for device in demoted {
            let Some(mut a) = self.devices.remove(&device) else {
                continue;
            };
            self.absent.remove(&device);
            a.via.retain(|_, s| s.present);
            a.refused = None;
            if !a.via.is_empty() && self.strangers.len() < MAX_STRANGERS {
                self.strangers.insert(device, a);
            }
        }
    }

    /// Whether a refusal about `subject` (a user or a device) may be logged now: at most once
    /// per `REFUSAL_LOG_INTERVAL`, remembering at most `REFUSAL_LOG_SUBJECTS` subjects.
    fn may_log(&mut self, now: Instant, subject: &str) -> bool {
        let recent = |t: &Instant| now.saturating_duration_since(*t) < REFUSAL_LOG_INTERVAL;
        match self.refusal_logs.get(subject) {
            Some(last) if recent(last) => return false,
            Some(_) => {}
            None if self.refusal_logs.len() >= REFUSAL_LOG_SUBJECTS => {
                self.refusal_logs.retain(|_, t| recent(t));
                if self.refusal_logs.len() >= REFUSAL_LOG_SUBJECTS {
                    return false;
                }
            }
            None => {}
        }
        self.refusal_logs.insert(subject.to_owned(), now);
        true
    }

    /// Whether `session` is the session of the link to `device` now.
    fn is_current_session(&self, device: &DeviceId, session: &str) -> bool {
        self.links
            .get(device)
            .and_then(|l| l.session.as_ref())
            .is_some_and(|s| s.id == session)
    }

    /// What to make of `device`: link it with which key, or why not.
    fn verdict(&self, device: &DeviceId) -> Verdict {
        let Some(announced) = self.devices.get(device) else {
            return Verdict::Gone;
        };
        if self.authorising(device).is_empty() {
            return Verdict::NotAuthorised;
        }
        let key = announced.key;
        if key == self.key
            && let Some(me) = &self.me
        {
            return Verdict::Refused(UnlinkedReason::KeyClaimedByOther { holder: me.clone() });
        }
        if let Some(holder) = self.holders.get(&key).filter(|h| *h != device) {
            return Verdict::Refused(UnlinkedReason::KeyClaimedByOther {
                holder: holder.clone(),
            });
        }
        match self.plans.memory.pins.get(device) {
            Some(pinned) if *pinned != key => {
                Verdict::Refused(UnlinkedReason::KeyNotTrusted { pinned: *pinned })
            }
            Some(_) => Verdict::Link { key, pin: false },
            None => Verdict::Link { key, pin: true },
        }
    }

    /// Counts and logs a refusal of `device`'s key, once per key and reason.
    fn note_refusal(&mut self, now: Instant, device: &DeviceId, reason: UnlinkedReason) {
        let Some(announced) = self.devices.get_mut(device) else {
            return;
        };
        if announced.refused.as_ref() == Some(&reason) {
            return;
        }
        announced.refused = Some(reason.clone());
        let key = announced.key;
        let logged = self.may_log(now, &device.to_string());
        match reason {
            UnlinkedReason::KeyNotTrusted { pinned } => {
                self.drops.count(DropReason::KeyNotTrusted);
                if logged {
                    tracing::warn!(%device, announced = %key.fingerprint(), pinned = %pinned.fingerprint(), "refusing a key other than the one pinned for this device; `ipop trust {device}` accepts it");
                }
            }
            UnlinkedReason::KeyClaimedByOther { holder } => {
                self.drops.count(DropReason::KeyClaimedByOther);
                if logged {
                    if self.me.as_ref() == Some(&holder) {
                        tracing::warn!(%device, key = %key.fingerprint(), "refusing a device that announces this device's own key");
                    } else {
                        tracing::warn!(%device, %holder, key = %key.fingerprint(), "refusing a device that announces the key pinned for {holder}; `ipop trust {device}` moves the key to it, and the link to {holder} goes");
                    }
                }
            }
            UnlinkedReason::NotAuthorised => {}
        }
    }

    /// The overlays through which `device` is both announced and authorised.
    fn authorising(&self, device: &DeviceId) -> Vec<OverlayId> {
        self.authorising_claims(device)
            .into_iter()
            .map(|(o, _)| o)
            .collect()
    }

    /// The overlays through which `device` is both announced and authorised, with the address
    /// it claims in each. A presence lost while the link lives still counts.
    fn authorising_claims(&self, device: &DeviceId) -> Vec<(OverlayId, Option<Claim>)> {
        let Some(announced) = self.devices.get(device) else {
            return Vec::new();
        };
        announced
            .via
            .iter()
            .filter(|(o, _)| {
                self.members
                    .get(*o)
                    .is_some_and(|users| users.contains(&device.user))
            })
            .map(|(o, s)| (o.clone(), s.claim))
            .collect()
    }

    /// Settles address collisions, then gives every link its current addresses. Only claims
    /// made where the claimant is authorised count.
    fn update_addresses(&mut self, me: &DeviceId) {
        let claims: Vec<(DeviceId, OverlayId, Claim)> = self
            .devices
            .keys()
            .filter(|d| *d != me)
            .flat_map(|d| {
                self.authorising_claims(d)
                    .into_iter()
                    .filter_map(move |(o, c)| Some((d.clone(), o, c?)))
            })
            .collect();
        self.plans.resolve(me, &claims);
        let linked: Vec<DeviceId> = self.links.keys().cloned().collect();
        for device in linked {
            self.set_peer_addresses(&device);
        }
        if !self.advertised.is_empty() {
            self.plan_routes();
        }
    }

    /// Gives the link to `device` its current addresses, after settling a claim it makes on one
    /// of ours (which may move us, and then every link's addresses change).
    fn update_device_addresses(&mut self, me: &DeviceId, device: &DeviceId) {
        let own = self.plans.claims();
        let contested = self.authorising_claims(device).iter().any(|(o, c)| {
            c.is_some_and(|c| {
                own.iter()
                    .any(|(mine, m)| mine == o && m.address == c.address)
            })
        });
        if contested {
            self.update_addresses(me);
        } else {
            self.set_peer_addresses(device);
        }
    }

    /// Gives the link to `device` the addresses its claims make: on its WireGuard peer when it
    /// has one, and in the table that finds the link for a packet whatever its state.
    fn set_peer_addresses(&mut self, device: &DeviceId) {
        let Some(link) = self.links.get(device) else {
            return;
        };
        let (key, peer) = (link.key, link.peer);
        let overlays = self.authorising_claims(device);
        let mut p = self.plans.peer(device, &key, &overlays);
        self.set_link_addresses(device, host_routes(&p));
        let Some(index) = peer else {
            return;
        };
        p.addresses.extend(self.accepted_from(device));
        let destinations = Destinations {
            own: p.destinations,
            routed: p.routed,
        };
        let refused = self
            .node
            .set_addresses(index, p.addresses, p.mapped, Some(destinations));
        if !refused.is_empty() {
            tracing::info!(%device, ?refused, "addresses already another peer's; left out");
        }
    }

    /// Records the addresses of the link to `device`, and which link each of them finds. An
    /// address that another link has already keeps finding that one.
    fn set_link_addresses(&mut self, device: &DeviceId, addresses: Vec<IpNet>) {
        let Some(link) = self.links.get_mut(device) else {
            return;
        };
        for a in &link.addresses {
            if self.by_address.get(&a.addr()) == Some(device) {
                self.by_address.remove(&a.addr());
            }
        }
        for a in &addresses {
            self.by_address
                .entry(a.addr())
                .or_insert_with(|| device.clone());
        }
        if link.addresses != addresses {
            link.addresses = addresses;
            self.addresses_version += 1;
        }
    }

    /// Forgets the addresses of the link to `device`, and drops what was held for it.
    fn forget_link_addresses(&mut self, device: &DeviceId) {
        self.set_link_addresses(device, Vec::new());
        self.drop_held(device);
    }

    /// Drops the packets held for `device`, counting them.
    fn drop_held(&mut self, device: &DeviceId) {
        let dropped = self.held.take(device).len();
        self.drops.count_many(DropReason::LinkNotUp, dropped as u64);
    }

    /// What the overlays that authorise `device` want of its link: kept whatever the traffic
    /// when one of them links every device, else on demand.
    fn wanted(&self, device: &DeviceId) -> Wanted {
        self.authorising(device)
            .iter()
            .fold(None, |w, o| Some(Wanted::combine(w, self.overlay_wants(o))))
            .unwrap_or(Wanted::Always)
    }

    /// What the policy of `overlay` means now: with `auto`, on demand from
    /// [`AUTO_THRESHOLD`] devices online.
    fn overlay_wants(&self, overlay: &OverlayId) -> Wanted {
        match self.policies.get(overlay) {
            None | Some((LinkPolicy::All, _)) => Wanted::Always,
            Some((LinkPolicy::OnDemand, idle)) => Wanted::OnDemand(*idle),
            Some((LinkPolicy::Auto, idle)) => {
                if self.sizes.get(overlay).copied().unwrap_or(1) >= AUTO_THRESHOLD {
                    Wanted::OnDemand(*idle)
                } else {
                    Wanted::Always
                }
            }
        }
    }

    /// Counts the devices online in each overlay whose policy is `auto`. Where the count
    /// crosses the threshold, the links that the overlay authorises follow its new policy.
    fn count_devices(&mut self, now: Instant) {
        let auto: Vec<OverlayId> = self
            .policies
            .iter()
            .filter(|(_, (p, _))| *p == LinkPolicy::Auto)
            .map(|(o, _)| o.clone())
            .collect();
        for overlay in auto {
            let online = self.online_in.get(&overlay).copied().unwrap_or(0);
            debug_assert_eq!(
                online,
                self.devices
                    .keys()
                    .filter(|d| self.counted_in(d).contains(&overlay))
                    .count(),
                "the online count of {overlay} drifted from the devices"
            );
            let before = self.overlay_wants(&overlay);
            let grew = self
                .sizes
                .insert(overlay.clone(), online + 1)
                .is_some_and(|size| size < online + 1);
            let arrivals = self.arrivals.entry(overlay.clone()).or_default();
            while arrivals
                .front()
                .is_some_and(|t| now.saturating_duration_since(*t) > AUTO_SETTLE)
            {
                arrivals.pop_front();
            }
            if grew {
                arrivals.push_back(now);
            }
            let after = self.overlay_wants(&overlay);
            if after == before {
                continue;
            }
            let links = if after == Wanted::Always {
                "to every device"
            } else {
                "on demand"
            };
            tracing::info!(%overlay, devices = online + 1, "the overlay crossed {AUTO_THRESHOLD} devices online: its links are now {links}");
            let concerned: Vec<DeviceId> = self
                .links
                .keys()
                .filter(|d| {
                    self.devices
                        .get(*d)
                        .is_some_and(|a| a.via.contains_key(&overlay))
                })
                .cloned()
                .collect();
            for device in concerned {
                self.apply_wanted(now, &device);
            }
        }
    }

    /// The overlays where `device` counts as online: present there, its user a member.
    fn counted_in(&self, device: &DeviceId) -> Vec<OverlayId> {
        let Some(a) = self.devices.get(device) else {
            return Vec::new();
        };
        a.via
            .iter()
            .filter(|(o, s)| {
                s.present
                    && self
                        .members
                        .get(*o)
                        .is_some_and(|m| m.contains(&device.user))
            })
            .map(|(o, _)| o.clone())
            .collect()
    }

    /// Moves `device`'s share of the online counts from `before` (where it counted before a
    /// change of its presences) to where it counts now.
    fn recount(&mut self, device: &DeviceId, before: Vec<OverlayId>) {
        for overlay in before {
            if let Some(n) = self.online_in.get_mut(&overlay) {
                *n = n.saturating_sub(1);
            }
        }
        for overlay in self.counted_in(device) {
            *self.online_in.entry(overlay).or_default() += 1;
        }
    }

    /// Counts every device anew, after a change of members.
    fn count_all(&mut self) {
        let counts: Vec<OverlayId> = self
            .devices
            .keys()
            .flat_map(|d| self.counted_in(d))
            .collect();
        self.online_in.clear();
        for overlay in counts {
            *self.online_in.entry(overlay).or_default() += 1;
        }
    }

    /// Brings the link to `device` in line with what its overlays want of it now. A link that
    /// becomes on-demand without having carried data goes to rest at once; one that carried
    /// data stays until it is idle. An on-demand link at rest that is now wanted whatever the
    /// traffic opens.
    fn apply_wanted(&mut self, now: Instant, device: &DeviceId) {
        let wanted = self.wanted(device);
        let first = self.me.as_ref().is_some_and(|me| me < device);
        let Some(link) = self.links.get_mut(device) else {
            return;
        };
        let before = std::mem::replace(&mut link.wanted, wanted);
        match (before, wanted) {
            (Wanted::Always, Wanted::OnDemand(_)) => {
                let carried = link.peer.and_then(|i| self.node.last_data(i)).is_some();
                if carried {
                    link.used = now;
                } else {
                    tracing::debug!(%device, "the link is on demand now and carried no data: back to idle");
                    self.rest(device, true);
                }
            }
            (Wanted::OnDemand(_), Wanted::Always) if link.idle => {
                link.idle = false;
                link.used = now;
                link.next_attempt = if first { now } else { now + ANSWER_GRACE };
            }
            _ => {}
        }
    }

    /// Puts a link to rest, on demand: its WireGuard peer and its session go (the other
    /// side is told, when `tell`), the packets held for it are dropped, and nothing is tried
    /// until traffic for the device, or its offer, comes.
    fn rest(&mut self, device: &DeviceId, tell: bool) {
        let Some(link) = self.links.get_mut(device) else {
            return;
        };
        if let Some(index) = link.peer.take() {
            self.node.remove_peer(index);
        }
        if let Some(s) = link.session.take()
            && tell
            && !link.offline
        {
            self.signals.push_back(Outgoing::new(
                device.clone(),
                Signal::Terminate {
                    session: s.id,
                    reason: TerminateReason::Idle,
                },
            ));
        }
        link.idle = true;
        link.backoff = BACKOFF_MIN;
        link.last_error = None;
        link.tried = (Vec::new(), Vec::new());
        self.drop_held(device);
    }

    /// When the on-demand link `link` has been without data for its idle time: counted from
    /// the later of the last data WireGuard carried and the last use.
    fn idle_due(&self, link: &Link) -> Option<Instant> {
        let Wanted::OnDemand(idle) = link.wanted else {
            return None;
        };
        if link.idle {
            return None;
        }
        let data = link.peer.and_then(|i| self.node.last_data(i));
        Some(data.map_or(link.used, |d| d.max(link.used)) + idle)
    }

    fn is_authorised_user(&self, user: &str) -> bool {
        self.members.values().any(|users| users.contains(user))
    }

    /// Brings every link in line with who is authorised and announced: after a change of
    /// members, or a new session.
    fn reconcile(&mut self, now: Instant) {
        let Some(me) = self.me.clone() else {
            return;
        };
        let all: BTreeSet<DeviceId> = self
            .devices
            .keys()
            .chain(self.links.keys())
            .cloned()
            .collect();
        for device in &all {
            self.settle_link(now, &me, device);
        }
        self.update_addresses(&me);
    }

    /// Brings the link to one device, and its addresses, in line with what is known of it.
    fn settle(&mut self, now: Instant, device: &DeviceId) {
        let Some(me) = self.me.clone() else {
            return;
        };
        self.settle_link(now, &me, device);
        self.update_device_addresses(&me, device);
    }

    /// Opens or closes the link to `device` as its verdict says; pins its key when it is first
    /// wanted.
    fn settle_link(&mut self, now: Instant, me: &DeviceId, device: &DeviceId) {
        #[cfg(test)]
        {
            self.settled += 1;
        }
        if device == me {
            return;
        }
        let key = match self.verdict(device) {
            Verdict::Link { key, pin } => {
                if pin {
                    tracing::info!(%device, key = %key.fingerprint(), "pinned the key of a new device");
                    self.plans.memory.pins.insert(device.clone(), key);
                    self.holders.insert(key, device.clone());
                    self.plans.remembered();
                }
                if let Some(a) = self.devices.get_mut(device) {
                    a.refused = None;
                }
                key
            }
            Verdict::Refused(reason) => {
                if self.links.contains_key(device) {
                    let why = match &reason {
                        UnlinkedReason::KeyClaimedByOther { .. } => {
                            "it announces a key that belongs to another device"
                        }
                        _ => "it announces another key than the one pinned for it",
                    };
                    tracing::info!(%device, "closing link: {why}");
                    self.drop_link(now, device, why);
                }
                self.note_refusal(now, device, reason);
                return;
            }
            Verdict::NotAuthorised | Verdict::Gone => {
                if self.links.contains_key(device) {
                    let why = if self.devices.contains_key(device)
                        || self.strangers.contains_key(device)
                        || !self.is_authorised_user(&device.user)
                    {
                        "the user is no longer authorised by any overlay"
                    } else {
                        "the device went offline"
                    };
                    tracing::info!(%device, "closing link: {why}");
                    self.drop_link(now, device, why);
                }
                return;
            }
        };
        if self.links.get(device).is_some_and(|l| l.key != key) {
            self.drop_link(now, device, "its key changed");
        }
        if self.links.contains_key(device) {
            self.apply_wanted(now, device);
            return;
        }
        let first = *me < *device;
        let offline = self.devices.get(device).is_some_and(Announced::offline);
        let wanted = self.wanted(device);
        let idle = wanted != Wanted::Always;
        let burst = self.authorising(device).iter().any(|o| {
            self.policies
                .get(o)
                .is_some_and(|(p, _)| *p == LinkPolicy::Auto)
                && self.arrivals.get(o).is_some_and(|a| a.len() >= 2)
        });
        let settle = if burst { AUTO_SETTLE } else { Duration::ZERO };
        tracing::info!(%device, key = %key.fingerprint(), on_demand = idle, "authorised device online");
        self.links.insert(
            device.clone(),
            Link {
                key,
                session: None,
                peer: None,
                next_attempt: if first {
                    now + settle
                } else {
                    now + ANSWER_GRACE
                },
                backoff: BACKOFF_MIN,
                last_error: None,
                tried: (Vec::new(), Vec::new()),
                offline,
                addresses: Vec::new(),
                wanted,
                idle,
                used: now,
                demanded: false,
                socket: None,
                sprayed: None,
            },
        );
        if let Some((id, offer, at)) = self.pending.remove(device)
            && now.saturating_duration_since(at) < PENDING_OFFER_TTL
        {
            self.accept(now, device.clone(), id, offer);
        }
    }

    /// Tears a link down: its WireGuard peer, its session (telling the other side).
    fn drop_link(&mut self, _now: Instant, device: &DeviceId, why: &str) {
        self.forget_link_addresses(device);
        if let Some(link) = self.links.remove(device) {
            if let Some(index) = link.peer {
                self.node.remove_peer(index);
            }
            if let Some(s) = link.session {
                tracing::debug!(%device, session = %s.id, "ending session: {why}");
                self.signals.push_back(Outgoing::new(
                    device.clone(),
                    Signal::Terminate {
                        session: s.id,
                        reason: TerminateReason::Done,
                    },
                ));
            }
        }
    }

    /// Abandons the current session of a link and schedules another attempt with back-off.
    fn fail(&mut self, now: Instant, device: &DeviceId, why: &str) {
        let jitter = self.jitter();
        let Some(link) = self.links.get_mut(device) else {
            return;
        };
        tracing::info!(%device, "link attempt failed: {why}; retrying in {:?}", link.backoff);
        if let Some(index) = link.peer.take() {
            self.node.remove_peer(index);
        }
        if let Some(s) = link.session.take() {
            link.tried = s.candidates();
            self.signals.push_back(Outgoing::new(
                device.clone(),
                Signal::Terminate {
                    session: s.id,
                    reason: TerminateReason::Failed,
                },
            ));
        }
        link.last_error = Some(why.to_owned());
        link.next_attempt = now + link.backoff + link.backoff.mul_f64(jitter * 0.25);
        link.backoff = (link.backoff * 2).min(BACKOFF_MAX);
    }

    /// Restarts ICE on a link whose path was lost: a new session with new credentials and the
    /// current candidates, which the other side accepts in place of the old one. The WireGuard
    /// peer stays; it moves to the new path once ICE chooses one. A restart that finds no path
    /// fails like any attempt, and the link is retried with back-off.
    fn restart(&mut self, now: Instant, device: &DeviceId) {
        let Some(link) = self.links.get_mut(device) else {
            return;
        };
        if let Some(s) = &link.session {
            tracing::info!(%device, session = %s.id, "the path stopped working; restarting ICE");
        }
        link.last_error = Some("the path stopped working; looking for another".to_owned());
        self.initiate(now, device);
    }

    /// A distinct seed for each STUN or TURN client, from the secret.
    fn client_seed(&mut self) -> u64 {
        self.clients += 1;
        self.secret ^ self.clients.wrapping_mul(0x9E37_79B9_7F4A_7C15)
    }

    /// A number in [0, 1) from the engine's generator (xorshift64).
    fn jitter(&mut self) -> f64 {
        self.next_random() as f64 / u64::MAX as f64
    }

    fn next_random(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    fn new_agent(&self, controlling: bool) -> IceAgent {
        let mut agent = IceAgent::new(IceCreds::new());
        agent.set_controlling(controlling);
        for &host in &self.hosts {
            if let Ok(c) = is::Candidate::host(host, "udp") {
                agent.add_local_candidate(c);
            }
        }
        // A relayed candidate is offered while its allocation holds it: after a lost
        // allocation, a new session (an ICE restart) offers only the relay that replaced it.
        let current = |c: &&is::Candidate| {
            c.kind() != is::CandidateKind::Relayed
                || self
                    .relays
                    .iter()
                    .any(|a| a.relayed_address() == Some(c.addr()))
        };
        for c in self.gathered.iter().filter(current) {
            agent.add_local_candidate(c.clone());
        }
        agent
    }

    /// Adds a candidate found after start (server-reflexive, relayed): every session gets it,
    /// and the other devices learn it with a `transport-info`.
    pub fn add_local_candidate(&mut self, candidate: is::Candidate) {
        self.kick();
        if self.gathered.iter().any(|c| c.addr() == candidate.addr()) {
            return;
        }
        for (device, link) in &mut self.links {
            let Some(s) = link.session.as_mut() else {
                continue;
            };
            if let Some(added) = s.agent.add_local_candidate(candidate.clone())
                && !link.offline
                && let Some(c) = ice::from_agent(added)
            {
                self.signals.push_back(Outgoing::new(
                    device.clone(),
                    Signal::Candidates {
                        session: s.id.clone(),
                        candidates: vec![c],
                    },
                ));
            }
        }
        self.gathered.push(candidate);
    }

    /// The port mapping the home router now grants, `(internal, external)`, or none. The
    /// external endpoint is offered as a server-reflexive candidate whose base is the internal
    /// one (XEP-0176 has no type for it); a mapping that is gone is no longer offered to new
    /// sessions.
    pub fn set_port_mapping(&mut self, mapping: Option<(SocketAddr, SocketAddr)>) {
        if let Some((_, old)) = self.port_mapping.take()
            && mapping.is_none_or(|(_, new)| new != old)
        {
            self.gathered.retain(|c| c.addr() != old);
        }
        self.port_mapping = mapping;
        if let Some((internal, external)) = mapping
            && let Ok(c) = is::Candidate::server_reflexive(external, internal, "udp")
        {
            self.add_local_candidate(c);
        }
    }

    /// Registers with friends' relays the sessions that found no direct path
    /// [`PEER_RELAY_AFTER`] after they started: a link that has one never takes a relay's
    /// pair.
    fn relay_where_needed(&mut self, now: Instant) {
        if self.relay_offers.is_empty() {
            return;
        }
        let needed: Vec<(DeviceId, String, Side)> = self
            .links
            .iter()
            .filter_map(|(device, link)| {
                let s = link.session.as_ref()?;
                let direct = has_direct_path(s);
                let due = now >= s.started + PEER_RELAY_AFTER;
                let registered = self.peer_relays.iter().any(|r| &r.device == device);
                (due && !direct && !registered).then(|| {
                    let side = if s.initiator {
                        Side::Initiator
                    } else {
                        Side::Responder
                    };
                    (device.clone(), s.id.clone(), side)
                })
            })
            .collect();
        for (device, session, side) in needed {
            self.start_peer_relays(now, &device, &session, side);
        }
    }

    /// Registers, as `side` of `session` with `device`, with the relays that offered to
    /// forward for us (at most [`MAX_RELAYS_PER_SESSION`]), other than the two ends.
    fn start_peer_relays(&mut self, now: Instant, device: &DeviceId, session: &str, side: Side) {
        self.peer_relays.retain(|r| &r.device != device);
        let Some(me) = self.me.clone() else {
            return;
        };
        let relays: Vec<(DeviceId, RelayOffer)> = self
            .relay_offers
            .iter()
            .filter(|(relay, _)| *relay != device && **relay != me)
            .take(MAX_RELAYS_PER_SESSION)
            .map(|(relay, offer)| (relay.clone(), *offer))
            .collect();
        for (relay, offer) in relays {
            let seed = self.client_seed();
            tracing::debug!(%device, %relay, endpoint = %offer.endpoint, "registering with a peer relay");
            let client = RelayClient::new(
                now,
                offer.endpoint,
                &offer.token,
                session,
                side,
                &me.to_string(),
                seed,
            );
            self.peer_relays.push(PeerRelay {
                device: device.clone(),
                session: session.to_owned(),
                relay,
                client,
            });
        }
        self.drive_peer_relays();
    }

    /// Sends what the relay registrations have to send, and gives each session the pair
    /// endpoints that became ready as remote candidates. Registrations of sessions that ended
    /// go.
    fn drive_peer_relays(&mut self) {
        let links = &self.links;
        // A registration goes with its session, and once the session found a direct path (the
        // relay's pair then ends for want of registrations).
        self.peer_relays.retain(|r| {
            links
                .get(&r.device)
                .and_then(|l| l.session.as_ref())
                .is_some_and(|s| s.id == r.session && !has_direct_path(s))
        });
        // The fastest TURN server this device holds a relayed address from, over UDP.
        let turn_rtt = self
            .relays
            .iter()
            .filter(|a| a.transport() == IceTransport::Udp && a.relayed_address().is_some())
            .filter_map(|a| {
                self.bindings
                    .iter()
                    .find(|b| b.server() == a.server())
                    .and_then(StunBinding::rtt)
            })
            .min();
        for r in &mut self.peer_relays {
            while let Some((destination, payload)) = r.client.poll_transmit() {
                self.transmits.push_back(Transmit {
                    destination,
                    via: None,
                    stream: false,
                    source: None,
                    payload,
                });
            }
            while let Some(event) = r.client.poll_event() {
                match event {
                    ClientEvent::Ready(pair) => {
                        let priority = peer_relay_priority(r.client.rtt(), turn_rtt);
                        tracing::info!(device = %r.device, relay = %r.relay, %pair, rtt = ?r.client.rtt(), ?turn_rtt, preferred_to_turn = priority == PEER_RELAY_FASTER, "the peer relay forwards for this link");
                        let candidate = Candidate {
                            foundation: "peer-relay".to_owned(),
                            component: 1,
                            priority,
                            address: pair,
                            kind: CandidateKind::Relayed,
                            related: Some(pair),
                        };
                        if let Some(s) = self
                            .links
                            .get_mut(&r.device)
                            .and_then(|l| l.session.as_mut())
                            && let Some(c) = ice::to_agent(&candidate)
                        {
                            s.agent.add_remote_candidate(c);
                        }
                    }
                    ClientEvent::Failed(reason) => {
                        tracing::info!(device = %r.device, relay = %r.relay, "no peer relay: {reason}");
                    }
                }
            }
        }
    }

    /// How the NAT in front of this device maps its port, as the STUN servers saw it over
    /// IPv4.
    pub fn nat_mapping(&self) -> NatMapping {
        NatMapping::from_observations(
            self.bindings
                .iter()
                .filter(|b| b.server().is_ipv4())
                .filter_map(StunBinding::mapped_address),
        )
    }

    /// What hole punching did since start.
    pub fn punch_stats(&self) -> PunchStats {
        self.punch_stats
    }

    /// The next order for the data plane's extra sockets.
    pub fn poll_socket_order(&mut self) -> Option<SocketOrder> {
        self.socket_orders.pop_front()
    }

    /// Offers the extra socket that a link's punching found, if any, to a new session of it.
    fn add_kept_socket(&self, agent: &mut IceAgent, device: &DeviceId) {
        let Some(port) = self.links.get(device).and_then(|l| l.socket) else {
            return;
        };
        if let Some(&host) = self.hosts.iter().find(|h| h.is_ipv4())
            && let Ok(c) = is::Candidate::host(SocketAddr::new(host.ip(), port), "udp")
        {
            agent.add_local_candidate(c);
        }
    }

    /// The public IPv4 server-reflexive endpoints among a session's remote candidates: where
    /// the other side's NAT maps its port.
    fn reflexive_targets(s: &Session) -> Vec<SocketAddr> {
        let mut targets: Vec<SocketAddr> = s
            .agent
            .remote_candidates()
            .filter(|c| c.kind() == is::CandidateKind::ServerReflexive)
            .map(|c| c.addr())
            .filter(|a| a.is_ipv4() && !is_private(a.ip()))
            .collect();
        targets.sort();
        targets.dedup();
        targets.truncate(4);
        targets
    }

    /// On a device whose NAT maps each destination anew: asks for sockets to punch from, for
    /// the sessions that found no direct path [`punch::PUNCH_AFTER`] after they started.
    fn punch_where_needed(&mut self, now: Instant) {
        if !self.online || self.nat_mapping() != NatMapping::Dependent {
            return;
        }
        let mut wanted = Vec::new();
        for (device, link) in &mut self.links {
            let Some(s) = link.session.as_mut() else {
                continue;
            };
            if link.offline
                || !matches!(s.punch, Punch::Idle)
                || now < s.started + punch::PUNCH_AFTER
                || has_direct_path(s)
            {
                continue;
            }
            let targets = Self::reflexive_targets(s);
            if targets.is_empty() {
                s.punch = Punch::Over;
                tracing::debug!(%device, "no direct path, and the other side has no public endpoint to punch to");
                continue;
            }
            wanted.push((device.clone(), targets));
        }
        for (device, targets) in wanted {
            let set = self.next_random();
            if let Some(s) = self.links.get_mut(&device).and_then(|l| l.session.as_mut()) {
                s.punch = Punch::Opening { set, targets };
                self.socket_orders.push_back(SocketOrder::Open {
                    set,
                    count: punch::SOCKETS,
                });
            }
        }
    }

    /// The data plane opened the extra sockets of `set` on `ports`: each sends a probe to the
    /// other side's endpoints, and the other side is asked to probe back.
    pub fn sockets_opened(&mut self, now: Instant, set: u64, ports: Vec<u16>) {
        self.kick();
        let found = self.links.iter_mut().find_map(|(device, link)| {
            let s = link.session.as_mut()?;
            matches!(&s.punch, Punch::Opening { set: x, .. } if *x == set).then_some((device, s))
        });
        let Some((device, s)) = found else {
            self.socket_orders.push_back(SocketOrder::Close { ports });
            return;
        };
        let Punch::Opening { targets, .. } = std::mem::take(&mut s.punch) else {
            return;
        };
        let probe = s.probe;
        self.punch_stats.sockets += ports.len() as u64;
        self.punch_stats.probes += (ports.len() * targets.len()) as u64;
        for &port in &ports {
            self.extra_ports.insert(port, device.clone());
            for &destination in &targets {
                self.transmits.push_back(Transmit {
                    destination,
                    via: None,
                    stream: false,
                    source: Some(port),
                    payload: probe.to_vec(),
                });
            }
        }
        tracing::info!(%device, sockets = ports.len(), ?targets, "no direct path and this NAT maps each destination anew: punching");
        s.punch = Punch::Open {
            ports,
            until: now + punch::SOCKET_LIFETIME,
        };
        self.signals.push_back(Outgoing::new(
            device.clone(),
            Signal::Punch {
                session: s.id.clone(),
            },
        ));
    }

    /// A probe of a session being punched: on an extra socket, the path is found (the socket
    /// becomes a host candidate of the session, and the others close); on the main socket,
    /// the other side's probe came through, which ICE's checks follow. Returns whether the
    /// datagram was a probe.
    fn take_probe(
        &mut self,
        now: Instant,
        local: SocketAddr,
        from: SocketAddr,
        datagram: &[u8],
    ) -> bool {
        if datagram.len() != 20 || datagram.get(..2) != Some(&[0x00, 0x11]) {
            return false;
        }
        let Some(device) = self.extra_ports.get(&local.port()).cloned() else {
            return self.links.values().any(|l| {
                l.session
                    .as_ref()
                    .is_some_and(|s| s.punch_started() && datagram == s.probe)
            });
        };
        let host = self.hosts.iter().find(|h| h.is_ipv4()).map(|h| h.ip());
        let Some(link) = self.links.get_mut(&device) else {
            return false;
        };
        let Some(s) = link.session.as_mut() else {
            return false;
        };
        if datagram != s.probe {
            return false;
        }
        let port = local.port();
        let Punch::Open { ports, .. } = &s.punch else {
            return true;
        };
        if !ports.contains(&port) {
            return true;
        }
        let mut closed: Vec<u16> = ports.iter().copied().filter(|&p| p != port).collect();
        s.punch = Punch::Over;
        s.punched = true;
        self.punch_stats.punched += 1;
        let ip = if local.ip().is_unspecified() {
            host
        } else {
            Some(local.ip())
        };
        if let Some(ip) = ip
            && let Ok(c) = is::Candidate::host(SocketAddr::new(ip, port), "udp")
        {
            s.agent.add_local_candidate(c);
            s.agent.handle_timeout(now);
        }
        tracing::info!(%device, %from, port, "a probe came through both NATs: punched");
        if let Some(old) = link.socket.replace(port)
            && old != port
        {
            closed.push(old);
        }
        self.close_sockets(closed);
        self.drive_device(now, &device);
        true
    }

    /// Sprays the probes that are due, and ends the punching that is over: sockets that no
    /// probe reached in time, sprays whose session found a direct path. Extra sockets that no
    /// link or punching holds any more close.
    fn drive_punches(&mut self, now: Instant) {
        let mut closed = Vec::new();
        for (device, link) in &mut self.links {
            let Some(s) = link.session.as_mut() else {
                continue;
            };
            let direct = has_direct_path(s);
            match &mut s.punch {
                Punch::Open { ports, until } if now >= *until => {
                    tracing::info!(%device, "no probe came through in {:?}: punching failed", punch::SOCKET_LIFETIME);
                    closed.append(ports);
                    s.punch = Punch::Over;
                    self.punch_stats.failed += 1;
                }
                Punch::Spraying(sprayer) => {
                    if direct {
                        tracing::info!(%device, probes = sprayer.sent(), "a direct path: probing ends");
                        s.punched = true;
                        s.punch = Punch::Over;
                        self.punch_stats.punched += 1;
                        continue;
                    }
                    let probe = s.probe;
                    for destination in sprayer.poll_burst(now) {
                        self.punch_stats.probes += 1;
                        self.transmits.push_back(Transmit {
                            destination,
                            via: None,
                            stream: false,
                            source: None,
                            payload: probe.to_vec(),
                        });
                    }
                    if sprayer.done() {
                        tracing::info!(%device, probes = sprayer.sent(), target = %sprayer.target(), "every probe went out");
                        s.punch = Punch::Over;
                        self.punch_stats.failed += 1;
                    }
                }
                _ => {}
            }
        }
        if self.extra_ports.is_empty() {
            self.close_sockets(closed);
            return;
        }
        let links = &self.links;
        let held = |port: u16, device: &DeviceId| {
            links.get(device).is_some_and(|l| {
                l.socket == Some(port)
                    || l.session.as_ref().is_some_and(
                        |s| matches!(&s.punch, Punch::Open { ports, .. } if ports.contains(&port)),
                    )
            })
        };
        closed.extend(
            self.extra_ports
                .iter()
                .filter(|(port, device)| !held(**port, device))
                .map(|(port, _)| *port),
        );
        self.close_sockets(closed);
    }

    /// Closes extra sockets, and forgets the paths through them.
    fn close_sockets(&mut self, mut ports: Vec<u16>) {
        ports.sort_unstable();
        ports.dedup();
        if ports.is_empty() {
            return;
        }
        for port in &ports {
            self.extra_ports.remove(port);
        }
        self.punched.retain(|_, p| !ports.contains(p));
        self.socket_orders.push_back(SocketOrder::Close { ports });
    }

    /// The other side, behind a NAT that maps each destination anew, opened sockets for
    /// `session` and asks for probes.
    fn spray(&mut self, now: Instant, from: &DeviceId, session: &str) {
        let mapping = self.nat_mapping();
        let seed = self.next_random();
        let Some(link) = self.links.get_mut(from) else {
            self.drops.count(DropReason::UnknownSignal);
            return;
        };
        let recently = link
            .sprayed
            .is_some_and(|t| now.saturating_duration_since(t) < punch::SPRAY_INTERVAL);
        let Some(s) = link.session.as_mut().filter(|s| s.id == session) else {
            self.drops.count(DropReason::UnknownSignal);
            return;
        };
        if mapping == NatMapping::Dependent {
            tracing::info!(device = %from, "both NATs map each destination anew: no punching");
            if let Punch::Open { ports, .. } = std::mem::take(&mut s.punch) {
                self.close_sockets(ports);
            }
            if let Some(s) = self.links.get_mut(from).and_then(|l| l.session.as_mut()) {
                s.punch = Punch::Over;
            }
            return;
        }
        if has_direct_path(s) || !matches!(s.punch, Punch::Idle) {
            return;
        }
        if recently {
            tracing::info!(device = %from, "asked to probe again within {:?}: not done", punch::SPRAY_INTERVAL);
            return;
        }
        let Some(target) = Self::reflexive_targets(s).first().map(SocketAddr::ip) else {
            tracing::debug!(device = %from, "asked to probe, but the device has no public endpoint");
            return;
        };
        tracing::info!(device = %from, %target, budget = punch::PROBES, "probing the device's ports");
        s.punch = Punch::Spraying(Sprayer::new(target, now, seed));
        link.sprayed = Some(now);
        self.kick();
    }

    fn offer(&self, agent: &IceAgent) -> LinkOffer {
        let creds = agent.local_credentials();
        LinkOffer {
            key: self.key,
            ufrag: creds.ufrag.clone(),
            pwd: creds.pass.clone(),
            candidates: agent
                .local_candidates()
                .filter_map(|c| ice::from_agent(&c))
                .collect(),
        }
    }

    /// Opens a session to `device` (an ICE restart when the link keeps its WireGuard peer).
    fn initiate(&mut self, now: Instant, device: &DeviceId) {
        let id = format!("{:016x}", self.next_random());
        let mut agent = self.new_agent(true);
        self.add_kept_socket(&mut agent, device);
        let offer = self.offer(&agent);
        let Some(link) = self.links.get_mut(device) else {
            return;
        };
        let restart = link.peer.is_some();
        // Traffic waits for a restarting link, and for an on-demand one (only traffic opens it).
        let urgent = restart || link.wanted != Wanted::Always;
        tracing::debug!(%device, session = %id, restart, urgent, "offering a link");
        link.session = Some(Session {
            id: id.clone(),
            initiator: true,
            agent,
            answered: false,
            started: now,
            nominated: None,
            lost: None,
            consent: ice::Consent::default(),
            restart,
            punch: Punch::Idle,
            probe: punch::probe(&id),
            punched: false,
        });
        self.signals.push_back(Outgoing {
            to: device.clone(),
            signal: Signal::Initiate { session: id, offer },
            urgent,
        });
    }

    fn handle_signal(&mut self, now: Instant, from: DeviceId, signal: Signal) {
        match signal {
            Signal::Initiate { session, offer } => {
                if !self.is_authorised_user(&from.user) {
                    self.refuse(now, &from, session, TerminateReason::NotAuthorised);
                    return;
                }
                if !self.links.contains_key(&from) {
                    // Authorised user, but its presence has not arrived yet: keep the offer.
                    self.keep_pending(now, from, session, offer);
                    return;
                }
                self.accept(now, from, session, offer);
            }
            Signal::Accept { session, offer } => {
                let Some(link) = self.links.get_mut(&from) else {
                    self.drops.count(DropReason::UnknownSignal);
                    return;
                };
                let key = link.key;
                let Some(s) = link
                    .session
                    .as_mut()
                    .filter(|s| s.id == session && s.initiator)
                else {
                    self.drops.count(DropReason::UnknownSignal);
                    return;
                };
                if offer.key != key {
                    self.refuse(now, &from, session, TerminateReason::WrongKey);
                    self.fail(
                        now,
                        &from,
                        "its answer carried another key than the one it announced",
                    );
                    return;
                }
                s.answered = true;
                apply_remote(&mut s.agent, &offer);
                s.agent.handle_timeout(now);
                self.attach_peer(now, &from, &offer);
            }
            Signal::Candidates {
                session,
                candidates,
            } => {
                let s = self
                    .links
                    .get_mut(&from)
                    .and_then(|l| l.session.as_mut())
                    .filter(|s| s.id == session);
                match s {
                    Some(s) => {
                        for c in candidates.iter().take(MAX_CANDIDATES) {
                            if let Some(c) = ice::to_agent(c) {
                                s.agent.add_remote_candidate(c);
                            }
                        }
                        s.agent.handle_timeout(now);
                    }
                    None => self.drops.count(DropReason::UnknownSignal),
                }
            }
            Signal::Punch { session } => self.spray(now, &from, &session),
            Signal::Terminate { session, reason } => {
                if self.is_current_session(&from, &session) {
                    let why = match reason {
                        TerminateReason::NotAuthorised => "the other side does not authorise us",
                        TerminateReason::WrongKey => "the other side refused our key",
                        TerminateReason::Glare => "the other side keeps its own session",
                        TerminateReason::Done => "the other side closed the link",
                        TerminateReason::Idle => "the other side closed the idle link",
                        TerminateReason::Failed => "the other side gave up",
                    };
                    if reason == TerminateReason::Glare {
                        // Its offer is on its way or already here; just wait for it.
                        if let Some(link) = self.links.get_mut(&from) {
                            link.session = None;
                            link.next_attempt = now + ANSWER_GRACE;
                        }
                    } else if reason == TerminateReason::Idle {
                        // Whatever this side's policy: traffic opens the link again.
                        tracing::info!(device = %from, "{why}: back to idle");
                        self.rest(&from, false);
                    } else {
                        self.fail(now, &from, why);
                    }
                }
            }
        }
    }

    /// Keeps an offer until its device's presence arrives (for `PENDING_OFFER_TTL`), while
    /// fewer than `MAX_PENDING` wait.
    fn keep_pending(&mut self, now: Instant, from: DeviceId, session: String, offer: LinkOffer) {
        if !self.pending.contains_key(&from) && self.pending.len() >= MAX_PENDING {
            self.pending
                .retain(|_, (_, _, at)| now.saturating_duration_since(*at) < PENDING_OFFER_TTL);
            if self.pending.len() >= MAX_PENDING {
                tracing::debug!(device = %from, "too many offers wait for presences; dropped");
                return;
            }
        }
        self.pending.insert(from, (session, offer, now));
    }

    /// Refuses a session, telling the other side why; the refusal is counted, and logged at
    /// most once a minute per user.
    fn refuse(&mut self, now: Instant, from: &DeviceId, session: String, reason: TerminateReason) {
        let counter = match reason {
            TerminateReason::WrongKey => DropReason::SignalWrongKey,
            _ => DropReason::SignalNotAuthorised,
        };
        self.drops.count(counter);
        if self.may_log(now, &from.user) {
            tracing::warn!(device = %from, ?reason, "refused a link offer");
        }
        self.signals.push_back(Outgoing::new(
            from.clone(),
            Signal::Terminate { session, reason },
        ));
    }

    /// Answers an offer from an authorised, announced device.
    fn accept(&mut self, now: Instant, from: DeviceId, session: String, offer: LinkOffer) {
        let Some(link) = self.links.get(&from) else {
            return;
        };
        if offer.key != link.key {
            self.refuse(now, &from, session, TerminateReason::WrongKey);
            return;
        }
        if let Some(ours) = &link.session {
            let me_first = self.me.as_ref().is_some_and(|me| *me < from);
            if ours.initiator && !ours.answered && me_first {
                // Glare: both offered at once; the device that sorts first keeps its session.
                self.signals.push_back(Outgoing::new(
                    from,
                    Signal::Terminate {
                        session,
                        reason: TerminateReason::Glare,
                    },
                ));
                return;
            }
        }
        // A new offer replaces the session we had, if any (an ICE restart when its path was
        // lost); the WireGuard peer, whose key the check above confirmed, stays.
        let mut agent = self.new_agent(false);
        self.add_kept_socket(&mut agent, &from);
        apply_remote(&mut agent, &offer);
        agent.handle_timeout(now);
        let answer = self.offer(&agent);
        if let Some(link) = self.links.get_mut(&from) {
            let restart = link.peer.is_some();
            if link.idle {
                tracing::info!(device = %from, "the device opens an on-demand link");
                link.idle = false;
                link.used = now;
            }
            link.session = Some(Session {
                id: session.clone(),
                initiator: false,
                agent,
                answered: true,
                started: now,
                nominated: None,
                lost: None,
                consent: ice::Consent::default(),
                restart,
                punch: Punch::Idle,
                probe: punch::probe(&session),
                punched: false,
            });
        }
        self.signals.push_back(Outgoing::new(
            from.clone(),
            Signal::Accept {
                session,
                offer: answer,
            },
        ));
        self.attach_peer(now, &from, &offer);
    }

    /// Adds the WireGuard peer for an accepted offer, unless the link has it already (an ICE
    /// restart: the peer keeps its session, and moves when the new path is chosen).
    fn attach_peer(&mut self, now: Instant, device: &DeviceId, offer: &LinkOffer) {
        if self.links.get(device).is_none_or(|l| l.peer.is_some()) {
            return;
        }
        let overlays = self.authorising_claims(device);
        let mut p = self.plans.peer(device, &offer.key, &overlays);
        self.set_link_addresses(device, host_routes(&p));
        p.addresses.extend(self.accepted_from(device));
        let config = PeerConfig {
            name: Some(device.to_string()),
            public_key: offer.key,
            endpoint: None,
            addresses: p.addresses,
            mapped: p.mapped,
            destinations: Some(Destinations {
                own: p.destinations,
                routed: p.routed,
            }),
            keepalive: Some(KEEPALIVE_S),
            roaming: false,
        };
        match self.node.add_peer(config) {
            Ok(index) => {
                if let Some(link) = self.links.get_mut(device) {
                    link.peer = Some(index);
                }
            }
            Err(e) => {
                let why = match e {
                    NodeError::OverlappingAddress { net, .. } => {
                        format!("its address {net} is already another peer's")
                    }
                    other => other.to_string(),
                };
                self.fail(now, device, &why);
            }
        }
    }

    /// Runs timers: retries, session timeouts, ICE, WireGuard.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.clock = Some(now);
        self.kicked = false;
        self.timers = None;
        if self.gathering_due {
            self.gathering_due = false;
            self.start_gathering(now);
        }
        for b in &mut self.bindings {
            b.handle_timeout(now);
        }
        for a in &mut self.relays {
            a.handle_timeout(now);
        }
        self.drive_gathering(now);
        self.relay_where_needed(now);
        if self.exit != ExitChoice::Off {
            self.follow_exit();
        }
        self.punch_where_needed(now);
        self.drive_punches(now);
        for r in &mut self.peer_relays {
            r.client.handle_timeout(now);
        }
        self.drive_peer_relays();
        if self.absent_due.is_some_and(|t| t <= now) {
            self.expire_absent(now);
        }
        for device in std::mem::take(&mut self.demanded) {
            let Some(link) = self.links.get_mut(&device) else {
                continue;
            };
            link.demanded = false;
            link.used = now;
            if link.idle {
                tracing::info!(%device, "traffic for the device: opening an on-demand link");
                link.idle = false;
                link.next_attempt = now;
            }
        }
        let idle: Vec<DeviceId> = self
            .links
            .iter()
            .filter(|(_, l)| self.idle_due(l).is_some_and(|t| t <= now))
            .map(|(d, _)| d.clone())
            .collect();
        for device in idle {
            tracing::info!(%device, "no data on the on-demand link for its idle time: closing it");
            self.rest(&device, true);
        }
        // A device offline on XMPP cannot be signalled: its link is neither retried nor
        // restarted, nor given up; WireGuard decides (see `expire_absent`). An on-demand link
        // at rest waits for traffic.
        let due: Vec<DeviceId> = self
            .links
            .iter()
            .filter(|(_, l)| !l.offline && !l.idle && l.session.is_none() && l.next_attempt <= now)
            .map(|(d, _)| d.clone())
            .collect();
        if self.me.is_some() {
            for device in due {
                self.initiate(now, &device);
            }
        }
        let stale: Vec<(DeviceId, &'static str)> = self
            .links
            .iter()
            .filter(|(_, l)| !l.offline)
            .filter_map(|(d, l)| {
                let s = l.session.as_ref()?;
                let age = now.duration_since(s.started);
                // The answering side's agent may never see one of its own checks answered (a
                // NAT can pass the other side's checks and WireGuard yet drop ours), while the
                // other side nominated a pair and WireGuard runs over it: that link is up. (Not
                // during a restart, where the session outlives the path it was made on.)
                let carried = || {
                    !s.restart
                        && l.peer
                            .and_then(|i| self.node.peer(i))
                            .is_some_and(|p| p.state == LinkState::Connected)
                };
                if !s.answered && age > SESSION_TIMEOUT {
                    Some((d.clone(), "no answer to our offer"))
                } else if s.answered && s.nominated.is_none() && age > ICE_TIMEOUT && !carried() {
                    Some((
                        d.clone(),
                        if s.restart {
                            "the path stopped working and an ICE restart found no other"
                        } else {
                            "ICE found no working path"
                        },
                    ))
                } else {
                    None
                }
            })
            .collect();
        for (device, why) in stale {
            self.fail(now, &device, why);
        }
        let lost: Vec<DeviceId> = self
            .links
            .iter()
            .filter(|(_, l)| {
                !l.offline
                    && l.session
                        .as_ref()
                        .and_then(restart_due)
                        .is_some_and(|t| t <= now)
            })
            .map(|(d, _)| d.clone())
            .collect();
        // Without the social network a restart could not be signalled, and would only tear
        // the link down: the WireGuard peer keeps its endpoint meanwhile, and carries on if
        // the path comes back.
        if self.online {
            for device in lost {
                self.restart(now, &device);
            }
        }
        // Consent on every link (cheap); the agents run only when their timer is due (or they
        // have none yet).
        for (device, link) in &mut self.links {
            if let Some(s) = link.session.as_mut() {
                let suspect = link.peer.is_some_and(|i| self.node.path_suspect(i, now));
                if s.consent.update(&mut s.agent, suspect, now)
                    && s.nominated.is_some()
                    && s.lost.is_none()
                {
                    tracing::info!(%device, session = %s.id, "the path went unanswered while traffic went out: it is lost");
                    s.lost = Some(now);
                }
                if s.agent.poll_timeout().is_none_or(|t| t <= now) {
                    s.agent.handle_timeout(now);
                }
            }
        }
        self.drive_agents(now);
        self.node.handle_timeout(now);
    }

    /// Collects what one link's ICE agent wants sent and what it decided.
    fn drive_device(&mut self, now: Instant, device: &DeviceId) {
        if let Some(link) = self.links.get_mut(device) {
            drive_link(
                now,
                device,
                link,
                Io {
                    relays: &mut self.relays,
                    node: &mut self.node,
                    transmits: &mut self.transmits,
                    extra_ports: &self.extra_ports,
                    punched: &mut self.punched,
                },
            );
        }
    }

    /// Collects what the ICE agents want sent and what they decided.
    fn drive_agents(&mut self, now: Instant) {
        for (device, link) in &mut self.links {
            drive_link(
                now,
                device,
                link,
                Io {
                    relays: &mut self.relays,
                    node: &mut self.node,
                    transmits: &mut self.transmits,
                    extra_ports: &self.extra_ports,
                    punched: &mut self.punched,
                },
            );
        }
        self.release_held();
    }

    /// When [`Engine::handle_timeout`] wants to run next.
    /// The timers of the links and the STUN and TURN clients are kept until something else
    /// than WireGuard data comes in; the node's own timer is read each time.
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        let timers = match self.timers {
            Some(t) => t,
            None => {
                let t = self.compute_timers();
                self.timers = Some(t);
                t
            }
        };
        match (timers, self.node.poll_timeout()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The earliest timer of the links and the STUN and TURN clients.
    fn compute_timers(&mut self) -> Option<Instant> {
        let mut next = None;
        let mut consider = |t: Option<Instant>| {
            if let Some(t) = t {
                next = Some(next.map_or(t, |n: Instant| n.min(t)));
            }
        };
        for link in self.links.values() {
            consider(self.idle_due(link));
        }
        let online = self.online;
        let clock = self.clock;
        for link in self.links.values_mut() {
            let signalled = online && !link.offline;
            match link.session.as_mut() {
                Some(s) => {
                    if signalled {
                        consider(restart_due(s));
                    }
                    if !link.offline {
                        // When the session times out (see `handle_timeout`), unless that
                        // time has passed and the session was kept.
                        let limit = if !s.answered {
                            Some(SESSION_TIMEOUT)
                        } else if s.nominated.is_none() {
                            Some(ICE_TIMEOUT)
                        } else {
                            None
                        };
                        consider(
                            limit
                                .map(|l| s.started + l + Duration::from_millis(1))
                                .filter(|t| clock.is_none_or(|c| *t > c)),
                        );
                    }
                    consider(s.agent.poll_timeout());
                }
                None if !link.offline && !link.idle => consider(Some(link.next_attempt)),
                None => {}
            }
        }
        consider(self.absent_due);
        for b in &self.bindings {
            consider(b.poll_timeout());
        }
        for a in &self.relays {
            consider(a.poll_timeout());
        }
        for r in &self.peer_relays {
            consider(r.client.poll_timeout());
        }
        let hard = self.nat_mapping() == NatMapping::Dependent;
        for s in self.links.values().filter_map(|l| l.session.as_ref()) {
            match &s.punch {
                Punch::Idle if hard => consider(
                    Some(s.started + punch::PUNCH_AFTER).filter(|t| clock.is_none_or(|c| *t > c)),
                ),
                Punch::Open { until, .. } => consider(Some(*until)),
                Punch::Spraying(sprayer) => consider(sprayer.poll_timeout()),
                _ => {}
            }
        }
        if !self.relay_offers.is_empty() {
            for (device, link) in &self.links {
                if let Some(s) = &link.session
                    && s.nominated.is_none()
                    && !self.peer_relays.iter().any(|r| &r.device == device)
                {
                    consider(
                        Some(s.started + PEER_RELAY_AFTER).filter(|t| clock.is_none_or(|c| *t > c)),
                    );
                }
            }
        }
        next
    }

    /// The next datagram to send: STUN from the ICE agents and the NAT traversal clients,
    /// then WireGuard control messages. What goes through a relay comes out wrapped for it.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        loop {
            let mut t = self
                .transmits
                .pop_front()
                .or_else(|| self.node.poll_transmit())?;
            let Some(r) = t.via else {
                if t.source.is_none() && !self.punched.is_empty() {
                    t.source = self.punched.get(&t.destination).copied();
                }
                return Some(t);
            };
            let Some(relay) = self.relays.get_mut(r) else {
                continue;
            };
            if !relay.has_permission(t.destination.ip()) {
                // The first data may arrive before the permission and be dropped by the
                // server: ICE and WireGuard send again.
                let Some(now) = self.clock else {
                    continue;
                };
                if relay.create_permission(now, t.destination.ip()).is_err() {
                    continue;
                }
                let stream = relay.transport() != IceTransport::Udp;
                while let Some((server, payload)) = relay.poll_transmit() {
                    self.transmits.push_back(Transmit {
                        destination: server,
                        via: None,
                        stream,
                        source: None,
                        payload,
                    });
                }
            }
            let mut out = vec![0u8; t.payload.len() + crate::turn::MAX_OVERHEAD];
            match relay.encapsulate(t.destination, &t.payload, &mut out) {
                Ok(n) => {
                    out.truncate(n);
                    return Some(Transmit {
                        destination: relay.server(),
                        via: None,
                        stream: relay.transport() != IceTransport::Udp,
                        source: None,
                        payload: out,
                    });
                }
                Err(e) => tracing::debug!(peer = %t.destination, "cannot relay: {e}"),
            }
        }
    }

    /// Starts the STUN bindings and TURN allocations for the servers in use, once each.
    fn start_gathering(&mut self, now: Instant) {
        let servers: Vec<IceServer> = self.servers().cloned().collect();
        for server in servers {
            let udp = server.transport == IceTransport::Udp;
            if udp && !self.bindings.iter().any(|b| b.server() == server.address) {
                let seed = self.client_seed();
                self.bindings
                    .push(StunBinding::new(server.address, now, seed));
            }
            if server.kind != IceServerKind::Turn {
                continue;
            }
            let credentials = TurnCredentials {
                username: server.username.clone().unwrap_or_default(),
                password: server.password.clone().unwrap_or_default(),
            };
            match self
                .relays
                .iter_mut()
                .find(|a| a.server() == server.address && a.transport() == server.transport)
            {
                Some(existing) => existing.set_credentials(credentials),
                None => {
                    let seed = self.client_seed();
                    self.relays.push(TurnAllocation::new(
                        server.address,
                        server.transport,
                        credentials,
                        now,
                        seed,
                    ));
                }
            }
        }
        self.drive_gathering(now);
    }

    /// Collects what the STUN and TURN clients want sent and what they found.
    fn drive_gathering(&mut self, _now: Instant) {
        let mut found = Vec::new();
        for b in &mut self.bindings {
            while let Some((server, payload)) = b.poll_transmit() {
                self.transmits.push_back(Transmit {
                    destination: server,
                    via: None,
                    stream: false,
                    source: None,
                    payload,
                });
            }
            while let Some(event) = b.poll_event() {
                match event {
                    BindingEvent::Mapped(mapped)
                    | BindingEvent::MappingChanged { to: mapped, .. } => {
                        tracing::info!(server = %b.server(), %mapped, "server-reflexive address");
                        found.push((mapped, false));
                    }
                    BindingEvent::Failed { reason } => {
                        tracing::info!(server = %b.server(), "STUN failed: {reason}");
                    }
                }
            }
        }
        for a in &mut self.relays {
            let stream = a.transport() != IceTransport::Udp;
            while let Some((server, payload)) = a.poll_transmit() {
                self.transmits.push_back(Transmit {
                    destination: server,
                    via: None,
                    stream,
                    source: None,
                    payload,
                });
            }
            while let Some(event) = a.poll_event() {
                match event {
                    TurnEvent::Allocated { relayed, .. } => {
                        tracing::info!(server = %a.server(), %relayed, "TURN relay allocated");
                        found.push((relayed, true));
                    }
                    TurnEvent::Failed { reason } => {
                        tracing::warn!(server = %a.server(), "TURN allocation failed: {reason}");
                    }
                    other => tracing::debug!(server = %a.server(), "TURN: {other:?}"),
                }
            }
        }
        for (address, relayed) in found {
            let Some(&base) = self.hosts.iter().find(|h| h.is_ipv4() == address.is_ipv4()) else {
                continue;
            };
            let candidate = if relayed {
                is::Candidate::relayed(address, base, "udp")
            } else {
                is::Candidate::server_reflexive(address, base, "udp")
            };
            if let Ok(c) = candidate {
                self.add_local_candidate(c);
            }
        }
    }

    /// The next signal to send over the social network.
    pub fn poll_signal(&mut self) -> Option<Outgoing> {
        self.signals.pop_front()
    }

    /// Drops counted by the engine and the node together.
    pub fn drops(&self) -> Drops {
        let mut all = self.node.drops().clone();
        all.add(&self.drops);
        all
    }

    /// The links to social network devices, by overlay.
    pub fn links(&self) -> Vec<LinkStatus> {
        self.links
            .iter()
            .map(|(device, link)| LinkStatus {
                device: device.clone(),
                key: link.key,
                overlays: self.authorising(device),
                addresses: link
                    .peer
                    .and_then(|i| self.node.peer(i))
                    .map_or_else(|| link.addresses.clone(), |p| p.addresses),
                phase: match &link.session {
                    None if link.idle => LinkPhase::Idle,
                    None => LinkPhase::Waiting,
                    Some(s) if !s.answered => LinkPhase::Offered,
                    Some(s) if s.nominated.is_none() => LinkPhase::Checking,
                    Some(_) => LinkPhase::Connected,
                },
                peer: link.peer.and_then(|i| self.node.peer(i)),
                pair: link
                    .session
                    .as_ref()
                    .and_then(chosen_pair)
                    .map(|pair| self.through_mapping(pair)),
                relay: link
                    .session
                    .as_ref()
                    .and_then(chosen_pair)
                    .and_then(|pair| self.describe_relay(device, &pair)),
                rtt: link
                    .session
                    .as_ref()
                    .and_then(|s| s.agent.nominated_pair_rtt()),
                tried: link
                    .session
                    .as_ref()
                    .map(Session::candidates)
                    .unwrap_or_else(|| link.tried.clone()),
                last_error: link.last_error.clone(),
                restarting: link
                    .session
                    .as_ref()
                    .is_some_and(|s| s.restart && s.nominated.is_none()),
                offline: link.offline,
                punched: link
                    .session
                    .as_ref()
                    .is_some_and(|s| s.punched && has_direct_path(s)),
            })
            .collect()
    }

    /// Devices that are announced but not linked: their key is not trusted or belongs to
    /// another device, or their user is not authorised.
    pub fn unlinked(&self) -> Vec<Unlinked> {
        let refused = self
            .devices
            .iter()
            .filter(|(d, _)| Some(*d) != self.me.as_ref() && !self.links.contains_key(*d))
            .filter_map(|(d, a)| {
                let reason = match self.verdict(d) {
                    Verdict::Refused(reason) => reason,
                    Verdict::NotAuthorised => UnlinkedReason::NotAuthorised,
                    Verdict::Link { .. } | Verdict::Gone => return None,
                };
                Some(Unlinked {
                    device: d.clone(),
                    key: a.key,
                    overlays: a.via.keys().cloned().collect(),
                    reason,
                })
            });
        let strangers = self.strangers.iter().map(|(d, a)| Unlinked {
            device: d.clone(),
            key: a.key,
            overlays: a.via.keys().cloned().collect(),
            reason: UnlinkedReason::NotAuthorised,
        });
        refused.chain(strangers).collect()
    }

    /// Accepts the key `device` announces now: in place of the key pinned for it, or taken
    /// from the device it was pinned for, whose pin and link go. Returns the key, or why there
    /// is nothing to accept.
    pub fn trust(&mut self, now: Instant, device: &DeviceId) -> Result<PublicKey, String> {
        self.kick();
        let pinned = self.plans.memory.pins.get(device).copied();
        let Some(announced) = self.devices.get(device) else {
            return Err(if self.strangers.contains_key(device) {
                format!("{device} is not authorised by any overlay; there is no link to trust")
            } else if let Some(k) = pinned {
                format!(
                    "{device} is not online; its pinned key {} is trusted",
                    k.fingerprint()
                )
            } else {
                format!("no device {device} is known")
            });
        };
        let key = announced.key;
        if key == self.key {
            return Err(format!(
                "{device} announces this device's own key, which no other device may use"
            ));
        }
        let holder = self.holders.get(&key).filter(|h| *h != device).cloned();
        if holder.is_none() && pinned == Some(key) {
            return Err(format!(
                "{device} announces no other key; its pinned key {} is trusted",
                key.fingerprint()
            ));
        }
        if let Some(holder) = &holder {
            tracing::warn!(%device, %holder, key = %key.fingerprint(), "moving a key to another device: the pin and the link of its holder go");
            self.plans.memory.pins.remove(holder);
            let why = "its key was moved to another device";
            tracing::info!(device = %holder, "closing link: {why}");
            self.drop_link(now, holder, why);
        } else {
            tracing::warn!(%device, key = %key.fingerprint(), "trusting a new key");
        }
        if let Some(old) = pinned
            && self.holders.get(&old) == Some(device)
        {
            self.holders.remove(&old);
        }
        self.plans.memory.pins.insert(device.clone(), key);
        self.holders.insert(key, device.clone());
        self.plans.remembered();
        self.drop_link(now, device, "its key changed");
        self.settle(now, device);
        if let Some(holder) = &holder {
            self.settle(now, holder);
        }
        Ok(key)
    }

    /// This device's addresses in each overlay.
    pub fn own_addresses(&self) -> Vec<OwnAddresses> {
        self.plans.own_addresses()
    }

    /// The address this device claims in each overlay (for its presence there).
    pub fn claims(&self) -> Vec<(OverlayId, Claim)> {
        self.plans.claims()
    }

    /// What the daemon must act on: address changes.
    pub fn poll_event(&mut self) -> Option<EngineEvent> {
        self.plans.poll_event()
    }

    /// What the engine wants kept across restarts.
    pub fn memory(&self) -> &Memory {
        &self.plans.memory
    }

    /// Counts up whenever [`Engine::memory`] changes.
    pub fn memory_version(&self) -> u64 {
        self.plans.version()
    }

    /// A direct pair whose local side is the port mapping's internal endpoint and whose remote
    /// side is not on a private network goes through the mapping: its local candidate is shown
    /// as the mapping (`mapped`, with the internal endpoint as its base).
    fn through_mapping(&self, (local, remote): (Candidate, Candidate)) -> (Candidate, Candidate) {
        match self.port_mapping {
            Some((internal, external))
                if local.address == internal
                    && remote.kind != CandidateKind::Relayed
                    && !is_private(remote.address.ip()) =>
            {
                let mapped = Candidate {
                    kind: CandidateKind::Mapped,
                    address: external,
                    related: Some(internal),
                    ..local
                };
                (mapped, remote)
            }
            _ => (local, remote),
        }
    }

    /// Which relay a candidate pair goes through: ours (by its server), else the peer's.
    fn describe_relay(
        &self,
        device: &DeviceId,
        (local, remote): &(Candidate, Candidate),
    ) -> Option<String> {
        if let Some(r) = self
            .peer_relays
            .iter()
            .find(|r| &r.device == device && r.client.pair_address() == Some(remote.address))
        {
            return Some(format!("the peer relay {} at {}", r.relay, remote.address));
        }
        if local.kind == crate::osn::CandidateKind::Relayed {
            let a = self
                .relays
                .iter()
                .find(|a| a.relayed_address() == Some(local.address))?;
            let host = self
                .servers()
                .find(|s| s.address == a.server() && s.transport == a.transport())
                .map_or_else(|| a.server().to_string(), |s| s.host.clone());
            let transport = match a.transport() {
                IceTransport::Udp => "udp",
                IceTransport::Tcp => "tcp",
                IceTransport::Tls => "tls",
            };
            Some(format!("{host} over {transport}"))
        } else if remote.kind == crate::osn::CandidateKind::Relayed {
            Some(format!("the peer's relay {}", remote.address))
        } else {
            None
        }
    }

    /// The peers that did not come from the social network (the config's static peers).
    pub fn static_peers(&self) -> Vec<PeerStatus> {
        let linked: BTreeSet<PublicKey> = self
            .links
            .values()
            .filter(|l| l.peer.is_some())
            .map(|l| l.key)
            .collect();
        self.node
            .peers()
            .filter(|p| !linked.contains(&p.public_key))
            .collect()
    }

    /// The overlays the social network reported, with their members.
    pub fn overlays(&self) -> impl Iterator<Item = (&OverlayId, &BTreeSet<String>)> {
        self.members.iter()
    }

    /// The STUN and TURN servers from the config file, kept whatever the network offers.
    pub fn set_config_servers(&mut self, servers: Vec<IceServer>) {
        self.kick();
        self.config_servers = servers;
        self.gathering_due = true;
    }

    /// Releases the TURN allocations (at shutdown); the datagrams to send follow from
    /// [`Engine::poll_transmit`].
    pub fn release(&mut self, now: Instant) {
        self.kick();
        for a in &mut self.relays {
            a.release(now);
        }
        self.drive_gathering(now);
    }

    /// Every STUN and TURN server in use: the config file's, then those the social network
    /// offers.
    pub fn servers(&self) -> impl Iterator<Item = &IceServer> {
        self.config_servers.iter().chain(&self.offered_servers)
    }

    /// This device, once the social network session is up.
    pub fn me(&self) -> Option<&DeviceId> {
        self.me.as_ref()
    }
}

/// The host routes of a device's addresses: its own, and the local side of its mappings.
fn host_routes(p: &crate::plan::PeerAddresses) -> Vec<IpNet> {
    p.addresses
        .iter()
        .copied()
        .chain(p.mapped.iter().map(|m| IpNet::from(IpAddr::V4(m.local))))
        .collect()
}

/// Takes what one link's ICE agent has to send and to say: its checks, a lost or found path,
/// the pair it nominated (which moves the WireGuard peer there).
fn drive_link(now: Instant, device: &DeviceId, link: &mut Link, io: Io<'_>) {
    let Io {
        relays,
        node,
        transmits,
        extra_ports,
        punched,
    } = io;
    let Some(s) = link.session.as_mut() else {
        return;
    };
    // What leaves from an extra socket (whose host candidate has its port) goes through it.
    let extra = |source: SocketAddr, via: Option<usize>| {
        (via.is_none() && extra_ports.contains_key(&source.port())).then_some(source.port())
    };
    while let Some(t) = s.agent.poll_transmit() {
        let via = relays
            .iter()
            .position(|a| a.relayed_address() == Some(t.source));
        transmits.push_back(Transmit {
            destination: t.destination,
            via,
            stream: false,
            source: extra(t.source, via),
            payload: t.contents.to_vec(),
        });
    }
    while let Some(event) = s.agent.poll_event() {
        if let IceAgentEvent::IceConnectionStateChange(state) = event {
            if state.is_disconnected() && s.nominated.is_some() && s.lost.is_none() {
                tracing::info!(%device, session = %s.id, "no path works any more");
                s.lost = Some(now);
            } else if state.is_connected() {
                s.lost = None;
            }
        } else if let IceAgentEvent::NominatedSend {
            source,
            destination,
            ..
        } = event
        {
            s.nominated = Some((source, destination));
            s.lost = None;
            let via = relays
                .iter()
                .position(|a| a.relayed_address() == Some(source));
            if let Some(r) = via
                && let Err(e) = relays[r].bind_channel(now, destination)
            {
                tracing::debug!(%destination, "no TURN channel: {e}");
            }
            match extra(source, via) {
                Some(port) => punched.insert(destination, port),
                None => punched.remove(&destination),
            };
            if let Some(index) = link.peer {
                node.set_endpoint(index, destination, via);
            }
            link.backoff = BACKOFF_MIN;
            link.last_error = None;
        }
    }
}

/// What [`drive_link`] sends through and moves: the engine's parts beside the links.
struct Io<'a> {
    relays: &'a mut [TurnAllocation],
    node: &'a mut Node,
    transmits: &'a mut VecDeque<Transmit>,
    extra_ports: &'a HashMap<u16, DeviceId>,
    punched: &'a mut HashMap<SocketAddr, u16>,
}

/// When a session whose path was lost restarts ICE: at once on the side that opened it (the
/// controlling agent), after a grace on the other, which the first side's restart usually
/// makes moot.
fn restart_due(s: &Session) -> Option<Instant> {
    let lost = s.lost?;
    Some(if s.initiator {
        lost
    } else {
        lost + RESTART_GRACE
    })
}

/// Whether an address is on a private network (RFC 1918, unique-local, link-local, loopback),
/// which a NAT's port mapping does not stand between.
fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_private() || v4.is_link_local() || v4.is_loopback(),
        IpAddr::V6(v6) => v6.is_unique_local() || v6.is_unicast_link_local() || v6.is_loopback(),
    }
}

/// A registration with a friend's relay for one session of a link ([`crate::peer_relay`]).
#[derive(Debug)]
struct PeerRelay {
    /// The device at the other end of the link.
    device: DeviceId,
    session: String,
    /// The device that relays.
    relay: DeviceId,
    client: RelayClient,
}

/// The ICE priority of a friend's relay as a remote candidate when it answers this device
/// faster than the TURN servers do: type preference 3, above every TURN relay's candidate (the
/// ICE agent gives those 2) and below every direct one (100 and more).
const PEER_RELAY_FASTER: u32 = (3 << 24) | (65_535 << 8) | 255;
/// Its priority otherwise (a TURN server over UDP answers faster, or the relay's time is
/// unknown): type preference 0, below a TURN relay's candidate.
const PEER_RELAY_SLOWER: u32 = (65_535 << 8) | 255;

/// Ranks a friend's relay against the TURN servers by the round-trip time this device measured
/// to each (a registration with the relay's pair port; a STUN Binding with the TURN server).
/// The controlling side's ranking is the one that decides which pair is nominated.
fn peer_relay_priority(relay: Option<Duration>, turn: Option<Duration>) -> u32 {
    match (relay, turn) {
        (Some(relay), Some(turn)) if relay < turn => PEER_RELAY_FASTER,
        (Some(_), None) => PEER_RELAY_FASTER,
        _ => PEER_RELAY_SLOWER,
    }
}

/// How long the path to the exit in use may leave traffic unanswered (after the second of
/// silence that makes it suspect) before another exit replaces it.
const EXIT_FAILOVER: Duration = Duration::from_millis(1500);

/// How long a session looks for a direct path before it registers with friends' relays.
const PEER_RELAY_AFTER: Duration = Duration::from_millis(1500);

/// The most relays one session registers with.
const MAX_RELAYS_PER_SESSION: usize = 2;

/// Whether a session's nominated pair goes through no relay (ours, the peer's or a friend's).
fn has_direct_path(s: &Session) -> bool {
    chosen_pair(s)
        .is_some_and(|(l, r)| l.kind != CandidateKind::Relayed && r.kind != CandidateKind::Relayed)
}

/// The nominated pair of a session as candidates (with their types).
fn chosen_pair(s: &Session) -> Option<(Candidate, Candidate)> {
    let (source, destination) = s.nominated?;
    let local = s
        .agent
        .local_candidates()
        .find(|c| c.addr() == source || c.local() == source)
        .and_then(|c| ice::from_agent(&c))?;
    let remote = s
        .agent
        .remote_candidates()
        .find(|c| c.addr() == destination)
        .and_then(|c| ice::from_agent(&c))?;
    Some((local, remote))
}

/// Gives the agent the remote credentials and candidates of an offer.
fn apply_remote(agent: &mut IceAgent, offer: &LinkOffer) {
    agent.set_remote_credentials(IceCreds {
        ufrag: offer.ufrag.clone(),
        pass: offer.pwd.clone(),
    });
    for c in offer.candidates.iter().take(MAX_CANDIDATES) {
        if let Some(c) = ice::to_agent(c) {
            agent.add_remote_candidate(c);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::LinkState;
    use crate::packet::tests::ipv4;
    use boringtun::x25519::StaticSecret;

    struct Dev {
        engine: Engine,
        id: DeviceId,
        /// The address of its first interface.
        addr: SocketAddr,
        /// The addresses of its other interfaces.
        more: Vec<SocketAddr>,
    }

    impl Dev {
        fn owns(&self, addr: SocketAddr) -> bool {
            self.addr == addr || self.more.contains(&addr)
        }

        /// The address it sends from to `to`, as routing picks it: its address in the same
        /// /24, else its first.
        fn source_for(&self, to: SocketAddr) -> SocketAddr {
            let net = |a: SocketAddr| match a.ip() {
                std::net::IpAddr::V4(v4) => Some([v4.octets()[0], v4.octets()[1], v4.octets()[2]]),
                std::net::IpAddr::V6(_) => None,
            };
            self.more
                .iter()
                .copied()
                .find(|a| net(*a).is_some() && net(*a) == net(to))
                .unwrap_or(self.addr)
        }

        /// Gives it another interface, at `addr`, offered as a host candidate.
        fn add_interface(&mut self, addr: &str) -> SocketAddr {
            let addr: SocketAddr = addr.parse().unwrap();
            self.more.push(addr);
            let hosts = std::iter::once(self.addr)
                .chain(self.more.clone())
                .collect();
            self.engine.set_host_candidates(hosts);
            addr
        }
    }

    /// A device in the social overlay, at `social` (address and prefix).
    fn dev(user: &str, device: &str, addr: &str, social: &str) -> Dev {
        dev_linking(user, device, addr, social, LinkPolicy::All, Duration::ZERO)
    }

    /// A device in the social overlay, at `social`, with the link policy `links`.
    fn dev_linking(
        user: &str,
        device: &str,
        addr: &str,
        social: &str,
        links: LinkPolicy,
        idle_timeout: Duration,
    ) -> Dev {
        let net: ipnet::Ipv4Net = social.parse().unwrap();
        let social = OverlayConfig {
            id: OverlayId::Social,
            subnet: net.trunc(),
            address: Some(net.addr()),
            links,
            idle_timeout,
            advertise: Vec::new(),
            accept_routes: false,
        };
        dev_in(user, device, addr, vec![social], Memory::default())
    }

    fn group(room: &str, subnet: &str, address: Option<&str>) -> OverlayConfig {
        OverlayConfig {
            id: OverlayId::Group(room.to_owned()),
            subnet: subnet.parse().unwrap(),
            address: address.map(|a| a.parse().unwrap()),
            links: LinkPolicy::All,
            idle_timeout: Duration::ZERO,
            advertise: Vec::new(),
            accept_routes: false,
        }
    }

    fn dev_in(
        user: &str,
        device: &str,
        addr: &str,
        overlays: Vec<OverlayConfig>,
        memory: Memory,
    ) -> Dev {
        let secret = StaticSecret::random_from_rng(rand_core::OsRng);
        let node = Node::new(secret, Vec::new()).unwrap();
        let addr: SocketAddr = addr.parse().unwrap();
        let seed = match addr.ip() {
            std::net::IpAddr::V4(v4) => u64::from(v4.octets()[3]),
            std::net::IpAddr::V6(v6) => u64::from(v6.octets()[15]),
        };
        let mut engine = Engine::new(node, overlays, memory, seed, !seed);
        engine.set_host_candidates(vec![addr]);
        Dev {
            engine,
            id: DeviceId::new(user, device),
            addr,
            more: Vec::new(),
        }
    }

    struct World {
        devs: Vec<Dev>,
        now: Instant,
        signals_sent: usize,
        /// Every datagram from the first address to the second is lost.
        cut: Vec<(SocketAddr, SocketAddr)>,
        /// One-way paths that lose STUN requests (ICE checks) but pass everything else.
        checks_lost: Vec<(SocketAddr, SocketAddr)>,
        /// The packets each device delivered to its TUN device during `run`.
        delivered: Vec<Vec<Vec<u8>>>,
        /// Every signal sent during `run`: from, to, signal.
        signals: Vec<(usize, DeviceId, Signal)>,
        /// Link offers sent during `run` marked urgent.
        urgent_offers: usize,
    }

    impl World {
        fn new(devs: Vec<Dev>) -> Self {
            let now = Instant::now();
            let mut w = World {
                delivered: vec![Vec::new(); devs.len()],
                devs,
                now,
                signals_sent: 0,
                cut: Vec::new(),
                checks_lost: Vec::new(),
                signals: Vec::new(),
                urgent_offers: 0,
            };
            for d in &mut w.devs {
                let me = d.id.clone();
                d.engine.handle_osn(now, OsnEvent::Online { me });
            }
            w
        }

        fn key(&self, i: usize) -> PublicKey {
            self.devs[i].engine.node().public_key()
        }

        /// Device `i` sees `users` as the members of `overlay`.
        fn members(&mut self, i: usize, overlay: &OverlayId, users: &[&str]) {
            let users = users.iter().map(|u| u.to_string()).collect();
            let ev = OsnEvent::Members {
                overlay: overlay.clone(),
                users,
            };
            self.devs[i].engine.handle_osn(self.now, ev);
        }

        /// Device `i` sees device `j` online through `overlay`, announcing `key` and its
        /// address there.
        fn sees(&mut self, i: usize, j: usize, overlay: &OverlayId, key: PublicKey) {
            let claim = self.devs[j]
                .engine
                .claims()
                .into_iter()
                .find(|(o, _)| o == overlay)
                .map(|(_, c)| c);
            let ev = OsnEvent::DeviceUp {
                overlay: overlay.clone(),
                device: self.devs[j].id.clone(),
                key,
                relay: None,
                routes: Vec::new(),
                exit_dns: None,
                claim,
            };
            self.devs[i].engine.handle_osn(self.now, ev);
        }

        /// Device `i` sees the presence of device `j` in `overlay` vanish.
        fn loses(&mut self, i: usize, j: usize, overlay: &OverlayId) {
            let ev = OsnEvent::DeviceDown {
                overlay: overlay.clone(),
                device: self.devs[j].id.clone(),
            };
            self.devs[i].engine.handle_osn(self.now, ev);
        }

        /// Device `i` sees `device` announce `key` through `overlay`, claiming nothing.
        fn announce(&mut self, i: usize, device: &DeviceId, overlay: &OverlayId, key: PublicKey) {
            let ev = OsnEvent::DeviceUp {
                overlay: overlay.clone(),
                device: device.clone(),
                key,
                relay: None,
                routes: Vec::new(),
                exit_dns: None,
                claim: None,
            };
            self.devs[i].engine.handle_osn(self.now, ev);
        }

        /// Runs the world for `steps` steps of 20 ms: signals and datagrams are delivered.
        fn run(&mut self, steps: usize) {
            let mut out = vec![0u8; 4096];
            for _ in 0..steps {
                self.now += Duration::from_millis(20);
                for d in &mut self.devs {
                    d.engine.handle_timeout(self.now);
                }
                for i in 0..self.devs.len() {
                    while let Some(Outgoing { to, signal, urgent }) =
                        self.devs[i].engine.poll_signal()
                    {
                        self.signals_sent += 1;
                        self.urgent_offers += usize::from(urgent);
                        self.signals.push((i, to.clone(), signal.clone()));
                        let from = self.devs[i].id.clone();
                        if let Some(j) = self.devs.iter().position(|d| d.id == to) {
                            let ev = OsnEvent::Signal { from, signal };
                            self.devs[j].engine.handle_osn(self.now, ev);
                        }
                    }
                    while let Some(t) = self.devs[i].engine.poll_transmit() {
                        let from = self.devs[i].source_for(t.destination);
                        if !self.passes(from, t.destination) {
                            continue;
                        }
                        let check = classify(&t.payload) == DatagramKind::Stun
                            && t.payload.first() == Some(&0)
                            && t.payload.get(1) == Some(&1);
                        if check && self.checks_lost.contains(&(from, t.destination)) {
                            continue;
                        }
                        if let Some(j) = self.devs.iter().position(|d| d.owns(t.destination)) {
                            let now = self.now;
                            let e = &mut self.devs[j].engine;
                            if let Some(n) =
                                e.handle_udp(now, t.destination, from, &t.payload, &mut out)
                            {
                                self.delivered[j].push(out[..n].to_vec());
                            }
                        }
                    }
                }
            }
        }

        /// From now on, every datagram between `a` and `b` is lost, both ways.
        fn cut(&mut self, a: SocketAddr, b: SocketAddr) {
            self.cut.extend([(a, b), (b, a)]);
        }

        fn passes(&self, from: SocketAddr, to: SocketAddr) -> bool {
            !self.cut.contains(&(from, to))
        }

        /// Runs until `done` holds, for at most `limit` of simulated time; returns how long it
        /// took.
        fn run_until(&mut self, limit: Duration, done: impl Fn(&World) -> bool) -> Duration {
            let start = self.now;
            while !done(self) {
                assert!(
                    self.now - start < limit,
                    "not done within {limit:?}: {:?} / {:?}",
                    self.link(0),
                    self.link(1)
                );
                self.run(1);
            }
            self.now - start
        }

        fn link(&self, i: usize) -> Option<LinkStatus> {
            self.devs[i].engine.links().into_iter().next()
        }

        fn connected(&self, i: usize) -> bool {
            self.link(i)
                .and_then(|l| l.peer)
                .is_some_and(|p| p.state == LinkState::Connected)
        }
    }

    fn alice_and_bob() -> World {
        World::new(vec![
            dev(
                "alice@example.org",
                "laptop",
                "192.0.2.1:51820",
                "10.78.0.1/16",
            ),
            dev(
                "bob@example.org",
                "phone",
                "192.0.2.2:51820",
                "10.78.0.2/16",
            ),
        ])
    }

    fn friends() -> World {
        let mut w = alice_and_bob();
        let social = OverlayId::Social;
        let both = ["alice@example.org", "bob@example.org"];
        w.members(0, &social, &both);
        w.members(1, &social, &both);
        let (ka, kb) = (w.key(0), w.key(1));
        w.sees(0, 1, &social, kb);
        w.sees(1, 0, &social, ka);
        w
    }

    #[test]
    fn a_presence_or_a_signal_settles_only_the_device_concerned() {
        let mut me = dev(
            "alice@example.org",
            "laptop",
            "192.0.2.1:51820",
            "10.78.0.1/16",
        );
        let now = Instant::now();
        let social = OverlayId::Social;
        let users: Vec<String> = (0..=100).map(|i| format!("user{i}@example.org")).collect();
        let e = &mut me.engine;
        e.handle_osn(now, OsnEvent::Online { me: me.id.clone() });
        e.handle_osn(
            now,
            OsnEvent::Members {
                overlay: social.clone(),
                users: users.clone(),
            },
        );
        let key = || PublicKey::from_secret(&StaticSecret::random_from_rng(rand_core::OsRng));
        let up = |user: &str, key: PublicKey| OsnEvent::DeviceUp {
            overlay: OverlayId::Social,
            device: DeviceId::new(user, "pc"),
            key,
            relay: None,
            routes: Vec::new(),
            exit_dns: None,
            claim: None,
        };
        for user in &users[..100] {
            e.handle_osn(now, up(user, key()));
        }
        assert_eq!(e.links.len(), 100);
        // A full reconcile, on a new roster, visits every device: the counter counts.
        e.settled = 0;
        e.handle_osn(
            now,
            OsnEvent::Members {
                overlay: social.clone(),
                users: users.clone(),
            },
        );
        assert_eq!(e.settled, 100);

        e.settled = 0;
        e.handle_osn(now, up(&users[100], key()));
        assert_eq!(e.settled, 1, "a new device's presence");
        assert_eq!(e.links.len(), 101);

        e.settled = 0;
        e.handle_osn(
            now,
            OsnEvent::DeviceDown {
                overlay: social.clone(),
                device: DeviceId::new(&users[7], "pc"),
            },
        );
        assert_eq!(e.settled, 1, "a presence that went");
        assert_eq!(e.links.len(), 100);

        e.settled = 0;
        e.handle_osn(
            now,
            OsnEvent::Signal {
                from: DeviceId::new(&users[3], "pc"),
                signal: Signal::Terminate {
                    session: "unknown".into(),
                    reason: TerminateReason::Done,
                },
            },
        );
        assert!(e.settled <= 1, "a signal settled {} devices", e.settled);
    }

    #[test]
    fn a_friends_relay_ranks_above_turn_when_it_answers_faster_and_below_direct_paths() {
        let turn = is::Candidate::relayed(
            "198.51.100.1:49152".parse().unwrap(),
            "192.168.1.2:51820".parse().unwrap(),
            "udp",
        )
        .unwrap()
        .prio();
        let srflx = is::Candidate::server_reflexive(
            "198.51.100.2:40000".parse().unwrap(),
            "192.168.1.2:51820".parse().unwrap(),
            "udp",
        )
        .unwrap()
        .prio();
        let ms = Duration::from_millis;
        let faster = peer_relay_priority(Some(ms(3)), Some(ms(40)));
        let slower = peer_relay_priority(Some(ms(40)), Some(ms(3)));
        assert!(turn < faster && faster < srflx, "{turn} {faster} {srflx}");
        assert!(slower < turn, "{slower} {turn}");
        // No TURN time (none over UDP): the relay is preferred; no relay time: it is not.
        assert_eq!(peer_relay_priority(Some(ms(40)), None), faster);
        assert_eq!(peer_relay_priority(None, Some(ms(40))), slower);
        assert_eq!(peer_relay_priority(None, None), slower);
    }

    #[test]
    fn friends_link_up_with_four_signals_and_carry_packets() {
        let mut w = friends();
        w.run(25);
        assert!(
            w.connected(0) && w.connected(1),
            "{:?} / {:?}",
            w.link(0),
            w.link(1)
        );
        // Offer and answer (each an IQ with its result in XMPP): four stanzas in all.
        assert_eq!(w.signals_sent, 2);
        let link = w.link(0).unwrap();
        assert_eq!(link.phase, LinkPhase::Connected);
        let (local, remote) = link.pair.expect("a chosen pair");
        assert_eq!(remote.address, w.devs[1].addr);
        assert_eq!(
            (local.kind, remote.kind),
            (CandidateKind::Host, CandidateKind::Host)
        );

        let mut wire = vec![0u8; 2048];
        let mut inner = vec![0u8; 2048];
        // Each side numbers the other in its own subnet; addresses are translated on the way.
        let numbers = |i: usize| w.devs[i].engine.memory().social_numbers.clone();
        let bob_for_alice = numbers(0)[&w.devs[1].id];
        let alice_for_bob = numbers(1)[&w.devs[0].id];
        let mut p = ipv4([10, 78, 0, 1], bob_for_alice.octets(), b"hi bob");
        let Wire {
            destination: dst,
            len: n,
            ..
        } = w.devs[0]
            .engine
            .handle_tun(&mut p, &mut wire)
            .expect("routed");
        assert_eq!(dst, w.devs[1].addr);
        let (now, from, to) = (w.now, w.devs[0].addr, w.devs[1].addr);
        let got = w.devs[1]
            .engine
            .handle_udp(now, to, from, &wire[..n], &mut inner)
            .expect("delivered");
        let seen = crate::packet::addresses(&inner[..got]);
        let expect = (alice_for_bob.into(), "10.78.0.2".parse().unwrap());
        assert_eq!(seen, Some(expect));
        assert_eq!(&inner[20..got], b"hi bob");
    }

    #[test]
    fn a_candidate_found_later_is_trickled_to_the_other_device() {
        let mut w = friends();
        w.run(2);
        let srflx = is::Candidate::server_reflexive(
            "203.0.113.1:40000".parse().unwrap(),
            w.devs[0].addr,
            "udp",
        )
        .unwrap();
        w.devs[0].engine.add_local_candidate(srflx);
        w.run(5);
        let (_, remote) = w.link(1).expect("bob's link").tried;
        assert!(
            remote
                .iter()
                .any(|c| c.kind == CandidateKind::ServerReflexive
                    && c.address == "203.0.113.1:40000".parse().unwrap()),
            "{remote:?}"
        );
    }

    #[test]
    fn an_offer_from_a_stranger_is_refused_and_counted() {
        let mut w = World::new(vec![
            dev(
                "alice@example.org",
                "laptop",
                "192.0.2.1:51820",
                "10.78.0.1/16",
            ),
            dev("eve@example.org", "pc", "192.0.2.5:51820", "10.78.0.5/16"),
        ]);
        let social = OverlayId::Social;
        w.members(0, &social, &["alice@example.org"]);
        // Eve thinks Alice is her friend and offers a link.
        w.members(1, &social, &["eve@example.org", "alice@example.org"]);
        let ka = w.key(0);
        w.sees(1, 0, &social, ka);
        // Eve's ID sorts after Alice's: she offers once her grace period is over.
        w.run(200);
        assert!(!w.connected(0) && !w.connected(1));
        assert!(
            w.devs[0]
                .engine
                .drops()
                .get(DropReason::SignalNotAuthorised)
                >= 1
        );
        assert_eq!(w.devs[0].engine.node().peers().count(), 0);
        let eve_link = w.link(1).expect("eve keeps trying");
        assert!(
            eve_link
                .last_error
                .unwrap_or_default()
                .contains("does not authorise")
        );
    }

    #[test]
    fn an_offer_with_another_key_than_announced_is_refused() {
        let mut w = alice_and_bob();
        let both = ["alice@example.org", "bob@example.org"];
        w.members(0, &OverlayId::Social, &both);
        w.members(1, &OverlayId::Social, &both);
        // Alice saw Bob announce a different key than the one his engine uses.
        let other = PublicKey::from_secret(&StaticSecret::random_from_rng(rand_core::OsRng));
        w.sees(0, 1, &OverlayId::Social, other);
        let ka = w.key(0);
        w.sees(1, 0, &OverlayId::Social, ka);
        w.run(50);
        assert!(!w.connected(0) && !w.connected(1));
        assert!(w.devs[0].engine.drops().get(DropReason::SignalWrongKey) >= 1);
    }

    #[test]
    fn a_changed_key_closes_the_link_and_is_refused_until_trusted() {
        let mut w = friends();
        w.run(25);
        assert!(w.connected(0));
        let pinned = w.key(1);
        assert_eq!(w.devs[0].engine.memory().pins[&w.devs[1].id], pinned);
        // Bob's device announces a new key (reinstalled, say): an explicit change, so Alice's
        // side closes the link at once, and refuses the new key.
        let secret = StaticSecret::random_from_rng(rand_core::OsRng);
        let fresh = PublicKey::from_secret(&secret);
        w.sees(0, 1, &OverlayId::Social, fresh);
        assert!(w.link(0).is_none());
        assert_eq!(w.devs[0].engine.node().peers().count(), 0);
        w.run(5);
        assert!(w.link(0).is_none());
        assert_eq!(w.devs[0].engine.memory().pins[&w.devs[1].id], pinned);
        assert_eq!(w.devs[0].engine.drops().get(DropReason::KeyNotTrusted), 1);
        let unlinked = w.devs[0].engine.unlinked();
        assert_eq!(unlinked.len(), 1);
        assert_eq!(unlinked[0].key, fresh);
        assert_eq!(unlinked[0].reason, UnlinkedReason::KeyNotTrusted { pinned });
        // Trusting it replaces the pin and the link.
        let bob = w.devs[1].id.clone();
        let now = w.now;
        assert_eq!(w.devs[0].engine.trust(now, &bob), Ok(fresh));
        assert_eq!(w.devs[0].engine.memory().pins[&bob], fresh);
        assert!(w.devs[0].engine.unlinked().is_empty());
        assert_eq!(w.link(0).unwrap().key, fresh);
        assert!(
            w.devs[0].engine.trust(now, &bob).is_err(),
            "nothing left to trust"
        );
    }

    /// Alice's and Bob's devices, linked, with each side's XMPP view of the other gone.
    fn linked_then_offline() -> World {
        let mut w = friends();
        w.run(25);
        assert!(w.connected(0) && w.connected(1));
        w.loses(0, 1, &OverlayId::Social);
        w.loses(1, 0, &OverlayId::Social);
        w
    }

    #[test]
    fn a_link_outlives_the_presence_while_wireguard_hears_from_the_device() {
        let mut w = friends();
        w.run(25);
        assert!(w.connected(0) && w.connected(1));
        let slots = (slot(&w, 0), slot(&w, 1));
        let before = tunnel(&mut w, 0, 1, b"one");
        assert_eq!(before.arrived.as_deref(), Some(&b"one"[..]));
        let signals = w.signals_sent;
        // The XMPP server goes away: each side sees the other's presence vanish.
        w.loses(0, 1, &OverlayId::Social);
        w.loses(1, 0, &OverlayId::Social);
        for i in 0..2 {
            let link = w.link(i).expect("the link stays");
            assert!(link.offline);
            assert_eq!(link.phase, LinkPhase::Connected);
            assert_eq!(link.overlays, vec![OverlayId::Social]);
        }
        // Four minutes on, past the 3-minute limit, with packets both ways every 30 s: the link
        // stays, in the same WireGuard session, and nothing is signalled.
        for _ in 0..8 {
            w.run(1500);
            let there = tunnel(&mut w, 0, 1, b"ping");
            let back = tunnel(&mut w, 1, 0, b"pong");
            assert_eq!(there.arrived.as_deref(), Some(&b"ping"[..]));
            assert_eq!(back.arrived.as_deref(), Some(&b"pong"[..]));
            assert_eq!(there.session, before.session);
        }
        assert_eq!((slot(&w, 0), slot(&w, 1)), slots);
        assert_eq!(w.signals_sent, signals);
        // Both announce themselves again with the same keys: present again, the same link,
        // nothing renegotiated.
        let (ka, kb) = (w.key(0), w.key(1));
        w.sees(0, 1, &OverlayId::Social, kb);
        w.sees(1, 0, &OverlayId::Social, ka);
        w.run(50);
        for i in 0..2 {
            let link = w.link(i).expect("the link");
            assert!(!link.offline);
            assert_eq!(link.phase, LinkPhase::Connected);
        }
        assert_eq!((slot(&w, 0), slot(&w, 1)), slots);
        assert_eq!(w.signals_sent, signals);
        let after = tunnel(&mut w, 0, 1, b"two");
        assert_eq!(after.arrived.as_deref(), Some(&b"two"[..]));
        assert_eq!(after.session, before.session);
    }

    #[test]
    fn a_link_to_a_device_offline_on_xmpp_closes_after_3_minutes_of_wireguard_silence() {
        let mut w = friends();
        w.run(25);
        assert!(w.connected(0) && w.connected(1));
        let sent = [tunnel(&mut w, 0, 1, b"one"), tunnel(&mut w, 1, 0, b"two")];
        assert!(sent.iter().all(|s| s.arrived.is_some()));
        let heard = w.now;
        // The presences vanish, and so does the network between them.
        w.loses(0, 1, &OverlayId::Social);
        w.loses(1, 0, &OverlayId::Social);
        let (a, b) = (w.devs[0].addr, w.devs[1].addr);
        w.cut(a, b);
        // One deadline covers it: the engine asks to be woken by then.
        let due = w.devs[0].engine.poll_timeout().expect("a deadline");
        assert!(due <= heard + SILENCE_LIMIT, "{due:?}");
        // 2 min 50 s on, the path lost and no restart possible without XMPP, the link stays.
        w.run_until(Duration::from_secs(200), |w| {
            w.now >= heard + Duration::from_secs(170)
        });
        assert!(w.link(0).is_some_and(|l| l.offline) && w.link(1).is_some());
        let gone = |w: &World| w.link(0).is_none() && w.link(1).is_none();
        w.run_until(Duration::from_secs(30), gone);
        let silent = w.now - heard;
        assert!(
            silent >= SILENCE_LIMIT && silent <= SILENCE_LIMIT + Duration::from_millis(40),
            "closed after {silent:?} of silence"
        );
        for i in 0..2 {
            assert_eq!(w.devs[i].engine.node().peers().count(), 0);
            assert!(w.devs[i].engine.unlinked().is_empty());
        }
        // Nothing is left to wake the engine for but WireGuard's timers.
        assert_eq!(
            w.devs[0].engine.poll_timeout(),
            w.devs[0].engine.node().poll_timeout()
        );
    }

    #[test]
    fn a_revocation_or_a_new_key_closes_a_link_kept_by_wireguard_at_once() {
        let mut w = linked_then_offline();
        assert!(w.link(0).is_some_and(|l| l.offline));
        // Alice removes Bob from her roster.
        w.members(0, &OverlayId::Social, &["alice@example.org"]);
        assert!(w.link(0).is_none());
        assert_eq!(w.devs[0].engine.node().peers().count(), 0);
        // Bob's side sees Alice's device announce another key.
        assert!(w.link(1).is_some_and(|l| l.offline));
        let fresh = PublicKey::from_secret(&StaticSecret::random_from_rng(rand_core::OsRng));
        w.sees(1, 0, &OverlayId::Social, fresh);
        assert!(w.link(1).is_none());
        assert_eq!(w.devs[1].engine.node().peers().count(), 0);
        assert_eq!(w.devs[1].engine.drops().get(DropReason::KeyNotTrusted), 1);
    }

    #[test]
    fn a_device_back_with_the_same_key_before_the_path_fails_keeps_its_session() {
        let mut w = linked_then_offline();
        let slots = (slot(&w, 0), slot(&w, 1));
        // Only Bob's device comes back for Alice; its key is the pinned one.
        let kb = w.key(1);
        w.sees(0, 1, &OverlayId::Social, kb);
        assert!(w.link(0).is_some_and(|l| !l.offline));
        assert!(w.link(1).is_some_and(|l| l.offline));
        w.run(100);
        assert_eq!((slot(&w, 0), slot(&w, 1)), slots);
        let sent = tunnel(&mut w, 1, 0, b"hi");
        assert_eq!(sent.arrived.as_deref(), Some(&b"hi"[..]));
    }

    #[test]
    fn a_key_announced_by_another_device_is_refused_and_counted_and_ipop_trust_moves_it() {
        let mut w = friends();
        let social = OverlayId::Social;
        let members = ["alice@example.org", "bob@example.org", "carol@example.org"];
        w.members(0, &social, &members);
        w.run(25);
        assert!(w.connected(0) && w.connected(1));
        let slots = (slot(&w, 0), slot(&w, 1));
        let (ka, kb) = (w.key(0), w.key(1));
        let bob = w.devs[1].id.clone();
        let pins = w.devs[0].engine.memory().pins.clone();
        // Carol, a friend, announces Bob's phone's key from a device of hers; Bob announces
        // it from another device of his; and Carol announces Alice's own key.
        let fake = DeviceId::new("carol@example.org", "fake");
        let tablet = DeviceId::new("bob@example.org", "tablet");
        let mirror = DeviceId::new("carol@example.org", "mirror");
        w.announce(0, &fake, &social, kb);
        w.announce(0, &tablet, &social, kb);
        w.announce(0, &mirror, &social, ka);
        // Again: the same refusal is counted once.
        w.announce(0, &fake, &social, kb);
        w.run(25);
        let e = &w.devs[0].engine;
        assert_eq!(e.drops().get(DropReason::KeyClaimedByOther), 3);
        assert_eq!(e.memory().pins, pins, "nothing pinned for the claimants");
        let mut refused: Vec<(DeviceId, UnlinkedReason)> = e
            .unlinked()
            .into_iter()
            .map(|u| (u.device, u.reason))
            .collect();
        refused.sort_by(|x, y| x.0.cmp(&y.0));
        let held_by = |d: &DeviceId| UnlinkedReason::KeyClaimedByOther { holder: d.clone() };
        assert_eq!(
            refused,
            vec![
                (tablet.clone(), held_by(&bob)),
                (fake.clone(), held_by(&bob)),
                (mirror, held_by(&w.devs[0].id)),
            ]
        );
        // The first holder keeps its link.
        assert_eq!(e.links().len(), 1);
        assert_eq!((slot(&w, 0), slot(&w, 1)), slots);
        let sent = tunnel(&mut w, 0, 1, b"bob");
        assert_eq!(sent.arrived.as_deref(), Some(&b"bob"[..]));
        // Alice's own key cannot be moved; Bob's can, deliberately: his pin and link go.
        let now = w.now;
        assert!(
            w.devs[0]
                .engine
                .trust(now, &DeviceId::new("carol@example.org", "mirror"))
                .is_err()
        );
        assert_eq!(w.devs[0].engine.trust(now, &fake), Ok(kb));
        let e = &w.devs[0].engine;
        assert_eq!(e.memory().pins.get(&fake), Some(&kb));
        assert_eq!(e.memory().pins.get(&bob), None);
        assert!(e.links().iter().all(|l| l.device != bob));
        assert!(
            e.unlinked()
                .iter()
                .any(|u| u.device == bob && u.reason == held_by(&fake))
        );
    }

    #[test]
    fn a_stranger_leaves_no_trace() {
        let mut w = World::new(vec![
            dev(
                "alice@example.org",
                "laptop",
                "192.0.2.1:51820",
                "10.78.0.1/16",
            ),
            dev("eve@example.org", "pc", "192.0.2.5:51820", "10.78.0.5/16"),
        ]);
        let social = OverlayId::Social;
        w.members(0, &social, &["alice@example.org"]);
        w.members(1, &social, &["eve@example.org", "alice@example.org"]);
        let memory = w.devs[0].engine.memory().clone();
        let version = w.devs[0].engine.memory_version();
        // Eve's presence reaches Alice's device (a directed presence), and Eve's device offers.
        let (ka, ke) = (w.key(0), w.key(1));
        w.sees(0, 1, &social, ke);
        w.sees(1, 0, &social, ka);
        w.run(250);
        let e = &w.devs[0].engine;
        assert!(e.drops().get(DropReason::SignalNotAuthorised) >= 1);
        assert_eq!(e.drops().get(DropReason::DeviceNotAuthorised), 1);
        assert_eq!(e.memory(), &memory);
        assert_eq!(e.memory_version(), version);
        assert!(e.links().is_empty());
        let unlinked = e.unlinked();
        assert_eq!(unlinked.len(), 1);
        assert_eq!(unlinked[0].reason, UnlinkedReason::NotAuthorised);
        // Once Alice befriends Eve, the remembered presence links, and only now is the key
        // pinned.
        w.members(0, &social, &["alice@example.org", "eve@example.org"]);
        let eve = w.devs[1].id.clone();
        assert_eq!(w.devs[0].engine.memory().pins.get(&eve), Some(&ke));
        w.run_until(Duration::from_secs(10), |w| {
            w.connected(0) && w.connected(1)
        });
    }

    #[test]
    fn routed_prefixes_are_taken_only_where_accepted_and_never_over_what_is_there() {
        let mut w = alice_and_bob();
        let social = OverlayId::Social;
        w.devs[0].engine.accepting.insert(social.clone());
        let users = ["alice@example.org", "bob@example.org", "carol@example.org"];
        w.members(0, &social, &users);
        w.devs[0]
            .engine
            .set_local_networks(vec!["192.168.1.0/24".parse().unwrap()]);
        let route = |device: &str, routes: &[&str]| OsnEvent::DeviceUp {
            overlay: OverlayId::Social,
            device: DeviceId::new(
                device.split('/').next().unwrap(),
                device.split('/').nth(1).unwrap(),
            ),
            key: PublicKey([device.len() as u8; 32]),
            claim: None,
            relay: None,
            routes: routes.iter().map(|r| r.parse().unwrap()).collect(),
            exit_dns: None,
        };
        let now = w.now;
        let e = &mut w.devs[0].engine;
        e.handle_osn(
            now,
            route(
                "bob@example.org/phone",
                &["192.168.50.0/24", "192.168.1.0/25", "10.78.3.0/24"],
            ),
        );
        e.handle_osn(
            now,
            route("carol@example.org/pi", &["192.168.50.128/25", "fd12::/64"]),
        );
        // Eve is no member: her routes are not even considered.
        e.handle_osn(now, route("eve@example.org/x", &["192.168.70.0/24"]));
        let states: Vec<(String, String, RouteState)> = e
            .routes()
            .iter()
            .map(|r| (r.prefix.to_string(), r.device.user.clone(), r.state.clone()))
            .collect();
        let accepted = |a: &str| RouteState::Accepted {
            source: a.parse().unwrap(),
        };
        let refused = |why: &str| RouteState::Refused(why.to_owned());
        let own_v6 = e.own_addresses()[0].v6.addr().to_string();
        assert_eq!(
            states,
            vec![
                (
                    "192.168.50.0/24".into(),
                    "bob@example.org".into(),
                    accepted("10.78.0.1")
                ),
                (
                    "192.168.1.0/25".into(),
                    "bob@example.org".into(),
                    refused("overlaps 192.168.1.0/24, a network of this device")
                ),
                (
                    "10.78.3.0/24".into(),
                    "bob@example.org".into(),
                    refused("overlaps 10.78.0.0/16 of the social overlay")
                ),
                (
                    "192.168.50.128/25".into(),
                    "carol@example.org".into(),
                    refused("overlaps 192.168.50.0/24, routed by bob@example.org/phone")
                ),
                (
                    "fd12::/64".into(),
                    "carol@example.org".into(),
                    accepted(&own_v6)
                ),
            ]
        );
        // Bob withdraws his routes: Carol's /25 is taken now.
        let version = e.routes_version();
        e.handle_osn(now, route("bob@example.org/phone", &[]));
        assert!(e.routes_version() > version);
        assert!(e.routes().iter().any(
            |r| r.prefix.to_string() == "192.168.50.128/25" && r.state == accepted("10.78.0.1")
        ));
        // Bob's device (no routes, no link) is not touched again by a presence without routes.
        let version = e.routes_version();
        e.handle_osn(now, route("bob@example.org/phone", &[]));
        assert_eq!(e.routes_version(), version);
        // Where routes are not accepted, they are listed, not taken.
        e.accepting.clear();
        e.handle_osn(now, route("carol@example.org/pi", &["192.168.50.128/25"]));
        assert_eq!(e.routes()[0].state, RouteState::NotAccepted);
    }

    #[test]
    fn announcements_from_strangers_are_bounded_in_memory() {
        let mut w = alice_and_bob();
        let social = OverlayId::Social;
        w.members(0, &social, &["alice@example.org"]);
        let memory = w.devs[0].engine.memory().clone();
        let key = w.key(1);
        for n in 0..MAX_STRANGERS + 100 {
            let device = DeviceId::new("eve@example.org", format!("r{n}"));
            w.announce(0, &device, &social, key);
        }
        let e = &w.devs[0].engine;
        assert_eq!(e.strangers.len(), MAX_STRANGERS);
        assert_eq!(e.unlinked().len(), MAX_STRANGERS);
        assert_eq!(
            e.drops().get(DropReason::DeviceNotAuthorised),
            (MAX_STRANGERS + 100) as u64
        );
        assert_eq!(e.memory(), &memory);
        // One that goes offline is forgotten, and makes room.
        let first = DeviceId::new("eve@example.org", "r0");
        w.devs[0].engine.handle_osn(
            w.now,
            OsnEvent::DeviceDown {
                overlay: social,
                device: first,
            },
        );
        assert_eq!(w.devs[0].engine.strangers.len(), MAX_STRANGERS - 1);
    }

    #[test]
    fn refusals_are_logged_once_a_minute_per_subject_with_bounded_memory() {
        let mut e = dev(
            "alice@example.org",
            "laptop",
            "192.0.2.1:51820",
            "10.78.0.1/16",
        )
        .engine;
        let t0 = Instant::now();
        assert!(e.may_log(t0, "eve@example.org"));
        assert!(!e.may_log(t0 + Duration::from_secs(59), "eve@example.org"));
        assert!(e.may_log(t0, "mallory@example.org"), "another user");
        assert!(e.may_log(t0 + Duration::from_secs(60), "eve@example.org"));
        let later = t0 + Duration::from_secs(90);
        let logged = (0..REFUSAL_LOG_SUBJECTS + 10)
            .filter(|n| e.may_log(later, &format!("u{n}@example.org")))
            .count();
        assert_eq!(e.refusal_logs.len(), REFUSAL_LOG_SUBJECTS);
        assert!(logged < REFUSAL_LOG_SUBJECTS, "{logged}");
        // A minute on, the old entries make room.
        assert!(e.may_log(later + REFUSAL_LOG_INTERVAL, "new@example.org"));
        assert!(e.refusal_logs.len() <= REFUSAL_LOG_SUBJECTS);
    }

    #[test]
    fn overlays_do_not_cross_and_group_collisions_settle() {
        // Alice is in two groups; Bob only in the first. Both remember 10.20.0.7 in it.
        let (g1, g2) = ("one@rooms.example.org", "two@rooms.example.org");
        let contested: std::net::Ipv4Addr = "10.20.0.7".parse().unwrap();
        let mut memory = Memory::default();
        memory.group_addresses.insert(g1.to_owned(), contested);
        let mut w = World::new(vec![
            dev_in(
                "alice@example.org",
                "laptop",
                "192.0.2.1:51820",
                vec![
                    group(g1, "10.20.0.0/24", None),
                    group(g2, "10.30.0.0/24", Some("10.30.0.1")),
                ],
                memory.clone(),
            ),
            dev_in(
                "bob@example.org",
                "phone",
                "192.0.2.2:51820",
                vec![group(g1, "10.20.0.0/24", None)],
                memory,
            ),
        ]);
        let (o1, o2) = (OverlayId::Group(g1.into()), OverlayId::Group(g2.into()));
        let both = ["alice@example.org", "bob@example.org"];
        w.members(0, &o1, &both);
        w.members(1, &o1, &both);
        w.members(0, &o2, &["alice@example.org", "carol@example.org"]);
        let (ka, kb) = (w.key(0), w.key(1));
        w.sees(0, 1, &o1, kb);
        w.sees(1, 0, &o1, ka);
        // Alice sorts first and keeps the address; Bob moves and says so.
        assert_eq!(w.devs[0].engine.claims()[0].1.address, contested);
        let moved = w.devs[1].engine.claims()[0].1.address;
        assert_ne!(moved, contested);
        assert!(matches!(
            w.devs[1].engine.poll_event(),
            Some(EngineEvent::AddressChanged { old, new, .. }) if old == contested && new == moved
        ));
        assert_eq!(w.devs[0].engine.poll_event(), None);
        w.sees(0, 1, &o1, kb);
        w.run(25);
        assert!(w.connected(0) && w.connected(1));
        let mut wire = vec![0u8; 2048];
        let mut inner = vec![0u8; 2048];
        // Bob to Alice in the group they share: delivered.
        let mut p = ipv4(moved.octets(), contested.octets(), b"hi");
        let Wire { len: n, .. } = w.devs[1]
            .engine
            .handle_tun(&mut p, &mut wire)
            .expect("routed");
        let (now, from, to) = (w.now, w.devs[1].addr, w.devs[0].addr);
        let e = &mut w.devs[0].engine;
        assert!(
            e.handle_udp(now, to, from, &wire[..n], &mut inner)
                .is_some()
        );
        // Bob has no route to Alice's address in the group he is not in (and her side
        // would drop it: see the node's tests).
        let mut p = ipv4(moved.octets(), [10, 30, 0, 1], b"sneak");
        assert!(w.devs[1].engine.handle_tun(&mut p, &mut wire).is_none());
        assert_eq!(w.devs[1].engine.drops().get(DropReason::NoRoute), 1);
    }

    #[test]
    fn removing_a_friend_tears_the_link_down_on_both_sides() {
        let mut w = friends();
        w.run(25);
        assert!(w.connected(0));
        w.members(1, &OverlayId::Social, &["bob@example.org"]);
        w.run(2);
        assert!(w.link(1).is_none());
        assert_eq!(w.devs[1].engine.node().peers().count(), 0);
        // Bob's side told Alice's, which closed too, and does not retry.
        assert!(w.link(0).is_none_or(|l| l.peer.is_none()));
    }

    #[test]
    fn glare_ends_with_one_session() {
        let mut w = friends();
        // Make the second device offer at once as well.
        for l in w.devs[1].engine.links.values_mut() {
            l.next_attempt = w.now;
        }
        w.run(40);
        assert!(
            w.connected(0) && w.connected(1),
            "{:?} / {:?}",
            w.link(0),
            w.link(1)
        );
        let a = w.link(0).unwrap();
        assert_eq!(a.phase, LinkPhase::Connected);
    }

    /// What one packet through the tunnel showed.
    #[derive(Debug, PartialEq, Eq)]
    struct Sent {
        /// Where it went.
        to: SocketAddr,
        /// The WireGuard session it was sealed in (the receiver's index) and its counter.
        session: u32,
        counter: u64,
        /// What came out at the other end.
        arrived: Option<Vec<u8>>,
    }

    /// Sends `payload` (under 8 bytes: it is not read as a UDP header) through the tunnel from
    /// device `i` to device `j`, as an IP packet from `i`'s own social address to the one `i`
    /// gives `j`.
    fn tunnel(w: &mut World, i: usize, j: usize, payload: &[u8]) -> Sent {
        let own = w.devs[i].engine.own_addresses()[0].v4.addr();
        let target = w.devs[i].engine.memory().social_numbers[&w.devs[j].id];
        let mut p = ipv4(own.octets(), target.octets(), payload);
        let mut wire = vec![0u8; 2048];
        let Wire {
            destination: to,
            len: n,
            ..
        } = w.devs[i]
            .engine
            .handle_tun(&mut p, &mut wire)
            .expect("routed");
        assert_eq!(wire[0], 4, "a WireGuard data message");
        let session = u32::from_le_bytes(wire[4..8].try_into().unwrap());
        let counter = u64::from_le_bytes(wire[8..16].try_into().unwrap());
        let from = w.devs[i].source_for(to);
        let now = w.now;
        let mut inner = vec![0u8; 2048];
        let arrived = w.passes(from, to).then_some(()).and_then(|()| {
            w.devs[j]
                .engine
                .handle_udp(now, to, from, &wire[..n], &mut inner)
                .map(|len| inner[20..len].to_vec())
        });
        Sent {
            to,
            session,
            counter,
            arrived,
        }
    }

    /// The WireGuard peer slot of device `i`'s link.
    fn slot(w: &World, i: usize) -> Option<usize> {
        w.devs[i].engine.links.values().next().and_then(|l| l.peer)
    }

    #[test]
    fn a_lost_path_is_replaced_by_an_ice_restart_and_the_wireguard_session_carries_on() {
        let mut w = friends();
        w.run(25);
        assert!(w.connected(0) && w.connected(1));
        let (a1, b1) = (w.devs[0].addr, w.devs[1].addr);
        assert_eq!(
            w.link(0).and_then(|l| l.pair).map(|p| p.1.address),
            Some(b1)
        );
        let slots = (slot(&w, 0), slot(&w, 1));
        let before = [tunnel(&mut w, 0, 1, b"one"), tunnel(&mut w, 1, 0, b"two")];
        assert_eq!(before[0].arrived.as_deref(), Some(&b"one"[..]));
        assert_eq!(before[1].arrived.as_deref(), Some(&b"two"[..]));

        // The network between them fails, and both join another one.
        w.cut(a1, b1);
        let a2 = w.devs[0].add_interface("198.51.100.1:51820");
        let b2 = w.devs[1].add_interface("198.51.100.2:51820");
        assert_eq!(tunnel(&mut w, 0, 1, b"lost").arrived, None);
        let signals = w.signals_sent;
        let on_b2 = |w: &World| {
            let pair = |i: usize| w.link(i).and_then(|l| l.pair).map(|p| p.1.address);
            pair(0) == Some(b2) && pair(1) == Some(a2)
        };
        let took = w.run_until(Duration::from_secs(45), on_b2);
        assert!(took < Duration::from_secs(35), "recovered in {took:?}");
        // One offer and its answer; the WireGuard peers were kept.
        assert_eq!(w.signals_sent - signals, 2);
        assert_eq!((slot(&w, 0), slot(&w, 1)), slots);
        for i in 0..2 {
            let link = w.link(i).unwrap();
            assert_eq!(link.phase, LinkPhase::Connected);
            assert_eq!(link.last_error, None);
        }
        // Packets go over the new path at once, both ways, in the same WireGuard sessions:
        // no new handshake was needed.
        let after = [
            tunnel(&mut w, 0, 1, b"three"),
            tunnel(&mut w, 1, 0, b"four"),
        ];
        assert_eq!((after[0].to, after[1].to), (b2, a2));
        assert_eq!(after[0].arrived.as_deref(), Some(&b"three"[..]));
        assert_eq!(after[1].arrived.as_deref(), Some(&b"four"[..]));
        for (b, a) in before.iter().zip(&after) {
            assert_eq!(a.session, b.session);
            assert!(a.counter > b.counter);
        }
    }

    /// Whether device `i`'s ICE found its path dead: the session reports it lost, or a
    /// restart replaced it.
    fn path_lost(w: &World, i: usize) -> bool {
        let link = w.devs[i].engine.links.values().next();
        link.and_then(|l| l.session.as_ref())
            .is_some_and(|s| s.lost.is_some() || s.restart)
    }

    #[test]
    fn a_dead_path_is_found_within_5_seconds_while_traffic_flows() {
        let mut w = friends();
        w.run(25);
        assert!(w.connected(0) && w.connected(1));
        let (a1, b1) = (w.devs[0].addr, w.devs[1].addr);
        // Idle for a minute: consent checks keep the path, and nothing is lost.
        w.run(3000);
        assert!(!path_lost(&w, 0) && !path_lost(&w, 1));
        // The path dies just after Alice heard from Bob, while she sends 5 packets a second.
        assert!(tunnel(&mut w, 1, 0, b"last").arrived.is_some());
        w.cut(a1, b1);
        let start = w.now;
        while !path_lost(&w, 0) {
            assert!(
                w.now - start < Duration::from_secs(5),
                "the dead path is still in use after {:?}",
                w.now - start
            );
            assert_eq!(tunnel(&mut w, 0, 1, b"ping").arrived, None);
            w.run(10);
        }
        eprintln!("dead path found after {:?}", w.now - start);
    }

    #[test]
    fn a_link_that_wireguard_carries_is_kept_when_only_the_other_sides_checks_succeed() {
        let mut w = friends();
        // Bob's checks never reach Alice (his NAT maps them apart, say); everything else does.
        let (a, b) = (w.devs[0].addr, w.devs[1].addr);
        w.checks_lost.push((b, a));
        w.run(25);
        assert!(w.connected(0) && w.connected(1));
        let slots = (slot(&w, 0), slot(&w, 1));
        // 40 s on, well past the ICE timeout, Bob's agent has still not nominated, yet the
        // link stays.
        w.run(2000);
        assert_eq!((slot(&w, 0), slot(&w, 1)), slots);
        assert!(w.link(1).and_then(|l| l.last_error).is_none());
        let sent = tunnel(&mut w, 1, 0, b"hi");
        assert_eq!(sent.arrived.as_deref(), Some(&b"hi"[..]));
    }

    #[test]
    fn the_answering_side_restarts_ice_when_only_it_sees_the_path_fail() {
        let mut w = friends();
        w.run(25);
        assert!(w.connected(0) && w.connected(1));
        let initiator = |w: &World, i: usize| {
            let link = w.devs[i].engine.links.values().next();
            link.and_then(|l| l.session.as_ref()).map(|s| s.initiator)
        };
        assert_eq!(
            (initiator(&w, 0), initiator(&w, 1)),
            (Some(true), Some(false))
        );
        let slots = (slot(&w, 0), slot(&w, 1));
        // Alice's datagrams no longer reach Bob; Bob's still reach Alice. Her ICE agent, still
        // checked by Bob, keeps its path; his sees it fail.
        let (a1, b1) = (w.devs[0].addr, w.devs[1].addr);
        w.cut.push((a1, b1));
        let a2 = w.devs[0].add_interface("198.51.100.1:51820");
        let b2 = w.devs[1].add_interface("198.51.100.2:51820");
        let signals = w.signals_sent;
        let on_b2 = |w: &World| {
            let pair = |i: usize| w.link(i).and_then(|l| l.pair).map(|p| p.1.address);
            pair(0) == Some(b2) && pair(1) == Some(a2)
        };
        w.run_until(Duration::from_secs(45), on_b2);
        // Bob opened the new session, after waiting for Alice to; the peers stayed.
        assert_eq!(
            (initiator(&w, 0), initiator(&w, 1)),
            (Some(false), Some(true))
        );
        assert_eq!(w.signals_sent - signals, 2);
        assert_eq!((slot(&w, 0), slot(&w, 1)), slots);
        let sent = tunnel(&mut w, 0, 1, b"hi");
        assert_eq!(sent.arrived.as_deref(), Some(&b"hi"[..]));
    }

    #[test]
    fn a_lost_path_waits_for_the_social_network_to_restart() {
        let mut w = friends();
        w.run(25);
        assert!(w.connected(0) && w.connected(1));
        let slots = (slot(&w, 0), slot(&w, 1));
        for d in &mut w.devs {
            d.engine.handle_osn(w.now, OsnEvent::Offline);
        }
        let (a1, b1) = (w.devs[0].addr, w.devs[1].addr);
        w.cut(a1, b1);
        let lost = |w: &World, i: usize| {
            let link = w.devs[i].engine.links.values().next();
            link.and_then(|l| l.session.as_ref()).and_then(|s| s.lost)
        };
        w.run_until(Duration::from_secs(40), |w| {
            lost(w, 0).is_some() && lost(w, 1).is_some()
        });
        // No signal can go out: nothing is tried, the peers stay, and the engine does not
        // ask to be woken for it.
        let signals = w.signals_sent;
        w.run(500);
        assert_eq!(w.signals_sent, signals);
        assert_eq!((slot(&w, 0), slot(&w, 1)), slots);
        let due = w.devs[0].engine.poll_timeout().expect("timers");
        assert!(due > w.now, "{due:?} is not after {:?}", w.now);
        // The path comes back before the social network does: WireGuard carries on over it.
        w.cut.clear();
        let sent = tunnel(&mut w, 0, 1, b"back");
        assert_eq!(sent.arrived.as_deref(), Some(&b"back"[..]));
        // Once it is back, ICE restarts.
        for i in 0..2 {
            let me = w.devs[i].id.clone();
            w.devs[i].engine.handle_osn(w.now, OsnEvent::Online { me });
        }
        let fresh = |w: &World| {
            (0..2).all(|i| {
                lost(w, i).is_none() && w.link(i).is_some_and(|l| l.phase == LinkPhase::Connected)
            })
        };
        w.run_until(Duration::from_secs(5), fresh);
        assert_eq!(w.signals_sent - signals, 2);
        assert_eq!((slot(&w, 0), slot(&w, 1)), slots);
    }

    #[test]
    fn a_restart_that_finds_no_path_fails_and_the_link_is_retried_with_back_off() {
        let mut w = friends();
        w.run(25);
        assert!(w.connected(0) && w.connected(1));
        let (a1, b1) = (w.devs[0].addr, w.devs[1].addr);
        w.cut(a1, b1);
        let restarted = |w: &World| {
            w.link(0)
                .and_then(|l| l.last_error)
                .is_some_and(|e| e.contains("looking for another"))
        };
        w.run_until(Duration::from_secs(40), restarted);
        // The WireGuard peer stays while ICE looks for a path.
        assert!(slot(&w, 0).is_some());
        let failed = |w: &World| w.link(0).is_some_and(|l| l.phase == LinkPhase::Waiting);
        let took = w.run_until(Duration::from_secs(25), failed);
        assert!(took > ICE_TIMEOUT, "{took:?}");
        let link = w.link(0).unwrap();
        assert_eq!(
            link.last_error.as_deref(),
            Some("the path stopped working and an ICE restart found no other")
        );
        assert!(link.peer.is_none());
        assert_eq!(link.tried.0.len(), 1, "{:?}", link.tried);
        assert_eq!(link.tried.1.first().map(|c| c.address), Some(b1));
        // Retried after a back-off that grows.
        let trying = |w: &World| w.link(0).is_some_and(|l| l.phase != LinkPhase::Waiting);
        let first = w.run_until(Duration::from_secs(5), trying);
        w.run_until(Duration::from_secs(25), failed);
        assert_eq!(
            w.link(0).unwrap().last_error.as_deref(),
            Some("ICE found no working path")
        );
        let second = w.run_until(Duration::from_secs(5), trying);
        assert!(
            first >= BACKOFF_MIN && second >= 2 * BACKOFF_MIN,
            "{first:?}, {second:?}"
        );
    }

    /// Three friends, Alice, Bob and Carol, whose social overlay links on demand with this
    /// idle time; they see each other online.
    fn on_demand_friends(idle: Duration) -> World {
        let on_demand = |user: &str, device: &str, addr: &str, social: &str| {
            dev_linking(user, device, addr, social, LinkPolicy::OnDemand, idle)
        };
        let mut w = World::new(vec![
            on_demand(
                "alice@example.org",
                "laptop",
                "192.0.2.1:51820",
                "10.78.0.1/16",
            ),
            on_demand(
                "bob@example.org",
                "phone",
                "192.0.2.2:51820",
                "10.78.0.2/16",
            ),
            on_demand(
                "carol@example.org",
                "desk",
                "192.0.2.3:51820",
                "10.78.0.3/16",
            ),
        ]);
        let social = OverlayId::Social;
        let all = ["alice@example.org", "bob@example.org", "carol@example.org"];
        for i in 0..3 {
            w.members(i, &social, &all);
        }
        for i in 0..3 {
            for j in 0..3 {
                if i != j {
                    let key = w.key(j);
                    w.sees(i, j, &social, key);
                }
            }
        }
        w
    }

    /// The link of device `i` to device `j`.
    fn link_to(w: &World, i: usize, j: usize) -> LinkStatus {
        let id = &w.devs[j].id;
        w.devs[i]
            .engine
            .links()
            .into_iter()
            .find(|l| l.device == *id)
            .expect("a link entry")
    }

    /// A packet from device `i` to the address it gives device `j` in the social overlay,
    /// handed to `i`'s engine as from its TUN device; returns whether it went out at once.
    fn send(w: &mut World, i: usize, j: usize, payload: &[u8]) -> bool {
        let own = w.devs[i].engine.own_addresses()[0].v4.addr();
        let target = w.devs[i].engine.memory().social_numbers[&w.devs[j].id];
        let mut p = ipv4(own.octets(), target.octets(), payload);
        let mut wire = vec![0u8; 2048];
        w.devs[i].engine.handle_tun(&mut p, &mut wire).is_some()
    }

    /// Whether device `j` delivered a packet carrying `payload` to its TUN device. (The test
    /// packets have no UDP header: a payload longer than 6 bytes would reach into the checksum
    /// that translation updates.)
    fn received(w: &World, j: usize, payload: &[u8]) -> bool {
        assert!(payload.len() <= 6);
        w.delivered[j].iter().any(|p| p.get(20..) == Some(payload))
    }

    fn drops_of(w: &World, i: usize, reason: DropReason) -> u64 {
        w.devs[i].engine.drops().get(reason)
    }

    #[test]
    fn on_demand_devices_get_no_link_until_traffic_and_the_first_packet_is_delivered() {
        let mut w = on_demand_friends(Duration::from_secs(600));
        w.run(250);
        assert_eq!(w.signals_sent, 0, "no offer without traffic");
        for i in 0..3 {
            let links = w.devs[i].engine.links();
            assert_eq!(links.len(), 2);
            for l in &links {
                assert_eq!(l.phase, LinkPhase::Idle, "{l:?}");
                assert!(l.peer.is_none(), "no WireGuard peer: {l:?}");
                // Addresses (and so names) come from presence, linked or not.
                assert!(l.addresses.iter().any(|a| a.addr().is_ipv4()), "{l:?}");
                assert!(l.addresses.iter().any(|a| a.addr().is_ipv6()), "{l:?}");
            }
            assert_eq!(w.devs[i].engine.node().peers().count(), 0);
        }

        // Bob, who sorts after Alice, opens the link: either side may.
        assert!(!send(&mut w, 1, 0, b"1st"), "held, not sent");
        assert!(!send(&mut w, 1, 0, b"2nd"));
        assert_eq!(drops_of(&w, 1, DropReason::NoRoute), 0, "held, not dropped");
        let took = w.run_until(Duration::from_secs(5), |w| received(w, 0, b"2nd"));
        assert!(took < Duration::from_secs(1), "set-up took {took:?}");
        assert!(received(&w, 0, b"1st"), "the first packet arrived too");
        let order: Vec<bool> = w.delivered[0]
            .iter()
            .map(|p| p.get(20..) == Some(&b"1st"[..]))
            .collect();
        assert_eq!(order, [true, false], "in order");
        assert!(matches!(
            w.signals.first(),
            Some((1, to, Signal::Initiate { .. })) if *to == w.devs[0].id
        ));
        assert_eq!(
            w.urgent_offers, 1,
            "the offer that traffic waits for is urgent"
        );
        // The reply goes straight out.
        assert!(send(&mut w, 0, 1, b"reply"), "alice's side has the link");
        assert!(w.connected(0));
        assert_eq!(link_to(&w, 0, 1).phase, LinkPhase::Connected);
        assert_eq!(link_to(&w, 1, 0).phase, LinkPhase::Connected);
        // Carol was left alone.
        assert_eq!(link_to(&w, 0, 2).phase, LinkPhase::Idle);
        assert_eq!(link_to(&w, 1, 2).phase, LinkPhase::Idle);
        assert!(
            w.devs[2]
                .engine
                .links()
                .iter()
                .all(|l| l.phase == LinkPhase::Idle)
        );
        assert!(
            w.signals
                .iter()
                .all(|(i, to, _)| *i != 2 && *to != w.devs[2].id)
        );
    }

    #[test]
    fn both_sides_opening_at_once_end_with_one_link() {
        let mut w = on_demand_friends(Duration::from_secs(600));
        assert!(!send(&mut w, 0, 1, b"fromA"));
        assert!(!send(&mut w, 1, 0, b"fromB"));
        w.run_until(Duration::from_secs(5), |w| {
            received(w, 0, b"fromB") && received(w, 1, b"fromA")
        });
        assert_eq!(link_to(&w, 0, 1).phase, LinkPhase::Connected);
        assert_eq!(link_to(&w, 1, 0).phase, LinkPhase::Connected);
        let glare = w.signals.iter().any(|(_, _, s)| {
            matches!(
                s,
                Signal::Terminate {
                    reason: TerminateReason::Glare,
                    ..
                }
            )
        });
        assert!(glare, "both offered, one session kept: {:?}", w.signals);
    }

    #[test]
    fn packets_held_for_a_link_are_bounded_and_the_drops_counted() {
        let mut w = on_demand_friends(Duration::from_secs(600));
        let extra = 10;
        for n in 0..crate::demand::HELD_PER_DEVICE + extra {
            assert!(!send(&mut w, 0, 1, format!("p{n:03}").as_bytes()));
        }
        assert_eq!(drops_of(&w, 0, DropReason::LinkQueueFull), extra as u64);
        assert_eq!(
            w.devs[0].engine.held.len(&w.devs[1].id),
            crate::demand::HELD_PER_DEVICE
        );
        let last = format!("p{:03}", crate::demand::HELD_PER_DEVICE - 1);
        w.run_until(Duration::from_secs(5), |w| received(w, 1, last.as_bytes()));
        w.run(5);
        assert_eq!(w.delivered[1].len(), crate::demand::HELD_PER_DEVICE);
        assert!(w.devs[0].engine.held.is_empty());
        // A packet for an address that no device has is still plain `no_route`.
        let mut p = ipv4([10, 78, 0, 1], [10, 78, 200, 200], b"nobody");
        let mut wire = vec![0u8; 2048];
        assert!(w.devs[0].engine.handle_tun(&mut p, &mut wire).is_none());
        assert_eq!(drops_of(&w, 0, DropReason::NoRoute), 1);
        assert_eq!(drops_of(&w, 0, DropReason::LinkQueueFull), extra as u64);
    }

    #[test]
    fn an_idle_on_demand_link_closes_on_both_ends_and_traffic_opens_it_again() {
        let idle = Duration::from_secs(30);
        let mut w = on_demand_friends(idle);
        send(&mut w, 0, 1, b"ping");
        w.run_until(Duration::from_secs(5), |w| received(w, 1, b"ping"));
        // Data keeps it up.
        for _ in 0..4 {
            w.run(500);
            let sent = tunnel(&mut w, 0, 1, b"still");
            assert!(sent.arrived.is_some(), "the link is up");
        }
        assert_eq!(link_to(&w, 1, 0).phase, LinkPhase::Connected);
        let signals = w.signals.len();
        let closed = |w: &World| {
            link_to(w, 0, 1).phase == LinkPhase::Idle && link_to(w, 1, 0).phase == LinkPhase::Idle
        };
        let took = w.run_until(idle + Duration::from_secs(2), closed);
        assert!(
            took + Duration::from_millis(300) >= idle,
            "closed after {took:?}, before its idle time"
        );
        for i in 0..2 {
            assert_eq!(w.devs[i].engine.node().peers().count(), 0, "peer removed");
        }
        let terminates: Vec<_> = w.signals[signals..]
            .iter()
            .filter(|(_, _, s)| {
                matches!(
                    s,
                    Signal::Terminate {
                        reason: TerminateReason::Idle,
                        ..
                    }
                )
            })
            .collect();
        assert!(!terminates.is_empty(), "{:?}", &w.signals[signals..]);
        // Nothing is retried while idle.
        let quiet = w.signals.len();
        w.run(500);
        assert_eq!(w.signals.len(), quiet, "{:?}", &w.signals[quiet..]);
        // Traffic opens a new link, from the side that closed or the other.
        assert!(!send(&mut w, 1, 0, b"again"));
        w.run_until(Duration::from_secs(5), |w| received(w, 0, b"again"));
        assert_eq!(link_to(&w, 0, 1).phase, LinkPhase::Connected);
    }

    #[test]
    fn in_an_auto_overlay_a_lone_device_is_offered_at_once_and_a_burst_after_a_wait() {
        let room = OverlayId::Group("lab@conference.example.org".into());
        let mut overlay = group(
            "lab@conference.example.org",
            "10.91.0.0/16",
            Some("10.91.0.1"),
        );
        overlay.links = LinkPolicy::Auto;
        let mut me = dev_in(
            "aaa@example.org",
            "pc",
            "192.0.2.1:51820",
            vec![overlay],
            Memory::default(),
        );
        let e = &mut me.engine;
        let t0 = Instant::now();
        e.handle_osn(t0, OsnEvent::Online { me: me.id.clone() });
        let users: Vec<String> = ["bob", "carol", "dave"]
            .iter()
            .map(|u| format!("{u}@example.org"))
            .collect();
        e.handle_osn(
            t0,
            OsnEvent::Members {
                overlay: room.clone(),
                users: users.clone(),
            },
        );
        let up = |i: usize| OsnEvent::DeviceUp {
            overlay: room.clone(),
            device: DeviceId::new(&users[i], "pc"),
            key: PublicKey::from_secret(&StaticSecret::random_from_rng(rand_core::OsRng)),
            relay: None,
            routes: Vec::new(),
            exit_dns: None,
            claim: Some(Claim {
                address: std::net::Ipv4Addr::new(10, 91, 0, 2 + i as u8),
                fixed: true,
            }),
        };
        let offers = |e: &mut Engine| {
            std::iter::from_fn(|| e.poll_signal())
                .filter(|o| matches!(o.signal, Signal::Initiate { .. }))
                .count()
        };
        // Well within the wait (gathering host candidates takes a moment).
        let soon = Duration::from_millis(100);
        e.handle_osn(t0, up(0));
        e.handle_timeout(t0 + soon);
        assert_eq!(offers(e), 1, "a device that comes alone is offered at once");

        let t1 = t0 + Duration::from_secs(5);
        e.handle_osn(t1, up(1));
        e.handle_osn(t1, up(2));
        e.handle_timeout(t1 + soon);
        assert_eq!(offers(e), 1, "the second of a burst waits");
        e.handle_timeout(t1 + AUTO_SETTLE + soon);
        assert_eq!(offers(e), 1, "and is offered after the wait");
    }

    #[test]
    fn auto_links_every_device_below_the_threshold_and_on_demand_from_it() {
        let room = OverlayId::Group("big@conference.example.org".into());
        let mut overlay = group(
            "big@conference.example.org",
            "10.90.0.0/16",
            Some("10.90.0.1"),
        );
        overlay.links = LinkPolicy::Auto;
        overlay.idle_timeout = Duration::from_secs(600);
        let mut me = dev_in(
            "aaa@example.org",
            "pc",
            "192.0.2.1:51820",
            vec![overlay],
            Memory::default(),
        );
        let mut now = Instant::now();
        let e = &mut me.engine;
        e.handle_osn(now, OsnEvent::Online { me: me.id.clone() });
        let users: Vec<String> = (0..AUTO_THRESHOLD + 2)
            .map(|i| format!("user{i:02}@example.org"))
            .collect();
        e.handle_osn(
            now,
            OsnEvent::Members {
                overlay: room.clone(),
                users: users.clone(),
            },
        );
        let up = |i: usize| OsnEvent::DeviceUp {
            overlay: room.clone(),
            device: DeviceId::new(&users[i], "pc"),
            key: PublicKey::from_secret(&StaticSecret::random_from_rng(rand_core::OsRng)),
            relay: None,
            routes: Vec::new(),
            exit_dns: None,
            claim: Some(Claim {
                address: std::net::Ipv4Addr::new(10, 90, 1, i as u8),
                fixed: true,
            }),
        };
        let phases = |e: &Engine| e.links().iter().map(|l| l.phase).collect::<Vec<_>>();
        let offers = |e: &mut Engine| {
            let mut n = (0usize, 0usize, 0usize);
            while let Some(Outgoing { signal, urgent, .. }) = e.poll_signal() {
                match signal {
                    Signal::Initiate { .. } => {
                        n.0 += 1;
                        n.2 += usize::from(urgent);
                    }
                    Signal::Terminate {
                        reason: TerminateReason::Idle,
                        ..
                    } => n.1 += 1,
                    _ => {}
                }
            }
            n
        };
        // This device and 22 others: below the threshold, every device is linked.
        for i in 0..AUTO_THRESHOLD - 2 {
            e.handle_osn(now, up(i));
        }
        assert!(phases(e).iter().all(|p| *p == LinkPhase::Waiting));
        now += Duration::from_secs(1);
        e.handle_timeout(now);
        assert_eq!(
            offers(e),
            (AUTO_THRESHOLD - 2, 0, 0),
            "one offer each, none urgent: no traffic waits for them"
        );

        // The 24th device online: links go on demand. Those that carried no data rest at once.
        e.handle_osn(now, up(AUTO_THRESHOLD - 2));
        assert!(
            phases(e).iter().all(|p| *p == LinkPhase::Idle),
            "{:?}",
            phases(e)
        );
        assert_eq!(
            offers(e),
            (0, AUTO_THRESHOLD - 2, 0),
            "each session ended as idle"
        );
        e.handle_osn(now, up(AUTO_THRESHOLD - 1));
        now += Duration::from_secs(5);
        e.handle_timeout(now);
        assert_eq!(
            offers(e),
            (0, 0, 0),
            "nothing offered on demand without traffic"
        );
        assert_eq!(e.links().len(), AUTO_THRESHOLD);

        // Two devices go: below the threshold again, every link is offered.
        for i in [0, 1] {
            e.handle_osn(
                now,
                OsnEvent::DeviceDown {
                    overlay: room.clone(),
                    device: DeviceId::new(&users[i], "pc"),
                },
            );
        }
        assert!(phases(e).iter().all(|p| *p == LinkPhase::Waiting));
        now += Duration::from_secs(1);
        e.handle_timeout(now);
        assert_eq!(offers(e), (AUTO_THRESHOLD - 2, 0, 0));
    }
}
