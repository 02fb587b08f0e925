//! Config files into the config parser and what `ipop up` builds from a valid one: the node
//! with its static peers and the engine with its overlays and addresses.
//!
//! Besides never panicking: an error that names a line names one of the text's lines.
#![no_main]

use boringtun::x25519::StaticSecret;
use ipop::config::Config;
use ipop_core::{Engine, Memory, Node};
use libfuzzer_sys::fuzz_target;

/// Larger config files are not worth the fuzzer's time.
const MAX_TEXT: usize = 64 * 1024;
/// A valid config with more static peers than this is not built into a node (each peer costs a
/// key agreement).
const MAX_PEERS: usize = 8;

fuzz_target!(|data: &[u8]| {
    if data.len() > MAX_TEXT {
        return;
    }
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // The private key file is read by the same daemon, with a parser of its own.
    let _ = ipop_core::key::parse_secret(text);
    let config = match Config::parse(text) {
        Ok(config) => config,
        Err(e) => {
            check_line(text, &e);
            return;
        }
    };
    let _ = (
        config.state_dir(),
        config.key_path(),
        config.control_socket(),
    );
    let peers = config.peer_configs();
    if peers.len() > MAX_PEERS {
        return;
    }
    let Ok(node) = Node::new(StaticSecret::from([7; 32]), peers) else {
        return;
    };
    let engine = Engine::new(node, config.overlays(), Memory::default(), 1, 2);
    for own in engine.own_addresses() {
        assert!(own.v4.prefix_len() <= 32 && own.v6.prefix_len() == 64);
    }
});

/// "line N, key K: message" or "line N: message" must name a line of the text.
fn check_line(text: &str, error: &str) {
    let Some(rest) = error.strip_prefix("line ") else {
        return;
    };
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    let line: usize = digits.parse().expect("a line number");
    let lines = text.split('\n').count();
    assert!(
        (1..=lines).contains(&line),
        "line {line} of a text of {lines} lines: {error}"
    );
}
