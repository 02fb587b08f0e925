//! A private ejabberd for one test: its own directory (config, certificate, Mnesia spool, logs),
//! Erlang node name and cookie, listening on loopback or inside a namespace on a port chosen per
//! run.
//!
//! ejabberd runs as the user `ejabberd`, as Debian's package sets it up: the directory is handed
//! to that user, and every directory above it must let others through (`o+x`). The Erlang VM is
//! started directly (what `ejabberdctl foreground` runs), so the process the lab holds is the VM
//! itself: SIGTERM stops ejabberd cleanly, SIGKILL crashes it. Its Erlang distribution (which
//! `ejabberdctl register` talks to) listens on loopback on a fixed port, without epmd, so that no
//! process outlives the test; the nodes of a cluster listen on their server's address instead,
//! all on one port, so that they reach each other across namespaces.
//!
//! The config is `docs/examples/ejabberd.yml`, the one `docs/servers.md` gives, with the lab's
//! certificate and address.

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

/// The field of `ejabberdctl connected_users_info` that names a session's node.
const SESSION_NODE_FIELD: usize = 5;

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
    /// For a node of a cluster: its distribution reachable at its own address.
    cluster: Option<ClusterRole>,
    certificate_login: bool,
}

/// How a node of a cluster gets its distribution port and cookie.
#[derive(Debug)]
enum ClusterRole {
    /// The first node: a port and a cookie of its own.
    First,
    /// A node that joins the first: its port and cookie.
    Of { port: u16, cookie: String },
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

    /// Lets clients log in with a certificate that the test CA signed (SASL EXTERNAL, the JID
    /// in the certificate): the c2s listener asks for client certificates (`tls_verify`) and
    /// checks them against the CA (`c2s_cafile`). Off by default.
    #[must_use]
    pub fn certificate_login(mut self) -> EjabberdBuilder {
        self.certificate_login = true;
        self
    }

    /// Makes this the first node of a cluster: its Erlang distribution listens on the server's
    /// own address (the node is `ipl-...@ADDRESS`) instead of loopback, so that nodes in other
    /// namespaces reach it; [`EjabberdBuilder::cluster_of`] starts the others.
    #[must_use]
    pub fn clustered(mut self) -> EjabberdBuilder {
        self.cluster = Some(ClusterRole::First);
        self
    }

    /// Makes this a node that can join the cluster of `first` ([`Ejabberd::join_cluster`]):
    /// like [`EjabberdBuilder::clustered`], with the cookie and distribution port of `first`
    /// (without epmd, every node of a cluster listens on the same port). Give both the same
    /// CA with [`EjabberdBuilder::ca`], so that clients trust every node.
    ///
    /// # Panics
    /// When `first` was not started [`EjabberdBuilder::clustered`].
    #[must_use]
    pub fn cluster_of(mut self, first: &Ejabberd) -> EjabberdBuilder {
        assert!(
            first.clustered,
            "ejabberd for {} is not clustered: start it with EjabberdBuilder::clustered",
            first.domain
        );
        self.cluster = Some(ClusterRole::Of {
            port: first.dist_port,
            cookie: first.cookie.clone(),
        });
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
        let (dist_ip, clustered) = match self.cluster {
            Some(_) => (self.ip, true),
            None => (IpAddr::V4(Ipv4Addr::LOCALHOST), false),
        };
        let (dist_port, cookie) = match self.cluster {
            Some(ClusterRole::Of { port, cookie }) => (port, cookie),
            Some(ClusterRole::First) | None => {
                (free_port(self.netns.as_ref(), dist_ip), random_cookie())
            }
        };
        let port = loop {
            let port = free_port(self.netns.as_ref(), self.ip);
            if port != dist_port {
                break port;
            }
        };
        let node = if clustered {
            format!("{PREFIX}{}-{id}@{dist_ip}", std::process::id())
        } else {
            format!("{PREFIX}{}-{id}@localhost", std::process::id())
        };
        let mut ejabberd = Ejabberd {
            daemon: None,
            children: Vec::new(),
            netns: self.netns,
            addr: SocketAddr::new(self.ip, port),
            dist_port,
            dist_ip,
            clustered,
            node,
            cookie,
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
        let mut config = ejabberd.config_yaml();
        if self.certificate_login {
            config = certificate_login(&config, &ejabberd.ca_cert.to_string_lossy());
        }
        write(&ejabberd.config, &config);
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
    /// The Erlang distribution port, on `dist_ip`.
    dist_port: u16,
    /// Loopback, or the server's address for a node of a cluster.
    dist_ip: IpAddr,
    /// Whether the node can be part of a cluster (long node name at `dist_ip`).
    clustered: bool,
    /// The Erlang node name, `ipl-<pid>-<n>@localhost`, or `ipl-<pid>-<n>@ADDRESS` for a node
    /// of a cluster.
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
            cluster: None,
            certificate_login: false,
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

    /// The Erlang node name (what `ejabberdctl list_cluster` and `join_cluster` name).
    #[must_use]
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Joins the cluster that `other` belongs to, with `ejabberdctl join_cluster` as an
    /// operator does: this node drops its own data (accounts, rosters, rooms) and takes the
    /// cluster's, then restarts its services. Returns once both nodes list each other and this
    /// one accepts clients again.
    ///
    /// # Panics
    /// When this node was not started [`EjabberdBuilder::cluster_of`] `other`'s cluster, or
    /// the join fails; the message carries `ejabberdctl`'s output.
    pub fn join_cluster(&mut self, other: &Ejabberd) {
        assert!(
            self.clustered && self.cookie == other.cookie,
            "ejabberd node {} was not started with EjabberdBuilder::cluster_of({})",
            self.node,
            other.node
        );
        let mut cmd = self.ctl();
        cmd.args(["join_cluster", &other.node]);
        run_checked(
            &mut cmd,
            &format!("join ejabberd node {} to {}", self.node, other.node),
        );
        let mut started = self.ctl();
        started.arg("started");
        run_checked(
            &mut started,
            &format!("wait for ejabberd node {} to start again", self.node),
        );
        let (stdout, log) = (self.stdout.clone(), self.log.clone());
        let what = format!("ejabberd node {} after joining the cluster", self.node);
        wait_accepting(
            &what,
            self.netns.as_ref(),
            self.addr,
            EJABBERD_READY_TIMEOUT,
            &mut self.daemon,
            move || logs(&stdout, &log),
        );
        for node in [&*self, other] {
            let members = node.cluster_nodes();
            assert!(
                members.contains(&self.node) && members.contains(&other.node),
                "after join_cluster, {} lists the cluster {members:?}",
                node.node
            );
        }
    }

    /// The nodes of this node's cluster, itself included (`ejabberdctl list_cluster`).
    ///
    /// # Panics
    /// When `ejabberdctl` fails.
    #[must_use]
    pub fn cluster_nodes(&self) -> Vec<String> {
        let mut cmd = self.ctl();
        cmd.arg("list_cluster");
        let out = run_checked(&mut cmd, &format!("list the cluster of {}", self.node));
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(|node| node.trim_matches('\'').to_owned())
            .collect()
    }

    /// The client sessions of the whole cluster, each as its full JID and the node it is
    /// connected to (`ejabberdctl connected_users_info`).
    ///
    /// # Panics
    /// When `ejabberdctl` fails.
    #[must_use]
    pub fn sessions(&self) -> Vec<(String, String)> {
        let mut cmd = self.ctl();
        cmd.arg("connected_users_info");
        let out = run_checked(&mut cmd, &format!("list the sessions on {}", self.node));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|line| {
                let fields: Vec<&str> = line.split('\t').collect();
                Some((
                    (*fields.first()?).to_owned(),
                    (*fields.get(SESSION_NODE_FIELD)?).to_owned(),
                ))
            })
            .collect()
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
    /// its own on loopback (on the server's address for a node of a cluster) and no epmd.
    fn vm_args(&self) -> Vec<String> {
        let spool = self.dir.join("spool");
        let interface = match self.dist_ip {
            IpAddr::V4(ip) => {
                let [a, b, c, d] = ip.octets();
                format!("{{{a},{b},{c},{d}}}")
            }
            IpAddr::V6(ip) => {
                let words: Vec<String> = ip.segments().iter().map(u16::to_string).collect();
                format!("{{{}}}", words.join(","))
            }
        };
        [
            if self.clustered { "-name" } else { "-sname" },
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
            &interface,
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

    /// `ejabberd.yml`: the config documented in `docs/servers.md` for this test's domain, with
    /// the lab's certificate, the c2s listener on this test's address and port, and without
    /// `mod_stun_disco` (the lab has no coturn at the documented address); then the lab's own
    /// settings (logging).
    fn config_yaml(&self) -> String {
        let certfile = self.dir.join("certs").join("server.pem");
        let documented = lab_config(
            &DOCUMENTED_CONFIG.replace("@DOMAIN@", &self.domain),
            &certfile.to_string_lossy(),
            self.addr,
        );
        let mut s = String::new();
        // Writing to a String cannot fail.
        let _ = writeln!(s, "{DOCUMENTED_HEADER}");
        s.push_str(&documented);
        let _ = writeln!(s, "{LAB_HEADER}");
        let _ = writeln!(s, "loglevel: info");
        let _ = writeln!(s, "log_rotate_count: 0");
        s
    }
}

/// `config` (the documented one) with `certfile` in place of the documented certificates,
/// the c2s listener on `addr`, and no `mod_stun_disco`.
///
/// # Panics
/// When `config` does not have each of those settings once, as documented.
fn lab_config(config: &str, certfile: &str, addr: SocketAddr) -> String {
    let replace_once = |config: &str, from: &str, to: &str| {
        assert_eq!(
            config.matches(from).count(),
            1,
            "docs/examples/ejabberd.yml has {from:?} once"
        );
        config.replace(from, to)
    };
    let config = replace_once(
        config,
        &format!("\n  - {}\n", yaml_str(DOCUMENTED_CERTFILES)),
        &format!("\n  - {}\n", yaml_str(certfile)),
    );
    let config = replace_once(
        &config,
        DOCUMENTED_C2S_ADDR,
        &format!(
            "\n    port: {}\n    ip: {}\n",
            addr.port(),
            yaml_str(&addr.ip().to_string())
        ),
    );
    without_module(&config, "mod_stun_disco")
}

/// `config` with client certificates asked for on the c2s listener and checked against `cafile`,
/// for SASL EXTERNAL; the settings docs/servers.md gives for certificate login.
fn certificate_login(config: &str, cafile: &str) -> String {
    let listener = "    starttls_required: true\n";
    assert_eq!(
        config.matches(listener).count(),
        1,
        "docs/examples/ejabberd.yml has one c2s listener with STARTTLS"
    );
    format!(
        "{}c2s_cafile: {}\n",
        config.replace(listener, &format!("{listener}    tls_verify: true\n")),
        yaml_str(cafile)
    )
}

/// `config` less the module `name` and its options.
///
/// # Panics
/// When `config` does not load that module once.
fn without_module(config: &str, name: &str) -> String {
    let head = format!("  {name}:");
    let mut out = String::with_capacity(config.len());
    let mut found = 0;
    let mut skipping = false;
    for line in config.split_inclusive('\n') {
        if line.trim_end() == head {
            found += 1;
            skipping = true;
            continue;
        }
        if skipping && line.starts_with("    ") {
            continue;
        }
        skipping = false;
        out.push_str(line);
    }
    assert_eq!(found, 1, "docs/examples/ejabberd.yml loads {name} once");
    out
}

/// The ejabberd config that `docs/servers.md` gives, with `@DOMAIN@`, `@TURN_HOST@` and
/// `@TURN_SECRET@` to fill in. Every ejabberd of the tests runs it.
const DOCUMENTED_CONFIG: &str = include_str!("../../../docs/examples/ejabberd.yml");

/// The certificates of the documented config, which the lab replaces with its own.
const DOCUMENTED_CERTFILES: &str = "/etc/ejabberd/certs/*.pem";

/// The c2s listener's address in the documented config, which the lab replaces with its own.
const DOCUMENTED_C2S_ADDR: &str = "\n    port: 5222\n    ip: \"::\"\n";

/// The line before the documented config in the config the lab writes.
const DOCUMENTED_HEADER: &str = "## ipop-lab: docs/examples/ejabberd.yml for this test.";

/// The line before the lab's own settings.
const LAB_HEADER: &str = "## ipop-lab: settings of this test's server.";

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

    /// `docs/servers.md` shows the config file the tests run, and the lab changes only the
    /// certificate, the listener's address and the STUN/TURN module in it.
    #[test]
    fn runs_the_config_that_the_documentation_shows() {
        let doc = include_str!("../../../docs/servers.md");
        assert!(
            doc.contains(&format!("```yaml\n{DOCUMENTED_CONFIG}```\n")),
            "docs/servers.md shows docs/examples/ejabberd.yml in a yaml block"
        );
        let addr: SocketAddr = "10.1.2.3:40001".parse().expect("address");
        let lab = lab_config(DOCUMENTED_CONFIG, "/tmp/lab/server.pem", addr);
        assert!(lab.contains("\n  - \"/tmp/lab/server.pem\"\n"), "{lab}");
        assert!(
            lab.contains("\n    port: 40001\n    ip: \"10.1.2.3\"\n    module: ejabberd_c2s\n"),
            "{lab}"
        );
        assert!(!lab.contains("mod_stun_disco:"), "{lab}");
        assert!(
            lab.lines()
                .filter(|line| !line.trim_start().starts_with('#'))
                .all(|line| !line.contains("@TURN_")),
            "{lab}"
        );
        assert!(
            lab.contains("  mod_stream_mgmt:\n    resend_on_timeout: if_offline\n"),
            "{lab}"
        );
        assert!(lab.contains("\n  mod_vcard:\n    search: false\n"), "{lab}");
        let removed: Vec<&str> = DOCUMENTED_CONFIG
            .lines()
            .filter(|line| !lab.lines().any(|l| l == *line))
            .collect();
        assert!(
            removed.iter().all(|line| line.contains("5222")
                || line.contains("\"::\"")
                || line.contains(DOCUMENTED_CERTFILES)
                || line.contains("mod_stun_disco")
                || line.starts_with("    ")),
            "the lab drops more than its own settings: {removed:?}"
        );
    }

    #[test]
    fn cookies_are_fresh_hex() {
        let (a, b) = (random_cookie(), random_cookie());
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
