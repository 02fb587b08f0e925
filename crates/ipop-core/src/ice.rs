//! Conversions between the signalled candidates of [`crate::osn`] and the `is` ICE agent's.

use crate::osn::{Candidate, CandidateKind};
use std::time::Duration;

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

/// Sets how often the agent checks its working pairs, and how many unanswered checks fail
/// one: quickly while the path is `suspect` (traffic goes out, nothing comes back), gently
/// otherwise. Changes nothing when the pace is already right.
pub fn pace_consent(agent: &mut is::IceAgent, suspect: bool) {
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
        c.kind.as_str()
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
