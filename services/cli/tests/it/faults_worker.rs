//! Fault tests of the worker side (issue 4, tests 1, 2, 4 and 6): under a steady stream of verifies (or of
//! published events), inject the fault, heal it, wait for quiet, then check that every 200 the clients saw is
//! exactly one allowed row in `api_usage`, one count in `usage_hourly` and one billed request, with no event twice.

use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull};
use futures::StreamExt;
use uuid::Uuid;

use tollgate_shared::codec;
use tollgate_shared::domain::Outcome;
use tollgate_shared::event::UsageEvent;
use tollgate_shared::quota_counter;

use crate::harness::usage_event;
use crate::harness::{wait_until, Load, TestEnv, NATS_URL};
use crate::servers::{PrivatePostgres, PrivateRedis};

/// Re-delivery of what a killed worker held comes after this long.
const TEST_ACK_WAIT: Duration = Duration::from_secs(2);

#[tokio::test]
async fn a_worker_killed_mid_batch_and_restarted_loses_and_doubles_nothing() {
    let env = TestEnv::new().await;
    env.short_ack_wait(TEST_ACK_WAIT).await;
    let org = env.org().await;
    let (_, key) = env.key(&org).await;
    let validator = env.start_validator().await;
    let mut worker = env.spawn_worker_process(NATS_URL);
    let load = Load::start(&validator, &key, 4);

    // Let it write for a while, so the kill lands among fetched, half-written and committed-but-unacked batches.
    env.wait_for_count_at_least("SELECT count(*) FROM api_usage", 300).await;
    worker.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let restarted = env.spawn_worker_process(NATS_URL);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let allowed = load.stop().await;

    env.assert_exactly_once(allowed).await;
    drop(restarted);
    validator.service.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_deleted_consumer_is_created_again_and_nothing_is_lost_or_doubled() {
    let env = TestEnv::new().await;
    env.short_ack_wait(TEST_ACK_WAIT).await;
    let org = env.org().await;
    let (_, key) = env.key(&org).await;
    let validator = env.start_validator().await;
    let worker = env.start_worker().await;
    let load = Load::start(&validator, &key, 4);

    // An operator's mistake, or NATS restarted without its storage: the consumer is gone under load.
    env.wait_for_count_at_least("SELECT count(*) FROM api_usage", 300).await;
    let js = jetstream::new(env.nats.clone());
    let stream = js.get_stream(&env.topology.stream).await.expect("usage stream");
    stream.delete_consumer(&env.topology.workers_consumer()).await.expect("delete the consumer");
    let written = env.count("SELECT count(*) FROM api_usage").await;
    env.wait_for_count_at_least("SELECT count(*) FROM api_usage", written + 300).await;
    let allowed = load.stop().await;

    env.assert_exactly_once(allowed).await;
    worker.stop().await;
    validator.service.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn two_workers_share_the_consumer_and_one_is_killed() {
    let env = TestEnv::new().await;
    env.short_ack_wait(TEST_ACK_WAIT).await;
    let org = env.org().await;
    let (_, key) = env.key(&org).await;
    let validator = env.start_validator().await;
    let ports = [crate::servers::free_port(), crate::servers::free_port()];
    let worker = |port: u16| {
        let settings =
            [("TOLLGATE_BATCH_WAIT", "20ms".into()), ("TOLLGATE_METRICS_LISTEN", format!("127.0.0.1:{port}"))];
        env.spawn_service("worker", NATS_URL, &settings)
    };
    let (mut first, second) = (worker(ports[0]), worker(ports[1]));
    let load = Load::start(&validator, &key, 4);

    env.wait_for_count_at_least("SELECT count(*) FROM api_usage", 300).await;
    // Both took batches: they share the consumer.
    let written = |port: u16| async move {
        let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await.ok()?.text().await.ok()?;
        crate::harness::series_value(&text, "tollgate_usage_rows_written_total")
    };
    let both = wait_until(
        Duration::from_secs(10),
        || async { (written(ports[0]).await.unwrap_or(0.0), written(ports[1]).await.unwrap_or(0.0)) },
        |(a, b)| *a > 0.0 && *b > 0.0,
    )
    .await;
    assert!(both.0 > 0.0 && both.1 > 0.0, "rows written by each worker: {both:?}");
    first.kill();
    // The survivor takes over, including what the killed one held once its ack wait expires.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let allowed = load.stop().await;

    env.assert_exactly_once(allowed).await;
    drop(second);
    validator.service.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn postgres_down_for_10_seconds_then_back_loses_nothing_and_copies_no_dead_letter_twice() {
    let postgres = PrivatePostgres::start();
    let env = TestEnv::on_postgres(postgres.url("").trim_end_matches('/')).await;
    let org = env.org().await;
    let (_, key) = env.key(&org).await;
    let validator = env.start_validator().await;
    // JetStream drops a dead letter published again only within the stream's duplicate window: a short one shows
    // whether a batch retried through the outage copies its bad message again.
    let js = jetstream::new(env.nats.clone());
    env.topology.ensure_worker_side(&js).await.expect("topology");
    let mut dead_letters = js.get_stream(env.topology.dead_letter_stream()).await.expect("dead-letter stream");
    let mut config = dead_letters.info().await.expect("info").config.clone();
    config.duplicate_window = Duration::from_secs(1);
    js.update_stream(config).await.expect("a short duplicate window");
    let worker = env.start_worker().await;
    let load = Load::start(&validator, &key, 2);

    env.wait_for_count_at_least("SELECT count(*) FROM api_usage", 100).await;
    postgres.stop();
    let garbage = bytes::Bytes::from_static(b"\x02not a usage batch");
    js.publish(env.topology.usage_subject(), garbage).await.expect("publish").await.expect("stored");
    // Verifies go on (cached key); the worker holds its batch, retrying with backoff and in-progress acks.
    tokio::time::sleep(Duration::from_secs(10)).await;
    postgres.restart();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let allowed = load.stop().await;

    // The backoff is at most 10 s, so the last retry may come that long after the restart.
    env.wait_for_count("SELECT count(*) FROM api_usage WHERE outcome = 'allowed'", allowed).await;
    env.assert_exactly_once(allowed).await;
    let copies = dead_letters.info().await.expect("info").state.messages;
    assert_eq!(copies, 1, "copies of the one bad message in the dead-letter stream");
    worker.stop().await;
    validator.service.stop().await;
    env.cleanup().await;
    drop(postgres);
}

/// A key of a new organization: (organization id, key id).
async fn key_of_new_org(env: &TestEnv) -> (Uuid, Uuid) {
    let (key_id, _) = env.key(&env.org().await).await;
    let org_id = sqlx::query_scalar("SELECT org_id FROM api_keys WHERE id = $1")
        .bind(key_id)
        .fetch_one(&env.pool)
        .await
        .expect("the key's organization");
    (org_id, key_id)
}

async fn publish(js: &jetstream::Context, subject: &str, message_id: String, events: Vec<UsageEvent>) {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(async_nats::header::NATS_MESSAGE_ID, message_id.as_str());
    js.publish_with_headers(subject.to_owned(), headers, codec::encode_batch(events).into())
        .await
        .expect("publish")
        .await
        .expect("stored");
}

async fn fetch(consumer: &jetstream::consumer::Consumer<pull::Config>, n: usize) -> Vec<jetstream::Message> {
    let mut messages =
        consumer.batch().max_messages(n).expires(Duration::from_secs(1)).messages().await.expect("fetch");
    let mut out = Vec::new();
    while let Some(message) = messages.next().await {
        out.push(message.expect("message"));
    }
    out
}

#[tokio::test]
async fn the_same_event_published_twice_and_a_batch_delivered_twice_count_once() {
    let env = TestEnv::new().await;
    env.short_ack_wait(Duration::from_secs(1)).await;
    let js = jetstream::new(env.nats.clone());
    let consumer = env.topology.ensure_worker_side(&js).await.expect("topology");
    let subject = env.topology.usage_subject();
    let (org_id, key_id) = (Uuid::now_v7(), Uuid::now_v7());

    // Every event twice, under different message ids (so JetStream keeps both copies).
    let events: Vec<UsageEvent> = (0..200).map(|_| usage_event(org_id, key_id, Outcome::Allowed, 1)).collect();
    for (i, chunk) in events.chunks(20).enumerate() {
        publish(&js, &subject, format!("a{i}"), chunk.to_vec()).await;
        publish(&js, &subject, format!("b{i}"), chunk.to_vec()).await;
    }

    // One batch delivered twice: fetched, left unacked past the ack wait, fetched again by a second worker; both
    // deliveries are then processed (the first worker was only slow, not dead).
    let mut first_worker = tollgate_worker::Worker::new(env.pool.clone(), js.clone(), &env.topology, None);
    let mut second_worker =
        tollgate_worker::Worker::new(env.pool.clone(), js.clone(), &env.topology, Some(env.quota_counters().await));
    let first_delivery = fetch(&consumer, 5).await;
    assert_eq!(first_delivery.len(), 5);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let second_delivery = fetch(&consumer, 5).await;
    assert_eq!(
        second_delivery.iter().map(|m| m.info().expect("info").stream_sequence).collect::<Vec<_>>(),
        first_delivery.iter().map(|m| m.info().expect("info").stream_sequence).collect::<Vec<_>>(),
        "the same batch was delivered again"
    );
    let first = first_worker.process_batch(&first_delivery).await.expect("first delivery");
    let second = second_worker.process_batch(&second_delivery).await.expect("second delivery");
    // Five messages: three chunks of 20 events, two of them twice; a batch writes each event once, and every event
    // it is offered is either written or a duplicate.
    assert_eq!((first.inserted, first.duplicates), (60, 40));
    assert_eq!((second.inserted, second.duplicates), (0, 100));

    // The rest through a running worker.
    let worker = env.start_worker().await;
    env.assert_exactly_once(200).await;
    worker.stop().await;
    env.cleanup().await;
}

/// A write that waits longer than the ack wait (here for a lock an operator holds on `usage_hourly`) keeps its batch:
/// the worker sends in-progress acks meanwhile, so JetStream hands the batch to no other worker.
#[tokio::test]
async fn a_write_waiting_longer_than_the_ack_wait_keeps_its_batch() {
    let env = TestEnv::new().await;
    env.short_ack_wait(TEST_ACK_WAIT).await;
    let (org_id, key_id) = key_of_new_org(&env).await;
    let js = jetstream::new(env.nats.clone());
    let mut lock = env.pool.begin().await.expect("transaction");
    sqlx::query("LOCK TABLE usage_hourly IN EXCLUSIVE MODE").execute(&mut *lock).await.expect("lock");
    let first = env.start_worker().await;
    let second = env.start_worker().await;
    publish(&js, &env.topology.usage_subject(), "m1".into(), vec![usage_event(org_id, key_id, Outcome::Allowed, 1)])
        .await;
    tokio::time::sleep(TEST_ACK_WAIT * 3).await;
    assert_eq!(env.count("SELECT count(*) FROM api_usage").await, 0, "the write waits for the lock");
    lock.rollback().await.expect("unlock");

    env.wait_for_count("SELECT sum(allowed) FROM usage_hourly", 1).await;
    assert_eq!(delivered(&env, &js).await, 1, "the batch was delivered again while a worker wrote it");
    env.assert_exactly_once(1).await;
    first.stop().await;
    second.stop().await;
    env.cleanup().await;
}

/// An ack wait an operator shortens while the workers run is what their in-progress acks keep to (once they have
/// read it again), not the one they started with.
#[tokio::test]
async fn an_ack_wait_shortened_while_workers_run_is_kept_to() {
    let env = TestEnv::new().await;
    let (org_id, key_id) = key_of_new_org(&env).await;
    let js = jetstream::new(env.nats.clone());
    env.topology.ensure_worker_side(&js).await.expect("topology");
    // Both start with the default ack wait (30 s): in-progress acks every 10 s.
    let first = env.start_worker().await;
    let second = env.start_worker().await;
    let stream = js.get_stream(&env.topology.stream).await.expect("stream");
    let mut consumer =
        stream.get_consumer::<pull::Config>(&env.topology.workers_consumer()).await.expect("workers consumer");
    let config =
        jetstream::consumer::Config { ack_wait: TEST_ACK_WAIT, ..consumer.info().await.expect("info").config.clone() };
    stream.create_consumer(config).await.expect("the ack wait edited");
    // The workers read their consumer every 5 s.
    tokio::time::sleep(Duration::from_secs(6)).await;

    let mut lock = env.pool.begin().await.expect("transaction");
    sqlx::query("LOCK TABLE usage_hourly IN EXCLUSIVE MODE").execute(&mut *lock).await.expect("lock");
    publish(&js, &env.topology.usage_subject(), "m1".into(), vec![usage_event(org_id, key_id, Outcome::Allowed, 1)])
        .await;
    tokio::time::sleep(TEST_ACK_WAIT * 3).await;
    lock.rollback().await.expect("unlock");

    env.wait_for_count("SELECT sum(allowed) FROM usage_hourly", 1).await;
    assert_eq!(delivered(&env, &js).await, 1, "the batch was delivered again while a worker wrote it");
    first.stop().await;
    second.stop().await;
    env.cleanup().await;
}

/// PostgreSQL away for several ack waits: the worker keeps its batch all along (in-progress acks through its failed
/// attempts and the waits between them), so JetStream delivers it once.
#[tokio::test]
async fn a_batch_retried_for_several_ack_waits_is_delivered_once() {
    let postgres = PrivatePostgres::start();
    let env = TestEnv::on_postgres(postgres.url("").trim_end_matches('/')).await;
    env.short_ack_wait(TEST_ACK_WAIT).await;
    let (org_id, key_id) = key_of_new_org(&env).await;
    let js = jetstream::new(env.nats.clone());
    let worker = env.start_worker().await;
    postgres.stop();
    publish(&js, &env.topology.usage_subject(), "m1".into(), vec![usage_event(org_id, key_id, Outcome::Allowed, 1)])
        .await;
    tokio::time::sleep(TEST_ACK_WAIT * 4).await;
    postgres.restart();

    env.wait_for_count("SELECT sum(allowed) FROM usage_hourly", 1).await;
    assert_eq!(delivered(&env, &js).await, 1, "the batch was delivered again while a worker retried it");
    worker.stop().await;
    env.cleanup().await;
}

/// How many deliveries the workers' consumer made, re-deliveries included (each takes a consumer sequence number).
async fn delivered(env: &TestEnv, js: &jetstream::Context) -> u64 {
    let stream = js.get_stream(&env.topology.stream).await.expect("stream");
    let mut consumer =
        stream.get_consumer::<pull::Config>(&env.topology.workers_consumer()).await.expect("workers consumer");
    consumer.info().await.expect("consumer info").delivered.consumer_sequence
}

/// A hung Redis (connections open, nothing answered) holds up no batch, and the quota counter catches up as soon as
/// a Redis answers again (here a new one, which lost every counter), with no batch after it.
#[tokio::test]
async fn a_hung_redis_holds_up_no_batch_and_the_quota_counter_catches_up_on_its_own() {
    let env = TestEnv::new().await;
    let mut redis = PrivateRedis::start();
    let (org_id, key_id) = key_of_new_org(&env).await;
    let js = jetstream::new(env.nats.clone());
    env.topology.ensure_worker_side(&js).await.expect("topology");
    // One message a batch and one loop, so that a batch held up by Redis holds up all the others.
    let settings = [
        ("REDIS_URL", redis.url()),
        ("TOLLGATE_BATCH_WAIT", "20ms".into()),
        ("TOLLGATE_BATCH_MESSAGES", "1".into()),
        ("TOLLGATE_WORKER_TASKS", "1".into()),
    ];
    let worker = env.spawn_service("worker", NATS_URL, &settings);
    let subject = env.topology.usage_subject();
    let event = || vec![usage_event(org_id, key_id, Outcome::Allowed, 1)];
    let counter = quota_counter::key_at(&env.topology.redis_prefix, org_id, chrono::Utc::now());
    let client = redis::Client::open(redis.url()).expect("url");
    let units = || async {
        let mut connection = client.get_multiplexed_async_connection().await.expect("redis");
        redis::cmd("GET").arg(&counter).query_async::<Option<i64>>(&mut connection).await.expect("GET")
    };
    publish(&js, &subject, "m0".into(), event()).await;
    let first = wait_until(Duration::from_secs(20), units, |units| *units == Some(1)).await;
    assert_eq!(first, Some(1), "the first event's count, before Redis hangs");

    redis.pause();
    // Twenty commits, each a batch of its own: when each waited out Redis's response timeout (1 s) they took 20 s.
    let started = std::time::Instant::now();
    for i in 1..=20 {
        publish(&js, &subject, format!("m{i}"), event()).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    env.wait_for_count("SELECT count(*) FROM api_usage", 21).await;
    assert!(started.elapsed() < Duration::from_secs(8), "21 rows took {:?}", started.elapsed());

    // What the hung server held is lost with it; the new one starts empty.
    redis.stop();
    redis.restart();
    let caught_up = wait_until(Duration::from_secs(15), units, |units| *units == Some(21)).await;
    assert_eq!(caught_up, Some(21), "the counter once Redis answered again, with no batch since");
    // Stopped first: a running worker would make the streams that cleanup deletes again.
    drop(worker);
    env.cleanup().await;
}

/// A Redis that comes back empty after seconds away gets its counters back within a second, even when it comes back
/// just after the worker's latest attempt failed: until then each organization's quota counts from 0.
#[tokio::test]
async fn a_redis_back_after_seconds_away_gets_its_quota_counter_within_a_second() {
    let env = TestEnv::new().await;
    let mut redis = PrivateRedis::start();
    let (org_id, key_id) = key_of_new_org(&env).await;
    let js = jetstream::new(env.nats.clone());
    env.topology.ensure_worker_side(&js).await.expect("topology");
    let metrics_port = crate::servers::free_port();
    let settings = [
        ("REDIS_URL", redis.url()),
        ("TOLLGATE_BATCH_WAIT", "20ms".into()),
        ("TOLLGATE_METRICS_LISTEN", format!("127.0.0.1:{metrics_port}")),
    ];
    let worker = env.spawn_service("worker", NATS_URL, &settings);
    let subject = env.topology.usage_subject();
    let counter = quota_counter::key_at(&env.topology.redis_prefix, org_id, chrono::Utc::now());
    let client = redis::Client::open(redis.url()).expect("url");
    let units = || async {
        let mut connection = client.get_multiplexed_async_connection().await.ok()?;
        redis::cmd("GET").arg(&counter).query_async::<Option<i64>>(&mut connection).await.ok()?
    };
    let failed_attempts = || async {
        let text = reqwest::get(format!("http://127.0.0.1:{metrics_port}/metrics")).await.ok()?.text().await.ok()?;
        crate::harness::series_value(&text, "tollgate_quota_counter_errors_total")
    };
    publish(&js, &subject, "m1".into(), vec![usage_event(org_id, key_id, Outcome::Allowed, 1)]).await;
    assert_eq!(wait_until(Duration::from_secs(20), units, |u| *u == Some(1)).await, Some(1), "before Redis goes");

    redis.stop();
    publish(&js, &subject, "m2".into(), vec![usage_event(org_id, key_id, Outcome::Allowed, 1)]).await;
    env.wait_for_count("SELECT count(*) FROM api_usage", 2).await;
    // Long enough for the waits between the worker's attempts to have grown as far as they go.
    tokio::time::sleep(Duration::from_secs(7)).await;
    let before = failed_attempts().await.expect("the worker's error counter");
    let after = wait_until(Duration::from_secs(10), failed_attempts, |n| n.is_some_and(|n| n > before)).await;
    assert!(after > Some(before), "the worker kept trying: {before} failed attempts, then {after:?}");
    redis.restart();
    let back = std::time::Instant::now();
    let caught_up = wait_until(Duration::from_secs(10), units, |u| *u == Some(2)).await;
    assert_eq!(caught_up, Some(2), "the counter once Redis answered again, with no batch since");
    assert!(back.elapsed() < Duration::from_secs(1), "the counter came back {:?} after Redis", back.elapsed());
    drop(worker);
    env.cleanup().await;
}

/// A worker started while Redis is away writes usage to PostgreSQL all the same (Redis holds only the quota counters),
/// and brings its organization's counter up to PostgreSQL's total once Redis answers.
#[tokio::test]
async fn a_worker_started_while_redis_is_away_writes_usage_and_raises_the_quota_once_redis_answers() {
    let env = TestEnv::new().await;
    let mut redis = PrivateRedis::start();
    redis.stop();
    let (org_id, key_id) = key_of_new_org(&env).await;
    let js = jetstream::new(env.nats.clone());
    env.topology.ensure_worker_side(&js).await.expect("topology");
    let worker =
        env.spawn_service("worker", NATS_URL, &[("REDIS_URL", redis.url()), ("TOLLGATE_BATCH_WAIT", "20ms".into())]);
    let subject = env.topology.usage_subject();

    publish(&js, &subject, "m1".into(), vec![usage_event(org_id, key_id, Outcome::Allowed, 3)]).await;
    env.wait_for_count("SELECT count(*) FROM api_usage", 1).await;

    redis.restart();
    // The counter reaches PostgreSQL's total once the worker has connected (more events keep it moving).
    let counter = quota_counter::key_at(&env.topology.redis_prefix, org_id, chrono::Utc::now());
    let client = redis::Client::open(redis.url()).expect("url");
    let mut sent = 1;
    let (units, total) = wait_until(
        Duration::from_secs(30),
        || {
            sent += 1;
            let (js, subject, client, counter) = (js.clone(), subject.clone(), client.clone(), counter.clone());
            let env = &env;
            async move {
                let event = usage_event(org_id, key_id, Outcome::Allowed, 1);
                publish(&js, &subject, format!("m{sent}"), vec![event]).await;
                tokio::time::sleep(Duration::from_millis(300)).await;
                let units = match client.get_multiplexed_async_connection().await {
                    Ok(mut connection) => redis::cmd("GET").arg(&counter).query_async(&mut connection).await.ok(),
                    Err(_) => None,
                };
                (units.flatten(), env.count("SELECT sum(units) FROM billing_periods").await)
            }
        },
        |(units, total)| *units == Some(*total),
    )
    .await;
    assert_eq!(units, Some(total), "the counter holds PostgreSQL's total");
    assert!(total >= 4, "the 3 units written while Redis was away are in it: {total}");
    drop(worker);
    env.cleanup().await;
}
