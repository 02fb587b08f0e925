//! The data plane: the TUN device, the UDP sockets, and the loop that runs the core.
//!
//! One task owns the core and every buffer. Packets move in batches: one TUN read returns up to
//! 64 KiB of TCP segments (TUN offload), which are encrypted into one contiguous buffer and sent
//! with one UDP GSO system call per destination; one `recvmmsg` returns many (GRO-coalesced)
//! datagrams, whose decrypted packets are coalesced again before they are written to the TUN
//! device. Buffers are allocated once at start.

use crate::control::Request;
use crate::status::{self, OverlayPlan, Status, XmppInfo};
use anyhow::Context;
use ipnet::IpNet;
use ipop_core::Engine;
use ipop_core::osn::{DeviceId, OsnEvent, Signal};
use ipop_core::turn::StreamFramer;
use quinn_udp::{RecvMeta, Transmit, UdpSockRef, UdpSocketState};
use std::collections::HashMap;
use std::io::{self, IoSliceMut};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::mpsc;
use tun_rs::{AsyncDevice, GROTable, IDEAL_BATCH_SIZE, VIRTIO_NET_HDR_LEN};

/// The largest IP packet a TUN read can return with offload (a 64 KiB GSO packet).
const TUN_READ_MAX: usize = VIRTIO_NET_HDR_LEN + 65535;
/// Room around each encrypted datagram: WireGuard's 32-byte overhead, and the TURN framing of a
/// relayed path.
const WG_OVERHEAD: usize = 32 + ipop_core::turn::MAX_OVERHEAD;
/// Datagrams per `recvmmsg`; each slot holds a GRO-coalesced train of up to 64 KiB.
const UDP_SLOTS: usize = 8;
const UDP_SLOT_SIZE: usize = 65535;
/// The most bytes one UDP GSO send may carry: the largest UDP payload of an IPv4 datagram.
const GSO_MAX_BYTES: usize = 65535 - 20 - 8;
/// Reads from one source per wake-up before the loop looks at the others.
const MAX_READS_PER_WAKE: usize = 16;

struct Udp {
    socket: UdpSocket,
    state: UdpSocketState,
}

impl Udp {
    fn bind(addr: SocketAddr) -> io::Result<Udp> {
        let domain = socket2::Domain::for_address(addr);
        let socket =
            socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
        if addr.is_ipv6() {
            socket.set_only_v6(true)?;
        }
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        let state = UdpSocketState::new(UdpSockRef::from(&socket))?;
        // Bigger kernel buffers absorb bursts while the loop is busy with the other direction.
        let _ = state.set_send_buffer_size(UdpSockRef::from(&socket), 4 << 20);
        let _ = state.set_recv_buffer_size(UdpSockRef::from(&socket), 4 << 20);
        let socket = UdpSocket::from_std(socket.into())?;
        Ok(Udp { socket, state })
    }

    /// Sends, waiting for room in the socket buffer if it is full. Returns whether the kernel
    /// took the datagrams.
    async fn send(&self, t: &Transmit<'_>) -> bool {
        let r = self
            .socket
            .async_io(Interest::WRITABLE, || {
                self.state.try_send(UdpSockRef::from(&self.socket), t)
            })
            .await;
        if let Err(e) = &r {
            tracing::debug!(destination = %t.destination, "send failed: {e}");
        }
        r.is_ok()
    }
}

/// The data plane's side of the social network binding: events in, signals out. The loop never
/// waits on the binding: signals go into an unbounded queue.
pub struct OsnChannel {
    pub events: mpsc::UnboundedReceiver<OsnEvent>,
    pub signals: mpsc::UnboundedSender<(DeviceId, Signal)>,
}

/// Reads the XMPP session's state for `ipop status`.
pub type XmppInfoFn = Box<dyn Fn() -> XmppInfo + Send>;

/// Everything the data plane needs to run.
pub struct Dataplane {
    engine: Engine,
    tun: AsyncDevice,
    udp4: Udp,
    udp6: Option<Udp>,
    interface: String,
    plans: Vec<OverlayPlan>,
    xmpp_info: Option<XmppInfoFn>,
    listen_port: u16,
    started: Instant,
    bufs: Buffers,
    io_errors: IoErrors,
    streams: Streams,
}

/// Packets lost to system call errors, counted beside the core's drops.
#[derive(Default)]
struct IoErrors {
    tun_read: u64,
    tun_write: u64,
    udp_send: u64,
    udp_receive: u64,
}

/// Every packet buffer, allocated once.
struct Buffers {
    /// A raw TUN read: virtio header plus a GSO packet.
    tun_read: Vec<u8>,
    /// The segments of one TUN read.
    segments: Vec<Vec<u8>>,
    sizes: Vec<usize>,
    /// Encrypted datagrams, back to back, ready for UDP GSO.
    wire: Vec<u8>,
    /// Received datagrams (GRO trains), one slot per `recvmmsg` message.
    udp_read: Vec<u8>,
    metas: Vec<RecvMeta>,
    /// Decrypted packets waiting for the TUN device, each after room for a virtio header.
    to_tun: Vec<Vec<u8>>,
    gro: GROTable,
}

impl Buffers {
    fn new(mtu: usize) -> Self {
        let segment = mtu + VIRTIO_NET_HDR_LEN + 64;
        let to_tun_slots = UDP_SLOTS * 64;
        Buffers {
            tun_read: vec![0; TUN_READ_MAX],
            segments: (0..IDEAL_BATCH_SIZE).map(|_| vec![0; segment]).collect(),
            sizes: vec![0; IDEAL_BATCH_SIZE],
            wire: vec![0; IDEAL_BATCH_SIZE * (segment + WG_OVERHEAD)],
            udp_read: vec![0; UDP_SLOTS * UDP_SLOT_SIZE],
            metas: vec![RecvMeta::default(); UDP_SLOTS],
            to_tun: (0..to_tun_slots)
                .map(|_| Vec::with_capacity(segment))
                .collect(),
            gro: GROTable::default(),
        }
    }
}

impl Dataplane {
    /// Creates the TUN device and binds the UDP sockets.
    pub fn new(
        engine: Engine,
        plans: Vec<OverlayPlan>,
        interface: &str,
        addresses: &[IpNet],
        routes: &[IpNet],
        mtu: u16,
        listen_port: u16,
    ) -> anyhow::Result<Self> {
        let udp4 = Udp::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, listen_port)))
            .with_context(|| format!("cannot bind UDP port {listen_port} on IPv4"))?;
        let port = udp4.socket.local_addr()?.port();
        let udp6 = match Udp::bind(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port))) {
            Ok(u) => Some(u),
            Err(e) => {
                tracing::warn!(
                    "no IPv6 socket on UDP port {port}: {e}; peers are reached over IPv4 only"
                );
                None
            }
        };
        let tun = crate::device::create(interface, addresses, routes, mtu)?;
        Ok(Dataplane {
            engine,
            tun,
            udp4,
            udp6,
            interface: interface.to_owned(),
            plans,
            xmpp_info: None,
            listen_port: port,
            started: Instant::now(),
            bufs: Buffers::new(mtu.into()),
            io_errors: IoErrors::default(),
            streams: Streams::new(),
        })
    }

    /// Where `ipop status` reads the XMPP session's state.
    pub fn set_xmpp_info(&mut self, f: XmppInfoFn) {
        self.xmpp_info = Some(f);
    }

    pub fn listen_port(&self) -> u16 {
        self.listen_port
    }

    /// Offers the host's addresses (but not the tunnel's own) as ICE host candidates.
    pub fn discover_host_candidates(&mut self) {
        let hosts = crate::device::host_addresses(&self.interface)
            .into_iter()
            .filter(|ip| ip.is_ipv4() || self.udp6.is_some())
            .map(|ip| SocketAddr::new(ip, self.listen_port))
            .collect::<Vec<_>>();
        tracing::debug!(?hosts, "host candidates");
        self.engine.set_host_candidates(hosts);
    }

    /// Runs until `shutdown` resolves.
    pub async fn run(
        mut self,
        mut requests: mpsc::Receiver<Request>,
        mut osn: Option<OsnChannel>,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        loop {
            self.engine.handle_timeout(Instant::now());
            for server in self.engine.stream_servers() {
                self.streams.connect(server);
            }
            self.flush_control().await;
            while let Some(signal) = self.engine.poll_signal() {
                if let Some(o) = &osn {
                    let _ = o.signals.send(signal);
                }
            }
            let deadline = self
                .engine
                .poll_timeout()
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
            let udp6_readable = async {
                match &self.udp6 {
                    Some(u) => u.socket.readable().await,
                    None => std::future::pending().await,
                }
            };
            let osn_event = async {
                match osn.as_mut() {
                    Some(o) => o.events.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = &mut shutdown => {
                    // Give TURN allocations back; their answers are not awaited.
                    self.engine.release(Instant::now());
                    self.flush_control().await;
                    return;
                }
                r = self.tun.readable() => {
                    if let Err(e) = r {
                        tracing::error!("TUN device failed: {e}");
                        return;
                    }
                    self.tun_to_network().await;
                }
                r = self.udp4.socket.readable() => {
                    if r.is_ok() {
                        self.network_to_tun(false).await;
                    }
                }
                r = udp6_readable => {
                    if r.is_ok() {
                        self.network_to_tun(true).await;
                    }
                }
                event = osn_event => match event {
                    Some(event) => self.engine.handle_osn(Instant::now(), event),
                    None => {
                        tracing::warn!("the social network binding stopped; links stay up");
                        osn = None;
                    }
                },
                Some((server, frame)) = self.streams.incoming.recv() => {
                    self.handle_stream_frame(server, &frame).await;
                }
                Some(req) = requests.recv() => {
                    let answer = self.answer(&req.command);
                    let _ = req.reply.send(answer);
                }
                _ = tokio::time::sleep_until(deadline.into()) => {}
            }
        }
    }

    /// A frame from the TCP connection to a TURN server: relayed traffic or an answer.
    async fn handle_stream_frame(&mut self, server: SocketAddr, frame: &[u8]) {
        let target = &mut self.bufs.to_tun[0];
        target.resize(VIRTIO_NET_HDR_LEN + frame.len(), 0);
        let got = self.engine.handle_stream(
            Instant::now(),
            server,
            frame,
            &mut target[VIRTIO_NET_HDR_LEN..],
        );
        if let Some(len) = got {
            self.bufs.to_tun[0].truncate(VIRTIO_NET_HDR_LEN + len);
            self.write_tun(1).await;
        }
        self.flush_control().await;
    }

    /// Sends the control datagrams the core queued (handshakes, keepalives).
    async fn flush_control(&mut self) {
        while let Some(t) = self.engine.poll_transmit() {
            if t.stream {
                self.streams.send(t.destination, t.payload);
                continue;
            }
            let transmit = Transmit {
                destination: t.destination,
                ecn: None,
                contents: &t.payload,
                segment_size: None,
                src_ip: None,
            };
            let sent = match self.socket_for(t.destination) {
                Some(udp) => udp.send(&transmit).await,
                None => false,
            };
            if !sent {
                self.io_errors.udp_send += 1;
            }
        }
    }

    fn socket_for(&self, dst: SocketAddr) -> Option<&Udp> {
        if dst.is_ipv4() {
            Some(&self.udp4)
        } else {
            self.udp6.as_ref()
        }
    }

    /// TUN → network: reads packets, encrypts them back to back into `wire`, and sends each run
    /// of equal-sized datagrams to one destination with a single GSO send.
    async fn tun_to_network(&mut self) {
        for _ in 0..MAX_READS_PER_WAKE {
            let b = &mut self.bufs;
            let n =
                match self
                    .tun
                    .try_recv_multiple(&mut b.tun_read, &mut b.segments, &mut b.sizes, 0)
                {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                    Err(e) => {
                        tracing::debug!("TUN read: {e}");
                        self.io_errors.tun_read += 1;
                        return;
                    }
                };
            let max_segments = self.udp4.state.max_gso_segments();
            let mut run: Option<Run> = None;
            let mut end = 0;
            for i in 0..n {
                let b = &mut self.bufs;
                let packet = &b.segments[i][..b.sizes[i]];
                let room = packet.len() + WG_OVERHEAD;
                let Some(out) = b.wire.get_mut(end..end + room.max(148)) else {
                    break;
                };
                let Some((dst, len, stream)) = self.engine.handle_tun(packet, out) else {
                    continue;
                };
                if stream {
                    let frame = out[..len].to_vec();
                    self.streams.send(dst, frame);
                    continue;
                }
                match &mut run {
                    Some(r) if r.extends(dst, len, max_segments) => r.push(len),
                    _ => {
                        if let Some(r) = run.take() {
                            self.send_run(&r).await;
                        }
                        run = Some(Run::new(dst, end, len));
                    }
                }
                end += len;
            }
            if let Some(r) = run {
                self.send_run(&r).await;
            }
        }
    }

    async fn send_run(&mut self, r: &Run) {
        let Some(udp) = self.socket_for(r.dst) else {
            self.io_errors.udp_send += r.count as u64;
            return;
        };
        let transmit = Transmit {
            destination: r.dst,
            ecn: None,
            contents: &self.bufs.wire[r.start..r.end],
            segment_size: (r.count > 1).then_some(r.segment),
            src_ip: None,
        };
        if !udp.send(&transmit).await {
            self.io_errors.udp_send += r.count as u64;
        }
    }

    /// Network → TUN: receives a batch of datagrams, decrypts them, and writes the packets to
    /// the TUN device, coalescing TCP segments again where offload allows.
    async fn network_to_tun(&mut self, v6: bool) {
        for _ in 0..MAX_READS_PER_WAKE {
            let udp = if v6 {
                match &self.udp6 {
                    Some(u) => u,
                    None => return,
                }
            } else {
                &self.udp4
            };
            let b = &mut self.bufs;
            let received = {
                let mut chunks = b.udp_read.chunks_mut(UDP_SLOT_SIZE);
                let mut iovs: [IoSliceMut<'_>; UDP_SLOTS] =
                    std::array::from_fn(|_| IoSliceMut::new(chunks.next().unwrap_or_default()));
                udp.socket.try_io(Interest::READABLE, || {
                    udp.state
                        .recv(UdpSockRef::from(&udp.socket), &mut iovs, &mut b.metas)
                })
            };
            let count = match received {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    tracing::debug!("UDP receive: {e}");
                    self.io_errors.udp_receive += 1;
                    return;
                }
            };
            let mut ready = 0;
            let now = Instant::now();
            for slot in 0..count {
                let meta = self.bufs.metas[slot];
                let stride = meta.stride.max(1);
                let local = SocketAddr::new(
                    meta.dst_ip.unwrap_or(if v6 {
                        Ipv6Addr::UNSPECIFIED.into()
                    } else {
                        Ipv4Addr::UNSPECIFIED.into()
                    }),
                    self.listen_port,
                );
                let base = slot * UDP_SLOT_SIZE;
                for offset in (0..meta.len).step_by(stride) {
                    if ready == self.bufs.to_tun.len() {
                        self.write_tun(ready).await;
                        ready = 0;
                    }
                    let b = &mut self.bufs;
                    let datagram = &b.udp_read[base + offset..base + meta.len.min(offset + stride)];
                    let target = &mut b.to_tun[ready];
                    target.resize(VIRTIO_NET_HDR_LEN + datagram.len(), 0);
                    if let Some(len) = self.engine.handle_udp(
                        now,
                        local,
                        meta.addr,
                        datagram,
                        &mut target[VIRTIO_NET_HDR_LEN..],
                    ) {
                        target.truncate(VIRTIO_NET_HDR_LEN + len);
                        ready += 1;
                    }
                }
            }
            self.write_tun(ready).await;
            self.flush_control().await;
        }
    }

    /// Writes the first `ready` decrypted packets to the TUN device.
    async fn write_tun(&mut self, ready: usize) {
        if ready == 0 {
            return;
        }
        let b = &mut self.bufs;
        if let Err(e) = self
            .tun
            .send_multiple(&mut b.gro, &mut b.to_tun[..ready], VIRTIO_NET_HDR_LEN)
            .await
        {
            tracing::debug!("TUN write: {e}");
            self.io_errors.tun_write += ready as u64;
        }
    }

    fn drops(&self) -> std::collections::BTreeMap<String, u64> {
        let mut drops = status::drops(&self.engine);
        let e = &self.io_errors;
        for (name, n) in [
            ("tun_read_failed", e.tun_read),
            ("tun_write_failed", e.tun_write),
            ("udp_send_failed", e.udp_send),
            ("udp_receive_failed", e.udp_receive),
        ] {
            drops.insert(name.to_owned(), n);
        }
        drops
    }

    fn answer(&self, command: &str) -> String {
        match command {
            "status" => {
                let key = self.engine.node().public_key();
                let s = Status {
                    interface: self.interface.clone(),
                    public_key: key.to_string(),
                    fingerprint: key.fingerprint(),
                    listen_port: self.listen_port,
                    uptime_s: self.started.elapsed().as_secs_f64().round(),
                    xmpp: self.xmpp_info.as_ref().map(|f| f()),
                    overlays: status::overlays(&self.engine, &self.plans),
                    ice_servers: status::ice_servers(&self.engine),
                    drops: self.drops(),
                };
                serde_json::to_string(&s).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
            }
            other if other.starts_with("group ") => {
                serde_json::json!({ "error": "group commands need an [xmpp] account in the config" })
                    .to_string()
            }
            other => serde_json::json!({ "error": format!("unknown command {other:?}") }).to_string(),
        }
    }
}

/// A run of datagrams to one destination, back to back in `wire`, all `segment` bytes long but
/// the last, which may be shorter: the shape that one UDP GSO send takes.
struct Run {
    dst: SocketAddr,
    start: usize,
    end: usize,
    segment: usize,
    count: usize,
    closed: bool,
}

impl Run {
    fn new(dst: SocketAddr, start: usize, len: usize) -> Self {
        Run {
            dst,
            start,
            end: start + len,
            segment: len,
            count: 1,
            closed: false,
        }
    }

    fn extends(&self, dst: SocketAddr, len: usize, max_segments: usize) -> bool {
        dst == self.dst
            && !self.closed
            && len <= self.segment
            && self.count < max_segments
            && self.end - self.start + len <= GSO_MAX_BYTES
    }

    fn push(&mut self, len: usize) {
        self.end += len;
        self.count += 1;
        self.closed = len < self.segment;
    }
}

/// TCP connections to TURN servers reached over TCP (where UDP is blocked): one task each,
/// framed with the core's [`StreamFramer`].
struct Streams {
    outgoing: HashMap<SocketAddr, mpsc::UnboundedSender<Vec<u8>>>,
    incoming: mpsc::UnboundedReceiver<(SocketAddr, Vec<u8>)>,
    to_plane: mpsc::UnboundedSender<(SocketAddr, Vec<u8>)>,
}

/// How long connecting to a TURN server over TCP may take.
const STREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

impl Streams {
    fn new() -> Self {
        let (to_plane, incoming) = mpsc::unbounded_channel();
        Streams {
            outgoing: HashMap::new(),
            incoming,
            to_plane,
        }
    }

    /// Opens the connection to `server` unless it is open.
    fn connect(&mut self, server: SocketAddr) {
        if self.outgoing.get(&server).is_some_and(|tx| !tx.is_closed()) {
            return;
        }
        let (tx, rx) = mpsc::unbounded_channel();
        self.outgoing.insert(server, tx);
        tokio::spawn(stream_task(server, rx, self.to_plane.clone()));
    }

    fn send(&mut self, server: SocketAddr, frame: Vec<u8>) {
        match self.outgoing.get(&server) {
            Some(tx) => {
                let _ = tx.send(frame);
            }
            None => tracing::debug!(%server, "no TCP connection to this TURN server"),
        }
    }
}

async fn stream_task(
    server: SocketAddr,
    mut outgoing: mpsc::UnboundedReceiver<Vec<u8>>,
    to_plane: mpsc::UnboundedSender<(SocketAddr, Vec<u8>)>,
) {
    let connected = tokio::time::timeout(STREAM_CONNECT_TIMEOUT, TcpStream::connect(server)).await;
    let stream = match connected {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::warn!(%server, "cannot connect to the TURN server over TCP: {e}");
            return;
        }
        Err(_) => {
            tracing::warn!(%server, "no TCP connection to the TURN server within 10 s");
            return;
        }
    };
    tracing::info!(%server, "connected to the TURN server over TCP");
    let _ = stream.set_nodelay(true);
    let (mut read, mut write) = stream.into_split();
    let mut framer = StreamFramer::new();
    let mut buf = vec![0u8; 65536];
    loop {
        tokio::select! {
            frame = outgoing.recv() => match frame {
                Some(frame) => {
                    if let Err(e) = write.write_all(&frame).await {
                        tracing::warn!(%server, "TURN connection lost: {e}");
                        return;
                    }
                }
                None => return,
            },
            n = read.read(&mut buf) => {
                let n = match n {
                    Ok(0) => {
                        tracing::warn!(%server, "the TURN server closed the TCP connection");
                        return;
                    }
                    Ok(n) => n,
                    Err(e) => {
                        tracing::warn!(%server, "TURN connection lost: {e}");
                        return;
                    }
                };
                if let Err(e) = framer.push(&buf[..n]) {
                    tracing::warn!(%server, "TURN stream out of step: {e}");
                    return;
                }
                loop {
                    match framer.next_frame() {
                        Ok(Some(frame)) => {
                            if to_plane.send((server, frame.to_vec())).is_err() {
                                return;
                            }
                        }
                        Ok(None) => break,
                        Err(e) => {
                            tracing::warn!(%server, "TURN stream out of step: {e}");
                            return;
                        }
                    }
                }
            }
        }
    }
}
