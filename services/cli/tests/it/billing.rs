//! Billing periods, the Redis quota counters, `tollgate usage reconcile` and `tollgate dlq list|replay`.

use std::process::{Command, Output};

use async_nats::jetstream;
use chrono::{Datelike, NaiveDate, TimeDelta, Utc};
use serde_json::Value;
use uuid::Uuid;

use tollgate_shared::codec;
use tollgate_shared::domain::Outcome;
use tollgate_shared::event::UsageEvent;
use tollgate_shared::quota_counter;
use tollgate_worker::reconcile::{self, Filter};

use crate::harness::usage_event;
use crate::harness::{TestEnv, REDIS_URL};

async fn publish(js: &jetstream::Context, subject: &str, events: Vec<UsageEvent>) {
    js.publish(subject.to_owned(), codec::encode_batch(events).into()).await.expect("publish").await.expect("stored");
}

fn this_month() -> NaiveDate {
    let today = Utc::now().date_naive();
    NaiveDate::from_ymd_opt(today.year(), today.month(), 1).expect("first of the month")
}

async fn org_id(env: &TestEnv, slug: &str) -> Uuid {
    sqlx::query_scalar("SELECT id FROM organizations WHERE slug = $1")
        .bind(slug)
        .fetch_one(&env.pool)
        .await
        .expect("org")
}

fn tollgate(env: &TestEnv, args: &[&str]) -> Output {
    tollgate_on_redis(env, REDIS_URL, args)
}

fn tollgate_on_redis(env: &TestEnv, redis_url: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(args)
        .env("DATABASE_URL", env.database_url.expose())
        .env("NATS_URL", crate::harness::NATS_URL)
        .env("REDIS_URL", redis_url)
        .env("TOLLGATE_STREAM", &env.topology.stream)
        .env("TOLLGATE_SUBJECT_PREFIX", &env.topology.subject_prefix)
        .env("TOLLGATE_REDIS_PREFIX", &env.topology.redis_prefix)
        .output()
        .expect("run tollgate")
}

async fn counter(key: &str) -> Option<i64> {
    read_counter(key).await.expect("GET")
}

async fn read_counter(key: &str) -> redis::RedisResult<Option<i64>> {
    let mut redis = tollgate_shared::connect::redis(&REDIS_URL.parse().expect("url")).await.expect("redis");
    redis::cmd("GET").arg(key).query_async(&mut redis).await
}

async fn delete(key: &str) {
    let mut redis = tollgate_shared::connect::redis(&REDIS_URL.parse().expect("url")).await.expect("redis");
    let _: i64 = redis::cmd("DEL").arg(key).query_async(&mut redis).await.expect("DEL");
}

#[tokio::test]
async fn billing_counts_allowed_units_and_prices_the_overage() {
    let env = TestEnv::new().await;
    let js = jetstream::new(env.nats.clone());
    env.topology.ensure_worker_side(&js).await.expect("topology");
    let slug = env.org().await; // on the pro plan
    let (key_id, _) = env.key(&slug).await;
    let org = org_id(&env, &slug).await;
    sqlx::query("UPDATE plans SET included_units = 10, price_per_thousand_minor = 50 WHERE name = 'pro'")
        .execute(&env.pool)
        .await
        .expect("plan");

    let mut events: Vec<UsageEvent> = (0..25).map(|_| usage_event(org, key_id, Outcome::Allowed, 2)).collect();
    events.extend((0..5).map(|_| usage_event(org, key_id, Outcome::RateLimited, 2)));
    publish(&js, &env.topology.usage_subject(), events).await;
    let worker = env.start_worker().await;
    env.wait_for_count("SELECT count(*) FROM api_usage", 30).await;

    let (requests, units, included, overage, amount, currency, status): (i64, i64, i64, i64, i64, String, String) =
        sqlx::query_as(
            "SELECT requests, units, included_units, overage_units, amount_minor, currency, status
             FROM billing_periods WHERE org_id = $1 AND month = $2",
        )
        .bind(org)
        .bind(this_month())
        .fetch_one(&env.pool)
        .await
        .expect("billing period");
    // 25 allowed requests of 2 units; 10 included; 40 over at 50 cents per 1000 → 2 cents (rounded up).
    assert_eq!((requests, units, included, overage, amount), (25, 50, 10, 40, 2));
    assert_eq!((currency.as_str(), status.as_str()), ("USD", "open"));
    assert_eq!(env.count("SELECT total_requests FROM api_keys").await, 30);
    env.assert_exactly_once(25).await;

    let key = quota_counter::key(&env.topology.redis_prefix, org, this_month());
    assert_eq!(counter(&key).await, Some(50), "the quota counter holds the committed units");

    // A lost counter is rebuilt from PostgreSQL by the next batch of that organization.
    delete(&key).await;
    publish(&js, &env.topology.usage_subject(), vec![usage_event(org, key_id, Outcome::Allowed, 3)]).await;
    crate::harness::wait_until(std::time::Duration::from_secs(10), || counter(&key), |v| *v == Some(53)).await;
    assert_eq!(counter(&key).await, Some(53));

    worker.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_batch_delivered_again_raises_its_counter_to_what_is_committed() {
    let env = TestEnv::new().await;
    let js = jetstream::new(env.nats.clone());
    env.topology.ensure_worker_side(&js).await.expect("topology");
    let (org, key_id) = (Uuid::now_v7(), Uuid::now_v7());
    let events: Vec<UsageEvent> = (0..4).map(|_| usage_event(org, key_id, Outcome::Allowed, 2)).collect();
    let worker = env.start_worker().await;
    publish(&js, &env.topology.usage_subject(), events.clone()).await;
    let key = quota_counter::key(&env.topology.redis_prefix, org, this_month());
    let raised =
        crate::harness::wait_until(std::time::Duration::from_secs(10), || counter(&key), |v| *v == Some(8)).await;
    assert_eq!(raised, Some(8), "the first delivery's raise, before the counter is lost");

    // The counter is lost (as when the raise after a commit never happened), and the same batch comes again: all of
    // its events are there already, and still its counter is raised to the committed total.
    delete(&key).await;
    publish(&js, &env.topology.usage_subject(), events).await;
    crate::harness::wait_until(std::time::Duration::from_secs(10), || counter(&key), |v| *v == Some(8)).await;
    assert_eq!(counter(&key).await, Some(8));
    env.assert_exactly_once(4).await;

    worker.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn an_unknown_organization_is_billed_on_free_terms() {
    let env = TestEnv::new().await;
    let js = jetstream::new(env.nats.clone());
    env.topology.ensure_worker_side(&js).await.expect("topology");
    let (org, key_id) = (Uuid::now_v7(), Uuid::now_v7());
    publish(&js, &env.topology.usage_subject(), vec![usage_event(org, key_id, Outcome::Allowed, 3)]).await;
    let worker = env.start_worker().await;
    env.wait_for_count("SELECT count(*) FROM billing_periods", 1).await;

    let free: i64 = sqlx::query_scalar("SELECT included_units FROM plans WHERE name = 'free'")
        .fetch_one(&env.pool)
        .await
        .expect("the free plan");
    let (plan, included, overage): (String, i64, i64) =
        sqlx::query_as("SELECT plan, included_units, overage_units FROM billing_periods WHERE org_id = $1")
            .bind(org)
            .fetch_one(&env.pool)
            .await
            .expect("billing period");
    assert!(free > 3, "the free plan includes some units ({free})");
    assert_eq!((plan.as_str(), included, overage), ("free", free, 0));

    worker.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn reconcile_reports_and_repairs_drift_and_fails_on_a_broken_invariant() {
    let env = TestEnv::new().await;
    let js = jetstream::new(env.nats.clone());
    env.topology.ensure_worker_side(&js).await.expect("topology");
    let (org, key_id) = (Uuid::now_v7(), Uuid::now_v7());
    publish(
        &js,
        &env.topology.usage_subject(),
        (0..7).map(|_| usage_event(org, key_id, Outcome::Allowed, 1)).collect(),
    )
    .await;
    // And a past month's, whose counter has long expired: no drift, nothing to repair.
    let past = |_| UsageEvent { ts: Utc::now() - TimeDelta::days(95), ..usage_event(org, key_id, Outcome::Allowed, 1) };
    publish(&js, &env.topology.usage_subject(), (0..5).map(past).collect()).await;
    let worker = env.start_worker().await;
    env.assert_exactly_once(12).await;
    worker.stop().await;

    // The past month's counter expired, as it does 40 days after its last event.
    let past_month = (Utc::now() - TimeDelta::days(95)).date_naive().with_day(1).expect("first day");
    delete(&quota_counter::key(&env.topology.redis_prefix, org, past_month)).await;
    // Redis flushed: the counter is gone, reconcile sees the drift and --fix rebuilds it.
    let key = quota_counter::key(&env.topology.redis_prefix, org, this_month());
    delete(&key).await;
    let mut quota = env.quota_counters().await;
    let report = reconcile::reconcile(&env.pool, Some(&mut quota), Filter::default(), false).await.expect("reconcile");
    assert_eq!((report.violations, report.drift_units, report.repaired), (0, Some(7), 0));
    assert_eq!(reconcile::counter_drift(&env.pool, &mut quota, this_month()).await.expect("drift"), 7);
    let output = tollgate(&env, &["--json", "usage", "reconcile", "--fix"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let json: Value = serde_json::from_slice(&output.stdout).expect("json");
    assert_eq!(json["repaired"], 1);
    assert_eq!(counter(&key).await, Some(7));
    let report = reconcile::reconcile(&env.pool, Some(&mut quota), Filter::default(), false).await.expect("reconcile");
    assert_eq!((report.violations, report.drift_units), (0, Some(0)), "zero drift after the rebuild");

    // A counter ahead of PostgreSQL is drift too, and is brought down.
    let mut redis = tollgate_shared::connect::redis(&REDIS_URL.parse().expect("url")).await.expect("redis");
    let _: () = redis::cmd("SET").arg(&key).arg(100).query_async(&mut redis).await.expect("SET");
    let report = reconcile::reconcile(&env.pool, Some(&mut quota), Filter::default(), true).await.expect("reconcile");
    assert_eq!((report.drift_units, report.repaired), (Some(93), 1));
    assert_eq!(counter(&key).await, Some(7));

    // A counter holding what is not a number, or not even a string, is drift to repair, not a reason to fail.
    for garbage in [&b"twelve"[..], b"\xff\xfe"] {
        let _: () = redis::cmd("SET").arg(&key).arg(garbage).query_async(&mut redis).await.expect("SET");
        assert_eq!(reconcile::counter_drift(&env.pool, &mut quota, this_month()).await.expect("drift"), 7);
        let report =
            reconcile::reconcile(&env.pool, Some(&mut quota), Filter::default(), true).await.expect("reconcile");
        assert_eq!((report.drift_units, report.repaired), (Some(7), 1));
        assert_eq!(counter(&key).await, Some(7));
    }
    delete(&key).await;
    let _: () = redis::cmd("RPUSH").arg(&key).arg("x").query_async(&mut redis).await.expect("RPUSH");
    let report = reconcile::reconcile(&env.pool, Some(&mut quota), Filter::default(), true).await.expect("reconcile");
    assert_eq!((report.drift_units, report.repaired), (Some(7), 1));
    assert_eq!(counter(&key).await, Some(7));

    // Without Redis, billing is checked all the same (it is what to alert on), and the counters are said unchecked.
    // Port 1: nothing listens there, and no test can take it.
    let away = "redis://127.0.0.1:1".to_owned();
    let output = tollgate_on_redis(&env, &away, &["usage", "reconcile"]);
    let said = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{said}{}", String::from_utf8_lossy(&output.stderr));
    assert!(said.contains("0 invariant violation(s), quota counters not checked"), "{said}");
    let output = tollgate_on_redis(&env, &away, &["--json", "usage", "reconcile"]);
    let json: Value = serde_json::from_slice(&output.stdout).expect("json");
    assert_eq!(json["drift_units"], Value::Null, "no drift figure where none was measured");
    let output = tollgate_on_redis(&env, &away, &["usage", "reconcile", "--fix"]);
    assert!(!output.status.success() && String::from_utf8_lossy(&output.stderr).contains("once Redis is back"));

    // Billing that disagrees with the rows: reported, and the command fails, with Redis or without.
    sqlx::query("UPDATE billing_periods SET requests = requests + 1").execute(&env.pool).await.expect("break");
    let month = this_month().format("%Y-%m").to_string();
    for redis_url in [REDIS_URL, &away] {
        let output = tollgate_on_redis(&env, redis_url, &["usage", "reconcile", "--month", &month]);
        assert!(!output.status.success());
        assert!(String::from_utf8_lossy(&output.stdout).contains("MISMATCH"));
    }

    env.cleanup().await;
}

#[tokio::test]
async fn dead_letters_are_listed_and_replayed_into_the_usage_stream() {
    let env = TestEnv::new().await;
    let js = jetstream::new(env.nats.clone());
    env.topology.ensure_worker_side(&js).await.expect("topology");
    publish_raw(&js, &env.topology.usage_subject(), b"\x01this is not bincode".to_vec()).await;
    let worker = env.start_worker().await;
    let dead_letters = js.get_stream(env.topology.dead_letter_stream()).await.expect("dead-letter stream");
    crate::harness::wait_until(
        std::time::Duration::from_secs(10),
        || async { dead_letters.get_raw_message(1).await.is_ok() },
        |found| *found,
    )
    .await;
    // A good message that an older worker dead-lettered (as if it had not known the codec version yet).
    let good = usage_event(Uuid::now_v7(), Uuid::now_v7(), Outcome::Allowed, 1);
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(tollgate_worker::REASON_HEADER, "unknown codec version 1");
    js.publish_with_headers(
        env.topology.dead_letter_subject(),
        headers,
        codec::encode_batch(vec![good.clone()]).into(),
    )
    .await
    .expect("publish")
    .await
    .expect("stored");
    publish_raw(&js, &env.topology.dead_letter_subject(), b"a third".to_vec()).await;

    let output = tollgate(&env, &["--json", "dlq", "list"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let letters: Value = serde_json::from_slice(&output.stdout).expect("json");
    let letters = letters.as_array().expect("array");
    assert_eq!(letters.len(), 3);
    assert_eq!(letters[0]["sequence"], 1);
    assert!(letters[0]["reason"].as_str().expect("reason").contains("undecodable"));
    assert_eq!(letters[0]["size"], 20);
    assert_eq!(letters[1]["sequence"], 2);

    let output = tollgate(&env, &["dlq", "replay", "--seq", "2"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    env.wait_for_count("SELECT count(*) FROM api_usage", 1).await;
    let event_id: Uuid = sqlx::query_scalar("SELECT event_id FROM api_usage").fetch_one(&env.pool).await.expect("row");
    assert_eq!(event_id, good.event_id);
    let output = tollgate(&env, &["--json", "dlq", "list"]);
    let letters: Value = serde_json::from_slice(&output.stdout).expect("json");
    let sequences: Vec<&Value> = letters.as_array().expect("array").iter().map(|l| &l["sequence"]).collect();
    assert_eq!(sequences, [1, 3], "the replayed one left the dead-letter stream, and the one after it is listed");
    let output = tollgate(&env, &["dlq", "replay", "--seq", "2"]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("no dead letter with sequence 2"));

    worker.stop().await;
    env.cleanup().await;
}

/// Message ids name a message by its stream and sequence; a stream made again (deleted by hand, or a NATS that lost
/// its storage) starts its sequences again, and its messages must not pass for the earlier ones.
#[tokio::test]
async fn streams_made_again_lose_no_dead_letter_and_no_replay() {
    let env = TestEnv::new().await;
    let js = jetstream::new(env.nats.clone());
    let dead_letters = || async {
        js.get_stream(env.topology.dead_letter_stream()).await.expect("dlq").info().await.expect("info").state.messages
    };
    let wait_for_dead_letters =
        |n: u64| crate::harness::wait_until(std::time::Duration::from_secs(10), dead_letters, move |m| *m == n);

    // Garbage at sequence 1 of the usage stream, dead-lettered; the stream made again; other garbage at its 1.
    for round in 1..=2 {
        env.topology.ensure_worker_side(&js).await.expect("topology");
        publish_raw(&js, &env.topology.usage_subject(), format!("\x01garbage {round}").into_bytes()).await;
        let worker = env.start_worker().await;
        assert_eq!(wait_for_dead_letters(round).await, round, "dead letters after round {round}");
        worker.stop().await;
        js.delete_stream(&env.topology.stream).await.expect("delete the usage stream");
    }

    // A dead letter replayed from sequence 1; the dead-letter stream made again; another replayed from its 1.
    env.topology.ensure_worker_side(&js).await.expect("topology");
    let worker = env.start_worker().await;
    for round in 1..=2 {
        js.delete_stream(env.topology.dead_letter_stream()).await.expect("delete the dead-letter stream");
        env.topology.ensure_dead_letter_stream(&js).await.expect("dead-letter stream");
        let event = usage_event(Uuid::now_v7(), Uuid::now_v7(), Outcome::Allowed, 1);
        publish_raw(&js, &env.topology.dead_letter_subject(), codec::encode_batch(vec![event])).await;
        let output = tollgate(&env, &["dlq", "replay", "--seq", "1"]);
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        env.wait_for_count("SELECT count(*) FROM api_usage", round).await;
    }

    worker.stop().await;
    env.cleanup().await;
}

async fn publish_raw(js: &jetstream::Context, subject: &str, payload: Vec<u8>) {
    js.publish(subject.to_owned(), payload.into()).await.expect("publish").await.expect("stored");
}

#[tokio::test]
async fn the_monthly_quota_survives_a_redis_flush_overshooting_only_by_events_in_flight() {
    let env = TestEnv::new().await;
    let slug = env.org().await;
    let limits = tollgate_shared::admin::OrgChanges {
        monthly_request_limit: Some(tollgate_shared::domain::LimitSetting::Max(5)),
        ..Default::default()
    };
    tollgate_shared::admin::update_org(&env.pool, &slug, limits).await.expect("org");
    let org = org_id(&env, &slug).await;
    let (_, key) = env.key(&slug).await;
    let validator = env.start_validator().await;
    let worker = env.start_worker().await;
    let client = reqwest::Client::new();
    let status = || {
        let request = client.get(validator.url("/v1/auth")).bearer_auth(key.expose());
        async move { request.send().await.expect("request").status() }
    };
    let quota_key = quota_counter::key(&env.topology.redis_prefix, org, this_month());
    let counter_reaches = |units: i64| {
        let quota_key = quota_key.clone();
        crate::harness::wait_until(
            std::time::Duration::from_secs(45),
            move || counter_of(quota_key.clone()),
            move |c| *c == Some(units),
        )
    };

    for _ in 0..5 {
        assert_eq!(status().await, reqwest::StatusCode::OK);
    }
    assert_eq!(counter_reaches(5).await, Some(5));
    assert_eq!(status().await, reqwest::StatusCode::TOO_MANY_REQUESTS, "the quota of 5 is used up");

    // Redis loses the counter. Until the workers' next commit for this organization rebuilds it from PostgreSQL,
    // the validator reads 0: the overshoot is the events in flight, here the one request that triggers the rebuild.
    delete(&quota_key).await;
    assert_eq!(status().await, reqwest::StatusCode::OK);
    assert_eq!(counter_reaches(6).await, Some(6), "rebuilt from PostgreSQL, not restarted from zero");
    for _ in 0..3 {
        assert_eq!(status().await, reqwest::StatusCode::TOO_MANY_REQUESTS, "the month was not reset");
    }

    // Something else writes the counter's key, with a value of another type: the validator reads that as no count,
    // and the workers' next commit writes the total over it, rather than failing on it for good. (That the
    // validator decides such a request in Redis, not by its failure policy, ratelimit.rs checks.)
    delete(&quota_key).await;
    let mut redis = tollgate_shared::connect::redis(&REDIS_URL.parse().expect("url")).await.expect("redis");
    let _: i64 = redis::cmd("RPUSH").arg(&quota_key).arg("x").query_async(&mut redis).await.expect("RPUSH");
    assert_eq!(status().await, reqwest::StatusCode::OK);
    assert_eq!(counter_reaches(7).await, Some(7), "written over with PostgreSQL's total");
    assert_eq!(status().await, reqwest::StatusCode::TOO_MANY_REQUESTS);
    env.wait_for_count("SELECT count(*) FROM api_usage WHERE outcome = 'allowed'", 7).await;

    validator.service.stop().await;
    worker.stop().await;
    env.cleanup().await;
}

/// The counter, or `None` while it is missing or holds something else than a number.
async fn counter_of(key: String) -> Option<i64> {
    read_counter(&key).await.ok().flatten()
}

/// A price whose bills could overflow would stop the workers at the first period of an organization on it.
#[tokio::test]
async fn a_plan_priced_past_what_a_bill_can_hold_is_refused() {
    let env = TestEnv::new().await;
    let plan = |price: i64| {
        sqlx::query(
            "INSERT INTO plans (name, included_units, price_per_thousand_minor, currency) VALUES ($1, 0, $2, 'USD')",
        )
        .bind(format!("priced-{price}"))
        .bind(price)
        .execute(&env.pool)
    };
    let refused = plan(1_000_001).await.expect_err("refused");
    assert!(refused.to_string().contains("plans_price_per_thousand_minor_at_most_1000000"), "{refused}");
    plan(1_000_000).await.expect("the dearest plan");
    env.cleanup().await;
}
