//! Gets usage events from the HTTP handlers to JetStream without the response ever waiting for NATS.
//!
//! Handlers push events into a bounded queue ([`EventQueue`]); one [`Publisher`] task drains it in batches (all that
//! is waiting, up to [`MAX_EVENTS_PER_MESSAGE`]), encodes each batch as one message and publishes it with a
//! `Nats-Msg-Id`, keeping a bounded number of acks in flight. A failed publish is retried with the same id, so
//! JetStream's duplicate window drops any copy that did get through. When every queue handle is dropped (graceful
//! shutdown), the publisher drains what is left and returns once JetStream has acknowledged all of it.

use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use tokio::sync::mpsc;
use uuid::Uuid;

use tollgate_shared::codec;
use tollgate_shared::event::UsageEvent;
use tollgate_shared::metrics::{EVENTS_PUBLISHED, EVENTS_PUBLISH_ERRORS, EVENT_QUEUE_DEPTH, EVENT_QUEUE_FULL};

/// Events per NATS message: large enough to amortise per-message costs, small enough to stay far below the
/// server's default 1 MB payload limit (an event is ~100–300 bytes).
pub const MAX_EVENTS_PER_MESSAGE: usize = 1000;
/// Messages published but not yet acknowledged.
const MAX_IN_FLIGHT: usize = 16;
const RETRY_FIRST: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// The handlers' end of the queue. Cloneable; the publisher stops once every clone is dropped.
#[derive(Clone)]
pub struct EventQueue(mpsc::Sender<UsageEvent>);

impl EventQueue {
    /// Queues an event. Only if the queue is full (NATS away for long) does the caller wait, so that no decision is
    /// ever lost; that wait is counted in `tollgate_event_queue_full_total`.
    pub async fn push(&self, event: UsageEvent) {
        let event = match self.0.try_send(event) {
            Ok(()) => return,
            Err(mpsc::error::TrySendError::Full(event)) => event,
            Err(mpsc::error::TrySendError::Closed(_)) => {
                tracing::error!("usage event queue is closed; the publisher stopped early");
                return;
            }
        };
        metrics::counter!(EVENT_QUEUE_FULL).increment(1);
        if self.0.send(event).await.is_err() {
            tracing::error!("usage event queue is closed; the publisher stopped early");
        }
    }
}

pub struct Publisher {
    queue: mpsc::Receiver<UsageEvent>,
    jetstream: jetstream::Context,
    subject: String,
}

/// A queue of `capacity` events and the publisher that drains it to `subject`.
pub fn channel(capacity: usize, jetstream: jetstream::Context, subject: String) -> (EventQueue, Publisher) {
    let (tx, rx) = mpsc::channel(capacity);
    (EventQueue(tx), Publisher { queue: rx, jetstream, subject })
}

impl Publisher {
    /// Publishes until the queue is closed and drained and every message is acknowledged.
    pub async fn run(mut self) {
        let mut in_flight = FuturesUnordered::new();
        let mut batch = Vec::with_capacity(MAX_EVENTS_PER_MESSAGE);
        let mut open = true;
        while open || !in_flight.is_empty() {
            tokio::select! {
                Some(published) = in_flight.next(), if !in_flight.is_empty() => {
                    metrics::counter!(EVENTS_PUBLISHED).increment(published);
                }
                received = self.queue.recv_many(&mut batch, MAX_EVENTS_PER_MESSAGE), if open && in_flight.len() < MAX_IN_FLIGHT => {
                    if received == 0 {
                        open = false;
                        continue;
                    }
                    metrics::gauge!(EVENT_QUEUE_DEPTH).set(self.queue.len() as f64);
                    let count = batch.len() as u64;
                    let payload = Bytes::from(codec::encode_batch(std::mem::take(&mut batch)));
                    let publish = publish_until_acked(self.jetstream.clone(), self.subject.clone(), payload);
                    in_flight.push(async move {
                        publish.await;
                        count
                    });
                }
            }
        }
        metrics::gauge!(EVENT_QUEUE_DEPTH).set(0.0);
    }
}

/// Publishes one message, retrying with backoff and the same message id until JetStream acknowledges it.
async fn publish_until_acked(jetstream: jetstream::Context, subject: String, payload: Bytes) {
    let message_id = Uuid::now_v7().to_string();
    let mut delay = RETRY_FIRST;
    loop {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, message_id.as_str());
        let attempt = async {
            jetstream.publish_with_headers(subject.clone(), headers, payload.clone()).await?.await?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
        };
        match attempt.await {
            Ok(()) => return,
            Err(e) => {
                metrics::counter!(EVENTS_PUBLISH_ERRORS).increment(1);
                tracing::warn!(error = %e, retry_in = ?delay, "publishing usage events failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(RETRY_MAX);
            }
        }
    }
}
