//! Network namespaces that delete themselves, and everything running in them, when dropped.

use std::ffi::OsStr;
use std::fs::File;
use std::net::IpAddr;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, Once, PoisonError};
use std::thread::{self, JoinHandle};

use nix::sched::{CloneFlags, setns};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::{PREFIX, next_id, run_checked, sanitize_tag};

/// Serialises `ip netns add` within this process: the first one sets up the shared mount of
/// `/run/netns`, and concurrent first calls can race on it.
static ADD_LOCK: Mutex<()> = Mutex::new(());
static SWEEP: Once = Once::new();

/// An interface's counters, from [`Netns::link_counters`].
#[derive(Debug, Clone, Copy)]
pub struct LinkCounters {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
}

/// A network namespace named `ipl-<pid>-<n>-<tag>`, with `lo` up.
///
/// Dropping it kills (SIGKILL, by PID) every process still inside and deletes it, which also
/// destroys the veths and bridges it holds.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates a namespace. The first call in a process also deletes stale namespaces left by
    /// earlier runs whose process is gone (see [`sweep_stale`]).
    ///
    /// # Panics
    /// When the namespace cannot be created (for example when not running as root).
    #[must_use]
    pub fn new(tag: &str) -> Netns {
        SWEEP.call_once(sweep_stale);
        let name = format!(
            "{PREFIX}{}-{}-{}",
            std::process::id(),
            next_id(),
            sanitize_tag(tag)
        );
        {
            let _guard = ADD_LOCK.lock().unwrap_or_else(PoisonError::into_inner);
            run_checked(
                Command::new("ip").args(["netns", "add", &name]),
                "create a network namespace",
            );
        }
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// The namespace's name, as `ip netns` knows it.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A command that runs `program` inside the namespace (`ip netns exec NAME program`). The
    /// program is exec'd by `ip`, so the child's PID is the program's PID.
    #[must_use]
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Runs `args[0]` with the remaining arguments inside the namespace and returns its output,
    /// whatever its exit status.
    ///
    /// # Panics
    /// When `args` is empty or the command cannot be started.
    #[must_use]
    pub fn try_exec(&self, args: &[&str]) -> Output {
        let (program, rest) = args.split_first().expect("a command to run");
        let mut cmd = self.command(program);
        cmd.args(rest).stdin(Stdio::null());
        cmd.output()
            .unwrap_or_else(|e| panic!("cannot run {args:?} in {}: {e}", self.name))
    }

    /// Runs a command inside the namespace and returns its output.
    ///
    /// # Panics
    /// When the command fails; the message names it and carries its stderr.
    pub fn exec(&self, args: &[&str]) -> Output {
        let (program, rest) = args.split_first().expect("a command to run");
        let mut cmd = self.command(program);
        cmd.args(rest);
        run_checked(&mut cmd, &format!("run in {}", self.name))
    }

    /// Runs `ip -n NAME ARGS...`, panicking when it fails.
    pub fn ip(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new("ip");
        cmd.args(["-n", &self.name]).args(args);
        run_checked(&mut cmd, "configure a namespace")
    }

    /// The packet and byte counters of interface `ifname` (`ip -s link show`): for a TUN
    /// device, its received packets are what the daemon wrote to it, and for a veth or a LAN
    /// interface a UDP GSO train counts as one packet.
    ///
    /// # Panics
    /// When the interface does not exist or `ip` prints no counters.
    #[must_use]
    pub fn link_counters(&self, ifname: &str) -> LinkCounters {
        let out = self.ip(&["-s", "-j", "link", "show", "dev", ifname]);
        let json: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("ip -j prints JSON");
        let stats = &json[0]["stats64"];
        let counter = |path: [&str; 2]| {
            stats[path[0]][path[1]]
                .as_u64()
                .unwrap_or_else(|| panic!("no {path:?} counter for {ifname} in {json}"))
        };
        LinkCounters {
            rx_packets: counter(["rx", "packets"]),
            rx_bytes: counter(["rx", "bytes"]),
            tx_packets: counter(["tx", "packets"]),
        }
    }

    /// Adds an address (`10.0.0.1/24`, `fd00::1/64`) to an interface in the namespace. IPv6
    /// addresses skip duplicate address detection so that they are usable at once.
    pub fn add_address(&self, ifname: &str, cidr: &str) {
        let mut args = vec!["addr", "add", cidr, "dev", ifname];
        if cidr.contains(':') {
            args.push("nodad");
        }
        self.ip(&args);
    }

    /// `ping -c COUNT -W 2 -i 0.2 ADDR` from inside the namespace; check `status.success()`.
    #[must_use]
    pub fn ping(&self, addr: IpAddr, count: u32) -> Output {
        self.try_exec(&[
            "ping",
            "-n",
            "-c",
            &count.to_string(),
            "-W",
            "2",
            "-i",
            "0.2",
            &addr.to_string(),
        ])
    }

    /// Runs `f` on a new thread that has entered this namespace, and returns its result. Sockets
    /// that `f` opens live in the namespace. A panic in `f` is resumed in the caller.
    pub fn run_in<T, F>(&self, f: F) -> T
    where
        T: Send,
        F: FnOnce() -> T + Send,
    {
        let file = self.open();
        let name = self.name.as_str();
        thread::scope(|scope| {
            let handle = thread::Builder::new()
                .name(format!("in-{name}"))
                .spawn_scoped(scope, move || {
                    enter(&file, name);
                    f()
                })
                .expect("spawn a thread");
            handle
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Like [`Netns::run_in`] but does not wait: returns the thread's handle, for a server that
    /// must run while the test does something else.
    pub fn spawn_in<T, F>(&self, f: F) -> JoinHandle<T>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let file = self.open();
        let name = self.name.clone();
        thread::Builder::new()
            .name(format!("in-{name}"))
            .spawn(move || {
                enter(&file, &name);
                f()
            })
            .expect("spawn a thread")
    }

    fn open(&self) -> File {
        let path = Path::new("/run/netns").join(&self.name);
        File::open(&path).unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        remove(&self.name);
    }
}

fn enter(file: &File, name: &str) {
    if let Err(e) = setns(file, CloneFlags::CLONE_NEWNET) {
        panic!("cannot enter network namespace {name}: {e}");
    }
}

/// The PIDs of the processes inside namespace `name`, this process excepted.
fn pids_in(name: &str) -> Vec<i32> {
    let Ok(out) = Command::new("ip").args(["netns", "pids", name]).output() else {
        return Vec::new();
    };
    let own = i32::try_from(std::process::id()).ok();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|pid| pid.parse::<i32>().ok())
        .filter(|pid| Some(*pid) != own)
        .collect()
}

/// Kills what still runs in the namespace and deletes it; reports failures instead of panicking,
/// since it runs in `Drop`.
fn remove(name: &str) {
    for pid in pids_in(name) {
        // The process may have exited meanwhile: ESRCH is fine.
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
    match Command::new("ip").args(["netns", "del", name]).output() {
        Ok(out) if out.status.success() => {}
        Ok(out) => eprintln!(
            "ipop-lab: cannot delete namespace {name}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => eprintln!("ipop-lab: cannot run `ip netns del {name}`: {e}"),
    }
}

/// The PID in a name made by [`Netns::new`] (`ipl-<pid>-...`).
fn creator_pid(name: &str) -> Option<u32> {
    name.strip_prefix(PREFIX)?.split('-').next()?.parse().ok()
}

/// Deletes the namespaces named by this harness whose creating process is no longer alive, so
/// that a run killed with SIGKILL does not leave namespaces (and their processes) behind.
/// [`Netns::new`] calls it once per process.
pub fn sweep_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(pid) = creator_pid(name) else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            eprintln!("ipop-lab: deleting stale namespace {name}");
            remove(name);
        }
    }
}

/// Whether a namespace of this name exists.
#[must_use]
pub fn exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creator_pid_is_parsed_from_our_names_only() {
        assert_eq!(creator_pid("ipl-1234-7-ping"), Some(1234));
        assert_eq!(creator_pid("ipl-x-7-ping"), None);
        assert_eq!(creator_pid("other-1234"), None);
    }

    #[test]
    fn namespace_is_deleted_on_drop_with_its_processes() {
        let ns = Netns::new("drop");
        let name = ns.name().to_owned();
        assert!(exists(&name), "{name} should exist");
        let mut sleeper = ns
            .command("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep in the namespace");
        let pid = i32::try_from(sleeper.id()).expect("a pid");
        crate::wait_until(
            std::time::Duration::from_secs(5),
            "sleep to enter the namespace",
            || {
                let pids = pids_in(&name);
                if pids.contains(&pid) {
                    Ok(())
                } else {
                    Err(format!("{pids:?}"))
                }
            },
        );
        drop(ns);
        assert!(!exists(&name), "{name} should be gone");
        let status = sleeper.wait().expect("reap sleep");
        assert!(!status.success(), "sleep should have been killed");
    }

    #[test]
    fn stale_namespace_of_a_dead_process_is_swept() {
        let mut child = Command::new("true").spawn().expect("spawn true");
        let dead = child.id();
        child.wait().expect("reap true");
        let name = format!("{PREFIX}{dead}-0-stale");
        run_checked(
            Command::new("ip").args(["netns", "add", &name]),
            "create a stale namespace",
        );
        sweep_stale();
        let left = exists(&name);
        if left {
            remove(&name);
        }
        assert!(!left, "{name} should have been swept");
    }

    #[test]
    fn namespace_of_a_live_process_is_kept_by_the_sweep() {
        let ns = Netns::new("live");
        sweep_stale();
        assert!(exists(ns.name()));
    }

    #[test]
    fn run_in_enters_the_namespace() {
        let ns = Netns::new("runin");
        ns.add_address("lo", "192.0.2.7/32");
        let bound = ns.run_in(|| std::net::UdpSocket::bind("192.0.2.7:0").is_ok());
        assert!(bound, "192.0.2.7 should be bindable inside the namespace");
        assert!(
            std::net::UdpSocket::bind("192.0.2.7:0").is_err(),
            "192.0.2.7 must not be bindable outside the namespace"
        );
    }
}
