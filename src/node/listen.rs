//! The front's listening sockets: one per front thread, all bound to the same address with
//! `SO_REUSEPORT`, so the kernel spreads incoming connections over the threads by a hash of
//! each connection's addresses. With one socket shared by every thread, the thread that woke
//! first accepted whole bursts of connections: 64 clients connecting at once all landed on one
//! thread, and the other threads served none.
//!
//! `SO_REUSEPORT` would also let a second daemon started on the same port by mistake take a
//! share of the connections without a word. Before the group is bound, a plain socket is bound
//! to the address: while anyone listens there, that bind fails, and so does the daemon.

use std::net::{SocketAddr, TcpListener, ToSocketAddrs};

use tokio::net::TcpSocket;

/// Connections waiting to be accepted, per socket.
const BACKLOG: u32 = 1024;

/// `n` non-blocking listeners on `addr` (the first address it resolves to that binds), all on
/// the same port: the one given, or, for port 0, the one the first listener got. Called inside
/// a tokio runtime (the sockets pass through tokio's listener on their way to std's).
pub fn listeners(addr: &str, n: usize) -> std::io::Result<Vec<TcpListener>> {
    let mut last = None;
    for candidate in addr.to_socket_addrs()? {
        match group(candidate, n.max(1)) {
            Ok(group) => return Ok(group),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{addr} resolves to no address"),
        )
    }))
}

fn group(addr: SocketAddr, n: usize) -> std::io::Result<Vec<TcpListener>> {
    if addr.port() != 0 {
        // Fails while anyone (an earlier daemon's group included) listens on the address.
        drop(bound_socket(addr, false)?);
    }
    let first = member(addr)?;
    let bound = first.local_addr()?;
    let mut out = Vec::with_capacity(n);
    out.push(first);
    for _ in 1..n {
        out.push(member(bound)?);
    }
    Ok(out)
}

/// A listening member of the address's `SO_REUSEPORT` group (non-blocking).
fn member(addr: SocketAddr) -> std::io::Result<TcpListener> {
    bound_socket(addr, true)?.listen(BACKLOG)?.into_std()
}

fn bound_socket(addr: SocketAddr, reuseport: bool) -> std::io::Result<TcpSocket> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    // Binding over connections of an earlier daemon in TIME_WAIT is fine; over a listener not.
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(reuseport)?;
    socket.bind(addr)?;
    Ok(socket)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_group_shares_one_port_and_refuses_a_second_group() {
        let group = listeners("127.0.0.1:0", 3).expect("bind");
        let ports: Vec<u16> = group
            .iter()
            .map(|l| l.local_addr().expect("addr").port())
            .collect();
        assert!(
            ports[0] != 0 && ports.iter().all(|p| *p == ports[0]),
            "{ports:?}"
        );
        // A second daemon on the same port is refused, not silently given a share.
        let again = listeners(&format!("127.0.0.1:{}", ports[0]), 2);
        assert_eq!(
            again.expect_err("second group").kind(),
            std::io::ErrorKind::AddrInUse
        );
        // So is anything else listening there.
        let plain = std::net::TcpListener::bind("127.0.0.1:0").expect("plain");
        let taken = plain.local_addr().expect("addr").to_string();
        assert_eq!(
            listeners(&taken, 1).expect_err("taken").kind(),
            std::io::ErrorKind::AddrInUse
        );
    }

    #[tokio::test]
    async fn an_unresolvable_address_is_an_error() {
        assert!(listeners("not an address", 1).is_err());
    }
}
