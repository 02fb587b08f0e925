//! Stops of the whole machine, seen from the test process.
//!
//! A virtual machine can be stopped by its host for a while (an overloaded host, a snapshot).
//! Every task on it is then charged the stop as if it had run, a daemon's packet loop included,
//! so the loop stall check would blame the daemon for it. One real-time thread per CPU sleeps
//! [`PERIOD`] at a time and records each wake-up that came [`LATE`] or later. Under
//! `SCHED_FIFO` it runs ahead of every ordinary task, so a busy test delays it by microseconds;
//! only a stop of the machine, or of its CPU, delays it by milliseconds. [`stopped_during`]
//! tells how much of an interval the machine was stopped for.

use std::collections::VecDeque;
use std::sync::{Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant, SystemTime};

use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
use nix::unistd::Pid;
use thread_priority::ThreadPriority;
use thread_priority::unix::{
    RealtimeThreadSchedulePolicy, ThreadSchedulePolicy, set_thread_priority_and_policy,
    thread_native_id,
};

const PERIOD: Duration = Duration::from_millis(2);
const LATE: Duration = Duration::from_millis(3);
/// Stops remembered, the oldest forgotten first.
const KEPT: usize = 4096;

/// The stops seen so far: when each began (wall clock, like the daemons' logs) and how long it
/// lasted.
type Stops = Mutex<VecDeque<(SystemTime, Duration)>>;

/// `None` when the watch could not start on every CPU.
static STOPS: OnceLock<Option<Stops>> = OnceLock::new();

/// Starts watching for stops of the machine, once per process, and returns whether it
/// watches. The watch needs root (real-time priority); without it [`stopped_during`] is always
/// zero.
pub fn watch() -> bool {
    STOPS
        .get_or_init(|| match start() {
            Ok(()) => Some(Mutex::new(VecDeque::new())),
            Err(e) => {
                eprintln!("ipop-lab: not watching for stops of the machine: {e}");
                None
            }
        })
        .is_some()
}

/// How much of `from..to` the machine was stopped for, by any of its CPUs' watchers.
pub fn stopped_during(from: SystemTime, to: SystemTime) -> Duration {
    match STOPS.get() {
        Some(Some(stops)) => {
            let stops = stops
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            covered(stops.iter().copied(), from, to)
        }
        _ => Duration::ZERO,
    }
}

/// One watcher per CPU this process may run on, each pinned to its CPU at real-time priority.
/// Returns once every watcher runs, or the first that could not.
fn start() -> Result<(), String> {
    let allowed = sched_getaffinity(Pid::from_raw(0)).map_err(|e| format!("CPUs: {e}"))?;
    let cpus: Vec<usize> = (0..CpuSet::count())
        .filter(|&cpu| allowed.is_set(cpu).unwrap_or(false))
        .collect();
    let (ready, started) = mpsc::channel();
    for &cpu in &cpus {
        let ready = ready.clone();
        std::thread::Builder::new()
            .name(format!("machine-watch-{cpu}"))
            .spawn(move || match pin(cpu) {
                Ok(()) => {
                    let _ = ready.send(Ok(()));
                    drop(ready);
                    watch_cpu();
                }
                Err(e) => {
                    let _ = ready.send(Err(e));
                }
            })
            .map_err(|e| format!("a watcher thread: {e}"))?;
    }
    for _ in &cpus {
        started
            .recv()
            .map_err(|_| "a watcher thread ended".to_owned())??;
    }
    Ok(())
}

fn pin(cpu: usize) -> Result<(), String> {
    let mut set = CpuSet::new();
    set.set(cpu).map_err(|e| format!("CPU {cpu}: {e}"))?;
    sched_setaffinity(Pid::from_raw(0), &set).map_err(|e| format!("CPU {cpu}: {e}"))?;
    set_thread_priority_and_policy(
        thread_native_id(),
        ThreadPriority::Max,
        ThreadSchedulePolicy::Realtime(RealtimeThreadSchedulePolicy::Fifo),
    )
    .map_err(|e| format!("real-time priority on CPU {cpu}: {e:?}"))
}

/// Sleeps [`PERIOD`] at a time, for as long as the process lives, recording late wake-ups.
fn watch_cpu() {
    loop {
        let before = Instant::now();
        std::thread::sleep(PERIOD);
        let late = before.elapsed().saturating_sub(PERIOD);
        if late >= LATE
            && let Some(Some(stops)) = STOPS.get()
        {
            let mut stops = stops
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if stops.len() == KEPT {
                stops.pop_front();
            }
            stops.push_back((SystemTime::now() - late, late));
        }
    }
}

/// How much of `from..to` the union of `stops` (start, length) covers.
fn covered(
    stops: impl Iterator<Item = (SystemTime, Duration)>,
    from: SystemTime,
    to: SystemTime,
) -> Duration {
    let mut clipped: Vec<(SystemTime, SystemTime)> = stops
        .map(|(start, length)| (start.max(from), (start + length).min(to)))
        .filter(|(start, end)| start < end)
        .collect();
    clipped.sort();
    let mut total = Duration::ZERO;
    let mut reach = from;
    for (start, end) in clipped {
        let start = start.max(reach);
        if end > start {
            total += end.duration_since(start).unwrap_or_default();
            reach = end;
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_millis(ms)
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn stops_seen_on_several_cpus_count_once() {
        let stops = [(at(100), ms(50)), (at(110), ms(50)), (at(300), ms(10))];
        assert_eq!(covered(stops.into_iter(), at(0), at(1000)), ms(70));
    }

    #[test]
    fn only_the_part_inside_the_interval_counts() {
        let stops = [(at(90), ms(20)), (at(190), ms(20)), (at(500), ms(5))];
        assert_eq!(covered(stops.into_iter(), at(100), at(200)), ms(20));
        assert_eq!(covered(stops.into_iter(), at(300), at(400)), ms(0));
    }

    #[test]
    fn a_stop_inside_another_adds_nothing() {
        let stops = [(at(100), ms(100)), (at(120), ms(10))];
        assert_eq!(covered(stops.into_iter(), at(0), at(1000)), ms(100));
    }

    /// Ordinary tasks keeping every CPU busy do not delay the watchers: a busy machine is not
    /// a stopped one.
    #[test]
    fn a_busy_machine_is_not_a_stopped_one() {
        assert!(watch(), "the watch needs root");
        let from = SystemTime::now();
        let busy: Vec<_> = (0..2 * std::thread::available_parallelism().map_or(2, usize::from))
            .map(|_| {
                std::thread::spawn(|| {
                    let start = Instant::now();
                    while start.elapsed() < ms(300) {
                        std::hint::spin_loop();
                    }
                })
            })
            .collect();
        for thread in busy {
            thread.join().expect("a busy thread");
        }
        let stopped = stopped_during(from, SystemTime::now());
        assert!(stopped < ms(10), "stopped for {stopped:?} while busy");
    }
}
