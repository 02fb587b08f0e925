//! A node: this device's side of every link, one WireGuard session per peer.
//!
//! The data path is two calls that write into buffers the caller owns, so that a packet costs
//! no allocation: [`Node::handle_tun`] turns an IP packet from the TUN device into a datagram
//! for a peer, [`Node::handle_udp`] turns a datagram from the network into an IP packet for the
//! TUN device. Handshakes, cookie replies and keepalives, which are rare, are queued and polled
//! with [`Node::poll_transmit`]; [`Node::handle_timeout`] drives the WireGuard timers.
//!
//! A handshake message costs a public-key operation only once it proved that its sender knows
//! our public key (MAC1) and, when more than 100 a second come, that the sender receives what
//! is sent to its source address (a cookie, MAC2); a flood of forged handshakes costs a MAC
//! check, or a MAC check and a cookie reply, each.

use crate::demux::{DatagramKind, classify};
use crate::key::PublicKey;
use crate::packet;
use crate::route::RouteTable;
use crate::translate;
use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519;
use ipnet::IpNet;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often the WireGuard timers of every session are driven.
const TIMER_TICK: Duration = Duration::from_millis(250);
/// A path on which nothing authenticated arrived for this long is quiet: an authenticated
/// datagram from another address (or through another relay) then moves the endpoint there,
/// even for a peer whose path ICE chose. A live link hears its peer far more often than this
/// (a ping every second, WireGuard's keepalive 10 s after data, any flow many times a
/// second); a path that carries traffic both ways is never quiet for this long, so two live
/// paths cannot pull the endpoint back and forth. Long enough to cover a burst of reordering
/// and the node's clock granularity (the 250 ms timer tick), short enough that a rebound NAT
/// costs about a second.
///
/// The device whose public key sorts higher waits [`ROAM_QUIET_HIGHER`] instead. When both
/// paths are alive but each side sends on another (one side moved to an ICE nomination the
/// other has not made yet), each side's path is quiet and both would roam at the same moment,
/// onto each other's old path, and swap again a second later, for ever. With the two waits
/// apart, the quicker side moves onto the path the other sends on, which hears it again there
/// before its own wait is over: the endpoints converge.
pub const ROAM_QUIET: Duration = Duration::from_secs(1);
/// The wait of the side whose key sorts higher (see [`ROAM_QUIET`]).
pub const ROAM_QUIET_HIGHER: Duration = Duration::from_millis(1500);
/// A session is usable for this long after its handshake (WireGuard's REJECT_AFTER_TIME).
const SESSION_LIFETIME: Duration = Duration::from_secs(180);
/// Handshake initiations without an answer before a peer is reported as not answering.
const UNANSWERED_BEFORE_PROBLEM: u32 = 2;
/// Room for any datagram the node sends on its own: a handshake, a keepalive, or a packet that
/// waited for a handshake (at most a 64 KiB IP packet plus WireGuard's 32 bytes).
const SCRATCH_LEN: usize = 65535 + 32;
/// WireGuard's message type for a handshake initiation.
const HANDSHAKE_INIT: u8 = 1;
/// WireGuard's message type for a handshake response.
const HANDSHAKE_RESPONSE: u8 = 2;
/// WireGuard's message type for a cookie reply.
const COOKIE_REPLY: u8 = 3;
/// The length of a cookie reply.
const COOKIE_REPLY_LEN: usize = 64;
/// Handshake messages with a valid MAC1 accepted per [`LOAD_WINDOW`] before the node is under
/// load and asks every sender for a cookie (boringtun's own device uses 100 a second). Each
/// costs at most one X25519 operation to find its peer, so this bounds that work to well under
/// 1 % of a core.
const HANDSHAKES_BEFORE_LOAD: u64 = 100;
/// How long handshake messages are counted before the count starts again.
const LOAD_WINDOW: Duration = Duration::from_secs(1);

/// A peer as the configuration (or, later, the social network) describes it.
#[derive(Debug, Clone)]
pub struct PeerConfig {
    pub name: Option<String>,
    pub public_key: PublicKey,
    pub endpoint: Option<SocketAddr>,
    /// Overlay addresses routed to this peer and accepted as inner sources from it.
    pub addresses: Vec<IpNet>,
    /// IPv4 addresses translated at the tunnel boundary (the social overlay).
    pub mapped: Vec<Mapping>,
    /// Where this peer may send to, so that nothing crosses from one overlay into another;
    /// `None` for anywhere (a static peer may route whole networks, as in WireGuard).
    pub destinations: Option<Destinations>,
    /// Persistent keepalive interval in seconds.
    pub keepalive: Option<u16>,
    /// Whether an authenticated datagram from another address moves the endpoint there at
    /// once (WireGuard's roaming). Off for peers whose path ICE chooses: with several paths
    /// (direct, relays) a datagram on one of them moves the link off the nominated pair only
    /// when that pair has gone quiet (nothing authenticated on it for [`ROAM_QUIET`]).
    pub roaming: bool,
}

/// Where a peer may send to through this device.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Destinations {
    /// Our own addresses in the overlays we share with it.
    pub own: Vec<IpAddr>,
    /// The prefixes we route for those overlays (a subnet router).
    pub routed: Vec<IpNet>,
}

impl Destinations {
    fn routes_to(&self, addr: IpAddr) -> bool {
        self.routed.iter().any(|n| n.contains(&addr))
    }
}

/// An IPv4 address translated at the tunnel boundary: this device calls the peer `local`; in
/// the tunnel the peer is `remote` and this device is `own`. Packets to `local` leave with
/// `remote` as their destination; packets from `remote` arrive with `local` as their source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapping {
    pub local: Ipv4Addr,
    pub remote: Ipv4Addr,
    pub own: Ipv4Addr,
}

/// A datagram to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    pub destination: SocketAddr,
    /// The TURN relay that carries it, when the peer is reached through one.
    pub via: Option<usize>,
    /// Whether it goes over the TCP connection to `destination` (a TURN server reached over
    /// TCP) rather than over UDP.
    pub stream: bool,
    /// The port of the extra socket it leaves from (a punched path), rather than the main one.
    pub source: Option<u16>,
    pub payload: Vec<u8>,
}

/// An encrypted datagram written by [`Node::handle_tun`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outgoing {
    pub destination: SocketAddr,
    /// The TURN relay that carries it, when the peer is reached through one.
    pub via: Option<usize>,
    /// Where the datagram starts in the output buffer.
    pub start: usize,
    pub len: usize,
}

/// Why [`Node::handle_tun_with_headroom`] wrote no datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unsent {
    /// The packet was dropped (and counted), or queued behind a handshake.
    Handled,
    /// No peer owns the destination. Not counted: the caller may hold the packet for a link
    /// that is not up yet.
    NoRoute(IpAddr),
    /// The destination's peer has no endpoint yet. Not counted, as above.
    NoEndpoint(IpAddr),
}

/// Where a link stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    /// No endpoint is known: waiting for the peer to reach us.
    Waiting,
    /// Handshaking, or the last session expired.
    Connecting,
    /// A session is established.
    Connected,
}

impl LinkState {
    pub fn as_str(self) -> &'static str {
        match self {
            LinkState::Waiting => "waiting",
            LinkState::Connecting => "connecting",
            LinkState::Connected => "connected",
        }
    }
}

/// Why a link is not up, as far as this side can tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// Our handshake initiations went unanswered.
    NoResponse { endpoint: SocketAddr, attempts: u32 },
    /// A handshake came from the peer's endpoint with a key other than the configured one.
    KeyMismatch {
        endpoint: SocketAddr,
        announced: PublicKey,
    },
    /// A handshake came from the peer's endpoint but was encrypted for another key than ours.
    NotForOurKey { endpoint: SocketAddr },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::NoResponse { endpoint, attempts } => write!(
                f,
                "no handshake response from {endpoint} after {attempts} attempts: the peer is \
                 down or unreachable, or it does not have our public key"
            ),
            Problem::KeyMismatch {
                endpoint,
                announced,
            } => write!(
                f,
                "a handshake from {endpoint} carried key {} ({announced}), not the public key \
                 configured for this peer",
                announced.fingerprint()
            ),
            Problem::NotForOurKey { endpoint } => write!(
                f,
                "a handshake from {endpoint} was encrypted for another key than ours: the peer \
                 has a wrong public key configured for us"
            ),
        }
    }
}

/// Why a packet was dropped. Every drop is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// A TUN packet whose IP header could not be read.
    MalformedIp,
    /// A TUN packet for an address that no peer owns.
    NoRoute,
    /// A TUN packet for a peer whose endpoint is not known yet.
    NoEndpoint,
    /// A datagram that is neither WireGuard nor anything else we speak.
    NotWireGuard,
    /// A WireGuard message that could not be parsed.
    MalformedWireGuard,
    /// A handshake from a key that belongs to no peer.
    UnknownKey,
    /// A handshake that was not encrypted for our key.
    HandshakeNotForUs,
    /// A message addressed to a session index we never handed out.
    UnknownSession,
    /// A message that failed authentication, was replayed or came too late.
    Rejected,
    /// A decrypted packet whose inner source is not an address of the peer that sent it.
    SpoofedSource,
    /// A STUN message that could not be parsed.
    MalformedStun,
    /// A STUN message that no ICE session accepts.
    UnknownStun,
    /// A link signal for a session we do not have.
    UnknownSignal,
    /// A link offer from a user that no overlay authorises.
    SignalNotAuthorised,
    /// A link offer whose key is not the key the device announced.
    SignalWrongKey,
    /// An ipop device whose user the overlay it was seen in does not authorise.
    DeviceNotAuthorised,
    /// A decrypted packet for an address of ours in an overlay the sender is not part of.
    WrongOverlay,
    /// A packet whose addresses could not be translated.
    Untranslatable,
    /// A device that announced another key than the one pinned for it.
    KeyNotTrusted,
    /// A TUN packet for a multicast address (the kernel's own IPv6 neighbour and router
    /// chatter on the interface): overlays carry unicast only.
    Multicast,
    /// A device that announced a key already pinned for another device, or this device's own.
    KeyClaimedByOther,
    /// A handshake message whose MAC1 is not made for our public key: whoever sent it does not
    /// know who we are. Dropped before any public-key operation.
    HandshakeBadMac,
    /// A handshake message that came while the node was under load without a valid cookie for
    /// its source address (MAC2): answered with a cookie reply, not processed.
    HandshakeUnderLoad,
    /// A TUN packet for a device whose link is not up yet, beyond the bound of packets held
    /// for it until the link comes up (per device and in all).
    LinkQueueFull,
    /// A packet held for a link that went back to idle or closed before it came up.
    LinkNotUp,
}

impl DropReason {
    pub const ALL: [DropReason; 25] = [
        DropReason::MalformedIp,
        DropReason::NoRoute,
        DropReason::NoEndpoint,
        DropReason::NotWireGuard,
        DropReason::MalformedWireGuard,
        DropReason::UnknownKey,
        DropReason::HandshakeNotForUs,
        DropReason::UnknownSession,
        DropReason::Rejected,
        DropReason::SpoofedSource,
        DropReason::MalformedStun,
        DropReason::UnknownStun,
        DropReason::UnknownSignal,
        DropReason::SignalNotAuthorised,
        DropReason::SignalWrongKey,
        DropReason::DeviceNotAuthorised,
        DropReason::WrongOverlay,
        DropReason::Untranslatable,
        DropReason::KeyNotTrusted,
        DropReason::Multicast,
        DropReason::KeyClaimedByOther,
        DropReason::HandshakeBadMac,
        DropReason::HandshakeUnderLoad,
        DropReason::LinkQueueFull,
        DropReason::LinkNotUp,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::MalformedIp => "malformed_ip",
            DropReason::NoRoute => "no_route",
            DropReason::NoEndpoint => "no_endpoint",
            DropReason::NotWireGuard => "not_wireguard",
            DropReason::MalformedWireGuard => "malformed_wireguard",
            DropReason::UnknownKey => "unknown_key",
            DropReason::HandshakeNotForUs => "handshake_not_for_us",
            DropReason::UnknownSession => "unknown_session",
            DropReason::Rejected => "rejected",
            DropReason::SpoofedSource => "spoofed_source",
            DropReason::MalformedStun => "malformed_stun",
            DropReason::UnknownStun => "unknown_stun",
            DropReason::UnknownSignal => "unknown_signal",
            DropReason::SignalNotAuthorised => "signal_not_authorised",
            DropReason::SignalWrongKey => "signal_wrong_key",
            DropReason::DeviceNotAuthorised => "device_not_authorised",
            DropReason::WrongOverlay => "wrong_overlay",
            DropReason::Untranslatable => "untranslatable",
            DropReason::KeyNotTrusted => "key_not_trusted",
            DropReason::Multicast => "multicast",
            DropReason::KeyClaimedByOther => "key_claimed_by_other",
            DropReason::HandshakeBadMac => "handshake_bad_mac",
            DropReason::HandshakeUnderLoad => "handshake_under_load",
            DropReason::LinkQueueFull => "link_queue_full",
            DropReason::LinkNotUp => "link_not_up",
        }
    }
}

/// Drop counters, one per [`DropReason`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Drops([u64; DropReason::ALL.len()]);

impl Drops {
    pub(crate) fn count(&mut self, reason: DropReason) {
        self.0[reason as usize] += 1;
    }

    pub(crate) fn count_many(&mut self, reason: DropReason, n: u64) {
        self.0[reason as usize] += n;
    }

    pub(crate) fn add(&mut self, other: &Drops) {
        for (mine, theirs) in self.0.iter_mut().zip(other.0) {
            *mine += theirs;
        }
    }

    pub fn get(&self, reason: DropReason) -> u64 {
        self.0[reason as usize]
    }

    pub fn iter(&self) -> impl Iterator<Item = (DropReason, u64)> + '_ {
        DropReason::ALL.iter().map(|&r| (r, self.get(r)))
    }
}

/// What `ipop status` shows of a peer.
#[derive(Debug, Clone)]
pub struct PeerStatus {
    pub name: Option<String>,
    pub public_key: PublicKey,
    pub addresses: Vec<IpNet>,
    pub state: LinkState,
    pub endpoint: Option<SocketAddr>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub last_handshake: Option<Duration>,
    pub problem: Option<Problem>,
}

struct Peer {
    config: PeerConfig,
    /// Distinguishes this peer from earlier ones in the same slot, in session indices.
    generation: u8,
    tunn: Tunn,
    endpoint: Option<SocketAddr>,
    /// The relay through which `endpoint` is reached, if any.
    via: Option<usize>,
    unanswered: u32,
    problem: Option<Problem>,
    connected: bool,
    started: bool,
    /// When the peer was last heard: a handshake or data that WireGuard authenticated, by the
    /// node's clock (the time of its last [`Node::handle_timeout`]).
    heard: Option<Instant>,
    /// When something authenticated last arrived on the current path (`endpoint`, `via`), or
    /// when the path was set, by the node's clock.
    path_heard: Option<Instant>,
    /// When a packet from the tunnel was last sent to the peer, by the node's clock.
    sent: Option<Instant>,
    /// When a packet for the tunnel (data, not a keepalive) last came from the peer, by the
    /// node's clock.
    received: Option<Instant>,
    /// Whether the peer is in the node's `roamed` queue.
    roam_queued: bool,
    /// How long the current path must be quiet before a roam off it.
    roam_quiet: Duration,
}

impl Peer {
    fn session_age(&self) -> Option<Duration> {
        self.tunn.stats().0.filter(|age| *age < SESSION_LIFETIME)
    }

    fn state(&self) -> LinkState {
        if self.session_age().is_some() {
            LinkState::Connected
        } else if self.endpoint.is_none() {
            LinkState::Waiting
        } else {
            LinkState::Connecting
        }
    }

    fn owns(&self, addr: IpAddr) -> bool {
        self.config.addresses.iter().any(|n| n.contains(&addr))
    }

    fn may_send_to(&self, addr: IpAddr) -> bool {
        self.config
            .destinations
            .as_ref()
            .is_none_or(|d| d.own.contains(&addr) || d.routes_to(addr))
    }

    /// Whether `addr` is in a prefix this device routes for the peer.
    fn may_route_to(&self, addr: IpAddr) -> bool {
        self.config
            .destinations
            .as_ref()
            .is_some_and(|d| d.routes_to(addr))
    }

    /// The routes of this peer: its addresses and the local side of its mappings.
    fn routes(&self) -> impl Iterator<Item = IpNet> + '_ {
        let mapped = self
            .config
            .mapped
            .iter()
            .map(|m| IpNet::from(IpAddr::V4(m.local)));
        self.config.addresses.iter().copied().chain(mapped)
    }

    fn label(&self) -> String {
        match &self.config.name {
            Some(name) => format!("{name} ({})", self.config.public_key.fingerprint()),
            None => self.config.public_key.fingerprint(),
        }
    }

    fn set_problem(&mut self, problem: Option<Problem>) {
        if self.problem != problem {
            if let Some(p) = &problem {
                tracing::warn!(peer = %self.label(), "link not up: {p}");
            }
            self.problem = problem;
        }
    }

    /// Notes a handshake initiation that we are about to send.
    fn initiation_sent(&mut self) {
        self.unanswered += 1;
        if self.unanswered > UNANSWERED_BEFORE_PROBLEM
            && let Some(endpoint) = self.endpoint
            && !matches!(
                self.problem,
                Some(Problem::KeyMismatch { .. } | Problem::NotForOurKey { .. })
            )
        {
            self.set_problem(Some(Problem::NoResponse {
                endpoint,
                attempts: self.unanswered - 1,
            }));
        }
    }

    /// Notes an authenticated message from `from` (through relay `via`) at `now`: the peer
    /// may have roamed, or its path moved between relayed and direct. The endpoint follows it
    /// when roaming is on, when no endpoint is known, or when the current path is quiet.
    /// Whether the peer is to be queued as roamed (it moved from a known endpoint, and is not
    /// queued yet).
    fn authenticated(
        &mut self,
        from: SocketAddr,
        via: Option<usize>,
        now: Option<Instant>,
    ) -> bool {
        if self.endpoint == Some(from) && self.via == via {
            self.path_heard = now.or(self.path_heard);
            return false;
        }
        let quiet = match (self.path_heard, now) {
            (Some(heard), Some(now)) => now.saturating_duration_since(heard) >= self.roam_quiet,
            (Some(_), None) => false,
            (None, _) => true,
        };
        if self.endpoint.is_some() && !self.config.roaming && !quiet {
            tracing::trace!(peer = %self.label(), %from, "authenticated on another path while the current one is alive");
            return false;
        }
        let Some(previous) = self.endpoint.replace(from) else {
            tracing::info!(peer = %self.label(), endpoint = %from, relayed = via.is_some(), "peer endpoint learned");
            self.via = via;
            self.path_heard = now;
            return false;
        };
        tracing::info!(peer = %self.label(), endpoint = %from, relayed = via.is_some(), %previous, "peer endpoint moved");
        self.via = via;
        self.path_heard = now;
        !std::mem::replace(&mut self.roam_queued, true)
    }

    fn update_connected(&mut self) {
        let now_connected = self.session_age().is_some();
        if now_connected && !self.connected {
            self.unanswered = 0;
            self.set_problem(None);
            tracing::info!(peer = %self.label(), endpoint = ?self.endpoint, "link up");
        } else if !now_connected && self.connected {
            tracing::info!(peer = %self.label(), "link down: session expired");
        }
        self.connected = now_connected;
    }
}

/// Why a [`Node`] could not be built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NodeError {
    #[error("peer {0} is listed twice")]
    DuplicatePeer(PublicKey),
    #[error("address {net} is claimed by two peers ({first} and {second})")]
    OverlappingAddress {
        net: IpNet,
        first: PublicKey,
        second: PublicKey,
    },
    #[error("peer {0} is this device's own key")]
    SelfAsPeer(PublicKey),
    #[error("more peers than sessions can be numbered")]
    TooManyPeers,
}

/// Peers live in slots; a session index is the slot plus the slot's generation, so that messages
/// for a removed peer never reach the peer that took its slot.
const MAX_SLOTS: usize = 1 << 16;

/// The check every handshake message passes before it may cost a public-key operation, as
/// WireGuard's cookie mechanism has it: MAC1 always (the sender knows our public key), and under
/// load MAC2 too (the sender holds a cookie for its source address, so it receives what is sent
/// there); a sender without one gets a cookie reply instead of an answer. The MACs and cookies
/// are boringtun's [`RateLimiter`]. Whether the node is under load is decided here, by counting
/// handshakes in windows of the node's clock: boringtun's own count restarts by its own clock.
struct HandshakeGate {
    /// Checks MAC1 alone: its limit is never reached. Every session shares it, so that only the
    /// gate asks for cookies.
    mac1: Arc<RateLimiter>,
    /// Checks MAC1 and MAC2 and writes cookie replies: its limit of 0 is always reached.
    cookie: RateLimiter,
    /// Handshake messages with a valid MAC1 in the current window.
    count: u64,
    /// When the count starts again.
    window_end: Option<Instant>,
    /// Whether the last window ended under load: a flood is logged when it starts.
    was_loaded: bool,
    /// Handshake messages with a bad MAC1 in the current window that were looked into: the
    /// first ones tell a peer that has a wrong key for us; the rest of a flood costs no search.
    diagnosed: u64,
}

/// What the gate makes of a handshake message.
enum Verdict {
    Pass,
    /// A cookie reply of this length was written: the message is not processed.
    Cookie(usize),
    Drop(DropReason),
}

impl HandshakeGate {
    fn new(public: &x25519::PublicKey) -> Self {
        HandshakeGate {
            mac1: Arc::new(RateLimiter::new(public, u64::MAX)),
            cookie: RateLimiter::new(public, 0),
            count: 0,
            window_end: None,
            was_loaded: false,
            diagnosed: 0,
        }
    }

    fn under_load(&self) -> bool {
        self.count >= HANDSHAKES_BEFORE_LOAD
    }

    /// Checks a handshake message that came from `from`; a cookie reply goes to `reply`.
    fn check(&mut self, from: IpAddr, datagram: &[u8], reply: &mut [u8]) -> Verdict {
        let limiter = if self.under_load() {
            &self.cookie
        } else {
            &*self.mac1
        };
        let verdict = match limiter.verify_packet(Some(from), datagram, reply) {
            Ok(_) => Verdict::Pass,
            Err(TunnResult::WriteToNetwork(cookie)) => Verdict::Cookie(cookie.len()),
            Err(TunnResult::Err(WireGuardError::InvalidMac)) => {
                return Verdict::Drop(DropReason::HandshakeBadMac);
            }
            Err(_) => return Verdict::Drop(DropReason::MalformedWireGuard),
        };
        self.count = self.count.saturating_add(1);
        if self.count == HANDSHAKES_BEFORE_LOAD && !self.was_loaded {
            tracing::warn!(
                "more than {HANDSHAKES_BEFORE_LOAD} handshakes a second: under load, handshakes \
                 without a cookie for their source address get a cookie reply"
            );
        }
        verdict
    }

    /// Starts a new window when the current one is over.
    fn handle_timeout(&mut self, now: Instant) {
        if self.window_end.is_none_or(|end| now >= end) {
            if self.was_loaded && !self.under_load() {
                tracing::info!("handshake load is over");
            }
            self.was_loaded = self.under_load();
            self.count = 0;
            self.diagnosed = 0;
            self.window_end = Some(now + LOAD_WINDOW);
        }
    }

    /// Whether a message with a bad MAC1 may be looked into, which costs a search of the peers.
    fn may_diagnose(&mut self) -> bool {
        self.diagnosed = self.diagnosed.saturating_add(1);
        self.diagnosed <= HANDSHAKES_BEFORE_LOAD
    }

    /// When the counts must start again; nothing is due while nothing was counted.
    fn poll_timeout(&self) -> Option<Instant> {
        self.window_end
            .filter(|_| self.count > 0 || self.diagnosed > 0)
    }
}

/// This device's side of every link.
pub struct Node {
    secret: x25519::StaticSecret,
    public: x25519::PublicKey,
    peers: Vec<Option<Peer>>,
    generations: Vec<u8>,
    by_key: HashMap<PublicKey, usize>,
    routes: RouteTable,
    transmits: VecDeque<Transmit>,
    drops: Drops,
    gate: HandshakeGate,
    next_tick: Option<Instant>,
    /// The time of the last [`Node::handle_timeout`]: when peers are heard.
    clock: Option<Instant>,
    /// Peers whose endpoint moved to where their authenticated datagrams came from, oldest
    /// first: each at most once, drained by [`Node::poll_roamed`].
    roamed: VecDeque<usize>,
    /// Counts up whenever a peer or its addresses change.
    version: u64,
    scratch: Vec<u8>,
}

impl Node {
    /// A node with the given identity and peers. Nothing is sent until the first
    /// [`Node::handle_timeout`].
    pub fn new(secret: x25519::StaticSecret, peers: Vec<PeerConfig>) -> Result<Self, NodeError> {
        let public = x25519::PublicKey::from(&secret);
        let mut node = Node {
            secret,
            public,
            peers: Vec::with_capacity(peers.len()),
            generations: Vec::with_capacity(peers.len()),
            by_key: HashMap::new(),
            routes: RouteTable::default(),
            transmits: VecDeque::new(),
            drops: Drops::default(),
            gate: HandshakeGate::new(&public),
            next_tick: None,
            clock: None,
            roamed: VecDeque::new(),
            version: 0,
            scratch: vec![0; SCRATCH_LEN],
        };
        for config in peers {
            node.add_peer(config)?;
        }
        Ok(node)
    }

    /// Adds a peer and returns its index. Its session opens at the next timer tick if its
    /// endpoint is known, or when the peer calls.
    pub fn add_peer(&mut self, config: PeerConfig) -> Result<usize, NodeError> {
        if config.public_key == self.public_key() {
            return Err(NodeError::SelfAsPeer(config.public_key));
        }
        if self.by_key.contains_key(&config.public_key) {
            return Err(NodeError::DuplicatePeer(config.public_key));
        }
        let index = match self.peers.iter().position(Option::is_none) {
            Some(free) => free,
            None if self.peers.len() < MAX_SLOTS => {
                self.peers.push(None);
                self.generations.push(0);
                self.peers.len() - 1
            }
            None => return Err(NodeError::TooManyPeers),
        };
        let nets: Vec<IpNet> = config
            .addresses
            .iter()
            .copied()
            .chain(config.mapped.iter().map(|m| IpAddr::V4(m.local).into()))
            .collect();
        for (i, net) in nets.iter().enumerate() {
            if let Err(owner) = self.routes.insert(*net, index) {
                for added in &nets[..i] {
                    self.routes.remove(*added);
                }
                let first = self.peers[owner]
                    .as_ref()
                    .map_or(config.public_key, |p| p.config.public_key);
                return Err(NodeError::OverlappingAddress {
                    net: *net,
                    first,
                    second: config.public_key,
                });
            }
        }
        let roam_quiet = if self.public_key() > config.public_key {
            ROAM_QUIET_HIGHER
        } else {
            ROAM_QUIET
        };
        let generation = self.generations[index].wrapping_add(1);
        self.generations[index] = generation;
        let tunn = Tunn::new(
            self.secret.clone(),
            x25519::PublicKey::from(config.public_key.0),
            None,
            config.keepalive.filter(|&k| k > 0),
            (u32::from(generation) << 16) | index as u32,
            Some(Arc::clone(&self.gate.mac1)),
        );
        self.by_key.insert(config.public_key, index);
        self.peers[index] = Some(Peer {
            endpoint: config.endpoint,
            via: None,
            config,
            generation,
            tunn,
            unanswered: 0,
            problem: None,
            connected: false,
            started: false,
            heard: None,
            path_heard: None,
            sent: None,
            received: None,
            roam_queued: false,
            roam_quiet,
        });
        // Let the next tick open the session at once.
        self.next_tick = None;
        self.version += 1;
        Ok(index)
    }

    /// Removes a peer: its routes, its session, its slot.
    pub fn remove_peer(&mut self, index: usize) {
        if let Some(peer) = self.peers.get_mut(index).and_then(Option::take) {
            for net in peer.routes() {
                self.routes.remove(net);
            }
            self.by_key.remove(&peer.config.public_key);
            self.version += 1;
            tracing::info!(peer = %peer.label(), "peer removed");
        }
    }

    /// Points a peer at a new endpoint (chosen by ICE), reached through relay `via` or
    /// directly. A peer without a session starts its handshake at the next tick.
    pub fn set_endpoint(&mut self, index: usize, endpoint: SocketAddr, via: Option<usize>) {
        if let Some(peer) = self.peers.get_mut(index).and_then(Option::as_mut)
            && (peer.endpoint != Some(endpoint) || peer.via != via)
        {
            tracing::debug!(peer = %peer.label(), %endpoint, relayed = via.is_some(), "endpoint set");
            peer.endpoint = Some(endpoint);
            peer.via = via;
            // A path just chosen gets its time to be heard before anything can roam off it.
            peer.path_heard = self.clock;
            self.next_tick = None;
        }
    }

    /// Replaces a peer's addresses, mappings and permitted destinations. An address that
    /// another peer owns is left out (and returned): the owner keeps it.
    pub fn set_addresses(
        &mut self,
        index: usize,
        addresses: Vec<IpNet>,
        mapped: Vec<Mapping>,
        destinations: Option<Destinations>,
    ) -> Vec<IpNet> {
        let Some(peer) = self.peers.get_mut(index).and_then(Option::as_mut) else {
            return Vec::new();
        };
        if peer.config.addresses == addresses
            && peer.config.mapped == mapped
            && peer.config.destinations == destinations
        {
            return Vec::new();
        }
        for net in peer.routes() {
            self.routes.remove(net);
        }
        let mut refused = Vec::new();
        let mut kept_addresses = Vec::new();
        for net in addresses {
            match self.routes.insert(net, index) {
                Ok(()) => kept_addresses.push(net),
                Err(_) => refused.push(net),
            }
        }
        let mut kept_mapped = Vec::new();
        for m in mapped {
            match self.routes.insert(IpAddr::V4(m.local).into(), index) {
                Ok(()) => kept_mapped.push(m),
                Err(_) => refused.push(IpAddr::V4(m.local).into()),
            }
        }
        peer.config.addresses = kept_addresses;
        peer.config.mapped = kept_mapped;
        peer.config.destinations = destinations;
        self.version += 1;
        tracing::debug!(peer = %peer.label(), addresses = ?peer.routes().collect::<Vec<_>>(), "addresses set");
        refused
    }

    fn peer_mut(&mut self, index: usize) -> Option<&mut Peer> {
        self.peers.get_mut(index).and_then(Option::as_mut)
    }

    /// Counts up whenever a peer is added or removed or its addresses change: what the
    /// daemon's DNS names follow.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// This device's public key.
    pub fn public_key(&self) -> PublicKey {
        PublicKey(self.public.to_bytes())
    }

    /// Turns an IP packet read from the TUN device into a datagram for its peer, written to the
    /// front of `out`. Returns the destination and the datagram's length, or `None` when the
    /// packet was dropped (and counted) or queued behind a handshake.
    ///
    /// A packet for a peer's translated address gets the peer's own address as its
    /// destination, in place, before it is encrypted.
    ///
    /// `out` must hold at least `packet.len() + 32` and 148 bytes.
    pub fn handle_tun(&mut self, packet: &mut [u8], out: &mut [u8]) -> Option<Outgoing> {
        match self.handle_tun_with_headroom(packet, out, |_, _| 0) {
            Ok(o) => Some(o),
            Err(Unsent::Handled) => None,
            Err(Unsent::NoRoute(_)) => {
                self.drops.count(DropReason::NoRoute);
                None
            }
            Err(Unsent::NoEndpoint(_)) => {
                self.drops.count(DropReason::NoEndpoint);
                None
            }
        }
    }

    /// As [`Node::handle_tun`], but the datagram is written `headroom(endpoint, via)` bytes
    /// into `out` (reported as [`Outgoing::start`]), leaving room in front for a relay's
    /// framing. `out` must hold that much more. A packet that no peer with an endpoint takes
    /// is left to the caller, uncounted and unchanged ([`Unsent::NoRoute`],
    /// [`Unsent::NoEndpoint`]).
    pub fn handle_tun_with_headroom(
        &mut self,
        packet: &mut [u8],
        out: &mut [u8],
        headroom: impl FnOnce(SocketAddr, Option<usize>) -> usize,
    ) -> Result<Outgoing, Unsent> {
        let Some(dst) = packet::destination(packet) else {
            self.drops.count(DropReason::MalformedIp);
            return Err(Unsent::Handled);
        };
        let Some(peer) = self
            .routes
            .lookup(dst)
            .and_then(|i| self.peers.get_mut(i).and_then(Option::as_mut))
        else {
            if dst.is_multicast() {
                self.drops.count(DropReason::Multicast);
                return Err(Unsent::Handled);
            }
            return Err(Unsent::NoRoute(dst));
        };
        let Some(endpoint) = peer.endpoint else {
            return Err(Unsent::NoEndpoint(dst));
        };
        if let Some(m) = peer
            .config
            .mapped
            .iter()
            .find(|m| IpAddr::V4(m.local) == dst)
            && translate::rewrite_v4(packet, None, Some(m.remote)).is_err()
        {
            self.drops.count(DropReason::Untranslatable);
            return Err(Unsent::Handled);
        }
        let start = headroom(endpoint, peer.via);
        let Some(room) = out.get_mut(start..) else {
            return Err(Unsent::Handled);
        };
        match peer.tunn.encapsulate(packet, room) {
            TunnResult::WriteToNetwork(datagram) => {
                if datagram.first() == Some(&HANDSHAKE_INIT) {
                    peer.initiation_sent();
                }
                peer.sent = self.clock;
                Ok(Outgoing {
                    destination: endpoint,
                    via: peer.via,
                    start,
                    len: datagram.len(),
                })
            }
            TunnResult::Err(e) => {
                tracing::debug!(peer = %peer.label(), "encapsulation failed: {e:?}");
                Err(Unsent::Handled)
            }
            _ => Err(Unsent::Handled),
        }
    }

    /// Handles a datagram from the network. When it carries an IP packet for the TUN device,
    /// the packet is written to the front of `out` and its length returned. Replies (handshake
    /// responses, queued packets) are queued for [`Node::poll_transmit`].
    ///
    /// `out` must be at least as long as `datagram`.
    /// `via` is the relay the datagram came through, if it was relayed.
    pub fn handle_udp(
        &mut self,
        from: SocketAddr,
        via: Option<usize>,
        datagram: &[u8],
        out: &mut [u8],
    ) -> Option<usize> {
        if classify(datagram) != DatagramKind::WireGuard {
            self.drops.count(DropReason::NotWireGuard);
            return None;
        }
        if matches!(
            datagram.first(),
            Some(&(HANDSHAKE_INIT | HANDSHAKE_RESPONSE))
        ) && !self.admit(from, via, datagram)
        {
            return None;
        }
        let index = self.peer_for(from, datagram)?;
        let clock = self.clock;
        let peer = self.peers[index].as_mut()?;
        let result = peer.tunn.decapsulate(Some(from.ip()), datagram, out);
        let delivered = match result {
            TunnResult::WriteToNetwork(reply) => {
                // A handshake response proves the initiation was authentic; a cookie reply
                // (under load) proves nothing yet.
                let authentic =
                    reply.first() == Some(&HANDSHAKE_RESPONSE) || datagram[0] == HANDSHAKE_RESPONSE;
                let reply = reply.to_vec();
                if authentic {
                    peer.heard = clock.or(peer.heard);
                    if peer.authenticated(from, via, clock) {
                        self.roamed.push_back(index);
                    }
                }
                self.transmits.push_back(Transmit {
                    destination: from,
                    via,
                    stream: false,
                    source: None,
                    payload: reply,
                });
                self.flush_queued(index);
                None
            }
            TunnResult::WriteToTunnelV4(p, _) | TunnResult::WriteToTunnelV6(p, _) => {
                let len = p.len();
                // Decrypted: the peer is alive, whatever the checks below make of the packet.
                peer.heard = clock.or(peer.heard);
                peer.received = clock.or(peer.received);
                let moved = peer.authenticated(from, via, clock);
                if moved {
                    self.roamed.push_back(index);
                }
                Self::accept(peer, index, &self.routes, &mut self.drops, &mut out[..len])
            }
            TunnResult::Done => {
                // A keepalive, or a cookie reply (which proves nothing: anyone who saw our
                // initiation and knows the peer's public key can make one).
                if datagram[0] != COOKIE_REPLY {
                    peer.heard = clock.or(peer.heard);
                    if peer.authenticated(from, via, clock) {
                        self.roamed.push_back(index);
                    }
                }
                self.flush_queued(index);
                None
            }
            TunnResult::Err(e) => {
                tracing::debug!(peer = %peer.label(), %from, "datagram rejected: {e:?}");
                self.drops.count(DropReason::Rejected);
                None
            }
        };
        // Data decrypted for a connected peer changes nothing: a session that decrypts is
        // younger than the lifetime. The session's clock is read only when it may have.
        if let Some(peer) = self.peer_mut(index)
            && !(peer.connected && delivered.is_some())
        {
            peer.update_connected();
        }
        delivered
    }

    /// Checks a decrypted packet's addresses: the source must be the peer's, the destination
    /// ours in an overlay the peer shares. A packet from the peer's translated address gets
    /// our numbering of the peer as its source, in place.
    fn accept(
        peer: &mut Peer,
        index: usize,
        routes: &RouteTable,
        drops: &mut Drops,
        packet: &mut [u8],
    ) -> Option<usize> {
        let (src, dst) = packet::addresses(packet)?;
        // The peer's own translated address first: an exit's peer owns every address, its
        // own included, which must still be translated.
        let mapping = peer
            .config
            .mapped
            .iter()
            .find(|m| IpAddr::V4(m.remote) == src)
            .copied();
        if let Some(m) = mapping {
            if dst != IpAddr::V4(m.own) && !peer.may_route_to(dst) {
                drops.count(DropReason::WrongOverlay);
                return None;
            }
            if translate::rewrite_v4(packet, Some(m.local), None).is_err() {
                drops.count(DropReason::Untranslatable);
                return None;
            }
        } else if peer.owns(src) && routes.lookup(src) == Some(index) {
            // (A peer that routes a prefix, an exit above all, does not speak for the
            // addresses of another peer inside it.)
            if !peer.may_send_to(dst) {
                tracing::debug!(peer = %peer.label(), %dst, "destination outside the peer's overlays");
                drops.count(DropReason::WrongOverlay);
                return None;
            }
        } else {
            tracing::debug!(peer = %peer.label(), %src, "inner source is not the peer's");
            drops.count(DropReason::SpoofedSource);
            return None;
        }
        Some(packet.len())
    }

    /// Sends what the session queued while it waited for a handshake.
    fn flush_queued(&mut self, index: usize) {
        let Some(peer) = self.peers.get_mut(index).and_then(Option::as_mut) else {
            return;
        };
        let Some(destination) = peer.endpoint else {
            return;
        };
        while let TunnResult::WriteToNetwork(datagram) =
            peer.tunn.decapsulate(None, &[], &mut self.scratch)
        {
            self.transmits.push_back(Transmit {
                destination,
                via: peer.via,
                stream: false,
                source: None,
                payload: datagram.to_vec(),
            });
        }
    }

    /// Passes a handshake message through the gate: counts what it drops and queues the cookie
    /// reply it asks for.
    fn admit(&mut self, from: SocketAddr, via: Option<usize>, datagram: &[u8]) -> bool {
        let mut reply = [0u8; COOKIE_REPLY_LEN];
        match self.gate.check(from.ip(), datagram, &mut reply) {
            Verdict::Pass => true,
            Verdict::Cookie(len) => {
                self.drops.count(DropReason::HandshakeUnderLoad);
                self.transmits.push_back(Transmit {
                    destination: from,
                    via,
                    stream: false,
                    source: None,
                    payload: reply[..len].to_vec(),
                });
                false
            }
            Verdict::Drop(reason) => {
                self.drops.count(reason);
                // A peer that has a wrong key for us makes MAC1 with that key.
                if reason == DropReason::HandshakeBadMac && self.gate.may_diagnose() {
                    self.blame(from, Problem::NotForOurKey { endpoint: from });
                }
                false
            }
        }
    }

    /// Finds the peer a WireGuard message belongs to: by the sender's static key for a
    /// handshake initiation, by our session index for everything else.
    fn peer_for(&mut self, from: SocketAddr, datagram: &[u8]) -> Option<usize> {
        let packet = match Tunn::parse_incoming_packet(datagram) {
            Ok(p) => p,
            Err(_) => {
                self.drops.count(DropReason::MalformedWireGuard);
                return None;
            }
        };
        let receiver = match packet {
            Packet::HandshakeInit(init) => {
                return match parse_handshake_anon(&self.secret, &self.public, &init) {
                    Ok(half) => {
                        let key = PublicKey(half.peer_static_public);
                        let found = self.by_key.get(&key).copied();
                        if found.is_none() {
                            self.drops.count(DropReason::UnknownKey);
                            tracing::debug!(%from, key = %key.fingerprint(), "handshake from unknown key");
                            self.blame(
                                from,
                                Problem::KeyMismatch {
                                    endpoint: from,
                                    announced: key,
                                },
                            );
                        }
                        found
                    }
                    Err(_) => {
                        self.drops.count(DropReason::HandshakeNotForUs);
                        self.blame(from, Problem::NotForOurKey { endpoint: from });
                        None
                    }
                };
            }
            Packet::HandshakeResponse(p) => p.receiver_idx,
            Packet::PacketCookieReply(p) => p.receiver_idx,
            Packet::PacketData(p) => p.receiver_idx,
        };
        let index = ((receiver >> 8) & 0xFFFF) as usize;
        let generation = (receiver >> 24) as u8;
        match self.peers.get(index).and_then(Option::as_ref) {
            Some(peer) if peer.generation == generation => Some(index),
            _ => {
                self.drops.count(DropReason::UnknownSession);
                None
            }
        }
    }

    /// Records a key problem on the peer whose endpoint sent a handshake we refused: the exact
    /// endpoint if one matches, else one at the same address.
    fn blame(&mut self, from: SocketAddr, problem: Problem) {
        let live = || self.peers.iter().flatten();
        let exact = live().position(|p| p.endpoint == Some(from));
        let same_host = || live().position(|p| p.endpoint.map(|e| e.ip()) == Some(from.ip()));
        if let Some(n) = exact.or_else(same_host)
            && let Some(peer) = self.peers.iter_mut().flatten().nth(n)
            && !peer.connected
        {
            peer.set_problem(Some(problem));
        }
    }

    /// Drives the WireGuard timers: handshake (re)tries, keepalives, session expiry.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.clock = Some(now);
        self.gate.handle_timeout(now);
        if self.next_tick.is_some_and(|t| now < t) {
            return;
        }
        self.next_tick = Some(now + TIMER_TICK);
        for peer in self.peers.iter_mut().flatten() {
            let result = if peer.started || peer.endpoint.is_none() {
                peer.tunn.update_timers(&mut self.scratch)
            } else {
                // First tick: open the session at once rather than on the first packet, so the
                // link is up before it is needed and a restarted peer tells us where it is now.
                peer.started = true;
                peer.tunn
                    .format_handshake_initiation(&mut self.scratch, false)
            };
            match result {
                TunnResult::WriteToNetwork(datagram) => {
                    if let Some(destination) = peer.endpoint {
                        let payload = datagram.to_vec();
                        if payload.first() == Some(&HANDSHAKE_INIT) {
                            peer.initiation_sent();
                        }
                        self.transmits.push_back(Transmit {
                            destination,
                            via: peer.via,
                            stream: false,
                            source: None,
                            payload,
                        });
                    }
                }
                TunnResult::Err(WireGuardError::ConnectionExpired) => {}
                TunnResult::Err(e) => tracing::debug!(peer = %peer.label(), "timer: {e:?}"),
                _ => {}
            }
            peer.update_connected();
        }
    }

    /// When [`Node::handle_timeout`] wants to be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match (self.next_tick, self.gate.poll_timeout()) {
            (Some(tick), Some(window)) => Some(tick.min(window)),
            (tick, window) => tick.or(window),
        }
    }

    /// The next control datagram to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// Drop counters since start.
    pub fn drops(&self) -> &Drops {
        &self.drops
    }

    /// The state of every peer.
    pub fn peers(&self) -> impl Iterator<Item = PeerStatus> + '_ {
        self.peers.iter().flatten().map(Peer::status)
    }

    /// When the peer in slot `index` was last heard: the time of the [`Node::handle_timeout`]
    /// before the last handshake or data from it that WireGuard authenticated. Unlike the
    /// handshake age in [`PeerStatus`] (boringtun's own clock), this follows the time passed in.
    pub fn last_heard(&self, index: usize) -> Option<Instant> {
        self.peers.get(index)?.as_ref()?.heard
    }

    /// When data last went through the tunnel of the peer in slot `index`, either way: a
    /// packet sent to it or one received from it, by the node's clock. Keepalives and
    /// handshakes do not count.
    pub fn last_data(&self, index: usize) -> Option<Instant> {
        let peer = self.peers.get(index)?.as_ref()?;
        match (peer.sent, peer.received) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }

    /// Whether the peer in slot `index` has an endpoint and a WireGuard session to send on.
    pub fn has_session(&self, index: usize) -> bool {
        self.peers
            .get(index)
            .and_then(Option::as_ref)
            .is_some_and(|p| p.endpoint.is_some() && p.session_age().is_some())
    }

    /// A peer whose endpoint moved on its own (roamed off a quiet path), with its new
    /// endpoint and relay.
    pub fn poll_roamed(&mut self) -> Option<(usize, SocketAddr, Option<usize>)> {
        while let Some(index) = self.roamed.pop_front() {
            if let Some(peer) = self.peers.get_mut(index).and_then(Option::as_mut) {
                peer.roam_queued = false;
                if let Some(endpoint) = peer.endpoint {
                    return Some((index, endpoint, peer.via));
                }
            }
        }
        None
    }

    /// Whether the current path to the peer in slot `index` looks dead: the tunnel sent to it
    /// since it last heard anything authenticated on that path, and that was [`ROAM_QUIET`] or
    /// more ago. Sparse traffic counts as well as a stream: one packet left unanswered keeps
    /// the path suspect until the peer is heard again (a live peer is, at the latest with
    /// WireGuard's keepalive 10 s after our data; meanwhile consent is only checked faster).
    pub fn path_suspect(&self, index: usize, now: Instant) -> bool {
        let Some(peer) = self.peers.get(index).and_then(Option::as_ref) else {
            return false;
        };
        let Some(sent) = peer.sent else {
            return false;
        };
        match peer.path_heard {
            Some(heard) => sent > heard && now.saturating_duration_since(heard) >= ROAM_QUIET,
            None => now.saturating_duration_since(sent) >= ROAM_QUIET,
        }
    }

    /// The state of one peer.
    pub fn peer(&self, index: usize) -> Option<PeerStatus> {
        self.peers
            .get(index)
            .and_then(Option::as_ref)
            .map(Peer::status)
    }
}

impl Peer {
    fn status(&self) -> PeerStatus {
        let (last_handshake, tx, rx, _, _) = self.tunn.stats();
        let state = self.state();
        PeerStatus {
            name: self.config.name.clone(),
            public_key: self.config.public_key,
            addresses: self.routes().collect(),
            state,
            endpoint: self.endpoint,
            rx_bytes: rx as u64,
            tx_bytes: tx as u64,
            last_handshake,
            problem: if state == LinkState::Connected {
                None
            } else {
                self.problem.clone()
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::tests::{ipv4, ipv6};
    use std::net::Ipv6Addr;

    struct Sim {
        a: Node,
        b: Node,
        a_addr: SocketAddr,
        b_addr: SocketAddr,
    }

    fn secret() -> x25519::StaticSecret {
        x25519::StaticSecret::random_from_rng(rand_core::OsRng)
    }

    fn peer(key: PublicKey, endpoint: Option<SocketAddr>, addrs: &[&str]) -> PeerConfig {
        PeerConfig {
            name: None,
            public_key: key,
            endpoint,
            addresses: addrs
                .iter()
                .map(|a| a.parse().expect("test prefix"))
                .collect(),
            mapped: Vec::new(),
            destinations: None,
            keepalive: None,
            roaming: true,
        }
    }

    fn pair(b_key_seen_by_a: Option<PublicKey>) -> Sim {
        let (sa, sb) = (secret(), secret());
        let (ka, kb) = (PublicKey::from_secret(&sa), PublicKey::from_secret(&sb));
        let a_addr: SocketAddr = "192.0.2.1:1000".parse().unwrap();
        let b_addr: SocketAddr = "192.0.2.2:2000".parse().unwrap();
        let a = Node::new(
            sa,
            vec![peer(
                b_key_seen_by_a.unwrap_or(kb),
                Some(b_addr),
                &["10.0.0.2/32", "fd00::2/128"],
            )],
        )
        .unwrap();
        let b = Node::new(
            sb,
            vec![peer(ka, Some(a_addr), &["10.0.0.1/32", "fd00::1/128"])],
        )
        .unwrap();
        Sim {
            a,
            b,
            a_addr,
            b_addr,
        }
    }

    impl Sim {
        /// Delivers every queued control datagram until both sides are quiet.
        fn exchange(&mut self) {
            let mut out = vec![0u8; 2048];
            for _ in 0..10 {
                let mut moved = false;
                while let Some(t) = self.a.poll_transmit() {
                    assert_eq!(t.destination, self.b_addr);
                    moved = true;
                    assert_eq!(
                        self.b.handle_udp(self.a_addr, None, &t.payload, &mut out),
                        None
                    );
                }
                while let Some(t) = self.b.poll_transmit() {
                    assert_eq!(t.destination, self.a_addr);
                    moved = true;
                    assert_eq!(
                        self.a.handle_udp(self.b_addr, None, &t.payload, &mut out),
                        None
                    );
                }
                if !moved {
                    return;
                }
            }
        }

        fn start(&mut self) {
            let now = Instant::now();
            self.a.handle_timeout(now);
            self.b.handle_timeout(now);
            self.exchange();
        }
    }

    fn state(n: &Node) -> LinkState {
        n.peers().next().expect("one peer").state
    }

    #[test]
    fn handshake_on_start_then_packets_flow_both_ways() {
        let mut sim = pair(None);
        sim.start();
        assert_eq!(state(&sim.a), LinkState::Connected);
        assert_eq!(state(&sim.b), LinkState::Connected);

        let mut wire = vec![0u8; 2048];
        let mut inner = vec![0u8; 2048];
        let p = ipv4([10, 0, 0, 1], [10, 0, 0, 2], b"hello");
        let out = sim
            .a
            .handle_tun(&mut p.clone(), &mut wire)
            .expect("encrypted");
        let (dst, n) = (out.destination, out.len);
        assert_eq!(dst, sim.b_addr);
        let got = sim
            .b
            .handle_udp(sim.a_addr, None, &wire[..n], &mut inner)
            .expect("delivered");
        assert_eq!(&inner[..got], &p[..]);

        let a6: Ipv6Addr = "fd00::1".parse().unwrap();
        let b6: Ipv6Addr = "fd00::2".parse().unwrap();
        let p6 = ipv6(b6, a6, b"back");
        let out = sim
            .b
            .handle_tun(&mut p6.clone(), &mut wire)
            .expect("encrypted");
        let (dst, n) = (out.destination, out.len);
        assert_eq!(dst, sim.a_addr);
        let got = sim
            .a
            .handle_udp(sim.b_addr, None, &wire[..n], &mut inner)
            .expect("delivered");
        assert_eq!(&inner[..got], &p6[..]);
        assert!(sim.a.peers().next().unwrap().rx_bytes > 0);
    }

    #[test]
    fn a_peer_is_heard_at_the_time_passed_in_when_wireguard_authenticates_it() {
        let mut sim = pair(None);
        let t0 = Instant::now();
        sim.a.handle_timeout(t0);
        sim.b.handle_timeout(t0);
        assert_eq!((sim.a.last_heard(0), sim.b.last_heard(0)), (None, None));
        sim.exchange();
        // The handshake: B heard A's initiation, A heard B's response.
        assert_eq!(
            (sim.a.last_heard(0), sim.b.last_heard(0)),
            (Some(t0), Some(t0))
        );
        // 100 s later by the clock passed in (boringtun's own clock hardly moved), data from A.
        let t1 = t0 + Duration::from_secs(100);
        sim.a.handle_timeout(t1);
        sim.b.handle_timeout(t1);
        let mut wire = vec![0u8; 2048];
        let mut inner = vec![0u8; 2048];
        let p = ipv4([10, 0, 0, 1], [10, 0, 0, 2], b"hello");
        let out = sim
            .a
            .handle_tun(&mut p.clone(), &mut wire)
            .expect("encrypted");
        assert!(
            sim.b
                .handle_udp(sim.a_addr, None, &wire[..out.len], &mut inner)
                .is_some()
        );
        assert_eq!(sim.b.last_heard(0), Some(t1));
        assert_eq!(sim.a.last_heard(0), Some(t0), "A heard nothing since");
        // A datagram that fails authentication (a fresh one, tampered with) is not the peer.
        let out = sim
            .a
            .handle_tun(&mut p.clone(), &mut wire)
            .expect("encrypted");
        let mut forged = wire[..out.len].to_vec();
        let last = forged.len() - 1;
        forged[last] ^= 1;
        let t2 = t1 + Duration::from_secs(100);
        sim.b.handle_timeout(t2);
        assert_eq!(
            sim.b.handle_udp(sim.a_addr, None, &forged, &mut inner),
            None
        );
        assert_eq!(sim.b.drops().get(DropReason::Rejected), 1);
        assert_eq!(sim.b.last_heard(0), Some(t1));
    }

    #[test]
    fn packet_sent_before_the_handshake_is_delivered_after_it() {
        let mut sim = pair(None);
        let mut wire = vec![0u8; 2048];
        let p = ipv4([10, 0, 0, 1], [10, 0, 0, 2], &[7; 1200]);
        // No session yet: the packet waits and a handshake initiation goes out instead.
        let out = sim
            .a
            .handle_tun(&mut p.clone(), &mut wire)
            .expect("initiation");
        let (dst, n) = (out.destination, out.len);
        assert_eq!((dst, wire[0]), (sim.b_addr, HANDSHAKE_INIT));
        let mut reply = vec![0u8; 2048];
        assert_eq!(
            sim.b.handle_udp(sim.a_addr, None, &wire[..n], &mut reply),
            None
        );
        let response = sim.b.poll_transmit().expect("handshake response");
        // The caller's buffer is only as long as the response; the queued packet is bigger.
        let mut small = vec![0u8; response.payload.len()];
        assert_eq!(
            sim.a
                .handle_udp(sim.b_addr, None, &response.payload, &mut small),
            None
        );
        // A keepalive confirms the session, then the waiting packet follows.
        let mut delivered = Vec::new();
        while let Some(t) = sim.a.poll_transmit() {
            if let Some(got) = sim.b.handle_udp(sim.a_addr, None, &t.payload, &mut reply) {
                delivered.push(reply[..got].to_vec());
            }
        }
        assert_eq!(delivered, vec![p]);
    }

    #[test]
    fn a_removed_peer_is_gone_and_its_slot_never_takes_its_messages() {
        let mut sim = pair(None);
        sim.start();
        let mut wire = vec![0u8; 2048];
        let mut inner = vec![0u8; 2048];
        let p = ipv4([10, 0, 0, 2], [10, 0, 0, 1], b"late");
        let n = sim
            .b
            .handle_tun(&mut p.clone(), &mut wire)
            .expect("encrypted")
            .len;
        let b_key = sim.a.peers().next().unwrap().public_key;
        sim.a.remove_peer(0);
        assert_eq!(sim.a.peers().count(), 0);
        assert_eq!(
            sim.a
                .handle_tun(&mut ipv4([10, 0, 0, 1], [10, 0, 0, 2], b""), &mut wire),
            None
        );
        assert_eq!(sim.a.drops().get(DropReason::NoRoute), 1);
        // A new peer takes slot 0: B's message for the old session must not reach it.
        let other = PublicKey::from_secret(&secret());
        assert_eq!(sim.a.add_peer(peer(other, None, &["10.0.0.3/32"])), Ok(0));
        assert_eq!(
            sim.a.handle_udp(sim.b_addr, None, &wire[..n], &mut inner),
            None
        );
        assert_eq!(sim.a.drops().get(DropReason::UnknownSession), 1);
        // And B can be added back.
        assert_eq!(
            sim.a
                .add_peer(peer(b_key, Some(sim.b_addr), &["10.0.0.2/32"])),
            Ok(1)
        );
    }

    #[test]
    fn inner_source_of_another_peer_is_dropped_and_counted() {
        let mut sim = pair(None);
        sim.start();
        let mut wire = vec![0u8; 2048];
        let mut inner = vec![0u8; 2048];
        // B claims a source address that A routes to nobody (and B does not own).
        let spoofed = ipv4([10, 0, 0, 9], [10, 0, 0, 1], b"spoof");
        let n = sim
            .b
            .handle_tun(&mut spoofed.clone(), &mut wire)
            .expect("encrypted")
            .len;
        assert_eq!(
            sim.a.handle_udp(sim.b_addr, None, &wire[..n], &mut inner),
            None
        );
        assert_eq!(sim.a.drops().get(DropReason::SpoofedSource), 1);
    }

    #[test]
    fn a_packet_for_an_address_outside_the_shared_overlays_is_dropped() {
        let mut sim = pair(None);
        sim.start();
        // A accepts from B only what is for 10.0.0.1; B routes all of 10.0.0.0/24 to A.
        let refused = sim.a.set_addresses(
            0,
            vec!["10.0.0.2/32".parse().unwrap()],
            Vec::new(),
            Some(Destinations {
                own: vec!["10.0.0.1".parse().unwrap()],
                routed: Vec::new(),
            }),
        );
        assert!(refused.is_empty());
        sim.b
            .set_addresses(0, vec!["10.0.0.0/24".parse().unwrap()], Vec::new(), None);
        let mut wire = vec![0u8; 2048];
        let mut inner = vec![0u8; 2048];
        for (dst, delivered) in [([10, 0, 0, 1], true), ([10, 0, 0, 7], false)] {
            let mut p = ipv4([10, 0, 0, 2], dst, b"x");
            let n = sim.b.handle_tun(&mut p, &mut wire).expect("encrypted").len;
            let got = sim.a.handle_udp(sim.b_addr, None, &wire[..n], &mut inner);
            assert_eq!(got.is_some(), delivered, "to {dst:?}");
        }
        assert_eq!(sim.a.drops().get(DropReason::WrongOverlay), 1);
    }

    #[test]
    fn a_peer_reaches_the_prefixes_routed_for_it_and_nothing_else_beyond_us() {
        let mut sim = pair(None);
        sim.start();
        // A routes 192.168.50.0/24 for B: B, in the overlay directly or through a mapping (the
        // social overlay), may send there; not to 192.168.60.0/24.
        let m = Mapping {
            local: "172.31.5.5".parse().unwrap(),
            remote: "10.0.0.3".parse().unwrap(),
            own: "10.0.0.1".parse().unwrap(),
        };
        sim.a.set_addresses(
            0,
            vec!["10.0.0.2/32".parse().unwrap()],
            vec![m],
            Some(Destinations {
                own: vec!["10.0.0.1".parse().unwrap()],
                routed: vec!["192.168.50.0/24".parse().unwrap()],
            }),
        );
        sim.b
            .set_addresses(0, vec!["0.0.0.0/0".parse().unwrap()], Vec::new(), None);
        let mut wire = vec![0u8; 2048];
        let mut inner = vec![0u8; 2048];
        for (src, dst, delivered) in [
            ([10, 0, 0, 2], [192, 168, 50, 9], true),
            ([10, 0, 0, 3], [192, 168, 50, 9], true),
            ([10, 0, 0, 2], [192, 168, 60, 9], false),
            ([10, 0, 0, 3], [192, 168, 60, 9], false),
        ] {
            let mut p = ipv4(src, dst, b"x");
            let n = sim.b.handle_tun(&mut p, &mut wire).expect("encrypted").len;
            let got = sim.a.handle_udp(sim.b_addr, None, &wire[..n], &mut inner);
            assert_eq!(got.is_some(), delivered, "{src:?} to {dst:?}");
            if let Some(len) = got {
                let (from, _) = packet::addresses(&inner[..len]).expect("a packet");
                // Through the mapping, the source is A's name for B, as for any packet of B's.
                let expected: std::net::Ipv4Addr = if src == [10, 0, 0, 3] {
                    m.local
                } else {
                    src.into()
                };
                assert_eq!(from, IpAddr::V4(expected));
            }
        }
        assert_eq!(sim.a.drops().get(DropReason::WrongOverlay), 2);
    }

    #[test]
    fn a_peer_that_routes_everything_does_not_speak_for_another_peers_address() {
        let mut sim = pair(None);
        sim.start();
        // B is A's exit (it routes every address), and C owns 10.0.0.3.
        sim.a
            .set_addresses(0, vec!["0.0.0.0/0".parse().unwrap()], Vec::new(), None);
        let c = PublicKey::from_secret(&secret());
        sim.a
            .add_peer(peer(c, None, &["10.0.0.3/32"]))
            .expect("a third peer");
        let mut wire = vec![0u8; 2048];
        let mut inner = vec![0u8; 2048];
        for (src, delivered) in [([198, 51, 100, 7], true), ([10, 0, 0, 3], false)] {
            let mut p = ipv4(src, [10, 0, 0, 1], b"x");
            let n = sim.b.handle_tun(&mut p, &mut wire).expect("encrypted").len;
            let got = sim.a.handle_udp(sim.b_addr, None, &wire[..n], &mut inner);
            assert_eq!(got.is_some(), delivered, "from {src:?}");
        }
        assert_eq!(sim.a.drops().get(DropReason::SpoofedSource), 1);
    }

    #[test]
    fn mapped_addresses_are_translated_both_ways() {
        let mut sim = pair(None);
        sim.start();
        // A calls B 172.31.5.5; in the tunnel B is 10.0.0.2 and A is 10.0.0.1.
        let m = Mapping {
            local: "172.31.5.5".parse().unwrap(),
            remote: "10.0.0.2".parse().unwrap(),
            own: "10.0.0.1".parse().unwrap(),
        };
        sim.a.set_addresses(
            0,
            Vec::new(),
            vec![m],
            Some(Destinations {
                own: vec!["10.0.0.1".parse().unwrap()],
                routed: Vec::new(),
            }),
        );
        let mut wire = vec![0u8; 2048];
        let mut inner = vec![0u8; 2048];
        let mut p = ipv4([10, 0, 0, 1], [172, 31, 5, 5], b"ping");
        let n = sim.a.handle_tun(&mut p, &mut wire).expect("encrypted").len;
        let got = sim.b.handle_udp(sim.a_addr, None, &wire[..n], &mut inner);
        let got = got.expect("delivered");
        assert_eq!(
            packet::addresses(&inner[..got]),
            Some(("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap()))
        );
        let mut reply = ipv4([10, 0, 0, 2], [10, 0, 0, 1], b"pong");
        let n = sim
            .b
            .handle_tun(&mut reply, &mut wire)
            .expect("encrypted")
            .len;
        let got = sim.a.handle_udp(sim.b_addr, None, &wire[..n], &mut inner);
        let got = got.expect("delivered");
        assert_eq!(
            packet::addresses(&inner[..got]),
            Some(("172.31.5.5".parse().unwrap(), "10.0.0.1".parse().unwrap()))
        );
        assert_eq!(
            sim.a.peer(0).unwrap().addresses,
            vec!["172.31.5.5/32".parse().unwrap()]
        );
        // Another address of the peer's is a spoof, even in its subnet.
        let mut spoof = ipv4([10, 0, 0, 3], [10, 0, 0, 1], b"x");
        sim.b
            .set_addresses(0, vec!["10.0.0.1/32".parse().unwrap()], Vec::new(), None);
        let n = sim
            .b
            .handle_tun(&mut spoof, &mut wire)
            .expect("encrypted")
            .len;
        assert_eq!(
            sim.a.handle_udp(sim.b_addr, None, &wire[..n], &mut inner),
            None
        );
        assert_eq!(sim.a.drops().get(DropReason::SpoofedSource), 1);
    }

    #[test]
    fn roaming_peer_is_followed_to_its_new_endpoint() {
        let mut sim = pair(None);
        sim.start();
        let mut wire = vec![0u8; 2048];
        let mut inner = vec![0u8; 2048];
        let moved: SocketAddr = "192.0.2.2:3000".parse().unwrap();
        let p = ipv4([10, 0, 0, 2], [10, 0, 0, 1], b"from elsewhere");
        let n = sim
            .b
            .handle_tun(&mut p.clone(), &mut wire)
            .expect("encrypted")
            .len;
        assert!(
            sim.a
                .handle_udp(moved, None, &wire[..n], &mut inner)
                .is_some()
        );
        let back = ipv4([10, 0, 0, 1], [10, 0, 0, 2], b"reply");
        let dst = sim
            .a
            .handle_tun(&mut back.clone(), &mut wire)
            .expect("encrypted")
            .destination;
        assert_eq!(dst, moved);
    }

    /// A and B linked, with A's peer B managed by ICE (roaming off, endpoint set by ICE) at
    /// `t0`, and the handshake done at `t0`.
    fn ice_managed(t0: Instant) -> Sim {
        let mut sim = pair(None);
        let b_key = sim.a.peers().next().unwrap().public_key;
        sim.a.remove_peer(0);
        let mut b_config = peer(b_key, None, &["10.0.0.2/32"]);
        b_config.roaming = false;
        let index = sim.a.add_peer(b_config).unwrap();
        sim.a.handle_timeout(t0);
        sim.b.handle_timeout(t0);
        sim.a.set_endpoint(index, sim.b_addr, None);
        sim.a.handle_timeout(t0);
        sim.exchange();
        assert_eq!(state(&sim.a), LinkState::Connected);
        sim
    }

    impl Sim {
        /// Sends a packet from B's tunnel to A as if it came from `from` through relay `via`;
        /// whether A took it.
        fn b_to_a(&mut self, from: SocketAddr, via: Option<usize>) -> bool {
            let mut wire = vec![0u8; 2048];
            let mut inner = vec![0u8; 2048];
            let p = ipv4([10, 0, 0, 2], [10, 0, 0, 1], b"from B");
            let n = self
                .b
                .handle_tun(&mut p.clone(), &mut wire)
                .expect("encrypted")
                .len;
            self.a
                .handle_udp(from, via, &wire[..n], &mut inner)
                .is_some()
        }

        /// Where A sends a packet for B now: the destination and relay.
        fn a_sends_to(&mut self) -> (SocketAddr, Option<usize>) {
            let mut wire = vec![0u8; 2048];
            let back = ipv4([10, 0, 0, 1], [10, 0, 0, 2], b"reply");
            let out = self
                .a
                .handle_tun(&mut back.clone(), &mut wire)
                .expect("encrypted");
            (out.destination, out.via)
        }

        fn a_at(&mut self, t: Instant) {
            self.a.handle_timeout(t);
        }

        /// How long A waits on a quiet path before roaming off it.
        fn a_quiet(&self) -> Duration {
            self.a.peers[0].as_ref().expect("peer B").roam_quiet
        }
    }

    #[test]
    fn a_peer_whose_path_ice_chooses_does_not_roam_while_its_path_is_alive() {
        let t0 = Instant::now();
        let mut sim = ice_managed(t0);
        let elsewhere: SocketAddr = "192.0.2.2:3000".parse().unwrap();
        // The current path was heard 0.9 s ago: a datagram on another path does not move it.
        sim.a_at(t0 + Duration::from_millis(900));
        assert!(sim.b_to_a(elsewhere, None));
        assert_eq!(sim.a_sends_to(), (sim.b_addr, None));
        // Heard again on the current path, then 0.9 s later again elsewhere: still no move.
        let b_addr = sim.b_addr;
        assert!(sim.b_to_a(b_addr, None));
        sim.a_at(t0 + Duration::from_millis(1800));
        assert!(sim.b_to_a(elsewhere, None));
        assert_eq!(sim.a_sends_to(), (sim.b_addr, None));
        assert_eq!(sim.a.poll_roamed(), None);
        assert_eq!(sim.a.peers().next().unwrap().endpoint, Some(sim.b_addr));
    }

    #[test]
    fn a_peer_whose_path_went_quiet_roams_to_where_it_is_heard_and_stays() {
        let t0 = Instant::now();
        let mut sim = ice_managed(t0);
        let elsewhere: SocketAddr = "192.0.2.2:3000".parse().unwrap();
        // Nothing on the current path for a second: the next authenticated datagram from
        // elsewhere moves the endpoint.
        let quiet = sim.a_quiet();
        sim.a_at(t0 + quiet);
        assert!(sim.b_to_a(elsewhere, None));
        assert_eq!(sim.a_sends_to(), (elsewhere, None));
        assert_eq!(sim.a.poll_roamed(), Some((0, elsewhere, None)));
        assert_eq!(sim.a.poll_roamed(), None);
        assert_eq!(sim.a.peers().next().unwrap().endpoint, Some(elsewhere));
        // A late datagram on the old path does not pull it back while the new one is alive.
        let b_addr = sim.b_addr;
        sim.a_at(t0 + quiet + Duration::from_millis(500));
        assert!(sim.b_to_a(b_addr, None));
        assert_eq!(sim.a_sends_to(), (elsewhere, None));
        assert_eq!(sim.a.poll_roamed(), None);
    }

    #[test]
    fn a_relay_is_roamed_to_only_when_the_current_path_is_quiet() {
        let t0 = Instant::now();
        let mut sim = ice_managed(t0);
        let relayed_peer: SocketAddr = "198.51.100.7:49152".parse().unwrap();
        let other_relay: SocketAddr = "198.51.100.8:49160".parse().unwrap();
        let quiet = sim.a_quiet();
        // Direct path alive: the same peer through relay 0 is no roam.
        sim.a_at(t0 + quiet / 2);
        assert!(sim.b_to_a(relayed_peer, Some(0)));
        assert_eq!(sim.a_sends_to(), (sim.b_addr, None));
        // Direct path quiet: the relay takes over.
        let t1 = t0 + quiet + Duration::from_millis(100);
        sim.a_at(t1);
        assert!(sim.b_to_a(relayed_peer, Some(0)));
        assert_eq!(sim.a_sends_to(), (relayed_peer, Some(0)));
        assert_eq!(sim.a.poll_roamed(), Some((0, relayed_peer, Some(0))));
        // The relayed path is alive: another relay, or the same address through another
        // relay, or the direct path, does not pull the endpoint around.
        sim.a_at(t1 + quiet / 2);
        assert!(sim.b_to_a(other_relay, Some(1)));
        assert!(sim.b_to_a(relayed_peer, Some(1)));
        let b_addr = sim.b_addr;
        assert!(sim.b_to_a(b_addr, None));
        assert_eq!(sim.a_sends_to(), (relayed_peer, Some(0)));
        assert_eq!(sim.a.poll_roamed(), None);
        // Relay 0 goes quiet; relay 1 is heard: it takes over.
        sim.a_at(t1 + quiet);
        assert!(sim.b_to_a(other_relay, Some(1)));
        assert_eq!(sim.a_sends_to(), (other_relay, Some(1)));
    }

    #[test]
    fn two_ice_chosen_peers_sending_on_different_live_paths_converge_on_one() {
        // Two paths between A and B, both alive: on path 0 A is A0 and B is B0, on path 1 A1
        // and B1. A sends on path 1, B on path 0: each hears the other only on the path it
        // does not send on.
        let (sa, sb) = (secret(), secret());
        let (ka, kb) = (PublicKey::from_secret(&sa), PublicKey::from_secret(&sb));
        let addr = |s: &str| -> SocketAddr { s.parse().unwrap() };
        let (a0, a1) = (addr("192.0.2.1:1000"), addr("198.51.100.1:1000"));
        let (b0, b1) = (addr("192.0.2.2:2000"), addr("198.51.100.2:2000"));
        let ice_peer = |key, net: &str| PeerConfig {
            roaming: false,
            ..peer(key, None, &[net])
        };
        let mut a = Node::new(sa, vec![ice_peer(kb, "10.0.0.2/32")]).unwrap();
        let mut b = Node::new(sb, vec![ice_peer(ka, "10.0.0.1/32")]).unwrap();
        let mut now = Instant::now();
        a.handle_timeout(now);
        b.handle_timeout(now);
        a.set_endpoint(0, b1, None);
        b.set_endpoint(0, a0, None);
        // Where a datagram to `to` comes from, on the same path.
        let source = |to: SocketAddr| match to {
            t if t == b0 => a0,
            t if t == b1 => a1,
            t if t == a0 => b0,
            _ => b1,
        };
        let mut wire = vec![0u8; 2048];
        let mut inner = vec![0u8; 2048];
        let mut moves = (0, 0);
        let mut last = (Some(b1), Some(a0));
        let mut in_flight: Vec<(bool, SocketAddr, Vec<u8>)> = Vec::new();
        // 10 s of packets both ways every 20 ms, 20 ms on the wire (the handshake included).
        for _ in 0..500 {
            now += Duration::from_millis(20);
            a.handle_timeout(now);
            b.handle_timeout(now);
            // What was sent in the last step arrives now (20 ms on the wire), then both send.
            for (to_b, src, payload) in std::mem::take(&mut in_flight) {
                let to = if to_b { &mut b } else { &mut a };
                to.handle_udp(src, None, &payload, &mut inner);
            }
            for a_sends in [true, false] {
                let (from, p) = if a_sends {
                    (&mut a, ipv4([10, 0, 0, 1], [10, 0, 0, 2], b"a"))
                } else {
                    (&mut b, ipv4([10, 0, 0, 2], [10, 0, 0, 1], b"b"))
                };
                if let Some(out) = from.handle_tun(&mut p.clone(), &mut wire) {
                    let src = source(out.destination);
                    in_flight.push((a_sends, src, wire[..out.len].to_vec()));
                }
                while let Some(t) = from.poll_transmit() {
                    in_flight.push((a_sends, source(t.destination), t.payload));
                }
            }
            let now_at = (
                a.peers().next().unwrap().endpoint,
                b.peers().next().unwrap().endpoint,
            );
            moves.0 += usize::from(now_at.0 != last.0);
            moves.1 += usize::from(now_at.1 != last.1);
            last = now_at;
        }
        assert_eq!(state(&a), LinkState::Connected);
        // One path both ways, reached with one move.
        assert!(
            last == (Some(b0), Some(a0)) || last == (Some(b1), Some(a1)),
            "{last:?}"
        );
        assert_eq!(moves.0 + moves.1, 1, "{moves:?}");
    }

    #[test]
    fn a_path_is_suspect_while_the_tunnel_sends_and_nothing_comes_back() {
        let t0 = Instant::now();
        let mut sim = ice_managed(t0);
        // Idle: not suspect, however long the silence.
        sim.a_at(t0 + Duration::from_secs(30));
        assert!(!sim.a.path_suspect(0, t0 + Duration::from_secs(30)));
        // Sending, and heard on the path just now: not suspect.
        let b_addr = sim.b_addr;
        assert!(sim.b_to_a(b_addr, None));
        sim.a_sends_to();
        assert!(!sim.a.path_suspect(0, t0 + Duration::from_millis(30_500)));
        // Sending on, a second of silence: suspect.
        let t1 = t0 + Duration::from_millis(31_000);
        sim.a_at(t1);
        sim.a_sends_to();
        assert!(sim.a.path_suspect(0, t1));
        // An answer on the path clears it.
        assert!(sim.b_to_a(b_addr, None));
        assert!(!sim.a.path_suspect(0, t1));
        // One packet, unanswered: suspect a second later, and still a while after, with
        // nothing sent since.
        sim.a_at(t1 + Duration::from_millis(100));
        sim.a_sends_to();
        assert!(!sim.a.path_suspect(0, t1 + Duration::from_millis(500)));
        assert!(sim.a.path_suspect(0, t1 + Duration::from_secs(1)));
        assert!(sim.a.path_suspect(0, t1 + Duration::from_secs(4)));
    }

    #[test]
    fn wrong_key_gives_no_link_and_both_sides_say_why() {
        let wrong = PublicKey::from_secret(&secret());
        let mut sim = pair(Some(wrong));
        sim.start();
        assert_ne!(state(&sim.a), LinkState::Connected);
        assert_ne!(state(&sim.b), LinkState::Connected);
        let a_problem = sim.a.peers().next().unwrap().problem.expect("a knows why");
        assert!(
            matches!(a_problem, Problem::KeyMismatch { .. }),
            "{a_problem:?}"
        );
        let b_problem = sim.b.peers().next().unwrap().problem.expect("b knows why");
        assert!(
            matches!(b_problem, Problem::NotForOurKey { .. }),
            "{b_problem:?}"
        );
        assert_eq!(sim.a.drops().get(DropReason::UnknownKey), 1);
        // A's initiations carry a MAC1 made for the wrong key: B needs no key operation to
        // refuse them.
        assert!(sim.b.drops().get(DropReason::HandshakeBadMac) >= 1);
        assert!(a_problem.to_string().contains("key"));
    }

    #[test]
    fn unrouted_and_malformed_tun_packets_are_counted() {
        let mut sim = pair(None);
        let mut wire = vec![0u8; 2048];
        assert_eq!(
            sim.a
                .handle_tun(&mut ipv4([10, 0, 0, 1], [10, 9, 9, 9], b""), &mut wire),
            None
        );
        assert_eq!(sim.a.handle_tun(&mut [0x45, 0, 1], &mut wire), None);
        let solicitation = ipv6(
            "fe80::1".parse().unwrap(),
            "ff02::2".parse().unwrap(),
            b"router solicitation",
        );
        assert_eq!(sim.a.handle_tun(&mut solicitation.clone(), &mut wire), None);
        assert_eq!(sim.a.drops().get(DropReason::NoRoute), 1);
        assert_eq!(sim.a.drops().get(DropReason::MalformedIp), 1);
        assert_eq!(sim.a.drops().get(DropReason::Multicast), 1);
    }

    #[test]
    fn hostile_datagrams_are_dropped_never_panic() {
        let mut sim = pair(None);
        sim.start();
        let mut out = vec![0u8; 4096];
        let mut rng = crate::testing::Rng(0x2545_f491_4f6c_dd1d);
        for len in 0..600usize {
            let mut d = rng.bytes(len);
            if len >= 4 {
                // Make some of them look like WireGuard so they reach the parser.
                d[0] = (len % 5) as u8;
                d[1..4].fill(0);
            }
            assert_eq!(sim.a.handle_udp(sim.b_addr, None, &d, &mut out), None);
        }
        let total: u64 = sim.a.drops().iter().map(|(_, n)| n).sum();
        assert_eq!(total, 600);
        assert_eq!(state(&sim.a), LinkState::Connected);
    }

    #[test]
    fn configuration_conflicts_are_refused() {
        let s = secret();
        let k = PublicKey::from_secret(&secret());
        let dup = Node::new(s.clone(), vec![peer(k, None, &[]), peer(k, None, &[])]);
        assert!(matches!(dup, Err(NodeError::DuplicatePeer(_))));
        let k2 = PublicKey::from_secret(&secret());
        let overlap = Node::new(
            s.clone(),
            vec![
                peer(k, None, &["10.0.0.2/32"]),
                peer(k2, None, &["10.0.0.2/32"]),
            ],
        );
        assert!(matches!(overlap, Err(NodeError::OverlappingAddress { .. })));
        let own = PublicKey::from_secret(&s);
        assert!(matches!(
            Node::new(s, vec![peer(own, None, &[])]),
            Err(NodeError::SelfAsPeer(_))
        ));
    }

    #[test]
    fn peer_without_endpoint_waits_and_is_learned_from_its_handshake() {
        let (sa, sb) = (secret(), secret());
        let (ka, kb) = (PublicKey::from_secret(&sa), PublicKey::from_secret(&sb));
        let a_addr: SocketAddr = "192.0.2.1:1000".parse().unwrap();
        let b_addr: SocketAddr = "192.0.2.2:2000".parse().unwrap();
        let a = Node::new(sa, vec![peer(kb, None, &["10.0.0.2/32"])]).unwrap();
        let b = Node::new(sb, vec![peer(ka, Some(a_addr), &["10.0.0.1/32"])]).unwrap();
        let mut sim = Sim {
            a,
            b,
            a_addr,
            b_addr,
        };
        assert_eq!(state(&sim.a), LinkState::Waiting);
        sim.start();
        assert_eq!(state(&sim.a), LinkState::Connected);
        assert_eq!(sim.a.peers().next().unwrap().endpoint, Some(b_addr));
    }

    /// A pair where only A knows where B is: B waits for A's handshake.
    fn a_calls_b() -> Sim {
        let (sa, sb) = (secret(), secret());
        let (ka, kb) = (PublicKey::from_secret(&sa), PublicKey::from_secret(&sb));
        let a_addr: SocketAddr = "192.0.2.1:1000".parse().unwrap();
        let b_addr: SocketAddr = "192.0.2.2:2000".parse().unwrap();
        let a = Node::new(sa, vec![peer(kb, Some(b_addr), &["10.0.0.2/32"])]).unwrap();
        let b = Node::new(sb, vec![peer(ka, None, &["10.0.0.1/32"])]).unwrap();
        Sim {
            a,
            b,
            a_addr,
            b_addr,
        }
    }

    /// A handshake initiation for `to` from a key that nobody knows: its MAC1 is valid, so
    /// only a key operation tells that it is not a peer's.
    fn stranger_initiation(to: PublicKey) -> Vec<u8> {
        let mut tunn = Tunn::new(secret(), x25519::PublicKey::from(to.0), None, None, 0, None);
        let mut buf = vec![0u8; 148];
        match tunn.format_handshake_initiation(&mut buf, false) {
            TunnResult::WriteToNetwork(d) => d.to_vec(),
            _ => panic!("no initiation"),
        }
    }

    fn stranger(n: usize) -> SocketAddr {
        SocketAddr::from(([198, 51, 100, (n % 250) as u8 + 1], 40000 + n as u16))
    }

    /// Sends strangers' initiations until `node` is under load; each one costs a key operation.
    fn load(node: &mut Node) {
        let mut out = vec![0u8; 2048];
        let key = node.public_key();
        for n in 0..HANDSHAKES_BEFORE_LOAD as usize {
            let d = stranger_initiation(key);
            assert_eq!(node.handle_udp(stranger(n), None, &d, &mut out), None);
        }
        assert_eq!(
            node.drops().get(DropReason::UnknownKey),
            HANDSHAKES_BEFORE_LOAD
        );
        assert_eq!(node.drops().get(DropReason::HandshakeUnderLoad), 0);
        assert_eq!(node.poll_transmit(), None, "strangers get no answer");
    }

    /// What the first peer's session sends when its retry timer fires (5 s of boringtun's own
    /// clock after an unanswered initiation): the initiation again, with the MAC2 of the
    /// cookie it was given, if any.
    fn retry_initiation(node: &mut Node) -> Vec<u8> {
        let peer = node.peers[0].as_mut().expect("a peer");
        let mut buf = vec![0u8; 148];
        match peer.tunn.format_handshake_initiation(&mut buf, true) {
            TunnResult::WriteToNetwork(d) => d.to_vec(),
            _ => panic!("no initiation"),
        }
    }

    #[test]
    fn a_handshake_with_a_bad_mac1_is_dropped_before_any_key_operation() {
        let mut sim = pair(None);
        sim.start();
        let mut out = vec![0u8; 2048];
        let b_key = sim.b.public_key();
        let from = stranger(1);
        // Random bytes of an initiation's type and length.
        let mut rng = crate::testing::Rng(0x9e37_79b9_7f4a_7c15);
        let mut forged = rng.bytes(148);
        forged[0] = HANDSHAKE_INIT;
        forged[1..4].fill(0);
        assert_eq!(sim.b.handle_udp(from, None, &forged, &mut out), None);
        // A real initiation whose MAC1 was made for another key, and one tampered with.
        let for_another = stranger_initiation(PublicKey::from_secret(&secret()));
        assert_eq!(sim.b.handle_udp(from, None, &for_another, &mut out), None);
        let mut tampered = stranger_initiation(b_key);
        tampered[60] ^= 1;
        assert_eq!(sim.b.handle_udp(from, None, &tampered, &mut out), None);
        // A forged response too.
        let mut response = rng.bytes(92);
        response[0] = HANDSHAKE_RESPONSE;
        response[1..4].fill(0);
        assert_eq!(sim.b.handle_udp(from, None, &response, &mut out), None);
        assert_eq!(sim.b.drops().get(DropReason::HandshakeBadMac), 4);
        // None of them reached the key operation that tells a wrong key or a stranger.
        assert_eq!(sim.b.drops().get(DropReason::HandshakeNotForUs), 0);
        assert_eq!(sim.b.drops().get(DropReason::UnknownKey), 0);
        assert_eq!(sim.b.poll_transmit(), None);
        // A stranger's initiation with a valid MAC1 does reach it.
        let valid = stranger_initiation(b_key);
        assert_eq!(sim.b.handle_udp(from, None, &valid, &mut out), None);
        assert_eq!(sim.b.drops().get(DropReason::UnknownKey), 1);
        assert_eq!(sim.b.drops().get(DropReason::HandshakeBadMac), 4);
        assert_eq!(state(&sim.b), LinkState::Connected);
    }

    #[test]
    fn under_load_an_initiation_gets_a_cookie_reply_and_the_peer_still_links() {
        let mut sim = a_calls_b();
        let t0 = Instant::now();
        sim.b.handle_timeout(t0);
        load(&mut sim.b);
        let mut out = vec![0u8; 2048];
        // Under load, a stranger costs no key operation: it gets a cookie reply.
        let from = stranger(1000);
        let d = stranger_initiation(sim.b.public_key());
        assert_eq!(sim.b.handle_udp(from, None, &d, &mut out), None);
        let cookie = sim.b.poll_transmit().expect("a cookie reply");
        assert_eq!(cookie.destination, from);
        assert_eq!(
            (cookie.payload[0], cookie.payload.len()),
            (COOKIE_REPLY, COOKIE_REPLY_LEN)
        );
        assert_eq!(
            sim.b.drops().get(DropReason::UnknownKey),
            HANDSHAKES_BEFORE_LOAD
        );
        assert_eq!(sim.b.drops().get(DropReason::HandshakeUnderLoad), 1);
        // A's initiation gets a cookie reply too, which A's session takes.
        sim.a.handle_timeout(t0);
        sim.exchange();
        assert_eq!(sim.b.drops().get(DropReason::HandshakeUnderLoad), 2);
        assert_eq!(state(&sim.a), LinkState::Connecting);
        assert_eq!(state(&sim.b), LinkState::Waiting);
        // The retry carries the cookie's MAC2, which holds for A's address only.
        let retry = retry_initiation(&mut sim.a);
        assert_eq!(sim.b.handle_udp(stranger(7), None, &retry, &mut out), None);
        assert_eq!(sim.b.drops().get(DropReason::HandshakeUnderLoad), 3);
        assert_eq!(
            sim.b.poll_transmit().map(|t| t.destination),
            Some(stranger(7))
        );
        assert_eq!(sim.b.handle_udp(sim.a_addr, None, &retry, &mut out), None);
        sim.exchange();
        assert_eq!(state(&sim.a), LinkState::Connected);
        assert_eq!(state(&sim.b), LinkState::Connected);
        assert_eq!(sim.b.drops().get(DropReason::HandshakeUnderLoad), 3);
        assert_eq!(
            sim.b.drops().get(DropReason::UnknownKey),
            HANDSHAKES_BEFORE_LOAD
        );
        let p = ipv4([10, 0, 0, 1], [10, 0, 0, 2], b"through the flood");
        let n = sim
            .a
            .handle_tun(&mut p.clone(), &mut out)
            .expect("sent")
            .len;
        let mut inner = vec![0u8; 2048];
        let got = sim.b.handle_udp(sim.a_addr, None, &out[..n], &mut inner);
        assert_eq!(got.map(|len| inner[..len].to_vec()), Some(p));
    }

    #[test]
    fn under_load_a_response_gets_a_cookie_reply_and_the_link_still_comes_up() {
        let mut sim = a_calls_b();
        let t0 = Instant::now();
        sim.b.handle_timeout(t0);
        // A sends its initiation, then a flood puts A under load before the response comes.
        sim.a.handle_timeout(t0);
        let initiation = sim.a.poll_transmit().expect("an initiation");
        load(&mut sim.a);
        let mut out = vec![0u8; 2048];
        assert_eq!(
            sim.b
                .handle_udp(sim.a_addr, None, &initiation.payload, &mut out),
            None
        );
        // B's response has no MAC2: A answers with a cookie reply, which B's session takes.
        sim.exchange();
        assert_eq!(sim.a.drops().get(DropReason::HandshakeUnderLoad), 1);
        assert_eq!(state(&sim.a), LinkState::Connecting);
        // A tries again; B's new response carries the cookie's MAC2.
        let retry = retry_initiation(&mut sim.a);
        assert_eq!(sim.b.handle_udp(sim.a_addr, None, &retry, &mut out), None);
        sim.exchange();
        assert_eq!(state(&sim.a), LinkState::Connected);
        assert_eq!(sim.a.drops().get(DropReason::HandshakeUnderLoad), 1);
        assert_eq!(sim.a.drops().get(DropReason::Rejected), 0);
    }

    #[test]
    fn the_handshake_count_starts_again_each_second_of_the_nodes_clock() {
        let mut sim = a_calls_b();
        let t0 = Instant::now();
        sim.b.handle_timeout(t0);
        load(&mut sim.b);
        let key = sim.b.public_key();
        let mut out = vec![0u8; 2048];
        assert!(sim.b.poll_timeout().is_some_and(|t| t <= t0 + LOAD_WINDOW));
        sim.b
            .handle_timeout(t0 + LOAD_WINDOW - Duration::from_millis(1));
        let d = stranger_initiation(key);
        assert_eq!(sim.b.handle_udp(stranger(1), None, &d, &mut out), None);
        assert_eq!(sim.b.drops().get(DropReason::HandshakeUnderLoad), 1);
        // A second later by the clock passed in, a handshake costs a key operation again.
        sim.b.handle_timeout(t0 + LOAD_WINDOW);
        let d = stranger_initiation(key);
        assert_eq!(sim.b.handle_udp(stranger(2), None, &d, &mut out), None);
        assert_eq!(sim.b.drops().get(DropReason::HandshakeUnderLoad), 1);
        assert_eq!(
            sim.b.drops().get(DropReason::UnknownKey),
            HANDSHAKES_BEFORE_LOAD + 1
        );
    }
}
