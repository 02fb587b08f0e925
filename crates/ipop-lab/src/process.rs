//! A guard for a long-running process whose output goes to a log file.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// How long [`Daemon::stop`] waits after SIGTERM before it sends SIGKILL.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Lines of each log printed when a test fails.
const LOG_TAIL_LINES: usize = 40;

/// A running process (usually `ipop up`) with stdout and stderr appended to a log file.
///
/// Dropping it stops the process (SIGTERM, then SIGKILL after [`STOP_TIMEOUT`]); when the
/// thread is panicking (a failing test), it also prints the log's path and last lines.
#[derive(Debug)]
pub struct Daemon {
    label: String,
    child: Child,
    log: PathBuf,
    exit: Option<ExitStatus>,
}

impl Daemon {
    /// Spawns `cmd` (typically built by [`crate::Netns::command`]) with its output appended
    /// to `log`, preceded by a line naming the command.
    ///
    /// # Panics
    /// When the log cannot be opened or the command cannot be started.
    pub fn spawn(label: &str, mut cmd: Command, log: &Path) -> Daemon {
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap_or_else(|e| panic!("cannot open log {}: {e}", log.display()));
        // A marker only: losing it does not matter.
        let _ = writeln!(file, "===== ipop-lab: starting {label}: {cmd:?}");
        let stderr = file
            .try_clone()
            .unwrap_or_else(|e| panic!("cannot duplicate log {}: {e}", log.display()));
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {label} ({cmd:?}): {e}"));
        Daemon {
            label: label.to_owned(),
            child,
            log: log.to_owned(),
            exit: None,
        }
    }

    #[must_use]
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    #[must_use]
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The exit status if the process has ended (without waiting).
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().ok().flatten();
        }
        self.exit
    }

    /// Sends SIGTERM, waits up to `timeout` for the process to end, then kills it. Returns how
    /// it ended, and whether it needed SIGKILL.
    pub fn stop_within(&mut self, timeout: Duration) -> (ExitStatus, bool) {
        if let Some(status) = self.try_wait() {
            return (status, false);
        }
        if let Ok(pid) = i32::try_from(self.child.id()) {
            // ESRCH means it has just exited; the wait below collects it.
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.try_wait() {
                return (status, false);
            }
            thread::sleep(Duration::from_millis(20));
        }
        (self.kill(), true)
    }

    /// Kills the process at once (SIGKILL, by PID), as a crash or `kill -9` would, reaps it and
    /// returns how it ended.
    ///
    /// # Panics
    /// When the process cannot be reaped.
    pub fn kill(&mut self) -> ExitStatus {
        if let Some(status) = self.try_wait() {
            return status;
        }
        // Child::kill sends SIGKILL to this child's PID only.
        let _ = self.child.kill();
        let status = self.child.wait().unwrap_or_else(|e| {
            panic!("cannot reap {} (pid {}): {e}", self.label, self.child.id())
        });
        self.exit = Some(status);
        status
    }

    /// Stops the process (see [`Daemon::stop_within`] with [`STOP_TIMEOUT`]) and returns its exit
    /// status.
    ///
    /// # Panics
    /// When the process ignored SIGTERM for [`STOP_TIMEOUT`] and had to be killed.
    pub fn stop(mut self) -> ExitStatus {
        let (status, killed) = self.stop_within(STOP_TIMEOUT);
        assert!(
            !killed,
            "{} ignored SIGTERM for {STOP_TIMEOUT:?} and was killed; log: {}",
            self.label,
            self.log.display()
        );
        status
    }

    /// The last `n` lines of the log.
    #[must_use]
    pub fn log_tail(&self, n: usize) -> String {
        log_tail(&self.log, n)
    }

    fn report(&self) {
        eprintln!(
            "----- {} (pid {}, {}), log {}, last {LOG_TAIL_LINES} lines:\n{}\n----- end of {}",
            self.label,
            self.child.id(),
            self.exit
                .map_or_else(|| "running".to_owned(), |s| s.to_string()),
            self.log.display(),
            self.log_tail(LOG_TAIL_LINES),
            self.label,
        );
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let (status, killed) = self.stop_within(STOP_TIMEOUT);
        if killed {
            eprintln!(
                "ipop-lab: {} ignored SIGTERM for {STOP_TIMEOUT:?} and was killed ({status})",
                self.label
            );
        }
        if thread::panicking() {
            self.report();
        }
    }
}

/// The last `n` lines of a file, or a note saying why it cannot be read.
#[must_use]
pub fn log_tail(path: &Path, n: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// A process as `/proc` shows it: its PID and its start time (clock ticks after boot), which
/// together name it even when the PID is used again later.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ProcId {
    pid: i32,
    start: u64,
}

impl ProcId {
    /// The process `pid` if it runs (or is a zombie).
    fn of(pid: i32) -> Option<ProcId> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let (_, start) = parse_stat(&stat)?;
        Some(ProcId { pid, start })
    }

    /// Whether this very process still exists.
    fn alive(self) -> bool {
        ProcId::of(self.pid) == Some(self)
    }
}

/// The parent PID and start time in a `/proc/PID/stat` line. The command name, in parentheses,
/// may hold spaces and parentheses itself: the fields start after the last `)`.
fn parse_stat(stat: &str) -> Option<(i32, u64)> {
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Field 4 of proc(5) is the parent's PID, field 22 the start time; `rest` begins at field 3.
    let ppid = fields.get(1)?.parse().ok()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((ppid, start))
}

/// The processes below `pid` (its children, their children, ...) at the time of the call.
pub(crate) fn descendants(pid: u32) -> Vec<ProcId> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let parents: Vec<(i32, i32, u64)> = entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let (ppid, start) = parse_stat(&stat)?;
            Some((pid, ppid, start))
        })
        .collect();
    let mut found = Vec::new();
    let mut frontier = match i32::try_from(pid) {
        Ok(pid) => vec![pid],
        Err(_) => return found,
    };
    while let Some(parent) = frontier.pop() {
        for &(pid, ppid, start) in &parents {
            if ppid == parent && !found.iter().any(|p: &ProcId| p.pid == pid) {
                found.push(ProcId { pid, start });
                frontier.push(pid);
            }
        }
    }
    found
}

/// Kills (SIGKILL) each of `procs` that still exists: the same PID with the same start time.
pub(crate) fn kill_leftovers(procs: &[ProcId]) {
    for proc in procs.iter().filter(|proc| proc.alive()) {
        // It may have exited meanwhile: ESRCH is fine.
        let _ = kill(Pid::from_raw(proc.pid), Signal::SIGKILL);
    }
}

/// Kills (SIGKILL, by PID) the server processes (`label`: Prosody, coturn) that an earlier test
/// process started and could not stop because it died without running destructors: those that
/// `is_server` recognises by their arguments and whose `config_flag` argument lies in
/// `$TMPDIR/ipl-<pid>-...` for a PID that no longer runs.
pub(crate) fn sweep_stale_servers(
    label: &str,
    is_server: impl Fn(&[String]) -> bool,
    config_flag: &str,
) {
    let ours = std::env::temp_dir()
        .join(crate::PREFIX)
        .to_string_lossy()
        .into_owned();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|arg| String::from_utf8_lossy(arg).into_owned())
            .collect();
        if !is_server(&args) {
            continue;
        }
        let Some(creator) = args
            .iter()
            .skip_while(|arg| *arg != config_flag)
            .nth(1)
            .and_then(|config| config.strip_prefix(&ours))
            .and_then(|rest| rest.split('-').next())
            .and_then(|creator| creator.parse::<u32>().ok())
        else {
            continue;
        };
        if creator != std::process::id() && !Path::new(&format!("/proc/{creator}")).exists() {
            eprintln!("ipop-lab: killing stale {label} (pid {pid}) of dead test process {creator}");
            // It may have exited meanwhile: ESRCH is fine.
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Netns, TestDir, wait_until};

    #[test]
    fn stop_sends_sigterm_and_collects_the_status() {
        let dir = TestDir::new("dstop");
        let ns = Netns::new("dstop");
        let log = dir.path().join("sleep.log");
        let mut cmd = ns.command("sh");
        cmd.args([
            "-c",
            "echo hello; trap 'echo bye; exit 3' TERM; sleep 30 & wait",
        ]);
        let daemon = Daemon::spawn("sleeper", cmd, &log);
        let pid = daemon.pid();
        thread::sleep(Duration::from_millis(300));
        let status = daemon.stop();
        assert_eq!(status.code(), Some(3), "the TERM trap should have run");
        assert!(!Path::new(&format!("/proc/{pid}")).exists());
        let tail = log_tail(&log, 10);
        assert!(tail.contains("starting sleeper"), "{tail}");
        assert!(tail.contains("hello") && tail.contains("bye"), "{tail}");
    }

    #[test]
    fn drop_kills_a_process_that_ignores_sigterm() {
        let dir = TestDir::new("dkill");
        let ns = Netns::new("dkill");
        let mut cmd = ns.command("sh");
        cmd.args(["-c", "trap '' TERM; sleep 30 & wait"]);
        let mut daemon = Daemon::spawn("stubborn", cmd, &dir.path().join("s.log"));
        thread::sleep(Duration::from_millis(300));
        let (status, killed) = daemon.stop_within(Duration::from_millis(300));
        assert!(killed, "SIGTERM was ignored, so SIGKILL was needed");
        assert!(!status.success());
    }

    #[test]
    fn leftover_descendants_are_found_and_killed() {
        let dir = TestDir::new("dtree");
        let ns = Netns::new("dtree");
        let mut cmd = ns.command("sh");
        // The shell ignores SIGTERM; its sleep would outlive it.
        cmd.args(["-c", "trap '' TERM; sleep 30 & wait"]);
        let mut daemon = Daemon::spawn("tree", cmd, &dir.path().join("t.log"));
        let below = wait_until(Duration::from_secs(5), "the shell to start sleep", || {
            let below = descendants(daemon.pid());
            if below.is_empty() {
                Err("no child yet".to_owned())
            } else {
                Ok(below)
            }
        });
        assert!(below.iter().all(|p| p.alive()));
        daemon.kill();
        assert!(
            below.iter().all(|p| p.alive()),
            "killing the shell leaves its child"
        );
        kill_leftovers(&below);
        wait_until(Duration::from_secs(5), "the orphan to go", || {
            if below.iter().any(|p| p.alive() && !zombie(p.pid)) {
                Err(format!("{below:?}"))
            } else {
                Ok(())
            }
        });
    }

    /// Whether `pid` has ended but was not reaped (an orphan whose new parent does not reap).
    fn zombie(pid: i32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|stat| {
                let (_, rest) = stat.rsplit_once(')')?;
                rest.split_whitespace().next().map(|state| state == "Z")
            })
            .unwrap_or(false)
    }

    #[test]
    fn stat_lines_with_odd_command_names_parse() {
        let stat = "42 (a) b) S 7 42 42 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 123456 1000 10";
        assert_eq!(parse_stat(stat), Some((7, 123_456)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn log_tail_keeps_the_last_lines() {
        let dir = TestDir::new("tail");
        let path = dir.path().join("x.log");
        std::fs::write(&path, "1\n2\n3\n4\n").expect("write log");
        assert_eq!(log_tail(&path, 2), "3\n4");
        assert_eq!(log_tail(&path, 10), "1\n2\n3\n4");
        assert!(log_tail(&dir.path().join("none"), 2).contains("cannot read"));
    }
}
