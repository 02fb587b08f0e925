//! Connections to TURN servers over a stream, plain TCP or TLS over TCP, for where UDP is
//! blocked: one task each does the I/O, the packet loop does the framing.
//!
//! Nothing is allocated per packet, and memory is bounded:
//! - Out: the loop appends each frame to the connection's outbox, a byte queue of at most
//!   [`OUTBOX_BYTES`]. The task takes the whole queue at once (swapping it with its spare
//!   buffer) and writes it with one `write_all` and one flush: many frames per system call and
//!   per TLS record. When the queue is full (the server reads slower than the tunnel sends),
//!   the frame is dropped and counted, as a full network queue would drop it.
//! - In: the task reads into buffers taken from a small pool and hands each read to the loop
//!   over a bounded channel; when the loop falls behind, the task stops reading and TCP slows the
//!   server down. The loop cuts the frames out with the core's [`StreamFramer`] and gives the
//!   buffer back to the pool.

use ipop_core::osn::{IceServer, IceTransport};
use ipop_core::turn::{FramingError, StreamFramer};
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::{self, pki_types::ServerName};

/// How long connecting to a TURN server over TCP, and the TLS handshake, may take.
const STREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long after an attempt a lost or refused connection is tried again.
const STREAM_RETRY: Duration = Duration::from_secs(5);
/// The most bytes waiting to be written to one connection: about 180 full-size frames.
pub const OUTBOX_BYTES: usize = 256 * 1024;
/// The most one read takes from a connection.
const READ_BYTES: usize = 64 * 1024;
/// Reads that may wait for the loop, over all connections.
const READS_QUEUED: usize = 8;
/// Read buffers kept for reuse.
const POOL_BUFFERS: usize = READS_QUEUED + 4;

/// Bytes read from one connection.
pub struct Chunk {
    server: SocketAddr,
    connection: u64,
    bytes: Vec<u8>,
}

/// Every stream connection of the data plane.
pub struct Streams {
    connections: HashMap<SocketAddr, Connection>,
    /// Reads from every connection, in order per connection.
    pub incoming: mpsc::Receiver<Chunk>,
    to_plane: mpsc::Sender<Chunk>,
    pool: Arc<Mutex<Vec<Vec<u8>>>>,
    next_id: u64,
    /// A CA certificate file trusted besides the system's roots (`[xmpp] ca_file`).
    pub extra_ca: Option<PathBuf>,
    /// Made for the first server reached over TLS.
    tls: Option<TlsConnector>,
    /// Frames dropped because a connection's outbox was full.
    pub dropped: u64,
}

/// One connection: its task, what it writes, and the loop's framer for what it reads.
struct Connection {
    id: u64,
    opened: Instant,
    outbox: Arc<Outbox>,
    framer: StreamFramer,
    task: JoinHandle<()>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What the loop has for a connection's task to write.
struct Outbox {
    queue: Mutex<Vec<u8>>,
    ready: Notify,
    /// Set by the task when the connection has ended.
    closed: AtomicBool,
}

impl Streams {
    pub fn new() -> Self {
        let (to_plane, incoming) = mpsc::channel(READS_QUEUED);
        Streams {
            connections: HashMap::new(),
            incoming,
            to_plane,
            pool: Arc::new(Mutex::new(Vec::new())),
            next_id: 0,
            extra_ca: None,
            tls: None,
            dropped: 0,
        }
    }

    /// Opens the connection to `server` unless it is open or was tried moments ago.
    pub fn connect(&mut self, server: IceServer) {
        let now = Instant::now();
        if self.connections.get(&server.address).is_some_and(|c| {
            !c.outbox.closed.load(Ordering::Relaxed) || now.duration_since(c.opened) < STREAM_RETRY
        }) {
            return;
        }
        let tls = match server.transport {
            IceTransport::Tls => match self.tls_connector() {
                Ok(tls) => Some(tls),
                Err(e) => {
                    tracing::warn!(server = %server.address, host = %server.host, "no TLS with the TURN server: {e}");
                    return;
                }
            },
            IceTransport::Tcp | IceTransport::Udp => None,
        };
        let outbox = Arc::new(Outbox {
            queue: Mutex::new(Vec::with_capacity(OUTBOX_BYTES)),
            ready: Notify::new(),
            closed: AtomicBool::new(false),
        });
        self.next_id += 1;
        let io = Io {
            server: server.address,
            connection: self.next_id,
            outbox: outbox.clone(),
            to_plane: self.to_plane.clone(),
            pool: self.pool.clone(),
        };
        let task = tokio::spawn(stream_task(server.clone(), tls, io));
        self.connections.insert(
            server.address,
            Connection {
                id: self.next_id,
                opened: now,
                outbox,
                framer: StreamFramer::new(),
                task,
            },
        );
    }

    /// The TLS client: the system's roots and the extra CA, as the XMPP login trusts them.
    pub fn tls_connector(&mut self) -> Result<TlsConnector, ipop_xmpp::LoginError> {
        if let Some(tls) = &self.tls {
            return Ok(tls.clone());
        }
        let config = ipop_xmpp::tls_config(self.extra_ca.as_deref())?;
        let tls = TlsConnector::from(Arc::new(config));
        self.tls = Some(tls.clone());
        Ok(tls)
    }

    /// Queues `frame` for `server`'s connection. The task is woken by [`Streams::flush`].
    pub fn send(&mut self, server: SocketAddr, frame: &[u8]) {
        let Some(c) = self.connections.get(&server) else {
            tracing::debug!(%server, "no connection to this TURN server");
            return;
        };
        let Ok(mut queue) = c.outbox.queue.lock() else {
            return;
        };
        if queue.len() + frame.len() > OUTBOX_BYTES {
            self.dropped += 1;
            return;
        }
        queue.extend_from_slice(frame);
    }

    /// Wakes the tasks of the connections that have frames to write.
    pub fn flush(&self) {
        for c in self.connections.values() {
            if c.outbox.queue.lock().is_ok_and(|q| !q.is_empty()) {
                c.outbox.ready.notify_one();
            }
        }
    }

    /// Cuts the frames out of a read and calls `each` with each, in order. A read from a
    /// connection that has since been replaced is ignored. When the stream is out of step, the
    /// connection is closed (and opened again by [`Streams::connect`]).
    pub fn frames(&mut self, chunk: Chunk, mut each: impl FnMut(SocketAddr, &[u8])) {
        let server = chunk.server;
        if let Some(c) = self
            .connections
            .get_mut(&server)
            .filter(|c| c.id == chunk.connection)
            && let Err(e) = cut(&mut c.framer, &chunk.bytes, |f| each(server, f))
        {
            tracing::warn!(%server, "TURN stream out of step: {e}");
            self.connections.remove(&server);
        }
        if let Ok(mut pool) = self.pool.lock()
            && pool.len() < POOL_BUFFERS
        {
            let mut bytes = chunk.bytes;
            bytes.clear();
            pool.push(bytes);
        }
    }
}

fn cut(
    framer: &mut StreamFramer,
    bytes: &[u8],
    mut each: impl FnMut(&[u8]),
) -> Result<(), FramingError> {
    framer.push(bytes)?;
    while let Some(frame) = framer.next_frame()? {
        each(frame);
    }
    Ok(())
}

/// A connection to a TURN server: TCP, or TLS over TCP.
pub(crate) trait TurnStream: AsyncRead + AsyncWrite + Unpin + Send {}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> TurnStream for S {}

/// A connection task's ends of the queues.
struct Io {
    server: SocketAddr,
    connection: u64,
    outbox: Arc<Outbox>,
    to_plane: mpsc::Sender<Chunk>,
    pool: Arc<Mutex<Vec<Vec<u8>>>>,
}

/// Connects to `server` (with TLS when `tls` is given) and carries bytes both ways until the
/// connection ends.
async fn stream_task(server: IceServer, tls: Option<TlsConnector>, io: Io) {
    let over = if tls.is_some() { "TLS" } else { "TCP" };
    let (address, host) = (server.address, &server.host);
    match tokio::time::timeout(STREAM_CONNECT_TIMEOUT, open_stream(&server, tls)).await {
        Ok(Ok(stream)) => {
            tracing::info!(server = %address, %host, "connected to the TURN server over {over}");
            if let Err(e) = carry(stream, &io).await {
                tracing::warn!(server = %address, "TURN connection lost: {e}");
            }
        }
        Ok(Err(reason)) => {
            tracing::warn!(server = %address, %host, "cannot use the TURN server over {over}: {reason}");
        }
        Err(_) => {
            tracing::warn!(
                server = %address,
                %host,
                "no {over} connection to the TURN server within {}s",
                STREAM_CONNECT_TIMEOUT.as_secs()
            );
        }
    }
    io.outbox.closed.store(true, Ordering::Relaxed);
}

/// The TCP connection to `server`, wrapped in TLS when `tls` is given; the certificate must be
/// valid for the server's host name.
pub(crate) async fn open_stream(
    server: &IceServer,
    tls: Option<TlsConnector>,
) -> Result<Box<dyn TurnStream>, String> {
    let tcp = TcpStream::connect(server.address)
        .await
        .map_err(|e| format!("cannot connect: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let Some(tls) = tls else {
        return Ok(Box::new(tcp));
    };
    let name = ServerName::try_from(server.host.clone()).map_err(|e| {
        format!(
            "{:?} is not a name its certificate can be checked against: {e}",
            server.host
        )
    })?;
    match tls.connect(name, tcp).await {
        Ok(stream) => Ok(Box::new(stream)),
        Err(e) => Err(tls_failure(&e, &server.host)),
    }
}

/// Why a TLS handshake with a TURN server failed, in words.
fn tls_failure(e: &io::Error, host: &str) -> String {
    match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(rustls::Error::InvalidCertificate(cert)) => format!(
            "its certificate is refused: {}",
            ipop_xmpp::describe_certificate_error(cert, host)
        ),
        Some(other) => format!("the TLS handshake failed: {other}"),
        None => format!("the TLS handshake failed: {e}"),
    }
}

/// Writes what the outbox holds and hands reads to the loop, until the connection ends (an
/// error) or the loop is gone (`Ok`).
async fn carry(stream: Box<dyn TurnStream>, io: &Io) -> io::Result<()> {
    let (mut read, mut write) = tokio::io::split(stream);
    let writer = async {
        let mut batch = Vec::with_capacity(OUTBOX_BYTES);
        loop {
            io.outbox.ready.notified().await;
            if let Ok(mut queue) = io.outbox.queue.lock() {
                std::mem::swap(&mut *queue, &mut batch);
            }
            if batch.is_empty() {
                continue;
            }
            write.write_all(&batch).await?;
            // TLS holds written data back until it is flushed.
            write.flush().await?;
            batch.clear();
        }
    };
    let reader = async {
        loop {
            let mut bytes = io
                .pool
                .lock()
                .ok()
                .and_then(|mut p| p.pop())
                .unwrap_or_else(|| Vec::with_capacity(READ_BYTES));
            bytes.reserve(READ_BYTES);
            let n = read.read_buf(&mut bytes).await?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the TURN server closed the connection",
                ));
            }
            let chunk = Chunk {
                server: io.server,
                connection: io.connection,
                bytes,
            };
            if io.to_plane.send(chunk).await.is_err() {
                return Ok(());
            }
        }
    };
    tokio::select! {
        r = writer => r,
        r = reader => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ipop_core::osn::IceServerKind;
    use ipop_lab::{TestCa, TestDir};
    use tokio::net::TcpListener;
    use tokio_rustls::TlsAcceptor;
    use tokio_rustls::rustls::ServerConfig;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

    /// A TLS server on loopback with a certificate for `host` signed by `ca`; it sends back
    /// the first bytes of each connection.
    async fn echo_server(ca: &TestCa, host: &str) -> SocketAddr {
        let issued = ca.issue(&[host]);
        let chain =
            vec![CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).expect("certificate")];
        let key = PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes()).expect("key");
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .expect("server configuration");
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("listen");
        let addr = listener.local_addr().expect("address");
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut buf = [0u8; 64];
                    if let Ok(n) = tls.read(&mut buf).await {
                        let _ = tls.write_all(&buf[..n]).await;
                        let _ = tls.flush().await;
                    }
                });
            }
        });
        addr
    }

    fn turn_over_tls(host: &str, address: SocketAddr) -> IceServer {
        IceServer {
            kind: IceServerKind::Turn,
            host: host.to_owned(),
            address,
            transport: IceTransport::Tls,
            username: None,
            password: None,
        }
    }

    #[tokio::test]
    async fn tls_to_a_turn_server_checks_its_certificate_against_its_host_name() {
        let ca = TestCa::new("ipop test CA");
        let dir = TestDir::new("turn-tls");
        let ca_file = dir.path().join("ca.crt");
        std::fs::write(&ca_file, ca.pem()).expect("CA file written");
        let mut streams = Streams::new();
        streams.extra_ca = Some(ca_file);
        let tls = streams.tls_connector().expect("TLS client");
        let addr = echo_server(&ca, "turn.example.org").await;

        let opened = open_stream(&turn_over_tls("turn.example.org", addr), Some(tls.clone())).await;
        let Ok(mut stream) = opened else {
            panic!("a certificate for the host name is accepted");
        };
        stream.write_all(b"ping").await.expect("write");
        stream.flush().await.expect("flush");
        let mut answer = [0u8; 4];
        stream.read_exact(&mut answer).await.expect("read");
        assert_eq!(&answer, b"ping");

        let other = open_stream(&turn_over_tls("relay.example.org", addr), Some(tls)).await;
        let reason = other
            .err()
            .expect("a certificate for another name is refused");
        assert!(
            reason.contains("certificate is refused")
                && reason.contains("not valid for relay.example.org"),
            "{reason}"
        );

        let system_roots_only = Streams::new().tls_connector().expect("TLS client");
        let unknown = open_stream(
            &turn_over_tls("turn.example.org", addr),
            Some(system_roots_only),
        )
        .await;
        let reason = unknown
            .err()
            .expect("a private CA is not trusted unless given");
        assert!(reason.contains("unknown authority"), "{reason}");
    }

    fn turn_over_tcp(address: SocketAddr) -> IceServer {
        IceServer {
            kind: IceServerKind::Turn,
            host: "127.0.0.1".to_owned(),
            address,
            transport: IceTransport::Tcp,
            username: None,
            password: None,
        }
    }

    /// ChannelData on channel 0x4000 with `len` bytes of `fill` (a multiple of four: no padding).
    fn channel_data(len: u16, fill: u8) -> Vec<u8> {
        let mut frame = vec![0x40, 0x00];
        frame.extend_from_slice(&len.to_be_bytes());
        frame.resize(4 + usize::from(len), fill);
        frame
    }

    #[tokio::test]
    async fn frames_go_out_in_few_writes_and_come_back_whole_from_pieces() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("listen");
        let addr = listener.local_addr().expect("address");
        let frames: Vec<Vec<u8>> = (0..100u8)
            .map(|i| channel_data(4 * (u16::from(i) + 1), i))
            .collect();
        let total: usize = frames.iter().map(Vec::len).sum();
        // The server counts the reads it needs for everything, then sends it back 7 bytes at
        // a time.
        let server = tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.expect("accept");
            let mut got = Vec::new();
            let mut reads = 0;
            let mut buf = vec![0u8; 1 << 16];
            while got.len() < total {
                let n = tcp.read(&mut buf).await.expect("read");
                assert!(n > 0, "the client closed early");
                got.extend_from_slice(&buf[..n]);
                reads += 1;
            }
            for piece in got.chunks(7) {
                tcp.write_all(piece).await.expect("write");
                tcp.flush().await.expect("flush");
            }
            reads
        });

        let mut streams = Streams::new();
        streams.connect(turn_over_tcp(addr));
        for f in &frames {
            streams.send(addr, f);
        }
        streams.flush();
        let mut back = Vec::new();
        while back.len() < frames.len() {
            let chunk = tokio::time::timeout(Duration::from_secs(5), streams.incoming.recv())
                .await
                .expect("the frames come back within 5 s")
                .expect("a read");
            streams.frames(chunk, |server, frame| {
                assert_eq!(server, addr);
                back.push(frame.to_vec());
            });
        }
        assert_eq!(back, frames, "every frame, whole and in order");
        let reads = server.await.expect("server");
        assert!(
            reads <= 4,
            "100 frames queued together reach the server in {reads} reads"
        );
        assert_eq!(streams.dropped, 0);
    }

    #[tokio::test]
    async fn a_full_outbox_drops_and_counts_what_does_not_fit() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("listen");
        let addr = listener.local_addr().expect("address");
        let mut streams = Streams::new();
        streams.connect(turn_over_tcp(addr));
        let frame = channel_data(1020, 1);
        let fit = OUTBOX_BYTES / frame.len();
        for _ in 0..fit + 10 {
            streams.send(addr, &frame);
        }
        assert_eq!(streams.dropped, 10, "the outbox holds {fit} frames");
        drop(listener);
    }
}
