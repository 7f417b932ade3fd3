//! Moving undecodable messages aside, to the dead-letter stream, so they never block the ones behind them.

use async_nats::jetstream::context::{PublishError, PublishErrorKind};
use async_nats::jetstream::{self, Message};

use tollgate_shared::codec::CodecError;
use tollgate_shared::metrics::DEAD_LETTERS;
use tollgate_shared::topology::Topology;

/// Header carrying why a message was dead-lettered.
pub const REASON_HEADER: &str = "Tollgate-Dead-Letter-Reason";
/// Header carrying the subject the message was first published to.
pub const SUBJECT_HEADER: &str = "Tollgate-Original-Subject";

/// Where a worker's dead letters go.
pub struct DeadLetters {
    jetstream: jetstream::Context,
    topology: Topology,
}

impl DeadLetters {
    pub fn new(jetstream: jetstream::Context, topology: &Topology) -> DeadLetters {
        DeadLetters { jetstream, topology: topology.clone() }
    }

    /// Copies `message` to the dead-letter stream with the reason, and waits for JetStream to store it. The copy's
    /// message id is derived from the original's stream position and the time it was stored there, so doing this
    /// twice stores it once, while a message at the same position of a stream made again is another one. A stream that
    /// is gone (deleted by hand, or NATS restarted without its storage) is created again: otherwise the message would
    /// wait, tried again after each ack wait, until someone noticed.
    pub async fn store(&self, message: &Message, error: &CodecError) -> Result<(), async_nats::Error> {
        match self.copy(message, error).await {
            Err(e) if is_stream_not_found(&e) => {
                tracing::warn!(stream = %self.topology.dead_letter_stream(), "the dead-letter stream is gone; creating it again");
                self.topology.ensure_dead_letter_stream(&self.jetstream).await?;
                self.copy(message, error).await
            }
            result => result,
        }
    }

    async fn copy(&self, message: &Message, error: &CodecError) -> Result<(), async_nats::Error> {
        let info = message.info()?;
        let position = format!("{}-{}", info.stream, info.stream_sequence);
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(REASON_HEADER, error.to_string().as_str());
        headers.insert(SUBJECT_HEADER, message.subject.as_str());
        let id = format!("dlq-{position}-{}", info.published.unix_timestamp_nanos());
        headers.insert(async_nats::header::NATS_MESSAGE_ID, id.as_str());
        let subject = self.topology.dead_letter_subject();
        self.jetstream.publish_with_headers(subject, headers, message.payload.clone()).await?.await?;
        metrics::counter!(DEAD_LETTERS, "reason" => error.kind()).increment(1);
        tracing::warn!(reason = %error, original = %position, "moved an undecodable usage message to the dead-letter stream");
        Ok(())
    }
}

fn is_stream_not_found(error: &async_nats::Error) -> bool {
    error.downcast_ref::<PublishError>().is_some_and(|e| e.kind() == PublishErrorKind::StreamNotFound)
}
