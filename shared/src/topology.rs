//! The JetStream topology: the usage stream, the dead-letter stream and the workers' consumer. Their definitions
//! are data in `nats/*.json` (the NATS API's own JSON, usable with the `nats` CLI); this module only renames them
//! for the configured stream and subject prefix and creates them idempotently, so any start order works. It also
//! removes a namespace (its streams and its Redis keys) when a bench or a test is done with it.

use std::collections::BTreeSet;

use async_nats::jetstream::{self, consumer, stream};

use crate::config::{NamespaceArgs, ServerUrl};

const USAGE_STREAM: &str = include_str!("../../nats/usage-stream.json");
const DEAD_LETTER_STREAM: &str = include_str!("../../nats/dead-letter-stream.json");
const WORKERS_CONSUMER: &str = include_str!("../../nats/workers-consumer.json");

/// Subject and stream names of one deployment, and the prefix of its Redis keys.
#[derive(Debug, Clone)]
pub struct Topology {
    pub stream: String,
    pub subject_prefix: String,
    pub redis_prefix: String,
}

#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("cannot create or read JetStream stream {stream}: {reason}. Is JetStream enabled (nats-server -js)?")]
    Stream { stream: String, reason: String },
    #[error("cannot create or read consumer {consumer} on stream {stream}: {reason}")]
    Consumer { stream: String, consumer: String, reason: String },
}

impl Topology {
    pub fn new(namespace: &NamespaceArgs) -> Topology {
        Topology {
            stream: namespace.stream.clone(),
            subject_prefix: namespace.subject_prefix.clone(),
            redis_prefix: namespace.redis_prefix.clone(),
        }
    }

    /// Where the validator publishes usage batches (`<prefix>.usage.v<codec version>`).
    pub fn usage_subject(&self) -> String {
        format!("{}.usage.v{}", self.subject_prefix, crate::codec::CURRENT_VERSION)
    }

    pub fn usage_filter(&self) -> String {
        format!("{}.usage.>", self.subject_prefix)
    }

    pub fn dead_letter_stream(&self) -> String {
        format!("{}_DLQ", self.stream)
    }

    pub fn dead_letter_subject(&self) -> String {
        format!("{}.dlq.usage", self.subject_prefix)
    }

    pub fn workers_consumer(&self) -> String {
        self.workers_consumer_config().durable_name.unwrap_or_default()
    }

    fn usage_stream_config(&self) -> stream::Config {
        let mut config: stream::Config = parse(USAGE_STREAM);
        config.name = self.stream.clone();
        config.subjects = vec![self.usage_filter()];
        config
    }

    fn dead_letter_stream_config(&self) -> stream::Config {
        let mut config: stream::Config = parse(DEAD_LETTER_STREAM);
        config.name = self.dead_letter_stream();
        config.subjects = vec![format!("{}.dlq.>", self.subject_prefix)];
        config
    }

    fn workers_consumer_config(&self) -> consumer::pull::Config {
        let mut config: consumer::pull::Config = parse(WORKERS_CONSUMER);
        config.filter_subject = self.usage_filter();
        config
    }

    /// Creates the usage stream if missing (what a validator needs).
    pub async fn ensure_usage_stream(&self, js: &jetstream::Context) -> Result<stream::Stream, TopologyError> {
        ensure_stream(js, USAGE_STREAM, self.usage_stream_config()).await
    }

    /// Creates the dead-letter stream if missing.
    pub async fn ensure_dead_letter_stream(&self, js: &jetstream::Context) -> Result<stream::Stream, TopologyError> {
        ensure_stream(js, DEAD_LETTER_STREAM, self.dead_letter_stream_config()).await
    }

    /// Creates both streams and the workers' consumer if missing (what a worker needs).
    pub async fn ensure_worker_side(
        &self,
        js: &jetstream::Context,
    ) -> Result<consumer::Consumer<consumer::pull::Config>, TopologyError> {
        let usage = self.ensure_usage_stream(js).await?;
        self.ensure_dead_letter_stream(js).await?;
        let config = self.workers_consumer_config();
        let name = self.workers_consumer();
        let consumer = usage.get_or_create_consumer(&name, config.clone()).await.map_err(|e| {
            TopologyError::Consumer { stream: self.stream.clone(), consumer: name.clone(), reason: e.to_string() }
        })?;
        warn_of_drift("consumer", &name, differences(WORKERS_CONSUMER, &config, &consumer.cached_info().config));
        Ok(consumer)
    }

    /// Deletes both streams (tests clean up with this).
    pub async fn delete(&self, js: &jetstream::Context) {
        let _ = js.delete_stream(&self.stream).await;
        let _ = js.delete_stream(self.dead_letter_stream()).await;
    }

    /// Deletes every Redis key under the prefix, a batch at a time (`SCAN`, then `UNLINK`, which frees them in the
    /// background), so that Redis does not block on a large namespace and nothing of it is left to expire later.
    pub async fn delete_redis_keys(&self, redis_url: &ServerUrl) -> anyhow::Result<()> {
        let redis = &mut crate::connect::redis(redis_url).await?;
        let pattern = format!("{}*", glob_escape(&self.redis_prefix));
        let mut cursor = 0u64;
        loop {
            let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(redis)
                .await?;
            if !keys.is_empty() {
                let _: i64 = redis::cmd("UNLINK").arg(keys).query_async(redis).await?;
            }
            if next == 0 {
                return Ok(());
            }
            cursor = next;
        }
    }
}

/// `text` as a Redis glob pattern that matches only itself.
fn glob_escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}

async fn ensure_stream(
    js: &jetstream::Context,
    file: &str,
    config: stream::Config,
) -> Result<stream::Stream, TopologyError> {
    let name = config.name.clone();
    let stream = js
        .get_or_create_stream(config.clone())
        .await
        .map_err(|e| TopologyError::Stream { stream: name.clone(), reason: e.to_string() })?;
    warn_of_drift("stream", &name, differences(file, &config, &stream.cached_info().config));
    Ok(stream)
}

/// Settings of a definition that operators may set as they see fit on a stream or consumer Tollgate made: sizes,
/// replicas, timings. Tollgate relies on every other one its files set.
const TUNABLE: [&str; 7] =
    ["name", "description", "num_replicas", "max_bytes", "max_msgs", "ack_wait", "max_ack_pending"];

/// The settings that `file` sets, save the [`TUNABLE`] ones, on which `actual` differs from `expected`.
fn differences(file: &str, expected: &impl serde::Serialize, actual: &impl serde::Serialize) -> Vec<String> {
    let expected = serde_json::to_value(expected).unwrap_or_default();
    let actual = serde_json::to_value(actual).unwrap_or_default();
    let file: serde_json::Value = serde_json::from_str(file).expect("nats/*.json are valid JSON");
    let settings = file.as_object().into_iter().flat_map(|settings| settings.keys());
    settings
        .filter(|setting| !TUNABLE.contains(&setting.as_str()) && expected.get(setting) != actual.get(setting))
        .map(|setting| {
            let value = |config: &serde_json::Value| config.get(setting).map_or("none".to_owned(), |v| v.to_string());
            format!("{setting} is {} rather than {}", value(&actual), value(&expected))
        })
        .collect()
}

/// Tollgate changes no stream or consumer that exists (an operator may have made it, or a bench be using it): it says
/// what differs, once per process (each worker task finds the same).
fn warn_of_drift(what: &str, name: &str, differences: Vec<String>) {
    static WARNED: std::sync::Mutex<BTreeSet<String>> = std::sync::Mutex::new(BTreeSet::new());
    let differences = differences.join("; ");
    let first = WARNED.lock().is_ok_and(|mut warned| warned.insert(format!("{what} {name}: {differences}")));
    if !differences.is_empty() && first {
        tracing::warn!(
            %differences,
            "JetStream {what} {name} is not as nats/*.json defines it, and Tollgate relies on that: edit it (`nats \
             {what} edit`), or remove it once empty for Tollgate to make it again"
        );
    }
}

/// Reads a definition over the client's defaults, so the files need only say what matters. The files are part of
/// the build; a parse failure is a bug caught by the unit test below.
fn parse<T: serde::Serialize + serde::de::DeserializeOwned + Default>(json: &str) -> T {
    let mut merged = serde_json::to_value(T::default()).expect("a default definition serializes");
    let file: serde_json::Value = serde_json::from_str(json).expect("nats/*.json are valid JSON");
    if let (Some(merged), Some(file)) = (merged.as_object_mut(), file.as_object()) {
        merged.extend(file.clone());
    }
    serde_json::from_value(merged).expect("nats/*.json are valid definitions (checked by a unit test)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn definitions_parse_and_are_renamed() {
        let topology = Topology { stream: "S1".into(), subject_prefix: "it.x".into(), redis_prefix: "it:".into() };
        let usage = topology.usage_stream_config();
        assert_eq!(usage.name, "S1");
        assert_eq!(usage.subjects, vec!["it.x.usage.>"]);
        assert_eq!(usage.retention, stream::RetentionPolicy::WorkQueue);
        assert!(usage.duplicate_window.as_secs() >= 60);
        assert_eq!(topology.dead_letter_stream_config().name, "S1_DLQ");
        let consumer = topology.workers_consumer_config();
        assert_eq!(consumer.max_deliver, -1);
        assert_eq!(consumer.filter_subject, "it.x.usage.>");
        assert_eq!(topology.workers_consumer(), "tollgate-workers");
        assert!(topology.usage_subject().starts_with("it.x.usage."));
    }

    #[test]
    fn what_tollgate_relies_on_is_compared_and_what_operators_tune_is_not() {
        let topology = Topology { stream: "S1".into(), subject_prefix: "it.x".into(), redis_prefix: "it:".into() };
        let expected = topology.usage_stream_config();
        assert_eq!(differences(USAGE_STREAM, &expected, &expected), Vec::<String>::new());
        let tuned = stream::Config { max_bytes: 1 << 30, num_replicas: 3, description: None, ..expected.clone() };
        assert_eq!(differences(USAGE_STREAM, &expected, &tuned), Vec::<String>::new());
        let drifted = stream::Config {
            retention: stream::RetentionPolicy::Limits,
            duplicate_window: std::time::Duration::from_secs(10),
            ..expected.clone()
        };
        assert_eq!(
            differences(USAGE_STREAM, &expected, &drifted),
            [
                "duplicate_window is 10000000000 rather than 120000000000",
                "retention is \"limits\" rather than \"workqueue\""
            ]
        );

        let consumer = topology.workers_consumer_config();
        let tuned = consumer::pull::Config { ack_wait: std::time::Duration::from_secs(5), ..consumer.clone() };
        assert_eq!(differences(WORKERS_CONSUMER, &consumer, &tuned), Vec::<String>::new());
        let drifted = consumer::pull::Config { max_deliver: 5, ..consumer.clone() };
        assert_eq!(differences(WORKERS_CONSUMER, &consumer, &drifted), ["max_deliver is 5 rather than -1"]);
    }

    #[test]
    fn a_prefix_is_escaped_to_match_only_itself() {
        assert_eq!(glob_escape("bench:1a:"), "bench:1a:");
        assert_eq!(glob_escape(r"a*b?[c]\d"), r"a\*b\?\[c\]\\d");
    }
}
