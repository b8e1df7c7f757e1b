//! Protocol detection on a tunnel stream: the first bytes say HTTP/2 with prior knowledge
//! (the `PRI * HTTP/2.0` preface), HTTP/1.x (a method token and a space), or anything else,
//! which is forwarded as opaque TCP with L4 policy only. gRPC is HTTP/2 whose requests carry
//! `content-type: application/grpc`, told apart per request.
//!
//! [`Rewind`] puts the sniffed bytes back in front of the stream for hyper.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf as _, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The HTTP/2 connection preface.
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Longest method token we wait for before deciding it is not HTTP/1.
const MAX_METHOD: usize = 20;

/// What the first bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detected {
    Http1,
    Http2,
    Tcp,
    /// Not enough bytes to tell yet.
    NeedMore,
}

/// Decides from the bytes read so far.
pub fn detect(buf: &[u8]) -> Detected {
    if buf.is_empty() {
        return Detected::NeedMore;
    }
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return if n == H2_PREFACE.len() {
            Detected::Http2
        } else {
            Detected::NeedMore
        };
    }
    for (i, b) in buf.iter().enumerate().take(MAX_METHOD + 1) {
        match b {
            b'A'..=b'Z' | b'-' | b'_' => continue,
            b' ' if i > 0 => return Detected::Http1,
            _ => return Detected::Tcp,
        }
    }
    if buf.len() > MAX_METHOD {
        Detected::Tcp
    } else {
        Detected::NeedMore
    }
}

/// A stream with some already-read bytes in front.
#[derive(Debug)]
pub struct Rewind<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> Rewind<S> {
    pub fn new(prefix: Bytes, inner: S) -> Self {
        Rewind { prefix, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The sniffed bytes go first, as one chunk; then the stream's own chunks (a tunnel's frames,
/// not copied).
impl<S: ambit_hbone::copy::Pipe> ambit_hbone::copy::Pipe for Rewind<S> {
    fn poll_read_chunk(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut bytes::BytesMut,
        want: usize,
    ) -> Poll<io::Result<Bytes>> {
        if !self.prefix.is_empty() {
            return Poll::Ready(Ok(std::mem::take(&mut self.prefix)));
        }
        self.inner.poll_read_chunk(cx, buf, want)
    }

    fn poll_write_chunk(
        &mut self,
        cx: &mut Context<'_>,
        chunk: &mut Bytes,
    ) -> Poll<io::Result<usize>> {
        self.inner.poll_write_chunk(cx, chunk)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt as _;

    #[test]
    fn detection() {
        let cases: [(&[u8], Detected); 9] = [
            (b"", Detected::NeedMore),
            (b"GET / HTTP/1.1\r\n", Detected::Http1),
            (b"POST", Detected::NeedMore),
            (b"M-SEARCH * HTTP/1.1", Detected::Http1),
            (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", Detected::Http2),
            (b"PRI * HTT", Detected::NeedMore),
            (b"\x16\x03\x01", Detected::Tcp),
            (b"hello", Detected::Tcp),
            (b"AAAAAAAAAAAAAAAAAAAAAAAAA", Detected::Tcp),
        ];
        for (bytes, want) in cases {
            assert_eq!(detect(bytes), want, "{:?}", String::from_utf8_lossy(bytes));
        }
    }

    #[tokio::test]
    async fn rewind_replays() {
        let mut r = Rewind::new(Bytes::from_static(b"ab"), &b"cd"[..]);
        let mut out = String::new();
        r.read_to_string(&mut out).await.expect("read");
        assert_eq!(out, "abcd");
    }
}
