//! This device as a relay for its friends and fellow members (`[relay] enabled = true`): the
//! sockets around the core's [`RelayServer`]. Registrations come to the control port; every
//! pair gets a UDP port of its own, whose datagrams a task of its own forwards. The relay runs
//! beside the packet loop and never touches the tunnel.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use ipop::status::{RelayPair, RelayStatus};
use ipop_core::peer_relay::{PairVerdict, RelayLimits, RelayServer, TOKEN_LEN};
use tokio::net::UdpSocket;
use tokio::task::{AbortHandle, JoinHandle, JoinSet};

/// How often pairs nobody registers for are looked for.
const EXPIRE_EVERY: Duration = Duration::from_secs(5);
/// The largest datagram forwarded.
const MAX_DATAGRAM: usize = 65_535;

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
        let control = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port))
            .await
            .map_err(|e| anyhow::anyhow!("[relay]: cannot bind UDP port {port}: {e}"))?;
        let port = control.local_addr()?.port();
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
async fn serve(control: UdpSocket, server: Arc<Mutex<RelayServer>>) {
    // The pairs' tasks end with this one (the set aborts them when dropped).
    let mut tasks = JoinSet::new();
    let mut pairs: HashMap<u16, AbortHandle> = HashMap::new();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut expire = tokio::time::interval(EXPIRE_EVERY);
    loop {
        tokio::select! {
            got = control.recv_from(&mut buf) => {
                let Ok((n, from)) = got else { continue };
                let mut opened = None;
                let answer = lock(&server).handle_control(Instant::now(), from, &buf[..n], || {
                    let socket = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).ok()?;
                    let port = socket.local_addr().ok()?.port();
                    opened = Some(socket);
                    Some(port)
                });
                if let Some(socket) = opened
                    .and_then(|s| s.set_nonblocking(true).ok().map(|()| s))
                    .and_then(|s| UdpSocket::from_std(s).ok())
                    && let Ok(local) = socket.local_addr()
                {
                    pairs.insert(local.port(), tasks.spawn(forward(socket, server.clone())));
                }
                if let Some(answer) = answer {
                    let _ = control.send_to(&answer, from).await;
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
async fn forward(socket: UdpSocket, server: Arc<Mutex<RelayServer>>) {
    let Ok(port) = socket.local_addr().map(|a| a.port()) else {
        return;
    };
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let Ok((n, from)) = socket.recv_from(&mut buf).await else {
            continue;
        };
        let verdict = lock(&server).handle_pair(Instant::now(), port, from, &buf[..n]);
        match verdict {
            PairVerdict::Reply(answer) => {
                let _ = socket.send_to(&answer, from).await;
            }
            PairVerdict::Forward(to) => {
                let _ = socket.send_to(&buf[..n], to).await;
            }
            PairVerdict::Drop(_) => {}
        }
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
