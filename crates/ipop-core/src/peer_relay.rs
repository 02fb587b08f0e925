//! Friends as relays: a device with `[relay] enabled = true` forwards, as a TURN server would,
//! the datagrams of two other devices that have no direct path, when both of them are its
//! user's friends or members of a group it is in. It never sees plaintext: what it forwards is
//! ICE checks and WireGuard datagrams, end-to-end protected.
//!
//! The relay announces a token in its presence, which reaches exactly the devices that it
//! authorises (its friends, its rooms' members). Two devices linking with each other that both
//! heard the relay derive, from that token and their Jingle session ID, which only they and the
//! XMPP server know, a pair ID and a key per side. Each registers with the relay:
//! 1. a STUN Binding request to the relay's control port, with the username
//!    `ipop-relay:<pair>:<a|b>:<device>` and MESSAGE-INTEGRITY keyed with the side's key; the
//!    relay answers with the port it forwards the pair on (ALTERNATE-SERVER);
//! 2. the same request to that port, which records where the side's datagrams come from (its
//!    NAT's mapping toward the relay), again every [`REGISTRATION_REFRESH`].
//!
//! Each side then has the relay's pair endpoint as a remote candidate of type `relay`: ICE
//! checks sent there reach the other side, and the answers come back the same way. The relay
//! forwards from one registered side to the other, within a per-pair and a total rate, for at
//! most [`RelayLimits::max_pairs`] pairs; a pair nobody registers for [`PAIR_IDLE`] ends.
//!
//! Everything here is sans-IO: the daemon owns the sockets and binds a pair's port when
//! [`RelayServer::handle_control`] asks for one.

use crate::stun::{
    Due, Retransmit, TransactionId, TransactionIds, decode_control, describe_error, encode,
    same_address, transaction_id,
};
use blake2::{Blake2s256, Digest};
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};
use stun_codec::rfc5389::Attribute;
use stun_codec::rfc5389::attributes::{
    AlternateServer, ErrorCode, Fingerprint, MessageIntegrity, Username, XorMappedAddress,
};
use stun_codec::rfc5389::methods::BINDING;
use stun_codec::{Message, MessageClass};

/// Bytes of the token a relay announces.
pub const TOKEN_LEN: usize = 16;
/// How often a side registers again with the relay's pair port.
pub const REGISTRATION_REFRESH: Duration = Duration::from_secs(15);
/// How long a pair lives without a registration from either side.
pub const PAIR_IDLE: Duration = Duration::from_secs(60);
/// The first word of a registration's username.
const PREFIX: &str = "ipop-relay";
/// The longest device name a registration carries (for the relay's status).
const MAX_DEVICE: usize = 200;
/// "Allocation Quota Reached": the relay forwards for as many pairs as it will.
const QUOTA_REACHED: u16 = 486;
/// "Server Error": the relay could not open a port for the pair.
const SERVER_ERROR: u16 = 500;

/// A pair of devices at a relay, from the relay's token and their session.
pub type PairId = [u8; 12];

/// Which end of the Jingle session a device is: the one that sent `session-initiate` (`a`) or
/// the one that accepted it (`b`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Side {
    Initiator,
    Responder,
}

impl Side {
    fn letter(self) -> &'static str {
        match self {
            Side::Initiator => "a",
            Side::Responder => "b",
        }
    }

    fn index(self) -> usize {
        match self {
            Side::Initiator => 0,
            Side::Responder => 1,
        }
    }
}

/// The pair ID two devices use at a relay for their session `session`.
pub fn pair_id(token: &[u8; TOKEN_LEN], session: &str) -> PairId {
    let digest = Blake2s256::new()
        .chain_update(b"ipop relay pair\0")
        .chain_update(token)
        .chain_update(session.as_bytes())
        .finalize();
    let mut id = [0; 12];
    id.copy_from_slice(&digest[..12]);
    id
}

/// The short-term STUN password of one side of a pair.
fn password(token: &[u8; TOKEN_LEN], pair: &PairId, side: Side) -> String {
    let digest = Blake2s256::new()
        .chain_update(b"ipop relay side\0")
        .chain_update(token)
        .chain_update(pair)
        .chain_update(side.letter().as_bytes())
        .finalize();
    hex(&digest[..16])
}

/// Lower-case hexadecimal: how pair IDs, keys and a relay's token are written.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Exactly `N` bytes in hexadecimal; `None` for any other text.
pub fn unhex<const N: usize>(text: &str) -> Option<[u8; N]> {
    if text.len() != 2 * N || !text.is_ascii() {
        return None;
    }
    let mut out = [0; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// What a registration says: the pair, the side and the device, as claimed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Registration {
    pair: PairId,
    side: Side,
    device: String,
}

impl Registration {
    fn username(&self) -> String {
        format!(
            "{PREFIX}:{}:{}:{}",
            hex(&self.pair),
            self.side.letter(),
            self.device
        )
    }

    fn parse(username: &str) -> Option<Registration> {
        let mut parts = username.splitn(4, ':');
        if parts.next()? != PREFIX {
            return None;
        }
        let pair = unhex(parts.next()?)?;
        let side = match parts.next()? {
            "a" => Side::Initiator,
            "b" => Side::Responder,
            _ => return None,
        };
        let device: String = parts.next()?.chars().take(MAX_DEVICE).collect();
        Some(Registration { pair, side, device })
    }
}

/// Adds MESSAGE-INTEGRITY with `password` and FINGERPRINT.
fn seal(mut message: Message<Attribute>, password: &str) -> Vec<u8> {
    if let Ok(integrity) = MessageIntegrity::new_short_term_credential(&message, password) {
        message.add_attribute(integrity);
    }
    if let Ok(fingerprint) = Fingerprint::new(&message) {
        message.add_attribute(fingerprint);
    }
    encode(message)
}

/// A registration request as a side sends it.
fn request(id: TransactionId, registration: &Registration, password: &str) -> Vec<u8> {
    let mut message = Message::<Attribute>::new(MessageClass::Request, BINDING, id);
    if let Ok(username) = Username::new(registration.username()) {
        message.add_attribute(username);
    }
    seal(message, password)
}

/// The registration in `datagram`, if it is a Binding request with an `ipop-relay` username
/// whose MESSAGE-INTEGRITY holds for `token`. `Err(())` for one that does not authenticate.
fn read_registration(
    token: &[u8; TOKEN_LEN],
    datagram: &[u8],
) -> Option<Result<(TransactionId, Registration), ()>> {
    let message = decode_control::<Attribute>(datagram)?;
    if message.method() != BINDING || message.class() != MessageClass::Request {
        return None;
    }
    let registration = Registration::parse(message.get_attribute::<Username>()?.name())?;
    let password = password(token, &registration.pair, registration.side);
    let valid = message
        .get_attribute::<MessageIntegrity>()
        .is_some_and(|mi| mi.check_short_term_credential(&password).is_ok());
    Some(if valid {
        Ok((message.transaction_id(), registration))
    } else {
        Err(())
    })
}

/// How much a relay forwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayLimits {
    /// Pairs forwarded at once.
    pub max_pairs: usize,
    /// Bytes a second for one pair, both ways together.
    pub pair_rate: u64,
    /// Bytes a second for all pairs together.
    pub total_rate: u64,
}

/// A token bucket of bytes, holding a tenth of a second at its rate (at least 64 KiB).
#[derive(Debug, Clone)]
struct Bucket {
    rate: f64,
    burst: f64,
    level: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate: u64, now: Instant) -> Bucket {
        let rate = rate as f64;
        let burst = (rate / 10.0).max(65_536.0);
        Bucket {
            rate,
            burst,
            level: burst,
            at: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.level = (self.level + elapsed * self.rate).min(self.burst);
        self.at = now;
    }

    fn has(&mut self, now: Instant, bytes: usize) -> bool {
        self.refill(now);
        self.level >= bytes as f64
    }

    fn take(&mut self, bytes: usize) {
        self.level -= bytes as f64;
    }
}

#[derive(Debug, Clone)]
struct End {
    addr: SocketAddr,
    device: String,
}

#[derive(Debug)]
struct Pair {
    port: u16,
    ends: [Option<End>; 2],
    bucket: Bucket,
    /// The last registration from either side.
    seen: Instant,
    forwarded: u64,
    bytes: u64,
    over_rate: u64,
}

/// What the relay does with a datagram on a pair's port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PairVerdict {
    /// Answer the sender with this datagram (a registration's answer).
    Reply(Vec<u8>),
    /// Send the datagram, as it is, to this address: the other side.
    Forward(SocketAddr),
    /// Drop it, for this reason.
    Drop(RelayDrop),
}

/// Why the relay dropped a datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RelayDrop {
    /// A registration whose MESSAGE-INTEGRITY does not hold: not from a device the relay
    /// authorises, or for another session.
    Unauthenticated,
    /// From an address no side of the pair registered.
    Unregistered,
    /// The other side has not registered yet.
    NoPeerYet,
    /// Over the pair's or the relay's rate.
    OverRate,
    /// For a port with no pair (it just ended).
    NoPair,
    /// A new pair beyond [`RelayLimits::max_pairs`].
    TooManyPairs,
}

impl RelayDrop {
    pub fn as_str(self) -> &'static str {
        match self {
            RelayDrop::Unauthenticated => "relay_unauthenticated",
            RelayDrop::Unregistered => "relay_unregistered",
            RelayDrop::NoPeerYet => "relay_no_peer_yet",
            RelayDrop::OverRate => "relay_over_rate",
            RelayDrop::NoPair => "relay_no_pair",
            RelayDrop::TooManyPairs => "relay_too_many_pairs",
        }
    }
}

/// One pair as the relay's status shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairStatus {
    pub port: u16,
    /// Each side: the device it says it is, and where its datagrams come from.
    pub ends: [Option<(String, SocketAddr)>; 2],
    pub forwarded: u64,
    pub bytes: u64,
    pub over_rate: u64,
}

/// The forwarding side: pairs, their ports and limits.
#[derive(Debug)]
pub struct RelayServer {
    token: [u8; TOKEN_LEN],
    limits: RelayLimits,
    pairs: HashMap<PairId, Pair>,
    by_port: HashMap<u16, PairId>,
    total: Bucket,
    drops: HashMap<RelayDrop, u64>,
}

impl RelayServer {
    pub fn new(token: [u8; TOKEN_LEN], limits: RelayLimits, now: Instant) -> RelayServer {
        RelayServer {
            token,
            limits,
            pairs: HashMap::new(),
            by_port: HashMap::new(),
            total: Bucket::new(limits.total_rate, now),
            drops: HashMap::new(),
        }
    }

    pub fn token(&self) -> &[u8; TOKEN_LEN] {
        &self.token
    }

    pub fn limits(&self) -> RelayLimits {
        self.limits
    }

    fn drop(&mut self, why: RelayDrop) -> Option<Vec<u8>> {
        *self.drops.entry(why).or_default() += 1;
        None
    }

    /// A datagram on the control port: a side's first registration. Answers with the pair's
    /// port, opening one with `bind` (which binds a UDP socket and gives its port) for a new
    /// pair. `None`: nothing to answer (not a registration, or one that does not authenticate,
    /// counted).
    pub fn handle_control(
        &mut self,
        now: Instant,
        from: SocketAddr,
        datagram: &[u8],
        bind: impl FnOnce() -> Option<u16>,
    ) -> Option<Vec<u8>> {
        let (id, registration) = match read_registration(&self.token, datagram)? {
            Ok(r) => r,
            Err(()) => return self.drop(RelayDrop::Unauthenticated),
        };
        let password = password(&self.token, &registration.pair, registration.side);
        let full = self.pairs.len() >= self.limits.max_pairs;
        let port = match self.pairs.get_mut(&registration.pair) {
            Some(pair) => {
                pair.seen = now;
                pair.port
            }
            None if full => {
                self.drop(RelayDrop::TooManyPairs);
                return Some(error(
                    id,
                    QUOTA_REACHED,
                    "the relay forwards for no more pairs",
                ));
            }
            None => {
                let Some(port) = bind() else {
                    return Some(error(id, SERVER_ERROR, "the relay cannot open a port"));
                };
                tracing::info!(port, device = %registration.device, "relay: a new pair");
                self.by_port.insert(port, registration.pair);
                self.pairs.insert(
                    registration.pair,
                    Pair {
                        port,
                        ends: [None, None],
                        bucket: Bucket::new(self.limits.pair_rate, now),
                        seen: now,
                        forwarded: 0,
                        bytes: 0,
                        over_rate: 0,
                    },
                );
                port
            }
        };
        let mut answer = Message::<Attribute>::new(MessageClass::SuccessResponse, BINDING, id);
        answer.add_attribute(XorMappedAddress::new(from));
        answer.add_attribute(AlternateServer::new(SocketAddr::new(
            IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            port,
        )));
        Some(seal(answer, &password))
    }

    /// A datagram on a pair's port `port` from `from`.
    pub fn handle_pair(
        &mut self,
        now: Instant,
        port: u16,
        from: SocketAddr,
        datagram: &[u8],
    ) -> PairVerdict {
        let Some(id) = self.by_port.get(&port).copied() else {
            self.drop(RelayDrop::NoPair);
            return PairVerdict::Drop(RelayDrop::NoPair);
        };
        match read_registration(&self.token, datagram) {
            Some(Ok((tid, registration))) if registration.pair == id => {
                let Some(pair) = self.pairs.get_mut(&id) else {
                    return PairVerdict::Drop(RelayDrop::NoPair);
                };
                pair.seen = now;
                let end = &mut pair.ends[registration.side.index()];
                if end.as_ref().is_none_or(|e| e.addr != from) {
                    tracing::info!(port, device = %registration.device, %from, "relay: a side registered");
                }
                *end = Some(End {
                    addr: from,
                    device: registration.device.clone(),
                });
                let password = password(&self.token, &id, registration.side);
                let mut answer =
                    Message::<Attribute>::new(MessageClass::SuccessResponse, BINDING, tid);
                answer.add_attribute(XorMappedAddress::new(from));
                return PairVerdict::Reply(seal(answer, &password));
            }
            Some(Ok(_)) | Some(Err(())) => {
                self.drop(RelayDrop::Unauthenticated);
                return PairVerdict::Drop(RelayDrop::Unauthenticated);
            }
            None => {}
        }
        let Some(pair) = self.pairs.get_mut(&id) else {
            return PairVerdict::Drop(RelayDrop::NoPair);
        };
        let side = pair
            .ends
            .iter()
            .position(|e| e.as_ref().is_some_and(|e| same_address(e.addr, from)));
        let verdict = match side {
            None => PairVerdict::Drop(RelayDrop::Unregistered),
            Some(s) => match &pair.ends[1 - s] {
                None => PairVerdict::Drop(RelayDrop::NoPeerYet),
                Some(other) => {
                    let len = datagram.len();
                    if pair.bucket.has(now, len) && self.total.has(now, len) {
                        pair.bucket.take(len);
                        self.total.take(len);
                        pair.forwarded += 1;
                        pair.bytes += len as u64;
                        PairVerdict::Forward(other.addr)
                    } else {
                        pair.over_rate += 1;
                        PairVerdict::Drop(RelayDrop::OverRate)
                    }
                }
            },
        };
        if let PairVerdict::Drop(why) = verdict {
            self.drop(why);
        }
        verdict
    }

    /// Ends the pairs nobody registered for [`PAIR_IDLE`]; returns their ports, to close.
    pub fn expire(&mut self, now: Instant) -> Vec<u16> {
        let idle: Vec<PairId> = self
            .pairs
            .iter()
            .filter(|(_, p)| now.saturating_duration_since(p.seen) >= PAIR_IDLE)
            .map(|(id, _)| *id)
            .collect();
        let mut ports = Vec::new();
        for id in idle {
            if let Some(pair) = self.pairs.remove(&id) {
                tracing::info!(port = pair.port, "relay: a pair ended (no registration)");
                self.by_port.remove(&pair.port);
                ports.push(pair.port);
            }
        }
        ports
    }

    /// The pairs, by port.
    pub fn pairs(&self) -> Vec<PairStatus> {
        let mut all: Vec<PairStatus> = self
            .pairs
            .values()
            .map(|p| PairStatus {
                port: p.port,
                ends: [0, 1].map(|i| p.ends[i].as_ref().map(|e| (e.device.clone(), e.addr))),
                forwarded: p.forwarded,
                bytes: p.bytes,
                over_rate: p.over_rate,
            })
            .collect();
        all.sort_by_key(|p| p.port);
        all
    }

    /// Datagrams dropped since start, by reason.
    pub fn drops(&self) -> impl Iterator<Item = (RelayDrop, u64)> + '_ {
        self.drops.iter().map(|(k, v)| (*k, *v))
    }
}

fn error(id: TransactionId, code: u16, reason: &str) -> Vec<u8> {
    let mut answer = Message::<Attribute>::new(MessageClass::ErrorResponse, BINDING, id);
    if let Ok(e) = ErrorCode::new(code, reason.to_owned()) {
        answer.add_attribute(e);
    }
    encode(answer)
}

/// Where a side's registration stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientState {
    /// Asking the control port for the pair's port.
    Asking,
    /// Registering with the pair's port.
    Registering { pair: SocketAddr },
    /// Registered: the pair's endpoint is a remote candidate.
    Registered { pair: SocketAddr },
    /// The relay refused or did not answer.
    Failed { reason: String },
}

/// What a [`RelayClient`] tells the engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientEvent {
    /// The pair's endpoint at the relay, to add as a remote candidate.
    Ready(SocketAddr),
    Failed(String),
}

/// One side's registration with one relay, for one session.
#[derive(Debug)]
pub struct RelayClient {
    control: SocketAddr,
    registration: Registration,
    password: String,
    ids: TransactionIds,
    state: ClientState,
    request: Option<(TransactionId, Vec<u8>, SocketAddr, Retransmit, bool)>,
    next_refresh: Option<Instant>,
    events: VecDeque<ClientEvent>,
    /// The round-trip time to the pair's port, from the last registration that measured one.
    rtt: Option<Duration>,
}

impl RelayClient {
    /// Starts registering `device`, as `side` of `session`, with the relay whose control port
    /// is `control` and whose token is `token`.
    pub fn new(
        now: Instant,
        control: SocketAddr,
        token: &[u8; TOKEN_LEN],
        session: &str,
        side: Side,
        device: &str,
        seed: u64,
    ) -> RelayClient {
        let pair = pair_id(token, session);
        let registration = Registration {
            pair,
            side,
            device: device.chars().take(MAX_DEVICE).collect(),
        };
        let mut client = RelayClient {
            control,
            password: password(token, &pair, side),
            registration,
            ids: TransactionIds::new(seed, &format!("peer relay {control} {session}")),
            state: ClientState::Asking,
            request: None,
            next_refresh: None,
            events: VecDeque::new(),
            rtt: None,
        };
        client.send(now, control);
        client
    }

    pub fn control(&self) -> SocketAddr {
        self.control
    }

    /// The round-trip time to the pair's port at the relay, once a registration measured it.
    pub fn rtt(&self) -> Option<Duration> {
        self.rtt
    }

    pub fn state(&self) -> &ClientState {
        &self.state
    }

    /// The pair's endpoint at the relay, once registered.
    pub fn pair_address(&self) -> Option<SocketAddr> {
        match self.state {
            ClientState::Registered { pair } => Some(pair),
            _ => None,
        }
    }

    fn send(&mut self, now: Instant, to: SocketAddr) {
        let id = self.ids.next_id();
        let bytes = request(id, &self.registration, &self.password);
        let mut retransmit = Retransmit::new(now, false);
        retransmit.fire(now);
        self.request = Some((id, bytes, to, retransmit, true));
        self.next_refresh = None;
    }

    pub fn owns_transaction(&self, id: &TransactionId) -> bool {
        self.request.as_ref().is_some_and(|(r, ..)| r == id)
    }

    /// A STUN message from `from`: whether it answered our request (and is consumed).
    pub fn handle_response(&mut self, now: Instant, from: SocketAddr, datagram: &[u8]) -> bool {
        let Some(id) = transaction_id(datagram) else {
            return false;
        };
        let Some((_, _, to, ..)) = self.request.as_ref().filter(|(r, ..)| *r == id) else {
            return false;
        };
        if !same_address(*to, from) {
            return false;
        }
        let Some(message) = decode_control::<Attribute>(datagram) else {
            return true;
        };
        if message.class() == MessageClass::ErrorResponse {
            let reason = message
                .get_attribute::<ErrorCode>()
                .map_or_else(|| "an error".to_owned(), describe_error);
            self.fail(now, format!("the relay {} refused: {reason}", self.control));
            return true;
        }
        let authentic = message
            .get_attribute::<MessageIntegrity>()
            .is_some_and(|mi| mi.check_short_term_credential(&self.password).is_ok());
        if message.class() != MessageClass::SuccessResponse || !authentic {
            return true;
        }
        let sample = self
            .request
            .take()
            .and_then(|(.., retransmit, _)| retransmit.rtt_sample(now));
        if !matches!(self.state, ClientState::Asking) {
            self.rtt = sample.or(self.rtt);
        }
        match self.state {
            ClientState::Asking => {
                let Some(port) = message
                    .get_attribute::<AlternateServer>()
                    .map(|a| a.address().port())
                    .filter(|p| *p != 0)
                else {
                    self.fail(now, format!("the relay {} named no port", self.control));
                    return true;
                };
                let pair = SocketAddr::new(self.control.ip(), port);
                self.state = ClientState::Registering { pair };
                self.send(now, pair);
            }
            ClientState::Registering { pair } => {
                self.state = ClientState::Registered { pair };
                self.events.push_back(ClientEvent::Ready(pair));
                self.next_refresh = Some(now + REGISTRATION_REFRESH);
            }
            ClientState::Registered { .. } => {
                self.next_refresh = Some(now + REGISTRATION_REFRESH);
            }
            ClientState::Failed { .. } => {}
        }
        true
    }

    fn fail(&mut self, now: Instant, reason: String) {
        tracing::info!(relay = %self.control, %reason, "peer relay");
        self.request = None;
        self.events.push_back(ClientEvent::Failed(reason.clone()));
        self.state = ClientState::Failed { reason };
        // Tried again from the start a while later: the relay may have room by then.
        self.next_refresh = Some(now + PAIR_IDLE);
    }

    pub fn poll_transmit(&mut self) -> Option<(SocketAddr, Vec<u8>)> {
        let (_, bytes, to, _, unsent) = self.request.as_mut()?;
        if !*unsent {
            return None;
        }
        *unsent = false;
        Some((*to, bytes.clone()))
    }

    pub fn poll_event(&mut self) -> Option<ClientEvent> {
        self.events.pop_front()
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        match &self.request {
            Some((.., retransmit, _)) => Some(retransmit.deadline()),
            None => self.next_refresh,
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some((.., retransmit, unsent)) = self.request.as_mut() {
            if retransmit.deadline() > now {
                return;
            }
            match retransmit.fire(now) {
                Due::Send => *unsent = true,
                Due::GiveUp => {
                    let reason = format!("no answer from the relay {}", self.control);
                    self.fail(now, reason);
                }
            }
            return;
        }
        if self.next_refresh.is_some_and(|t| t <= now) {
            match self.state.clone() {
                ClientState::Registered { pair } => self.send(now, pair),
                ClientState::Failed { .. } | ClientState::Asking => {
                    self.state = ClientState::Asking;
                    self.send(now, self.control);
                }
                ClientState::Registering { pair } => self.send(now, pair),
            }
        }
    }
}

impl fmt::Display for ClientState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientState::Asking => f.write_str("asking the relay for a pair"),
            ClientState::Registering { pair } => write!(f, "registering at {pair}"),
            ClientState::Registered { pair } => write!(f, "registered at {pair}"),
            ClientState::Failed { reason } => f.write_str(reason),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: RelayLimits = RelayLimits {
        max_pairs: 2,
        pair_rate: 1_000_000,
        total_rate: 10_000_000,
    };
    const TOKEN: [u8; TOKEN_LEN] = [7; TOKEN_LEN];

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// Runs a client's exchange with the server until it settles; returns the client.
    fn register(
        server: &mut RelayServer,
        now: Instant,
        session: &str,
        side: Side,
        from: SocketAddr,
        ports: &mut u16,
    ) -> RelayClient {
        let control = addr("198.51.100.9:3479");
        let mut client = RelayClient::new(now, control, &TOKEN, session, side, "x@e.org/dev", 1);
        for _ in 0..4 {
            let Some((to, bytes)) = client.poll_transmit() else {
                break;
            };
            let answer = if to == control {
                server.handle_control(now, from, &bytes, || {
                    *ports += 1;
                    Some(*ports)
                })
            } else {
                match server.handle_pair(now, to.port(), from, &bytes) {
                    PairVerdict::Reply(b) => Some(b),
                    other => panic!("registration not answered: {other:?}"),
                }
            };
            if let Some(answer) = answer {
                assert!(client.handle_response(now, to, &answer));
            }
        }
        client
    }

    #[test]
    fn two_sides_register_and_the_relay_forwards_between_them_only() {
        let now = Instant::now();
        let mut server = RelayServer::new(TOKEN, LIMITS, now);
        let mut ports = 40_000;
        let (a, b) = (addr("203.0.113.1:1111"), addr("203.0.113.2:2222"));
        let ca = register(&mut server, now, "sid-1", Side::Initiator, a, &mut ports);
        assert_eq!(ca.pair_address(), Some(addr("198.51.100.9:40001")));
        // Before the other side registers, nothing goes through.
        assert_eq!(
            server.handle_pair(now, 40_001, a, b"wireguard"),
            PairVerdict::Drop(RelayDrop::NoPeerYet)
        );
        let cb = register(&mut server, now, "sid-1", Side::Responder, b, &mut ports);
        assert_eq!(cb.pair_address(), ca.pair_address());
        assert_eq!(
            server.handle_pair(now, 40_001, a, b"to b"),
            PairVerdict::Forward(b)
        );
        assert_eq!(
            server.handle_pair(now, 40_001, b, b"to a"),
            PairVerdict::Forward(a)
        );
        let stranger = addr("203.0.113.3:3333");
        assert_eq!(
            server.handle_pair(now, 40_001, stranger, b"hi"),
            PairVerdict::Drop(RelayDrop::Unregistered)
        );
        let status = server.pairs();
        assert_eq!(status.len(), 1);
        assert_eq!(status[0].forwarded, 2);
        assert_eq!(status[0].ends[1], Some(("x@e.org/dev".to_owned(), b)));
    }

    #[test]
    fn a_registration_with_another_token_is_refused_and_counted() {
        let now = Instant::now();
        let mut server = RelayServer::new(TOKEN, LIMITS, now);
        let control = addr("198.51.100.9:3479");
        let mut client = RelayClient::new(
            now,
            control,
            &[8; TOKEN_LEN],
            "s",
            Side::Initiator,
            "eve",
            2,
        );
        let (_, bytes) = client.poll_transmit().unwrap();
        let answer = server.handle_control(now, addr("203.0.113.66:1"), &bytes, || {
            panic!("no port for a stranger")
        });
        assert_eq!(answer, None);
        assert_eq!(
            server.drops().collect::<Vec<_>>(),
            [(RelayDrop::Unauthenticated, 1)]
        );
        // Not a registration at all: ignored, not counted.
        assert_eq!(
            server.handle_control(now, addr("203.0.113.66:1"), b"junk", || None),
            None
        );
    }

    #[test]
    fn pairs_beyond_the_limit_are_refused_and_idle_pairs_end() {
        let now = Instant::now();
        let mut server = RelayServer::new(TOKEN, LIMITS, now);
        let mut ports = 40_000;
        let a = addr("203.0.113.1:1111");
        for session in ["s1", "s2"] {
            let c = register(&mut server, now, session, Side::Initiator, a, &mut ports);
            assert!(c.pair_address().is_some());
        }
        let mut third = register(&mut server, now, "s3", Side::Initiator, a, &mut ports);
        assert!(
            matches!(third.state(), ClientState::Failed { reason } if reason.contains("486")),
            "{}",
            third.state()
        );
        assert!(matches!(third.poll_event(), Some(ClientEvent::Failed(_))));
        assert_eq!(server.expire(now + PAIR_IDLE / 2), Vec::<u16>::new());
        let mut ended = server.expire(now + PAIR_IDLE);
        ended.sort_unstable();
        assert_eq!(ended, [40_001, 40_002]);
        assert_eq!(
            server.handle_pair(now, 40_001, a, b"late"),
            PairVerdict::Drop(RelayDrop::NoPair)
        );
    }

    #[test]
    fn a_pair_is_held_to_its_rate() {
        let now = Instant::now();
        let mut server = RelayServer::new(TOKEN, LIMITS, now);
        let mut ports = 40_000;
        let (a, b) = (addr("203.0.113.1:1111"), addr("203.0.113.2:2222"));
        register(&mut server, now, "s", Side::Initiator, a, &mut ports);
        register(&mut server, now, "s", Side::Responder, b, &mut ports);
        let datagram = [0u8; 1400];
        // The bucket holds a tenth of a second (100 kB at 1 MB/s): 71 datagrams, then drops.
        let forwarded = (0..200)
            .filter(|_| server.handle_pair(now, 40_001, a, &datagram) == PairVerdict::Forward(b))
            .count();
        assert_eq!(forwarded, 71);
        assert_eq!(server.pairs()[0].over_rate, 129);
        // A second later the bucket is full again.
        let later = now + Duration::from_secs(1);
        assert_eq!(
            server.handle_pair(later, 40_001, a, &datagram),
            PairVerdict::Forward(b)
        );
    }

    #[test]
    fn a_registered_side_refreshes_and_retries_after_silence() {
        let now = Instant::now();
        let mut server = RelayServer::new(TOKEN, LIMITS, now);
        let mut ports = 40_000;
        let a = addr("203.0.113.1:1111");
        let mut client = register(&mut server, now, "s", Side::Initiator, a, &mut ports);
        assert_eq!(
            client.poll_event(),
            Some(ClientEvent::Ready(addr("198.51.100.9:40001")))
        );
        let refresh = client.poll_timeout().unwrap();
        assert_eq!(refresh, now + REGISTRATION_REFRESH);
        client.handle_timeout(refresh);
        let (to, _) = client.poll_transmit().unwrap();
        assert_eq!(to, addr("198.51.100.9:40001"));
        // Unanswered: retransmitted 6 times, then failed; asked again from the start later.
        let mut sent = 0;
        while !matches!(client.state(), ClientState::Failed { .. }) && sent < 20 {
            let t = client.poll_timeout().unwrap();
            client.handle_timeout(t);
            sent += usize::from(client.poll_transmit().is_some());
        }
        assert_eq!(sent, 6, "{}", client.state());
        let again = client.poll_timeout().unwrap();
        client.handle_timeout(again);
        assert_eq!(client.state(), &ClientState::Asking);
        assert_eq!(
            client.poll_transmit().map(|(to, _)| to),
            Some(client.control())
        );
    }

    #[test]
    fn usernames_round_trip_and_garbage_is_not_a_registration() {
        let r = Registration {
            pair: pair_id(&TOKEN, "sid"),
            side: Side::Responder,
            device: "bob@example.org/phone:with:colons".to_owned(),
        };
        assert_eq!(Registration::parse(&r.username()), Some(r));
        for bad in [
            "",
            "ipop-relay",
            "ipop-relay:zz:a:d",
            "other:00:a:d",
            "ipop-relay:000000000000000000000000:c:d",
        ] {
            assert_eq!(Registration::parse(bad), None, "{bad}");
        }
    }
}
