//! Stops of the whole machine, seen from the test process.
//!
//! A virtual machine can be stopped by its host for a while (an overloaded host, a snapshot).
//! Every task on it is then charged the stop as if it had run, a daemon's packet loop included,
//! so the loop stall check would blame the daemon for it. One real-time thread per CPU sleeps
//! [`PERIOD`] at a time and records each wake-up that came [`LATE`] or later. Under
//! `SCHED_FIFO` it runs ahead of every ordinary task, so a busy test delays it by microseconds.
//! A long stretch of kernel work on its CPU can delay it too (a kernel built without forced
//! preemption finishes a system call before it switches), and that may be the daemon's own
//! work; but only a stop of the machine delays the watchers of every CPU at once.
//! [`stopped_during`] counts only such times.

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
/// Late wake-ups remembered per CPU, the oldest forgotten first.
const KEPT: usize = 4096;

/// A late wake-up: when the watcher should have woken (wall clock, like the daemons' logs) and
/// how late it was.
type Stop = (SystemTime, Duration);

/// Each watcher's late wake-ups, in the order of [`start`]'s CPUs. `None` when the watch
/// could not start on every CPU.
static STOPS: OnceLock<Option<Mutex<Vec<VecDeque<Stop>>>>> = OnceLock::new();

/// Starts watching for stops of the machine, once per process, and returns whether it
/// watches. The watch needs root (real-time priority); without it [`stopped_during`] is always
/// zero.
pub fn watch() -> bool {
    STOPS
        .get_or_init(|| match start() {
            Ok(cpus) => Some(Mutex::new(vec![VecDeque::new(); cpus])),
            Err(e) => {
                eprintln!("ipop-lab: not watching for stops of the machine: {e}");
                None
            }
        })
        .is_some()
}

/// How much of `from..to` the whole machine was stopped for: the time in which the watchers
/// of all CPUs were late at once.
pub fn stopped_during(from: SystemTime, to: SystemTime) -> Duration {
    with_stops(|stops| all_late(stops, from, to)).unwrap_or_default()
}

/// How late each CPU's watcher was within `from..to`, in total, in the order of the CPUs:
/// where only some were late, something held those CPUs (kernel work), not the machine.
pub fn late_per_cpu(from: SystemTime, to: SystemTime) -> Vec<Duration> {
    with_stops(|stops| {
        stops
            .iter()
            .map(|stops| total(&merged(stops, from, to)))
            .collect()
    })
    .unwrap_or_default()
}

/// `f` on the watchers' records, if the watch runs.
fn with_stops<T>(f: impl FnOnce(&mut Vec<VecDeque<Stop>>) -> T) -> Option<T> {
    let Some(Some(stops)) = STOPS.get() else {
        return None;
    };
    Some(f(&mut stops
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)))
}

/// One watcher per CPU this process may run on, each pinned to its CPU at real-time priority.
/// Returns the number of watchers once every one runs, or the first error.
fn start() -> Result<usize, String> {
    let allowed = sched_getaffinity(Pid::from_raw(0)).map_err(|e| format!("CPUs: {e}"))?;
    let cpus: Vec<usize> = (0..CpuSet::count())
        .filter(|&cpu| allowed.is_set(cpu).unwrap_or(false))
        .collect();
    let (ready, started) = mpsc::channel();
    for (index, &cpu) in cpus.iter().enumerate() {
        let ready = ready.clone();
        std::thread::Builder::new()
            .name(format!("machine-watch-{cpu}"))
            .spawn(move || match pin(cpu) {
                Ok(()) => {
                    let _ = ready.send(Ok(()));
                    drop(ready);
                    watch_cpu(index);
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
    Ok(cpus.len())
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

/// Sleeps [`PERIOD`] at a time, for as long as the process lives, recording the late wake-ups
/// of watcher `index`.
fn watch_cpu(index: usize) {
    loop {
        let before = Instant::now();
        std::thread::sleep(PERIOD);
        let late = before.elapsed().saturating_sub(PERIOD);
        if late >= LATE {
            with_stops(|stops| {
                if let Some(mine) = stops.get_mut(index) {
                    if mine.len() == KEPT {
                        mine.pop_front();
                    }
                    mine.push_back((SystemTime::now() - late, late));
                }
            });
        }
    }
}

/// An interval of wall-clock time.
type Span = (SystemTime, SystemTime);

/// The time within `from..to` in which every CPU's watcher was late.
fn all_late(per_cpu: &[VecDeque<Stop>], from: SystemTime, to: SystemTime) -> Duration {
    let mut cpus = per_cpu.iter().map(|stops| merged(stops, from, to));
    let Some(first) = cpus.next() else {
        return Duration::ZERO;
    };
    total(&cpus.fold(first, |all, one| intersection(&all, &one)))
}

fn total(spans: &[Span]) -> Duration {
    spans
        .iter()
        .map(|(start, end)| end.duration_since(*start).unwrap_or_default())
        .sum()
}

/// `stops` clipped to `from..to`, sorted, overlaps merged.
fn merged(stops: &VecDeque<Stop>, from: SystemTime, to: SystemTime) -> Vec<Span> {
    let mut clipped: Vec<Span> = stops
        .iter()
        .map(|&(start, length)| (start.max(from), (start + length).min(to)))
        .filter(|(start, end)| start < end)
        .collect();
    clipped.sort();
    let mut spans: Vec<Span> = Vec::with_capacity(clipped.len());
    for (start, end) in clipped {
        match spans.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => spans.push((start, end)),
        }
    }
    spans
}

/// Where two sorted lists of disjoint spans overlap.
fn intersection(a: &[Span], b: &[Span]) -> Vec<Span> {
    let (mut i, mut j, mut both) = (0, 0, Vec::new());
    while let (Some(x), Some(y)) = (a.get(i), b.get(j)) {
        let (start, end) = (x.0.max(y.0), x.1.min(y.1));
        if start < end {
            both.push((start, end));
        }
        if x.1 <= y.1 {
            i += 1;
        } else {
            j += 1;
        }
    }
    both
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

    fn cpu(stops: &[(u64, u64)]) -> VecDeque<Stop> {
        stops
            .iter()
            .map(|&(start, length)| (at(start), ms(length)))
            .collect()
    }

    #[test]
    fn a_stop_counts_where_every_cpu_saw_it() {
        let cpus = [cpu(&[(100, 50), (300, 10)]), cpu(&[(110, 50), (500, 10)])];
        assert_eq!(all_late(&cpus, at(0), at(1000)), ms(40));
    }

    #[test]
    fn a_late_wake_up_on_one_cpu_alone_is_not_a_stop() {
        let cpus = [cpu(&[(100, 50)]), cpu(&[])];
        assert_eq!(all_late(&cpus, at(0), at(1000)), ms(0));
        assert_eq!(all_late(&cpus[..1], at(0), at(1000)), ms(50));
    }

    #[test]
    fn only_the_part_inside_the_interval_counts() {
        let stops = cpu(&[(90, 20), (190, 20), (500, 5)]);
        let cpus = [stops.clone(), stops];
        assert_eq!(all_late(&cpus, at(100), at(200)), ms(20));
        assert_eq!(all_late(&cpus, at(300), at(400)), ms(0));
    }

    #[test]
    fn overlapping_late_wake_ups_of_one_cpu_count_once() {
        let cpus = [cpu(&[(100, 100), (120, 10), (150, 100)]), cpu(&[(0, 1000)])];
        assert_eq!(all_late(&cpus, at(0), at(1000)), ms(150));
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
