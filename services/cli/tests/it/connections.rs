//! What the validator's HTTP server holds for its clients: connections that send no request in time are closed (slow
//! headers, slow bodies, idle keep-alive), past its connection limit new ones wait until one closes, and a shutdown
//! drains, then waits for requests in flight only so long.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::{wait_until, TestEnv, REDIS_URL};

const HEALTH: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: tollgate\r\n\r\n";

/// Sends `/healthz` on `stream` and reads its answer (`ok`), failing after `patience`.
async fn health(stream: &mut TcpStream, patience: Duration) -> Result<String, &'static str> {
    stream.write_all(HEALTH).await.map_err(|_| "cannot send")?;
    let mut answer = Vec::new();
    let read = async {
        let mut buf = [0; 1024];
        while !answer.ends_with(b"\r\n\r\nok") {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return Err("closed"),
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
        Ok(())
    };
    tokio::time::timeout(patience, read).await.map_err(|_| "no answer")??;
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

/// How long after `since` the server closed `stream`, and what it sent before.
async fn closed_after(mut stream: TcpStream, since: Instant) -> (Duration, String) {
    let mut received = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut received)).await;
    (since.elapsed(), String::from_utf8_lossy(&received).into_owned())
}

#[tokio::test]
async fn a_connection_that_sends_no_request_in_time_is_closed_and_a_busy_one_is_not() {
    let env = TestEnv::new().await;
    let timeout = Duration::from_secs(1);
    let mut args = env.validator_args();
    args.connections.read_timeout = timeout;
    let validator = env.start_validator_with(args, REDIS_URL).await;
    let connect = || async { TcpStream::connect(validator.address).await.expect("connects") };

    // Before the connections: each one's wait starts when the server accepts it.
    let since = Instant::now();
    let mut slow_headers = connect().await;
    let mut idle = connect().await;
    let mut slow_body = connect().await;
    let mut busy = connect().await;
    slow_headers.write_all(b"GET /v1/auth HTTP/1.1\r\nHost: tollgate\r\n").await.expect("sends");
    health(&mut idle, Duration::from_secs(5)).await.expect("an answer before it idles");
    let body_start = b"POST /v1/verify HTTP/1.1\r\nHost: tollgate\r\nContent-Type: application/json\r\n\
                       Content-Length: 100\r\n\r\n{\"key\": ";
    slow_body.write_all(body_start).await.expect("sends");
    let closes = [slow_headers, idle, slow_body].map(|stream| tokio::spawn(closed_after(stream, since)));

    // A request every 0.4 s for 2.4 s, on one connection: each restarts the wait, so none is cut off.
    for request in 0..6 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        let answer = health(&mut busy, Duration::from_secs(5)).await;
        assert!(answer.is_ok_and(|a| a.starts_with("HTTP/1.1 200")), "request {request} on a busy connection");
    }

    let [slow_headers, idle, slow_body] = futures::future::join_all(closes).await.try_into().expect("three");
    for (what, closed) in [("slow headers", &slow_headers), ("idle keep-alive", &idle), ("slow body", &slow_body)] {
        let (after, _) = closed.as_ref().expect("the read task ran");
        assert!(
            *after >= timeout && *after < timeout + Duration::from_secs(3),
            "{what}: closed after {after:?}, with a read timeout of {timeout:?}"
        );
    }
    let (_, sent) = slow_headers.expect("ran");
    assert_eq!(sent, "", "headers never finished get no answer");
    let (_, sent) = slow_body.expect("ran");
    assert!(sent.starts_with("HTTP/1.1 408"), "a body never finished: {sent}");
    assert!(sent.contains("TOLLGATE_READ_TIMEOUT"), "the answer names the setting: {sent}");

    validator.service.stop().await;
    env.cleanup().await;
}

/// A client that sends requests but never reads the answers is closed once an answer has waited a read timeout to be
/// taken: until its answers are taken, hyper reads no more of its requests, so the header timeout never starts, and
/// such a connection held its slot (and its file descriptor) for as long as the client kept acknowledging.
#[tokio::test]
async fn a_client_that_does_not_take_its_answers_is_closed() {
    let env = TestEnv::new().await;
    let timeout = Duration::from_secs(1);
    let mut args = env.validator_args();
    args.connections.read_timeout = timeout;
    args.connections.max_connections = 1;
    let validator = env.start_validator_with(args, REDIS_URL).await;

    let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
    socket.set_recv_buffer_size(4096).expect("a small receive buffer");
    let mut stalled = socket.connect(validator.address).await.expect("connects");
    // Requests until the validator stops reading them, its answers piling up unread.
    let sending = tokio::spawn(async move { while stalled.write_all(&HEALTH.repeat(100)).await.is_ok() {} });
    tokio::time::sleep(timeout).await;
    let mut next = TcpStream::connect(validator.address).await.expect("connects");
    let answer = health(&mut next, timeout * 5).await.expect("the only slot is freed");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let closed = wait_until(timeout * 5, || async { sending.is_finished() }, |closed| *closed).await;
    assert!(closed, "the client that took no answers is closed");

    validator.service.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn connections_past_the_limit_wait_until_one_closes() {
    let env = TestEnv::new().await;
    let mut validator = env.spawn_validator_process(&[("TOLLGATE_MAX_CONNECTIONS", "2".into())]);
    validator.answering().await;
    let open = || async { validator.metric(r#"tollgate_http_connections{listener="api"}"#).await };
    let connect = || async { TcpStream::connect(("127.0.0.1", validator.port)).await.expect("connects") };

    let mut first = connect().await;
    let mut second = connect().await;
    for stream in [&mut first, &mut second] {
        health(stream, Duration::from_secs(5)).await.expect("served: under the limit");
    }
    let served = wait_until(Duration::from_secs(5), open, |n| *n == Some(2.0)).await;
    assert_eq!(served, Some(2.0), "open connections");

    // The kernel completes the connection; the validator does not take it while two are open.
    let mut third = connect().await;
    assert_eq!(health(&mut third, Duration::from_millis(500)).await, Err("no answer"), "past the limit");
    // The metrics listener's probe is not in that queue.
    let mut probe = TcpStream::connect(("127.0.0.1", validator.metrics_port)).await.expect("connects");
    let answer = health(&mut probe, Duration::from_secs(5)).await.expect("the metrics port's /healthz, at the limit");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    drop(first);
    let answer = health(&mut third, Duration::from_secs(5)).await.expect("served once one closed");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(open().await, Some(2.0), "open connections after one closed and one was accepted");

    drop((second, third));
    drop(validator); // stopped before its namespace is removed
    env.cleanup().await;
}

#[tokio::test]
async fn a_shutdown_closes_requests_unfinished_after_its_grace_period_and_keeps_the_events() {
    let env = TestEnv::new().await;
    let org = env.org().await;
    let (_, key) = env.key(&org).await;
    let grace = Duration::from_secs(1);
    let mut args = env.validator_args();
    args.connections.shutdown_grace = grace;
    let validator = env.start_validator_with(args, REDIS_URL).await;
    assert_eq!(validator.auth_status(&reqwest::Client::new(), &key).await, reqwest::StatusCode::OK);
    // A body that never comes would hold the shutdown for the read timeout (65 s here) without a grace period.
    let mut half_sent = TcpStream::connect(validator.address).await.expect("connects");
    half_sent
        .write_all(b"POST /v1/verify HTTP/1.1\r\nHost: tollgate\r\nContent-Length: 100\r\n\r\n{\"key\": ")
        .await
        .expect("sends");
    // Accepted in turn: once a later connection is served, the half-sent one was taken in.
    let mut later = TcpStream::connect(validator.address).await.expect("connects");
    health(&mut later, Duration::from_secs(5)).await.expect("the server took the connections in");

    let since = Instant::now();
    validator.service.shutdown.cancel();
    // Without the grace period, the read timeout's 65 s.
    let stopped = tokio::time::timeout(Duration::from_secs(15), validator.service.task).await;
    let stopped_after = since.elapsed();
    stopped.expect("stopped within 15 s").expect("no panic").expect("a clean stop");
    assert!(
        stopped_after >= grace && stopped_after < grace + Duration::from_secs(5),
        "stopped {stopped_after:?} after being told to, with a grace period of {grace:?}"
    );
    let (_, sent) = closed_after(half_sent, since).await;
    assert_eq!(sent, "", "a request cut off gets no answer");

    // The event of the request answered before is not lost on the way.
    let worker = env.start_worker().await;
    env.wait_for_count("SELECT count(*) FROM api_usage", 1).await;
    worker.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_validator_told_to_stop_serves_through_its_delay_with_healthz_saying_503() {
    let env = TestEnv::new().await;
    let org = env.org().await;
    let (_, key) = env.key(&org).await;
    let delay = Duration::from_secs(4);
    let mut validator = env.spawn_validator_process(&[("TOLLGATE_SHUTDOWN_DELAY", "4s".into())]);
    validator.answering().await;
    let client = reqwest::Client::new();
    let get = |url: String| client.get(url).bearer_auth(key.expose()).send();
    let metrics_health = format!("http://127.0.0.1:{}/healthz", validator.metrics_port);

    let since = Instant::now();
    validator.process.terminate();
    let healthz = wait_until(
        Duration::from_secs(3),
        || get(validator.url("/healthz")),
        |r| r.as_ref().is_ok_and(|r| r.status() == reqwest::StatusCode::SERVICE_UNAVAILABLE),
    );
    let healthz = healthz.await.expect("/healthz answers while draining");
    assert_eq!(healthz.text().await.expect("body"), "draining");
    let auth = get(validator.url("/v1/auth")).await.expect("served while draining");
    assert_eq!(auth.status(), reqwest::StatusCode::OK);
    let liveness = get(metrics_health.clone()).await.expect("the metrics listener answers while draining");
    assert_eq!(liveness.status(), reqwest::StatusCode::OK);

    let exit = validator.process.exit_within(Duration::from_secs(15)).await.expect("stopped after its delay");
    assert!(exit.success(), "a clean stop: {exit}");
    assert!(since.elapsed() >= delay, "stopped {:?} after SIGTERM, before its delay of {delay:?}", since.elapsed());
    env.cleanup().await;
}

#[tokio::test]
async fn a_second_signal_stops_a_draining_validator_at_once_but_a_repeat_of_the_first_does_not() {
    let env = TestEnv::new().await;
    let mut validator = env.spawn_validator_process(&[("TOLLGATE_SHUTDOWN_DELAY", "60s".into())]);
    validator.answering().await;
    validator.process.terminate();
    // Again a moment later, as when a terminal and a wrapper script both pass on one Ctrl-C: the same signal.
    tokio::time::sleep(Duration::from_millis(200)).await;
    validator.process.terminate();
    let client = reqwest::Client::new();
    let draining = wait_until(
        Duration::from_secs(5),
        || client.get(validator.url("/healthz")).send(),
        |r| r.as_ref().is_ok_and(|r| r.status() == reqwest::StatusCode::SERVICE_UNAVAILABLE),
    );
    draining.await.expect("draining after the first signal");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let healthz = client.get(validator.url("/healthz")).send().await.expect("still draining after a repeat");
    assert_eq!(healthz.status(), reqwest::StatusCode::SERVICE_UNAVAILABLE);

    validator.process.terminate();
    let exit = validator.process.exit_within(Duration::from_secs(5)).await.expect("stopped at the second signal");
    assert!(!exit.success(), "a stop that may lose events is no success: {exit}");
    env.cleanup().await;
}

#[tokio::test]
async fn a_key_revoked_while_the_validator_drains_is_refused() {
    let env = TestEnv::new().await;
    let org = env.org().await;
    let (key_id, key) = env.key(&org).await;
    let mut args = env.validator_args();
    args.shutdown_delay = Duration::from_secs(5);
    let validator = env.start_validator_with(args, REDIS_URL).await;
    let client = reqwest::Client::new();
    assert_eq!(validator.auth_status(&client, &key).await, reqwest::StatusCode::OK, "cached");

    validator.service.shutdown.cancel();
    // Past a few of the refresher's turns (200 ms apart here) since the signal.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let actor = tollgate_shared::admin::Actor("test".into());
    tollgate_shared::admin::revoke_key(&env.pool, &actor, key_id, None).await.expect("revoke");
    let refused = wait_until(
        Duration::from_secs(3),
        || validator.auth_status(&client, &key),
        |s| *s == reqwest::StatusCode::UNAUTHORIZED,
    );
    assert_eq!(refused.await, reqwest::StatusCode::UNAUTHORIZED, "the revocation reached the draining validator");

    validator.service.task.await.expect("no panic").expect("a clean stop");
    env.cleanup().await;
}
