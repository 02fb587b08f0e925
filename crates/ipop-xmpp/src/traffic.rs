//! Counting what the session costs the server: bytes on the connection (TLS included, as the
//! server's rate limits count them), stanzas, link signals and their failures.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes written to and read from the server, over every connection of one session.
#[derive(Debug, Default)]
pub struct ByteCounts {
    sent: AtomicU64,
    received: AtomicU64,
}

impl ByteCounts {
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }
}

/// A connection whose bytes are added to [`ByteCounts`].
pub struct Counted<S> {
    inner: S,
    counts: std::sync::Arc<ByteCounts>,
}

impl<S> Counted<S> {
    pub fn new(inner: S, counts: std::sync::Arc<ByteCounts>) -> Self {
        Counted { inner, counts }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            let n = buf.filled().len().saturating_sub(before);
            this.counts.received.fetch_add(n as u64, Ordering::Relaxed);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled {
            this.counts.sent.fetch_add(n as u64, Ordering::Relaxed);
        }
        polled
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = polled {
            this.counts.sent.fetch_add(n as u64, Ordering::Relaxed);
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Stanzas and link signals of one session, for [`crate::XmppStatus::traffic`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Stanzas sent to the server and received from it (nonzas such as stream management
    /// acknowledgements are not stanzas).
    pub stanzas_sent: u64,
    pub stanzas_received: u64,
    /// Bytes written to and read from the connection to the server, TLS included, over every
    /// connection of the session.
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Link signals (Jingle IQs) sent.
    pub signals_sent: u64,
    /// Well-formed link signals received from devices (before the core decides whether to
    /// accept them).
    pub signals_received: u64,
    /// Link offers (`session-initiate`) sent.
    pub offers_sent: u64,
    /// Link offers sent to a device that had one from this session before: retries after a
    /// failure, and new links after one closed.
    pub offers_repeated: u64,
    /// Signals the other side refused (an IQ error).
    pub signals_refused: u64,
    /// Signals not answered within [`crate::SIGNAL_TIMEOUT`].
    pub signals_timed_out: u64,
    /// Signals that could not be sent: the session was offline or its queue full.
    pub signals_unsent: u64,
    /// Signals that never went out because a later one made them moot while they waited in
    /// the send queue (an offer ended before it was sent), or were merged into one (candidates
    /// into the offer they follow).
    pub signals_coalesced: u64,
    /// Stanzas waiting in the send queue now.
    pub send_queue: u64,
    /// The longest a stanza waited in the send queue, in milliseconds.
    pub send_wait_max_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn counts_the_bytes_both_ways() {
        let counts = Arc::new(ByteCounts::default());
        let (ours, mut theirs) = tokio::io::duplex(64);
        let mut counted = Counted::new(ours, counts.clone());
        counted.write_all(b"<presence/>").await.expect("write");
        let mut seen = [0_u8; 11];
        theirs.read_exact(&mut seen).await.expect("read");
        assert_eq!(&seen, b"<presence/>");
        theirs
            .write_all(b"<iq type='result'/>")
            .await
            .expect("write");
        drop(theirs);
        let mut got = Vec::new();
        counted.read_to_end(&mut got).await.expect("read");
        assert_eq!(got, b"<iq type='result'/>");
        assert_eq!((counts.sent(), counts.received()), (11, 19));
    }
}
