//! The XMPP binding of ipop: one XMPP session turned into [`OsnEvent`]s for the core, and the
//! core's [`Signal`](ipop_core::osn::Signal)s carried to other devices as Jingle.
//!
//! * [`connect`] logs in (SCRAM over verified TLS), announces the device (presence with entity
//!   capabilities, the ipop key, its address claim in the overlay and priority -1), fetches the
//!   roster and joins the group rooms, and returns once that is done, or with a [`LoginError`]
//!   that says what went wrong.
//! * The [`Session`] then runs in its own task: it follows the roster, presences and rooms,
//!   answers Jingle and service discovery, reconnects with backoff when the connection is lost
//!   (reporting [`OsnEvent::Offline`], then [`OsnEvent::Online`] and the full picture again).
//! * After every login it asks the server for STUN and TURN servers (XEP-0215), reports them as
//!   [`OsnEvent::IceServers`] and asks again before their TURN credentials expire.
//!
//! Nothing here knows packets; the wire format is in `docs/protocol.md`.

mod announce;
mod extdisco;
pub mod guard;
pub mod jingle;
mod login;
mod muc;
mod pace;
#[doc(hidden)]
pub mod replay;
mod session;
mod traffic;

/// The parsers of payloads that other XMPP entities send, for the fuzz targets in `fuzz/`. Not
/// an API: the binding calls them itself.
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::announce::read as read_announce;
    pub use crate::extdisco::parse as parse_extdisco;
    pub use crate::muc::read_occupant;
}

use ipop_core::PublicKey;
use ipop_core::osn::{Claim, IceServerKind, IceTransport, OsnEvent, Outgoing, OverlayId};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_xmpp::jid::BareJid;

pub use extdisco::MAX_SERVICES as MAX_EXTERNAL_SERVICES;
pub use jingle::MAX_CANDIDATES;
pub use login::{describe_certificate_error, tls_config};
pub use traffic::Traffic;

/// The namespace of ipop's presence payload, `<ipop xmlns='urn:ipop:0' key='…'/>` (with the
/// optional `address` and `fixed` of the device's claim), and the
/// service discovery feature that says a device runs ipop.
pub const NS_IPOP: &str = "urn:ipop:0";
/// The namespace of ipop's Jingle application description (link offers).
pub const NS_LINK: &str = "urn:ipop:link:0";

/// How long an outgoing Jingle IQ may stay unanswered before it counts as failed.
pub const SIGNAL_TIMEOUT: Duration = Duration::from_secs(10);

/// One XMPP account on one device.
#[derive(Clone)]
pub struct XmppConfig {
    /// The bare JID of the account, `alice@example.org`.
    pub jid: String,
    pub password: String,
    /// The device name, used as the XMPP resource.
    pub device: String,
    /// Host and port of the server when DNS SRV records are absent.
    pub server: Option<(String, u16)>,
    /// Direct TLS (XEP-0368, usually port 5223) instead of STARTTLS.
    pub direct_tls: bool,
    /// An extra CA certificate file (PEM) trusted in addition to the system's roots.
    pub extra_ca: Option<PathBuf>,
    /// Log in with this client certificate (SASL EXTERNAL, XEP-0178) instead of the password.
    pub client_cert: Option<ClientCertificate>,
    /// Whether the social overlay (own devices and mutual roster contacts) is on.
    pub social: bool,
    pub groups: Vec<GroupConfig>,
    /// The device's WireGuard public key, announced in presence.
    pub key: PublicKey,
    /// The device's own IPv4 address, claimed in the presence to the roster (the social
    /// overlay). [`Session::announce`] changes it.
    pub social_claim: Option<Claim>,
    /// The prefixes this device routes for the social overlay's devices.
    pub social_routes: Vec<ipnet::IpNet>,
    /// This device's offer to relay for its friends and fellow members, in every presence.
    pub relay: Option<ipop_core::osn::RelayOffer>,
    /// The port on which this device answers its peers' DNS queries, said with `<exit/>`
    /// wherever it routes the default routes.
    pub exit_dns: Option<u16>,
    /// How long [`connect`] may take to log in. The roster and the rooms may take longer: the
    /// session is then returned, and finishes synchronising in the background.
    pub login_timeout: Duration,
    /// The rate, in bytes per second, at which the session sends, and the most it sends at
    /// once: below the server's client rate limit, so that what matters most is not queued at
    /// the server behind the rest. A rate of 0 sends without pacing.
    pub send_rate: u32,
    pub send_burst: u32,
}

/// The default send rate, bytes per second: Debian's stock Prosody limit (10 kB/s). A server
/// with a stricter limit (ejabberd's stock `normal` shaper: 3 000 B/s) throttles before the
/// session does; a rate set under that limit keeps the session's order of urgency. A fixed
/// rate under the strictest limit would make a device with a hundred friends take longer to
/// answer their offers than they wait for an answer.
pub const DEFAULT_SEND_RATE: u32 = 10_000;
/// The default send burst, bytes: ejabberd's stock burst.
pub const DEFAULT_SEND_BURST: u32 = 20_000;

impl XmppConfig {
    /// A configuration with the defaults: STARTTLS through DNS SRV, social overlay on, no
    /// groups, 15 s to log in.
    pub fn new(
        jid: impl Into<String>,
        password: impl Into<String>,
        device: impl Into<String>,
        key: PublicKey,
    ) -> Self {
        XmppConfig {
            jid: jid.into(),
            password: password.into(),
            device: device.into(),
            server: None,
            direct_tls: false,
            extra_ca: None,
            client_cert: None,
            social: true,
            groups: Vec::new(),
            key,
            social_claim: None,
            social_routes: Vec::new(),
            relay: None,
            exit_dns: None,
            login_timeout: Duration::from_secs(15),
            send_rate: DEFAULT_SEND_RATE,
            send_burst: DEFAULT_SEND_BURST,
        }
    }
}

impl fmt::Debug for XmppConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("XmppConfig")
            .field("jid", &self.jid)
            .field("password", &"<hidden>")
            .field("device", &self.device)
            .field("server", &self.server)
            .field("direct_tls", &self.direct_tls)
            .field("extra_ca", &self.extra_ca)
            .field("client_cert", &self.client_cert)
            .field("social", &self.social)
            .field("groups", &self.groups)
            .field("key", &self.key)
            .field("social_claim", &self.social_claim)
            .field("login_timeout", &self.login_timeout)
            .field("send_rate", &self.send_rate)
            .field("send_burst", &self.send_burst)
            .finish()
    }
}

/// A client certificate and its private key, PEM files: the certificate names the account
/// (`id-on-xmppAddr`), and the server trusts its issuer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCertificate {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A group overlay: the members of one multi-user chat room.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupConfig {
    /// The bare JID of the room, `lab@conference.example.org`.
    pub room: String,
    /// Create the room (members-only, non-anonymous, persistent) if it does not exist.
    pub create: bool,
    /// The device's address in the group's subnet, claimed in the presence to the room.
    /// [`Session::announce`] changes it.
    pub claim: Option<Claim>,
    /// The prefixes this device routes for the group's devices.
    pub routes: Vec<ipnet::IpNet>,
}

/// Why [`connect`] failed. Every variant names the cause in words for the user.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoginError {
    #[error("invalid {what}: {why}")]
    Config { what: String, why: String },
    #[error("cannot reach the XMPP server {server}: {reason}")]
    Unreachable { server: String, reason: String },
    #[error("the TLS certificate of {server} is refused: {reason}")]
    Certificate { server: String, reason: String },
    #[error("TLS with {server} failed: {reason}")]
    Tls { server: String, reason: String },
    #[error("{server} does not offer TLS, and ipop never logs in without it")]
    NoTls { server: String },
    #[error(
        "{server} offers no SCRAM authentication (it offers {offered:?}); ipop only logs in with SCRAM"
    )]
    NoScram {
        server: String,
        offered: Vec<String>,
    },
    #[error(
        "{server} does not offer certificate login (SASL EXTERNAL; it offers {}): configure it \
         to ask for client certificates (docs/servers.md), or log in with a password",
        offered.join(", ")
    )]
    NoExternal {
        server: String,
        offered: Vec<String>,
    },
    #[error(
        "{server} refused the client certificate for {jid} ({reason}): it must be signed by a \
         CA the server trusts and name the account"
    )]
    CertificateRefused {
        server: String,
        jid: String,
        reason: String,
    },
    /// XMPP servers answer `not-authorized` for a wrong password and for an unknown account
    /// alike, on purpose: the two cannot be told apart.
    #[error("login as {jid} refused ({condition}): wrong password or no such account")]
    AuthFailed { jid: String, condition: String },
    #[error("the account {jid} is disabled on its server")]
    AccountDisabled { jid: String },
    #[error("the XMPP stream with {server} failed: {reason}")]
    Stream { server: String, reason: String },
    #[error("timed out{} waiting for {waiting_for}", after.map(|d| format!(" after {d:?}")).unwrap_or_default())]
    Timeout {
        waiting_for: String,
        after: Option<Duration>,
    },
    #[error("cannot join the group room {room}: {why}")]
    RoomRefused { room: String, why: String },
}

/// Why a request on a running [`Session`] failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("{0} is not one of the configured group rooms")]
    NotAGroup(String),
    #[error("invalid JID {jid:?}: {why}")]
    InvalidJid { jid: String, why: String },
    #[error("not connected to the XMPP server (reconnecting)")]
    Offline,
    #[error("{by} refused: {why}")]
    Refused { by: String, why: String },
    #[error("no answer from {0} in time")]
    Timeout(String),
    #[error("the XMPP session is closed")]
    Closed,
    #[error("too many requests are queued for the XMPP session")]
    Busy,
}

/// Where the session stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Logging in for the first time.
    Connecting,
    Online,
    /// The connection was lost; reconnecting with backoff.
    Reconnecting,
    /// Shut down.
    Closed,
}

/// Why an incoming stanza (or an outgoing signal part) was dropped. Each has a counter in
/// [`XmppStatus::drops`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DropReason {
    /// A Jingle IQ that does not follow `docs/protocol.md` (answered `bad-request`).
    MalformedJingle,
    /// A Jingle IQ with more than [`MAX_CANDIDATES`] candidates (answered `bad-request`).
    TooManyCandidates,
    /// A Jingle action ipop does not use (answered `feature-not-implemented`).
    UnsupportedJingleAction,
    /// A Jingle IQ from a bare JID, not a device (answered `bad-request`).
    JingleNotFromDevice,
    /// Candidates beyond [`MAX_CANDIDATES`] that the core asked to send.
    OutgoingCandidatesOverLimit,
    /// A presence whose ipop payload has no valid key.
    BadPresenceKey,
    /// A presence whose ipop payload has a valid key but a malformed address claim (the device
    /// counts as a peer without a claim).
    BadPresenceClaim,
    /// A `<route/>` in a presence that is malformed, a default route, or beyond the limit (left
    /// out; the rest of the presence counts).
    BadPresenceRoute,
    /// A room presence without a readable `muc#user` payload.
    MalformedOccupant,
    /// A room occupant whose real JID is hidden.
    OccupantWithoutRealJid,
    /// A roster push from someone other than our own account (answered `service-unavailable`).
    SpoofedRosterPush,
    /// A roster result or push that does not parse.
    MalformedRoster,
    /// An IQ response nobody waits for, or from the wrong sender.
    UnexpectedIqResponse,
    /// An IQ request ipop does not serve (answered `service-unavailable`).
    UnsupportedIq,
    /// More devices or occupants than ipop keeps track of.
    TooManyDevices,
    /// A message: ipop never reads or answers messages.
    Message,
    /// A signal the daemon sent while the session's queue was full.
    QueueFull,
    /// An XEP-0215 `<service/>` entry (STUN/TURN server) that breaks the rules: no type, a bad
    /// host, port, credentials or expiry date.
    MalformedExternalService,
    /// Usable XEP-0215 entries beyond [`MAX_EXTERNAL_SERVICES`] in one answer.
    ExternalServicesOverLimit,
    /// A stanza nested deeper than [`guard::Limits`] allow (an IQ request is answered
    /// `policy-violation`).
    XmlTooDeep,
    /// A stanza with a name, attribute or text longer than [`guard::Limits`] allow.
    XmlTokenTooLarge,
    /// A stanza larger than [`guard::Limits`] allow.
    StanzaTooLarge,
    /// A Jingle IQ from someone no overlay authorises (answered `service-unavailable`, as if
    /// no ipop ran here).
    JingleFromStranger,
}

impl DropReason {
    pub const ALL: [DropReason; 23] = [
        DropReason::MalformedJingle,
        DropReason::TooManyCandidates,
        DropReason::UnsupportedJingleAction,
        DropReason::JingleNotFromDevice,
        DropReason::OutgoingCandidatesOverLimit,
        DropReason::BadPresenceKey,
        DropReason::BadPresenceClaim,
        DropReason::BadPresenceRoute,
        DropReason::MalformedOccupant,
        DropReason::OccupantWithoutRealJid,
        DropReason::SpoofedRosterPush,
        DropReason::MalformedRoster,
        DropReason::UnexpectedIqResponse,
        DropReason::UnsupportedIq,
        DropReason::TooManyDevices,
        DropReason::Message,
        DropReason::QueueFull,
        DropReason::MalformedExternalService,
        DropReason::ExternalServicesOverLimit,
        DropReason::XmlTooDeep,
        DropReason::XmlTokenTooLarge,
        DropReason::StanzaTooLarge,
        DropReason::JingleFromStranger,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::MalformedJingle => "malformed-jingle",
            DropReason::TooManyCandidates => "too-many-candidates",
            DropReason::UnsupportedJingleAction => "unsupported-jingle-action",
            DropReason::JingleNotFromDevice => "jingle-not-from-device",
            DropReason::OutgoingCandidatesOverLimit => "outgoing-candidates-over-limit",
            DropReason::BadPresenceKey => "bad-presence-key",
            DropReason::BadPresenceClaim => "bad-presence-claim",
            DropReason::BadPresenceRoute => "bad-presence-route",
            DropReason::MalformedOccupant => "malformed-occupant",
            DropReason::OccupantWithoutRealJid => "occupant-without-real-jid",
            DropReason::SpoofedRosterPush => "spoofed-roster-push",
            DropReason::MalformedRoster => "malformed-roster",
            DropReason::UnexpectedIqResponse => "unexpected-iq-response",
            DropReason::UnsupportedIq => "unsupported-iq",
            DropReason::TooManyDevices => "too-many-devices",
            DropReason::Message => "message",
            DropReason::QueueFull => "queue-full",
            DropReason::MalformedExternalService => "malformed-external-service",
            DropReason::ExternalServicesOverLimit => "external-services-over-limit",
            DropReason::XmlTooDeep => "xml-too-deep",
            DropReason::XmlTokenTooLarge => "xml-token-too-large",
            DropReason::StanzaTooLarge => "stanza-too-large",
            DropReason::JingleFromStranger => "jingle-from-stranger",
        }
    }

    fn index(self) -> usize {
        Self::ALL.iter().position(|r| *r == self).unwrap_or(0)
    }

    fn of(violation: guard::Violation) -> DropReason {
        match violation {
            guard::Violation::TooDeep => DropReason::XmlTooDeep,
            guard::Violation::TokenTooLarge => DropReason::XmlTokenTooLarge,
            guard::Violation::TooLarge => DropReason::StanzaTooLarge,
        }
    }
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A group room as the session sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomStatus {
    pub room: String,
    pub joined: bool,
    /// Occupants authorised in the overlay (member, admin or owner), ourselves included.
    pub members_present: usize,
    /// Why we are not in the room, if we are not.
    pub problem: Option<String>,
}

/// A STUN or TURN server that the XMPP server offers (XEP-0215), as the core was last told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalServiceStatus {
    pub kind: IceServerKind,
    pub transport: IceTransport,
    /// The host as the XMPP server named it.
    pub host: String,
    pub address: SocketAddr,
    /// Whether it came with (TURN) credentials; they are not shown.
    pub credentials: bool,
    /// When the credentials expire; new ones are asked for before.
    pub expires: Option<SystemTime>,
}

/// A snapshot of the session for `ipop status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XmppStatus {
    pub state: State,
    /// The bound full JID, once online.
    pub bound: Option<String>,
    /// The server as configured or found: `host:port` or `domain (SRV)`.
    pub server: String,
    /// The server's address on the last connection.
    pub server_ip: Option<std::net::IpAddr>,
    /// How often the session came back after a lost connection.
    pub reconnects: u64,
    /// How many of those came back by resuming the stream (XEP-0198): the server kept the
    /// session, queued what came for it meanwhile and delivered it on return.
    pub resumptions: u64,
    /// The last login or connection error, while reconnecting.
    pub last_error: Option<String>,
    /// Roster contacts with mutual subscription (the social overlay's friends).
    pub friends: usize,
    /// ipop devices seen through the social overlay.
    pub social_devices: usize,
    pub rooms: Vec<RoomStatus>,
    /// STUN and TURN servers offered by the XMPP server (XEP-0215); servers from the config file
    /// are not here.
    pub external_services: Vec<ExternalServiceStatus>,
    /// Why the last query for them gave nothing or less than offered (the server does not offer
    /// the feature, a refusal, a timeout, names that do not resolve), if it did.
    pub external_services_problem: Option<String>,
    /// Dropped stanzas by reason; only reasons that happened.
    pub drops: Vec<(DropReason, u64)>,
    /// Stanzas, bytes and link signals since the session started.
    pub traffic: Traffic,
}

/// State shared between the session task and the [`Session`] handle.
#[derive(Debug)]
struct Shared {
    status: Mutex<XmppStatus>,
    drops: Mutex<[u64; DropReason::ALL.len()]>,
    /// Stanzas and signals; the bytes are in `bytes`.
    traffic: Mutex<Traffic>,
    bytes: Arc<traffic::ByteCounts>,
    /// What the session is waiting for, for a timeout message at login.
    waiting_for: Mutex<String>,
    /// Log lines that others can cause at will.
    logs: LogLimiter,
}

/// Keeps a log line that others can repeat at will (a stranger's stanzas, a server that keeps
/// refusing) to one per key per minute; the rest go to the debug level.
#[derive(Debug, Default)]
struct LogLimiter {
    last: Mutex<HashMap<String, Instant>>,
}

impl LogLimiter {
    const PERIOD: Duration = Duration::from_secs(60);
    /// Most keys remembered: beyond, the oldest entries go first.
    const KEYS: usize = 1024;

    /// Whether a line for `key` may be logged now.
    fn allow(&self, key: &str) -> bool {
        let now = Instant::now();
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(at) = last.get(key)
            && now.duration_since(*at) < Self::PERIOD
        {
            return false;
        }
        if last.len() >= Self::KEYS {
            last.retain(|_, at| now.duration_since(*at) < Self::PERIOD);
            if last.len() >= Self::KEYS {
                last.clear();
            }
        }
        last.insert(key.to_owned(), now);
        true
    }
}

impl Shared {
    fn new(server: String) -> Self {
        Shared {
            status: Mutex::new(XmppStatus {
                state: State::Connecting,
                bound: None,
                server,
                server_ip: None,
                reconnects: 0,
                resumptions: 0,
                last_error: None,
                friends: 0,
                social_devices: 0,
                rooms: Vec::new(),
                external_services: Vec::new(),
                external_services_problem: None,
                drops: Vec::new(),
                traffic: Traffic::default(),
            }),
            drops: Mutex::new([0; DropReason::ALL.len()]),
            traffic: Mutex::new(Traffic::default()),
            bytes: Arc::default(),
            waiting_for: Mutex::new("resource binding".to_owned()),
            logs: LogLimiter::default(),
        }
    }

    /// What the guard on the stream reports.
    fn on_guard(&self, event: guard::GuardEvent) {
        match event {
            guard::GuardEvent::Dropped {
                violation,
                kind,
                from,
            } => {
                self.count(DropReason::of(violation));
                let from = from.as_deref().unwrap_or("the server");
                if self.logs.allow(violation.as_str()) {
                    tracing::warn!(
                        reason = violation.as_str(),
                        "dropped a <{kind}/> from {from} that breaks ipop's bounds on XML; \
                         more are counted in status and logged at most once a minute"
                    );
                } else {
                    tracing::debug!(
                        reason = violation.as_str(),
                        "dropped a <{kind}/> from {from}"
                    );
                }
            }
            guard::GuardEvent::ResumptionFailed { condition } => {
                let condition = condition.unwrap_or_else(|| "no reason given".to_owned());
                if self.logs.allow("resumption-failed") {
                    tracing::warn!(
                        "the XMPP server cannot resume the previous stream ({condition}); \
                         binding a new session"
                    );
                } else {
                    tracing::debug!("stream resumption refused ({condition})");
                }
            }
        }
    }

    fn update(&self, f: impl FnOnce(&mut XmppStatus)) {
        f(&mut self.status.lock().unwrap_or_else(PoisonError::into_inner));
    }

    fn count_traffic(&self, f: impl FnOnce(&mut Traffic)) {
        f(&mut self.traffic.lock().unwrap_or_else(PoisonError::into_inner));
    }

    fn count(&self, reason: DropReason) {
        self.drops.lock().unwrap_or_else(PoisonError::into_inner)[reason.index()] += 1;
    }

    fn waiting_for(&self, what: impl Into<String>) {
        *self
            .waiting_for
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = what.into();
    }

    fn snapshot(&self) -> XmppStatus {
        let mut status = self
            .status
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let drops = *self.drops.lock().unwrap_or_else(PoisonError::into_inner);
        status.drops = DropReason::ALL
            .iter()
            .zip(drops)
            .filter(|(_, n)| *n > 0)
            .map(|(r, n)| (*r, n))
            .collect();
        status.traffic = *self.traffic.lock().unwrap_or_else(PoisonError::into_inner);
        status.traffic.bytes_sent = self.bytes.sent();
        status.traffic.bytes_received = self.bytes.received();
        status
    }
}

/// Requests from the handle to the session task.
enum Command {
    Signal(Outgoing),
    Affiliation {
        room: BareJid,
        jid: BareJid,
        affiliation: &'static str,
        done: oneshot::Sender<Result<(), Error>>,
    },
    Shutdown(oneshot::Sender<()>),
}

/// How much lower the session thread's priority is than the packet loop's (in nice steps).
const SESSION_NICE: i32 = 10;

/// Most requests queued for the session task.
const COMMAND_QUEUE: usize = 1024;

/// Claims changed through [`Session::announce`], by overlay: the latest one wins.
type Claims = BTreeMap<OverlayId, Option<Claim>>;

/// A running XMPP session. Dropping it ends the session like [`Session::shutdown`], without
/// waiting.
pub struct Session {
    commands: mpsc::Sender<Command>,
    events: mpsc::UnboundedSender<OsnEvent>,
    shared: Arc<Shared>,
    groups: Vec<BareJid>,
    claims: watch::Sender<Claims>,
    /// Closed when the session's thread is done with it.
    finished: oneshot::Receiver<()>,
}

/// Logs in, announces the device, fetches the roster and joins the rooms. Returns the session
/// and the receiver of its events, which starts with [`OsnEvent::Online`] and the full
/// picture. The receiver must be drained: it is unbounded.
///
/// The session runs on a thread of its own, with its own runtime: reading, bounding and parsing
/// what the server sends never holds up the caller's tasks (the daemon's packet loop).
pub async fn connect(
    cfg: XmppConfig,
) -> Result<(Session, mpsc::UnboundedReceiver<OsnEvent>), LoginError> {
    let (reply, answer) = oneshot::channel();
    let thread_error = |reason: String| LoginError::Stream {
        server: cfg
            .server
            .as_ref()
            .map_or_else(|| cfg.jid.clone(), |(host, port)| format!("{host}:{port}")),
        reason,
    };
    let settings = cfg.clone();
    std::thread::Builder::new()
        .name("ipop-xmpp".to_owned())
        .spawn(move || {
            // When the machine is busy, the packet loop goes first: a flood of stanzas slows
            // the session, not the tunnels. (On Linux the nice value is the thread's own.)
            let lowered = rustix::process::getpriority_process(None).and_then(|nice| {
                rustix::process::setpriority_process(None, (nice + SESSION_NICE).min(19))
            });
            if let Err(e) = lowered {
                tracing::debug!("the XMPP session's thread keeps its priority: {e}");
            }
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime.block_on(run(settings, reply)),
                Err(e) => {
                    // The caller may have stopped waiting.
                    let _ = reply.send(Err(LoginError::Stream {
                        server: settings.jid.clone(),
                        reason: format!("cannot start the XMPP session's runtime: {e}"),
                    }));
                }
            }
        })
        .map_err(|e| thread_error(format!("cannot start the XMPP session's thread: {e}")))?;
    answer.await.unwrap_or_else(|_| {
        Err(thread_error(
            "the XMPP session ended during login".to_owned(),
        ))
    })
}

type Connected = Result<(Session, mpsc::UnboundedReceiver<OsnEvent>), LoginError>;

/// The session's thread: logs in, answers `reply`, then runs the session until it ends.
async fn run(cfg: XmppConfig, reply: oneshot::Sender<Connected>) {
    let (finished_tx, finished) = oneshot::channel();
    let (task, outcome) = match start(cfg, finished).await {
        Ok((session, events, task)) => (Some(task), Ok((session, events))),
        Err(e) => (None, Err(e)),
    };
    if let Err(Ok((session, _))) = reply.send(outcome) {
        // Nobody waits for the session any more: dropping the handle ends it.
        drop(session);
    }
    if let Some(task) = task {
        // A join error could only be a panic, already reported by the runtime.
        let _ = task.await;
    }
    drop(finished_tx);
}

async fn start(
    cfg: XmppConfig,
    finished: oneshot::Receiver<()>,
) -> Result<
    (
        Session,
        mpsc::UnboundedReceiver<OsnEvent>,
        tokio::task::JoinHandle<()>,
    ),
    LoginError,
> {
    let deadline = tokio::time::Instant::now() + cfg.login_timeout;
    let with_duration = |e: LoginError| match e {
        LoginError::Timeout { waiting_for, .. } => LoginError::Timeout {
            waiting_for,
            after: Some(cfg.login_timeout),
        },
        other => other,
    };
    let mut groups = Vec::with_capacity(cfg.groups.len());
    for group in &cfg.groups {
        groups.push(BareJid::new(&group.room).map_err(|e| LoginError::Config {
            what: format!("group room {:?}", group.room),
            why: e.to_string(),
        })?);
    }
    let shared = Arc::new(Shared::new(String::new()));
    let guard_shared = shared.clone();
    let login = Arc::new(login::Login::new(
        &cfg,
        Arc::new(move |event| guard_shared.on_guard(event)),
        shared.bytes.clone(),
    )?);
    shared.update(|s| s.server = login.server.clone());
    let first = login.open(deadline).await.map_err(with_duration)?;
    let (commands, command_rx) = mpsc::channel(COMMAND_QUEUE);
    let (events, event_rx) = mpsc::unbounded_channel();
    let (ready_tx, ready_rx) = oneshot::channel();
    let (claims, claims_rx) = watch::channel(Claims::new());
    let task = session::Task::new(
        cfg.clone(),
        groups.clone(),
        login,
        first,
        shared.clone(),
        session::Channels {
            events: events.clone(),
            commands: command_rx,
            claims: claims_rx,
            ready: ready_tx,
        },
    );
    let task = tokio::spawn(task.run());
    let session = Session {
        commands,
        events,
        shared: shared.clone(),
        groups,
        claims,
        finished,
    };
    let outcome = match tokio::time::timeout_at(deadline, ready_rx).await {
        Ok(Ok(Ok(()))) => return Ok((session, event_rx, task)),
        Ok(Ok(Err(e))) => e,
        Ok(Err(_)) => LoginError::Stream {
            server: shared.snapshot().server,
            reason: "the session ended during login".to_owned(),
        },
        Err(_) => {
            // Logged in, but the roster or a room is slow: a busy server, not a wrong
            // setting. The session goes on synchronising, and links follow as it does.
            let waiting_for = shared
                .waiting_for
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
            tracing::warn!(
                "logged in, but still waiting for {} after {:?}: going on without it; links \
                 come as it arrives",
                waiting_for,
                cfg.login_timeout
            );
            return Ok((session, event_rx, task));
        }
    };
    let (done, closed) = oneshot::channel();
    if session.commands.send(Command::Shutdown(done)).await.is_ok() {
        // The task answers once the stream is closed; an error means it ended already.
        let _ = closed.await;
    }
    // A join error could only be a panic, already reported by the runtime.
    let _ = task.await;
    Err(outcome)
}

impl Session {
    /// Sends a link signal to a device, without waiting: it goes out when the send pace allows,
    /// after what is more urgent. A refusal or a timeout comes back as
    /// [`OsnEvent::SignalFailed`].
    pub fn send(&self, out: Outgoing) {
        if let Err(e) = self.commands.try_send(Command::Signal(out)) {
            let (out, why) = match e {
                mpsc::error::TrySendError::Full(Command::Signal(out)) => {
                    self.shared.count(DropReason::QueueFull);
                    (out, "the XMPP session's queue is full")
                }
                mpsc::error::TrySendError::Closed(Command::Signal(out)) => {
                    (out, "the XMPP session is closed")
                }
                _ => return,
            };
            self.shared.count_traffic(|t| t.signals_unsent += 1);
            let Outgoing { to, signal, .. } = out;
            tracing::warn!(%to, session = signal.session(), "signal not sent: {why}");
            // Nobody listening is fine: the daemon is going away.
            let _ = self.events.send(OsnEvent::SignalFailed {
                to,
                session: signal.session().to_owned(),
                reason: why.to_owned(),
            });
        }
    }

    /// Claims `claim` as the device's IPv4 address in `overlay` from now on (none with `None`):
    /// its own address for the social overlay, its address in the group's subnet for a group.
    /// When online, the presence with the new claim goes out at once (to the roster, or to the
    /// room); after a reconnect or a rejoin the latest claim is sent. A group that is not
    /// configured is logged and ignored.
    pub fn announce(&self, overlay: OverlayId, claim: Option<Claim>) {
        let overlay = match overlay {
            OverlayId::Social => OverlayId::Social,
            OverlayId::Group(room) => {
                match BareJid::new(&room).ok().filter(|r| self.groups.contains(r)) {
                    Some(jid) => OverlayId::Group(jid.to_string()),
                    None => {
                        tracing::warn!(
                            room,
                            "claim not announced: {}",
                            Error::NotAGroup(room.clone())
                        );
                        return;
                    }
                }
            }
        };
        self.claims.send_modify(|claims| {
            claims.insert(overlay, claim);
        });
    }

    /// Makes `jid` a member of the group room `room` (muc#admin affiliation `member`). Needs
    /// owner or admin rights in the room.
    pub fn add_member(
        &self,
        room: &str,
        jid: &str,
    ) -> impl Future<Output = Result<(), Error>> + Send + 'static {
        self.affiliation(room, jid, "member")
    }

    /// Takes membership of the group room `room` away from `jid` (affiliation `none`); the
    /// server removes their devices from the room.
    pub fn remove_member(
        &self,
        room: &str,
        jid: &str,
    ) -> impl Future<Output = Result<(), Error>> + Send + 'static {
        self.affiliation(room, jid, "none")
    }

    fn affiliation(
        &self,
        room: &str,
        jid: &str,
        affiliation: &'static str,
    ) -> impl Future<Output = Result<(), Error>> + Send + 'static {
        let request = (|| {
            let room = BareJid::new(room)
                .ok()
                .filter(|r| self.groups.contains(r))
                .ok_or_else(|| Error::NotAGroup(room.to_owned()))?;
            let jid = BareJid::new(jid).map_err(|e| Error::InvalidJid {
                jid: jid.to_owned(),
                why: e.to_string(),
            })?;
            let (done, answer) = oneshot::channel();
            self.commands
                .try_send(Command::Affiliation {
                    room,
                    jid,
                    affiliation,
                    done,
                })
                .map_err(|e| match e {
                    mpsc::error::TrySendError::Full(_) => Error::Busy,
                    mpsc::error::TrySendError::Closed(_) => Error::Closed,
                })?;
            Ok(answer)
        })();
        async move { request?.await.unwrap_or(Err(Error::Closed)) }
    }

    /// Where the session stands, for `ipop status`.
    pub fn status(&self) -> XmppStatus {
        self.shared.snapshot()
    }

    /// The address of the XMPP server the session is connected to, if it is: what
    /// [`Session::status`] says, without copying the rest.
    pub fn server_ip(&self) -> Option<std::net::IpAddr> {
        self.shared
            .status
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .server_ip
    }

    /// Ends the session: unavailable presence to the rooms and the account, then the stream is
    /// closed.
    pub async fn shutdown(self) {
        let (done, finished) = oneshot::channel();
        if self.commands.send(Command::Shutdown(done)).await.is_ok() {
            // The task answers once the stream is closed; an error means it ended already.
            let _ = finished.await;
        }
        // Closed (never sent) once the session's task has ended.
        let _ = self.finished.await;
    }
}
