//! Conversions between the signalled candidates of [`crate::osn`] and the `is` ICE agent's.

use crate::osn::{Candidate, CandidateKind};
use std::time::{Duration, Instant};

/// Consent checks of a working pair while its path is healthy or idle: one every 3 s, and the
/// pair fails after 9 unanswered checks (about 21 s). What keeps an idle link's NAT mappings
/// open, at a modest rate.
const CONSENT_INTERVAL: Duration = Duration::from_secs(3);
const CONSENT_CHECKS: usize = 9;
/// Consent checks while the tunnel sends and nothing authenticated comes back on the path:
/// one a second, and the pair fails after 4 unanswered checks (checks go 0.25, 0.5, 1 and 1 s
/// apart, then 1 s more for the last answer): a dead pair is found within 5 s of its death.
const SUSPECT_INTERVAL: Duration = Duration::from_secs(1);
const SUSPECT_CHECKS: usize = 4;

/// How long the nominated pair may leave every check unanswered while its path is suspect
/// before it is taken as dead. The path is suspect after 1 s of silence while the tunnel sends,
/// so a path that dies under traffic is given up about 4.5 s after its last answer. (The agent's
/// own verdict can take up to 15 s more: it keeps a pair for 15 s after the other side's last
/// check.)
pub const CONSENT_TIMEOUT: Duration = Duration::from_millis(3500);

/// Consent freshness of a session's nominated pair (RFC 7675, on a shorter clock): while the
/// path is suspect, the answers to the pair's checks are counted, and consent is lost when
/// none came for [`CONSENT_TIMEOUT`].
#[derive(Debug, Default)]
pub struct Consent {
    /// Since when the path is suspect with no new answer, and the answers counted then.
    unanswered: Option<(Instant, Option<u64>)>,
}

impl Consent {
    /// How long the path has been suspect with no check answered, at `now`.
    pub fn unanswered_for(&self, now: Instant) -> Duration {
        self.unanswered.map_or(Duration::ZERO, |(since, _)| {
            now.saturating_duration_since(since)
        })
    }

    /// Paces the agent's checks for a path that is `suspect` or not, and tells whether
    /// consent is lost.
    pub fn update(&mut self, agent: &mut is::IceAgent, suspect: bool, now: Instant) -> bool {
        pace_consent(agent, suspect);
        if !suspect {
            self.unanswered = None;
            return false;
        }
        let answers = agent.nominated_pair_responses_received();
        match self.unanswered {
            Some((since, seen)) if seen == answers => {
                now.saturating_duration_since(since) >= CONSENT_TIMEOUT
            }
            _ => {
                self.unanswered = Some((now, answers));
                false
            }
        }
    }
}

/// Sets how often the agent checks its working pairs, and how many unanswered checks fail
/// one: quickly while the path is `suspect` (traffic goes out, nothing comes back), gently
/// otherwise. Changes nothing when the pace is already right.
fn pace_consent(agent: &mut is::IceAgent, suspect: bool) {
    if suspect {
        agent.set_max_stun_rto(SUSPECT_INTERVAL);
        agent.set_max_stun_retransmits(SUSPECT_CHECKS);
    } else {
        agent.set_max_stun_rto(CONSENT_INTERVAL);
        agent.set_max_stun_retransmits(CONSENT_CHECKS);
    }
}

/// The candidate in SDP `candidate:` attribute form (RFC 8839), which the ICE agent parses.
pub fn to_sdp(c: &Candidate) -> String {
    let mut s = format!(
        "candidate:{} {} udp {} {} {} typ {}",
        c.foundation,
        c.component,
        c.priority,
        c.address.ip(),
        c.address.port(),
        c.kind.wire().as_str()
    );
    if let Some(r) = c.related {
        s.push_str(&format!(" raddr {} rport {}", r.ip(), r.port()));
    }
    s
}

/// Reads a candidate the ICE agent wrote; `None` for anything but a UDP candidate.
pub fn from_agent(c: &is::Candidate) -> Option<Candidate> {
    let sdp = c.to_sdp_string();
    let foundation = sdp
        .strip_prefix("candidate:")?
        .split(' ')
        .next()?
        .to_owned();
    let kind = match c.kind() {
        is::CandidateKind::Host => CandidateKind::Host,
        is::CandidateKind::ServerReflexive => CandidateKind::ServerReflexive,
        is::CandidateKind::PeerReflexive => CandidateKind::PeerReflexive,
        is::CandidateKind::Relayed => CandidateKind::Relayed,
    };
    if c.proto() != is::Protocol::Udp {
        return None;
    }
    Some(Candidate {
        foundation,
        component: 1,
        priority: c.prio(),
        address: c.addr(),
        kind,
        related: (kind != CandidateKind::Host).then(|| c.local()),
    })
}

/// A signalled candidate as the ICE agent takes it; `None` when the agent rejects it.
pub fn to_agent(c: &Candidate) -> Option<is::Candidate> {
    is::Candidate::from_sdp_string(&to_sdp(c)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consent_is_lost_after_unanswered_suspect_time_only() {
        let mut agent = is::IceAgent::new(is::IceCreds::new());
        let mut consent = Consent::default();
        let t0 = Instant::now();
        // Not suspect: never lost, however long.
        assert!(!consent.update(&mut agent, false, t0));
        assert!(!consent.update(&mut agent, false, t0 + Duration::from_secs(60)));
        // Suspect from t1: lost once nothing was answered for the whole timeout.
        let t1 = t0 + Duration::from_secs(61);
        assert!(!consent.update(&mut agent, true, t1));
        assert!(!consent.update(&mut agent, true, t1 + CONSENT_TIMEOUT / 2));
        assert!(consent.update(&mut agent, true, t1 + CONSENT_TIMEOUT));
        // The path is heard again: the count starts over.
        let t2 = t1 + CONSENT_TIMEOUT + Duration::from_secs(1);
        assert!(!consent.update(&mut agent, false, t2));
        assert!(!consent.update(&mut agent, true, t2));
        assert!(!consent.update(&mut agent, true, t2 + CONSENT_TIMEOUT / 2));
    }

    #[test]
    fn host_candidate_survives_the_round_trip() {
        let mut agent = is::IceAgent::new(is::IceCreds::new());
        let local = is::Candidate::host("10.0.0.1:51820".parse().unwrap(), "udp").unwrap();
        let added = agent.add_local_candidate(local).expect("accepted").clone();
        let ours = from_agent(&added).expect("udp host");
        assert_eq!(ours.kind, CandidateKind::Host);
        assert_eq!(ours.address, "10.0.0.1:51820".parse().unwrap());
        let back = to_agent(&ours).expect("parses");
        assert_eq!(back.addr(), added.addr());
        assert_eq!(back.prio(), added.prio());
    }

    #[test]
    fn nonsense_candidates_are_refused() {
        let c = Candidate {
            foundation: "f o o".into(),
            component: 1,
            priority: 1,
            address: "10.0.0.1:1".parse().unwrap(),
            kind: CandidateKind::Host,
            related: None,
        };
        assert!(to_agent(&c).is_none());
    }
}
