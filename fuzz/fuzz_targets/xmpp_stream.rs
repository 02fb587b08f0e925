//! Raw bytes from the XMPP server, after login, through the whole receive path: the guard,
//! tokio-xmpp's parser and stanza stream, and the session, to the events the core sees.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() > 256 * 1024 {
        return;
    }
    // A replay that cannot finish in time is a bug (the session hung on an input).
    assert!(
        ipop_xmpp::replay::events(data).is_some(),
        "the replay did not finish"
    );
});
