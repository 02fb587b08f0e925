//! UDP sockets as the data plane and the relay use them: batched receives (`recvmmsg`, with
//! the kernel's GRO merging a flow's datagrams into trains) and batched sends (runs of
//! equal-sized datagrams to one destination in one UDP GSO system call).

use quinn_udp::{RecvMeta, Transmit, UdpSockRef, UdpSocketState};
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use tokio::io::Interest;
use tokio::net::UdpSocket;

/// The most bytes one UDP GSO send may carry: the largest UDP payload of an IPv4 datagram.
const GSO_MAX_BYTES: usize = 65535 - 20 - 8;

pub struct Udp {
    pub socket: UdpSocket,
    pub state: UdpSocketState,
}

impl Udp {
    /// A socket for the main port, with big kernel buffers.
    pub fn bind(addr: SocketAddr) -> io::Result<Udp> {
        Self::bind_with(addr, true)
    }

    pub fn bind_with(addr: SocketAddr, big_buffers: bool) -> io::Result<Udp> {
        let domain = socket2::Domain::for_address(addr);
        let socket =
            socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
        if addr.is_ipv6() {
            socket.set_only_v6(true)?;
        }
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        let state = UdpSocketState::new(UdpSockRef::from(&socket))?;
        // The mark keeps ipop's own datagrams off the tunnel when an exit is in use.
        socket.set_mark(crate::exit::MARK).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot mark the socket (SO_MARK needs CAP_NET_ADMIN): {e}"),
            )
        })?;
        if big_buffers {
            // Bigger kernel buffers absorb bursts while the loop is busy with the other
            // direction.
            let _ = state.set_send_buffer_size(UdpSockRef::from(&socket), 4 << 20);
            let _ = state.set_recv_buffer_size(UdpSockRef::from(&socket), 4 << 20);
        }
        let socket = UdpSocket::from_std(socket.into())?;
        Ok(Udp { socket, state })
    }

    /// One `recvmmsg` if datagrams are waiting (`WouldBlock` if not): a train of
    /// `metas[i].stride`-byte datagrams, `metas[i].len` bytes in all, in each of the first
    /// `n` slots.
    pub fn try_recv(
        &self,
        slots: &mut [IoSliceMut<'_>],
        metas: &mut [RecvMeta],
    ) -> io::Result<usize> {
        self.socket.try_io(Interest::READABLE, || {
            self.state
                .recv(UdpSockRef::from(&self.socket), slots, metas)
        })
    }

    /// As [`Udp::try_recv`], waiting until datagrams come.
    pub async fn recv(
        &self,
        slots: &mut [IoSliceMut<'_>],
        metas: &mut [RecvMeta],
    ) -> io::Result<usize> {
        self.socket
            .async_io(Interest::READABLE, || {
                self.state
                    .recv(UdpSockRef::from(&self.socket), slots, metas)
            })
            .await
    }

    /// As [`Udp::recv`], one train into `buf`: what was received.
    pub async fn recv_train(&self, buf: &mut [u8]) -> io::Result<RecvMeta> {
        let mut meta = RecvMeta::default();
        self.recv(&mut [IoSliceMut::new(buf)], std::slice::from_mut(&mut meta))
            .await?;
        Ok(meta)
    }

    /// Sends, waiting for room in the socket buffer if it is full. Returns whether the kernel
    /// took the datagrams.
    pub async fn send(&self, t: &Transmit<'_>) -> bool {
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

/// A run of datagrams to one destination, back to back in a buffer, all `segment` bytes long
/// but the last, which may be shorter: the shape that one UDP GSO send takes.
pub struct Run {
    pub dst: SocketAddr,
    /// The extra socket it leaves from, if not the main one.
    pub source: Option<u16>,
    start: usize,
    end: usize,
    segment: usize,
    pub count: usize,
    closed: bool,
}

impl Run {
    /// A run of one datagram, `len` bytes at `start`.
    pub fn new(dst: SocketAddr, source: Option<u16>, start: usize, len: usize) -> Self {
        Run {
            dst,
            source,
            start,
            end: start + len,
            segment: len,
            count: 1,
            closed: false,
        }
    }

    /// Whether a datagram of `len` bytes right after the run may join it.
    pub fn extends(
        &self,
        dst: SocketAddr,
        source: Option<u16>,
        len: usize,
        max_segments: usize,
    ) -> bool {
        dst == self.dst
            && source == self.source
            && !self.closed
            && len <= self.segment
            && self.count < max_segments
            && self.end - self.start + len <= GSO_MAX_BYTES
    }

    /// Adds the `len` bytes right after the run.
    pub fn push(&mut self, len: usize) {
        self.end += len;
        self.count += 1;
        self.closed = len < self.segment;
    }

    /// The send of the run, whose bytes are in `buffer`.
    pub fn transmit<'a>(&self, buffer: &'a [u8]) -> Transmit<'a> {
        Transmit {
            destination: self.dst,
            ecn: None,
            contents: &buffer[self.start..self.end],
            segment_size: (self.count > 1).then_some(self.segment),
            src_ip: None,
        }
    }
}
