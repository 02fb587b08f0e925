//! The raw XMPP client against a real Prosody (run as root: namespaces, Prosody as root).

use std::time::Duration;

use ipop_lab::{Netns, Prosody, RawElement, RawError, RawXmpp, veth};

const WAIT: Duration = Duration::from_secs(10);

/// Receives until an element named `name` with this id comes.
fn recv_id(raw: &mut RawXmpp, name: &str, id: &str) -> RawElement {
    loop {
        let e = raw
            .recv(WAIT)
            .unwrap_or_else(|e| panic!("waiting for <{name} id='{id}'>: {e}"));
        if e.name() == name && e.attr("id") == Some(id) {
            return e;
        }
    }
}

#[test]
fn a_raw_client_logs_in_from_a_namespace_and_reads_back_what_prosody_forwards() {
    let server_ns = Netns::new("rawsrv");
    let client_ns = Netns::new("rawcli");
    let (in_server, in_client) = veth(&server_ns, &client_ns);
    server_ns.add_address(&in_server, "10.0.0.254/24");
    client_ns.add_address(&in_client, "10.0.0.1/24");
    let server = Prosody::start_in(&server_ns, "10.0.0.254", "raw.example");
    server.register("mallory", "pw-m");
    let builder = RawXmpp::builder(server.c2s_addr(), server.domain(), server.ca_cert_der())
        .netns(&client_ns);

    let wrong = builder.clone().login("mallory", "not-her-password");
    assert!(
        matches!(&wrong, Err(RawError::Refused { condition, .. }) if condition == "not-authorized"),
        "{wrong:?}"
    );

    let mut raw = builder
        .resource("lab")
        .login("mallory", "pw-m")
        .unwrap_or_else(|e| panic!("mallory cannot log in: {e}"));
    assert_eq!(raw.jid(), "mallory@raw.example/lab");
    let me = raw.jid().to_owned();

    raw.send_raw(b"<iq type='get' id='ping-1' to='raw.example'><ping xmlns='urn:xmpp:ping'/></iq>")
        .expect("send a ping");
    let pong = raw.wait_iq("ping-1", WAIT).expect("the server answers");
    assert_eq!(pong.attr("type"), Some("result"), "{pong}");

    // An IQ to a resource that is not online: the server answers for it.
    raw.send_raw(
        b"<iq type='get' id='q-2' to='nobody@raw.example/none'>\
          <query xmlns='jabber:iq:version'/></iq>",
    )
    .expect("send a query");
    let refused = raw.wait_iq("q-2", WAIT).expect("the server answers");
    assert_eq!(refused.attr("type"), Some("error"), "{refused}");
    assert_eq!(
        refused.error_condition(),
        Some("service-unavailable"),
        "{refused}"
    );

    // Stanzas a hostile client sends, to itself: Prosody forwards them as they are.
    let deep = format!(
        "<message to='{me}' id='deep-3'>{}{}</message>",
        "<x>".repeat(20_000),
        "</x>".repeat(20_000)
    );
    let wide = format!(
        "<message to='{me}' id='wide-4'><x xmlns='urn:example:raw' a='{}'>{}</x></message>",
        "A".repeat(64 * 1024),
        "T".repeat(64 * 1024)
    );
    raw.send_raw(deep.as_bytes()).expect("send the deep stanza");
    raw.send_raw(wide.as_bytes()).expect("send the wide stanza");
    let back = recv_id(&mut raw, "message", "deep-3");
    assert_eq!(back.depth(), 20_001, "{back}");
    assert!(back.size() >= 140_000, "{back}");
    let back = recv_id(&mut raw, "message", "wide-4");
    let x = back.child("x").expect("the payload");
    assert_eq!(x.attr("a").map(str::len), Some(64 * 1024));
    assert_eq!(x.text.len(), 64 * 1024);

    // Over Prosody's 256 KiB stanza limit, the stream ends.
    let huge = format!(
        "<message to='{me}' id='huge-5'><body>{}</body></message>",
        "H".repeat(300 * 1024)
    );
    // Prosody may close before the last bytes are written.
    let sent = raw.send_raw(huge.as_bytes());
    let ended = raw.recv(WAIT);
    assert!(
        matches!(&ended, Err(RawError::Stream { condition, .. }) if condition == "policy-violation"),
        "sending: {sent:?}; then: {ended:?}"
    );
}
