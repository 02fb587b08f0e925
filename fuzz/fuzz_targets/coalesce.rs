//! Decrypted packets into the receive coalescer (`ipop::coalesce::Coalescer`), as the daemon
//! hands them over: each one decrypted into the room the coalescer offers, the batch written out
//! when full and at the end.
//!
//! The input is one byte that picks the device's offloads (none, TCP only, TCP and UDP), then a
//! script of packets, each `[fixes][length: u16 BE][bytes]`. The low bits of `fixes` have the
//! harness make the packet's IP and UDP lengths agree with its size, its IPv4 header checksum
//! valid and its TCP or UDP checksum valid, so that the fuzzer reaches the merging code without
//! having to find checksums; another bit makes the datagram decrypt to nothing, after it has
//! scribbled over its room, as a keepalive does.
//!
//! Besides never panicking: every write fits a TUN write (a virtio header and 64 KiB), one
//! without offload carries no virtio header, and the writes of a batch, split as the kernel
//! splits them, give back exactly the packets that went in (IPv4 identification and header
//! checksum aside, which segmentation renumbers), those of each flow in the order they came.
#![no_main]

use ipop::coalesce::Coalescer;
use libfuzzer_sys::fuzz_target;
use tun_rs::{VIRTIO_NET_HDR_LEN as VNET, VirtioNetHdr, checksum, checksum_no_fold, gso_split};

const FIX_LENGTHS: u8 = 1;
const FIX_IP_CHECKSUM: u8 = 2;
const FIX_L4_CHECKSUM: u8 = 4;
const DECRYPTS_TO_NOTHING: u8 = 8;
/// The most a decrypted packet can be: a datagram of 64 KiB less WireGuard's overhead.
const MAX_PACKET: usize = 65535 - 32;
/// Packets beyond this are ignored.
const MAX_PACKETS: usize = 300;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, mut script)) = data.split_first() else {
        return;
    };
    let (offload, udp) = match mode % 3 {
        0 => (false, false),
        1 => (true, false),
        _ => (true, true),
    };
    let mut c = Coalescer::new(offload, udp);
    let mut fed = Vec::new();
    for _ in 0..MAX_PACKETS {
        let [fixes, hi, lo, rest @ ..] = script else {
            break;
        };
        let len = usize::from(u16::from_be_bytes([*hi, *lo])).min(rest.len());
        let (bytes, tail) = rest.split_at(len);
        script = tail;
        let mut p = bytes[..len.min(MAX_PACKET)].to_vec();
        fix(&mut p, *fixes);
        if c.is_full() {
            check(&mut c, &mut fed, offload);
        }
        let room = c
            .room(p.len() + 32)
            .expect("a batch that is not full has room");
        assert!(
            room.len() >= p.len(),
            "room for {} bytes, asked for more",
            room.len()
        );
        if fixes & DECRYPTS_TO_NOTHING != 0 {
            room[..p.len()].fill(0xee);
            c.commit(None);
        } else {
            room[..p.len()].copy_from_slice(&p);
            c.commit(Some(p.len()));
            fed.push(p);
        }
    }
    check(&mut c, &mut fed, offload);
});

/// Writes the batch out and checks it against the packets fed since the last batch.
fn check(c: &mut Coalescer, fed: &mut Vec<Vec<u8>>, offload: bool) {
    let mut back = Vec::new();
    for w in c.finish() {
        assert!(w.len() <= VNET + 65535, "a write of {} bytes", w.len());
        if !offload {
            back.push(w.to_vec());
            continue;
        }
        let hdr =
            VirtioNetHdr::decode(w).expect("a write with offload starts with a virtio header");
        let mut packet = w[VNET..].to_vec();
        if hdr.gso_type == 0 {
            assert_eq!(hdr.flags, 0, "an unmerged packet asks for no checksum");
            back.push(packet);
            continue;
        }
        let v6 = packet[0] >> 4 == 6;
        let (headers, size) = (usize::from(hdr.hdr_len), usize::from(hdr.gso_size));
        assert!(
            size > 0 && headers < packet.len(),
            "a merged packet carries data"
        );
        let segments = (packet.len() - headers).div_ceil(size);
        let mut out = vec![vec![0u8; headers + size]; segments];
        let mut sizes = vec![0; segments];
        let n = gso_split(&mut packet, hdr, &mut out, &mut sizes, 0, v6)
            .expect("the kernel can split a merged packet");
        back.extend(out.into_iter().zip(sizes).take(n).map(|(mut o, size)| {
            o.truncate(size);
            o
        }));
    }
    c.clear();
    let sent: Vec<Vec<u8>> = fed.drain(..).map(renumbered).collect();
    let back: Vec<Vec<u8>> = back.into_iter().map(renumbered).collect();
    let (mut sorted_sent, mut sorted_back) = (sent.clone(), back.clone());
    sorted_sent.sort();
    sorted_back.sort();
    assert!(
        sorted_sent == sorted_back,
        "the packets written are not the packets fed"
    );
    let mut flows = std::collections::BTreeSet::new();
    flows.extend(sent.iter().filter_map(|p| flow(p)));
    for f in flows {
        let of = |packets: &[Vec<u8>]| -> Vec<Vec<u8>> {
            packets
                .iter()
                .filter(|p| flow(p).as_ref() == Some(&f))
                .cloned()
                .collect()
        };
        assert!(of(&sent) == of(&back), "a flow's packets came out of order");
    }
}

/// The flow of an unfragmented TCP or UDP packet: its IP version, protocol, addresses and
/// ports.
fn flow(p: &[u8]) -> Option<(u8, u8, Vec<u8>)> {
    let (proto, addresses, iph) = match p.first()? >> 4 {
        4 if p.len() >= 20 && p[0] & 0x0f >= 5 && p[6] & 0x3f == 0 && p[7] == 0 => {
            (p[9], &p[12..20], usize::from(p[0] & 0x0f) * 4)
        }
        6 if p.len() >= 40 => (p[6], &p[8..40], 40),
        _ => return None,
    };
    let ports = p.get(iph..iph + 4).filter(|_| proto == 6 || proto == 17)?;
    Some((p[0] >> 4, proto, [addresses, ports].concat()))
}

/// The packet with its IPv4 identification and header checksum zeroed.
fn renumbered(mut p: Vec<u8>) -> Vec<u8> {
    if p.len() >= 20 && p[0] >> 4 == 4 {
        p[4..6].fill(0);
        p[10..12].fill(0);
    }
    p
}

/// Applies the fixes the script asks for, where the packet is long enough to take them.
fn fix(p: &mut [u8], fixes: u8) {
    let len = p.len();
    let (v6, iph, proto) = match p.first().map(|b| b >> 4) {
        Some(4) if len >= 20 && usize::from(p[0] & 0x0f) * 4 >= 20 => {
            (false, usize::from(p[0] & 0x0f) * 4, p[9])
        }
        Some(6) if len >= 40 => (true, 40, p[6]),
        _ => return,
    };
    if iph > len {
        return;
    }
    if fixes & FIX_LENGTHS != 0 {
        if v6 {
            p[4..6].copy_from_slice(&((len - 40) as u16).to_be_bytes());
        } else {
            p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        }
        if proto == 17 && len >= iph + 8 {
            p[iph + 4..iph + 6].copy_from_slice(&((len - iph) as u16).to_be_bytes());
        }
    }
    let field = match proto {
        6 => iph + 16,
        17 => iph + 6,
        _ => len,
    };
    if fixes & FIX_L4_CHECKSUM != 0 && field + 2 <= len {
        p[field..field + 2].fill(0);
        let addresses = if v6 { &p[8..40] } else { &p[12..20] };
        let pseudo = checksum_no_fold(addresses, u64::from(proto) + (len - iph) as u64);
        let mut sum = !checksum(&p[iph..], pseudo);
        if proto == 17 && sum == 0 {
            sum = 0xffff;
        }
        p[field..field + 2].copy_from_slice(&sum.to_be_bytes());
    }
    if fixes & FIX_IP_CHECKSUM != 0 && !v6 {
        p[10..12].fill(0);
        let sum = !checksum(&p[..iph], 0);
        p[10..12].copy_from_slice(&sum.to_be_bytes());
    }
}
