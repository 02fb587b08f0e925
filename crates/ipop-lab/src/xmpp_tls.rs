//! Opening authenticated XMPP streams for tests: TCP to a fixed address (opened inside a network
//! namespace when asked), STARTTLS with a rustls config that trusts only the test CA, then SASL
//! SCRAM. The streams are handed to tokio-xmpp's `StanzaStream`, which binds the resource
//! (without stream management, see `LabConnector::open`).
//!
//! tokio-xmpp's own STARTTLS connector builds its root store from the process environment
//! (`SSL_CERT_FILE`), which cannot differ between tests running in parallel in one process; its
//! login also picks PLAIN over SCRAM when TLS 1.3 makes it ask for channel binding that the
//! server does not offer.

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use sasl::common::Credentials;
use tokio::io::BufStream;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::oneshot;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};
use tokio_xmpp::error::ProtocolError;
use tokio_xmpp::jid::Jid;
use tokio_xmpp::parsers::ns;
use tokio_xmpp::parsers::starttls;
use tokio_xmpp::parsers::stream_features::StreamFeatures;
use tokio_xmpp::stanzastream::Connection;
use tokio_xmpp::xmlstream::{
    FallibleStreamElement, ReadError, StreamHeader, Timeouts, XmppStream, XmppStreamElement,
    initiate_stream,
};
use tokio_xmpp::{Error, client_login};

use crate::nsenter::{NsHandle, run_in};

/// How long one TCP connection attempt may take.
pub const TCP_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long one whole attempt (TCP, TLS, authentication) may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(15);

/// Waits between failed attempts, as tokio-xmpp's own reconnection does: from 1 s, doubling up
/// to 30 s.
const BACKOFF_FIRST: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// The SASL mechanisms used, best first, without channel binding (Prosody 0.12 offers no
/// `-PLUS` mechanism).
const SCRAM: [&str; 2] = ["SCRAM-SHA-256", "SCRAM-SHA-1"];

/// The reconnection callback of a `StanzaStream`: called for the first stream and after each
/// disconnection, with the slot to put the next stream in.
pub(crate) type Reconnector = Box<dyn FnMut(Option<String>, oneshot::Sender<Connection>) + Send>;

/// Opens streams to `addr` whatever the JID's domain (which still names the TLS server).
#[derive(Clone)]
pub(crate) struct LabConnector {
    addr: SocketAddr,
    netns: Option<NsHandle>,
    tls: Arc<ClientConfig>,
    /// The last error of an attempt, for the message when a login times out: attempts are
    /// retried, so nobody else sees them.
    last_error: Arc<Mutex<Option<String>>>,
}

impl fmt::Debug for LabConnector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LabConnector")
            .field("addr", &self.addr)
            .field("netns", &self.netns.as_ref().map(NsHandle::name))
            .finish_non_exhaustive()
    }
}

impl LabConnector {
    /// # Errors
    /// When `ca_der` is not a certificate rustls accepts as a trust anchor.
    pub(crate) fn new(
        addr: SocketAddr,
        netns: Option<NsHandle>,
        ca_der: &[u8],
    ) -> Result<LabConnector, String> {
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from(ca_der.to_vec()))
            .map_err(|e| format!("the test CA is not a usable trust anchor: {e}"))?;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let tls = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("cannot configure TLS: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(LabConnector {
            addr,
            netns,
            tls: Arc::new(tls),
            last_error: Arc::new(Mutex::new(None)),
        })
    }

    /// The last error of a connection attempt, if any.
    pub(crate) fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The reconnection callback for a `StanzaStream` of `jid` (bare, or full to ask for that
    /// resource). It must be called inside a tokio runtime: each call spawns a task that tries
    /// until a stream is open, backing off between attempts. That task keeps the slot until it
    /// fills it or the runtime ends (the stream's worker panics on a dropped slot).
    pub(crate) fn reconnector(self, jid: Jid, password: String) -> Reconnector {
        Box::new(move |_, slot| {
            let (connector, jid, password) = (self.clone(), jid.clone(), password.clone());
            tokio::spawn(async move {
                let mut delay = BACKOFF_FIRST;
                loop {
                    if let Some(connection) = connector.connect(&jid, &password).await {
                        // Refused only when the stanza stream has closed: the connection then
                        // goes with it.
                        let _ = slot.send(connection);
                        return;
                    }
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(BACKOFF_MAX);
                }
            });
        })
    }

    /// One attempt; a failure is kept for [`LabConnector::last_error`].
    async fn connect(&self, jid: &Jid, password: &str) -> Option<Connection> {
        let error = match tokio::time::timeout(ATTEMPT_TIMEOUT, self.open(jid, password)).await {
            Ok(Ok(connection)) => return Some(connection),
            Ok(Err(e)) => format!("connecting to {}: {e}", self.addr),
            Err(_) => format!(
                "connecting to {}: no authenticated stream within {ATTEMPT_TIMEOUT:?}",
                self.addr
            ),
        };
        *self
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(error);
        None
    }

    async fn tcp(&self) -> io::Result<TcpStream> {
        let addr = self.addr;
        // The socket belongs to the namespace it is created in, wherever it is used later.
        let socket = run_in(self.netns.as_ref(), move || {
            if addr.is_ipv4() {
                TcpSocket::new_v4()
            } else {
                TcpSocket::new_v6()
            }
        })??;
        tokio::time::timeout(TCP_CONNECT_TIMEOUT, socket.connect(addr))
            .await
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no TCP connection to {addr} within {TCP_CONNECT_TIMEOUT:?}"),
                )
            })?
    }

    /// TCP, STARTTLS, TLS, SCRAM and the stream restart: a stream ready for resource binding.
    async fn open(&self, jid: &Jid, password: &str) -> Result<Connection, Error> {
        let domain = jid.domain().as_str();
        let header = || StreamHeader {
            to: Some(Cow::Borrowed(domain)),
            from: None,
            id: None,
        };
        let timeouts = Timeouts::tight();
        let tcp = self.tcp().await?;
        let plain =
            initiate_stream(BufStream::new(tcp), ns::JABBER_CLIENT, header(), timeouts).await?;
        let (features, mut plain) = plain.recv_features::<FallibleStreamElement>().await?;
        if !features.can_starttls() {
            return Err(Error::Protocol(ProtocolError::NoTls));
        }
        plain
            .send(&XmppStreamElement::Starttls(starttls::Nonza::Request(
                starttls::Request,
            )))
            .await?;
        loop {
            match plain
                .next()
                .await
                .map(|item| item.and_then(FallibleStreamElement::into_read_error))
            {
                Some(Ok(XmppStreamElement::Starttls(starttls::Nonza::Proceed(_)))) => break,
                Some(Ok(_) | Err(ReadError::SoftTimeout)) => {}
                Some(Err(ReadError::HardError(e))) => return Err(e.into()),
                Some(Err(ReadError::ParseError(e))) => {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, e).into());
                }
                None | Some(Err(ReadError::StreamFooterReceived)) => {
                    return Err(Error::Disconnected);
                }
            }
        }
        let tcp = plain.into_inner().into_inner();
        let server_name = ServerName::try_from(domain.to_owned()).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{domain} is not a TLS server name: {e}"),
            )
        })?;
        let tls = TlsConnector::from(Arc::clone(&self.tls))
            .connect(server_name, tcp)
            .await?;
        let pending =
            initiate_stream(BufStream::new(tls), ns::JABBER_CLIENT, header(), timeouts).await?;
        let (features, stream): (StreamFeatures, XmppStream<_>) = pending.recv_features().await?;
        let credentials = Credentials::default()
            .with_username(jid.node().map_or("", |node| node.as_str()))
            .with_password(password);
        let stream = client_login(stream, scram(&features), credentials).await?;
        let (mut features, stream) = stream
            .send_header(header())
            .await?
            .recv_features::<FallibleStreamElement>()
            .await?;
        // The lab's chat users do without stream management (XEP-0198), as many chat clients
        // do: each reconnection is a new session. tokio-xmpp 6 rejects the `<failed/>` without
        // `h` that Prosody and ejabberd send when a resumption fails after a restart, so a
        // client that tries to resume would never log in again.
        features.stream_management = None;
        Ok(Connection {
            stream: stream.box_stream(),
            features,
            identity: jid.clone(),
        })
    }
}

/// The SCRAM mechanisms the server offers, for tokio-xmpp's SASL loop (which otherwise also
/// takes PLAIN). Empty when there is none: the login then fails saying so.
fn scram(features: &StreamFeatures) -> BTreeSet<String> {
    SCRAM
        .iter()
        .filter(|mechanism| features.sasl_mechanisms.contains(**mechanism))
        .map(|mechanism| (*mechanism).to_owned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_scram_is_offered_to_the_login() {
        let features = StreamFeatures {
            sasl_mechanisms: ["PLAIN", "SCRAM-SHA-1", "SCRAM-SHA-1-PLUS"]
                .into_iter()
                .map(str::to_owned)
                .collect(),
            ..StreamFeatures::default()
        };
        assert_eq!(
            scram(&features).into_iter().collect::<Vec<_>>(),
            vec!["SCRAM-SHA-1".to_owned()]
        );
        assert!(scram(&StreamFeatures::default()).is_empty());
    }
}
