//! Receive-side coalescing: the decrypted TCP segments of one flow are merged into one packet of
//! up to 64 KiB, written to the TUN device with a virtio header that describes it as a TCP GSO
//! packet, as the kernel's own GRO would hand it up. A train of 45 segments then costs one
//! write instead of 45. Where the device takes UDP segmentation offload (Linux 6.2 and later),
//! the datagrams of one UDP flow are merged the same way into a UDP GSO packet, which the kernel
//! splits again for a socket that does not ask for UDP GRO.
//!
//! A packet is decrypted straight after the end of the flow the previous packet extended,
//! overlapping the room its own headers take there. When it extends that flow (the usual case in
//! a bulk transfer), its payload is already in place: only the few bytes under its headers are
//! put back. Otherwise it is moved to the next free buffer, or appended to another open flow.
//! Segments are merged on the kernel's GRO rules: same addresses, ports, acknowledgement,
//! window, TCP options (and urgent pointer, which the kernel ignores), IP type of service and
//! TTL (or traffic class, flow label and hop limit), a valid IPv4 header checksum, consecutive
//! sequence numbers, flags ACK or ACK+PSH (PSH ends a flow), no segment longer than the first
//! and a short one last. UDP datagrams are merged on the same rules less those of TCP's own
//! header: same addresses, ports and IP fields, the same length but a short one last, at most
//! [`UDP_MAX_SEGMENTS`] of them. Each segment's checksum is checked before it is merged, since
//! the kernel trusts a packet that asks it to complete the checksum (so UDP without a checksum is
//! never merged). Everything else (ICMP, TCP control segments, fragments, IPv6 extension headers)
//! is written unmerged, in the order it came relative to its flow.

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
const UDP: u8 = 17;
/// The most datagrams one UDP GSO packet may carry: the kernel refuses more from a TUN writer
/// (`UDP_MAX_SEGMENTS`, 64 before Linux 6.10 and 128 since).
const UDP_MAX_SEGMENTS: usize = 64;
const TCP_ACK: u8 = 0x10;
const TCP_PSH: u8 = 0x08;
/// virtio-net header: the packet's checksum is to be completed by whoever consumes it.
const NEEDS_CSUM: u8 = 1;
const GSO_TCPV4: u8 = 1;
const GSO_TCPV6: u8 = 4;
const GSO_UDP_L4: u8 = 5;

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
    /// Whether the device also takes UDP GSO packets.
    udp: bool,
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

/// A TCP or UDP packet that later segments may extend; its headers are those of its first
/// segment.
#[derive(Clone, Copy)]
struct Flow {
    v6: bool,
    iph: usize,
    proto: u8,
    headers: usize,
    /// TCP only.
    next_seq: u32,
    /// The first segment's payload length: the GSO segment size.
    gso: usize,
    segments: usize,
    /// Whether another segment may still be appended (not after PSH or a short segment).
    open: bool,
}

/// A TCP segment or UDP datagram that may be merged.
#[derive(Clone, Copy)]
struct Segment {
    v6: bool,
    iph: usize,
    proto: u8,
    headers: usize,
    payload: usize,
    /// TCP only, as is `psh`.
    seq: u32,
    psh: bool,
}

impl Coalescer {
    /// `offload`: the TUN device was opened with virtio headers (`IFF_VNET_HDR`) and TSO; `udp`:
    /// it takes UDP segmentation offload too.
    pub fn new(offload: bool, udp: bool) -> Self {
        Coalescer {
            bufs: (0..BUFFERS).map(|_| vec![0; BUFFER_LEN]).collect(),
            used: Vec::with_capacity(BUFFERS),
            hot: None,
            pending: Pending::None,
            stash: [0; MAX_HEADERS],
            offload,
            udp: offload && udp,
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
                    match self.segment(packet).filter(|s| self.extends(h, packet, s)) {
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
        let Some(s) = self.segment(packet) else {
            self.close_flows_of(free, n);
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
        let flow = checksum_valid(packet, s.iph, s.v6, s.proto).then_some(Flow {
            v6: s.v6,
            iph: s.iph,
            proto: s.proto,
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

    /// The packet as a segment that may be merged into this device's writes.
    fn segment(&self, p: &[u8]) -> Option<Segment> {
        segment(p).filter(|s| self.offload && (s.proto == TCP || self.udp))
    }

    /// Whether `packet` (the segment `s`) extends the open flow in buffer `g`.
    fn extends(&self, g: usize, packet: &[u8], s: &Segment) -> bool {
        let Some(f) = self.used[g].flow.filter(|f| f.open) else {
            return false;
        };
        let first = &self.bufs[g][VNET..VNET + f.headers];
        let (iph, headers) = (f.iph, f.headers);
        let tcp_fields_match = || {
            f.proto != TCP
                || (s.seq == f.next_seq
                    // Acknowledgement number, header length and reserved bits; window; urgent
                    // pointer and options: all but the flags, the sequence number and the
                    // checksum.
                    && first[iph + 8..iph + 13] == packet[iph + 8..iph + 13]
                    && first[iph + 14..iph + 16] == packet[iph + 14..iph + 16]
                    && first[iph + 18..headers] == packet[iph + 18..headers])
        };
        s.v6 == f.v6
            && s.iph == iph
            && s.proto == f.proto
            && s.headers == headers
            && s.payload <= f.gso
            && self.used[g].len + s.payload <= MAX_PACKET
            && same_flow(first, iph, packet, iph, f.v6)
            && ip_fields_match(first, packet, f.v6)
            && tcp_fields_match()
            && checksum_valid(packet, iph, f.v6, f.proto)
    }

    fn append(&mut self, g: usize, s: &Segment) {
        let used = &mut self.used[g];
        used.len += s.payload;
        if let Some(f) = used.flow.as_mut() {
            f.next_seq = f.next_seq.wrapping_add(s.payload as u32);
            f.segments += 1;
            if s.psh || s.payload < f.gso || (f.proto == UDP && f.segments == UDP_MAX_SEGMENTS) {
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
        let Some((v6, iph, proto)) = transport_at(packet) else {
            return;
        };
        for (g, used) in self.used.iter_mut().enumerate() {
            if let Some(f) = used.flow.as_mut()
                && f.open
                && f.v6 == v6
                && f.proto == proto
                && same_flow(
                    &self.bufs[g][VNET..VNET + f.headers],
                    f.iph,
                    packet,
                    iph,
                    v6,
                )
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

/// The IP version, header length and protocol of a TCP or UDP packet, not fragmented.
fn transport_at(p: &[u8]) -> Option<(bool, usize, u8)> {
    match p.first()? >> 4 {
        4 => {
            let iph = usize::from(p[0] & 0x0f) * 4;
            let unfragmented = p.len() >= 20 && p[6] & 0x3f == 0 && p[7] == 0;
            (iph >= 20 && unfragmented && (p[9] == TCP || p[9] == UDP)).then(|| (false, iph, p[9]))
        }
        6 => (p.len() >= 40 && (p[6] == TCP || p[6] == UDP)).then(|| (true, 40, p[6])),
        _ => None,
    }
}

/// The packet as a segment that may be merged, with lengths that agree with the IP header (and
/// an IPv4 header checksum that is valid, since the merged packet gets a new one): TCP with a
/// payload and flags ACK or ACK+PSH, or UDP with a payload and a checksum.
fn segment(p: &[u8]) -> Option<Segment> {
    let (v6, iph, proto) = transport_at(p)?;
    let ip_len = if v6 {
        usize::from(u16::from_be_bytes([p[4], p[5]])) + 40
    } else {
        usize::from(u16::from_be_bytes([p[2], p[3]]))
    };
    if ip_len != p.len() || (!v6 && (p.len() < iph || checksum(&p[..iph], 0) != 0xffff)) {
        return None;
    }
    if proto == UDP {
        let headers = iph + 8;
        let udp_len = p.get(iph + 4..iph + 6)?;
        let checksum = p.get(iph + 6..iph + 8)?;
        let agrees = usize::from(u16::from_be_bytes([udp_len[0], udp_len[1]])) == p.len() - iph;
        return (agrees && headers < p.len() && checksum != [0, 0]).then_some(Segment {
            v6,
            iph,
            proto,
            headers,
            payload: p.len() - headers,
            seq: 0,
            psh: false,
        });
    }
    if p.len() < iph + 20 {
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
        proto,
        headers,
        payload: p.len() - headers,
        seq: u32::from_be_bytes([p[iph + 4], p[iph + 5], p[iph + 6], p[iph + 7]]),
        psh: flags & TCP_PSH != 0,
    })
}

/// Same addresses and ports, for packets whose transport headers start at `a_iph` and `b_iph`
/// (IPv4 options may differ within a flow).
fn same_flow(a: &[u8], a_iph: usize, b: &[u8], b_iph: usize, v6: bool) -> bool {
    let addresses = if v6 { 8..40 } else { 12..20 };
    a.len() >= a_iph + 4
        && b.len() >= b_iph + 4
        && a[addresses.clone()] == b[addresses]
        && a[a_iph..a_iph + 4] == b[b_iph..b_iph + 4]
}

/// The IP fields that must agree for segments to be merged.
fn ip_fields_match(a: &[u8], b: &[u8], v6: bool) -> bool {
    if v6 {
        // Version, traffic class and flow label; hop limit.
        a[..4] == b[..4] && a[7] == b[7]
    } else {
        // Type of service, DF and reserved flags, TTL, options.
        let iph = usize::from(a[0] & 0x0f) * 4;
        a[1] == b[1] && a[6] >> 5 == b[6] >> 5 && a[8] == b[8] && a[20..iph] == b[20..iph]
    }
}

/// The one's-complement sum of the pseudo-header of `proto` for `len` bytes of segment.
fn pseudo_header_sum(p: &[u8], v6: bool, proto: u8, len: usize) -> u64 {
    let addresses = if v6 { &p[8..40] } else { &p[12..20] };
    tun_rs::checksum_no_fold(addresses, u64::from(proto) + len as u64)
}

fn checksum_valid(p: &[u8], iph: usize, v6: bool, proto: u8) -> bool {
    let sum = pseudo_header_sum(p, v6, proto, p.len() - iph);
    checksum(&p[iph..], sum) == 0xffff
}

/// Makes the merged packet's headers describe all of it and returns its virtio header: TCP or
/// UDP GSO with the segment size, the checksum left for the kernel to complete (the
/// pseudo-header sum in the checksum field).
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
    let l4_len = len - f.iph;
    let (gso_type, csum_offset) = match (f.proto, f.v6) {
        (UDP, _) => {
            p[f.iph + 4..f.iph + 6].copy_from_slice(&(l4_len as u16).to_be_bytes());
            (GSO_UDP_L4, 6)
        }
        (_, true) => (GSO_TCPV6, 16),
        (_, false) => (GSO_TCPV4, 16),
    };
    let sum = checksum(&[], pseudo_header_sum(p, f.v6, f.proto, l4_len));
    let at = f.iph + usize::from(csum_offset);
    p[at..at + 2].copy_from_slice(&sum.to_be_bytes());
    VirtioNetHdr {
        flags: NEEDS_CSUM,
        gso_type,
        hdr_len: f.headers as u16,
        gso_size: f.gso as u16,
        csum_start: f.iph as u16,
        csum_offset,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAYLOAD: usize = 1368;

    /// An IP packet of `proto` from 10.0.0.1 (or fd00::1) to 10.0.0.2 (or fd00::2) with
    /// `l4_len` zero bytes after its header, IPv4 identification `id` and a valid IPv4 header
    /// checksum; and its header's length.
    fn ip_packet(v6: bool, proto: u8, l4_len: usize, id: u32) -> (Vec<u8>, usize) {
        let iph = if v6 { 40 } else { 20 };
        let mut p = vec![0u8; iph + l4_len];
        let len = p.len();
        if v6 {
            p[0] = 0x60;
            p[4..6].copy_from_slice(&((len - 40) as u16).to_be_bytes());
            p[6] = proto;
            p[7] = 64;
            let src: std::net::Ipv6Addr = "fd00::1".parse().expect("address");
            let dst: std::net::Ipv6Addr = "fd00::2".parse().expect("address");
            p[8..24].copy_from_slice(&src.octets());
            p[24..40].copy_from_slice(&dst.octets());
        } else {
            p[0] = 0x45;
            p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
            p[4..6].copy_from_slice(&(id as u16).to_be_bytes());
            p[6] = 0x40;
            p[8] = 64;
            p[9] = proto;
            p[12..16].copy_from_slice(&[10, 0, 0, 1]);
            p[16..20].copy_from_slice(&[10, 0, 0, 2]);
            let sum = !checksum(&p[..20], 0);
            p[10..12].copy_from_slice(&sum.to_be_bytes());
        }
        (p, iph)
    }

    /// A TCP segment from 10.0.0.1:4000 (or fd00::1) to 10.0.0.2:5001 (or fd00::2) with
    /// timestamps, a valid checksum and payload bytes that depend on the sequence number.
    fn tcp(v6: bool, seq: u32, payload: usize, flags: u8) -> Vec<u8> {
        let tcph = 32;
        let (mut p, iph) = ip_packet(v6, TCP, tcph + payload, seq / PAYLOAD as u32);
        let len = p.len();
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
        let sum = !checksum(&p[t..], pseudo_header_sum(&p, v6, TCP, len - t));
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

    /// UDP datagram `n` of `payload` bytes from port `sport` of 10.0.0.1 (or fd00::1) to
    /// 10.0.0.2:5001 (or fd00::2), with a valid checksum and bytes that depend on `n`.
    fn udp_datagram(v6: bool, sport: u16, n: u32, payload: usize) -> Vec<u8> {
        let (mut p, iph) = ip_packet(v6, UDP, 8 + payload, n);
        let len = p.len();
        p[iph..iph + 2].copy_from_slice(&sport.to_be_bytes());
        p[iph + 2..iph + 4].copy_from_slice(&5001u16.to_be_bytes());
        p[iph + 4..iph + 6].copy_from_slice(&((len - iph) as u16).to_be_bytes());
        for (i, b) in p[iph + 8..].iter_mut().enumerate() {
            *b = (n as usize * 7 + i) as u8;
        }
        let sum = !checksum(&p[iph..], pseudo_header_sum(&p, v6, UDP, len - iph));
        p[iph + 6..iph + 8].copy_from_slice(&sum.to_be_bytes());
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
            let mut c = Coalescer::new(true, true);
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
                assert!(checksum_valid(&b, iph, v6, TCP), "segment {i} checksum");
            }
        }
    }

    #[test]
    fn a_merged_packet_stays_within_64_kib() {
        let mut c = Coalescer::new(true, true);
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
        let mut c = Coalescer::new(true, true);
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
    fn a_segment_with_another_window_or_a_bad_ip_header_checksum_starts_a_new_write() {
        let seq = |i: u32| i * PAYLOAD as u32;
        let wider = |i: u32| {
            let mut p = tcp(false, seq(i), PAYLOAD, TCP_ACK);
            p[34..36].copy_from_slice(&1024u16.to_be_bytes());
            p[36..38].fill(0);
            let sum = !checksum(&p[20..], pseudo_header_sum(&p, false, TCP, PAYLOAD + 32));
            p[36..38].copy_from_slice(&sum.to_be_bytes());
            p
        };
        let mut header_checksum = wider(3);
        header_checksum[10] ^= 0x01;
        let sent = vec![
            tcp(false, seq(0), PAYLOAD, TCP_ACK),
            wider(1),
            wider(2),
            header_checksum,
        ];
        let mut c = Coalescer::new(true, true);
        let written = run(&mut c, &sent);
        let counts: Vec<usize> = written.iter().map(|w| split(w).len()).collect();
        assert_eq!(counts, [1, 2, 1]);
    }

    #[test]
    fn a_packet_of_the_flow_with_ip_options_keeps_its_place() {
        let seq = |i: u32| i * PAYLOAD as u32;
        let plain = tcp(false, seq(1), PAYLOAD, TCP_ACK);
        // The same segment with 4 bytes of IPv4 options (NOP, NOP, NOP, end).
        let mut options = [&plain[..20], &[1, 1, 1, 0], &plain[20..]].concat();
        options[0] = 0x46;
        options[2..4].copy_from_slice(&(plain.len() as u16 + 4).to_be_bytes());
        options[10..12].fill(0);
        let sum = !checksum(&options[..24], 0);
        options[10..12].copy_from_slice(&sum.to_be_bytes());
        let sent = vec![tcp(false, seq(0), PAYLOAD, TCP_ACK), options, plain];
        let mut c = Coalescer::new(true, true);
        let written = run(&mut c, &sent);
        let back: Vec<Vec<u8>> = written
            .iter()
            .flat_map(|w| split(w))
            .map(ip_id_free)
            .collect();
        let sent: Vec<Vec<u8>> = sent.into_iter().map(ip_id_free).collect();
        assert!(
            back == sent,
            "the flow's packets come out in the order they came"
        );
    }

    #[test]
    fn interleaved_flows_each_merge_and_a_lost_decryption_leaves_the_flow_intact() {
        let mut c = Coalescer::new(true, true);
        let other = |seq: u32| {
            let mut p = tcp(false, seq, PAYLOAD, TCP_ACK);
            // Another source port; fix the checksum.
            p[20..22].copy_from_slice(&4001u16.to_be_bytes());
            p[36..38].fill(0);
            let sum = !checksum(&p[20..], pseudo_header_sum(&p, false, TCP, p.len() - 20));
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

    /// Splits every write back and checks that the datagrams come out as they went in.
    fn assert_round_trip(written: &[Vec<u8>], sent: &[Vec<u8>]) {
        let back: Vec<Vec<u8>> = written
            .iter()
            .flat_map(|w| split(w))
            .map(ip_id_free)
            .collect();
        let sent: Vec<Vec<u8>> = sent.iter().cloned().map(ip_id_free).collect();
        assert_eq!(back.len(), sent.len(), "datagrams after the round trip");
        for (i, (b, s)) in back.iter().zip(&sent).enumerate() {
            assert!(b == s, "datagram {i} differs after the round trip");
            let (v6, iph) = if b[0] >> 4 == 6 {
                (true, 40)
            } else {
                (false, 20)
            };
            assert!(checksum_valid(b, iph, v6, UDP), "datagram {i} checksum");
        }
    }

    #[test]
    fn a_train_of_udp_datagrams_becomes_one_write_that_splits_back_into_the_same_datagrams() {
        for v6 in [false, true] {
            let mut c = Coalescer::new(true, true);
            let mut sent: Vec<Vec<u8>> = (0..40).map(|n| udp_datagram(v6, 4000, n, 1200)).collect();
            sent.push(udp_datagram(v6, 4000, 40, 300));
            let written = run(&mut c, &sent);
            assert_eq!(written.len(), 1, "one write for 41 datagrams (IPv6: {v6})");
            let hdr = VirtioNetHdr::decode(&written[0]).expect("virtio header");
            assert_eq!((hdr.gso_type, hdr.gso_size), (GSO_UDP_L4, 1200));
            assert_round_trip(&written, &sent);
        }
    }

    #[test]
    fn a_udp_write_carries_at_most_the_datagrams_the_kernel_takes() {
        let mut c = Coalescer::new(true, true);
        let sent: Vec<Vec<u8>> = (0..150)
            .map(|n| udp_datagram(false, 4000, n, 100))
            .collect();
        let written = run(&mut c, &sent);
        let counts: Vec<usize> = written.iter().map(|w| split(w).len()).collect();
        assert_eq!(counts, [64, 64, 22]);
        assert_round_trip(&written, &sent);
    }

    #[test]
    fn udp_of_other_flows_sizes_or_bad_checksums_stays_apart_in_order() {
        let mut c = Coalescer::new(true, true);
        let mut bad = udp_datagram(false, 4000, 2, 1200);
        let last = bad.len() - 1;
        bad[last] ^= 0xff;
        let mut no_checksum = udp_datagram(false, 4000, 5, 1200);
        no_checksum[26..28].fill(0);
        let sent = vec![
            udp_datagram(false, 4000, 0, 1200),
            udp_datagram(false, 4000, 1, 1200),
            bad,
            udp_datagram(false, 4000, 3, 1200),
            udp_datagram(false, 4001, 0, 1200),
            udp_datagram(false, 4000, 4, 1200),
            no_checksum,
            // Longer than the flow's datagrams: it starts a flow of its own.
            udp_datagram(false, 4000, 6, 1300),
            udp_datagram(false, 4000, 7, 1300),
        ];
        let written = run(&mut c, &sent);
        let counts: Vec<usize> = written.iter().map(|w| split(w).len()).collect();
        assert_eq!(counts, [2, 1, 2, 1, 1, 2]);
        let back: Vec<Vec<u8>> = written.iter().flat_map(|w| split(w)).collect();
        let order: Vec<usize> = back
            .iter()
            .map(|b| {
                sent.iter()
                    .position(|s| s == b)
                    .expect("a datagram that was sent")
            })
            .collect();
        assert_eq!(order, [0, 1, 2, 3, 5, 4, 6, 7, 8], "each flow in its order");
    }

    #[test]
    fn without_udp_offload_udp_is_written_alone_and_tcp_still_merged() {
        let mut c = Coalescer::new(true, false);
        let mut sent: Vec<Vec<u8>> = (0..3).map(|n| udp_datagram(false, 4000, n, 1200)).collect();
        sent.extend((0..3).map(|i| tcp(false, i * PAYLOAD as u32, PAYLOAD, TCP_ACK)));
        let written = run(&mut c, &sent);
        let counts: Vec<usize> = written.iter().map(|w| split(w).len()).collect();
        assert_eq!(counts, [1, 1, 1, 3]);
    }

    #[test]
    fn without_offload_every_packet_is_written_alone_without_a_virtio_header() {
        let mut c = Coalescer::new(false, false);
        let sent: Vec<Vec<u8>> = (0..3)
            .map(|i| tcp(false, i * PAYLOAD as u32, PAYLOAD, TCP_ACK))
            .collect();
        assert!(run(&mut c, &sent) == sent);
    }

    #[test]
    fn a_full_batch_asks_to_be_written() {
        let mut c = Coalescer::new(true, true);
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
