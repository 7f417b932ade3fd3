//! Looking at and replaying the dead-letter stream (`tollgate dlq list|replay`).
//!
//! A replay republishes the message's payload to the usage subject it came from, waits for JetStream to store it,
//! and only then deletes it from the dead-letter stream: a crash in between leaves it in both places, and the
//! replay's message id (derived from the dead letter's position) makes a second replay within JetStream's
//! duplicate window a no-op; past that window a duplicate message is still harmless, because the workers write
//! each event once.

use async_nats::jetstream;
use async_nats::jetstream::message::StreamMessage;
use async_nats::jetstream::stream::{LastRawMessageError, LastRawMessageErrorKind, Stream};
use chrono::{DateTime, Utc};

use tollgate_shared::topology::Topology;

use crate::dead_letter::{REASON_HEADER, SUBJECT_HEADER};

/// One message in the dead-letter stream.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeadLetter {
    pub sequence: u64,
    pub time: DateTime<Utc>,
    pub reason: String,
    /// The usage subject it was first published to.
    pub subject: String,
    pub size: usize,
}

/// Which dead letters to replay.
#[derive(Debug, Clone, Copy)]
pub enum Selection {
    One(u64),
    All,
}

#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    #[error(
        "cannot read dead-letter stream {stream}: {reason} (a worker makes it when it starts; is TOLLGATE_STREAM the \
         workers' own?)"
    )]
    Stream { stream: String, reason: String },
    #[error("no dead letter with sequence {0} (`tollgate dlq list` lists them)")]
    NotFound(u64),
    #[error("cannot republish dead letter {sequence}: {reason}")]
    Publish { sequence: u64, reason: String },
    #[error("republished dead letter {sequence} but cannot delete it from the dead-letter stream: {reason}")]
    Delete { sequence: u64, reason: String },
}

async fn open(js: &jetstream::Context, topology: &Topology) -> Result<Stream, DlqError> {
    let name = topology.dead_letter_stream();
    js.get_stream(&name).await.map_err(|e| DlqError::Stream { stream: name, reason: e.to_string() })
}

/// Every dead letter, oldest first: each asked for as the first one from a sequence on, so that the gaps replays
/// leave cost nothing.
pub async fn list(js: &jetstream::Context, topology: &Topology) -> Result<Vec<DeadLetter>, DlqError> {
    let stream = open(js, topology).await?;
    let mut letters = Vec::new();
    let mut from = 1;
    loop {
        match stream.get_first_raw_message_by_subject(">", from).await {
            Ok(message) => {
                from = message.sequence + 1;
                letters.push(dead_letter(message, topology));
            }
            Err(e) if matches!(e.kind(), LastRawMessageErrorKind::NoMessageFound) => return Ok(letters),
            Err(e) => return Err(unreadable(topology, e)),
        }
    }
}

fn unreadable(topology: &Topology, error: LastRawMessageError) -> DlqError {
    DlqError::Stream { stream: topology.dead_letter_stream(), reason: error.to_string() }
}

fn dead_letter(message: StreamMessage, topology: &Topology) -> DeadLetter {
    let header = |name: &str| message.headers.get(name).map(|v| v.to_string());
    let time = DateTime::from_timestamp(message.time.unix_timestamp(), message.time.nanosecond())
        .unwrap_or(DateTime::UNIX_EPOCH);
    DeadLetter {
        sequence: message.sequence,
        time,
        reason: header(REASON_HEADER).unwrap_or_default(),
        subject: header(SUBJECT_HEADER).unwrap_or_else(|| topology.usage_subject()),
        size: message.payload.len(),
    }
}

/// Republishes the selected dead letters to their usage subject and deletes them from the dead-letter stream;
/// returns the sequences replayed.
pub async fn replay(js: &jetstream::Context, topology: &Topology, selection: Selection) -> Result<Vec<u64>, DlqError> {
    let stream = open(js, topology).await?;
    let sequences: Vec<u64> = match selection {
        Selection::One(sequence) => vec![sequence],
        Selection::All => list(js, topology).await?.into_iter().map(|l| l.sequence).collect(),
    };
    let usage_prefix = format!("{}.usage.", topology.subject_prefix);
    let mut replayed = Vec::new();
    for sequence in sequences {
        let message = match stream.get_raw_message(sequence).await {
            Ok(message) => message,
            Err(e) if matches!(e.kind(), LastRawMessageErrorKind::NoMessageFound) => {
                return Err(DlqError::NotFound(sequence))
            }
            Err(e) => return Err(unreadable(topology, e)),
        };
        // Only ever back into this deployment's usage stream, whatever the header says.
        let subject = message
            .headers
            .get(SUBJECT_HEADER)
            .map(|v| v.to_string())
            .filter(|s| s.starts_with(&usage_prefix))
            .unwrap_or_else(|| topology.usage_subject());
        let mut headers = async_nats::HeaderMap::new();
        // Stable across a replay retried after it was interrupted, but not shared with the message at the same
        // sequence of a dead-letter stream made again.
        let id = format!("replay-{}-{sequence}-{}", topology.dead_letter_stream(), message.time.unix_timestamp_nanos());
        headers.insert(async_nats::header::NATS_MESSAGE_ID, id.as_str());
        let publish = |reason: String| DlqError::Publish { sequence, reason };
        js.publish_with_headers(subject, headers, message.payload.clone())
            .await
            .map_err(|e| publish(e.to_string()))?
            .await
            .map_err(|e| publish(e.to_string()))?;
        stream.delete_message(sequence).await.map_err(|e| DlqError::Delete { sequence, reason: e.to_string() })?;
        tracing::info!(sequence, "replayed a dead letter");
        replayed.push(sequence);
    }
    Ok(replayed)
}
