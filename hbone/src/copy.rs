//! Bidirectional copy between two byte streams (a workload's TCP socket and an HBONE
//! tunnel, or two tunnels), with buffers that start small and grow with the traffic.
//!
//! Most proxied connections are short and chatty; a few are bulk transfers. A fixed 1 MiB
//! buffer per direction would cost 2 MiB per idle connection; a fixed 8 KiB buffer caps bulk
//! throughput with syscall and frame overhead. So each direction starts at
//! [`INITIAL_BUFFER`] and doubles (up to [`MAX_BUFFER`]) each time a read fills it.
//!
//! Half-close is preserved: when one side reaches EOF, the other side's write half is shut
//! down (for a tunnel, END_STREAM) and the opposite direction keeps flowing until it ends too.

use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Size each direction's buffer starts at.
pub const INITIAL_BUFFER: usize = 16 * 1024;
/// Size a direction's buffer may grow to.
pub const MAX_BUFFER: usize = 1024 * 1024;

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
    buf: Vec<u8>,
    /// `buf[pos..filled]` has been read and not yet written.
    pos: usize,
    filled: usize,
    /// The last read filled the buffer: grow it before the next read.
    grow: bool,
    read_eof: bool,
    /// Written since the last flush.
    unflushed: bool,
    done: bool,
    amount: u64,
}

impl Direction {
    fn new() -> Self {
        Direction {
            buf: vec![0; INITIAL_BUFFER],
            pos: 0,
            filled: 0,
            grow: false,
            read_eof: false,
            unflushed: false,
            done: false,
            amount: 0,
        }
    }

    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut reader: Pin<&mut R>,
        mut writer: Pin<&mut W>,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        loop {
            if self.pos == self.filled && !self.read_eof {
                if self.grow {
                    // The buffer is empty here, so growing copies nothing.
                    self.grow = false;
                    let size = (self.buf.len() * 2).min(MAX_BUFFER);
                    self.buf = vec![0; size];
                }
                let mut read_buf = ReadBuf::new(&mut self.buf);
                match reader.as_mut().poll_read(cx, &mut read_buf) {
                    Poll::Pending => {
                        // Nothing more to read now: push out what we wrote before waiting.
                        if self.unflushed {
                            ready!(writer.as_mut().poll_flush(cx))?;
                            self.unflushed = false;
                        }
                        return Poll::Pending;
                    }
                    Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                    Poll::Ready(Ok(())) => {
                        let n = read_buf.filled().len();
                        if n == 0 {
                            self.read_eof = true;
                        } else {
                            self.grow = n == self.buf.len() && self.buf.len() < MAX_BUFFER;
                            self.pos = 0;
                            self.filled = n;
                        }
                    }
                }
            }
            while self.pos < self.filled {
                let n = ready!(writer
                    .as_mut()
                    .poll_write(cx, &self.buf[self.pos..self.filled]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.pos += n;
                self.amount += n as u64;
                self.unflushed = true;
            }
            if self.read_eof {
                // Pass the half-close on; the other direction carries on independently.
                ready!(writer.as_mut().poll_flush(cx))?;
                self.unflushed = false;
                ready!(writer.as_mut().poll_shutdown(cx))?;
                self.done = true;
                // Release the buffer now; the other direction may run for a long time.
                self.buf = Vec::new();
                return Poll::Ready(Ok(()));
            }
        }
    }
}

/// Copies `a` to `b` and `b` to `a` until both directions reach EOF, shutting down the write
/// half of each side when the other side's read half ends. Returns the bytes moved each way.
pub async fn copy_bidirectional<A, B>(a: &mut A, b: &mut B) -> Result<Transferred, CopyError>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
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
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
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
            if let Poll::Ready(Err(source)) =
                a_to_b.poll_copy(cx, Pin::new(&mut *a), Pin::new(&mut *b))
            {
                return Poll::Ready(Err(CopyError::AToB {
                    transferred: transferred(&a_to_b, &b_to_a),
                    source,
                }));
            }
        }
        if !b_to_a.done {
            if let Poll::Ready(Err(source)) =
                b_to_a.poll_copy(cx, Pin::new(&mut *b), Pin::new(&mut *a))
            {
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
    async fn buffer_grows_when_reads_fill_it_and_is_released_at_eof() {
        // A reader that fills whatever buffer it is given, once per poll, then waits: each
        // poll of the copy moves one full buffer.
        let mut d = Direction::new();
        let mut reader = OneFullReadPerPoll { ready: true };
        let mut sink = tokio::io::sink();
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let mut sizes = vec![d.buf.len()];
        for _ in 0..12 {
            reader.ready = true;
            assert!(d
                .poll_copy(&mut cx, Pin::new(&mut reader), Pin::new(&mut sink))
                .is_pending());
            sizes.push(d.buf.len());
        }
        assert_eq!(sizes[0], INITIAL_BUFFER);
        assert_eq!(*sizes.last().unwrap(), MAX_BUFFER, "sizes seen: {sizes:?}");

        // At EOF the buffer is dropped, because the other direction may live on for hours.
        let data = vec![7u8; 100_000];
        let mut d = Direction::new();
        let mut reader: &[u8] = &data;
        let mut sink = Vec::new();
        poll_fn(|cx| d.poll_copy(cx, Pin::new(&mut reader), Pin::new(&mut sink)))
            .await
            .unwrap();
        assert_eq!(sink, data);
        assert!(d.buf.is_empty());
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

    struct OneFullReadPerPoll {
        ready: bool,
    }

    impl AsyncRead for OneFullReadPerPoll {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
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
}
