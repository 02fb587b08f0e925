//! IPv4 address translation at the tunnel boundary, for the social overlay.
//!
//! In a social overlay each device numbers its friends' devices in its own private subnet, so a
//! packet that crosses the tunnel has its addresses rewritten: each side sees its own numbering.
//! [`rewrite_v4`] does that in place, without allocation, and keeps every checksum that covers an
//! address valid by incremental update (RFC 1624) rather than by recomputation, so the cost per
//! packet does not grow with its length.
//!
//! A stateless rewrite cannot reach a transport checksum that is not in the packet at hand: a
//! first fragment too short to hold it, or the quote of an ICMP error cut before it. Such fields
//! are left alone.

use std::net::Ipv4Addr;

const MIN_HEADER: usize = 20;
const ICMP_HEADER: usize = 8;
const ICMP: u8 = 1;
const TCP: u8 = 6;
const UDP: u8 = 17;

// Offsets in an IPv4 header.
const CHECKSUM: usize = 10;
const SOURCE: usize = 12;
const DESTINATION: usize = 16;

/// Why a packet could not be rewritten (the caller drops and counts it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TranslateError {
    /// The buffer ends before the IPv4 header or before the packet's total length.
    #[error("packet is shorter than its IPv4 header or its total length")]
    Truncated,
    /// The version field is not 4.
    #[error("not an IPv4 packet")]
    NotIpv4,
    /// The header length is below 20 bytes or beyond the total length.
    #[error("IPv4 header length is invalid")]
    BadHeader,
}

/// Rewrites the source and/or destination address of the IPv4 packet in `packet` in place
/// (`None` leaves that address alone), and fixes every checksum that covers it.
///
/// Covered are the IPv4 header checksum, the TCP and UDP checksums (through their
/// pseudo-header; a UDP checksum of 0, "none", stays 0) and, in an ICMP error message, the quoted
/// packet: its source (if it is the outer destination) and its destination (if it is the outer
/// source) are rewritten to match, with its header checksum, its transport checksum when quoted,
/// and the outer ICMP checksum. Bytes after the IPv4 total length are not touched. On error,
/// `packet` is unchanged.
pub fn rewrite_v4(
    packet: &mut [u8],
    src: Option<Ipv4Addr>,
    dst: Option<Ipv4Addr>,
) -> Result<(), TranslateError> {
    let ip = Header::parse(packet)?;
    let change = Change {
        src: ip.src,
        new_src: src.map_or(ip.src, |a| a.octets()),
        dst: ip.dst,
        new_dst: dst.map_or(ip.dst, |a| a.octets()),
    };
    if change.is_none() {
        return Ok(());
    }
    let (header, body) = packet
        .get_mut(..ip.total_len)
        .and_then(|p| p.split_at_mut_checked(ip.header_len))
        .ok_or(TranslateError::Truncated)?;
    rewrite_ip_header(header, &change);
    if ip.first_fragment {
        if ip.protocol == ICMP {
            rewrite_icmp_error(body, &change);
        } else {
            rewrite_transport(body, ip.protocol, &change);
        }
    }
    Ok(())
}

/// What the rewrite needs from a validated IPv4 header.
struct Header {
    header_len: usize,
    total_len: usize,
    protocol: u8,
    first_fragment: bool,
    src: [u8; 4],
    dst: [u8; 4],
}

impl Header {
    fn parse(packet: &[u8]) -> Result<Self, TranslateError> {
        let first = packet.first().ok_or(TranslateError::Truncated)?;
        if first >> 4 != 4 {
            return Err(TranslateError::NotIpv4);
        }
        let h: &[u8; MIN_HEADER] = packet
            .get(..MIN_HEADER)
            .and_then(|h| h.try_into().ok())
            .ok_or(TranslateError::Truncated)?;
        let header_len = usize::from(h[0] & 0x0f) * 4;
        let total_len = usize::from(u16::from_be_bytes([h[2], h[3]]));
        if header_len < MIN_HEADER || total_len < header_len {
            return Err(TranslateError::BadHeader);
        }
        if total_len > packet.len() {
            return Err(TranslateError::Truncated);
        }
        Ok(Self {
            header_len,
            total_len,
            protocol: h[9],
            first_fragment: fragment_offset(h[6], h[7]) == 0,
            src: [h[12], h[13], h[14], h[15]],
            dst: [h[16], h[17], h[18], h[19]],
        })
    }
}

/// The fragment offset, from the two bytes that hold it with the flags.
fn fragment_offset(high: u8, low: u8) -> u16 {
    u16::from_be_bytes([high, low]) & 0x1fff
}

/// How the two addresses of one IPv4 header change (an address may stay as it is).
struct Change {
    src: [u8; 4],
    new_src: [u8; 4],
    dst: [u8; 4],
    new_dst: [u8; 4],
}

impl Change {
    fn is_none(&self) -> bool {
        self.src == self.new_src && self.dst == self.new_dst
    }

    /// `check` updated for the change, for a checksum that covers both addresses.
    fn adjust(&self, check: u16) -> u16 {
        adjust_address(
            adjust_address(check, self.src, self.new_src),
            self.dst,
            self.new_dst,
        )
    }
}

/// RFC 1624 eqn. 3: the checksum `check` after a 16-bit word it covers went from `old` to `new`,
/// `~(~HC + ~m + m')` in one's-complement arithmetic.
fn adjust(check: u16, old: u16, new: u16) -> u16 {
    if old == new {
        return check;
    }
    let sum = u32::from(!check) + u32::from(!old) + u32::from(new);
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// [`adjust`] for the two words of an IPv4 address.
fn adjust_address(check: u16, old: [u8; 4], new: [u8; 4]) -> u16 {
    let [a, b, c, d] = old;
    let [e, f, g, h] = new;
    let check = adjust(
        check,
        u16::from_be_bytes([a, b]),
        u16::from_be_bytes([e, f]),
    );
    adjust(
        check,
        u16::from_be_bytes([c, d]),
        u16::from_be_bytes([g, h]),
    )
}

/// Replaces the big-endian word at `at` with `f` of it. Returns the word before and after, or
/// `None` (and changes nothing) if `buf` ends before the word does.
fn update_word(buf: &mut [u8], at: usize, f: impl FnOnce(u16) -> u16) -> Option<(u16, u16)> {
    let field: &mut [u8; 2] = buf.get_mut(at..at.checked_add(2)?)?.try_into().ok()?;
    let old = u16::from_be_bytes(*field);
    let new = f(old);
    *field = new.to_be_bytes();
    Some((old, new))
}

/// Writes `new` at `at` if it differs from `old` and `buf` holds all of the field.
fn put_address(buf: &mut [u8], at: usize, old: [u8; 4], new: [u8; 4]) {
    if old != new
        && let Some(field) = buf.get_mut(at..at + 4)
    {
        field.copy_from_slice(&new);
    }
}

/// Writes the new addresses into an IPv4 header, or into what there is of one, and updates its
/// checksum. Returns the checksum before and after, if the header holds it.
fn rewrite_ip_header(header: &mut [u8], change: &Change) -> Option<(u16, u16)> {
    put_address(header, SOURCE, change.src, change.new_src);
    put_address(header, DESTINATION, change.dst, change.new_dst);
    update_word(header, CHECKSUM, |c| change.adjust(c))
}

/// Updates the TCP or UDP checksum at the start of `segment` for the change of the addresses in
/// its pseudo-header. Returns the checksum before and after, if `segment` holds it.
fn rewrite_transport(segment: &mut [u8], protocol: u8, change: &Change) -> Option<(u16, u16)> {
    match protocol {
        TCP => update_word(segment, 16, |c| change.adjust(c)),
        // 0 means the sender computed no checksum; a computed 0 is sent as 0xffff.
        UDP => update_word(segment, 6, |c| match c {
            0 => 0,
            c => match change.adjust(c) {
                0 => 0xffff,
                c => c,
            },
        }),
        _ => None,
    }
}

/// In an ICMP error message, rewrites the quoted packet to match the outer `change`: it travelled
/// the other way, so its source is the outer destination and its destination the outer source.
/// Other ICMP messages are not covered by the pseudo-header and need nothing.
fn rewrite_icmp_error(message: &mut [u8], outer: &Change) {
    // Destination unreachable, source quench, redirect, time exceeded, parameter problem.
    if !matches!(message.first(), Some(3 | 4 | 5 | 11 | 12)) {
        return;
    }
    let Some((icmp, quote)) = message.split_at_mut_checked(ICMP_HEADER) else {
        return;
    };
    let Some(&first) = quote.first() else {
        return;
    };
    let header_len = usize::from(first & 0x0f) * 4;
    if first >> 4 != 4 || header_len < MIN_HEADER {
        return;
    }
    let address = |at: usize| -> Option<[u8; 4]> { quote.get(at..at + 4)?.try_into().ok() };
    // An address the quote does not hold, or does not match, stays as it is.
    let (src, new_src) = match address(SOURCE) {
        Some(a) if a == outer.dst => (a, outer.new_dst),
        Some(a) => (a, a),
        None => ([0; 4], [0; 4]),
    };
    let (dst, new_dst) = match address(DESTINATION) {
        Some(a) if a == outer.src => (a, outer.new_src),
        Some(a) => (a, a),
        None => ([0; 4], [0; 4]),
    };
    let change = Change {
        src,
        new_src,
        dst,
        new_dst,
    };
    if change.is_none() {
        return;
    }
    let protocol = quote.get(9).copied();
    let first_fragment =
        matches!(quote.get(6..8), Some(&[high, low]) if fragment_offset(high, low) == 0);
    let header = rewrite_ip_header(quote, &change);
    let transport = match (protocol, quote.get_mut(header_len..)) {
        (Some(protocol), Some(segment)) if first_fragment => {
            rewrite_transport(segment, protocol, &change)
        }
        _ => None,
    };
    // The ICMP checksum covers the quote: every word changed in it, at even offsets.
    update_word(icmp, 2, |c| {
        let c = change.adjust(c);
        let c = header.map_or(c, |(old, new)| adjust(c, old, new));
        transport.map_or(c, |(old, new)| adjust(c, old, new))
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Rng;

    // Straightforward reference checksums, computed over whole packets.

    fn sum(parts: &[&[u8]]) -> u16 {
        let mut s: u64 = 0;
        for part in parts {
            assert_eq!(part.len() % 2, 0, "parts other than the last are even");
            for w in part.chunks(2) {
                s += u64::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)]));
            }
        }
        while s > 0xffff {
            s = (s & 0xffff) + (s >> 16);
        }
        s as u16
    }

    fn sum_padded(pseudo: &[u8], segment: &[u8]) -> u16 {
        let mut padded = segment.to_vec();
        if padded.len() % 2 == 1 {
            padded.push(0);
        }
        sum(&[pseudo, &padded])
    }

    fn pseudo_header(src: &[u8], dst: &[u8], protocol: u8, len: usize) -> Vec<u8> {
        let mut p = Vec::new();
        p.extend_from_slice(src);
        p.extend_from_slice(dst);
        p.extend_from_slice(&[0, protocol]);
        p.extend_from_slice(&(len as u16).to_be_bytes());
        p
    }

    /// Computes the checksum of a transport segment in full, into its field.
    fn seal_transport(src: &[u8], dst: &[u8], protocol: u8, segment: &mut [u8]) {
        let (field, pseudo) = match protocol {
            TCP => (16, pseudo_header(src, dst, protocol, segment.len())),
            UDP => (6, pseudo_header(src, dst, protocol, segment.len())),
            ICMP => (2, Vec::new()),
            _ => return,
        };
        if segment.len() < field + 2 || (protocol == UDP && segment[6..8] == [0, 0]) {
            return;
        }
        segment[field..field + 2].fill(0);
        let mut c = !sum_padded(&pseudo, segment);
        if protocol == UDP && c == 0 {
            c = 0xffff;
        }
        segment[field..field + 2].copy_from_slice(&c.to_be_bytes());
    }

    /// Computes every checksum of a packet in full: the IPv4 header's and, for a whole datagram,
    /// the transport's (a UDP checksum of 0 stays 0). Quotes in ICMP errors are left as they are.
    fn seal(p: &mut [u8]) {
        let hl = usize::from(p[0] & 0x0f) * 4;
        let total = usize::from(u16::from_be_bytes([p[2], p[3]]));
        p[10..12].fill(0);
        let c = !sum(&[&p[..hl]]);
        p[10..12].copy_from_slice(&c.to_be_bytes());
        let whole = u16::from_be_bytes([p[6], p[7]]) & 0x3fff == 0;
        if whole {
            let (header, segment) = p[..total].split_at_mut(hl);
            seal_transport(&header[12..16], &header[16..20], header[9], segment);
        }
    }

    fn sealed(p: &[u8]) -> Vec<u8> {
        let mut p = p.to_vec();
        seal(&mut p);
        p
    }

    /// Asserts that every checksum of `p` equals a full recomputation and that the header verifies.
    fn assert_checksums(p: &[u8]) {
        assert_eq!(sealed(p), p, "checksums equal a full recomputation");
        let hl = usize::from(p[0] & 0x0f) * 4;
        assert_eq!(sum(&[&p[..hl]]), 0xffff, "the IPv4 header verifies");
    }

    fn ipv4(
        src: [u8; 4],
        dst: [u8; 4],
        protocol: u8,
        options: &[u8],
        frag: u16,
        payload: &[u8],
    ) -> Vec<u8> {
        assert_eq!(options.len() % 4, 0);
        let hl = MIN_HEADER + options.len();
        let total = (hl + payload.len()) as u16;
        let mut p = vec![0x40 | (hl / 4) as u8, 0];
        p.extend_from_slice(&total.to_be_bytes());
        p.extend_from_slice(&[0x1c, 0x46]);
        p.extend_from_slice(&frag.to_be_bytes());
        p.extend_from_slice(&[64, protocol, 0, 0]);
        p.extend_from_slice(&src);
        p.extend_from_slice(&dst);
        p.extend_from_slice(options);
        p.extend_from_slice(payload);
        seal(&mut p);
        p
    }

    /// A TCP SYN with an MSS option, as a client sends it.
    fn tcp_syn(src: [u8; 4], dst: [u8; 4], options: &[u8]) -> Vec<u8> {
        let mut tcp = vec![0x9c, 0x40, 0x00, 0x16]; // ports 40000 -> 22
        tcp.extend_from_slice(&0x5eed_1234u32.to_be_bytes()); // sequence number
        tcp.extend_from_slice(&[0; 4]); // acknowledgment number
        tcp.extend_from_slice(&[0x60, 0x02, 0xfa, 0xf0]); // 24-byte header, SYN, window 64240
        tcp.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
        tcp.extend_from_slice(&[0x02, 0x04, 0x05, 0xb4]); // MSS 1460
        ipv4(src, dst, TCP, options, 0x4000, &tcp)
    }

    /// A UDP datagram, with or without a checksum.
    fn udp(src: [u8; 4], dst: [u8; 4], payload: &[u8], checksum: bool) -> Vec<u8> {
        let mut d = vec![0xd4, 0x31, 0x00, 0x35]; // ports 54321 -> 53
        d.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        d.extend_from_slice(if checksum { &[0xff, 0xff] } else { &[0, 0] });
        d.extend_from_slice(payload);
        ipv4(src, dst, UDP, &[], 0, &d)
    }

    fn icmp(src: [u8; 4], dst: [u8; 4], kind: u8, code: u8, rest: &[u8]) -> Vec<u8> {
        let mut m = vec![kind, code, 0, 0];
        m.extend_from_slice(rest);
        ipv4(src, dst, ICMP, &[], 0, &m)
    }

    fn a(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    const ALICE: [u8; 4] = [192, 168, 1, 20];
    const BOB: [u8; 4] = [10, 254, 0, 7];
    const ALICE_FOR_BOB: [u8; 4] = [172, 31, 200, 9];
    const BOB_FOR_ALICE: [u8; 4] = [100, 64, 3, 129];

    fn translate(p: &mut [u8]) {
        rewrite_v4(
            p,
            Some(Ipv4Addr::from(ALICE_FOR_BOB)),
            Some(Ipv4Addr::from(BOB)),
        )
        .unwrap();
    }

    #[test]
    fn reference_checksum_matches_a_known_header() {
        let header = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        let mut again = header;
        again[10..12].fill(0);
        assert_eq!(!sum(&[&again]), 0xb861);
    }

    #[test]
    fn tcp_syn_keeps_valid_checksums() {
        let mut p = tcp_syn(ALICE, BOB_FOR_ALICE, &[]);
        translate(&mut p);
        assert_eq!(p, tcp_syn(ALICE_FOR_BOB, BOB, &[]));
        assert_checksums(&p);
    }

    #[test]
    fn only_the_given_address_changes() {
        let mut p = tcp_syn(ALICE, BOB_FOR_ALICE, &[]);
        rewrite_v4(&mut p, None, Some(a("10.254.0.7"))).unwrap();
        assert_eq!(p, tcp_syn(ALICE, BOB, &[]));
        rewrite_v4(&mut p, Some(a("172.31.200.9")), None).unwrap();
        assert_eq!(p, tcp_syn(ALICE_FOR_BOB, BOB, &[]));
        let before = p.clone();
        rewrite_v4(&mut p, None, None).unwrap();
        assert_eq!(p, before);
    }

    #[test]
    fn udp_with_and_without_checksum() {
        for checksum in [true, false] {
            let mut p = udp(
                ALICE,
                BOB_FOR_ALICE,
                b"\x12\x34\x01\x00\x00\x01query",
                checksum,
            );
            translate(&mut p);
            assert_eq!(
                p,
                udp(
                    ALICE_FOR_BOB,
                    BOB,
                    b"\x12\x34\x01\x00\x00\x01query",
                    checksum
                )
            );
            assert_checksums(&p);
            assert_eq!(p[26..28] == [0, 0], !checksum, "no checksum stays none");
        }
    }

    #[test]
    fn a_udp_checksum_that_comes_to_zero_is_sent_as_ffff() {
        // Pick the payload so that the translated datagram sums to zero.
        let probe = udp(ALICE_FOR_BOB, BOB, &[0, 0], false);
        let pseudo = pseudo_header(&ALICE_FOR_BOB, &BOB, UDP, 10);
        let filler = !sum(&[&pseudo, &probe[20..]]);
        let payload = filler.to_be_bytes();
        let mut p = udp(ALICE, BOB_FOR_ALICE, &payload, true);
        assert_ne!(p[26..28], [0xff, 0xff]);
        translate(&mut p);
        assert_eq!(p[26..28], [0xff, 0xff]);
        assert_eq!(p, udp(ALICE_FOR_BOB, BOB, &payload, true));
        assert_checksums(&p);
    }

    #[test]
    fn icmp_echo_checksum_is_not_touched() {
        let rest = b"\x00\x2a\x00\x01ping payload....";
        let mut p = icmp(ALICE, BOB_FOR_ALICE, 8, 0, rest);
        let echo_checksum = [p[22], p[23]];
        translate(&mut p);
        assert_eq!(p, icmp(ALICE_FOR_BOB, BOB, 8, 0, rest));
        assert_eq!([p[22], p[23]], echo_checksum);
        assert_checksums(&p);
    }

    /// Bob's host answers Alice's packet with an ICMP error; on its way to Alice, the error and
    /// the packet it quotes are translated into her numbering.
    #[test]
    fn icmp_errors_quote_the_translated_packet() {
        let payload = b"abcdefghijklmnopqrstuvwxyz0123";
        type Build = fn([u8; 4], [u8; 4], &[u8]) -> Vec<u8>;
        let quoted: [Build; 3] = [
            |s, d, p| udp(s, d, p, true),
            |s, d, p| udp(s, d, p, false),
            |s, d, _| tcp_syn(s, d, &[]),
        ];
        for (kind, code) in [(3, 3), (11, 0), (12, 0), (4, 0), (5, 1)] {
            for build in quoted {
                let original = build(ALICE_FOR_BOB, BOB, payload);
                for len in [0, 1, 10, 12, 14, 16, 18, 20, 24, 26, 28, 36, original.len()] {
                    let mut rest = vec![0, 0, 0, 0];
                    rest.extend_from_slice(&original[..len]);
                    let mut p = icmp(BOB, ALICE_FOR_BOB, kind, code, &rest);
                    rewrite_v4(
                        &mut p,
                        Some(Ipv4Addr::from(BOB_FOR_ALICE)),
                        Some(Ipv4Addr::from(ALICE)),
                    )
                    .unwrap();

                    // Each quoted field is translated if the quote holds all of it.
                    let src = if len >= 16 { ALICE } else { ALICE_FOR_BOB };
                    let dst = if len >= 20 { BOB_FOR_ALICE } else { BOB };
                    let mut rest = vec![0, 0, 0, 0];
                    rest.extend_from_slice(&build(src, dst, payload)[..len]);
                    assert_eq!(
                        p,
                        icmp(BOB_FOR_ALICE, ALICE, kind, code, &rest),
                        "type {kind}, quote of {len} bytes"
                    );
                    assert_checksums(&p);
                }
            }
        }
    }

    #[test]
    fn icmp_error_quote_addresses_that_do_not_match_are_left_alone() {
        let stranger = [203, 0, 113, 5];
        let original = udp(stranger, BOB, b"data", true);
        let mut rest = vec![0, 0, 0, 0];
        rest.extend_from_slice(&original);
        let mut p = icmp(BOB, ALICE_FOR_BOB, 3, 1, &rest);
        rewrite_v4(
            &mut p,
            Some(Ipv4Addr::from(BOB_FOR_ALICE)),
            Some(Ipv4Addr::from(ALICE)),
        )
        .unwrap();
        let mut rest = vec![0, 0, 0, 0];
        rest.extend_from_slice(&udp(stranger, BOB_FOR_ALICE, b"data", true));
        assert_eq!(p, icmp(BOB_FOR_ALICE, ALICE, 3, 1, &rest));
        assert_checksums(&p);
    }

    #[test]
    fn fragments_keep_the_datagram_checksum_valid() {
        let payload: Vec<u8> = (0..=255u8).cycle().take(300).collect();
        let split = |src, dst| {
            let whole = udp(src, dst, &payload, true);
            let udp_bytes = &whole[20..];
            let first = ipv4(src, dst, UDP, &[], 0x2000, &udp_bytes[..104]);
            let second = ipv4(src, dst, UDP, &[], 13, &udp_bytes[104..]);
            (first, second)
        };
        let (mut first, mut second) = split(ALICE, BOB_FOR_ALICE);
        translate(&mut first);
        translate(&mut second);
        let (expected_first, expected_second) = split(ALICE_FOR_BOB, BOB);
        assert_eq!(first, expected_first);
        assert_eq!(second, expected_second);

        // The reassembled datagram verifies with the translated addresses.
        let mut datagram = first[20..].to_vec();
        datagram.extend_from_slice(&second[20..]);
        let stored = datagram.clone();
        seal_transport(&ALICE_FOR_BOB, &BOB, UDP, &mut datagram);
        assert_eq!(datagram, stored);
        assert_checksums(&first);
        assert_checksums(&second);
    }

    #[test]
    fn later_fragments_change_only_the_ip_header() {
        // A later fragment whose data looks like an ICMP error quoting our addresses.
        let mut looks_like = vec![3, 3, 0, 0, 0, 0, 0, 0];
        looks_like.extend_from_slice(&udp(BOB_FOR_ALICE, ALICE, b"x", true));
        for protocol in [ICMP, TCP, UDP] {
            let mut p = ipv4(ALICE, BOB_FOR_ALICE, protocol, &[], 0x2000 | 7, &looks_like);
            translate(&mut p);
            assert_eq!(
                p,
                ipv4(ALICE_FOR_BOB, BOB, protocol, &[], 0x2000 | 7, &looks_like)
            );
            assert_checksums(&p);
        }
    }

    #[test]
    fn icmp_error_quoting_a_later_fragment_changes_only_its_ip_header() {
        let data = b"\x00\x35\xd4\x31\x00\x10\x12\x34 not a header";
        let quote = |src, dst| {
            let mut rest = vec![0, 0, 0, 0];
            rest.extend_from_slice(&ipv4(src, dst, UDP, &[], 0x2000 | 5, data));
            rest
        };
        let mut p = icmp(BOB, ALICE_FOR_BOB, 11, 1, &quote(ALICE_FOR_BOB, BOB));
        rewrite_v4(
            &mut p,
            Some(Ipv4Addr::from(BOB_FOR_ALICE)),
            Some(Ipv4Addr::from(ALICE)),
        )
        .unwrap();
        assert_eq!(
            p,
            icmp(BOB_FOR_ALICE, ALICE, 11, 1, &quote(ALICE, BOB_FOR_ALICE))
        );
        assert_checksums(&p);
    }

    #[test]
    fn header_options_are_skipped() {
        // No-operation, end of options; then a record-route option with room for two addresses.
        for options in [&[1, 1, 1, 0][..], &[1, 7, 11, 4, 0, 0, 0, 0, 0, 0, 0, 0]] {
            let mut p = tcp_syn(ALICE, BOB_FOR_ALICE, options);
            translate(&mut p);
            assert_eq!(p, tcp_syn(ALICE_FOR_BOB, BOB, options));
            assert_checksums(&p);
        }
    }

    #[test]
    fn malformed_packets_are_refused_unchanged() {
        let good = udp(ALICE, BOB_FOR_ALICE, b"payload", true);
        let mut short_ihl = good.clone();
        short_ihl[0] = 0x44;
        let mut long_ihl = good.clone();
        long_ihl[0] = 0x4f; // 60-byte header in a 35-byte packet
        let mut ipv6 = good.clone();
        ipv6[0] = 0x60;
        let mut beyond = good.clone();
        beyond[3] += 1;
        let cases = [
            (Vec::new(), TranslateError::Truncated),
            (good[..19].to_vec(), TranslateError::Truncated),
            (good[..good.len() - 1].to_vec(), TranslateError::Truncated),
            (beyond, TranslateError::Truncated),
            (short_ihl, TranslateError::BadHeader),
            (long_ihl, TranslateError::BadHeader),
            (ipv6, TranslateError::NotIpv4),
        ];
        for (packet, error) in cases {
            let mut p = packet.clone();
            assert_eq!(
                rewrite_v4(&mut p, Some(a("10.0.0.1")), Some(a("10.0.0.2"))),
                Err(error)
            );
            assert_eq!(p, packet);
        }
        assert_eq!(TranslateError::NotIpv4.to_string(), "not an IPv4 packet");
    }

    #[test]
    fn bytes_after_the_total_length_are_not_touched() {
        let mut p = udp(ALICE, BOB_FOR_ALICE, b"data", true);
        p.extend_from_slice(&[0xee; 6]);
        translate(&mut p);
        let mut expected = udp(ALICE_FOR_BOB, BOB, b"data", true);
        expected.extend_from_slice(&[0xee; 6]);
        assert_eq!(p, expected);
    }

    /// Random packets, most of them shaped enough to reach the transport and ICMP code.
    #[test]
    fn random_packets_never_panic_and_keep_checksums_valid() {
        let mut rng = Rng(0x6a09_e667_f3bc_c908);
        for i in 0..20_000 {
            let len = rng.below(140);
            let mut p = rng.bytes(len);
            let mut sealed_before = false;
            if i % 5 != 0 && len >= MIN_HEADER {
                let hl = if rng.below(4) == 0 {
                    20 + 4 * rng.below(11)
                } else {
                    20
                };
                p[0] = 0x40 | (hl / 4) as u8;
                let total = if rng.below(8) == 0 {
                    rng.below(len + 1)
                } else {
                    len
                };
                p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
                if rng.below(3) != 0 {
                    p[6] &= 0xe0;
                    p[7] = 0;
                }
                p[9] = [ICMP, TCP, UDP, 47][rng.below(4)];
                if p[9] == ICMP && hl + 8 + 20 <= len {
                    p[hl] = [3, 4, 5, 11, 12, 0][rng.below(6)];
                    let quote = hl + 8;
                    p[quote] = 0x45;
                    p[quote + 6] &= 0xe0;
                    p[quote + 7] = 0;
                    p[quote + 9] = [TCP, UDP, ICMP][rng.below(3)];
                    // The quote goes the other way: from the outer destination to its source.
                    let (src, dst) = (p[12..16].to_vec(), p[16..20].to_vec());
                    if rng.below(4) != 0 {
                        p[quote + 12..quote + 16].copy_from_slice(&dst);
                    }
                    if rng.below(4) != 0 {
                        p[quote + 16..quote + 20].copy_from_slice(&src);
                    }
                }
                if hl <= total && total <= len {
                    seal(&mut p);
                    sealed_before = true;
                }
            }
            let before = p.clone();
            let address = |rng: &mut Rng| match rng.below(3) {
                0 => None,
                _ => Some(Ipv4Addr::from(rng.next() as u32)),
            };
            let (src, dst) = (address(&mut rng), address(&mut rng));
            match rewrite_v4(&mut p, src, dst) {
                Err(_) => assert_eq!(p, before, "an error leaves the packet as it was"),
                Ok(()) => {
                    let total = usize::from(u16::from_be_bytes([p[2], p[3]]));
                    assert_eq!(p[total..], before[total..]);
                    if let Some(src) = src {
                        assert_eq!(p[12..16], src.octets());
                    }
                    if let Some(dst) = dst {
                        assert_eq!(p[16..20], dst.octets());
                    }
                    if sealed_before {
                        assert_checksums(&p);
                    }
                }
            }
        }
    }
}
