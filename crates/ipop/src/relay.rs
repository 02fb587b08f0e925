//! This device as a relay for its friends and fellow members (`[relay] enabled = true`): the
//! sockets around the core's [`RelayServer`]. Registrations come to the control port; every
//! pair gets a UDP port of its own, whose datagrams a task of its own forwards. The relay runs
//! beside the packet loop and never touches the tunnel.
//!
//! A pair's task forwards in batches, as the data plane sends: one `recvmmsg` takes up to
//! [`PAIR_SLOTS`] trains of datagrams that the kernel's GRO merged, the relay's verdicts for all
//! of them are taken under one lock, and each run of datagrams to the other side leaves, from
//! where it was received, in one UDP GSO send. Its sockets have big kernel buffers, so a burst
//! of a fast sender waits there instead of being dropped.

use std::collections::{BTreeMap, HashMap};
use std::io::IoSliceMut;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use ipop::status::{RelayPair, RelayStatus};
use ipop_core::peer_relay::{PairVerdict, RelayLimits, RelayServer, TOKEN_LEN};
use quinn_udp::{RecvMeta, Transmit};
use tokio::task::{AbortHandle, JoinHandle, JoinSet};

use crate::udp::{Run, Udp};

/// How often pairs nobody registers for are looked for.
const EXPIRE_EVERY: Duration = Duration::from_secs(5);
/// The largest datagram, or GRO train of datagrams, received.
const MAX_DATAGRAM: usize = 65_535;
/// Trains of datagrams one receive on a pair's port takes.
const PAIR_SLOTS: usize = 4;

/// The running relay.
pub struct Relay {
    server: Arc<Mutex<RelayServer>>,
    endpoint: Option<SocketAddr>,
    problem: Option<String>,
    task: JoinHandle<()>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn lock(server: &Mutex<RelayServer>) -> std::sync::MutexGuard<'_, RelayServer> {
    server.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Relay {
    /// Binds the control port (`port`, or any when 0) and starts forwarding. The others reach
    /// it at `configured`, or else at this host's first public IPv4 address among `hosts`.
    pub async fn start(
        port: u16,
        configured: Option<SocketAddr>,
        hosts: &[IpAddr],
        limits: RelayLimits,
    ) -> anyhow::Result<Relay> {
        let control = Udp::bind_with(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)), false)
            .map_err(|e| anyhow::anyhow!("[relay]: cannot bind UDP port {port}: {e}"))?;
        let port = control.socket.local_addr()?.port();
        let (endpoint, problem) = match endpoint(configured, hosts, port) {
            Ok(e) => (Some(e), None),
            Err(why) => {
                tracing::warn!("not relaying: {why}");
                (None, Some(why))
            }
        };
        if let Some(e) = endpoint {
            tracing::info!(endpoint = %e, max_pairs = limits.max_pairs, "relaying for friends and fellow members");
        }
        let mut token = [0u8; TOKEN_LEN];
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut token);
        let server = Arc::new(Mutex::new(RelayServer::new(token, limits, Instant::now())));
        let task = tokio::spawn(serve(control, server.clone()));
        Ok(Relay {
            server,
            endpoint,
            problem,
            task,
        })
    }

    /// What the presence offers: the endpoint and the token, when the endpoint is known.
    pub fn offer(&self) -> Option<ipop_core::osn::RelayOffer> {
        let endpoint = self.endpoint?;
        Some(ipop_core::osn::RelayOffer {
            endpoint,
            token: *lock(&self.server).token(),
        })
    }

    /// A reader of the relay's status.
    pub fn status_fn(&self) -> impl Fn() -> RelayStatus + Send + 'static {
        let server = self.server.clone();
        let endpoint = self.endpoint;
        let problem = self.problem.clone();
        move || {
            let server = lock(&server);
            let limits = server.limits();
            RelayStatus {
                endpoint: endpoint.map(|e| e.to_string()),
                problem: problem.clone(),
                max_pairs: limits.max_pairs,
                pair_rate_mbit: limits.pair_rate * 8 / 1_000_000,
                total_rate_mbit: limits.total_rate * 8 / 1_000_000,
                pairs: server
                    .pairs()
                    .into_iter()
                    .map(|p| RelayPair {
                        port: p.port,
                        ends: p
                            .ends
                            .iter()
                            .map(|e| match e {
                                Some((device, addr)) => format!("{device} at {addr}"),
                                None => "(not registered)".to_owned(),
                            })
                            .collect(),
                        forwarded: p.forwarded,
                        bytes: p.bytes,
                        over_rate: p.over_rate,
                    })
                    .collect(),
                drops: server
                    .drops()
                    .map(|(why, n)| (why.as_str().to_owned(), n))
                    .collect::<BTreeMap<_, _>>(),
            }
        }
    }
}

/// The control port's loop: registrations, new pairs' sockets, and the end of idle pairs.
async fn serve(control: Udp, server: Arc<Mutex<RelayServer>>) {
    // The pairs' tasks end with this one (the set aborts them when dropped).
    let mut tasks = JoinSet::new();
    let mut pairs: HashMap<u16, AbortHandle> = HashMap::new();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut expire = tokio::time::interval(EXPIRE_EVERY);
    loop {
        tokio::select! {
            // The socket has UDP_GRO on (as every `Udp`): registrations from one sender that
            // arrive together come as one train, cut at the stride.
            got = control.recv_train(&mut buf) => {
                let Ok(meta) = got else { continue };
                let from = meta.addr;
                let train = buf.get(..meta.len).unwrap_or_default();
                for datagram in train.chunks(meta.stride.max(1)) {
                    let mut opened = None;
                    let answer = lock(&server).handle_control(Instant::now(), from, datagram, || {
                        let udp = Udp::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)))
                            .inspect_err(|e| {
                                tracing::warn!("relay: cannot open a pair's port: {e}");
                            })
                            .ok()?;
                        let port = udp.socket.local_addr().ok()?.port();
                        opened = Some((port, udp));
                        Some(port)
                    });
                    if let Some((port, udp)) = opened {
                        pairs.insert(port, tasks.spawn(forward(udp, port, server.clone())));
                    }
                    if let Some(answer) = answer {
                        let _ = control.socket.send_to(&answer, from).await;
                    }
                }
            }
            _ = expire.tick() => {
                for port in lock(&server).expire(Instant::now()) {
                    if let Some(task) = pairs.remove(&port) {
                        task.abort();
                    }
                }
                // Reap the aborted ones.
                while tasks.try_join_next().is_some() {}
            }
        }
    }
}

/// One pair's port: registrations are answered, the rest goes to the other side.
async fn forward(udp: Udp, port: u16, server: Arc<Mutex<RelayServer>>) {
    let mut buf = vec![0u8; PAIR_SLOTS * MAX_DATAGRAM];
    let mut metas = [RecvMeta::default(); PAIR_SLOTS];
    let mut runs: Vec<Run> = Vec::new();
    let mut replies: Vec<(Vec<u8>, SocketAddr)> = Vec::new();
    loop {
        let received = {
            let mut chunks = buf.chunks_mut(MAX_DATAGRAM);
            let mut slots: [IoSliceMut<'_>; PAIR_SLOTS] =
                std::array::from_fn(|_| IoSliceMut::new(chunks.next().unwrap_or_default()));
            udp.recv(&mut slots, &mut metas).await
        };
        let Ok(count) = received else {
            continue;
        };
        let max_segments = udp.state.max_gso_segments();
        {
            let mut server = lock(&server);
            let now = Instant::now();
            sort_batch(
                &buf,
                metas.get(..count).unwrap_or_default(),
                max_segments,
                |from, datagram| server.handle_pair(now, port, from, datagram),
                &mut runs,
                &mut replies,
            );
        }
        for run in runs.drain(..) {
            udp.send(&run.transmit(&buf)).await;
        }
        for (answer, to) in replies.drain(..) {
            udp.send(&Transmit {
                destination: to,
                ecn: None,
                contents: &answer,
                segment_size: None,
                src_ip: None,
            })
            .await;
        }
    }
}

/// Sorts a batch that one receive put in `buf` (slot `i` at `i * MAX_DATAGRAM`, described by
/// `metas[i]`): each slot's train is cut into its datagrams, `verdict` judges each in order, the
/// datagrams to forward are grouped into `runs` that one GSO send each can take (back to back in
/// `buf`, one destination, at most `max_segments`), and answers go to `replies`. A datagram not
/// forwarded ends the run before it.
fn sort_batch(
    buf: &[u8],
    metas: &[RecvMeta],
    max_segments: usize,
    mut verdict: impl FnMut(SocketAddr, &[u8]) -> PairVerdict,
    runs: &mut Vec<Run>,
    replies: &mut Vec<(Vec<u8>, SocketAddr)>,
) {
    for (slot, meta) in metas.iter().enumerate() {
        let base = slot * MAX_DATAGRAM;
        let stride = meta.stride.max(1);
        let mut run: Option<Run> = None;
        for offset in (0..meta.len).step_by(stride) {
            let (start, end) = (base + offset, base + meta.len.min(offset + stride));
            let Some(datagram) = buf.get(start..end) else {
                break;
            };
            let len = datagram.len();
            match verdict(meta.addr, datagram) {
                PairVerdict::Forward(to) => match &mut run {
                    Some(r) if r.extends(to, None, len, max_segments) => r.push(len),
                    _ => runs.extend(run.replace(Run::new(to, None, start, len))),
                },
                PairVerdict::Reply(answer) => {
                    runs.extend(run.take());
                    replies.push((answer, meta.addr));
                }
                PairVerdict::Drop(_) => runs.extend(run.take()),
            }
        }
        runs.extend(run);
    }
}

/// Where the others reach the relay's port: the configured endpoint, else this host's first
/// public IPv4 address. `Err` says why there is none.
fn endpoint(
    configured: Option<SocketAddr>,
    hosts: &[IpAddr],
    port: u16,
) -> Result<SocketAddr, String> {
    if let Some(e) = configured {
        return Ok(e);
    }
    hosts
        .iter()
        .find_map(|ip| match ip {
            IpAddr::V4(v4) if !ipop::portmap::beyond_another_nat(*v4) && !v4.is_loopback() => {
                Some(SocketAddr::new(*ip, port))
            }
            _ => None,
        })
        .ok_or_else(|| {
            "this device has no public IPv4 address of its own: set [relay] endpoint to the \
             address and port a port forward on the router gives the relay port"
                .to_owned()
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ipop_core::peer_relay::RelayDrop;

    const A: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1)), 4000);
    const B: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(203, 0, 113, 2)), 5000);

    /// A batch buffer whose slot `i` holds a train of `len` bytes from `from`, cut every
    /// `stride` bytes; every byte of a datagram is its index in the train.
    fn batch(trains: &[(SocketAddr, usize, usize)]) -> (Vec<u8>, Vec<RecvMeta>) {
        let mut buf = vec![0u8; trains.len() * MAX_DATAGRAM];
        let mut metas = Vec::new();
        for (slot, &(from, len, stride)) in trains.iter().enumerate() {
            for (i, b) in buf[slot * MAX_DATAGRAM..][..len].iter_mut().enumerate() {
                *b = u8::try_from(i / stride).expect("a short train");
            }
            let mut meta = RecvMeta::default();
            (meta.addr, meta.len, meta.stride) = (from, len, stride);
            metas.push(meta);
        }
        (buf, metas)
    }

    /// Each run as (destination, start, length, segment size).
    fn shape(runs: &[Run], buf: &[u8]) -> Vec<(SocketAddr, usize, usize, Option<usize>)> {
        runs.iter()
            .map(|r| {
                let t = r.transmit(buf);
                let start = t.contents.as_ptr() as usize - buf.as_ptr() as usize;
                (t.destination, start, t.contents.len(), t.segment_size)
            })
            .collect()
    }

    fn to_the_other_side(from: SocketAddr, _: &[u8]) -> PairVerdict {
        PairVerdict::Forward(if from == A { B } else { A })
    }

    #[test]
    fn a_train_forwarded_whole_leaves_in_one_gso_send_from_where_it_lies() {
        let (buf, metas) = batch(&[(A, 560, 100)]);
        let (mut runs, mut replies) = (Vec::new(), Vec::new());
        sort_batch(&buf, &metas, 64, to_the_other_side, &mut runs, &mut replies);
        assert_eq!(shape(&runs, &buf), [(B, 0, 560, Some(100))]);
        assert!(replies.is_empty());
    }

    #[test]
    fn a_datagram_not_forwarded_cuts_the_run_and_a_registration_is_answered() {
        let (buf, metas) = batch(&[(A, 560, 100)]);
        let (mut runs, mut replies) = (Vec::new(), Vec::new());
        let mut judged = Vec::new();
        let verdict = |from: SocketAddr, datagram: &[u8]| {
            judged.push((datagram[0], datagram.len()));
            match datagram[0] {
                2 => PairVerdict::Drop(RelayDrop::OverRate),
                4 => PairVerdict::Reply(vec![0xaa]),
                _ => to_the_other_side(from, datagram),
            }
        };
        sort_batch(&buf, &metas, 64, verdict, &mut runs, &mut replies);
        assert_eq!(
            judged,
            [(0, 100), (1, 100), (2, 100), (3, 100), (4, 100), (5, 60)],
            "every datagram of the train is judged once, in order"
        );
        assert_eq!(
            shape(&runs, &buf),
            [
                (B, 0, 200, Some(100)),
                (B, 300, 100, None),
                (B, 500, 60, None)
            ]
        );
        assert_eq!(replies, [(vec![0xaa], A)]);
    }

    #[test]
    fn slots_go_their_own_ways_and_runs_keep_to_the_segment_limit() {
        let (buf, metas) = batch(&[(A, 500, 100), (B, 150, 150)]);
        let (mut runs, mut replies) = (Vec::new(), Vec::new());
        sort_batch(&buf, &metas, 2, to_the_other_side, &mut runs, &mut replies);
        assert_eq!(
            shape(&runs, &buf),
            [
                (B, 0, 200, Some(100)),
                (B, 200, 200, Some(100)),
                (B, 400, 100, None),
                (A, MAX_DATAGRAM, 150, None),
            ]
        );
        assert!(replies.is_empty());
    }
}
