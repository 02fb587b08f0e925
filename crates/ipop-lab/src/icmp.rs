//! One ICMP echo from inside a network namespace, without starting a process. The scale
//! harness sends thousands of them, and each `ip netns exec … ping` costs a mount namespace, a
//! sysfs mount and two programs: at 100 devices that took more CPU than the daemons it
//! measured.

use std::io::{self, Read};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

use crate::nsenter::NsHandle;

const ECHO_REPLY: u8 = 0;
const ECHO_REQUEST: u8 = 8;
const PAYLOAD: &[u8; 16] = b"ipop-lab echo!!!";

/// Identifies each echo, so that concurrent ones from one namespace (a raw socket there sees
/// every ICMP packet that arrives) are told apart.
static NEXT_ID: AtomicU16 = AtomicU16::new(1);

/// Sends one echo request from the namespace `ns` to `to` and waits up to `wait` for its
/// reply: `Ok(true)` when it came.
pub(crate) fn echo(ns: &NsHandle, to: Ipv4Addr, wait: Duration) -> io::Result<bool> {
    let mut socket = ns.run(|| Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4)))??;
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    socket.send_to(&request(id), &SocketAddrV4::new(to, 0).into())?;
    let deadline = Instant::now() + wait;
    let mut buf = [0u8; 1500];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(false);
        }
        socket.set_read_timeout(Some(left))?;
        match socket.read(&mut buf) {
            Ok(n) if is_reply(buf.get(..n).unwrap_or_default(), id) => return Ok(true),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(false);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// An echo request with identifier `id`, sequence 1.
fn request(id: u16) -> Vec<u8> {
    let mut packet = vec![ECHO_REQUEST, 0, 0, 0];
    packet.extend_from_slice(&id.to_be_bytes());
    packet.extend_from_slice(&1u16.to_be_bytes());
    packet.extend_from_slice(PAYLOAD);
    let sum = checksum(&packet);
    packet[2..4].copy_from_slice(&sum.to_be_bytes());
    packet
}

/// Whether `datagram` (an IPv4 packet, as a raw socket reads it) is the reply to echo `id`.
fn is_reply(datagram: &[u8], id: u16) -> bool {
    let Some(header) = datagram.first().map(|b| usize::from(b & 0x0f) * 4) else {
        return false;
    };
    let Some(icmp) = datagram.get(header..) else {
        return false;
    };
    icmp.len() >= 8
        && icmp[0] == ECHO_REPLY
        && icmp[4..6] == id.to_be_bytes()
        && icmp[6..8] == 1u16.to_be_bytes()
        && icmp.get(8..) == Some(&PAYLOAD[..])
}

/// The Internet checksum (RFC 1071).
fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w.get(1).copied().unwrap_or(0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_checks_out_and_only_its_own_reply_matches() {
        let req = request(0x1234);
        assert_eq!(checksum(&req), 0, "a packet with its checksum sums to zero");
        let mut reply = vec![
            0x45, 0, 0, 0, 0, 0, 0, 0, 64, 1, 0, 0, 10, 0, 0, 2, 10, 0, 0, 1,
        ];
        reply.extend_from_slice(&req);
        assert!(!is_reply(&reply, 0x1234), "a request is no reply");
        reply[20] = ECHO_REPLY;
        assert!(is_reply(&reply, 0x1234));
        assert!(!is_reply(&reply, 0x1235), "another echo's reply");
        assert!(!is_reply(&reply[..30], 0x1234), "cut short");
        assert!(!is_reply(&[], 0x1234));
    }

    #[test]
    fn an_echo_between_two_namespaces_is_answered_and_one_to_nobody_is_not() {
        let lan = crate::Lan::new("icmp", 2);
        let from = NsHandle::of(&lan.hosts[0].ns);
        let wait = Duration::from_secs(2);
        assert!(echo(&from, lan.hosts[1].ipv4, wait).expect("sent"));
        // Concurrent echoes from one namespace each see their own reply only.
        let answered = std::thread::scope(|scope| {
            let echoes: Vec<_> = (0..8)
                .map(|_| scope.spawn(|| echo(&from, lan.hosts[1].ipv4, wait)))
                .collect();
            echoes
                .into_iter()
                .map(|e| e.join().expect("no panic"))
                .filter(|e| matches!(e, Ok(true)))
                .count()
        });
        assert_eq!(answered, 8);
        // An address on the LAN that no host has: no reply within the wait, and no longer.
        let started = Instant::now();
        let short = Duration::from_millis(300);
        assert!(!echo(&from, Ipv4Addr::new(10, 0, 0, 99), short).expect("sent"));
        assert!(started.elapsed() < short + Duration::from_millis(200));
    }

    #[test]
    fn the_checksum_is_rfc_1071s() {
        // The example of RFC 1071, section 3: 00 01 f2 03 f4 f5 f6 f7 sums to ddf2.
        assert_eq!(
            checksum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]),
            !0xddf2
        );
    }
}
