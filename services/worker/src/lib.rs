//! The workers: read usage messages from the JetStream consumer in batches, write them to PostgreSQL exactly once,
//! and acknowledge them only after the commit. Any number of workers can share the consumer.

mod dead_letter;
mod store;

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull, Message};
use futures::StreamExt;
use rand::Rng;
use tokio_util::sync::CancellationToken;

use tollgate_shared::codec;
use tollgate_shared::config::WorkerArgs;
use tollgate_shared::metrics::{
    USAGE_DUPLICATES, USAGE_ROWS_WRITTEN, WORKER_BATCH_DURATION, WORKER_BATCH_ERRORS, WORKER_BATCH_SIZE,
};
use tollgate_shared::topology::Topology;

pub use dead_letter::{REASON_HEADER, SUBJECT_HEADER};
pub use store::{UsageStore, Written};

const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// What one batch did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchOutcome {
    pub messages: usize,
    pub inserted: u64,
    pub duplicates: u64,
    pub dead_lettered: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error("writing the batch to PostgreSQL failed: {0}")]
    Database(#[from] sqlx::Error),
    #[error("moving a message to the dead-letter stream failed: {0}")]
    DeadLetter(async_nats::Error),
}

pub struct Worker {
    store: UsageStore,
    jetstream: jetstream::Context,
    dead_letter_subject: String,
}

impl Worker {
    pub fn new(pool: sqlx::PgPool, jetstream: jetstream::Context, topology: &Topology) -> Worker {
        Worker { store: UsageStore::new(pool), jetstream, dead_letter_subject: topology.dead_letter_subject() }
    }

    /// One step: dead-letter what cannot be decoded, write the rest in one transaction, then ack everything.
    /// On error nothing is acked, so every message will be delivered again.
    pub async fn process_batch(&mut self, messages: &[Message]) -> Result<BatchOutcome, BatchError> {
        let started = Instant::now();
        let mut events = Vec::new();
        let mut dead_lettered = 0;
        for message in messages {
            match codec::decode_batch(&message.payload) {
                Ok(batch) => events.extend(batch),
                Err(e) => {
                    dead_letter::dead_letter(&self.jetstream, &self.dead_letter_subject, message, &e)
                        .await
                        .map_err(BatchError::DeadLetter)?;
                    dead_lettered += 1;
                }
            }
        }
        let written =
            if events.is_empty() { Written { inserted: 0, duplicates: 0 } } else { self.store.write(&events).await? };
        for message in messages {
            // A lost ack only means a re-delivery, which the write above makes harmless.
            if let Err(e) = message.ack().await {
                tracing::warn!(error = %e, "ack failed; the message will be re-delivered and skipped");
            }
        }
        metrics::counter!(USAGE_ROWS_WRITTEN).increment(written.inserted);
        metrics::counter!(USAGE_DUPLICATES).increment(written.duplicates);
        metrics::histogram!(WORKER_BATCH_SIZE).record(events.len() as f64);
        metrics::histogram!(WORKER_BATCH_DURATION).record(started.elapsed().as_secs_f64());
        Ok(BatchOutcome {
            messages: messages.len(),
            inserted: written.inserted,
            duplicates: written.duplicates,
            dead_lettered,
        })
    }
}

/// Consumes until `shutdown` is cancelled. A batch already fetched is written and acked before returning; a batch
/// that cannot be written is retried with backoff (keeping its messages from being re-delivered meanwhile).
pub async fn run(
    args: WorkerArgs,
    topology: Topology,
    pool: sqlx::PgPool,
    nats: async_nats::Client,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let jetstream = jetstream::new(nats);
    let consumer = topology.ensure_worker_side(&jetstream).await?;
    let mut worker = Worker::new(pool, jetstream, &topology);
    tracing::info!(stream = %topology.stream, consumer = %topology.workers_consumer(), "worker consuming");
    while !shutdown.is_cancelled() {
        // Not raced against shutdown: a pull abandoned mid-way would leave its messages delivered to nobody until
        // the ack wait expires. A fetch ends within `batch_wait` anyway.
        let messages = fetch(&consumer, &args).await;
        if messages.is_empty() {
            continue;
        }
        let mut delay = BACKOFF_FIRST;
        loop {
            match worker.process_batch(&messages).await {
                Ok(_) => break,
                Err(e) => {
                    metrics::counter!(WORKER_BATCH_ERRORS).increment(1);
                    tracing::warn!(error = %e, retry_in = ?delay, "batch failed; retrying");
                    if shutdown.is_cancelled() {
                        // Not acked: JetStream re-delivers these to the next worker.
                        return Ok(());
                    }
                    for message in &messages {
                        // Resets the ack timer so JetStream does not hand the batch to another worker meanwhile.
                        let _ = message.ack_with(jetstream::AckKind::Progress).await;
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(full_jitter(delay)) => {}
                    }
                    delay = (delay * 2).min(BACKOFF_MAX);
                }
            }
        }
    }
    tracing::info!("worker stopped");
    Ok(())
}

/// Up to `batch_messages` messages, waiting at most `batch_wait` for them.
async fn fetch(consumer: &jetstream::consumer::Consumer<pull::Config>, args: &WorkerArgs) -> Vec<Message> {
    let batch = consumer.batch().max_messages(args.batch_messages).expires(args.batch_wait).messages().await;
    let mut stream = match batch {
        Ok(stream) => stream,
        Err(e) => {
            tracing::warn!(error = %e, "cannot fetch from JetStream; retrying");
            tokio::time::sleep(BACKOFF_FIRST).await;
            return Vec::new();
        }
    };
    let mut messages = Vec::new();
    while let Some(message) = stream.next().await {
        match message {
            Ok(message) => messages.push(message),
            Err(e) => {
                tracing::warn!(error = %e, "error while fetching from JetStream");
                break;
            }
        }
    }
    messages
}

/// A random wait in `[0, ceiling]`, so workers retrying together do not retry in lockstep.
fn full_jitter(ceiling: Duration) -> Duration {
    ceiling.mul_f64(rand::rng().random::<f64>())
}
