//! A raw XMPP client for tests that must send what no well-behaved client would: stanzas nested
//! 20 000 deep, 64 KiB attributes, bytes cut at any place.
//!
//! It logs in as plainly as XMPP allows: TCP (opened inside a network namespace when asked),
//! STARTTLS trusting only the test CA, SASL PLAIN (which servers allow over TLS), a stream
//! restart and resource binding. Then [`RawXmpp::send_raw`] writes whatever bytes it is given,
//! in small chunks, and [`RawXmpp::recv`] and [`RawXmpp::wait_iq`] read back top-level elements
//! with a flat scanner: no recursion and no tree, whatever the depth of what comes back.
//!
//! It blocks, and every step has a timeout. It is a test tool: it trusts the server to write
//! well-formed XML and only checks what it needs to find where each element ends.

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{self, ClientConfig, ClientConnection, RootCertStore, StreamOwned};

use crate::netns::Netns;
use crate::nsenter::{NsHandle, run_in};

/// How long each step of the login, and each write, may take by default.
pub const RAW_STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// [`RawXmpp::send_raw`] writes at most this many bytes at a time.
const CHUNK: usize = 4096;

/// The largest element [`RawXmpp::recv`] takes; a larger one is an error.
const MAX_ELEMENT: usize = 4 << 20;

/// The id of the resource binding request.
const BIND_ID: &str = "raw-bind";

const NS_TLS: &str = "urn:ietf:params:xml:ns:xmpp-tls";
const NS_SASL: &str = "urn:ietf:params:xml:ns:xmpp-sasl";
const NS_BIND: &str = "urn:ietf:params:xml:ns:xmpp-bind";
const NS_STANZAS: &str = "urn:ietf:params:xml:ns:xmpp-stanzas";
const NS_STREAMS: &str = "urn:ietf:params:xml:ns:xmpp-streams";

/// Why a raw client could not do what it was asked.
#[derive(Debug)]
pub enum RawError {
    /// Nothing (or not enough) came within `after` while waiting for `what`.
    Timeout { what: String, after: Duration },
    /// The server closed the connection or the stream while we waited for `what`.
    Closed { what: String },
    /// A system call failed during `what`.
    Io { what: String, source: io::Error },
    /// TLS could not be set up.
    Tls { detail: String },
    /// The server ended the stream with this error (`policy-violation`, say).
    Stream { condition: String, text: String },
    /// The server refused `what` (a wrong password, a resource it will not bind).
    Refused { what: String, condition: String },
    /// The server answered something else than `what`.
    Unexpected { what: String, got: String },
    /// What the server sent is not XML as far as the scanner can tell.
    Malformed { detail: String },
}

impl fmt::Display for RawError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RawError::Timeout { what, after } => write!(f, "no {what} within {after:?}"),
            RawError::Closed { what } => {
                write!(f, "the server closed the connection (waiting for {what})")
            }
            RawError::Io { what, source } => write!(f, "{what}: {source}"),
            RawError::Tls { detail } => write!(f, "TLS: {detail}"),
            RawError::Stream { condition, text } if text.is_empty() => {
                write!(f, "the server ended the stream: {condition}")
            }
            RawError::Stream { condition, text } => {
                write!(f, "the server ended the stream: {condition} ({text})")
            }
            RawError::Refused { what, condition } => {
                write!(f, "the server refused {what}: {condition}")
            }
            RawError::Unexpected { what, got } => write!(f, "expected {what}, got {got}"),
            RawError::Malformed { detail } => write!(f, "the server sent bad XML: {detail}"),
        }
    }
}

impl std::error::Error for RawError {}

/// One tag of a [`RawElement`], in document order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawTag {
    /// 0 for the element itself, 1 for its children, and so on.
    pub depth: usize,
    /// The name as written, prefix included (`stream:features`).
    pub name: String,
    /// The attributes as written (`xmlns` included), values unescaped.
    pub attrs: Vec<(String, String)>,
    /// The text directly inside the tag, unescaped.
    pub text: String,
}

impl RawTag {
    /// The name without its prefix.
    #[must_use]
    pub fn local_name(&self) -> &str {
        local(&self.name)
    }

    #[must_use]
    pub fn attr(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }
}

/// A top-level element as received: its tags in document order, flat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawElement {
    tags: Vec<RawTag>,
    size: usize,
}

impl RawElement {
    /// The element's name without its prefix (`iq`, `presence`, `features`).
    #[must_use]
    pub fn name(&self) -> &str {
        self.root().local_name()
    }

    /// An attribute of the element itself.
    #[must_use]
    pub fn attr(&self, name: &str) -> Option<&str> {
        self.root().attr(name)
    }

    /// Every tag, the element's own first.
    #[must_use]
    pub fn tags(&self) -> &[RawTag] {
        &self.tags
    }

    /// The bytes it took on the wire.
    #[must_use]
    pub fn size(&self) -> usize {
        self.size
    }

    /// How many levels deep it nests: 1 for an element without children.
    #[must_use]
    pub fn depth(&self) -> usize {
        self.tags.iter().map(|t| t.depth + 1).max().unwrap_or(0)
    }

    /// The first child (depth 1) with this local name.
    #[must_use]
    pub fn child(&self, name: &str) -> Option<&RawTag> {
        self.tags
            .iter()
            .find(|t| t.depth == 1 && t.local_name() == name)
    }

    /// The condition of a stanza error (`policy-violation`, say): the first child of `<error/>`
    /// in the stanzas namespace.
    #[must_use]
    pub fn error_condition(&self) -> Option<&str> {
        self.condition("error", NS_STANZAS)
    }

    /// The first grandchild in namespace `ns` under the first child named `parent`.
    fn condition(&self, parent: &str, ns: &str) -> Option<&str> {
        let at = self
            .tags
            .iter()
            .position(|t| t.depth == 1 && t.local_name() == parent)?;
        self.tags[at + 1..]
            .iter()
            .take_while(|t| t.depth > 1)
            .find(|t| t.depth == 2 && t.attr("xmlns") == Some(ns))
            .map(RawTag::local_name)
    }

    fn root(&self) -> &RawTag {
        // The scanner makes no element without its own tag.
        &self.tags[0]
    }
}

impl fmt::Display for RawElement {
    /// The element's own tag (long values cut), its children's names and its size.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let root = self.root();
        write!(f, "<{}", root.name)?;
        for (key, value) in &root.attrs {
            match value.char_indices().nth(60) {
                Some((cut, _)) => write!(f, " {key}='{}…'", &value[..cut])?,
                None => write!(f, " {key}='{value}'")?,
            }
        }
        f.write_str(">")?;
        let children: Vec<&str> = self
            .tags
            .iter()
            .filter(|t| t.depth == 1)
            .take(6)
            .map(|t| t.name.as_str())
            .collect();
        if !children.is_empty() {
            write!(f, " [{}]", children.join(", "))?;
        }
        write!(f, " ({} bytes, depth {})", self.size, self.depth())
    }
}

/// Options for a [`RawXmpp`]; [`RawXmppBuilder::login`] connects.
#[derive(Debug, Clone)]
pub struct RawXmppBuilder {
    addr: SocketAddr,
    domain: String,
    ca_der: Vec<u8>,
    netns: Option<NsHandle>,
    resource: String,
    step_timeout: Duration,
}

impl RawXmppBuilder {
    /// Connects from inside `ns`.
    #[must_use]
    pub fn netns(mut self, ns: &Netns) -> RawXmppBuilder {
        self.netns = Some(NsHandle::of(ns));
        self
    }

    /// The resource to bind; `raw` by default.
    #[must_use]
    pub fn resource(mut self, resource: &str) -> RawXmppBuilder {
        self.resource = resource.to_owned();
        self
    }

    /// How long each login step and each write may take ([`RAW_STEP_TIMEOUT`] by default).
    #[must_use]
    pub fn step_timeout(mut self, timeout: Duration) -> RawXmppBuilder {
        self.step_timeout = timeout;
        self
    }

    /// Logs in as `user@DOMAIN` with SASL PLAIN and binds the resource.
    ///
    /// # Errors
    /// When a step fails or takes longer than the step timeout; the error says which.
    pub fn login(self, user: &str, password: &str) -> Result<RawXmpp, RawError> {
        let tls = tls_config(&self.ca_der)?;
        let (addr, timeout) = (self.addr, self.step_timeout);
        let tcp = run_in(self.netns.as_ref(), move || {
            TcpStream::connect_timeout(&addr, timeout)
        })
        .and_then(|connected| connected)
        .map_err(|source| io_error(format!("connecting to {addr}"), source, timeout))?;
        tcp.set_nodelay(true)
            .and_then(|()| tcp.set_write_timeout(Some(timeout)))
            .map_err(|source| io_error("setting up the socket".to_owned(), source, timeout))?;
        let mut raw = RawXmpp {
            io: Io::Plain(tcp),
            buf: Vec::new(),
            backlog: VecDeque::new(),
            domain: self.domain,
            jid: String::new(),
            step_timeout: timeout,
        };

        let features = raw.open_stream("stream features")?;
        if features.child("starttls").is_none() {
            return Err(RawError::Unexpected {
                what: "an offer of STARTTLS".to_owned(),
                got: features.to_string(),
            });
        }
        raw.send_raw(format!("<starttls xmlns='{NS_TLS}'/>").as_bytes())?;
        let answer = raw.next(&Deadline::new(timeout, "answer to STARTTLS"))?;
        if answer.name() != "proceed" {
            return Err(RawError::Unexpected {
                what: "<proceed/>".to_owned(),
                got: answer.to_string(),
            });
        }
        let mut raw = raw.start_tls(tls)?;

        let features = raw.open_stream("stream features after STARTTLS")?;
        let mechanisms: Vec<&str> = features
            .tags()
            .iter()
            .filter(|t| t.local_name() == "mechanism")
            .map(|t| t.text.trim())
            .collect();
        if !mechanisms.contains(&"PLAIN") {
            return Err(RawError::Unexpected {
                what: "an offer of SASL PLAIN".to_owned(),
                got: format!("mechanisms {mechanisms:?}"),
            });
        }
        raw.send_raw(plain_auth(user, password).as_bytes())?;
        let answer = raw.next(&Deadline::new(timeout, "answer to SASL PLAIN"))?;
        match answer.name() {
            "success" => {}
            "failure" => {
                return Err(RawError::Refused {
                    what: format!("the login of {user}"),
                    condition: answer
                        .tags()
                        .iter()
                        .find(|t| t.depth == 1 && t.local_name() != "text")
                        .map_or_else(|| answer.to_string(), |t| t.name.clone()),
                });
            }
            _ => {
                return Err(RawError::Unexpected {
                    what: "<success/> or <failure/>".to_owned(),
                    got: answer.to_string(),
                });
            }
        }

        let features = raw.open_stream("stream features after authentication")?;
        if features.child("bind").is_none() {
            return Err(RawError::Unexpected {
                what: "an offer of resource binding".to_owned(),
                got: features.to_string(),
            });
        }
        raw.send_raw(
            format!(
                "<iq type='set' id='{BIND_ID}'><bind xmlns='{NS_BIND}'><resource>{}</resource></bind></iq>",
                escape(&self.resource)
            )
            .as_bytes(),
        )?;
        let answer = raw.wait_iq(BIND_ID, timeout)?;
        if answer.attr("type") != Some("result") {
            return Err(RawError::Refused {
                what: format!("the resource {:?}", self.resource),
                condition: answer
                    .error_condition()
                    .unwrap_or("no condition")
                    .to_owned(),
            });
        }
        raw.jid = answer
            .tags()
            .iter()
            .find(|t| t.local_name() == "jid")
            .map(|t| t.text.trim().to_owned())
            .filter(|jid| !jid.is_empty())
            .ok_or_else(|| RawError::Unexpected {
                what: "the bound JID".to_owned(),
                got: answer.to_string(),
            })?;
        Ok(raw)
    }
}

/// A logged-in XMPP session that sends raw bytes and reads elements back.
pub struct RawXmpp {
    io: Io,
    /// Bytes received and not yet taken as elements.
    buf: Vec<u8>,
    /// Elements read while waiting for another, oldest first.
    backlog: VecDeque<RawElement>,
    domain: String,
    jid: String,
    step_timeout: Duration,
}

impl fmt::Debug for RawXmpp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawXmpp")
            .field("jid", &self.jid)
            .field("buffered", &self.buf.len())
            .field("backlog", &self.backlog.len())
            .finish_non_exhaustive()
    }
}

impl RawXmpp {
    /// Options for a client of the server at `addr` serving `domain`, whose certificate the CA
    /// `ca_der` (DER) signed.
    #[must_use]
    pub fn builder(addr: SocketAddr, domain: &str, ca_der: &[u8]) -> RawXmppBuilder {
        RawXmppBuilder {
            addr,
            domain: domain.to_owned(),
            ca_der: ca_der.to_vec(),
            netns: None,
            resource: "raw".to_owned(),
            step_timeout: RAW_STEP_TIMEOUT,
        }
    }

    /// The bound full JID (`user@domain/resource`).
    #[must_use]
    pub fn jid(&self) -> &str {
        &self.jid
    }

    /// Writes `bytes` as they are, [`CHUNK`] bytes at a time.
    ///
    /// # Errors
    /// When a write fails or blocks for longer than the step timeout.
    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<(), RawError> {
        let what = || format!("sending {} bytes", bytes.len());
        for chunk in bytes.chunks(CHUNK) {
            self.io
                .write_all(chunk)
                .and_then(|()| self.io.flush())
                .map_err(|source| io_error(what(), source, self.step_timeout))?;
        }
        Ok(())
    }

    /// The next top-level element from the server.
    ///
    /// # Errors
    /// When none comes within `timeout`, the connection or the stream ends (a stream error
    /// included), or the bytes are not XML.
    pub fn recv(&mut self, timeout: Duration) -> Result<RawElement, RawError> {
        self.next(&Deadline::new(timeout, "element from the server"))
    }

    /// Waits for the answer (type `result` or `error`) to the IQ with this id. Elements that
    /// come meanwhile are kept for [`RawXmpp::recv`], in order.
    ///
    /// # Errors
    /// As [`RawXmpp::recv`].
    pub fn wait_iq(&mut self, id: &str, timeout: Duration) -> Result<RawElement, RawError> {
        let deadline = Deadline::new(timeout, &format!("answer to the IQ {id:?}"));
        let mut others = Vec::new();
        let found = loop {
            match self.next(&deadline) {
                Ok(e)
                    if e.name() == "iq"
                        && e.attr("id") == Some(id)
                        && matches!(e.attr("type"), Some("result" | "error")) =>
                {
                    break Ok(e);
                }
                Ok(other) => others.push(other),
                Err(e) => break Err(e),
            }
        };
        for other in others.into_iter().rev() {
            self.backlog.push_front(other);
        }
        found
    }

    /// Sends a stream header and reads the server's, then its features.
    fn open_stream(&mut self, what: &str) -> Result<RawElement, RawError> {
        self.send_raw(
            format!(
                "<?xml version='1.0'?><stream:stream xmlns='jabber:client' \
                 xmlns:stream='http://etherx.jabber.org/streams' to='{}' version='1.0'>",
                escape(&self.domain)
            )
            .as_bytes(),
        )?;
        let deadline = Deadline::new(self.step_timeout, "stream header");
        loop {
            match scan_header(&self.buf).map_err(|detail| RawError::Malformed { detail })? {
                Scanned::Done(_, used) => {
                    self.buf.drain(..used);
                    break;
                }
                Scanned::Incomplete => self.read_more(&deadline)?,
            }
        }
        let features = self.next(&Deadline::new(self.step_timeout, what))?;
        if features.name() != "features" {
            return Err(RawError::Unexpected {
                what: what.to_owned(),
                got: features.to_string(),
            });
        }
        Ok(features)
    }

    /// Switches the connection to TLS (after `<proceed/>`) and completes the handshake.
    fn start_tls(self, config: Arc<ClientConfig>) -> Result<RawXmpp, RawError> {
        let Io::Plain(tcp) = self.io else {
            return Err(RawError::Tls {
                detail: "STARTTLS on a connection that has TLS already".to_owned(),
            });
        };
        let name = ServerName::try_from(self.domain.clone()).map_err(|e| RawError::Tls {
            detail: format!("{} is not a TLS server name: {e}", self.domain),
        })?;
        let conn = ClientConnection::new(config, name).map_err(|e| RawError::Tls {
            detail: e.to_string(),
        })?;
        let mut tls = StreamOwned::new(conn, tcp);
        let after = self.step_timeout;
        tls.sock
            .set_read_timeout(Some(after))
            .map_err(|source| io_error("setting up the socket".to_owned(), source, after))?;
        while tls.conn.is_handshaking() {
            match tls.conn.complete_io(&mut tls.sock) {
                Ok((0, 0)) => {
                    return Err(RawError::Closed {
                        what: "the TLS handshake".to_owned(),
                    });
                }
                Ok(_) => {}
                Err(e) if is_timeout(&e) => {
                    return Err(RawError::Timeout {
                        what: "TLS handshake".to_owned(),
                        after,
                    });
                }
                Err(e) => {
                    return Err(RawError::Tls {
                        detail: e.to_string(),
                    });
                }
            }
        }
        Ok(RawXmpp {
            io: Io::Tls(Box::new(tls)),
            ..self
        })
    }

    /// The next element, from the backlog or the connection. A stream error is an `Err`.
    fn next(&mut self, deadline: &Deadline) -> Result<RawElement, RawError> {
        if let Some(e) = self.backlog.pop_front() {
            return Ok(e);
        }
        loop {
            match scan_element(&self.buf).map_err(|detail| RawError::Malformed { detail })? {
                Scanned::Done(Item::Element(e), used) => {
                    self.buf.drain(..used);
                    if e.root().name == "stream:error" {
                        return Err(RawError::Stream {
                            condition: e
                                .tags()
                                .iter()
                                .find(|t| {
                                    t.depth == 1
                                        && t.attr("xmlns") == Some(NS_STREAMS)
                                        && t.local_name() != "text"
                                })
                                .map_or_else(String::new, |t| t.local_name().to_owned()),
                            text: e.child("text").map_or_else(String::new, |t| t.text.clone()),
                        });
                    }
                    return Ok(e);
                }
                Scanned::Done(Item::StreamEnd, _) => {
                    return Err(RawError::Closed {
                        what: deadline.what.clone(),
                    });
                }
                Scanned::Incomplete if self.buf.len() > MAX_ELEMENT => {
                    return Err(RawError::Malformed {
                        detail: format!("an element larger than {MAX_ELEMENT} bytes"),
                    });
                }
                Scanned::Incomplete => self.read_more(deadline)?,
            }
        }
    }

    /// Reads what has arrived, waiting until the deadline for something.
    fn read_more(&mut self, deadline: &Deadline) -> Result<(), RawError> {
        let left = deadline
            .at
            .checked_duration_since(Instant::now())
            .filter(|left| !left.is_zero())
            .ok_or_else(|| deadline.timeout())?;
        self.io
            .socket()
            .set_read_timeout(Some(left))
            .map_err(|source| io_error("setting a read timeout".to_owned(), source, left))?;
        let mut chunk = vec![0; 64 * 1024];
        match self.io.read(&mut chunk) {
            Ok(0) => Err(RawError::Closed {
                what: deadline.what.clone(),
            }),
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(()),
            Err(e) if is_timeout(&e) => Err(deadline.timeout()),
            Err(source) => Err(RawError::Io {
                what: format!("waiting for {}", deadline.what),
                source,
            }),
        }
    }
}

/// The connection, before and after STARTTLS.
enum Io {
    Plain(TcpStream),
    Tls(Box<StreamOwned<ClientConnection, TcpStream>>),
}

impl Io {
    fn socket(&self) -> &TcpStream {
        match self {
            Io::Plain(tcp) => tcp,
            Io::Tls(tls) => &tls.sock,
        }
    }
}

impl Read for Io {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Io::Plain(tcp) => tcp.read(buf),
            Io::Tls(tls) => tls.read(buf),
        }
    }
}

impl Write for Io {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Io::Plain(tcp) => tcp.write(buf),
            Io::Tls(tls) => tls.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Io::Plain(tcp) => tcp.flush(),
            Io::Tls(tls) => tls.flush(),
        }
    }
}

/// When a wait ends, and what it waits for (`answer to STARTTLS`).
struct Deadline {
    at: Instant,
    after: Duration,
    what: String,
}

impl Deadline {
    fn new(after: Duration, what: &str) -> Deadline {
        Deadline {
            at: Instant::now() + after,
            after,
            what: what.to_owned(),
        }
    }

    fn timeout(&self) -> RawError {
        RawError::Timeout {
            what: self.what.clone(),
            after: self.after,
        }
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

fn io_error(what: String, source: io::Error, after: Duration) -> RawError {
    if is_timeout(&source) {
        RawError::Timeout { what, after }
    } else {
        RawError::Io { what, source }
    }
}

/// A TLS client config that trusts `ca_der` alone.
fn tls_config(ca_der: &[u8]) -> Result<Arc<ClientConfig>, RawError> {
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from(ca_der.to_vec()))
        .map_err(|e| RawError::Tls {
            detail: format!("the test CA is not a usable trust anchor: {e}"),
        })?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| RawError::Tls {
            detail: format!("cannot configure TLS: {e}"),
        })?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The SASL PLAIN request for `user` (RFC 4616: no authorisation identity).
fn plain_auth(user: &str, password: &str) -> String {
    let message = BASE64.encode(format!("\0{user}\0{password}"));
    format!("<auth xmlns='{NS_SASL}' mechanism='PLAIN'>{message}</auth>")
}

/// `s` as XML text or attribute value.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '\'' => out.push_str("&apos;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
    out
}

/// What the scanner found at the start of a buffer.
#[derive(Debug, PartialEq, Eq)]
enum Scanned<T> {
    /// It has not all arrived yet.
    Incomplete,
    /// Found; it and what came before it take this many bytes.
    Done(T, usize),
}

/// A top-level item of a stream.
#[derive(Debug, PartialEq, Eq)]
enum Item {
    Element(RawElement),
    /// `</stream:stream>`.
    StreamEnd,
}

/// Reads the server's stream header (an XML declaration, then `<stream:stream …>`).
fn scan_header(buf: &[u8]) -> Result<Scanned<RawTag>, String> {
    let mut pos = 0;
    loop {
        pos += buf[pos..]
            .iter()
            .take_while(|b| b.is_ascii_whitespace())
            .count();
        let rest = &buf[pos..];
        if rest.is_empty() {
            return Ok(Scanned::Incomplete);
        }
        if rest.starts_with(b"<?") {
            let Some(end) = find(rest, b"?>") else {
                return Ok(Scanned::Incomplete);
            };
            pos += end + 2;
            continue;
        }
        if rest[0] != b'<' {
            return Err(format!("expected a stream header, got {}", preview(rest)));
        }
        let Scanned::Done((name, attrs, closed), used) = start_tag(rest)? else {
            return Ok(Scanned::Incomplete);
        };
        if local(&name) != "stream" || closed {
            return Err(format!("expected <stream:stream>, got {}", preview(rest)));
        }
        let tag = RawTag {
            depth: 0,
            name,
            attrs,
            text: String::new(),
        };
        return Ok(Scanned::Done(tag, pos + used));
    }
}

/// Reads the next top-level element, or the end of the stream. Iterative: the depth of the
/// element costs memory on the heap, never stack.
fn scan_element(buf: &[u8]) -> Result<Scanned<Item>, String> {
    let mut pos = 0;
    let mut start = 0;
    let mut tags: Vec<RawTag> = Vec::new();
    // Indices in `tags` of the elements still open, innermost last.
    let mut open: Vec<usize> = Vec::new();
    loop {
        if open.is_empty() {
            // Between top-level items: whitespace keepalives.
            pos += buf[pos..]
                .iter()
                .take_while(|b| b.is_ascii_whitespace())
                .count();
        }
        let rest = &buf[pos..];
        let Some(&first) = rest.first() else {
            return Ok(Scanned::Incomplete);
        };
        if first != b'<' {
            let Some(&current) = open.last() else {
                return Err(format!("text outside an element: {}", preview(rest)));
            };
            let Some(len) = find(rest, b"<") else {
                return Ok(Scanned::Incomplete);
            };
            tags[current]
                .text
                .push_str(&unescape(&String::from_utf8_lossy(&rest[..len])));
            pos += len;
        } else if rest.starts_with(b"<!--") {
            let Some(len) = find(rest, b"-->") else {
                return Ok(Scanned::Incomplete);
            };
            pos += len + 3;
        } else if rest.starts_with(b"<![CDATA[") {
            let Some(&current) = open.last() else {
                return Err(format!("CDATA outside an element: {}", preview(rest)));
            };
            let Some(len) = find(rest, b"]]>") else {
                return Ok(Scanned::Incomplete);
            };
            tags[current]
                .text
                .push_str(&String::from_utf8_lossy(&rest[9..len]));
            pos += len + 3;
        } else if rest.starts_with(b"<?") {
            let Some(len) = find(rest, b"?>") else {
                return Ok(Scanned::Incomplete);
            };
            pos += len + 2;
        } else if rest.starts_with(b"</") {
            let Some(len) = find(rest, b">") else {
                return Ok(Scanned::Incomplete);
            };
            let name = String::from_utf8_lossy(&rest[2..len]).trim().to_owned();
            pos += len + 1;
            match open.pop() {
                None if local(&name) == "stream" => return Ok(Scanned::Done(Item::StreamEnd, pos)),
                None => return Err(format!("</{name}> closes nothing")),
                Some(i) if tags[i].name != name => {
                    return Err(format!("</{name}> closes <{}>", tags[i].name));
                }
                Some(_) if open.is_empty() => {
                    let element = RawElement {
                        tags,
                        size: pos - start,
                    };
                    return Ok(Scanned::Done(Item::Element(element), pos));
                }
                Some(_) => {}
            }
        } else {
            let Scanned::Done((name, attrs, closed), len) = start_tag(rest)? else {
                return Ok(Scanned::Incomplete);
            };
            if tags.is_empty() {
                start = pos;
            }
            tags.push(RawTag {
                depth: open.len(),
                name,
                attrs,
                text: String::new(),
            });
            pos += len;
            if !closed {
                open.push(tags.len() - 1);
            } else if open.is_empty() {
                let element = RawElement {
                    tags,
                    size: pos - start,
                };
                return Ok(Scanned::Done(Item::Element(element), pos));
            }
        }
    }
}

/// A start tag: name, attributes, and whether it closes itself (`<a/>`).
type StartTag = (String, Vec<(String, String)>, bool);

/// Reads the start tag at the beginning of `buf` (which starts with `<`): its name, its
/// attributes and whether it closes itself.
fn start_tag(buf: &[u8]) -> Result<Scanned<StartTag>, String> {
    let mut quote = None;
    let mut end = None;
    for (i, &b) in buf.iter().enumerate().skip(1) {
        match quote {
            Some(q) if b == q => quote = None,
            Some(_) => {}
            None if b == b'\'' || b == b'"' => quote = Some(b),
            None if b == b'>' => {
                end = Some(i);
                break;
            }
            None if b == b'<' => return Err(format!("'<' inside a tag: {}", preview(buf))),
            None => {}
        }
    }
    let Some(end) = end else {
        return Ok(Scanned::Incomplete);
    };
    let closed = buf[end - 1] == b'/';
    let inner = String::from_utf8_lossy(&buf[1..if closed { end - 1 } else { end }]);
    let name_len = inner
        .find(|c: char| c.is_ascii_whitespace())
        .unwrap_or(inner.len());
    let name = inner[..name_len].to_owned();
    if name.is_empty() {
        return Err(format!("a tag without a name: {}", preview(buf)));
    }
    let mut attrs = Vec::new();
    let mut rest = inner[name_len..].trim_start();
    while !rest.is_empty() {
        let bad = || format!("a bad attribute in <{name}>: {}", preview(rest.as_bytes()));
        let (key, after) = rest.split_once('=').ok_or_else(bad)?;
        let after = after.trim_start();
        let q = after
            .chars()
            .next()
            .filter(|c| *c == '\'' || *c == '"')
            .ok_or_else(bad)?;
        let value_and_rest = &after[1..];
        let close = value_and_rest.find(q).ok_or_else(bad)?;
        attrs.push((key.trim().to_owned(), unescape(&value_and_rest[..close])));
        rest = value_and_rest[close + 1..].trim_start();
    }
    Ok(Scanned::Done((name, attrs, closed), end + 1))
}

/// Replaces the predefined entities and character references.
fn unescape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        rest = &rest[amp..];
        let decoded = rest
            .find(';')
            .filter(|&semi| semi <= 10)
            .and_then(|semi| Some((entity(&rest[1..semi])?, semi)));
        match decoded {
            Some((c, semi)) => {
                out.push(c);
                rest = &rest[semi + 1..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

fn entity(name: &str) -> Option<char> {
    match name {
        "lt" => Some('<'),
        "gt" => Some('>'),
        "amp" => Some('&'),
        "apos" => Some('\''),
        "quot" => Some('"'),
        _ => {
            let number = name.strip_prefix('#')?;
            let code = match number.strip_prefix('x') {
                Some(hex) => u32::from_str_radix(hex, 16).ok()?,
                None => number.parse().ok()?,
            };
            char::from_u32(code)
        }
    }
}

/// A name without its prefix.
fn local(name: &str) -> &str {
    name.rsplit_once(':').map_or(name, |(_, local)| local)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The first bytes of `bytes`, for error messages.
fn preview(bytes: &[u8]) -> String {
    let cut = &bytes[..bytes.len().min(80)];
    format!("{:?}", String::from_utf8_lossy(cut))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::thread;

    use crate::ca::TestCa;

    fn element(xml: &str) -> RawElement {
        match scan_element(xml.as_bytes()) {
            Ok(Scanned::Done(Item::Element(e), used)) => {
                assert_eq!(used, xml.len(), "{xml}");
                e
            }
            other => panic!("{xml}: {other:?}"),
        }
    }

    #[test]
    fn an_element_is_read_with_its_attributes_text_and_children() {
        let e = element(
            "<iq type='error' id=\"a&amp;b\" from='x@y/z'>\
             <query xmlns='jabber:iq:version'/>\
             <error type='cancel'>\
             <service-unavailable xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/>\
             <text xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'>1 &lt; 2 &#x263A; &#65;<![CDATA[<raw>]]></text>\
             </error></iq>",
        );
        assert_eq!(e.name(), "iq");
        assert_eq!(e.attr("id"), Some("a&b"));
        assert_eq!(e.attr("type"), Some("error"));
        assert_eq!(e.error_condition(), Some("service-unavailable"));
        assert_eq!(e.depth(), 3);
        assert_eq!(
            e.child("query").and_then(|q| q.attr("xmlns")),
            Some("jabber:iq:version")
        );
        let text = e.tags().iter().find(|t| t.name == "text").expect("text");
        assert_eq!(text.text, "1 < 2 \u{263A} A<raw>");
        assert_eq!(
            e.to_string(),
            format!(
                "<iq type='error' id='a&b' from='x@y/z'> [query, error] ({} bytes, depth 3)",
                e.size()
            )
        );
    }

    #[test]
    fn an_element_cut_anywhere_is_incomplete_and_whole_is_read() {
        let xml = "<presence from='a@b/c' note='x > y'><status>hi &amp; bye</status><c a='1'/></presence>";
        for cut in 0..xml.len() {
            assert_eq!(
                scan_element(&xml.as_bytes()[..cut]),
                Ok(Scanned::Incomplete),
                "cut at {cut}"
            );
        }
        let e = element(xml);
        assert_eq!(e.attr("note"), Some("x > y"));
        assert_eq!(e.child("status").map(|s| s.text.as_str()), Some("hi & bye"));
        assert_eq!(e.size(), xml.len());
    }

    #[test]
    fn elements_follow_each_other_and_whitespace_between_them_is_skipped() {
        let stream = b"  \n<a/>\n <b x='1'>t</b> </stream:stream>";
        let Ok(Scanned::Done(Item::Element(a), used)) = scan_element(stream) else {
            panic!("no first element");
        };
        assert_eq!((a.name(), a.size()), ("a", 4));
        let rest = &stream[used..];
        let Ok(Scanned::Done(Item::Element(b), used2)) = scan_element(rest) else {
            panic!("no second element");
        };
        assert_eq!(b.attr("x"), Some("1"));
        assert_eq!(
            scan_element(&rest[used2..]).map(|s| matches!(s, Scanned::Done(Item::StreamEnd, _))),
            Ok(true)
        );
    }

    /// 20 000 levels read on a thread with a 64 KiB stack: nothing recurses on depth.
    #[test]
    fn a_20000_deep_element_is_read_without_recursion() {
        let deep = format!(
            "<message>{}{}</message>",
            "<x>".repeat(20_000),
            "</x>".repeat(20_000)
        );
        let e = thread::Builder::new()
            .stack_size(64 * 1024)
            .spawn(move || element(&deep))
            .expect("a thread")
            .join()
            .expect("no stack overflow");
        assert_eq!(e.depth(), 20_001);
        assert_eq!(e.size(), 140_019);
        assert_eq!(e.tags().len(), 20_001);
    }

    #[test]
    fn what_is_not_xml_is_an_error_not_a_panic() {
        for bad in [
            "<a></b>",
            "text<a/>",
            "</a>",
            "<a x></a>",
            "<a x=y></a>",
            "<a <b>",
            "< x='1'/>",
        ] {
            assert!(scan_element(bad.as_bytes()).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_stream_header_is_read_after_the_xml_declaration() {
        let header = "<?xml version='1.0'?>\n<stream:stream xmlns='jabber:client' id='s1' from='example.org'>";
        for cut in 0..header.len() {
            assert_eq!(
                scan_header(&header.as_bytes()[..cut]),
                Ok(Scanned::Incomplete),
                "cut at {cut}"
            );
        }
        let Ok(Scanned::Done(tag, used)) = scan_header(header.as_bytes()) else {
            panic!("no header");
        };
        assert_eq!(
            (tag.name.as_str(), tag.attr("id"), used),
            ("stream:stream", Some("s1"), header.len())
        );
        assert!(scan_header(b"<features/>").is_err());
    }

    #[test]
    fn plain_auth_carries_user_and_password_without_authzid() {
        let auth = plain_auth("mallory", "pw<&>");
        let b64 = auth
            .strip_prefix("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>")
            .and_then(|s| s.strip_suffix("</auth>"))
            .expect("an auth element");
        assert_eq!(BASE64.decode(b64).expect("base64"), b"\0mallory\0pw<&>");
        assert_eq!(escape("a<b>&'\""), "a&lt;b&gt;&amp;&apos;&quot;");
    }

    /// A loopback listener that accepts one connection and hands it to `serve`.
    fn fake_server(serve: impl FnOnce(TcpStream) + Send + 'static) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("address");
        thread::spawn(move || {
            if let Ok((socket, _)) = listener.accept() {
                serve(socket);
            }
        });
        addr
    }

    #[test]
    fn a_silent_server_is_a_timeout_that_names_the_step() {
        let addr = fake_server(|socket| {
            thread::sleep(Duration::from_secs(3));
            drop(socket);
        });
        let ca = TestCa::new("raw test CA");
        let started = Instant::now();
        let err = RawXmpp::builder(addr, "example.org", ca.der())
            .step_timeout(Duration::from_millis(500))
            .login("mallory", "pw")
            .expect_err("no login without a server");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(err.to_string(), "no stream header within 500ms");
    }

    #[test]
    fn a_server_that_hangs_up_or_refuses_tls_says_so() {
        let ca = TestCa::new("raw test CA");
        // Reads the stream header, then closes: a clean end, no reset.
        let hang_up = fake_server(|mut socket| {
            let _ = socket.read(&mut [0; 512]);
        });
        let err = RawXmpp::builder(hang_up, "example.org", ca.der())
            .login("mallory", "pw")
            .expect_err("no login");
        assert_eq!(
            err.to_string(),
            "the server closed the connection (waiting for stream header)"
        );

        let no_tls = fake_server(|mut socket| {
            let _ = socket.write_all(
                b"<?xml version='1.0'?><stream:stream xmlns='jabber:client' \
                  xmlns:stream='http://etherx.jabber.org/streams' id='1'>\
                  <stream:features><mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>\
                  <mechanism>PLAIN</mechanism></mechanisms></stream:features>",
            );
            thread::sleep(Duration::from_secs(1));
        });
        let err = RawXmpp::builder(no_tls, "example.org", ca.der())
            .login("mallory", "pw")
            .expect_err("no login without TLS");
        assert!(
            err.to_string()
                .starts_with("expected an offer of STARTTLS, got <stream:features>"),
            "{err}"
        );

        let stream_error = fake_server(|mut socket| {
            let _ = socket.write_all(
                b"<stream:stream xmlns:stream='http://etherx.jabber.org/streams'>\
                  <stream:error><host-unknown xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>\
                  </stream:error></stream:stream>",
            );
            thread::sleep(Duration::from_secs(1));
        });
        let err = RawXmpp::builder(stream_error, "example.org", ca.der())
            .login("mallory", "pw")
            .expect_err("no login after a stream error");
        assert_eq!(err.to_string(), "the server ended the stream: host-unknown");
    }
}
