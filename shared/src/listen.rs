//! Listening sockets for Tollgate's own HTTP servers, and serving them.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_io_timeout::TimeoutStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_service::Service;

use crate::config::ConnectionArgs;

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

/// Serves `router` on `listener` until `shutdown` completes, within `limits` (past its connections, more wait in the
/// kernel's queue, [`BACKLOG`] long; a client that sends no request within the read timeout is closed, and so is one
/// that takes nothing of an answer for as long); `open` follows the connections served. Then it accepts no more, lets the requests
/// in flight finish for up to `limits.shutdown_grace`, closes the connections still open after that, and returns once
/// every connection is closed.
///
/// Why not `axum::serve`: it sets no timer, so hyper's header timeout never runs, and it caps no connections, so a
/// client that opens many and sends nothing would hold them (and their file descriptors) for ever.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnectionArgs,
    open: metrics::Gauge,
    shutdown: impl Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let connections = GracefulShutdown::new();
    let (tasks, past_grace) = (TaskTracker::new(), CancellationToken::new());
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(limits.read_timeout);
    let mut shutdown = pin!(shutdown);
    loop {
        let (stream, peer, slot) = tokio::select! {
            () = &mut shutdown => break,
            accepted = accept(&listener, &slots) => accepted,
        };
        let router = router.clone();
        // What axum's `into_make_service_with_connect_info` would add: the handlers read the peer's address.
        let service = service_fn(move |mut request: hyper::Request<Incoming>| {
            request.extensions_mut().insert(ConnectInfo(peer));
            router.clone().call(request)
        });
        // hyper reads no request while an answer waits to be taken, so its header timeout does not start then: a
        // client that sends requests and takes no answers would hold its connection for as long as it acknowledges.
        let mut stream = TimeoutStream::new(stream);
        stream.set_write_timeout(Some(limits.read_timeout));
        let connection = connections.watch(http.serve_connection(TokioIo::new(Box::pin(stream)), service));
        let counted = Counted::new(&open);
        let past_grace = past_grace.clone();
        tasks.spawn(async move {
            tokio::select! {
                // The client's doing (it went away, took too long, or sent what is not HTTP); hyper answered what it
                // could.
                served = connection => if let Err(e) = served {
                    tracing::debug!(error = %e, %peer, "connection closed");
                },
                // Dropping the connection closes it, with whatever request it was reading or answering.
                () = past_grace.cancelled() => {}
            }
            // Also dropped if a handler panics.
            drop((counted, slot));
        });
    }
    drop(listener);
    tasks.close();
    // A client halfway through sending a request would otherwise hold the shutdown for up to the read timeout.
    if tokio::time::timeout(limits.shutdown_grace, connections.shutdown()).await.is_err() {
        tracing::warn!(
            grace = ?limits.shutdown_grace,
            connections = tasks.len(),
            "requests still unfinished after the shutdown grace period (TOLLGATE_SHUTDOWN_GRACE): closing them"
        );
        past_grace.cancel();
    }
    tasks.wait().await;
}

/// A connection counted in a gauge for as long as this lives.
struct Counted(metrics::Gauge);

impl Counted {
    fn new(gauge: &metrics::Gauge) -> Counted {
        gauge.increment(1.0);
        Counted(gauge.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// The next connection, once one of `slots` is free.
async fn accept(listener: &TcpListener, slots: &Arc<Semaphore>) -> (TcpStream, SocketAddr, OwnedSemaphorePermit) {
    let slot = Arc::clone(slots).acquire_owned().await.expect("the semaphore is never closed");
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => return (stream, peer, slot),
            // The client gave up before it was accepted.
            Err(e) if matches!(e.kind(), io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset) => {}
            // Out of file descriptors or memory: that passes as connections close, and retrying at once would spin.
            Err(e) => {
                tracing::error!(error = %e, "cannot accept a connection; trying again in 100 ms");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
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
