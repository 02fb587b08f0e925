//! Links on demand: which overlays link every device at once and which only when traffic
//! wants a device, and the packets held while such a link comes up.
//!
//! An overlay's policy is [`LinkPolicy::All`] (a link to every authorised device that is
//! online), [`LinkPolicy::OnDemand`] (a link is negotiated when the first packet for one of the
//! device's addresses enters the TUN device, and closed after an idle time without data), or
//! [`LinkPolicy::Auto`]: all links while the overlay has fewer than [`AUTO_THRESHOLD`] devices
//! online (this one included), on demand from there. The engine applies the policy; this module
//! holds the packets that wait for a link, within fixed bounds.

use crate::osn::DeviceId;
use std::collections::{HashMap, VecDeque};
use std::time::Duration;

/// With [`LinkPolicy::Auto`], an overlay with at least this many devices online, this one
/// included, links on demand.
pub const AUTO_THRESHOLD: usize = 24;
/// How long an on-demand link stays up without data, unless configured.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// Most packets held for one device while its link comes up.
pub const HELD_PER_DEVICE: usize = 64;
/// Most packets held for all devices together.
pub const HELD_TOTAL: usize = 1024;
/// Most bytes held for all devices together.
pub const HELD_BYTES: usize = 1 << 20;

/// Which links an overlay keeps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LinkPolicy {
    /// A link to every authorised device that is online.
    All,
    /// A link only while traffic flows to or from the device.
    OnDemand,
    /// All links below [`AUTO_THRESHOLD`] devices online, on demand from there.
    #[default]
    Auto,
}

impl LinkPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            LinkPolicy::All => "all",
            LinkPolicy::OnDemand => "on-demand",
            LinkPolicy::Auto => "auto",
        }
    }
}

/// What the policy means for one link now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wanted {
    /// Kept whatever the traffic.
    Always,
    /// Kept while data flows; closed after this long without.
    OnDemand(Duration),
}

impl Wanted {
    /// The policy of a link that several overlays authorise: kept whatever the traffic when
    /// one of them wants that, else on demand with the longest of their idle times.
    pub(crate) fn combine(a: Option<Wanted>, b: Wanted) -> Wanted {
        match (a, b) {
            (Some(Wanted::OnDemand(x)), Wanted::OnDemand(y)) => Wanted::OnDemand(x.max(y)),
            (Some(Wanted::Always), _) | (_, Wanted::Always) => Wanted::Always,
            (None, b) => b,
        }
    }
}

/// Packets from the TUN device that wait for their device's link to come up: at most
/// [`HELD_PER_DEVICE`] per device, [`HELD_TOTAL`] and [`HELD_BYTES`] in all.
#[derive(Debug, Default)]
pub(crate) struct Held {
    queues: HashMap<DeviceId, VecDeque<Vec<u8>>>,
    packets: usize,
    bytes: usize,
}

impl Held {
    /// Holds a copy of `packet` for `device`; `false` when a bound leaves no room.
    pub(crate) fn push(&mut self, device: &DeviceId, packet: &[u8]) -> bool {
        if self.packets >= HELD_TOTAL || self.bytes + packet.len() > HELD_BYTES {
            return false;
        }
        if !self.queues.contains_key(device) {
            self.queues.insert(device.clone(), VecDeque::new());
        }
        let Some(queue) = self.queues.get_mut(device) else {
            return false;
        };
        if queue.len() >= HELD_PER_DEVICE {
            return false;
        }
        queue.push_back(packet.to_vec());
        self.packets += 1;
        self.bytes += packet.len();
        true
    }

    /// Takes the packets held for `device`, oldest first.
    pub(crate) fn take(&mut self, device: &DeviceId) -> VecDeque<Vec<u8>> {
        let queue = self.queues.remove(device).unwrap_or_default();
        self.packets -= queue.len();
        self.bytes -= queue.iter().map(Vec::len).sum::<usize>();
        queue
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.queues.is_empty()
    }

    /// The devices that have packets held.
    pub(crate) fn devices(&self) -> impl Iterator<Item = &DeviceId> {
        self.queues.keys()
    }

    /// How many packets are held for `device`.
    #[cfg(test)]
    pub(crate) fn len(&self, device: &DeviceId) -> usize {
        self.queues.get(device).map_or(0, VecDeque::len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_packets_are_bounded_per_device_and_in_all() {
        let mut held = Held::default();
        let a = DeviceId::new("a@x", "pc");
        for _ in 0..HELD_PER_DEVICE {
            assert!(held.push(&a, &[0; 100]));
        }
        assert!(
            !held.push(&a, &[0; 100]),
            "one more than the per-device bound"
        );
        let mut others = 0;
        let mut i = 0;
        while held.push(&DeviceId::new(format!("u{i}@x"), "pc"), &[0; 100]) {
            others += 1;
            if others % HELD_PER_DEVICE == 0 {
                i += 1;
            }
        }
        assert_eq!(HELD_PER_DEVICE + others, HELD_TOTAL);
        assert_eq!(held.take(&a).len(), HELD_PER_DEVICE);
        assert!(held.push(&a, &[0; 100]), "room again once taken");
        assert_eq!(held.len(&a), 1);

        let mut big = Held::default();
        let mut n = 0;
        while big.push(&a, &[0; 60_000]) {
            n += 1;
        }
        assert_eq!(n, HELD_BYTES / 60_000, "the byte bound holds first");
        big.take(&a);
        assert!(big.is_empty());
        assert_eq!((big.packets, big.bytes), (0, 0));
    }

    #[test]
    fn a_link_of_two_overlays_is_kept_when_one_wants_it() {
        let (m, t) = (Duration::from_secs(60), Duration::from_secs(600));
        assert_eq!(
            Wanted::combine(Some(Wanted::OnDemand(m)), Wanted::OnDemand(t)),
            Wanted::OnDemand(t)
        );
        assert_eq!(
            Wanted::combine(Some(Wanted::OnDemand(m)), Wanted::Always),
            Wanted::Always
        );
        assert_eq!(
            Wanted::combine(Some(Wanted::Always), Wanted::OnDemand(m)),
            Wanted::Always
        );
        assert_eq!(
            Wanted::combine(None, Wanted::OnDemand(m)),
            Wanted::OnDemand(m)
        );
    }
}
