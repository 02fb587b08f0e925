//! What the session sends, paced under the server's client rate limit and ordered by what waits
//! for it.
//!
//! Stock servers throttle what each client sends (ejabberd's `normal` shaper: 3 000 B/s with
//! bursts of 20 000 B; Debian's Prosody: 10 kB/s). What a client writes faster than that waits
//! in the server's socket buffers, in order: an answer to a friend's link offer then sits
//! behind a hundred offers of our own, times out at the friend, and is asked for again, which
//! adds to the queue that made it late. So the session keeps its own queue, sends from it no
//! faster than a token bucket allows, and sends the most needed first. A signal's answer is
//! timed from when it leaves the queue, not from when it was queued.
//!
//! The bucket's rate is a guess at the server's limit, and a server may throttle harder (a
//! stricter shaper, or a user with many friends whose offers all come at once). So where the
//! stream has stream management (XEP-0198), the session also keeps at most [`WINDOW`] bytes on
//! the way that the server has not acknowledged: the server then paces the queue at whatever
//! rate it reads, and what waits, waits here, in order of need, not in its socket buffers.

use std::collections::VecDeque;
use tokio::time::{Duration, Instant};

/// What waits for a stanza, most urgent first: the order in which the queue sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Class {
    /// The session's own business: presence, roster and room requests, answers to requests.
    Control,
    /// Signals of link sessions under way: accepts, candidates, terminates.
    Answer,
    /// Offers that traffic waits for (on-demand links, restarts).
    Urgent,
    /// Offers of links that are only wanted in the background.
    Background,
    /// Answers to requests from strangers (no overlay authorises them).
    Stranger,
}

const CLASSES: usize = 5;

/// A token bucket over bytes. It may go into debt by one stanza: a stanza goes out whenever
/// the bucket is not empty, and its size is taken afterwards.
#[derive(Debug)]
pub(crate) struct Bucket {
    /// Bytes per second.
    rate: f64,
    /// Most bytes saved up.
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    /// A full bucket; `None` when `rate` is 0, which means no pacing.
    pub(crate) fn new(rate: u32, burst: u32, now: Instant) -> Option<Bucket> {
        (rate > 0).then(|| Bucket {
            rate: f64::from(rate),
            burst: f64::from(burst.max(1)),
            tokens: f64::from(burst.max(1)),
            at: now,
        })
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.at = now;
    }

    /// When the next stanza may go.
    pub(crate) fn ready_at(&mut self, now: Instant) -> Instant {
        self.refill(now);
        if self.tokens >= 0.0 {
            now
        } else {
            now + Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }

    /// Takes a sent stanza's bytes.
    pub(crate) fn take(&mut self, now: Instant, bytes: usize) {
        self.refill(now);
        self.tokens -= bytes as f64;
    }
}

/// Most bytes on the way to the server and not yet acknowledged by it: at ejabberd's stock
/// 3 000 B/s, what the session sent waits at most about 1.4 s at the server, while a
/// server that reads at once acknowledges within a round trip, so 4 KiB do not slow a LAN or a
/// server 100 ms away (40 kB/s, beyond every stock client limit).
pub(crate) const WINDOW: usize = 4096;

/// A stanza the server has not acknowledged within this time is no longer waited for: the
/// queue then goes at the bucket's pace alone until the server acknowledges again.
pub(crate) const ACK_PATIENCE: Duration = Duration::from_secs(10);

/// Whether the server has acknowledged a sent stanza, or it will never be (the stream that
/// carried it is gone).
pub(crate) trait Delivered {
    fn delivered(&self) -> bool;
}

/// The stanzas sent and not yet acknowledged, with their bytes, oldest first (a server
/// acknowledges in order).
#[derive(Debug)]
pub(crate) struct Window<T> {
    sent: VecDeque<(T, usize, Instant)>,
    bytes: usize,
}

impl<T: Delivered> Window<T> {
    pub(crate) fn new() -> Self {
        Window {
            sent: VecDeque::new(),
            bytes: 0,
        }
    }

    pub(crate) fn sent(&mut self, item: T, bytes: usize, now: Instant) {
        self.bytes += bytes;
        self.sent.push_back((item, bytes, now));
    }

    /// With the window closed, the stanza to wait for and when the window opens at the latest:
    /// `None` while fewer than [`WINDOW`] bytes wait for an acknowledgement (one stanza may take
    /// it beyond). Forgets first what the server acknowledged, or failed to within
    /// [`ACK_PATIENCE`].
    pub(crate) fn waiting_for(&mut self, now: Instant) -> Option<(&T, Instant)> {
        while let Some((item, bytes, at)) = self.sent.front() {
            if !item.delivered() && now < *at + ACK_PATIENCE {
                break;
            }
            self.bytes -= bytes;
            self.sent.pop_front();
        }
        if self.bytes < WINDOW {
            return None;
        }
        self.sent
            .front()
            .map(|(item, _, at)| (item, *at + ACK_PATIENCE))
    }

    /// A new stream: nothing of the old one will be acknowledged on it.
    pub(crate) fn clear(&mut self) {
        self.sent.clear();
        self.bytes = 0;
    }
}

/// One queue per [`Class`], bounded in total and, for [`Class::Stranger`], on its own.
#[derive(Debug)]
pub(crate) struct Queues<T> {
    queues: [VecDeque<(Instant, T)>; CLASSES],
    max: usize,
    max_stranger: usize,
}

impl<T> Queues<T> {
    pub(crate) fn new(max: usize, max_stranger: usize) -> Self {
        Queues {
            queues: Default::default(),
            max,
            max_stranger,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.queues.iter().map(VecDeque::len).sum()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.queues.iter().all(VecDeque::is_empty)
    }

    /// Queues `item`, or gives it back when the queue is full.
    pub(crate) fn push(&mut self, class: Class, now: Instant, item: T) -> Result<(), T> {
        if self.len() >= self.max
            || (class == Class::Stranger
                && self.queues[Class::Stranger as usize].len() >= self.max_stranger)
        {
            return Err(item);
        }
        self.queues[class as usize].push_back((now, item));
        Ok(())
    }

    /// The most urgent item, and when it was queued.
    pub(crate) fn pop(&mut self) -> Option<(Instant, T)> {
        self.queues.iter_mut().find_map(VecDeque::pop_front)
    }

    /// Every queued item, most urgent first.
    pub(crate) fn iter_mut(&mut self) -> impl Iterator<Item = &mut T> {
        self.queues
            .iter_mut()
            .flat_map(|q| q.iter_mut().map(|(_, item)| item))
    }

    /// Keeps the items for which `keep` is true.
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&T) -> bool) {
        for q in &mut self.queues {
            q.retain(|(_, item)| keep(item));
        }
    }

    /// Empties the queue, most urgent first.
    pub(crate) fn drain(&mut self) -> impl Iterator<Item = T> + '_ {
        self.queues
            .iter_mut()
            .flat_map(|q| q.drain(..).map(|(_, item)| item))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bucket_lets_a_burst_through_then_the_rate() {
        let t0 = Instant::now();
        let mut b = Bucket::new(1000, 3000, t0).expect("paced");
        // Three stanzas of 1000 B go at once; the third empties the bucket.
        for _ in 0..3 {
            assert_eq!(b.ready_at(t0), t0);
            b.take(t0, 1000);
        }
        // A fourth goes at once too (the bucket is not in debt), and puts it 500 B in debt.
        assert_eq!(b.ready_at(t0), t0);
        b.take(t0, 500);
        assert_eq!(b.ready_at(t0), t0 + Duration::from_millis(500));
        // Half a second later it may send again; a long pause refills no more than the burst.
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!(b.ready_at(t1), t1);
        let t2 = t1 + Duration::from_secs(60);
        b.refill(t2);
        assert!((b.tokens - 3000.0).abs() < 1e-6, "{}", b.tokens);
    }

    #[derive(Debug)]
    struct Acked(std::rc::Rc<std::cell::Cell<bool>>);

    impl Delivered for Acked {
        fn delivered(&self) -> bool {
            self.0.get()
        }
    }

    #[test]
    fn the_window_closes_at_its_bytes_and_opens_as_the_server_acknowledges_in_order() {
        let t0 = Instant::now();
        let acks: Vec<_> = (0..3)
            .map(|_| std::rc::Rc::new(std::cell::Cell::new(false)))
            .collect();
        let mut w = Window::new();
        let waits_for = |w: &mut Window<Acked>, now: Instant| {
            w.waiting_for(now).map(|(a, at)| {
                let i = acks
                    .iter()
                    .position(|b| std::ptr::eq(a.0.as_ref(), b.as_ref()));
                (i, at)
            })
        };
        assert_eq!(waits_for(&mut w, t0), None, "an empty window");
        w.sent(Acked(acks[0].clone()), 3000, t0);
        assert_eq!(waits_for(&mut w, t0), None, "3000 B on the way");
        // One stanza may take it beyond the window; then it is closed.
        w.sent(Acked(acks[1].clone()), 2000, t0);
        w.sent(Acked(acks[2].clone()), 500, t0);
        assert_eq!(waits_for(&mut w, t0), Some((Some(0), t0 + ACK_PATIENCE)));
        // An acknowledgement of a later stanza alone frees nothing: the server acknowledges
        // in order, and the oldest is the one to wait for.
        acks[2].set(true);
        assert_eq!(waits_for(&mut w, t0), Some((Some(0), t0 + ACK_PATIENCE)));
        acks[0].set(true);
        assert_eq!(
            waits_for(&mut w, t0),
            None,
            "2500 B of the second and third"
        );
        acks[1].set(true);
        assert_eq!(waits_for(&mut w, t0), None);
        assert!(
            w.sent.is_empty(),
            "the second and the third are both acknowledged"
        );
        // A server that does not acknowledge is waited for no longer than the patience.
        let t1 = t0 + Duration::from_secs(1);
        let silent = || Acked(std::rc::Rc::new(std::cell::Cell::new(false)));
        w.sent(silent(), 5000, t1);
        let t2 = t1 + ACK_PATIENCE - Duration::from_millis(1);
        assert_eq!(waits_for(&mut w, t2), Some((None, t1 + ACK_PATIENCE)));
        assert_eq!(waits_for(&mut w, t1 + ACK_PATIENCE), None);
        w.sent(silent(), 5000, t1);
        w.clear();
        assert_eq!(
            waits_for(&mut w, t1),
            None,
            "a new stream starts with an open window"
        );
    }

    #[test]
    fn no_rate_means_no_pacing() {
        assert!(Bucket::new(0, 20_000, Instant::now()).is_none());
    }

    #[test]
    fn the_most_urgent_class_goes_first_and_each_class_in_order() {
        let now = Instant::now();
        let mut q = Queues::new(10, 1);
        for (class, item) in [
            (Class::Stranger, "error to a stranger"),
            (Class::Background, "offer 1"),
            (Class::Background, "offer 2"),
            (Class::Answer, "accept"),
            (Class::Urgent, "on-demand offer"),
            (Class::Control, "presence"),
        ] {
            q.push(class, now, item).expect("room");
        }
        let order: Vec<&str> = std::iter::from_fn(|| q.pop().map(|(_, i)| i)).collect();
        assert_eq!(
            order,
            [
                "presence",
                "accept",
                "on-demand offer",
                "offer 1",
                "offer 2",
                "error to a stranger"
            ]
        );
        assert!(q.is_empty());
    }

    #[test]
    fn a_full_queue_gives_the_item_back() {
        let now = Instant::now();
        let mut q = Queues::new(3, 1);
        q.push(Class::Background, now, 1).expect("room");
        q.push(Class::Stranger, now, 4).expect("room");
        assert_eq!(q.push(Class::Stranger, now, 5), Err(5), "strangers' share");
        q.push(Class::Control, now, 2).expect("room");
        assert_eq!(q.push(Class::Control, now, 3), Err(3));
        assert_eq!(q.len(), 3);
        q.retain(|i| *i != 1);
        assert_eq!(q.drain().collect::<Vec<_>>(), [2, 4]);
    }
}
