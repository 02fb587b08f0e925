//! Receive-side coalescing: the decrypted TCP segments of one flow are merged into one packet of
//! up to 64 KiB, written to the TUN device with a virtio header that describes it as a TCP GSO
//! packet, as the kernel's own GRO would hand it up. A train of 45 segments then costs one
//! write instead of 45.
//!
//! A packet is decrypted straight after the end of the flow the previous packet extended,
//! overlapping the room its own headers take there. When it extends that flow (the usual case in
//! a bulk transfer), its payload is already in place: only the few bytes under its headers are
//! put back. Otherwise it is moved to the next free buffer, or appended to another open flow.
//! Segments are merged on the kernel's GRO rules: same addresses, ports, acknowledgement, TCP
//! options, IP type of service and TTL (or traffic class and hop limit), consecutive sequence
//! numbers, flags ACK or ACK+PSH (PSH ends a flow), no segment longer than the first and a
//! short one last. Each segment's checksum is checked before it is merged, since the kernel
//! trusts a packet that asks it to complete the checksum. Everything else (UDP, ICMP, TCP
//! control segments, fragments) is written unmerged, in the order it came relative to its flow.

use tun_rs::{VIRTIO_NET_HDR_LEN as VNET, VirtioNetHdr, checksum};

/// The longest IP packet one write may carry.
const MAX_PACKET: usize = 65535;
/// Buffers per batch; when they are all used, the batch must be written.
const BUFFERS: usize = 64;
/// Each buffer: a virtio header and the longest IP packet (a decrypted datagram never exceeds it).
const BUFFER_LEN: usize = VNET + MAX_PACKET;
/// The longest IP and TCP headers (both with options).
const MAX_HEADERS: usize = 120;

const TCP: u8 = 6;
const TCP_ACK: u8 = 0x10;
const TCP_PSH: u8 = 0x08;
/// virtio-net header: the packet's checksum is to be completed by whoever consumes it.
const NEEDS_CSUM: u8 = 1;
const GSO_TCPV4: u8 = 1;
const GSO_TCPV6: u8 = 4;

/// Decrypted packets of one batch, coalesced, waiting to be written to the TUN device.
pub struct Coalescer {
    /// Allocated once; pages are only touched as far as packets fill them.
    bufs: Vec<Vec<u8>>,
    /// The used buffers, in the order they are to be written: `used[i]` is in `bufs[i]`.
    used: Vec<Used>,
    /// The buffer whose flow the next packet is decrypted after.
    hot: Option<usize>,
    pending: Pending,
    /// What a packet decrypted after the hot flow's end covered.
    stash: [u8; MAX_HEADERS],
    /// Whether the device takes virtio headers; without them nothing is merged.
    offload: bool,
}

/// Where the packet handed out by [`Coalescer::room`] is being decrypted.
#[derive(Clone, Copy)]
enum Pending {
    None,
    /// At the start of the next free buffer.
    Fresh,
    /// At `at` in the hot buffer, over the last `headers` bytes of its flow.
    Hot {
        at: usize,
        headers: usize,
    },
}

struct Used {
    /// Bytes of IP packet after the virtio header.
    len: usize,
    flow: Option<Flow>,
}

/// A TCP packet that later segments may extend; its headers are those of its first segment.
#[derive(Clone, Copy)]
struct Flow {
    v6: bool,
    iph: usize,
    headers: usize,
    next_seq: u32,
    /// The first segment's payload length: the GSO segment size.
    gso: usize,
    segments: usize,
    /// Whether another segment may still be appended (not after PSH or a short segment).
    open: bool,
}

/// A TCP segment that may be merged.
#[derive(Clone, Copy)]
struct Segment {
    v6: bool,
    iph: usize,
    headers: usize,
    payload: usize,
    seq: u32,
    psh: bool,
}

impl Coalescer {
    /// `offload`: the TUN device was opened with virtio headers (`IFF_VNET_HDR`) and TSO.
    pub fn new(offload: bool) -> Self {
        Coalescer {
            bufs: (0..BUFFERS).map(|_| vec![0; BUFFER_LEN]).collect(),
            used: Vec::with_capacity(BUFFERS),
            hot: None,
            pending: Pending::None,
            stash: [0; MAX_HEADERS],
            offload,
        }
    }

    /// Whether the batch must be written before another packet can be taken.
    pub fn is_full(&self) -> bool {
        self.used.len() == BUFFERS
    }

    /// Room to decrypt a datagram of `len` bytes into; [`Coalescer::commit`] must follow. None
    /// when the batch is full.
    pub fn room(&mut self, len: usize) -> Option<&mut [u8]> {
        if self.is_full() {
            return None;
        }
        if let Some(h) = self.hot
            && let Some(flow) = self.used[h].flow.filter(|f| f.open)
        {
            let at = VNET + self.used[h].len - flow.headers;
            if at + len <= BUFFER_LEN {
                let buf = &mut self.bufs[h];
                self.stash[..flow.headers].copy_from_slice(&buf[at..at + flow.headers]);
                self.pending = Pending::Hot {
                    at,
                    headers: flow.headers,
                };
                return Some(&mut buf[at..]);
            }
        }
        self.pending = Pending::Fresh;
        Some(&mut self.bufs[self.used.len()][VNET..])
    }

    /// Takes the packet decrypted into the last [`Coalescer::room`]: `Some(length)`, or None if
    /// the datagram gave no packet.
    pub fn commit(&mut self, len: Option<usize>) {
        let pending = std::mem::replace(&mut self.pending, Pending::None);
        let free = self.used.len();
        match (pending, len) {
            (Pending::None, _) | (Pending::Fresh, None) => {}
            (Pending::Fresh, Some(n)) => self.place(free, n),
            (Pending::Hot { at, headers }, len) => {
                let Some(h) = self.hot else { return };
                if let Some(n) = len {
                    let packet = &self.bufs[h][at..at + n];
                    match segment(packet).filter(|s| self.extends(h, packet, s)) {
                        Some(s) => {
                            self.bufs[h][at..at + headers].copy_from_slice(&self.stash[..headers]);
                            self.append(h, &s);
                            return;
                        }
                        None => {
                            let (src, dst) = pair(&mut self.bufs, h, free);
                            dst[VNET..VNET + n].copy_from_slice(&src[at..at + n]);
                        }
                    }
                }
                self.bufs[h][at..at + headers].copy_from_slice(&self.stash[..headers]);
                if let Some(n) = len {
                    self.place(free, n);
                }
            }
        }
    }

    /// Files the packet at the start of the free buffer `free`: appended to an open flow it
    /// extends, or as a buffer of its own.
    fn place(&mut self, free: usize, n: usize) {
        let packet = &self.bufs[free][VNET..VNET + n];
        let Some(s) = segment(packet).filter(|_| self.offload) else {
            if is_tcp(packet) {
                self.close_flows_of(free, n);
            }
            self.used.push(Used { len: n, flow: None });
            return;
        };
        if let Some(g) = (0..self.used.len())
            .rev()
            .find(|&g| self.extends(g, packet, &s))
        {
            let (src, dst) = pair(&mut self.bufs, free, g);
            let end = VNET + self.used[g].len;
            dst[end..end + s.payload].copy_from_slice(&src[VNET + s.headers..VNET + n]);
            self.append(g, &s);
            self.hot = Some(g);
            return;
        }
        let flow = checksum_valid(packet, s.iph, s.v6).then_some(Flow {
            v6: s.v6,
            iph: s.iph,
            headers: s.headers,
            next_seq: s.seq.wrapping_add(s.payload as u32),
            gso: s.payload,
            segments: 1,
            open: !s.psh,
        });
        self.close_flows_of(free, n);
        if flow.is_some() {
            self.hot = Some(free);
        }
        self.used.push(Used { len: n, flow });
    }

    /// Whether `packet` (the segment `s`) extends the open flow in buffer `g`.
    fn extends(&self, g: usize, packet: &[u8], s: &Segment) -> bool {
        let Some(f) = self.used[g].flow.filter(|f| f.open) else {
            return false;
        };
        let first = &self.bufs[g][VNET..VNET + f.headers];
        let (iph, headers) = (f.iph, f.headers);
        s.v6 == f.v6
            && s.iph == iph
            && s.headers == headers
            && s.seq == f.next_seq
            && s.payload <= f.gso
            && self.used[g].len + s.payload <= MAX_PACKET
            && same_flow(first, packet, f.v6, iph)
            && ip_fields_match(first, packet, f.v6)
            // Acknowledgement number, then TCP options.
            && first[iph + 8..iph + 12] == packet[iph + 8..iph + 12]
            && first[iph + 20..headers] == packet[iph + 20..headers]
            && checksum_valid(packet, iph, f.v6)
    }

    fn append(&mut self, g: usize, s: &Segment) {
        let used = &mut self.used[g];
        used.len += s.payload;
        if let Some(f) = used.flow.as_mut() {
            f.next_seq = f.next_seq.wrapping_add(s.payload as u32);
            f.segments += 1;
            if s.psh || s.payload < f.gso {
                f.open = false;
            }
            if s.psh {
                self.bufs[g][VNET + f.iph + 13] |= TCP_PSH;
            }
        }
    }

    /// Closes the open flows that the packet in buffer `free` belongs to, so that nothing of
    /// them is written after it.
    fn close_flows_of(&mut self, free: usize, n: usize) {
        let packet = &self.bufs[free][VNET..VNET + n];
        let Some((v6, iph)) = tcp_header_at(packet) else {
            return;
        };
        for (g, used) in self.used.iter_mut().enumerate() {
            if let Some(f) = used.flow.as_mut()
                && f.open
                && f.v6 == v6
                && f.iph == iph
                && same_flow(&self.bufs[g][VNET..VNET + f.headers], packet, v6, iph)
            {
                f.open = false;
            }
        }
    }

    /// Writes the virtio header and fixes the IP and TCP headers of every merged packet, then
    /// returns the packets to write, in order.
    pub fn finish(&mut self) -> impl Iterator<Item = &[u8]> {
        for (used, buf) in self.used.iter().zip(self.bufs.iter_mut()) {
            let header = match used.flow.filter(|f| f.segments > 1) {
                Some(f) => merged_header(&mut buf[VNET..VNET + used.len], &f),
                None => VirtioNetHdr::default(),
            };
            // The buffer is longer than the header: encoding cannot fail.
            let _ = header.encode(&mut buf[..VNET]);
        }
        let start = if self.offload { 0 } else { VNET };
        self.hot = None;
        self.pending = Pending::None;
        self.used
            .iter()
            .zip(self.bufs.iter())
            .map(move |(used, buf)| &buf[start..VNET + used.len])
    }

    /// Empties the batch once it has been written.
    pub fn clear(&mut self) {
        self.used.clear();
        self.hot = None;
        self.pending = Pending::None;
    }
}

/// Two distinct buffers: `a` to read, `b` to write.
fn pair(bufs: &mut [Vec<u8>], a: usize, b: usize) -> (&[u8], &mut [u8]) {
    if a < b {
        let (lo, hi) = bufs.split_at_mut(b);
        (&lo[a], &mut hi[0])
    } else {
        let (lo, hi) = bufs.split_at_mut(a);
        (&hi[0], &mut lo[b])
    }
}

/// The IP version and header length of a TCP packet, not fragmented.
fn tcp_header_at(p: &[u8]) -> Option<(bool, usize)> {
    match p.first()? >> 4 {
        4 => {
            let iph = usize::from(p[0] & 0x0f) * 4;
            let unfragmented = p.len() >= 20 && p[6] & 0x3f == 0 && p[7] == 0;
            (iph >= 20 && unfragmented && p[9] == TCP).then_some((false, iph))
        }
        6 => (p.len() >= 40 && p[6] == TCP).then_some((true, 40)),
        _ => None,
    }
}

fn is_tcp(p: &[u8]) -> bool {
    tcp_header_at(p).is_some_and(|(_, iph)| p.len() >= iph + 20)
}

/// The packet as a segment that may be merged: TCP with a payload, flags ACK or ACK+PSH, and
/// lengths that agree with the IP header.
fn segment(p: &[u8]) -> Option<Segment> {
    let (v6, iph) = tcp_header_at(p)?;
    let ip_len = if v6 {
        usize::from(u16::from_be_bytes([p[4], p[5]])) + 40
    } else {
        usize::from(u16::from_be_bytes([p[2], p[3]]))
    };
    if ip_len != p.len() || p.len() < iph + 20 {
        return None;
    }
    let headers = iph + usize::from(p[iph + 12] >> 4) * 4;
    let flags = p[iph + 13];
    if headers < iph + 20 || headers >= p.len() || (flags != TCP_ACK && flags != TCP_ACK | TCP_PSH)
    {
        return None;
    }
    Some(Segment {
        v6,
        iph,
        headers,
        payload: p.len() - headers,
        seq: u32::from_be_bytes([p[iph + 4], p[iph + 5], p[iph + 6], p[iph + 7]]),
        psh: flags & TCP_PSH != 0,
    })
}

/// Same addresses and ports.
fn same_flow(a: &[u8], b: &[u8], v6: bool, iph: usize) -> bool {
    let addresses = if v6 { 8..40 } else { 12..20 };
    a.len() >= iph + 4
        && b.len() >= iph + 4
        && a[addresses.clone()] == b[addresses]
        && a[iph..iph + 4] == b[iph..iph + 4]
}

/// The IP fields that must agree for segments to be merged.
fn ip_fields_match(a: &[u8], b: &[u8], v6: bool) -> bool {
    if v6 {
        // Version and traffic class, hop limit.
        a[0] == b[0] && a[1] >> 4 == b[1] >> 4 && a[7] == b[7]
    } else {
        // Type of service, DF and reserved flags, TTL, options.
        let iph = usize::from(a[0] & 0x0f) * 4;
        a[1] == b[1] && a[6] >> 5 == b[6] >> 5 && a[8] == b[8] && a[20..iph] == b[20..iph]
    }
}

/// The one's-complement sum of the TCP pseudo-header for `tcp_len` bytes of segment.
fn pseudo_header_sum(p: &[u8], v6: bool, tcp_len: usize) -> u64 {
    let addresses = if v6 { &p[8..40] } else { &p[12..20] };
    tun_rs::checksum_no_fold(addresses, u64::from(TCP) + tcp_len as u64)
}

fn checksum_valid(p: &[u8], iph: usize, v6: bool) -> bool {
    let sum = pseudo_header_sum(p, v6, p.len() - iph);
    checksum(&p[iph..], sum) == 0xffff
}

/// Makes the merged packet's headers describe all of it and returns its virtio header: TCP GSO
/// with the segment size, the checksum left for the kernel to complete (the pseudo-header sum
/// in the checksum field).
fn merged_header(p: &mut [u8], f: &Flow) -> VirtioNetHdr {
    let len = p.len();
    if f.v6 {
        p[4..6].copy_from_slice(&((len - 40) as u16).to_be_bytes());
    } else {
        p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        p[10..12].fill(0);
        let sum = !checksum(&p[..f.iph], 0);
        p[10..12].copy_from_slice(&sum.to_be_bytes());
    }
    let sum = checksum(&[], pseudo_header_sum(p, f.v6, len - f.iph));
    p[f.iph + 16..f.iph + 18].copy_from_slice(&sum.to_be_bytes());
    VirtioNetHdr {
        flags: NEEDS_CSUM,
        gso_type: if f.v6 { GSO_TCPV6 } else { GSO_TCPV4 },
        hdr_len: f.headers as u16,
        gso_size: f.gso as u16,
        csum_start: f.iph as u16,
        csum_offset: 16,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAYLOAD: usize = 1368;

    /// A TCP segment from 10.0.0.1:4000 (or fd00::1) to 10.0.0.2:5001 (or fd00::2) with
    /// timestamps, a valid checksum and payload bytes that depend on the sequence number.
    fn tcp(v6: bool, seq: u32, payload: usize, flags: u8) -> Vec<u8> {
        let iph = if v6 { 40 } else { 20 };
        let tcph = 32;
        let mut p = vec![0u8; iph + tcph + payload];
        let len = p.len();
        if v6 {
            p[0] = 0x60;
            p[4..6].copy_from_slice(&((len - 40) as u16).to_be_bytes());
            p[6] = TCP;
            p[7] = 64;
            let src: std::net::Ipv6Addr = "fd00::1".parse().expect("address");
            let dst: std::net::Ipv6Addr = "fd00::2".parse().expect("address");
            p[8..24].copy_from_slice(&src.octets());
            p[24..40].copy_from_slice(&dst.octets());
        } else {
            p[0] = 0x45;
            p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
            p[4..6].copy_from_slice(&((seq / PAYLOAD as u32) as u16).to_be_bytes());
            p[6] = 0x40;
            p[8] = 64;
            p[9] = TCP;
            p[12..16].copy_from_slice(&[10, 0, 0, 1]);
            p[16..20].copy_from_slice(&[10, 0, 0, 2]);
            let sum = !checksum(&p[..20], 0);
            p[10..12].copy_from_slice(&sum.to_be_bytes());
        }
        let t = iph;
        p[t..t + 2].copy_from_slice(&4000u16.to_be_bytes());
        p[t + 2..t + 4].copy_from_slice(&5001u16.to_be_bytes());
        p[t + 4..t + 8].copy_from_slice(&seq.to_be_bytes());
        p[t + 8..t + 12].copy_from_slice(&77u32.to_be_bytes());
        p[t + 12] = ((tcph / 4) as u8) << 4;
        p[t + 13] = flags;
        p[t + 14..t + 16].copy_from_slice(&512u16.to_be_bytes());
        // NOP, NOP, timestamps.
        p[t + 20..t + 24].copy_from_slice(&[1, 1, 8, 10]);
        p[t + 24..t + 28].copy_from_slice(&1234u32.to_be_bytes());
        for (i, b) in p[t + tcph..].iter_mut().enumerate() {
            *b = (seq as usize + i) as u8;
        }
        let sum = !checksum(&p[t..], pseudo_header_sum(&p, v6, len - t));
        p[t + 16..t + 18].copy_from_slice(&sum.to_be_bytes());
        p
    }

    fn udp() -> Vec<u8> {
        let mut p = vec![0u8; 60];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&60u16.to_be_bytes());
        p[9] = 17;
        p
    }

    /// Feeds the packets as if each had just been decrypted, then returns what would be written.
    fn run(c: &mut Coalescer, packets: &[Vec<u8>]) -> Vec<Vec<u8>> {
        for p in packets {
            let room = c.room(p.len() + 32).expect("room");
            room[..p.len()].copy_from_slice(p);
            c.commit(Some(p.len()));
        }
        let out = c.finish().map(<[u8]>::to_vec).collect();
        c.clear();
        out
    }

    /// Splits a written packet back into segments as the kernel would, checksums included.
    fn split(written: &[u8]) -> Vec<Vec<u8>> {
        let hdr = VirtioNetHdr::decode(written).expect("virtio header");
        let mut packet = written[VNET..].to_vec();
        if hdr.gso_type == 0 {
            assert_eq!(hdr.flags, 0, "an unmerged packet carries its own checksum");
            return vec![packet];
        }
        assert_eq!(hdr.flags, NEEDS_CSUM);
        let v6 = packet[0] >> 4 == 6;
        let mut out = vec![vec![0u8; 2048]; 64];
        let mut sizes = vec![0; 64];
        let n = tun_rs::gso_split(&mut packet, hdr, &mut out, &mut sizes, 0, v6).expect("split");
        out.truncate(n);
        for (o, size) in out.iter_mut().zip(sizes) {
            o.truncate(size);
        }
        out
    }

    fn ip_id_free(mut p: Vec<u8>) -> Vec<u8> {
        if p[0] >> 4 == 4 {
            p[4..6].fill(0);
            p[10..12].fill(0);
        }
        p
    }

    #[test]
    fn a_train_of_segments_becomes_one_write_that_splits_back_into_the_same_segments() {
        for v6 in [false, true] {
            let mut c = Coalescer::new(true);
            let mut sent: Vec<Vec<u8>> = (0..40)
                .map(|i| tcp(v6, 1000 + i * PAYLOAD as u32, PAYLOAD, TCP_ACK))
                .collect();
            sent.push(tcp(v6, 1000 + 40 * PAYLOAD as u32, 100, TCP_ACK | TCP_PSH));
            let written = run(&mut c, &sent);
            assert_eq!(written.len(), 1, "one write for 41 segments (IPv6: {v6})");
            let back = split(&written[0]);
            assert_eq!(back.len(), sent.len());
            for (i, (b, s)) in back.into_iter().zip(&sent).enumerate() {
                let (b, s) = (ip_id_free(b), ip_id_free(s.clone()));
                assert!(
                    b == s,
                    "segment {i} differs after the round trip (IPv6: {v6})"
                );
                let iph = if v6 { 40 } else { 20 };
                assert!(checksum_valid(&b, iph, v6), "segment {i} checksum");
            }
        }
    }

    #[test]
    fn a_merged_packet_stays_within_64_kib() {
        let mut c = Coalescer::new(true);
        let sent: Vec<Vec<u8>> = (0..100)
            .map(|i| tcp(false, i * PAYLOAD as u32, PAYLOAD, TCP_ACK))
            .collect();
        let written = run(&mut c, &sent);
        assert!(written.len() >= 3, "{} writes", written.len());
        assert!(written.iter().all(|w| w.len() <= BUFFER_LEN));
        let back: Vec<Vec<u8>> = written.iter().flat_map(|w| split(w)).collect();
        assert_eq!(back.len(), 100);
        for (b, s) in back.into_iter().zip(sent) {
            assert!(ip_id_free(b) == ip_id_free(s));
        }
    }

    #[test]
    fn gaps_other_protocols_control_segments_and_bad_checksums_pass_unmerged_in_order() {
        let mut c = Coalescer::new(true);
        let mut bad = tcp(false, 1000 + 2 * PAYLOAD as u32, PAYLOAD, TCP_ACK);
        let last = bad.len() - 1;
        bad[last] ^= 0xff;
        let seq = |i: u32| 1000 + i * PAYLOAD as u32;
        let sent = vec![
            tcp(false, seq(0), PAYLOAD, TCP_ACK),
            tcp(false, seq(1), PAYLOAD, TCP_ACK),
            udp(),
            bad,
            // A gap: segment 3 is missing.
            tcp(false, seq(4), PAYLOAD, TCP_ACK),
            tcp(false, seq(5), PAYLOAD, TCP_ACK),
            // FIN: nothing of the flow may be written after it.
            tcp(false, seq(6), 0, TCP_ACK | 0x01),
            tcp(false, seq(6), PAYLOAD, TCP_ACK),
        ];
        let written = run(&mut c, &sent);
        let segments: Vec<Vec<Vec<u8>>> = written.iter().map(|w| split(w)).collect();
        let counts: Vec<usize> = segments.iter().map(Vec::len).collect();
        assert_eq!(counts, [2, 1, 1, 2, 1, 1]);
        let back: Vec<Vec<u8>> = segments.into_iter().flatten().map(ip_id_free).collect();
        let sent: Vec<Vec<u8>> = sent.into_iter().map(ip_id_free).collect();
        assert!(back == sent, "the packets come out as they went in");
    }

    #[test]
    fn interleaved_flows_each_merge_and_a_lost_decryption_leaves_the_flow_intact() {
        let mut c = Coalescer::new(true);
        let other = |seq: u32| {
            let mut p = tcp(false, seq, PAYLOAD, TCP_ACK);
            // Another source port; fix the checksum.
            p[20..22].copy_from_slice(&4001u16.to_be_bytes());
            p[36..38].fill(0);
            let sum = !checksum(&p[20..], pseudo_header_sum(&p, false, p.len() - 20));
            p[36..38].copy_from_slice(&sum.to_be_bytes());
            p
        };
        let mut sent = Vec::new();
        for round in 0..4u32 {
            for i in 0..5 {
                let seq = (round * 5 + i) * PAYLOAD as u32;
                sent.push(tcp(false, seq, PAYLOAD, TCP_ACK));
            }
            for i in 0..5 {
                sent.push(other((round * 5 + i) * PAYLOAD as u32));
            }
        }
        for (i, p) in sent.iter().enumerate() {
            let room = c.room(p.len() + 32).expect("room");
            room[..p.len()].copy_from_slice(p);
            c.commit(Some(p.len()));
            if i % 7 == 0 {
                // A datagram that decrypts to nothing (a keepalive) scribbles over its room.
                let room = c.room(200).expect("room");
                room[..200].fill(0xee);
                c.commit(None);
            }
        }
        let written: Vec<Vec<u8>> = c.finish().map(<[u8]>::to_vec).collect();
        assert_eq!(written.len(), 2, "one write per flow");
        for (w, port) in written.iter().zip([4000u16, 4001]) {
            let back = split(w);
            let expected: Vec<Vec<u8>> = sent
                .iter()
                .filter(|p| p[20..22] == port.to_be_bytes())
                .cloned()
                .map(ip_id_free)
                .collect();
            assert!(back.into_iter().map(ip_id_free).collect::<Vec<_>>() == expected);
        }
    }

    #[test]
    fn without_offload_every_packet_is_written_alone_without_a_virtio_header() {
        let mut c = Coalescer::new(false);
        let sent: Vec<Vec<u8>> = (0..3)
            .map(|i| tcp(false, i * PAYLOAD as u32, PAYLOAD, TCP_ACK))
            .collect();
        assert!(run(&mut c, &sent) == sent);
    }

    #[test]
    fn a_full_batch_asks_to_be_written() {
        let mut c = Coalescer::new(true);
        for _ in 0..BUFFERS {
            let p = udp();
            let room = c.room(p.len()).expect("room");
            room[..p.len()].copy_from_slice(&p);
            c.commit(Some(p.len()));
        }
        assert!(c.is_full());
        assert!(c.room(60).is_none());
        assert_eq!(c.finish().count(), BUFFERS);
        c.clear();
        assert!(c.room(60).is_some());
    }
}
