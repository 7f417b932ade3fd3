//! The JetStream topology: the usage stream, the dead-letter stream and the workers' consumer. Their definitions
//! are data in `nats/*.json` (the NATS API's own JSON, usable with the `nats` CLI); this module only renames them
//! for the configured stream and subject prefix and creates them idempotently, so any start order works. It also
//! removes a namespace (its streams and its Redis keys) when a bench or a test is done with it.

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
        ensure_stream(js, self.usage_stream_config()).await
    }

    /// Creates the dead-letter stream if missing.
    pub async fn ensure_dead_letter_stream(&self, js: &jetstream::Context) -> Result<stream::Stream, TopologyError> {
        ensure_stream(js, self.dead_letter_stream_config()).await
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
        usage.get_or_create_consumer(&name, config).await.map_err(|e| TopologyError::Consumer {
            stream: self.stream.clone(),
            consumer: name,
            reason: e.to_string(),
        })
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

async fn ensure_stream(js: &jetstream::Context, config: stream::Config) -> Result<stream::Stream, TopologyError> {
    let name = config.name.clone();
    js.get_or_create_stream(config).await.map_err(|e| TopologyError::Stream { stream: name, reason: e.to_string() })
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
    fn a_prefix_is_escaped_to_match_only_itself() {
        assert_eq!(glob_escape("bench:1a:"), "bench:1a:");
        assert_eq!(glob_escape(r"a*b?[c]\d"), r"a\*b\?\[c\]\\d");
    }
}
