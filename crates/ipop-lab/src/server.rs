//! What a test needs of an XMPP server, whichever it runs: [`Prosody`] or [`Ejabberd`]. Tests
//! that must hold on both take a [`ServerKind`] and work through [`XmppServer`].

use std::fmt;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use crate::ejabberd::Ejabberd;
use crate::netns::Netns;
use crate::nsenter::{NsHandle, run_in};
use crate::process::Daemon;
use crate::prosody::Prosody;

/// A private XMPP server of a test: a virtual host `DOMAIN` with a MUC service
/// `conference.DOMAIN`, STARTTLS on its c2s port with a certificate from a test CA, stream
/// management with resumption, accounts made by [`XmppServer::register`].
///
/// [`XmppServer::stop`] and [`XmppServer::start`] keep the port, the accounts and the rosters;
/// dropping the server stops every process it started and removes its files.
pub trait XmppServer: fmt::Debug + Send {
    /// Which server this is.
    fn kind(&self) -> ServerKind;

    fn domain(&self) -> &str;

    /// `conference.DOMAIN`, the MUC service.
    fn conference_domain(&self) -> String {
        format!("conference.{}", self.domain())
    }

    /// `user@DOMAIN`.
    fn jid(&self, user: &str) -> String {
        format!("{user}@{}", self.domain())
    }

    /// Where clients connect (STARTTLS); the same across restarts.
    fn c2s_addr(&self) -> SocketAddr;

    /// The test CA (PEM) that signed the server certificate.
    fn ca_cert_path(&self) -> &Path;

    /// The test CA certificate, DER-encoded.
    fn ca_cert_der(&self) -> &[u8];

    /// The server's own log.
    fn log_path(&self) -> &Path;

    /// Creates the account `user@DOMAIN`.
    ///
    /// # Panics
    /// When the server's tool refuses (ejabberd's needs the server running).
    fn register(&self, user: &str, password: &str);

    /// The PID of the running server process.
    fn pid(&self) -> Option<u32>;

    fn is_running(&mut self) -> bool;

    /// Starts the server again after a stop or a kill, on the same port and data, and returns
    /// once its c2s port accepts connections.
    ///
    /// # Panics
    /// When it is already running or does not come up in time.
    fn start(&mut self);

    /// Stops the server the way its operator would (SIGTERM): it closes its streams and ends.
    fn stop(&mut self);

    /// Kills the server process at once (SIGKILL), as a crash would: no stream is closed and
    /// no state is saved.
    fn kill(&mut self);
}

/// The XMPP servers the lab runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerKind {
    /// Prosody 0.12 (Debian's `prosody`).
    Prosody,
    /// ejabberd 23.01 (Debian's `ejabberd`).
    Ejabberd,
}

impl ServerKind {
    /// Starts this server inside `ns`, listening on `ip` (an address already configured
    /// there), for `domain`, with its default options.
    ///
    /// # Panics
    /// When `ip` is not an IP address or the server does not come up.
    #[must_use]
    pub fn start_in(self, ns: &Netns, ip: &str, domain: &str) -> Box<dyn XmppServer> {
        match self {
            ServerKind::Prosody => Box::new(Prosody::start_in(ns, ip, domain)),
            ServerKind::Ejabberd => Box::new(Ejabberd::start_in(ns, ip, domain)),
        }
    }
}

impl fmt::Display for ServerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ServerKind::Prosody => "Prosody",
            ServerKind::Ejabberd => "ejabberd",
        })
    }
}

/// Polls `addr` (from inside `ns` when given) until it accepts a TCP connection.
///
/// # Panics
/// When `daemon` exits first or `timeout` passes; the message names `what` and carries
/// `logs()`.
pub(crate) fn wait_accepting(
    what: &str,
    ns: Option<&NsHandle>,
    addr: SocketAddr,
    timeout: Duration,
    daemon: &mut Option<Daemon>,
    logs: impl Fn() -> String,
) {
    let deadline = Instant::now() + timeout;
    loop {
        let probe = run_in(ns, move || {
            TcpStream::connect_timeout(&addr, Duration::from_millis(500))
        });
        let last = match probe {
            Ok(Ok(_)) => return,
            Ok(Err(e)) | Err(e) => e,
        };
        if let Some(status) = daemon.as_mut().and_then(Daemon::try_wait) {
            panic!(
                "{what} exited ({status}) before accepting connections on {addr}; {}",
                logs()
            );
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what} to accept connections on {addr}{}; \
             last error: {last}; {}",
            ns.map(|ns| format!(" in namespace {}", ns.name()))
                .unwrap_or_default(),
            logs()
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// A TCP port that is free on `ip` (inside `ns` when given) at the time of the call.
pub(crate) fn free_port(ns: Option<&NsHandle>, ip: IpAddr) -> u16 {
    let where_ = ns
        .map(|ns| format!(" in namespace {}", ns.name()))
        .unwrap_or_default();
    let bound = run_in(ns, move || {
        TcpListener::bind((ip, 0)).and_then(|listener| listener.local_addr())
    });
    match bound {
        Ok(Ok(addr)) => addr.port(),
        Ok(Err(e)) | Err(e) => {
            panic!("cannot find a free TCP port on {ip}{where_} (is the address configured?): {e}")
        }
    }
}
