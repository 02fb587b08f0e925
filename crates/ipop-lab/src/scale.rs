//! The scale benchmark behind `bench/scale.sh` and the `ipop-scale` binary: N devices in one
//! group room and one more device whose user has the N users as friends, each device in its
//! own namespace with its own `ipop up`, on one LAN with one XMPP server that has its stock
//! client rate limits.
//!
//! It measures the time from starting every daemon to every wanted pair passing a ping (each
//! pair of group members, and the well-connected device with each friend), what the XMPP
//! session of each device cost (stanzas and bytes, link offers, failed signals), and once
//! linked, each daemon's idle CPU and memory. [`Report::table`] prints it, [`Report::json`]
//! gives it to scripts.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::ejabberd::Ejabberd;
use crate::icmp;
use crate::ipop::{Lab, Node};
use crate::nsenter::NsHandle;
use crate::prosody::Prosody;
use crate::server::{ServerKind, XmppServer};
use crate::xmpp_user::XmppUser;

/// The accounts' domain.
const DOMAIN: &str = "example.org";
/// The group room, `ROOM@conference.DOMAIN`.
const ROOM: &str = "scale";
/// The group's subnet: device `i` (from 0) has `10.90.(i / 250).(i % 250 + 1)`.
const GROUP_SUBNET: &str = "10.90.0.0/16";
/// Most group devices: ejabberd's rooms hold 200 occupants by default.
pub const MAX_DEVICES: u8 = 200;
/// How often the statuses are read while waiting for the pairs.
const ROUND: Duration = Duration::from_secs(1);
/// How often a progress line is printed while waiting.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// How much longer than the wait and the idle measurement an on-demand link may stay up
/// without data (`idle_timeout`).
const IDLE_TIMEOUT_MARGIN: Duration = Duration::from_secs(120);
/// Beyond a resting link's idle time, how long the run waits for it to close: the close is
/// checked on the engine's timers, and both ends must agree.
const REST_MARGIN: Duration = Duration::from_secs(15);
/// How long each daemon may take to stop after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a round starts pings for: those started by then run to their end, the rest wait
/// for the next round and its fresh look at the statuses.
const PING_BUDGET: Duration = Duration::from_secs(2);
/// How long a ping waits for its reply: a device shown `connected` answers at once; to one
/// shown `idle` the first packet opens an on-demand link, and is held until it is up.
const PING_WAIT_CONNECTED: Duration = Duration::from_secs(1);
const PING_WAIT_IDLE: Duration = Duration::from_secs(3);
/// Threads that read statuses, register accounts and write rosters at once.
const SETUP_WORKERS: usize = 4;
/// The kernel's clock ticks per second in `/proc/PID/stat` (`USER_HZ`, 100 on Linux).
const USER_HZ: f64 = 100.0;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Makes SIGINT, SIGTERM and SIGHUP set a flag that every wait of the run checks, so that a
/// Ctrl-C ends the run early and its destructors remove what it created.
///
/// # Errors
/// When the handlers cannot be installed.
pub fn stop_on_signals() -> Result<(), String> {
    use tokio::signal::unix::{SignalKind, signal};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start a runtime for signals: {e}"))?;
    let mut streams = {
        let _entered = runtime.enter();
        let mut streams = Vec::new();
        for kind in [
            SignalKind::interrupt(),
            SignalKind::terminate(),
            SignalKind::hangup(),
        ] {
            streams.push(signal(kind).map_err(|e| format!("cannot handle signals: {e}"))?);
        }
        streams
    };
    thread::Builder::new()
        .name("signals".to_owned())
        .spawn(move || {
            runtime.block_on(async move {
                loop {
                    let waits = streams.iter_mut().map(|s| Box::pin(s.recv()));
                    futures::future::select_all(waits).await;
                    if !INTERRUPTED.swap(true, Ordering::SeqCst) {
                        eprintln!("ipop-scale: interrupted; cleaning up");
                    }
                }
            });
        })
        .map_err(|e| format!("cannot start the signal thread: {e}"))?;
    Ok(())
}

/// Whether a signal asked the run to end.
#[must_use]
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Which links the devices keep: the `links` key of their `[social]` and `[[groups]]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LinkPolicy {
    /// A link to every device of the overlay that is online.
    All,
    /// A link only once traffic for the device comes.
    OnDemand,
    /// All links while the overlay has fewer than 24 devices online, on demand from there.
    #[default]
    Auto,
}

impl LinkPolicy {
    /// The policy named as in the config (`all`, `on-demand`, `auto`).
    #[must_use]
    pub fn parse(name: &str) -> Option<LinkPolicy> {
        [LinkPolicy::All, LinkPolicy::OnDemand, LinkPolicy::Auto]
            .into_iter()
            .find(|p| p.as_str() == name)
    }

    /// The value of the `links` key.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            LinkPolicy::All => "all",
            LinkPolicy::OnDemand => "on-demand",
            LinkPolicy::Auto => "auto",
        }
    }
}

impl std::fmt::Display for LinkPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Group devices (N); the well-connected device comes on top.
    pub devices: u8,
    pub server: ServerKind,
    /// The `links` policy of every device, in the group and in the social overlay.
    pub links: LinkPolicy,
    /// The `ipop` binary the devices run.
    pub ipop: PathBuf,
    /// How long the pairs may take to pass, from starting the daemons.
    pub timeout: Duration,
    /// How long idle CPU is measured once the pairs pass.
    pub idle: Duration,
    /// Pings run at once.
    pub ping_workers: usize,
    /// Where to copy the logs of the daemons and the server before they are removed.
    pub keep_logs: Option<PathBuf>,
    /// With a time, on-demand links close after it without data (`idle_timeout`), and once
    /// the pairs pass the run waits for them to close before the final figures: what a device
    /// costs with N members and no traffic. Without, links outlast the run.
    pub rest: Option<Duration>,
    /// `[xmpp] send_rate` for every device, bytes per second (0: no pacing); `None` keeps the
    /// default.
    pub send_rate: Option<u32>,
}

/// Who pings whom: device indices `0..n` are the group devices, `n` the well-connected one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pair {
    /// Group devices `a < b`; one pings the other's group address: `a` when `a + b` is even,
    /// else `b`, so that each device pings about half of the others rather than device 0 all
    /// of them.
    Group { a: usize, b: usize },
    /// The well-connected device pings friend `friend` at the address it numbered it with.
    Hub { friend: usize },
}

impl Pair {
    /// The device that pings, and the device it pings.
    #[must_use]
    pub fn pinger_target(self, n: usize) -> (usize, usize) {
        match self {
            Pair::Group { a, b } if (a + b).is_multiple_of(2) => (a, b),
            Pair::Group { a, b } => (b, a),
            Pair::Hub { friend } => (n, friend),
        }
    }

    /// The device that pings.
    #[must_use]
    pub fn pinger(self, n: usize) -> usize {
        self.pinger_target(n).0
    }
}

/// Every wanted pair for `n` group devices: the `n·(n−1)/2` pairs of the group, then the `n`
/// pairs of the well-connected device.
#[must_use]
pub fn wanted_pairs(n: usize) -> Vec<Pair> {
    let mut pairs: Vec<Pair> = (0..n)
        .flat_map(|a| (a + 1..n).map(move |b| Pair::Group { a, b }))
        .collect();
    pairs.extend((0..n).map(|friend| Pair::Hub { friend }));
    pairs
}

/// The account of group device `i` (from 0).
#[must_use]
pub fn user(i: usize) -> String {
    format!("u{:03}", i + 1)
}

/// The well-connected device's account.
pub const HUB: &str = "hub";
/// The room owner's account (a chat client, not a device).
const OWNER: &str = "owner";

fn password(user: &str) -> String {
    format!("pw-{user}-scale")
}

/// Group device `i`'s address in the group.
#[must_use]
pub fn group_address(i: usize) -> IpAddr {
    let (hi, lo) = (i / 250, i % 250 + 1);
    IpAddr::from([
        10,
        90,
        u8::try_from(hi).unwrap_or(u8::MAX),
        u8::try_from(lo).unwrap_or(u8::MAX),
    ])
}

/// The median and the largest of `values` (`None` when empty).
#[must_use]
pub fn median_max(values: &[f64]) -> Option<(f64, f64)> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    let median = if v.len().is_multiple_of(2) {
        f64::midpoint(v[mid - 1], v[mid])
    } else {
        v[mid]
    };
    Some((median, v[v.len() - 1]))
}

/// Clock ticks of user and system time, and the state letter, from a `/proc/PID/stat` line.
#[must_use]
pub fn parse_stat(stat: &str) -> Option<(char, u64)> {
    // The command name may hold spaces and parentheses: the fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((state, utime + stime))
}

/// `VmRSS` and `VmHWM` in kB from a `/proc/PID/status` text.
#[must_use]
pub fn parse_memory(status: &str) -> Option<(u64, u64)> {
    let field = |name: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        line[name.len()..].split_whitespace().next()?.parse().ok()
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// The CPU ticks a process used so far, or `None` once it is gone or a zombie.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&stat)
        .filter(|(state, _)| *state != 'Z')
        .map(|(_, t)| t)
}

fn memory_kb(pid: u32) -> Option<(u64, u64)> {
    parse_memory(&std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?)
}

/// Percent of one core from ticks used over a wall-clock time.
#[must_use]
pub fn cpu_percent(ticks: u64, over: Duration) -> f64 {
    if over.is_zero() {
        return 0.0;
    }
    ticks as f64 / USER_HZ / over.as_secs_f64() * 100.0
}

/// Runs `f` on every item with up to `workers` threads; the results keep the items' order.
fn par_map<T: Sync, R: Send>(items: &[T], workers: usize, f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let next = AtomicUsize::new(0);
    let mut out: Vec<(usize, R)> = thread::scope(|scope| {
        let handles: Vec<_> = (0..workers.clamp(1, items.len().max(1)))
            .map(|_| {
                scope.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(item) = items.get(i) else {
                            return done;
                        };
                        done.push((i, f(item)));
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    });
    out.sort_by_key(|(i, _)| *i);
    out.into_iter().map(|(_, r)| r).collect()
}

/// The XMPP server of the run.
enum Server {
    Prosody(Prosody),
    Ejabberd(Ejabberd),
}

impl Server {
    fn get(&self) -> &dyn XmppServer {
        match self {
            Server::Prosody(p) => p,
            Server::Ejabberd(e) => e,
        }
    }

    /// Makes `hub` and each of `friends` mutual friends: on Prosody the way chat clients do it
    /// (subscription requests and answers); on ejabberd, whose stock `mod_pres_counter` lets a
    /// user send only 5 subscription stanzas a minute, with `ejabberdctl add_rosteritem`.
    fn befriend(&self, hub: &str, friends: &[String], ns: &crate::Netns) {
        match self {
            Server::Prosody(p) => {
                let mut hub_client = XmppUser::builder(p, hub, &password(hub))
                    .resource("chat")
                    .netns(ns)
                    .connect();
                for (k, friend) in friends.iter().enumerate() {
                    if interrupted() {
                        return;
                    }
                    let mut client = XmppUser::builder(p, friend, &password(friend))
                        .resource("chat")
                        .netns(ns)
                        .connect();
                    hub_client.befriend(&mut client);
                    progress_every(k + 1, friends.len(), "friendships made");
                }
            }
            Server::Ejabberd(e) => {
                let items: Vec<(&str, &str)> = friends
                    .iter()
                    .flat_map(|f| [(hub, f.as_str()), (f.as_str(), hub)])
                    .collect();
                par_map(&items, SETUP_WORKERS, |(user, contact)| {
                    if !interrupted() {
                        e.add_roster_item(user, contact, "friends", "both");
                    }
                });
            }
        }
    }
}

/// Prints `k/total what` every tenth of the way.
fn progress_every(k: usize, total: usize, what: &str) {
    if k == total || k.is_multiple_of((total / 10).max(1)) {
        eprintln!("ipop-scale: {k}/{total} {what}");
    }
}

/// A device that another device's status lists as one it can reach now: linked, or idle on
/// demand (the first packet for it opens a link).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Reachable {
    /// The user (local part of the JID).
    user: String,
    /// Its IPv4 address in the overlay, as this device knows it: in a group the member's own,
    /// in the social overlay the one this device numbered it with.
    address: Option<IpAddr>,
    /// Whether the link is up (`connected`), rather than `idle`.
    connected: bool,
}

/// What one device's status said.
#[derive(Debug, Clone, Default)]
struct Seen {
    online: bool,
    /// The devices it can reach in the group and in the social overlay.
    group: Vec<Reachable>,
    social: Vec<Reachable>,
    xmpp: Value,
    loop_stall_ms: f64,
}

impl Seen {
    /// Links up: the devices shown `connected`.
    fn links_up(&self) -> usize {
        self.group
            .iter()
            .chain(&self.social)
            .filter(|r| r.connected)
            .count()
    }
}

fn find(list: &[Reachable], user: &str) -> Option<Reachable> {
    list.iter().find(|r| r.user == user).cloned()
}

fn read_status(node: &Node, room: &str) -> Option<Seen> {
    Some(parse_status(&node.status().ok()?, room))
}

/// Reads what the harness needs from `ipop status --json`: whether XMPP is online, its
/// counters, and in the social overlay and in the group `room` the peers shown `connected` or
/// `idle`, with their IPv4 address.
fn parse_status(status: &Value, room: &str) -> Seen {
    let mut seen = Seen {
        online: status["xmpp"]["state"] == "online",
        xmpp: status["xmpp"].clone(),
        loop_stall_ms: status["loop_stall_max_s"].as_f64().unwrap_or_default() * 1000.0,
        ..Seen::default()
    };
    for overlay in status["overlays"].as_array().into_iter().flatten() {
        let social = overlay["kind"] == "social";
        if !social && overlay["name"] != room {
            continue;
        }
        for peer in overlay["peers"].as_array().into_iter().flatten() {
            let connected = match peer["state"].as_str() {
                Some("connected") => true,
                Some("idle") => false,
                _ => continue,
            };
            let Some(user) = peer["jid"].as_str().and_then(|j| j.split('@').next()) else {
                continue;
            };
            let address = peer["addresses"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|a| a.as_str()?.split('/').next()?.parse::<IpAddr>().ok())
                .find(IpAddr::is_ipv4);
            let reachable = Reachable {
                user: user.to_owned(),
                address,
                connected,
            };
            if social {
                seen.social.push(reachable);
            } else {
                seen.group.push(reachable);
            }
        }
    }
    seen
}

/// The XMPP counters of a status, as numbers.
fn counter(xmpp: &Value, key: &str) -> f64 {
    xmpp[key].as_f64().unwrap_or_default()
}

fn failures(xmpp: &Value) -> f64 {
    xmpp["signal_failures"]
        .as_object()
        .map(|m| m.values().filter_map(Value::as_f64).sum())
        .unwrap_or_default()
}

/// Everything measured in one run.
#[derive(Debug, Clone)]
pub struct Report {
    pub devices: usize,
    pub server: ServerKind,
    pub server_limit: &'static str,
    pub links: LinkPolicy,
    /// The `idle_timeout` the links rested for before the final figures, if they did.
    pub rested: Option<Duration>,
    /// The devices' `send_rate`, when not the default.
    pub send_rate: Option<u32>,
    pub started_at: String,
    pub cores: usize,
    /// Pairs that passed a ping, and when (seconds from starting the daemons), by kind.
    pub group_pairs: usize,
    pub group_passed: Vec<f64>,
    pub hub_pairs: usize,
    pub hub_passed: Vec<f64>,
    /// Seconds until every daemon was online on XMPP, if they all were.
    pub all_online_s: Option<f64>,
    pub timed_out: bool,
    pub interrupted: bool,
    /// Pings to a pair shown `connected` that went unanswered, and to a pair shown `idle`
    /// (whose link the ping opens).
    pub failed_pings: u64,
    pub failed_idle_pings: u64,
    /// On-demand set-up: for each pair whose device was shown `idle` when first pinged, the
    /// seconds from the start of that ping to the first reply.
    pub setup_s: Vec<f64>,
    /// Daemons that exited during the run, by name.
    pub exited: Vec<String>,
    /// One entry per device: the group devices, then the well-connected one.
    pub per_device: Vec<DeviceReport>,
    pub idle_s: f64,
    /// The server's CPU seconds from starting the daemons to the end of the wait, its idle CPU
    /// (% of a core) and its memory (kB).
    pub server_setup_cpu_s: Option<f64>,
    pub server_idle_cpu: Option<f64>,
    pub server_memory_kb: Option<(u64, u64)>,
}

/// One device's figures.
#[derive(Debug, Clone, Default)]
pub struct DeviceReport {
    pub name: String,
    /// Links up at the end of the wait.
    pub links: usize,
    /// The XMPP counters at the end of the wait (`stanzas_sent`, …), and their growth while
    /// idle.
    pub xmpp: Value,
    pub idle_stanzas: f64,
    pub idle_bytes: f64,
    /// Idle CPU, % of one core.
    pub idle_cpu: Option<f64>,
    /// `VmRSS` and `VmHWM`, kB.
    pub memory_kb: Option<(u64, u64)>,
    pub loop_stall_ms: f64,
}

impl DeviceReport {
    fn per_link(&self, value: f64) -> f64 {
        if self.links == 0 {
            f64::NAN
        } else {
            value / self.links as f64
        }
    }
}

/// A row of the table: a label and a value for a group device (median, max) and for the
/// well-connected device.
struct Row {
    label: &'static str,
    group: Option<(f64, f64)>,
    hub: Option<f64>,
    decimals: usize,
}

fn fmt_value(v: f64, decimals: usize) -> String {
    if v.is_finite() {
        format!("{v:.decimals$}")
    } else {
        "-".to_owned()
    }
}

impl Report {
    fn group_devices(&self) -> &[DeviceReport] {
        &self.per_device[..self.devices.min(self.per_device.len())]
    }

    fn hub(&self) -> Option<&DeviceReport> {
        self.per_device.get(self.devices)
    }

    /// The seconds by which every pair of a kind passed, if all did.
    fn converged(passed: &[f64], wanted: usize) -> Option<f64> {
        (passed.len() == wanted).then(|| passed.iter().copied().fold(0.0, f64::max))
    }

    fn rows(&self) -> Vec<Row> {
        let stat = |f: &dyn Fn(&DeviceReport) -> f64| -> (Option<(f64, f64)>, Option<f64>) {
            let values: Vec<f64> = self.group_devices().iter().map(f).collect();
            (median_max(&values), self.hub().map(f))
        };
        let mut rows = Vec::new();
        let mut row = |label, decimals, f: &dyn Fn(&DeviceReport) -> f64| {
            let (group, hub) = stat(f);
            rows.push(Row {
                label,
                group,
                hub,
                decimals,
            });
        };
        let x = |key: &'static str| move |d: &DeviceReport| counter(&d.xmpp, key);
        let mem = |which: usize| {
            move |d: &DeviceReport| {
                d.memory_kb
                    .map_or(f64::NAN, |m| [m.0, m.1][which] as f64 / 1024.0)
            }
        };
        row("links up", 0, &|d| d.links as f64);
        row("stanzas sent", 0, &x("stanzas_sent"));
        row("stanzas received", 0, &x("stanzas_received"));
        row("XMPP kB sent", 1, &|d| {
            counter(&d.xmpp, "bytes_sent") / 1000.0
        });
        row("XMPP kB received", 1, &|d| {
            counter(&d.xmpp, "bytes_received") / 1000.0
        });
        row("stanzas sent per link", 1, &|d| {
            d.per_link(counter(&d.xmpp, "stanzas_sent"))
        });
        row("stanzas received per link", 1, &|d| {
            d.per_link(counter(&d.xmpp, "stanzas_received"))
        });
        row("XMPP bytes sent per link", 0, &|d| {
            d.per_link(counter(&d.xmpp, "bytes_sent"))
        });
        row("XMPP bytes received per link", 0, &|d| {
            d.per_link(counter(&d.xmpp, "bytes_received"))
        });
        row("link offers sent", 0, &x("link_offers"));
        row("link offers repeated", 0, &x("link_offers_repeated"));
        row("signals failed", 0, &|d| failures(&d.xmpp));
        row("XMPP reconnects", 0, &x("reconnects"));
        row("idle stanzas per minute", 1, &|d| {
            d.idle_stanzas * 60.0 / self.idle_s.max(1.0)
        });
        row("idle XMPP bytes per second", 0, &|d| {
            d.idle_bytes / self.idle_s.max(1.0)
        });
        row("idle CPU, % of a core", 2, &|d| {
            d.idle_cpu.unwrap_or(f64::NAN)
        });
        row("idle CPU per link, % of a core", 3, &|d| {
            d.per_link(d.idle_cpu.unwrap_or(f64::NAN))
        });
        row("VmRSS, MiB", 1, &mem(0));
        row("VmHWM, MiB", 1, &mem(1));
        row("loop stall (last minute), ms", 1, &|d| d.loop_stall_ms);
        rows
    }

    /// The report as a text table.
    #[must_use]
    pub fn table(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let n = self.devices;
        let _ = writeln!(
            s,
            "ipop scale: {n} devices in one group room + 1 device with {n} friends, on {} ({}), \
             links = \"{}\", {} cores, started {}",
            self.server, self.server_limit, self.links, self.cores, self.started_at
        );
        let pairs = |passed: &[f64], wanted: usize| match Report::converged(passed, wanted) {
            Some(t) => format!("all {wanted} pass after {t:.1} s"),
            None => format!("{}/{wanted} pass (not converged)", passed.len()),
        };
        let _ = writeln!(
            s,
            "group pairs: {}; median pair {} s",
            pairs(&self.group_passed, self.group_pairs),
            median_max(&self.group_passed).map_or("-".to_owned(), |(m, _)| format!("{m:.1}"))
        );
        let _ = writeln!(
            s,
            "friend pairs: {}; median pair {} s",
            pairs(&self.hub_passed, self.hub_pairs),
            median_max(&self.hub_passed).map_or("-".to_owned(), |(m, _)| format!("{m:.1}"))
        );
        let _ = writeln!(
            s,
            "on-demand set-up, first ping to a device shown idle until its reply: {}",
            match median_max(&self.setup_s) {
                Some((median, max)) => format!(
                    "median {median:.2} s, max {max:.2} s, over {} pairs",
                    self.setup_s.len()
                ),
                None => "no pair was idle when first pinged".to_owned(),
            }
        );
        let _ = writeln!(
            s,
            "all daemons online on XMPP after: {}; unanswered pings: {} to a device shown \
             connected, {} to one shown idle",
            self.all_online_s
                .map_or("never".to_owned(), |t| format!("{t:.1} s")),
            self.failed_pings,
            self.failed_idle_pings
        );
        if self.timed_out {
            let _ = writeln!(s, "TIMED OUT before every pair passed");
        }
        if self.interrupted {
            let _ = writeln!(s, "INTERRUPTED");
        }
        if !self.exited.is_empty() {
            let _ = writeln!(s, "daemons that exited: {}", self.exited.join(", "));
        }
        let _ = writeln!(
            s,
            "\n{:<34} {:>12} {:>12} {:>12}",
            "per device", "group median", "group max", "friends hub"
        );
        for r in self.rows() {
            let (med, max) = r.group.map_or(("-".to_owned(), "-".to_owned()), |(a, b)| {
                (fmt_value(a, r.decimals), fmt_value(b, r.decimals))
            });
            let hub = r.hub.map_or("-".to_owned(), |v| fmt_value(v, r.decimals));
            let _ = writeln!(s, "{:<34} {med:>12} {max:>12} {hub:>12}", r.label);
        }
        let opt = |v: Option<f64>, d: usize| v.map_or("-".to_owned(), |v| fmt_value(v, d));
        let _ = writeln!(
            s,
            "\nXMPP server: {} CPU s from start to the end of the wait; idle {} % of a core; \
             VmRSS {} MiB, VmHWM {} MiB",
            opt(self.server_setup_cpu_s, 1),
            opt(self.server_idle_cpu, 2),
            opt(self.server_memory_kb.map(|m| m.0 as f64 / 1024.0), 1),
            opt(self.server_memory_kb.map(|m| m.1 as f64 / 1024.0), 1),
        );
        let _ = writeln!(s, "idle figures over {:.0} s", self.idle_s);
        if let Some(rate) = self.send_rate {
            let _ = writeln!(s, "every device had [xmpp] send_rate = {rate}");
        }
        if let Some(rest) = self.rested {
            let _ = writeln!(
                s,
                "links up and idle figures taken after the links rested: idle_timeout {} s, \
                 then no traffic",
                rest.as_secs()
            );
        } else if !self.setup_s.is_empty() {
            let _ = writeln!(
                s,
                "links up: every pair was pinged, which opened every on-demand link; these are \
                 the worst case, where all of them carry traffic"
            );
        }
        s
    }

    /// The report for scripts.
    #[must_use]
    pub fn json(&self) -> Value {
        let rows: serde_json::Map<String, Value> = self
            .rows()
            .into_iter()
            .map(|r| {
                (
                    r.label.to_owned(),
                    json!({
                        "group_median": r.group.map(|g| g.0).filter(|v| v.is_finite()),
                        "group_max": r.group.map(|g| g.1).filter(|v| v.is_finite()),
                        "hub": r.hub.filter(|v| v.is_finite()),
                    }),
                )
            })
            .collect();
        json!({
            "devices": self.devices,
            "server": self.server.to_string(),
            "server_limit": self.server_limit,
            "links": self.links.as_str(),
            "rested_s": self.rested.map(|r| r.as_secs()),
            "send_rate": self.send_rate,
            "started_at": self.started_at,
            "cores": self.cores,
            "group_pairs": self.group_pairs,
            "group_passed": self.group_passed.len(),
            "group_converged_s": Report::converged(&self.group_passed, self.group_pairs),
            "hub_pairs": self.hub_pairs,
            "hub_passed": self.hub_passed.len(),
            "hub_converged_s": Report::converged(&self.hub_passed, self.hub_pairs),
            "all_online_s": self.all_online_s,
            "timed_out": self.timed_out,
            "interrupted": self.interrupted,
            "failed_pings": self.failed_pings,
            "failed_idle_pings": self.failed_idle_pings,
            "on_demand_setup_pairs": self.setup_s.len(),
            "on_demand_setup_median_s": median_max(&self.setup_s).map(|m| m.0),
            "on_demand_setup_max_s": median_max(&self.setup_s).map(|m| m.1),
            "exited": self.exited,
            "idle_s": self.idle_s,
            "server_setup_cpu_s": self.server_setup_cpu_s,
            "server_idle_cpu_percent": self.server_idle_cpu,
            "server_vmrss_kb": self.server_memory_kb.map(|m| m.0),
            "server_vmhwm_kb": self.server_memory_kb.map(|m| m.1),
            "per_device": rows,
            "devices_xmpp": self.per_device.iter().map(|d| json!({
                "name": d.name,
                "links": d.links,
                "xmpp": d.xmpp,
                "idle_cpu_percent": d.idle_cpu,
                "vmrss_kb": d.memory_kb.map(|m| m.0),
                "vmhwm_kb": d.memory_kb.map(|m| m.1),
            })).collect::<Vec<_>>(),
        })
    }
}

/// The overlay sections of a device's config: `[social]`, and for group device `i` of `room`
/// the group's `[[groups]]` with its configured address; each with the run's `links` policy
/// and an `idle_timeout` of `idle_timeout` (whole seconds, at least one).
fn overlays_config(
    group: Option<(&str, usize)>,
    links: LinkPolicy,
    idle_timeout: Duration,
) -> String {
    use std::fmt::Write as _;
    let policy = format!(
        "links = \"{links}\"\nidle_timeout = \"{}s\"\n",
        idle_timeout.as_secs().max(1)
    );
    let mut config = format!("[social]\n{policy}");
    if let Some((room, i)) = group {
        let _ = write!(
            config,
            "\n[[groups]]\nroom = \"{room}\"\nsubnet = \"{GROUP_SUBNET}\"\naddress = \"{}\"\n{policy}",
            group_address(i)
        );
    }
    config
}

/// The lab, its server and the daemons; dropping it stops the daemons first (without the
/// tests' loop-stall check, which a loaded machine fails), then the server, then removes the
/// namespaces and directories.
struct Run {
    lab: Lab,
    server: Option<Server>,
    _neighbours: NeighbourRoom,
}

/// The kernel's neighbour tables (ARP, and NDP for IPv6) are shared by every network namespace,
/// with one limit (`gc_thresh3`, 1024 entries by default) that a LAN of N hosts, each with an
/// entry for every other, passes from N = 32: new entries then fail ("neighbor table
/// overflow"), and packets between namespaces, this run's and anyone else's, are dropped. So the
/// run raises the limits of both tables to fit its LAN, and puts them back when it ends.
struct NeighbourRoom {
    saved: Vec<(String, String)>,
}

impl NeighbourRoom {
    fn for_hosts(hosts: usize) -> NeighbourRoom {
        let entries = neighbour_entries(hosts);
        let mut saved = Vec::new();
        for family in ["ipv4", "ipv6"] {
            for (knob, want) in [("gc_thresh2", entries), ("gc_thresh3", 2 * entries)] {
                let path = format!("/proc/sys/net/{family}/neigh/default/{knob}");
                let Ok(old) = std::fs::read_to_string(&path) else {
                    continue;
                };
                let old = old.trim().to_owned();
                if old.parse::<usize>().is_ok_and(|v| v < want) {
                    match std::fs::write(&path, want.to_string()) {
                        Ok(()) => saved.push((path, old)),
                        Err(e) => eprintln!("ipop-scale: cannot raise {path} to {want}: {e}"),
                    }
                }
            }
        }
        if !saved.is_empty() {
            eprintln!(
                "ipop-scale: neighbour table limits raised to fit {hosts} hosts ({entries} entries), until the run ends"
            );
        }
        NeighbourRoom { saved }
    }
}

/// Entries one neighbour table needs for a LAN of `hosts`, each knowing every other by two
/// addresses (IPv6 adds a link-local one), with room for the rest of the machine.
fn neighbour_entries(hosts: usize) -> usize {
    2 * hosts * hosts + 1024
}

impl Drop for NeighbourRoom {
    fn drop(&mut self) {
        for (path, old) in self.saved.drain(..).rev() {
            if let Err(e) = std::fs::write(&path, &old) {
                eprintln!("ipop-scale: cannot put {path} back to {old}: {e}");
            }
        }
    }
}

impl Run {
    fn stop_daemons(&mut self) {
        let pids: Vec<u32> = self.lab.nodes.iter().filter_map(Node::pid).collect();
        for pid in pids {
            if let Ok(pid) = i32::try_from(pid) {
                // ESRCH: it has ended already; the stop below reaps it.
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
        }
        for node in &mut self.lab.nodes {
            if let Some((status, true)) = node.stop_within(STOP_TIMEOUT) {
                eprintln!(
                    "ipop-scale: ipop {} ignored SIGTERM for {STOP_TIMEOUT:?} and was killed ({status})",
                    node.name
                );
            }
        }
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        self.stop_daemons();
        drop(self.server.take());
    }
}

fn now_utc() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// Sleeps `d` in short steps; false if interrupted meanwhile.
fn sleep_unless_interrupted(d: Duration) -> bool {
    let end = Instant::now() + d;
    while Instant::now() < end {
        if interrupted() {
            return false;
        }
        thread::sleep(end.saturating_duration_since(Instant::now()).min(ROUND / 4));
    }
    !interrupted()
}

/// Sets the run up, waits for the pairs, measures, and stops everything.
///
/// # Errors
/// When the options are out of range or the run is interrupted during set-up.
///
/// # Panics
/// When the lab cannot be set up (a namespace, the server, an account); what was created is
/// removed as the panic unwinds.
pub fn run(opts: &Options) -> Result<Report, String> {
    if !(2..=MAX_DEVICES).contains(&opts.devices) {
        return Err(format!(
            "N must be 2 to {MAX_DEVICES} (ejabberd's rooms hold 200 occupants by default)"
        ));
    }
    let n = usize::from(opts.devices);
    let cores = thread::available_parallelism().map_or(1, usize::from);
    let started_at = now_utc();
    eprintln!(
        "ipop-scale: {n} group devices + 1 with {n} friends on {}, links = \"{}\"; setting up {} \
         namespaces",
        opts.server,
        opts.links,
        n + 3
    );
    // Devices 0..n, the well-connected device n, the server n + 1.
    let neighbours = NeighbourRoom::for_hosts(n + 2);
    let lab = Lab::new(&opts.ipop, "scale", opts.devices + 2);
    let mut run = Run {
        lab,
        server: None,
        _neighbours: neighbours,
    };
    let server_host = &run.lab.nodes[n + 1].host;
    let (server_ns, server_ip) = (&server_host.ns, IpAddr::V4(server_host.ipv4));
    let (server, server_limit) = match opts.server {
        ServerKind::Prosody => (
            Server::Prosody(
                Prosody::builder(DOMAIN)
                    .in_netns(server_ns, server_ip)
                    .stock_limits(true)
                    .start(),
            ),
            "stock c2s limit 10 kB/s",
        ),
        ServerKind::Ejabberd => (
            Server::Ejabberd(
                Ejabberd::builder(DOMAIN)
                    .in_netns(server_ns, server_ip)
                    .start(),
            ),
            "stock c2s shaper 3000 B/s, burst 20000 B",
        ),
    };
    let users: Vec<String> = (0..n).map(user).collect();
    {
        let xmpp = server.get();
        let mut accounts: Vec<&str> = users.iter().map(String::as_str).collect();
        accounts.extend([HUB, OWNER]);
        eprintln!("ipop-scale: registering {} accounts", accounts.len());
        // Registration runs one tool process per account: a few at once.
        let registered = std::sync::Mutex::new(0_usize);
        par_map(&accounts, SETUP_WORKERS, |account| {
            if !interrupted() {
                server.get().register(account, &password(account));
                let mut done = registered
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                *done += 1;
                progress_every(*done, accounts.len(), "accounts registered");
            }
        });
        if interrupted() {
            return Err("interrupted during set-up".to_owned());
        }
        eprintln!("ipop-scale: creating the room and adding {n} members");
        let mut owner = XmppUser::builder(xmpp, OWNER, &password(OWNER))
            .resource("chat")
            .netns(server_ns)
            .connect();
        let room = owner.create_room_members_only(ROOM).to_string();
        for u in &users {
            let jid = crate::BareJid::new(&xmpp.jid(u))
                .map_err(|e| format!("{u} does not make a JID: {e}"))?;
            owner.add_member(ROOM, &jid);
        }
        owner.leave(ROOM);
        drop(owner);
        if interrupted() {
            return Err("interrupted during set-up".to_owned());
        }
        eprintln!("ipop-scale: making {HUB} and the {n} members friends");
        server.befriend(HUB, &users, server_ns);
        if interrupted() {
            return Err("interrupted during set-up".to_owned());
        }
        // Links that the pings open stay up to the end, idle measurement included.
        let idle_timeout = opts
            .rest
            .unwrap_or(opts.timeout + opts.idle + IDLE_TIMEOUT_MARGIN);
        for (i, node) in run.lab.nodes.iter().take(n + 1).enumerate() {
            let (account, device, group) = if i < n {
                (users[i].as_str(), "pc", Some((room.as_str(), i)))
            } else {
                (HUB, "hub", None)
            };
            let overlays = overlays_config(group, opts.links, idle_timeout);
            let mut config = node.config(51820);
            config.addresses.clear();
            "info".clone_into(&mut config.log_level);
            let pace = opts
                .send_rate
                .map(|r| format!("send_rate = {r}\n"))
                .unwrap_or_default();
            config.extra = format!(
                "[xmpp]\njid = \"{account}@{DOMAIN}\"\npassword = \"{pw}\"\nserver = \"{addr}\"\n\
                 ca_file = {ca:?}\ndevice = \"{device}\"\n{pace}\n{overlays}",
                pw = password(account),
                addr = xmpp.c2s_addr(),
                ca = xmpp.ca_cert_path(),
            );
            node.write_config(&config);
        }
    }
    let server_pid = server.get().pid();
    run.server = Some(server);
    let room = format!("{ROOM}@conference.{DOMAIN}");

    eprintln!("ipop-scale: starting {} daemons", n + 1);
    let server_cpu_start = server_pid.and_then(cpu_ticks);
    let t0 = Instant::now();
    for node in run.lab.nodes.iter_mut().take(n + 1) {
        node.start();
    }
    let nodes = &run.lab.nodes[..=n];
    let pids: Vec<Option<u32>> = nodes.iter().map(Node::pid).collect();

    // Wait for the pairs: each round reads the statuses of the devices that still ping or are
    // not online yet, then pings the pairs whose pinger shows the other end connected or idle.
    let pairs = wanted_pairs(n);
    let mut passed: Vec<Option<f64>> = vec![None; pairs.len()];
    let mut tried: Vec<Option<Instant>> = vec![None; pairs.len()];
    let mut targets: Vec<Option<Target>> = vec![None; pairs.len()];
    let namespaces: Vec<NsHandle> = nodes.iter().map(|node| NsHandle::of(node.ns())).collect();
    // When each pair was first pinged (seconds from the start), and whether it was idle then.
    let mut first_ping: Vec<Option<(f64, bool)>> = vec![None; pairs.len()];
    let mut setup_s: Vec<f64> = Vec::new();
    let mut failed_pings = 0_u64;
    let mut failed_idle_pings = 0_u64;
    let mut online = vec![false; n + 1];
    let mut all_online_s = None;
    let mut exited: Vec<String> = Vec::new();
    let deadline = t0 + opts.timeout;
    let mut last_progress = Instant::now();
    let mut timed_out = false;
    loop {
        let round = Instant::now();
        if interrupted() {
            break;
        }
        if round >= deadline {
            timed_out = true;
            break;
        }
        for (i, pid) in pids.iter().enumerate() {
            let name = &nodes[i].name;
            if pid.and_then(cpu_ticks).is_none() && !exited.contains(name) {
                eprintln!(
                    "ipop-scale: ipop {name} has exited; log {}",
                    nodes[i].log_path().display()
                );
                exited.push(name.clone());
            }
        }
        // A pair's target, once its pinger listed it connected or idle, stays so for the run
        // (nothing but the pings opens a link on demand, and a link up stays up), so only
        // the devices not online yet and the pingers of pairs not yet seen are asked.
        let mut ask: Vec<usize> = (0..=n).filter(|i| !online[*i]).collect();
        for (k, pair) in pairs.iter().enumerate() {
            if passed[k].is_none() && targets[k].is_none() {
                ask.push(pair.pinger(n));
            }
        }
        ask.sort_unstable();
        ask.dedup();
        let seen: Vec<Option<Seen>> =
            par_map(&ask, SETUP_WORKERS, |&i| read_status(&nodes[i], &room));
        let mut statuses: Vec<Option<&Seen>> = vec![None; n + 1];
        for (&i, s) in ask.iter().zip(&seen) {
            statuses[i] = s.as_ref();
            if s.as_ref().is_some_and(|s| s.online) {
                online[i] = true;
            }
        }
        if all_online_s.is_none() && online.iter().all(|o| *o) {
            all_online_s = Some(t0.elapsed().as_secs_f64());
        }
        find_targets(&pairs, &mut targets, &statuses, &users);
        let pings = choose_pings(&pairs, &passed, &tried, &targets);
        let ping_until = (Instant::now() + PING_BUDGET).min(deadline);
        let results = par_map(&pings, opts.ping_workers, |ping| {
            if interrupted() || Instant::now() >= ping_until {
                return None;
            }
            let wait = if ping.idle {
                PING_WAIT_IDLE
            } else {
                PING_WAIT_CONNECTED
            };
            let IpAddr::V4(to) = ping.to else {
                return None;
            };
            let start = t0.elapsed().as_secs_f64();
            let reply = match icmp::echo(&namespaces[ping.from], to, wait) {
                Ok(reply) => reply,
                Err(e) => {
                    eprintln!(
                        "ipop-scale: cannot ping {to} from {}: {e}",
                        nodes[ping.from].name
                    );
                    false
                }
            };
            Some((start, reply.then(|| t0.elapsed().as_secs_f64())))
        });
        for (ping, result) in pings.iter().zip(results) {
            let Some((start, reply)) = result else {
                continue;
            };
            tried[ping.pair] = Some(Instant::now());
            let (first, idle_at_first) = *first_ping[ping.pair].get_or_insert((start, ping.idle));
            match reply {
                Some(t) => {
                    passed[ping.pair] = Some(t);
                    if idle_at_first {
                        setup_s.push(t - first);
                    }
                }
                None if ping.idle => failed_idle_pings += 1,
                None => failed_pings += 1,
            }
        }
        let (group_done, hub_done) = count_passed(&pairs, &passed);
        let all = group_done + hub_done == pairs.len();
        if all || last_progress.elapsed() >= PROGRESS_EVERY {
            last_progress = Instant::now();
            eprintln!(
                "ipop-scale: {:6.1} s: {group_done}/{} group pairs pass, {hub_done}/{n} friend \
                 pairs pass, {}/{} daemons online, pings unanswered: {failed_pings} to connected, \
                 {failed_idle_pings} to idle",
                t0.elapsed().as_secs_f64(),
                n * (n - 1) / 2,
                online.iter().filter(|o| **o).count(),
                n + 1
            );
        }
        if all {
            break;
        }
        if !sleep_unless_interrupted(ROUND.saturating_sub(round.elapsed())) {
            break;
        }
    }
    let server_setup_cpu_s = server_pid
        .and_then(cpu_ticks)
        .zip(server_cpu_start)
        .map(|(end, start)| end.saturating_sub(start) as f64 / USER_HZ);

    if let Some(rest) = opts.rest.filter(|_| !interrupted()) {
        let wait = rest + REST_MARGIN;
        eprintln!(
            "ipop-scale: waiting {} s for on-demand links to close after their idle time",
            wait.as_secs()
        );
        sleep_unless_interrupted(wait);
    }
    eprintln!("ipop-scale: reading every status");
    let all: Vec<usize> = (0..=n).collect();
    let before: Vec<Option<Seen>> =
        par_map(&all, SETUP_WORKERS, |&i| read_status(&nodes[i], &room));

    // Idle: nothing reads statuses or pings meanwhile.
    let mut idle_s = 0.0;
    let mut idle_cpu: Vec<Option<f64>> = vec![None; n + 1];
    let mut server_idle_cpu = None;
    if !interrupted() && !opts.idle.is_zero() {
        eprintln!(
            "ipop-scale: measuring idle CPU over {} s",
            opts.idle.as_secs()
        );
        let start_ticks: Vec<Option<u64>> = pids.iter().map(|p| p.and_then(cpu_ticks)).collect();
        let server_start = server_pid.and_then(cpu_ticks);
        let idle_start = Instant::now();
        if sleep_unless_interrupted(opts.idle) {
            let over = idle_start.elapsed();
            idle_s = over.as_secs_f64();
            for (i, pid) in pids.iter().enumerate() {
                idle_cpu[i] = pid
                    .and_then(cpu_ticks)
                    .zip(start_ticks[i])
                    .map(|(end, start)| cpu_percent(end.saturating_sub(start), over));
            }
            server_idle_cpu = server_pid
                .and_then(cpu_ticks)
                .zip(server_start)
                .map(|(end, start)| cpu_percent(end.saturating_sub(start), over));
        }
    }
    let after: Vec<Option<Seen>> = if idle_s > 0.0 {
        par_map(&all, SETUP_WORKERS, |&i| read_status(&nodes[i], &room))
    } else {
        vec![None; n + 1]
    };
    let per_device = (0..=n)
        .map(|i| {
            let seen = before[i].clone().unwrap_or_default();
            let grown = |key: &str| {
                after[i]
                    .as_ref()
                    .map_or(0.0, |a| counter(&a.xmpp, key) - counter(&seen.xmpp, key))
            };
            DeviceReport {
                name: nodes[i].name.clone(),
                links: seen.links_up(),
                idle_stanzas: grown("stanzas_sent") + grown("stanzas_received"),
                idle_bytes: grown("bytes_sent") + grown("bytes_received"),
                xmpp: seen.xmpp,
                idle_cpu: idle_cpu[i],
                memory_kb: pids[i].and_then(memory_kb),
                loop_stall_ms: seen.loop_stall_ms,
            }
        })
        .collect();
    let server_memory_kb = server_pid.and_then(memory_kb);
    let group_passed: Vec<f64> = pairs
        .iter()
        .zip(&passed)
        .filter(|(p, _)| matches!(p, Pair::Group { .. }))
        .filter_map(|(_, t)| *t)
        .collect();
    let hub_passed: Vec<f64> = pairs
        .iter()
        .zip(&passed)
        .filter(|(p, _)| matches!(p, Pair::Hub { .. }))
        .filter_map(|(_, t)| *t)
        .collect();
    let report = Report {
        devices: n,
        server: opts.server,
        server_limit,
        links: opts.links,
        rested: opts.rest,
        send_rate: opts.send_rate,
        started_at,
        cores,
        group_pairs: n * (n - 1) / 2,
        group_passed,
        hub_pairs: n,
        hub_passed,
        all_online_s,
        timed_out,
        interrupted: interrupted(),
        failed_pings,
        failed_idle_pings,
        setup_s,
        exited,
        per_device,
        idle_s,
        server_setup_cpu_s,
        server_idle_cpu,
        server_memory_kb,
    };
    if let Some(dir) = &opts.keep_logs {
        keep_logs(dir, nodes, run.server.as_ref().map(|s| s.get().log_path()));
    }
    eprintln!("ipop-scale: stopping the daemons and the server");
    drop(run);
    Ok(report)
}

/// Copies each daemon's log (`NAME.log`) and the server's (`server.log`) into `dir`.
fn keep_logs(dir: &Path, nodes: &[Node], server: Option<&Path>) {
    if let Err(e) = std::fs::create_dir_all(dir) {
        eprintln!("ipop-scale: cannot create {}: {e}", dir.display());
        return;
    }
    let copies = nodes
        .iter()
        .map(|node| (node.log_path(), dir.join(format!("{}.log", node.name))))
        .chain(server.map(|log| (log.to_owned(), dir.join("server.log"))));
    for (from, to) in copies {
        if let Err(e) = std::fs::copy(&from, &to) {
            eprintln!("ipop-scale: cannot copy {}: {e}", from.display());
        }
    }
    eprintln!("ipop-scale: logs kept in {}", dir.display());
}

/// Where a pair's pinger reaches the other device: the IPv4 address its status lists for it,
/// and whether the link was `idle` (the ping opens it on demand) rather than `connected`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Target {
    to: IpAddr,
    idle: bool,
}

/// A ping to send: for pair `pair`, from device `from` to its target.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Ping {
    pair: usize,
    from: usize,
    to: IpAddr,
    idle: bool,
}

/// Fills in the target of each pair not yet known whose pinger's status (`statuses`, by
/// device) lists the other device `connected` or `idle` with an IPv4 address.
fn find_targets(
    pairs: &[Pair],
    targets: &mut [Option<Target>],
    statuses: &[Option<&Seen>],
    users: &[String],
) {
    let n = users.len();
    for (pair, target) in pairs.iter().zip(targets.iter_mut()) {
        if target.is_some() {
            continue;
        }
        let (from, to) = pair.pinger_target(n);
        let Some(seen) = statuses.get(from).copied().flatten() else {
            continue;
        };
        let found = match pair {
            Pair::Group { .. } => find(&seen.group, &users[to]),
            Pair::Hub { .. } => find(&seen.social, &users[to]),
        };
        if let Some(Reachable {
            address: Some(to),
            connected,
            ..
        }) = found
        {
            *target = Some(Target {
                to,
                idle: !connected,
            });
        }
    }
}

/// The pings of one round, in the order to send them: one for each pair that has not passed
/// and has a target. Pairs never pinged come first, then those pinged longest ago. Among the
/// pairs never pinged, each pinger goes by its progress over the whole run, the share of its
/// pairs pinged so far, so that the links the pings open are spread over the devices, one with
/// twice the pairs (the hub) takes two turns for the others' one, and a pinger left out of one
/// round (a round holds fewer pings than there are pingers) comes first in the next.
fn choose_pings(
    pairs: &[Pair],
    passed: &[Option<f64>],
    tried: &[Option<Instant>],
    targets: &[Option<Target>],
) -> Vec<Ping> {
    let n = pairs
        .iter()
        .filter(|p| matches!(p, Pair::Hub { .. }))
        .count();
    let mut total = vec![0_usize; n + 1];
    let mut done = vec![0_usize; n + 1];
    for (k, pair) in pairs.iter().enumerate() {
        let from = pair.pinger(n);
        total[from] += 1;
        done[from] += usize::from(tried[k].is_some() || passed[k].is_some());
    }
    let mut ready: Vec<(Option<Instant>, usize, Ping)> = Vec::new();
    for (k, pair) in pairs.iter().enumerate() {
        let Some(Target { to, idle }) = targets[k].filter(|_| passed[k].is_none()) else {
            continue;
        };
        let from = pair.pinger(n);
        let progress = done[from] * PACE_SCALE / total[from];
        if tried[k].is_none() {
            done[from] += 1;
        }
        let ping = Ping {
            pair: k,
            from,
            to,
            idle,
        };
        ready.push((tried[k], progress, ping));
    }
    ready.sort_by_key(|(tried, progress, _)| (*tried, *progress));
    ready.into_iter().map(|(_, _, p)| p).collect()
}

/// The resolution of a pinger's progress through its pings in [`choose_pings`].
const PACE_SCALE: usize = 1 << 20;

/// How many group pairs and friend pairs passed.
fn count_passed(pairs: &[Pair], passed: &[Option<f64>]) -> (usize, usize) {
    pairs
        .iter()
        .zip(passed)
        .filter(|(_, t)| t.is_some())
        .fold((0, 0), |(g, h), (p, _)| match p {
            Pair::Group { .. } => (g + 1, h),
            Pair::Hub { .. } => (g, h + 1),
        })
}

/// Where the binary finds `ipop` unless told: `target/release/ipop` beside this crate.
#[must_use]
pub fn default_ipop() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/release/ipop")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_neighbour_tables_fit_a_lan_of_100_devices_beside_the_default() {
        let hosts = 102;
        assert!(neighbour_entries(hosts) >= 2 * hosts * (hosts - 1));
        assert!(neighbour_entries(2) > 1024);
    }

    #[test]
    fn pairs_are_every_group_pair_once_and_every_friend() {
        let pairs = wanted_pairs(4);
        assert_eq!(pairs.len(), 4 * 3 / 2 + 4);
        assert_eq!(pairs[0], Pair::Group { a: 0, b: 1 });
        assert!(pairs.contains(&Pair::Group { a: 2, b: 3 }));
        assert!(!pairs.contains(&Pair::Group { a: 3, b: 2 }));
        assert_eq!(pairs[6], Pair::Hub { friend: 0 });
        assert_eq!(Pair::Group { a: 1, b: 3 }.pinger_target(4), (1, 3));
        assert_eq!(Pair::Group { a: 2, b: 3 }.pinger_target(4), (3, 2));
        assert_eq!(Pair::Hub { friend: 1 }.pinger_target(4), (4, 1));
        assert_eq!(Pair::Hub { friend: 1 }.pinger(4), 4);
        // Each device pings about half of the others.
        let n = 100;
        let mut pings = vec![0; n];
        for pair in wanted_pairs(n) {
            if let Pair::Group { .. } = pair {
                pings[pair.pinger(n)] += 1;
            }
        }
        assert!(pings.iter().all(|k| (49..=50).contains(k)), "{pings:?}");
        assert_eq!(wanted_pairs(100).len(), 4950 + 100);
        let passed = [Some(1.0), None, Some(2.0), None, None, None, Some(3.0)];
        let mut all = vec![None; pairs.len()];
        all[..passed.len()].copy_from_slice(&passed);
        assert_eq!(count_passed(&pairs, &all), (2, 1));
    }

    #[test]
    fn group_addresses_are_distinct_host_addresses() {
        assert_eq!(group_address(0), IpAddr::from([10, 90, 0, 1]));
        assert_eq!(group_address(249), IpAddr::from([10, 90, 0, 250]));
        assert_eq!(group_address(250), IpAddr::from([10, 90, 1, 1]));
        let all: std::collections::BTreeSet<IpAddr> = (0..200).map(group_address).collect();
        assert_eq!(all.len(), 200);
        assert_eq!(user(0), "u001");
        assert_eq!(user(99), "u100");
    }

    #[test]
    fn medians_and_maxima() {
        assert_eq!(median_max(&[]), None);
        assert_eq!(median_max(&[3.0, 1.0, 2.0]), Some((2.0, 3.0)));
        assert_eq!(median_max(&[4.0, 1.0, 2.0, 3.0]), Some((2.5, 4.0)));
        assert_eq!(median_max(&[f64::NAN, 1.0]), Some((1.0, 1.0)));
    }

    #[test]
    fn proc_files_are_read() {
        let stat = "4242 (ipop (x) y) S 1 4242 4242 0 -1 4194560 500 0 0 0 123 45 0 0 20 0 3 0 \
                    100 1000 200";
        assert_eq!(parse_stat(stat), Some(('S', 168)));
        assert_eq!(parse_stat("4242 (ipop) Z 1"), None);
        let status = "Name:\tipop\nVmHWM:\t   12000 kB\nVmRSS:\t    9000 kB\nThreads:\t3\n";
        assert_eq!(parse_memory(status), Some((9000, 12000)));
        assert_eq!(parse_memory("Name:\tipop\n"), None);
        assert!((cpu_percent(150, Duration::from_secs(30)) - 5.0).abs() < 1e-9);
        assert!(cpu_percent(1, Duration::ZERO).abs() < f64::EPSILON);
    }

    #[test]
    fn par_map_keeps_the_order() {
        let items: Vec<u32> = (0..50).collect();
        assert_eq!(
            par_map(&items, 4, |x| x * 2),
            items.iter().map(|x| x * 2).collect::<Vec<_>>()
        );
        assert!(par_map(&Vec::<u32>::new(), 4, |x| *x).is_empty());
    }

    fn device(name: &str, links: usize, sent: u64, cpu: f64) -> DeviceReport {
        DeviceReport {
            name: name.to_owned(),
            links,
            xmpp: json!({"stanzas_sent": sent, "stanzas_received": 2 * sent,
                         "bytes_sent": 1000 * sent, "bytes_received": 0,
                         "link_offers": 3, "link_offers_repeated": 1,
                         "signal_failures": {"refused": 1, "timeout": 2, "unsent": 0}}),
            idle_cpu: Some(cpu),
            memory_kb: Some((10 * 1024, 12 * 1024)),
            ..DeviceReport::default()
        }
    }

    #[test]
    fn the_table_shows_medians_maxima_and_the_hub() {
        let report = Report {
            devices: 3,
            server: ServerKind::Prosody,
            server_limit: "stock",
            links: LinkPolicy::OnDemand,
            rested: None,
            send_rate: None,
            started_at: "2026-12-04 22:30 UTC".to_owned(),
            cores: 2,
            group_pairs: 3,
            group_passed: vec![1.0, 2.5, 4.0],
            hub_pairs: 3,
            hub_passed: vec![2.0, 3.0],
            all_online_s: Some(0.8),
            timed_out: true,
            interrupted: false,
            failed_pings: 2,
            failed_idle_pings: 1,
            setup_s: vec![0.4, 0.2, 1.5],
            exited: Vec::new(),
            per_device: vec![
                device("a", 3, 10, 0.5),
                device("b", 3, 20, 0.3),
                device("c", 3, 30, 0.9),
                device("hub", 3, 40, 1.2),
            ],
            idle_s: 30.0,
            server_setup_cpu_s: Some(4.0),
            server_idle_cpu: Some(0.1),
            server_memory_kb: Some((40 * 1024, 50 * 1024)),
        };
        let table = report.table();
        assert!(
            table.contains("group pairs: all 3 pass after 4.0 s; median pair 2.5 s"),
            "{table}"
        );
        assert!(
            table.contains("friend pairs: 2/3 pass (not converged)"),
            "{table}"
        );
        assert!(table.contains("TIMED OUT"), "{table}");
        assert!(table.contains("links = \"on-demand\""), "{table}");
        assert!(
            table.contains(
                "first ping to a device shown idle until its reply: median 0.40 s, \
                            max 1.50 s, over 3 pairs"
            ),
            "{table}"
        );
        assert!(
            table.contains("unanswered pings: 2 to a device shown connected, 1 to one shown idle"),
            "{table}"
        );
        assert!(table.contains("the worst case"), "{table}");
        let line = |label: &str| {
            table
                .lines()
                .find(|l| l.starts_with(label))
                .unwrap_or_default()
                .split_whitespace()
                .rev()
                .take(3)
                .collect::<Vec<_>>()
        };
        assert_eq!(line("stanzas sent "), ["40", "30", "20"]);
        assert_eq!(line("stanzas sent per link"), ["13.3", "10.0", "6.7"]);
        assert_eq!(line("signals failed"), ["3", "3", "3"]);
        assert_eq!(line("idle CPU, %"), ["1.20", "0.90", "0.50"]);
        assert_eq!(line("VmHWM"), ["12.0", "12.0", "12.0"]);
        let json = report.json();
        assert_eq!(json["group_converged_s"], 4.0);
        assert_eq!(json["hub_converged_s"], Value::Null);
        assert_eq!(json["links"], "on-demand");
        assert_eq!(json["on_demand_setup_pairs"], 3);
        assert_eq!(json["on_demand_setup_median_s"], 0.4);
        assert_eq!(json["failed_idle_pings"], 1);
        assert_eq!(json["per_device"]["links up"]["hub"], 3.0);
        assert_eq!(json["devices_xmpp"].as_array().map(Vec::len), Some(4));
    }

    #[test]
    fn link_policies_are_named_as_in_the_config() {
        for policy in [LinkPolicy::All, LinkPolicy::OnDemand, LinkPolicy::Auto] {
            assert_eq!(LinkPolicy::parse(policy.as_str()), Some(policy));
        }
        assert_eq!(LinkPolicy::parse("on-demand"), Some(LinkPolicy::OnDemand));
        assert_eq!(LinkPolicy::parse("ondemand"), None);
        assert_eq!(LinkPolicy::default(), LinkPolicy::Auto);
    }

    #[test]
    fn the_config_gives_both_overlays_the_policy() {
        let group = overlays_config(
            Some(("scale@conference.example.org", 1)),
            LinkPolicy::OnDemand,
            Duration::from_secs(750),
        );
        assert_eq!(
            group,
            "[social]\nlinks = \"on-demand\"\nidle_timeout = \"750s\"\n\n[[groups]]\n\
             room = \"scale@conference.example.org\"\nsubnet = \"10.90.0.0/16\"\n\
             address = \"10.90.0.2\"\nlinks = \"on-demand\"\nidle_timeout = \"750s\"\n"
        );
        let hub = overlays_config(None, LinkPolicy::All, Duration::ZERO);
        assert_eq!(hub, "[social]\nlinks = \"all\"\nidle_timeout = \"1s\"\n");
    }

    /// A peer as `ipop status --json` lists it (fields the harness does not read left out).
    fn peer(user: &str, state: &str, addresses: &[&str]) -> Value {
        json!({"id": "key", "fingerprint": "fp", "name": null, "jid": format!("{user}@example.org"),
               "device": "pc", "addresses": addresses, "state": state, "path": null,
               "rx_bytes": 0, "tx_bytes": 0, "reason": null})
    }

    /// A status with a social overlay and the group `ROOM_JID`, holding these peers.
    fn status(social: Vec<Value>, group: Vec<Value>) -> Value {
        json!({"xmpp": {"state": "online", "stanzas_sent": 7}, "loop_stall_max_s": 0.002,
               "overlays": [
                   {"name": "social", "kind": "social", "addresses": ["172.31.0.1/16"],
                    "peers": social},
                   {"name": ROOM_JID, "kind": "group", "addresses": ["10.90.0.1/16"],
                    "peers": group},
                   {"name": "other@conference.example.org", "kind": "group",
                    "addresses": ["10.91.0.1/16"],
                    "peers": [peer("u007", "connected", &["10.91.0.7/32"])]}]})
    }

    const ROOM_JID: &str = "scale@conference.example.org";

    #[test]
    fn status_lists_connected_and_idle_peers_with_their_addresses() {
        let social = vec![peer("hub", "idle", &["172.31.0.2/32", "fd00::2/128"])];
        let group = vec![
            peer("u002", "connected", &["10.90.0.2/32"]),
            peer("u003", "idle", &["fd00::3/128", "10.90.0.3/32"]),
            peer("u004", "connecting", &["10.90.0.4/32"]),
            peer("u005", "offline", &[]),
            peer("u006", "idle", &["fd00::6/128"]),
        ];
        let seen = parse_status(&status(social, group), ROOM_JID);
        assert!(seen.online);
        assert!((counter(&seen.xmpp, "stanzas_sent") - 7.0).abs() < f64::EPSILON);
        assert!((seen.loop_stall_ms - 2.0).abs() < 1e-9);
        let reach = |user: &str, a: Option<[u8; 4]>, connected| Reachable {
            user: user.to_owned(),
            address: a.map(IpAddr::from),
            connected,
        };
        assert_eq!(seen.social, [reach("hub", Some([172, 31, 0, 2]), false)]);
        assert_eq!(
            seen.group,
            [
                reach("u002", Some([10, 90, 0, 2]), true),
                reach("u003", Some([10, 90, 0, 3]), false),
                reach("u006", None, false),
            ]
        );
        assert_eq!(seen.links_up(), 1);
        assert!(!parse_status(&json!({}), ROOM_JID).online);
    }

    #[test]
    fn pings_go_to_connected_and_idle_peers_spread_over_the_pingers() {
        let users: Vec<String> = (0..4).map(user).collect();
        // Pairs and who pings whom: 0 (1 → 0), 1 (0 → 2), 2 (3 → 0), 3 (2 → 1), 4 (1 → 3),
        // 5 (3 → 2), then the hub (4) with each, 6 to 9.
        let pairs = wanted_pairs(4);
        let group = |peers: Vec<Value>| Some(parse_status(&status(Vec::new(), peers), ROOM_JID));
        let statuses = [
            group(vec![peer("u003", "idle", &["10.90.0.3/32"])]),
            group(vec![
                peer("u001", "connected", &["10.90.0.1/32"]),
                peer("u004", "idle", &["10.90.0.4/32"]),
            ]),
            group(vec![peer("u002", "connecting", &["10.90.0.2/32"])]),
            group(vec![
                peer("u001", "idle", &["10.90.0.1/32"]),
                peer("u003", "connected", &["10.90.0.3/32"]),
            ]),
            Some(parse_status(
                &status(
                    vec![
                        peer("u001", "idle", &["172.31.0.2/32"]),
                        peer("u002", "idle", &["fd00::3/128"]),
                        peer("u004", "connected", &["172.31.0.5/32"]),
                    ],
                    Vec::new(),
                ),
                ROOM_JID,
            )),
        ];
        let statuses: Vec<Option<&Seen>> = statuses.iter().map(Option::as_ref).collect();
        let mut targets = vec![None; pairs.len()];
        find_targets(&pairs, &mut targets, &statuses, &users);
        let mut passed = vec![None; pairs.len()];
        let mut tried = vec![None; pairs.len()];
        let ping = |pair, from, to: [u8; 4], idle| Ping {
            pair,
            from,
            to: IpAddr::from(to),
            idle,
        };
        // Each pinger's first pair, then by each one's share of its pairs pinged: the hub's
        // second (a quarter of its four) before the others' second (half of their two).
        assert_eq!(
            choose_pings(&pairs, &passed, &tried, &targets),
            [
                ping(0, 1, [10, 90, 0, 1], false),
                ping(1, 0, [10, 90, 0, 3], true),
                ping(2, 3, [10, 90, 0, 1], true),
                ping(6, 4, [172, 31, 0, 2], true),
                ping(9, 4, [172, 31, 0, 5], false),
                ping(4, 1, [10, 90, 0, 4], true),
                ping(5, 3, [10, 90, 0, 3], false),
            ]
        );
        // Passed pairs are done; pairs pinged before come after those never pinged.
        passed[0] = Some(1.0);
        tried[6] = Some(Instant::now());
        let order: Vec<usize> = choose_pings(&pairs, &passed, &tried, &targets)
            .iter()
            .map(|p| p.pair)
            .collect();
        assert_eq!(order, [1, 2, 9, 4, 5, 6]);
        // A target once found is kept: a later status that no longer lists it changes
        // nothing.
        let before = targets.clone();
        find_targets(
            &pairs,
            &mut targets,
            &[None, None, None, None, None],
            &users,
        );
        assert_eq!(targets, before);
        // A pinger with twice the pings takes two turns for the other's one.
        let hub = parse_status(
            &status(
                users
                    .iter()
                    .map(|u| peer(u, "connected", &["172.31.0.9/32"]))
                    .collect(),
                Vec::new(),
            ),
            ROOM_JID,
        );
        let statuses = [None, statuses[1], None, None, Some(&hub)];
        let mut targets = vec![None; pairs.len()];
        find_targets(&pairs, &mut targets, &statuses, &users);
        let order: Vec<usize> = choose_pings(&pairs, &[None; 10], &[None; 10], &targets)
            .iter()
            .map(|p| p.pair)
            .collect();
        assert_eq!(order, [0, 6, 7, 4, 8, 9]);
        // A pinger served in an earlier round waits for one that was not: with one of the
        // first pinger's two pairs pinged, the hub's first two come before its second.
        let mut tried = [None; 10];
        tried[0] = Some(Instant::now());
        let order: Vec<usize> = choose_pings(&pairs, &[None; 10], &tried, &targets)
            .iter()
            .map(|p| p.pair)
            .collect();
        assert_eq!(order, [6, 7, 4, 8, 9, 0]);
    }
}
