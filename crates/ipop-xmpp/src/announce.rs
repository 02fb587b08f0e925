//! What a device says about itself: the presence that announces ipop (entity capabilities,
//! XEP-0115, with the ipop feature, and the device's public key) and the service discovery
//! answer behind those capabilities.

use crate::{NS_IPOP, NS_LINK};
use ipop_core::PublicKey;
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

/// The presence payloads of an ipop device: entity capabilities and the key.
pub fn payloads(key: &PublicKey) -> Vec<Element> {
    vec![
        Caps::new(CAPS_NODE, caps_hash()).into(),
        Element::builder("ipop", NS_IPOP)
            .attr(xml_ncname!("key").into(), key.to_string())
            .build(),
    ]
}

/// The available presence of an ipop device.
pub fn presence(key: &PublicKey) -> Presence {
    let mut presence = Presence::available().with_payloads(payloads(key));
    presence.priority = Priority(PRIORITY);
    presence
}

/// What a presence says about ipop.
#[derive(Debug, PartialEq, Eq)]
pub enum Announce {
    /// No ipop payload: a chat client or another program; not a peer.
    None,
    /// An ipop device with this key.
    Key(PublicKey),
    /// An ipop payload whose key does not parse.
    BadKey,
}

/// Reads the ipop payload of a presence.
pub fn read(payloads: &[Element]) -> Announce {
    match payloads.iter().find(|p| p.is("ipop", NS_IPOP)) {
        None => Announce::None,
        Some(p) => match p.attr("key").map(str::parse::<PublicKey>) {
            Some(Ok(key)) => Announce::Key(key),
            _ => Announce::BadKey,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presence_carries_caps_key_and_negative_priority() {
        let key = PublicKey([3; 32]);
        let presence = presence(&key);
        assert_eq!(presence.priority, Priority(-1));
        assert_eq!(read(&presence.payloads), Announce::Key(key));
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
    fn disco_info_advertises_the_ipop_features() {
        let info = disco_info(Some(caps_node_ver()));
        assert!(info.features.contains(NS_IPOP));
        assert!(info.features.contains(NS_LINK));
        assert!(info.features.contains(ns::JINGLE_ICE_UDP));
        assert_eq!(info.identities.len(), 1);
    }

    #[test]
    fn payloads_without_or_with_bad_keys_are_told_apart() {
        assert_eq!(read(&[]), Announce::None);
        let bad = Element::builder("ipop", NS_IPOP)
            .attr(xml_ncname!("key").into(), "AAAA")
            .build();
        assert_eq!(read(&[bad]), Announce::BadKey);
        assert_eq!(read(&[Element::bare("ipop", NS_IPOP)]), Announce::BadKey);
        assert_eq!(read(&[Element::bare("ipop", "urn:other")]), Announce::None);
    }
}
