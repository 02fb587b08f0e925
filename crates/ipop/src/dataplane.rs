//! The data plane: the TUN device, the UDP sockets, and the loop that runs the core.
//!
//! One task owns the core and every buffer. Packets move in batches: one TUN read returns up to
//! 64 KiB of TCP segments (TUN offload), which are encrypted into one contiguous buffer and sent
//! with one UDP GSO system call per destination; one `recvmmsg` returns many (GRO-coalesced)
//! datagrams, whose decrypted packets are coalesced again before they are written to the TUN
//! device. Buffers are allocated once at start.

use crate::coalesce::Coalescer;
use crate::control::Request;
use crate::overlays::Keeper;
use crate::status::{self, Status, XmppInfo};
use crate::streams::{Chunk, Streams};
use crate::udp::{Run, Udp};
use anyhow::Context;
use ipnet::IpNet;
use ipop_core::Engine;
use ipop_core::engine::SocketOrder;
use ipop_core::osn::{DeviceId, OsnEvent, Outgoing};
use quinn_udp::{RecvMeta, Transmit};
use std::io::{self, IoSliceMut};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tun_rs::{AsyncDevice, IDEAL_BATCH_SIZE, VIRTIO_NET_HDR_LEN};

/// How often the host's addresses are read again for ICE host candidates.
const HOST_SCAN_EVERY: Duration = Duration::from_secs(10);
/// Most social network events taken in one wake-up.
const OSN_BATCH: usize = 256;
/// The largest IP packet a TUN read can return with offload (a 64 KiB GSO packet).
const TUN_READ_MAX: usize = VIRTIO_NET_HDR_LEN + 65535;
/// Room around each encrypted datagram: WireGuard's 32-byte overhead, and the TURN framing of a
/// relayed path.
const WG_OVERHEAD: usize = 32 + ipop_core::turn::MAX_OVERHEAD;
/// The least room an encrypted datagram needs: a handshake initiation in ChannelData.
const MIN_WIRE_ROOM: usize = 148 + ipop_core::turn::CHANNEL_DATA_HEADER;
/// Datagrams per `recvmmsg`; each slot holds a GRO-coalesced train of up to 64 KiB.
const UDP_SLOTS: usize = 8;
const UDP_SLOT_SIZE: usize = 65535;
/// Reads from one source per wake-up before the loop looks at the others.
const MAX_READS_PER_WAKE: usize = 16;
/// How long one wake-up may keep reading before the loop looks at its other inputs (readiness
/// stays set, so it comes back at once).
const WAKE_BUDGET: Duration = Duration::from_millis(2);
/// A stall of the loop this long is logged, with what woke it.
const LONG_STALL: Duration = Duration::from_millis(10);

/// The data plane's side of the social network binding: events in, signals out. The loop never
/// waits on the binding: signals go into an unbounded queue.
pub struct OsnChannel {
    pub events: mpsc::UnboundedReceiver<OsnEvent>,
    pub signals: mpsc::UnboundedSender<Outgoing>,
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
    /// The addresses of the static overlay (the config's `[interface] addresses`).
    static_addresses: Vec<IpNet>,
    keeper: Keeper,
    xmpp_info: Option<XmppInfoFn>,
    listen_port: u16,
    started: Instant,
    /// When the host's addresses are read again for ICE host candidates (a network change
    /// shows in the next ICE restart).
    next_host_scan: Instant,
    bufs: Buffers,
    io_errors: IoErrors,
    streams: Streams,
    /// How long the loop went without waiting, over the last minute.
    stalls: status::StallWindow,
    /// The port mapper's news and status, when it runs.
    port_map: Option<PortMap>,
    /// What this device relays for others, when it does.
    relay_status: Option<Box<dyn Fn() -> status::RelayStatus + Send>>,
    /// Extra IPv4 sockets, by port: hole punching's probes leave from them, and a punched
    /// path goes through one ([`ipop_core::punch`]).
    extra: Vec<(u16, Udp)>,
    /// The prefixes this device routes, by overlay, for status.
    advertised_routes: std::collections::BTreeMap<String, Vec<String>>,
    /// Sets of extra sockets opened off the loop (hundreds of system calls), for the engine's
    /// set.
    opened: (
        mpsc::UnboundedSender<OpenedSockets>,
        mpsc::UnboundedReceiver<OpenedSockets>,
    ),
}

/// Extra sockets opened for the engine's set, with their ports.
type OpenedSockets = (u64, Vec<(u16, Udp)>);

/// A socket the loop reads from.
#[derive(Debug, Clone, Copy)]
enum Socket {
    V4,
    V6,
    /// The extra socket with this port.
    Extra(u16),
}

/// What the data plane holds of the port mapper.
pub struct PortMap {
    pub found: mpsc::UnboundedReceiver<crate::portmap::Found>,
    pub status: Box<dyn Fn() -> crate::portmap::PortMapStatus + Send>,
}

/// Packets lost to system call errors, counted beside the core's drops.
#[derive(Default)]
struct IoErrors {
    tun_read: u64,
    tun_write: u64,
    udp_send: u64,
    udp_receive: u64,
    /// Reads from a TURN server's stream with more packets than a TUN batch holds: the rest
    /// are dropped.
    stream_batch_full: u64,
}

/// What the kernel says of the packet thread: its CPU time (`CLOCK_THREAD_CPUTIME_ID`, which
/// is current, unlike the first field of `schedstat`, which lags by up to a tick while the
/// thread runs), and from `/proc/thread-self/schedstat` the time it waited for a CPU while
/// runnable and how many times it was switched in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct SchedStat {
    on_cpu: Duration,
    run_queue: Duration,
    switched_in: u64,
    /// From `getrusage(RUSAGE_THREAD)`, for the log only: where the CPU time went (the loop's
    /// own code, or the kernel on its behalf, softirqs that ran on its CPU included), how often
    /// it slept, and page faults that needed I/O.
    user: Duration,
    system: Duration,
    slept: u64,
    major_faults: u64,
}

/// Tells how much of a long loop iteration was the loop's own doing. Time the scheduler gave
/// the CPU to other processes (run-queue wait) is not; neither is time the hypervisor took the
/// virtual CPU away (steal: the thread is neither on a CPU nor on a run queue, as seen here in
/// gaps of up to 18 ms under load). So a stall is the thread's CPU time during the iteration,
/// unless the thread went to sleep meanwhile other than to wait for the next wake-up (a
/// blocking call, a page fault read from disk: a voluntary switch that no wake-up explains), in
/// which case it is the wall time less the run-queue wait. Being preempted is not sleeping: the
/// wait to run again is run-queue time, and any steal in between stays out. The kernel's
/// figures are read at most once a millisecond just before the loop waits, and after a wake-up
/// that took longer, so their cost does not grow with the packet rate and the packet that wakes
/// the loop never waits for them; a figure is off by at most [`SchedClock::RESOLUTION`].
struct SchedClock {
    file: Option<std::fs::File>,
    /// When `last` was read.
    at: Instant,
    last: SchedStat,
    /// Wake-ups since `last` was read: each follows at most one sleep, the wait.
    wakes: u64,
    /// What the last [`SchedClock::stall`] judged from, for the log: the kernel's figures
    /// between its two readings, and the wake-ups in between.
    judged: (SchedStat, u64),
}

impl SchedStat {
    /// What the thread did from `before` to `self`.
    fn since(self, before: SchedStat) -> SchedStat {
        SchedStat {
            on_cpu: self.on_cpu.saturating_sub(before.on_cpu),
            run_queue: self.run_queue.saturating_sub(before.run_queue),
            switched_in: self.switched_in.saturating_sub(before.switched_in),
            user: self.user.saturating_sub(before.user),
            system: self.system.saturating_sub(before.system),
            slept: self.slept.saturating_sub(before.slept),
            major_faults: self.major_faults.saturating_sub(before.major_faults),
        }
    }
}

impl SchedClock {
    const RESOLUTION: Duration = Duration::from_millis(1);

    /// Must be called on the thread that runs the loop.
    fn open() -> Self {
        let mut c = SchedClock {
            file: std::fs::File::open("/proc/thread-self/schedstat").ok(),
            at: Instant::now(),
            last: SchedStat::default(),
            wakes: 0,
            judged: (SchedStat::default(), 0),
        };
        c.last = c.read().unwrap_or_default();
        c
    }

    fn read(&self) -> Option<SchedStat> {
        use nix::sys::resource::{UsageWho, getrusage};
        use nix::time::{ClockId, clock_gettime};
        use std::os::unix::fs::FileExt;
        let mut buf = [0u8; 96];
        let n = self.file.as_ref()?.read_at(&mut buf, 0).ok()?;
        let mut stat = parse_schedstat(std::str::from_utf8(buf.get(..n)?).ok()?)?;
        stat.on_cpu = Duration::from(clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID).ok()?);
        if let Ok(usage) = getrusage(UsageWho::RUSAGE_THREAD) {
            let duration = |t: nix::sys::time::TimeVal| {
                Duration::from_secs(u64::try_from(t.tv_sec()).unwrap_or(0))
                    + Duration::from_micros(u64::try_from(t.tv_usec()).unwrap_or(0))
            };
            stat.user = duration(usage.user_time());
            stat.system = duration(usage.system_time());
            stat.slept = u64::try_from(usage.voluntary_context_switches()).unwrap_or(0);
            stat.major_faults = u64::try_from(usage.major_page_faults()).unwrap_or(0);
        }
        Some(stat)
    }

    /// The loop is about to wait: the figures a long next iteration is judged from.
    fn waits(&mut self) {
        let now = Instant::now();
        if now.duration_since(self.at) >= Self::RESOLUTION
            && let Some(last) = self.read()
        {
            (self.at, self.last, self.wakes) = (now, last, 0);
        }
    }

    /// The loop wakes up: returns the time.
    fn woke(&mut self) -> Instant {
        self.wakes += 1;
        Instant::now()
    }

    /// The part of `elapsed` (from the last wake-up to `now`) that was the loop's own doing.
    fn stall(&mut self, now: Instant, elapsed: Duration) -> Duration {
        let Some(stat) = self.read() else {
            self.judged = (SchedStat::default(), 0);
            return elapsed;
        };
        let stall = loop_share(elapsed, self.last, stat, self.wakes);
        self.judged = (stat.since(self.last), self.wakes);
        (self.at, self.last, self.wakes) = (now, stat, 0);
        stall
    }
}

fn parse_schedstat(text: &str) -> Option<SchedStat> {
    let mut fields = text.split_ascii_whitespace().map(str::parse::<u64>);
    let mut next = || fields.next()?.ok();
    Some(SchedStat {
        on_cpu: Duration::from_nanos(next()?),
        run_queue: Duration::from_nanos(next()?),
        switched_in: next()?,
        ..SchedStat::default()
    })
}

/// [`SchedClock::stall`]'s rule, between two readings with `wakes` wake-ups in between.
fn loop_share(elapsed: Duration, before: SchedStat, after: SchedStat, wakes: u64) -> Duration {
    if after.slept.saturating_sub(before.slept) <= wakes {
        elapsed.min(after.on_cpu.saturating_sub(before.on_cpu))
    } else {
        elapsed.saturating_sub(after.run_queue.saturating_sub(before.run_queue))
    }
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
    /// Decrypted packets waiting for the TUN device, TCP segments and UDP datagrams merged.
    to_tun: Coalescer,
}

impl Buffers {
    fn new(mtu: usize, offload: bool, udp_offload: bool) -> Self {
        let segment = mtu + VIRTIO_NET_HDR_LEN + 64;
        Buffers {
            tun_read: vec![0; TUN_READ_MAX],
            segments: (0..IDEAL_BATCH_SIZE).map(|_| vec![0; segment]).collect(),
            sizes: vec![0; IDEAL_BATCH_SIZE],
            wire: vec![0; IDEAL_BATCH_SIZE * (segment + WG_OVERHEAD)],
            udp_read: vec![0; UDP_SLOTS * UDP_SLOT_SIZE],
            metas: vec![RecvMeta::default(); UDP_SLOTS],
            to_tun: Coalescer::new(offload, udp_offload),
        }
    }
}

impl Dataplane {
    /// Creates the TUN device as `interface` says, with `addresses` (the static ones and the
    /// overlays' IPv4), the overlays' IPv6 `ula` where the host has IPv6, and `routes`, and
    /// binds the UDP sockets.
    pub fn new(
        engine: Engine,
        keeper: Keeper,
        interface: &crate::config::Interface,
        addresses: &[IpNet],
        ula: &[ipnet::Ipv6Net],
        routes: &[IpNet],
    ) -> anyhow::Result<Self> {
        let (mtu, listen_port) = (interface.mtu, interface.listen_port);
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
        let tun = crate::device::create(&interface.name, addresses, ula, routes, mtu)?;
        let (offload, udp_offload) = (tun.tcp_gso(), tun.udp_gso());
        Ok(Dataplane {
            engine,
            tun,
            udp4,
            udp6,
            interface: interface.name.clone(),
            static_addresses: interface.addresses.clone(),
            keeper,
            xmpp_info: None,
            listen_port: port,
            started: Instant::now(),
            next_host_scan: Instant::now() + HOST_SCAN_EVERY,
            bufs: Buffers::new(mtu.into(), offload, udp_offload),
            io_errors: IoErrors::default(),
            streams: Streams::new(),
            stalls: status::StallWindow::default(),
            port_map: None,
            relay_status: None,
            extra: Vec::new(),
            opened: mpsc::unbounded_channel(),
            advertised_routes: std::collections::BTreeMap::new(),
        })
    }

    /// Where address changes are announced: the XMPP binding.
    pub fn set_announcer(&mut self, announce: crate::overlays::Announcer) {
        self.keeper.set_announcer(announce);
    }

    /// Where `ipop status` reads what this device relays for others.
    pub fn set_relay_status(&mut self, f: Box<dyn Fn() -> status::RelayStatus + Send>) {
        self.relay_status = Some(f);
    }

    /// The prefixes this device routes, by overlay, for status.
    pub fn set_advertised_routes(
        &mut self,
        routes: std::collections::BTreeMap<String, Vec<String>>,
    ) {
        self.advertised_routes = routes;
    }

    /// Where the XMPP server's address is read (kept off the tunnel while an exit is in use).
    pub fn set_xmpp_server(&mut self, f: Box<dyn Fn() -> Option<std::net::IpAddr> + Send>) {
        self.keeper.set_xmpp_server(f);
    }

    /// Where the port mapper's news come from.
    pub fn set_port_map(&mut self, port_map: PortMap) {
        self.port_map = Some(port_map);
    }

    /// Where `ipop status` reads the XMPP session's state.
    pub fn set_xmpp_info(&mut self, f: XmppInfoFn) {
        self.xmpp_info = Some(f);
    }

    /// A CA certificate file that TURN servers over TLS may be signed by, besides the system's
    /// roots: the one trusted for the XMPP server.
    pub fn trust_ca_file(&mut self, ca_file: Option<PathBuf>) {
        self.streams.extra_ca = ca_file;
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
        self.engine
            .set_local_networks(crate::device::host_networks(&self.interface));
    }

    /// Runs until `shutdown` resolves.
    pub async fn run(
        mut self,
        mut requests: mpsc::Receiver<Request>,
        mut osn: Option<OsnChannel>,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        // When the loop last woke up, and why: the time until it waits again is a stall.
        let mut woke: Option<(Instant, &'static str)> = None;
        let mut sched = SchedClock::open();
        loop {
            let now = Instant::now();
            // Timers only when one is due, or when something besides WireGuard data came in.
            if self.engine.is_due(now) {
                self.engine.handle_timeout(now);
                self.keeper.after(&mut self.engine, &self.tun);
                for server in self.engine.stream_servers() {
                    self.streams.connect(server);
                }
            }
            let timers_done = Instant::now();
            if now >= self.next_host_scan {
                self.next_host_scan = now + HOST_SCAN_EVERY;
                self.discover_host_candidates();
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
            if let Some((w, what)) = woke.take() {
                let (top, now) = (now, Instant::now());
                let elapsed = now.duration_since(w);
                let stall = if elapsed >= SchedClock::RESOLUTION {
                    sched.stall(now, elapsed)
                } else {
                    elapsed
                };
                if stall >= LONG_STALL {
                    // Where the wall time went: what woke the loop, the timers it then ran,
                    // and the sending that followed.
                    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
                    let (judged, wakes) = sched.judged;
                    tracing::info!(
                        what,
                        ms = ms(stall),
                        wall_ms = ms(elapsed),
                        woken_ms = ms(top.saturating_duration_since(w)),
                        timers_ms = ms(timers_done.saturating_duration_since(top)),
                        sending_ms = ms(now.saturating_duration_since(timers_done)),
                        cpu_ms = ms(judged.on_cpu),
                        queued_ms = ms(judged.run_queue),
                        switched_in = judged.switched_in,
                        wakes,
                        user_ms = ms(judged.user),
                        system_ms = ms(judged.system),
                        slept = judged.slept,
                        major_faults = judged.major_faults,
                        "the packet loop went long without waiting"
                    );
                }
                self.stalls.record(now, stall);
            }
            sched.waits();
            let udp6_readable = async {
                match &self.udp6 {
                    Some(u) => u.socket.readable().await,
                    None => std::future::pending().await,
                }
            };
            let extra_readable = std::future::poll_fn(|cx| {
                for (port, udp) in &self.extra {
                    if let std::task::Poll::Ready(r) = udp.socket.poll_recv_ready(cx) {
                        return std::task::Poll::Ready(r.map(|()| *port));
                    }
                }
                std::task::Poll::Pending
            });
            let port_mapping = async {
                match self.port_map.as_mut() {
                    Some(p) => p.found.recv().await,
                    None => std::future::pending().await,
                }
            };
            let osn_event = async {
                match osn.as_mut() {
                    Some(o) => o.events.recv().await,
                    None => std::future::pending().await,
                }
            };
            let wake = tokio::select! {
                _ = &mut shutdown => {
                    // Give TURN allocations back; their answers are not awaited.
                    self.engine.release(Instant::now());
                    self.flush_control().await;
                    self.keeper.shutdown();
                    return;
                }
                r = self.tun.readable() => {
                    let wake = sched.woke();
                    if let Err(e) = r {
                        tracing::error!("TUN device failed: {e}");
                        return;
                    }
                    self.tun_to_network().await;
                    (wake, "tun")
                }
                r = self.udp4.socket.readable() => {
                    let wake = sched.woke();
                    if r.is_ok() {
                        self.network_to_tun(Socket::V4).await;
                    }
                    (wake, "udp4")
                }
                r = udp6_readable => {
                    let wake = sched.woke();
                    if r.is_ok() {
                        self.network_to_tun(Socket::V6).await;
                    }
                    (wake, "udp6")
                }
                r = extra_readable => {
                    let wake = sched.woke();
                    match r {
                        Ok(port) => self.network_to_tun(Socket::Extra(port)).await,
                        Err(e) => tracing::debug!("extra socket: {e}"),
                    }
                    (wake, "extra socket")
                }
                event = osn_event => {
                    let wake = sched.woke();
                    match event {
                        Some(event) => {
                            self.engine.handle_osn(wake, event);
                            // A burst (a room's occupants after a join, a roster's presences)
                            // is taken whole, so that the link policy sees the overlay's size
                            // before any link of it is offered.
                            for _ in 1..OSN_BATCH {
                                let Some(Ok(event)) = osn.as_mut().map(|o| o.events.try_recv())
                                else {
                                    break;
                                };
                                self.engine.handle_osn(wake, event);
                            }
                        }
                        None => {
                            tracing::warn!("the social network binding stopped; links stay up");
                            osn = None;
                        }
                    }
                    (wake, "social network event")
                }
                Some((set, sockets)) = self.opened.1.recv() => {
                    let wake = sched.woke();
                    let ports = sockets.iter().map(|(p, _)| *p).collect();
                    self.extra.extend(sockets);
                    self.engine.sockets_opened(wake, set, ports);
                    self.flush_control().await;
                    (wake, "extra sockets opened")
                }
                Some(found) = port_mapping => {
                    let wake = sched.woke();
                    self.engine.set_port_mapping(found);
                    (wake, "port mapping")
                }
                Some(chunk) = self.streams.incoming.recv() => {
                    let wake = sched.woke();
                    self.stream_to_tun(chunk).await;
                    (wake, "TURN stream")
                }
                Some(req) = requests.recv() => {
                    let wake = sched.woke();
                    let answer = self.answer(&req.command);
                    self.keeper.after(&mut self.engine, &self.tun);
                    let _ = req.reply.send(answer);
                    (wake, "control request")
                }
                _ = tokio::time::sleep_until(deadline.into()) => (sched.woke(), "timer"),
            };
            woke = Some(wake);
        }
    }

    /// Bytes from the connection to a TURN server over TCP or TLS: relayed traffic and the
    /// server's answers. The packets go to the TUN device together, coalesced as from UDP.
    async fn stream_to_tun(&mut self, chunk: Chunk) {
        let now = Instant::now();
        let (engine, to_tun) = (&mut self.engine, &mut self.bufs.to_tun);
        let mut full = 0;
        self.streams
            .frames(chunk, |server, frame| match to_tun.room(frame.len()) {
                Some(target) => {
                    let got = engine.handle_stream(now, server, frame, target);
                    to_tun.commit(got);
                }
                None => full += 1,
            });
        self.io_errors.stream_batch_full += full;
        self.write_tun().await;
        self.flush_control().await;
    }

    /// Sends the control datagrams the core queued (handshakes, keepalives), and wakes the
    /// stream connections that have frames to write.
    async fn flush_control(&mut self) {
        self.obey_socket_orders();
        while let Some(t) = self.engine.poll_transmit() {
            if t.stream {
                self.streams.send(t.destination, &t.payload);
                continue;
            }
            let transmit = Transmit {
                destination: t.destination,
                ecn: None,
                contents: &t.payload,
                segment_size: None,
                src_ip: None,
            };
            let sent = match self.socket_for(t.destination, t.source) {
                Some(udp) => udp.send(&transmit).await,
                None => false,
            };
            if !sent {
                self.io_errors.udp_send += 1;
            }
        }
        self.streams.flush();
    }

    /// The socket to send to `dst` from: the extra socket with port `source`, else the main
    /// socket of `dst`'s family.
    fn socket_for(&self, dst: SocketAddr, source: Option<u16>) -> Option<&Udp> {
        if let Some(port) = source {
            return self.extra_socket(port);
        }
        if dst.is_ipv4() {
            Some(&self.udp4)
        } else {
            self.udp6.as_ref()
        }
    }

    fn extra_socket(&self, port: u16) -> Option<&Udp> {
        self.extra.iter().find(|(p, _)| *p == port).map(|(_, u)| u)
    }

    /// Opens and closes the extra sockets the engine asks for, off the loop: the opened ones
    /// come back through `opened`.
    fn obey_socket_orders(&mut self) {
        while let Some(order) = self.engine.poll_socket_order() {
            match order {
                SocketOrder::Open { set, count } => {
                    let opened = self.opened.0.clone();
                    tokio::task::spawn_blocking(move || {
                        let _ = opened.send((set, open_extra_sockets(count)));
                    });
                }
                SocketOrder::Close { ports } => {
                    let (closed, kept): (Vec<(u16, Udp)>, _) = std::mem::take(&mut self.extra)
                        .into_iter()
                        .partition(|(p, _)| ports.contains(p));
                    self.extra = kept;
                    if !closed.is_empty() {
                        tokio::task::spawn_blocking(move || drop(closed));
                    }
                }
            }
        }
    }

    /// TUN → network: reads packets, encrypts them back to back into `wire`, and sends each run
    /// of equal-sized datagrams to one destination with a single GSO send. A run goes on across
    /// reads, so that packets the TUN device hands over one at a time (UDP, such as QUIC or
    /// a game's traffic) leave in trains too; it leaves when the next packet does not extend it,
    /// when `wire` has no room for another read, and when the wake-up's reading ends.
    async fn tun_to_network(&mut self) {
        let started = Instant::now();
        let max_segments = self.udp4.state.max_gso_segments();
        let mut run: Option<Run> = None;
        let mut end = 0;
        for _ in 0..MAX_READS_PER_WAKE {
            if started.elapsed() >= WAKE_BUDGET {
                break;
            }
            let b = &mut self.bufs;
            let n =
                match self
                    .tun
                    .try_recv_multiple(&mut b.tun_read, &mut b.segments, &mut b.sizes, 0)
                {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        tracing::debug!("TUN read: {e}");
                        self.io_errors.tun_read += 1;
                        break;
                    }
                };
            let b = &self.bufs;
            let needed: usize = b.sizes[..n]
                .iter()
                .map(|size| (size + WG_OVERHEAD).max(MIN_WIRE_ROOM))
                .sum();
            if end + needed > b.wire.len() {
                if let Some(r) = run.take() {
                    self.send_run(&r).await;
                }
                end = 0;
            }
            for i in 0..n {
                let b = &mut self.bufs;
                let packet = &mut b.segments[i][..b.sizes[i]];
                let room = packet.len() + WG_OVERHEAD;
                let Some(out) = b.wire.get_mut(end..end + room.max(MIN_WIRE_ROOM)) else {
                    break;
                };
                let Some(wire) = self.engine.handle_tun(packet, out) else {
                    continue;
                };
                let (dst, len, source) = (wire.destination, wire.len, wire.source);
                if wire.stream {
                    self.streams.send(dst, &out[..len]);
                    continue;
                }
                match &mut run {
                    Some(r) if r.extends(dst, source, len, max_segments) => r.push(len),
                    _ => {
                        if let Some(r) = run.take() {
                            self.send_run(&r).await;
                        }
                        run = Some(Run::new(dst, source, end, len));
                    }
                }
                end += len;
            }
        }
        if let Some(r) = run {
            self.send_run(&r).await;
        }
    }

    async fn send_run(&mut self, r: &Run) {
        let Some(udp) = self.socket_for(r.dst, r.source) else {
            self.io_errors.udp_send += r.count as u64;
            return;
        };
        if !udp.send(&r.transmit(&self.bufs.wire)).await {
            self.io_errors.udp_send += r.count as u64;
        }
    }

    /// Network → TUN: receives a batch of datagrams, decrypts them, and writes the packets to
    /// the TUN device, coalescing TCP segments and UDP datagrams again where offload allows.
    async fn network_to_tun(&mut self, socket: Socket) {
        let started = Instant::now();
        let (v6, port) = match socket {
            Socket::V4 => (false, self.listen_port),
            Socket::V6 => (true, self.listen_port),
            Socket::Extra(port) => (false, port),
        };
        for _ in 0..MAX_READS_PER_WAKE {
            if started.elapsed() >= WAKE_BUDGET {
                return;
            }
            // Looked up anew each time: handling a batch may close extra sockets.
            let udp = match socket {
                Socket::V4 => &self.udp4,
                Socket::V6 => match &self.udp6 {
                    Some(u) => u,
                    None => return,
                },
                Socket::Extra(port) => match self.extra.iter().find(|(p, _)| *p == port) {
                    Some((_, u)) => u,
                    None => return,
                },
            };
            let b = &mut self.bufs;
            let received = {
                let mut chunks = b.udp_read.chunks_mut(UDP_SLOT_SIZE);
                let mut iovs: [IoSliceMut<'_>; UDP_SLOTS] =
                    std::array::from_fn(|_| IoSliceMut::new(chunks.next().unwrap_or_default()));
                udp.try_recv(&mut iovs, &mut b.metas)
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
                    port,
                );
                let base = slot * UDP_SLOT_SIZE;
                for offset in (0..meta.len).step_by(stride) {
                    if self.bufs.to_tun.is_full() {
                        self.write_tun().await;
                    }
                    let b = &mut self.bufs;
                    let datagram = &b.udp_read[base + offset..base + meta.len.min(offset + stride)];
                    // Never None after the write above.
                    let Some(target) = b.to_tun.room(datagram.len()) else {
                        continue;
                    };
                    let got = self
                        .engine
                        .handle_udp(now, local, meta.addr, datagram, target);
                    b.to_tun.commit(got);
                }
            }
            self.write_tun().await;
            self.flush_control().await;
        }
    }

    /// Writes the decrypted packets waiting in `to_tun` to the TUN device, one write per
    /// merged flow.
    async fn write_tun(&mut self) {
        for packet in self.bufs.to_tun.finish() {
            if let Err(e) = self.tun.send(packet).await {
                tracing::debug!("TUN write: {e}");
                self.io_errors.tun_write += 1;
            }
        }
        self.bufs.to_tun.clear();
    }

    fn drops(&self) -> std::collections::BTreeMap<String, u64> {
        let mut drops = status::drops(&self.engine);
        let e = &self.io_errors;
        for (name, n) in [
            ("tun_read_failed", e.tun_read),
            ("tun_write_failed", e.tun_write),
            ("udp_send_failed", e.udp_send),
            ("udp_receive_failed", e.udp_receive),
            (
                "turn_stream_queue_full",
                e.stream_batch_full + self.streams.dropped,
            ),
            ("dns_malformed", crate::dns::malformed()),
            ("dns_forward_failed", crate::dns::forward_failed()),
        ] {
            drops.insert(name.to_owned(), n);
        }
        drops
    }

    fn answer(&mut self, command: &str) -> String {
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
                    overlays: status::overlays(&self.engine, &self.static_addresses),
                    ice_servers: status::ice_servers(&self.engine),
                    drops: self.drops(),
                    loop_stall_max_s: self.stalls.max(Instant::now()).as_secs_f64(),
                    port_mapping: self.port_map.as_ref().map(|p| (p.status)()),
                    relay: self.relay_status.as_ref().map(|f| f()),
                    nat_mapping: self.engine.nat_mapping().as_str().to_owned(),
                    punching: self.engine.punch_stats().into(),
                    advertised_routes: self.advertised_routes.clone(),
                    routes: status::routes(&self.engine),
                    exit: status::exit(&self.engine, self.keeper.exit_fallback(), self.keeper.exit_dns()),
                };
                serde_json::to_string(&s).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
            }
            other if other.starts_with("trust ") => {
                let name = other["trust ".len()..].trim();
                let device = name
                    .split_once('/')
                    .map(|(user, device)| DeviceId::new(user, device));
                let answer = match device {
                    None => Err(format!("{name:?} is not JID/DEVICE")),
                    Some(d) => self.engine.trust(Instant::now(), &d),
                };
                match answer {
                    Ok(key) => serde_json::json!({ "trusted": key.to_string(), "fingerprint": key.fingerprint() }),
                    Err(e) => serde_json::json!({ "error": e }),
                }
                .to_string()
            }
            other if other.starts_with("exit ") => {
                match crate::config::parse_exit(other["exit ".len()..].trim()) {
                    Ok(choice) => {
                        self.engine.set_exit(choice);
                        self.keeper.after(&mut self.engine, &self.tun);
                        serde_json::json!({ "exit": status::exit(&self.engine, self.keeper.exit_fallback(), self.keeper.exit_dns()) })
                    }
                    Err(e) => serde_json::json!({ "error": e }),
                }
                .to_string()
            }
            other if other.starts_with("group ") => {
                serde_json::json!({ "error": "group commands need an [xmpp] account in the config" })
                    .to_string()
            }
            other => serde_json::json!({ "error": format!("unknown command {other:?}") }).to_string(),
        }
    }
}

/// Opens up to `count` IPv4 UDP sockets on ports the system picks, with default buffers.
fn open_extra_sockets(count: usize) -> Vec<(u16, Udp)> {
    let mut sockets = Vec::with_capacity(count);
    for _ in 0..count {
        let udp = Udp::bind_with(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)), false)
            .and_then(|u| Ok((u.socket.local_addr()?.port(), u)));
        match udp {
            Ok(socket) => sockets.push(socket),
            Err(e) => {
                tracing::warn!(
                    opened = sockets.len(),
                    "cannot open more sockets to punch from: {e}"
                );
                break;
            }
        }
    }
    sockets
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_threads_schedstat_is_read_and_only_grows() {
        let mut c = SchedClock::open();
        let first = c
            .read()
            .expect("this kernel has /proc/thread-self/schedstat");
        let woke = c.woke();
        let spin = Instant::now();
        while spin.elapsed() < Duration::from_millis(3) {
            std::hint::spin_loop();
        }
        let elapsed = woke.elapsed();
        let stall = c.stall(Instant::now(), elapsed);
        assert!(stall <= elapsed, "{stall:?} of {elapsed:?}");
        let again = c.read().expect("read again");
        assert!(again.on_cpu > first.on_cpu && again.switched_in >= first.switched_in);
    }

    #[test]
    fn schedstat_lines_parse_and_bad_ones_do_not() {
        let s = parse_schedstat("2500000 1000000 7\n").expect("parses");
        assert_eq!(s.on_cpu, Duration::from_micros(2500));
        assert_eq!(s.run_queue, Duration::from_millis(1));
        assert_eq!(s.switched_in, 7);
        assert_eq!(parse_schedstat("12 x 3"), None);
        assert_eq!(parse_schedstat("12 3"), None);
    }

    #[test]
    fn a_stall_leaves_out_stolen_time_and_run_queue_waits_but_not_blocking() {
        let at = |cpu_ms: u64, rq_ms: u64, switched_in: u64, slept: u64| SchedStat {
            on_cpu: Duration::from_millis(cpu_ms),
            run_queue: Duration::from_millis(rq_ms),
            switched_in,
            slept,
            ..SchedStat::default()
        };
        let wall = Duration::from_millis(18);
        // The virtual CPU was taken away: 2 ms on the CPU, no sleep but the wait.
        assert_eq!(
            loop_share(wall, at(10, 5, 40, 7), at(12, 5, 41, 8), 1),
            Duration::from_millis(2)
        );
        // Preempted for 6 ms, and the virtual CPU taken away besides: switched in once more
        // than the wake-ups explain, but no sleep, so still the CPU time.
        assert_eq!(
            loop_share(wall, at(10, 5, 40, 7), at(12, 11, 42, 8), 1),
            Duration::from_millis(2)
        );
        // Blocked: a sleep no wake-up explains, so the wall time less the run-queue wait.
        assert_eq!(
            loop_share(wall, at(10, 5, 40, 7), at(12, 11, 42, 9), 1),
            Duration::from_millis(12)
        );
        // CPU time read from before the last wait is capped by the wall time.
        assert_eq!(loop_share(wall, at(0, 0, 0, 0), at(30, 0, 1, 1), 1), wall);
    }
}
