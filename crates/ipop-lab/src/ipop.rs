//! ipop nodes: keys, configs, daemons and `ipop status --json`.

use std::fmt::Write as _;
use std::fs::Permissions;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output};
use std::time::{Duration, SystemTime};

use serde_json::Value;

use crate::dir::TestDir;
use crate::net::{Host, Lan, host_letter};
use crate::netns::Netns;
use crate::process::{Daemon, log_tail};
use crate::{run_checked, wait_until};

/// Runs `ipop init --static DIR/ipop.toml` (which writes a config and `ipop.key`) and returns
/// the public key that `ipop key` prints for it.
///
/// # Panics
/// When either command fails or the key does not look like a base64 Curve25519 key.
#[must_use]
pub fn generate_key(bin: &Path, dir: &Path) -> String {
    std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    let config = dir.join("ipop.toml");
    run_checked(
        Command::new(bin).args(["init", "--static"]).arg(&config),
        "generate a key with `ipop init`",
    );
    let out = run_checked(
        Command::new(bin).arg("key").arg("-c").arg(&config),
        "read a public key with `ipop key`",
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let key = stdout.lines().next().unwrap_or_default().trim().to_owned();
    assert!(
        key.len() == 44 && key.ends_with('='),
        "`ipop key` should print a base64 public key on its first line, printed {stdout:?}"
    );
    key
}

/// Runs `ipop status --json -c CONFIG` in `ns` and parses its output. `Err` carries the reason
/// (the daemon's stderr, or the output that is not JSON), for polling with [`wait_until`].
pub fn status_json(ns: &Netns, bin: &Path, config: &Path) -> Result<Value, String> {
    let out = ns
        .command(bin)
        .args(["status", "--json", "-c"])
        .arg(config)
        .output()
        .map_err(|e| format!("cannot run ipop status: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "ipop status failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| {
        format!(
            "ipop status --json printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// Every peer of every overlay in a status.
#[must_use]
pub fn status_peers(status: &Value) -> Vec<&Value> {
    status["overlays"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|overlay| overlay["peers"].as_array())
        .flatten()
        .collect()
}

/// The peer whose `id` (public key) is `id`, in any overlay.
#[must_use]
pub fn find_peer<'a>(status: &'a Value, id: &str) -> Option<&'a Value> {
    status_peers(status)
        .into_iter()
        .find(|peer| peer["id"].as_str() == Some(id))
}

/// A string field of the peer `id`, such as `state` or `reason`; `None` when the peer is
/// missing or the field is not a string.
#[must_use]
pub fn peer_field<'a>(status: &'a Value, id: &str, field: &str) -> Option<&'a str> {
    find_peer(status, id)?.get(field)?.as_str()
}

/// A peer entry of a config (`[[peers]]`).
#[derive(Clone, Debug)]
pub struct Peer {
    pub name: Option<String>,
    pub public_key: String,
    /// `10.0.0.2:51820` or `[fd00::2]:51820`.
    pub endpoint: Option<String>,
    pub addresses: Vec<String>,
    pub keepalive: Option<u32>,
}

/// An ipop config, rendered by [`Config::to_toml`].
#[derive(Clone, Debug)]
pub struct Config {
    pub private_key_file: PathBuf,
    pub log_level: String,
    pub control_socket: PathBuf,
    /// Pinned keys and chosen addresses (relative to the config file).
    pub state_dir: PathBuf,
    pub interface: String,
    pub addresses: Vec<String>,
    pub mtu: Option<u32>,
    pub listen_port: u16,
    pub peers: Vec<Peer>,
    /// More TOML, appended as it is (the `[xmpp]`, `[social]` and `[[groups]]` sections).
    pub extra: String,
}

impl Config {
    #[must_use]
    pub fn to_toml(&self) -> String {
        let mut s = String::new();
        // Writing to a String cannot fail.
        let _ = writeln!(s, "[device]");
        let _ = writeln!(
            s,
            "private_key_file = {}",
            quote(&self.private_key_file.to_string_lossy())
        );
        let _ = writeln!(s, "log_level = {}", quote(&self.log_level));
        let _ = writeln!(
            s,
            "control_socket = {}",
            quote(&self.control_socket.to_string_lossy())
        );
        let _ = writeln!(
            s,
            "state_dir = {}",
            quote(&self.state_dir.to_string_lossy())
        );
        let _ = writeln!(s, "\n[interface]");
        let _ = writeln!(s, "name = {}", quote(&self.interface));
        let _ = writeln!(s, "addresses = {}", quote_list(&self.addresses));
        if let Some(mtu) = self.mtu {
            let _ = writeln!(s, "mtu = {mtu}");
        }
        let _ = writeln!(s, "listen_port = {}", self.listen_port);
        for peer in &self.peers {
            let _ = writeln!(s, "\n[[peers]]");
            if let Some(name) = &peer.name {
                let _ = writeln!(s, "name = {}", quote(name));
            }
            let _ = writeln!(s, "public_key = {}", quote(&peer.public_key));
            if let Some(endpoint) = &peer.endpoint {
                let _ = writeln!(s, "endpoint = {}", quote(endpoint));
            }
            let _ = writeln!(s, "addresses = {}", quote_list(&peer.addresses));
            if let Some(keepalive) = peer.keepalive {
                let _ = writeln!(s, "keepalive = {keepalive}");
            }
        }
        if !self.extra.is_empty() {
            let _ = writeln!(s, "\n{}", self.extra);
        }
        s
    }
}

/// A TOML basic string.
fn quote(value: &str) -> String {
    let mut s = String::with_capacity(value.len() + 2);
    s.push('"');
    for c in value.chars() {
        match c {
            '"' => s.push_str("\\\""),
            '\\' => s.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(s, "\\u{:04X}", u32::from(c));
            }
            c => s.push(c),
        }
    }
    s.push('"');
    s
}

fn quote_list(values: &[String]) -> String {
    let items: Vec<String> = values.iter().map(|v| quote(v)).collect();
    format!("[{}]", items.join(", "))
}

/// One ipop device: a host on the LAN, its directory (config, key, control socket, log) and
/// its daemon when started. Node `i` (from 0) has overlay addresses `10.77.0.{i+1}` and
/// `fd77::{i+1}`.
#[derive(Debug)]
pub struct Node {
    /// Declared first: stopped before the namespace is deleted.
    daemon: Option<Daemon>,
    pub host: Host,
    pub name: String,
    pub dir: PathBuf,
    pub public_key: String,
    pub overlay_v4: Ipv4Addr,
    pub overlay_v6: Ipv6Addr,
    bin: PathBuf,
}

impl Node {
    /// Makes the node's directory `parent/NAME` and its key (with `ipop init`).
    #[must_use]
    pub fn new(bin: &Path, host: Host, name: &str, parent: &Path, index: u8) -> Node {
        let dir = parent.join(name);
        let public_key = generate_key(bin, &dir);
        let n = index.checked_add(1).expect("at most 254 nodes");
        Node {
            daemon: None,
            host,
            name: name.to_owned(),
            dir,
            public_key,
            overlay_v4: Ipv4Addr::new(10, 77, 0, n),
            overlay_v6: Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, u16::from(n)),
            bin: bin.to_owned(),
        }
    }

    #[must_use]
    pub fn ns(&self) -> &Netns {
        &self.host.ns
    }

    #[must_use]
    pub fn config_path(&self) -> PathBuf {
        self.dir.join("ipop.toml")
    }

    #[must_use]
    pub fn socket_path(&self) -> PathBuf {
        self.dir.join("ctl.sock")
    }

    /// The daemon's log; restarts append to it.
    #[must_use]
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("ipop.log")
    }

    /// A config for this node, without peers: the key from `ipop init`, a control socket in
    /// the node's directory, interface `ipop0` with the node's overlay addresses.
    #[must_use]
    pub fn config(&self, listen_port: u16) -> Config {
        Config {
            private_key_file: PathBuf::from("ipop.key"),
            log_level: "debug".to_owned(),
            control_socket: self.socket_path(),
            state_dir: PathBuf::from("state"),
            interface: "ipop0".to_owned(),
            addresses: vec![
                format!("{}/24", self.overlay_v4),
                format!("{}/64", self.overlay_v6),
            ],
            mtu: Some(1420),
            listen_port,
            peers: Vec::new(),
            extra: String::new(),
        }
    }

    /// This node as a peer entry for another node's config, with its IPv4 underlay endpoint at
    /// `listen_port` (or no endpoint).
    #[must_use]
    pub fn as_peer(&self, listen_port: Option<u16>) -> Peer {
        Peer {
            name: Some(self.name.clone()),
            public_key: self.public_key.clone(),
            endpoint: listen_port.map(|port| format!("{}:{port}", self.host.ipv4)),
            addresses: vec![
                format!("{}/32", self.overlay_v4),
                format!("{}/128", self.overlay_v6),
            ],
            keepalive: None,
        }
    }

    /// Writes `config` as the node's `ipop.toml`.
    /// Writes the node's config file, readable by its owner only: tests put passwords in it,
    /// which ipop warns of in a file that others can read.
    pub fn write_config(&self, config: &Config) {
        let path = self.config_path();
        std::fs::write(&path, config.to_toml())
            .and_then(|()| std::fs::set_permissions(&path, Permissions::from_mode(0o600)))
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    }

    /// Starts `ipop up -c CONFIG` in the node's namespace.
    ///
    /// # Panics
    /// When the daemon already runs or cannot be started.
    pub fn start(&mut self) {
        assert!(self.daemon.is_none(), "ipop {} already runs", self.name);
        let mut cmd = self.host.ns.command(&self.bin);
        cmd.arg("up").arg("-c").arg(self.config_path());
        crate::machine::watch();
        self.daemon = Some(Daemon::spawn(
            &format!("ipop {}", self.name),
            cmd,
            &self.log_path(),
        ));
    }

    /// Stops the daemon with SIGTERM and returns its exit status.
    ///
    /// # Panics
    /// When it is not running, or ignores SIGTERM (see [`Daemon::stop`]).
    pub fn stop(&mut self) -> ExitStatus {
        if !std::thread::panicking()
            && let Err(e) = self.check_loop_stall()
        {
            panic!("{e}");
        }
        let daemon = self
            .daemon
            .take()
            .unwrap_or_else(|| panic!("ipop {} is not running", self.name));
        daemon.stop()
    }

    /// Stops the daemon like [`Node::stop`], without judging its loop stall: for benchmarks
    /// that load the machine beyond what the tests allow. SIGTERM, then SIGKILL after
    /// `timeout`; returns how it ended and whether it had to be killed, or `None` when it was
    /// not running.
    pub fn stop_within(&mut self, timeout: Duration) -> Option<(ExitStatus, bool)> {
        let mut daemon = self.daemon.take()?;
        Some(daemon.stop_within(timeout))
    }

    /// The daemon's PID, once started (it may have exited since: see [`Node::exited`]).
    #[must_use]
    pub fn pid(&self) -> Option<u32> {
        self.daemon.as_ref().map(Daemon::pid)
    }

    /// Whether the daemon's packet loop stayed under [`MAX_LOOP_STALL`] without waiting, by
    /// its status. A daemon that is not running, or does not answer, is not judged here.
    pub fn check_loop_stall(&mut self) -> Result<(), String> {
        if self.daemon.is_none() || self.exited().is_some() {
            return Ok(());
        }
        let status = match self.status() {
            Ok(s) => s,
            Err(e) => {
                eprintln!(
                    "ipop {}: no status to read the loop stall from: {e}",
                    self.name
                );
                return Ok(());
            }
        };
        let stall = status["loop_stall_max_s"].as_f64().unwrap_or_default();
        if stall >= MAX_LOOP_STALL.as_secs_f64() {
            let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
            let stalls: Vec<(LongStall, Duration)> = long_stalls(&log)
                .filter(|s| s.own >= MAX_LOOP_STALL)
                .map(|s| {
                    let stopped = crate::machine::stopped_during(s.end - s.wall, s.end);
                    (s, stopped)
                })
                .collect();
            let blamed = stalls
                .iter()
                .find(|(s, stopped)| s.own.saturating_sub(*stopped) >= MAX_LOOP_STALL);
            if stalls.is_empty() || blamed.is_some() {
                let stopped = blamed.map_or(String::new(), |(s, stopped)| {
                    let late = crate::machine::late_per_cpu(s.end - s.wall, s.end);
                    format!(
                        "; the whole machine was stopped for {stopped:.1?} of it, and each \
                         CPU's watcher was late {late:.1?} in it"
                    )
                });
                return Err(format!(
                    "ipop {}: its packet loop went {:.1} ms without waiting (limit {} ms){stopped}; log {}",
                    self.name,
                    stall * 1000.0,
                    MAX_LOOP_STALL.as_millis(),
                    self.log_path().display()
                ));
            }
            for (s, stopped) in &stalls {
                eprintln!(
                    "ipop {}: its packet loop went {:.1?} without waiting, while the whole machine was stopped for {stopped:.1?} (not counted against it)",
                    self.name, s.own
                );
            }
            return Ok(());
        }
        eprintln!(
            "ipop {}: longest loop stall in the last minute {:.2} ms",
            self.name,
            stall * 1000.0
        );
        Ok(())
    }

    /// How the daemon ended, if it was started and has ended since (a crash, say).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.daemon.as_mut()?.try_wait()
    }

    /// Panics if the daemon was started and has ended since, naming `what` the test was doing.
    pub fn assert_running(&mut self, what: &str) {
        if let Some(exit) = self.exited() {
            panic!(
                "ipop {} exited ({exit}) during {what}; log {}",
                self.name,
                self.log_path().display()
            );
        }
    }

    /// `ipop status --json` for this node.
    pub fn status(&self) -> Result<Value, String> {
        status_json(&self.host.ns, &self.bin, &self.config_path())
    }

    /// Polls the status until `ready` holds, and returns that status.
    ///
    /// # Panics
    /// When `timeout` passes first (naming `what` and the last status), or when the daemon
    /// exits meanwhile.
    pub fn wait_status(
        &mut self,
        timeout: Duration,
        what: &str,
        mut ready: impl FnMut(&Value) -> bool,
    ) -> Value {
        let what = format!("{what} (on node {})", self.name);
        wait_until(timeout, &what, || {
            self.assert_running(&format!("the wait for {what}"));
            let status = self.status()?;
            if ready(&status) {
                Ok(status)
            } else {
                Err(status.to_string())
            }
        })
    }

    /// Waits until this node's status shows `peer` in state `state`.
    pub fn wait_peer_state(&mut self, peer: &Node, state: &str, timeout: Duration) -> Value {
        let id = peer.public_key.clone();
        self.wait_status(timeout, &format!("peer {} {state}", peer.name), |s| {
            peer_field(s, &id, "state") == Some(state)
        })
    }

    /// Pings from this node's namespace (see [`Netns::ping`]).
    #[must_use]
    pub fn ping(&self, addr: IpAddr, count: u32) -> Output {
        self.host.ns.ping(addr, count)
    }
}

/// Every end-to-end test fails when a daemon it ran still shows a longer stall of its packet
/// loop than this at the end (see [`Node::check_loop_stall`]).
///
/// A wake-up's own work is bounded at about 2 ms (the read loops yield after that), and a quiet
/// run of the suite shows at most about 1 ms. The margin is for the kernel: without
/// `CONFIG_IRQ_TIME_ACCOUNTING` (Debian's kernels and this project's CI have none), interrupt and
/// softirq work done while the loop's thread is on the CPU, such as another flow's packets, is
/// billed to that thread. With a CPU hog on one core, one wake-up that handled a single ping was
/// billed 10.6 ms while a stranger flooded the XMPP server beside it.
///
/// A stall during which the whole machine was stopped (a virtual machine whose host paused
/// it: [`crate::machine`]'s watchers of every CPU held up at once) is judged without the stop:
/// the loop was charged for time in which nothing ran.
pub const MAX_LOOP_STALL: Duration = Duration::from_millis(20);

/// A long stall, as a daemon logs it: when it ended, how much of it was the loop's own doing,
/// and its wall time.
#[derive(Debug, PartialEq)]
struct LongStall {
    end: SystemTime,
    own: Duration,
    wall: Duration,
}

/// The long stalls a daemon's log reports.
fn long_stalls(log: &str) -> impl Iterator<Item = LongStall> {
    log.lines()
        .filter(|line| line.contains("the packet loop went long without waiting"))
        .filter_map(|line| {
            let (time, fields) = line.split_once(' ')?;
            let end = chrono::DateTime::parse_from_rfc3339(time).ok()?;
            let field = |name: &str| {
                fields
                    .split_ascii_whitespace()
                    .find_map(|w| w.strip_prefix(name)?.parse::<f64>().ok())
                    .and_then(|ms| Duration::try_from_secs_f64(ms / 1000.0).ok())
            };
            Some(LongStall {
                end: end.into(),
                own: field("ms=")?,
                wall: field("wall_ms=")?,
            })
        })
}

impl Drop for Node {
    /// Checks the loop stall before the daemon is stopped (by its own drop). A failing check
    /// fails the test, unless the test is failing already (a second panic would abort).
    fn drop(&mut self) {
        if std::thread::panicking() {
            return;
        }
        if let Err(e) = self.check_loop_stall() {
            panic!("{e}");
        }
    }
}

/// Nodes `a`, `b`, ... on one LAN, each with a key, in a test directory. Drop order: daemons,
/// then namespaces, then the directory.
#[derive(Debug)]
pub struct Lab {
    pub nodes: Vec<Node>,
    pub lan: Lan,
    pub dir: TestDir,
    bin: PathBuf,
}

impl Lab {
    /// A LAN of `n` nodes with keys generated by `bin` (the `ipop` binary).
    #[must_use]
    pub fn new(bin: impl AsRef<Path>, tag: &str, n: u8) -> Lab {
        let bin = bin.as_ref().to_owned();
        let dir = TestDir::new(tag);
        let mut lan = Lan::new(tag, n);
        let nodes = std::mem::take(&mut lan.hosts)
            .into_iter()
            .zip(0..n)
            .map(|(host, i)| {
                Node::new(&bin, host, &host_letter(i.saturating_add(1)), dir.path(), i)
            })
            .collect();
        Lab {
            nodes,
            lan,
            dir,
            bin,
        }
    }

    /// Generates a key that belongs to no node, in `DIR/label`.
    #[must_use]
    pub fn spare_key(&self, label: &str) -> String {
        generate_key(&self.bin, &self.dir.path().join(label))
    }

    /// Configs for a full mesh: every node listens on `listen_port` and names every other node
    /// with its endpoint.
    #[must_use]
    pub fn mesh_configs(&self, listen_port: u16) -> Vec<Config> {
        self.nodes
            .iter()
            .map(|node| {
                let mut config = node.config(listen_port);
                config.peers = self
                    .nodes
                    .iter()
                    .filter(|other| other.name != node.name)
                    .map(|other| other.as_peer(Some(listen_port)))
                    .collect();
                config
            })
            .collect()
    }

    /// Writes [`Lab::mesh_configs`] and starts every daemon.
    pub fn start_mesh(&mut self, listen_port: u16) {
        let configs = self.mesh_configs(listen_port);
        for (node, config) in self.nodes.iter_mut().zip(&configs) {
            node.write_config(config);
            node.start();
        }
    }

    /// Stops every started daemon with SIGTERM and checks that each exits with success, so that
    /// a daemon that crashed during the test fails it, and that its loop stall stayed under
    /// [`MAX_LOOP_STALL`].
    ///
    /// # Panics
    /// When a daemon ended with a failure, naming it and showing its log's last lines.
    pub fn stop_all(&mut self) {
        for node in &mut self.nodes {
            if let Err(e) = node.check_loop_stall() {
                panic!("{e}");
            }
            if let Some(daemon) = node.daemon.take() {
                let status = daemon.stop();
                let log = node.log_path();
                assert!(
                    status.success(),
                    "ipop {} ended with {status}, not with success on SIGTERM; log {}:\n{}",
                    node.name,
                    log.display(),
                    log_tail(&log, 40)
                );
            }
        }
    }

    /// Waits until every node shows every other node `connected`.
    pub fn wait_all_connected(&mut self, timeout: Duration) {
        let peers: Vec<(String, String)> = self
            .nodes
            .iter()
            .map(|n| (n.name.clone(), n.public_key.clone()))
            .collect();
        for node in &mut self.nodes {
            let own = node.name.clone();
            for (name, key) in peers.iter().filter(|(name, _)| *name != own) {
                node.wait_status(timeout, &format!("peer {name} connected"), |s| {
                    peer_field(s, key, "state") == Some("connected")
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn config_renders_as_toml() {
        let config = Config {
            private_key_file: PathBuf::from("ipop.key"),
            log_level: "debug".to_owned(),
            control_socket: PathBuf::from("/tmp/x \"y\"/ctl.sock"),
            state_dir: PathBuf::from("state"),
            interface: "ipop0".to_owned(),
            addresses: vec!["10.77.0.1/24".to_owned(), "fd77::1/64".to_owned()],
            mtu: None,
            listen_port: 51820,
            peers: vec![Peer {
                name: Some("b".to_owned()),
                public_key: "KEY=".to_owned(),
                endpoint: Some("[fd00::2]:51820".to_owned()),
                addresses: vec!["10.77.0.2/32".to_owned()],
                keepalive: Some(25),
            }],
            extra: String::new(),
        };
        let toml = config.to_toml();
        assert!(toml.starts_with("[device]\nprivate_key_file = \"ipop.key\"\n"));
        assert!(toml.contains("control_socket = \"/tmp/x \\\"y\\\"/ctl.sock\"\n"));
        assert!(toml.contains("addresses = [\"10.77.0.1/24\", \"fd77::1/64\"]\n"));
        assert!(!toml.contains("mtu"));
        assert!(toml.contains(
            "\n[[peers]]\nname = \"b\"\npublic_key = \"KEY=\"\nendpoint = \"[fd00::2]:51820\"\n\
             addresses = [\"10.77.0.2/32\"]\nkeepalive = 25\n"
        ));
    }

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(quote("a\nb\\"), "\"a\\u000Ab\\\\\"");
    }

    #[test]
    fn peers_are_found_across_overlays() {
        let status = json!({"overlays": [
            {"name": "static", "peers": [{"id": "A", "state": "connected", "reason": null}]},
            {"name": "other", "peers": [{"id": "B", "state": "waiting", "reason": "no key"}]},
        ]});
        assert_eq!(status_peers(&status).len(), 2);
        assert_eq!(peer_field(&status, "B", "state"), Some("waiting"));
        assert_eq!(peer_field(&status, "B", "reason"), Some("no key"));
        assert_eq!(peer_field(&status, "A", "reason"), None);
        assert!(find_peer(&status, "C").is_none());
        assert!(status_peers(&json!({})).is_empty());
    }

    #[test]
    fn long_stalls_are_read_from_the_log() {
        let log = "\
2026-12-06T03:32:21.583506Z  INFO ipop: ipop is up interface=ipop0 port=51820
2026-12-06T03:32:26.791993Z  INFO ipop::dataplane: the packet loop went long without waiting \
what=\"udp4\" ms=235.979778 wall_ms=776.4157280000001 woken_ms=703.05336 cpu_ms=197.8
2026-12-06T03:32:27.5Z  INFO ipop::dataplane: the packet loop went long without waiting ms=x
";
        let stalls: Vec<LongStall> = long_stalls(log).collect();
        let end = SystemTime::UNIX_EPOCH + Duration::from_micros(1_796_527_946_791_993);
        assert_eq!(
            stalls,
            [LongStall {
                end,
                own: Duration::from_nanos(235_979_778),
                wall: Duration::from_nanos(776_415_728),
            }]
        );
    }
}
