//! Private servers for fault tests: a nats-server, redis-server or PostgreSQL of our own on a free port, which a
//! test may stop and start at will without touching the shared ones. Each is killed and removed on drop.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// A port free now, for a server a test starts. It is picked outside the kernel's ephemeral range, where `bind(0)` and
/// outgoing connections take theirs, and never twice in this process: a port found by binding port 0 and let go could
/// be taken by any other socket before the server meant for it binds it. With no room beside that range, port 0 it is.
pub fn free_port() -> u16 {
    const SPAN: u32 = 12_000;
    static PICKED: AtomicU32 = AtomicU32::new(0);
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
    let mut bounds = range.split_whitespace().map(|n| n.parse::<u32>().unwrap_or(0));
    let (low, high) = (bounds.next().unwrap_or(32_768), bounds.next().unwrap_or(60_999));
    let first = if low >= 1024 + SPAN {
        low - SPAN
    } else if high + SPAN <= 65_535 {
        high + 1
    } else {
        return TcpListener::bind("127.0.0.1:0").expect("bind port 0").local_addr().expect("local address").port();
    };
    // From a different place in each run, so that a run does not start where the last one's sockets may linger.
    let start = std::process::id() % SPAN;
    for _ in 0..SPAN {
        let port = first + (start + PICKED.fetch_add(1, Ordering::Relaxed)) % SPAN;
        let port = u16::try_from(port).expect("within the port range");
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port from {first} on");
}

/// Waits until `port` answers. With the server's process (`child`), also fails as soon as that has exited: its port
/// was taken meanwhile (a free port is free only until someone binds it), and what answers there is not ours.
fn wait_for_port(port: u16, what: &str, mut child: Option<&mut Child>) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut exited = || {
        if let Some(Ok(Some(status))) = child.as_mut().map(|c| c.try_wait()) {
            panic!("{what} exited ({status}) before answering on port {port}: was the port taken?");
        }
    };
    loop {
        exited();
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            // A server that cannot bind exits at once: long enough for that, in case what answered is another's.
            std::thread::sleep(Duration::from_millis(50));
            exited();
            return;
        }
        assert!(Instant::now() < deadline, "{what} did not start on port {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn kill(child: &mut Option<Child>) {
    if let Some(mut child) = child.take() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// A nats-server with JetStream, keeping its store across stop/start.
pub struct PrivateNats {
    pub port: u16,
    store: TempDir,
    child: Option<Child>,
    /// Whether it runs JetStream (from the next restart on).
    pub jetstream: bool,
}

impl PrivateNats {
    pub fn start() -> PrivateNats {
        PrivateNats::start_with_config("")
    }

    /// One whose configuration file holds `config` (nats-server's format), besides the port and JetStream.
    pub fn start_with_config(config: &str) -> PrivateNats {
        PrivateNats::start_as(config, true)
    }

    /// One that answers without JetStream, as a cluster does while it has no JetStream leader.
    pub fn start_without_jetstream() -> PrivateNats {
        PrivateNats::start_as("", false)
    }

    fn start_as(config: &str, jetstream: bool) -> PrivateNats {
        let store = TempDir::new().expect("temp dir");
        let mut nats = PrivateNats { port: free_port(), store, child: None, jetstream };
        std::fs::write(nats.config_file(), config).expect("write the nats-server configuration");
        nats.restart();
        nats
    }

    fn config_file(&self) -> std::path::PathBuf {
        self.store.path().join("nats-server.conf")
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kills the server (SIGKILL).
    pub fn stop(&mut self) {
        kill(&mut self.child);
    }

    /// Starts it again on the same port with the same store.
    pub fn restart(&mut self) {
        let child = Command::new("/usr/sbin/nats-server")
            .arg("-c")
            .arg(self.config_file())
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string()])
            .args(self.jetstream.then_some("-js"))
            .arg("-sd")
            .arg(self.store.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server");
        wait_for_port(self.port, "nats-server", Some(self.child.insert(child)));
    }
}

impl Drop for PrivateNats {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A redis-server that keeps nothing on disk.
pub struct PrivateRedis {
    pub port: u16,
    child: Option<Child>,
    /// More `redis-server` arguments (`--requirepass X`, say).
    settings: Vec<String>,
}

impl PrivateRedis {
    pub fn start() -> PrivateRedis {
        PrivateRedis::start_with(&[])
    }

    pub fn start_with(settings: &[&str]) -> PrivateRedis {
        let settings = settings.iter().map(|s| s.to_string()).collect();
        let mut redis = PrivateRedis { port: free_port(), child: None, settings };
        redis.restart();
        redis
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn stop(&mut self) {
        kill(&mut self.child);
    }

    /// Freezes the server (SIGSTOP): its connections stay open and nothing is answered, as with a hung Redis.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("redis-server is running").id().to_string();
        let status = Command::new("kill").args([signal, &pid]).status().expect("run kill");
        assert!(status.success(), "kill {signal} {pid}");
    }

    pub fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(&self.settings)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        wait_for_port(self.port, "redis-server", Some(self.child.insert(child)));
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A PostgreSQL cluster of our own (run as the `postgres` user, since PostgreSQL refuses to run as root).
pub struct PrivatePostgres {
    pub port: u16,
    data: PathBuf,
    _dir: TempDir,
}

impl PrivatePostgres {
    pub fn start() -> PrivatePostgres {
        let dir = TempDir::new().expect("temp dir");
        let data = dir.path().join("data");
        std::fs::create_dir(&data).expect("data dir");
        as_postgres(&["chown", "-R", "postgres", &dir.path().display().to_string()], true);
        run_as_postgres(&[
            &bin("initdb"),
            "-D",
            &data.display().to_string(),
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
        ]);
        let postgres = PrivatePostgres { port: free_port(), data, _dir: dir };
        postgres.restart();
        postgres
    }

    /// The URL of database `name` on this server.
    pub fn url(&self, name: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }

    /// Stops the server at once (like a crash, without a checkpoint).
    pub fn stop(&self) {
        run_as_postgres(&[&bin("pg_ctl"), "-D", &self.data.display().to_string(), "-m", "immediate", "-w", "stop"]);
    }

    /// Freezes the server and its backends (SIGSTOP): connections stay open and nothing is answered, as with a
    /// hung PostgreSQL.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        assert!(self.send(signal), "cannot send {signal} to the private PostgreSQL");
    }

    /// Signals the postmaster first, so that it starts no backend the signal would miss, then its children.
    fn send(&self, signal: &str) -> bool {
        let Ok(pid_file) = std::fs::read_to_string(self.data.join("postmaster.pid")) else { return false };
        let Some(pid) = pid_file.lines().next().map(str::trim) else { return false };
        let sent = Command::new("kill").args([signal, pid]).status().is_ok_and(|status| status.success());
        sent && Command::new("pkill").args([signal, "-P", pid]).status().is_ok()
    }

    pub fn restart(&self) {
        let options = format!("-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off", self.port, self.data.display());
        let log = self.data.join("server.log");
        run_as_postgres(&[
            &bin("pg_ctl"),
            "-D",
            &self.data.display().to_string(),
            "-o",
            &options,
            "-l",
            &log.display().to_string(),
            "-w",
            "start",
        ]);
        // pg_ctl -w has waited for the server, and exited.
        wait_for_port(self.port, "postgres", None);
    }

    /// Copies the stopped server's data aside: a backup to restore later.
    pub fn back_up(&self) {
        run_as_postgres(&["cp", "-a", &self.data.display().to_string(), &self.backup().display().to_string()]);
    }

    /// Puts the backup in place of the stopped server's data: the server goes back to when it was taken, its
    /// transaction ids included.
    pub fn restore(&self) {
        let data = self.data.display().to_string();
        run_as_postgres(&["rm", "-rf", &data]);
        run_as_postgres(&["cp", "-a", &self.backup().display().to_string(), &data]);
    }

    fn backup(&self) -> PathBuf {
        self.data.with_file_name("backup")
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        // A paused server (a test that failed before resuming it) would not act on the stop.
        self.send("-CONT");
        let _ = Command::new("runuser")
            .args([
                "-u",
                "postgres",
                "--",
                &bin("pg_ctl"),
                "-D",
                &self.data.display().to_string(),
                "-m",
                "immediate",
                "stop",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

fn bin(name: &str) -> String {
    let versions = std::fs::read_dir("/usr/lib/postgresql").expect("PostgreSQL binaries in /usr/lib/postgresql");
    let mut dirs: Vec<PathBuf> = versions.filter_map(|e| e.ok().map(|e| e.path())).collect();
    dirs.sort();
    let dir = dirs.last().expect("a PostgreSQL version");
    Path::new(dir).join("bin").join(name).display().to_string()
}

fn run_as_postgres(args: &[&str]) {
    as_postgres(args, false);
}

fn as_postgres(args: &[&str], as_root: bool) {
    let mut command = if as_root {
        Command::new(args[0])
    } else {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--", args[0]]);
        c
    };
    let output = command.args(&args[1..]).output().expect("run a PostgreSQL command");
    assert!(output.status.success(), "{args:?} failed: {}", String::from_utf8_lossy(&output.stderr));
}

/// A TCP proxy to `upstream` that passes on what the server sends `delay` late, once `delay` is set: a server far
/// away, whose every answer takes that long.
pub struct SlowProxy {
    pub address: String,
    delay_ms: Arc<AtomicU64>,
}

impl SlowProxy {
    pub async fn start(upstream: &str) -> SlowProxy {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("addr").to_string();
        let delay_ms = Arc::new(AtomicU64::new(0));
        let (upstream, delay) = (upstream.to_owned(), delay_ms.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let server = tokio::net::TcpStream::connect(&upstream).await.expect("upstream");
                let ((mut from_client, mut to_client), (mut from_server, mut to_server)) =
                    (client.into_split(), server.into_split());
                tokio::spawn(async move { tokio::io::copy(&mut from_client, &mut to_server).await });
                let (held, mut due) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
                let delay = delay.clone();
                tokio::spawn(async move {
                    let mut buffer = vec![0; 64 * 1024];
                    while let Ok(n @ 1..) = from_server.read(&mut buffer).await {
                        let at = tokio::time::Instant::now() + Duration::from_millis(delay.load(Ordering::Relaxed));
                        let _ = held.send((at, buffer[..n].to_vec()));
                    }
                });
                tokio::spawn(async move {
                    while let Some((at, bytes)) = due.recv().await {
                        tokio::time::sleep_until(at).await;
                        if to_client.write_all(&bytes).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        SlowProxy { address, delay_ms }
    }

    pub fn delay(&self, delay: Duration) {
        self.delay_ms.store(delay.as_millis() as u64, Ordering::Relaxed);
    }
}
