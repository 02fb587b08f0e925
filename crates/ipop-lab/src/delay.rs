//! A UDP delay line: a far-away server in a lab whose kernel has no netem.
//!
//! [`UdpDelay`] listens on an address in a namespace and forwards every datagram to an upstream
//! server, and the server's answers back, each after a fixed delay. Each client gets an upstream
//! socket of its own, as a NAT would give it a port, so the server tells the clients apart (a
//! TURN server keeps one allocation per client). The round trip through it grows by twice the
//! delay.

use crate::netns::Netns;
use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Most clients one delay line serves; datagrams from more are dropped.
const MAX_CLIENTS: usize = 16;
/// Datagrams in flight at most; more are dropped, as a full queue would.
const QUEUE: usize = 8192;
/// How often the threads look at the stop flag.
const POLL: Duration = Duration::from_millis(50);

/// A datagram waiting for its time: due at, the socket it leaves from, where to.
type Delayed = (Instant, Arc<UdpSocket>, SocketAddr, Vec<u8>);

/// A running delay line; it stops when dropped.
pub struct UdpDelay {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    /// One reader per client's upstream socket.
    readers: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl UdpDelay {
    /// Forwards what arrives at `listen` (in `ns`) to `upstream`, and the answers back, `delay`
    /// late each way. Port 0 in `listen` takes a free port: see [`UdpDelay::addr`].
    pub fn start(ns: &Netns, listen: SocketAddr, upstream: SocketAddr, delay: Duration) -> Self {
        let front = ns
            .run_in(move || UdpSocket::bind(listen))
            .unwrap_or_else(|e| panic!("delay line cannot bind {listen}: {e}"));
        let front = Arc::new(front);
        let addr = front.local_addr().expect("bound address");
        // Upstream sockets are opened in the namespace up front, and handed to clients as they
        // come.
        let pool: Vec<UdpSocket> = (0..MAX_CLIENTS)
            .map(|_| {
                ns.run_in(move || UdpSocket::bind(SocketAddr::new(addr.ip(), 0)))
                    .unwrap_or_else(|e| panic!("delay line cannot bind an upstream socket: {e}"))
            })
            .collect();
        let stop = Arc::new(AtomicBool::new(false));
        let readers: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let (queue, delayed) = sync_channel::<Delayed>(QUEUE);
        let sender = std::thread::spawn({
            let stop = stop.clone();
            move || send_when_due(&delayed, &stop)
        });
        let receiver = std::thread::spawn({
            let (stop, readers) = (stop.clone(), readers.clone());
            let mut pool = pool.into_iter();
            let mut clients: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
            move || {
                forward(&front, &stop, |client, bytes| {
                    let socket = match clients.get(&client) {
                        Some(s) => s.clone(),
                        None => {
                            let Some(s) = pool.next() else { return };
                            let s = Arc::new(s);
                            clients.insert(client, s.clone());
                            // The server's answers to this client go back through `front`.
                            let (stop, queue, front, upstream_socket) =
                                (stop.clone(), queue.clone(), front.clone(), s.clone());
                            let reader = std::thread::spawn(move || {
                                forward(&upstream_socket, &stop, |_, bytes| {
                                    push(
                                        &queue,
                                        (Instant::now() + delay, front.clone(), client, bytes),
                                    );
                                });
                            });
                            readers
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .push(reader);
                            s
                        }
                    };
                    push(&queue, (Instant::now() + delay, socket, upstream, bytes));
                });
            }
        });
        UdpDelay {
            addr,
            stop,
            threads: vec![sender, receiver],
            readers,
        }
    }

    /// Where clients send to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for UdpDelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let readers = std::mem::take(&mut *self.readers.lock().unwrap_or_else(|e| e.into_inner()));
        for t in readers {
            let _ = t.join();
        }
    }
}

/// Reads datagrams from `socket` until `stop`, handing each to `f` with its source.
fn forward(socket: &UdpSocket, stop: &AtomicBool, mut f: impl FnMut(SocketAddr, Vec<u8>)) {
    let _ = socket.set_read_timeout(Some(POLL));
    let mut buf = vec![0u8; 65535];
    while !stop.load(Ordering::Relaxed) {
        if let Ok((n, from)) = socket.recv_from(&mut buf) {
            f(from, buf[..n].to_vec());
        }
    }
}

/// Queues a datagram; a full queue drops it, as a congested link would.
fn push(queue: &SyncSender<Delayed>, item: Delayed) {
    let _ = queue.try_send(item);
}

/// Sends each datagram at its time. The delay is the same for all, so the queue is in order.
fn send_when_due(delayed: &Receiver<Delayed>, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        let Ok((due, socket, to, bytes)) = delayed.recv_timeout(POLL) else {
            continue;
        };
        let wait = due.saturating_duration_since(Instant::now());
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
        let _ = socket.send_to(&bytes, to);
    }
}
