//! The event pipeline's exactly-once and dead-letter behaviour, driven by publishing to the stream directly.

use async_nats::jetstream;
use chrono::Utc;
use uuid::Uuid;

use tollgate_shared::codec;
use tollgate_shared::domain::Outcome;
use tollgate_shared::event::UsageEvent;

use crate::harness::usage_event;
use crate::harness::TestEnv;

async fn publish(js: &jetstream::Context, subject: &str, message_id: &str, payload: Vec<u8>) {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(async_nats::header::NATS_MESSAGE_ID, message_id);
    js.publish_with_headers(subject.to_owned(), headers, payload.into()).await.expect("publish").await.expect("ack");
}

/// Waits until the usage stream holds no message: it drains (work-queue retention) once every message is acked.
async fn wait_until_drained(env: &TestEnv, js: &jetstream::Context) {
    let drained = crate::harness::wait_until(
        std::time::Duration::from_secs(10),
        || async { js.get_stream(&env.topology.stream).await.expect("stream").cached_info().state.messages },
        |n| *n == 0,
    )
    .await;
    assert_eq!(drained, 0, "messages left in the usage stream");
}

#[tokio::test]
async fn a_redelivered_event_leaves_one_row_and_a_count_of_one() {
    let env = TestEnv::new().await;
    let js = jetstream::new(env.nats.clone());
    env.topology.ensure_worker_side(&js).await.expect("topology");
    let subject = env.topology.usage_subject();
    let once = usage_event(Uuid::now_v7(), Uuid::now_v7(), Outcome::Allowed, 1);
    let payload = codec::encode_batch(vec![once.clone()]);

    // The same event: re-published under a new message id (JetStream keeps both), re-published under the same id
    // (JetStream drops it), and twice inside one message.
    publish(&js, &subject, "m1", payload.clone()).await;
    publish(&js, &subject, "m2", payload.clone()).await;
    publish(&js, &subject, "m1", payload).await;
    publish(&js, &subject, "m3", codec::encode_batch(vec![once.clone(), once.clone()])).await;
    let stream = js.get_stream(&env.topology.stream).await.expect("stream");
    assert_eq!(stream.cached_info().state.messages, 3, "JetStream dropped the duplicate message id");

    let worker = env.start_worker().await;
    env.wait_for_count("SELECT count(*) FROM api_usage", 1).await;
    wait_until_drained(&env, &js).await;
    assert_eq!(env.count("SELECT count(*) FROM api_usage").await, 1);
    assert_eq!(env.count("SELECT sum(allowed) FROM usage_hourly").await, 1);
    worker.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn garbage_goes_to_the_dead_letter_stream_and_the_next_event_is_written() {
    let env = TestEnv::new().await;
    let js = jetstream::new(env.nats.clone());
    env.topology.ensure_worker_side(&js).await.expect("topology");
    let subject = env.topology.usage_subject();

    publish(&js, &subject, "garbage", b"\x01this is not bincode".to_vec()).await;
    publish(&js, &subject, "future", b"\x63from a future version".to_vec()).await;
    let good = usage_event(Uuid::now_v7(), Uuid::now_v7(), Outcome::Allowed, 1);
    publish(&js, &subject, "good", codec::encode_batch(vec![good.clone()])).await;

    let worker = env.start_worker().await;
    env.wait_for_count("SELECT count(*) FROM api_usage", 1).await;
    let event_id: Uuid = sqlx::query_scalar("SELECT event_id FROM api_usage").fetch_one(&env.pool).await.expect("row");
    assert_eq!(event_id, good.event_id);

    let dead_letters = js.get_stream(env.topology.dead_letter_stream()).await.expect("dead-letter stream");
    assert_eq!(dead_letters.cached_info().state.messages, 2);
    let first = dead_letters.get_raw_message(1).await.expect("first dead letter");
    let reason = first.headers.get(tollgate_worker::REASON_HEADER).expect("reason header").to_string();
    assert!(reason.contains("undecodable"), "{reason}");
    assert_eq!(first.payload.as_ref(), b"\x01this is not bincode");
    let second = dead_letters.get_raw_message(2).await.expect("second dead letter");
    let reason = second.headers.get(tollgate_worker::REASON_HEADER).expect("reason header").to_string();
    assert!(reason.contains("unknown codec version 99"), "{reason}");

    worker.stop().await;
    env.cleanup().await;
}

/// A dead-letter stream an operator capped, once full, refuses the next dead letter rather than dropping its oldest:
/// a dead letter is the only copy of its message once the worker acks it. That message waits in the usage stream,
/// tried again after each ack wait, until there is room; the good messages behind it go on.
#[tokio::test]
async fn a_full_dead_letter_stream_drops_no_dead_letter_and_holds_up_nothing_else() {
    let env = TestEnv::new().await;
    let ack_wait = std::time::Duration::from_secs(2);
    env.short_ack_wait(ack_wait).await;
    let js = jetstream::new(env.nats.clone());
    env.topology.ensure_worker_side(&js).await.expect("topology");
    let mut capped = js.get_stream(env.topology.dead_letter_stream()).await.expect("dlq").cached_info().config.clone();
    capped.max_messages = 2;
    js.update_stream(capped.clone()).await.expect("the dead-letter stream capped");
    let subject = env.topology.usage_subject();
    for n in 1..=3 {
        publish(&js, &subject, &format!("garbage-{n}"), format!("\x01garbage {n}").into_bytes()).await;
    }
    let metrics_port = crate::servers::free_port();
    let settings = [("TOLLGATE_METRICS_LISTEN", format!("127.0.0.1:{metrics_port}"))];
    let worker = env.spawn_service("worker", crate::harness::NATS_URL, &settings);
    let dead_letters = || async {
        let state = js.get_stream(env.topology.dead_letter_stream()).await.expect("dlq").cached_info().state.clone();
        (state.first_sequence, state.messages)
    };
    let stored = crate::harness::wait_until(std::time::Duration::from_secs(10), dead_letters, |s| s.1 == 2).await;
    assert_eq!(stored, (1, 2));

    // Good events after it are written and acked, several times over the ack wait.
    for n in 1..=3 {
        let good = usage_event(Uuid::now_v7(), Uuid::now_v7(), Outcome::Allowed, 1);
        publish(&js, &subject, &format!("good-{n}"), codec::encode_batch(vec![good])).await;
        env.wait_for_count("SELECT count(*) FROM api_usage", n).await;
        tokio::time::sleep(ack_wait / 2).await;
    }
    assert_eq!(dead_letters().await, (1, 2), "no dead letter dropped");
    let waiting = || async { js.get_stream(&env.topology.stream).await.expect("stream").cached_info().state.messages };
    let left = crate::harness::wait_until(std::time::Duration::from_secs(5), waiting, |n| *n == 1).await;
    assert_eq!(left, 1, "only the third garbage message waits in the usage stream");
    let exposition = reqwest::get(format!("http://127.0.0.1:{metrics_port}/metrics")).await.expect("scrape");
    let refused =
        crate::harness::series_value(&exposition.text().await.expect("text"), "tollgate_dead_letters_refused_total");
    assert!(refused.is_some_and(|n| n >= 1.0), "the refusal is counted: {refused:?}");

    capped.max_messages = -1;
    js.update_stream(capped).await.expect("the cap raised");
    wait_until_drained(&env, &js).await;
    assert_eq!(dead_letters().await, (1, 3));
    drop(worker); // stopped before its namespace is removed
    env.cleanup().await;
}

/// A message holding one impossible event among good ones (a publisher with a bug, say): the good ones are written,
/// and the message is dead-lettered whole with the reason; replayed, it writes nothing twice.
#[tokio::test]
async fn an_impossible_event_does_not_take_the_others_of_its_message_with_it() {
    let env = TestEnv::new().await;
    let js = jetstream::new(env.nats.clone());
    env.topology.ensure_worker_side(&js).await.expect("topology");
    let (org, key) = (Uuid::now_v7(), Uuid::now_v7());
    let good = || usage_event(org, key, Outcome::Allowed, 1);
    let impossible = UsageEvent { units: 0, ..good() };
    let message = codec::encode_batch(vec![good(), impossible, good()]);
    publish(&js, &env.topology.usage_subject(), "mixed", message.clone()).await;

    let worker = env.start_worker().await;
    env.wait_for_count("SELECT count(*) FROM api_usage", 2).await;
    let dead_letters = || async {
        js.get_stream(env.topology.dead_letter_stream()).await.expect("dlq").info().await.expect("info").state.clone()
    };
    let state = crate::harness::wait_until(std::time::Duration::from_secs(10), dead_letters, |s| s.messages == 1).await;
    assert_eq!(state.messages, 1);
    let stream = js.get_stream(env.topology.dead_letter_stream()).await.expect("dlq");
    let letter = stream.get_raw_message(state.last_sequence).await.expect("the dead letter");
    let reason = letter.headers.get(tollgate_worker::REASON_HEADER).expect("reason header").to_string();
    assert!(reason.contains("units out of range"), "{reason}");
    assert_eq!(letter.payload.as_ref(), message.as_slice(), "the message whole");

    // Replayed (as an operator would, once a worker can read it): the good events are there already.
    let replayed =
        tollgate_worker::dlq::replay(&js, &env.topology, tollgate_worker::dlq::Selection::All).await.expect("replay");
    assert_eq!(replayed.len(), 1);
    let again =
        crate::harness::wait_until(std::time::Duration::from_secs(10), dead_letters, |s| s.last_sequence > 1).await;
    assert_eq!(again.messages, 1, "dead-lettered again, being no more possible than before");
    assert_eq!(env.count("SELECT count(*) FROM api_usage").await, 2);
    assert_eq!(env.count("SELECT sum(allowed) FROM usage_hourly").await, 2);
    worker.stop().await;
    env.cleanup().await;
}

/// A month's partition dropped while a worker runs (by an operator, or retention) comes back with the next event
/// of that month, instead of that event failing its batch for ever on what the worker remembered.
#[tokio::test]
async fn a_dropped_partition_is_made_again_for_a_late_event() {
    let env = TestEnv::new().await;
    let js = jetstream::new(env.nats.clone());
    env.topology.ensure_worker_side(&js).await.expect("topology");
    let subject = env.topology.usage_subject();
    let months_ago = |n: i64| UsageEvent {
        ts: chrono::Utc::now() - chrono::TimeDelta::days(n * 31),
        ..usage_event(Uuid::now_v7(), Uuid::now_v7(), Outcome::Allowed, 1)
    };
    let worker = env.start_worker().await;
    let first = months_ago(3);
    publish(&js, &subject, "first", codec::encode_batch(vec![first.clone()])).await;
    env.wait_for_count("SELECT count(*) FROM api_usage", 1).await;
    // Its month's partition only: none is made ahead of a past month (it could re-attach one detached for archiving).
    let month = chrono::Datelike::with_day(&first.ts.date_naive(), 1).expect("the first of the month");
    let after = (month + chrono::Months::new(1)).format("api_usage_%Y_%m");
    assert_eq!(env.count(&format!("SELECT count(*) FROM pg_class WHERE relname = '{after}'")).await, 0);

    let partition = format!("api_usage_{}", first.ts.format("%Y_%m"));
    sqlx::query(&format!("DROP TABLE {partition}")).execute(&env.pool).await.expect("drop the partition");
    publish(&js, &subject, "late", codec::encode_batch(vec![months_ago(3)])).await;
    env.wait_for_count_within("SELECT count(*) FROM api_usage", 1, std::time::Duration::from_secs(20)).await;
    let made_again = format!("SELECT count(*) FROM pg_inherits WHERE inhrelid = to_regclass('{partition}')");
    assert_eq!(env.count(&made_again).await, 1);

    worker.stop().await;
    env.cleanup().await;
}

/// `name`, the partition of `ts`'s month (UTC) made by hand, as an operator would: no unique index on `event_id`.
async fn partition_by_hand(env: &TestEnv, name: &str, ts: chrono::DateTime<Utc>) {
    let month = ts.format("%Y-%m-01");
    let sql = format!(
        "CREATE TABLE {name} PARTITION OF api_usage FOR VALUES FROM ('{month} 00:00+00') TO \
         (('{month}'::date + interval '1 month')::timestamp AT TIME ZONE 'UTC')"
    );
    sqlx::query(&sql).execute(&env.pool).await.expect("a partition made by hand");
}

/// A month's partition made by hand (`CREATE TABLE ... PARTITION OF`) lacks the unique index on `event_id`, the
/// one thing that makes a re-delivered event a no-op: the worker gives it one before writing to it.
#[tokio::test]
async fn a_partition_made_by_hand_gets_the_unique_index_that_keeps_events_once() {
    let env = TestEnv::new().await;
    let js = jetstream::new(env.nats.clone());
    env.topology.ensure_worker_side(&js).await.expect("topology");
    let subject = env.topology.usage_subject();
    let event = UsageEvent {
        ts: Utc::now() - chrono::TimeDelta::days(95),
        ..usage_event(Uuid::now_v7(), Uuid::now_v7(), Outcome::Allowed, 1)
    };
    // Under the name the worker gives a month's partition.
    let partition = format!("api_usage_{}", event.ts.format("%Y_%m"));
    partition_by_hand(&env, &partition, event.ts).await;

    let payload = codec::encode_batch(vec![event]);
    let worker = env.start_worker().await;
    publish(&js, &subject, "first", payload.clone()).await;
    env.wait_for_count(&format!("SELECT count(*) FROM {partition}"), 1).await;
    // Again under another message id, in a batch of its own: only the index can tell it is the same event.
    publish(&js, &subject, "again", payload).await;
    wait_until_drained(&env, &js).await;
    assert_eq!(env.count(&format!("SELECT count(*) FROM {partition}")).await, 1);
    assert_eq!(env.count("SELECT sum(allowed) FROM usage_hourly").await, 1);
    worker.stop().await;
    env.cleanup().await;
}

/// A partition that went without the index and holds an event twice cannot be given it: the worker's error says
/// so and what to do, rather than PostgreSQL's bare complaint about a duplicate key at every batch.
#[tokio::test]
async fn a_partition_holding_an_event_twice_is_named_with_what_to_do() {
    let env = TestEnv::new().await;
    let ts = Utc::now() - chrono::TimeDelta::days(95);
    partition_by_hand(&env, "doubled", ts).await;
    let twice = "INSERT INTO api_usage (event_id, ts, org_id, key_id, latency_us, outcome, method, path) \
                 SELECT $1, $2, $1, $1, 1, 'allowed', 'GET', '/' FROM generate_series(1, 2)";
    sqlx::query(twice).bind(Uuid::now_v7()).bind(ts).execute(&env.pool).await.expect("an event twice");

    let error = sqlx::query("SELECT tollgate_ensure_usage_partition($1)")
        .bind(ts)
        .execute(&env.pool)
        .await
        .expect_err("no unique index over an event held twice");
    let message = error.to_string();
    assert!(message.contains("usage partition doubled has no unique index on event_id"), "{message}");
    assert!(message.contains("keep one row per event_id"), "{message}");
    env.cleanup().await;
}

/// A month's partition attached under another name (archived under a new name and attached again) is the month's
/// partition: the worker writes to it, where attaching one of the usual name failed every batch of that month.
#[tokio::test]
async fn a_partition_attached_under_another_name_takes_its_months_events() {
    let env = TestEnv::new().await;
    let js = jetstream::new(env.nats.clone());
    env.topology.ensure_worker_side(&js).await.expect("topology");
    let subject = env.topology.usage_subject();
    let event = UsageEvent {
        ts: Utc::now() - chrono::TimeDelta::days(95),
        ..usage_event(Uuid::now_v7(), Uuid::now_v7(), Outcome::Allowed, 1)
    };
    let partition: String = sqlx::query_scalar("SELECT tollgate_ensure_usage_partition($1)")
        .bind(event.ts)
        .fetch_one(&env.pool)
        .await
        .expect("the month's partition");
    let bounds: String = sqlx::query_scalar(&format!(
        "SELECT pg_get_expr(relpartbound, oid) FROM pg_class WHERE oid = '{partition}'::regclass"
    ))
    .fetch_one(&env.pool)
    .await
    .expect("its bounds");
    for step in [
        format!("ALTER TABLE api_usage DETACH PARTITION {partition}"),
        format!("ALTER TABLE {partition} RENAME TO archived"),
        format!("ALTER TABLE api_usage ATTACH PARTITION archived {bounds}"),
    ] {
        sqlx::query(&step).execute(&env.pool).await.expect(&step);
    }

    let worker = env.start_worker().await;
    publish(&js, &subject, "late", codec::encode_batch(vec![event])).await;
    env.wait_for_count("SELECT count(*) FROM archived", 1).await;
    worker.stop().await;
    env.cleanup().await;
}

/// A message near NATS's 1 MiB limit could not be dead-lettered (its copy adds headers), and would hold up its
/// worker for good: the usage stream refuses it, and dead-letters the largest it takes.
#[tokio::test]
async fn the_usage_stream_takes_no_message_too_large_to_dead_letter_and_keeps_dead_letters() {
    let env = TestEnv::new().await;
    let js = jetstream::new(env.nats.clone());
    env.topology.ensure_worker_side(&js).await.expect("topology");
    let subject = env.topology.usage_subject();
    let largest = js.get_stream(&env.topology.stream).await.expect("stream").cached_info().config.max_message_size;
    let largest = usize::try_from(largest).expect("a limit is set");
    let garbage = |size: usize| vec![0xff_u8; size];

    let refused = js.publish(subject.clone(), garbage(largest + 1).into()).await.expect("sent").await;
    assert!(refused.is_err(), "the stream took a message of {} bytes", largest + 1);
    // With its message id header, within the limit.
    publish(&js, &subject, "large", garbage(largest - 100)).await;
    let good = usage_event(Uuid::now_v7(), Uuid::now_v7(), Outcome::Allowed, 1);
    publish(&js, &subject, "good", codec::encode_batch(vec![good])).await;

    let worker = env.start_worker().await;
    env.wait_for_count("SELECT count(*) FROM api_usage", 1).await;
    let dead_letters = js.get_stream(env.topology.dead_letter_stream()).await.expect("dead-letter stream");
    let letter = dead_letters.get_raw_message(1).await.expect("the large message, dead-lettered");
    assert_eq!(letter.payload.len(), largest - 100);
    // Dead letters wait for an operator however long it takes: no age limit.
    assert_eq!(dead_letters.cached_info().config.max_age, std::time::Duration::ZERO);

    worker.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_deleted_dead_letter_stream_is_created_again_and_holds_up_nothing() {
    let env = TestEnv::new().await;
    let js = jetstream::new(env.nats.clone());
    env.topology.ensure_worker_side(&js).await.expect("topology");
    let worker = env.start_worker().await;
    let subject = env.topology.usage_subject();
    let event = || usage_event(Uuid::now_v7(), Uuid::now_v7(), Outcome::Allowed, 1);
    publish(&js, &subject, "before", codec::encode_batch(vec![event()])).await;
    env.wait_for_count("SELECT count(*) FROM api_usage", 1).await;

    // Deleted by hand (or NATS restarted without its storage) while the worker runs.
    js.delete_stream(env.topology.dead_letter_stream()).await.expect("delete the dead-letter stream");
    publish(&js, &subject, "garbage", b"\x01this is not bincode".to_vec()).await;
    publish(&js, &subject, "after", codec::encode_batch(vec![event()])).await;
    env.wait_for_count("SELECT count(*) FROM api_usage", 2).await;
    let dead_letters = crate::harness::wait_until(
        std::time::Duration::from_secs(10),
        || async {
            match js.get_stream(env.topology.dead_letter_stream()).await {
                Ok(stream) => stream.cached_info().state.messages,
                Err(_) => 0,
            }
        },
        |n| *n == 1,
    )
    .await;
    assert_eq!(dead_letters, 1, "the garbage is in the dead-letter stream again");
    // Nothing is held: the stream drains, and a later event is written at once.
    publish(&js, &subject, "later", codec::encode_batch(vec![event()])).await;
    env.wait_for_count("SELECT count(*) FROM api_usage", 3).await;
    let stream = js.get_stream(&env.topology.stream).await.expect("usage stream");
    let left = crate::harness::wait_until(
        std::time::Duration::from_secs(10),
        || async { stream.clone().info().await.map(|i| i.state.messages).unwrap_or(u64::MAX) },
        |n| *n == 0,
    )
    .await;
    assert_eq!(left, 0, "every message was acked");

    worker.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_new_months_partition_is_made_while_an_idle_transaction_holds_api_usage_and_the_next_one_ahead() {
    let env = TestEnv::new().await;
    let js = jetstream::new(env.nats.clone());
    env.topology.ensure_worker_side(&js).await.expect("topology");
    // An analyst's session left idle in a transaction that read the table.
    let mut idle = env.pool.begin().await.expect("begin");
    sqlx::query("SELECT 1 FROM api_usage LIMIT 1").execute(&mut *idle).await.expect("read api_usage");
    let worker = env.start_worker().await;

    // A month no partition exists for yet (the migrations make this month's and the next).
    let ahead = Utc::now() + chrono::Months::new(3);
    let event = UsageEvent { ts: ahead, ..usage_event(Uuid::now_v7(), Uuid::now_v7(), Outcome::Allowed, 1) };
    publish(&js, &env.topology.usage_subject(), "ahead", codec::encode_batch(vec![event])).await;
    // Bounded: a partition waiting for the idle transaction's lock would make this query wait behind it too.
    let written = env.wait_for_count_within("SELECT count(*) FROM api_usage", 1, std::time::Duration::from_secs(10));
    tokio::time::timeout(std::time::Duration::from_secs(15), written).await.expect("the event is written at once");
    let partitions: Vec<String> = sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
         WHERE i.inhparent = 'api_usage'::regclass ORDER BY 1",
    )
    .fetch_all(&env.pool)
    .await
    .expect("partitions");
    let name = |at: chrono::DateTime<Utc>| at.format("api_usage_%Y_%m").to_string();
    assert!(partitions.contains(&name(ahead)), "{partitions:?}");
    assert!(partitions.contains(&name(ahead + chrono::Months::new(1))), "the next month's, ahead: {partitions:?}");

    idle.rollback().await.expect("rollback");
    worker.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_partition_that_cannot_be_made_ahead_holds_up_one_batch_not_every_one() {
    let env = TestEnv::new().await;
    let js = jetstream::new(env.nats.clone());
    env.topology.ensure_worker_side(&js).await.expect("topology");
    let ahead = Utc::now() + chrono::Months::new(3);
    sqlx::query("SELECT tollgate_ensure_usage_partition($1)").bind(ahead).execute(&env.pool).await.expect("partition");
    // A lock that attaching a partition waits for (a manual ANALYZE or CREATE INDEX takes it too).
    let mut holder = env.pool.begin().await.expect("begin");
    sqlx::query("LOCK TABLE api_usage IN SHARE UPDATE EXCLUSIVE MODE").execute(&mut *holder).await.expect("lock");
    let worker = env.start_worker().await;

    // Batches of that month, one after another: the first waits out the attempt at the month after (5 s).
    let started = std::time::Instant::now();
    for n in 1..=3 {
        let event = UsageEvent { ts: ahead, ..usage_event(Uuid::now_v7(), Uuid::now_v7(), Outcome::Allowed, 1) };
        publish(&js, &env.topology.usage_subject(), &format!("m{n}"), codec::encode_batch(vec![event])).await;
        env.wait_for_count_within("SELECT count(*) FROM api_usage", n, std::time::Duration::from_secs(10)).await;
    }
    let took = started.elapsed();
    assert!(took < std::time::Duration::from_secs(9), "each batch waited for the lock: {took:?}");

    holder.rollback().await.expect("rollback");
    worker.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn the_partition_function_cuts_months_in_utc_whatever_the_sessions_time_zone() {
    let env = TestEnv::new().await;
    let mut session = env.pool.acquire().await.expect("connection");
    sqlx::query("SET TIME ZONE 'America/Los_Angeles'").execute(&mut *session).await.expect("time zone");
    let made: String = sqlx::query_scalar("SELECT tollgate_ensure_usage_partition('2031-03-15T12:00:00Z')")
        .fetch_one(&mut *session)
        .await
        .expect("partition");
    assert_eq!(made, "api_usage_2031_03");
    sqlx::query("RESET TIME ZONE").execute(&mut *session).await.expect("reset");
    drop(session);
    let bounds: String = sqlx::query_scalar(
        "SELECT pg_get_expr(c.relpartbound, c.oid) FROM pg_class c WHERE c.relname = 'api_usage_2031_03'",
    )
    .fetch_one(&env.pool)
    .await
    .expect("bounds");
    assert_eq!(bounds, "FOR VALUES FROM ('2031-03-01 00:00:00+00') TO ('2031-04-01 00:00:00+00')");
    env.cleanup().await;
}

#[tokio::test]
async fn the_outcome_enum_in_postgresql_lists_every_outcome_the_code_has() {
    let env = TestEnv::new().await;
    let labels: Vec<String> = sqlx::query_scalar("SELECT unnest(enum_range(NULL::usage_outcome))::text")
        .fetch_all(&env.pool)
        .await
        .expect("enum labels");
    let code: Vec<&str> = Outcome::ALL.iter().map(|o| o.as_str()).collect();
    assert_eq!(labels, code, "a new Outcome needs `ALTER TYPE usage_outcome ADD VALUE` in a migration");
    env.cleanup().await;
}

#[tokio::test]
async fn user_agents_are_stored_once_and_read_back_through_their_id() {
    let env = TestEnv::new().await;
    let js = jetstream::new(env.nats.clone());
    env.topology.ensure_worker_side(&js).await.expect("topology");
    let (org, key) = (Uuid::now_v7(), Uuid::now_v7());
    let with = |ua: Option<&str>| UsageEvent {
        user_agent: ua.map(str::to_owned),
        ..usage_event(org, key, Outcome::Allowed, 1)
    };
    let events = vec![with(Some("sdk/1.0")), with(Some("sdk/1.0")), with(None), with(Some("curl/8.5.0"))];
    publish(&js, &env.topology.usage_subject(), "m1", codec::encode_batch(events.clone())).await;
    // A second message repeating a string: still one row in user_agents.
    publish(&js, &env.topology.usage_subject(), "m2", codec::encode_batch(vec![with(Some("curl/8.5.0"))])).await;

    let worker = env.start_worker().await;
    env.wait_for_count("SELECT count(*) FROM api_usage", 5).await;
    let read: Vec<(Uuid, Option<String>)> = sqlx::query_as(
        "SELECT u.event_id, a.user_agent FROM api_usage u LEFT JOIN user_agents a ON a.id = u.user_agent_id",
    )
    .fetch_all(&env.pool)
    .await
    .expect("rows");
    for event in &events {
        let stored = read.iter().find(|(id, _)| *id == event.event_id).map(|(_, ua)| ua.clone());
        assert_eq!(stored, Some(event.user_agent.clone()), "event {}", event.event_id);
    }
    assert_eq!(env.count("SELECT count(*) FROM user_agents").await, 2);
    worker.stop().await;

    // A worker that does not remember them (a restart) asks for known strings again: no id is used up by that.
    let last_id = "SELECT last_value FROM user_agents_id_seq";
    let before = env.count(last_id).await;
    let worker = env.start_worker().await;
    publish(&js, &env.topology.usage_subject(), "m3", codec::encode_batch(vec![with(Some("sdk/1.0"))])).await;
    env.wait_for_count("SELECT count(*) FROM api_usage", 6).await;
    assert_eq!(env.count(last_id).await, before, "ids of the 32-bit sequence used up for strings already there");

    // The table is full (as many ids handed out as it may hold): a new string is recorded as none, a known one as
    // before, and the batch goes through.
    let full = format!("SELECT setval('user_agents_id_seq', {})", tollgate_worker::USER_AGENTS_STORED_MAX);
    sqlx::query(&full).execute(&env.pool).await.expect("setval");
    let (new, known) = (with(Some("made-up/42")), with(Some("curl/8.5.0")));
    publish(&js, &env.topology.usage_subject(), "m4", codec::encode_batch(vec![new.clone(), known.clone()])).await;
    env.wait_for_count("SELECT count(*) FROM api_usage", 8).await;
    let stored = |id: Uuid| {
        let sql = "SELECT a.user_agent FROM api_usage u LEFT JOIN user_agents a ON a.id = u.user_agent_id WHERE u.event_id = $1";
        let pool = env.pool.clone();
        async move { sqlx::query_scalar::<_, Option<String>>(sql).bind(id).fetch_one(&pool).await.expect("row") }
    };
    assert_eq!(stored(new.event_id).await, None);
    assert_eq!(stored(known.event_id).await, Some("curl/8.5.0".to_owned()));
    assert_eq!(env.count("SELECT count(*) FROM user_agents").await, 2);
    worker.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_consumer_that_refuses_the_workers_pulls_is_asked_again_after_a_pause_not_at_once() {
    use futures::StreamExt;
    let env = TestEnv::new().await;
    // An operator's edit the workers keep: pulls that wait longer than 1 ms are refused (409) by the server.
    env.workers_consumer_with(|config| config.max_expires = std::time::Duration::from_millis(1)).await;
    let pulls_subject =
        format!("$JS.API.CONSUMER.MSG.NEXT.{}.{}", env.topology.stream, env.topology.workers_consumer());
    let mut pulls = env.nats.subscribe(pulls_subject).await.expect("watch the pulls");

    let worker = env.start_worker().await;
    // Each refused pull is one request on this subject; a worker pausing 100 ms after each makes at most 20 in 2 s
    // from its first, and keeps asking.
    tokio::time::timeout(std::time::Duration::from_secs(10), pulls.next()).await.expect("a first pull");
    let until = tokio::time::Instant::now() + std::time::Duration::from_secs(2);
    let mut seen = 0;
    while let Ok(Some(_)) = tokio::time::timeout_at(until, pulls.next()).await {
        seen += 1;
    }
    assert!((2..=25).contains(&seen), "{seen} pulls in 2 s");
    worker.stop().await;
    env.cleanup().await;
}

/// A consumer edited to hand out at most one message a pull: the workers ask for no more, and consume. (They read the
/// consumer again every 5 s, for an edit made while they run; nats-server 2.9 keeps enforcing the limit a consumer was
/// created with, so only an edit made before they start is tested here.)
#[tokio::test]
async fn a_consumer_allowing_smaller_pulls_is_asked_for_no_more_than_it_allows() {
    let env = TestEnv::new().await;
    let js = jetstream::new(env.nats.clone());
    env.workers_consumer_with(|config| config.max_batch = 1).await;
    let worker = env.start_worker().await;
    for n in 0..3 {
        let event = usage_event(Uuid::now_v7(), Uuid::now_v7(), Outcome::Allowed, 1);
        publish(&js, &env.topology.usage_subject(), &format!("m{n}"), codec::encode_batch(vec![event])).await;
    }
    env.wait_for_count("SELECT count(*) FROM api_usage", 3).await;
    worker.stop().await;
    env.cleanup().await;
}

/// The log of a worker started on `env`, once it consumes.
async fn worker_log_once_consuming(env: &TestEnv) -> (String, crate::harness::ServiceProcess) {
    let log = tempfile::NamedTempFile::new().expect("a log file");
    let settings = [("RUST_LOG", "info".to_owned())];
    let worker =
        env.spawn_service_logging("worker", crate::harness::NATS_URL, &settings, log.reopen().expect("log").into());
    let read = || async { std::fs::read_to_string(log.path()).expect("the log") };
    let said = crate::harness::wait_until(std::time::Duration::from_secs(20), read, |l| l.contains("worker consuming"));
    (said.await, worker)
}

#[tokio::test]
async fn a_stream_or_consumer_not_as_defined_is_warned_of_and_left_as_it_is() {
    let drift = "is not as nats/*.json defines it";
    // As the worker makes them itself: nothing to say.
    let env = TestEnv::new().await;
    let (said, worker) = worker_log_once_consuming(&env).await;
    assert!(said.contains("worker consuming") && !said.contains(drift), "{said}");
    drop(worker);
    env.cleanup().await;

    // Made by hand, otherwise.
    let env = TestEnv::new().await;
    let js = jetstream::new(env.nats.clone());
    let stream = js
        .create_stream(jetstream::stream::Config {
            name: env.topology.stream.clone(),
            subjects: vec![env.topology.usage_filter()],
            duplicate_window: std::time::Duration::from_secs(10),
            ..Default::default()
        })
        .await
        .expect("a stream of limits retention");
    env.workers_consumer_with(|config| config.max_deliver = 5).await;
    let (said, worker) = worker_log_once_consuming(&env).await;
    for difference in [
        "retention is \"limits\" rather than \"workqueue\"",
        "duplicate_window is 10000000000 rather than 120000000000",
        "max_deliver is 5 rather than -1",
    ] {
        assert!(said.contains(difference), "{difference}: {said}");
    }
    assert!(said.contains(&format!("stream {} {drift}", env.topology.stream)), "{said}");
    drop(worker);
    let info = js.get_stream(stream.cached_info().config.name.clone()).await.expect("stream").cached_info().clone();
    assert_eq!(info.config.retention, jetstream::stream::RetentionPolicy::Limits, "left as it was");
    env.cleanup().await;
}
