//! A private coturn (STUN and TURN server) for one test: its own directory, config, log, user
//! database and ports, on loopback or inside a namespace, with time-limited credentials (the TURN
//! REST API: `use-auth-secret`).

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Once;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha1::Sha1;

use crate::ca::TestCa;
use crate::dir::TestDir;
use crate::netns::Netns;
use crate::next_id;
use crate::nsenter::{NsHandle, run_in};
use crate::process::{Daemon, log_tail};

/// How long [`CoturnBuilder::start`] waits for coturn to answer a STUN Binding request.
pub const COTURN_READY_TIMEOUT: Duration = Duration::from_secs(15);

/// The realm every test coturn uses unless told otherwise.
pub const COTURN_REALM: &str = "ipop.test";

/// Relay ports per coturn.
const RELAY_PORTS: u16 = 64;

/// Lines of coturn's log printed when a test fails.
const LOG_TAIL_LINES: usize = 60;

static SWEEP: Once = Once::new();

/// Options for a [`Coturn`]; [`CoturnBuilder::start`] starts it.
#[derive(Debug)]
pub struct CoturnBuilder {
    netns: Option<NsHandle>,
    ip: IpAddr,
    relay_ip: Option<IpAddr>,
    secret: String,
    realm: String,
    stale_nonce: Option<Duration>,
    extra: Vec<String>,
    parent: Option<PathBuf>,
    tls: Option<(TestCa, String)>,
    alt_ip: Option<IpAddr>,
}

impl CoturnBuilder {
    /// Runs coturn inside `ns`, listening on `ip`, which must already be an address of an
    /// interface there.
    #[must_use]
    pub fn in_netns(mut self, ns: &Netns, ip: IpAddr) -> CoturnBuilder {
        self.netns = Some(NsHandle::of(ns));
        self.ip = ip;
        self
    }

    /// The address relayed traffic leaves from (coturn's `relay-ip`); the listening address by
    /// default.
    #[must_use]
    pub fn relay_ip(mut self, ip: IpAddr) -> CoturnBuilder {
        self.relay_ip = Some(ip);
        self
    }

    /// Also listens on `ip` (a second address of the same interface) and answers RFC 5780's
    /// CHANGE-REQUEST from it and from the port after its own: what a NAT behaviour test (such
    /// as miniupnpd's) needs. Off by default. coturn then answers STUN on four endpoints, both
    /// addresses with [`Coturn::addr`]'s port and the next one ([`Coturn::stun_addrs`]); the
    /// port is chosen so that both are free on both addresses, and [`CoturnBuilder::start`]
    /// waits until all four answer.
    #[must_use]
    pub fn alt_ip(mut self, ip: IpAddr) -> CoturnBuilder {
        self.alt_ip = Some(ip);
        self
    }

    /// The shared secret of the TURN REST API (`static-auth-secret`).
    #[must_use]
    pub fn secret(mut self, secret: &str) -> CoturnBuilder {
        self.secret = secret.to_owned();
        self
    }

    #[must_use]
    pub fn realm(mut self, realm: &str) -> CoturnBuilder {
        self.realm = realm.to_owned();
        self
    }

    /// Nonces expire after this long (coturn's `stale-nonce`), so that clients see 438 Stale
    /// Nonce answers. Whole seconds, at least one.
    #[must_use]
    pub fn stale_nonce(mut self, lifetime: Duration) -> CoturnBuilder {
        self.stale_nonce = Some(lifetime.max(Duration::from_secs(1)));
        self
    }

    /// A line of coturn configuration (`option` or `option=value`) added to the file.
    #[must_use]
    pub fn config_line(mut self, line: &str) -> CoturnBuilder {
        self.extra.push(line.to_owned());
        self
    }

    /// Puts the scratch directory under `parent` (a test's [`TestDir`], say) instead of a
    /// temporary directory of its own.
    #[must_use]
    pub fn dir(mut self, parent: &Path) -> CoturnBuilder {
        self.parent = Some(parent.to_owned());
        self
    }

    /// Also serves STUN and TURN over TLS, on a port of its own ([`Coturn::tls_addr`]), with a
    /// certificate for the host name `host` signed by `ca` (coturn's `tls-listening-port`,
    /// `cert` and `pkey`).
    #[must_use]
    pub fn tls(mut self, ca: &TestCa, host: &str) -> CoturnBuilder {
        self.tls = Some((ca.clone(), host.to_owned()));
        self
    }

    /// Writes the config, starts coturn and waits until it answers STUN over UDP and accepts TCP
    /// connections, and with [`CoturnBuilder::tls`] until its log says the TLS listener is up
    /// and that accepts TCP connections too.
    ///
    /// # Panics
    /// When a file cannot be written, no port is free on the address, or coturn does not come
    /// up within [`COTURN_READY_TIMEOUT`]; the message carries its log.
    #[must_use]
    pub fn start(self) -> Coturn {
        SWEEP.call_once(sweep_stale_coturn);
        let (scratch, dir) = match &self.parent {
            Some(parent) => (None, parent.join(format!("coturn-{}", next_id()))),
            None => {
                let scratch = TestDir::new("coturn");
                let dir = scratch.path().to_owned();
                (Some(scratch), dir)
            }
        };
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        // With an alternate address, coturn also listens on the next port, on both addresses.
        let (ips, span) = match self.alt_ip {
            Some(alt) => (vec![self.ip, alt], 2),
            None => (vec![self.ip], 1),
        };
        let port = free_port(self.netns.as_ref(), &ips, span);
        let relay_ip = self.relay_ip.unwrap_or(self.ip);
        let relay_ports = relay_ports(self.netns.as_ref(), relay_ip);
        let tls_addr = self.tls.as_ref().map(|(ca, host)| {
            let tls_dir = dir.join("tls");
            std::fs::create_dir_all(&tls_dir)
                .unwrap_or_else(|e| panic!("cannot create {}: {e}", tls_dir.display()));
            ca.write_server_files(&tls_dir, &[host]);
            let tls_port = (0..50)
                .map(|_| free_port(self.netns.as_ref(), &[self.ip], 1))
                .find(|p| !(port..port + span).contains(p))
                .unwrap_or_else(|| panic!("no second free port on {} for TLS", self.ip));
            SocketAddr::new(self.ip, tls_port)
        });
        let coturn = Coturn {
            daemon: None,
            addr: SocketAddr::new(self.ip, port),
            alt_ip: self.alt_ip,
            tls_addr,
            relay_ip,
            relay_ports,
            config: dir.join("turnserver.conf"),
            log: dir.join("turnserver.log"),
            stdout: dir.join("turnserver.out"),
            secret: self.secret,
            realm: self.realm,
            netns: self.netns,
            dir,
            _scratch: scratch,
        };
        let config = coturn.config_text(self.stale_nonce, &self.extra);
        std::fs::write(&coturn.config, config)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", coturn.config.display()));
        coturn.launch()
    }
}

/// A running coturn: STUN and TURN over UDP and TCP on one port, and over TLS on another when
/// asked, relaying over UDP.
///
/// Dropping it stops the process (SIGTERM, then SIGKILL, by PID) and removes its directory;
/// when the thread is panicking, it prints the log's path and tail and keeps the directory.
#[derive(Debug)]
pub struct Coturn {
    /// Declared first: stopped before the directory goes.
    daemon: Option<Daemon>,
    netns: Option<NsHandle>,
    addr: SocketAddr,
    /// [`CoturnBuilder::alt_ip`].
    alt_ip: Option<IpAddr>,
    tls_addr: Option<SocketAddr>,
    relay_ip: IpAddr,
    relay_ports: RangeInclusive<u16>,
    secret: String,
    realm: String,
    dir: PathBuf,
    config: PathBuf,
    log: PathBuf,
    stdout: PathBuf,
    /// The temporary directory when the builder was given none; dropped last.
    _scratch: Option<TestDir>,
}

impl Coturn {
    /// Options for a coturn on 127.0.0.1 with secret `ipop-lab-secret` and realm
    /// [`COTURN_REALM`], unless told otherwise.
    #[must_use]
    pub fn builder() -> CoturnBuilder {
        CoturnBuilder {
            netns: None,
            ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            relay_ip: None,
            secret: "ipop-lab-secret".to_owned(),
            realm: COTURN_REALM.to_owned(),
            stale_nonce: None,
            extra: Vec::new(),
            parent: None,
            tls: None,
            alt_ip: None,
        }
    }

    /// A coturn on 127.0.0.1 with default options.
    ///
    /// # Panics
    /// See [`CoturnBuilder::start`].
    #[must_use]
    pub fn start_local() -> Coturn {
        Coturn::builder().start()
    }

    /// Where clients reach it, over UDP and TCP.
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every endpoint it answers STUN on over UDP: [`Coturn::addr`] and, with
    /// [`CoturnBuilder::alt_ip`], the alternate address with the same port and both addresses
    /// with the next port (RFC 5780's other endpoints).
    #[must_use]
    pub fn stun_addrs(&self) -> Vec<SocketAddr> {
        let mut addrs = vec![self.addr];
        if let Some(alt) = self.alt_ip {
            let next = self.addr.port() + 1;
            addrs.extend([
                SocketAddr::new(alt, self.addr.port()),
                SocketAddr::new(self.addr.ip(), next),
                SocketAddr::new(alt, next),
            ]);
        }
        addrs
    }

    /// Where clients reach it over TLS, when started with [`CoturnBuilder::tls`].
    #[must_use]
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls_addr
    }

    /// The address relayed transport addresses are on.
    #[must_use]
    pub fn relay_ip(&self) -> IpAddr {
        self.relay_ip
    }

    /// The UDP ports relayed transport addresses are taken from.
    #[must_use]
    pub fn relay_ports(&self) -> RangeInclusive<u16> {
        self.relay_ports.clone()
    }

    #[must_use]
    pub fn secret(&self) -> &str {
        &self.secret
    }

    #[must_use]
    pub fn realm(&self) -> &str {
        &self.realm
    }

    /// Time-limited credentials for `name`, valid for `valid_for` from now: `(username,
    /// password)`.
    #[must_use]
    pub fn credentials(&self, name: &str, valid_for: Duration) -> (String, String) {
        let expiry = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |now| now.as_secs())
            + valid_for.as_secs();
        rest_credentials(&self.secret, name, expiry)
    }

    /// The PID of the running coturn.
    #[must_use]
    pub fn pid(&self) -> Option<u32> {
        self.daemon.as_ref().map(Daemon::pid)
    }

    #[must_use]
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    #[must_use]
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// The directory holding the config, database and logs.
    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The last `n` lines of coturn's log.
    #[must_use]
    pub fn log_tail(&self, n: usize) -> String {
        log_tail(&self.log, n)
    }

    fn launch(mut self) -> Coturn {
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", ns.name(), "turnserver"]);
                cmd
            }
            None => Command::new("turnserver"),
        };
        cmd.arg("-c").arg(&self.config);
        self.daemon = Some(Daemon::spawn("coturn", cmd, &self.stdout));
        self.wait_ready();
        self
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + COTURN_READY_TIMEOUT;
        let (addr, tls_addr) = (self.addr, self.tls_addr);
        // The other RFC 5780 endpoints (with an alternate address) answer STUN over UDP too.
        let others = self.stun_addrs().split_off(1);
        loop {
            let probe = run_in(self.netns.as_ref(), || {
                probe(addr, tls_addr)?;
                others.iter().try_for_each(|other| stun_answers(*other))
            });
            let last = match probe {
                Ok(Ok(())) if self.tls_listening() => return,
                Ok(Ok(())) => std::io::Error::other("no TLS listener in the log yet"),
                Ok(Err(e)) | Err(e) => e,
            };
            if let Some(status) = self.daemon.as_mut().and_then(Daemon::try_wait) {
                panic!(
                    "coturn exited ({status}) before answering on {addr}; {}",
                    self.logs()
                );
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {COTURN_READY_TIMEOUT:?} waiting for coturn to answer on \
                 {addr}; last error: {last}; {}",
                self.logs()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether the log says the TLS listener is up, when there is one.
    fn tls_listening(&self) -> bool {
        let Some(tls_addr) = self.tls_addr else {
            return true;
        };
        let port = format!(":{}", tls_addr.port());
        std::fs::read_to_string(&self.log).is_ok_and(|log| {
            log.lines().any(|line| {
                line.contains("TLS/TCP listener opened on") && line.trim_end().ends_with(&port)
            })
        })
    }

    fn logs(&self) -> String {
        format!(
            "output {}:\n{}\nlog {}:\n{}",
            self.stdout.display(),
            log_tail(&self.stdout, 20),
            self.log.display(),
            log_tail(&self.log, LOG_TAIL_LINES)
        )
    }

    fn config_text(&self, stale_nonce: Option<Duration>, extra: &[String]) -> String {
        let alt_ip = self.alt_ip;
        let dir = &self.dir;
        let mut s = String::new();
        // Writing to a String cannot fail.
        let _ = writeln!(s, "# Written by ipop-lab for one test.");
        let _ = writeln!(s, "listening-ip={}", self.addr.ip());
        if let Some(ip) = alt_ip {
            let _ = writeln!(s, "listening-ip={ip}");
        }
        let _ = writeln!(s, "listening-port={}", self.addr.port());
        let _ = writeln!(s, "relay-ip={}", self.relay_ip);
        let _ = writeln!(s, "min-port={}", self.relay_ports.start());
        let _ = writeln!(s, "max-port={}", self.relay_ports.end());
        let _ = writeln!(s, "realm={}", self.realm);
        let _ = writeln!(s, "use-auth-secret");
        let _ = writeln!(s, "static-auth-secret={}", self.secret);
        let _ = writeln!(s, "allow-loopback-peers");
        let _ = writeln!(s, "no-multicast-peers");
        match self.tls_addr {
            Some(tls_addr) => {
                let tls_dir = dir.join("tls");
                let _ = writeln!(s, "tls-listening-port={}", tls_addr.port());
                let _ = writeln!(s, "cert={}", tls_dir.join("server.crt").display());
                let _ = writeln!(s, "pkey={}", tls_dir.join("server.key").display());
            }
            None => {
                let _ = writeln!(s, "no-tls");
            }
        }
        let _ = writeln!(s, "no-dtls");
        let _ = writeln!(s, "no-cli");
        if alt_ip.is_none() {
            let _ = writeln!(s, "no-rfc5780");
        }
        let _ = writeln!(s, "userdb={}", dir.join("turndb").display());
        let _ = writeln!(s, "pidfile={}", dir.join("turnserver.pid").display());
        let _ = writeln!(s, "log-file={}", self.log.display());
        let _ = writeln!(s, "simple-log");
        let _ = writeln!(s, "no-stdout-log");
        let _ = writeln!(s, "verbose");
        if let Some(lifetime) = stale_nonce {
            let _ = writeln!(s, "stale-nonce={}", lifetime.as_secs());
        }
        for line in extra {
            let _ = writeln!(s, "{line}");
        }
        s
    }
}

impl Drop for Coturn {
    fn drop(&mut self) {
        // Dropping the daemon stops it and, in a failing test, prints its output.
        drop(self.daemon.take());
        if thread::panicking() {
            eprintln!(
                "----- coturn on {}: config {}, log {}, last {LOG_TAIL_LINES} lines:\n{}\n----- end of coturn log",
                self.addr,
                self.config.display(),
                self.log.display(),
                log_tail(&self.log, LOG_TAIL_LINES)
            );
        }
    }
}

/// TURN REST API credentials (as coturn's `use-auth-secret` checks them): username
/// `<expiry>:<name>`, password base64(HMAC-SHA1(secret, username)). `expiry` is in Unix seconds;
/// a past one gives expired credentials.
#[must_use]
pub fn rest_credentials(secret: &str, name: &str, expiry: u64) -> (String, String) {
    let username = format!("{expiry}:{name}");
    let mut mac = <Hmac<Sha1> as Mac>::new_from_slice(secret.as_bytes())
        .unwrap_or_else(|e| panic!("HMAC takes keys of any length: {e}"));
    mac.update(username.as_bytes());
    let password = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    (username, password)
}

/// Kills (SIGKILL, by PID) the coturn processes that an earlier test process started and could
/// not stop because it died without running destructors: those whose config lies in
/// `$TMPDIR/ipl-<pid>-...` for a PID that no longer runs. [`CoturnBuilder::start`] calls it once
/// per process.
pub fn sweep_stale_coturn() {
    crate::process::sweep_stale_servers(
        "coturn",
        |args| {
            args.first()
                .is_some_and(|program| program.ends_with("turnserver"))
        },
        "-c",
    );
}

/// Sends a STUN Binding request to `addr` and waits briefly for the answer, then connects over
/// TCP, to `tls_addr` as well when given.
fn probe(addr: SocketAddr, tls_addr: Option<SocketAddr>) -> std::io::Result<()> {
    stun_answers(addr)?;
    for addr in std::iter::once(addr).chain(tls_addr) {
        TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
    }
    Ok(())
}

/// Sends a STUN Binding request to `addr` over UDP and waits briefly for the answer from there.
fn stun_answers(addr: SocketAddr) -> std::io::Result<()> {
    let unspecified: IpAddr = if addr.is_ipv4() {
        Ipv4Addr::UNSPECIFIED.into()
    } else {
        std::net::Ipv6Addr::UNSPECIFIED.into()
    };
    let socket = UdpSocket::bind((unspecified, 0))?;
    socket.set_read_timeout(Some(Duration::from_millis(200)))?;
    let request = binding_request();
    socket.send_to(&request, addr)?;
    let mut answer = [0u8; 512];
    loop {
        let (n, from) = socket.recv_from(&mut answer)?;
        if from == addr && n >= 20 && answer[..2] == [0x01, 0x01] && answer[8..20] == request[8..20]
        {
            return Ok(());
        }
    }
}

/// A STUN Binding request (no attributes) whose transaction ID is made of this process's ID.
fn binding_request() -> [u8; 20] {
    let mut request = [0u8; 20];
    request[1] = 0x01;
    request[4..8].copy_from_slice(&[0x21, 0x12, 0xA4, 0x42]);
    request[8..20].copy_from_slice(&std::process::id().to_be_bytes().repeat(3));
    request
}

/// A port `p` such that the `span` ports from `p` are free for both UDP and TCP on every address
/// of `ips` (inside `ns` when given) at the time of the call.
fn free_port(ns: Option<&NsHandle>, ips: &[IpAddr], span: u16) -> u16 {
    let found = run_in(ns, || {
        let first = *ips.first().expect("an address to find a port on");
        for _ in 0..50 {
            let port = UdpSocket::bind((first, 0))?.local_addr()?.port();
            let Some(last) = port.checked_add(span - 1) else {
                continue;
            };
            // Each socket is closed again at once: only whether it could be bound matters.
            let free = (port..=last).all(|p| {
                ips.iter().all(|ip| {
                    UdpSocket::bind((*ip, p)).is_ok() && TcpListener::bind((*ip, p)).is_ok()
                })
            });
            if free {
                return Ok(port);
            }
        }
        Err(std::io::Error::other("no port free for both UDP and TCP"))
    });
    match found {
        Ok(Ok(port)) => port,
        Ok(Err(e)) | Err(e) => panic!("cannot find a free port on {ips:?} for coturn: {e}"),
    }
}

/// [`RELAY_PORTS`] consecutive UDP ports on `ip` of which the first is free now (coturn skips
/// the ones taken later).
fn relay_ports(ns: Option<&NsHandle>, ip: IpAddr) -> RangeInclusive<u16> {
    let found = run_in(ns, move || {
        for _ in 0..50 {
            let port = UdpSocket::bind((ip, 0))?.local_addr()?.port();
            if let Some(end) = port.checked_add(RELAY_PORTS - 1) {
                return Ok(port..=end);
            }
        }
        Err(std::io::Error::other("no free UDP port range"))
    });
    match found {
        Ok(Ok(range)) => range,
        Ok(Err(e)) | Err(e) => panic!("cannot find relay ports on {ip} for coturn: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::sync::Arc;
    use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
    use tokio_rustls::rustls::{self, ClientConfig, ClientConnection, RootCertStore, StreamOwned};

    /// A TLS connection to `addr` that trusts only `ca` and checks the certificate against
    /// `host`; the handshake happens on first use.
    fn tls_client(
        ca: &TestCa,
        addr: SocketAddr,
        host: &'static str,
    ) -> StreamOwned<ClientConnection, TcpStream> {
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from(ca.der().to_vec()))
            .expect("the test CA is a trust anchor");
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = ServerName::try_from(host).expect("a host name");
        let connection = ClientConnection::new(Arc::new(config), name).expect("TLS client");
        let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
        tcp.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("read timeout");
        StreamOwned::new(connection, tcp)
    }

    #[test]
    fn rest_credentials_are_base64_hmac_sha1_of_the_username() {
        // Expected value from `printf %s 1433895918:ninefingers | openssl dgst -binary -sha1
        // -hmac logen | base64`.
        let (username, password) = rest_credentials("logen", "ninefingers", 1_433_895_918);
        assert_eq!(username, "1433895918:ninefingers");
        assert_eq!(password, "HY+Vd729N0UZ/xCzjg1F0GsoMK8=");
    }

    #[test]
    fn starts_answers_and_stops_by_pid() {
        let coturn = Coturn::start_local();
        let pid = coturn.pid().expect("running");
        probe(coturn.addr(), None).expect("answers STUN and TCP");
        let dir = coturn.dir().to_owned();
        let config = std::fs::read_to_string(coturn.config_path()).expect("config");
        assert!(config.contains("use-auth-secret") && config.contains("allow-loopback-peers"));
        drop(coturn);
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "stopped");
        assert!(!dir.exists(), "directory removed");
    }

    #[test]
    fn answers_stun_over_tls_with_a_certificate_for_its_host_name() {
        let ca = TestCa::new("ipop-lab coturn test CA");
        let coturn = Coturn::builder().tls(&ca, "turn.example.org").start();
        let tls_addr = coturn.tls_addr().expect("a TLS address");
        assert_ne!(tls_addr.port(), coturn.addr().port());
        assert!(
            Coturn::start_local().tls_addr().is_none(),
            "no TLS unless asked"
        );

        let mut tls = tls_client(&ca, tls_addr, "turn.example.org");
        let request = binding_request();
        tls.write_all(&request).expect("a Binding request over TLS");
        let mut answer = [0u8; 20];
        tls.read_exact(&mut answer).expect("an answer over TLS");
        assert_eq!(answer[..2], [0x01, 0x01], "a Binding success: {answer:?}");
        assert_eq!(answer[8..20], request[8..20], "for our transaction");

        let mut wrong = tls_client(&ca, tls_addr, "other.example.org");
        let refused = wrong.write_all(&request).and_then(|()| wrong.flush());
        let e = refused.expect_err("the certificate is for turn.example.org only");
        assert!(e.to_string().contains("not valid for name"), "{e}");
    }
}
