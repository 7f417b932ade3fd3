//! A key verified over HTTP becomes exactly one usage row; bad keys get a uniform 401.

use std::time::{Duration, Instant};

use chrono::{TimeDelta, Utc};
use reqwest::header::HeaderValue;
use reqwest::StatusCode;
use serde_json::{json, Value};

use tollgate_shared::admin::{self, Actor};
use tollgate_shared::key::{ApiKey, KeyEnv};
use tollgate_validator::KeyCache;

use crate::harness::{new_key, wait_until, TestEnv};
use crate::servers::{PrivatePostgres, PrivateRedis, SlowProxy};

#[tokio::test]
async fn a_verified_key_becomes_one_usage_row_and_one_hourly_count() {
    let env = TestEnv::new().await;
    let org = env.org().await;
    let (key_id, key) = env.key(&org).await;
    let validator = env.start_validator().await;
    let worker = env.start_worker().await;

    let response = reqwest::Client::new()
        .get(validator.url("/v1/auth"))
        .bearer_auth(key.expose())
        .header("X-Original-Method", "PUT")
        .header("X-Original-URI", "/orders/42?x=1")
        .header("X-Forwarded-For", "203.0.113.7")
        .header("X-Request-Id", "req-1")
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::OK);
    let headers = response.headers();
    assert_eq!(headers["x-tollgate-key-id"], key_id.to_string().as_str());
    assert_eq!(headers["x-tollgate-key-name"], "test key");
    assert_eq!(headers["x-tollgate-role"], "user");
    assert!(headers.contains_key("x-tollgate-org-id"));

    // Envoy's ext_authz style: the original path appended to /v1/auth, no X-Original-URI.
    let envoy = reqwest::Client::new()
        .get(validator.url("/v1/auth/orders/7"))
        .header("X-API-Key", key.expose())
        .send()
        .await
        .expect("request");
    assert_eq!(envoy.status(), StatusCode::OK);
    env.wait_for_count("SELECT count(*) FROM api_usage WHERE path = '/orders/7'", 1).await;
    // The site's root under Envoy: /v1/auth/.
    let root = reqwest::Client::new()
        .get(validator.url("/v1/auth/"))
        .header("X-API-Key", key.expose())
        .send()
        .await
        .expect("request");
    assert_eq!(root.status(), StatusCode::OK);
    env.wait_for_count("SELECT count(*) FROM api_usage WHERE path = '/'", 1).await;
    // Envoy as gateways/envoy sends its checks: the client's own path and query after /v1/auth/envoy. That query
    // requires nothing of the key, and is recorded with the path.
    let query = reqwest::Client::new()
        .get(validator.url("/v1/auth/envoy/search?scope=all&role=admin"))
        .header("X-API-Key", key.expose())
        .send()
        .await
        .expect("request");
    assert_eq!(query.status(), StatusCode::OK, "the client's query is not Tollgate's parameters");
    env.wait_for_count("SELECT count(*) FROM api_usage WHERE path = '/search?scope=all&role=admin'", 1).await;
    // A gateway's auth URL with a slash before its requirement, and a client whose own URI is that same rest (as
    // Traefik would send it in X-Forwarded-Uri): the requirement holds, and this key has no admin role.
    let required = reqwest::Client::new()
        .get(validator.url("/v1/auth/?role=admin"))
        .header("X-API-Key", key.expose())
        .header("X-Forwarded-Uri", "/?role=admin")
        .send()
        .await
        .expect("request");
    assert_eq!(required.status(), StatusCode::FORBIDDEN, "a gateway's requirement is kept");
    // A method sent straight to /v1/auth, longer than an event holds: cut to fit, so that its message is written
    // rather than set aside as impossible with the events of other requests it carries.
    let method = reqwest::Method::from_bytes(b"PROPFIND-EXTENDED-EDITION").expect("a method");
    let long = reqwest::Client::new()
        .request(method, validator.url("/v1/auth"))
        .header("X-API-Key", key.expose())
        .send()
        .await
        .expect("request");
    assert_eq!(long.status(), StatusCode::OK);
    env.wait_for_count("SELECT count(*) FROM api_usage WHERE method = 'PROPFIND-EXTENDE'", 1).await;

    env.wait_for_count("SELECT count(*) FROM api_usage", 6).await;
    let (outcome, method, path, ip, request_id): (String, String, String, String, String) = sqlx::query_as(
        "SELECT outcome::text, method, path, host(client_ip), request_id FROM api_usage WHERE key_id = $1 AND method = 'PUT'",
    )
    .bind(key_id)
    .fetch_one(&env.pool)
    .await
    .expect("usage row");
    assert_eq!(
        (outcome.as_str(), method.as_str(), path.as_str(), ip.as_str(), request_id.as_str()),
        ("allowed", "PUT", "/orders/42?x=1", "203.0.113.7", "req-1")
    );
    assert_eq!(env.count("SELECT sum(allowed) FROM usage_hourly").await, 5);
    assert_eq!(env.count("SELECT sum(denied) FROM usage_hourly").await, 1);
    env.wait_for_count("SELECT total_requests FROM api_keys", 6).await;

    validator.service.stop().await;
    worker.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn bad_credentials_get_a_uniform_401_and_no_row() {
    let env = TestEnv::new().await;
    let org = env.org().await;
    let (_, good) = env.key(&org).await;
    let validator = env.start_validator().await;
    let worker = env.start_worker().await;
    let client = reqwest::Client::new();
    let made_up = ApiKey::generate(KeyEnv::Live);
    let mut typo = good.expose().to_owned();
    typo.replace_range(20..21, if &typo[20..21] == "a" { "b" } else { "a" });

    let attempts: Vec<(&str, Vec<(&str, HeaderValue)>)> = vec![
        ("missing", vec![]),
        (
            "unknown",
            vec![("authorization", HeaderValue::from_str(&format!("Bearer {}", made_up.expose())).expect("v"))],
        ),
        ("typo", vec![("x-api-key", HeaderValue::from_str(&typo).expect("v"))]),
        ("empty bearer", vec![("authorization", HeaderValue::from_static("Bearer "))]),
        ("10 kB key", vec![("x-api-key", HeaderValue::from_str(&"k".repeat(10_000)).expect("v"))]),
        ("non-UTF-8", vec![("x-service-key", HeaderValue::from_bytes(b"tg_live_\xff\xfe\xfd").expect("v"))]),
        ("garbage", vec![("authorization", HeaderValue::from_static("Bearer ../../etc/passwd"))]),
    ];
    let mut bodies = Vec::new();
    for (what, headers) in attempts {
        let mut request = client.get(validator.url("/v1/auth"));
        for (name, value) in headers {
            request = request.header(name, value);
        }
        let response = request.send().await.expect("request");
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{what}");
        assert_eq!(response.headers()["www-authenticate"], "Bearer realm=\"tollgate\"", "{what}");
        bodies.push(response.text().await.expect("body"));
    }
    assert!(bodies.windows(2).all(|pair| pair[0] == pair[1]), "401 bodies differ: {bodies:?}");

    // Headers far past any sane size get a 4xx from the HTTP layer, never a 5xx.
    let huge = client.get(validator.url("/v1/auth")).header("x-padding", "p".repeat(1_000_000)).send().await;
    if let Ok(response) = huge {
        assert!(response.status().is_client_error(), "huge headers: {}", response.status());
    }

    // A good request afterwards is the only row: none of the above was identified.
    let ok = client.get(validator.url("/v1/auth")).bearer_auth(good.expose()).send().await.expect("request");
    assert_eq!(ok.status(), StatusCode::OK);
    env.wait_for_count("SELECT count(*) FROM api_usage", 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(env.count("SELECT count(*) FROM api_usage WHERE outcome <> 'allowed'").await, 0);

    validator.service.stop().await;
    worker.stop().await;
    env.cleanup().await;
}

/// What a caller presents never reaches a log line, at any level, from Tollgate or the libraries it logs through: a
/// good key in each header and in a JSON body, a typo of it, a made-up key, a key of another format, a revoked key,
/// and keys in bodies that are refused.
#[tokio::test]
async fn no_presented_key_reaches_the_log_even_at_trace_level() {
    let env = TestEnv::new().await;
    let org = env.org().await;
    let (_, good) = env.key(&org).await;
    let (revoked_id, revoked) = env.key(&org).await;
    admin::revoke_key(&env.pool, &Actor("test".into()), revoked_id, None).await.expect("revoke");
    let mut typo = good.expose().to_owned();
    typo.replace_range(20..21, if &typo[20..21] == "a" { "b" } else { "a" });
    let made_up = ApiKey::generate(KeyEnv::Live).expose().to_owned();
    let foreign = "sk_prod_9f8e7d6c5b4a39281706f5e4d3c2b1a0".to_owned();
    let log = tempfile::NamedTempFile::new().expect("a log file");
    let mut validator = env.spawn_validator_process_logging(
        &[("RUST_LOG", "trace".into())],
        log.reopen().expect("the log file, to write").into(),
    );
    validator.answering().await;
    let client = reqwest::Client::new();

    let secrets = [good.expose().to_owned(), revoked.expose().to_owned(), typo, made_up, foreign];
    let mut statuses = Vec::new();
    for secret in &secrets {
        for header in ["authorization", "x-api-key", "x-service-key"] {
            let value = if header == "authorization" { format!("Bearer {secret}") } else { secret.clone() };
            let request = client.get(validator.url("/v1/auth?scope=read")).header(header, value);
            statuses.push(request.send().await.expect("auth").status().as_u16());
        }
        for body in [
            json!({ "key": secret }).to_string(),
            json!({ "key": secret, "cost": "many" }).to_string(),
            format!("{{\"key\": \"{secret}\""),
            format!("[\"{secret}\"]"),
        ] {
            let request = client.post(validator.url("/v1/verify")).body(body);
            statuses.push(request.send().await.expect("verify").status().as_u16());
        }
    }
    // The good key passes in each header and in a body (bad keys get `200` with `valid: false` there); bodies that
    // are not a valid request get 400 whatever key they hold.
    let good_key = [200, 200, 200, 200, 400, 400, 400];
    let bad_key = [401, 401, 401, 200, 400, 400, 400];
    assert_eq!(statuses, [good_key, bad_key, bad_key, bad_key, bad_key].concat());
    // Time for every line about these requests (and the events they made) to be written.
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(validator);

    let written = std::fs::read_to_string(log.path()).expect("the log");
    assert!(written.contains("TRACE"), "the validator logs at trace level: {written}");
    for secret in &secrets {
        // The random part alone, too: a key logged cut, quoted or escaped still leaks it.
        let tail = &secret[secret.len() - 24..];
        assert!(!written.contains(tail), "a presented key is in the log: …{tail}");
    }
    env.cleanup().await;
}

/// Requests refused before any decision (a bad cost header, a body that is no request, one too large) are counted as
/// `invalid_request`, so that a misconfigured gateway or client shows on the dashboards.
#[tokio::test]
async fn requests_refused_before_a_decision_are_counted() {
    let env = TestEnv::new().await;
    let mut validator = env.spawn_validator_process(&[]);
    validator.answering().await;
    let client = reqwest::Client::new();
    let refused = r#"tollgate_verify_requests_total{outcome="invalid_request"}"#;
    assert_eq!(validator.metric(refused).await, Some(0.0), "the series, from the start");

    let bad_cost = client.get(validator.url("/v1/auth")).header("x-tollgate-cost", "0").send();
    let no_request = client.post(validator.url("/v1/verify")).body("[]").send();
    let too_large = client.post(validator.url("/v1/verify")).body("{".repeat(100_000)).send();
    let mut statuses = Vec::new();
    for request in [bad_cost, no_request, too_large] {
        statuses.push(request.await.expect("request").status().as_u16());
    }
    assert_eq!(statuses, [400, 400, 413]);
    assert_eq!(validator.metric(refused).await, Some(3.0));
    drop(validator); // stopped before its namespace is removed
    env.cleanup().await;
}

/// The issue's promise: an unknown-key flood costs one PostgreSQL query per key, then none within the negative-cache
/// TTL. Counted by PostgreSQL itself: the scans of the key-hash index in this test's own database.
#[tokio::test]
async fn a_flood_of_one_unknown_key_makes_one_database_query() {
    let env = TestEnv::new().await;
    let validator = env.start_validator().await;
    let client = reqwest::Client::new();
    let made_up = ApiKey::generate(KeyEnv::Live);
    let waiting_lookups = "SELECT count(*) FROM pg_stat_activity \
        WHERE datname = current_database() AND wait_event_type = 'Lock' AND query LIKE '%WHERE k.key_hash = $1%'";
    let hash_index_scans = "SELECT sum(idx_scan) FROM pg_stat_user_indexes \
        WHERE relname = 'api_keys' AND indexrelname LIKE '%key_hash%'";

    // With the table locked, every request of the flood is in flight at once, and only one lookup reaches PostgreSQL.
    let lock = lock_keys(env.pool.clone()).await;
    let flood: Vec<_> = (0..20)
        .map(|_| {
            let request = client.get(validator.url("/v1/auth")).bearer_auth(made_up.expose());
            tokio::spawn(async move { request.send().await.expect("request").status() })
        })
        .collect();
    env.wait_for_count_within(waiting_lookups, 1, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(env.count(waiting_lookups).await, 1, "the other 19 lookups wait for the first one's answer");
    lock.rollback().await.expect("unlock");
    for request in flood {
        assert_eq!(request.await.expect("task"), StatusCode::UNAUTHORIZED);
    }
    // Within the TTL the answer comes from the negative cache: a locked table does not delay it.
    let lock = lock_keys(env.pool.clone()).await;
    let again = client.get(validator.url("/v1/auth")).bearer_auth(made_up.expose()).send();
    let again = tokio::time::timeout(Duration::from_secs(2), again).await.expect("no database wait").expect("request");
    assert_eq!(again.status(), StatusCode::UNAUTHORIZED);
    lock.rollback().await.expect("unlock");

    // A backend reports its statistics within 10 s of going idle (PostgreSQL 15).
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert_eq!(env.count(hash_index_scans).await, 1, "21 requests, one query");

    validator.service.stop().await;
    env.cleanup().await;
}

/// A transaction holding the strongest lock on `api_keys`: nothing reads it until the transaction ends.
async fn lock_keys(pool: sqlx::PgPool) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut transaction = pool.begin().await.expect("begin");
    sqlx::query("LOCK TABLE api_keys IN ACCESS EXCLUSIVE MODE").execute(&mut *transaction).await.expect("lock");
    transaction
}

/// A key's name past ASCII arrives percent-encoded in its header (raw UTF-8 there reads as Latin-1, or not at all, in
/// many HTTP libraries), and `%` with it, so that it decodes back.
#[tokio::test]
async fn a_key_name_past_ascii_arrives_percent_encoded() {
    let env = TestEnv::new().await;
    let org = env.org().await;
    let (_, key) = env.key_with(&org, |k| k.name = "Équipe 100% données".into()).await;
    let validator = env.start_validator().await;
    let response = reqwest::Client::new().get(validator.url("/v1/auth")).bearer_auth(key.expose()).send().await;
    let response = response.expect("request");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["x-tollgate-key-name"], "%C3%89quipe 100%25 donn%C3%A9es");
    validator.service.stop().await;
    env.cleanup().await;
}

/// While PostgreSQL does not answer lookups in time (a lock on the keys, an overload), a flood of keys not cached
/// writes a log line a second, not one a request.
#[tokio::test]
async fn lookups_that_time_out_are_logged_once_a_second_not_once_a_request() {
    let env = TestEnv::new().await;
    let log = tempfile::NamedTempFile::new().expect("a log file");
    let mut validator = env.spawn_validator_process_logging(&[], log.reopen().expect("the log file, to write").into());
    validator.answering().await;
    let lock = lock_keys(env.pool.clone()).await;
    let client = reqwest::Client::new();
    let requests = (0..20).map(|n| {
        let request = client.get(validator.url("/v1/auth")).bearer_auth(format!("sk_flood_{n:032}"));
        async move { request.send().await.expect("request").status() }
    });
    let statuses = futures::future::join_all(requests).await;
    assert!(statuses.iter().all(|s| *s == StatusCode::SERVICE_UNAVAILABLE), "{statuses:?}");
    drop(lock);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let logged = std::fs::read_to_string(log.path()).expect("the log");
    let lines = logged.matches("cannot look up a key that is not cached").count();
    assert!((1..=2).contains(&lines), "{lines} lines for 20 failed lookups: {logged}");
    drop(validator); // stopped before its namespace is removed
    env.cleanup().await;
}

#[tokio::test]
async fn revoked_expired_and_disabled_keys_get_401_and_are_recorded() {
    let env = TestEnv::new().await;
    let org = env.org().await;
    let (revoked_id, revoked) = env.key(&org).await;
    // Made with an expiry, which has passed by the time it is used (a key cannot be made already expired).
    let (expired_id, expired) = env.key_with(&org, |k| k.expires_at = Some(Utc::now() + TimeDelta::hours(1))).await;
    let ended = admin::KeyChanges { expires_at: Some(Some(Utc::now() - TimeDelta::seconds(1))), ..Default::default() };
    admin::update_key(&env.pool, &Actor("test".into()), expired_id, ended).await.expect("expire");
    let (disabled_id, disabled) = env.key(&org).await;
    let validator = env.start_validator().await;
    let worker = env.start_worker().await;
    let client = reqwest::Client::new();
    let status = |key| validator.auth_status(&client, key);

    // Cached while good, then revoked through the operations the CLI uses: the cache learns within 5 s.
    assert_eq!(status(&revoked).await, StatusCode::OK);
    assert_eq!(status(&disabled).await, StatusCode::OK);
    admin::revoke_key(&env.pool, &Actor("test".into()), revoked_id, Some("leaked".into())).await.expect("revoke");
    let changes = admin::KeyChanges { active: Some(false), ..Default::default() };
    admin::update_key(&env.pool, &Actor("test".into()), disabled_id, changes).await.expect("disable");
    let seen = wait_until(Duration::from_secs(5), || status(&revoked), |s| *s == StatusCode::UNAUTHORIZED).await;
    assert_eq!(seen, StatusCode::UNAUTHORIZED, "revocation did not reach the validator within 5 s");
    // A separate change: the refresher may apply it one poll after the revocation.
    let seen = wait_until(Duration::from_secs(5), || status(&disabled), |s| *s == StatusCode::UNAUTHORIZED).await;
    assert_eq!(seen, StatusCode::UNAUTHORIZED, "disabling did not reach the validator within 5 s");
    assert_eq!(status(&expired).await, StatusCode::UNAUTHORIZED);

    env.wait_for_count("SELECT count(*) FROM api_usage WHERE outcome = 'expired'", 1).await;
    env.wait_for_count("SELECT count(*) FROM api_usage WHERE outcome = 'disabled'", 1).await;
    assert!(env.count("SELECT count(*) FROM api_usage WHERE outcome = 'revoked'").await >= 1);
    let denied = env.count("SELECT count(*) FROM api_usage WHERE outcome <> 'allowed'").await;
    env.wait_for_count("SELECT sum(denied) FROM usage_hourly", denied).await;
    // The revoked key stayed good until the cache learned of the revocation; every one of those is counted.
    let allowed = env.count("SELECT count(*) FROM api_usage WHERE outcome = 'allowed'").await;
    assert!(allowed >= 2);
    env.wait_for_count("SELECT sum(allowed) FROM usage_hourly", allowed).await;

    validator.service.stop().await;
    worker.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_key_revoked_while_it_is_being_enabled_stays_revoked() {
    let env = TestEnv::new().await;
    let org = env.org().await;
    let (id, _) = env.key(&org).await;
    let change = |active| admin::KeyChanges { active: Some(active), ..Default::default() };
    admin::update_key(&env.pool, &Actor("test".into()), id, change(false)).await.expect("disable");

    // A revocation under way (its row locked, not yet committed) when the enabling reads the key, which is not
    // revoked yet: the enabling then waits for the row, and must not undo the revocation once it gets it.
    let mut revoking = env.pool.begin().await.expect("begin");
    sqlx::query("UPDATE api_keys SET active = false, revoked_at = now() WHERE id = $1")
        .bind(id)
        .execute(&mut *revoking)
        .await
        .expect("revoke");
    let pool = env.pool.clone();
    let enabling = tokio::spawn(async move { admin::update_key(&pool, &Actor("test".into()), id, change(true)).await });
    let waiting =
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'";
    env.wait_for_count(waiting, 1).await;
    revoking.commit().await.expect("commit");

    let refused = enabling.await.expect("task").expect_err("enabling a revoked key");
    assert!(refused.to_string().contains("revoked"), "{refused}");
    let state: (bool, bool) = sqlx::query_as("SELECT active, revoked_at IS NOT NULL FROM api_keys WHERE id = $1")
        .bind(id)
        .fetch_one(&env.pool)
        .await
        .expect("key");
    assert_eq!(state, (false, true), "(active, revoked)");
    // And once revoked, plainly.
    let refused = admin::update_key(&env.pool, &Actor("test".into()), id, change(true)).await.expect_err("enabling");
    assert!(refused.to_string().contains("revoked"), "{refused}");
    env.cleanup().await;
}

/// An operator's own SQL, which does not touch updated_at, still reaches the validators; the workers' bookkeeping on
/// a key is not a change.
#[tokio::test]
async fn changes_made_in_sql_reach_the_validators() {
    let env = TestEnv::new().await;
    let org = env.org().await;
    let (key_id, key) = env.key(&org).await;
    let other_org = env.org().await;
    let (_, other) = env.key(&other_org).await;
    let validator = env.start_validator().await;
    let client = reqwest::Client::new();
    let status = |key| validator.auth_status(&client, key);
    assert_eq!(status(&key).await, StatusCode::OK);
    assert_eq!(status(&other).await, StatusCode::OK);
    let stamp = "SELECT extract(epoch FROM updated_at)::float8, changed_in FROM api_keys WHERE id = $1";
    let stamped = || async {
        sqlx::query_as::<_, (f64, i64)>(stamp).bind(key_id).fetch_one(&env.pool).await.expect("updated_at")
    };

    let before = stamped().await;
    sqlx::query("UPDATE api_keys SET total_requests = total_requests + 1, last_used_at = now() WHERE id = $1")
        .bind(key_id)
        .execute(&env.pool)
        .await
        .expect("bookkeeping");
    assert_eq!(stamped().await, before, "the workers' bookkeeping is not a change");

    sqlx::query("UPDATE api_keys SET active = false WHERE id = $1").bind(key_id).execute(&env.pool).await.expect("key");
    sqlx::query("UPDATE organizations SET active = false WHERE slug = $1")
        .bind(&other_org)
        .execute(&env.pool)
        .await
        .expect("org");
    for key in [&key, &other] {
        let seen = wait_until(Duration::from_secs(5), || status(key), |s| *s == StatusCode::UNAUTHORIZED).await;
        assert_eq!(seen, StatusCode::UNAUTHORIZED, "a change made in SQL reached the validator");
    }
    validator.service.stop().await;
    env.cleanup().await;
}

/// A change whose commit becomes visible long after it was made (an operator's transaction left open, a commit
/// waiting for a synchronous standby) reaches the validators all the same: they find changes by the transaction
/// that made them, not by its time.
#[tokio::test]
async fn a_change_committed_long_after_it_was_made_reaches_the_validators() {
    let env = TestEnv::new().await;
    let org = env.org().await;
    let (key_id, key) = env.key(&org).await;
    let validator = env.start_validator().await;
    let client = reqwest::Client::new();
    let status = || validator.auth_status(&client, &key);
    assert_eq!(status().await, StatusCode::OK);

    let mut open = env.pool.begin().await.expect("begin");
    sqlx::query("UPDATE api_keys SET revoked_at = now() WHERE id = $1")
        .bind(key_id)
        .execute(&mut *open)
        .await
        .expect("revoke");
    // Longer than the refresher once looked back in time (5 s).
    tokio::time::sleep(Duration::from_secs(7)).await;
    assert_eq!(status().await, StatusCode::OK, "not committed yet");
    open.commit().await.expect("commit");
    let seen = wait_until(Duration::from_secs(5), status, |s| *s == StatusCode::UNAUTHORIZED).await;
    assert_eq!(seen, StatusCode::UNAUTHORIZED, "the revocation reached the validator");
    validator.service.stop().await;
    env.cleanup().await;
}

/// A read of a key under way while a change to it is applied may predate the change: it is not kept, so the change is
/// not undone by the older read finishing after it. Whether the read was a lookup of a key not cached, of a key not
/// made yet, or the recheck of a cached one.
#[tokio::test]
async fn a_read_that_predates_an_applied_change_does_not_undo_it() {
    let env = TestEnv::new().await;
    let org = env.org().await;
    let (revoked_id, revoked) = env.key(&org).await;
    let (rechecked_id, rechecked) = env.key(&org).await;
    let unmade = ApiKey::generate(KeyEnv::Test);
    // The cache under test reads through a proxy that can hold PostgreSQL's answers back, on one connection, which
    // its first read prepares the statement on (so that a later read's snapshot is taken at once, not after a
    // delayed round trip); every record read is due for a recheck. The changes are read by another cache.
    let options = env.pool.connect_options();
    let proxy = SlowProxy::start(&format!("{}:{}", options.get_host(), options.get_port())).await;
    let port = proxy.address.rsplit(':').next().and_then(|port| port.parse().ok()).expect("the proxy's port");
    let slow = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .test_before_acquire(false)
        .connect_with((*options).clone().host("127.0.0.1").port(port))
        .await
        .expect("pool");
    let cache = KeyCache::new(slow.clone(), 10, Duration::from_secs(30), Duration::ZERO).await.expect("cache");
    let fresh = KeyCache::new(env.pool.clone(), 10, Duration::from_secs(30), Duration::from_secs(300));
    let fresh = fresh.await.expect("cache");
    let found = |cache: &KeyCache, key: &ApiKey| {
        let (cache, hash) = (cache.clone(), key.hash());
        async move { cache.lookup(hash).await.expect("lookup") }
    };
    assert!(found(&cache, &rechecked).await.is_some());
    // Once the pool has its connection back (the pool pings it when it comes back, and a ping answered late would
    // hold up the next read), PostgreSQL's answers come late by `delay`.
    let (pool, proxy) = (&slow, &proxy);
    let answers_late = |delay| async move {
        let idle = wait_until(Duration::from_secs(5), || async { pool.num_idle() }, |idle| *idle == 1).await;
        assert_eq!(idle, 1, "the pool's connection is back");
        proxy.delay(delay);
    };
    // Reads answered this late are under way meanwhile (and within the cache's 1 s timeout).
    let (late, settle) = (Duration::from_millis(450), Duration::from_millis(150));

    // A lookup of a key not cached, its read under way while the key's revocation is applied.
    answers_late(late).await;
    let lookup = tokio::spawn(found(&cache, &revoked));
    tokio::time::sleep(settle).await;
    admin::revoke_key(&env.pool, &Actor("test".into()), revoked_id, None).await.expect("revoke");
    cache.apply(revoked.hash(), (*found(&fresh, &revoked).await.expect("the key")).clone());
    let answered = lookup.await.expect("lookup").expect("the key");
    assert!(answered.revoked_at.is_none(), "the read predates the revocation");
    answers_late(Duration::ZERO).await;
    let now = found(&cache, &revoked).await.expect("the key");
    assert!(now.revoked_at.is_some(), "the revocation held");

    // A lookup of a key not made yet, its read under way while the key's creation is applied.
    answers_late(late).await;
    let lookup = tokio::spawn(found(&cache, &unmade));
    tokio::time::sleep(settle).await;
    admin::import_key(&env.pool, &Actor("test".into()), new_key(&org), &unmade).await.expect("import");
    cache.apply(unmade.hash(), (*found(&fresh, &unmade).await.expect("the key")).clone());
    assert!(lookup.await.expect("lookup").is_none(), "the read predates the key");
    answers_late(Duration::ZERO).await;
    assert!(found(&cache, &unmade).await.is_some(), "the key is no longer unknown");

    // A cached key's recheck (its lookup answers at once, from the cache), under way while its revocation is applied.
    answers_late(late).await;
    assert!(found(&cache, &rechecked).await.expect("the key").revoked_at.is_none());
    tokio::time::sleep(settle).await;
    admin::revoke_key(&env.pool, &Actor("test".into()), rechecked_id, None).await.expect("revoke");
    cache.apply(rechecked.hash(), (*found(&fresh, &rechecked).await.expect("the key")).clone());
    // The recheck's answer has come meanwhile.
    tokio::time::sleep(Duration::from_secs(1)).await;
    answers_late(Duration::ZERO).await;
    let now = found(&cache, &rechecked).await.expect("the key");
    assert!(now.revoked_at.is_some(), "the revocation held");

    slow.close().await;
    env.cleanup().await;
}

/// A server whose transaction ids are behind those the key cache last saw (restored from a backup, a fail-over that
/// lost transactions, a cut-over to another server) still brings its changes: the cache reads every key's last change
/// once again when the server restarted or is another.
#[tokio::test]
async fn changes_reach_the_key_cache_from_a_server_restored_to_before_what_it_saw() {
    let postgres = PrivatePostgres::start();
    let env = TestEnv::on_postgres(postgres.url("").trim_end_matches('/')).await;
    let org = env.org().await;
    let (key_id, key) = env.key(&org).await;
    postgres.stop();
    postgres.back_up();
    postgres.restart();
    // Each within 1 s: given a few tries, on a server just started on a busy machine.
    let made = || async { KeyCache::new(env.pool.clone(), 10, Duration::from_secs(1), Duration::from_secs(300)).await };
    let cache = wait_until(Duration::from_secs(10), made, Result::is_ok).await.expect("cache");
    let found = || async { cache.lookup(key.hash()).await.ok().flatten() };
    let record = wait_until(Duration::from_secs(10), found, Option::is_some).await.expect("the key");
    assert!(record.revoked_at.is_none());
    // Transactions the backup has not had, which the cache's snapshots see past.
    for _ in 0..100 {
        sqlx::query("SELECT pg_current_xact_id()").execute(&env.pool).await.expect("a transaction");
    }
    assert_eq!(cache.refresh().await.expect("refresh"), 0);

    postgres.stop();
    postgres.restore();
    postgres.restart();
    // Its transaction is one of the ids the cache saw past.
    let actor = Actor("test".into());
    let revoked = || async { admin::revoke_key(&env.pool, &actor, key_id, None).await.is_ok() };
    assert!(wait_until(Duration::from_secs(10), revoked, |ok| *ok).await, "revoked");
    let refreshed = wait_until(Duration::from_secs(10), || async { cache.refresh().await.ok() }, Option::is_some);
    assert!(refreshed.await.is_some_and(|changed| changed >= 1), "the key's change was read");
    let record = cache.lookup(key.hash()).await.expect("lookup").expect("the key");
    assert!(record.revoked_at.is_some(), "the revocation reached the cache");
    env.cleanup().await;
}

/// PostgreSQL's `'infinity'` cannot be read into a time (reading one panicked, and stopped the key refresher for
/// good): the database refuses it, naming what to write instead, and the validators keep picking up changes.
#[tokio::test]
async fn an_infinite_key_time_is_refused_in_sql_and_changes_keep_reaching_the_validators() {
    let env = TestEnv::new().await;
    let org = env.org().await;
    let (key_id, key) = env.key(&org).await;
    let validator = env.start_validator().await;
    let client = reqwest::Client::new();
    let status = |key| validator.auth_status(&client, key);
    assert_eq!(status(&key).await, StatusCode::OK);

    for (column, value, constraint) in [
        ("expires_at", "infinity", "api_keys_expires_at_finite_null_is_never"),
        ("expires_at", "-infinity", "api_keys_expires_at_finite_null_is_never"),
        ("revoked_at", "infinity", "api_keys_revoked_at_finite"),
    ] {
        let sql = format!("UPDATE api_keys SET {column} = '{value}' WHERE id = $1");
        let refused = sqlx::query(&sql).bind(key_id).execute(&env.pool).await.expect_err("an infinite time");
        assert!(refused.to_string().contains(constraint), "{column} = {value}: {refused}");
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    sqlx::query("UPDATE api_keys SET revoked_at = now(), active = false WHERE id = $1")
        .bind(key_id)
        .execute(&env.pool)
        .await
        .expect("revoke");
    let seen = wait_until(Duration::from_secs(5), || status(&key), |s| *s == StatusCode::UNAUTHORIZED).await;
    assert_eq!(seen, StatusCode::UNAUTHORIZED, "the revocation reached the validator");
    validator.service.stop().await;
    env.cleanup().await;
}

/// A revocation that waits for a worker's batch holding the key's row commits later than its transaction began;
/// it must still reach validators whose refresher has moved on meanwhile.
#[tokio::test]
async fn a_revocation_that_waited_for_a_lock_still_reaches_the_validators() {
    let env = TestEnv::new().await;
    let org = env.org().await;
    let (id, key) = env.key(&org).await;
    let validator = env.start_validator().await;
    let client = reqwest::Client::new();
    let status = || validator.auth_status(&client, &key);
    assert_eq!(status().await, StatusCode::OK);

    // What a worker's batch does to the key's row, held open.
    let mut batch = env.pool.begin().await.expect("begin");
    sqlx::query("UPDATE api_keys SET total_requests = total_requests + 1 WHERE id = $1")
        .bind(id)
        .execute(&mut *batch)
        .await
        .expect("update");
    let pool = env.pool.clone();
    let revoking =
        tokio::spawn(async move { admin::revoke_key(&pool, &Actor("test".into()), id, None).await.map(|_| ()) });
    release_after_a_long_wait(&env, batch, revoking).await;

    let seen = wait_until(Duration::from_secs(5), status, |s| *s == StatusCode::UNAUTHORIZED).await;
    assert_eq!(seen, StatusCode::UNAUTHORIZED, "the revocation reached the validator");
    validator.service.stop().await;
    env.cleanup().await;
}

/// Commits `holder` once `waiting`, a change held up by its lock, has waited 6 s (the key refresher once looked for
/// changes only 5 s back in time), then waits for that change.
async fn release_after_a_long_wait(
    env: &TestEnv,
    holder: sqlx::Transaction<'static, sqlx::Postgres>,
    waiting: tokio::task::JoinHandle<Result<(), admin::AdminError>>,
) {
    let lock_waits =
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'";
    env.wait_for_count(lock_waits, 1).await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    holder.commit().await.expect("commit");
    waiting.await.expect("task").expect("the change held up");
}

/// An imported key that a validator refused before its import (its client already presents it) is accepted once the
/// import commits, even when the import waited for its organization's lock for seconds.
#[tokio::test]
async fn an_import_that_waited_for_a_lock_still_reaches_a_validator_that_refused_its_key() {
    let env = TestEnv::new().await;
    let org = env.org().await;
    let validator = env.start_validator().await;
    let client = reqwest::Client::new();
    let key = ApiKey::parse("sk_prod_0f1e2d3c4b5a69788796a5b4c3d2e1f0").expect("an importable key");
    let status = || validator.auth_status(&client, &key);
    assert_eq!(status().await, StatusCode::UNAUTHORIZED, "not imported yet");

    // Another import, or an operator's transaction, holding the organization's row.
    let mut holder = env.pool.begin().await.expect("begin");
    sqlx::query("SELECT 1 FROM organizations WHERE slug = $1 FOR UPDATE")
        .bind(&org)
        .execute(&mut *holder)
        .await
        .expect("lock");
    let (pool, org_slug, imported) = (env.pool.clone(), org.clone(), key.clone());
    let importing = tokio::spawn(async move {
        admin::import_key(&pool, &Actor("test".into()), new_key(&org_slug), &imported).await.map(|_| ())
    });
    release_after_a_long_wait(&env, holder, importing).await;

    let seen = wait_until(Duration::from_secs(5), status, |s| *s == StatusCode::OK).await;
    assert_eq!(seen, StatusCode::OK, "the import reached the validator");
    validator.service.stop().await;
    env.cleanup().await;
}

/// Lookups that hold every pooled connection (a flood of made-up keys, each a query) hold up no revocation: the
/// refresher has a connection of its own. Nor do they count as PostgreSQL away: a key not cached is still read once a
/// connection comes free, instead of answered 503 at once.
#[tokio::test]
async fn lookups_holding_every_pooled_connection_hold_up_no_revocation() {
    let env = TestEnv::new().await;
    let org = env.org().await;
    let (revoked_id, revoked) = env.key(&org).await;
    let (_, other) = env.key(&org).await;
    let options = (*env.pool.connect_options()).clone();
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(1).connect_with(options).await.expect("pool");
    let cache = KeyCache::new(pool.clone(), 10, Duration::from_secs(1), Duration::from_secs(300)).await.expect("cache");
    let cached = cache.lookup(revoked.hash()).await.expect("lookup").expect("the key");
    assert!(cached.revoked_at.is_none());
    let held = pool.acquire().await.expect("the pool's one connection");
    let shutdown = tokio_util::sync::CancellationToken::new();
    let refresher = tokio::spawn(cache.clone().keep_fresh(Duration::from_millis(100), shutdown.clone()));

    sqlx::query("UPDATE api_keys SET revoked_at = now() WHERE id = $1")
        .bind(revoked_id)
        .execute(&env.pool)
        .await
        .expect("revoke");
    let seen = wait_until(
        Duration::from_secs(10),
        || async { cache.lookup(revoked.hash()).await.ok().flatten().and_then(|record| record.revoked_at) },
        Option::is_some,
    )
    .await;
    assert!(seen.is_some(), "the revocation reached the cache while the pool had no connection to spare");

    let lookup = tokio::spawn({
        let cache = cache.clone();
        async move { cache.lookup(other.hash()).await.map(|record| record.is_some()) }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(held);
    let found = lookup.await.expect("the lookup's task");
    assert!(matches!(found, Ok(true)), "a lookup while the pool was busy: {found:?}");

    shutdown.cancel();
    refresher.await.expect("the refresher's task");
    pool.close().await;
    env.cleanup().await;
}

/// On a PostgreSQL of its own: another test's transaction left running would have the refresher read this one's
/// changes again until it ends, as it should.
#[tokio::test]
async fn the_key_cache_reads_a_changed_key_once_whichever_of_key_org_and_tier_changed() {
    let postgres = PrivatePostgres::start();
    let env = TestEnv::on_postgres(postgres.url("").trim_end_matches('/')).await;
    let org = env.org().await;
    env.key(&org).await;
    let cache =
        KeyCache::new(env.pool.clone(), 10, Duration::from_secs(1), Duration::from_secs(300)).await.expect("cache");
    let changed = || async { cache.refresh().await.expect("refresh") };
    // Marked as changed by a transaction of now, as the triggers do (setting the mark alone is no change to them).
    let touch = |table: &'static str| {
        let sql = format!("UPDATE {table} SET changed_in = pg_current_xact_id()::text::bigint");
        let pool = env.pool.clone();
        async move { sqlx::query(&sql).execute(&pool).await.expect(table) }
    };

    // The key, its organization and its tier all changed (each arm of the query matches it).
    for table in ["api_keys", "organizations", "rate_limit_tiers"] {
        touch(table).await;
    }
    assert_eq!(changed().await, 1);
    // Nothing changed since.
    assert_eq!(changed().await, 0);
    // Each alone.
    for table in ["api_keys", "organizations", "rate_limit_tiers"] {
        touch(table).await;
        assert_eq!(changed().await, 1, "{table} changed");
        assert_eq!(changed().await, 0, "{table} changed once");
    }
    // A transaction left open holds no refresh back: changes made meanwhile are read once, and its own once it
    // commits.
    let mut open = env.pool.begin().await.expect("begin");
    let mark = "UPDATE organizations SET changed_in = pg_current_xact_id()::text::bigint";
    sqlx::query(mark).execute(&mut *open).await.expect("a change not committed yet");
    touch("api_keys").await;
    assert_eq!(changed().await, 1, "a change made while a transaction is open");
    assert_eq!(changed().await, 0, "read once, though the transaction is still open");
    open.commit().await.expect("commit");
    assert_eq!(changed().await, 1, "the open transaction's change, once committed");
    assert_eq!(changed().await, 0);
    // Marks of transactions this server has not had, as a restore of another server's rows brings: not a change to
    // read again at every refresh.
    for table in ["api_keys", "organizations", "rate_limit_tiers"] {
        let sql = format!("UPDATE {table} SET changed_in = pg_current_xact_id()::text::bigint + 1000000000");
        sqlx::query(&sql).execute(&env.pool).await.expect(table);
    }
    assert_eq!(changed().await, 0);

    env.cleanup().await;
}

#[tokio::test]
async fn tiers_are_data_and_a_row_the_validator_cannot_read_holds_up_no_other_change() {
    let env = TestEnv::new().await;
    let org = env.org().await;
    let (gold_id, gold) = env.key(&org).await;
    let (odd_id, odd) = env.key(&org).await;
    let (revoked_id, revoked) = env.key(&org).await;
    let validator = env.start_validator().await;
    let client = reqwest::Client::new();
    let status = |key| validator.auth_status(&client, key);
    for key in [&gold, &odd, &revoked] {
        assert_eq!(status(key).await, StatusCode::OK);
    }
    let sql = |statement: &'static str, id: uuid::Uuid| {
        let pool = env.pool.clone();
        async move { sqlx::query(statement).bind(id).execute(&pool).await.expect(statement) }
    };

    // A tier an operator added in SQL (tiers are rows, not a list compiled into the validator).
    sql("INSERT INTO rate_limit_tiers (name, window_limit, window_seconds) VALUES ('gold', 2, 60)", gold_id).await;
    sql("UPDATE api_keys SET rate_limit_tier = 'gold', updated_at = now() WHERE id = $1", gold_id).await;
    // A role a newer release added: this validator cannot read the row. The key fails, rather than keep deciding on
    // what the cache held before its row changed.
    sqlx::query("ALTER TABLE api_keys DROP CONSTRAINT api_keys_role_check").execute(&env.pool).await.expect("alter");
    sql("UPDATE api_keys SET role = 'owner', updated_at = now() WHERE id = $1", odd_id).await;
    let seen = wait_until(Duration::from_secs(10), || status(&odd), |s| *s == StatusCode::SERVICE_UNAVAILABLE).await;
    assert_eq!(seen, StatusCode::SERVICE_UNAVAILABLE, "a key whose row cannot be read");
    // And later changes still arrive: the refresher moved past that row.
    admin::revoke_key(&env.pool, &Actor("test".into()), revoked_id, None).await.expect("revoke");
    let seen = wait_until(Duration::from_secs(10), || status(&revoked), |s| *s == StatusCode::UNAUTHORIZED).await;
    assert_eq!(seen, StatusCode::UNAUTHORIZED, "a revocation after the row that cannot be read");
    // The key on the new tier gets its limit: 2 per minute (a window of another length counts afresh).
    let mut statuses = Vec::new();
    for _ in 0..3 {
        statuses.push(status(&gold).await);
    }
    assert_eq!(statuses, [StatusCode::OK, StatusCode::OK, StatusCode::TOO_MANY_REQUESTS]);

    validator.service.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn lookups_that_queue_behind_a_failing_query_fail_with_it_rather_than_in_turn() {
    let postgres = PrivatePostgres::start();
    let env = TestEnv::on_postgres(postgres.url("").trim_end_matches('/')).await;
    let validator = env.start_validator().await;
    let client = reqwest::Client::new();
    let unseen = ApiKey::generate(KeyEnv::Test);
    assert_eq!(client.get(validator.url("/healthz")).send().await.expect("request").status(), StatusCode::OK);

    postgres.pause();
    // Twenty requests for one key no cache holds, before the refresher has noticed: they share one query, and when
    // it times out, the rest fail at once instead of each waiting out a query of its own in turn.
    let (statuses, took) = validator.auth_at_once(&client, &unseen, 20).await;
    assert!(statuses.iter().all(|s| *s == StatusCode::SERVICE_UNAVAILABLE), "{statuses:?}");
    assert!(took < Duration::from_secs(4), "the twenty answers took {took:?}");

    postgres.resume();
    validator.service.stop().await;
    env.cleanup().await;
}

/// A read that hangs while PostgreSQL itself answers (here, `api_keys` locked): the refresher does not count
/// PostgreSQL away, so the key's own failed read is what spares the lookups queued behind it a read each.
#[tokio::test]
async fn lookups_of_a_key_whose_read_hangs_fail_together_after_one_timeout() {
    let env = TestEnv::new().await;
    let validator = env.start_validator().await;
    let client = reqwest::Client::new();
    let unseen = ApiKey::generate(KeyEnv::Test);
    let locked = lock_keys(env.pool.clone()).await;

    let (statuses, took) = validator.auth_at_once(&client, &unseen, 20).await;
    assert!(statuses.iter().all(|s| *s == StatusCode::SERVICE_UNAVAILABLE), "{statuses:?}");
    assert!(took < Duration::from_secs(4), "the twenty answers took {took:?}");

    locked.rollback().await.expect("unlock");
    validator.service.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn without_postgresql_cached_keys_keep_deciding_unseen_ones_get_503_at_once_and_deleted_ones_go() {
    let postgres = PrivatePostgres::start();
    let env = TestEnv::on_postgres(postgres.url("").trim_end_matches('/')).await;
    let org = env.org().await;
    let (key_id, key) = env.key(&org).await;
    let recheck = Duration::from_millis(300);
    // A process of its own, so that the metrics read below are this validator's alone.
    let validator = env.spawn_validator_process(&[
        ("TOLLGATE_KEY_REFRESH", "200ms".into()),
        ("TOLLGATE_KEY_RECHECK", format!("{}ms", recheck.as_millis())),
    ]);
    let client = reqwest::Client::new();
    let auth_with = |key: ApiKey| {
        let request = client.get(validator.url("/v1/auth")).bearer_auth(key.expose());
        async move {
            let started = Instant::now();
            let status = request.send().await.map(|response| response.status()).ok();
            (status, started.elapsed())
        }
    };
    let auth = || auth_with(key.clone());
    let (status, _) = wait_until(Duration::from_secs(20), auth, |(status, _)| status.is_some()).await;
    assert_eq!(status, Some(StatusCode::OK));

    postgres.stop();
    // Past the recheck age, several times over: each answer comes from the cache at once, not after the pool's
    // wait for a connection, and not as a 503.
    for _ in 0..4 {
        tokio::time::sleep(recheck * 2).await;
        let (status, took) = auth().await;
        assert_eq!(status, Some(StatusCode::OK), "a cached key while PostgreSQL is away");
        assert!(took < Duration::from_millis(500), "answered in {took:?}");
    }

    // Once the refresher has found PostgreSQL away, a key the cache has not seen gets 503 at once, not after the
    // pool's wait for a connection.
    let unseen = || auth_with(ApiKey::generate(KeyEnv::Test));
    let (status, took) = wait_until(Duration::from_secs(15), unseen, |(status, took)| {
        *status == Some(StatusCode::SERVICE_UNAVAILABLE) && *took < Duration::from_millis(500)
    })
    .await;
    assert_eq!(status, Some(StatusCode::SERVICE_UNAVAILABLE), "an unseen key while PostgreSQL is away");
    assert!(took < Duration::from_millis(500), "answered in {took:?}");
    // And the dashboards see how long it has been.
    let age = validator.metric("tollgate_key_refresh_age_seconds").await.expect("the refresh age gauge");
    assert!(age > 1.0, "seconds since the refresher last heard from PostgreSQL: {age}");

    postgres.restart();
    // A key row deleted outright is a change the refresher cannot see: its recheck finds it gone.
    sqlx::query("DELETE FROM key_audit WHERE key_id = $1").bind(key_id).execute(&env.pool).await.expect("audit");
    sqlx::query("DELETE FROM api_keys WHERE id = $1").bind(key_id).execute(&env.pool).await.expect("delete");
    let (status, _) =
        wait_until(Duration::from_secs(30), auth, |(status, _)| *status == Some(StatusCode::UNAUTHORIZED)).await;
    assert_eq!(status, Some(StatusCode::UNAUTHORIZED), "a deleted key after its recheck");

    drop(validator); // stopped before its namespace is removed
    env.cleanup().await;
}

#[tokio::test]
async fn verify_answers_json_and_names_the_bad_field() {
    let env = TestEnv::new().await;
    let org = env.org().await;
    let (key_id, key) = env.key(&org).await;
    let (revoked_id, revoked) = env.key(&org).await;
    admin::revoke_key(&env.pool, &Actor("test".into()), revoked_id, None).await.expect("revoke");
    let validator = env.start_validator().await;
    let worker = env.start_worker().await;
    let client = reqwest::Client::new();
    let verify = |body: Value| {
        let request = client.post(validator.url("/v1/verify")).json(&body);
        async move {
            let response = request.send().await.expect("request");
            (response.status(), response.json::<Value>().await.expect("json body"))
        }
    };

    let (status, body) = verify(json!({ "key": key.expose(), "cost": 3, "method": "GET", "path": "/x" })).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["valid"], true);
    assert_eq!(body["code"], "VALID");
    assert_eq!(body["key_id"], key_id.to_string());
    assert_eq!(body["scopes"], json!(["read"]));

    let (_, body) = verify(json!({ "key": revoked.expose() })).await;
    assert_eq!((body["valid"].clone(), body["code"].clone()), (json!(false), json!("REVOKED")));
    let (_, body) = verify(json!({ "key": "not-a-key" })).await;
    assert_eq!((body["valid"].clone(), body["code"].clone()), (json!(false), json!("INVALID")));
    // A key read from a file, newline and all; the end client's User-Agent, which the calling service passes on.
    let from_file = format!("{}\n", key.expose());
    let (_, body) = verify(json!({ "key": from_file, "user_agent": "shop-app/2.1", "request_id": "ua" })).await;
    assert_eq!(body["code"], "VALID", "{body}");

    let (status, body) = verify(json!({ "key": key.expose(), "ip": "not an ip" })).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["field"], "ip");
    let (status, body) = verify(json!({ "cost": 1 })).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body["message"].as_str().expect("message").contains("key"), "{body}");
    let (status, body) = verify(json!({ "key": key.expose(), "cost": 0 })).await;
    assert_eq!((status, body["field"].clone()), (StatusCode::BAD_REQUEST, json!("cost")));
    // A misspelt requirement is refused, not dropped with the check it asked for.
    let (status, body) = verify(json!({ "key": key.expose(), "scopes": "admin" })).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body["message"].as_str().expect("message").contains("scopes"), "{body}");
    let misspelt = client.get(validator.url("/v1/auth?scopes=admin")).bearer_auth(key.expose());
    let misspelt = misspelt.send().await.expect("request");
    assert_eq!(misspelt.status(), StatusCode::BAD_REQUEST);
    // No answer may be kept by a cache on the way: an allowed one served again would skip the check.
    let allowed = client.get(validator.url("/v1/auth")).bearer_auth(key.expose()).send().await.expect("request");
    let refused = client.get(validator.url("/v1/auth")).send().await.expect("request");
    for (answer, status) in
        [(allowed, StatusCode::OK), (refused, StatusCode::UNAUTHORIZED), (misspelt, StatusCode::BAD_REQUEST)]
    {
        assert_eq!(answer.status(), status);
        assert_eq!(answer.headers()["cache-control"], "no-store", "{status}");
    }
    // A NUL could never be written to PostgreSQL: refused here, not recorded as an event no worker can write.
    for field in ["method", "path", "request_id", "user_agent"] {
        let (status, body) = verify(json!({ "key": key.expose(), field: "a\u{0}b" })).await;
        assert_eq!((status, body["field"].clone()), (StatusCode::BAD_REQUEST, json!(field)), "{body}");
    }
    let garbage = client.post(validator.url("/v1/verify")).body("{not json").send().await.expect("request");
    assert_eq!(garbage.status(), StatusCode::BAD_REQUEST);
    let two = format!(r#"{{"key":"{0}"}}{{"key":"{0}"}}"#, key.expose());
    let two = client.post(validator.url("/v1/verify")).body(two).send().await.expect("request");
    assert_eq!(two.status(), StatusCode::BAD_REQUEST, "a second object after the first is not ignored");
    // Past the 64 KiB a request needs: 413, with the same JSON as any refused request.
    let oversized = json!({ "key": key.expose(), "path": "p".repeat(100_000) });
    let (status, body) = verify(oversized).await;
    assert_eq!((status, body["error"].clone()), (StatusCode::PAYLOAD_TOO_LARGE, json!("invalid_request")), "{body}");
    for not_an_object in [json!([]), json!(["tg_live_x", 1]), json!("tg_live_x"), json!(null)] {
        let (status, body) = verify(not_an_object).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(body["message"].as_str().expect("message").contains("must be a JSON object"), "{body}");
    }

    // A wrong method or path, as a misconfigured gateway sends: JSON saying what there is.
    let wrong_method = client.get(validator.url("/v1/verify")).send().await.expect("request");
    assert_eq!(wrong_method.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(wrong_method.headers()["allow"], "POST");
    let wrong_path = client.get(validator.url("/v2/auth")).send().await.expect("request");
    assert_eq!(wrong_path.status(), StatusCode::NOT_FOUND);
    for answer in [wrong_method, wrong_path] {
        let body: Value = answer.json().await.expect("a JSON body");
        assert!(body["message"].as_str().expect("message").contains("POST /v1/verify"), "{body}");
    }

    // The three verifies above that decided on a known key, and the one allowed `/v1/auth`.
    env.wait_for_count("SELECT count(*) FROM api_usage", 4).await;
    env.wait_for_count("SELECT sum(units) FROM usage_hourly", 5).await;
    let agent: String = sqlx::query_scalar(
        "SELECT a.user_agent FROM api_usage u JOIN user_agents a ON a.id = u.user_agent_id WHERE u.request_id = 'ua'",
    )
    .fetch_one(&env.pool)
    .await
    .expect("the row of the key read from a file");
    assert_eq!(agent, "shop-app/2.1");

    let ready = client.get(validator.url("/readyz")).send().await.expect("readyz");
    assert_eq!(ready.status(), StatusCode::OK);
    let health = client.get(validator.url("/healthz")).send().await.expect("healthz");
    assert_eq!(health.status(), StatusCode::OK);

    validator.service.stop().await;
    worker.stop().await;
    env.cleanup().await;
}

/// `/readyz` asks every server, and anyone who reaches the port may call it: a flood of calls at once shares probes
/// (a call that comes while one is under way gets its answer), rather than sending each call's queries to PostgreSQL
/// and JetStream, whose pool key lookups wait on.
#[tokio::test]
async fn a_flood_of_readiness_probes_shares_the_servers_probes() {
    use futures::StreamExt;
    let env = TestEnv::new().await;
    let validator = env.start_validator().await;
    // Each probe asks JetStream about the usage stream: a copy of each question comes here too.
    let mut questions =
        env.nats.subscribe(format!("$JS.API.STREAM.INFO.{}", env.topology.stream)).await.expect("subscribe");
    env.nats.flush().await.expect("flush");
    let client = reqwest::Client::new();
    let calls = (0..200).map(|_| async { client.get(validator.url("/readyz")).send().await.expect("readyz").status() });
    let answers = futures::future::join_all(calls).await;
    assert!(answers.iter().all(|status| *status == StatusCode::OK), "{answers:?}");
    env.nats.flush().await.expect("flush");
    let mut asked = 0;
    while tokio::time::timeout(Duration::from_millis(200), questions.next()).await.is_ok_and(|q| q.is_some()) {
        asked += 1;
    }
    assert!((1..=50).contains(&asked), "{asked} probes for 200 calls at once");

    validator.service.stop().await;
    env.cleanup().await;
}

/// A call that comes while a probe waits on a server that does not answer gets that probe's answer: it waits for one
/// probe at most, not for the one under way and then one of its own.
#[tokio::test]
async fn a_readiness_call_waits_for_one_probe_at_most() {
    let env = TestEnv::new().await;
    let redis = PrivateRedis::start();
    let validator = env.start_validator_with(env.validator_args(), &redis.url()).await;
    redis.pause();
    let client = reqwest::Client::new();
    let call = || async {
        let came = Instant::now();
        let status = client.get(validator.url("/readyz")).send().await.expect("readyz").status();
        (status, came.elapsed())
    };
    // The first call's probe waits out its 1 s timeout on Redis; the second comes halfway through.
    let second = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        call().await
    };
    let ((first, _), (second, waited)) = tokio::join!(call(), second);
    assert_eq!((first, second), (StatusCode::SERVICE_UNAVAILABLE, StatusCode::SERVICE_UNAVAILABLE));
    assert!(waited < Duration::from_millis(1200), "the second call waited {waited:?}");
    redis.resume();

    validator.service.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn graceful_shutdown_loses_no_decision() {
    let env = TestEnv::new().await;
    let org = env.org().await;
    let (_, key) = env.key(&org).await;
    let validator = env.start_validator().await;
    let worker = env.start_worker().await;
    let client = reqwest::Client::new();

    // 300 requests at once; the 100th answer stops both the validator and the worker at once, with the other requests
    // in flight or still to be sent. Whatever the worker did not write is durable in JetStream for the next one.
    let answered = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let stops = [validator.service.shutdown.clone(), worker.shutdown.clone()];
    let requests: Vec<_> = (0..300)
        .map(|_| {
            let request = client.get(validator.url("/v1/auth")).bearer_auth(key.expose());
            let (answered, stops) = (answered.clone(), stops.clone());
            tokio::spawn(async move {
                let status = request.send().await.map(|r| r.status());
                if answered.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1 == 100 {
                    stops.iter().for_each(tokio_util::sync::CancellationToken::cancel);
                }
                status
            })
        })
        .collect();
    let mut allowed = 0;
    for request in requests {
        // A request not yet sent when its connection closed fails; every one answered was a 200.
        if let Ok(status) = request.await.expect("request task") {
            assert_eq!(status, StatusCode::OK);
            allowed += 1;
        }
    }
    assert!(allowed >= 100, "{allowed}");
    validator.service.task.await.expect("validator panicked").expect("validator failed");
    worker.task.await.expect("worker panicked").expect("worker failed");

    let next_worker = env.start_worker().await;
    env.wait_for_count("SELECT count(*) FROM api_usage", allowed).await;
    env.wait_for_count("SELECT sum(allowed) FROM usage_hourly", allowed).await;
    next_worker.stop().await;
    env.cleanup().await;
}

/// A cached key read again in the background (its recheck) counts as `source="recheck"`, apart from the lookups a
/// request waited on PostgreSQL for: `tollgate bench verify` holds a run with any of those to be invalid.
#[tokio::test]
async fn a_recheck_counts_apart_from_lookups_that_read_postgresql() {
    let env = TestEnv::new().await;
    let org = env.org().await;
    let (_, key) = env.key(&org).await;
    let mut validator = env.spawn_validator_process(&[("TOLLGATE_KEY_RECHECK", "100ms".into())]);
    validator.answering().await;
    let client = reqwest::Client::new();
    let auth = || client.get(validator.url("/v1/auth")).bearer_auth(key.expose()).send();
    assert_eq!(auth().await.expect("request").status(), StatusCode::OK);
    let series = |source: &str| format!("tollgate_key_lookups_total{{source=\"{source}\"}}");
    let rechecked = wait_until(
        Duration::from_secs(10),
        || async {
            tokio::time::sleep(Duration::from_millis(150)).await;
            assert_eq!(auth().await.expect("request").status(), StatusCode::OK);
            validator.metric(&series("recheck")).await
        },
        |n| n.is_some_and(|n| n >= 1.0),
    )
    .await;
    assert!(rechecked.is_some_and(|n| n >= 1.0), "no recheck counted: {rechecked:?}");
    assert_eq!(validator.metric(&series("database")).await, Some(1.0), "only the first lookup read PostgreSQL");
    drop(validator);
    env.cleanup().await;
}
