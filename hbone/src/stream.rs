//! The byte stream inside one HBONE tunnel: one HTTP/2 `CONNECT` stream seen as a plain
//! `AsyncRead + AsyncWrite`, the same type on the client and the server side.
//!
//! `shutdown()` sends END_STREAM (a TCP half-close, so the peer reads EOF while it can still
//! answer); reading returns EOF once the peer half-closes. Dropping the stream before both
//! directions are closed resets it (RST_STREAM CANCEL), which the peer sees as a connection
//! reset: the tunnel keeps TCP's distinction between a clean close and an abort.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::copy::Pipe;
use crate::Identity;

/// Something kept alive for as long as the stream lives (the client pool uses it to count
/// streams per connection and to keep the connection alive).
pub(crate) type Guard = Box<dyn Send + Sync>;

/// Most bytes one `poll_write` hands to h2. Each write from a slice copies into a fresh
/// buffer (h2 owns what it sends); at 64 KiB those come from the allocator's free lists, while
/// 1 MiB buffers go to `mmap` and back, and the bulk benchmark showed those page faults as
/// most of the tunnel's page faults (236k vs 86k per GiB). Larger writes just take a few
/// calls. The proxies' copy loop writes chunks instead ([`Pipe`]), which are not copied.
const MAX_WRITE_CHUNK: usize = 64 * 1024;

/// Why a tunnel stream failed, before it is surfaced as an [`io::Error`] (the
/// `AsyncRead`/`AsyncWrite` contract).
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The peer reset the stream (RST_STREAM) with this reason, or the connection went away.
    #[error("HBONE stream reset by peer: {0}")]
    Reset(Reason),
    /// The HTTP/2 connection carrying the stream failed.
    #[error("HBONE connection failed: {0}")]
    Connection(#[source] h2::Error),
}

impl StreamError {
    /// Maps an h2 error to the `io::Error` a TCP socket would have given in the same situation,
    /// so code written for `TcpStream` (copy loops, access logs) needs no HBONE special case.
    fn into_io(err: h2::Error) -> io::Error {
        if err.is_io() {
            return err
                .into_io()
                .unwrap_or_else(|| io::Error::from(io::ErrorKind::BrokenPipe));
        }
        let kind = match err.reason() {
            Some(Reason::CANCEL) | Some(Reason::STREAM_CLOSED) | Some(Reason::REFUSED_STREAM) => {
                io::ErrorKind::ConnectionReset
            }
            Some(Reason::NO_ERROR) => io::ErrorKind::BrokenPipe,
            _ if err.is_go_away() => io::ErrorKind::ConnectionAborted,
            _ => io::ErrorKind::Other,
        };
        let inner = match err.reason() {
            Some(reason) if err.is_reset() => StreamError::Reset(reason),
            _ => StreamError::Connection(err),
        };
        io::Error::new(kind, inner)
    }
}

/// One HBONE tunnel: bytes written here come out of the peer's stream and vice versa.
pub struct TunnelStream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received but not yet handed to the reader. HTTP/2 receive flow control is released
    /// only as the reader consumes bytes, so a slow reader slows the sender down instead of
    /// making us buffer without bound.
    pending: Bytes,
    read_eof: bool,
    write_closed: bool,
    peer_identity: Identity,
    peer_addr: SocketAddr,
    _guard: Option<Guard>,
}

impl std::fmt::Debug for TunnelStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelStream")
            .field("stream_id", &self.send.stream_id().as_u32())
            .field("peer_identity", &self.peer_identity)
            .field("peer_addr", &self.peer_addr)
            .field("read_eof", &self.read_eof)
            .field("write_closed", &self.write_closed)
            .finish()
    }
}

impl TunnelStream {
    pub(crate) fn new(
        send: SendStream<Bytes>,
        recv: RecvStream,
        peer_identity: Identity,
        peer_addr: SocketAddr,
        guard: Option<Guard>,
    ) -> Self {
        TunnelStream {
            send,
            recv,
            pending: Bytes::new(),
            read_eof: false,
            write_closed: false,
            peer_identity,
            peer_addr,
            _guard: guard,
        }
    }

    /// The identity the other end proved in the TLS handshake: on the server side, the
    /// client's workload identity (for policy and logs); on the client side, the server's,
    /// which the TLS configuration already checked against the expected one.
    pub fn peer_identity(&self) -> &Identity {
        &self.peer_identity
    }

    /// The socket address of the other end of the HBONE connection (not the tunnel's
    /// `:authority`).
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer_addr
    }

    fn write_error(&mut self, cx: &mut Context<'_>, err: Option<h2::Error>) -> io::Error {
        // A send-side failure says little; the reset reason (if the peer sent one) says why.
        if let Poll::Ready(Ok(reason)) = self.send.poll_reset(cx) {
            return match reason {
                Reason::NO_ERROR | Reason::CANCEL | Reason::STREAM_CLOSED => {
                    io::Error::new(io::ErrorKind::BrokenPipe, StreamError::Reset(reason))
                }
                other => io::Error::new(io::ErrorKind::ConnectionReset, StreamError::Reset(other)),
            };
        }
        match err {
            Some(err) => StreamError::into_io(err),
            None => io::Error::from(io::ErrorKind::BrokenPipe),
        }
    }
}

impl AsyncRead for TunnelStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        while this.pending.is_empty() {
            this.pending = ready!(this.poll_frame_unreleased(cx))?;
            if this.read_eof {
                break;
            }
        }
        let n = this.pending.len().min(buf.remaining());
        buf.put_slice(&this.pending[..n]);
        this.pending.advance(n);
        // Flow control is released as the reader consumes bytes, so a slow reader slows the
        // sender down instead of making us buffer without bound. Fails only if the stream is
        // already gone, and then the next poll says so.
        let _ = this.recv.flow_control().release_capacity(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for TunnelStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if this.write_closed {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "write after shutdown of an HBONE stream",
            )));
        }
        let capacity = ready!(this.poll_send_capacity(cx, buf.len()))?;
        let n = capacity.min(buf.len()).min(MAX_WRITE_CHUNK);
        match this
            .send
            .send_data(Bytes::copy_from_slice(&buf[..n]), false)
        {
            Ok(()) => Poll::Ready(Ok(n)),
            Err(err) => Poll::Ready(Err(this.write_error(cx, Some(err)))),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Data handed to h2 is written by the connection task as soon as it can be; there is
        // no buffer of ours to flush.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.write_closed {
            return Poll::Ready(Ok(()));
        }
        this.write_closed = true;
        match this.send.send_data(Bytes::new(), true) {
            Ok(()) => Poll::Ready(Ok(())),
            Err(err) => Poll::Ready(Err(this.write_error(cx, Some(err)))),
        }
    }
}

impl TunnelStream {
    /// Waits for send capacity for up to `want` bytes; how much was assigned.
    fn poll_send_capacity(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<io::Result<usize>> {
        // Ask for the whole of it; h2 assigns what the peer's windows (stream and connection)
        // allow. We only ever hand h2 bytes it has capacity for, so its internal buffering
        // stays bounded by the flow-control windows.
        self.send.reserve_capacity(want);
        loop {
            let capacity = self.send.capacity();
            if capacity > 0 {
                return Poll::Ready(Ok(capacity));
            }
            match ready!(self.send.poll_capacity(cx)) {
                // Capacity was assigned: loop to read how much.
                Some(Ok(_)) => continue,
                Some(Err(err)) => return Poll::Ready(Err(self.write_error(cx, Some(err)))),
                // The stream can no longer send (reset or closed).
                None => return Poll::Ready(Err(self.write_error(cx, None))),
            }
        }
    }

    /// The next DATA frame's bytes as received (empty at EOF, or for an empty frame), their
    /// flow control not yet released: whoever consumes them releases it.
    fn poll_frame_unreleased(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Bytes>> {
        if self.read_eof {
            return Poll::Ready(Ok(Bytes::new()));
        }
        match ready!(self.recv.poll_data(cx)) {
            None => {
                self.read_eof = true;
                Poll::Ready(Ok(Bytes::new()))
            }
            Some(Ok(data)) => Poll::Ready(Ok(data)),
            // RST_STREAM(NO_ERROR) is the peer saying "I am done, stop sending": for the
            // reader that is an end of stream, not a failure.
            Some(Err(err)) if err.reason() == Some(Reason::NO_ERROR) => {
                self.read_eof = true;
                Poll::Ready(Ok(Bytes::new()))
            }
            Some(Err(err)) => Poll::Ready(Err(StreamError::into_io(err))),
        }
    }
}

/// The copy loop's side of a tunnel: received frames are handed over as they are, and
/// chunks to send go into DATA frames without a copy.
impl Pipe for TunnelStream {
    fn poll_read_chunk(
        &mut self,
        cx: &mut Context<'_>,
        _buf: &mut BytesMut,
        _want: usize,
    ) -> Poll<io::Result<Bytes>> {
        // Bytes a reader left over first, then whole frames. Handing them over is consuming
        // them: the caller holds them as it would hold bytes it had read, so their flow
        // control is released now.
        let data = if !self.pending.is_empty() {
            std::mem::take(&mut self.pending)
        } else {
            loop {
                let frame = ready!(self.poll_frame_unreleased(cx))?;
                // An empty DATA frame is not EOF; EOF is `read_eof`.
                if !frame.is_empty() || self.read_eof {
                    break frame;
                }
            }
        };
        // Fails only if the stream is already gone, and then the next poll says so.
        let _ = self.recv.flow_control().release_capacity(data.len());
        Poll::Ready(Ok(data))
    }

    fn poll_write_chunk(
        &mut self,
        cx: &mut Context<'_>,
        chunk: &mut Bytes,
    ) -> Poll<io::Result<usize>> {
        if chunk.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if self.write_closed {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "write after shutdown of an HBONE stream",
            )));
        }
        let capacity = ready!(self.poll_send_capacity(cx, chunk.len()))?;
        let n = capacity.min(chunk.len());
        match self.send.send_data(chunk.split_to(n), false) {
            Ok(()) => Poll::Ready(Ok(n)),
            Err(err) => Poll::Ready(Err(self.write_error(cx, Some(err)))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What callers rely on: a tunnel goes wherever a `TcpStream` goes (spawned tasks,
    /// `copy_bidirectional`, boxed as `dyn AsyncRead + AsyncWrite`).
    #[test]
    fn tunnel_stream_is_a_plain_async_byte_stream() {
        fn plain<T: AsyncRead + AsyncWrite + Unpin + Send + Sync + 'static>() {}
        plain::<TunnelStream>();
    }
}
