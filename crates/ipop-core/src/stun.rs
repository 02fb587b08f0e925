//! A STUN Binding client (RFC 8489) for server-reflexive candidates, and the STUN plumbing that
//! the TURN client ([`crate::turn`]) shares: header checks, attribute walking, transaction IDs
//! and the retransmission schedule.
//!
//! [`StunBinding`] asks one STUN server, over the shared UDP socket, which address and port our
//! datagrams come from (XOR-MAPPED-ADDRESS), retransmits as RFC 8489 §6.2.1 says (RTO 500 ms,
//! doubling, 7 transmissions, then 16 RTO for the last answer) and binds again every
//! [`BINDING_REFRESH`] to keep the NAT mapping open and to notice when it changes. It never
//! touches a socket or a clock: datagrams and time go in, datagrams and events come out.
//!
//! The engine routes a STUN datagram by its transaction ID: [`transaction_id`] reads it without
//! decoding the message, and [`StunBinding::owns_transaction`] (like
//! [`crate::turn::TurnAllocation::owns_transaction`]) says whether it is one of ours.

use crate::demux::STUN_MAGIC_COOKIE;
use blake2::{Blake2s256, Digest};
use bytecodec::{DecodeExt, EncodeExt};
use std::collections::VecDeque;
use std::fmt;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use stun_codec::rfc5389::attributes::{ErrorCode, MappedAddress, XorMappedAddress};
use stun_codec::rfc5389::methods::BINDING;
use stun_codec::{Attribute, Message, MessageClass, MessageDecoder, MessageEncoder};

pub use stun_codec::TransactionId;

/// The initial retransmission timeout (RFC 8489 §6.2.1).
pub const STUN_RTO: Duration = Duration::from_millis(500);
/// Transmissions of one request over UDP before giving up (RFC 8489's Rc).
pub const STUN_MAX_TRANSMITS: u32 = 7;
/// How long to wait for an answer after the last transmission, in RTOs (RFC 8489's Rm).
const STUN_LAST_WAIT_RTOS: u32 = 16;
/// How long a request over a reliable transport (TCP, TLS) waits for its answer (RFC 8489's Ti).
pub const STUN_RELIABLE_TIMEOUT: Duration = Duration::from_millis(39_500);
/// How often a [`StunBinding`] binds again, to keep the NAT mapping and notice changes.
pub const BINDING_REFRESH: Duration = Duration::from_secs(25);
/// The STUN header: type, length, magic cookie, transaction ID.
pub const STUN_HEADER_LEN: usize = 20;
/// The largest STUN control message (response, error) we decode. Real ones are a few hundred
/// bytes; anything larger is refused before it reaches the decoder.
pub const MAX_CONTROL_MESSAGE: usize = 4096;
/// The most attributes we accept in a STUN message.
pub const MAX_ATTRIBUTES: usize = 32;

/// The transaction ID of a STUN message, read from its header, if `datagram` is a well-formed
/// STUN message (RFC 8489 §5: top bits zero, magic cookie, length a multiple of four and equal to
/// what follows the header). Nothing is decoded and nothing allocated.
pub fn transaction_id(datagram: &[u8]) -> Option<TransactionId> {
    Header::parse(datagram).map(|h| h.transaction_id)
}

/// Whether two addresses are the same, reading IPv4-mapped IPv6 addresses as IPv4 (a dual-stack
/// socket reports IPv4 peers that way).
pub(crate) fn same_address(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port() && a.ip().to_canonical() == b.ip().to_canonical()
}

/// A validated STUN header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    /// Method and class bits (the message type without the two zero bits).
    pub(crate) message_type: u16,
    /// Length of the attributes, without the header.
    pub(crate) length: usize,
    pub(crate) transaction_id: TransactionId,
}

impl Header {
    /// The header of a whole STUN message: `message` must be exactly the header plus the length
    /// it declares.
    pub(crate) fn parse(message: &[u8]) -> Option<Header> {
        let header: &[u8; STUN_HEADER_LEN] = message.get(..STUN_HEADER_LEN)?.try_into().ok()?;
        if header[0] & 0xC0 != 0 || header[4..8] != STUN_MAGIC_COOKIE {
            return None;
        }
        let length = usize::from(u16::from_be_bytes([header[2], header[3]]));
        if length % 4 != 0 || message.len() != STUN_HEADER_LEN + length {
            return None;
        }
        let mut id = [0; 12];
        id.copy_from_slice(&header[8..20]);
        Some(Header {
            message_type: u16::from_be_bytes([header[0], header[1]]),
            length,
            transaction_id: TransactionId::new(id),
        })
    }

    /// The message type of `method` in `class` (RFC 8489 §5).
    pub(crate) const fn message_type(method: u16, class: MessageClass) -> u16 {
        let class = match class {
            MessageClass::Request => 0b00,
            MessageClass::Indication => 0b01,
            MessageClass::SuccessResponse => 0b10,
            MessageClass::ErrorResponse => 0b11,
        };
        (method & 0x000F)
            | ((class & 0b01) << 4)
            | ((method & 0x0070) << 1)
            | ((class & 0b10) << 7)
            | ((method & 0x0F80) << 2)
    }
}

/// One attribute of a STUN message: its type and the range of its value in the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RawAttribute {
    pub(crate) kind: u16,
    pub(crate) value: std::ops::Range<usize>,
}

/// The attributes of a STUN message whose header [`Header::parse`] accepted, without copying.
/// Yields `Err(())` once, and then nothing, when an attribute overruns the message or there are
/// more than [`MAX_ATTRIBUTES`].
pub(crate) struct Attributes<'a> {
    message: &'a [u8],
    offset: usize,
    count: usize,
    broken: bool,
}

impl<'a> Attributes<'a> {
    pub(crate) fn new(message: &'a [u8]) -> Self {
        Attributes {
            message,
            offset: STUN_HEADER_LEN,
            count: 0,
            broken: false,
        }
    }
}

impl Iterator for Attributes<'_> {
    type Item = Result<RawAttribute, ()>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.broken || self.offset >= self.message.len() {
            return None;
        }
        self.count += 1;
        let tlv = self.message.get(self.offset..self.offset + 4);
        let Some(&[t0, t1, l0, l1]) = tlv else {
            self.broken = true;
            return Some(Err(()));
        };
        let start = self.offset + 4;
        let end = start + usize::from(u16::from_be_bytes([l0, l1]));
        let padded = end.next_multiple_of(4);
        if padded > self.message.len() || self.count > MAX_ATTRIBUTES {
            self.broken = true;
            return Some(Err(()));
        }
        self.offset = padded;
        Some(Ok(RawAttribute {
            kind: u16::from_be_bytes([t0, t1]),
            value: start..end,
        }))
    }
}

/// Decodes a STUN control message with `stun_codec`, after checking its header and bounding its
/// size and attribute count. `None` for anything malformed.
pub(crate) fn decode_control<A: Attribute>(message: &[u8]) -> Option<Message<A>> {
    if message.len() > MAX_CONTROL_MESSAGE {
        return None;
    }
    Header::parse(message)?;
    for attribute in Attributes::new(message) {
        attribute.ok()?;
    }
    MessageDecoder::<A>::new()
        .decode_from_bytes(message)
        .ok()?
        .ok()
}

/// Encodes a message we built; our own messages always fit.
pub(crate) fn encode<A: Attribute>(message: Message<A>) -> Vec<u8> {
    match MessageEncoder::<A>::new().encode_into_bytes(message) {
        Ok(bytes) => bytes,
        Err(e) => {
            // Only a message over 64 KiB fails, and we never build one.
            tracing::error!(error = %e, "cannot encode a STUN message");
            Vec::new()
        }
    }
}

/// Whether a decoded message carries a comprehension-required attribute that `A` does not know;
/// such a success response must be discarded (RFC 8489 §7.3.3).
pub(crate) fn has_unknown_required<A: Attribute>(message: &Message<A>) -> bool {
    message
        .unknown_attributes()
        .any(|a| a.get_type().is_comprehension_required())
}

/// "401 Unauthorized" and the like, for reasons shown to the user.
pub(crate) fn describe_error(error: &ErrorCode) -> String {
    let phrase = error.reason_phrase().trim();
    let phrase: String = phrase.chars().take(80).collect();
    if phrase.is_empty() {
        error.code().to_string()
    } else {
        format!("{} {phrase}", error.code())
    }
}

/// Unpredictable transaction IDs: BLAKE2s of a secret seed, the client (`context`: its kind,
/// transport and server) and a counter. RFC 8489 §6 asks for cryptographically random IDs; the
/// core reads no randomness, so the daemon gives the seed. The context keeps two clients given
/// the same seed apart.
#[derive(Debug, Clone)]
pub(crate) struct TransactionIds {
    keyed: Blake2s256,
    counter: u64,
}

impl TransactionIds {
    pub(crate) fn new(seed: u64, context: &str) -> Self {
        let keyed = Blake2s256::new()
            .chain_update(b"ipop stun transaction\0")
            .chain_update(seed.to_le_bytes())
            .chain_update(context.as_bytes());
        TransactionIds { keyed, counter: 0 }
    }

    pub(crate) fn next_id(&mut self) -> TransactionId {
        self.counter += 1;
        let digest = self
            .keyed
            .clone()
            .chain_update(self.counter.to_le_bytes())
            .finalize();
        let mut id = [0; 12];
        id.copy_from_slice(&digest[..12]);
        TransactionId::new(id)
    }
}

/// When to (re)transmit a request and when to give up on it.
#[derive(Debug, Clone)]
pub(crate) struct Retransmit {
    reliable: bool,
    transmits: u32,
    next: Instant,
    /// When the first transmission went out.
    first: Instant,
}

/// What a due [`Retransmit`] asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Due {
    Send,
    GiveUp,
}

impl Retransmit {
    /// A schedule for a request about to be sent at `now`, over a reliable transport (one
    /// transmission, [`STUN_RELIABLE_TIMEOUT`]) or not (RFC 8489 §6.2.1).
    pub(crate) fn new(now: Instant, reliable: bool) -> Self {
        Retransmit {
            reliable,
            transmits: 0,
            next: now,
            first: now,
        }
    }

    /// The round-trip time that an answer at `now` measures: none after a retransmission,
    /// which the answer may belong to either of (Karn's rule).
    pub(crate) fn rtt_sample(&self, now: Instant) -> Option<Duration> {
        (self.transmits == 1).then(|| now.saturating_duration_since(self.first))
    }

    pub(crate) fn deadline(&self) -> Instant {
        self.next
    }

    pub(crate) fn transmits(&self) -> u32 {
        self.transmits
    }

    /// At `now`, past the deadline: send (again) or give up.
    pub(crate) fn fire(&mut self, now: Instant) -> Due {
        let most = if self.reliable { 1 } else { STUN_MAX_TRANSMITS };
        if self.transmits >= most {
            return Due::GiveUp;
        }
        self.transmits += 1;
        let wait = if self.reliable {
            STUN_RELIABLE_TIMEOUT
        } else if self.transmits == STUN_MAX_TRANSMITS {
            STUN_RTO * STUN_LAST_WAIT_RTOS
        } else {
            STUN_RTO * (1 << (self.transmits - 1))
        };
        self.next = now + wait;
        Due::Send
    }
}

/// Where a [`StunBinding`] stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BindingState {
    /// No answer yet to the first request.
    Pending,
    /// The server told us our mapped address (and we keep asking every [`BINDING_REFRESH`]).
    Done { mapped: SocketAddr },
    /// The last request went unanswered or was refused; the client asks again after
    /// [`BINDING_REFRESH`].
    Failed { reason: String },
}

/// What a [`StunBinding`] reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BindingEvent {
    /// The first mapped address, or the first after a failure: a server-reflexive candidate.
    Mapped(SocketAddr),
    /// The NAT now maps us to another address (it rebooted, or the mapping expired).
    MappingChanged { from: SocketAddr, to: SocketAddr },
    /// The request went unanswered or was refused.
    Failed { reason: String },
}

/// What a [`StunBinding`] counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BindingStats {
    /// Requests sent, retransmissions included.
    pub transmits: u64,
    /// Responses that answered one of our requests.
    pub responses: u64,
    /// Responses to our transaction that were dropped: malformed, from another address, with
    /// unknown comprehension-required attributes or without a mapped address.
    pub dropped: u64,
}

/// The request in flight.
#[derive(Debug, Clone)]
struct Request {
    id: TransactionId,
    bytes: Vec<u8>,
    retransmit: Retransmit,
    /// Sent at least once and waiting for `poll_transmit`.
    unsent: bool,
}

/// A STUN Binding client for one server over the shared UDP socket.
#[derive(Debug, Clone)]
pub struct StunBinding {
    server: SocketAddr,
    ids: TransactionIds,
    request: Option<Request>,
    /// The transaction answered last, so that late answers to its retransmissions are
    /// recognised (and ignored) rather than passed on as strangers.
    answered: Option<TransactionId>,
    state: BindingState,
    next_bind: Option<Instant>,
    events: VecDeque<BindingEvent>,
    stats: BindingStats,
    /// The round-trip time to the server, from the last answer that measured one.
    rtt: Option<Duration>,
}

impl StunBinding {
    /// A client that sends its first Binding request to `server` at once (see
    /// [`StunBinding::poll_transmit`]). `seed` must be secret and random (from the OS), and
    /// differ between clients: the transaction IDs derive from it, and a guessable ID lets
    /// anyone forge our mapped address.
    pub fn new(server: SocketAddr, now: Instant, seed: u64) -> Self {
        let mut binding = StunBinding {
            server,
            ids: TransactionIds::new(seed, &format!("binding {server}")),
            request: None,
            answered: None,
            state: BindingState::Pending,
            next_bind: None,
            events: VecDeque::new(),
            stats: BindingStats::default(),
            rtt: None,
        };
        binding.start(now);
        binding
    }

    pub fn server(&self) -> SocketAddr {
        self.server
    }

    pub fn state(&self) -> &BindingState {
        &self.state
    }

    /// The round-trip time to the server, once an answer measured it.
    pub fn rtt(&self) -> Option<Duration> {
        self.rtt
    }

    /// Our address as the server sees it, while the last answer stands.
    pub fn mapped_address(&self) -> Option<SocketAddr> {
        match self.state {
            BindingState::Done { mapped } => Some(mapped),
            _ => None,
        }
    }

    pub fn stats(&self) -> BindingStats {
        self.stats
    }

    /// Whether a STUN message with this transaction ID answers one of our requests (the one in
    /// flight, or the one answered last).
    pub fn owns_transaction(&self, id: &TransactionId) -> bool {
        self.request.as_ref().is_some_and(|r| r.id == *id) || self.answered.as_ref() == Some(id)
    }

    /// The next datagram to send: `(server, request)`.
    pub fn poll_transmit(&mut self) -> Option<(SocketAddr, Vec<u8>)> {
        let request = self.request.as_mut().filter(|r| r.unsent)?;
        request.unsent = false;
        self.stats.transmits += 1;
        Some((self.server, request.bytes.clone()))
    }

    pub fn poll_event(&mut self) -> Option<BindingEvent> {
        self.events.pop_front()
    }

    /// When [`StunBinding::handle_timeout`] wants to run next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match &self.request {
            Some(request) => Some(request.retransmit.deadline()),
            None => self.next_bind,
        }
    }

    /// Retransmits, gives up, or starts the next periodic Binding, as the time says.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some(request) = &mut self.request {
            if now >= request.retransmit.deadline() {
                match request.retransmit.fire(now) {
                    Due::Send => request.unsent = true,
                    Due::GiveUp => {
                        let transmits = request.retransmit.transmits();
                        self.request = None;
                        self.fail(
                            now,
                            format!(
                                "STUN server {} did not answer {transmits} Binding requests",
                                self.server
                            ),
                        );
                    }
                }
            }
        } else if self.next_bind.is_some_and(|at| now >= at) {
            self.start(now);
        }
    }

    /// A STUN message that arrived from `from`. Returns whether it was an answer to one of our
    /// requests (and so is consumed here, even when it was dropped as malformed); `false` means
    /// it belongs to someone else (an ICE agent, a TURN client).
    pub fn handle_response(&mut self, now: Instant, from: SocketAddr, message: &[u8]) -> bool {
        let Some(id) = transaction_id(message) else {
            return false;
        };
        if !same_address(from, self.server) || !self.owns_transaction(&id) {
            return false;
        }
        if self.answered == Some(id) {
            // A late answer to a retransmission of a transaction already answered.
            return true;
        }
        let Some(response) = decode_control::<stun_codec::rfc5389::Attribute>(message) else {
            self.stats.dropped += 1;
            return true;
        };
        if response.method() != BINDING
            || !matches!(
                response.class(),
                MessageClass::SuccessResponse | MessageClass::ErrorResponse
            )
        {
            self.stats.dropped += 1;
            return true;
        }
        if response.class() == MessageClass::ErrorResponse {
            let Some(error) = response.get_attribute::<ErrorCode>() else {
                self.stats.dropped += 1;
                return true;
            };
            let reason = format!(
                "STUN server {} refused the Binding request: {}",
                self.server,
                describe_error(error)
            );
            self.answer(now, id);
            self.fail(now, reason);
            return true;
        }
        if has_unknown_required(&response) {
            self.stats.dropped += 1;
            return true;
        }
        let mapped = response
            .get_attribute::<XorMappedAddress>()
            .map(XorMappedAddress::address)
            .or_else(|| {
                response
                    .get_attribute::<MappedAddress>()
                    .map(MappedAddress::address)
            });
        let Some(mapped) = mapped else {
            self.stats.dropped += 1;
            return true;
        };
        if let Some(rtt) = self
            .request
            .as_ref()
            .and_then(|r| r.retransmit.rtt_sample(now))
        {
            self.rtt = Some(rtt);
        }
        self.answer(now, id);
        match self.state {
            BindingState::Done { mapped: before } if before == mapped => {}
            BindingState::Done { mapped: before } => {
                tracing::info!(server = %self.server, from = %before, to = %mapped, "NAT mapping changed");
                self.events.push_back(BindingEvent::MappingChanged {
                    from: before,
                    to: mapped,
                });
            }
            _ => {
                tracing::debug!(server = %self.server, %mapped, "server-reflexive address");
                self.events.push_back(BindingEvent::Mapped(mapped));
            }
        }
        self.state = BindingState::Done { mapped };
        true
    }

    fn start(&mut self, now: Instant) {
        let id = self.ids.next_id();
        let message =
            Message::<stun_codec::rfc5389::Attribute>::new(MessageClass::Request, BINDING, id);
        let mut retransmit = Retransmit::new(now, false);
        retransmit.fire(now);
        self.request = Some(Request {
            id,
            bytes: encode(message),
            retransmit,
            unsent: true,
        });
        self.next_bind = None;
    }

    /// Our request was answered: the next one goes out after [`BINDING_REFRESH`].
    fn answer(&mut self, now: Instant, id: TransactionId) {
        self.stats.responses += 1;
        self.request = None;
        self.answered = Some(id);
        self.next_bind = Some(now + BINDING_REFRESH);
    }

    fn fail(&mut self, now: Instant, reason: String) {
        tracing::info!(server = %self.server, %reason, "STUN binding failed");
        self.next_bind = Some(now + BINDING_REFRESH);
        if !matches!(&self.state, BindingState::Failed { reason: r } if *r == reason) {
            self.events.push_back(BindingEvent::Failed {
                reason: reason.clone(),
            });
        }
        self.state = BindingState::Failed { reason };
    }
}

impl fmt::Display for BindingState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BindingState::Pending => f.write_str("waiting for the STUN server"),
            BindingState::Done { mapped } => write!(f, "mapped to {mapped}"),
            BindingState::Failed { reason } => f.write_str(reason),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stun_codec::rfc5389::Attribute as Rfc5389;
    use stun_codec::rfc5389::attributes::Software;

    const SERVER: &str = "192.0.2.1:3478";

    fn server() -> SocketAddr {
        SERVER.parse().expect("address")
    }

    fn request_id(bytes: &[u8]) -> TransactionId {
        transaction_id(bytes).expect("a STUN request")
    }

    fn response(id: TransactionId, class: MessageClass, attributes: Vec<Rfc5389>) -> Vec<u8> {
        let mut message = Message::<Rfc5389>::new(class, BINDING, id);
        for a in attributes {
            message.add_attribute(a);
        }
        encode(message)
    }

    fn success(id: TransactionId, mapped: &str) -> Vec<u8> {
        let mapped = mapped.parse().expect("address");
        response(
            id,
            MessageClass::SuccessResponse,
            vec![XorMappedAddress::new(mapped).into()],
        )
    }

    use crate::testing::Rng;

    #[test]
    fn sends_a_binding_request_and_reads_the_mapped_address() {
        let t0 = Instant::now();
        let mut b = StunBinding::new(server(), t0, 1);
        let (to, request) = b.poll_transmit().expect("a request");
        assert_eq!(to, server());
        assert_eq!(request.len(), STUN_HEADER_LEN);
        assert_eq!(&request[..2], &[0x00, 0x01], "a Binding request");
        assert!(
            b.poll_transmit().is_none(),
            "sent once until it is due again"
        );
        assert_eq!(*b.state(), BindingState::Pending);

        let id = request_id(&request);
        assert!(b.owns_transaction(&id));
        assert!(b.handle_response(t0, server(), &success(id, "198.51.100.7:40000")));
        let mapped: SocketAddr = "198.51.100.7:40000".parse().expect("address");
        assert_eq!(b.mapped_address(), Some(mapped));
        assert_eq!(*b.state(), BindingState::Done { mapped });
        assert_eq!(b.poll_event(), Some(BindingEvent::Mapped(mapped)));
        assert_eq!(b.poll_event(), None);

        // A late answer to a retransmission is ours but changes nothing.
        assert!(b.handle_response(t0, server(), &success(id, "198.51.100.9:1")));
        assert_eq!(b.mapped_address(), Some(mapped));
        assert_eq!(b.poll_event(), None);
        assert_eq!(b.stats().responses, 1);
    }

    #[test]
    fn the_round_trip_is_measured_on_answers_to_a_single_transmission_only() {
        let t0 = Instant::now();
        let mut b = StunBinding::new(server(), t0, 3);
        let (_, request) = b.poll_transmit().expect("a request");
        let id = request_id(&request);
        let rtt = Duration::from_millis(42);
        assert!(b.handle_response(t0 + rtt, server(), &success(id, "198.51.100.7:1")));
        assert_eq!(b.rtt(), Some(rtt));
        // The next Binding is retransmitted before its answer: which transmission the answer
        // belongs to is unknown, so the last figure stands.
        let t1 = t0 + BINDING_REFRESH + rtt;
        b.handle_timeout(t1);
        let (_, request) = b.poll_transmit().expect("the next request");
        b.handle_timeout(t1 + STUN_RTO);
        assert!(b.poll_transmit().is_some(), "retransmitted");
        let id = request_id(&request);
        let late = t1 + STUN_RTO + Duration::from_millis(5);
        assert!(b.handle_response(late, server(), &success(id, "198.51.100.7:1")));
        assert_eq!(b.rtt(), Some(rtt));
    }

    #[test]
    fn retransmits_as_rfc_8489_says_then_fails_and_tries_again_later() {
        let t0 = Instant::now();
        let mut b = StunBinding::new(server(), t0, 2);
        let mut sent = Vec::new();
        let mut now = t0;
        while sent.len() < 10 && now < t0 + Duration::from_secs(60) {
            b.handle_timeout(now);
            if let Some((_, bytes)) = b.poll_transmit() {
                sent.push((now - t0, request_id(&bytes)));
            }
            if matches!(b.state(), BindingState::Failed { .. }) {
                break;
            }
            now = b.poll_timeout().expect("a timer while pending");
        }
        let times: Vec<u64> = sent.iter().map(|(t, _)| t.as_millis() as u64).collect();
        assert_eq!(times, [0, 500, 1500, 3500, 7500, 15500, 31500]);
        assert!(
            sent.iter().all(|(_, id)| *id == sent[0].1),
            "one transaction"
        );
        assert_eq!(now - t0, Duration::from_millis(39_500));
        let BindingState::Failed { reason } = b.state() else {
            panic!("failed after 7 transmissions: {:?}", b.state());
        };
        assert!(reason.contains("did not answer 7"), "{reason}");
        assert!(matches!(b.poll_event(), Some(BindingEvent::Failed { .. })));
        assert_eq!(b.mapped_address(), None);

        // It asks again later, with a new transaction.
        assert_eq!(b.poll_timeout(), Some(now + BINDING_REFRESH));
        b.handle_timeout(now + BINDING_REFRESH);
        let (_, again) = b.poll_transmit().expect("a new request");
        assert_ne!(request_id(&again), sent[0].1);
        assert!(b.handle_response(now, server(), &success(request_id(&again), "203.0.113.1:9")));
        assert!(matches!(b.poll_event(), Some(BindingEvent::Mapped(_))));
    }

    #[test]
    fn binds_again_periodically_and_reports_a_changed_mapping() {
        let t0 = Instant::now();
        let mut b = StunBinding::new(server(), t0, 3);
        let (_, r) = b.poll_transmit().expect("request");
        assert!(b.handle_response(t0, server(), &success(request_id(&r), "198.51.100.7:40000")));
        b.poll_event();
        assert_eq!(b.poll_timeout(), Some(t0 + BINDING_REFRESH));
        b.handle_timeout(t0 + Duration::from_secs(10));
        assert!(b.poll_transmit().is_none(), "not due yet");

        let t1 = t0 + BINDING_REFRESH;
        b.handle_timeout(t1);
        let (_, r) = b.poll_transmit().expect("refresh");
        // While the refresh is out, the mapping stands.
        assert!(b.mapped_address().is_some());
        assert!(b.handle_response(t1, server(), &success(request_id(&r), "198.51.100.7:40000")));
        assert_eq!(b.poll_event(), None, "same mapping: nothing to report");

        let t2 = t1 + BINDING_REFRESH;
        b.handle_timeout(t2);
        let (_, r) = b.poll_transmit().expect("refresh");
        assert!(b.handle_response(t2, server(), &success(request_id(&r), "198.51.100.7:50000")));
        assert_eq!(
            b.poll_event(),
            Some(BindingEvent::MappingChanged {
                from: "198.51.100.7:40000".parse().expect("address"),
                to: "198.51.100.7:50000".parse().expect("address"),
            })
        );
    }

    #[test]
    fn answers_from_elsewhere_or_to_other_transactions_are_not_ours() {
        let t0 = Instant::now();
        let mut b = StunBinding::new(server(), t0, 4);
        let (_, r) = b.poll_transmit().expect("request");
        let id = request_id(&r);
        let other: SocketAddr = "192.0.2.2:3478".parse().expect("address");
        assert!(!b.handle_response(t0, other, &success(id, "198.51.100.7:1")));
        let stranger = TransactionId::new([7; 12]);
        assert!(!b.owns_transaction(&stranger));
        assert!(!b.handle_response(t0, server(), &success(stranger, "198.51.100.7:1")));
        assert!(!b.handle_response(t0, server(), b"not stun at all, not at all"));
        assert_eq!(*b.state(), BindingState::Pending);

        // The same server through a dual-stack socket (IPv4-mapped IPv6) is the server.
        let mapped_server: SocketAddr = "[::ffff:192.0.2.1]:3478".parse().expect("address");
        assert!(b.handle_response(t0, mapped_server, &success(id, "198.51.100.7:1")));
    }

    #[test]
    fn an_error_answer_fails_with_the_servers_reason() {
        let t0 = Instant::now();
        let mut b = StunBinding::new(server(), t0, 5);
        let (_, r) = b.poll_transmit().expect("request");
        let error = ErrorCode::new(420, "Unknown Attribute".to_owned()).expect("error code");
        let bytes = response(
            request_id(&r),
            MessageClass::ErrorResponse,
            vec![error.into()],
        );
        assert!(b.handle_response(t0, server(), &bytes));
        let BindingState::Failed { reason } = b.state() else {
            panic!("{:?}", b.state());
        };
        assert!(reason.contains("420 Unknown Attribute"), "{reason}");
    }

    #[test]
    fn dubious_answers_are_dropped_and_counted_and_the_request_stands() {
        let t0 = Instant::now();
        let mut b = StunBinding::new(server(), t0, 6);
        let (_, r) = b.poll_transmit().expect("request");
        let id = request_id(&r);

        // No mapped address.
        let software = Software::new("x".to_owned()).expect("software");
        let empty = response(id, MessageClass::SuccessResponse, vec![software.into()]);
        assert!(b.handle_response(t0, server(), &empty));

        // An unknown comprehension-required attribute (type 0x7777) after the address.
        let mut unknown = success(id, "198.51.100.7:1");
        unknown.extend_from_slice(&[0x77, 0x77, 0x00, 0x04, 1, 2, 3, 4]);
        let len = u16::try_from(unknown.len() - STUN_HEADER_LEN).expect("length");
        unknown[2..4].copy_from_slice(&len.to_be_bytes());
        assert!(b.handle_response(t0, server(), &unknown));

        // Truncated, and an attribute longer than the message.
        let good = success(id, "198.51.100.7:1");
        assert!(!b.handle_response(t0, server(), &good[..good.len() - 4]));
        let mut overrun = good.clone();
        overrun[22..24].copy_from_slice(&0xFFF0u16.to_be_bytes());
        assert!(b.handle_response(t0, server(), &overrun));

        // Too large, and too many attributes.
        let mut huge = good.clone();
        huge.resize(MAX_CONTROL_MESSAGE + 4, 0);
        let len = u16::try_from(huge.len() - STUN_HEADER_LEN).expect("length");
        huge[2..4].copy_from_slice(&len.to_be_bytes());
        assert!(b.handle_response(t0, server(), &huge));
        let many: Vec<Rfc5389> = (0..MAX_ATTRIBUTES + 1)
            .map(|_| Software::new("s".to_owned()).expect("software").into())
            .collect();
        assert!(b.handle_response(
            t0,
            server(),
            &response(id, MessageClass::SuccessResponse, many)
        ));

        assert_eq!(*b.state(), BindingState::Pending);
        assert_eq!(b.stats().dropped, 5);
        assert!(b.handle_response(t0, server(), &good));
        assert!(b.mapped_address().is_some());
    }

    #[test]
    fn a_pre_rfc_5389_mapped_address_is_accepted() {
        let t0 = Instant::now();
        let mut b = StunBinding::new(server(), t0, 7);
        let (_, r) = b.poll_transmit().expect("request");
        let mapped: SocketAddr = "198.51.100.7:4000".parse().expect("address");
        let bytes = response(
            request_id(&r),
            MessageClass::SuccessResponse,
            vec![MappedAddress::new(mapped).into()],
        );
        assert!(b.handle_response(t0, server(), &bytes));
        assert_eq!(b.mapped_address(), Some(mapped));
    }

    #[test]
    fn transaction_ids_need_a_well_formed_header() {
        let good = success(TransactionId::new([9; 12]), "198.51.100.7:1");
        assert_eq!(transaction_id(&good), Some(TransactionId::new([9; 12])));
        let mut cookie = good.clone();
        cookie[5] ^= 1;
        assert_eq!(transaction_id(&cookie), None);
        let mut top = good.clone();
        top[0] |= 0x80;
        assert_eq!(transaction_id(&top), None);
        assert_eq!(transaction_id(&good[..19]), None);
        assert_eq!(transaction_id(&good[..good.len() - 1]), None);
        let mut odd = good.clone();
        odd[3] += 1;
        odd.push(0);
        assert_eq!(transaction_id(&odd), None, "length not a multiple of 4");
    }

    #[test]
    fn ids_differ_per_seed_and_per_request() {
        let mut a = TransactionIds::new(1, "x");
        let mut b = TransactionIds::new(2, "x");
        let mut c = TransactionIds::new(1, "y");
        let (a1, a2, b1, c1) = (a.next_id(), a.next_id(), b.next_id(), c.next_id());
        assert_ne!(a1, a2);
        assert_ne!(a1, b1);
        assert_ne!(a1, c1, "another client with the same seed");
        assert_eq!(
            TransactionIds::new(1, "x").next_id(),
            a1,
            "deterministic for tests"
        );
    }

    #[test]
    fn random_and_mutated_input_never_panics() {
        let t0 = Instant::now();
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let mut b = StunBinding::new(server(), t0, 8);
        let (_, r) = b.poll_transmit().expect("request");
        let id = request_id(&r);
        let good = success(id, "198.51.100.7:1");
        let mut accepted = 0;
        for round in 0..20_000 {
            let mut bytes = match round % 3 {
                // Noise behind a header that carries our transaction ID.
                0 => {
                    let len = rng.below(200) & !3;
                    let mut bytes = vec![0x01, 0x01, 0, 0];
                    bytes[2..4].copy_from_slice(&(len as u16).to_be_bytes());
                    bytes.extend_from_slice(&STUN_MAGIC_COOKIE);
                    bytes.extend_from_slice(id.as_bytes());
                    bytes.extend(rng.bytes(len));
                    bytes
                }
                // A genuine answer with a few bytes changed.
                1 => {
                    let mut bytes = good.clone();
                    for _ in 0..1 + rng.below(4) {
                        let at = STUN_HEADER_LEN + rng.below(bytes.len() - STUN_HEADER_LEN);
                        bytes[at] = rng.next() as u8;
                    }
                    bytes
                }
                _ => {
                    let len = rng.below(100);
                    rng.bytes(len)
                }
            };
            if round % 7 == 0 {
                let cut = rng.below(bytes.len() + 1);
                bytes.truncate(cut);
            }
            if b.handle_response(t0, server(), &bytes) && b.poll_event().is_some() {
                // Answered (or refused): start over, with the same transaction ID.
                accepted += 1;
                b = StunBinding::new(server(), t0, 8);
                b.poll_transmit();
            }
            transaction_id(&bytes);
            decode_control::<Rfc5389>(&bytes);
        }
        assert!(accepted > 0 && accepted < 20_000, "{accepted}");
    }
}
