//! Rate limits and quotas against a real Redis: the rolling-window bound across validators, fill, one round trip
//! per decision, the failure policies with Redis killed, shadow mode, scopes, the per-IP bad-key limit.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{Datelike, TimeDelta, Utc};
use reqwest::StatusCode;
use serde_json::{json, Value};
use uuid::Uuid;

use tollgate_shared::admin::{self, OrgChanges, TierChanges, WindowSetting};
use tollgate_shared::config::{FailurePolicies, FailurePolicy, LimiterArgs, ValidatorArgs};
use tollgate_shared::domain::{LimitSetting, Role, TierName};
use tollgate_shared::key::{ApiKey, KeyEnv};

use crate::harness::{series_value, wait_until, RunningValidator, TestEnv, REDIS_URL};
use crate::servers::{PrivateRedis, SlowProxy};

/// Makes `tier` allow `limit` per `seconds` (its main window), with no burst limit.
async fn set_tier(env: &TestEnv, tier: &str, limit: i64, seconds: i32, shadow: bool) {
    let changes = TierChanges {
        window: Some(WindowSetting { limit: LimitSetting::Max(limit), seconds }),
        burst: Some(WindowSetting { limit: LimitSetting::Unlimited, seconds: 60 }),
        shadow: Some(shadow),
    };
    admin::set_tier(&env.pool, tier, changes).await.expect("set tier");
}

async fn auth(client: &reqwest::Client, validator: &RunningValidator, key: &ApiKey) -> reqwest::Response {
    client.get(validator.url("/v1/auth")).bearer_auth(key.expose()).send().await.expect("request")
}

fn header(response: &reqwest::Response, name: &str) -> String {
    response.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned()
}

/// Admission times (the limiter's clock, µs) of a key's allowed requests, oldest first.
async fn admissions(env: &TestEnv, key_id: Uuid) -> Vec<i64> {
    sqlx::query_scalar(
        "SELECT (extract(epoch FROM ts) * 1000000)::int8 FROM api_usage WHERE key_id = $1 AND outcome = 'allowed'
         ORDER BY ts",
    )
    .bind(key_id)
    .fetch_all(&env.pool)
    .await
    .expect("admissions")
}

/// The most admissions in any closed rolling window of `window_us`.
fn max_in_any_window(times: &[i64], window_us: i64) -> usize {
    let mut best = 0;
    let mut start = 0;
    for end in 0..times.len() {
        while times[end] - times[start] > window_us {
            start += 1;
        }
        best = best.max(end - start + 1);
    }
    best
}

#[tokio::test]
async fn four_validators_hammering_one_key_never_exceed_any_rolling_window() {
    let env = TestEnv::new().await;
    let (limit, seconds) = (40, 2);
    set_tier(&env, "limited", limit, seconds, false).await;
    let org = env.org().await;
    let (key_id, key) = env.key_with(&org, |k| k.tier = TierName::from_static("limited")).await;
    let mut validators = Vec::new();
    for _ in 0..4 {
        validators.push(Arc::new(env.start_validator().await));
    }
    let worker = env.start_worker().await;

    let deadline = Instant::now() + Duration::from_secs(5);
    let mut tasks = Vec::new();
    for validator in &validators {
        for _ in 0..3 {
            let (validator, key) = (validator.clone(), key.clone());
            tasks.push(tokio::spawn(async move {
                let client = reqwest::Client::new();
                let (mut ok, mut limited) = (0_i64, 0_i64);
                while Instant::now() < deadline {
                    match auth(&client, &validator, &key).await.status() {
                        StatusCode::OK => ok += 1,
                        StatusCode::TOO_MANY_REQUESTS => limited += 1,
                        other => panic!("unexpected {other}"),
                    }
                }
                (ok, limited)
            }));
        }
    }
    let (mut ok, mut limited) = (0, 0);
    for task in tasks {
        let (o, l) = task.await.expect("client task");
        ok += o;
        limited += l;
    }
    env.wait_for_count("SELECT count(*) FROM api_usage", ok + limited).await;
    let times = admissions(&env, key_id).await;
    assert_eq!(times.len() as i64, ok, "every 200 is an allowed row");
    let most = max_in_any_window(&times, i64::from(seconds) * 1_000_000);
    println!("hammer: {ok} allowed, {limited} limited; most in any rolling {seconds}s window: {most} (limit {limit})");
    assert!(most <= limit as usize, "{most} admitted within {seconds}s; limit {limit}");
    assert!(ok >= 2 * limit, "the limit was reached again after the window ({ok} allowed)");
    assert!(limited > ok, "the load was over the limit");

    for validator in validators {
        Arc::into_inner(validator).expect("one handle").service.stop().await;
    }
    worker.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn steady_over_limit_load_fills_at_least_97_percent_of_each_window() {
    let env = TestEnv::new().await;
    let (limit, seconds) = (100_i64, 2_i64);
    set_tier(&env, "limited", limit, seconds as i32, false).await;
    let org = env.org().await;
    let (key_id, key) = env.key_with(&org, |k| k.tier = TierName::from_static("limited")).await;
    let mut validators = Vec::new();
    for _ in 0..4 {
        validators.push(Arc::new(env.start_validator().await));
    }
    let worker = env.start_worker().await;

    // 1.5× the limit, spread over the four validators.
    let every = Duration::from_secs_f64(seconds as f64 * 4.0 / (1.5 * limit as f64));
    let run = Duration::from_secs(10);
    let mut tasks = Vec::new();
    for (i, validator) in validators.iter().enumerate() {
        let (validator, key) = (validator.clone(), key.clone());
        // Staggered, so the four clients together offer an even stream rather than bursts of four.
        let offset = every.mul_f64(i as f64 / 4.0);
        tasks.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + offset, every);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let end = Instant::now() + run;
            let mut sent = 0_i64;
            while Instant::now() < end {
                ticker.tick().await;
                let status = auth(&client, &validator, &key).await.status();
                assert!(status == StatusCode::OK || status == StatusCode::TOO_MANY_REQUESTS, "{status}");
                sent += 1;
            }
            sent
        }));
    }
    let mut sent = 0;
    for task in tasks {
        sent += task.await.expect("client task");
    }
    env.wait_for_count("SELECT count(*) FROM api_usage", sent).await;
    let times = admissions(&env, key_id).await;
    let window = seconds * 1_000_000;
    assert!(max_in_any_window(&times, window) <= limit as usize);
    // Steady state: after the first window, the rolling windows starting every tenth of a window over three
    // windows. The mean is the fill; the emptiest is reported too.
    let start = times[0] + window;
    let counts: Vec<usize> = (0..=20)
        .map(|i| {
            let from = start + i * window / 10;
            times.iter().filter(|t| (from..from + window).contains(*t)).count()
        })
        .collect();
    let fill = counts.iter().sum::<usize>() as f64 / counts.len() as f64 / limit as f64;
    let lowest = counts.iter().min().copied().unwrap_or(0);
    println!(
        "fill: {sent} sent, {} allowed; steady state: mean {:.1}% of the limit per rolling window, lowest {lowest}",
        times.len(),
        fill * 100.0
    );
    assert!(fill >= 0.97, "fill {fill}");

    for validator in validators {
        Arc::into_inner(validator).expect("one handle").service.stop().await;
    }
    worker.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_decision_takes_one_redis_round_trip_and_a_key_without_limits_none() {
    let env = TestEnv::new().await;
    let redis = PrivateRedis::start();
    set_tier(&env, "standard", 1000, 3600, false).await;
    let org = env.org().await;
    let limits = OrgChanges {
        rate_limit_per_minute: Some(LimitSetting::Max(1000)),
        monthly_request_limit: Some(LimitSetting::Max(1_000_000)),
        ..OrgChanges::default()
    };
    admin::update_org(&env.pool, &org, limits).await.expect("org limits");
    let (_, limited) = env
        .key_with(&org, |k| {
            k.tier = TierName::from_static("standard");
            k.custom_rate_limit_per_minute = Some(1000);
        })
        .await;
    let free_org = env.org().await;
    let (_, free) = env.key(&free_org).await;
    let validator = env.start_validator_with(env.validator_args(), &redis.url()).await;
    let client = reqwest::Client::new();
    // The first call loads the script (NOSCRIPT, SCRIPT LOAD, EVALSHA); every later one is a single EVALSHA.
    assert_eq!(auth(&client, &validator, &limited).await.status(), StatusCode::OK);

    let mut monitor = tokio::process::Command::new("redis-cli")
        .args(["-p", &redis.port.to_string(), "monitor"])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("redis-cli monitor");
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(monitor.stdout.take().expect("out")));
    assert_eq!(lines.next_line().await.expect("read").as_deref(), Some("OK"));

    let decisions = 20;
    for _ in 0..decisions {
        let response = auth(&client, &validator, &limited).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(header(&response, "x-ratelimit-limit"), "1000");
    }
    for _ in 0..10 {
        let response = auth(&client, &validator, &free).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert!(response.headers().get("x-ratelimit-limit").is_none());
    }
    // A marker command from another connection ends the capture.
    let marker = redis::Client::open(redis.url()).expect("url");
    let mut marker = marker.get_multiplexed_async_connection().await.expect("redis");
    let _: String = redis::cmd("ECHO").arg("end-of-test").query_async(&mut marker).await.expect("echo");
    let mut round_trips = Vec::new();
    while let Some(line) = lines.next_line().await.expect("read") {
        if line.contains("end-of-test") {
            break;
        }
        if !line.contains(" lua]") {
            round_trips.push(line);
        }
    }
    let commands: Vec<&str> =
        round_trips.iter().filter_map(|l| l.split("] \"").nth(1)).filter_map(|c| c.split('"').next()).collect();
    println!("round trips for {decisions} limited decisions and 10 unlimited: {}", commands.len());
    assert_eq!(commands.len(), decisions, "{round_trips:#?}");
    assert!(commands.iter().all(|c| c.eq_ignore_ascii_case("evalsha")), "{commands:?}");

    validator.service.stop().await;
    env.cleanup().await;
}

fn policy_args(env: &TestEnv, policy: FailurePolicy) -> ValidatorArgs {
    let mut args = env.validator_args();
    args.limits.failure_policy = FailurePolicies::all(policy);
    args.limits.redis_timeout = LimiterArgs::defaults().redis_timeout;
    args.limits.breaker_cooldown = Duration::from_millis(200);
    args
}

/// A decision taken without Redis counts once in `tollgate_ratelimit_degraded_total`, under the policy that decided
/// it: a limit that is `closed` refuses it whatever the `local` ones say, so it is not counted under `local` too.
#[tokio::test]
async fn a_degraded_decision_is_counted_once_under_the_policy_that_decided_it() {
    let env = TestEnv::new().await;
    let org = env.org().await;
    let changes = OrgChanges { rate_limit_per_minute: Some(LimitSetting::Max(100)), ..OrgChanges::default() };
    admin::update_org(&env.pool, &org, changes).await.expect("org");
    let (_, key) = env.key_with(&org, |k| k.custom_rate_limit_per_minute = Some(100)).await;
    let nothing_there = format!("redis://127.0.0.1:{}", crate::servers::free_port());
    let mut validator = env.spawn_validator_process(&[
        ("REDIS_URL", nothing_there),
        ("TOLLGATE_LIMIT_FAILURE_POLICY", "local,org=closed".into()),
    ]);
    validator.answering().await;
    let client = reqwest::Client::new();
    for _ in 0..5 {
        let response = client.get(validator.url("/v1/auth")).bearer_auth(key.expose()).send().await.expect("request");
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE, "the organization's limit is closed");
    }
    let degraded = |policy: &str| format!("tollgate_ratelimit_degraded_total{{policy=\"{policy}\"}}");
    assert_eq!(validator.metric(&degraded("closed")).await, Some(5.0));
    assert_eq!(validator.metric(&degraded("local")).await, Some(0.0));
    // An organization whose limit is in shadow mode: that limit never refuses, closed or not, so the key's own limit
    // (local) decides.
    let shadow = env.org().await;
    let changes =
        OrgChanges { rate_limit_per_minute: Some(LimitSetting::Max(100)), shadow: Some(true), ..OrgChanges::default() };
    admin::update_org(&env.pool, &shadow, changes).await.expect("org");
    let (_, key) = env.key_with(&shadow, |k| k.custom_rate_limit_per_minute = Some(100)).await;
    let response = client.get(validator.url("/v1/auth")).bearer_auth(key.expose()).send().await.expect("request");
    assert_eq!(response.status(), StatusCode::OK, "a shadow limit's closed policy refused");
    assert_eq!(validator.metric(&degraded("local")).await, Some(1.0));
    drop(validator);
    env.cleanup().await;
}

/// A hung Redis (stopped, its connections still open) delays no decision beyond the timeout, counted from when the
/// request began to wait, even for the requests queued behind the call that hangs.
#[tokio::test]
async fn a_hung_redis_delays_no_decision_beyond_the_timeout() {
    let env = TestEnv::new().await;
    let redis = PrivateRedis::start();
    let org = env.org().await;
    let (_, key) = env.key_with(&org, |k| k.custom_rate_limit_per_minute = Some(1000)).await;
    let mut args = policy_args(&env, FailurePolicy::Open);
    // Long enough that a request waiting for two calls in a row (a timeout counted from the call, not the request)
    // stands out from scheduling noise.
    let timeout = Duration::from_millis(800);
    args.limits.redis_timeout = timeout;
    let validator = env.start_validator_with(args, &redis.url()).await;
    let client = reqwest::Client::new();
    assert_eq!(auth(&client, &validator, &key).await.status(), StatusCode::OK);

    redis.pause();
    let requests = (0..40).map(|_| {
        let (client, url, key) = (client.clone(), validator.url("/v1/auth"), key.clone());
        async move {
            let started = Instant::now();
            let response = client.get(&url).bearer_auth(key.expose()).send().await.expect("request");
            (response.status(), started.elapsed())
        }
    });
    let answers = futures::future::join_all(requests).await;
    redis.resume();
    for (status, took) in answers {
        assert_eq!(status, StatusCode::OK, "policy open allows");
        // Slack for 40 connections opening on a busy machine; a deadline counted from the call gives about 2 × 800 ms.
        assert!(took < timeout + Duration::from_millis(400), "a decision took {took:?} with a {timeout:?} timeout");
    }

    validator.service.stop().await;
    env.cleanup().await;
}

/// The breaker counts failed calls, not the decisions they carried: one hung call of many requests is one failure, so
/// Redis decides again as soon as it answers, rather than after a cooldown of every request following the policy.
#[tokio::test]
async fn one_hung_call_of_many_requests_does_not_open_the_breaker() {
    let env = TestEnv::new().await;
    let redis = PrivateRedis::start();
    let org = env.org().await;
    let (_, key) = env.key_with(&org, |k| k.custom_rate_limit_per_minute = Some(1000)).await;
    let mut args = policy_args(&env, FailurePolicy::Open);
    args.limits.redis_timeout = Duration::from_millis(200);
    // Counted per decision, the requests below are well over this; counted per call (at most two in flight, each
    // carrying up to 32 of them), far under it.
    args.limits.breaker_failures = 20;
    args.limits.breaker_cooldown = Duration::from_secs(60);
    let validator = env.start_validator_with(args, &redis.url()).await;
    let client = reqwest::Client::new();
    assert_eq!(auth(&client, &validator, &key).await.status(), StatusCode::OK);

    redis.pause();
    let requests = (0..40).map(|_| auth(&client, &validator, &key));
    let answers = futures::future::join_all(requests).await;
    redis.resume();
    assert!(answers.iter().all(|a| a.status() == StatusCode::OK), "policy open allows");
    assert!(answers.iter().all(|a| !a.headers().contains_key("x-ratelimit-limit")), "none was decided by Redis");

    let after = auth(&client, &validator, &key).await;
    assert_eq!(after.status(), StatusCode::OK);
    assert!(after.headers().contains_key("x-ratelimit-limit"), "Redis decides again: the breaker stayed closed");
    let ready: Value = client.get(validator.url("/readyz")).send().await.expect("readyz").json().await.expect("json");
    assert_eq!(ready["ratelimit"], "ok", "{ready}");

    validator.service.stop().await;
    env.cleanup().await;
}

/// A decision that waited in the queue for a script call does not cut its call short for the others: each is answered
/// when its own deadline passes. Nor is Redis failing when it answers a call within the timeout from when the call
/// went out, after its decisions' deadlines.
#[tokio::test]
async fn a_decision_that_waited_for_its_call_does_not_time_out_the_others() {
    let env = TestEnv::new().await;
    let org = env.org().await;
    let (_, key) = env.key_with(&org, |k| k.custom_rate_limit_per_minute = Some(1000)).await;
    let proxy = SlowProxy::start(REDIS_URL.trim_start_matches("redis://")).await;
    let mut args = policy_args(&env, FailurePolicy::Open);
    // (Redis's connection gives up on an answer after 1 s in any case.)
    args.limits.redis_timeout = Duration::from_secs(1);
    // A single failure opens it, for longer than the test.
    args.limits.breaker_failures = 1;
    args.limits.breaker_cooldown = Duration::from_secs(60);
    let validator = Arc::new(env.start_validator_with(args, &format!("redis://{}", proxy.address)).await);
    let request = |after: Duration| {
        let (client, validator, key) = (reqwest::Client::new(), validator.clone(), key.clone());
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            auth(&client, &validator, &key).await
        })
    };
    let decided_by_redis = |response: &reqwest::Response| response.headers().contains_key("x-ratelimit-limit");
    assert!(decided_by_redis(&request(Duration::ZERO).await.expect("request")), "Redis answers");

    // Redis far away: every call takes 700 ms. Two calls in flight (the most there are), then two decisions that wait
    // for a call, from 100 and 600 ms on: the call they go out in, at about 700 ms, is answered at about 1400 ms, past
    // the first one's deadline (1100 ms) and within the second one's (1600 ms).
    proxy.delay(Duration::from_millis(700));
    let in_flight = [request(Duration::ZERO), request(Duration::from_millis(50))];
    let (waited_long, waited_little) = (request(Duration::from_millis(100)), request(Duration::from_millis(600)));
    for call in in_flight {
        assert!(decided_by_redis(&call.await.expect("request")));
    }
    let waited_long = waited_long.await.expect("request");
    assert_eq!(waited_long.status(), StatusCode::OK, "policy open");
    assert!(!decided_by_redis(&waited_long), "it waited out its timeout");
    assert!(decided_by_redis(&waited_little.await.expect("request")), "answered by Redis within its timeout");
    let after = request(Duration::ZERO).await.expect("request");
    assert!(decided_by_redis(&after), "the breaker stayed closed");

    // Every call takes 850 ms now. A decision that waits for a call from 150 ms on goes out at about 850 ms with
    // 300 ms left, and is answered by the policy; Redis answers the call within 1 s of its going out.
    proxy.delay(Duration::from_millis(850));
    let in_flight = [request(Duration::ZERO), request(Duration::from_millis(50))];
    let waited = request(Duration::from_millis(150));
    for call in in_flight {
        assert!(decided_by_redis(&call.await.expect("request")));
    }
    assert!(!decided_by_redis(&waited.await.expect("request")), "it waited out its timeout");
    let after = request(Duration::ZERO).await.expect("request");
    assert!(decided_by_redis(&after), "the breaker stayed closed");

    Arc::into_inner(validator).expect("every request done").service.stop().await;
    env.cleanup().await;
}

/// A hung Redis opens the breaker under a steady load too: a call fails when Redis does not answer within the
/// timeout from when the call went out, whatever its decisions' deadlines, which their wait in the queue may have all
/// but used up.
#[tokio::test]
async fn a_hung_redis_opens_the_breaker_under_a_steady_load() {
    let env = TestEnv::new().await;
    let redis = PrivateRedis::start();
    let org = env.org().await;
    let (_, key) = env.key_with(&org, |k| k.custom_rate_limit_per_minute = Some(1_000_000)).await;
    let timeout = Duration::from_millis(500);
    let mut args = policy_args(&env, FailurePolicy::Open);
    args.limits.redis_timeout = timeout;
    args.limits.breaker_failures = 5;
    args.limits.breaker_cooldown = Duration::from_secs(60);
    let validator = Arc::new(env.start_validator_with(args, &redis.url()).await);
    let client = reqwest::Client::new();
    assert!(auth(&client, &validator, &key).await.headers().contains_key("x-ratelimit-limit"), "Redis answers");

    redis.pause();
    // A request every 4 ms for 3 s, each on its own: decisions join the queue steadily while both calls are out.
    let mut every = tokio::time::interval(Duration::from_millis(4));
    let mut requests = Vec::new();
    let load = Instant::now();
    while load.elapsed() < Duration::from_secs(3) {
        every.tick().await;
        let (client, validator, key) = (client.clone(), validator.clone(), key.clone());
        requests.push(tokio::spawn(async move { auth(&client, &validator, &key).await.status() }));
    }
    for request in requests {
        assert_eq!(request.await.expect("request"), StatusCode::OK, "policy open");
    }
    let started = Instant::now();
    let lone = auth(&client, &validator, &key).await;
    let took = started.elapsed();
    redis.resume();
    assert!(!lone.headers().contains_key("x-ratelimit-limit"), "decided by the policy");
    assert!(took < timeout / 2, "the breaker is open: no wait for Redis ({took:?})");

    Arc::into_inner(validator).expect("every request done").service.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn each_failure_policy_holds_while_redis_is_killed_and_recovery_is_automatic() {
    let metrics = tollgate_shared::metrics::install();
    let env = TestEnv::new().await;
    let mut redis = PrivateRedis::start();
    let org = env.org().await;
    let (_, key) = env.key_with(&org, |k| k.custom_rate_limit_per_minute = Some(3)).await;
    let open = env.start_validator_with(policy_args(&env, FailurePolicy::Open), &redis.url()).await;
    let closed = env.start_validator_with(policy_args(&env, FailurePolicy::Closed), &redis.url()).await;
    let local = env.start_validator_with(policy_args(&env, FailurePolicy::Local), &redis.url()).await;
    let client = reqwest::Client::new();
    for validator in [&open, &closed, &local] {
        assert_eq!(auth(&client, validator, &key).await.status(), StatusCode::OK);
    }

    // The recorder is the test process's: other tests running meanwhile may add to these, never take away.
    let degraded = |policy: &str| {
        let series = format!("tollgate_ratelimit_degraded_total{{policy=\"{policy}\"}}");
        series_value(&metrics.render(), &series).unwrap_or(0.0)
    };
    let before = ["open", "closed", "local"].map(degraded);
    redis.stop();
    let statuses = |validator: &'static str, v: &RunningValidator| {
        let (client, key) = (client.clone(), key.clone());
        let url = v.url("/v1/auth");
        async move {
            let mut seen = Vec::new();
            for _ in 0..6 {
                let started = Instant::now();
                let response = client.get(&url).bearer_auth(key.expose()).send().await.expect("request");
                let took = started.elapsed();
                assert!(took < Duration::from_millis(500), "{validator}: a decision took {took:?} with Redis away");
                seen.push(response.status().as_u16());
            }
            seen
        }
    };
    assert_eq!(statuses("open", &open).await, vec![200; 6]);
    assert_eq!(statuses("closed", &closed).await, vec![503; 6]);
    // Local: this process's own counter, limit 3 ÷ 1 replica, starting empty.
    assert_eq!(statuses("local", &local).await, vec![200, 200, 200, 429, 429, 429]);
    // While Redis is away a denial always says when to retry: a process's share of a limit is not the limit.
    let heavy = local.url("/v1/auth");
    let heavy =
        client.get(heavy).bearer_auth(key.expose()).header("X-Tollgate-Cost", "4").send().await.expect("request");
    assert_eq!(heavy.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(heavy.headers().contains_key("retry-after"), "{:?}", heavy.headers());
    // Each validator's six decisions (and the heavy one) were taken without Redis, under its own policy.
    let counted = ["open", "closed", "local"].map(degraded);
    for ((policy, before), after) in ["open", "closed", "local"].iter().zip(before).zip(counted) {
        assert!(after - before >= 6.0, "{policy}: {before} degraded decisions before Redis went away, {after} after");
    }
    for validator in [&open, &closed, &local] {
        let ready = client.get(validator.url("/readyz")).send().await.expect("readyz");
        assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE, "not ready while Redis is away");
        let body: Value = ready.json().await.expect("json");
        assert_eq!((body["redis"].clone(), body["ratelimit"].clone()), (json!("unavailable"), json!("degraded")));
    }

    redis.restart();
    for (name, validator) in [("open", &open), ("closed", &closed), ("local", &local)] {
        let recovered = wait_until(
            Duration::from_secs(15),
            || async {
                let response = auth(&client, validator, &key).await;
                (response.status(), response.headers().contains_key("x-ratelimit-limit"))
            },
            |(status, counted)| *status == StatusCode::OK && *counted,
        )
        .await;
        assert_eq!(recovered, (StatusCode::OK, true), "{name} did not recover");
        let ready = client.get(validator.url("/readyz")).send().await.expect("readyz");
        assert_eq!(ready.status(), StatusCode::OK, "{name} ready again");
        let ready: Value = ready.json().await.expect("json");
        assert_eq!(ready["ratelimit"], "ok", "{name}: {ready}");
    }

    for validator in [open, closed, local] {
        validator.service.stop().await;
    }
    env.cleanup().await;
}

/// A validator started while Redis is away serves (its limits follow their failure policy) and says why on `/readyz`,
/// then decides in Redis once Redis answers, without a restart: a validator restarted during a Redis outage must not
/// turn it into a total one.
#[tokio::test]
async fn a_validator_started_while_redis_is_away_serves_by_policy_and_uses_redis_once_it_answers() {
    let env = TestEnv::new().await;
    let mut redis = PrivateRedis::start();
    redis.stop();
    let org = env.org().await;
    let (_, key) = env.key_with(&org, |k| k.custom_rate_limit_per_minute = Some(3)).await;
    let validator =
        env.spawn_validator_process(&[("REDIS_URL", redis.url()), ("TOLLGATE_BREAKER_COOLDOWN", "200ms".into())]);
    let client = reqwest::Client::new();
    let readyz = || async {
        let response = client.get(validator.url("/readyz")).send().await.ok()?;
        Some((response.status(), response.json::<Value>().await.ok()?))
    };
    let auth = || async {
        let response = client.get(validator.url("/v1/auth")).bearer_auth(key.expose()).send().await.expect("request");
        (response.status(), header(&response, "x-ratelimit-remaining"))
    };

    let ready = wait_until(Duration::from_secs(20), readyz, Option::is_some).await.expect("the validator serves");
    assert_eq!(ready.0, StatusCode::SERVICE_UNAVAILABLE, "not ready while Redis is away: {ready:?}");
    assert_eq!((ready.1["redis"].clone(), ready.1["ratelimit"].clone()), (json!("unavailable"), json!("degraded")));
    // The default `local` policy: this process's own count, limit 3 ÷ 1 replica.
    let mut seen = Vec::new();
    for _ in 0..4 {
        seen.push(auth().await.0.as_u16());
    }
    assert_eq!(seen, [200, 200, 200, 429]);

    redis.restart();
    // Decided in Redis, whose count starts empty: 2 of 3 left after the first.
    let recovered =
        wait_until(Duration::from_secs(15), auth, |(status, remaining)| *status == StatusCode::OK && remaining == "2")
            .await;
    assert_eq!(recovered, (StatusCode::OK, "2".to_owned()), "decided in Redis once it answers");
    let ready = readyz().await.expect("readyz");
    assert_eq!(ready.0, StatusCode::OK, "ready again: {ready:?}");
    assert_eq!((ready.1["redis"].clone(), ready.1["ratelimit"].clone()), (json!("ok"), json!("ok")));

    drop(validator); // stopped before its namespace is removed
    env.cleanup().await;
}

#[tokio::test]
async fn limits_report_headers_count_cost_deny_without_consuming_and_read_the_quota() {
    let env = TestEnv::new().await;
    let org = env.org().await;
    let limits = OrgChanges { monthly_request_limit: Some(LimitSetting::Max(100)), ..OrgChanges::default() };
    let org_row = admin::update_org(&env.pool, &org, limits).await.expect("org");
    let (key_id, key) = env.key_with(&org, |k| k.custom_rate_limit_per_minute = Some(5)).await;
    let validator = env.start_validator().await;
    let worker = env.start_worker().await;
    let client = reqwest::Client::new();
    let verify_json = |body: Value| {
        let request = client.post(validator.url("/v1/verify")).json(&body).send();
        async move { request.await.expect("verify").json::<Value>().await.expect("json") }
    };
    let with_cost = |cost: u32| {
        client.get(validator.url("/v1/auth")).bearer_auth(key.expose()).header("X-Tollgate-Cost", cost.to_string())
    };

    let first = with_cost(3).send().await.expect("request");
    assert_eq!(first.status(), StatusCode::OK);
    assert_eq!(header(&first, "x-ratelimit-limit"), "5");
    assert_eq!(header(&first, "x-ratelimit-remaining"), "2");
    assert_eq!(header(&first, "x-ratelimit-used"), "3");
    assert_eq!(header(&first, "ratelimit-policy"), "\"key\";q=5;w=60");
    assert!(header(&first, "ratelimit").starts_with("\"key\";r=2;t="));
    let reset: i64 = header(&first, "x-ratelimit-reset").parse().expect("epoch seconds");
    let now = Utc::now().timestamp();
    // The first request's bucket (0.6 s wide) leaves 60 s after it ends, rounded up to a whole second.
    assert!((now..=now + 62).contains(&reset), "reset {reset}, now {now}");

    let denied = with_cost(3).send().await.expect("request");
    assert_eq!(denied.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry_after: i64 = header(&denied, "retry-after").parse().expect("seconds");
    assert!((1..=62).contains(&retry_after), "{retry_after}");
    let body: Value = denied.json().await.expect("json");
    assert_eq!(body["error"], "rate_limited");
    assert_eq!(body["limit"], 5);
    assert!(chrono::DateTime::parse_from_rfc3339(body["reset_at"].as_str().expect("reset_at")).is_ok(), "{body}");
    // A request heavier than the whole limit is denied without a Retry-After that no wait would honour.
    let never = with_cost(6).send().await.expect("request");
    assert_eq!(never.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(never.headers().get("retry-after").is_none(), "{:?}", never.headers());
    let body: Value = never.json().await.expect("json");
    assert_eq!((body["error"].as_str(), body["retry_after"].clone()), (Some("rate_limited"), Value::Null), "{body}");
    assert!(body["message"].as_str().is_some_and(|m| m.contains("weighs more than the key limit of 5")), "{body}");
    let verify = verify_json(json!({ "key": key.expose(), "cost": 6 })).await;
    assert_eq!(verify["code"], "RATE_LIMITED", "{verify}");
    assert!(verify.get("retry_after").is_none() && verify["message"].is_string(), "{verify}");
    // The denials consumed nothing: 2 more still fit.
    assert_eq!(with_cost(2).send().await.expect("request").status(), StatusCode::OK);
    let verify = verify_json(json!({ "key": key.expose() })).await;
    assert_eq!((verify["valid"].clone(), verify["code"].clone()), (json!(false), json!("RATE_LIMITED")), "{verify}");
    assert_eq!(verify["limit"], 5);
    assert!(verify["reset_at"].is_string() && verify["retry_after"].as_i64().is_some_and(|s| s >= 1), "{verify}");
    assert_eq!(with_cost(1001).send().await.expect("request").status(), StatusCode::BAD_REQUEST);

    // The monthly quota: the workers' counter (set here by hand), read in the same round trip.
    let (_, quota_key_holder) = env.key(&org).await;
    let quota_key = tollgate_validator::quota_key(&env.topology.redis_prefix, org_row.id, Utc::now());
    let mut redis =
        redis::Client::open(REDIS_URL).expect("url").get_multiplexed_async_connection().await.expect("redis");
    let _: () = redis::cmd("SET").arg(&quota_key).arg(98).query_async(&mut redis).await.expect("set");
    let quota_auth = |cost: u32| {
        client
            .get(validator.url("/v1/auth"))
            .bearer_auth(quota_key_holder.expose())
            .header("X-Tollgate-Cost", cost.to_string())
    };
    // Its window is the month, whose length the policy gives (the time left is the `RateLimit` field's `t`); the
    // month when the request was sent or answered.
    let policy = || {
        let start = Utc::now().date_naive().with_day(1).expect("first");
        let month = (start.checked_add_months(chrono::Months::new(1)).expect("next") - start).num_seconds();
        format!("\"quota\";q=100;w={month}")
    };
    let sent = policy();
    let ok = quota_auth(2).send().await.expect("request");
    assert_eq!(ok.status(), StatusCode::OK);
    assert!([sent, policy()].contains(&header(&ok, "ratelimit-policy")), "{:?}", ok.headers());
    assert_eq!(header(&ok, "x-ratelimit-remaining"), "0");
    // The validator only reads the counter; the workers add committed usage. Simulate their catching up:
    let _: () = redis::cmd("SET").arg(&quota_key).arg(100).query_async(&mut redis).await.expect("set");
    let over = quota_auth(1).send().await.expect("request");
    assert_eq!(over.status(), StatusCode::TOO_MANY_REQUESTS);
    let body: Value = over.json().await.expect("json");
    assert_eq!((body["error"].as_str(), body["limit"].as_i64()), (Some("quota_exceeded"), Some(100)), "{body}");
    let verify = verify_json(json!({ "key": quota_key_holder.expose() })).await;
    assert_eq!(verify["code"], "USAGE_EXCEEDED", "{verify}");

    env.wait_for_count("SELECT count(*) FROM api_usage WHERE outcome = 'quota_exceeded'", 2).await;
    env.wait_for_count(
        &format!("SELECT count(*) FROM api_usage WHERE key_id = '{key_id}' AND outcome = 'rate_limited'"),
        4,
    )
    .await;
    env.wait_for_count(
        &format!("SELECT sum(units) FROM api_usage WHERE key_id = '{key_id}' AND outcome = 'allowed'"),
        5,
    )
    .await;

    validator.service.stop().await;
    worker.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_counter_overwritten_with_something_else_starts_afresh_instead_of_failing() {
    let env = TestEnv::new().await;
    let org = env.org().await;
    let (key_id, key) = env.key_with(&org, |k| k.custom_rate_limit_per_minute = Some(5)).await;
    let validator = env.start_validator().await;
    let client = reqwest::Client::new();
    assert_eq!(header(&auth(&client, &validator, &key).await, "x-ratelimit-used"), "1");

    let counter = format!("{}window:key:{key_id}:60", env.topology.redis_prefix);
    let mut redis =
        redis::Client::open(REDIS_URL).expect("url").get_multiplexed_async_connection().await.expect("redis");
    // Shorter than a counter's trailer, then long enough to hold one of nonsense.
    for length in [40, 64] {
        let _: () = redis::cmd("SET").arg(&counter).arg("x".repeat(length)).query_async(&mut redis).await.expect("set");
        let answer = auth(&client, &validator, &key).await;
        assert_eq!(answer.status(), StatusCode::OK);
        assert_eq!(header(&answer, "x-ratelimit-used"), "1", "{length} bytes: counting starts again");
        assert_eq!(header(&auth(&client, &validator, &key).await, "x-ratelimit-used"), "2", "and goes on from there");
    }
    // A key of another type (a list) under the counter's name: counted afresh too, and written over.
    let _: i64 = redis::cmd("DEL").arg(&counter).query_async(&mut redis).await.expect("del");
    let _: i64 = redis::cmd("RPUSH").arg(&counter).arg("x").query_async(&mut redis).await.expect("rpush");
    let answer = auth(&client, &validator, &key).await;
    assert_eq!((answer.status(), header(&answer, "x-ratelimit-used")), (StatusCode::OK, "1".into()));
    assert_eq!(header(&auth(&client, &validator, &key).await, "x-ratelimit-used"), "2");
    // Decided in Redis (not by the local fallback): the counter is one again, its total 2.
    let stored: Vec<u8> = redis::cmd("GET").arg(&counter).query_async(&mut redis).await.expect("get");
    // Its trailer (the last 48 bytes) starts with the total.
    assert!(stored.len() >= 48, "{stored:?}");
    let total = &stored[stored.len() - 48..stored.len() - 40];
    assert_eq!(i64::from_le_bytes(total.try_into().expect("8 bytes")), 2);

    // The organization's quota counter (the workers' to write) holding a list: read as no count, and the decision
    // still made in Redis, which counts it in the key's counter. (A quota of 2, so that the answer reports it.)
    let limits = OrgChanges { monthly_request_limit: Some(LimitSetting::Max(2)), ..OrgChanges::default() };
    let org_id = admin::update_org(&env.pool, &org, limits).await.expect("org").id;
    let quota = tollgate_validator::quota_key(&env.topology.redis_prefix, org_id, Utc::now());
    let _: i64 = redis::cmd("RPUSH").arg(&quota).arg("x").query_async(&mut redis).await.expect("rpush");
    // Five of the validator's key refreshes (waited out rather than polled: each request counts against the key's
    // limit of 5).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let answer = auth(&client, &validator, &key).await;
    assert_eq!(answer.status(), StatusCode::OK);
    assert!(header(&answer, "ratelimit-policy").contains("quota"), "{:?}", answer.headers());
    let stored: Vec<u8> = redis::cmd("GET").arg(&counter).query_async(&mut redis).await.expect("get");
    let total = &stored[stored.len() - 48..stored.len() - 40];
    assert_eq!(i64::from_le_bytes(total.try_into().expect("8 bytes")), 3, "decided in Redis");
    validator.service.stop().await;
    env.cleanup().await;
}

/// A validator whose clock is 40 days ahead (libfaketime) decides by Redis's once Redis has answered it: a key that
/// expires in 10 days is valid, and the quota it reads is that of Redis's month, the one the workers count usage in
/// (Redis's clock stamps the events).
#[tokio::test]
async fn a_validator_whose_clock_is_far_off_decides_by_redis_clock() {
    let faketime = ["/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1", "/usr/lib/faketime/libfaketime.so.1"]
        .into_iter()
        .find(|path| std::path::Path::new(path).exists())
        .expect("libfaketime is not installed: .ci/run installs it (apt-get install faketime)");
    let env = TestEnv::new().await;
    let org = env.org().await;
    let limits = OrgChanges { monthly_request_limit: Some(LimitSetting::Max(10)), ..OrgChanges::default() };
    let org_id = admin::update_org(&env.pool, &org, limits).await.expect("org").id;
    let (_, expiring) = env.key_with(&org, |k| k.expires_at = Some(Utc::now() + TimeDelta::days(10))).await;
    let (_, lasting) = env.key(&org).await;
    let other_org = env.org().await;
    let (_, limited) = env.key_with(&other_org, |k| k.custom_rate_limit_per_minute = Some(1000)).await;
    // The month's quota (by Redis's clock, which is this test's) is used up; the month the validator's clock is in
    // has none counted.
    let mut redis =
        redis::Client::open(REDIS_URL).expect("url").get_multiplexed_async_connection().await.expect("redis");
    let quota = tollgate_validator::quota_key(&env.topology.redis_prefix, org_id, Utc::now());
    let _: () = redis::cmd("SET").arg(&quota).arg(10).query_async(&mut redis).await.expect("set");
    let settings = [("LD_PRELOAD", faketime), ("FAKETIME", "+40d"), ("DONT_FAKE_MONOTONIC", "1")];
    let mut validator = env.spawn_validator_process(&settings.map(|(name, value)| (name, value.to_owned())));
    validator.answering().await;
    let client = reqwest::Client::new();
    let auth = |key: &ApiKey| client.get(validator.url("/v1/auth")).bearer_auth(key.expose()).send();

    // A decision Redis makes shows the validator Redis's clock.
    assert_eq!(auth(&limited).await.expect("request").status(), StatusCode::OK);
    for key in [&expiring, &lasting] {
        let answer = auth(key).await.expect("request");
        assert_eq!(answer.status(), StatusCode::TOO_MANY_REQUESTS, "not expired, and over this month's quota");
        let body: Value = answer.json().await.expect("json");
        assert_eq!(body["error"], "quota_exceeded", "{body}");
    }
    env.cleanup().await;
}

#[tokio::test]
async fn shadow_limits_allow_but_record_what_they_would_have_done() {
    let metrics = tollgate_shared::metrics::install();
    let env = TestEnv::new().await;
    set_tier(&env, "limited", 2, 60, true).await;
    let org = env.org().await;
    let (tier_key_id, tier_key) = env.key_with(&org, |k| k.tier = TierName::from_static("limited")).await;
    let shadow_org = env.org().await;
    let changes =
        OrgChanges { rate_limit_per_minute: Some(LimitSetting::Max(1)), shadow: Some(true), ..OrgChanges::default() };
    admin::update_org(&env.pool, &shadow_org, changes).await.expect("org");
    let (org_key_id, org_key) = env.key(&shadow_org).await;
    let validator = env.start_validator().await;
    let worker = env.start_worker().await;
    let client = reqwest::Client::new();
    // The recorder is the test process's: other tests running meanwhile may add to these, never take away.
    let shadow_denials = |limit: &str| {
        let series = format!("tollgate_ratelimit_shadow_denials_total{{limit=\"{limit}\"}}");
        series_value(&metrics.render(), &series).unwrap_or(0.0)
    };
    let before = ["tier", "org"].map(shadow_denials);

    for _ in 0..5 {
        assert_eq!(auth(&client, &validator, &tier_key).await.status(), StatusCode::OK);
        assert_eq!(auth(&client, &validator, &org_key).await.status(), StatusCode::OK);
    }
    let shadowed = |key: Uuid| {
        format!("SELECT count(*) FROM api_usage WHERE key_id = '{key}' AND outcome = 'allowed' AND shadow_outcome = 'rate_limited'")
    };
    env.wait_for_count("SELECT count(*) FROM api_usage", 10).await;
    assert_eq!(env.count(&shadowed(tier_key_id)).await, 3);
    assert_eq!(env.count(&shadowed(org_key_id)).await, 4);
    let after = ["tier", "org"].map(shadow_denials);
    assert!(after[0] - before[0] >= 3.0, "tier shadow denials: {} before, {} after", before[0], after[0]);
    assert!(after[1] - before[1] >= 4.0, "org shadow denials: {} before, {} after", before[1], after[1]);

    // Out of shadow mode, the same limit denies (the key cache picks up the tier change).
    set_tier(&env, "limited", 2, 60, false).await;
    let status = wait_until(
        Duration::from_secs(5),
        || async { auth(&client, &validator, &tier_key).await.status() },
        |s| *s == StatusCode::TOO_MANY_REQUESTS,
    )
    .await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);

    validator.service.stop().await;
    worker.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn scopes_and_roles_are_enforced_before_limits() {
    let env = TestEnv::new().await;
    let org = env.org().await;
    let (key_id, key) = env
        .key_with(&org, |k| {
            k.scopes = vec!["read".into(), "orders".into()];
            k.custom_rate_limit_per_minute = Some(1);
        })
        .await;
    let validator = env.start_validator().await;
    let worker = env.start_worker().await;
    let client = reqwest::Client::new();
    let get = |query: &str| client.get(validator.url(&format!("/v1/auth{query}"))).bearer_auth(key.expose());

    let refusals = [
        get("?scope=write").send().await.expect("request"),
        get("?scope=read,write").send().await.expect("request"),
        get("").header("X-Tollgate-Require-Scope", "write").send().await.expect("request"),
        get("?role=admin").send().await.expect("request"),
        get("").header("X-Tollgate-Require-Role", "admin").send().await.expect("request"),
    ];
    for response in refusals {
        assert_eq!(response.status(), StatusCode::FORBIDDEN);
        let body: Value = response.json().await.expect("json");
        assert_eq!(body["error"], "insufficient_scope");
    }
    let verify: Value = client
        .post(validator.url("/v1/verify"))
        .json(&json!({ "key": key.expose(), "scope": "write" }))
        .send()
        .await
        .expect("verify")
        .json()
        .await
        .expect("json");
    assert_eq!((verify["valid"].clone(), verify["code"].clone()), (json!(false), json!("INSUFFICIENT_SCOPE")));
    assert_eq!(get("?role=superuser").send().await.expect("request").status(), StatusCode::BAD_REQUEST);
    // None of the refusals used the key's 1-per-minute limit.
    let allowed = get("?scope=read&scope=orders&role=user").send().await.expect("request");
    assert_eq!(allowed.status(), StatusCode::OK);
    assert_eq!(header(&allowed, "x-tollgate-role"), Role::User.as_str());
    assert_eq!(get("?scope=read").send().await.expect("request").status(), StatusCode::TOO_MANY_REQUESTS);

    env.wait_for_count(
        &format!("SELECT count(*) FROM api_usage WHERE key_id = '{key_id}' AND outcome = 'insufficient_scope'"),
        6,
    )
    .await;
    validator.service.stop().await;
    worker.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_blocked_client_s_made_up_keys_are_not_looked_up() {
    let env = TestEnv::new().await;
    let mut validator = env.spawn_validator_process(&[("TOLLGATE_IP_FAILURES_PER_MINUTE", "5".into())]);
    validator.answering().await;
    let client = reqwest::Client::new();
    let made_up = |ip: &str| {
        let key = ApiKey::generate(KeyEnv::Live);
        client.get(validator.url("/v1/auth")).header("X-Forwarded-For", ip).bearer_auth(key.expose()).send()
    };
    let looked_up = r#"tollgate_key_lookups_total{source="database"}"#;

    for _ in 0..5 {
        assert_eq!(made_up("203.0.113.60").await.expect("request").status(), StatusCode::UNAUTHORIZED);
    }
    let mut retry_after = i64::MAX;
    for _ in 0..50 {
        let blocked = made_up("203.0.113.60").await.expect("request");
        assert_eq!(blocked.status(), StatusCode::TOO_MANY_REQUESTS);
        // The first block's time, counted down.
        let retry = header(&blocked, "retry-after").parse::<i64>().expect("Retry-After in seconds");
        assert!(retry >= 1 && retry <= retry_after, "Retry-After {retry} after {retry_after}");
        retry_after = retry;
    }
    // The first 429 was a 401 until the limit counted it: the 6 keys before the block, none after.
    assert_eq!(validator.metric(looked_up).await, Some(6.0), "lookups");
    assert_eq!(validator.metric("tollgate_ip_failures_limited_total").await, Some(50.0));
    // Another client's keys are looked up.
    assert_eq!(made_up("203.0.113.61").await.expect("request").status(), StatusCode::UNAUTHORIZED);
    assert_eq!(validator.metric(looked_up).await, Some(7.0));
    // A trusted proxy's own address (no X-Forwarded-For) stands for all its clients: limited, but not blocked.
    for n in 0..8 {
        let key = ApiKey::generate(KeyEnv::Live);
        let status = client.get(validator.url("/v1/auth")).bearer_auth(key.expose()).send().await.expect("request");
        let expected = if n < 5 { StatusCode::UNAUTHORIZED } else { StatusCode::TOO_MANY_REQUESTS };
        assert_eq!(status.status(), expected, "request {n} from the proxy's own address");
    }
    assert_eq!(validator.metric(looked_up).await, Some(15.0), "every key from the proxy's address looked up");

    drop(validator); // stopped before its namespace is removed
    env.cleanup().await;
}

/// A trusted proxy's own address is counted and blocked on its own, not as part of its IPv6 /64: another host of that
/// /64 (a gateway's neighbour in a cluster's network) that sends bad keys must not get the proxy's requests refused.
#[tokio::test]
async fn a_trusted_proxy_is_not_blocked_for_its_ipv6_neighbours() {
    let env = TestEnv::new().await;
    let org = env.org().await;
    let mut args = env.validator_args();
    args.limits.ip_failures_per_minute = 5;
    let proxy = "2001:db8:5:6::1";
    args.trusted_proxies = format!("127.0.0.0/8,{proxy}/128").parse().expect("nets");
    let validator = env.start_validator_with(args, REDIS_URL).await;
    let client = reqwest::Client::new();
    let from = |ip: &str, key: &str| {
        client.get(validator.url("/v1/auth")).header("X-Forwarded-For", ip).header("X-API-Key", key.to_owned())
    };
    let made_up = ApiKey::generate(KeyEnv::Live);
    let neighbour = "2001:db8:5:6::99";
    for _ in 0..5 {
        assert_eq!(from(neighbour, made_up.expose()).send().await.expect("request").status(), StatusCode::UNAUTHORIZED);
    }
    let blocked = from(neighbour, made_up.expose()).send().await.expect("request");
    assert_eq!(blocked.status(), StatusCode::TOO_MANY_REQUESTS, "the neighbour's /64 is blocked");

    // A request that names no client beyond the proxy: its key is looked up (not held), and its own bad keys have a
    // count of their own.
    let (_, key) = env.key(&org).await;
    assert_eq!(from(proxy, key.expose()).send().await.expect("request").status(), StatusCode::OK);
    assert_eq!(from(proxy, made_up.expose()).send().await.expect("request").status(), StatusCode::UNAUTHORIZED);

    validator.service.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn too_many_bad_keys_from_one_ip_get_429_but_its_valid_keys_pass() {
    let env = TestEnv::new().await;
    let org = env.org().await;
    let (_, good) = env.key_with(&org, |k| k.scopes = vec!["read".into()]).await;
    let mut args = env.validator_args();
    args.limits.ip_failures_per_minute = 5;
    let validator = env.start_validator_with(args, REDIS_URL).await;
    let client = reqwest::Client::new();
    let from = |ip: &str, key: &str| {
        client.get(validator.url("/v1/auth")).header("X-Forwarded-For", ip).header("X-API-Key", key.to_owned())
    };
    let made_up = ApiKey::generate(KeyEnv::Live);
    let attacker = "203.0.113.50";
    // Used once, so that the validator holds it.
    assert_eq!(from("198.51.100.20", good.expose()).send().await.expect("request").status(), StatusCode::OK);
    let (_, not_held) = env.key(&org).await;

    for i in 0..5 {
        let bad = if i % 2 == 0 { made_up.expose().to_owned() } else { "nonsense".to_owned() };
        assert_eq!(from(attacker, &bad).send().await.expect("request").status(), StatusCode::UNAUTHORIZED);
    }
    let blocked = from(attacker, made_up.expose()).send().await.expect("request");
    assert_eq!(blocked.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(header(&blocked, "retry-after").parse::<i64>().is_ok_and(|s| s >= 1));
    let body: Value = blocked.json().await.expect("json");
    assert_eq!(body["error"], "rate_limited");
    // A valid key the validator holds is not blocked from the same address, and other addresses are not affected.
    assert_eq!(from(attacker, good.expose()).send().await.expect("request").status(), StatusCode::OK);
    // One it would have to look up is, until the block passes: that is what lets a flood of made-up keys cost nothing.
    assert_eq!(
        from(attacker, not_held.expose()).send().await.expect("request").status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(
        from("198.51.100.9", made_up.expose()).send().await.expect("request").status(),
        StatusCode::UNAUTHORIZED
    );
    // 403s do not count.
    let neighbour = "198.51.100.10";
    for _ in 0..10 {
        let response = client
            .get(validator.url("/v1/auth?scope=write"))
            .header("X-Forwarded-For", neighbour)
            .header("X-API-Key", good.expose())
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), StatusCode::FORBIDDEN);
    }
    assert_eq!(from(neighbour, made_up.expose()).send().await.expect("request").status(), StatusCode::UNAUTHORIZED);

    // The blocked client cannot get out by writing an address of its choice before the one its proxy wrote (with a
    // port, as some proxies write it).
    let spoofed = from("192.0.2.1, 203.0.113.50:4711", made_up.expose()).send().await.expect("request");
    assert_eq!(spoofed.status(), StatusCode::TOO_MANY_REQUESTS);
    // An IPv6 client is its /64, whichever of its addresses it sends from.
    for i in 1..=5 {
        let status = from(&format!("2001:db8:5:6::{i}"), made_up.expose()).send().await.expect("request").status();
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    let rotated = from("2001:db8:5:6:ffff::1", made_up.expose()).send().await.expect("request");
    assert_eq!(rotated.status(), StatusCode::TOO_MANY_REQUESTS);
    let next_block = from("2001:db8:5:7::1", made_up.expose()).send().await.expect("request");
    assert_eq!(next_block.status(), StatusCode::UNAUTHORIZED);

    validator.service.stop().await;
    env.cleanup().await;
}
