//! Opening an authenticated XMPP stream: TCP, TLS (STARTTLS or direct) with our own rustls
//! configuration, SASL SCRAM, or SASL EXTERNAL with a client certificate. Every failure is
//! classified into a [`LoginError`] that names its cause; tokio-xmpp's own connectors retry
//! forever and only log why.
//!
//! The stream this returns is handed to tokio-xmpp's `StanzaStream`, which binds the resource,
//! negotiates stream management and calls us again (through [`Login::open`]) to reconnect.

use crate::guard::{Guard, Limits, Sink};
use crate::traffic::{ByteCounts, Counted};
use crate::{ClientCertificate, LoginError, XmppConfig};
use futures::{SinkExt, StreamExt};
use sasl::common::{ChannelBinding, Credentials};
use std::borrow::Cow;
use std::collections::BTreeSet;
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, BufStream};
use tokio::time::{Instant, timeout_at};
use tokio_rustls::TlsConnector;
use tokio_xmpp::connect::DnsConfig;
use tokio_xmpp::error::AuthError;
use tokio_xmpp::jid::{BareJid, FullJid, Jid};
use tokio_xmpp::minidom::Element;
use tokio_xmpp::minidom::rxml::xml_ncname;
use tokio_xmpp::parsers::ns;
use tokio_xmpp::parsers::sasl::DefinedCondition as SaslCondition;
use tokio_xmpp::parsers::sasl_cb::Type as ChannelBindingType;
use tokio_xmpp::parsers::starttls;
use tokio_xmpp::parsers::stream_features::StreamFeatures;
use tokio_xmpp::rustls::pki_types::pem::PemObject;
use tokio_xmpp::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_xmpp::rustls::{self, CertificateError, ClientConfig, RootCertStore};
use tokio_xmpp::stanzastream::Connection;
use tokio_xmpp::xmlstream::{
    FallibleStreamElement, InitiatingStream, PendingFeaturesRecv, ReadError, RecvFeaturesError,
    StreamHeader, Timeouts, XmlStream, XmppStream, XmppStreamElement, initiate_stream,
};

/// Silence on the stream before we ping the server, and how long the ping may take: a dead
/// connection is noticed within about a minute and a half.
const STREAM_TIMEOUTS: Timeouts = Timeouts {
    read_timeout: Duration::from_secs(60),
    response_timeout: Duration::from_secs(30),
};

/// Everything needed to open a stream for one account and device, again and again.
pub struct Login {
    jid: FullJid,
    password: String,
    dns: DnsConfig,
    /// How the server is reached, for messages: `example.org (SRV)` or `host:port`.
    pub server: String,
    direct_tls: bool,
    /// Log in with the TLS client certificate (SASL EXTERNAL), not the password.
    external: bool,
    tls: Arc<ClientConfig>,
    /// Where the guard on every stream reports what it dropped.
    guard: Sink,
    /// Where every connection counts its bytes.
    bytes: Arc<ByteCounts>,
    /// The local address of the last connection opened, and a handle on its socket: when the
    /// address leaves the host (a new network), the connection is dead and is shut down at once
    /// rather than after the stream's read timeout.
    socket: Mutex<Option<(IpAddr, OwnedFd)>>,
    /// The server's address on the last connection opened.
    server_ip: Mutex<Option<IpAddr>>,
}

impl Login {
    pub fn new(cfg: &XmppConfig, guard: Sink, bytes: Arc<ByteCounts>) -> Result<Self, LoginError> {
        let bare = BareJid::new(&cfg.jid).map_err(|e| LoginError::Config {
            what: format!("jid {:?}", cfg.jid),
            why: e.to_string(),
        })?;
        if bare.node().is_none() {
            return Err(LoginError::Config {
                what: format!("jid {:?}", cfg.jid),
                why: "an account JID looks like user@example.org".to_owned(),
            });
        }
        let jid = bare
            .with_resource_str(&cfg.device)
            .map_err(|e| LoginError::Config {
                what: format!("device {:?}", cfg.device),
                why: format!("not usable as an XMPP resource: {e}"),
            })?;
        let domain = bare.domain().as_str().to_owned();
        let (dns, server) = match &cfg.server {
            Some((host, port)) => (DnsConfig::no_srv(host, *port), format!("{host}:{port}")),
            None if cfg.direct_tls => (DnsConfig::srv_xmpps(&domain), format!("{domain} (SRV)")),
            None => (
                DnsConfig::srv_default_client(&domain),
                format!("{domain} (SRV)"),
            ),
        };
        Ok(Login {
            jid,
            password: cfg.password.clone(),
            dns,
            server,
            direct_tls: cfg.direct_tls,
            external: cfg.client_cert.is_some(),
            tls: Arc::new(login_tls_config(
                cfg.extra_ca.as_deref(),
                cfg.client_cert.as_ref(),
            )?),
            guard,
            bytes,
            socket: Mutex::new(None),
            server_ip: Mutex::new(None),
        })
    }

    /// When the address the current connection was opened from is no longer the host's, shuts
    /// the connection down (the stream then reconnects, resuming the session when it can) and
    /// returns the address.
    pub(crate) fn drop_if_address_gone(&self) -> Option<IpAddr> {
        let mut socket = self.socket.lock().unwrap_or_else(PoisonError::into_inner);
        let ip = socket.as_ref().map(|(ip, _)| *ip)?;
        // Binding to an address the host does not have fails with EADDRNOTAVAIL.
        match std::net::UdpSocket::bind((ip, 0)) {
            Err(e) if e.kind() == std::io::ErrorKind::AddrNotAvailable => {}
            _ => return None,
        }
        if let Some((_, fd)) = socket.take() {
            // The stream sees the end of the connection; a socket already closed is fine.
            let _ = rustix::net::shutdown(&fd, rustix::net::Shutdown::Both);
        }
        Some(ip)
    }

    /// The server's address on the last connection opened.
    pub fn server_ip(&self) -> Option<IpAddr> {
        *self
            .server_ip
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    pub fn jid(&self) -> &FullJid {
        &self.jid
    }

    fn domain(&self) -> &str {
        self.jid.domain().as_str()
    }

    /// Opens an authenticated stream by `deadline`, ready for resource binding.
    pub async fn open(&self, deadline: Instant) -> Result<Connection, LoginError> {
        let step = |what: String| LoginError::Timeout {
            waiting_for: what,
            after: None,
        };
        let tcp = timeout_at(deadline, self.dns.resolve())
            .await
            .map_err(|_| step(format!("a TCP connection to {}", self.server)))?
            .map_err(|e| LoginError::Unreachable {
                server: self.server.clone(),
                reason: match e {
                    tokio_xmpp::Error::Disconnected => {
                        "no address of the server accepted a connection".to_owned()
                    }
                    other => other.to_string(),
                },
            })?;
        if let Ok(peer) = tcp.peer_addr() {
            *self
                .server_ip
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(peer.ip());
        }
        if let (Ok(local), Ok(fd)) = (tcp.local_addr(), tcp.as_fd().try_clone_to_owned()) {
            *self.socket.lock().unwrap_or_else(PoisonError::into_inner) = Some((local.ip(), fd));
        }
        let tcp = Counted::new(tcp, self.bytes.clone());
        let opened = async {
            // From TLS on, everything the server sends passes the guard: authentication is
            // where stanzas from others start to arrive.
            let (tls, binding) = if self.direct_tls {
                self.tls(tcp).await?
            } else {
                let plain = self.starttls(BufStream::new(tcp)).await?;
                self.tls(plain.into_inner()).await?
            };
            let guarded = Guard::new(tls, Limits::DEFAULT, self.guard.clone());
            self.authenticate(BufStream::new(guarded), binding).await
        };
        timeout_at(deadline, opened)
            .await
            .map_err(|_| step(format!("TLS and authentication with {}", self.server)))?
    }

    fn header(&self) -> StreamHeader<'_> {
        StreamHeader {
            to: Some(Cow::Borrowed(self.domain())),
            from: None,
            id: None,
        }
    }

    fn stream_error(&self, e: impl std::fmt::Display) -> LoginError {
        LoginError::Stream {
            server: self.server.clone(),
            reason: e.to_string(),
        }
    }

    /// Negotiates STARTTLS on a plain stream and returns the TCP connection, ready for TLS.
    async fn starttls<S>(&self, io: BufStream<S>) -> Result<BufStream<S>, LoginError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let pending = initiate_stream(io, ns::JABBER_CLIENT, self.header(), STREAM_TIMEOUTS)
            .await
            .map_err(|e| self.stream_error(e))?;
        let (features, mut stream) = pending
            .recv_features::<FallibleStreamElement>()
            .await
            .map_err(|e| self.stream_error(tokio_xmpp::Error::from(e)))?;
        if !features.can_starttls() {
            return Err(LoginError::NoTls {
                server: self.server.clone(),
            });
        }
        stream
            .send(&XmppStreamElement::Starttls(starttls::Nonza::Request(
                starttls::Request,
            )))
            .await
            .map_err(|e| self.stream_error(e))?;
        loop {
            match stream
                .next()
                .await
                .map(|r| r.and_then(|e| e.into_read_error()))
            {
                Some(Ok(XmppStreamElement::Starttls(starttls::Nonza::Proceed(_)))) => break,
                Some(Ok(XmppStreamElement::Starttls(_))) => {
                    return Err(LoginError::Tls {
                        server: self.server.clone(),
                        reason: "the server refused STARTTLS".to_owned(),
                    });
                }
                Some(Ok(_)) | Some(Err(ReadError::SoftTimeout)) => {}
                Some(Err(ReadError::HardError(e))) => return Err(self.stream_error(e)),
                Some(Err(ReadError::ParseError(e))) => return Err(self.stream_error(e)),
                None | Some(Err(ReadError::StreamFooterReceived)) => {
                    return Err(self.stream_error("the server closed the stream"));
                }
            }
        }
        Ok(stream.into_inner())
    }

    async fn tls<S>(
        &self,
        io: S,
    ) -> Result<(tokio_rustls::client::TlsStream<S>, ChannelBinding), LoginError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let name =
            ServerName::try_from(self.domain().to_owned()).map_err(|e| LoginError::Config {
                what: format!("domain {:?}", self.domain()),
                why: e.to_string(),
            })?;
        let tls = TlsConnector::from(self.tls.clone())
            .connect(name, io)
            .await
            .map_err(|e| self.tls_error(e))?;
        let (_, connection) = tls.get_ref();
        // RFC 9266 channel binding, available with TLS 1.3 only.
        let binding = match connection.protocol_version() {
            Some(rustls::ProtocolVersion::TLSv1_3) => connection
                .export_keying_material(vec![0u8; 32], b"EXPORTER-Channel-Binding", None)
                .map(ChannelBinding::TlsExporter)
                .unwrap_or(ChannelBinding::None),
            _ => ChannelBinding::None,
        };
        Ok((tls, binding))
    }

    fn tls_error(&self, e: io::Error) -> LoginError {
        let server = self.server.clone();
        match e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            Some(rustls::Error::InvalidCertificate(cert)) => LoginError::Certificate {
                server,
                reason: describe_certificate_error(cert, self.domain()),
            },
            Some(other) => LoginError::Tls {
                server,
                reason: other.to_string(),
            },
            None => LoginError::Tls {
                server,
                reason: e.to_string(),
            },
        }
    }

    /// SASL over the TLS stream, then the stream restart; returns the stream ready for binding.
    async fn authenticate<S>(
        &self,
        io: BufStream<S>,
        binding: ChannelBinding,
    ) -> Result<Connection, LoginError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let mut header = self.header();
        if self.direct_tls {
            // As tokio-xmpp does: some servers only offer SASL2 when they know who is coming.
            header.from = Some(Cow::Owned(self.jid.to_bare().to_string()));
        }
        let pending = initiate_stream(io, ns::JABBER_CLIENT, header, STREAM_TIMEOUTS)
            .await
            .map_err(|e| self.stream_error(e))?;
        if self.external {
            return self.external(pending).await;
        }
        let (features, stream): (StreamFeatures, XmppStream<BufStream<S>>) = pending
            .recv_features()
            .await
            .map_err(|e| self.stream_error(tokio_xmpp::Error::from(e)))?;
        let (mechanisms, binding) =
            choose_scram(&features, binding).ok_or_else(|| LoginError::NoScram {
                server: self.server.clone(),
                offered: features.sasl_mechanisms.iter().cloned().collect(),
            })?;
        let username = self.jid.node().map(|n| n.as_str()).unwrap_or_default();
        let credentials = Credentials::default()
            .with_username(username)
            .with_password(self.password.clone())
            .with_channel_binding(binding);
        let stream = tokio_xmpp::client_login(stream, mechanisms, credentials)
            .await
            .map_err(|e| self.auth_error(e))?;
        self.restart(stream).await
    }

    /// The stream restart after authentication; returns the stream ready for binding.
    async fn restart<S>(
        &self,
        stream: InitiatingStream<BufStream<S>>,
    ) -> Result<Connection, LoginError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let pending = stream
            .send_header(self.header())
            .await
            .map_err(|e| self.stream_error(e))?;
        let (features, stream) = pending
            .recv_features::<FallibleStreamElement>()
            .await
            .map_err(|e| self.stream_error(tokio_xmpp::Error::from(e)))?;
        Ok(Connection {
            stream: stream.box_stream(),
            features,
            identity: Jid::from(self.jid.clone()),
        })
    }

    /// SASL EXTERNAL (RFC 6120 §6.3.10, XEP-0178): the server takes the account from the client
    /// certificate it checked during TLS. No authorization identity is sent (`=`): the
    /// certificate names one account.
    async fn external<S>(
        &self,
        pending: PendingFeaturesRecv<BufStream<S>>,
    ) -> Result<Connection, LoginError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (features, mut stream): (StreamFeatures, XmlStream<BufStream<S>, Element>) =
            pending.recv_features().await.map_err(|e| match e {
                RecvFeaturesError::Io(e) => self.refused_or(&e),
                other => self.stream_error(tokio_xmpp::Error::from(other)),
            })?;
        if !features.sasl_mechanisms.contains("EXTERNAL") {
            return Err(LoginError::NoExternal {
                server: self.server.clone(),
                offered: features.sasl_mechanisms.iter().cloned().collect(),
            });
        }
        let auth = Element::builder("auth", ns::SASL)
            .attr(xml_ncname!("mechanism").into(), "EXTERNAL")
            .append("=")
            .build();
        stream.send(&auth).await.map_err(|e| self.refused_or(&e))?;
        loop {
            match stream.next().await {
                Some(Ok(answer)) if answer.is("success", ns::SASL) => {
                    return self.restart(stream.initiate_reset()).await;
                }
                Some(Ok(answer)) if answer.is("failure", ns::SASL) => {
                    let condition = answer
                        .children()
                        .find(|c| c.name() != "text")
                        .map_or("failure", |c| c.name());
                    return Err(LoginError::CertificateRefused {
                        server: self.server.clone(),
                        jid: self.jid.to_bare().to_string(),
                        reason: condition.to_owned(),
                    });
                }
                Some(Ok(_)) | Some(Err(ReadError::SoftTimeout)) => {}
                Some(Err(ReadError::HardError(e))) => return Err(self.refused_or(&e)),
                Some(Err(ReadError::ParseError(e))) => return Err(self.stream_error(e)),
                None | Some(Err(ReadError::StreamFooterReceived)) => {
                    return Err(self.stream_error("the server closed the stream"));
                }
            }
        }
    }

    /// A stream error while logging in with a certificate: a TLS alert from the server means
    /// it refused the certificate (with TLS 1.3 the refusal arrives after the handshake).
    fn refused_or(&self, e: &io::Error) -> LoginError {
        match e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            Some(alert @ rustls::Error::AlertReceived(_)) => LoginError::CertificateRefused {
                server: self.server.clone(),
                jid: self.jid.to_bare().to_string(),
                reason: alert.to_string(),
            },
            _ => self.stream_error(e),
        }
    }

    fn auth_error(&self, e: tokio_xmpp::Error) -> LoginError {
        let jid = self.jid.to_bare().to_string();
        match e {
            tokio_xmpp::Error::Auth(AuthError::Fail(SaslCondition::AccountDisabled)) => {
                LoginError::AccountDisabled { jid }
            }
            tokio_xmpp::Error::Auth(AuthError::Fail(condition)) => LoginError::AuthFailed {
                jid,
                condition: tokio_xmpp::minidom::Element::from(condition)
                    .name()
                    .to_owned(),
            },
            other => self.stream_error(other),
        }
    }
}

/// Which SCRAM mechanisms to offer to tokio-xmpp's SASL loop, and with which channel binding.
/// `-PLUS` (RFC 9266 `tls-exporter`) when the server advertises it (XEP-0440), plain SCRAM
/// without channel binding otherwise. Never PLAIN or ANONYMOUS.
fn choose_scram(
    features: &StreamFeatures,
    binding: ChannelBinding,
) -> Option<(BTreeSet<String>, ChannelBinding)> {
    let offered = &features.sasl_mechanisms;
    let pick = |names: &[&str]| -> BTreeSet<String> {
        names
            .iter()
            .filter(|n| offered.contains(**n))
            .map(|n| (*n).to_owned())
            .collect()
    };
    let exporter_advertised = features
        .sasl_cb
        .as_ref()
        .is_some_and(|cb| cb.types.contains(&ChannelBindingType::TlsExporter));
    if matches!(binding, ChannelBinding::TlsExporter(_)) && exporter_advertised {
        let plus = pick(&["SCRAM-SHA-256-PLUS", "SCRAM-SHA-1-PLUS"]);
        if !plus.is_empty() {
            return Some((plus, binding));
        }
    }
    let plain = pick(&["SCRAM-SHA-256", "SCRAM-SHA-1"]);
    (!plain.is_empty()).then_some((plain, ChannelBinding::None))
}

/// Why a certificate was refused, in words for the user; `domain` is the name it was checked
/// against.
pub fn describe_certificate_error(e: &CertificateError, domain: &str) -> String {
    match e {
        CertificateError::UnknownIssuer => "it is signed by an unknown authority (for a private \
             server, give its CA certificate with [xmpp] ca_file)"
            .to_owned(),
        CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
            format!("it is not valid for {domain}: {e}")
        }
        CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
            format!("it has expired: {e}")
        }
        CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
            format!("it is not valid yet (is the clock right?): {e}")
        }
        other => other.to_string(),
    }
}

/// The trust anchors: the system's roots and, for a private server, an extra CA file. The
/// daemon checks its TURN servers over TLS with the same configuration.
pub fn tls_config(extra_ca: Option<&std::path::Path>) -> Result<ClientConfig, LoginError> {
    Ok(tls_builder(extra_ca)?.with_no_client_auth())
}

/// [`tls_config`], presenting `client` (certificate chain and key) when there is one.
fn login_tls_config(
    extra_ca: Option<&std::path::Path>,
    client: Option<&ClientCertificate>,
) -> Result<ClientConfig, LoginError> {
    let builder = tls_builder(extra_ca)?;
    let Some(client) = client else {
        return Ok(builder.with_no_client_auth());
    };
    let config_error = |what: &str, path: &std::path::Path, why: String| LoginError::Config {
        what: format!("{what} {}", path.display()),
        why,
    };
    let chain = CertificateDer::pem_file_iter(&client.cert)
        .map_err(|e| config_error("client_cert", &client.cert, e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| config_error("client_cert", &client.cert, e.to_string()))?;
    if chain.is_empty() {
        return Err(config_error(
            "client_cert",
            &client.cert,
            "no PEM certificate in the file".to_owned(),
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&client.key)
        .map_err(|e| config_error("client_key", &client.key, e.to_string()))?;
    builder.with_client_auth_cert(chain, key).map_err(|e| {
        config_error(
            "client_key",
            &client.key,
            format!("does not fit the certificate: {e}"),
        )
    })
}

/// The roots (the system's and `extra_ca`) and protocol versions every TLS connection uses.
fn tls_builder(
    extra_ca: Option<&std::path::Path>,
) -> Result<rustls::ConfigBuilder<ClientConfig, rustls::client::WantsClientCert>, LoginError> {
    let mut roots = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for error in &native.errors {
        tracing::debug!("skipping part of the system certificate store: {error}");
    }
    roots.add_parsable_certificates(native.certs);
    if let Some(path) = extra_ca {
        let config_error = |why: String| LoginError::Config {
            what: format!("extra_ca {}", path.display()),
            why,
        };
        let mut added = 0;
        for cert in CertificateDer::pem_file_iter(path).map_err(|e| config_error(e.to_string()))? {
            let cert = cert.map_err(|e| config_error(e.to_string()))?;
            roots
                .add(cert)
                .map_err(|e| config_error(format!("not a usable CA certificate: {e}")))?;
            added += 1;
        }
        if added == 0 {
            return Err(config_error("no PEM certificate in the file".to_owned()));
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    Ok(ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| LoginError::Tls {
            server: String::new(),
            reason: e.to_string(),
        })?
        .with_root_certificates(roots))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_xmpp::parsers::sasl_cb::SaslChannelBinding;

    fn features(mechanisms: &[&str], exporter: bool) -> StreamFeatures {
        StreamFeatures {
            sasl_mechanisms: mechanisms.iter().map(|m| (*m).to_owned()).collect(),
            sasl_cb: exporter.then(|| SaslChannelBinding {
                types: vec![ChannelBindingType::TlsExporter],
            }),
            ..StreamFeatures::default()
        }
    }

    #[test]
    fn scram_only_with_channel_binding_when_advertised() {
        let exporter = || ChannelBinding::TlsExporter(vec![1; 32]);
        let names = |r: Option<(BTreeSet<String>, ChannelBinding)>| {
            r.map(|(m, b)| {
                (
                    m.into_iter().collect::<Vec<_>>(),
                    matches!(b, ChannelBinding::None),
                )
            })
        };
        assert_eq!(
            names(choose_scram(
                &features(&["PLAIN", "SCRAM-SHA-1"], false),
                exporter()
            )),
            Some((vec!["SCRAM-SHA-1".to_owned()], true))
        );
        assert_eq!(
            names(choose_scram(
                &features(&["SCRAM-SHA-1", "SCRAM-SHA-1-PLUS"], true),
                exporter()
            )),
            Some((vec!["SCRAM-SHA-1-PLUS".to_owned()], false))
        );
        assert_eq!(
            names(choose_scram(
                &features(&["SCRAM-SHA-1", "SCRAM-SHA-1-PLUS"], false),
                exporter()
            )),
            Some((vec!["SCRAM-SHA-1".to_owned()], true))
        );
        assert_eq!(
            names(choose_scram(
                &features(&["PLAIN", "ANONYMOUS"], true),
                exporter()
            )),
            None
        );
    }
}
