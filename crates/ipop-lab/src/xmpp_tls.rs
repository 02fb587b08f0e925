//! A tokio-xmpp [`ServerConnector`] for tests: TCP to a fixed address (opened inside a network
//! namespace when asked), STARTTLS with a rustls config that trusts only the test CA.
//!
//! tokio-xmpp's own STARTTLS connector builds its root store from the process environment
//! (`SSL_CERT_FILE`), which cannot differ between tests running in parallel in one process.

use std::borrow::Cow;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use sasl::common::ChannelBinding;
use tokio::io::BufStream;
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{self, ClientConfig, ProtocolVersion, RootCertStore};
use tokio_xmpp::Error;
use tokio_xmpp::connect::{ServerConnector, ServerConnectorError};
use tokio_xmpp::error::ProtocolError;
use tokio_xmpp::jid::Jid;
use tokio_xmpp::parsers::starttls;
use tokio_xmpp::xmlstream::{
    FallibleStreamElement, PendingFeaturesRecv, ReadError, StreamHeader, Timeouts,
    XmppStreamElement, initiate_stream,
};

use crate::nsenter::{NsHandle, run_in};

/// How long one TCP connection attempt may take.
pub const TCP_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Connects to `addr` whatever the JID's domain (which still names the TLS server).
#[derive(Clone)]
pub(crate) struct LabConnector {
    addr: SocketAddr,
    netns: Option<NsHandle>,
    tls: Arc<ClientConfig>,
    /// The last connection or TLS error, for the message when a login times out: tokio-xmpp
    /// only logs them and retries.
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

#[derive(Debug)]
struct TlsSetupError(String);

impl fmt::Display for TlsSetupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TlsSetupError {}
impl ServerConnectorError for TlsSetupError {}

fn setup_error(message: String) -> Error {
    Error::Connection(Box::new(TlsSetupError(message)))
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

    async fn connect_starttls(
        &self,
        jid: &Jid,
        ns: &'static str,
        timeouts: Timeouts,
    ) -> Result<
        (
            PendingFeaturesRecv<BufStream<TlsStream<TcpStream>>>,
            ChannelBinding,
        ),
        Error,
    > {
        let domain = jid.domain().as_str();
        let header = || StreamHeader {
            to: Some(Cow::Borrowed(domain)),
            from: None,
            id: None,
        };
        let tcp = self.tcp().await?;
        let plain = initiate_stream(BufStream::new(tcp), ns, header(), timeouts).await?;
        let (features, mut plain) = plain.recv_features().await?;
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
        let server_name = ServerName::try_from(domain.to_owned())
            .map_err(|e| setup_error(format!("{domain} is not a TLS server name: {e}")))?;
        let tls = TlsConnector::from(Arc::clone(&self.tls))
            .connect(server_name, tcp)
            .await?;
        let binding = match tls.get_ref().1.protocol_version() {
            Some(ProtocolVersion::TLSv1_3) => {
                let exported = tls
                    .get_ref()
                    .1
                    .export_keying_material(vec![0u8; 32], b"EXPORTER-Channel-Binding", None)
                    .map_err(|e| setup_error(format!("cannot export channel binding: {e}")))?;
                ChannelBinding::TlsExporter(exported)
            }
            _ => ChannelBinding::None,
        };
        let stream = initiate_stream(BufStream::new(tls), ns, header(), timeouts).await?;
        Ok((stream, binding))
    }
}

impl ServerConnector for LabConnector {
    type Stream = BufStream<TlsStream<TcpStream>>;

    async fn connect(
        &self,
        jid: &Jid,
        ns: &'static str,
        timeouts: Timeouts,
    ) -> Result<(PendingFeaturesRecv<Self::Stream>, ChannelBinding), Error> {
        let result = self.connect_starttls(jid, ns, timeouts).await;
        if let Err(e) = &result {
            let message = format!("connecting to {}: {e}", self.addr);
            *self
                .last_error
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(message);
        }
        result
    }
}
