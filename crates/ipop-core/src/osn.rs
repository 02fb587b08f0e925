//! The online social network (OSN) as the core sees it: who may link with whom, which devices
//! are online with which key, and the link signalling that travels over it.
//!
//! A binding (today XMPP, in the `ipop-xmpp` crate) turns its protocol into [`OsnEvent`]s and
//! carries [`Signal`]s to other devices. Nothing here knows XMPP: a user is an opaque identifier
//! (a bare JID for XMPP) and a device is a user plus a device name (the XMPP resource).

use crate::key::PublicKey;
use ipnet::IpNet;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};

/// One device of one user: for XMPP, a full JID `user/device`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId {
    /// The user, e.g. `alice@example.org`.
    pub user: String,
    /// The device name, e.g. `laptop`.
    pub device: String,
}

impl DeviceId {
    pub fn new(user: impl Into<String>, device: impl Into<String>) -> Self {
        DeviceId {
            user: user.into(),
            device: device.into(),
        }
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.user, self.device)
    }
}

/// An overlay: the social one (the user's own devices and roster friends with mutual
/// subscription), or a group (the members of one multi-user chat room).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum OverlayId {
    Social,
    /// A group, named by its room, e.g. `lab@conference.example.org`.
    Group(String),
}

impl fmt::Display for OverlayId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OverlayId::Social => f.write_str("social"),
            OverlayId::Group(room) => f.write_str(room),
        }
    }
}

/// What the social network reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OsnEvent {
    /// The session is up (first login or reconnect) as device `me`. A full picture follows:
    /// [`OsnEvent::Members`] for every overlay, then [`OsnEvent::DeviceUp`] for every device.
    Online { me: DeviceId },
    /// The session was lost; the binding reconnects by itself. Links stay up meanwhile.
    Offline,
    /// The users authorised in `overlay` are now exactly `users` (whether online or not). Users
    /// that were authorised and are no longer lose their links at once.
    Members {
        overlay: OverlayId,
        users: Vec<String>,
    },
    /// A device announced ipop with `key`, seen through `overlay` (the roster for the social
    /// overlay, the room for a group), claiming `claim` as its IPv4 address there.
    DeviceUp {
        overlay: OverlayId,
        device: DeviceId,
        key: PublicKey,
        claim: Option<Claim>,
        /// The device forwards for the devices it authorises, which this one is
        /// ([`crate::peer_relay`]).
        relay: Option<RelayOffer>,
        /// The prefixes it routes for the devices of `overlay` (a subnet router).
        routes: Vec<IpNet>,
        /// An exit that also answers DNS queries from the devices it carries, on this UDP port
        /// of its overlay addresses.
        exit_dns: Option<u16>,
    },
    /// A device went offline (or left the room) as seen through `overlay`. Its link stays while
    /// WireGuard still hears from it.
    DeviceDown {
        overlay: OverlayId,
        device: DeviceId,
    },
    /// A link signal from another device, over its authenticated session.
    Signal { from: DeviceId, signal: Signal },
    /// A signal we sent was refused or went unanswered.
    SignalFailed {
        to: DeviceId,
        session: String,
        reason: String,
    },
    /// The STUN and TURN servers the social network offers (XEP-0215), with current
    /// credentials. Replaces what the network offered before; servers from the config file are
    /// kept. Sent again when credentials are renewed.
    IceServers(Vec<IceServer>),
}

/// What a relay announces in its presence: where its control port is, and the token that its
/// friends and fellow members derive their pair keys from ([`crate::peer_relay`]).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct RelayOffer {
    pub endpoint: SocketAddr,
    pub token: [u8; crate::peer_relay::TOKEN_LEN],
}

impl fmt::Debug for RelayOffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RelayOffer")
            .field("endpoint", &self.endpoint)
            .field("token", &"<redacted>")
            .finish()
    }
}

/// The IPv4 address a device says it has in an overlay (in its presence there): its own
/// address in the social overlay, its address in a group's subnet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Claim {
    pub address: Ipv4Addr,
    /// Set in the device's config rather than chosen automatically: it never moves when two
    /// devices claim the same address.
    pub fixed: bool,
}

/// A STUN or TURN server, resolved to an address. Its `Debug` leaves the password out.
#[derive(Clone, PartialEq, Eq)]
pub struct IceServer {
    pub kind: IceServerKind,
    /// The host name, for TLS certificate checks and for status.
    pub host: String,
    pub address: SocketAddr,
    pub transport: IceTransport,
    /// TURN long-term credentials (for `use-auth-secret` servers, time-limited ones).
    pub username: Option<String>,
    pub password: Option<String>,
}

impl fmt::Debug for IceServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IceServer")
            .field("kind", &self.kind)
            .field("host", &self.host)
            .field("address", &self.address)
            .field("transport", &self.transport)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IceServerKind {
    Stun,
    Turn,
}

/// How to reach a STUN or TURN server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IceTransport {
    Udp,
    Tcp,
    Tls,
}

/// A signal the core wants sent, and how much it matters that it goes out soon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    pub to: DeviceId,
    pub signal: Signal,
    /// Traffic waits for it: the offer of an on-demand link that a packet opened, or of an
    /// established link that restarts. A paced sender puts urgent offers before the offers of
    /// links that are only wanted in the background.
    pub urgent: bool,
}

impl Outgoing {
    /// A signal that is not urgent.
    pub fn new(to: DeviceId, signal: Signal) -> Self {
        Outgoing {
            to,
            signal,
            urgent: false,
        }
    }
}

/// A link signal, sent to one device. In XMPP this is a Jingle session (XEP-0166) with the
/// ICE-UDP transport (XEP-0176) and ipop's own application description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signal {
    /// Opens a link session (Jingle `session-initiate`).
    Initiate { session: String, offer: LinkOffer },
    /// Accepts it (Jingle `session-accept`).
    Accept { session: String, offer: LinkOffer },
    /// More candidates for a session (Jingle `transport-info`).
    Candidates {
        session: String,
        candidates: Vec<Candidate>,
    },
    /// Asks the other side to probe our ports: we opened sockets to punch through our NAT
    /// ([`crate::punch`]; Jingle `transport-info` with ipop's `<punch/>`).
    Punch { session: String },
    /// Ends a session (Jingle `session-terminate`).
    Terminate {
        session: String,
        reason: TerminateReason,
    },
}

impl Signal {
    pub fn session(&self) -> &str {
        match self {
            Signal::Initiate { session, .. }
            | Signal::Accept { session, .. }
            | Signal::Candidates { session, .. }
            | Signal::Punch { session }
            | Signal::Terminate { session, .. } => session,
        }
    }
}

/// Why a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TerminateReason {
    /// The sender does not authorise the receiver (Jingle `security-error`).
    NotAuthorised,
    /// The key does not match the key the device announced (Jingle `security-error` too).
    WrongKey,
    /// The sender prefers the other session of a glare (Jingle `alternative-session`).
    Glare,
    /// The link is no longer wanted (Jingle `success`).
    Done,
    /// An on-demand link carried no data for its idle time and goes back to idle; traffic
    /// opens a new one (Jingle `success` with ipop's `<idle/>`).
    Idle,
    /// Anything else (Jingle `failed-application`, `general-error`, …).
    Failed,
}

/// What a device offers for a link: its identity and how to reach it. Its addresses are in
/// its presence in each overlay ([`Claim`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkOffer {
    /// The WireGuard public key the link will use; must equal the announced key.
    pub key: PublicKey,
    /// ICE credentials.
    pub ufrag: String,
    pub pwd: String,
    pub candidates: Vec<Candidate>,
}

/// An ICE candidate, in the terms of XEP-0176.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub foundation: String,
    pub component: u8,
    pub priority: u32,
    pub address: SocketAddr,
    pub kind: CandidateKind,
    /// The base of a server-reflexive or relayed candidate (`rel-addr`, `rel-port`).
    pub related: Option<SocketAddr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CandidateKind {
    Host,
    ServerReflexive,
    PeerReflexive,
    Relayed,
    /// A port mapping granted by this device's home router (PCP, NAT-PMP, UPnP IGD): known
    /// only to this device, for status; on the wire it is server-reflexive.
    Mapped,
}

impl CandidateKind {
    /// The name shown in status: the XEP-0176 and SDP type, or `mapped`.
    pub fn as_str(self) -> &'static str {
        match self {
            CandidateKind::Host => "host",
            CandidateKind::ServerReflexive => "srflx",
            CandidateKind::PeerReflexive => "prflx",
            CandidateKind::Relayed => "relay",
            CandidateKind::Mapped => "mapped",
        }
    }

    /// The type in XEP-0176 and SDP.
    pub fn wire(self) -> CandidateKind {
        match self {
            CandidateKind::Mapped => CandidateKind::ServerReflexive,
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_turn_password_stays_out_of_debug() {
        let server = IceServer {
            kind: IceServerKind::Turn,
            host: "turn.example.org".to_owned(),
            address: SocketAddr::from(([192, 0, 2, 1], 3478)),
            transport: IceTransport::Udp,
            username: Some("1700000000:alice".to_owned()),
            password: Some("hunter2-hmac".to_owned()),
        };
        let debug = format!("{server:?}");
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(
            debug.contains("1700000000:alice") && debug.contains("<redacted>"),
            "{debug}"
        );
    }
}
