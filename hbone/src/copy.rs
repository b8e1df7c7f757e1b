//! Bidirectional copy between two byte streams (a workload's TCP socket and an HBONE
//! tunnel, or two tunnels), moving whole buffers rather than copying between them.
//!
//! Bytes read from one side are cut from a read buffer as a [`Bytes`] chunk and handed to the
//! other side as they are: an HBONE stream sends that chunk as HTTP/2 DATA without copying it,
//! and gives the frames it receives as chunks to write to the socket. With plain
//! `AsyncRead`/`AsyncWrite` each of those steps was a memmove (a tenth of a bulk flow's
//! cycles in the profile), so both sides of the copy are [`Pipe`]s: any byte stream, with a
//! chunk interface that a stream holding its own buffers overrides.
//!
//! Most proxied connections are short and chatty, or idle; a few are bulk transfers. A
//! direction holds a read buffer only while bytes flow: it is allocated for a read and let go
//! when the socket has nothing more to give, so an idle connection holds none, and its size
//! starts at [`INITIAL_BUFFER`] and doubles (up to [`MAX_BUFFER`]) each time a read fills it.
//!
//! Half-close is preserved: when one side reaches EOF, the other side's write half is shut
//! down (for a tunnel, END_STREAM) and the opposite direction keeps flowing until it ends too.

use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite};

/// Size a direction's reads start at.
pub const INITIAL_BUFFER: usize = 16 * 1024;
/// Size a direction's reads may grow to: a quarter of a MiB is four socket reads per MiB of
/// a bulk flow, and stays in the allocator's segments rather than going to `mmap`.
pub const MAX_BUFFER: usize = 256 * 1024;

/// Where in its cache line each read from a socket starts. The next copy of those bytes is
/// usually rustls's, into a TLS record whose payload starts 5 bytes (after an HTTP/2 frame
/// header, 14) into a line-aligned buffer. glibc's memcpy uses `rep movsb` at these sizes,
/// and on AMD EPYC (this project's benchmark machine) that runs at a third of its speed when
/// the destination lies 1 to 15 bytes past the source modulo 64, which is exactly where a
/// read into a fresh, aligned buffer put it: 16 KiB copies of uncached data measured 2.7
/// GB/s against 6.8 GB/s, and in a profile of the bulk benchmark rustls's copy into its
/// records fell from 356 to 53 samples per GB with reads moved to mid-line. Mid-line keeps
/// the distance at 37 or 46 bytes for both record layouts. It costs under 64 bytes of room
/// per read.
const READ_OFFSET: usize = 32;
const CACHE_LINE: usize = 64;

/// A byte stream the copy moves chunks through. The provided methods read into the copy's
/// buffer and write from a chunk's bytes, which suits a socket; a stream that holds its
/// bytes in buffers of its own (an HBONE tunnel's frames) overrides them to hand those
/// buffers over instead of copying.
pub trait Pipe: AsyncRead + AsyncWrite + Unpin {
    /// Reads what is available, at most `want` bytes, as one chunk; an empty chunk is EOF.
    /// `buf` is the direction's read room: a chunk is cut from it, and it is grown first when
    /// it has less than `want` spare.
    fn poll_read_chunk(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
        want: usize,
    ) -> Poll<io::Result<Bytes>> {
        // Room for the read and for moving its start to READ_OFFSET in its cache line.
        if buf.capacity() - buf.len() < want + CACHE_LINE {
            buf.reserve(want + CACHE_LINE);
        }
        if buf.is_empty() {
            let start = buf.as_ptr() as usize;
            let pad = READ_OFFSET.wrapping_sub(start) % CACHE_LINE;
            buf.put_bytes(0, pad);
            buf.advance(pad);
        }
        let mut room = (&mut *buf).limit(want);
        ready!(tokio_util::io::poll_read_buf(
            Pin::new(&mut *self),
            cx,
            &mut room
        ))?;
        // What was read; the spare room stays for the next read.
        Poll::Ready(Ok(buf.split().freeze()))
    }

    /// Writes a prefix of `chunk`, advances `chunk` past it and says how long it was.
    fn poll_write_chunk(
        &mut self,
        cx: &mut Context<'_>,
        chunk: &mut Bytes,
    ) -> Poll<io::Result<usize>> {
        let n = ready!(Pin::new(&mut *self).poll_write(cx, chunk))?;
        chunk.advance(n);
        Poll::Ready(Ok(n))
    }
}

impl Pipe for tokio::net::TcpStream {}
impl Pipe for tokio::net::UnixStream {}
impl Pipe for tokio::io::DuplexStream {}

impl<T: Pipe + ?Sized> Pipe for &mut T {
    fn poll_read_chunk(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
        want: usize,
    ) -> Poll<io::Result<Bytes>> {
        (**self).poll_read_chunk(cx, buf, want)
    }

    fn poll_write_chunk(
        &mut self,
        cx: &mut Context<'_>,
        chunk: &mut Bytes,
    ) -> Poll<io::Result<usize>> {
        (**self).poll_write_chunk(cx, chunk)
    }
}

impl<T: Pipe + ?Sized> Pipe for Box<T> {
    fn poll_read_chunk(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
        want: usize,
    ) -> Poll<io::Result<Bytes>> {
        (**self).poll_read_chunk(cx, buf, want)
    }

    fn poll_write_chunk(
        &mut self,
        cx: &mut Context<'_>,
        chunk: &mut Bytes,
    ) -> Poll<io::Result<usize>> {
        (**self).poll_write_chunk(cx, chunk)
    }
}

/// Any byte stream as a [`Pipe`] with the provided (copying) methods, for streams of other
/// crates (an upgraded hyper connection).
#[derive(Debug)]
pub struct Plain<T>(pub T);

impl<T: AsyncRead + Unpin> AsyncRead for Plain<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Plain<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> Pipe for Plain<T> {}

/// Bytes moved in each direction, as far as the copy got.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Transferred {
    /// Bytes read from `a` and written to `b`.
    pub a_to_b: u64,
    /// Bytes read from `b` and written to `a`.
    pub b_to_a: u64,
}

/// Why a bidirectional copy stopped early. Each variant carries what was transferred until
/// then, because access logs and metrics want the byte counts of failed connections too.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    /// Reading from `a`, or writing or shutting down `b`, failed.
    #[error("copy a->b failed after {} bytes a->b, {} bytes b->a: {source}", .transferred.a_to_b, .transferred.b_to_a)]
    AToB {
        transferred: Transferred,
        #[source]
        source: io::Error,
    },
    /// Reading from `b`, or writing or shutting down `a`, failed.
    #[error("copy b->a failed after {} bytes a->b, {} bytes b->a: {source}", .transferred.a_to_b, .transferred.b_to_a)]
    BToA {
        transferred: Transferred,
        #[source]
        source: io::Error,
    },
}

impl CopyError {
    /// What was transferred before the failure.
    pub fn transferred(&self) -> Transferred {
        match self {
            CopyError::AToB { transferred, .. } | CopyError::BToA { transferred, .. } => {
                *transferred
            }
        }
    }
}

/// One direction of the copy.
struct Direction {
    /// Read room; empty (no allocation) while the reader has nothing to give.
    buf: BytesMut,
    /// How much the next read asks for.
    want: usize,
    /// Read and not yet written.
    chunk: Bytes,
    read_eof: bool,
    /// Written since the last flush.
    unflushed: bool,
    done: bool,
    amount: u64,
}

impl Direction {
    fn new() -> Self {
        Direction {
            buf: BytesMut::new(),
            want: INITIAL_BUFFER,
            chunk: Bytes::new(),
            read_eof: false,
            unflushed: false,
            done: false,
            amount: 0,
        }
    }

    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
        writer: &mut W,
    ) -> Poll<io::Result<()>>
    where
        R: Pipe + ?Sized,
        W: Pipe + ?Sized,
    {
        loop {
            if self.chunk.is_empty() && !self.read_eof {
                match reader.poll_read_chunk(cx, &mut self.buf, self.want) {
                    Poll::Pending => {
                        // Nothing to read for now: an idle connection keeps no read buffer
                        // (what was cut from it lives on in chunks still being sent).
                        self.buf = BytesMut::new();
                        // Push out what we wrote before waiting.
                        if self.unflushed {
                            ready!(Pin::new(&mut *writer).poll_flush(cx))?;
                            self.unflushed = false;
                        }
                        return Poll::Pending;
                    }
                    Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                    Poll::Ready(Ok(chunk)) => {
                        if chunk.is_empty() {
                            self.read_eof = true;
                        } else {
                            if chunk.len() >= self.want {
                                self.want = (self.want * 2).min(MAX_BUFFER);
                            }
                            self.chunk = chunk;
                        }
                    }
                }
            }
            while !self.chunk.is_empty() {
                let n = ready!(writer.poll_write_chunk(cx, &mut self.chunk))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.amount += n as u64;
                self.unflushed = true;
            }
            if self.read_eof {
                // Pass the half-close on; the other direction carries on independently.
                ready!(Pin::new(&mut *writer).poll_flush(cx))?;
                self.unflushed = false;
                ready!(Pin::new(&mut *writer).poll_shutdown(cx))?;
                self.done = true;
                // Release the buffer now; the other direction may run for a long time.
                self.buf = BytesMut::new();
                return Poll::Ready(Ok(()));
            }
        }
    }
}

/// Copies `a` to `b` and `b` to `a` until both directions reach EOF, shutting down the write
/// half of each side when the other side's read half ends. Returns the bytes moved each way.
pub async fn copy_bidirectional<A, B>(a: &mut A, b: &mut B) -> Result<Transferred, CopyError>
where
    A: Pipe + ?Sized,
    B: Pipe + ?Sized,
{
    match copy_bidirectional_until(a, b, std::future::pending::<std::convert::Infallible>()).await?
    {
        Copied::Finished(transferred) => Ok(transferred),
        Copied::Stopped { by, .. } => match by {},
    }
}

/// How a copy that could be stopped from outside ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Copied<S> {
    /// Both directions reached EOF.
    Finished(Transferred),
    /// `stop` completed first (with `by`); the copy went no further.
    Stopped {
        /// Bytes moved until then.
        transferred: Transferred,
        /// What `stop` resolved to (why the caller stopped it).
        by: S,
    },
}

/// [`copy_bidirectional`] that also ends when `stop` completes, with the bytes moved so far
/// (dropping the copy future instead would lose them, and access logs want them). The
/// streams are left as they are: closing them is the caller's business.
pub async fn copy_bidirectional_until<A, B, S>(
    a: &mut A,
    b: &mut B,
    stop: S,
) -> Result<Copied<S::Output>, CopyError>
where
    A: Pipe + ?Sized,
    B: Pipe + ?Sized,
    S: Future,
{
    let mut a_to_b = Direction::new();
    let mut b_to_a = Direction::new();
    let mut stop = std::pin::pin!(stop);
    poll_fn(|cx| {
        let transferred = |x: &Direction, y: &Direction| Transferred {
            a_to_b: x.amount,
            b_to_a: y.amount,
        };
        if let Poll::Ready(by) = stop.as_mut().poll(cx) {
            return Poll::Ready(Ok(Copied::Stopped {
                transferred: transferred(&a_to_b, &b_to_a),
                by,
            }));
        }
        if !a_to_b.done {
            if let Poll::Ready(Err(source)) = a_to_b.poll_copy(cx, &mut *a, &mut *b) {
                return Poll::Ready(Err(CopyError::AToB {
                    transferred: transferred(&a_to_b, &b_to_a),
                    source,
                }));
            }
        }
        if !b_to_a.done {
            if let Poll::Ready(Err(source)) = b_to_a.poll_copy(cx, &mut *b, &mut *a) {
                return Poll::Ready(Err(CopyError::BToA {
                    transferred: transferred(&a_to_b, &b_to_a),
                    source,
                }));
            }
        }
        if a_to_b.done && b_to_a.done {
            Poll::Ready(Ok(Copied::Finished(transferred(&a_to_b, &b_to_a))))
        } else {
            Poll::Pending
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn reads_start_mid_cache_line_and_keep_every_byte() {
        // A fresh buffer from the allocator is line-aligned; each chunk must start at
        // READ_OFFSET within its line whatever the size of the read before it, and the bytes
        // must be exactly those sent.
        let (mut writer, mut reader) = tokio::io::duplex(1024 * 1024);
        let sent: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
        writer.write_all(&sent).await.unwrap();
        drop(writer);
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for want in [16 * 1024, 1000, 7, 64 * 1024, 33, 256 * 1024]
            .into_iter()
            .cycle()
        {
            let chunk = poll_fn(|cx| reader.poll_read_chunk(cx, &mut buf, want))
                .await
                .unwrap();
            if chunk.is_empty() {
                break;
            }
            assert!(chunk.len() <= want);
            assert_eq!(
                chunk.as_ptr() as usize % CACHE_LINE,
                READ_OFFSET,
                "a read of {} bytes after {} bytes",
                chunk.len(),
                got.len()
            );
            got.extend_from_slice(&chunk);
        }
        assert_eq!(got, sent);
    }

    #[tokio::test]
    async fn copies_both_ways_and_passes_half_close_on() {
        // client <-> (a | copy | b) <-> server
        let (mut client, mut a) = tokio::io::duplex(64 * 1024);
        let (mut b, mut server) = tokio::io::duplex(64 * 1024);
        let copy = tokio::spawn(async move { copy_bidirectional(&mut a, &mut b).await });

        let upload: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let expected = upload.clone();
        let server_task = tokio::spawn(async move {
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.unwrap();
            // The client half-closed; the server can still answer.
            server.write_all(b"reply after eof").await.unwrap();
            server.shutdown().await.unwrap();
            got
        });
        client.write_all(&upload).await.unwrap();
        client.shutdown().await.unwrap();
        let mut reply = Vec::new();
        client.read_to_end(&mut reply).await.unwrap();

        assert_eq!(server_task.await.unwrap(), expected);
        assert_eq!(reply, b"reply after eof");
        let transferred = copy.await.unwrap().unwrap();
        assert_eq!(
            transferred,
            Transferred {
                a_to_b: 3_000_000,
                b_to_a: 15
            }
        );
    }

    #[tokio::test]
    async fn reads_grow_when_they_fill_and_no_buffer_is_held_while_idle() {
        // A reader that fills whatever it is asked for, once per poll, then waits: each poll
        // of the copy moves one full read.
        let mut d = Direction::new();
        let mut io = OneFullReadPerPoll {
            ready: true,
            written: 0,
        };
        let mut sink = OneFullReadPerPoll {
            ready: false,
            written: 0,
        };
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let mut sizes = vec![d.want];
        for _ in 0..12 {
            io.ready = true;
            assert!(d.poll_copy(&mut cx, &mut io, &mut sink).is_pending());
            sizes.push(d.want);
            // Waiting for the reader, the direction holds no read buffer.
            assert_eq!(
                d.buf.capacity(),
                0,
                "after a read of {}",
                sizes[sizes.len() - 2]
            );
        }
        assert_eq!(sizes[0], INITIAL_BUFFER);
        assert_eq!(*sizes.last().unwrap(), MAX_BUFFER, "sizes seen: {sizes:?}");
        assert_eq!(sink.written, sizes[..12].iter().sum::<usize>());

        // At EOF the buffer is dropped, because the other direction may live on for hours.
        let (mut client, mut a) = tokio::io::duplex(64 * 1024);
        let (mut b, mut server) = tokio::io::duplex(64 * 1024);
        let data = vec![7u8; 100_000];
        let writer = tokio::spawn(async move {
            client.write_all(&data).await.unwrap();
            client.shutdown().await.unwrap();
            client
        });
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.unwrap();
            got
        });
        let mut d = Direction::new();
        poll_fn(|cx| d.poll_copy(cx, &mut a, &mut b)).await.unwrap();
        drop(b);
        assert_eq!(reader.await.unwrap(), vec![7u8; 100_000]);
        assert!(d.done && d.chunk.is_empty());
        assert_eq!(d.buf.capacity(), 0);
        drop(writer.await.unwrap());
    }

    #[tokio::test]
    async fn a_stopped_copy_reports_what_it_moved_and_why() {
        let (mut client, mut a) = tokio::io::duplex(1024);
        let (mut b, mut server) = tokio::io::duplex(1024);
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<&'static str>();
        let copy = tokio::spawn(async move {
            copy_bidirectional_until(&mut a, &mut b, async move {
                stop_rx.await.unwrap_or("sender dropped")
            })
            .await
        });
        client.write_all(b"12345").await.unwrap();
        let mut got = [0u8; 5];
        server.read_exact(&mut got).await.unwrap();
        server.write_all(b"ab").await.unwrap();
        let mut back = [0u8; 2];
        client.read_exact(&mut back).await.unwrap();
        stop_tx.send("policy").unwrap();
        let copied = copy.await.unwrap().unwrap();
        assert_eq!(
            copied,
            Copied::Stopped {
                transferred: Transferred {
                    a_to_b: 5,
                    b_to_a: 2
                },
                by: "policy",
            }
        );
    }

    /// Reads: fills what it is asked for once each time `ready` is set. Writes: counts.
    struct OneFullReadPerPoll {
        ready: bool,
        written: usize,
    }

    impl AsyncRead for OneFullReadPerPoll {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            if !self.ready {
                return Poll::Pending;
            }
            self.ready = false;
            let n = buf.remaining();
            buf.put_slice(&vec![1; n]);
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for OneFullReadPerPoll {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.written += buf.len();
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    impl Pipe for OneFullReadPerPoll {}
}
