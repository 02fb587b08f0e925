//! A private ejabberd for one test: its own directory (config, certificate, Mnesia spool, logs),
//! Erlang node name and cookie, listening on loopback or inside a namespace on a port chosen per
//! run.
//!
//! ejabberd runs as the user `ejabberd`, as Debian's package sets it up: the directory is handed
//! to that user, and every directory above it must let others through (`o+x`). The Erlang VM is
//! started directly (what `ejabberdctl foreground` runs), so the process the lab holds is the VM
//! itself: SIGTERM stops ejabberd cleanly, SIGKILL crashes it. Its Erlang distribution (which
//! `ejabberdctl register` talks to) listens on loopback on a fixed port, without epmd, so that no
//! process outlives the test.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Once;
use std::thread;
use std::time::Duration;

use crate::ca::TestCa;
use crate::dir::TestDir;
use crate::netns::Netns;
use crate::nsenter::NsHandle;
use crate::process::{Daemon, ProcId, descendants, kill_leftovers, log_tail};
use crate::server::{ServerKind, XmppServer, free_port, wait_accepting};
use crate::{PREFIX, next_id, run_checked, sanitize_tag};

/// How long [`Ejabberd::start`] waits for the c2s port to accept connections.
pub const EJABBERD_READY_TIMEOUT: Duration = Duration::from_secs(30);

/// How long [`Ejabberd::stop`] waits after SIGTERM before it kills the VM: ejabberd takes about
/// 3 s to shut down on an idle machine.
pub const EJABBERD_STOP_TIMEOUT: Duration = Duration::from_secs(20);

/// The system user that Debian's package runs ejabberd as.
const EJABBERD_USER: &str = "ejabberd";

/// Lines of ejabberd's own log printed when a test fails.
const LOG_TAIL_LINES: usize = 60;

/// The argument that marks a VM as started by this lab, followed by its directory (so that a
/// later run can find VMs of dead test processes).
const LAB_DIR_FLAG: &str = "-ipop_lab_dir";

static SWEEP: Once = Once::new();

/// Options for an [`Ejabberd`]; [`EjabberdBuilder::start`] starts it.
#[derive(Debug)]
pub struct EjabberdBuilder {
    domain: String,
    netns: Option<NsHandle>,
    ip: IpAddr,
    parent: Option<PathBuf>,
    ca: Option<TestCa>,
}

impl EjabberdBuilder {
    /// Runs ejabberd inside `ns`, listening on `ip`, which must already be an address of an
    /// interface there.
    #[must_use]
    pub fn in_netns(mut self, ns: &Netns, ip: IpAddr) -> EjabberdBuilder {
        self.netns = Some(NsHandle::of(ns));
        self.ip = ip;
        self
    }

    /// Puts the directory under `parent` (a test's [`TestDir`], say) instead of a temporary
    /// directory of its own.
    #[must_use]
    pub fn dir(mut self, parent: &Path) -> EjabberdBuilder {
        self.parent = Some(parent.to_owned());
        self
    }

    /// Has `ca` sign the server certificate; a CA of its own by default.
    #[must_use]
    pub fn ca(mut self, ca: &TestCa) -> EjabberdBuilder {
        self.ca = Some(ca.clone());
        self
    }

    /// Writes the certificate and config, starts ejabberd and waits until its c2s port accepts
    /// connections.
    ///
    /// # Panics
    /// When ejabberd is not installed, a file cannot be written, no port is free, a directory
    /// above the scratch directory cannot be entered by the `ejabberd` user, or ejabberd does
    /// not come up within [`EJABBERD_READY_TIMEOUT`]; the message carries its log.
    #[must_use]
    pub fn start(self) -> Ejabberd {
        SWEEP.call_once(sweep_stale_ejabberd);
        let erl_libs = erl_libs();
        let tag = format!("ejab{}", sanitize_tag(&self.domain));
        let id = next_id();
        let (scratch, dir) = match &self.parent {
            Some(parent) => (None, parent.join(format!("ejabberd-{}-{id}", self.domain))),
            None => {
                let scratch = TestDir::new(&tag);
                let dir = scratch.path().to_owned();
                (Some(scratch), dir)
            }
        };
        for sub in ["spool", "logs", "certs"] {
            let sub = dir.join(sub);
            std::fs::create_dir_all(&sub)
                .unwrap_or_else(|e| panic!("cannot create {}: {e}", sub.display()));
        }
        let ca = self
            .ca
            .unwrap_or_else(|| TestCa::new(&format!("ipop-lab test CA for {}", self.domain)));
        let conference = format!("conference.{}", self.domain);
        let server = ca.issue(&[&self.domain, &conference]);
        let certs = dir.join("certs");
        write(&certs.join("ca.crt"), &ca.pem());
        // ejabberd wants the certificate and its key in one file (with the chain, if any: the
        // test CA signs it directly).
        write(
            &certs.join("server.pem"),
            &format!("{}{}", server.cert_pem, server.key_pem),
        );
        let port = free_port(self.netns.as_ref(), self.ip);
        let dist_port = free_port(self.netns.as_ref(), IpAddr::V4(Ipv4Addr::LOCALHOST));
        let mut ejabberd = Ejabberd {
            daemon: None,
            children: Vec::new(),
            netns: self.netns,
            addr: SocketAddr::new(self.ip, port),
            dist_port,
            node: format!("{PREFIX}{}-{id}@localhost", std::process::id()),
            cookie: random_cookie(),
            erl_libs,
            config: dir.join("ejabberd.yml"),
            ctl_config: dir.join("ejabberdctl.cfg"),
            log: dir.join("logs").join("ejabberd.log"),
            stdout: dir.join("ejabberd.out"),
            ca_cert: certs.join("ca.crt"),
            ca_der: ca.der().to_vec(),
            domain: self.domain,
            dir,
            _scratch: scratch,
        };
        write(&ejabberd.config, &ejabberd.config_yaml());
        write(&ejabberd.ctl_config, &ejabberd.ctl_config_text());
        // The stock Debian inetrc: `localhost` without asking DNS.
        write(
            &ejabberd.dir.join("inetrc"),
            "{lookup,[\"file\",\"native\"]}.\n{host,{127,0,0,1}, [\"localhost\",\"hostalias\"]}.\n\
             {file, resolv, \"/etc/resolv.conf\"}.\n",
        );
        hand_over(&ejabberd.dir);
        ejabberd.start();
        ejabberd
    }
}

/// A running (or stopped, see [`Ejabberd::stop`] and [`Ejabberd::kill`]) ejabberd with a
/// virtual host `DOMAIN` and a MUC service `conference.DOMAIN` where local users create rooms.
///
/// Dropping it stops the VM (SIGTERM, then SIGKILL, by PID) and any process the VM started
/// that is still there, and removes its directory; when the thread is panicking, it prints the
/// logs' paths and tails and keeps the directory.
#[derive(Debug)]
pub struct Ejabberd {
    /// Declared first: stopped before the directory goes.
    daemon: Option<Daemon>,
    /// Processes the VM started (a port program, say), seen when it was last stopped.
    children: Vec<ProcId>,
    netns: Option<NsHandle>,
    domain: String,
    addr: SocketAddr,
    /// The Erlang distribution port, on loopback.
    dist_port: u16,
    /// The Erlang node name, `ipl-<pid>-<n>@localhost`.
    node: String,
    cookie: String,
    /// Where ejabberd's Erlang applications are installed.
    erl_libs: PathBuf,
    dir: PathBuf,
    config: PathBuf,
    ctl_config: PathBuf,
    log: PathBuf,
    stdout: PathBuf,
    ca_cert: PathBuf,
    ca_der: Vec<u8>,
    /// The temporary directory when the builder was given none; dropped last.
    _scratch: Option<TestDir>,
}

impl Ejabberd {
    /// Options for an ejabberd serving `domain`, on loopback unless told otherwise.
    #[must_use]
    pub fn builder(domain: &str) -> EjabberdBuilder {
        EjabberdBuilder {
            domain: domain.to_owned(),
            netns: None,
            ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            parent: None,
            ca: None,
        }
    }

    /// An ejabberd on 127.0.0.1 with default options.
    ///
    /// # Panics
    /// See [`EjabberdBuilder::start`].
    #[must_use]
    pub fn start_local(domain: &str) -> Ejabberd {
        Ejabberd::builder(domain).start()
    }

    /// An ejabberd inside `ns`, listening on `ip` (an address already configured there), with
    /// default options.
    ///
    /// # Panics
    /// When `ip` is not an IP address; see also [`EjabberdBuilder::start`].
    #[must_use]
    pub fn start_in(ns: &Netns, ip: &str, domain: &str) -> Ejabberd {
        let ip: IpAddr = ip
            .parse()
            .unwrap_or_else(|e| panic!("{ip:?} is not an IP address: {e}"));
        Ejabberd::builder(domain).in_netns(ns, ip).start()
    }

    #[must_use]
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// `conference.DOMAIN`, the MUC service.
    #[must_use]
    pub fn conference_domain(&self) -> String {
        format!("conference.{}", self.domain)
    }

    /// `user@DOMAIN`.
    #[must_use]
    pub fn jid(&self, user: &str) -> String {
        format!("{user}@{}", self.domain)
    }

    /// Where clients connect (STARTTLS on this port); the same across restarts.
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

    /// ejabberd's own log.
    #[must_use]
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The VM's standard output and error (start-up errors land here).
    #[must_use]
    pub fn stdout_path(&self) -> &Path {
        &self.stdout
    }

    /// The directory holding the config, certificates, spool and logs.
    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    #[must_use]
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// The name of the namespace ejabberd runs in, if not the caller's.
    #[must_use]
    pub fn netns_name(&self) -> Option<&str> {
        self.netns.as_ref().map(NsHandle::name)
    }

    /// The PID of the running VM.
    #[must_use]
    pub fn pid(&self) -> Option<u32> {
        self.daemon.as_ref().map(Daemon::pid)
    }

    /// Whether the VM is running.
    pub fn is_running(&mut self) -> bool {
        self.daemon
            .as_mut()
            .is_some_and(|daemon| daemon.try_wait().is_none())
    }

    /// Creates the account `user@DOMAIN` with `ejabberdctl register`, which asks the running
    /// server.
    ///
    /// # Panics
    /// When `ejabberdctl` fails (ejabberd is not running, say); the message carries its output.
    pub fn register(&self, user: &str, password: &str) {
        let mut cmd = self.ctl();
        cmd.args(["register", user, &self.domain, password]);
        run_checked(&mut cmd, &format!("register {user}@{}", self.domain));
    }

    /// Puts `contact@DOMAIN` on `user@DOMAIN`'s roster with `subscription` (`both`, `to`,
    /// `from` or `none`) in roster group `group`, as an administrator does with `ejabberdctl
    /// add_rosteritem`: no subscription stanza is exchanged, so the stock `mod_pres_counter`
    /// (5 subscription stanzas a minute per user) does not hold it back.
    ///
    /// # Panics
    /// When `ejabberdctl` fails; the message carries its output.
    pub fn add_roster_item(&self, user: &str, contact: &str, group: &str, subscription: &str) {
        let mut cmd = self.ctl();
        cmd.args([
            "add_rosteritem",
            user,
            &self.domain,
            contact,
            &self.domain,
            contact,
            group,
            subscription,
        ]);
        run_checked(
            &mut cmd,
            &format!("put {contact} on the roster of {user}@{}", self.domain),
        );
    }

    /// Starts ejabberd again after [`Ejabberd::stop`] or [`Ejabberd::kill`], with the same
    /// config, data, node name and ports, and waits until it accepts connections.
    ///
    /// # Panics
    /// When it is already running, or does not come up within [`EJABBERD_READY_TIMEOUT`].
    pub fn start(&mut self) {
        assert!(
            !self.is_running(),
            "ejabberd for {} is already running",
            self.domain
        );
        // Reap the stopped one first, so that its drop does not report twice.
        self.daemon = None;
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", ns.name(), "setpriv"]);
                cmd
            }
            None => Command::new("setpriv"),
        };
        // Each program execs the next: the child's PID is the VM's.
        cmd.args([
            &format!("--reuid={EJABBERD_USER}"),
            &format!("--regid={EJABBERD_USER}"),
            "--init-groups",
            "erl",
        ]);
        cmd.args(self.vm_args());
        cmd.current_dir(self.dir.join("spool"))
            .env("HOME", &self.dir)
            .env("EJABBERD_CONFIG_PATH", &self.config)
            .env("EJABBERD_LOG_PATH", &self.log)
            .env("EJABBERD_PID_PATH", self.dir.join("ejabberd.pid"))
            .env(
                "ERL_CRASH_DUMP",
                self.dir.join("logs").join("erl_crash.dump"),
            )
            .env("ERL_INETRC", self.dir.join("inetrc"))
            .env("ERL_LIBS", &self.erl_libs)
            .env("ERL_MAX_PORTS", "32000")
            .env("ERL_MAX_ETS_TABLES", "1400");
        let label = format!("ejabberd for {}", self.domain);
        self.daemon = Some(Daemon::spawn(&label, cmd, &self.stdout));
        let what = label;
        let (stdout, log) = (self.stdout.clone(), self.log.clone());
        let logs = move || logs(&stdout, &log);
        wait_accepting(
            &what,
            self.netns.as_ref(),
            self.addr,
            EJABBERD_READY_TIMEOUT,
            &mut self.daemon,
            logs,
        );
        // The client port opens before every module has started: on a busy machine the account
        // tables can still be missing then. `ejabberdctl started` waits (60 s at most) until the
        // node says it has started.
        let mut started = self.ctl();
        started.arg("started");
        run_checked(
            &mut started,
            &format!("wait for ejabberd for {} to finish starting", self.domain),
        );
    }

    /// Stops ejabberd (SIGTERM, then SIGKILL after [`EJABBERD_STOP_TIMEOUT`]), as its operator
    /// would: it closes every stream and ends. Data and config stay for [`Ejabberd::start`].
    /// Does nothing when it is not running.
    pub fn stop(&mut self) {
        self.note_children();
        if let Some(daemon) = self.daemon.as_mut() {
            let (status, killed) = daemon.stop_within(EJABBERD_STOP_TIMEOUT);
            if killed {
                eprintln!(
                    "ipop-lab: ejabberd for {} ignored SIGTERM for {EJABBERD_STOP_TIMEOUT:?} and \
                     was killed ({status})",
                    self.domain
                );
            }
        }
        kill_leftovers(&std::mem::take(&mut self.children));
    }

    /// Kills the VM at once (SIGKILL, by PID), as a crash would; then the processes it had
    /// started, should they linger. Data and config stay for [`Ejabberd::start`], less what a
    /// real crash loses too: Mnesia writes its log with a delay of up to 2 s, so accounts or
    /// roster changes made just before may be gone. Does nothing when it is not running.
    pub fn kill(&mut self) {
        self.note_children();
        if let Some(daemon) = self.daemon.as_mut() {
            daemon.kill();
        }
        kill_leftovers(&std::mem::take(&mut self.children));
    }

    /// Remembers the processes below the running VM, to end them after it.
    fn note_children(&mut self) {
        if let Some(pid) = self.pid().filter(|_| self.is_running()) {
            self.children = descendants(pid);
        }
    }

    /// `ejabberdctl` with this instance's config, node, ports and cookie, inside its namespace.
    fn ctl(&self) -> Command {
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", ns.name(), "ejabberdctl"]);
                cmd
            }
            None => Command::new("ejabberdctl"),
        };
        cmd.arg("--config-dir")
            .arg(&self.dir)
            .arg("--ctl-config")
            .arg(&self.ctl_config)
            .arg("--config")
            .arg(&self.config)
            .arg("--spool")
            .arg(self.dir.join("spool"))
            .arg("--logs")
            .arg(self.dir.join("logs"));
        cmd
    }

    /// The VM's arguments: those `ejabberdctl foreground` gives, with a distribution port of
    /// its own on loopback and no epmd.
    fn vm_args(&self) -> Vec<String> {
        let spool = self.dir.join("spool");
        [
            "-sname",
            &self.node,
            "+K",
            "true",
            "+P",
            "250000",
            "-env",
            "ERL_CRASH_DUMP_BYTES",
            "0",
            "-erl_epmd_port",
            &self.dist_port.to_string(),
            "-start_epmd",
            "false",
            "-kernel",
            "inet_dist_use_interface",
            "{127,0,0,1}",
            "-setcookie",
            &self.cookie,
            "-mnesia",
            "dir",
            &erlang_string(&spool.to_string_lossy()),
            LAB_DIR_FLAG,
            &self.dir.to_string_lossy(),
            "-s",
            "ejabberd",
            "-noinput",
        ]
        .iter()
        .map(|arg| (*arg).to_owned())
        .collect()
    }

    /// `ejabberdctl.cfg`: the node to talk to, its distribution port and cookie.
    fn ctl_config_text(&self) -> String {
        format!(
            "# Written by ipop-lab for one test.\nERLANG_NODE={}\nERL_DIST_PORT={}\n\
             ERL_OPTIONS=\"-setcookie {}\"\n",
            self.node, self.dist_port, self.cookie
        )
    }

    /// `ejabberd.yml`: Debian's stock config for one virtual host, with only the c2s listener
    /// (STARTTLS required, the stock shaper and stanza size limit), and the group-room settings
    /// that `docs/servers.md` gives.
    fn config_yaml(&self) -> String {
        let q = |value: &str| yaml_str(value);
        let mut s = String::new();
        // Writing to a String cannot fail.
        let _ = writeln!(s, "# Written by ipop-lab for one test.");
        let _ = writeln!(s, "loglevel: info");
        let _ = writeln!(s, "log_rotate_count: 0");
        let _ = writeln!(s, "hosts:\n  - {}", q(&self.domain));
        let _ = writeln!(
            s,
            "certfiles:\n  - {}",
            q(&self.dir.join("certs").join("server.pem").to_string_lossy())
        );
        s.push_str(STOCK_TLS);
        let _ = writeln!(
            s,
            "listen:\n  -\n    port: {}\n    ip: {}\n    module: ejabberd_c2s\n    \
             max_stanza_size: 262144\n    shaper: c2s_shaper\n    access: c2s\n    \
             starttls_required: true\n    protocol_options: 'TLS_OPTIONS'",
            self.addr.port(),
            q(&self.addr.ip().to_string())
        );
        s.push_str(STOCK_RULES);
        s.push_str(STOCK_MODULES);
        s
    }
}

/// The stock TLS settings of Debian's `ejabberd.yml`.
const STOCK_TLS: &str = "\
define_macro:
  'TLS_CIPHERS': \"HIGH:!aNULL:!eNULL:!3DES:@STRENGTH\"
  'TLS_OPTIONS':
    - \"no_sslv3\"
    - \"no_tlsv1\"
    - \"no_tlsv1_1\"
    - \"cipher_server_preference\"
    - \"no_compression\"
c2s_ciphers: 'TLS_CIPHERS'
s2s_ciphers: 'TLS_CIPHERS'
c2s_protocol_options: 'TLS_OPTIONS'
s2s_protocol_options: 'TLS_OPTIONS'
";

/// The stock authentication, access rules and shapers of Debian's `ejabberd.yml`: clients are
/// limited to 3000 bytes/s (bursts of 20 000).
const STOCK_RULES: &str = "\
disable_sasl_mechanisms:
  - \"digest-md5\"
  - \"X-OAUTH2\"
s2s_use_starttls: required
auth_method: internal
auth_password_format: scram
acl:
  admin:
    user:
      - \"\"
  local:
    user_regexp: \"\"
  loopback:
    ip:
      - 127.0.0.0/8
      - ::1/128
access_rules:
  local:
    allow: local
  c2s:
    deny: blocked
    allow: all
  announce:
    allow: admin
  configure:
    allow: admin
  muc_create:
    allow: local
  pubsub_createnode:
    allow: local
  trusted_network:
    allow: loopback
api_permissions:
  \"console commands\":
    from:
      - ejabberd_ctl
    who: all
    what: \"*\"
shaper:
  normal:
    rate: 3000
    burst_size: 20000
  fast: 200000
shaper_rules:
  max_user_sessions: 10
  max_user_offline_messages:
    5000: admin
    100: all
  c2s_shaper:
    none: admin
    normal: all
  s2s_shaper: fast
";

/// Debian's stock modules, less those that need a listener the lab does not open (BOSH, HTTP
/// API, MQTT, server-to-server dialback) and `mod_stun_disco` (no STUN/TURN server to
/// announce). `mod_muc` as `docs/servers.md` sets it up; `mod_stream_mgmt` as stock (stream
/// resumption on, sessions kept 300 s).
const STOCK_MODULES: &str = "\
modules:
  mod_adhoc: {}
  mod_admin_extra: {}
  mod_announce:
    access: announce
  mod_avatar: {}
  mod_blocking: {}
  mod_caps: {}
  mod_carboncopy: {}
  mod_client_state: {}
  mod_configure: {}
  mod_disco: {}
  mod_fail2ban: {}
  mod_last: {}
  mod_muc:
    access:
      - allow
    access_admin:
      - allow: admin
    access_create: local
    access_persistent: local
    default_room_options:
      members_only: true
      anonymous: false
      persistent: true
      public: false
  mod_muc_admin: {}
  mod_offline:
    access_max_user_messages: max_user_offline_messages
  mod_ping: {}
  mod_pres_counter:
    count: 5
    interval: 60
  mod_privacy: {}
  mod_private: {}
  mod_pubsub:
    access_createnode: pubsub_createnode
    plugins:
      - flat
      - pep
  mod_push: {}
  mod_push_keepalive: {}
  mod_roster:
    versioning: true
  mod_shared_roster: {}
  mod_sic: {}
  mod_stream_mgmt:
    resend_on_timeout: if_offline
  mod_vcard:
    search: false
  mod_vcard_xupdate: {}
  mod_version: {}
";

impl XmppServer for Ejabberd {
    fn kind(&self) -> ServerKind {
        ServerKind::Ejabberd
    }

    fn domain(&self) -> &str {
        Ejabberd::domain(self)
    }

    fn c2s_addr(&self) -> SocketAddr {
        Ejabberd::c2s_addr(self)
    }

    fn ca_cert_path(&self) -> &Path {
        Ejabberd::ca_cert_path(self)
    }

    fn ca_cert_der(&self) -> &[u8] {
        Ejabberd::ca_cert_der(self)
    }

    fn log_path(&self) -> &Path {
        Ejabberd::log_path(self)
    }

    fn register(&self, user: &str, password: &str) {
        Ejabberd::register(self, user, password);
    }

    fn pid(&self) -> Option<u32> {
        Ejabberd::pid(self)
    }

    fn is_running(&mut self) -> bool {
        Ejabberd::is_running(self)
    }

    fn start(&mut self) {
        Ejabberd::start(self);
    }

    fn stop(&mut self) {
        Ejabberd::stop(self);
    }

    fn kill(&mut self) {
        Ejabberd::kill(self);
    }
}

impl Drop for Ejabberd {
    fn drop(&mut self) {
        self.note_children();
        // Dropping the daemon stops it and, in a failing test, prints its output.
        drop(self.daemon.take());
        kill_leftovers(&std::mem::take(&mut self.children));
        if thread::panicking() {
            eprintln!(
                "----- ejabberd for {}: config {}, log {}, last {LOG_TAIL_LINES} lines:\n{}\n----- end of ejabberd log",
                self.domain,
                self.config.display(),
                self.log.display(),
                log_tail(&self.log, LOG_TAIL_LINES)
            );
        }
    }
}

/// Kills (SIGKILL, by PID) the ejabberd VMs that an earlier test process started and could not
/// stop because it died without running destructors: those whose directory lies in
/// `$TMPDIR/ipl-<pid>-...` for a PID that no longer runs. [`EjabberdBuilder::start`] calls it
/// once per process. (A VM inside a namespace also dies with the namespace sweep.)
pub fn sweep_stale_ejabberd() {
    crate::process::sweep_stale_servers(
        "ejabberd",
        |args| {
            args.first().is_some_and(|arg| arg.ends_with("/beam.smp"))
                && args.iter().any(|arg| arg == LAB_DIR_FLAG)
        },
        LAB_DIR_FLAG,
    );
}

/// Where Debian installs ejabberd's Erlang applications (`ejabberdctl` sets `ERL_LIBS` to it).
///
/// # Panics
/// When ejabberd is not installed there.
fn erl_libs() -> PathBuf {
    let libs = PathBuf::from(format!("/usr/lib/{}-linux-gnu", std::env::consts::ARCH));
    let installed = std::fs::read_dir(&libs).is_ok_and(|entries| {
        entries.flatten().any(|entry| {
            entry
                .file_name()
                .to_str()
                .is_some_and(|name| name.starts_with("ejabberd-"))
        })
    });
    assert!(
        installed,
        "ejabberd is not installed (no {}/ejabberd-*): apt-get install ejabberd",
        libs.display()
    );
    libs
}

/// Gives `dir` and everything in it to the `ejabberd` user, and makes sure that user can reach
/// it: each directory above must let others through. The lab's own directories get `o+x`;
/// any other that lacks it is an error.
///
/// # Panics
/// When that cannot be done.
fn hand_over(dir: &Path) {
    let mut cmd = Command::new("chown");
    cmd.args(["-R", &format!("{EJABBERD_USER}:{EJABBERD_USER}")])
        .arg(dir);
    run_checked(&mut cmd, "hand ejabberd's directory to its user");
    for above in dir.ancestors().skip(1) {
        let meta = std::fs::metadata(above)
            .unwrap_or_else(|e| panic!("cannot inspect {}: {e}", above.display()));
        let mut perms = meta.permissions();
        if perms.mode() & 0o001 != 0 {
            continue;
        }
        let ours = above
            .file_name()
            .and_then(|name| name.to_str())
            .is_some_and(|name| name.starts_with(PREFIX));
        assert!(
            ours,
            "ejabberd runs as user {EJABBERD_USER}, which cannot enter {} (mode {:o}): give \
             it o+x or set TMPDIR elsewhere",
            above.display(),
            perms.mode() & 0o7777
        );
        perms.set_mode(perms.mode() | 0o001);
        std::fs::set_permissions(above, perms)
            .unwrap_or_else(|e| panic!("cannot chmod o+x {}: {e}", above.display()));
    }
}

/// A fresh Erlang cookie: 32 hex digits from the kernel's random source.
fn random_cookie() -> String {
    use std::io::Read as _;
    let mut bytes = [0_u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .unwrap_or_else(|e| panic!("cannot read /dev/urandom: {e}"));
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// The paths and tails of ejabberd's output and log, for panic messages.
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

/// A YAML double-quoted scalar (a JSON string is one).
fn yaml_str(value: &str) -> String {
    serde_json::Value::from(value).to_string()
}

/// An Erlang string literal, as `-mnesia dir` wants its value.
fn erlang_string(value: &str) -> String {
    let mut s = String::with_capacity(value.len() + 2);
    s.push('"');
    for c in value.chars() {
        if matches!(c, '"' | '\\') {
            s.push('\\');
        }
        s.push(c);
    }
    s.push('"');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_quoted_for_yaml_and_erlang() {
        assert_eq!(yaml_str("a\"b\\c"), "\"a\\\"b\\\\c\"");
        assert_eq!(erlang_string("/tmp/a \"b\""), "\"/tmp/a \\\"b\\\"\"");
    }

    #[test]
    fn cookies_are_fresh_hex() {
        let (a, b) = (random_cookie(), random_cookie());
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
