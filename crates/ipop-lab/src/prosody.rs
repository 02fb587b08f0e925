//! A private Prosody for one test: its own directory, config, data, CA and server certificate,
//! listening on loopback or inside a namespace on a port chosen per run.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Once;
use std::thread;
use std::time::Duration;

use crate::ca::TestCa;
use crate::dir::TestDir;
use crate::netns::Netns;
use crate::nsenter::NsHandle;
use crate::process::{Daemon, STOP_TIMEOUT, log_tail};
use crate::server::{ServerKind, XmppServer, free_port, wait_accepting};
use crate::{next_id, run_checked, sanitize_tag};

/// How long [`Prosody::start`] waits for the c2s port to accept connections.
pub const PROSODY_READY_TIMEOUT: Duration = Duration::from_secs(20);

/// Lines of Prosody's own log printed when a test fails.
const LOG_TAIL_LINES: usize = 60;

/// The Prosody config that `docs/servers.md` gives, with `@DOMAIN@`, `@TURN_HOST@` and
/// `@TURN_SECRET@` to fill in. Every Prosody of the tests runs it.
const DOCUMENTED_CONFIG: &str = include_str!("../../../docs/examples/prosody.cfg.lua");

/// The client rate limit of the documented config, and of Debian's stock config, which
/// [`ProsodyBuilder::stock_limits`] puts in its place.
const DOCUMENTED_C2S_RATE: &str = "rate = \"10mb/s\"";
const STOCK_C2S_RATE: &str = "rate = \"10kb/s\"";

/// The line before the documented config in the config the lab writes.
const DOCUMENTED_HEADER: &str = "-- ipop-lab: docs/examples/prosody.cfg.lua for this domain.";

/// The line before the lab's settings for the virtual host: stream management, and the test's
/// own STUN/TURN servers, which replace the documented ones.
const HOST_HEADER: &str = "-- ipop-lab: settings for this test's virtual host.";

static SWEEP: Once = Once::new();

/// A STUN or TURN server announced to clients through XEP-0215 (Prosody's
/// `external_services`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExternalService {
    /// `stun` or `turn`.
    pub kind: String,
    /// `udp` or `tcp`.
    pub transport: String,
    pub host: String,
    pub port: u16,
    /// Shared secret for time-limited TURN credentials (coturn's `static-auth-secret`).
    pub secret: Option<String>,
    /// Lifetime of those credentials, in seconds.
    pub ttl: Option<u32>,
}

/// Options for a [`Prosody`]; [`ProsodyBuilder::start`] starts it.
#[derive(Debug)]
pub struct ProsodyBuilder {
    domain: String,
    netns: Option<NsHandle>,
    ip: IpAddr,
    room_locking: bool,
    stock_limits: bool,
    external_services: Option<Vec<ExternalService>>,
    parent: Option<PathBuf>,
    ca: Option<TestCa>,
    resumption_window: Option<Duration>,
    federation: bool,
}

impl ProsodyBuilder {
    /// Runs Prosody inside `ns`, listening on `ip`, which must already be an address of an
    /// interface there.
    #[must_use]
    pub fn in_netns(mut self, ns: &Netns, ip: IpAddr) -> ProsodyBuilder {
        self.netns = Some(NsHandle::of(ns));
        self.ip = ip;
        self
    }

    /// Whether new MUC rooms stay locked until their owner submits the configuration form
    /// (XEP-0045 §10.1.2). On by default, as in Prosody: ipop must configure the rooms it
    /// creates. Off makes every new room an instant room.
    #[must_use]
    pub fn room_locking(mut self, locked: bool) -> ProsodyBuilder {
        self.room_locking = locked;
        self
    }

    /// Limits each client to what Debian's stock Prosody config allows (`c2s` rate
    /// `10kb/s`) instead of the documented config's `10mb/s`. Off by default.
    #[must_use]
    pub fn stock_limits(mut self, stock: bool) -> ProsodyBuilder {
        self.stock_limits = stock;
        self
    }

    /// STUN/TURN servers that Prosody announces (XEP-0215). None by default.
    #[must_use]
    pub fn external_services(mut self, services: Vec<ExternalService>) -> ProsodyBuilder {
        self.external_services = Some(services);
        self
    }

    /// How long Prosody keeps the session of a client whose connection dropped, for it to
    /// resume the stream (`smacks_hibernation_time`, whole seconds); Prosody's 600 s by default.
    #[must_use]
    pub fn resumption_window(mut self, window: Duration) -> ProsodyBuilder {
        self.resumption_window = Some(window);
        self
    }

    /// Federates with other XMPP servers: server-to-server links on port 5269 of its address,
    /// over TLS, authenticated by certificates that the test CA signed (`s2s_secure_auth`, so
    /// no dialback). Other servers are found through DNS (`_xmpp-server._tcp` SRV, then A
    /// records): give the namespace a [`crate::NetnsResolver`]. Off by default.
    #[must_use]
    pub fn federation(mut self) -> ProsodyBuilder {
        self.federation = true;
        self
    }

    /// Puts the scratch directory under `parent` (a test's [`TestDir`], say) instead of a
    /// temporary directory of its own.
    #[must_use]
    pub fn dir(mut self, parent: &Path) -> ProsodyBuilder {
        self.parent = Some(parent.to_owned());
        self
    }

    /// Has `ca` sign the server certificate, so that other servers of the test can share it; a
    /// CA of its own by default.
    #[must_use]
    pub fn ca(mut self, ca: &TestCa) -> ProsodyBuilder {
        self.ca = Some(ca.clone());
        self
    }

    /// Writes the certificates and config, starts Prosody and waits until its c2s port accepts
    /// connections.
    ///
    /// # Panics
    /// When a file cannot be written, no port is free on the address, or Prosody does not come
    /// up within [`PROSODY_READY_TIMEOUT`]; the message carries its log.
    #[must_use]
    pub fn start(self) -> Prosody {
        SWEEP.call_once(sweep_stale_prosody);
        let tag = format!("xmpp{}", sanitize_tag(&self.domain));
        let (scratch, dir) = match &self.parent {
            Some(parent) => {
                let dir = parent.join(format!("prosody-{}-{}", self.domain, next_id()));
                (None, dir)
            }
            None => {
                let scratch = TestDir::new(&tag);
                let dir = scratch.path().to_owned();
                (Some(scratch), dir)
            }
        };
        for sub in [dir.join("data"), dir.join("certs")] {
            std::fs::create_dir_all(&sub)
                .unwrap_or_else(|e| panic!("cannot create {}: {e}", sub.display()));
        }
        let ca = self
            .ca
            .unwrap_or_else(|| TestCa::new(&format!("ipop-lab test CA for {}", self.domain)));
        let conference = format!("conference.{}", self.domain);
        ca.write_server_files(&dir.join("certs"), &[&self.domain, &conference]);
        let ca_der = ca.der().to_vec();
        let port = free_port(self.netns.as_ref(), self.ip);
        let mut prosody = Prosody {
            daemon: None,
            netns: self.netns,
            addr: SocketAddr::new(self.ip, port),
            config: dir.join("prosody.cfg.lua"),
            log: dir.join("prosody.log"),
            stdout: dir.join("prosody.out"),
            ca_cert: dir.join("certs").join("ca.crt"),
            ca_der,
            domain: self.domain,
            dir,
            _scratch: scratch,
        };
        let mut config = prosody.config_lua(
            self.room_locking,
            self.stock_limits,
            self.external_services.as_deref(),
            self.federation,
        );
        if let Some(window) = self.resumption_window {
            // The last section is the virtual host's: the setting is the host's.
            let _ = writeln!(config, "smacks_hibernation_time = {}", window.as_secs());
        }
        write(&prosody.config, &config);
        prosody.start();
        prosody
    }
}

/// A running (or stopped, see [`Prosody::stop`] and [`Prosody::kill`]) Prosody with a virtual
/// host `DOMAIN`, which offers stream management with resumption, and a MUC component
/// `conference.DOMAIN`.
///
/// Dropping it stops the process (SIGTERM, then SIGKILL, by PID) and removes its directory;
/// when the thread is panicking, it prints the logs' paths and tails and keeps the directory.
#[derive(Debug)]
pub struct Prosody {
    /// Declared first: stopped before the directory goes.
    daemon: Option<Daemon>,
    netns: Option<NsHandle>,
    domain: String,
    addr: SocketAddr,
    dir: PathBuf,
    config: PathBuf,
    log: PathBuf,
    stdout: PathBuf,
    ca_cert: PathBuf,
    ca_der: Vec<u8>,
    /// The temporary directory when the builder was given none; dropped last.
    _scratch: Option<TestDir>,
}

impl Prosody {
    /// Options for a Prosody serving `domain`, on loopback unless told otherwise.
    #[must_use]
    pub fn builder(domain: &str) -> ProsodyBuilder {
        ProsodyBuilder {
            domain: domain.to_owned(),
            netns: None,
            ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            room_locking: true,
            stock_limits: false,
            external_services: None,
            parent: None,
            ca: None,
            resumption_window: None,
            federation: false,
        }
    }

    /// A Prosody on 127.0.0.1 with default options.
    ///
    /// # Panics
    /// See [`ProsodyBuilder::start`].
    #[must_use]
    pub fn start_local(domain: &str) -> Prosody {
        Prosody::builder(domain).start()
    }

    /// A Prosody inside `ns`, listening on `ip` (an address already configured there), with
    /// default options.
    ///
    /// # Panics
    /// When `ip` is not an IP address; see also [`ProsodyBuilder::start`].
    #[must_use]
    pub fn start_in(ns: &Netns, ip: &str, domain: &str) -> Prosody {
        let ip: IpAddr = ip
            .parse()
            .unwrap_or_else(|e| panic!("{ip:?} is not an IP address: {e}"));
        Prosody::builder(domain).in_netns(ns, ip).start()
    }

    #[must_use]
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// `conference.DOMAIN`, the MUC component.
    #[must_use]
    pub fn conference_domain(&self) -> String {
        format!("conference.{}", self.domain)
    }

    /// `user@DOMAIN`.
    #[must_use]
    pub fn jid(&self, user: &str) -> String {
        format!("{user}@{}", self.domain)
    }

    /// Where clients connect (STARTTLS on this port); the same across [`Prosody::stop`] and
    /// [`Prosody::start`].
    #[must_use]
    pub fn c2s_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The test CA (PEM) that signed the server certificate.
    #[must_use]
    pub fn ca_cert_path(&self) -> &Path {
        &self.ca_cert
    }

    /// The test CA certificate, DER-encoded.
    #[must_use]
    pub fn ca_cert_der(&self) -> &[u8] {
        &self.ca_der
    }

    /// Prosody's own log (debug level).
    #[must_use]
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Prosody's standard output and error (start-up errors land here).
    #[must_use]
    pub fn stdout_path(&self) -> &Path {
        &self.stdout
    }

    /// The directory holding the config, certificates, data and logs.
    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    #[must_use]
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// The name of the namespace Prosody runs in, if not the caller's.
    #[must_use]
    pub fn netns_name(&self) -> Option<&str> {
        self.netns.as_ref().map(NsHandle::name)
    }

    /// The PID of the running Prosody.
    #[must_use]
    pub fn pid(&self) -> Option<u32> {
        self.daemon.as_ref().map(Daemon::pid)
    }

    /// Whether the process is running.
    pub fn is_running(&mut self) -> bool {
        self.daemon
            .as_mut()
            .is_some_and(|daemon| daemon.try_wait().is_none())
    }

    /// Creates the account `user@DOMAIN` with `prosodyctl register` (works whether Prosody runs
    /// or not).
    ///
    /// # Panics
    /// When `prosodyctl` fails; the message carries its output.
    pub fn register(&self, user: &str, password: &str) {
        let mut cmd = Command::new("prosodyctl");
        cmd.arg("--config")
            .arg(&self.config)
            .args(["register", user, &self.domain, password]);
        run_checked(&mut cmd, &format!("register {user}@{}", self.domain));
    }

    /// Starts Prosody again after [`Prosody::stop`], with the same config, data and port, and
    /// waits until it accepts connections.
    ///
    /// # Panics
    /// When it is already running, or does not come up within [`PROSODY_READY_TIMEOUT`].
    pub fn start(&mut self) {
        assert!(
            !self.is_running(),
            "Prosody for {} is already running",
            self.domain
        );
        // Reap the stopped one first, so that its drop does not report twice.
        self.daemon = None;
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", ns.name(), "prosody"]);
                cmd
            }
            None => Command::new("prosody"),
        };
        cmd.arg("--config").arg(&self.config).arg("-F");
        let label = format!("prosody for {}", self.domain);
        self.daemon = Some(Daemon::spawn(&label, cmd, &self.stdout));
        self.wait_ready();
    }

    /// Stops Prosody (SIGTERM, then SIGKILL after [`STOP_TIMEOUT`]); data and config stay for
    /// [`Prosody::start`]. Does nothing when it is not running.
    pub fn stop(&mut self) {
        if let Some(daemon) = self.daemon.as_mut() {
            let (status, killed) = daemon.stop_within(STOP_TIMEOUT);
            if killed {
                eprintln!(
                    "ipop-lab: Prosody for {} ignored SIGTERM for {STOP_TIMEOUT:?} and was killed ({status})",
                    self.domain
                );
            }
        }
    }

    /// Kills Prosody at once (SIGKILL, by PID), as a crash would; data and config stay for
    /// [`Prosody::start`]. Does nothing when it is not running.
    pub fn kill(&mut self) {
        if let Some(daemon) = self.daemon.as_mut() {
            daemon.kill();
        }
    }

    fn wait_ready(&mut self) {
        let what = format!("Prosody for {}", self.domain);
        let (stdout, log) = (self.stdout.clone(), self.log.clone());
        let logs = move || logs(&stdout, &log);
        wait_accepting(
            &what,
            self.netns.as_ref(),
            self.addr,
            PROSODY_READY_TIMEOUT,
            &mut self.daemon,
            logs,
        );
    }

    /// The settings of this process (paths, address, ports, root), then the config documented
    /// in `docs/servers.md` for this test's domain (stream management with resumption
    /// included, as in Debian's stock config), then the virtual host's own settings: this
    /// test's STUN/TURN servers, which replace the documented ones. No setting is made twice in
    /// one file: Prosody 0.12 cannot always report that, and fails to start. With
    /// `stock_limits`, the documented client rate limit is replaced by Debian's.
    fn config_lua(
        &self,
        room_locking: bool,
        stock_limits: bool,
        services: Option<&[ExternalService]>,
        federation: bool,
    ) -> String {
        let path = |p: &Path| lua_str(&p.to_string_lossy());
        let dir = &self.dir;
        let mut s = String::new();
        // Writing to a String cannot fail.
        let _ = writeln!(
            s,
            "-- Written by ipop-lab for one test: its process's settings."
        );
        // With mod_posix off, the documented pidfile is never written.
        let _ = writeln!(s, "run_as_root = true");
        let _ = writeln!(s, "data_path = {}", path(&dir.join("data")));
        let _ = writeln!(s, "admin_socket = {}", path(&dir.join("prosody.sock")));
        let _ = writeln!(s, "log = {{ debug = {} }}", path(&self.log));
        let _ = writeln!(
            s,
            "interfaces = {{ {} }}",
            lua_str(&self.addr.ip().to_string())
        );
        let _ = writeln!(s, "c2s_ports = {{ {} }}", self.addr.port());
        let _ = writeln!(s, "c2s_direct_tls_ports = {{ }}");
        // The documented config requires encryption and certificates on server-to-server links.
        if federation {
            let _ = writeln!(s, "s2s_ports = {{ 5269 }}");
        } else {
            let _ = writeln!(s, "s2s_ports = {{ }}");
        }
        let _ = writeln!(s, "http_ports = {{ }}");
        let _ = writeln!(s, "https_ports = {{ }}");
        let mut disabled = vec!["http", "posix", "offline"];
        if !federation {
            disabled.push("s2s");
        }
        if services.is_none() {
            disabled.push("external_services");
        }
        let disabled: Vec<String> = disabled.iter().map(|m| lua_str(m)).collect();
        let _ = writeln!(s, "modules_disabled = {{ {} }}", disabled.join("; "));
        // The CA verifies other servers' certificates on server-to-server links.
        let _ = writeln!(
            s,
            "ssl = {{ key = {}; certificate = {}; cafile = {} }}",
            path(&dir.join("certs").join("server.key")),
            path(&dir.join("certs").join("server.crt")),
            path(&dir.join("certs").join("ca.crt"))
        );
        let _ = writeln!(s, "muc_room_locking = {room_locking}");
        let _ = writeln!(s, "{DOCUMENTED_HEADER}");
        let documented = DOCUMENTED_CONFIG.replace("@DOMAIN@", &self.domain);
        if stock_limits {
            s.push_str(&stock_rate(&documented));
        } else {
            s.push_str(&documented);
        }
        let _ = writeln!(s, "{HOST_HEADER}");
        let _ = writeln!(s, "VirtualHost {}", lua_str(&self.domain));
        if let Some(services) = services {
            let _ = writeln!(s, "external_services = {{");
            for service in services {
                let _ = write!(
                    s,
                    "  {{ type = {}, transport = {}, host = {}, port = {}",
                    lua_str(&service.kind),
                    lua_str(&service.transport),
                    lua_str(&service.host),
                    service.port
                );
                if let Some(secret) = &service.secret {
                    let _ = write!(s, ", secret = {}", lua_str(secret));
                }
                if let Some(ttl) = service.ttl {
                    let _ = write!(s, ", ttl = {ttl}");
                }
                let _ = writeln!(s, " }};");
            }
            let _ = writeln!(s, "}}");
        }
        s
    }
}

impl Drop for Prosody {
    fn drop(&mut self) {
        // Dropping the daemon stops it and, in a failing test, prints its output.
        drop(self.daemon.take());
        if thread::panicking() {
            eprintln!(
                "----- Prosody for {}: config {}, log {}, last {LOG_TAIL_LINES} lines:\n{}\n----- end of Prosody log",
                self.domain,
                self.config.display(),
                self.log.display(),
                log_tail(&self.log, LOG_TAIL_LINES)
            );
        }
    }
}

impl XmppServer for Prosody {
    fn kind(&self) -> ServerKind {
        ServerKind::Prosody
    }

    fn domain(&self) -> &str {
        Prosody::domain(self)
    }

    fn c2s_addr(&self) -> SocketAddr {
        Prosody::c2s_addr(self)
    }

    fn ca_cert_path(&self) -> &Path {
        Prosody::ca_cert_path(self)
    }

    fn ca_cert_der(&self) -> &[u8] {
        Prosody::ca_cert_der(self)
    }

    fn log_path(&self) -> &Path {
        Prosody::log_path(self)
    }

    fn register(&self, user: &str, password: &str) {
        Prosody::register(self, user, password);
    }

    fn pid(&self) -> Option<u32> {
        Prosody::pid(self)
    }

    fn is_running(&mut self) -> bool {
        Prosody::is_running(self)
    }

    fn start(&mut self) {
        Prosody::start(self);
    }

    fn stop(&mut self) {
        Prosody::stop(self);
    }

    fn kill(&mut self) {
        Prosody::kill(self);
    }
}

/// Kills (SIGKILL, by PID) the Prosody processes that an earlier test process started and
/// could not stop because it died without running destructors (an abort, SIGKILL): those whose
/// config lies in `$TMPDIR/ipl-<pid>-...` for a PID that no longer runs. [`ProsodyBuilder::start`]
/// calls it once per process. (Prosody inside a namespace also dies with the namespace sweep.)
pub fn sweep_stale_prosody() {
    crate::process::sweep_stale_servers(
        "Prosody",
        |args| args.iter().any(|arg| arg.ends_with("/prosody")),
        "--config",
    );
}

/// The paths and tails of Prosody's output and log, for panic messages.
fn logs(stdout: &Path, log: &Path) -> String {
    format!(
        "output {}:\n{}\nlog {}:\n{}",
        stdout.display(),
        log_tail(stdout, 20),
        log.display(),
        log_tail(log, LOG_TAIL_LINES)
    )
}

fn write(path: &Path, contents: &str) {
    std::fs::write(path, contents)
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

/// `config` with its client rate limit set to Debian's stock one.
///
/// # Panics
/// When `config` does not set the documented limit once.
fn stock_rate(config: &str) -> String {
    assert_eq!(
        config.matches(DOCUMENTED_C2S_RATE).count(),
        1,
        "docs/examples/prosody.cfg.lua sets the client limit as {DOCUMENTED_C2S_RATE} once"
    );
    config.replace(DOCUMENTED_C2S_RATE, STOCK_C2S_RATE)
}

/// A Lua string literal.
fn lua_str(value: &str) -> String {
    let mut s = String::with_capacity(value.len() + 2);
    s.push('"');
    for c in value.chars() {
        match c {
            '"' => s.push_str("\\\""),
            '\\' => s.push_str("\\\\"),
            '\n' => s.push_str("\\n"),
            c if c.is_control() => {
                let _ = write!(s, "\\{:03}", u32::from(c));
            }
            c => s.push(c),
        }
    }
    s.push('"');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `docs/servers.md` shows the config file the tests run, and a Prosody comes up with it.
    #[test]
    fn runs_the_config_that_the_documentation_shows() {
        let doc = include_str!("../../../docs/servers.md");
        assert!(
            doc.contains(&format!("```lua\n{DOCUMENTED_CONFIG}```\n")),
            "docs/servers.md shows docs/examples/prosody.cfg.lua in a lua block"
        );
        let services = vec![ExternalService {
            kind: "turn".to_owned(),
            transport: "udp".to_owned(),
            host: "192.0.2.1".to_owned(),
            port: 3478,
            secret: Some("s".to_owned()),
            ttl: Some(60),
        }];
        for services in [None, Some(services)] {
            let mut builder = Prosody::builder("example.org");
            if let Some(services) = &services {
                builder = builder.external_services(services.clone());
            }
            let prosody = builder.start();
            let config = std::fs::read_to_string(prosody.config_path()).expect("config");
            let (own, documented) = config
                .split_once(&format!("{DOCUMENTED_HEADER}\n"))
                .expect("the documented config follows the lab's settings");
            let (documented, host) = documented
                .split_once(&format!("{HOST_HEADER}\n"))
                .expect("the lab's host settings follow the documented config");
            assert!(host.starts_with("VirtualHost \"example.org\"\n"), "{host}");
            assert!(
                documented.contains("\"smacks\";"),
                "the documented config offers stream management with resumption"
            );
            assert_eq!(
                host.contains("external_services = {"),
                services.is_some(),
                "{host}"
            );
            assert_eq!(
                own.contains("\"external_services\" }"),
                services.is_none(),
                "{own}"
            );
            assert_eq!(
                documented,
                DOCUMENTED_CONFIG.replace("@DOMAIN@", "example.org")
            );
            assert!(
                !own.contains("VirtualHost") && !own.contains("Component"),
                "{own}"
            );
        }
    }

    #[test]
    fn stock_limits_replace_the_documented_client_rate() {
        let stock = stock_rate(DOCUMENTED_CONFIG);
        assert!(stock.contains("c2s = { rate = \"10kb/s\" };"), "{stock}");
        assert!(!stock.contains("10mb/s"), "{stock}");
        assert_eq!(
            stock.replace(STOCK_C2S_RATE, DOCUMENTED_C2S_RATE),
            DOCUMENTED_CONFIG
        );
    }

    #[test]
    fn lua_strings_are_escaped() {
        assert_eq!(lua_str("a\"b\\c\nd"), "\"a\\\"b\\\\c\\nd\"");
        assert_eq!(lua_str("x\u{1}2"), "\"x\\0012\"");
    }
}
