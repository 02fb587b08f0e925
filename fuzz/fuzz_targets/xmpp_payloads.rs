//! XML into the parsers of the payloads that other XMPP entities send: Jingle link signalling,
//! the ipop presence payload, a room occupant's `muc#user` payload and XEP-0215 external
//! service answers.
//!
//! The input is XML text, parsed into an element as the stream parser would (inputs that are not
//! well-formed are skipped). The stream bounds depth before a stanza reaches these parsers, and
//! the fuzz target `xmpp_stream` covers that; here depth is bounded at [`MAX_DEPTH`]. A `<presence/>`
//! root gives its children as payloads; any other root is itself the payload. Besides never
//! panicking, a Jingle payload that reads as a signal must read the same after it is written back
//! and parsed again, as the peer would receive it.
#![no_main]

use ipop_xmpp::fuzzing::{parse_extdisco, read_announce, read_occupant};
use ipop_xmpp::jingle::{from_element, to_element};
use libfuzzer_sys::fuzz_target;
use minidom::Element;
use minidom::tree_builder::TreeBuilder;

/// Larger inputs are not worth the fuzzer's time (stanzas over 256 KiB never arrive).
const MAX_TEXT: usize = 64 * 1024;
/// Deeper elements are skipped; the payloads read here are at most five levels deep.
const MAX_DEPTH: usize = 64;

fuzz_target!(|data: &[u8]| {
    if data.len() > MAX_TEXT {
        return;
    }
    let Some(root) = parse(data) else {
        return;
    };
    let payloads: Vec<Element> = if root.name() == "presence" {
        root.children().cloned().collect()
    } else {
        vec![root.clone()]
    };
    let _ = read_announce(&payloads);
    let _ = read_occupant(&payloads);
    let _ = parse_extdisco(&root);
    if let Ok(signal) = from_element(&root) {
        let me = "alice@example.org/laptop".parse().expect("a JID");
        let (element, left_out) = to_element(&signal, &me);
        assert_eq!(
            left_out, 0,
            "a signal read has no more candidates than are sent"
        );
        let text = String::from(&element);
        let again = parse(text.as_bytes()).expect("a written signal parses");
        assert_eq!(from_element(&again), Ok(signal), "{text}");
    }
});

/// The element in `text`, if it is well-formed XML at most [`MAX_DEPTH`] deep.
fn parse(text: &[u8]) -> Option<Element> {
    let mut builder = TreeBuilder::new();
    let mut reader = minidom::rxml::RawReader::new(text);
    while let Some(event) = reader.read().ok()? {
        builder.process_event(event).ok()?;
        if builder.depth() > MAX_DEPTH {
            return None;
        }
        if let Some(root) = builder.root.take() {
            return Some(root);
        }
    }
    None
}
