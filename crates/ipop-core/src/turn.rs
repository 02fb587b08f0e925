//! A TURN client (RFC 8656, RFC 5766): one allocation on one server over one transport, as a
//! sans-IO state machine.
//!
//! [`TurnAllocation`] allocates a relayed UDP address (Allocate with REQUESTED-TRANSPORT UDP),
//! authenticates with long-term credentials (the first request goes without, the 401 answer
//! gives REALM and NONCE, a 438 answer a fresh NONCE), refreshes the allocation at 80 % of its
//! lifetime, installs and refreshes permissions (CreatePermission, every
//! [`PERMISSION_REFRESH`]) and channels (ChannelBind, every [`CHANNEL_REFRESH`]), and releases the
//! allocation on request (Refresh with LIFETIME 0). Data to a peer goes out as ChannelData once a
//! channel is bound, as a Send indication before; data from peers arrives as ChannelData or Data
//! indications, decoded in place ([`TurnInput::Data`] gives the payload's range in the datagram).
//!
//! The transport is the daemon's business. Over UDP the allocation shares the socket with
//! WireGuard and ICE; over TCP or TLS the daemon feeds the byte stream through a
//! [`StreamFramer`], which cuts it into STUN messages and ChannelData frames, and the client pads
//! ChannelData to four bytes as RFC 8656 §12.5 requires on streams.
//!
//! Everything from the network is bounded and counted ([`TurnStats`]); nothing panics on it.

use crate::demux::STUN_MAGIC_COOKIE;
use crate::osn::IceTransport;
use crate::stun::{
    Attributes, Due, Header, Retransmit, STUN_HEADER_LEN, TransactionId, TransactionIds,
    decode_control, describe_error, encode, has_unknown_required, same_address,
};
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::Range;
use std::time::{Duration, Instant};
use stun_codec::rfc5389::attributes::{
    ErrorCode, MessageIntegrity, Nonce, Realm, Username, XorMappedAddress,
};
use stun_codec::rfc5766::attributes::{
    ChannelNumber, Lifetime, RequestedTransport, XorPeerAddress, XorRelayAddress,
};
use stun_codec::rfc5766::methods::{ALLOCATE, CHANNEL_BIND, CREATE_PERMISSION, REFRESH};
use stun_codec::{Message, MessageClass, Method};

/// The attributes the TURN client reads and writes.
mod wire {
    use stun_codec::rfc5389::attributes::{
        ErrorCode, Fingerprint, MessageIntegrity, Nonce, Realm, Software, UnknownAttributes,
        Username, XorMappedAddress,
    };
    use stun_codec::rfc5766::attributes::{
        ChannelNumber, Lifetime, RequestedTransport, XorPeerAddress, XorRelayAddress,
    };

    stun_codec::define_attribute_enums!(
        Attribute,
        AttributeDecoder,
        AttributeEncoder,
        [
            Username,
            MessageIntegrity,
            ErrorCode,
            UnknownAttributes,
            Realm,
            Nonce,
            XorMappedAddress,
            Software,
            Fingerprint,
            ChannelNumber,
            Lifetime,
            XorPeerAddress,
            XorRelayAddress,
            RequestedTransport
        ]
    );
}

/// The first channel number (RFC 8656 §12).
pub const CHANNEL_MIN: u16 = 0x4000;
/// The last channel number: RFC 8656 §12 allows 0x4000..=0x4FFF (RFC 5766 allowed up to 0x7FFE;
/// 0x5000 and above are now reserved).
pub const CHANNEL_MAX: u16 = 0x4FFF;
/// A permission lasts 300 s (RFC 8656 §9); we refresh it this often.
pub const PERMISSION_REFRESH: Duration = Duration::from_secs(240);
/// A channel binding lasts 600 s (RFC 8656 §12); we refresh it this often.
pub const CHANNEL_REFRESH: Duration = Duration::from_secs(480);
/// A channel number unbound, or whose binding failed, is not reused for this long (its binding
/// may live 10 minutes on the server, and RFC 8656 §12 asks for 5 more).
const CHANNEL_COOLDOWN: Duration = Duration::from_secs(900);
/// The allocation lifetime we ask for, and assume when a server gives none.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(DEFAULT_LIFETIME_SECS as u64);
const DEFAULT_LIFETIME_SECS: u32 = 600;
/// Bounds on a lifetime granted by the server.
const MIN_LIFETIME: Duration = Duration::from_secs(30);
const MAX_LIFETIME: Duration = Duration::from_secs(3600);
/// The share of the lifetime after which the allocation is refreshed.
const REFRESH_PERCENT: u32 = 80;
/// The most permissions (peer IP addresses) and channels one allocation keeps.
pub const MAX_PERMISSIONS: usize = 256;
pub const MAX_CHANNELS: usize = 256;
/// Authentication round trips (401 or 438 answers) allowed for one request before it fails.
const MAX_AUTH_ROUNDS: u8 = 4;
/// Finished transactions remembered, so that late answers to their retransmissions are
/// recognised as ours.
const RECENT_TRANSACTIONS: usize = 16;
/// After a 437 to Allocate (an allocation of an earlier run holds our address) and the Refresh
/// that releases it, Allocate is tried again this often (servers delete released allocations on
/// a timer tick, coturn within a second) …
const STALE_RETRY: Duration = Duration::from_secs(1);
/// … this many times, counting the release.
const MAX_STALE_ROUNDS: u8 = 4;
/// REQUESTED-TRANSPORT: UDP.
const PROTOCOL_UDP: u8 = 17;
/// The ChannelData header: channel number and length.
pub const CHANNEL_DATA_HEADER: usize = 4;
/// The most a Send indication or ChannelData adds to a payload (a Send indication to an IPv6
/// peer: header, XOR-PEER-ADDRESS, DATA header and padding). `out` in
/// [`TurnAllocation::encapsulate`] needs the payload's length plus this.
pub const MAX_OVERHEAD: usize = STUN_HEADER_LEN + 4 + 20 + 4 + 3;
/// The largest frame on a stream: a STUN message of the largest length (a multiple of four),
/// 12 bytes longer than ChannelData with the largest payload, padded.
pub const MAX_STREAM_FRAME: usize = STUN_HEADER_LEN + 0xFFFC;
/// The most a [`StreamFramer`] buffers: one unfinished frame and one 64 KiB read.
pub const MAX_STREAM_BUFFER: usize = MAX_STREAM_FRAME + 0x10000;

const XOR_PEER_ADDRESS: u16 = XorPeerAddress::CODEPOINT;
const DATA: u16 = stun_codec::rfc5766::attributes::Data::CODEPOINT;
/// The Send and Data methods (RFC 8656 §18).
const METHOD_SEND: u16 = 0x006;
const METHOD_DATA: u16 = 0x007;
const SEND_INDICATION: u16 = Header::message_type(METHOD_SEND, MessageClass::Indication);
const DATA_INDICATION: u16 = Header::message_type(METHOD_DATA, MessageClass::Indication);

/// Long-term credentials for a TURN server. For `use-auth-secret` servers (TURN REST API) the
/// username is `<expiry unix time>:<name>` and the password base64(HMAC-SHA1(secret, username)).
#[derive(Clone, PartialEq, Eq)]
pub struct TurnCredentials {
    pub username: String,
    pub password: String,
}

impl fmt::Debug for TurnCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TurnCredentials")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// Where an allocation stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TurnState {
    /// Allocate sent (the 401 exchange included); no relayed address yet.
    Allocating,
    /// The server relays for us: see [`TurnAllocation::relayed_address`].
    Allocated,
    /// [`TurnAllocation::release`] sent a Refresh with lifetime 0.
    Releasing,
    /// Released, or never allocated when release was asked for.
    Released,
    /// Gone for good; the reason says why. A new allocation needs a new [`TurnAllocation`].
    Failed { reason: String },
}

impl fmt::Display for TurnState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TurnState::Allocating => f.write_str("allocating"),
            TurnState::Allocated => f.write_str("allocated"),
            TurnState::Releasing => f.write_str("releasing"),
            TurnState::Released => f.write_str("released"),
            TurnState::Failed { reason } => write!(f, "failed: {reason}"),
        }
    }
}

/// What a [`TurnAllocation`] reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TurnEvent {
    /// The server allocated `relayed` (a relayed candidate) and saw us as `mapped` (a
    /// server-reflexive candidate), when it said.
    Allocated {
        relayed: SocketAddr,
        mapped: Option<SocketAddr>,
    },
    /// The allocation failed or was lost.
    Failed { reason: String },
    /// The server refused or did not answer a permission for `peer`.
    PermissionFailed { peer: IpAddr, reason: String },
    /// Data to `peer` now goes through `channel`.
    ChannelBound { peer: SocketAddr, channel: u16 },
    /// The server refused or did not answer a channel binding for `peer`.
    ChannelFailed { peer: SocketAddr, reason: String },
    /// The allocation is released.
    Released,
}

/// What a [`TurnAllocation`] counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TurnStats {
    /// Requests sent, retransmissions included.
    pub transmits: u64,
    pub retransmissions: u64,
    /// Answers to our requests.
    pub responses: u64,
    /// Payloads from peers passed on, and sent to peers.
    pub data_in: u64,
    pub data_out: u64,
    /// Messages from the server that could not be parsed, or broke the rules.
    pub malformed: u64,
    /// Answers to authenticated requests whose MESSAGE-INTEGRITY is missing or wrong.
    pub integrity_failures: u64,
    /// ChannelData on a channel we did not bind.
    pub unknown_channel: u64,
    /// Data indications from a peer we gave no permission.
    pub no_permission: u64,
}

/// What [`TurnAllocation::handle_input`] made of a datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TurnInput {
    /// Not from this allocation's server, or not a message of ours: try someone else.
    NotOurs,
    /// Consumed here: an answer to one of our requests, or something dropped and counted.
    Handled,
    /// Data from `peer`, at `payload` in the datagram; the allocation's relayed address is
    /// where it arrived.
    Data {
        peer: SocketAddr,
        payload: Range<usize>,
    },
}

/// Why a call on a [`TurnAllocation`] could not be carried out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TurnError {
    #[error("the TURN allocation is not (or no longer) allocated")]
    NotAllocated,
    #[error("the TURN allocation has failed or is released")]
    Closed,
    #[error("too many TURN peers (at most {MAX_PERMISSIONS} permissions, {MAX_CHANNELS} channels)")]
    TooManyPeers,
    #[error("the peer's address family differs from the relayed address's")]
    AddressFamily,
    #[error("no permission was asked for this peer")]
    NoPermission,
    #[error("no channel is bound to this peer yet")]
    NoChannel,
    #[error("the payload is larger than TURN can carry")]
    TooLarge,
    #[error("the output buffer is too small")]
    BufferTooSmall,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Request {
    Allocate,
    Refresh {
        lifetime: u32,
    },
    /// Refresh with lifetime 0 of an allocation that a 437 said is in the way.
    ClearStale,
    CreatePermission {
        ip: IpAddr,
    },
    ChannelBind {
        peer: SocketAddr,
        channel: u16,
    },
}

impl Request {
    fn method(self) -> Method {
        match self {
            Request::Allocate => ALLOCATE,
            Request::Refresh { .. } | Request::ClearStale => REFRESH,
            Request::CreatePermission { .. } => CREATE_PERMISSION,
            Request::ChannelBind { .. } => CHANNEL_BIND,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Request::Allocate => "Allocate",
            Request::Refresh { .. } | Request::ClearStale => "Refresh",
            Request::CreatePermission { .. } => "CreatePermission",
            Request::ChannelBind { .. } => "ChannelBind",
        }
    }
}

/// What a request was authenticated with, to check the answer's integrity. Its `Debug` leaves
/// the password out.
#[derive(Clone)]
struct Key {
    username: Username,
    realm: Realm,
    password: String,
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Key")
            .field("username", &self.username)
            .field("realm", &self.realm)
            .field("password", &"<redacted>")
            .finish()
    }
}

#[derive(Debug, Clone)]
struct Transaction {
    id: TransactionId,
    request: Request,
    bytes: Vec<u8>,
    retransmit: Retransmit,
    unsent: bool,
    key: Option<Key>,
    /// 401 and 438 answers so far in this request's chain.
    auth_rounds: u8,
}

#[derive(Debug, Clone)]
struct Permission {
    /// When to refresh; `None` until the server has installed it.
    refresh_at: Option<Instant>,
    in_flight: bool,
}

#[derive(Debug, Clone)]
struct Channel {
    number: u16,
    refresh_at: Option<Instant>,
    in_flight: bool,
}

/// A TURN allocation on one server, over one transport.
#[derive(Debug, Clone)]
pub struct TurnAllocation {
    server: SocketAddr,
    transport: IceTransport,
    username: Result<Username, String>,
    password: String,
    ids: TransactionIds,
    /// REALM and NONCE from the server's last 401 or 438.
    auth: Option<(Realm, Nonce)>,
    state: TurnState,
    relayed: Option<SocketAddr>,
    mapped: Option<SocketAddr>,
    refresh_at: Option<Instant>,
    expires_at: Option<Instant>,
    transactions: Vec<Transaction>,
    recent: VecDeque<TransactionId>,
    permissions: HashMap<IpAddr, Permission>,
    channels: HashMap<SocketAddr, Channel>,
    channel_peers: HashMap<u16, SocketAddr>,
    cooldown: HashMap<u16, Instant>,
    next_channel: u16,
    /// 437 answers to Allocate so far: the first makes us release the stale allocation.
    stale_rounds: u8,
    /// When to send Allocate again after a 437.
    allocate_at: Option<Instant>,
    events: VecDeque<TurnEvent>,
    stats: TurnStats,
}

impl TurnAllocation {
    /// An allocation on `server`, reached over `transport`, whose first Allocate request goes
    /// out at once (see [`TurnAllocation::poll_transmit`]). `seed` must be secret and random,
    /// and differ between clients: transaction IDs derive from it.
    pub fn new(
        server: SocketAddr,
        transport: IceTransport,
        credentials: TurnCredentials,
        now: Instant,
        seed: u64,
    ) -> Self {
        let mut allocation = TurnAllocation {
            server,
            transport,
            username: checked_username(server, credentials.username),
            password: credentials.password,
            ids: TransactionIds::new(seed, &format!("turn {transport:?} {server}")),
            auth: None,
            state: TurnState::Allocating,
            relayed: None,
            mapped: None,
            refresh_at: None,
            expires_at: None,
            transactions: Vec::new(),
            recent: VecDeque::new(),
            permissions: HashMap::new(),
            channels: HashMap::new(),
            channel_peers: HashMap::new(),
            cooldown: HashMap::new(),
            next_channel: CHANNEL_MIN,
            stale_rounds: 0,
            allocate_at: None,
            events: VecDeque::new(),
            stats: TurnStats::default(),
        };
        if let Err(reason) = &allocation.username {
            let reason = reason.clone();
            allocation.fail(reason);
        } else {
            allocation.send(now, Request::Allocate, 0);
        }
        allocation
    }

    pub fn server(&self) -> SocketAddr {
        self.server
    }

    pub fn transport(&self) -> IceTransport {
        self.transport
    }

    pub fn state(&self) -> &TurnState {
        &self.state
    }

    /// The relayed transport address (XOR-RELAYED-ADDRESS), while allocated.
    pub fn relayed_address(&self) -> Option<SocketAddr> {
        self.relayed.filter(|_| self.state == TurnState::Allocated)
    }

    /// Our address as the server saw it (XOR-MAPPED-ADDRESS of the Allocate answer).
    pub fn mapped_address(&self) -> Option<SocketAddr> {
        self.mapped
    }

    pub fn stats(&self) -> TurnStats {
        self.stats
    }

    /// Whether a STUN message with this transaction ID answers one of our requests.
    pub fn owns_transaction(&self, id: &TransactionId) -> bool {
        self.transactions.iter().any(|t| t.id == *id) || self.recent.contains(id)
    }

    /// New credentials (time-limited ones are renewed before they expire); the next request
    /// uses them.
    pub fn set_credentials(&mut self, credentials: TurnCredentials) {
        self.username = checked_username(self.server, credentials.username);
        self.password = credentials.password;
    }

    /// Asks the server to let `peer` send to us and us to it, and keeps the permission
    /// refreshed until [`TurnAllocation::remove_permission`]. Before the allocation exists the
    /// request waits for it. Permissions are per IP address (RFC 8656 §9).
    pub fn create_permission(&mut self, now: Instant, peer: IpAddr) -> Result<(), TurnError> {
        self.check_open()?;
        self.check_family(peer)?;
        if self.permissions.contains_key(&peer) {
            return Ok(());
        }
        if self.permissions.len() >= MAX_PERMISSIONS {
            return Err(TurnError::TooManyPeers);
        }
        self.permissions.insert(
            peer,
            Permission {
                refresh_at: None,
                in_flight: false,
            },
        );
        if self.state == TurnState::Allocated {
            self.send_permission(now, peer);
        }
        Ok(())
    }

    /// Stops refreshing the permission for `peer` and unbinds its channels (the server lets
    /// them expire).
    pub fn remove_permission(&mut self, now: Instant, peer: IpAddr) {
        self.permissions.remove(&peer);
        let gone: Vec<SocketAddr> = self
            .channels
            .keys()
            .filter(|p| p.ip() == peer)
            .copied()
            .collect();
        for peer in gone {
            self.unbind(now, peer);
        }
        self.transactions.retain(|t| match t.request {
            Request::CreatePermission { ip } => ip != peer,
            Request::ChannelBind { peer: p, .. } => p.ip() != peer,
            _ => true,
        });
    }

    /// Binds a channel to `peer` (and asks for its permission), so that data to and from it
    /// travels as ChannelData, 4 bytes of overhead instead of 36 or more. Refreshed until
    /// [`TurnAllocation::remove_permission`] for its address.
    pub fn bind_channel(&mut self, now: Instant, peer: SocketAddr) -> Result<(), TurnError> {
        self.check_open()?;
        self.check_family(peer.ip())?;
        if self.channels.contains_key(&peer) {
            return Ok(());
        }
        if self.channels.len() >= MAX_CHANNELS {
            return Err(TurnError::TooManyPeers);
        }
        self.create_permission(now, peer.ip())?;
        self.cooldown.retain(|_, until| *until > now);
        let Some(number) = self.free_channel() else {
            return Err(TurnError::TooManyPeers);
        };
        self.channels.insert(
            peer,
            Channel {
                number,
                refresh_at: None,
                in_flight: false,
            },
        );
        self.channel_peers.insert(number, peer);
        if self.state == TurnState::Allocated {
            self.send_channel_bind(now, peer);
        }
        Ok(())
    }

    /// The channel bound to `peer`, once the server confirmed it.
    pub fn channel(&self, peer: SocketAddr) -> Option<u16> {
        self.channels
            .get(&peer)
            .filter(|c| c.refresh_at.is_some())
            .map(|c| c.number)
    }

    /// Whether the server confirmed the permission for `peer`.
    pub fn has_permission(&self, peer: IpAddr) -> bool {
        self.permissions
            .get(&peer)
            .is_some_and(|p| p.refresh_at.is_some())
    }

    /// Writes `payload` for `peer` into `out`, ready to send to the server: ChannelData once a
    /// channel is bound (padded to 4 bytes on a stream), a Send indication before. Returns the
    /// length written. `out` needs `payload.len() + MAX_OVERHEAD` bytes.
    pub fn encapsulate(
        &mut self,
        peer: SocketAddr,
        payload: &[u8],
        out: &mut [u8],
    ) -> Result<usize, TurnError> {
        if self.state != TurnState::Allocated {
            return Err(TurnError::NotAllocated);
        }
        if !self.permissions.contains_key(&peer.ip()) {
            return Err(TurnError::NoPermission);
        }
        u16::try_from(payload.len()).map_err(|_| TurnError::TooLarge)?;
        let written = match self.channel(peer) {
            Some(channel) => {
                let end = CHANNEL_DATA_HEADER + payload.len();
                out.get_mut(CHANNEL_DATA_HEADER..end)
                    .ok_or(TurnError::BufferTooSmall)?
                    .copy_from_slice(payload);
                self.write_channel_data(channel, out, payload.len())?
            }
            None => {
                let id = self.ids.next_id();
                write_send_indication(id, peer, payload, out)?
            }
        };
        self.stats.data_out += 1;
        Ok(written)
    }

    /// Whether data for `peer` goes out as ChannelData, which [`TurnAllocation::frame_in_place`]
    /// can write around a payload where it lies.
    pub fn frames_in_place(&self, peer: SocketAddr) -> bool {
        self.state == TurnState::Allocated && self.channel(peer).is_some()
    }

    /// Makes ChannelData for `peer` of the `len` bytes at `buf[CHANNEL_DATA_HEADER..]`, without
    /// moving them: writes the header in front and, on a stream, the padding after. Returns the
    /// frame's length. Needs a bound channel ([`TurnAllocation::frames_in_place`]); otherwise
    /// use [`TurnAllocation::encapsulate`].
    pub fn frame_in_place(
        &mut self,
        peer: SocketAddr,
        buf: &mut [u8],
        len: usize,
    ) -> Result<usize, TurnError> {
        if self.state != TurnState::Allocated {
            return Err(TurnError::NotAllocated);
        }
        let channel = self.channel(peer).ok_or(TurnError::NoChannel)?;
        let written = self.write_channel_data(channel, buf, len)?;
        self.stats.data_out += 1;
        Ok(written)
    }

    /// Writes the ChannelData header for the `len` payload bytes that follow it in `frame`, and
    /// the padding a stream needs.
    fn write_channel_data(
        &self,
        channel: u16,
        frame: &mut [u8],
        len: usize,
    ) -> Result<usize, TurnError> {
        let length = u16::try_from(len).map_err(|_| TurnError::TooLarge)?;
        let end = CHANNEL_DATA_HEADER + len;
        let padded = if self.is_stream() {
            end.next_multiple_of(4)
        } else {
            end
        };
        let frame = frame.get_mut(..padded).ok_or(TurnError::BufferTooSmall)?;
        frame[..2].copy_from_slice(&channel.to_be_bytes());
        frame[2..4].copy_from_slice(&length.to_be_bytes());
        frame[end..].fill(0);
        Ok(padded)
    }

    /// A datagram (or a frame from a [`StreamFramer`]) that arrived from `from`.
    pub fn handle_input(&mut self, now: Instant, from: SocketAddr, datagram: &[u8]) -> TurnInput {
        if !same_address(from, self.server) {
            return TurnInput::NotOurs;
        }
        match datagram.first() {
            Some(0x40..=0x7F) => self.channel_data(datagram),
            Some(0x00..=0x3F) => self.stun_input(now, datagram),
            _ => TurnInput::NotOurs,
        }
    }

    /// When [`TurnAllocation::handle_timeout`] wants to run next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let transactions = self.transactions.iter().map(|t| t.retransmit.deadline());
        let mut next = transactions.min();
        let mut consider = |at: Option<Instant>| {
            if let Some(at) = at {
                next = Some(next.map_or(at, |n| n.min(at)));
            }
        };
        consider(self.allocate_at);
        if self.state == TurnState::Allocated {
            consider(self.refresh_at);
            consider(self.expires_at);
            for p in self.permissions.values().filter(|p| !p.in_flight) {
                consider(p.refresh_at);
            }
            for c in self.channels.values().filter(|c| !c.in_flight) {
                consider(c.refresh_at);
            }
        }
        next
    }

    /// Retransmits, gives up on requests, and refreshes the allocation, permissions and
    /// channels, as the time says.
    pub fn handle_timeout(&mut self, now: Instant) {
        let mut expired = Vec::new();
        for t in &mut self.transactions {
            if now < t.retransmit.deadline() {
                continue;
            }
            match t.retransmit.fire(now) {
                Due::Send => {
                    t.unsent = true;
                    self.stats.retransmissions += 1;
                }
                Due::GiveUp => expired.push((t.id, t.request, t.retransmit.transmits())),
            }
        }
        for (id, request, transmits) in expired {
            self.finish(id);
            let reason = format!(
                "TURN server {} did not answer {} ({transmits} transmissions)",
                self.server,
                request.name()
            );
            self.request_failed(now, request, reason);
        }
        if self.allocate_at.is_some_and(|at| now >= at) {
            self.allocate_at = None;
            self.send(now, Request::Allocate, 0);
        }
        if self.state != TurnState::Allocated {
            return;
        }
        if self.expires_at.is_some_and(|at| now >= at) {
            self.fail(format!(
                "the allocation on {} expired before a Refresh succeeded",
                self.server
            ));
            return;
        }
        let refreshing = self
            .transactions
            .iter()
            .any(|t| matches!(t.request, Request::Refresh { .. }));
        if !refreshing && self.refresh_at.is_some_and(|at| now >= at) {
            let lifetime = DEFAULT_LIFETIME_SECS;
            self.send(now, Request::Refresh { lifetime }, 0);
        }
        let permissions: Vec<IpAddr> = self
            .permissions
            .iter()
            .filter(|(_, p)| !p.in_flight && p.refresh_at.is_some_and(|at| now >= at))
            .map(|(ip, _)| *ip)
            .collect();
        for ip in permissions {
            self.send_permission(now, ip);
        }
        let channels: Vec<SocketAddr> = self
            .channels
            .iter()
            .filter(|(_, c)| !c.in_flight && c.refresh_at.is_some_and(|at| now >= at))
            .map(|(peer, _)| *peer)
            .collect();
        for peer in channels {
            self.send_channel_bind(now, peer);
        }
    }

    /// The next request to send: `(server, message)`.
    pub fn poll_transmit(&mut self) -> Option<(SocketAddr, Vec<u8>)> {
        let t = self.transactions.iter_mut().find(|t| t.unsent)?;
        t.unsent = false;
        self.stats.transmits += 1;
        Some((self.server, t.bytes.clone()))
    }

    pub fn poll_event(&mut self) -> Option<TurnEvent> {
        self.events.pop_front()
    }

    /// Gives the allocation back (Refresh with lifetime 0), for shutdown. Further requests and
    /// data are refused; the state becomes [`TurnState::Released`] when the server answers or
    /// the request times out.
    pub fn release(&mut self, now: Instant) {
        match self.state {
            TurnState::Allocated => {
                self.clear();
                self.state = TurnState::Releasing;
                self.send(now, Request::Refresh { lifetime: 0 }, 0);
            }
            TurnState::Allocating => self.released(),
            TurnState::Releasing | TurnState::Released | TurnState::Failed { .. } => {}
        }
    }

    fn is_stream(&self) -> bool {
        self.transport != IceTransport::Udp
    }

    fn check_open(&self) -> Result<(), TurnError> {
        match self.state {
            TurnState::Allocating | TurnState::Allocated => Ok(()),
            _ => Err(TurnError::Closed),
        }
    }

    fn check_family(&self, peer: IpAddr) -> Result<(), TurnError> {
        match self.relayed {
            Some(relayed) if relayed.is_ipv4() != peer.to_canonical().is_ipv4() => {
                Err(TurnError::AddressFamily)
            }
            _ => Ok(()),
        }
    }

    fn free_channel(&mut self) -> Option<u16> {
        for _ in CHANNEL_MIN..=CHANNEL_MAX {
            let number = self.next_channel;
            self.next_channel = if number == CHANNEL_MAX {
                CHANNEL_MIN
            } else {
                number + 1
            };
            if !self.channel_peers.contains_key(&number) && !self.cooldown.contains_key(&number) {
                return Some(number);
            }
        }
        None
    }

    fn unbind(&mut self, now: Instant, peer: SocketAddr) {
        if let Some(channel) = self.channels.remove(&peer) {
            self.channel_peers.remove(&channel.number);
            self.cooldown.insert(channel.number, now + CHANNEL_COOLDOWN);
        }
    }

    fn send_permission(&mut self, now: Instant, ip: IpAddr) {
        if let Some(p) = self.permissions.get_mut(&ip) {
            p.in_flight = true;
            self.send(now, Request::CreatePermission { ip }, 0);
        }
    }

    fn send_channel_bind(&mut self, now: Instant, peer: SocketAddr) {
        if let Some(c) = self.channels.get_mut(&peer) {
            c.in_flight = true;
            let channel = c.number;
            self.send(now, Request::ChannelBind { peer, channel }, 0);
        }
    }

    /// Builds `request` (authenticated when the server told us REALM and NONCE) and queues it.
    fn send(&mut self, now: Instant, request: Request, auth_rounds: u8) {
        let id = self.ids.next_id();
        let mut message =
            Message::<wire::Attribute>::new(MessageClass::Request, request.method(), id);
        match request {
            Request::Allocate => message.add_attribute(RequestedTransport::new(PROTOCOL_UDP)),
            Request::Refresh { lifetime } => message.add_attribute(Lifetime::from_u32(lifetime)),
            Request::ClearStale => message.add_attribute(Lifetime::from_u32(0)),
            Request::CreatePermission { ip } => {
                message.add_attribute(XorPeerAddress::new(SocketAddr::new(ip, 0)));
            }
            Request::ChannelBind { peer, channel } => {
                if let Ok(number) = ChannelNumber::new(channel) {
                    message.add_attribute(number);
                }
                message.add_attribute(XorPeerAddress::new(peer));
            }
        }
        let key = match (&self.username, &self.auth) {
            (Ok(username), Some((realm, nonce))) => {
                message.add_attribute(username.clone());
                message.add_attribute(realm.clone());
                message.add_attribute(nonce.clone());
                let integrity = MessageIntegrity::new_long_term_credential(
                    &message,
                    username,
                    realm,
                    &self.password,
                );
                match integrity {
                    Ok(integrity) => message.add_attribute(integrity),
                    Err(e) => tracing::error!(error = %e, "cannot sign a TURN request"),
                }
                Some(Key {
                    username: username.clone(),
                    realm: realm.clone(),
                    password: self.password.clone(),
                })
            }
            _ => None,
        };
        let mut retransmit = Retransmit::new(now, self.is_stream());
        retransmit.fire(now);
        self.transactions.push(Transaction {
            id,
            request,
            bytes: encode(message),
            retransmit,
            unsent: true,
            key,
            auth_rounds,
        });
    }

    /// Forgets a transaction, remembering its ID for late answers.
    fn finish(&mut self, id: TransactionId) -> Option<Transaction> {
        let index = self.transactions.iter().position(|t| t.id == id)?;
        if self.recent.len() >= RECENT_TRANSACTIONS {
            self.recent.pop_front();
        }
        self.recent.push_back(id);
        Some(self.transactions.remove(index))
    }

    fn channel_data(&mut self, datagram: &[u8]) -> TurnInput {
        let Some(&[c0, c1, l0, l1]) = datagram.get(..CHANNEL_DATA_HEADER) else {
            self.stats.malformed += 1;
            return TurnInput::Handled;
        };
        let end = CHANNEL_DATA_HEADER + usize::from(u16::from_be_bytes([l0, l1]));
        // Over UDP the padding is optional (RFC 8656 §12.5); never more than three bytes.
        if datagram.len() < end || datagram.len() > end.next_multiple_of(4) {
            self.stats.malformed += 1;
            return TurnInput::Handled;
        }
        match self.channel_peers.get(&u16::from_be_bytes([c0, c1])) {
            Some(&peer) => {
                self.stats.data_in += 1;
                TurnInput::Data {
                    peer,
                    payload: CHANNEL_DATA_HEADER..end,
                }
            }
            None => {
                self.stats.unknown_channel += 1;
                TurnInput::Handled
            }
        }
    }

    fn stun_input(&mut self, now: Instant, message: &[u8]) -> TurnInput {
        let Some(header) = Header::parse(message) else {
            self.stats.malformed += 1;
            return TurnInput::Handled;
        };
        if header.message_type == DATA_INDICATION {
            return self.data_indication(&header, message);
        }
        if !self.owns_transaction(&header.transaction_id) {
            return TurnInput::NotOurs;
        }
        self.response(now, header.transaction_id, message);
        TurnInput::Handled
    }

    fn data_indication(&mut self, header: &Header, message: &[u8]) -> TurnInput {
        let mut peer = None;
        let mut data = None;
        for attribute in Attributes::new(message) {
            let Ok(attribute) = attribute else {
                self.stats.malformed += 1;
                return TurnInput::Handled;
            };
            let value = &message[attribute.value.clone()];
            match attribute.kind {
                XOR_PEER_ADDRESS if peer.is_none() => {
                    peer = xor_address(value, &header.transaction_id);
                    if peer.is_none() {
                        self.stats.malformed += 1;
                        return TurnInput::Handled;
                    }
                }
                DATA if data.is_none() => data = Some(attribute.value),
                XOR_PEER_ADDRESS | DATA => {}
                kind if kind < 0x8000 => {
                    // An unknown comprehension-required attribute.
                    self.stats.malformed += 1;
                    return TurnInput::Handled;
                }
                _ => {}
            }
        }
        let (Some(peer), Some(payload)) = (peer, data) else {
            self.stats.malformed += 1;
            return TurnInput::Handled;
        };
        if !self.permissions.contains_key(&peer.ip()) {
            self.stats.no_permission += 1;
            return TurnInput::Handled;
        }
        self.stats.data_in += 1;
        TurnInput::Data { peer, payload }
    }

    fn response(&mut self, now: Instant, id: TransactionId, bytes: &[u8]) {
        let Some(t) = self.transactions.iter().find(|t| t.id == id) else {
            // A late answer to a retransmission of a finished transaction.
            return;
        };
        let (request, key, auth_rounds) = (t.request, t.key.clone(), t.auth_rounds);
        let Some(message) = decode_control::<wire::Attribute>(bytes) else {
            self.stats.malformed += 1;
            return;
        };
        let class = message.class();
        if message.method() != request.method()
            || !matches!(
                class,
                MessageClass::SuccessResponse | MessageClass::ErrorResponse
            )
        {
            self.stats.malformed += 1;
            return;
        }
        let integrity = message.get_attribute::<MessageIntegrity>();
        let genuine = match (&key, integrity) {
            (Some(key), Some(integrity)) => integrity
                .check_long_term_credential(&key.username, &key.realm, &key.password)
                .is_ok(),
            // Answers to authenticated requests must prove they come from the server; error
            // answers to those need not (a 401 or 438 cannot), but are checked when they try.
            (Some(_), None) => class == MessageClass::ErrorResponse,
            (None, _) => true,
        };
        if !genuine {
            self.stats.integrity_failures += 1;
            return;
        }
        if class == MessageClass::SuccessResponse && has_unknown_required(&message) {
            self.stats.malformed += 1;
            return;
        }
        let error = match class {
            MessageClass::ErrorResponse => {
                let Some(error) = message.get_attribute::<ErrorCode>().cloned() else {
                    self.stats.malformed += 1;
                    return;
                };
                Some(error)
            }
            _ => None,
        };
        self.finish(id);
        self.stats.responses += 1;
        match error {
            None => self.succeeded(now, request, &message),
            Some(error) => self.refused(now, request, key.is_some(), auth_rounds, &error, &message),
        }
    }

    fn succeeded(&mut self, now: Instant, request: Request, message: &Message<wire::Attribute>) {
        let lifetime = message
            .get_attribute::<Lifetime>()
            .map_or(DEFAULT_LIFETIME, Lifetime::lifetime);
        match request {
            Request::Allocate => {
                let Some(relayed) = message.get_attribute::<XorRelayAddress>() else {
                    self.fail(format!(
                        "TURN server {} allocated without telling the relayed address",
                        self.server
                    ));
                    return;
                };
                let relayed = relayed.address();
                let mapped = message
                    .get_attribute::<XorMappedAddress>()
                    .map(XorMappedAddress::address);
                tracing::info!(server = %self.server, %relayed, ?mapped, ?lifetime, "TURN allocation");
                self.relayed = Some(relayed);
                self.mapped = mapped;
                self.state = TurnState::Allocated;
                self.schedule_refresh(now, lifetime);
                self.events
                    .push_back(TurnEvent::Allocated { relayed, mapped });
                // Permissions and channels asked for while allocating; those of the wrong
                // family fail now.
                let ips: Vec<IpAddr> = self.permissions.keys().copied().collect();
                for ip in ips {
                    if self.check_family(ip).is_ok() {
                        self.send_permission(now, ip);
                    } else {
                        self.permissions.remove(&ip);
                        self.events.push_back(TurnEvent::PermissionFailed {
                            peer: ip,
                            reason: TurnError::AddressFamily.to_string(),
                        });
                    }
                }
                let peers: Vec<SocketAddr> = self.channels.keys().copied().collect();
                for peer in peers {
                    if self.permissions.contains_key(&peer.ip()) {
                        self.send_channel_bind(now, peer);
                    } else {
                        self.unbind(now, peer);
                    }
                }
            }
            Request::Refresh { lifetime: 0 } => self.released(),
            Request::Refresh { .. } => self.schedule_refresh(now, lifetime),
            Request::ClearStale => self.allocate_at = Some(now + STALE_RETRY),
            Request::CreatePermission { ip } => {
                if let Some(p) = self.permissions.get_mut(&ip) {
                    p.in_flight = false;
                    p.refresh_at = Some(now + PERMISSION_REFRESH);
                }
            }
            Request::ChannelBind { peer, channel } => {
                if let Some(c) = self.channels.get_mut(&peer).filter(|c| c.number == channel) {
                    c.in_flight = false;
                    if c.refresh_at.replace(now + CHANNEL_REFRESH).is_none() {
                        self.events
                            .push_back(TurnEvent::ChannelBound { peer, channel });
                    }
                }
            }
        }
    }

    /// An error answer: authenticate and try again (401, 438), clear a stale allocation (437
    /// to Allocate, once), or fail the request.
    fn refused(
        &mut self,
        now: Instant,
        request: Request,
        authenticated: bool,
        auth_rounds: u8,
        error: &ErrorCode,
        message: &Message<wire::Attribute>,
    ) {
        let realm = message.get_attribute::<Realm>().cloned();
        let nonce = message.get_attribute::<Nonce>().cloned();
        let code = error.code();
        let retry = match code {
            401 | 438 if auth_rounds + 1 >= MAX_AUTH_ROUNDS => false,
            401 => {
                // Without credentials: the challenge. With them: refused, unless the nonce
                // changed under us (servers that answer a stale nonce with 401).
                let new_nonce = nonce.as_ref() != self.auth.as_ref().map(|(_, n)| n);
                realm.is_some() && nonce.is_some() && (!authenticated || new_nonce)
            }
            438 => nonce.is_some(),
            _ => false,
        };
        if retry {
            let realm = realm.or_else(|| self.auth.as_ref().map(|(r, _)| r.clone()));
            if let (Some(realm), Some(nonce)) = (realm, nonce) {
                self.auth = Some((realm, nonce));
                self.send(now, request, auth_rounds + 1);
                return;
            }
        }
        if code == 437 && request == Request::Allocate && self.stale_rounds + 1 < MAX_STALE_ROUNDS {
            // An allocation from an earlier run holds our address: give it back, then allocate
            // once the server has deleted it.
            if self.stale_rounds == 0 {
                tracing::info!(server = %self.server, "TURN server has a stale allocation for our address; releasing it");
                self.send(now, Request::ClearStale, 0);
            } else {
                self.allocate_at = Some(now + STALE_RETRY);
            }
            self.stale_rounds += 1;
            return;
        }
        let reason = match code {
            401 if authenticated => format!(
                "TURN server {} refused the credentials of {:?} ({}): wrong or expired",
                self.server,
                self.username
                    .as_ref()
                    .map(Username::name)
                    .unwrap_or_default(),
                describe_error(error)
            ),
            401 | 438 => format!(
                "TURN server {} keeps asking to authenticate {} ({})",
                self.server,
                request.name(),
                describe_error(error)
            ),
            437 if request == Request::Allocate => format!(
                "TURN server {} still holds an allocation for our address ({}); it expires \
                 within {} s",
                self.server,
                describe_error(error),
                MAX_LIFETIME.as_secs()
            ),
            _ => format!(
                "TURN server {} refused {}: {}",
                self.server,
                request.name(),
                describe_error(error)
            ),
        };
        self.request_failed(now, request, reason);
    }

    /// A request that failed for good.
    fn request_failed(&mut self, now: Instant, request: Request, reason: String) {
        match request {
            Request::Refresh { lifetime: 0 } => self.released(),
            Request::ClearStale => self.allocate_at = Some(now + STALE_RETRY),
            Request::Allocate | Request::Refresh { .. } => self.fail(reason),
            Request::CreatePermission { ip } => {
                tracing::info!(server = %self.server, peer = %ip, %reason, "TURN permission failed");
                if self.permissions.remove(&ip).is_some() {
                    self.events
                        .push_back(TurnEvent::PermissionFailed { peer: ip, reason });
                }
            }
            Request::ChannelBind { peer, channel } => {
                tracing::info!(server = %self.server, %peer, channel, %reason, "TURN channel binding failed");
                if self
                    .channels
                    .get(&peer)
                    .is_some_and(|c| c.number == channel)
                {
                    self.unbind(now, peer);
                    self.events
                        .push_back(TurnEvent::ChannelFailed { peer, reason });
                }
            }
        }
    }

    fn schedule_refresh(&mut self, now: Instant, lifetime: Duration) {
        let lifetime = lifetime.clamp(MIN_LIFETIME, MAX_LIFETIME);
        self.refresh_at = Some(now + lifetime * REFRESH_PERCENT / 100);
        self.expires_at = Some(now + lifetime);
    }

    fn released(&mut self) {
        tracing::info!(server = %self.server, "TURN allocation released");
        self.clear();
        self.state = TurnState::Released;
        self.events.push_back(TurnEvent::Released);
    }

    fn fail(&mut self, reason: String) {
        tracing::warn!(server = %self.server, %reason, "TURN allocation failed");
        self.clear();
        self.state = TurnState::Failed {
            reason: reason.clone(),
        };
        self.events.push_back(TurnEvent::Failed { reason });
    }

    fn clear(&mut self) {
        self.transactions.clear();
        self.permissions.clear();
        self.channels.clear();
        self.channel_peers.clear();
        self.refresh_at = None;
        self.expires_at = None;
        self.allocate_at = None;
    }
}

/// The USERNAME attribute for `username`, or why it cannot be one.
fn checked_username(server: SocketAddr, username: String) -> Result<Username, String> {
    Username::new(username)
        .map_err(|_| format!("the TURN username for {server} is longer than 512 bytes"))
}

/// Writes a Send indication (RFC 8656 §11.1) of `payload` to `peer` into `out`.
fn write_send_indication(
    id: TransactionId,
    peer: SocketAddr,
    payload: &[u8],
    out: &mut [u8],
) -> Result<usize, TurnError> {
    let address_len = if peer.is_ipv4() { 8 } else { 20 };
    let data_end = STUN_HEADER_LEN + 4 + address_len + 4 + payload.len();
    let total = data_end.next_multiple_of(4);
    let length = u16::try_from(total - STUN_HEADER_LEN).map_err(|_| TurnError::TooLarge)?;
    let data_len = u16::try_from(payload.len()).map_err(|_| TurnError::TooLarge)?;
    let out = out.get_mut(..total).ok_or(TurnError::BufferTooSmall)?;
    out[..2].copy_from_slice(&SEND_INDICATION.to_be_bytes());
    out[2..4].copy_from_slice(&length.to_be_bytes());
    out[4..8].copy_from_slice(&STUN_MAGIC_COOKIE);
    out[8..20].copy_from_slice(id.as_bytes());
    let mut at = STUN_HEADER_LEN;
    out[at..at + 2].copy_from_slice(&XOR_PEER_ADDRESS.to_be_bytes());
    out[at + 2..at + 4].copy_from_slice(&(address_len as u16).to_be_bytes());
    at += 4;
    write_xor_address(peer, &id, &mut out[at..at + address_len]);
    at += address_len;
    out[at..at + 2].copy_from_slice(&DATA.to_be_bytes());
    out[at + 2..at + 4].copy_from_slice(&data_len.to_be_bytes());
    at += 4;
    out[at..data_end].copy_from_slice(payload);
    out[data_end..].fill(0);
    Ok(total)
}

/// The XOR mask of an address (RFC 8489 §14.2): the magic cookie, then the transaction ID.
fn xor_mask(id: &TransactionId) -> [u8; 16] {
    let mut mask = [0; 16];
    mask[..4].copy_from_slice(&STUN_MAGIC_COOKIE);
    mask[4..].copy_from_slice(id.as_bytes());
    mask
}

/// Writes an XOR-…-ADDRESS value (8 bytes for IPv4, 20 for IPv6) into `out`, which has that
/// length.
fn write_xor_address(address: SocketAddr, id: &TransactionId, out: &mut [u8]) {
    let mask = xor_mask(id);
    out[0] = 0;
    out[1] = if address.is_ipv4() { 1 } else { 2 };
    let port = address.port() ^ u16::from_be_bytes([mask[0], mask[1]]);
    out[2..4].copy_from_slice(&port.to_be_bytes());
    let octets: &[u8] = match address.ip() {
        IpAddr::V4(ip) => &ip.octets(),
        IpAddr::V6(ip) => &ip.octets(),
    };
    for ((o, a), m) in out[4..].iter_mut().zip(octets).zip(mask) {
        *o = a ^ m;
    }
}

/// Reads an XOR-…-ADDRESS value.
fn xor_address(value: &[u8], id: &TransactionId) -> Option<SocketAddr> {
    let mask = xor_mask(id);
    let (&[_, family, p0, p1], rest) = value.split_first_chunk::<4>()?;
    let port = u16::from_be_bytes([p0 ^ mask[0], p1 ^ mask[1]]);
    let ip = match (family, rest.len()) {
        (1, 4) => {
            let mut octets = [0; 4];
            for ((o, a), m) in octets.iter_mut().zip(rest).zip(mask) {
                *o = a ^ m;
            }
            IpAddr::V4(Ipv4Addr::from(octets))
        }
        (2, 16) => {
            let mut octets = [0; 16];
            for ((o, a), m) in octets.iter_mut().zip(rest).zip(mask) {
                *o = a ^ m;
            }
            IpAddr::V6(Ipv6Addr::from(octets))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// Why a TURN byte stream cannot be read any further; the connection must be closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    #[error("the TURN stream carries something other than STUN or ChannelData")]
    NotTurn,
    #[error("more than {MAX_STREAM_BUFFER} bytes of TURN stream are waiting to be read")]
    Overflow,
}

/// The length of the frame at the start of a TURN byte stream: `Ok(Some((frame, consumed)))`
/// when it is all there (`frame` bytes of message, `consumed` with ChannelData padding),
/// `Ok(None)` when more bytes are needed.
pub fn stream_frame_len(buffer: &[u8]) -> Result<Option<(usize, usize)>, FramingError> {
    let Some(&first) = buffer.first() else {
        return Ok(None);
    };
    match first {
        0x00..=0x3F => {
            if buffer.len() >= 8 && buffer[4..8] != STUN_MAGIC_COOKIE {
                return Err(FramingError::NotTurn);
            }
            let Some(&[_, _, l0, l1]) = buffer.get(..4) else {
                return Ok(None);
            };
            let length = usize::from(u16::from_be_bytes([l0, l1]));
            if length % 4 != 0 {
                return Err(FramingError::NotTurn);
            }
            let frame = STUN_HEADER_LEN + length;
            Ok((buffer.len() >= frame).then_some((frame, frame)))
        }
        0x40..=0x7F => {
            let Some(&[_, _, l0, l1]) = buffer.get(..CHANNEL_DATA_HEADER) else {
                return Ok(None);
            };
            let frame = CHANNEL_DATA_HEADER + usize::from(u16::from_be_bytes([l0, l1]));
            let consumed = frame.next_multiple_of(4);
            Ok((buffer.len() >= consumed).then_some((frame, consumed)))
        }
        _ => Err(FramingError::NotTurn),
    }
}

/// Cuts a TURN byte stream (TCP or TLS, RFC 8656 §12.5) into whole STUN messages and ChannelData
/// frames (without their padding), each to be given to [`TurnAllocation::handle_input`]. Buffers
/// at most [`MAX_STREAM_BUFFER`] bytes: read at most 64 KiB at a time and drain the frames
/// after each read.
#[derive(Debug, Clone, Default)]
pub struct StreamFramer {
    buffer: Vec<u8>,
    start: usize,
    broken: Option<FramingError>,
}

impl StreamFramer {
    pub fn new() -> Self {
        StreamFramer::default()
    }

    /// Appends bytes read from the stream.
    pub fn push(&mut self, bytes: &[u8]) -> Result<(), FramingError> {
        if let Some(e) = self.broken {
            return Err(e);
        }
        self.buffer.drain(..self.start);
        self.start = 0;
        if self.buffer.len() + bytes.len() > MAX_STREAM_BUFFER {
            self.broken = Some(FramingError::Overflow);
            return Err(FramingError::Overflow);
        }
        self.buffer.extend_from_slice(bytes);
        Ok(())
    }

    /// The next whole frame, if it has arrived.
    pub fn next_frame(&mut self) -> Result<Option<&[u8]>, FramingError> {
        if let Some(e) = self.broken {
            return Err(e);
        }
        let rest = &self.buffer[self.start..];
        match stream_frame_len(rest) {
            Ok(Some((frame, consumed))) => {
                let start = self.start;
                self.start += consumed;
                Ok(Some(&self.buffer[start..start + frame]))
            }
            Ok(None) => Ok(None),
            Err(e) => {
                self.broken = Some(e);
                Err(e)
            }
        }
    }

    /// Bytes received but not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buffer.len() - self.start
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stun::STUN_MAX_TRANSMITS;
    use bytecodec::DecodeExt;
    use stun_codec::MessageDecoder;
    use stun_codec::rfc5766::attributes::Data;

    const USER: &str = "1700000000:alice";
    const PASSWORD: &str = "secret-password";

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("address")
    }

    fn server() -> SocketAddr {
        addr("192.0.2.1:3478")
    }

    fn relayed() -> SocketAddr {
        addr("192.0.2.1:50000")
    }

    fn mapped() -> SocketAddr {
        addr("198.51.100.7:40000")
    }

    fn peer() -> SocketAddr {
        addr("203.0.113.5:7000")
    }

    fn credentials(password: &str) -> TurnCredentials {
        TurnCredentials {
            username: USER.to_owned(),
            password: password.to_owned(),
        }
    }

    fn parse(bytes: &[u8]) -> Message<wire::Attribute> {
        MessageDecoder::<wire::Attribute>::new()
            .decode_from_bytes(bytes)
            .expect("decodes")
            .expect("whole")
    }

    /// A TURN server in a test: answers what the client sends.
    struct Server {
        realm: Realm,
        nonce: Nonce,
    }

    impl Server {
        fn new() -> Self {
            Server {
                realm: Realm::new("ipop.test".to_owned()).expect("realm"),
                nonce: Nonce::new("nonce-1".to_owned()).expect("nonce"),
            }
        }

        fn answer(
            &self,
            request: &Message<wire::Attribute>,
            class: MessageClass,
            attributes: Vec<wire::Attribute>,
            password: Option<&str>,
        ) -> Vec<u8> {
            let mut m =
                Message::<wire::Attribute>::new(class, request.method(), request.transaction_id());
            for a in attributes {
                m.add_attribute(a);
            }
            if let Some(password) = password {
                let username = Username::new(USER.to_owned()).expect("username");
                let mi = MessageIntegrity::new_long_term_credential(
                    &m,
                    &username,
                    &self.realm,
                    password,
                )
                .expect("integrity");
                m.add_attribute(mi);
            }
            encode(m)
        }

        fn error(&self, request: &Message<wire::Attribute>, code: u16, auth: bool) -> Vec<u8> {
            let mut attributes: Vec<wire::Attribute> = vec![
                ErrorCode::new(code, "Nope".to_owned())
                    .expect("code")
                    .into(),
            ];
            if auth {
                attributes.push(self.realm.clone().into());
                attributes.push(self.nonce.clone().into());
            }
            self.answer(request, MessageClass::ErrorResponse, attributes, None)
        }

        fn success(
            &self,
            request: &Message<wire::Attribute>,
            attributes: Vec<wire::Attribute>,
        ) -> Vec<u8> {
            self.answer(
                request,
                MessageClass::SuccessResponse,
                attributes,
                Some(PASSWORD),
            )
        }

        /// Checks that `request` is signed with our credentials and the current nonce.
        fn check_signed(&self, request: &Message<wire::Attribute>) {
            let username = request.get_attribute::<Username>().expect("USERNAME");
            assert_eq!(username.name(), USER);
            assert_eq!(request.get_attribute::<Realm>(), Some(&self.realm));
            assert_eq!(request.get_attribute::<Nonce>(), Some(&self.nonce));
            request
                .get_attribute::<MessageIntegrity>()
                .expect("MESSAGE-INTEGRITY")
                .check_long_term_credential(username, &self.realm, PASSWORD)
                .expect("integrity checks out");
        }
    }

    fn next_request(t: &mut TurnAllocation) -> Message<wire::Attribute> {
        let (to, bytes) = t.poll_transmit().expect("a request");
        assert_eq!(to, server());
        parse(&bytes)
    }

    fn deliver(t: &mut TurnAllocation, now: Instant, bytes: &[u8]) {
        assert_eq!(t.handle_input(now, server(), bytes), TurnInput::Handled);
    }

    /// Drives a new allocation through the 401 exchange to Allocated.
    fn allocated(now: Instant, transport: IceTransport) -> (TurnAllocation, Server) {
        let s = Server::new();
        let mut t = TurnAllocation::new(server(), transport, credentials(PASSWORD), now, 42);
        let first = next_request(&mut t);
        assert_eq!(first.method(), ALLOCATE);
        assert_eq!(
            first
                .get_attribute::<RequestedTransport>()
                .map(|r| r.protocol()),
            Some(PROTOCOL_UDP)
        );
        assert!(first.get_attribute::<MessageIntegrity>().is_none());
        deliver(&mut t, now, &s.error(&first, 401, true));
        assert_eq!(*t.state(), TurnState::Allocating);
        let second = next_request(&mut t);
        assert_eq!(second.method(), ALLOCATE);
        s.check_signed(&second);
        deliver(
            &mut t,
            now,
            &s.success(
                &second,
                vec![
                    XorRelayAddress::new(relayed()).into(),
                    XorMappedAddress::new(mapped()).into(),
                    Lifetime::from_u32(600).into(),
                ],
            ),
        );
        assert_eq!(*t.state(), TurnState::Allocated);
        assert_eq!(
            t.poll_event(),
            Some(TurnEvent::Allocated {
                relayed: relayed(),
                mapped: Some(mapped()),
            })
        );
        (t, s)
    }

    /// Answers every pending request of `t` with success.
    fn answer_all(t: &mut TurnAllocation, s: &Server, now: Instant) -> Vec<Method> {
        let mut methods = Vec::new();
        while let Some((_, bytes)) = t.poll_transmit() {
            let request = parse(&bytes);
            s.check_signed(&request);
            methods.push(request.method());
            let lifetime: Vec<wire::Attribute> = if request.method() == REFRESH {
                vec![
                    request
                        .get_attribute::<Lifetime>()
                        .expect("LIFETIME")
                        .clone()
                        .into(),
                ]
            } else {
                Vec::new()
            };
            deliver(t, now, &s.success(&request, lifetime));
        }
        methods
    }

    #[test]
    fn allocates_with_the_401_dance() {
        let t0 = Instant::now();
        let (t, _) = allocated(t0, IceTransport::Udp);
        assert_eq!(t.relayed_address(), Some(relayed()));
        assert_eq!(t.mapped_address(), Some(mapped()));
        assert_eq!(t.stats().responses, 2);
        assert_eq!(t.poll_timeout(), Some(t0 + Duration::from_secs(480)));
    }

    #[test]
    fn stun_datagrams_route_by_transaction_id() {
        let t0 = Instant::now();
        let s = Server::new();
        let mut t = TurnAllocation::new(server(), IceTransport::Udp, credentials(PASSWORD), t0, 1);
        let (_, bytes) = t.poll_transmit().expect("request");
        let id = crate::stun::transaction_id(&bytes).expect("a STUN header");
        assert!(t.owns_transaction(&id));
        deliver(&mut t, t0, &s.error(&parse(&bytes), 401, true));
        assert!(t.owns_transaction(&id), "late answers to it are still ours");
        let binding = crate::stun::StunBinding::new(server(), t0, 1);
        assert!(!binding.owns_transaction(&id));
        let stranger = Message::<wire::Attribute>::new(
            MessageClass::SuccessResponse,
            stun_codec::rfc5389::methods::BINDING,
            TransactionId::new([1; 12]),
        );
        assert_eq!(
            t.handle_input(t0, server(), &encode(stranger)),
            TurnInput::NotOurs,
            "a Binding answer from the same server is someone else's"
        );
    }

    #[test]
    fn an_overlong_username_fails_at_once() {
        let long = TurnCredentials {
            username: "u".repeat(600),
            password: PASSWORD.to_owned(),
        };
        let mut t = TurnAllocation::new(server(), IceTransport::Udp, long, Instant::now(), 1);
        assert!(t.poll_transmit().is_none());
        assert!(
            matches!(t.poll_event(), Some(TurnEvent::Failed { reason }) if reason.contains("512 bytes"))
        );
    }

    #[test]
    fn an_answer_with_wrong_integrity_is_dropped() {
        let t0 = Instant::now();
        let s = Server::new();
        let mut t = TurnAllocation::new(server(), IceTransport::Udp, credentials(PASSWORD), t0, 1);
        let first = next_request(&mut t);
        deliver(&mut t, t0, &s.error(&first, 401, true));
        let second = next_request(&mut t);
        let attributes = vec![wire::Attribute::from(XorRelayAddress::new(relayed()))];
        let forged = s.answer(
            &second,
            MessageClass::SuccessResponse,
            attributes.clone(),
            Some("not the password"),
        );
        deliver(&mut t, t0, &forged);
        let unsigned = s.answer(&second, MessageClass::SuccessResponse, attributes, None);
        deliver(&mut t, t0, &unsigned);
        assert_eq!(t.stats().integrity_failures, 2);
        assert_eq!(*t.state(), TurnState::Allocating);
        deliver(
            &mut t,
            t0,
            &s.success(&second, vec![XorRelayAddress::new(relayed()).into()]),
        );
        assert_eq!(t.relayed_address(), Some(relayed()));
    }

    #[test]
    fn wrong_credentials_fail_after_a_bounded_number_of_tries() {
        let t0 = Instant::now();
        let mut s = Server::new();
        let mut t = TurnAllocation::new(server(), IceTransport::Udp, credentials("wrong"), t0, 1);
        let mut requests = 0;
        while let Some((_, bytes)) = t.poll_transmit() {
            requests += 1;
            // A server that hands out a new nonce with every 401.
            s.nonce = Nonce::new(format!("nonce-{requests}")).expect("nonce");
            deliver(&mut t, t0, &s.error(&parse(&bytes), 401, true));
        }
        assert!(requests <= usize::from(MAX_AUTH_ROUNDS), "{requests}");
        let TurnState::Failed { reason } = t.state() else {
            panic!("{:?}", t.state());
        };
        assert!(reason.contains("refused the credentials"), "{reason}");
        assert!(reason.contains(USER), "{reason}");
        assert!(matches!(t.poll_event(), Some(TurnEvent::Failed { .. })));
        assert_eq!(t.poll_timeout(), None);
    }

    #[test]
    fn a_401_to_signed_request_with_the_same_nonce_fails_at_once() {
        let t0 = Instant::now();
        let s = Server::new();
        let mut t = TurnAllocation::new(server(), IceTransport::Udp, credentials("wrong"), t0, 1);
        let first = next_request(&mut t);
        deliver(&mut t, t0, &s.error(&first, 401, true));
        let second = next_request(&mut t);
        deliver(&mut t, t0, &s.error(&second, 401, true));
        assert!(t.poll_transmit().is_none());
        assert!(matches!(t.state(), TurnState::Failed { .. }));
    }

    #[test]
    fn a_stale_nonce_is_replaced_and_the_request_repeated() {
        let t0 = Instant::now();
        let (mut t, mut s) = allocated(t0, IceTransport::Udp);
        t.create_permission(t0, peer().ip()).expect("permission");
        let request = next_request(&mut t);
        assert_eq!(request.method(), CREATE_PERMISSION);
        s.nonce = Nonce::new("nonce-2".to_owned()).expect("nonce");
        deliver(&mut t, t0, &s.error(&request, 438, true));
        let again = next_request(&mut t);
        assert_eq!(again.method(), CREATE_PERMISSION);
        s.check_signed(&again);
        deliver(&mut t, t0, &s.success(&again, Vec::new()));
        assert!(t.has_permission(peer().ip()));
    }

    #[test]
    fn endless_stale_nonces_fail_the_request() {
        let t0 = Instant::now();
        let (mut t, mut s) = allocated(t0, IceTransport::Udp);
        let t1 = t0 + Duration::from_secs(480);
        t.handle_timeout(t1);
        let mut rounds = 0;
        while let Some((_, bytes)) = t.poll_transmit() {
            rounds += 1;
            s.nonce = Nonce::new(format!("stale-{rounds}")).expect("nonce");
            deliver(&mut t, t1, &s.error(&parse(&bytes), 438, true));
        }
        assert!(rounds <= usize::from(MAX_AUTH_ROUNDS));
        let TurnState::Failed { reason } = t.state() else {
            panic!("{:?}", t.state());
        };
        assert!(reason.contains("keeps asking"), "{reason}");
    }

    #[test]
    fn server_refusals_fail_with_the_code() {
        for code in [403, 486, 442, 508] {
            let t0 = Instant::now();
            let s = Server::new();
            let mut t =
                TurnAllocation::new(server(), IceTransport::Udp, credentials(PASSWORD), t0, 1);
            let first = next_request(&mut t);
            deliver(&mut t, t0, &s.error(&first, 401, true));
            let second = next_request(&mut t);
            deliver(&mut t, t0, &s.error(&second, code, false));
            let TurnState::Failed { reason } = t.state() else {
                panic!("{code}: {:?}", t.state());
            };
            assert!(
                reason.contains(&format!("refused Allocate: {code} Nope")),
                "{reason}"
            );
        }
    }

    #[test]
    fn a_stale_allocation_in_the_way_is_released_and_allocate_retried() {
        let t0 = Instant::now();
        let s = Server::new();
        let mut t = TurnAllocation::new(server(), IceTransport::Udp, credentials(PASSWORD), t0, 1);
        let first = next_request(&mut t);
        deliver(&mut t, t0, &s.error(&first, 401, true));
        let second = next_request(&mut t);
        deliver(&mut t, t0, &s.error(&second, 437, false));
        let clear = next_request(&mut t);
        assert_eq!(clear.method(), REFRESH);
        assert_eq!(
            clear.get_attribute::<Lifetime>().map(Lifetime::lifetime),
            Some(Duration::ZERO)
        );
        s.check_signed(&clear);
        deliver(&mut t, t0, &s.success(&clear, Vec::new()));
        // The server deletes it on a timer: Allocate again a second later, and again while it
        // answers 437, a bounded number of times.
        let mut now = t0;
        let mut allocates = 0;
        loop {
            assert!(t.poll_transmit().is_none(), "nothing before the timer");
            let Some(at) = t.poll_timeout() else { break };
            assert_eq!(at, now + STALE_RETRY);
            now = at;
            t.handle_timeout(now);
            let again = next_request(&mut t);
            assert_eq!(again.method(), ALLOCATE);
            s.check_signed(&again);
            allocates += 1;
            deliver(&mut t, now, &s.error(&again, 437, false));
        }
        assert_eq!(allocates, MAX_STALE_ROUNDS - 1);
        let TurnState::Failed { reason } = t.state() else {
            panic!("{:?}", t.state());
        };
        assert!(reason.contains("still holds an allocation"), "{reason}");
    }

    #[test]
    fn refreshes_at_80_percent_and_fails_when_the_allocation_is_gone() {
        let t0 = Instant::now();
        let (mut t, s) = allocated(t0, IceTransport::Udp);
        t.handle_timeout(t0 + Duration::from_secs(479));
        assert!(t.poll_transmit().is_none());
        let t1 = t0 + Duration::from_secs(480);
        t.handle_timeout(t1);
        let refresh = next_request(&mut t);
        assert_eq!(refresh.method(), REFRESH);
        assert_eq!(
            refresh.get_attribute::<Lifetime>().map(Lifetime::lifetime),
            Some(DEFAULT_LIFETIME)
        );
        s.check_signed(&refresh);
        t.handle_timeout(t1 + Duration::from_millis(100));
        assert!(t.poll_transmit().is_none(), "one Refresh at a time");
        deliver(
            &mut t,
            t1,
            &s.success(&refresh, vec![Lifetime::from_u32(300).into()]),
        );
        assert_eq!(t.poll_timeout(), Some(t1 + Duration::from_secs(240)));

        let t2 = t1 + Duration::from_secs(240);
        t.handle_timeout(t2);
        let refresh = next_request(&mut t);
        deliver(&mut t, t2, &s.error(&refresh, 437, false));
        let TurnState::Failed { reason } = t.state() else {
            panic!("{:?}", t.state());
        };
        assert!(reason.contains("refused Refresh: 437"), "{reason}");
        assert_eq!(t.relayed_address(), None);
    }

    #[test]
    fn an_unanswered_allocate_times_out_with_a_reason() {
        let t0 = Instant::now();
        let mut t = TurnAllocation::new(server(), IceTransport::Udp, credentials(PASSWORD), t0, 1);
        let mut now = t0;
        let mut sent = 0;
        while let Some(at) = t.poll_timeout() {
            now = at;
            t.handle_timeout(now);
            while t.poll_transmit().is_some() {
                sent += 1;
            }
        }
        // The first transmission went out before the loop.
        assert_eq!(sent + 1, STUN_MAX_TRANSMITS);
        assert_eq!(now - t0, Duration::from_millis(39_500));
        let TurnState::Failed { reason } = t.state() else {
            panic!("{:?}", t.state());
        };
        assert!(
            reason.contains("did not answer Allocate (7 transmissions)"),
            "{reason}"
        );
        assert_eq!(t.stats().retransmissions, 6);
    }

    #[test]
    fn over_a_stream_requests_are_sent_once_and_wait_39_5_s() {
        let t0 = Instant::now();
        let mut t = TurnAllocation::new(server(), IceTransport::Tcp, credentials(PASSWORD), t0, 1);
        assert!(t.poll_transmit().is_some());
        assert_eq!(t.poll_timeout(), Some(t0 + Duration::from_millis(39_500)));
        t.handle_timeout(t0 + Duration::from_millis(39_500));
        assert!(t.poll_transmit().is_none());
        assert!(matches!(t.state(), TurnState::Failed { .. }));
    }

    #[test]
    fn permissions_and_channels_asked_early_wait_for_the_allocation_and_are_refreshed() {
        let t0 = Instant::now();
        let s = Server::new();
        let mut t = TurnAllocation::new(server(), IceTransport::Udp, credentials(PASSWORD), t0, 1);
        t.bind_channel(t0, peer()).expect("channel");
        let other = addr("203.0.113.6:1");
        t.create_permission(t0, other.ip()).expect("permission");
        let first = next_request(&mut t);
        assert!(t.poll_transmit().is_none(), "nothing before the allocation");
        deliver(&mut t, t0, &s.error(&first, 401, true));
        let second = next_request(&mut t);
        deliver(
            &mut t,
            t0,
            &s.success(&second, vec![XorRelayAddress::new(relayed()).into()]),
        );
        let mut methods = Vec::new();
        let mut bound = None;
        while let Some((_, bytes)) = t.poll_transmit() {
            let request = parse(&bytes);
            s.check_signed(&request);
            methods.push(request.method());
            if request.method() == CHANNEL_BIND {
                let number = request
                    .get_attribute::<ChannelNumber>()
                    .expect("CHANNEL-NUMBER");
                let to = request.get_attribute::<XorPeerAddress>().expect("peer");
                bound = Some((number.value(), to.address()));
            }
            deliver(&mut t, t0, &s.success(&request, Vec::new()));
        }
        methods.sort();
        assert_eq!(
            methods,
            [CREATE_PERMISSION, CREATE_PERMISSION, CHANNEL_BIND]
        );
        assert_eq!(bound, Some((CHANNEL_MIN, peer())));
        assert!(t.has_permission(peer().ip()) && t.has_permission(other.ip()));
        assert_eq!(t.channel(peer()), Some(CHANNEL_MIN));
        let events: Vec<TurnEvent> = std::iter::from_fn(|| t.poll_event()).collect();
        assert!(events.contains(&TurnEvent::ChannelBound {
            peer: peer(),
            channel: CHANNEL_MIN
        }));

        // Permissions every 240 s, channels every 480 s, the allocation at 480 s.
        let t1 = t0 + PERMISSION_REFRESH;
        t.handle_timeout(t1);
        assert_eq!(
            answer_all(&mut t, &s, t1),
            [CREATE_PERMISSION, CREATE_PERMISSION]
        );
        let t2 = t0 + CHANNEL_REFRESH;
        t.handle_timeout(t2);
        let mut methods = answer_all(&mut t, &s, t2);
        methods.sort();
        assert_eq!(
            methods,
            [REFRESH, CREATE_PERMISSION, CREATE_PERMISSION, CHANNEL_BIND]
        );
        assert_eq!(*t.state(), TurnState::Allocated);
        assert_eq!(
            std::iter::from_fn(|| t.poll_event()).count(),
            0,
            "refreshes are not news"
        );

        // Removing the permission stops the refreshes and unbinds the channel.
        t.remove_permission(t2, peer().ip());
        assert_eq!(t.channel(peer()), None);
        let t3 = t2 + CHANNEL_REFRESH;
        t.handle_timeout(t3);
        let mut methods = answer_all(&mut t, &s, t3);
        methods.sort();
        assert_eq!(methods, [REFRESH, CREATE_PERMISSION]);
    }

    #[test]
    fn a_refused_permission_or_channel_is_reported_and_forgotten() {
        let t0 = Instant::now();
        let (mut t, s) = allocated(t0, IceTransport::Udp);
        t.bind_channel(t0, peer()).expect("channel");
        let permission = next_request(&mut t);
        let bind = next_request(&mut t);
        deliver(&mut t, t0, &s.error(&permission, 403, false));
        deliver(&mut t, t0, &s.error(&bind, 403, false));
        let events: Vec<TurnEvent> = std::iter::from_fn(|| t.poll_event()).collect();
        assert!(
            matches!(&events[..], [TurnEvent::PermissionFailed { reason, .. }, TurnEvent::ChannelFailed { .. }] if reason.contains("403")),
            "{events:?}"
        );
        assert!(!t.has_permission(peer().ip()));
        assert_eq!(t.channel(peer()), None);
        assert_eq!(*t.state(), TurnState::Allocated, "the allocation stays");
        // The refused number is not reused at once.
        t.bind_channel(t0, peer()).expect("channel");
        next_request(&mut t);
        let bind = next_request(&mut t);
        let number = bind.get_attribute::<ChannelNumber>().expect("number");
        assert_eq!(number.value(), CHANNEL_MIN + 1);
    }

    #[test]
    fn peers_are_bounded_and_families_checked() {
        let t0 = Instant::now();
        let (mut t, _) = allocated(t0, IceTransport::Udp);
        assert_eq!(
            t.create_permission(t0, "2001:db8::1".parse().expect("ip")),
            Err(TurnError::AddressFamily)
        );
        for i in 0..MAX_PERMISSIONS {
            let ip = IpAddr::V4(Ipv4Addr::from(0x0A00_0000 + i as u32));
            t.create_permission(t0, ip).expect("room");
        }
        assert_eq!(
            t.create_permission(t0, "203.0.113.200".parse().expect("ip")),
            Err(TurnError::TooManyPeers)
        );
        let known = IpAddr::V4(Ipv4Addr::from(0x0A00_0000));
        assert_eq!(t.create_permission(t0, known), Ok(()), "already there");
    }

    #[test]
    fn data_goes_out_as_send_indications_then_channel_data() {
        let t0 = Instant::now();
        let (mut t, s) = allocated(t0, IceTransport::Udp);
        let mut out = [0u8; 1500];
        assert_eq!(
            t.encapsulate(peer(), b"hello", &mut out),
            Err(TurnError::NoPermission)
        );
        t.bind_channel(t0, peer()).expect("channel");

        // Before the channel is confirmed: a Send indication.
        let n = t.encapsulate(peer(), b"hello", &mut out).expect("send");
        let send = parse(&out[..n]);
        assert_eq!(send.class(), MessageClass::Indication);
        assert_eq!(send.method().as_u16(), METHOD_SEND);
        assert_eq!(
            send.get_attribute::<XorPeerAddress>()
                .map(XorPeerAddress::address),
            Some(peer())
        );
        let message = MessageDecoder::<stun_codec::rfc5766::Attribute>::new()
            .decode_from_bytes(&out[..n])
            .expect("decodes")
            .expect("whole");
        assert_eq!(
            message.get_attribute::<Data>().map(Data::data),
            Some(&b"hello"[..])
        );
        let v6 = addr("[2001:db8::5]:7000");
        let mut big = [0u8; 100];
        let n = write_send_indication(TransactionId::new([1; 12]), v6, &[7; 45], &mut big)
            .expect("fits");
        assert_eq!(n, 45 + MAX_OVERHEAD, "the most overhead");
        assert_eq!(
            parse(&big[..n])
                .get_attribute::<XorPeerAddress>()
                .map(XorPeerAddress::address),
            Some(v6)
        );

        answer_all(&mut t, &s, t0);
        let n = t.encapsulate(peer(), b"hello", &mut out).expect("send");
        assert_eq!(
            &out[..n],
            &[0x40, 0x00, 0x00, 0x05, b'h', b'e', b'l', b'l', b'o']
        );
        assert_eq!(
            t.encapsulate(peer(), b"hello", &mut out[..8]),
            Err(TurnError::BufferTooSmall)
        );
        assert_eq!(
            t.encapsulate(peer(), &vec![0; 70_000], &mut vec![0; 70_100]),
            Err(TurnError::TooLarge)
        );
        assert_eq!(t.stats().data_out, 2, "refusals are not counted as sent");
    }

    #[test]
    fn over_a_stream_channel_data_is_padded() {
        let t0 = Instant::now();
        let (mut t, s) = allocated(t0, IceTransport::Tls);
        t.bind_channel(t0, peer()).expect("channel");
        answer_all(&mut t, &s, t0);
        let mut out = [0xEE; 64];
        let n = t.encapsulate(peer(), b"hello", &mut out).expect("send");
        assert_eq!(
            &out[..n],
            &[0x40, 0, 0, 5, b'h', b'e', b'l', b'l', b'o', 0, 0, 0]
        );
    }

    #[test]
    fn channel_data_is_framed_around_the_payload_where_it_lies() {
        let t0 = Instant::now();
        for (transport, framed) in [
            (
                IceTransport::Udp,
                &[0x40, 0, 0, 5, b'h', b'e', b'l', b'l', b'o'][..],
            ),
            (
                IceTransport::Tcp,
                &[0x40, 0, 0, 5, b'h', b'e', b'l', b'l', b'o', 0, 0, 0][..],
            ),
        ] {
            let (mut t, s) = allocated(t0, transport);
            t.bind_channel(t0, peer()).expect("channel");
            assert!(!t.frames_in_place(peer()), "not before the server confirms");
            let mut buf = [0xEE; 16];
            buf[CHANNEL_DATA_HEADER..CHANNEL_DATA_HEADER + 5].copy_from_slice(b"hello");
            assert_eq!(
                t.frame_in_place(peer(), &mut buf, 5),
                Err(TurnError::NoChannel)
            );
            answer_all(&mut t, &s, t0);
            assert!(t.frames_in_place(peer()));
            let n = t.frame_in_place(peer(), &mut buf, 5).expect("framed");
            assert_eq!(&buf[..n], framed, "{transport:?}");
            assert_eq!(
                t.frame_in_place(peer(), &mut buf[..8], 5),
                Err(TurnError::BufferTooSmall)
            );
            assert_eq!(t.stats().data_out, 1);
        }
    }

    #[test]
    fn data_from_peers_is_decoded_in_place() {
        let t0 = Instant::now();
        let (mut t, s) = allocated(t0, IceTransport::Udp);
        t.bind_channel(t0, peer()).expect("channel");
        answer_all(&mut t, &s, t0);

        let frame = [0x40, 0x00, 0x00, 0x03, 1, 2, 3];
        assert_eq!(
            t.handle_input(t0, server(), &frame),
            TurnInput::Data {
                peer: peer(),
                payload: 4..7
            }
        );
        let padded = [0x40, 0x00, 0x00, 0x03, 1, 2, 3, 0];
        assert!(matches!(
            t.handle_input(t0, server(), &padded),
            TurnInput::Data { .. }
        ));
        // Not from the server: someone else's business.
        assert_eq!(t.handle_input(t0, peer(), &frame), TurnInput::NotOurs);
        // Unknown channel, short, overlong.
        deliver(&mut t, t0, &[0x40, 0x01, 0x00, 0x03, 1, 2, 3]);
        deliver(&mut t, t0, &[0x40, 0x00, 0x00, 0x09, 1, 2, 3]);
        deliver(&mut t, t0, &[0x40, 0x00]);
        deliver(&mut t, t0, &[0x40, 0x00, 0x00, 0x01, 1, 0, 0, 0, 0]);
        assert_eq!(t.stats().unknown_channel, 1);
        assert_eq!(t.stats().malformed, 3);

        // A Data indication.
        let mut indication = Message::<stun_codec::rfc5766::Attribute>::new(
            MessageClass::Indication,
            stun_codec::rfc5766::methods::DATA,
            TransactionId::new([3; 12]),
        );
        indication.add_attribute(XorPeerAddress::new(addr("203.0.113.5:9999")));
        indication.add_attribute(Data::new(b"payload".to_vec()).expect("data"));
        let bytes = encode(indication);
        let TurnInput::Data {
            peer: from,
            payload,
        } = t.handle_input(t0, server(), &bytes)
        else {
            panic!("data");
        };
        assert_eq!(
            from,
            addr("203.0.113.5:9999"),
            "any port of a permitted address"
        );
        assert_eq!(&bytes[payload], b"payload");

        // From an address without permission.
        let mut stranger = Message::<stun_codec::rfc5766::Attribute>::new(
            MessageClass::Indication,
            stun_codec::rfc5766::methods::DATA,
            TransactionId::new([4; 12]),
        );
        stranger.add_attribute(XorPeerAddress::new(addr("198.51.100.99:1")));
        stranger.add_attribute(Data::new(b"x".to_vec()).expect("data"));
        deliver(&mut t, t0, &encode(stranger));
        assert_eq!(t.stats().no_permission, 1);
        assert_eq!(t.stats().data_in, 3);
    }

    #[test]
    fn release_sends_a_zero_lifetime_refresh() {
        let t0 = Instant::now();
        let (mut t, s) = allocated(t0, IceTransport::Udp);
        t.bind_channel(t0, peer()).expect("channel");
        answer_all(&mut t, &s, t0);
        t.release(t0);
        t.release(t0);
        assert_eq!(*t.state(), TurnState::Releasing);
        let refresh = next_request(&mut t);
        assert_eq!(refresh.method(), REFRESH);
        assert_eq!(
            refresh.get_attribute::<Lifetime>().map(Lifetime::lifetime),
            Some(Duration::ZERO)
        );
        assert!(t.poll_transmit().is_none());
        assert_eq!(
            t.bind_channel(t0, addr("203.0.113.9:1")),
            Err(TurnError::Closed)
        );
        assert_eq!(
            t.encapsulate(peer(), b"x", &mut [0; 64]),
            Err(TurnError::NotAllocated)
        );
        deliver(
            &mut t,
            t0,
            &s.success(&refresh, vec![Lifetime::from_u32(0).into()]),
        );
        assert_eq!(*t.state(), TurnState::Released);
        assert!(std::iter::from_fn(|| t.poll_event()).any(|e| e == TurnEvent::Released));
        assert_eq!(t.poll_timeout(), None);

        // Unanswered, a release still ends.
        let (mut t, _) = allocated(t0, IceTransport::Udp);
        t.release(t0);
        while let Some(at) = t.poll_timeout() {
            t.handle_timeout(at);
            while t.poll_transmit().is_some() {}
        }
        assert_eq!(*t.state(), TurnState::Released);
    }

    #[test]
    fn the_framer_cuts_a_stream_into_messages_and_unpadded_channel_data() {
        let stun = encode(Message::<wire::Attribute>::new(
            MessageClass::SuccessResponse,
            ALLOCATE,
            TransactionId::new([5; 12]),
        ));
        let channel = [0x40, 0x00, 0x00, 0x05, 1, 2, 3, 4, 5, 0, 0, 0];
        let mut stream = Vec::new();
        for _ in 0..3 {
            stream.extend_from_slice(&stun);
            stream.extend_from_slice(&channel);
        }
        for chunk in [1, 3, 7, 64] {
            let mut framer = StreamFramer::new();
            let mut frames = Vec::new();
            for piece in stream.chunks(chunk) {
                framer.push(piece).expect("fits");
                while let Some(frame) = framer.next_frame().expect("well formed") {
                    frames.push(frame.to_vec());
                }
            }
            assert_eq!(frames.len(), 6, "chunks of {chunk}");
            assert_eq!(frames[0], stun);
            assert_eq!(frames[1], &channel[..9]);
            assert_eq!(framer.buffered(), 0);
        }
    }

    #[test]
    fn the_framer_refuses_garbage_and_bounds_its_buffer() {
        let mut framer = StreamFramer::new();
        framer.push(&[0x80, 0, 0, 0]).expect("buffered");
        assert_eq!(framer.next_frame(), Err(FramingError::NotTurn));
        assert_eq!(
            framer.push(&[0]),
            Err(FramingError::NotTurn),
            "stays broken"
        );

        let mut framer = StreamFramer::new();
        framer
            .push(&[0x01, 0x01, 0x00, 0x08, 1, 2, 3, 4])
            .expect("buffered");
        assert_eq!(framer.next_frame(), Err(FramingError::NotTurn), "no cookie");

        let mut framer = StreamFramer::new();
        framer.push(&[0x01, 0x01, 0x00, 0x07]).expect("buffered");
        assert_eq!(
            framer.next_frame(),
            Err(FramingError::NotTurn),
            "odd length"
        );

        let mut framer = StreamFramer::new();
        let chunk = vec![0x4F; 0x10000];
        let mut result = Ok(());
        for _ in 0..3 {
            result = framer.push(&chunk);
        }
        assert_eq!(result, Err(FramingError::Overflow));
    }

    /// The largest STUN message (length 0xFFFC) is a longer frame than the largest ChannelData:
    /// read in 64 KiB pieces and drained after each, it still fits the buffer.
    #[test]
    fn the_largest_stun_message_passes_through_the_framer() {
        let mut message = vec![0u8; STUN_HEADER_LEN + 0xFFFC];
        message[..2].copy_from_slice(&[0x01, 0x01]);
        message[2..4].copy_from_slice(&0xFFFCu16.to_be_bytes());
        message[4..8].copy_from_slice(&STUN_MAGIC_COOKIE);
        assert!(message.len() <= MAX_STREAM_FRAME);
        let mut stream = message.clone();
        stream.extend_from_slice(&message);
        let mut framer = StreamFramer::new();
        let mut frames = 0;
        // The first read stops 1 byte short of the first message, the next read is a full 64 KiB.
        let first = message.len() - 1;
        for piece in [
            &stream[..first],
            &stream[first..first + 0x10000],
            &stream[first + 0x10000..],
        ] {
            framer.push(piece).expect("fits");
            while let Some(frame) = framer.next_frame().expect("well formed") {
                assert_eq!(frame, &message[..]);
                frames += 1;
            }
        }
        assert_eq!(frames, 2);
    }

    use crate::testing::Rng;

    #[test]
    fn random_and_mutated_input_never_panics() {
        let t0 = Instant::now();
        let mut rng = Rng(0x2545_F491_4F6C_DD1D);
        let s = Server::new();
        let (mut t, _) = allocated(t0, IceTransport::Udp);
        t.bind_channel(t0, peer()).expect("channel");
        let pending: Vec<Message<wire::Attribute>> = std::iter::from_fn(|| t.poll_transmit())
            .map(|(_, b)| parse(&b))
            .collect();
        let genuine: Vec<Vec<u8>> = pending
            .iter()
            .flat_map(|r| {
                [
                    s.success(r, vec![Lifetime::from_u32(600).into()]),
                    s.error(r, 438, true),
                    s.error(r, 401, true),
                ]
            })
            .collect();
        let mut data = Message::<stun_codec::rfc5766::Attribute>::new(
            MessageClass::Indication,
            stun_codec::rfc5766::methods::DATA,
            TransactionId::new([3; 12]),
        );
        data.add_attribute(XorPeerAddress::new(peer()));
        data.add_attribute(Data::new(vec![9; 40]).expect("data"));
        let data = encode(data);
        let ids: Vec<TransactionId> = pending.iter().map(|m| m.transaction_id()).collect();
        let mut framer = StreamFramer::new();
        let mut restarts = 0;
        for round in 0..30_000 {
            let mut bytes = match round % 4 {
                0 => {
                    let len = rng.below(300) & !3;
                    let mut bytes = vec![0x01, 0x13, 0, 0];
                    bytes[0] = rng.below(0x40) as u8;
                    bytes[2..4].copy_from_slice(&(len as u16).to_be_bytes());
                    bytes.extend_from_slice(&STUN_MAGIC_COOKIE);
                    bytes.extend_from_slice(ids[rng.below(ids.len())].as_bytes());
                    bytes.extend(rng.bytes(len));
                    bytes
                }
                1 => {
                    let mut bytes = if round % 8 == 1 {
                        data.clone()
                    } else {
                        genuine[rng.below(genuine.len())].clone()
                    };
                    for _ in 0..1 + rng.below(4) {
                        let at = STUN_HEADER_LEN + rng.below(bytes.len() - STUN_HEADER_LEN);
                        bytes[at] = rng.next() as u8;
                    }
                    bytes
                }
                2 => {
                    let len = rng.below(64);
                    let mut bytes = rng.bytes(len + 4);
                    bytes[0] = 0x40 | (rng.below(0x40) as u8);
                    bytes
                }
                _ => {
                    let len = rng.below(100);
                    rng.bytes(len)
                }
            };
            if round % 5 == 0 {
                let cut = rng.below(bytes.len() + 1);
                bytes.truncate(cut);
            }
            if let TurnInput::Data { payload, .. } = t.handle_input(t0, server(), &bytes) {
                assert!(payload.end <= bytes.len());
            }
            if framer.push(&bytes).is_err() {
                framer = StreamFramer::new();
            }
            while let Ok(Some(frame)) = framer.next_frame() {
                t.handle_input(t0, server(), frame);
            }
            t.handle_timeout(t0 + Duration::from_millis(round * 10));
            while t.poll_transmit().is_some() {}
            if t.state() != &TurnState::Allocated || t.transactions.is_empty() {
                // Answered or failed: start over; the same seed gives the same transaction IDs.
                restarts += 1;
                (t, _) = allocated(t0, IceTransport::Udp);
                t.bind_channel(t0, peer()).expect("channel");
                while t.poll_transmit().is_some() {}
            }
        }
        assert!(restarts > 1 && restarts < 10_000, "{restarts}");
    }
}
