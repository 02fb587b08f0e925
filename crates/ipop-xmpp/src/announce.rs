//! What a device says about itself: the presence that announces ipop (entity capabilities,
//! XEP-0115, with the ipop feature, the device's public key and its address claim in the
//! overlay) and the service discovery answer behind those capabilities.

use crate::{NS_IPOP, NS_LINK};
use ipnet::IpNet;
use ipop_core::PublicKey;
use ipop_core::osn::{Claim, RelayOffer};
use ipop_core::peer_relay::{self, TOKEN_LEN};
use std::fmt;
use std::net::Ipv4Addr;
use tokio_xmpp::minidom::{Element, rxml::xml_ncname};
use tokio_xmpp::parsers::caps::{self, Caps};
use tokio_xmpp::parsers::disco::{DiscoInfoResult, Identity};
use tokio_xmpp::parsers::hashes::{Algo, Hash};
use tokio_xmpp::parsers::ns;
use tokio_xmpp::parsers::presence::{Presence, Priority};

/// The entity capabilities node naming the ipop software.
pub const CAPS_NODE: &str = "urn:ipop";

/// Presence priority of an ipop device: negative, so that the server never delivers a message
/// sent to the bare JID to it (RFC 6121 §8.5.2.1.1).
pub const PRIORITY: i8 = -1;

/// What ipop answers to service discovery: one identity and the features it implements.
pub fn disco_info(node: Option<String>) -> DiscoInfoResult {
    DiscoInfoResult {
        node,
        identities: vec![Identity::new("client", "bot", "en", "ipop")],
        features: [
            ns::DISCO_INFO,
            ns::CAPS,
            ns::JINGLE,
            ns::JINGLE_ICE_UDP,
            NS_IPOP,
            NS_LINK,
        ]
        .into_iter()
        .map(str::to_owned)
        .collect(),
        extensions: vec![],
    }
}

fn caps_hash() -> Hash {
    caps::hash_caps(&caps::compute_disco(&disco_info(None)), Algo::Sha_1)
        // SHA-1 always hashes; the error case is for algorithms the parsers lack.
        .unwrap_or_else(|_| Hash::new(Algo::Sha_1, Vec::new()))
}

/// The verification string of [`disco_info`] (XEP-0115 §5, SHA-1).
pub fn caps_ver() -> String {
    caps_hash().to_base64()
}

/// The node a peer queries to learn what our caps stand for: `node#ver`.
pub fn caps_node_ver() -> String {
    format!("{CAPS_NODE}#{}", caps_ver())
}

/// At most this many routes are read from one presence; more are left out.
pub const MAX_ROUTES: usize = 16;

/// The presence payloads of an ipop device: entity capabilities, the key and, if any, the
/// device's claim in the overlay the presence goes to, its offer to relay and the prefixes it
/// routes for that overlay; an exit says on which port it answers DNS (`exit_dns`).
pub fn payloads(
    key: &PublicKey,
    claim: Option<Claim>,
    relay: Option<&RelayOffer>,
    routes: &[IpNet],
    exit_dns: Option<u16>,
) -> Vec<Element> {
    let mut ipop =
        Element::builder("ipop", NS_IPOP).attr(xml_ncname!("key").into(), key.to_string());
    if let Some(claim) = claim {
        ipop = ipop.attr(xml_ncname!("address").into(), claim.address.to_string());
        if claim.fixed {
            ipop = ipop.attr(xml_ncname!("fixed").into(), "true");
        }
    }
    if let Some(relay) = relay {
        let token = peer_relay::hex(&relay.token);
        ipop = ipop.append(
            Element::builder("relay", NS_IPOP)
                .attr(xml_ncname!("endpoint").into(), relay.endpoint.to_string())
                .attr(xml_ncname!("token").into(), token)
                .build(),
        );
    }
    // The default routes say that the device is an exit: `<exit/>`, once, with the port of
    // its DNS responder when it forwards its peers' queries: `<exit dns='53'/>`.
    if routes.iter().any(|r| r.prefix_len() == 0) {
        let mut exit = Element::builder("exit", NS_IPOP);
        if let Some(port) = exit_dns {
            exit = exit.attr(xml_ncname!("dns").into(), port.to_string());
        }
        ipop = ipop.append(exit.build());
    }
    for route in routes
        .iter()
        .filter(|r| r.prefix_len() > 0)
        .take(MAX_ROUTES)
    {
        ipop = ipop.append(
            Element::builder("route", NS_IPOP)
                .attr(xml_ncname!("prefix").into(), route.trunc().to_string())
                .build(),
        );
    }
    vec![Caps::new(CAPS_NODE, caps_hash()).into(), ipop.build()]
}

/// The available presence of an ipop device, claiming `claim` where it goes and offering its
/// `routes` there.
pub fn presence(
    key: &PublicKey,
    claim: Option<Claim>,
    relay: Option<&RelayOffer>,
    routes: &[IpNet],
    exit_dns: Option<u16>,
) -> Presence {
    let mut presence =
        Presence::available().with_payloads(payloads(key, claim, relay, routes, exit_dns));
    presence.priority = Priority(PRIORITY);
    presence
}

/// The available presence of a device outside the social overlay: no ipop payload, and the
/// same negative priority.
pub fn unannounced_presence() -> Presence {
    let mut presence = Presence::available();
    presence.priority = Priority(PRIORITY);
    presence
}

/// What a presence says about ipop.
#[derive(Debug, PartialEq, Eq)]
pub enum Announce {
    /// No ipop payload: a chat client or another program; not a peer.
    None,
    /// An ipop device with this key, claiming an address or not. A claim that does not parse
    /// leaves the device a peer without a claim; a relay offer that does not, without one.
    Key {
        key: PublicKey,
        claim: Result<Option<Claim>, BadClaim>,
        relay: Option<RelayOffer>,
        /// The prefixes it routes, and how many `<route/>` elements were malformed or beyond
        /// [`MAX_ROUTES`] (left out).
        routes: (Vec<IpNet>, usize),
        /// The port on which an exit answers DNS.
        exit_dns: Option<u16>,
    },
    /// An ipop payload whose key does not parse.
    BadKey,
}

/// An address claim that does not follow `docs/protocol.md`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BadClaim {
    /// `address` is not a dotted IPv4 address.
    Address(String),
    /// `fixed` is not an XML boolean.
    Fixed(String),
    /// `fixed` without `address`.
    FixedWithoutAddress,
}

impl fmt::Display for BadClaim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BadClaim::Address(a) => write!(f, "address {a:?} is not an IPv4 address"),
            BadClaim::Fixed(v) => write!(f, "fixed {v:?} is not a boolean"),
            BadClaim::FixedWithoutAddress => f.write_str("fixed without an address"),
        }
    }
}

/// Reads the claim of an ipop payload.
fn read_claim(ipop: &Element) -> Result<Option<Claim>, BadClaim> {
    let fixed = match ipop.attr("fixed") {
        None | Some("false" | "0") => false,
        Some("true" | "1") => true,
        Some(other) => return Err(BadClaim::Fixed(other.to_owned())),
    };
    match ipop.attr("address") {
        None if fixed => Err(BadClaim::FixedWithoutAddress),
        None => Ok(None),
        Some(a) => a
            .parse::<Ipv4Addr>()
            .map(|address| Some(Claim { address, fixed }))
            .map_err(|_| BadClaim::Address(a.to_owned())),
    }
}

/// Reads the relay offer of an ipop payload: `<relay endpoint='IP:PORT' token='32 hex'/>`.
fn read_relay(ipop: &Element) -> Option<RelayOffer> {
    let relay = ipop.get_child("relay", NS_IPOP)?;
    let endpoint = relay.attr("endpoint")?.parse().ok()?;
    let token = peer_relay::unhex::<TOKEN_LEN>(relay.attr("token")?)?;
    Some(RelayOffer { endpoint, token })
}

/// Reads the prefixes an ipop payload routes: `<route prefix='192.168.50.0/24'/>`, at most
/// [`MAX_ROUTES`], and the default routes of an exit, `<exit/>`. Returns them and how many were
/// left out: malformed, with host bits set, a default route (an exit says `<exit/>`) or beyond
/// the limit.
fn read_routes(ipop: &Element) -> (Vec<IpNet>, usize) {
    let mut routes = Vec::new();
    let mut bad = 0;
    for r in ipop.children().filter(|c| c.is("route", NS_IPOP)) {
        match r.attr("prefix").and_then(|p| p.parse::<IpNet>().ok()) {
            Some(net)
                if net.trunc() == net && net.prefix_len() > 0 && routes.len() < MAX_ROUTES =>
            {
                if !routes.contains(&net) {
                    routes.push(net);
                }
            }
            _ => bad += 1,
        }
    }
    if ipop.get_child("exit", NS_IPOP).is_some() {
        routes.extend(exit_routes());
    }
    (routes, bad)
}

/// The default routes, IPv4 and IPv6: what an exit routes.
pub fn exit_routes() -> [IpNet; 2] {
    [
        IpNet::V4(ipnet::Ipv4Net::default()),
        IpNet::V6(ipnet::Ipv6Net::default()),
    ]
}

/// Reads the DNS port of an exit: `<exit dns='53'/>`. A port that does not parse, or 0, is
/// left out: the exit is still an exit.
fn read_exit_dns(ipop: &Element) -> Option<u16> {
    let port = ipop.get_child("exit", NS_IPOP)?.attr("dns")?.parse().ok()?;
    (port != 0).then_some(port)
}

/// Reads the ipop payload of a presence.
pub fn read(payloads: &[Element]) -> Announce {
    match payloads.iter().find(|p| p.is("ipop", NS_IPOP)) {
        None => Announce::None,
        Some(p) => match p.attr("key").map(str::parse::<PublicKey>) {
            Some(Ok(key)) => Announce::Key {
                key,
                claim: read_claim(p),
                relay: read_relay(p),
                routes: read_routes(p),
                exit_dns: read_exit_dns(p),
            },
            _ => Announce::BadKey,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_travel_in_the_presence_and_bad_ones_are_left_out_and_counted() {
        let key = PublicKey([4; 32]);
        let routes: Vec<IpNet> = vec![
            "192.168.50.0/24".parse().unwrap(),
            "fd12::/64".parse().unwrap(),
        ];
        let presence = presence(&key, None, None, &routes, None);
        match read(&presence.payloads) {
            Announce::Key { routes: got, .. } => assert_eq!(got, (routes.clone(), 0)),
            other => panic!("{other:?}"),
        }
        // An exit: its default routes travel as one <exit/>.
        let mut exit = routes.clone();
        exit.extend(exit_routes());
        let announced = super::presence(&key, None, None, &exit, Some(5353));
        let xml = String::from(&Element::from(announced.clone()));
        assert_eq!(xml.matches("<exit").count(), 1, "{xml}");
        assert!(!xml.contains("0.0.0.0/0"), "{xml}");
        match read(&announced.payloads) {
            Announce::Key {
                routes: got,
                exit_dns,
                ..
            } => assert_eq!((got, exit_dns), ((exit, 0), Some(5353))),
            other => panic!("{other:?}"),
        }
        // A DNS port on an exit that does not parse leaves an exit without DNS.
        for bad in ["0", "65536", "fifty-three"] {
            let xml = format!("<ipop xmlns='{NS_IPOP}' key='{key}'><exit dns='{bad}'/></ipop>");
            match read(&[xml.parse().unwrap()]) {
                Announce::Key {
                    routes, exit_dns, ..
                } => assert_eq!((routes.0.len(), exit_dns), (2, None), "{bad}"),
                other => panic!("{other:?}"),
            }
        }
        let xml = format!(
            "<ipop xmlns='{NS_IPOP}' key='{key}'><route prefix='10.1.0.0/16'/>\
             <route prefix='10.1.2.3/16'/><route prefix='0.0.0.0/0'/><route/>\
             <route prefix='nonsense'/><route prefix='10.1.0.0/16'/></ipop>"
        );
        match read(&[xml.parse().unwrap()]) {
            Announce::Key { routes, .. } => {
                assert_eq!(routes, (vec!["10.1.0.0/16".parse().unwrap()], 4));
            }
            other => panic!("{other:?}"),
        }
        let many: String = (0..40)
            .map(|i| format!("<route prefix='10.{i}.0.0/16'/>"))
            .collect();
        let xml = format!("<ipop xmlns='{NS_IPOP}' key='{key}'>{many}</ipop>");
        match read(&[xml.parse().unwrap()]) {
            Announce::Key { routes, .. } => {
                assert_eq!((routes.0.len(), routes.1), (MAX_ROUTES, 40 - MAX_ROUTES));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_relay_offer_travels_in_the_presence_and_a_bad_one_is_left_out() {
        let key = PublicKey([3; 32]);
        let offer = RelayOffer {
            endpoint: "198.51.100.4:51821".parse().unwrap(),
            token: [0xab; TOKEN_LEN],
        };
        let presence = presence(&key, None, Some(&offer), &[], None);
        match read(&presence.payloads) {
            Announce::Key { relay, .. } => assert_eq!(relay, Some(offer)),
            other => panic!("{other:?}"),
        }
        for relay in [
            "<relay endpoint='198.51.100.4:51821' token='abab'/>",
            "<relay endpoint='nowhere' token='abababababababababababababababab'/>",
            "<relay token='abababababababababababababababab'/>",
            "<relay endpoint='198.51.100.4:1' token='zzababababababababababababababab'/>",
        ] {
            let xml = format!("<ipop xmlns='{NS_IPOP}' key='{key}'>{relay}</ipop>");
            match read(&[xml.parse().unwrap()]) {
                Announce::Key { relay: None, .. } => {}
                other => panic!("{xml}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_device_outside_the_social_overlay_announces_nothing() {
        let presence = unannounced_presence();
        assert_eq!(presence.priority, Priority(-1));
        assert!(matches!(read(&presence.payloads), Announce::None));
    }

    #[test]
    fn presence_carries_caps_key_and_negative_priority() {
        let key = PublicKey([3; 32]);
        let presence = presence(&key, None, None, &[], None);
        assert_eq!(presence.priority, Priority(-1));
        assert_eq!(
            read(&presence.payloads),
            Announce::Key {
                key,
                claim: Ok(None),
                relay: None,
                routes: (Vec::new(), 0),
                exit_dns: None,
            }
        );
        let ipop = presence
            .payloads
            .iter()
            .find(|p| p.is("ipop", NS_IPOP))
            .expect("ipop payload");
        assert_eq!((ipop.attr("address"), ipop.attr("fixed")), (None, None));
        let caps = presence
            .payloads
            .iter()
            .find(|p| p.is("c", ns::CAPS))
            .expect("caps");
        assert_eq!(caps.attr("node"), Some(CAPS_NODE));
        assert_eq!(caps.attr("hash"), Some("sha-1"));
        assert_eq!(caps.attr("ver"), Some(caps_ver().as_str()));
        assert_eq!(caps_ver().len(), 28, "base64 of a SHA-1 digest");
    }

    #[test]
    fn a_presence_with_key_and_claim_stays_small() {
        let claim = Some(Claim {
            address: std::net::Ipv4Addr::new(172, 31, 255, 254),
            fixed: true,
        });
        let stanza = String::from(&Element::from(presence(
            &PublicKey([7; 32]),
            claim,
            None,
            &[],
            None,
        )));
        let payload: usize = payloads(&PublicKey([7; 32]), claim, None, &[], None)
            .iter()
            .map(|p| String::from(p).len())
            .sum();
        println!(
            "presence with caps, key and claim: {} bytes, of which the payloads {payload}",
            stanza.len()
        );
        // docs/scale.md reports these figures: a room of 100 devices costs each joiner this
        // much times 100, through the server's rate limit.
        assert!(stanza.len() <= 400, "{} bytes: {stanza}", stanza.len());
    }

    #[test]
    fn disco_info_advertises_the_ipop_features() {
        let info = disco_info(Some(caps_node_ver()));
        assert!(info.features.contains(NS_IPOP));
        assert!(info.features.contains(NS_LINK));
        assert!(info.features.contains(ns::JINGLE_ICE_UDP));
        assert_eq!(info.identities.len(), 1);
    }

    fn ipop(attrs: &str) -> Element {
        format!(
            "<ipop xmlns='urn:ipop:0' key='{}' {attrs}/>",
            PublicKey([7; 32])
        )
        .parse()
        .expect("test XML is well-formed")
    }

    #[test]
    fn a_claim_goes_out_and_comes_back() {
        let key = PublicKey([5; 32]);
        for fixed in [false, true] {
            let claim = Claim {
                address: Ipv4Addr::new(10, 20, 0, 5),
                fixed,
            };
            let presence = presence(&key, Some(claim), None, &[], None);
            let ipop = presence
                .payloads
                .iter()
                .find(|p| p.is("ipop", NS_IPOP))
                .expect("ipop payload");
            assert_eq!(ipop.attr("address"), Some("10.20.0.5"));
            assert_eq!(ipop.attr("fixed"), fixed.then_some("true"));
            let xml = String::from(ipop);
            let parsed: Element = xml.parse().expect("our XML parses");
            assert_eq!(
                read(&[parsed]),
                Announce::Key {
                    key,
                    claim: Ok(Some(claim)),
                    relay: None,
                    routes: (Vec::new(), 0),
                    exit_dns: None,
                },
                "{xml}"
            );
        }
    }

    #[test]
    fn fixed_is_an_xml_boolean() {
        let claim = |fixed| Claim {
            address: Ipv4Addr::new(10, 1, 2, 3),
            fixed,
        };
        for (attr, fixed) in [("true", true), ("1", true), ("false", false), ("0", false)] {
            assert_eq!(
                read(&[ipop(&format!("address='10.1.2.3' fixed='{attr}'"))]),
                Announce::Key {
                    key: PublicKey([7; 32]),
                    claim: Ok(Some(claim(fixed))),
                    relay: None,
                    routes: (Vec::new(), 0),
                    exit_dns: None,
                },
                "{attr}"
            );
        }
    }

    #[test]
    fn a_bad_claim_leaves_the_key_and_says_what_is_wrong() {
        for (attrs, bad) in [
            ("address='10.20.0'", BadClaim::Address("10.20.0".to_owned())),
            (
                "address='10.20.0.256'",
                BadClaim::Address("10.20.0.256".to_owned()),
            ),
            (
                "address='010.20.0.1'",
                BadClaim::Address("010.20.0.1".to_owned()),
            ),
            ("address='fd00::5'", BadClaim::Address("fd00::5".to_owned())),
            (
                "address='10.20.0.5/24'",
                BadClaim::Address("10.20.0.5/24".to_owned()),
            ),
            ("address=''", BadClaim::Address(String::new())),
            (
                "address='10.20.0.5' fixed='yes'",
                BadClaim::Fixed("yes".to_owned()),
            ),
            ("fixed='true'", BadClaim::FixedWithoutAddress),
        ] {
            assert_eq!(
                read(&[ipop(attrs)]),
                Announce::Key {
                    key: PublicKey([7; 32]),
                    claim: Err(bad),
                    relay: None,
                    routes: (Vec::new(), 0),
                    exit_dns: None,
                },
                "{attrs}"
            );
        }
        assert_eq!(
            read(&[ipop("")]),
            Announce::Key {
                key: PublicKey([7; 32]),
                claim: Ok(None),
                relay: None,
                routes: (Vec::new(), 0),
                exit_dns: None,
            }
        );
    }

    /// The `<ipop/>` payloads of the presence examples in `docs/protocol.md` read as the
    /// document says: the social one claims the device's own address, the group one a fixed
    /// address in the group's subnet.
    #[test]
    fn the_examples_in_the_protocol_document_read_as_documented() {
        let doc = include_str!("../../../docs/protocol.md");
        let claims: Vec<Option<Claim>> = doc
            .split("```xml")
            .skip(1)
            .filter_map(|block| block.split("```").next())
            .filter_map(|block| {
                let start = block.find("<ipop ")?;
                let end = start + block[start..].find("/>")? + 2;
                let xml = block[start..end]
                    .lines()
                    .map(str::trim)
                    .collect::<Vec<_>>()
                    .join(" ");
                match read(&[xml.parse().expect("example is well-formed")]) {
                    Announce::Key {
                        claim: Ok(claim), ..
                    } => Some(claim),
                    other => panic!("{xml}: {other:?}"),
                }
            })
            .collect();
        assert_eq!(
            claims,
            vec![
                Some(Claim {
                    address: Ipv4Addr::new(10, 78, 0, 1),
                    fixed: false
                }),
                Some(Claim {
                    address: Ipv4Addr::new(10, 20, 0, 5),
                    fixed: true
                }),
            ]
        );
    }

    #[test]
    fn payloads_without_or_with_bad_keys_are_told_apart() {
        assert_eq!(read(&[]), Announce::None);
        let bad = Element::builder("ipop", NS_IPOP)
            .attr(xml_ncname!("key").into(), "AAAA")
            .build();
        assert_eq!(read(&[bad]), Announce::BadKey);
        assert_eq!(read(&[Element::bare("ipop", NS_IPOP)]), Announce::BadKey);
        let bad_key_and_claim = Element::builder("ipop", NS_IPOP)
            .attr(xml_ncname!("key").into(), "AAAA")
            .attr(xml_ncname!("address").into(), "10.0.0.1")
            .build();
        assert_eq!(read(&[bad_key_and_claim]), Announce::BadKey);
        assert_eq!(read(&[Element::bare("ipop", "urn:other")]), Announce::None);
    }
}
