//! A session fed from memory: what the XMPP server sends, as raw bytes, in; the events the core
//! would see, out. The whole receive path runs as in the daemon (the guard, tokio-xmpp's
//! parser and stanza stream, the session); only the connection is a pipe, which the server
//! side closes after the input, so that the session goes offline once it has handled it all.
//! For fuzzing and for tests of hostile input.

use crate::guard::{Guard, Limits};
use crate::session::{Channels, Task};
use crate::{Claims, GroupConfig, Shared, XmppConfig, login};
use ipop_core::PublicKey;
use ipop_core::osn::OsnEvent;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_xmpp::jid::{BareJid, Jid};
use tokio_xmpp::parsers::ns;
use tokio_xmpp::stanzastream::Connection;
use tokio_xmpp::xmlstream::{StreamHeader, Timeouts, initiate_stream};

/// The device the replayed session logs in as.
pub const ME: &str = "alice@example.org/laptop";
/// Its friend (mutual subscription in the roster the server sends first).
pub const FRIEND: &str = "bob@example.org";
/// The group room it is in.
pub const ROOM: &str = "lab@conference.example.org";

/// What the server says before `input`: the stream header and features, the answer to
/// resource binding, and the roster.
fn preamble() -> String {
    format!(
        "<?xml version='1.0'?><stream:stream xmlns='jabber:client' \
         xmlns:stream='http://etherx.jabber.org/streams' id='replay' from='example.org' \
         version='1.0'><stream:features><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/>\
         </stream:features><iq type='result' id='resource-binding'><bind \
         xmlns='urn:ietf:params:xml:ns:xmpp-bind'><jid>{ME}</jid></bind></iq><iq type='result' \
         id='replay-1'><query xmlns='jabber:iq:roster'><item jid='{FRIEND}' \
         subscription='both'/></query></iq>"
    )
}

/// Most time a replay may take: far more than any input needs.
const LIMIT: Duration = Duration::from_secs(10);

/// Feeds `input` to a session logged in as [`ME`], with the social overlay and the group
/// [`ROOM`], after the [`preamble`]; returns the events for the core, up to and including
/// [`OsnEvent::Offline`] when the pipe closes. `None` if the session could not even start, or
/// did not finish within ten seconds.
pub fn events(input: &[u8]) -> Option<Vec<OsnEvent>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .ok()?;
    runtime.block_on(replay(input))
}

async fn replay(input: &[u8]) -> Option<Vec<OsnEvent>> {
    let (client, mut server) = tokio::io::duplex(64 * 1024);
    let mut script = preamble().into_bytes();
    script.extend_from_slice(input);
    tokio::spawn(async move {
        // The server side writes its part and closes its end, reading what the session sends
        // meanwhile; the session's requests go unanswered.
        let (mut reader, mut writer) = tokio::io::split(&mut server);
        let drain = async {
            let mut sink = vec![0; 16 * 1024];
            while reader.read(&mut sink).await.is_ok_and(|n| n > 0) {}
        };
        let write = async {
            // A session that stopped reading ends the replay either way.
            let _ = writer.write_all(&script).await;
            let _ = writer.shutdown().await;
        };
        tokio::join!(drain, write);
    });

    let mut cfg = XmppConfig::new("alice@example.org", "", "laptop", PublicKey([7; 32]));
    cfg.server = Some(("127.0.0.1".to_owned(), 0));
    cfg.groups = vec![GroupConfig {
        room: ROOM.to_owned(),
        create: false,
        claim: None,
        routes: Vec::new(),
    }];
    let shared = Arc::new(Shared::new("replay".to_owned()));
    let sink_shared = shared.clone();
    let sink: crate::guard::Sink = Arc::new(move |e| sink_shared.on_guard(e));
    // Reading the system's certificates takes longer than a replay: one login serves them all
    // (it would only be used to reconnect, which a replay never does).
    static LOGIN: OnceLock<Option<Arc<login::Login>>> = OnceLock::new();
    let login = LOGIN
        .get_or_init(|| {
            login::Login::new(&cfg, sink.clone(), Arc::default())
                .ok()
                .map(Arc::new)
        })
        .clone()?;
    let io = BufStream::new(Guard::new(client, Limits::DEFAULT, sink));
    let header = StreamHeader {
        to: Some("example.org".into()),
        from: None,
        id: None,
    };
    let pending = initiate_stream(io, ns::JABBER_CLIENT, header, Timeouts::default())
        .await
        .ok()?;
    let (features, stream) = pending.recv_features().await.ok()?;
    let first = Connection {
        stream: stream.box_stream(),
        features,
        identity: Jid::from(login.jid().clone()),
    };
    let (_commands, command_rx) = mpsc::channel(1);
    let (events, mut event_rx) = mpsc::unbounded_channel();
    let (ready, _ready_rx) = oneshot::channel();
    let (_claims, claims_rx) = watch::channel(Claims::new());
    let groups = vec![BareJid::new(ROOM).ok()?];
    let task = Task::new(
        cfg,
        groups,
        login,
        first,
        shared,
        Channels {
            events,
            commands: command_rx,
            claims: claims_rx,
            ready,
        },
    )
    .with_id_prefix("replay");
    let running = tokio::spawn(task.run());
    let mut out = Vec::new();
    let finished = tokio::time::timeout(LIMIT, async {
        while let Some(event) = event_rx.recv().await {
            let offline = event == OsnEvent::Offline;
            out.push(event);
            if offline {
                break;
            }
        }
    })
    .await;
    running.abort();
    finished.ok().map(|()| out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ipop_core::osn::{DeviceId, OverlayId};

    fn key(byte: u8) -> String {
        PublicKey([byte; 32]).to_string()
    }

    #[test]
    fn a_friends_device_announced_after_login_reaches_the_core() {
        let input = format!(
            "<presence from='{FRIEND}/phone'><ipop xmlns='urn:ipop:0' key='{}'/></presence>",
            key(2)
        );
        let events = events(input.as_bytes()).expect("replay runs");
        assert!(
            events.contains(&OsnEvent::DeviceUp {
                overlay: OverlayId::Social,
                device: DeviceId::new(FRIEND, "phone"),
                key: PublicKey([2; 32]),
                relay: None,
                routes: Vec::new(),
                exit_dns: None,
                claim: None,
            }),
            "{events:?}"
        );
    }

    #[test]
    fn hostile_stanzas_between_two_presences_change_nothing_else() {
        let deep = "<a>".repeat(20_000) + &"</a>".repeat(20_000);
        let long = "x".repeat(64 * 1024);
        let input = format!(
            "<presence from='mallory@evil.example/x' to='alice@example.org'>{deep}</presence>\
             <iq type='set' id='j' from='mallory@evil.example/x' to='{ME}'><jingle \
             xmlns='urn:xmpp:jingle:1' action='session-initiate' sid='s'>{deep}</jingle></iq>\
             <message from='mallory@evil.example/x' to='{ME}' id='{long}'/>\
             <presence from='{FRIEND}/phone'><ipop xmlns='urn:ipop:0' key='{}'/></presence>",
            key(2)
        );
        let events = events(input.as_bytes()).expect("replay runs");
        let ups: Vec<&OsnEvent> = events
            .iter()
            .filter(|e| matches!(e, OsnEvent::DeviceUp { .. }))
            .collect();
        assert_eq!(ups.len(), 1, "{events:?}");
        // The stream went offline only at the end of the input, once.
        assert_eq!(
            events.iter().position(|e| *e == OsnEvent::Offline),
            Some(events.len() - 1),
            "{events:?}"
        );
    }
}
