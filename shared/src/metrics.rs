//! Every metric Tollgate exports: names, help texts and histogram buckets in one place, and the `/metrics` endpoint.
//! Labels are bounded (outcomes, never key or organization ids).

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use metrics::{Counter, Label};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;

use crate::config::ConnectionArgs;

pub const VERIFY_REQUESTS: &str = "tollgate_verify_requests_total";
pub const VERIFY_DURATION: &str = "tollgate_verify_duration_seconds";
pub const KEY_LOOKUPS: &str = "tollgate_key_lookups_total";
pub const KEY_REFRESH_AGE: &str = "tollgate_key_refresh_age_seconds";
pub const EVENTS_PUBLISHED: &str = "tollgate_events_published_total";
pub const EVENTS_PUBLISH_ERRORS: &str = "tollgate_events_publish_errors_total";
pub const EVENT_QUEUE_DEPTH: &str = "tollgate_event_queue_depth";
pub const EVENT_QUEUE_FULL: &str = "tollgate_event_queue_full_total";
pub const USAGE_ROWS_WRITTEN: &str = "tollgate_usage_rows_written_total";
pub const USAGE_DUPLICATES: &str = "tollgate_usage_duplicates_total";
pub const WORKER_BATCH_SIZE: &str = "tollgate_worker_batch_size";
pub const WORKER_BATCH_DURATION: &str = "tollgate_worker_batch_duration_seconds";
pub const WORKER_BATCH_ERRORS: &str = "tollgate_worker_batch_errors_total";
pub const DEAD_LETTERS: &str = "tollgate_dead_letters_total";
pub const DEAD_LETTERS_REFUSED: &str = "tollgate_dead_letters_refused_total";
pub const WORKER_LAG: &str = "tollgate_worker_lag_seconds";
pub const CONSUMER_PENDING: &str = "tollgate_consumer_pending_messages";
pub const CONSUMER_ACK_PENDING: &str = "tollgate_consumer_ack_pending_messages";
pub const QUOTA_COUNTER_ERRORS: &str = "tollgate_quota_counter_errors_total";
pub const QUOTA_DRIFT: &str = "tollgate_quota_drift_units";
pub const SPOOL_BYTES: &str = "tollgate_spool_bytes";
pub const SPOOL_SEGMENTS: &str = "tollgate_spool_segments";
pub const SPOOL_CORRUPT_RECORDS: &str = "tollgate_spool_corrupt_records_total";
pub const PUBLISH_DURATION: &str = "tollgate_publish_duration_seconds";
pub const PUBLISH_RETRIES: &str = "tollgate_publish_retries_total";
pub const EVENTS_SPOOLED: &str = "tollgate_events_spooled_total";
pub const EVENTS_REPLAYED: &str = "tollgate_events_replayed_total";
pub const EVENTS_DROPPED: &str = "tollgate_events_dropped_total";
pub const EVENTS_REJECTED: &str = "tollgate_events_rejected_total";
pub const RATELIMIT_DECISIONS: &str = "tollgate_ratelimit_decisions_total";
pub const RATELIMIT_SHADOW_DENIALS: &str = "tollgate_ratelimit_shadow_denials_total";
pub const RATELIMIT_DEGRADED: &str = "tollgate_ratelimit_degraded_total";
pub const RATELIMIT_REDIS_DURATION: &str = "tollgate_ratelimit_redis_duration_seconds";
pub const RATELIMIT_REDIS_ERRORS: &str = "tollgate_ratelimit_redis_errors_total";
pub const RATELIMIT_BREAKER_OPEN: &str = "tollgate_ratelimit_breaker_open";
pub const IP_FAILURES_LIMITED: &str = "tollgate_ip_failures_limited_total";
pub const HTTP_CONNECTIONS: &str = "tollgate_http_connections";

/// Latency buckets from 10 µs: the validator answers in well under a millisecond.
const FAST_BUCKETS: &[f64] =
    &[0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0];
const BATCH_DURATION_BUCKETS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];
const LAG_BUCKETS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0];
const BATCH_SIZE_BUCKETS: &[f64] = &[1.0, 10.0, 50.0, 100.0, 500.0, 1000.0, 5000.0, 10000.0, 50000.0];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide recorder once (later calls return the same handle) and describes every metric.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(VERIFY_DURATION.into()), FAST_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Full(WORKER_BATCH_DURATION.into()), BATCH_DURATION_BUCKETS)
                })
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full(WORKER_BATCH_SIZE.into()), BATCH_SIZE_BUCKETS))
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full(WORKER_LAG.into()), LAG_BUCKETS))
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full(PUBLISH_DURATION.into()), BATCH_DURATION_BUCKETS))
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full(RATELIMIT_REDIS_DURATION.into()), FAST_BUCKETS))
                .expect("bucket lists are non-empty constants")
                .install_recorder()
                .expect("no other metrics recorder is installed in this process");
            describe();
            handle
        })
        .clone()
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        VERIFY_REQUESTS,
        "Verify requests, by outcome (including missing/malformed/unknown keys, and invalid_request: refused unread)."
    );
    describe_histogram!(VERIFY_DURATION, Unit::Seconds, "Time to decide a verify request.");
    describe_counter!(
        KEY_LOOKUPS,
        "Key lookups, by source: cache, negative_cache, database; and recheck, a cached key read again in the background."
    );
    describe_gauge!(
        KEY_REFRESH_AGE,
        Unit::Seconds,
        "Time since the key cache's refresher last heard from PostgreSQL (while it fails, keys not cached get 503)."
    );
    describe_counter!(EVENTS_PUBLISHED, "Usage events acknowledged by JetStream.");
    describe_counter!(EVENTS_PUBLISH_ERRORS, "Failed publish attempts of usage batches (each is retried).");
    describe_gauge!(EVENT_QUEUE_DEPTH, "Usage events waiting in the validator's queue for the publisher.");
    describe_counter!(EVENT_QUEUE_FULL, "Verify requests that had to wait because the event queue was full.");
    describe_counter!(USAGE_ROWS_WRITTEN, "Rows inserted into api_usage.");
    describe_counter!(
        USAGE_DUPLICATES,
        "Events that changed nothing: already in api_usage (re-delivered), or repeated within a batch."
    );
    describe_histogram!(WORKER_BATCH_SIZE, "Events per batch written by a worker.");
    describe_histogram!(WORKER_BATCH_DURATION, Unit::Seconds, "Time to write and commit one batch.");
    describe_counter!(WORKER_BATCH_ERRORS, "Batches that failed to commit and will be retried.");
    describe_counter!(DEAD_LETTERS, "Messages moved to the dead-letter stream, by reason.");
    describe_counter!(
        DEAD_LETTERS_REFUSED,
        "Undecodable messages the dead-letter stream refused (full, or away): each stays unacked in the usage stream \
         and is tried again after the ack wait."
    );
    describe_histogram!(WORKER_LAG, Unit::Seconds, "Time from an event's decision to the commit of its batch.");
    describe_gauge!(CONSUMER_PENDING, "Messages in the usage stream not yet delivered to any worker.");
    describe_gauge!(CONSUMER_ACK_PENDING, "Messages delivered to workers and not yet acknowledged.");
    describe_counter!(
        QUOTA_COUNTER_ERRORS,
        "Failed attempts to raise the Redis quota counters (retried until Redis answers)."
    );
    describe_gauge!(
        QUOTA_DRIFT,
        "Units by which this month's Redis quota counters differ from PostgreSQL (the worker's check, once a minute)."
    );
    describe_gauge!(SPOOL_BYTES, Unit::Bytes, "Bytes of usage messages in the validator's disk spool.");
    describe_gauge!(SPOOL_SEGMENTS, "Segment files in the validator's disk spool.");
    describe_counter!(
        SPOOL_CORRUPT_RECORDS,
        "Spool records skipped on replay (torn tails, checksum failures) and segments set aside (unreadable, undeletable)."
    );
    describe_histogram!(PUBLISH_DURATION, Unit::Seconds, "Time from publishing a usage message to its JetStream ack.");
    describe_counter!(PUBLISH_RETRIES, "Publish attempts of spooled messages made after a failed attempt.");
    describe_counter!(EVENTS_SPOOLED, "Usage events written to the disk spool because NATS was unreachable or slow.");
    describe_counter!(EVENTS_REPLAYED, "Spooled usage events acknowledged by JetStream.");
    describe_counter!(
        EVENTS_DROPPED,
        "Usage events lost: the spool full (or failing to write) under policy `drop`, shutdown with NATS away and the \
         spool full, or a spooled message too large for NATS that cannot be cut."
    );
    describe_counter!(EVENTS_REJECTED, "Verifies answered 503 because the spool was full and its policy is `block`.");
    describe_counter!(
        RATELIMIT_DECISIONS,
        "Rate-limit decisions by the limit that decided (key, tier, org, quota, ip; none when no limit applies) \
         and result (allowed, denied; unavailable when Redis could not decide and a limit's policy is closed)."
    );
    describe_counter!(RATELIMIT_SHADOW_DENIALS, "Requests a shadow-mode limit would have denied, by limit kind.");
    describe_counter!(
        RATELIMIT_DEGRADED,
        "Rate-limit decisions taken without Redis (timeout, error or open breaker), once each, by the policy that decided: \
         closed if any of its limits is, else local if any is, else open."
    );
    describe_histogram!(
        RATELIMIT_REDIS_DURATION,
        Unit::Seconds,
        "Time a decision waited for Redis when it answered: its one round trip, and the wait for a call to carry it."
    );
    describe_counter!(
        RATELIMIT_REDIS_ERRORS,
        "Rate-limit decisions Redis did not make (their call failed or timed out, or too many waited), by kind."
    );
    describe_gauge!(RATELIMIT_BREAKER_OPEN, "1 while the rate limiter's Redis circuit breaker is open, else 0.");
    describe_counter!(IP_FAILURES_LIMITED, "Requests answered 429 because their client IP sent too many bad keys.");
    describe_gauge!(
        HTTP_CONNECTIONS,
        "Open HTTP connections, by listener: api (the validator's, at most TOLLGATE_MAX_CONNECTIONS; more wait to be \
         accepted) and metrics."
    );
}

/// A labelled counter on a hot path: its handles for the label values it is expected to see, taken from the registry
/// once. `counter!` builds its key (an allocation) and searches the registry on every call, a cost the validator would
/// pay several times per request. Values not listed still count, through the registry. Take it after [`install`]: a
/// handle taken before the recorder exists counts nowhere.
pub struct LabeledCounter<const N: usize> {
    name: &'static str,
    labels: [&'static str; N],
    handles: Vec<([&'static str; N], Counter)>,
}

impl<const N: usize> LabeledCounter<N> {
    pub fn new(
        name: &'static str,
        labels: [&'static str; N],
        expected: impl IntoIterator<Item = [&'static str; N]>,
    ) -> LabeledCounter<N> {
        let handles =
            expected.into_iter().map(|values| (values, metrics::counter!(name, labeled(labels, values)))).collect();
        LabeledCounter { name, labels, handles }
    }

    pub fn increment(&self, values: [&'static str; N]) {
        match self.handles.iter().find(|(expected, _)| *expected == values) {
            Some((_, counter)) => counter.increment(1),
            None => metrics::counter!(self.name, labeled(self.labels, values)).increment(1),
        }
    }
}

fn labeled<const N: usize>(labels: [&'static str; N], values: [&'static str; N]) -> Vec<Label> {
    labels.into_iter().zip(values).map(|(label, value)| Label::from_static_parts(label, value)).collect()
}

/// Starts counters at zero, so that each one's series exists before its first event: a dashboard shows 0 rather than
/// "No data", and `increase()` counts that first event. For counters with a label, see [`start_labeled_at_zero`].
pub fn start_at_zero(names: &[&'static str]) {
    for &name in names {
        metrics::counter!(name).increment(0);
    }
}

/// Like [`start_at_zero`], one series per value of `label`.
pub fn start_labeled_at_zero(name: &'static str, label: &'static str, values: impl IntoIterator<Item = &'static str>) {
    for value in values {
        metrics::counter!(name, label => value).increment(0);
    }
}

/// Serves Prometheus text at `/metrics`, and `/healthz`, until `shutdown` completes. `/healthz` here is the probe
/// that busy API connections do not hold up: the API's own waits in the kernel's queue once
/// `TOLLGATE_MAX_CONNECTIONS` are open (a liveness probe that failed then would restart a validator for being busy),
/// and a worker has no other.
pub async fn serve(listener: TcpListener, shutdown: impl std::future::Future<Output = ()>) {
    let handle = install();
    let upkeep = handle.clone();
    // Keeps histogram storage bounded between scrapes.
    let upkeep_task = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            upkeep.run_upkeep();
        }
    });
    let app = axum::Router::new()
        .route("/metrics", axum::routing::get(move || async move { handle.render() }))
        .route("/healthz", axum::routing::get(|| async { "ok" }));
    let open = metrics::gauge!(HTTP_CONNECTIONS, "listener" => "metrics");
    crate::listen::serve(listener, app, SCRAPERS, open, shutdown).await;
    upkeep_task.abort();
}

/// Prometheus scrapes over one keep-alive connection, every 15 to 60 s.
const SCRAPERS: ConnectionArgs = ConnectionArgs {
    max_connections: 64,
    read_timeout: Duration::from_secs(65),
    // It stops last (see `serve`): a scrape under way has had its time.
    shutdown_grace: Duration::from_secs(1),
};

/// Binds the metrics listener, with an error that names the variable.
pub fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    crate::listen::bind(addr).map_err(|e| {
        anyhow::anyhow!(
            "cannot listen on {addr} for metrics (TOLLGATE_METRICS_LISTEN): {e}. Each Tollgate process on a host \
                 needs its own, e.g. TOLLGATE_METRICS_LISTEN=127.0.0.1:9465"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_labeled_counter_counts_expected_and_unexpected_values() {
        let handle = install();
        let counter = LabeledCounter::new("tollgate_test_labeled_total", ["a", "b"], [["x", "y"]]);
        counter.increment(["x", "y"]);
        counter.increment(["x", "y"]);
        counter.increment(["x", "z"]);
        let text = handle.render();
        assert!(text.contains("tollgate_test_labeled_total{a=\"x\",b=\"y\"} 2"), "{text}");
        assert!(text.contains("tollgate_test_labeled_total{a=\"x\",b=\"z\"} 1"), "{text}");
    }
}
