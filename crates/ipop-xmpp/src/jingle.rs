//! Link signals as Jingle (XEP-0166) payloads with the ICE-UDP transport (XEP-0176) and ipop's
//! own application description, `urn:ipop:link:0`. The wire format is written down in
//! `docs/protocol.md`.
//!
//! Everything here is pure: an [`Element`] in, a [`Signal`] or a [`Malformed`] reason out, and the
//! reverse. Every input is bounded; nothing panics on hostile input.

use crate::NS_LINK;
use ipop_core::PublicKey;
use ipop_core::osn::{Candidate, CandidateKind, LinkOffer, Signal, TerminateReason};
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use tokio_xmpp::jid::Jid;
use tokio_xmpp::minidom::{Element, rxml::xml_ncname};
use tokio_xmpp::parsers::jingle::{
    Action, Content, ContentId, Creator, Description, Jingle, Reason, ReasonElement, Senders,
    SessionId, Transport,
};
use tokio_xmpp::parsers::jingle_ice_udp::{Candidate as IceCandidate, Type as IceType};
use tokio_xmpp::parsers::ns;

/// At most this many candidates in one signal; a signal with more is refused.
pub const MAX_CANDIDATES: usize = 32;
/// Longest accepted session id, ICE username fragment or password.
const MAX_TOKEN: usize = 256;
/// Longest accepted candidate foundation (RFC 8445 allows 32 characters).
const MAX_FOUNDATION: usize = 32;

/// The name of the one content of an ipop link session.
const CONTENT_NAME: &str = "link";
/// ipop's payload of a `transport-info` that asks for probes ([`Signal::Punch`]).
const PUNCH: &str = "punch";

/// Why an incoming Jingle payload was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    #[error("not a Jingle element: {0}")]
    Parse(String),
    #[error("unsupported Jingle action {0}")]
    UnsupportedAction(String),
    #[error("bad session id")]
    SessionId,
    #[error("expected exactly one content, found {0}")]
    ContentCount(usize),
    #[error("missing or foreign application description")]
    Description,
    #[error("missing or foreign transport")]
    Transport,
    #[error("bad key: {0}")]
    Key(String),
    #[error("more than {MAX_CANDIDATES} candidates")]
    TooManyCandidates,
    #[error("bad candidate: {0}")]
    Candidate(String),
    #[error("missing or oversized ICE credentials")]
    Credentials,
}

fn action_of(signal: &Signal) -> Action {
    match signal {
        Signal::Initiate { .. } => Action::SessionInitiate,
        Signal::Accept { .. } => Action::SessionAccept,
        Signal::Candidates { .. } | Signal::Punch { .. } => Action::TransportInfo,
        Signal::Terminate { .. } => Action::SessionTerminate,
    }
}

/// Builds the `<jingle/>` payload of the IQ that carries `signal`, sent by `me`. Returns the
/// element and how many candidates were left out to stay within [`MAX_CANDIDATES`].
pub fn to_element(signal: &Signal, me: &Jid) -> (Element, usize) {
    let mut jingle = Jingle::new(action_of(signal), SessionId(signal.session().to_owned()));
    let mut left_out = 0;
    match signal {
        Signal::Initiate { offer, .. } | Signal::Accept { offer, .. } => {
            jingle = if matches!(signal, Signal::Initiate { .. }) {
                jingle.with_initiator(me.clone())
            } else {
                jingle.with_responder(me.clone())
            };
            let (transport, n) = transport(Some((&offer.ufrag, &offer.pwd)), &offer.candidates);
            left_out = n;
            jingle = jingle.add_content(
                content()
                    .with_description(Description::Unknown(description(offer)))
                    .with_transport(transport),
            );
        }
        Signal::Candidates { candidates, .. } => {
            let (transport, n) = transport(None, candidates);
            left_out = n;
            jingle = jingle.add_content(content().with_transport(transport));
        }
        Signal::Punch { .. } => {
            // A transport-info with no candidate: a peer that does not know <punch/> finds
            // nothing to do in it.
            let (transport, _) = transport(None, &[]);
            jingle = jingle.add_content(content().with_transport(transport));
            jingle.other.push(Element::bare(PUNCH, NS_LINK));
        }
        Signal::Terminate { reason, .. } => {
            jingle = jingle.set_reason(ReasonElement {
                reason: match reason {
                    TerminateReason::NotAuthorised | TerminateReason::WrongKey => {
                        Reason::SecurityError
                    }
                    TerminateReason::Glare => Reason::AlternativeSession { sid: None },
                    TerminateReason::Done | TerminateReason::Idle => Reason::Success,
                    TerminateReason::Failed => Reason::FailedApplication,
                },
                texts: Default::default(),
            });
        }
    }
    let mut element = Element::from(jingle);
    if let Signal::Terminate { reason, .. } = signal {
        let detail = match reason {
            TerminateReason::NotAuthorised => Some("not-authorised"),
            TerminateReason::WrongKey => Some("wrong-key"),
            TerminateReason::Idle => Some("idle"),
            _ => None,
        };
        if let (Some(detail), Some(reason)) = (detail, element.get_child_mut("reason", ns::JINGLE))
        {
            reason.append_child(Element::bare(detail, NS_LINK));
        }
    }
    (element, left_out)
}

fn content() -> Content {
    Content::new(Creator::Initiator, ContentId(CONTENT_NAME.to_owned())).with_senders(Senders::Both)
}

fn description(offer: &LinkOffer) -> Element {
    Element::builder("description", NS_LINK)
        .attr(xml_ncname!("key").into(), offer.key.to_string())
        .build()
}

fn transport(credentials: Option<(&str, &str)>, candidates: &[Candidate]) -> (Transport, usize) {
    let mut builder = Element::builder("transport", ns::JINGLE_ICE_UDP);
    if let Some((ufrag, pwd)) = credentials {
        builder = builder
            .attr(xml_ncname!("ufrag").into(), ufrag)
            .attr(xml_ncname!("pwd").into(), pwd);
    }
    let element = builder
        .append_all(
            candidates
                .iter()
                .take(MAX_CANDIDATES)
                .map(|c| Element::from(ice_candidate(c))),
        )
        .build();
    (
        Transport::Unknown(element),
        candidates.len().saturating_sub(MAX_CANDIDATES),
    )
}

fn ice_candidate(c: &Candidate) -> IceCandidate {
    // XEP-0176 wants an id unique within the session: a digest of what makes a candidate.
    let mut hasher = DefaultHasher::new();
    (
        &c.foundation,
        c.component,
        c.address,
        c.kind.as_str(),
        c.priority,
    )
        .hash(&mut hasher);
    IceCandidate {
        component: c.component,
        foundation: c.foundation.clone(),
        generation: 0,
        id: format!("{:016x}", hasher.finish()),
        ip: c.address.ip(),
        port: c.address.port(),
        priority: c.priority,
        protocol: "udp".to_owned(),
        rel_addr: c.related.map(|r| r.ip()),
        rel_port: c.related.map(|r| r.port()),
        network: None,
        type_: match c.kind.wire() {
            CandidateKind::Host => IceType::Host,
            CandidateKind::ServerReflexive | CandidateKind::Mapped => IceType::Srflx,
            CandidateKind::PeerReflexive => IceType::Prflx,
            CandidateKind::Relayed => IceType::Relay,
        },
    }
}

/// Reads a `<jingle/>` payload into a signal.
pub fn from_element(element: &Element) -> Result<Signal, Malformed> {
    // The ipop detail of a reason (`wrong-key`, `idle`) is a foreign child of <reason/>, which the typed
    // parser discards: read it from the raw element first.
    let detail = element
        .get_child("reason", ns::JINGLE)
        .and_then(|r| r.children().find(|c| c.ns() == NS_LINK))
        .map(|c| c.name().to_owned());
    let jingle = Jingle::try_from(element.clone()).map_err(|e| Malformed::Parse(e.to_string()))?;
    let session = jingle.sid.0;
    if session.is_empty() || session.len() > MAX_TOKEN {
        return Err(Malformed::SessionId);
    }
    match jingle.action {
        Action::SessionInitiate | Action::SessionAccept => {
            let content = only_content(jingle.contents)?;
            let Some(Description::Unknown(description)) = content.description else {
                return Err(Malformed::Description);
            };
            let (credentials, candidates) = read_transport(content.transport)?;
            let (ufrag, pwd) = credentials.ok_or(Malformed::Credentials)?;
            let key = read_description(&description)?;
            let offer = LinkOffer {
                key,
                ufrag,
                pwd,
                candidates,
            };
            Ok(if jingle.action == Action::SessionInitiate {
                Signal::Initiate { session, offer }
            } else {
                Signal::Accept { session, offer }
            })
        }
        Action::TransportInfo => {
            let content = only_content(jingle.contents)?;
            let (_, candidates) = read_transport(content.transport)?;
            if jingle.other.iter().any(|e| e.is(PUNCH, NS_LINK)) {
                return Ok(Signal::Punch { session });
            }
            Ok(Signal::Candidates {
                session,
                candidates,
            })
        }
        Action::SessionTerminate => {
            let reason = match jingle.reason.map(|r| r.reason) {
                Some(Reason::SecurityError) if detail.as_deref() == Some("wrong-key") => {
                    TerminateReason::WrongKey
                }
                Some(Reason::SecurityError) => TerminateReason::NotAuthorised,
                Some(Reason::Success) if detail.as_deref() == Some("idle") => TerminateReason::Idle,
                Some(Reason::AlternativeSession { .. }) => TerminateReason::Glare,
                Some(Reason::Success | Reason::Cancel | Reason::Gone | Reason::Expired) => {
                    TerminateReason::Done
                }
                _ => TerminateReason::Failed,
            };
            Ok(Signal::Terminate { session, reason })
        }
        other => Err(Malformed::UnsupportedAction(other.to_string())),
    }
}

fn only_content(mut contents: Vec<Content>) -> Result<Content, Malformed> {
    match contents.len() {
        1 => contents.pop().ok_or(Malformed::ContentCount(0)),
        n => Err(Malformed::ContentCount(n)),
    }
}

fn read_description(element: &Element) -> Result<PublicKey, Malformed> {
    if !element.is("description", NS_LINK) {
        return Err(Malformed::Description);
    }
    element
        .attr("key")
        .ok_or_else(|| Malformed::Key("missing".to_owned()))?
        .parse::<PublicKey>()
        .map_err(|e| Malformed::Key(e.to_string()))
}

type Credentials = Option<(String, String)>;

fn read_transport(
    transport: Option<Transport>,
) -> Result<(Credentials, Vec<Candidate>), Malformed> {
    let element = match transport {
        Some(Transport::IceUdp(t)) => Element::from(t),
        _ => return Err(Malformed::Transport),
    };
    let credentials = match (element.attr("ufrag"), element.attr("pwd")) {
        (Some(ufrag), Some(pwd)) => {
            if ufrag.is_empty()
                || pwd.is_empty()
                || ufrag.len() > MAX_TOKEN
                || pwd.len() > MAX_TOKEN
            {
                return Err(Malformed::Credentials);
            }
            Some((ufrag.to_owned(), pwd.to_owned()))
        }
        (None, None) => None,
        _ => return Err(Malformed::Credentials),
    };
    let children: Vec<&Element> = element
        .children()
        .filter(|c| c.is("candidate", ns::JINGLE_ICE_UDP))
        .collect();
    if children.len() > MAX_CANDIDATES {
        return Err(Malformed::TooManyCandidates);
    }
    let candidates = children
        .into_iter()
        .map(|c| read_candidate(c.clone()))
        .collect::<Result<_, _>>()?;
    Ok((credentials, candidates))
}

fn read_candidate(element: Element) -> Result<Candidate, Malformed> {
    let c = IceCandidate::try_from(element).map_err(|e| Malformed::Candidate(e.to_string()))?;
    if !c.protocol.eq_ignore_ascii_case("udp") {
        return Err(Malformed::Candidate(format!(
            "protocol {:?}, only udp is supported",
            c.protocol.chars().take(16).collect::<String>()
        )));
    }
    if c.foundation.is_empty() || c.foundation.len() > MAX_FOUNDATION {
        return Err(Malformed::Candidate("bad foundation".to_owned()));
    }
    let related = match (c.rel_addr, c.rel_port) {
        (Some(ip), Some(port)) => Some(SocketAddr::new(ip, port)),
        (None, None) => None,
        _ => return Err(Malformed::Candidate("rel-addr without rel-port".to_owned())),
    };
    Ok(Candidate {
        foundation: c.foundation,
        component: c.component,
        priority: c.priority,
        address: SocketAddr::new(c.ip, c.port),
        kind: match c.type_ {
            IceType::Host => CandidateKind::Host,
            IceType::Srflx => CandidateKind::ServerReflexive,
            IceType::Prflx => CandidateKind::PeerReflexive,
            IceType::Relay => CandidateKind::Relayed,
        },
        related,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_xmpp::minidom::Element;

    fn me() -> Jid {
        Jid::new("alice@example.org/laptop").expect("valid JID")
    }

    fn candidate(i: u16) -> Candidate {
        Candidate {
            foundation: format!("f{i}"),
            component: 1,
            priority: 2_130_706_431 - u32::from(i),
            address: SocketAddr::from(([192, 0, 2, 1], 40_000 + i)),
            kind: CandidateKind::Host,
            related: None,
        }
    }

    fn offer() -> LinkOffer {
        LinkOffer {
            key: PublicKey([7; 32]),
            ufrag: "abcd".to_owned(),
            pwd: "0123456789abcdefghijkl".to_owned(),
            candidates: vec![
                candidate(1),
                Candidate {
                    foundation: "2".to_owned(),
                    component: 1,
                    priority: 1_694_498_815,
                    address: "[2001:db8::5]:3478".parse().expect("addr"),
                    kind: CandidateKind::ServerReflexive,
                    related: Some("[fd00::1]:40001".parse().expect("addr")),
                },
                Candidate {
                    foundation: "3".to_owned(),
                    component: 1,
                    priority: 16_777_215,
                    address: "198.51.100.7:50000".parse().expect("addr"),
                    kind: CandidateKind::Relayed,
                    related: Some("192.0.2.1:40001".parse().expect("addr")),
                },
                Candidate {
                    foundation: "4".to_owned(),
                    component: 1,
                    priority: 1_845_501_695,
                    address: "203.0.113.9:6000".parse().expect("addr"),
                    kind: CandidateKind::PeerReflexive,
                    related: None,
                },
            ],
        }
    }

    /// Through the element and through its serialised text, as it travels.
    fn round_trip(signal: Signal) {
        let (element, left_out) = to_element(&signal, &me());
        assert_eq!(left_out, 0);
        assert_eq!(from_element(&element), Ok(signal.clone()));
        let text = String::from(&element);
        let reparsed: Element = text.parse().expect("own output parses");
        assert_eq!(from_element(&reparsed), Ok(signal));
    }

    #[test]
    fn every_signal_round_trips() {
        round_trip(Signal::Initiate {
            session: "s1".to_owned(),
            offer: offer(),
        });
        round_trip(Signal::Accept {
            session: "s1".to_owned(),
            offer: LinkOffer {
                candidates: vec![],
                ..offer()
            },
        });
        round_trip(Signal::Candidates {
            session: "s1".to_owned(),
            candidates: offer().candidates,
        });
        round_trip(Signal::Candidates {
            session: "s1".to_owned(),
            candidates: vec![],
        });
        round_trip(Signal::Punch {
            session: "s1".to_owned(),
        });
        for reason in [
            TerminateReason::NotAuthorised,
            TerminateReason::WrongKey,
            TerminateReason::Glare,
            TerminateReason::Done,
            TerminateReason::Idle,
            TerminateReason::Failed,
        ] {
            round_trip(Signal::Terminate {
                session: "s1".to_owned(),
                reason,
            });
        }
    }

    #[test]
    fn initiate_has_the_documented_shape() {
        let (element, _) = to_element(
            &Signal::Initiate {
                session: "s1".to_owned(),
                offer: offer(),
            },
            &me(),
        );
        assert!(element.is("jingle", ns::JINGLE));
        assert_eq!(element.attr("action"), Some("session-initiate"));
        assert_eq!(element.attr("initiator"), Some("alice@example.org/laptop"));
        let content = element.get_child("content", ns::JINGLE).expect("content");
        assert_eq!(content.attr("name"), Some("link"));
        assert_eq!(content.attr("creator"), Some("initiator"));
        let description = content
            .get_child("description", NS_LINK)
            .expect("description");
        assert_eq!(
            description.attr("key"),
            Some(PublicKey([7; 32]).to_string().as_str())
        );
        let transport = content
            .get_child("transport", ns::JINGLE_ICE_UDP)
            .expect("transport");
        assert_eq!(transport.attr("ufrag"), Some("abcd"));
        assert_eq!(transport.children().count(), 4);
    }

    #[test]
    fn excess_candidates_are_left_out_when_sending_and_refused_when_received() {
        let many: Vec<Candidate> = (0..40).map(candidate).collect();
        let signal = Signal::Candidates {
            session: "s".to_owned(),
            candidates: many.clone(),
        };
        let (element, left_out) = to_element(&signal, &me());
        assert_eq!(left_out, 8);
        assert_eq!(
            from_element(&element),
            Ok(Signal::Candidates {
                session: "s".to_owned(),
                candidates: many[..MAX_CANDIDATES].to_vec(),
            })
        );

        let mut transport = Element::builder("transport", ns::JINGLE_ICE_UDP).build();
        for c in &many {
            transport.append_child(Element::from(ice_candidate(c)));
        }
        let hostile = Element::builder("jingle", ns::JINGLE)
            .attr(xml_ncname!("action").into(), "transport-info")
            .attr(xml_ncname!("sid").into(), "s")
            .append(
                Element::builder("content", ns::JINGLE)
                    .attr(xml_ncname!("creator").into(), "initiator")
                    .attr(xml_ncname!("name").into(), "link")
                    .append(transport)
                    .build(),
            )
            .build();
        assert_eq!(from_element(&hostile), Err(Malformed::TooManyCandidates));
    }

    fn parse(xml: &str) -> Result<Signal, Malformed> {
        let element: Element = xml.parse().expect("test XML is well-formed");
        from_element(&element)
    }

    const J: &str = "xmlns='urn:xmpp:jingle:1'";
    const ICE: &str = "xmlns='urn:xmpp:jingle:transports:ice-udp:1'";
    const KEY: &str = "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=";

    fn initiate_with(description: &str, transport: &str) -> String {
        format!(
            "<jingle {J} action='session-initiate' sid='s'><content creator='initiator' \
             name='link'>{description}{transport}</content></jingle>"
        )
    }

    #[test]
    fn malformed_input_is_refused_with_a_reason_and_never_panics() {
        let good_description = format!("<description xmlns='urn:ipop:link:0' key='{KEY}'/>");
        let good_transport = format!("<transport {ICE} ufrag='u' pwd='p'/>");
        assert!(parse(&initiate_with(&good_description, &good_transport)).is_ok());

        let cases: Vec<(String, Malformed)> = vec![
            (
                format!("<jingle {J} action='session-initiate'/>"),
                Malformed::Parse(String::new()),
            ),
            (
                format!("<jingle {J} action='launch-missiles' sid='s'/>"),
                Malformed::Parse(String::new()),
            ),
            (
                format!("<jingle {J} action='content-add' sid='s'/>"),
                Malformed::UnsupportedAction("content-add".to_owned()),
            ),
            (
                format!("<jingle {J} action='session-initiate' sid=''/>"),
                Malformed::SessionId,
            ),
            (
                format!("<jingle {J} action='session-initiate' sid='s'/>"),
                Malformed::ContentCount(0),
            ),
            (initiate_with("", &good_transport), Malformed::Description),
            (
                initiate_with("<description xmlns='urn:other'/>", &good_transport),
                Malformed::Description,
            ),
            (initiate_with(&good_description, ""), Malformed::Transport),
            (
                initiate_with(
                    &good_description,
                    "<transport xmlns='urn:xmpp:jingle:transports:raw-udp:1'/>",
                ),
                Malformed::Transport,
            ),
            (
                initiate_with(&good_description, &format!("<transport {ICE}/>")),
                Malformed::Credentials,
            ),
            (
                initiate_with(&good_description, &format!("<transport {ICE} ufrag='u'/>")),
                Malformed::Credentials,
            ),
            (
                initiate_with(
                    "<description xmlns='urn:ipop:link:0' key='short'/>",
                    &good_transport,
                ),
                Malformed::Key(String::new()),
            ),
            (
                initiate_with("<description xmlns='urn:ipop:link:0'/>", &good_transport),
                Malformed::Key(String::new()),
            ),
            (
                initiate_with(
                    &good_description,
                    &format!(
                        "<transport {ICE} ufrag='u' pwd='p'><candidate component='1' \
                         foundation='1' generation='0' id='x' ip='not-an-ip' port='1' \
                         priority='1' protocol='udp' type='host'/></transport>"
                    ),
                ),
                Malformed::Parse(String::new()),
            ),
            (
                initiate_with(
                    &good_description,
                    &format!(
                        "<transport {ICE} ufrag='u' pwd='p'><candidate component='1' \
                         foundation='1' generation='0' id='x' ip='192.0.2.1' port='1' \
                         priority='1' protocol='tcp' type='host'/></transport>"
                    ),
                ),
                Malformed::Candidate(String::new()),
            ),
            (
                initiate_with(
                    &good_description,
                    &format!(
                        "<transport {ICE} ufrag='u' pwd='p'><candidate component='1' \
                         foundation='1' generation='0' id='x' ip='192.0.2.1' port='99999' \
                         priority='1' protocol='udp' type='host'/></transport>"
                    ),
                ),
                Malformed::Parse(String::new()),
            ),
            (
                initiate_with(
                    &good_description,
                    &format!(
                        "<transport {ICE} ufrag='u' pwd='p'><candidate component='1' \
                         foundation='1' generation='0' id='x' ip='192.0.2.1' port='9' \
                         priority='1' protocol='udp' type='srflx' rel-addr='192.0.2.2'/>\
                         </transport>"
                    ),
                ),
                Malformed::Candidate(String::new()),
            ),
            (
                format!(
                    "<jingle {J} action='transport-info' sid='s'>\
                     <content creator='initiator' name='a'><transport {ICE}/></content>\
                     <content creator='initiator' name='b'><transport {ICE}/></content></jingle>"
                ),
                Malformed::ContentCount(2),
            ),
            (
                format!(
                    "<jingle {J} action='session-initiate' sid='{}'/>",
                    "s".repeat(300)
                ),
                Malformed::SessionId,
            ),
        ];
        for (xml, expected) in cases {
            let got = parse(&xml);
            let same_kind = matches!(
                (&got, &expected),
                (Err(Malformed::Parse(_)), Malformed::Parse(_))
                    | (Err(Malformed::Key(_)), Malformed::Key(_))
                    | (Err(Malformed::Candidate(_)), Malformed::Candidate(_))
            ) || got.as_ref().err() == Some(&expected);
            assert!(same_kind, "{xml}\n  expected {expected:?}, got {got:?}");
        }
    }

    #[test]
    fn foreign_terminate_reasons_map_to_the_nearest_core_reason() {
        let terminate = |reason: &str| {
            parse(&format!(
                "<jingle {J} action='session-terminate' sid='s'><reason>{reason}</reason></jingle>"
            ))
        };
        let reason_of = |r: Result<Signal, Malformed>| match r {
            Ok(Signal::Terminate { reason, .. }) => Some(reason),
            _ => None,
        };
        assert_eq!(reason_of(terminate("<gone/>")), Some(TerminateReason::Done));
        assert_eq!(
            reason_of(terminate("<success/><idle xmlns='urn:ipop:link:0'/>")),
            Some(TerminateReason::Idle)
        );
        assert_eq!(
            reason_of(terminate("<gone/><idle xmlns='urn:ipop:link:0'/>")),
            Some(TerminateReason::Done),
            "idle is a detail of success only"
        );
        assert_eq!(
            reason_of(terminate("<decline/>")),
            Some(TerminateReason::Failed)
        );
        assert_eq!(
            reason_of(terminate("<security-error/>")),
            Some(TerminateReason::NotAuthorised)
        );
        assert_eq!(
            reason_of(parse(&format!(
                "<jingle {J} action='session-terminate' sid='s'/>"
            ))),
            Some(TerminateReason::Failed)
        );
    }
}

#[cfg(test)]
mod documented {
    use super::*;

    /// The Jingle examples in `docs/protocol.md` are what this module reads.
    #[test]
    fn the_examples_in_the_protocol_document_parse() {
        let doc = include_str!("../../../docs/protocol.md");
        let mut seen = 0;
        for block in doc.split("```xml").skip(1) {
            let block = block.split("```").next().unwrap_or_default();
            let (Some(start), Some(end)) = (block.find("<jingle"), block.find("</jingle>")) else {
                continue;
            };
            let xml = &block[start..end + "</jingle>".len()];
            let element: Element = xml.parse().expect("example is well-formed");
            assert!(from_element(&element).is_ok(), "{xml}");
            seen += 1;
        }
        assert!(
            seen >= 3,
            "the document shows initiate, candidates and terminate"
        );
    }
}
