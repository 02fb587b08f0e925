//! IPv4 packets through the social overlay's address translation, both ways: the destination
//! rewritten on the way into the tunnel, the source on the way out of it, and both at once.
//!
//! Input: 8 bytes of new addresses (source, destination), then the packet. Besides never
//! panicking, the rewrite must keep its promises: an error leaves the packet unchanged, bytes
//! after the IPv4 total length are never touched, the new addresses are in the header, and
//! every checksum that was valid before (IPv4 header, whole TCP or UDP segment, ICMP message) is
//! valid after.
#![no_main]

use ipop_core::packet;
use ipop_core::translate::rewrite_v4;
use libfuzzer_sys::fuzz_target;
use std::net::Ipv4Addr;

const ICMP: u8 = 1;
const TCP: u8 = 6;
const UDP: u8 = 17;

fuzz_target!(|data: &[u8]| {
    let Some((addresses, packet)) = data.split_first_chunk::<8>() else {
        return;
    };
    let new_src = Ipv4Addr::new(addresses[0], addresses[1], addresses[2], addresses[3]);
    let new_dst = Ipv4Addr::new(addresses[4], addresses[5], addresses[6], addresses[7]);
    // What the node reads before it translates.
    let _ = packet::addresses(packet);
    for (src, dst) in [
        (None, Some(new_dst)),
        (Some(new_src), None),
        (Some(new_src), Some(new_dst)),
    ] {
        check_rewrite(packet, src, dst);
    }
});

fn check_rewrite(original: &[u8], src: Option<Ipv4Addr>, dst: Option<Ipv4Addr>) {
    let before = Checksums::of(original);
    let mut p = original.to_vec();
    if rewrite_v4(&mut p, src, dst).is_err() {
        assert_eq!(p, original, "a refused packet is left unchanged");
        return;
    }
    let total = usize::from(u16::from_be_bytes([p[2], p[3]]));
    assert_eq!(
        p[total..],
        original[total..],
        "bytes after the total length"
    );
    if let Some(src) = src {
        assert_eq!(p[12..16], src.octets(), "new source");
    }
    if let Some(dst) = dst {
        assert_eq!(p[16..20], dst.octets(), "new destination");
    }
    let after = Checksums::of(&p);
    assert!(
        !before.header || after.header,
        "IPv4 header checksum broken"
    );
    assert!(
        !before.transport || after.transport,
        "transport checksum broken"
    );
}

/// Which checksums of a packet are valid (a checksum that cannot be checked counts as invalid).
struct Checksums {
    header: bool,
    transport: bool,
}

impl Checksums {
    fn of(p: &[u8]) -> Checksums {
        let header_len = usize::from(p.first().map_or(0, |b| b & 0x0f)) * 4;
        let Some(fixed) = p.get(..20) else {
            return Checksums {
                header: false,
                transport: false,
            };
        };
        let total = usize::from(u16::from_be_bytes([fixed[2], fixed[3]]));
        if header_len < 20 || total < header_len || total > p.len() {
            return Checksums {
                header: false,
                transport: false,
            };
        }
        let header = sum(&[&p[..header_len]]) == 0xffff;
        // Only a whole datagram (not a fragment) carries its whole transport segment.
        let whole = fixed[6] & 0x3f == 0 && fixed[7] == 0;
        let segment = &p[header_len..total];
        let length = (segment.len() as u16).to_be_bytes();
        let pseudo = [
            fixed[12], fixed[13], fixed[14], fixed[15], fixed[16], fixed[17], fixed[18], fixed[19],
            0, fixed[9], length[0], length[1],
        ];
        let transport = whole
            && match fixed[9] {
                TCP => segment.len() >= 20 && sum(&[&pseudo, segment]) == 0xffff,
                UDP => {
                    segment.len() >= 8
                        && segment[6..8] != [0, 0]
                        && sum(&[&pseudo, segment]) == 0xffff
                }
                ICMP => segment.len() >= 8 && sum(&[segment]) == 0xffff,
                _ => false,
            };
        Checksums { header, transport }
    }
}

/// The one's-complement sum of the 16-bit words of `parts` (each part but the last of even
/// length; the last padded with a zero byte).
fn sum(parts: &[&[u8]]) -> u16 {
    let mut s: u64 = 0;
    for part in parts {
        for w in part.chunks(2) {
            s += u64::from(u16::from_be_bytes([w[0], w.get(1).copied().unwrap_or(0)]));
        }
    }
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}
