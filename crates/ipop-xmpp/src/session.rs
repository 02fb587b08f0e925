//! The session task: owns the stanza stream and turns what arrives into [`OsnEvent`]s.
//!
//! State is rebuilt from the server after every fresh stream (roster, presences, rooms); what
//! the core was told is kept per overlay in a [`View`], so that after a reconnect the full
//! picture is announced again and devices that did not come back are reported down.
//!
//! The device's own claims (its address in each overlay) are kept here too: every presence
//! sent carries the latest one, and a change from [`crate::Session::announce`] goes out at once
//! when online, or with the next presence otherwise.

use crate::announce::{self, Announce};
use crate::extdisco::{self, Offered, Resolution, Resolved};
use crate::guard;
use crate::jingle::{self, Malformed};
use crate::login::Login;
use crate::muc::{self, Affiliation, OccupantInfo};
use crate::pace::{Bucket, Class, Delivered, Queues, Window};
use crate::{
    Claims, Command, DropReason, Error, ExternalServiceStatus, LoginError, RoomStatus,
    SIGNAL_TIMEOUT, Shared, State, XmppConfig,
};
use futures::{FutureExt, StreamExt};
use ipop_core::PublicKey;
use ipop_core::osn::{Claim, DeviceId, OsnEvent, Outgoing, OverlayId, RelayOffer, Signal};
use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, timeout};
use tokio_xmpp::Stanza;
use tokio_xmpp::jid::{BareJid, FullJid, Jid};
use tokio_xmpp::minidom::Element;
use tokio_xmpp::parsers::iq::Iq;
use tokio_xmpp::parsers::message::Message;
use tokio_xmpp::parsers::ns;
use tokio_xmpp::parsers::presence::{Presence, Priority, Type as PresenceType};
use tokio_xmpp::parsers::roster::{Item as RosterItem, Roster, Subscription};
use tokio_xmpp::parsers::stanza_error::{DefinedCondition, ErrorType, StanzaError};
use tokio_xmpp::stanzastream::{
    Connection, Event, StanzaStage, StanzaStream, StanzaToken, StreamEvent,
};

/// How long IQs to our server and rooms (roster, room configuration, affiliations) may take.
const SERVER_IQ_TIMEOUT: Duration = Duration::from_secs(30);
/// After a fresh stream, devices seen before that have not announced themselves again within
/// this time are reported down: as long as the longest reconnect back-off of any device (they
/// may all have lost the server at once), plus half a minute to log in and announce.
const RESYNC_GRACE: Duration = BACKOFF_MAX.saturating_add(Duration::from_secs(30));
/// Wait before joining a room again after being removed from it for a passing reason.
const REJOIN_DELAY: Duration = Duration::from_secs(60);
/// Reconnect backoff: from one second, doubling, to half a minute, with jitter.
const BACKOFF_FIRST: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// While the server refuses connections (it is down or restarting), the backoff stops growing
/// here: a refused connection costs the server nothing, and a restarted server is found within
/// a few seconds.
const BACKOFF_MAX_REFUSED: Duration = Duration::from_secs(3);
/// Most time one reconnection attempt may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(30);
/// Most devices the social overlay keeps track of, and most occupants per room.
const MAX_DEVICES: usize = 4096;
/// Depth of tokio-xmpp's stanza queues.
const QUEUE_DEPTH: usize = 64;
/// How often pending IQs and timers are checked.
const TICK: Duration = Duration::from_millis(250);
/// How often the connection's local address is looked for among the host's.
const ADDRESS_CHECK: Duration = Duration::from_secs(1);
/// After a failed query for STUN/TURN servers, ask again this soon while credentials that were
/// reported before are still valid.
const EXTERNAL_RETRY: Duration = Duration::from_secs(30);

/// What a device announces in one overlay: its key and its address claim there.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Announced {
    key: PublicKey,
    claim: Option<Claim>,
    relay: Option<RelayOffer>,
    routes: Vec<ipnet::IpNet>,
    exit_dns: Option<u16>,
}

/// What the core was told about one overlay.
#[derive(Default)]
struct View {
    members: Option<BTreeSet<String>>,
    devices: BTreeMap<DeviceId, Announced>,
    /// Devices announced before the last fresh stream and not yet seen again.
    stale: BTreeMap<DeviceId, Announced>,
}

impl View {
    /// Forget what was said, so that the next publication says everything again. With
    /// `keep_stale`, what was up is remembered for [`View::sweep`].
    fn restart(&mut self, keep_stale: bool) {
        self.members = None;
        let devices = std::mem::take(&mut self.devices);
        if keep_stale {
            self.stale.extend(devices);
        }
    }

    /// Tell the core what changed: members first, then devices down, then devices up (again
    /// when their key or claim changed).
    fn publish(
        &mut self,
        overlay: &OverlayId,
        members: BTreeSet<String>,
        devices: BTreeMap<DeviceId, Announced>,
        out: &mut Vec<OsnEvent>,
    ) {
        if self.members.as_ref() != Some(&members) {
            out.push(OsnEvent::Members {
                overlay: overlay.clone(),
                users: members.iter().cloned().collect(),
            });
            self.members = Some(members);
        }
        let gone: Vec<DeviceId> = self
            .devices
            .keys()
            .filter(|d| !devices.contains_key(*d))
            .cloned()
            .collect();
        for device in gone {
            self.update(overlay, device, None, out);
        }
        for (device, announced) in devices {
            self.update(overlay, device, Some(announced), out);
        }
    }

    /// Tells the core of one device that came, changed or went (`None`): the work is that
    /// device's, whatever the size of the overlay. Before the first full publication there is
    /// nothing to update: that publication will say it.
    fn update(
        &mut self,
        overlay: &OverlayId,
        device: DeviceId,
        announced: Option<Announced>,
        out: &mut Vec<OsnEvent>,
    ) {
        if self.members.is_none() {
            return;
        }
        match announced {
            Some(announced) => {
                self.stale.remove(&device);
                if self.devices.get(&device) != Some(&announced) {
                    self.devices.insert(device.clone(), announced.clone());
                    out.push(OsnEvent::DeviceUp {
                        overlay: overlay.clone(),
                        device,
                        key: announced.key,
                        relay: announced.relay,
                        claim: announced.claim,
                        routes: announced.routes,
                        exit_dns: announced.exit_dns,
                    });
                }
            }
            None => {
                if self.devices.remove(&device).is_some() {
                    out.push(OsnEvent::DeviceDown {
                        overlay: overlay.clone(),
                        device,
                    });
                }
            }
        }
    }

    /// Report down the devices that did not come back after a fresh stream.
    fn sweep(&mut self, overlay: &OverlayId, out: &mut Vec<OsnEvent>) {
        for (device, _) in std::mem::take(&mut self.stale) {
            if !self.devices.contains_key(&device) {
                out.push(OsnEvent::DeviceDown {
                    overlay: overlay.clone(),
                    device,
                });
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum RoomState {
    /// Not in the room; join again at the given time, if any.
    Out {
        rejoin_at: Option<Instant>,
    },
    /// Join presence sent.
    Joining,
    /// We created the room and are configuring it.
    Configuring,
    Joined,
    /// We cannot be in this room; why.
    Failed(String),
}

struct Occupant {
    real: FullJid,
    affiliation: Affiliation,
    /// What it announces, if it runs ipop.
    announced: Option<Announced>,
}

struct Room {
    jid: BareJid,
    create: bool,
    /// Our claim in the group, sent with every presence to the room.
    claim: Option<Claim>,
    /// The prefixes we route for the group, sent with every presence to the room.
    routes: Vec<ipnet::IpNet>,
    /// The claim changed while we could not tell the room: tell it once joined.
    claim_unsent: bool,
    nick: String,
    state: RoomState,
    occupants: BTreeMap<String, Occupant>,
    /// Users seen in the room with an affiliation that authorises them. A user stays a member
    /// while offline; only an explicit revocation (ban, kick, affiliation removed) ends it.
    members: BTreeSet<BareJid>,
    view: View,
    overlay: OverlayId,
    /// When devices that were in the room before we rejoined it and have not come back are
    /// reported down.
    sweep_at: Option<Instant>,
}

impl Room {
    fn occupant_jid(&self) -> Option<FullJid> {
        self.jid.with_resource_str(&self.nick).ok()
    }
}

/// What an outgoing IQ was for.
enum Purpose {
    Signal {
        to: DeviceId,
        session: String,
    },
    Roster,
    RoomConfig {
        room: usize,
    },
    Affiliation {
        done: oneshot::Sender<Result<(), Error>>,
    },
    /// XEP-0215 `<services/>`.
    ExternalServices,
    /// XEP-0215 `<credentials/>` for some of these services.
    ExternalCredentials {
        services: Vec<Offered>,
    },
}

/// The STUN and TURN servers from the XMPP server (XEP-0215).
#[derive(Default)]
struct External {
    /// What the core was told last.
    announced: Vec<Resolved>,
    /// When to ask again, for fresh credentials or after a failure.
    renew_at: Option<Instant>,
    /// The host name lookup for the last answer.
    resolving: Option<JoinHandle<Resolution>>,
}

/// Waits for the lookup in `slot`, if any, and empties the slot; `None` if it panicked.
async fn resolved(slot: &mut Option<JoinHandle<Resolution>>) -> Option<Resolution> {
    let Some(handle) = slot else {
        return std::future::pending().await;
    };
    let result = handle.await;
    *slot = None;
    result.ok()
}

struct Pending {
    /// Who must answer; `None` for our own account (the server answers for it).
    to: Option<Jid>,
    /// `None` while the request waits in the send queue.
    deadline: Option<Instant>,
    purpose: Purpose,
}

/// A stanza in the send queue. Signals stay signals until they go, so that a later signal of
/// the same link session can be merged into them or cancel them.
enum Queued {
    Stanza(Stanza),
    Signal {
        /// The IQ's id, under which [`Task::pending`] waits for the answer.
        id: String,
        jid: FullJid,
        out: Outgoing,
    },
}

/// Most stanzas in the send queue, and most answers to strangers among them.
const SEND_QUEUE: usize = 2048;
const STRANGER_ANSWERS: usize = 32;

pub(crate) struct Task {
    /// How connections are opened, and the current one's address.
    login: Arc<Login>,
    /// When to look again whether the connection's address is still the host's.
    next_address_check: Instant,
    cfg: XmppConfig,
    own: BareJid,
    me: FullJid,
    shared: Arc<Shared>,
    stream: StanzaStream,
    events: mpsc::UnboundedSender<OsnEvent>,
    commands: mpsc::Receiver<Command>,
    /// Completed once the first login has fully synchronised (or failed).
    ready: Option<oneshot::Sender<Result<(), LoginError>>>,
    /// Tells reconnection attempts to stop.
    closing: watch::Sender<bool>,
    online: bool,
    ever_online: bool,
    pending: HashMap<String, Pending>,
    next_id: u64,
    id_prefix: String,
    roster_loaded: bool,
    contacts: BTreeMap<BareJid, Subscription>,
    /// ipop devices seen outside rooms (own account and contacts), whatever their subscription.
    presences: BTreeMap<FullJid, Announced>,
    /// Claims changed by the [`crate::Session`] handle.
    claims: watch::Receiver<Claims>,
    /// Our social claim changed while offline: send it when the stream is resumed.
    social_claim_unsent: bool,
    social: View,
    social_sweep_at: Option<Instant>,
    rooms: Vec<Room>,
    external: External,
    /// Devices a link offer went to, to count repeated offers.
    offered: BTreeSet<DeviceId>,
    /// Stanzas produced while handling one input, queued afterwards.
    outbox: Vec<(Class, Stanza)>,
    /// What waits to be sent, by class, and the pace it goes at (none without a limit).
    queue: Queues<Queued>,
    bucket: Option<Bucket>,
    /// What the server has not acknowledged yet, where the stream has stream management.
    window: Option<Window<StanzaToken>>,
    /// Events produced while handling one input, sent afterwards.
    out: Vec<OsnEvent>,
}

/// Sleeps until `at`; forever with `None`.
async fn until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

impl Delivered for StanzaToken {
    fn delivered(&self) -> bool {
        // Ready once acknowledged, failed or dropped, or when the stream forgot it.
        self.clone()
            .wait_for(StanzaStage::Acked)
            .now_or_never()
            .is_some()
    }
}

/// Waits until the server acknowledges `token`'s stanza (or never will); forever with `None`.
async fn acknowledged(token: Option<StanzaToken>) {
    match token {
        Some(mut token) => drop(token.wait_for(StanzaStage::Acked).await),
        None => std::future::pending().await,
    }
}

/// The bytes a stanza takes on the stream, before TLS.
fn wire_len(stanza: &Stanza) -> usize {
    String::from(&Element::from(stanza)).len()
}

/// Waits for a change of the claims; forever once the handle is gone.
async fn claims_changed(claims: &mut watch::Receiver<Claims>) {
    if claims.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// The reason of a guard's placeholder among `payloads`, if it is one.
fn dropped_reason(payloads: &[Element]) -> Option<String> {
    payloads
        .iter()
        .find(|p| p.is("dropped", guard::NS_DROPPED))
        .map(|p| p.attr("reason").unwrap_or("unknown").to_owned())
}

/// Reads the ipop announcement of a presence from `from`, counting what is wrong with it: a
/// device with a bad claim is still a peer, without a claim.
fn read_announced(shared: &Shared, payloads: &[Element], from: &FullJid) -> Option<Announced> {
    match announce::read(payloads) {
        Announce::None => None,
        Announce::BadKey => {
            count_drop(
                shared,
                DropReason::BadPresenceKey,
                format_args!("presence of {from}"),
            );
            None
        }
        Announce::Key {
            key,
            claim,
            relay,
            routes: (routes, bad_routes),
            exit_dns,
        } => {
            if bad_routes > 0 {
                for _ in 0..bad_routes {
                    shared.count(DropReason::BadPresenceRoute);
                }
                tracing::debug!(%from, bad_routes, "routes left out of a presence");
            }
            let claim = claim.unwrap_or_else(|bad| {
                count_drop(
                    shared,
                    DropReason::BadPresenceClaim,
                    format_args!("claim in the presence of {from}: {bad}"),
                );
                None
            });
            Some(Announced {
                key,
                claim,
                relay,
                routes,
                exit_dns,
            })
        }
    }
}

fn count_drop(shared: &Shared, reason: DropReason, detail: impl std::fmt::Display) {
    tracing::debug!(reason = reason.as_str(), "dropped: {detail}");
    shared.count(reason);
}

fn random_u64() -> u64 {
    RandomState::new().hash_one(std::time::SystemTime::now())
}

/// The task's ends of the channels to the [`crate::Session`] handle and to [`crate::connect`].
pub(crate) struct Channels {
    pub events: mpsc::UnboundedSender<OsnEvent>,
    pub commands: mpsc::Receiver<Command>,
    pub claims: watch::Receiver<Claims>,
    /// Answered once the first login has synchronised, or failed.
    pub ready: oneshot::Sender<Result<(), LoginError>>,
}

impl Task {
    pub(crate) fn new(
        cfg: XmppConfig,
        groups: Vec<BareJid>,
        login: Arc<Login>,
        first: Connection,
        shared: Arc<Shared>,
        Channels {
            events,
            commands,
            claims,
            ready,
        }: Channels,
    ) -> Self {
        let me = login.jid().clone();
        let own = me.to_bare();
        let (closing, closing_rx) = watch::channel(false);
        let stream = StanzaStream::new(
            reconnector(first, login.clone(), shared.clone(), closing_rx),
            QUEUE_DEPTH,
        );
        let rooms = groups
            .into_iter()
            .zip(&cfg.groups)
            .map(|(jid, group)| Room {
                overlay: OverlayId::Group(jid.to_string()),
                jid,
                create: group.create,
                claim: group.claim,
                routes: group.routes.clone(),
                claim_unsent: false,
                nick: muc::nick(&own, me.resource().as_str()),
                state: RoomState::Out { rejoin_at: None },
                occupants: BTreeMap::new(),
                members: BTreeSet::new(),
                view: View::default(),
                sweep_at: None,
            })
            .collect();
        Task {
            login,
            next_address_check: Instant::now(),
            own,
            me,
            shared,
            stream,
            events,
            commands,
            ready: Some(ready),
            closing,
            online: false,
            ever_online: false,
            pending: HashMap::new(),
            next_id: 0,
            id_prefix: format!("ipop-{:08x}", random_u64() as u32),
            roster_loaded: false,
            contacts: BTreeMap::new(),
            presences: BTreeMap::new(),
            claims,
            social_claim_unsent: false,
            social: View::default(),
            social_sweep_at: None,
            rooms,
            external: External::default(),
            offered: BTreeSet::new(),
            queue: Queues::new(SEND_QUEUE, STRANGER_ANSWERS),
            bucket: Bucket::new(cfg.send_rate, cfg.send_burst, Instant::now()),
            window: None,
            cfg,
            outbox: Vec::new(),
            out: Vec::new(),
        }
    }

    /// Names our requests `PREFIX-1`, `PREFIX-2`, … instead of by a random prefix (the first is
    /// the roster request after login), for a replay whose answers are written beforehand.
    pub(crate) fn with_id_prefix(mut self, prefix: &str) -> Self {
        prefix.clone_into(&mut self.id_prefix);
        self
    }

    pub(crate) async fn run(mut self) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let finished = loop {
            let send_at = self.send_at(Instant::now());
            // With a closed window, the next stanza waits for the oldest to be acknowledged.
            let ack = self
                .window
                .as_mut()
                .filter(|_| send_at.is_some())
                .and_then(|w| w.waiting_for(Instant::now()))
                .map(|(token, _)| token.clone());
            tokio::select! {
                event = self.stream.next() => match event {
                    Some(Event::Stream(e)) => self.on_stream_event(e),
                    Some(Event::Stanza(s)) => self.on_stanza(s),
                    None => {
                        tracing::error!("the XMPP stream ended for good");
                        break None;
                    }
                },
                command = self.commands.recv() => match command {
                    Some(Command::Shutdown(done)) => break Some(done),
                    Some(command) => self.on_command(command),
                    None => break None,
                },
                resolution = resolved(&mut self.external.resolving) => {
                    self.on_resolved(resolution);
                }
                () = claims_changed(&mut self.claims) => self.on_claims(),
                _ = tick.tick() => self.on_tick(Instant::now()),
                () = until(send_at) => {}
                () = acknowledged(ack) => {}
            }
            self.flush().await;
        };
        self.close().await;
        if let Some(done) = finished {
            // The handle may have stopped waiting; nothing to do then.
            let _ = done.send(());
        }
    }

    /// Queues the stanzas that handling one input produced, sends what the pace allows, and
    /// hands the events to the core.
    async fn flush(&mut self) {
        let now = Instant::now();
        for (class, stanza) in std::mem::take(&mut self.outbox) {
            if self.queue.push(class, now, Queued::Stanza(stanza)).is_err() {
                self.drop_stanza(DropReason::QueueFull, "the send queue is full");
            }
        }
        while self.send_at(now).is_some_and(|at| at <= now) {
            let Some((queued_at, queued)) = self.queue.pop() else {
                break;
            };
            let stanza = self.prepare(queued, now);
            let waited = now.saturating_duration_since(queued_at).as_millis();
            let bytes = wire_len(&stanza);
            if let Some(bucket) = &mut self.bucket {
                bucket.take(now, bytes);
            }
            self.shared.count_traffic(|t| {
                t.stanzas_sent += 1;
                t.send_wait_max_ms = t
                    .send_wait_max_ms
                    .max(u64::try_from(waited).unwrap_or(u64::MAX));
            });
            // IQs are tracked by their id; the token only tells when the server has the stanza.
            let token = self.stream.send(Box::new(stanza)).await;
            if let Some(window) = &mut self.window {
                window.sent(token, bytes, now);
            }
        }
        let queued = self.queue.len() as u64;
        self.shared.count_traffic(|t| t.send_queue = queued);
        for event in std::mem::take(&mut self.out) {
            if self.events.send(event).is_err() {
                tracing::debug!("nobody listens to XMPP events any more");
            }
        }
    }

    /// When the next queued stanza may go, at the latest (an acknowledgement from the server
    /// may open the window before): `None` when nothing waits or the stream is down.
    fn send_at(&mut self, now: Instant) -> Option<Instant> {
        if !self.online || self.queue.is_empty() {
            return None;
        }
        let paced = self.bucket.as_mut().map_or(now, |b| b.ready_at(now));
        let Some(window) = &mut self.window else {
            return Some(paced);
        };
        Some(
            window
                .waiting_for(now)
                .map_or(paced, |(_, at)| paced.max(at)),
        )
    }

    /// Turns a queued item into the stanza to send; a signal's answer is timed from now.
    fn prepare(&mut self, queued: Queued, now: Instant) -> Stanza {
        let (id, jid, Outgoing { to, signal, .. }) = match queued {
            Queued::Stanza(stanza) => return stanza,
            Queued::Signal { id, jid, out } => (id, jid, out),
        };
        if let Some(pending) = self.pending.get_mut(&id) {
            pending.deadline = Some(now + SIGNAL_TIMEOUT);
        }
        let (payload, left_out) = jingle::to_element(&signal, &Jid::from(self.me.clone()));
        if left_out > 0 {
            tracing::warn!(%to, session = signal.session(), left_out, "too many candidates; sent the first {}", jingle::MAX_CANDIDATES);
            for _ in 0..left_out {
                self.shared.count(DropReason::OutgoingCandidatesOverLimit);
            }
        }
        let offer = matches!(signal, Signal::Initiate { .. });
        let repeated = offer && !self.first_offer_to(&to);
        self.shared.count_traffic(|t| {
            t.signals_sent += 1;
            t.offers_sent += u64::from(offer);
            t.offers_repeated += u64::from(repeated);
        });
        Iq::Set {
            from: None,
            to: Some(jid.into()),
            id,
            payload,
        }
        .into()
    }

    async fn close(mut self) {
        self.closing.send_replace(true);
        // Unsent signals no longer matter: the links end with the session.
        self.queue.drain().for_each(drop);
        if let Some(lookup) = self.external.resolving.take() {
            lookup.abort();
        }
        for (_, pending) in self.pending.drain() {
            if let Purpose::Affiliation { done } = pending.purpose {
                // The caller may have given up waiting.
                let _ = done.send(Err(Error::Closed));
            }
        }
        if self.online {
            for room in &self.rooms {
                if matches!(room.state, RoomState::Joined | RoomState::Configuring)
                    && let Some(to) = room.occupant_jid()
                {
                    self.outbox
                        .push((Class::Control, Presence::unavailable().with_to(to).into()));
                }
            }
            let mut last = None;
            for stanza in std::mem::take(&mut self.outbox)
                .into_iter()
                .map(|(_, stanza)| stanza)
                .chain([Presence::unavailable().into()])
            {
                self.shared.count_traffic(|t| t.stanzas_sent += 1);
                last = Some(self.stream.send(Box::new(stanza)).await);
            }
            if let Some(mut token) = last
                && timeout(Duration::from_secs(2), token.wait_for(StanzaStage::Sent))
                    .await
                    .is_err()
            {
                tracing::debug!("unavailable presence not sent within 2 s");
            }
            if timeout(Duration::from_secs(5), self.stream.close())
                .await
                .is_err()
            {
                tracing::debug!("the XMPP stream did not close within 5 s");
            }
        }
        self.shared.update(|s| s.state = State::Closed);
    }

    fn next_id(&mut self) -> String {
        self.next_id += 1;
        format!("{}-{}", self.id_prefix, self.next_id)
    }

    fn iq(&mut self, to: Option<Jid>, set: bool, payload: Element, purpose: Purpose) {
        let id = self.next_id();
        let timeout = match purpose {
            Purpose::Signal { .. } => SIGNAL_TIMEOUT,
            _ => SERVER_IQ_TIMEOUT,
        };
        let iq = if set {
            Iq::Set {
                from: None,
                to: to.clone(),
                id: id.clone(),
                payload,
            }
        } else {
            Iq::Get {
                from: None,
                to: to.clone(),
                id: id.clone(),
                payload,
            }
        };
        self.outbox.push((Class::Control, iq.into()));
        self.pending.insert(
            id,
            Pending {
                to,
                deadline: Some(Instant::now() + timeout),
                purpose,
            },
        );
    }

    fn reply(&mut self, to: Option<Jid>, id: String, payload: Option<Element>) {
        let class = self.reply_class(to.as_ref());
        self.outbox.push((
            class,
            Iq::Result {
                from: None,
                to,
                id,
                payload,
            }
            .into(),
        ));
    }

    fn reply_error(
        &mut self,
        to: Option<Jid>,
        id: String,
        type_: ErrorType,
        condition: DefinedCondition,
        text: &str,
    ) {
        let class = self.reply_class(to.as_ref());
        self.outbox.push((
            class,
            Iq::Error {
                from: None,
                to,
                id,
                error: StanzaError::new(type_, condition, "en", text),
                payload: None,
            }
            .into(),
        ));
    }

    /// Answers go before everything else, except answers to strangers: those go last, and
    /// only a few may wait, so that a stranger's flood of requests cannot hold up this device's
    /// own stanzas.
    fn reply_class(&self, to: Option<&Jid>) -> Class {
        if self.may_ask(to) {
            Class::Control
        } else {
            Class::Stranger
        }
    }

    fn drop_stanza(&self, reason: DropReason, detail: impl std::fmt::Display) {
        count_drop(&self.shared, reason, detail);
    }

    // ---- the stream comes and goes ----

    fn on_stream_event(&mut self, event: StreamEvent) {
        match event {
            StreamEvent::Reset {
                bound_jid,
                features,
            } => {
                self.window = features.stream_management.is_some().then(Window::new);
                self.on_fresh_stream(bound_jid);
            }
            StreamEvent::Resumed => {
                tracing::info!("XMPP stream resumed");
                // What was not acknowledged is sent again by the stream: start afresh.
                if let Some(window) = &mut self.window {
                    window.clear();
                }
                self.online = true;
                self.shared.update(|s| {
                    s.state = State::Online;
                    s.reconnects += 1;
                    s.resumptions += 1;
                    s.last_error = None;
                });
                // Nothing was lost: say everything again from what we know.
                self.out.push(OsnEvent::Online {
                    me: self.device_id(),
                });
                self.social.restart(false);
                self.publish_social();
                for i in 0..self.rooms.len() {
                    self.rooms[i].view.restart(false);
                    self.publish_room(i);
                }
                // The server kept our presences; claims changed meanwhile go out now.
                if std::mem::take(&mut self.social_claim_unsent) {
                    self.send_social_presence();
                }
                for i in 0..self.rooms.len() {
                    if self.rooms[i].state == RoomState::Joined && self.rooms[i].claim_unsent {
                        self.send_room_presence(i);
                    }
                }
                if !self.external_busy() {
                    self.query_external_services();
                }
            }
            StreamEvent::Suspended => {
                if self.online {
                    tracing::warn!("lost the connection to the XMPP server; reconnecting");
                    self.online = false;
                    self.shared.update(|s| s.state = State::Reconnecting);
                    self.out.push(OsnEvent::Offline);
                }
            }
        }
    }

    fn device_id(&self) -> DeviceId {
        DeviceId::new(self.own.to_string(), self.me.resource().as_str())
    }

    fn on_fresh_stream(&mut self, bound: Jid) {
        match bound.try_into_full() {
            Ok(full) if full.to_bare() == self.own => self.me = full,
            other => tracing::warn!(?other, "the server bound an unexpected JID; keeping ours"),
        }
        tracing::info!(jid = %self.me, "online");
        let reconnect = self.ever_online;
        self.online = true;
        self.ever_online = true;
        let bound = self.me.to_string();
        self.shared.update(|s| {
            s.state = State::Online;
            s.bound = Some(bound);
            s.last_error = None;
            if reconnect {
                s.reconnects += 1;
            }
        });
        // What waited to be sent belonged to the old stream: its presences and answers are
        // moot, and its signals fail below with the requests of the old stream, whose answers
        // will never come.
        self.queue.drain().for_each(drop);
        for (_, pending) in std::mem::take(&mut self.pending) {
            self.fail(pending.purpose, Error::Offline);
        }
        self.out.push(OsnEvent::Online {
            me: self.device_id(),
        });

        // The contacts stay until the new roster replaces them: they answer who may send us a
        // link offer meanwhile.
        self.roster_loaded = false;
        self.presences.clear();
        self.social.restart(true);
        if self.cfg.social {
            self.shared.waiting_for("the roster");
            self.iq(
                None,
                false,
                Roster {
                    ver: None,
                    items: vec![],
                }
                .into(),
                Purpose::Roster,
            );
        }
        self.social_claim_unsent = false;
        self.send_social_presence();
        // Every room, failed ones too: a revoked membership may have been granted again.
        for i in 0..self.rooms.len() {
            let room = &mut self.rooms[i];
            room.occupants.clear();
            room.view.restart(true);
            self.join(i);
        }
        self.query_external_services();
        self.check_ready();
    }

    /// Completes the first login once the roster is in and every room is joined.
    fn check_ready(&mut self) {
        if self.ready.is_none() {
            return;
        }
        if let Some(failed) = self.rooms.iter().find_map(|r| match &r.state {
            RoomState::Failed(why) => Some((r.jid.to_string(), why.clone())),
            _ => None,
        }) {
            if let Some(ready) = self.ready.take() {
                // connect() may have timed out already.
                let _ = ready.send(Err(LoginError::RoomRefused {
                    room: failed.0,
                    why: failed.1,
                }));
            }
            return;
        }
        if self.cfg.social && !self.roster_loaded {
            return;
        }
        if let Some(room) = self.rooms.iter().find(|r| r.state != RoomState::Joined) {
            self.shared
                .waiting_for(format!("joining the room {}", room.jid));
            return;
        }
        if let Some(ready) = self.ready.take() {
            // connect() may have timed out already.
            let _ = ready.send(Ok(()));
        }
    }

    fn on_tick(&mut self, now: Instant) {
        if self.online && now >= self.next_address_check {
            self.next_address_check = now + ADDRESS_CHECK;
            let server_ip = self.login.server_ip();
            self.shared.update(|s| s.server_ip = server_ip);
            if let Some(gone) = self.login.drop_if_address_gone() {
                tracing::info!(
                    "the address {gone} of the XMPP connection left this host (a new network); \
                     reconnecting"
                );
            }
        }
        let expired: Vec<String> = self
            .pending
            .iter()
            .filter(|(_, p)| p.deadline.is_some_and(|d| d <= now))
            .map(|(id, _)| id.clone())
            .collect();
        for id in expired {
            if let Some(pending) = self.pending.remove(&id) {
                let who = pending
                    .to
                    .as_ref()
                    .map_or_else(|| "the XMPP server".to_owned(), Jid::to_string);
                match pending.purpose {
                    // Offline, the next fresh stream asks again anyway.
                    Purpose::Roster if !self.online => {}
                    Purpose::Roster => {
                        tracing::warn!("no roster from the server in time; asking again");
                        self.iq(
                            None,
                            false,
                            Roster {
                                ver: None,
                                items: vec![],
                            }
                            .into(),
                            Purpose::Roster,
                        );
                    }
                    purpose => self.fail(purpose, Error::Timeout(who)),
                }
            }
        }
        if self.social_sweep_at.is_some_and(|at| at <= now) {
            self.social_sweep_at = None;
            self.social.sweep(&OverlayId::Social, &mut self.out);
        }
        for room in &mut self.rooms {
            if room.sweep_at.is_some_and(|at| at <= now) {
                room.sweep_at = None;
                room.view.sweep(&room.overlay, &mut self.out);
            }
        }
        if self.online {
            for i in 0..self.rooms.len() {
                if let RoomState::Out {
                    rejoin_at: Some(at),
                } = self.rooms[i].state
                    && at <= now
                {
                    self.join(i);
                }
            }
            if self.external.renew_at.is_some_and(|at| at <= now) && !self.external_busy() {
                self.query_external_services();
            }
        }
    }

    /// An outgoing request failed: tell whoever waits for it.
    fn fail(&mut self, purpose: Purpose, error: Error) {
        match purpose {
            Purpose::Signal { to, session } => {
                tracing::debug!(%to, session, "signal failed: {error}");
                self.shared.count_traffic(|t| match &error {
                    Error::Refused { .. } => t.signals_refused += 1,
                    Error::Timeout(_) => t.signals_timed_out += 1,
                    _ => t.signals_unsent += 1,
                });
                self.out.push(OsnEvent::SignalFailed {
                    to,
                    session,
                    reason: error.to_string(),
                });
            }
            Purpose::Affiliation { done } => {
                // The caller may have given up waiting.
                let _ = done.send(Err(error));
            }
            Purpose::RoomConfig { room } => {
                self.room_failed(room, format!("could not configure the new room: {error}"));
            }
            Purpose::Roster => {}
            Purpose::ExternalServices => self.external_services_failed(error.to_string()),
            Purpose::ExternalCredentials { services } => {
                tracing::debug!("no TURN credentials from the XMPP server: {error}");
                self.resolve_external_services(extdisco::usable(services));
            }
        }
    }

    // ---- our own claims ----

    /// Our available presence to the roster, with our social claim. Without the social
    /// overlay it says nothing about ipop, so that roster contacts do not take the device
    /// for a peer.
    fn send_social_presence(&mut self) {
        let presence = if self.cfg.social {
            announce::presence(
                &self.cfg.key,
                self.cfg.social_claim,
                self.cfg.relay.as_ref(),
                &self.cfg.social_routes,
                self.cfg.exit_dns,
            )
        } else {
            announce::unannounced_presence()
        };
        self.outbox.push((Class::Control, presence.into()));
    }

    /// Our available presence to a room we are in, with our claim there.
    fn send_room_presence(&mut self, i: usize) {
        let room = &mut self.rooms[i];
        room.claim_unsent = false;
        let Some(to) = room.occupant_jid() else {
            return;
        };
        let mut presence = announce::presence(
            &self.cfg.key,
            room.claim,
            self.cfg.relay.as_ref(),
            &room.routes,
            self.cfg.exit_dns,
        );
        presence.to = Some(to.into());
        self.outbox.push((Class::Control, presence.into()));
    }

    fn on_claims(&mut self) {
        let claims = self.claims.borrow_and_update().clone();
        for (overlay, claim) in claims {
            self.set_claim(&overlay, claim);
        }
    }

    /// Keeps `claim` as ours in `overlay` and tells the overlay now if we can, at the next
    /// chance otherwise.
    fn set_claim(&mut self, overlay: &OverlayId, claim: Option<Claim>) {
        match overlay {
            OverlayId::Social => {
                if self.cfg.social_claim == claim {
                    return;
                }
                tracing::debug!(?claim, "new claim in the social overlay");
                self.cfg.social_claim = claim;
                if self.online {
                    self.send_social_presence();
                } else {
                    self.social_claim_unsent = true;
                }
            }
            OverlayId::Group(_) => {
                let Some(i) = self.rooms.iter().position(|r| r.overlay == *overlay) else {
                    return;
                };
                let room = &mut self.rooms[i];
                if room.claim == claim {
                    return;
                }
                tracing::debug!(room = %room.jid, ?claim, "new claim in the group");
                room.claim = claim;
                if self.online && room.state == RoomState::Joined {
                    self.send_room_presence(i);
                } else {
                    room.claim_unsent = true;
                }
            }
        }
    }

    // ---- commands from the daemon ----

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Signal(out) => self.send_signal(out),
            Command::Affiliation {
                room,
                jid,
                affiliation,
                done,
            } => {
                if !self.online {
                    // The caller may have given up waiting.
                    let _ = done.send(Err(Error::Offline));
                    return;
                }
                self.iq(
                    Some(room.clone().into()),
                    true,
                    muc::set_affiliation(&jid, affiliation),
                    Purpose::Affiliation { done },
                );
            }
            Command::Shutdown(_) => {}
        }
    }

    fn send_signal(&mut self, out: Outgoing) {
        let session = out.signal.session().to_owned();
        if !self.online {
            self.fail(
                Purpose::Signal {
                    to: out.to,
                    session,
                },
                Error::Offline,
            );
            return;
        }
        let Ok(jid) = FullJid::new(&out.to.to_string()) else {
            let error = Error::InvalidJid {
                jid: out.to.to_string(),
                why: "not a full JID".to_owned(),
            };
            self.fail(
                Purpose::Signal {
                    to: out.to,
                    session,
                },
                error,
            );
            return;
        };
        if self.coalesce(&out) {
            return;
        }
        let class = match out.signal {
            Signal::Initiate { .. } if out.urgent => Class::Urgent,
            Signal::Initiate { .. } => Class::Background,
            _ => Class::Answer,
        };
        let id = self.next_id();
        let to = out.to.clone();
        let queued = Queued::Signal {
            id: id.clone(),
            jid: jid.clone(),
            out,
        };
        if self.queue.push(class, Instant::now(), queued).is_err() {
            self.fail(Purpose::Signal { to, session }, Error::Busy);
            return;
        }
        self.pending.insert(
            id,
            Pending {
                to: Some(jid.into()),
                deadline: None,
                purpose: Purpose::Signal { to, session },
            },
        );
    }

    /// Takes back what waits in the send queue for a session the other side ended (an answer
    /// it gave up waiting for): sending it would only cost the rate limit.
    fn drop_queued(&mut self, to: &DeviceId, session: &str) {
        let mut taken = Vec::new();
        self.queue.retain(|q| match q {
            Queued::Signal { id, out, .. } if out.to == *to && out.signal.session() == session => {
                taken.push(id.clone());
                false
            }
            _ => true,
        });
        for id in &taken {
            self.pending.remove(id);
        }
        if !taken.is_empty() {
            tracing::debug!(%to, session, "the other side ended the session: its queued signals are not sent");
            let n = taken.len() as u64;
            self.shared.count_traffic(|t| t.signals_coalesced += n);
        }
    }

    /// Folds `out` into the queued signals of its link session: candidates join the offer or
    /// answer they follow, and the end of a session whose offer was never sent takes the
    /// offer back (the other side never hears of it). True when nothing is left to send.
    fn coalesce(&mut self, out: &Outgoing) -> bool {
        let session = out.signal.session();
        let same = |q: &Queued| {
            matches!(q, Queued::Signal { out: o, .. }
                if o.to == out.to && o.signal.session() == session)
        };
        let folded = match &out.signal {
            Signal::Terminate { .. } => {
                let unsent_offer = self.queue.iter_mut().any(|q| {
                    same(q)
                        && matches!(q, Queued::Signal { out: o, .. }
                            if matches!(o.signal, Signal::Initiate { .. }))
                });
                if !unsent_offer {
                    return false;
                }
                let mut taken = Vec::new();
                self.queue.retain(|q| match q {
                    Queued::Signal { id, .. } if same(q) => {
                        taken.push(id.clone());
                        false
                    }
                    _ => true,
                });
                for id in &taken {
                    self.pending.remove(id);
                }
                tracing::debug!(to = %out.to, session, "session ended before its offer went out: neither is sent");
                taken.len() as u64 + 1
            }
            Signal::Candidates { candidates, .. } => {
                let Some(offer) = self.queue.iter_mut().find_map(|q| match q {
                    Queued::Signal { out: o, .. }
                        if o.to == out.to && o.signal.session() == session =>
                    {
                        match &mut o.signal {
                            Signal::Initiate { offer, .. } | Signal::Accept { offer, .. } => {
                                Some(offer)
                            }
                            _ => None,
                        }
                    }
                    _ => None,
                }) else {
                    return false;
                };
                offer.candidates.extend(candidates.iter().cloned());
                1
            }
            Signal::Initiate { .. } | Signal::Accept { .. } | Signal::Punch { .. } => return false,
        };
        self.shared.count_traffic(|t| t.signals_coalesced += folded);
        true
    }

    /// Notes that a link offer goes to `device`; false if one went there before (as far as
    /// up to [`MAX_DEVICES`] devices offered to are remembered).
    fn first_offer_to(&mut self, device: &DeviceId) -> bool {
        if self.offered.contains(device) {
            return false;
        }
        if self.offered.len() >= MAX_DEVICES {
            self.offered.clear();
        }
        self.offered.insert(device.clone());
        true
    }

    // ---- stanzas ----

    fn on_stanza(&mut self, stanza: Stanza) {
        self.shared.count_traffic(|t| t.stanzas_received += 1);
        // What the guard on the stream dropped was counted and logged there; a request is
        // answered, anything else is left alone.
        let dropped = match &stanza {
            Stanza::Iq(Iq::Get { payload, .. } | Iq::Set { payload, .. }) => {
                dropped_reason(std::slice::from_ref(payload))
            }
            Stanza::Iq(_) => None,
            Stanza::Presence(p) => dropped_reason(&p.payloads),
            Stanza::Message(m) => dropped_reason(&m.payloads),
        };
        if let Some(reason) = dropped {
            if let Stanza::Iq(Iq::Get { from, id, .. } | Iq::Set { from, id, .. }) = stanza {
                self.reply_error(
                    from,
                    id,
                    ErrorType::Modify,
                    DefinedCondition::PolicyViolation,
                    &format!("dropped by ipop: {reason}"),
                );
            }
            return;
        }
        match stanza {
            Stanza::Iq(iq) => self.on_iq(iq),
            Stanza::Presence(p) => self.on_presence(p),
            Stanza::Message(m) => self.on_message(m),
        }
    }

    fn on_message(&mut self, message: Message) {
        // ipop never reads or answers messages; chat to the bare JID goes to the user's chat
        // client anyway, because of our negative priority.
        let from = message
            .from
            .as_ref()
            .map(Jid::to_string)
            .unwrap_or_default();
        self.drop_stanza(DropReason::Message, format_args!("message from {from}"));
    }

    fn on_iq(&mut self, iq: Iq) {
        match iq {
            Iq::Get {
                from, id, payload, ..
            } => {
                if !self.may_ask(from.as_ref()) {
                    // Strangers learn nothing, not even that an ipop device is online here.
                    self.stranger_iq(from, id, &payload);
                } else if payload.is("query", ns::DISCO_INFO) {
                    let node = payload.attr("node").map(str::to_owned);
                    if node.is_none() || node.as_deref() == Some(&announce::caps_node_ver()) {
                        self.reply(from, id, Some(announce::disco_info(node).into()));
                    } else {
                        self.reply_error(
                            from,
                            id,
                            ErrorType::Cancel,
                            DefinedCondition::ItemNotFound,
                            "unknown node",
                        );
                    }
                } else if payload.is("ping", ns::PING) {
                    self.reply(from, id, None);
                } else {
                    self.unsupported_iq(from, id, &payload);
                }
            }
            Iq::Set {
                from, id, payload, ..
            } => {
                if payload.is("jingle", ns::JINGLE) && !self.may_ask(from.as_ref()) {
                    self.stranger_iq(from, id, &payload);
                } else if payload.is("jingle", ns::JINGLE) {
                    self.on_jingle(from, id, &payload);
                } else if payload.is("query", ns::ROSTER) {
                    self.on_roster_push(from, id, payload);
                } else {
                    self.unsupported_iq(from, id, &payload);
                }
            }
            Iq::Result {
                from, id, payload, ..
            } => self.on_response(from, id, Ok(payload)),
            Iq::Error {
                from, id, error, ..
            } => self.on_response(from, id, Err(error)),
        }
    }

    /// Whether `from` may ask this device anything: our server or account, or a user that an
    /// overlay authorises (a friend, a member of one of our rooms).
    fn may_ask(&self, from: Option<&Jid>) -> bool {
        let Some(from) = from else {
            return true;
        };
        let bare = from.to_bare();
        if bare == self.own || (bare.node().is_none() && bare.domain() == self.own.domain()) {
            return true;
        }
        (self.cfg.social && self.contacts.get(&bare) == Some(&Subscription::Both))
            || self.rooms.iter().any(|r| r.members.contains(&bare))
    }

    /// An IQ request from someone no overlay authorises: answered as by a client that serves
    /// nothing, counted, and logged at most once per sender a minute.
    fn stranger_iq(&mut self, from: Option<Jid>, id: String, payload: &Element) {
        let who = from.as_ref().map(Jid::to_string).unwrap_or_default();
        if payload.is("jingle", ns::JINGLE) {
            self.shared.count(DropReason::JingleFromStranger);
            let user = from
                .as_ref()
                .map(|f| f.to_bare().to_string())
                .unwrap_or_default();
            if self.shared.logs.allow(&format!("stranger {user}")) {
                tracing::warn!(
                    "refused a link offer from {who}: no overlay authorises {user}; \
                     more from them are counted and logged at most once a minute"
                );
            } else {
                tracing::debug!("refused a link offer from {who}");
            }
        } else {
            self.drop_stanza(
                DropReason::UnsupportedIq,
                format_args!("IQ {{{}}}{} from {who}", payload.ns(), payload.name()),
            );
        }
        self.reply_error(
            from,
            id,
            ErrorType::Cancel,
            DefinedCondition::ServiceUnavailable,
            "",
        );
    }

    fn unsupported_iq(&mut self, from: Option<Jid>, id: String, payload: &Element) {
        self.drop_stanza(
            DropReason::UnsupportedIq,
            format_args!("IQ {{{}}}{}", payload.ns(), payload.name()),
        );
        self.reply_error(
            from,
            id,
            ErrorType::Cancel,
            DefinedCondition::ServiceUnavailable,
            "not served by ipop",
        );
    }

    fn on_jingle(&mut self, from: Option<Jid>, id: String, payload: &Element) {
        let Some(sender) = from.as_ref().and_then(|f| f.try_as_full().ok()).cloned() else {
            self.drop_stanza(DropReason::JingleNotFromDevice, "Jingle from a bare JID");
            self.reply_error(
                from,
                id,
                ErrorType::Modify,
                DefinedCondition::BadRequest,
                "Jingle comes from a device",
            );
            return;
        };
        match jingle::from_element(payload) {
            Ok(signal) => {
                self.shared.count_traffic(|t| t.signals_received += 1);
                self.reply(from, id, None);
                let from = DeviceId::new(sender.to_bare().to_string(), sender.resource().as_str());
                if let Signal::Terminate { session, .. } = &signal {
                    self.drop_queued(&from, session);
                }
                self.out.push(OsnEvent::Signal { from, signal });
            }
            Err(malformed) => {
                let (reason, condition) = match malformed {
                    Malformed::UnsupportedAction(_) => (
                        DropReason::UnsupportedJingleAction,
                        DefinedCondition::FeatureNotImplemented,
                    ),
                    Malformed::TooManyCandidates => {
                        (DropReason::TooManyCandidates, DefinedCondition::BadRequest)
                    }
                    _ => (DropReason::MalformedJingle, DefinedCondition::BadRequest),
                };
                self.drop_stanza(reason, format_args!("Jingle from {sender}: {malformed}"));
                self.reply_error(
                    from,
                    id,
                    ErrorType::Cancel,
                    condition,
                    &malformed.to_string(),
                );
            }
        }
    }

    /// Whether a response to `pending` may come from `from`.
    fn answers(&self, pending: &Pending, from: Option<&Jid>) -> bool {
        match (&pending.to, from) {
            (None, None) => true,
            (None, Some(from)) => {
                from.as_str() == self.own.as_str() || from.as_str() == self.me.as_str()
            }
            (Some(to), Some(from)) => to == from,
            (Some(_), None) => false,
        }
    }

    fn on_response(
        &mut self,
        from: Option<Jid>,
        id: String,
        result: Result<Option<Element>, StanzaError>,
    ) {
        let known = self
            .pending
            .get(&id)
            .map(|p| self.answers(p, from.as_ref()));
        let Some(true) = known else {
            self.drop_stanza(
                DropReason::UnexpectedIqResponse,
                format_args!(
                    "IQ response {id} from {}",
                    from.as_ref().map(Jid::to_string).unwrap_or_default()
                ),
            );
            return;
        };
        let Some(pending) = self.pending.remove(&id) else {
            return;
        };
        match (pending.purpose, result) {
            (Purpose::Signal { .. }, Ok(_)) => {}
            (Purpose::Roster, Ok(payload)) => self.on_roster(payload),
            (Purpose::Roster, Err(error)) => {
                tracing::warn!("the server refused the roster: {}", muc::describe(&error));
                self.roster_loaded = true;
                self.publish_social();
                self.check_ready();
            }
            (Purpose::RoomConfig { room }, Ok(_)) => {
                tracing::info!(room = %self.rooms[room].jid, "created and configured the room");
                self.rooms[room].state = RoomState::Joined;
                self.room_joined(room);
            }
            (Purpose::Affiliation { done }, Ok(_)) => {
                // The caller may have given up waiting.
                let _ = done.send(Ok(()));
            }
            (Purpose::ExternalServices, Ok(payload)) => self.on_external_services(payload),
            (Purpose::ExternalCredentials { services }, Ok(payload)) => {
                self.on_external_credentials(services, payload);
            }
            (purpose, Err(error)) => {
                let by = pending
                    .to
                    .map_or_else(|| "the XMPP server".to_owned(), |j| j.to_string());
                let error = Error::Refused {
                    by,
                    why: muc::describe(&error),
                };
                self.fail(purpose, error);
            }
        }
    }

    // ---- STUN and TURN servers from the XMPP server (XEP-0215) ----

    /// Whether a query, a credentials request or a lookup is under way.
    fn external_busy(&self) -> bool {
        self.external.resolving.is_some()
            || self.pending.values().any(|p| {
                matches!(
                    p.purpose,
                    Purpose::ExternalServices | Purpose::ExternalCredentials { .. }
                )
            })
    }

    fn server_jid(&self) -> Jid {
        BareJid::from_parts(None, self.own.domain()).into()
    }

    fn query_external_services(&mut self) {
        if let Some(lookup) = self.external.resolving.take() {
            lookup.abort();
        }
        self.external.renew_at = None;
        let server = self.server_jid();
        tracing::debug!(%server, "asking for STUN/TURN servers (XEP-0215)");
        self.iq(
            Some(server),
            false,
            extdisco::query(),
            Purpose::ExternalServices,
        );
    }

    /// Reads an offer and counts what was wrong with it.
    fn read_offer(&self, payload: Option<Element>) -> Result<Vec<Offered>, String> {
        // An empty result says "no services".
        let Some(payload) = payload else {
            return Ok(Vec::new());
        };
        let offer = extdisco::parse(&payload).inspect_err(|why| {
            self.drop_stanza(DropReason::MalformedExternalService, why);
        })?;
        for _ in 0..offer.malformed {
            self.shared.count(DropReason::MalformedExternalService);
        }
        if offer.over_limit > 0 {
            tracing::debug!(
                dropped = offer.over_limit,
                "more than {} STUN/TURN servers offered",
                extdisco::MAX_SERVICES
            );
            for _ in 0..offer.over_limit {
                self.shared.count(DropReason::ExternalServicesOverLimit);
            }
        }
        Ok(offer.services)
    }

    fn on_external_services(&mut self, payload: Option<Element>) {
        let mut services = match self.read_offer(payload) {
            Ok(services) => services,
            Err(why) => {
                self.external_services_failed(format!("unreadable answer: {why}"));
                return;
            }
        };
        extdisco::share_credentials(&mut services);
        if let Some(request) = extdisco::credentials_request(&services) {
            let server = self.server_jid();
            self.iq(
                Some(server),
                false,
                request,
                Purpose::ExternalCredentials { services },
            );
            return;
        }
        self.resolve_external_services(services);
    }

    fn on_external_credentials(&mut self, mut services: Vec<Offered>, payload: Option<Element>) {
        match self.read_offer(payload) {
            Ok(answer) => extdisco::apply_credentials(&mut services, &answer),
            Err(why) => tracing::debug!("unreadable TURN credentials: {why}"),
        }
        self.resolve_external_services(extdisco::usable(services));
    }

    fn resolve_external_services(&mut self, services: Vec<Offered>) {
        if services.is_empty() {
            self.on_resolved(Some(Resolution::default()));
        } else {
            self.external.resolving = Some(tokio::spawn(extdisco::resolve(services)));
        }
    }

    /// Reports the servers to the core: whenever there are some (new credentials, or a fresh
    /// stream), and once more when there are none left.
    fn on_resolved(&mut self, resolution: Option<Resolution>) {
        let Some(Resolution {
            servers,
            unresolved,
        }) = resolution
        else {
            self.external_services_failed("the host name lookup failed".to_owned());
            return;
        };
        if servers.is_empty() && !unresolved.is_empty() {
            let names: Vec<String> = unresolved.into_iter().collect();
            self.external_services_failed(format!("no address for {}", names.join(", ")));
            return;
        }
        self.external.renew_at = extdisco::renew_delay(&servers, SystemTime::now()).map(|d| {
            tracing::debug!("asking for fresh TURN credentials in {d:?}");
            Instant::now() + d
        });
        let report = !servers.is_empty() || !self.external.announced.is_empty();
        self.external.announced = servers;
        let problem = if !unresolved.is_empty() {
            let names: Vec<String> = unresolved.into_iter().collect();
            Some(format!("no address for {}", names.join(", ")))
        } else if self.external.announced.is_empty() {
            Some("the XMPP server offers no STUN or TURN server that ipop uses".to_owned())
        } else {
            None
        };
        self.update_external_status(problem);
        if report {
            tracing::info!(
                count = self.external.announced.len(),
                "STUN/TURN servers from the XMPP server"
            );
            self.announce_external();
        } else {
            tracing::debug!("the XMPP server offers no STUN/TURN servers");
        }
    }

    /// The query gave nothing: what was reported stays until its credentials expire, and while
    /// some may, ask again soon.
    fn external_services_failed(&mut self, why: String) {
        tracing::debug!("no STUN/TURN servers from the XMPP server (XEP-0215): {why}");
        if extdisco::prune_expired(&mut self.external.announced, SystemTime::now()) {
            tracing::info!("TURN credentials from the XMPP server expired");
            self.announce_external();
        }
        self.external.renew_at = self
            .external
            .announced
            .iter()
            .any(|s| s.expires.is_some())
            .then(|| Instant::now() + EXTERNAL_RETRY);
        self.update_external_status(Some(why));
    }

    fn announce_external(&mut self) {
        self.out.push(OsnEvent::IceServers(
            self.external
                .announced
                .iter()
                .map(|s| s.server.clone())
                .collect(),
        ));
    }

    fn update_external_status(&self, problem: Option<String>) {
        let services = self
            .external
            .announced
            .iter()
            .map(|s| ExternalServiceStatus {
                kind: s.server.kind,
                transport: s.server.transport,
                host: s.server.host.clone(),
                address: s.server.address,
                credentials: s.server.username.is_some(),
                expires: s.expires,
            })
            .collect();
        self.shared.update(|s| {
            s.external_services = services;
            s.external_services_problem = problem;
        });
    }

    // ---- the social overlay ----

    fn on_roster(&mut self, payload: Option<Element>) {
        let roster = match payload.map(Roster::try_from) {
            Some(Ok(roster)) => roster,
            Some(Err(e)) => {
                self.drop_stanza(DropReason::MalformedRoster, format_args!("roster: {e}"));
                Roster {
                    ver: None,
                    items: vec![],
                }
            }
            None => Roster {
                ver: None,
                items: vec![],
            },
        };
        self.contacts = roster
            .items
            .into_iter()
            .filter(|i| i.subscription != Subscription::Remove)
            .take(MAX_DEVICES)
            .map(|i| (i.jid, i.subscription))
            .collect();
        self.roster_loaded = true;
        tracing::debug!(contacts = self.contacts.len(), "roster loaded");
        self.publish_social();
        if !self.social.stale.is_empty() {
            self.social_sweep_at = Some(Instant::now() + RESYNC_GRACE);
        }
        self.check_ready();
    }

    fn on_roster_push(&mut self, from: Option<Jid>, id: String, payload: Element) {
        // RFC 6121 §2.1.6: a push comes from our own account, or from nobody (the server).
        if from.as_ref().is_some_and(|f| f.to_bare() != self.own) {
            self.drop_stanza(
                DropReason::SpoofedRosterPush,
                format_args!(
                    "roster push from {}",
                    from.as_ref().map(Jid::to_string).unwrap_or_default()
                ),
            );
            self.reply_error(
                from,
                id,
                ErrorType::Cancel,
                DefinedCondition::ServiceUnavailable,
                "",
            );
            return;
        }
        let item: Option<RosterItem> = match Roster::try_from(payload) {
            Ok(mut roster) if roster.items.len() == 1 => roster.items.pop(),
            Ok(_) => None,
            Err(_) => None,
        };
        let Some(item) = item else {
            self.drop_stanza(
                DropReason::MalformedRoster,
                "roster push without exactly one item",
            );
            self.reply_error(
                from,
                id,
                ErrorType::Modify,
                DefinedCondition::BadRequest,
                "",
            );
            return;
        };
        self.reply(from, id, None);
        if !self.cfg.social {
            return;
        }
        if item.subscription == Subscription::Remove {
            self.contacts.remove(&item.jid);
        } else if self.contacts.len() < MAX_DEVICES || self.contacts.contains_key(&item.jid) {
            self.contacts.insert(item.jid, item.subscription);
        } else {
            self.drop_stanza(DropReason::TooManyDevices, "roster item over the limit");
        }
        self.publish_social();
    }

    fn publish_social(&mut self) {
        let friends = self
            .contacts
            .values()
            .filter(|s| **s == Subscription::Both)
            .count();
        if !self.cfg.social || !self.roster_loaded {
            return;
        }
        let mut members: BTreeSet<String> = self
            .contacts
            .iter()
            .filter(|(_, s)| **s == Subscription::Both)
            .map(|(j, _)| j.to_string())
            .collect();
        members.insert(self.own.to_string());
        // Every ipop device seen is reported, authorised or not: the core decides, and counts
        // and logs the devices it refuses.
        let devices: BTreeMap<DeviceId, Announced> = self
            .presences
            .iter()
            .map(|(jid, announced)| {
                (
                    DeviceId::new(jid.to_bare().to_string(), jid.resource().as_str()),
                    announced.clone(),
                )
            })
            .collect();
        let count = devices.len();
        self.social
            .publish(&OverlayId::Social, members, devices, &mut self.out);
        self.shared.update(|s| {
            s.friends = friends;
            s.social_devices = count;
        });
    }

    fn on_presence(&mut self, presence: Presence) {
        let Some(from) = presence.from.clone() else {
            return;
        };
        if let Some(i) = self.rooms.iter().position(|r| r.jid == from.to_bare()) {
            self.on_room_presence(i, from, presence);
            return;
        }
        match presence.type_ {
            PresenceType::Subscribe => {
                tracing::info!(%from, "subscription request; ipop leaves it to your chat client");
                return;
            }
            PresenceType::Subscribed
            | PresenceType::Unsubscribe
            | PresenceType::Unsubscribed
            | PresenceType::Probe => return,
            PresenceType::None | PresenceType::Unavailable | PresenceType::Error => {}
        }
        if !self.cfg.social {
            return;
        }
        let full = match from.try_into_full() {
            Ok(full) => full,
            Err(bare) => {
                // An unavailable or error presence from a bare JID: all its devices are gone.
                if presence.type_ != PresenceType::None {
                    self.presences.retain(|jid, _| jid.to_bare() != bare);
                    self.publish_social();
                }
                return;
            }
        };
        if full == self.me {
            return;
        }
        let announced = match presence.type_ {
            PresenceType::None => read_announced(&self.shared, &presence.payloads, &full),
            _ => None,
        };
        match &announced {
            Some(announced) => {
                if self.presences.len() >= MAX_DEVICES && !self.presences.contains_key(&full) {
                    self.drop_stanza(
                        DropReason::TooManyDevices,
                        format_args!("presence of {full}"),
                    );
                    return;
                }
                self.presences.insert(full.clone(), announced.clone());
            }
            None => {
                if self.presences.remove(&full).is_none() {
                    return;
                }
            }
        }
        if self.roster_loaded {
            let device = DeviceId::new(full.to_bare().to_string(), full.resource().as_str());
            self.social
                .update(&OverlayId::Social, device, announced, &mut self.out);
            let count = self.presences.len();
            self.shared.update(|s| s.social_devices = count);
        }
    }

    // ---- group rooms ----

    fn join(&mut self, i: usize) {
        let room = &mut self.rooms[i];
        let Some(to) = room.occupant_jid() else {
            self.room_failed(
                i,
                "the room JID and our nickname do not form a valid JID".to_owned(),
            );
            return;
        };
        tracing::debug!(room = %room.jid, nick = room.nick, "joining");
        room.state = RoomState::Joining;
        room.occupants.clear();
        room.claim_unsent = false;
        let mut presence = Presence::available()
            .with_to(to)
            .with_payloads(muc::join_payloads(
                &self.cfg.key,
                room.claim,
                self.cfg.relay.as_ref(),
                &room.routes,
                self.cfg.exit_dns,
            ));
        presence.priority = Priority(announce::PRIORITY);
        self.outbox.push((Class::Control, presence.into()));
        self.update_room_status();
    }

    fn room_failed(&mut self, i: usize, why: String) {
        let room = &mut self.rooms[i];
        tracing::error!(room = %room.jid, "{why}");
        if matches!(
            room.state,
            RoomState::Joined | RoomState::Joining | RoomState::Configuring
        ) && let Some(to) = room.occupant_jid()
        {
            self.outbox
                .push((Class::Control, Presence::unavailable().with_to(to).into()));
        }
        room.state = RoomState::Failed(why);
        self.clear_room(i);
        self.check_ready();
    }

    /// We are out of the room for good: nobody is authorised through it any more.
    fn clear_room(&mut self, i: usize) {
        let room = &mut self.rooms[i];
        room.occupants.clear();
        room.members.clear();
        room.sweep_at = None;
        if room.view.members.is_some() || !room.view.devices.is_empty() {
            room.view.publish(
                &room.overlay,
                BTreeSet::new(),
                BTreeMap::new(),
                &mut self.out,
            );
        }
        room.view.stale.clear();
        self.update_room_status();
    }

    fn room_joined(&mut self, i: usize) {
        self.publish_room(i);
        let room = &mut self.rooms[i];
        if !room.view.stale.is_empty() {
            room.sweep_at = Some(Instant::now() + RESYNC_GRACE);
        }
        if room.claim_unsent {
            self.send_room_presence(i);
        }
        self.check_ready();
    }

    fn publish_room(&mut self, i: usize) {
        let room = &mut self.rooms[i];
        if room.state == RoomState::Joined {
            let members: BTreeSet<String> = room.members.iter().map(BareJid::to_string).collect();
            let devices: BTreeMap<DeviceId, Announced> = room
                .occupants
                .values()
                .filter(|o| o.real != self.me)
                .filter_map(|o| {
                    o.announced.clone().map(|announced| {
                        (
                            DeviceId::new(o.real.to_bare().to_string(), o.real.resource().as_str()),
                            announced,
                        )
                    })
                })
                .collect();
            room.view
                .publish(&room.overlay, members, devices, &mut self.out);
        }
        self.update_room_status();
    }

    fn update_room_status(&self) {
        let rooms = self
            .rooms
            .iter()
            .map(|r| RoomStatus {
                room: r.jid.to_string(),
                joined: r.state == RoomState::Joined,
                members_present: r
                    .occupants
                    .values()
                    .filter(|o| o.affiliation.authorised())
                    .count(),
                problem: match &r.state {
                    RoomState::Failed(why) => Some(why.clone()),
                    RoomState::Out { .. } => {
                        Some("not in the room; joining again later".to_owned())
                    }
                    _ => None,
                },
            })
            .collect();
        self.shared.update(|s| s.rooms = rooms);
    }

    fn on_room_presence(&mut self, i: usize, from: Jid, presence: Presence) {
        let Ok(occupant) = from.try_into_full() else {
            tracing::debug!(room = %self.rooms[i].jid, "presence from the room itself ignored");
            return;
        };
        let nick = occupant.resource().as_str().to_owned();
        let is_self = nick == self.rooms[i].nick;
        if presence.type_ == PresenceType::Error {
            if is_self && matches!(self.rooms[i].state, RoomState::Joining) {
                let error = presence
                    .payloads
                    .iter()
                    .find(|p| p.is("error", ns::DEFAULT_NS))
                    .and_then(|p| StanzaError::try_from(p.clone()).ok());
                let why = muc::join_refusal(error.as_ref(), &self.own);
                self.room_failed(i, why);
            } else {
                tracing::debug!(%occupant, "error presence from a room ignored");
            }
            return;
        }
        if !matches!(
            presence.type_,
            PresenceType::None | PresenceType::Unavailable
        ) {
            return;
        }
        let info = match muc::read_occupant(&presence.payloads) {
            Ok(info) => info,
            Err(why) => {
                self.drop_stanza(
                    DropReason::MalformedOccupant,
                    format_args!("{occupant}: {why}"),
                );
                return;
            }
        };
        if is_self || info.has(muc::STATUS_SELF) {
            self.on_own_room_presence(i, presence.type_, &info);
            return;
        }
        let room = &mut self.rooms[i];
        if presence.type_ == PresenceType::Unavailable {
            let left = room.occupants.remove(&nick);
            // Going offline keeps the membership; being banned, kicked or losing the
            // affiliation ends it, and with it the user's links through this room.
            let revoked = muc::revokes(&info) || !info.affiliation.authorised();
            let real = info
                .jid
                .as_ref()
                .map(|j| j.to_bare())
                .or_else(|| left.as_ref().map(|o| o.real.to_bare()));
            let forgotten = match real {
                Some(user) if revoked => {
                    tracing::info!(room = %room.jid, %user, "membership revoked");
                    room.members.remove(&user)
                }
                _ => false,
            };
            if forgotten {
                self.publish_room(i);
            } else if let Some(left) = left
                && room.state == RoomState::Joined
                && left.real != self.me
            {
                let device = DeviceId::new(
                    left.real.to_bare().to_string(),
                    left.real.resource().as_str(),
                );
                room.view.update(&room.overlay, device, None, &mut self.out);
                self.update_room_status();
            }
            return;
        }
        let Some(real) = info.jid else {
            self.drop_stanza(
                DropReason::OccupantWithoutRealJid,
                format_args!("{occupant} hides its real JID"),
            );
            return;
        };
        let announced = read_announced(&self.shared, &presence.payloads, &occupant);
        let room = &mut self.rooms[i];
        if room.occupants.len() >= MAX_DEVICES && !room.occupants.contains_key(&nick) {
            self.drop_stanza(
                DropReason::TooManyDevices,
                format_args!("occupant {occupant}"),
            );
            return;
        }
        let members_changed = if info.affiliation.authorised() {
            room.members.insert(real.to_bare())
        } else {
            room.members.remove(&real.to_bare())
        };
        let device = DeviceId::new(real.to_bare().to_string(), real.resource().as_str());
        let own = real == self.me;
        let renamed = room
            .occupants
            .insert(
                nick,
                Occupant {
                    real,
                    affiliation: info.affiliation,
                    announced: announced.clone(),
                },
            )
            .is_some_and(|before| {
                DeviceId::new(
                    before.real.to_bare().to_string(),
                    before.real.resource().as_str(),
                ) != device
            });
        if members_changed || renamed {
            self.publish_room(i);
        } else if room.state == RoomState::Joined && !own {
            room.view
                .update(&room.overlay, device, announced, &mut self.out);
            self.update_room_status();
        }
    }

    fn on_own_room_presence(&mut self, i: usize, type_: PresenceType, info: &OccupantInfo) {
        if type_ == PresenceType::Unavailable {
            let (why, rejoin) = muc::exit_reason(info);
            let room = &mut self.rooms[i];
            tracing::warn!(room = %room.jid, "left the room: {why}");
            if rejoin {
                // Out for a passing reason (a restart of the chat service, a kick): the members
                // and their links stay; devices that are not back some time after we rejoin
                // are reported down then.
                room.state = RoomState::Out {
                    rejoin_at: Some(Instant::now() + REJOIN_DELAY),
                };
                room.occupants.clear();
                room.view.restart(true);
                self.update_room_status();
            } else {
                self.room_failed(i, why.to_owned());
            }
            return;
        }
        let own = Occupant {
            real: self.me.clone(),
            affiliation: info.affiliation,
            announced: None,
        };
        let room = &mut self.rooms[i];
        if info.affiliation.authorised() {
            room.members.insert(self.own.clone());
        }
        let nick = room.nick.clone();
        room.occupants.insert(nick, own);
        if room.state != RoomState::Joining {
            // An update of our own presence (affiliation change, room configuration).
            self.publish_room(i);
            return;
        }
        if info.has(muc::STATUS_CREATED) {
            if room.create {
                tracing::info!(room = %room.jid, "the room did not exist; configuring it");
                room.state = RoomState::Configuring;
                let to = Jid::from(room.jid.clone());
                self.iq(
                    Some(to),
                    true,
                    muc::owner_config(),
                    Purpose::RoomConfig { room: i },
                );
            } else {
                self.room_failed(
                    i,
                    "it does not exist (set `create = true` to create it)".to_owned(),
                );
            }
            return;
        }
        if !(info.has(muc::STATUS_NON_ANONYMOUS) || info.has(muc::STATUS_NOW_NON_ANONYMOUS)) {
            self.room_failed(
                i,
                "it hides real JIDs, and ipop cannot authorise peers in a room that hides them \
                 (an owner must let anyone see real JIDs: muc#roomconfig_whois = anyone)"
                    .to_owned(),
            );
            return;
        }
        tracing::info!(room = %room.jid, occupants = room.occupants.len(), "joined the room");
        room.state = RoomState::Joined;
        self.room_joined(i);
    }
}

/// The reconnect logic handed to tokio-xmpp's `StanzaStream`: the first call gets the stream
/// [`crate::connect`] opened (so that its errors were reported); later calls open new streams
/// with exponential backoff and jitter, logging why each attempt failed.
fn reconnector(
    first: Connection,
    login: Arc<Login>,
    shared: Arc<Shared>,
    closing: watch::Receiver<bool>,
) -> Box<dyn FnMut(Option<String>, oneshot::Sender<Connection>) + Send + 'static> {
    let mut first = Some(first);
    Box::new(move |_, slot| {
        if let Some(connection) = first.take() {
            if slot.send(connection).is_err() {
                tracing::debug!("the stanza stream ended before its first connection");
            }
            return;
        }
        tokio::spawn(reconnect(
            login.clone(),
            shared.clone(),
            closing.clone(),
            slot,
        ));
    })
}

async fn reconnect(
    login: Arc<Login>,
    shared: Arc<Shared>,
    mut closing: watch::Receiver<bool>,
    slot: oneshot::Sender<Connection>,
) {
    let mut delay = BACKOFF_FIRST;
    loop {
        // Full jitter over the upper half: between delay/2 and delay.
        let wait = delay / 2 + delay.mul_f64((random_u64() % 1000) as f64 / 2000.0);
        tokio::select! {
            _ = sleep(wait) => {}
            _ = closing.wait_for(|c| *c) => break,
        }
        tracing::debug!("reconnecting to {}", login.server);
        match login.open(Instant::now() + ATTEMPT_TIMEOUT).await {
            Ok(connection) => {
                if slot.send(connection).is_err() {
                    tracing::debug!("the stanza stream ended while reconnecting");
                }
                return;
            }
            Err(e) => {
                let most = match e {
                    LoginError::Unreachable { .. } => BACKOFF_MAX_REFUSED,
                    _ => BACKOFF_MAX,
                };
                delay = (delay * 2).min(most);
                let why = e.to_string();
                if shared.logs.allow(&format!("reconnect {why}")) {
                    tracing::warn!(
                        "reconnecting to the XMPP server failed: {why}; retrying every {:?} or \
                         less (the same failure is logged again in a minute)",
                        delay
                    );
                } else {
                    tracing::debug!("reconnecting failed: {why}; retrying in about {delay:?}");
                }
                shared.update(|s| s.last_error = Some(why));
            }
        }
    }
    // Shutting down. tokio-xmpp's worker treats a dropped slot as a bug and panics, so the slot
    // (an argument, alive until this function returns) is kept until the runtime ends; the
    // worker waits on it and holds nothing else.
    std::future::pending::<()>().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(name: &str) -> DeviceId {
        DeviceId::new("bob@example.org", name)
    }

    fn publish(view: &mut View, members: &[&str], devices: &[(&str, u8)]) -> Vec<OsnEvent> {
        let mut out = Vec::new();
        view.publish(
            &OverlayId::Social,
            members.iter().map(|m| (*m).to_owned()).collect(),
            devices
                .iter()
                .map(|(d, k)| {
                    (
                        device(d),
                        Announced {
                            key: PublicKey([*k; 32]),
                            relay: None,
                            routes: Vec::new(),
                            exit_dns: None,
                            claim: None,
                        },
                    )
                })
                .collect(),
            &mut out,
        );
        out
    }

    fn up(name: &str, key: u8) -> OsnEvent {
        OsnEvent::DeviceUp {
            overlay: OverlayId::Social,
            device: device(name),
            key: PublicKey([key; 32]),
            relay: None,
            routes: Vec::new(),
            exit_dns: None,
            claim: None,
        }
    }

    fn down(name: &str) -> OsnEvent {
        OsnEvent::DeviceDown {
            overlay: OverlayId::Social,
            device: device(name),
        }
    }

    fn members(users: &[&str]) -> OsnEvent {
        OsnEvent::Members {
            overlay: OverlayId::Social,
            users: users.iter().map(|u| (*u).to_owned()).collect(),
        }
    }

    #[test]
    fn a_view_reports_changes_only_members_first() {
        let mut view = View::default();
        assert_eq!(
            publish(&mut view, &["a", "b"], &[("laptop", 1)]),
            vec![members(&["a", "b"]), up("laptop", 1)]
        );
        assert_eq!(publish(&mut view, &["a", "b"], &[("laptop", 1)]), vec![]);
        assert_eq!(
            publish(&mut view, &["a"], &[("phone", 2), ("laptop", 3)]),
            vec![members(&["a"]), up("laptop", 3), up("phone", 2)]
        );
        assert_eq!(
            publish(&mut view, &["a"], &[("laptop", 3)]),
            vec![down("phone")]
        );
    }

    #[test]
    fn one_device_updated_in_a_large_view_says_that_device_only() {
        let mut view = View::default();
        let mut out = Vec::new();
        let announced = |k: u8| {
            Some(Announced {
                key: PublicKey([k; 32]),
                relay: None,
                routes: Vec::new(),
                exit_dns: None,
                claim: None,
            })
        };
        // Before the first publication an update waits for it.
        view.update(&OverlayId::Social, device("early"), announced(9), &mut out);
        assert!(out.is_empty(), "{out:?}");
        let names: Vec<String> = (0..100).map(|i| format!("d{i}")).collect();
        let devices: Vec<(&str, u8)> = names.iter().map(|n| (n.as_str(), 1)).collect();
        assert_eq!(publish(&mut view, &["bob"], &devices).len(), 101);

        view.update(&OverlayId::Social, device("new"), announced(2), &mut out);
        view.update(&OverlayId::Social, device("d7"), announced(1), &mut out);
        view.update(&OverlayId::Social, device("d8"), announced(3), &mut out);
        view.update(&OverlayId::Social, device("d9"), None, &mut out);
        view.update(&OverlayId::Social, device("gone"), None, &mut out);
        assert_eq!(
            out,
            [up("new", 2), up("d8", 3), down("d9")],
            "only what changed"
        );
        // A full publication afterwards agrees with the updates: nothing more to say.
        let mut now: Vec<(&str, u8)> = devices
            .iter()
            .copied()
            .filter(|(n, _)| *n != "d9")
            .map(|(n, k)| (n, if n == "d8" { 3 } else { k }))
            .collect();
        now.push(("new", 2));
        assert_eq!(publish(&mut view, &["bob"], &now), []);
    }

    #[test]
    fn a_changed_claim_with_the_same_key_is_said_again() {
        let claim = |last: u8, fixed: bool| {
            Some(Claim {
                address: std::net::Ipv4Addr::new(10, 20, 0, last),
                fixed,
            })
        };
        let mut view = View::default();
        let mut say = |claim: Option<Claim>| {
            let mut out = Vec::new();
            let announced = Announced {
                key: PublicKey([1; 32]),
                relay: None,
                routes: Vec::new(),
                exit_dns: None,
                claim,
            };
            view.publish(
                &OverlayId::Social,
                BTreeSet::from(["a".to_owned()]),
                BTreeMap::from([(device("laptop"), announced)]),
                &mut out,
            );
            out.retain(|e| matches!(e, OsnEvent::DeviceUp { .. }));
            out
        };
        let up_with = |claim: Option<Claim>| OsnEvent::DeviceUp {
            overlay: OverlayId::Social,
            device: device("laptop"),
            key: PublicKey([1; 32]),
            relay: None,
            routes: Vec::new(),
            exit_dns: None,
            claim,
        };
        assert_eq!(say(claim(5, false)), vec![up_with(claim(5, false))]);
        assert_eq!(say(claim(5, false)), vec![]);
        assert_eq!(say(claim(6, false)), vec![up_with(claim(6, false))]);
        assert_eq!(say(claim(6, true)), vec![up_with(claim(6, true))]);
        assert_eq!(say(None), vec![up_with(None)]);
        assert_eq!(say(None), vec![]);
    }

    #[test]
    fn a_bad_claim_is_counted_and_the_device_stays_a_peer_without_one() {
        let shared = Shared::new("test".to_owned());
        let from = FullJid::new("bob@example.org/desktop").expect("jid");
        let ipop = |attrs: &str| -> Vec<Element> {
            vec![
                format!("<ipop xmlns='urn:ipop:0' {attrs}/>")
                    .parse()
                    .expect("test XML is well-formed"),
            ]
        };
        let key = PublicKey([2; 32]);
        assert_eq!(
            read_announced(
                &shared,
                &ipop(&format!("key='{key}' address='10.20.0.300'")),
                &from
            ),
            Some(Announced {
                key,
                claim: None,
                relay: None,
                routes: Vec::new(),
                exit_dns: None,
            })
        );
        assert_eq!(
            shared.snapshot().drops,
            vec![(DropReason::BadPresenceClaim, 1)]
        );
        assert_eq!(
            read_announced(
                &shared,
                &ipop(&format!("key='{key}' address='10.20.0.30'")),
                &from
            ),
            Some(Announced {
                key,
                relay: None,
                routes: Vec::new(),
                exit_dns: None,
                claim: Some(Claim {
                    address: std::net::Ipv4Addr::new(10, 20, 0, 30),
                    fixed: false
                })
            })
        );
        assert_eq!(
            read_announced(&shared, &ipop("key='AAAA' address='10.20.0.30'"), &from),
            None
        );
        assert_eq!(
            shared.snapshot().drops,
            vec![
                (DropReason::BadPresenceKey, 1),
                (DropReason::BadPresenceClaim, 1)
            ]
        );
    }

    #[test]
    fn after_a_fresh_stream_everything_is_said_again_and_the_missing_go_down() {
        let mut view = View::default();
        publish(&mut view, &["a", "b"], &[("laptop", 1), ("phone", 2)]);
        view.restart(true);
        assert_eq!(
            publish(&mut view, &["a", "b"], &[("laptop", 1)]),
            vec![members(&["a", "b"]), up("laptop", 1)]
        );
        let mut out = Vec::new();
        view.sweep(&OverlayId::Social, &mut out);
        assert_eq!(out, vec![down("phone")]);
        out.clear();
        view.sweep(&OverlayId::Social, &mut out);
        assert_eq!(out, vec![]);

        // After a resumed stream nothing was lost: no sweep is needed.
        view.restart(false);
        assert_eq!(
            publish(&mut view, &["a", "b"], &[("laptop", 1)]),
            vec![members(&["a", "b"]), up("laptop", 1)]
        );
        view.sweep(&OverlayId::Social, &mut out);
        assert_eq!(out, vec![]);
    }
}
