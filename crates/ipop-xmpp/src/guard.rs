//! Bounds on what the XMPP server may hand to the XML parser.
//!
//! Anyone who knows a user's JID can make the server forward a stanza to that user's devices:
//! 20 000 levels deep, a 64 KiB attribute, 200 kB of anything, as long as the server's own
//! stanza limit (usually 256 KiB) lets it through. The parser underneath (rxml, minidom and the
//! typed stanzas of xmpp-parsers) builds trees by recursion and refuses tokens over 8 KiB by
//! failing the whole stream. So every byte from the server passes through a [`Guard`] first:
//! a flat state machine, with no recursion and constant memory per level, that follows the
//! XML just far enough to find where each top-level element (a stanza or a nonza) ends, and
//! checks it against [`Limits`] before anything else sees it.
//!
//! A stanza that breaks a bound is replaced by a placeholder of the same kind that keeps its
//! `id`, `type`, `from` and `to` and carries only `<dropped xmlns='urn:ipop:dropped:0'
//! reason='…'/>`. The stream therefore stays up, stream management (XEP-0198) counts and
//! acknowledges the stanza as handled (the server never replays it), and the session can
//! answer an IQ with an error. A nonza that breaks a bound is left out.
//!
//! The guard also rewrites the server's `<failed/>` answer to a stream resumption into the one
//! shape the stanza stream accepts, so that a refused resumption leads to a fresh session at
//! once instead of a failed stream (servers add a `<text/>`, or leave `h` out as XEP-0198 allows).
//!
//! Well-formedness is not checked here: servers parse and re-serialise everything they forward,
//! and the parser underneath checks it again.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The namespace of the placeholder's payload.
pub const NS_DROPPED: &str = "urn:ipop:dropped:0";
const NS_SM: &[u8] = b"urn:xmpp:sm:3";

/// What a top-level element may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Nesting depth, counting the top-level element as 1.
    pub depth: usize,
    /// Bytes in an element or attribute name.
    pub name: usize,
    /// Bytes in one attribute value, as written (escaped).
    pub attribute: usize,
    /// Bytes in one run of text (or CDATA) between two tags.
    pub text: usize,
    /// Bytes in the whole element.
    pub element: usize,
}

impl Limits {
    /// ipop's own stanzas nest 5 deep (a Jingle candidate); rosters 4. JIDs are at most 3 071
    /// bytes per part. A roster of a few thousand contacts fits in half a megabyte.
    pub const DEFAULT: Limits = Limits {
        depth: 16,
        name: 256,
        attribute: 4096,
        text: 16 * 1024,
        element: 512 * 1024,
    };
}

/// Which bound an element broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Violation {
    TooDeep,
    TokenTooLarge,
    TooLarge,
}

impl Violation {
    pub fn as_str(self) -> &'static str {
        match self {
            Violation::TooDeep => "xml-too-deep",
            Violation::TokenTooLarge => "xml-token-too-large",
            Violation::TooLarge => "stanza-too-large",
        }
    }

    /// Reads the reason of a placeholder back.
    pub fn parse(reason: &str) -> Option<Violation> {
        [
            Violation::TooDeep,
            Violation::TokenTooLarge,
            Violation::TooLarge,
        ]
        .into_iter()
        .find(|v| v.as_str() == reason)
    }
}

/// What the guard reports as it goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuardEvent {
    /// A top-level element broke a bound: `kind` is its name (`iq`, `presence`, `message`, or
    /// a nonza's), `from` its sender when it said one that fits the bounds.
    Dropped {
        violation: Violation,
        kind: String,
        from: Option<String>,
    },
    /// The server refused to resume the stream; `condition` is the error it gave, if any.
    ResumptionFailed { condition: Option<String> },
}

/// Where the guard's events go.
pub type Sink = Arc<dyn Fn(GuardEvent) + Send + Sync>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lex {
    /// Text between tags.
    Content,
    /// Just after `<`.
    Open,
    StartName,
    /// Inside a start tag, between attributes.
    InTag,
    AttrName,
    /// After an attribute name, before `=`.
    AttrEq,
    /// After `=`, before the opening quote.
    AttrQuote,
    AttrValue(u8),
    /// After `/` in a start tag.
    SelfClose,
    EndName,
    /// After an end tag's name, before `>`.
    EndTail,
    /// Inside `<?…?>`; whether the last byte was `?`.
    Pi(bool),
    /// After `<!`: the bytes seen so far decide between comment, CDATA and declaration.
    Bang,
    /// Inside `<!--…-->`; dashes just seen.
    Comment(u8),
    /// Inside `<![CDATA[…]]>`; closing brackets just seen.
    Cdata(u8),
    /// Inside `<!…>` (a DOCTYPE): until `>`.
    Declaration,
}

/// An attribute of a top-level element that the placeholder keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Kept {
    name: Vec<u8>,
    value: Vec<u8>,
    quote: u8,
}

/// The attributes a placeholder keeps, and the one a `<failed/>` is read for.
const KEPT: [&[u8]; 6] = [b"id", b"type", b"from", b"to", b"xmlns", b"h"];

/// The byte-level scanner: bytes in, bytes out, events on the side.
pub struct Scanner {
    limits: Limits,
    lex: Lex,
    /// Element depth from the document root: 1 inside `<stream:stream>`.
    depth: usize,
    /// Bytes ready for the parser, from `out_pos` on.
    out: Vec<u8>,
    out_pos: usize,
    /// Whether the bytes go to the current top-level element rather than straight out.
    in_unit: bool,
    /// The top-level element being read, until it ends; emptied once it breaks a bound.
    unit: Vec<u8>,
    violation: Option<Violation>,
    /// Bytes of the current token (name, value or text run).
    token: usize,
    /// Name of the tag being read (bounded).
    name: Vec<u8>,
    /// Whether the tag being read is an end tag.
    closing: bool,
    /// The top-level element's name and kept attributes.
    root_name: Vec<u8>,
    root_attrs: Vec<Kept>,
    attr_name: Vec<u8>,
    attr_value: Vec<u8>,
    /// Name of the first child of the top-level element (the condition of a `<failed/>`).
    first_child: Option<Vec<u8>>,
    bang: Vec<u8>,
    /// The start tag being read opens a new stream (a restart after authentication).
    stream_header: bool,
    sink: Sink,
}

impl Scanner {
    pub fn new(limits: Limits, sink: Sink) -> Self {
        Scanner {
            limits,
            lex: Lex::Content,
            depth: 0,
            out: Vec::new(),
            out_pos: 0,
            in_unit: false,
            unit: Vec::new(),
            violation: None,
            token: 0,
            name: Vec::new(),
            closing: false,
            root_name: Vec::new(),
            root_attrs: Vec::new(),
            attr_name: Vec::new(),
            attr_value: Vec::new(),
            first_child: None,
            bang: Vec::new(),
            stream_header: false,
            sink,
        }
    }

    /// Bytes ready for the parser.
    pub fn output(&self) -> &[u8] {
        &self.out[self.out_pos..]
    }

    /// Marks `n` bytes of [`Scanner::output`] as taken.
    pub fn consume(&mut self, n: usize) {
        self.out_pos = (self.out_pos + n).min(self.out.len());
        if self.out_pos == self.out.len() {
            self.out.clear();
            self.out_pos = 0;
        }
    }

    pub fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.step(b);
        }
    }

    fn push(&mut self, b: u8) {
        if !self.in_unit {
            self.out.push(b);
        } else if self.violation.is_none() {
            self.unit.push(b);
            if self.unit.len() > self.limits.element {
                self.violate(Violation::TooLarge);
            }
        }
    }

    fn violate(&mut self, v: Violation) {
        if self.in_unit && self.violation.is_none() {
            self.violation = Some(v);
            self.unit = Vec::new();
        }
    }

    /// Counts one more byte of the current token against `limit`.
    fn grow_token(&mut self, limit: usize) {
        self.token += 1;
        if self.token > limit {
            self.violate(Violation::TokenTooLarge);
        }
    }

    fn step(&mut self, b: u8) {
        match self.lex {
            Lex::Content => {
                if b == b'<' {
                    self.lex = Lex::Open;
                    self.token = 0;
                    // At the top level, a `<` may open a stanza: it is held back until the
                    // next byte says what it opens.
                    if !self.at_top() {
                        self.push(b);
                    }
                } else {
                    if self.in_unit {
                        self.grow_token(self.limits.text);
                    }
                    self.push(b);
                }
            }
            Lex::Open => {
                let held = self.at_top();
                match b {
                    b'/' | b'?' | b'!' => {
                        if held {
                            self.out.push(b'<');
                        }
                        self.push(b);
                        self.lex = match b {
                            b'/' => {
                                self.closing = true;
                                Lex::EndName
                            }
                            b'?' => Lex::Pi(false),
                            _ => {
                                self.bang.clear();
                                Lex::Bang
                            }
                        };
                    }
                    _ => {
                        if held {
                            self.begin_unit();
                            self.push(b'<');
                        }
                        self.closing = false;
                        self.name.clear();
                        self.push(b);
                        self.name_byte(b);
                        self.lex = Lex::StartName;
                    }
                }
            }
            Lex::StartName => match b {
                b' ' | b'\t' | b'\r' | b'\n' => {
                    self.push(b);
                    self.start_tag_named();
                    self.lex = Lex::InTag;
                }
                b'/' => {
                    self.push(b);
                    self.start_tag_named();
                    self.lex = Lex::SelfClose;
                }
                b'>' => {
                    self.push(b);
                    self.start_tag_named();
                    self.start_tag_end(false);
                }
                _ => {
                    self.push(b);
                    self.name_byte(b);
                }
            },
            Lex::InTag => {
                self.push(b);
                match b {
                    b'/' => self.lex = Lex::SelfClose,
                    b'>' => self.start_tag_end(false),
                    b' ' | b'\t' | b'\r' | b'\n' => {}
                    _ => {
                        self.attr_name.clear();
                        self.attr_name.push(b);
                        self.token = 1;
                        self.lex = Lex::AttrName;
                    }
                }
            }
            Lex::AttrName => {
                self.push(b);
                match b {
                    b'=' => self.lex = Lex::AttrQuote,
                    b' ' | b'\t' | b'\r' | b'\n' => self.lex = Lex::AttrEq,
                    _ => {
                        self.grow_token(self.limits.name);
                        if self.attr_name.len() < self.limits.name {
                            self.attr_name.push(b);
                        }
                    }
                }
            }
            Lex::AttrEq => {
                self.push(b);
                if b == b'=' {
                    self.lex = Lex::AttrQuote;
                }
            }
            Lex::AttrQuote => {
                self.push(b);
                if b == b'"' || b == b'\'' {
                    self.attr_value.clear();
                    self.token = 0;
                    self.lex = Lex::AttrValue(b);
                }
            }
            Lex::AttrValue(quote) => {
                self.push(b);
                if b == quote {
                    self.attribute_end(quote);
                    self.lex = Lex::InTag;
                } else {
                    self.grow_token(self.limits.attribute);
                    if self.is_root_tag() && self.attr_value.len() < self.limits.attribute {
                        self.attr_value.push(b);
                    }
                }
            }
            Lex::SelfClose => {
                self.push(b);
                if b == b'>' {
                    self.start_tag_end(true);
                } else {
                    self.lex = Lex::InTag;
                }
            }
            Lex::EndName => match b {
                b'>' => {
                    self.push(b);
                    self.end_tag();
                }
                b' ' | b'\t' | b'\r' | b'\n' => {
                    self.push(b);
                    self.lex = Lex::EndTail;
                }
                _ => {
                    self.push(b);
                    self.grow_token(self.limits.name);
                }
            },
            Lex::EndTail => {
                self.push(b);
                if b == b'>' {
                    self.end_tag();
                }
            }
            Lex::Pi(question) => {
                self.push(b);
                self.lex = match b {
                    b'>' if question => Lex::Content,
                    b'?' => Lex::Pi(true),
                    _ => {
                        if self.in_unit {
                            self.grow_token(self.limits.text);
                        }
                        Lex::Pi(false)
                    }
                };
            }
            Lex::Bang => {
                self.push(b);
                self.bang.push(b);
                self.lex = if self.bang == b"--" {
                    Lex::Comment(0)
                } else if self.bang == b"[CDATA[" {
                    self.token = 0;
                    Lex::Cdata(0)
                } else if b"--".starts_with(&self.bang) || b"[CDATA[".starts_with(&self.bang) {
                    Lex::Bang
                } else if b == b'>' {
                    Lex::Content
                } else {
                    Lex::Declaration
                };
            }
            Lex::Comment(dashes) => {
                self.push(b);
                if self.in_unit {
                    self.grow_token(self.limits.text);
                }
                self.lex = match b {
                    b'-' => Lex::Comment((dashes + 1).min(2)),
                    b'>' if dashes == 2 => Lex::Content,
                    _ => Lex::Comment(0),
                };
            }
            Lex::Cdata(brackets) => {
                self.push(b);
                if self.in_unit {
                    self.grow_token(self.limits.text);
                }
                self.lex = match b {
                    b']' => Lex::Cdata((brackets + 1).min(2)),
                    b'>' if brackets == 2 => {
                        self.token = 0;
                        Lex::Content
                    }
                    _ => Lex::Cdata(0),
                };
            }
            Lex::Declaration => {
                self.push(b);
                if b == b'>' {
                    self.lex = Lex::Content;
                }
            }
        }
    }

    /// Between top-level elements, inside the stream.
    fn at_top(&self) -> bool {
        self.depth == 1 && !self.in_unit
    }

    fn is_root_tag(&self) -> bool {
        self.in_unit && self.depth == 1 && !self.closing
    }

    fn name_byte(&mut self, b: u8) {
        self.grow_token(self.limits.name);
        if self.name.len() < self.limits.name {
            self.name.push(b);
        }
    }

    /// A `<` followed by a name at the top level: a top-level element begins.
    fn begin_unit(&mut self) {
        self.in_unit = true;
        self.unit.clear();
        self.violation = None;
        self.root_name.clear();
        self.root_attrs.clear();
        self.first_child = None;
    }

    /// The name of a start tag is complete.
    fn start_tag_named(&mut self) {
        if self.is_root_tag() {
            self.root_name = self.name.clone();
            if local_name(&self.root_name) == b"stream" {
                // A new stream header (after STARTTLS or authentication): not an element of
                // the stream but the start of a new one.
                self.in_unit = false;
                self.stream_header = true;
                let unit = std::mem::take(&mut self.unit);
                self.out.extend_from_slice(&unit);
            }
        } else if self.in_unit && self.depth == 2 && self.first_child.is_none() {
            self.first_child = Some(self.name.clone());
        }
    }

    fn attribute_end(&mut self, quote: u8) {
        if self.is_root_tag()
            && self.token <= self.limits.attribute
            && KEPT.contains(&self.attr_name.as_slice())
        {
            self.root_attrs.push(Kept {
                name: self.attr_name.clone(),
                value: std::mem::take(&mut self.attr_value),
                quote,
            });
        }
        self.attr_value.clear();
        self.token = 0;
    }

    fn start_tag_end(&mut self, empty: bool) {
        self.lex = Lex::Content;
        self.token = 0;
        if std::mem::take(&mut self.stream_header) {
            self.depth = 1;
            return;
        }
        if empty {
            if self.in_unit && self.depth == 1 {
                self.finish_unit();
            }
            return;
        }
        self.depth += 1;
        // The stream is level 1; the top-level element's own level is 1 in the limits.
        if self.in_unit && self.depth - 1 > self.limits.depth {
            self.violate(Violation::TooDeep);
        }
    }

    fn end_tag(&mut self) {
        self.lex = Lex::Content;
        self.token = 0;
        self.depth = self.depth.saturating_sub(1);
        if self.in_unit && self.depth == 1 {
            self.finish_unit();
        }
    }

    /// The top-level element ended: out it goes, as it was, rewritten or replaced.
    fn finish_unit(&mut self) {
        self.in_unit = false;
        let name = std::mem::take(&mut self.root_name);
        let attrs = std::mem::take(&mut self.root_attrs);
        let unit = std::mem::take(&mut self.unit);
        let attr = |n: &[u8]| attrs.iter().find(|a| a.name == n);
        if name == b"failed" && attr(b"xmlns").is_some_and(|a| a.value == NS_SM) {
            self.failed_resumption(attr(b"h").map(|a| a.value.as_slice()));
            return;
        }
        let Some(violation) = self.violation.take() else {
            self.out.extend_from_slice(&unit);
            return;
        };
        let kind = String::from_utf8_lossy(&name).into_owned();
        let from = attr(b"from").map(|a| String::from_utf8_lossy(&a.value).into_owned());
        (self.sink)(GuardEvent::Dropped {
            violation,
            kind,
            from,
        });
        if matches!(name.as_slice(), b"iq" | b"presence" | b"message") {
            self.placeholder(&name, &attrs, violation);
        }
    }

    /// A stanza of the same kind with the same addressing and id, and nothing else.
    fn placeholder(&mut self, name: &[u8], attrs: &[Kept], violation: Violation) {
        let is_iq = name == b"iq";
        let answer = is_iq
            && attrs
                .iter()
                .any(|a| a.name == b"type" && matches!(a.value.as_slice(), b"result" | b"error"));
        let out = &mut self.out;
        out.push(b'<');
        out.extend_from_slice(name);
        for a in attrs.iter().filter(|a| a.name != b"h") {
            if answer && a.name == b"type" {
                continue;
            }
            out.push(b' ');
            out.extend_from_slice(&a.name);
            out.extend_from_slice(b"=");
            out.push(a.quote);
            out.extend_from_slice(&a.value);
            out.push(a.quote);
        }
        if answer {
            // An answer to one of our requests becomes a refusal, so the request fails now
            // rather than at its timeout.
            out.extend_from_slice(b" type='error'><error type='cancel'><policy-violation xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error>");
        } else {
            out.push(b'>');
        }
        out.extend_from_slice(b"<dropped xmlns='");
        out.extend_from_slice(NS_DROPPED.as_bytes());
        out.extend_from_slice(b"' reason='");
        out.extend_from_slice(violation.as_str().as_bytes());
        out.extend_from_slice(b"'/></");
        out.extend_from_slice(name);
        out.push(b'>');
    }

    /// `<failed/>` in the one shape the stanza stream reads: `h` is required there, so an
    /// absent or unreadable one becomes the largest value, which it ignores as going backwards.
    fn failed_resumption(&mut self, h: Option<&[u8]>) {
        self.violation = None;
        let condition = self
            .first_child
            .take()
            .map(|c| String::from_utf8_lossy(local_name(&c)).into_owned());
        (self.sink)(GuardEvent::ResumptionFailed { condition });
        let h = h
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| h.parse::<u32>().ok())
            .unwrap_or(u32::MAX);
        self.out
            .extend_from_slice(format!("<failed xmlns='urn:xmpp:sm:3' h='{h}'/>").as_bytes());
    }
}

fn local_name(name: &[u8]) -> &[u8] {
    match name.iter().rposition(|&b| b == b':') {
        Some(i) => &name[i + 1..],
        None => name,
    }
}

/// An XMPP connection with a [`Scanner`] on what it reads; writes pass through.
pub struct Guard<S> {
    inner: S,
    scanner: Scanner,
    buf: Box<[u8]>,
}

impl<S> Guard<S> {
    pub fn new(inner: S, limits: Limits, sink: Sink) -> Self {
        Guard {
            inner,
            scanner: Scanner::new(limits, sink),
            buf: vec![0; 16 * 1024].into_boxed_slice(),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Guard<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            let ready = this.scanner.output();
            if !ready.is_empty() {
                let n = ready.len().min(out.remaining());
                out.put_slice(&ready[..n]);
                this.scanner.consume(n);
                return Poll::Ready(Ok(()));
            }
            let mut read = ReadBuf::new(&mut this.buf);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut read))?;
            let filled = read.filled();
            if filled.is_empty() {
                // End of stream; an element cut short is lost with the connection.
                return Poll::Ready(Ok(()));
            }
            let n = filled.len();
            this.scanner.feed(&this.buf[..n]);
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Guard<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use tokio_xmpp::minidom::Element;
    use tokio_xmpp::parsers::iq::Iq;
    use tokio_xmpp::parsers::presence::Presence;
    use tokio_xmpp::parsers::sm::Failed;

    const HEADER: &str = "<?xml version='1.0'?><stream:stream xmlns='jabber:client' \
        xmlns:stream='http://etherx.jabber.org/streams' id='s1' from='example.org' version='1.0'>";

    /// Scans `input` in pieces of `chunk` bytes; returns the output and the events.
    fn scan_in(input: &[u8], chunk: usize, limits: Limits) -> (String, Vec<GuardEvent>) {
        let events = Arc::new(Mutex::new(Vec::new()));
        let seen = events.clone();
        let mut scanner = Scanner::new(
            limits,
            Arc::new(move |e| seen.lock().expect("test lock").push(e)),
        );
        let mut out = Vec::new();
        for piece in input.chunks(chunk) {
            scanner.feed(piece);
            out.extend_from_slice(scanner.output());
            let n = scanner.output().len();
            scanner.consume(n);
        }
        let events = events.lock().expect("test lock").clone();
        (String::from_utf8(out).expect("utf-8 out"), events)
    }

    fn scan(input: &str) -> (String, Vec<GuardEvent>) {
        scan_in(input.as_bytes(), 7, Limits::DEFAULT)
    }

    fn after_header(out: &str) -> &str {
        out.strip_prefix(HEADER)
            .expect("the header passes unchanged")
    }

    fn nested(depth: usize) -> String {
        let mut s = String::new();
        for _ in 0..depth {
            s.push_str("<a>");
        }
        for _ in 0..depth {
            s.push_str("</a>");
        }
        s
    }

    fn dropped(violation: Violation, kind: &str, from: Option<&str>) -> GuardEvent {
        GuardEvent::Dropped {
            violation,
            kind: kind.to_owned(),
            from: from.map(str::to_owned),
        }
    }

    #[test]
    fn a_well_behaved_stream_passes_byte_for_byte_in_any_pieces() {
        let input = format!(
            "{HEADER}<stream:features><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></stream:features> \
             <iq type='result' id='a&amp;b' from=\"x@y/z\"><query xmlns='jabber:iq:roster'><item jid='b@y' \
             name='a > b / c'><group>Friends &lt;3</group></item></query></iq>\n\
             <message from='b@y/r'><body><![CDATA[<not a tag>]]></body><!-- note --></message>\
             <presence from='b@y/r'/><r xmlns='urn:xmpp:sm:3'/></stream:stream>"
        );
        for chunk in [1, 3, 64, 4096] {
            let (out, events) = scan_in(input.as_bytes(), chunk, Limits::DEFAULT);
            assert_eq!(out, input, "in pieces of {chunk}");
            assert!(events.is_empty());
        }
    }

    #[test]
    fn a_deep_presence_becomes_an_empty_one_from_the_same_sender() {
        let input = format!(
            "{HEADER}<presence from='mallory@evil.example/x' to='alice@example.org'>{}</presence>\
             <presence from='bob@example.org/phone'/>",
            nested(20_000)
        );
        let (out, events) = scan(&input);
        assert_eq!(
            after_header(&out),
            "<presence from='mallory@evil.example/x' to='alice@example.org'>\
             <dropped xmlns='urn:ipop:dropped:0' reason='xml-too-deep'/></presence>\
             <presence from='bob@example.org/phone'/>"
        );
        assert_eq!(
            events,
            vec![dropped(
                Violation::TooDeep,
                "presence",
                Some("mallory@evil.example/x")
            )]
        );
    }

    #[test]
    fn the_depth_bound_counts_the_stanza_itself() {
        // A stanza with 15 levels inside it is 16 deep: the bound.
        let ok = format!("{HEADER}<message>{}</message>", nested(15));
        assert_eq!(scan(&ok).0, ok);
        let deep = format!("{HEADER}<message>{}</message>", nested(16));
        assert_eq!(scan(&deep).1.len(), 1);
    }

    #[test]
    fn placeholders_of_requests_and_answers_parse_as_stanzas() {
        let input = format!(
            "{HEADER}<iq type='set' id='j1' from='mallory@evil.example/x' to='alice@example.org/laptop'>\
             <jingle xmlns='urn:xmpp:jingle:1'>{}</jingle></iq>\
             <iq type=\"result\" id=\"r1\" from=\"example.org\"><query xmlns='jabber:iq:roster'>{}</query></iq>",
            nested(10_000),
            "<item jid='x@y'/>".repeat(40_000)
        );
        let (out, events) = scan(&input);
        assert_eq!(
            events,
            vec![
                dropped(Violation::TooDeep, "iq", Some("mallory@evil.example/x")),
                dropped(Violation::TooLarge, "iq", Some("example.org")),
            ]
        );
        let body = format!("<x xmlns='jabber:client'>{}</x>", after_header(&out));
        let root: Element = body.parse().expect("placeholders are well-formed");
        let mut stanzas = root.children().cloned();
        match Iq::try_from(stanzas.next().expect("first")).expect("an IQ") {
            Iq::Set { id, payload, .. } => {
                assert_eq!(id, "j1");
                assert!(payload.is("dropped", NS_DROPPED));
                assert_eq!(payload.attr("reason"), Some("xml-too-deep"));
            }
            other => panic!("not a set: {other:?}"),
        }
        match Iq::try_from(stanzas.next().expect("second")).expect("an IQ") {
            Iq::Error { id, error, .. } => {
                assert_eq!(id, "r1");
                assert_eq!(
                    error.defined_condition,
                    tokio_xmpp::parsers::stanza_error::DefinedCondition::PolicyViolation
                );
            }
            other => panic!("not an error: {other:?}"),
        }
    }

    #[test]
    fn long_attributes_names_and_texts_are_bounded() {
        let long = "A".repeat(64 * 1024);
        let cases = [
            format!("<presence from='m@e/x' id='{long}'/>"),
            format!("<presence from='m@e/x'><c node='{long}'/></presence>"),
            format!("<message from='m@e/x'><body>{long}</body></message>"),
            format!("<message from='m@e/x'><{long}/></message>"),
        ];
        for case in cases {
            let input = format!("{HEADER}{case}<presence from='b@e/p'/>");
            let (out, events) = scan(&input);
            assert_eq!(
                events,
                vec![dropped(
                    Violation::TokenTooLarge,
                    if case.starts_with("<presence") {
                        "presence"
                    } else {
                        "message"
                    },
                    Some("m@e/x")
                )],
                "{}",
                &case[..40]
            );
            assert!(out.ends_with("<presence from='b@e/p'/>"), "{}", &case[..40]);
            assert!(out.len() < HEADER.len() + 200, "nothing long is kept");
        }
    }

    #[test]
    fn an_over_large_nonza_is_left_out() {
        let input = format!(
            "{HEADER}<stream:features>{}</stream:features><presence from='b@e/p'/>",
            nested(40)
        );
        let (out, events) = scan(&input);
        assert_eq!(after_header(&out), "<presence from='b@e/p'/>");
        assert_eq!(
            events,
            vec![dropped(Violation::TooDeep, "stream:features", None)]
        );
    }

    #[test]
    fn a_refused_resumption_takes_the_shape_the_stanza_stream_reads() {
        for (failed, h, condition) in [
            (
                "<failed xmlns='urn:xmpp:sm:3'><item-not-found xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></failed>",
                u32::MAX,
                Some("item-not-found"),
            ),
            (
                "<failed xmlns='urn:xmpp:sm:3' h='12'><item-not-found xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/>\
                 <text xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'>Unknown session</text></failed>",
                12,
                Some("item-not-found"),
            ),
            ("<failed xmlns='urn:xmpp:sm:3'/>", u32::MAX, None),
        ] {
            let (out, events) = scan(&format!("{HEADER}{failed}"));
            let rewritten = after_header(&out);
            let parsed = Failed::try_from(rewritten.parse::<Element>().expect("well-formed"))
                .expect("the stanza stream's parser reads it");
            assert_eq!(parsed.h, Some(h));
            assert_eq!(
                events,
                vec![GuardEvent::ResumptionFailed {
                    condition: condition.map(str::to_owned)
                }]
            );
        }
    }

    #[test]
    fn a_restarted_stream_is_followed_like_the_first() {
        let input = format!(
            "{HEADER}<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>{HEADER}\
             <stream:features/><presence from='m@e/x'>{}</presence><presence from='b@e/p'/>",
            nested(100)
        );
        let (out, events) = scan(&input);
        assert_eq!(
            out,
            format!(
                "{HEADER}<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>{HEADER}\
                 <stream:features/><presence from='m@e/x'><dropped xmlns='urn:ipop:dropped:0' \
                 reason='xml-too-deep'/></presence><presence from='b@e/p'/>"
            )
        );
        assert_eq!(events.len(), 1);
    }

    #[test]
    fn memory_stays_bounded_while_a_huge_element_streams_through() {
        let mut scanner = Scanner::new(Limits::DEFAULT, Arc::new(|_| {}));
        scanner.feed(HEADER.as_bytes());
        scanner.feed(b"<message from='m@e/x'>");
        for _ in 0..1000 {
            scanner.feed(&[b'<', b'a', b'/', b'>'].repeat(1024));
            assert!(scanner.unit.capacity() <= 2 * Limits::DEFAULT.element);
        }
        assert!(scanner.unit.is_empty());
        scanner.feed(b"</message>");
        assert!(String::from_utf8_lossy(scanner.output()).contains("stanza-too-large"));
    }

    #[test]
    fn presence_placeholders_keep_their_type() {
        let input = format!(
            "{HEADER}<presence type='unavailable' from='b@e/p'><x>{}</x></presence>",
            "y".repeat(20_000)
        );
        let (out, _) = scan(&input);
        let body = format!("<x xmlns='jabber:client'>{}</x>", after_header(&out));
        let root: Element = body.parse().expect("well-formed");
        let first = root.children().next().expect("a stanza").clone();
        let p = Presence::try_from(first).expect("a presence");
        assert_eq!(p.type_, tokio_xmpp::parsers::presence::Type::Unavailable);
    }
}
