//! The scenario of IPOP's XMPP/OSN bindings, run for real on one machine.
//!
//! Alice and Bob are friends on an XMPP server (SocialVPN); Carol creates a group and adds David
//! (GroupVPN). They do this from chat clients, independently of ipop. Each of them has one
//! device behind a NAT router of its own on a fake internet, where a server runs Prosody (which
//! also hands out its STUN/TURN server, XEP-0215) and coturn. Every device runs `ipop up` with a
//! config naming only its XMPP account and its overlay; the demo shows `ipop status` on each
//! device and pings by DNS name within both overlays.
//!
//! `scripts/demo.sh` installs the packages, builds ipop and this driver, then runs it as root:
//!
//! ```text
//! seed_demo --ipop target/release/ipop [--stay] [--first-step 3 --total 13]
//! ```
//!
//! Everything it creates (namespaces, processes, files, `/etc/netns` entries) is removed when it
//! ends, after a failure and on SIGINT (Ctrl-C), SIGTERM or SIGHUP too. With `--stay` it stays up
//! until one of those signals arrives.

use std::fmt::Write as _;
use std::fs::OpenOptions;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::fs::OpenOptionsExt as _;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use ipop_lab::{
    BareJid, Coturn, Daemon, ExternalService, Nat, NatLab, Netns, Prosody, TestDir, XmppUser,
    generate_key, log_tail, status_json,
};
use serde_json::Value;
use tokio::signal::unix::{SignalKind, signal};

const USAGE: &str = "usage: seed_demo --ipop PATH [--stay] [--first-step N --total M]
  --ipop PATH      the ipop binary every device runs
  --stay           stay up after the demo, until Ctrl-C (or SIGTERM)
  --first-step N   number of this driver's first step (default 1)
  --total M        steps in all, those before it included (checked against the driver's)";

const DOMAIN: &str = "example.org";
/// The group's room, on `conference.DOMAIN`.
const ROOM: &str = "lab";
const GROUP_SUBNET: &str = "10.42.0.0/24";
/// How long the devices may take to log in to XMPP.
const ONLINE_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the two links may take to carry pings once every device is online.
const LINK_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a device's name may take to resolve once its link carries pings.
const NAME_TIMEOUT: Duration = Duration::from_secs(5);
/// Log lines shown when a step fails.
const LOG_LINES: usize = 15;
/// The steps of this driver, the clean-up included.
const STEPS: usize = 11;

/// `println!` that carries on when the output is gone (`| head`), so that the demo still
/// cleans up.
macro_rules! say {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// Set by the signal thread: the demo stops at the next check and cleans up.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Overlay {
    /// `[social]`: friends on the roster.
    Friends,
    /// `[[groups]]`: the members of the room.
    Group,
}

/// A user with one device.
struct Person {
    user: &'static str,
    device: &'static str,
    nat: Nat,
    overlay: Overlay,
}

const PEOPLE: [Person; 4] = [
    Person {
        user: "alice",
        device: "laptop",
        nat: Nat::FullCone,
        overlay: Overlay::Friends,
    },
    Person {
        user: "bob",
        device: "phone",
        nat: Nat::Symmetric,
        overlay: Overlay::Friends,
    },
    Person {
        user: "carol",
        device: "desk",
        nat: Nat::Symmetric,
        overlay: Overlay::Group,
    },
    Person {
        user: "david",
        device: "laptop",
        nat: Nat::UdpBlocked,
        overlay: Overlay::Group,
    },
];
const ALICE: usize = 0;
const BOB: usize = 1;
const CAROL: usize = 2;
const DAVID: usize = 3;
/// The links the scenario makes: within the friends' overlay and within the group.
const LINKS: [(usize, usize); 2] = [(ALICE, BOB), (CAROL, DAVID)];

impl Person {
    fn jid(&self) -> String {
        format!("{}@{DOMAIN}", self.user)
    }

    /// `laptop.bob.example.org.ipop`: the name ipop gives this device in DNS.
    fn dns_name(&self) -> String {
        format!("{}.{}.{DOMAIN}.ipop", self.device, self.user)
    }

    /// "alice's laptop".
    fn label(&self) -> String {
        format!("{}'s {}", self.user, self.device)
    }

    fn password(&self) -> String {
        format!("demo-{}-password", self.user)
    }
}

fn nat_name(nat: Nat) -> &'static str {
    match nat {
        Nat::None => "no NAT",
        Nat::FullCone => "a full-cone NAT",
        Nat::PortRestrictedCone => "a port-restricted cone NAT",
        Nat::Symmetric => "a symmetric NAT",
        Nat::UdpBlocked => "a NAT that blocks UDP",
    }
}

struct Args {
    ipop: PathBuf,
    stay: bool,
    first_step: usize,
    total: usize,
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut ipop = None;
    let mut stay = false;
    let mut first_step = 1;
    let mut total = None;
    let number = |flag: &str, value: Option<String>| -> Result<usize, String> {
        value
            .and_then(|v| v.parse().ok())
            .filter(|n| *n >= 1)
            .ok_or_else(|| format!("{flag} needs a number of at least 1"))
    };
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--ipop" => ipop = Some(PathBuf::from(args.next().ok_or("--ipop needs a path")?)),
            "--stay" => stay = true,
            "--first-step" => first_step = number("--first-step", args.next())?,
            "--total" => total = Some(number("--total", args.next())?),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    let ipop: PathBuf = ipop.ok_or("--ipop is required")?;
    // Absolute, for the commands printed to run by hand.
    let ipop = std::fs::canonicalize(&ipop)
        .ok()
        .filter(|p| p.is_file())
        .ok_or_else(|| format!("{} is not a file", ipop.display()))?;
    let own_total = first_step - 1 + STEPS;
    let total = total.unwrap_or(own_total);
    if total != own_total {
        return Err(format!(
            "--total {total} does not match: this driver has {STEPS} steps from step {first_step}, {own_total} in all"
        ));
    }
    Ok(Args {
        ipop,
        stay,
        first_step,
        total,
    })
}

/// Why the demo stopped early.
enum Failure {
    /// A step failed; it has printed why.
    Failed,
    Interrupted,
}

fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Starts a thread that takes SIGINT, SIGTERM and SIGHUP and sets [`INTERRUPTED`]; the demo
/// then stops at its next check and cleans up.
fn catch_signals() -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(|e| format!("cannot start the signal thread: {e}"))?;
    let (mut int, mut term, mut hup) = {
        let _context = runtime.enter();
        let catch = |kind| signal(kind).map_err(|e| format!("cannot catch signals: {e}"));
        (
            catch(SignalKind::interrupt())?,
            catch(SignalKind::terminate())?,
            catch(SignalKind::hangup())?,
        )
    };
    thread::Builder::new()
        .name("signals".to_owned())
        .spawn(move || {
            runtime.block_on(async move {
                loop {
                    let name = tokio::select! {
                        Some(()) = int.recv() => "SIGINT",
                        Some(()) = term.recv() => "SIGTERM",
                        Some(()) = hup.recv() => "SIGHUP",
                        else => return,
                    };
                    if INTERRUPTED.swap(true, Ordering::SeqCst) {
                        let _ = writeln!(
                            std::io::stderr(),
                            "\n{name} again: still cleaning up, it ends within seconds"
                        );
                    } else {
                        let _ = writeln!(std::io::stderr(), "\n{name}: stopping");
                    }
                }
            });
        })
        .map_err(|e| format!("cannot start the signal thread: {e}"))?;
    Ok(())
}

/// Numbered progress lines: `[3/13] what … ok (0.4 s)`.
struct Progress {
    next: usize,
    total: usize,
}

impl Progress {
    /// Runs one step and prints its line. A panic inside (the lab's way to fail) counts as a
    /// failure with its message.
    fn step<T>(
        &mut self,
        title: &str,
        f: impl FnOnce() -> Result<T, String>,
    ) -> Result<T, Failure> {
        if interrupted() {
            return Err(Failure::Interrupted);
        }
        let result = self.run(title, f);
        if interrupted() {
            return Err(Failure::Interrupted);
        }
        result.map_err(|()| Failure::Failed)
    }

    /// The last step, numbered so also after a failure or an interruption (the clean-up).
    fn last_step(&mut self, title: &str, f: impl FnOnce() -> Result<(), String>) -> bool {
        self.next = self.total;
        self.run(title, f).is_ok()
    }

    fn run<T>(&mut self, title: &str, f: impl FnOnce() -> Result<T, String>) -> Result<T, ()> {
        let mut out = std::io::stdout();
        // A closed output (`| head`) must not stop the demo before it cleans up.
        let _ = write!(out, "[{}/{}] {title} … ", self.next, self.total);
        let _ = out.flush();
        self.next += 1;
        let started = Instant::now();
        let result = match panic::catch_unwind(AssertUnwindSafe(f)) {
            Ok(result) => result,
            Err(payload) => Err(panic_message(payload.as_ref())),
        };
        let took = duration(started.elapsed());
        match result {
            Ok(value) => {
                say!("ok ({took})");
                Ok(value)
            }
            Err(_) if interrupted() => {
                say!("interrupted");
                Err(())
            }
            Err(reason) => {
                say!("FAILED ({took})");
                say!("{}", indent(&reason));
                Err(())
            }
        }
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_else(|| "a step panicked".to_owned())
}

/// `0.4 s`, `12.0 s`, `3 min 12 s`.
fn duration(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 60.0 {
        format!("{s:.1} s")
    } else {
        format!("{} min {} s", d.as_secs() / 60, d.as_secs() % 60)
    }
}

fn indent(text: &str) -> String {
    text.trim_end()
        .lines()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// `/etc/netns/NS/resolv.conf`, which `ip netns exec NS` mounts on `/etc/resolv.conf`: programs
/// run in the device's namespace ask ipop's DNS responder. Removed on drop.
struct ResolvConf {
    dir: PathBuf,
}

impl ResolvConf {
    fn new(ns: &Netns, server: Ipv4Addr) -> Result<ResolvConf, String> {
        let dir = Path::new("/etc/netns").join(ns.name());
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let guard = ResolvConf { dir };
        let path = guard.dir.join("resolv.conf");
        std::fs::write(
            &path,
            format!("nameserver {server}\noptions timeout:1 attempts:2\n"),
        )
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        Ok(guard)
    }
}

impl Drop for ResolvConf {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            let _ = writeln!(
                std::io::stderr(),
                "cannot remove {}: {e}",
                self.dir.display()
            );
        }
    }
}

/// Everything the demo starts. Fields drop in order: the name-server files and the daemons
/// first, then the servers, the lab and the directory of configs and logs.
struct Demo {
    /// Per person, once pointed at the device's own ipop.
    resolvers: Vec<(usize, ResolvConf)>,
    /// One per person, in [`PEOPLE`]'s order, once started.
    daemons: Vec<Daemon>,
    coturn: Option<Coturn>,
    prosody: Option<Prosody>,
    lab: Option<NatLab>,
    dir: TestDir,
    ipop: PathBuf,
}

impl Demo {
    fn person_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(PEOPLE[i].user)
    }

    fn config(&self, i: usize) -> PathBuf {
        self.person_dir(i).join("ipop.toml")
    }

    fn log(&self, i: usize) -> PathBuf {
        self.person_dir(i).join("ipop.log")
    }

    fn lab(&self) -> Result<&NatLab, String> {
        self.lab
            .as_ref()
            .ok_or_else(|| "the lab is not built".to_owned())
    }

    fn prosody(&self) -> Result<&Prosody, String> {
        self.prosody
            .as_ref()
            .ok_or_else(|| "Prosody is not running".to_owned())
    }

    fn ns(&self, i: usize) -> Result<&Netns, String> {
        Ok(&self.lab()?.devices[i].host.ns)
    }

    /// A chat client of person `i`'s, on the server's side of the fake internet.
    fn chat_client(&self, i: usize) -> Result<XmppUser, String> {
        let person = &PEOPLE[i];
        Ok(
            XmppUser::builder(self.prosody()?, person.user, &person.password())
                .resource("chat")
                .netns(&self.lab()?.server.ns)
                .connect(),
        )
    }

    fn status(&self, i: usize) -> Result<Value, String> {
        status_json(self.ns(i)?, &self.ipop, &self.config(i))
    }

    /// `ipop status` as a person reads it.
    fn status_table(&self, i: usize) -> String {
        match self.ns(i).map(|ns| self.ipop_in(ns, i, &["status"])) {
            Ok(Ok(out)) if out.status.success() => {
                String::from_utf8_lossy(&out.stdout).into_owned()
            }
            Ok(Ok(out)) => format!(
                "ipop status failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            Ok(Err(e)) | Err(e) => e,
        }
    }

    /// `ipop ARGS -c CONFIG` in device `i`'s namespace.
    fn ipop_in(&self, ns: &Netns, i: usize, args: &[&str]) -> Result<Output, String> {
        ns.command(&self.ipop)
            .args(args)
            .arg("-c")
            .arg(self.config(i))
            .output()
            .map_err(|e| format!("cannot run {}: {e}", self.ipop.display()))
    }

    /// Points the resolver of device `i`'s namespace at its own ipop, on its address in its
    /// overlay, unless done already; returns that address.
    fn use_own_dns(&mut self, i: usize) -> Result<Ipv4Addr, String> {
        let status = self.status(i)?;
        let kind = match PEOPLE[i].overlay {
            Overlay::Friends => "social",
            Overlay::Group => "group",
        };
        let server = own_address(&status, kind)
            .ok_or_else(|| format!("{} has no {kind} address: {status}", PEOPLE[i].label()))?;
        if !self.resolvers.iter().any(|(j, _)| *j == i) {
            let resolver = ResolvConf::new(self.ns(i)?, server)?;
            self.resolvers.push((i, resolver));
        }
        Ok(server)
    }

    /// Fails when an `ipop up` started so far has exited.
    fn running(&mut self) -> Result<(), Wait> {
        for (daemon, person) in self.daemons.iter_mut().zip(&PEOPLE) {
            if let Some(status) = daemon.try_wait() {
                return Err(Wait::Gone(format!(
                    "ipop up on {} exited ({status}); last lines of {}:\n{}",
                    person.label(),
                    daemon.log_path().display(),
                    indent(&daemon.log_tail(LOG_LINES))
                )));
            }
        }
        Ok(())
    }

    /// What to show when something about device `i` went wrong: its status and last log lines.
    fn diagnose(&self, i: usize) -> String {
        format!(
            "{}: ipop status:\n{}\n{}: last lines of {}:\n{}",
            PEOPLE[i].label(),
            indent(&self.status_table(i)),
            PEOPLE[i].label(),
            self.log(i).display(),
            indent(&log_tail(&self.log(i), LOG_LINES))
        )
    }
}

/// Why a condition does not hold: not yet, or not ever (a daemon has exited).
enum Wait {
    Pending(String),
    Gone(String),
}

impl From<String> for Wait {
    fn from(last: String) -> Wait {
        Wait::Pending(last)
    }
}

/// Polls `f` every 100 ms until it returns `Ok`, or says it never will, or the timeout passes,
/// or the demo is interrupted.
fn wait_for<T>(
    timeout: Duration,
    what: &str,
    mut f: impl FnMut() -> Result<T, Wait>,
) -> Result<T, String> {
    let deadline = Instant::now() + timeout;
    loop {
        match f() {
            Ok(value) => return Ok(value),
            Err(Wait::Gone(why)) => return Err(why),
            Err(_) if interrupted() => return Err("interrupted".to_owned()),
            Err(Wait::Pending(last)) if Instant::now() >= deadline => {
                return Err(format!(
                    "no {what} within {}; last seen: {last}",
                    duration(timeout)
                ));
            }
            Err(Wait::Pending(_)) => thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// The peer with this JID in any overlay of a status.
fn peer<'a>(status: &'a Value, jid: &str) -> Option<&'a Value> {
    status["overlays"]
        .as_array()?
        .iter()
        .flat_map(|o| o["peers"].as_array().into_iter().flatten())
        .find(|p| p["jid"].as_str() == Some(jid))
}

/// The addresses (without prefix length) of a list like `["10.42.0.7/24", "fd…/64"]`.
fn addresses(list: &Value) -> Vec<IpAddr> {
    list.as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a.as_str()?.split('/').next()?.parse().ok())
        .collect()
}

/// The first IPv4 address of such a list.
fn first_ipv4(list: &Value) -> Option<Ipv4Addr> {
    addresses(list).into_iter().find_map(|a| match a {
        IpAddr::V4(v4) => Some(v4),
        IpAddr::V6(_) => None,
    })
}

/// This device's own IPv4 address in its overlay (`social` or `group`).
fn own_address(status: &Value, kind: &str) -> Option<Ipv4Addr> {
    status["overlays"]
        .as_array()?
        .iter()
        .find(|o| o["kind"] == kind)
        .and_then(|o| first_ipv4(&o["addresses"]))
}

fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn build_lab() -> Result<NatLab, String> {
    let lab = PEOPLE
        .iter()
        .fold(NatLab::builder("seed"), |b, p| b.site(p.nat))
        .build();
    // As on a real server, the default route leads somewhere: relayed packets toward a device's
    // private address get lost on the way instead of failing at once.
    lab.server
        .ns
        .ip(&["route", "add", "default", "via", "198.18.0.1"]);
    // The lab's addressing is IPv4 only, with IPv6 off in every namespace. On a device, the
    // interfaces created from now on (ipop's) get IPv6, as on a usual machine, so the overlays
    // carry both.
    for device in &lab.devices {
        device.host.ns.run_in(|| {
            std::fs::write("/proc/sys/net/ipv6/conf/default/disable_ipv6", "0")
                .map_err(|e| format!("cannot turn IPv6 on in {}: {e}", device.host.ns.name()))
        })?;
    }
    Ok(lab)
}

fn start_servers(lab: &NatLab, dir: &Path) -> (Coturn, Prosody) {
    let ip = IpAddr::V4(lab.server.ip);
    let coturn = Coturn::builder()
        .in_netns(&lab.server.ns, ip)
        .dir(dir)
        .start();
    let service = |kind: &str, transport: &str| ExternalService {
        kind: kind.to_owned(),
        transport: transport.to_owned(),
        host: ip.to_string(),
        port: coturn.addr().port(),
        secret: (kind == "turn").then(|| coturn.secret().to_owned()),
        ttl: Some(3600),
    };
    let prosody = Prosody::builder(DOMAIN)
        .in_netns(&lab.server.ns, ip)
        .dir(dir)
        .external_services(vec![
            service("stun", "udp"),
            service("turn", "udp"),
            service("turn", "tcp"),
        ])
        .start();
    (coturn, prosody)
}

/// Writes device `i`'s key (`ipop init`), XMPP password and config.
fn configure(demo: &Demo, i: usize) -> Result<(), String> {
    let person = &PEOPLE[i];
    let prosody = demo.prosody()?;
    let dir = demo.person_dir(i);
    let _public_key = generate_key(&demo.ipop, &dir);
    let pass = dir.join("xmpp.pass");
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&pass)
        .and_then(|mut f| f.write_all(person.password().as_bytes()))
        .map_err(|e| format!("cannot write {}: {e}", pass.display()))?;
    let overlay = match person.overlay {
        Overlay::Friends => {
            "# Friends on the roster (mutual subscription) and their devices, numbered by this\n\
             # device in the default subnet.\n\
             [social]\n"
                .to_owned()
        }
        Overlay::Group => format!(
            "# Every member of the room; this device picks a free address in the subnet.\n\
             [[groups]]\nroom = \"{ROOM}@{conference}\"\nsubnet = \"{GROUP_SUBNET}\"\n",
            conference = prosody.conference_domain()
        ),
    };
    let text = format!(
        "[device]\nstate_dir = \"state\"\ncontrol_socket = {sock:?}\nlog_level = \"info\"\n\n\
         [xmpp]\njid = \"{jid}\"\npassword_file = \"xmpp.pass\"\nserver = \"{server}\"\n\
         ca_file = {ca:?}\ndevice = \"{device}\"\n\n{overlay}",
        sock = dir.join("ipop.sock"),
        jid = person.jid(),
        server = prosody.c2s_addr(),
        ca = prosody.ca_cert_path(),
        device = person.device,
    );
    let config = demo.config(i);
    std::fs::write(&config, text).map_err(|e| format!("cannot write {}: {e}", config.display()))
}

/// Starts `ipop up` on every device and waits until each is online on XMPP.
fn start_daemons(demo: &mut Demo) -> Result<(), String> {
    for (i, person) in PEOPLE.iter().enumerate() {
        let mut cmd = demo.ns(i)?.command(&demo.ipop);
        cmd.arg("up").arg("-c").arg(demo.config(i));
        let daemon = Daemon::spawn(&format!("ipop up ({})", person.label()), cmd, &demo.log(i));
        demo.daemons.push(daemon);
    }
    for (i, person) in PEOPLE.iter().enumerate() {
        let what = format!("XMPP login of {}", person.label());
        let online = wait_for(ONLINE_TIMEOUT, &what, || {
            demo.running()?;
            let status = demo.status(i)?;
            if status["xmpp"]["state"] == "online" {
                Ok(())
            } else {
                Err(format!("xmpp {}", status["xmpp"]).into())
            }
        });
        online.map_err(|e| format!("{e}\n{}", demo.diagnose(i)))?;
    }
    Ok(())
}

/// Waits until `a` and `b` list each other as connected and `a` pings `b`; returns `a`'s entry
/// for `b`.
fn wait_link(demo: &mut Demo, a: usize, b: usize) -> Result<Value, String> {
    let (pa, pb) = (&PEOPLE[a], &PEOPLE[b]);
    let what = format!("link between {} and {}", pa.label(), pb.label());
    wait_for(LINK_TIMEOUT, &what, || {
        demo.running()?;
        let sa = demo.status(a)?;
        let sb = demo.status(b)?;
        let to_b = peer(&sa, &pb.jid()).ok_or(format!("{} does not list {}", pa.user, pb.user))?;
        let to_a = peer(&sb, &pa.jid()).ok_or(format!("{} does not list {}", pb.user, pa.user))?;
        for (from, entry) in [(pa, to_b), (pb, to_a)] {
            if entry["state"] != "connected" {
                return Err(format!("{}'s side: {entry}", from.user).into());
            }
        }
        let address = first_ipv4(&to_b["addresses"]).ok_or(format!("no address: {to_b}"))?;
        if demo.ns(a)?.ping(IpAddr::V4(address), 1).status.success() {
            Ok(to_b.clone())
        } else {
            Err(format!("{} does not answer pings at {address}", pb.label()).into())
        }
    })
    .map_err(|e| format!("{e}\n{}\n{}", demo.diagnose(a), demo.diagnose(b)))
}

/// From device `from`'s namespace, looks `to` up by name and pings it. Returns the transcript.
fn ping_by_name(demo: &mut Demo, from: usize, to: usize) -> Result<String, String> {
    let (pf, pt) = (&PEOPLE[from], &PEOPLE[to]);
    let server = demo.use_own_dns(from)?;
    let expected = peer(&demo.status(from)?, &pt.jid())
        .map(|p| addresses(&p["addresses"]))
        .unwrap_or_default();
    let ns = demo.ns(from)?;
    let name = pt.dns_name();
    let prompt = format!("{}@{}$", pf.user, pf.device);
    let mut transcript = format!(
        "(the name server is ipop itself, on {server}, {}'s own address)\n",
        pf.user
    );
    let lookup = ["getent", "hosts", name.as_str()];
    let asked = Instant::now();
    let found = wait_for(NAME_TIMEOUT, "answer", || {
        let out = ns.try_exec(&lookup);
        if out.status.success() {
            Ok(out)
        } else {
            Err(format!("`{}` failed ({})", lookup.join(" "), out.status).into())
        }
    })
    .map_err(|e| format!("{e}\n{}", demo.diagnose(from)))?;
    if asked.elapsed() > Duration::from_millis(100) {
        let _ = writeln!(
            transcript,
            "(note: ipop did not know {name} during the first {} of asking, although the link \
             already carried pings)",
            duration(asked.elapsed())
        );
    }
    let text = output_text(&found);
    let _ = writeln!(
        transcript,
        "{prompt} {}\n{}",
        lookup.join(" "),
        text.trim_end()
    );
    let answered: Vec<IpAddr> = text
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    if answered.is_empty() || !answered.iter().all(|a| expected.contains(a)) {
        return Err(format!(
            "{name} resolved to {answered:?}, not to the addresses {} gives {}, {expected:?}",
            pf.user, pt.user
        ));
    }
    let ping = ["ping", "-c", "3", name.as_str()];
    let out = ns.try_exec(&ping);
    let text = output_text(&out);
    let _ = writeln!(
        transcript,
        "{prompt} {}\n{}",
        ping.join(" "),
        text.trim_end()
    );
    if out.status.success() {
        Ok(transcript)
    } else {
        Err(format!(
            "`ip netns exec {} {}` failed ({}):\n{}\n{}",
            ns.name(),
            ping.join(" "),
            out.status,
            text.trim_end(),
            demo.diagnose(from)
        ))
    }
}

/// The demo's steps up to the name look-ups; prints what each device sees.
fn run(progress: &mut Progress, demo: &mut Demo) -> Result<(), Failure> {
    let nats: Vec<&str> = PEOPLE
        .iter()
        .map(|p| nat_name(p.nat).trim_start_matches("a "))
        .collect();
    let lab = progress.step(
        &format!(
            "building a fake internet: a server, and a home router per device ({})",
            nats.join(", ")
        ),
        build_lab,
    )?;
    demo.lab = Some(lab);

    let (coturn, prosody) = progress.step(
        "starting Prosody (XMPP for example.org, which announces the STUN/TURN server) and coturn on the server",
        || Ok(start_servers(demo.lab()?, demo.dir.path())),
    )?;
    demo.coturn = Some(coturn);
    demo.prosody = Some(prosody);

    progress.step(
        "registering alice, bob, carol and david on example.org",
        || {
            let prosody = demo.prosody()?;
            for p in &PEOPLE {
                prosody.register(p.user, &p.password());
            }
            Ok(())
        },
    )?;

    progress.step(
        "alice and bob become friends from their chat clients (a subscription each way)",
        || {
            let mut alice = demo.chat_client(ALICE)?;
            let mut bob = demo.chat_client(BOB)?;
            alice.befriend(&mut bob);
            Ok(())
        },
    )?;

    let room = format!("{ROOM}@conference.{DOMAIN}");
    progress.step(
        &format!("carol creates the group {room} from her chat client and adds david"),
        || {
            let mut carol = demo.chat_client(CAROL)?;
            carol.create_room_members_only(ROOM);
            let david = BareJid::new(&PEOPLE[DAVID].jid()).map_err(|e| e.to_string())?;
            carol.add_member(ROOM, &david);
            if carol.members(ROOM).contains(&david) {
                Ok(())
            } else {
                Err(format!("david is not a member of {room}"))
            }
        },
    )?;

    progress.step(
        "ipop init on each device, and a config: the XMPP account and [social] or [[groups]]",
        || (0..PEOPLE.len()).try_for_each(|i| configure(demo, i)),
    )?;

    progress.step(
        "ipop up on the four devices, until each is online on XMPP",
        || start_daemons(demo),
    )?;

    let entries = progress.step(
        "waiting for the links alice ↔ bob (friends) and carol ↔ david (group) to carry pings",
        || {
            LINKS
                .iter()
                .map(|&(a, b)| wait_link(&mut *demo, a, b))
                .collect::<Result<Vec<_>, _>>()
        },
    )?;

    if let Some(lab) = &demo.lab {
        for (i, person) in PEOPLE.iter().enumerate() {
            let device = &lab.devices[i];
            say!(
                "\n── {} behind {} ({}, seen on the internet as {})",
                person.label(),
                nat_name(person.nat),
                device.host.ipv4,
                device.public_ip
            );
            say!("{}@{}$ ipop status", person.user, person.device);
            say!("{}", indent(&demo.status_table(i)));
        }
    }
    say!();

    let alice_to_bob = progress.step(
        &format!(
            "alice pings bob's phone by name, {}",
            PEOPLE[BOB].dns_name()
        ),
        || ping_by_name(demo, ALICE, BOB),
    )?;
    say!("{}", indent(&alice_to_bob));
    let carol_to_david = progress.step(
        &format!(
            "carol pings david's laptop by name, {}",
            PEOPLE[DAVID].dns_name()
        ),
        || ping_by_name(demo, CAROL, DAVID),
    )?;
    say!("{}", indent(&carol_to_david));

    say!("\nThe links, as `ipop status` reports them:");
    for (&(a, b), entry) in LINKS.iter().zip(&entries) {
        let (pa, pb) = (&PEOPLE[a], &PEOPLE[b]);
        let at: Vec<String> = addresses(&entry["addresses"])
            .iter()
            .map(IpAddr::to_string)
            .collect();
        say!(
            "    {} ↔ {} ({} ↔ {}): {}, pair {}\n        {} reaches {} at {}",
            pa.label(),
            pb.label(),
            nat_name(pa.nat),
            nat_name(pb.nat),
            entry["path"].as_str().unwrap_or("no path"),
            entry["pair"].as_str().unwrap_or("-"),
            pa.user,
            pb.user,
            at.join(" and "),
        );
    }
    Ok(())
}

/// Prints how to look around while the demo stays up.
fn explore(demo: &mut Demo) {
    let named: Vec<usize> = (0..demo.daemons.len())
        .filter(|&i| match demo.use_own_dns(i) {
            Ok(_) => true,
            Err(e) => {
                say!("(no names on {}: {e})", PEOPLE[i].label());
                false
            }
        })
        .collect();
    let Some(lab) = &demo.lab else { return };
    let ipop = demo.ipop.display();
    let ns = |i: usize| lab.devices[i].host.ns.name();
    say!("The devices stay up. From another terminal, as root:");
    say!("  each device's view:");
    for (i, p) in PEOPLE.iter().enumerate().take(demo.daemons.len()) {
        say!(
            "    ip netns exec {} {ipop} status -c {}   # {}",
            ns(i),
            demo.config(i).display(),
            p.label()
        );
    }
    if !named.is_empty() {
        say!("  ping by name (each namespace asks its own ipop for .ipop names):");
        for (a, b) in LINKS.iter().flat_map(|&(a, b)| [(a, b), (b, a)]) {
            if named.contains(&a) {
                say!("    ip netns exec {} ping {}", ns(a), PEOPLE[b].dns_name());
            }
        }
    }
    say!(
        "  a shell on alice's laptop: ip netns exec {} bash",
        ns(ALICE)
    );
    say!("  logs: {}/<user>/ipop.log", demo.dir.path().display());
    if let Some(prosody) = &demo.prosody {
        say!("        {}", prosody.log_path().display());
    }
    if let Some(coturn) = &demo.coturn {
        say!("        {}", coturn.log_path().display());
    }
    say!(
        "Stop with Ctrl-C here, or: kill -INT {}   (everything is removed)",
        std::process::id()
    );
}

/// Waits for a stop signal, saying so when a daemon ends meanwhile.
fn stay(demo: &mut Demo) {
    let mut reported = vec![false; demo.daemons.len()];
    while !interrupted() {
        for (i, daemon) in demo.daemons.iter_mut().enumerate() {
            if !reported[i]
                && let Some(status) = daemon.try_wait()
            {
                reported[i] = true;
                say!("ipop up on {} exited ({status})", PEOPLE[i].label());
            }
        }
        thread::sleep(Duration::from_millis(200));
    }
}

/// Namespaces and `/etc/netns` entries of this process still present.
fn leftovers() -> Result<(), String> {
    let prefix = format!("{}{}-", ipop_lab::PREFIX, std::process::id());
    let mut left: Vec<String> = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&prefix))
        .map(|n| format!("namespace {n}"))
        .collect();
    if let Ok(entries) = std::fs::read_dir("/etc/netns") {
        left.extend(
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&prefix))
                .map(|n| format!("/etc/netns/{n}")),
        );
    }
    if left.is_empty() {
        Ok(())
    } else {
        Err(format!("left behind: {}", left.join(", ")))
    }
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("seed_demo: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = catch_signals() {
        eprintln!("seed_demo: {e}");
        return ExitCode::FAILURE;
    }
    // What a run killed outright left in /etc/netns (namespaces and servers are swept by the lab).
    ipop_lab::sweep_stale_hosts();
    // Steps report their panics themselves, as FAILED lines.
    panic::set_hook(Box::new(|_| {}));
    let mut progress = Progress {
        next: args.first_step,
        total: args.total,
    };
    let mut demo = Demo {
        resolvers: Vec::new(),
        daemons: Vec::new(),
        coturn: None,
        prosody: None,
        lab: None,
        dir: TestDir::new("demo"),
        ipop: args.ipop.clone(),
    };
    let outcome = run(&mut progress, &mut demo);
    if args.stay && !demo.daemons.is_empty() && !interrupted() {
        if outcome.is_err() {
            say!("\nStaying up so that you can look into it.");
        } else {
            say!();
        }
        explore(&mut demo);
        stay(&mut demo);
    }
    let clean = progress.last_step(
        "stopping ipop, Prosody and coturn; removing the namespaces and files",
        || {
            drop(demo);
            leftovers()
        },
    );
    match outcome {
        Ok(()) if clean => ExitCode::SUCCESS,
        Ok(()) | Err(Failure::Failed) => {
            say!("The demo FAILED: see above.");
            ExitCode::FAILURE
        }
        Err(Failure::Interrupted) => ExitCode::from(130),
    }
}
