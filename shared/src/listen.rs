//! Listening sockets for Tollgate's own HTTP servers.

use std::io;
use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpSocket};

/// Connections the kernel may complete before the server accepts them: as many as it allows, since Linux caps this
/// at `net.core.somaxconn`, which operators tune. Tokio's and the standard library's 128 is too few for a fleet of
/// gateways reconnecting at once (after a deploy, say) to a validator whose thread is busy: the kernel drops the
/// connections beyond it, and each waits out a 1 s SYN retransmission.
const BACKLOG: u32 = 65_535;

/// Listens on `addr` with [`BACKLOG`], as Tokio's `TcpListener::bind` does otherwise (`SO_REUSEADDR` set).
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::net::TcpStream;

    use super::*;

    /// A burst of connections well past the usual 128 completes while the server accepts none of them.
    #[tokio::test]
    async fn a_burst_of_connections_completes_before_any_is_accepted() {
        const BURST: usize = 512;
        let somaxconn: usize = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .map(|s| s.trim().parse().expect("a number"))
            .unwrap_or(BURST);
        assert!(somaxconn >= BURST, "net.core.somaxconn is {somaxconn}: raise it to at least {BURST} for this test");
        let listener = bind(SocketAddr::from(([127, 0, 0, 1], 0))).expect("a free port on loopback");
        let addr = listener.local_addr().expect("its address");
        let mut connects = tokio::task::JoinSet::new();
        for _ in 0..BURST {
            // Under the 1 s a dropped connection waits before its SYN is sent again.
            connects.spawn(tokio::time::timeout(Duration::from_millis(900), TcpStream::connect(addr)));
        }
        // Held until counted, so that every connection stays in the queue.
        let streams: Vec<_> = connects.join_all().await.into_iter().filter_map(|s| s.ok()?.ok()).collect();
        assert_eq!(streams.len(), BURST, "connections completed before the first accept");
    }
}
