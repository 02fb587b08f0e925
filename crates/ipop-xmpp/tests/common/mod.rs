//! Helpers for the integration tests: a private Prosody per test (from `ipop-lab`), ipop
//! configurations for it, and a plain XMPP "chat client" that works on raw stanzas.

use futures::{SinkExt, StreamExt};
use ipop_core::PublicKey;
use ipop_core::osn::OsnEvent;
use ipop_lab::Prosody;
use ipop_xmpp::{GroupConfig, XmppConfig};
use std::borrow::Cow;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::BufStream;
use tokio::net::TcpStream;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_xmpp::Stanza;
use tokio_xmpp::connect::ServerConnector;
use tokio_xmpp::jid::{BareJid, Jid};
use tokio_xmpp::minidom::Element;
use tokio_xmpp::parsers::iq::Iq;
use tokio_xmpp::parsers::presence::{Presence, Priority};
use tokio_xmpp::parsers::stanza_error::DefinedCondition;
use tokio_xmpp::parsers::starttls;
use tokio_xmpp::rustls::pki_types::pem::PemObject;
use tokio_xmpp::rustls::pki_types::{CertificateDer, ServerName};
use tokio_xmpp::rustls::{ClientConfig, RootCertStore};
use tokio_xmpp::stanzastream::{Event, StanzaStage, StanzaStream, StreamEvent};
use tokio_xmpp::xmlstream::{
    FallibleStreamElement, PendingFeaturesRecv, ReadError, StreamHeader, Timeouts,
    XmppStreamElement, initiate_stream,
};

pub const DOMAIN: &str = "localhost";
pub const ROOMS: &str = "conference.localhost";

/// How long a test waits for any one thing to happen.
pub const WAIT: Duration = Duration::from_secs(10);

/// A private Prosody serving `localhost`, with a MUC component `conference.localhost` whose new
/// rooms stay locked until configured.
pub fn prosody() -> Prosody {
    Prosody::start_local(DOMAIN)
}

/// An ipop configuration for `user@localhost` on `device`, trusting the test CA.
pub fn config_for(
    server: &Prosody,
    user: &str,
    password: &str,
    device: &str,
    key: u8,
) -> XmppConfig {
    let mut cfg = XmppConfig::new(server.jid(user), password, device, PublicKey([key; 32]));
    cfg.server = Some(("127.0.0.1".to_owned(), server.c2s_addr().port()));
    cfg.extra_ca = Some(server.ca_cert_path().to_owned());
    cfg.login_timeout = WAIT;
    cfg
}

/// A TCP port nobody listens on.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free port: {e}"))
}

/// A group room configuration.
pub fn group(room: &str, create: bool) -> GroupConfig {
    GroupConfig {
        room: format!("{room}@{ROOMS}"),
        create,
        claim: None,
        routes: Vec::new(),
    }
}

/// Reads events until one matches, and returns it; fails with what was seen otherwise.
pub async fn expect<T>(
    events: &mut UnboundedReceiver<OsnEvent>,
    what: &str,
    matches: impl FnMut(&OsnEvent) -> Option<T>,
) -> T {
    expect_within(events, WAIT, what, matches).await
}

/// [`expect`], with another time limit than [`WAIT`].
pub async fn expect_within<T>(
    events: &mut UnboundedReceiver<OsnEvent>,
    wait: Duration,
    what: &str,
    mut matches: impl FnMut(&OsnEvent) -> Option<T>,
) -> T {
    let deadline = tokio::time::Instant::now() + wait;
    let mut seen = Vec::new();
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some(event)) => {
                if let Some(found) = matches(&event) {
                    return found;
                }
                seen.push(event);
            }
            Ok(None) => panic!("events ended while waiting for {what}; seen: {seen:#?}"),
            Err(_) => panic!("no {what} within {wait:?}; seen: {seen:#?}"),
        }
    }
}

/// Members of an overlay, sorted.
pub fn members(event: &OsnEvent, overlay: &ipop_core::osn::OverlayId) -> Option<Vec<String>> {
    match event {
        OsnEvent::Members { overlay: o, users } if o == overlay => {
            let mut users = users.clone();
            users.sort();
            Some(users)
        }
        _ => None,
    }
}

/// Connects tokio-xmpp's client with STARTTLS and the test CA (tokio-xmpp's own connectors
/// only trust the system store).
#[derive(Debug, Clone)]
struct TestConnector {
    addr: SocketAddr,
    tls: Arc<ClientConfig>,
}

impl ServerConnector for TestConnector {
    type Stream = BufStream<TlsStream<TcpStream>>;

    async fn connect(
        &self,
        jid: &Jid,
        ns: &'static str,
        timeouts: Timeouts,
    ) -> Result<
        (
            PendingFeaturesRecv<Self::Stream>,
            sasl::common::ChannelBinding,
        ),
        tokio_xmpp::Error,
    > {
        let header = || StreamHeader {
            to: Some(Cow::Owned(jid.domain().to_string())),
            from: None,
            id: None,
        };
        let tcp = BufStream::new(TcpStream::connect(self.addr).await?);
        let (_, mut stream) = initiate_stream(tcp, ns, header(), timeouts)
            .await?
            .recv_features::<FallibleStreamElement>()
            .await?;
        stream
            .send(&XmppStreamElement::Starttls(starttls::Nonza::Request(
                starttls::Request,
            )))
            .await?;
        loop {
            match stream
                .next()
                .await
                .map(|r| r.and_then(|e| e.into_read_error()))
            {
                Some(Ok(XmppStreamElement::Starttls(starttls::Nonza::Proceed(_)))) => break,
                Some(Ok(_)) | Some(Err(ReadError::SoftTimeout)) => {}
                other => {
                    return Err(io::Error::other(format!("STARTTLS failed: {other:?}")).into());
                }
            }
        }
        let name = ServerName::try_from(jid.domain().to_string())
            .map_err(|e| io::Error::other(e.to_string()))?;
        let tls = TlsConnector::from(self.tls.clone())
            .connect(name, stream.into_inner().into_inner())
            .await?;
        Ok((
            initiate_stream(BufStream::new(tls), ns, header(), timeouts).await?,
            sasl::common::ChannelBinding::None,
        ))
    }
}

/// A plain XMPP client: the user's chat client, or a peer doing what ipop does not.
///
/// Built on tokio-xmpp's `StanzaStream`, not its `Client`: `Client` loses wake-ups when a stanza
/// arrives while one is being sent (its `StanzaReceiver` returns `Pending` without registering a
/// waker when the shared lock is busy), and then stalls until something else wakes it.
pub struct ChatClient {
    stream: StanzaStream,
    pub jid: BareJid,
}

impl ChatClient {
    /// Logs in as `user@localhost/resource` and, with `priority`, sends available presence.
    pub async fn connect(
        server: &Prosody,
        user: &str,
        password: &str,
        resource: &str,
        priority: Option<i8>,
    ) -> ChatClient {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(server.ca_cert_path()).expect("read CA") {
            roots.add(cert.expect("CA parses")).expect("CA usable");
        }
        let tls = ClientConfig::builder_with_provider(Arc::new(
            tokio_xmpp::rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        let jid = Jid::new(&format!("{user}@{DOMAIN}/{resource}")).expect("JID");
        let mut stream = StanzaStream::new_c2s(
            TestConnector {
                addr: server.c2s_addr(),
                tls: Arc::new(tls),
            },
            jid.clone(),
            password.to_owned(),
            Timeouts::tight(),
            16,
        );
        tokio::time::timeout(WAIT, async {
            while let Some(event) = stream.next().await {
                if let Event::Stream(StreamEvent::Reset { .. }) = event {
                    return;
                }
            }
        })
        .await
        .expect("chat client online");
        let mut chat = ChatClient {
            stream,
            jid: jid.to_bare(),
        };
        if let Some(priority) = priority {
            let mut presence = Presence::available();
            presence.priority = Priority(priority);
            chat.send(presence.into()).await;
        }
        chat
    }

    pub async fn send(&mut self, stanza: Stanza) {
        let mut token = self.stream.send(Box::new(stanza)).await;
        token
            .wait_for(StanzaStage::Sent)
            .await
            .expect("stanza sent");
    }

    /// Reads stanzas until one matches.
    pub async fn expect<T>(
        &mut self,
        what: &str,
        mut matches: impl FnMut(&Stanza) -> Option<T>,
    ) -> T {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.stream.next()).await {
                Ok(Some(Event::Stanza(stanza))) => {
                    if let Some(found) = matches(&stanza) {
                        return found;
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) => panic!("chat client stream ended while waiting for {what}"),
                Err(_) => panic!("chat client {}: no {what} within {WAIT:?}", self.jid),
            }
        }
    }

    /// Sends an IQ and waits for its answer: the result's payload, or the error condition.
    pub async fn iq(&mut self, iq: Iq) -> Result<Option<Element>, DefinedCondition> {
        let id = iq.id().to_owned();
        self.send(iq.into()).await;
        self.expect("IQ answer", |s| match s {
            Stanza::Iq(Iq::Result { id: i, payload, .. }) if *i == id => Some(Ok(payload.clone())),
            Stanza::Iq(Iq::Error { id: i, error, .. }) if *i == id => {
                Some(Err(error.defined_condition.clone()))
            }
            _ => None,
        })
        .await
    }

    pub async fn end(self) {
        self.stream.close().await;
    }
}
