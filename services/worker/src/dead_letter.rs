//! Moving undecodable messages aside, to the dead-letter stream, so they never block the ones behind them.

use async_nats::jetstream::{self, Message};

use tollgate_shared::codec::CodecError;
use tollgate_shared::metrics::DEAD_LETTERS;

/// Header carrying why a message was dead-lettered.
pub const REASON_HEADER: &str = "Tollgate-Dead-Letter-Reason";
/// Header carrying the subject the message was first published to.
pub const SUBJECT_HEADER: &str = "Tollgate-Original-Subject";

/// Copies `message` to `subject` with the reason, and waits for JetStream to store it. The copy's message id is
/// derived from the original's stream position, so doing this twice stores it once.
pub async fn dead_letter(
    jetstream: &jetstream::Context,
    subject: &str,
    message: &Message,
    error: &CodecError,
) -> Result<(), async_nats::Error> {
    let position = message.info().map(|info| format!("{}-{}", info.stream, info.stream_sequence))?;
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(REASON_HEADER, error.to_string().as_str());
    headers.insert(SUBJECT_HEADER, message.subject.as_str());
    headers.insert(async_nats::header::NATS_MESSAGE_ID, format!("dlq-{position}").as_str());
    jetstream.publish_with_headers(subject.to_owned(), headers, message.payload.clone()).await?.await?;
    metrics::counter!(DEAD_LETTERS, "reason" => error.kind()).increment(1);
    tracing::warn!(reason = %error, original = %position, "moved an undecodable usage message to the dead-letter stream");
    Ok(())
}
