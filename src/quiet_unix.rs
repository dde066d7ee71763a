//! A Unix stream socket that the reactor watches for readability only, for the daemon ↔ agent
//! connections.
//!
//! tokio's own `UnixStream` is registered for readability and writability, and a Unix socket
//! reports "writable" each time its peer reads from it. So every request/response exchange
//! woke the side that had just written once for nothing: the agent, when the daemon read its
//! reply, and the daemon, when the agent read its request (on the same CPU, preempting the
//! reader in the middle of its work). Here writes go straight to the socket; only when it is
//! full does a second registration (on a duplicate descriptor, for writability) wait for room,
//! and it is dropped as soon as the write has gone through.

use std::io::{self, IoSlice, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};

pub struct QuietUnixStream {
    io: AsyncFd<UnixStream>,
    /// Watches for room to write, only while a write waits for it.
    room: Option<AsyncFd<OwnedFd>>,
}

impl QuietUnixStream {
    /// Takes a connected stream (made non-blocking here). Must run inside a tokio runtime.
    pub fn new(stream: UnixStream) -> io::Result<Self> {
        stream.set_nonblocking(true)?;
        // SAFETY: the stream owns its descriptor for as long as the AsyncFd holds it, and is
        // never swapped for another.
        let io = unsafe { AsyncFd::register_with_interest(stream, Interest::READABLE)? };
        Ok(Self { io, room: None })
    }

    /// Writes with `write`, waiting for room (and only then) when the socket is full.
    fn poll_write_with(
        &mut self,
        cx: &mut Context<'_>,
        write: impl Fn(&UnixStream) -> io::Result<usize>,
    ) -> Poll<io::Result<usize>> {
        loop {
            match write(self.io.get_ref()) {
                Ok(n) => {
                    self.room = None;
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
            let room = match &mut self.room {
                Some(room) => room,
                slot => {
                    let dup = self.io.get_ref().as_fd().try_clone_to_owned()?;
                    // SAFETY: as in `new`; the duplicate is owned by the AsyncFd.
                    let room = unsafe { AsyncFd::register_with_interest(dup, Interest::WRITABLE)? };
                    slot.insert(room)
                }
            };
            // Registering reports a socket that already has room at once, so no wake-up is
            // lost between the failed write and here.
            let mut ready = ready!(room.poll_write_ready(cx))?;
            ready.clear_ready();
        }
    }
}

impl AsyncRead for QuietUnixStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut ready = ready!(self.io.poll_read_ready(cx))?;
            // Read into the buffer's uninitialised part as it is (hyper hands a fresh one each
            // time; zeroing it first would cost as much as the copy).
            // SAFETY: read(2) only writes into the buffer, and at most its length.
            let unfilled = unsafe { buf.unfilled_mut() };
            let read = ready.try_io(|io| {
                // SAFETY: see above; the descriptor is the stream's own.
                let n = unsafe {
                    libc::read(
                        io.get_ref().as_raw_fd(),
                        unfilled.as_mut_ptr().cast(),
                        unfilled.len(),
                    )
                };
                usize::try_from(n).map_err(|_| io::Error::last_os_error())
            });
            match read {
                Ok(Ok(n)) => {
                    // SAFETY: read(2) initialised these `n` bytes.
                    unsafe { buf.assume_init(n) };
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for QuietUnixStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_write_with(cx, |mut s| s.write(data))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .poll_write_with(cx, |mut s| s.write_vectored(bufs))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.io.get_ref().shutdown(std::net::Shutdown::Write))
    }
}

#[cfg(test)]
mod tests {
    use super::QuietUnixStream;
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    }

    /// The epoll event mask this process registered for descriptor `fd` (from the epoll
    /// instances' fdinfo), if any.
    fn epoll_mask(fd: i32) -> Option<u32> {
        for entry in std::fs::read_dir("/proc/self/fdinfo").ok()?.flatten() {
            let Ok(info) = std::fs::read_to_string(entry.path()) else {
                continue;
            };
            for line in info.lines().filter(|l| l.starts_with("tfd:")) {
                let fields: Vec<&str> = line.split_whitespace().collect();
                if fields.get(1) == Some(&fd.to_string().as_str()) {
                    return fields.get(3).and_then(|m| u32::from_str_radix(m, 16).ok());
                }
            }
        }
        None
    }

    #[test]
    fn only_readability_is_watched() {
        runtime().block_on(async {
            let (a, b) = UnixStream::pair().expect("pair");
            let quiet = QuietUnixStream::new(a).expect("register");
            let quiet_fd = quiet.io.get_ref().as_raw_fd();
            b.set_nonblocking(true).expect("nonblocking");
            let plain = tokio::net::UnixStream::from_std(b).expect("register");
            let out = libc::EPOLLOUT as u32;
            let quiet_mask = epoll_mask(quiet_fd).expect("quiet stream registered");
            let plain_mask = epoll_mask(plain.as_raw_fd()).expect("plain stream registered");
            assert_eq!(quiet_mask & out, 0, "mask {quiet_mask:#x}");
            assert_ne!(quiet_mask & libc::EPOLLIN as u32, 0, "mask {quiet_mask:#x}");
            // The method can see the difference: tokio's own stream watches writability.
            assert_ne!(plain_mask & out, 0, "mask {plain_mask:#x}");
        });
    }

    #[test]
    fn a_large_transfer_waits_for_room_and_arrives_whole() {
        runtime().block_on(async {
            let (a, b) = UnixStream::pair().expect("pair");
            let mut writer = QuietUnixStream::new(a).expect("register");
            let mut reader = QuietUnixStream::new(b).expect("register");
            // Far more than a socket buffer: the writer must wait for room many times.
            let data: Vec<u8> = (0..8u32 << 20).map(|i| (i % 251) as u8).collect();
            let sent = data.clone();
            let write = tokio::spawn(async move {
                writer.write_all(&sent).await.expect("write");
                writer.shutdown().await.expect("shutdown");
                writer
            });
            let mut got = Vec::new();
            let mut buf = vec![0u8; 4096];
            loop {
                let n = reader.read(&mut buf).await.expect("read");
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
                tokio::task::yield_now().await;
            }
            let writer = write.await.expect("writer task");
            assert!(
                got == data,
                "{} of {} bytes, or altered",
                got.len(),
                data.len()
            );
            // The room watcher is gone once the writes are through.
            assert!(writer.room.is_none());
        });
    }

    #[test]
    fn a_writer_waiting_for_room_learns_that_the_peer_is_gone() {
        runtime().block_on(async {
            let (a, b) = UnixStream::pair().expect("pair");
            let mut writer = QuietUnixStream::new(a).expect("register");
            // Fill the socket, so that the next write has to wait for room.
            let chunk = vec![7u8; 64 << 10];
            while writer.io.get_ref().write(&chunk).is_ok() {}
            let write = tokio::spawn(async move { writer.write_all(&chunk).await });
            for _ in 0..4 {
                tokio::task::yield_now().await;
            }
            assert!(!write.is_finished(), "the write should be waiting for room");
            drop(b);
            let result = tokio::time::timeout(std::time::Duration::from_secs(10), write)
                .await
                .expect("the writer must not wait forever")
                .expect("writer task");
            assert_eq!(
                result.map_err(|e| e.kind()),
                Err(std::io::ErrorKind::BrokenPipe)
            );
        });
    }
}
