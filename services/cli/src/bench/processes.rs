//! The servers a benchmark measures, each a child process of this same binary, killed when the bench ends.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context;

use tollgate_shared::config::{ConnectionArgs, NamespaceArgs, ServerArgs, ServerUrl};
use tollgate_shared::listen;
use tollgate_shared::metrics::HTTP_CONNECTIONS;

/// A loopback port that is free now; another process may take it before a child binds it (see [`start_server`]).
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A child process, killed when this handle is dropped.
pub struct ChildProcess(pub Child);

impl Drop for ChildProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts a validator on the bench's own database, names and spool directory.
pub fn spawn_validator(
    servers: &ServerArgs,
    (database_url, namespace, spool): (&ServerUrl, &NamespaceArgs, &Path),
    (port, metrics_port): (u16, u16),
    threads: u16,
) -> anyhow::Result<Child> {
    Command::new(std::env::current_exe()?)
        .arg("validator")
        .env("TOKIO_WORKER_THREADS", threads.to_string())
        .env("DATABASE_URL", database_url.expose())
        .env("TOLLGATE_SPOOL_DIR", spool)
        .env("NATS_URL", servers.nats_url.expose())
        .env("REDIS_URL", servers.redis_url.expose())
        .env("TOLLGATE_STREAM", &namespace.stream)
        .env("TOLLGATE_SUBJECT_PREFIX", &namespace.subject_prefix)
        .env("TOLLGATE_REDIS_PREFIX", &namespace.redis_prefix)
        .env("TOLLGATE_LISTEN", format!("127.0.0.1:{port}"))
        .env("TOLLGATE_METRICS_LISTEN", format!("127.0.0.1:{metrics_port}"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .context("cannot start the validator")
}

pub fn spawn_trivial(port: u16, threads: u16) -> anyhow::Result<Child> {
    Command::new(std::env::current_exe()?)
        .args(["bench", "trivial-server", "--listen", &format!("127.0.0.1:{port}")])
        .env("TOKIO_WORKER_THREADS", threads.to_string())
        .stdout(Stdio::null())
        .spawn()
        .context("cannot start the trivial server")
}

/// The baseline: the same HTTP stack answering 200 without doing anything.
pub async fn trivial_server(listen: std::net::SocketAddr, connections: ConnectionArgs) -> anyhow::Result<()> {
    let app = axum::Router::new().fallback(|| async { axum::http::StatusCode::OK });
    let open = metrics::gauge!(HTTP_CONNECTIONS, "listener" => "api");
    listen::serve(listen::bind(listen)?, app, connections, open, std::future::pending()).await;
    Ok(())
}

/// Times a child server is started on new ports after it exited before answering.
const START_ATTEMPTS: usize = 3;

/// Starts a child server on free ports and waits until it answers on the first. A port from [`free_port`] is free
/// only until the child binds it, and another process can take it meanwhile: then the child exits, and it is started
/// again on other ports.
pub async fn start_server<const N: usize>(
    client: &reqwest::Client,
    spawn: impl Fn([u16; N]) -> anyhow::Result<Child>,
) -> anyhow::Result<(ChildProcess, [u16; N])> {
    for _ in 0..START_ATTEMPTS {
        let mut ports = [0; N];
        for port in &mut ports {
            *port = free_port()?;
        }
        let mut child = ChildProcess(spawn(ports)?);
        if wait_ready(client, &format!("http://127.0.0.1:{}/healthz", ports[0]), &mut child.0).await? {
            return Ok((child, ports));
        }
    }
    anyhow::bail!("a server the bench started exited before answering, {START_ATTEMPTS} times: see its errors above")
}

/// Waits until `url` answers 200 (true), or until `child` exits (false).
async fn wait_ready(client: &reqwest::Client, url: &str, child: &mut Child) -> anyhow::Result<bool> {
    for _ in 0..200 {
        if child.try_wait()?.is_some() {
            return Ok(false);
        }
        if client.get(url).send().await.is_ok_and(|r| r.status().is_success()) {
            return Ok(true);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("{url} did not become ready")
}

#[cfg(test)]
mod tests {
    use std::process::Command;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::{start_server, START_ATTEMPTS};

    #[tokio::test]
    async fn a_server_that_exits_before_answering_is_started_again_then_reported() {
        let started = AtomicUsize::new(0);
        let client = reqwest::Client::new();
        let result = start_server(&client, |_: [u16; 2]| {
            started.fetch_add(1, Ordering::Relaxed);
            Ok(Command::new("sh").args(["-c", "exit 1"]).spawn()?)
        })
        .await;
        assert!(result.is_err());
        assert_eq!(started.load(Ordering::Relaxed), START_ATTEMPTS);
    }
}
