//! Gets usage events from the HTTP handlers to JetStream without the response ever waiting for NATS, and without
//! losing them when NATS is away.
//!
//! Handlers push events into a bounded queue ([`EventQueue`]); one [`Publisher`] task drains it in batches (what
//! arrives within [`LINGER`] of a batch's first event, up to [`MAX_EVENTS_PER_MESSAGE`]), encodes each batch as one
//! message with its own `Nats-Msg-Id` (or several, up to [`MAX_MESSAGE_BYTES`] each, when its events are large),
//! and publishes it directly, keeping a bounded number of acks in flight (more while the queue holds a backlog).
//!
//! When a publish fails or is not acknowledged within the publish timeout, the publisher *diverts*: every message
//! still in flight, in the order they were sent, and then every new one go to the disk [`spool`], while a replayer
//! publishes the spool's oldest messages (with their original message ids) and deletes them once acknowledged.
//! It diverts too when NATS is alive but acknowledges slower than events come even with the most messages in flight
//! (new messages go to the spool; those in flight still complete), so that requests never wait for room in the queue.
//! When the spool is empty again, publishing is direct again. A message that did reach JetStream before its ack was
//! lost is spooled and replayed under the same id, so the duplicate window (then the worker's `ON CONFLICT`) drops
//! it. What a previous run left in the spool is replayed first.
//!
//! When every queue handle is dropped (graceful shutdown), the publisher drains the queue to NATS, or to the spool
//! if NATS is away, and returns once nothing is in memory.

pub mod spool;

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use futures::FutureExt;
use tokio::sync::{mpsc, watch};
use uuid::Uuid;

use tollgate_shared::codec::{self, MAX_EVENTS_PER_MESSAGE};
use tollgate_shared::config::{FsyncPolicy, SpoolFullPolicy};
use tollgate_shared::event::UsageEvent;
use tollgate_shared::metrics::{
    start_at_zero, EVENTS_DROPPED, EVENTS_PUBLISHED, EVENTS_PUBLISH_ERRORS, EVENTS_REJECTED, EVENTS_REPLAYED,
    EVENTS_SPOOLED, EVENT_QUEUE_DEPTH, EVENT_QUEUE_FULL, PUBLISH_DURATION, PUBLISH_RETRIES, SPOOL_CORRUPT_RECORDS,
};

use spool::{Spool, SpoolError, SpooledMessage};

/// Bytes per NATS message, at most: a batch of large events (paths, user agents and request ids are each kept up to
/// 2 KB) is split to fit. nats-server closes the connection on a message over its `max_payload` (1 MB by default), so
/// such a message could never be published, and the spool would replay it forever, holding up every event behind it.
const MAX_MESSAGE_BYTES: usize = 512 * 1024;
/// Room left under the server's `max_payload` for a message's headers.
const HEADERS_ROOM: usize = 1024;
/// How long a message waits for more events before it is published. Per-message costs (nats-server's, the ack's)
/// dominate small messages; 5 ms is nothing to a usage event and, at 25k verifies/s, makes ~130-event messages.
const LINGER: Duration = Duration::from_millis(5);
/// Messages published but not yet acknowledged, when publishing directly. Two keep JetStream busy while events
/// pile up into the next message: with 16, messages left nearly empty and nats-server spent 37% of a core at
/// 25k verifies/s against 19% with 2 (`tollgate bench verify`, 2-core machine).
const MAX_IN_FLIGHT: usize = 2;
/// Messages in flight at most while the queue holds a full message's worth or more (or, if smaller, is full): the
/// events come faster than two messages per ack's round trip carry (NATS far away or busy), and keeping to two would
/// fill the queue and make requests wait for room in it. The messages are as full as the queue then.
const MAX_IN_FLIGHT_BEHIND: usize = 16;
/// Spooled messages published together by one replay step, at most, and their bytes: as many events per ack's round
/// trip as direct publishing carries behind a backlog (its most in flight, full), even when the spool holds small
/// messages (those made while spooling hold what came within [`LINGER`]), or a NATS that acks slowly would take fewer
/// events through the spool than it took directly.
const REPLAY_MESSAGES: usize = 1024;
const REPLAY_BYTES: usize = MAX_IN_FLIGHT_BEHIND * MAX_MESSAGE_BYTES;
const RETRY_FIRST: Duration = Duration::from_millis(100);
/// Kept short so replay resumes within about this long once NATS is back.
const RETRY_MAX: Duration = Duration::from_secs(2);

/// The handlers' end of the queue. Cloneable; the publisher stops once every clone is dropped.
#[derive(Clone)]
pub struct EventQueue {
    sender: mpsc::Sender<UsageEvent>,
    spool_full: watch::Receiver<bool>,
    full_policy: SpoolFullPolicy,
}

/// No event can be queued: the spool is full and its policy is `block` (or the publisher stopped). The caller answers
/// 503.
#[derive(Debug)]
pub struct Rejected;

/// Room for one event in the queue, taken before the decision the event records: queuing it then never waits, nor
/// fails.
pub struct Slot<'a>(mpsc::Permit<'a, UsageEvent>);

impl Slot<'_> {
    pub fn send(self, event: UsageEvent) {
        self.0.send(event);
    }
}

impl EventQueue {
    /// Room for one event: at once, or once there is room (counted in `tollgate_event_queue_full_total`), so that no
    /// decision is lost. Refused (counted as a refused event) while the spool is full and its policy is `block`,
    /// including while waiting (the publisher takes nothing from the queue then, so the wait could be endless): the
    /// request is then answered 503, before any limit counts it.
    pub async fn reserve(&self) -> Result<Slot<'_>, Rejected> {
        let blocking = self.full_policy == SpoolFullPolicy::Block;
        if blocking && *self.spool_full.borrow() {
            return reject();
        }
        let closed = || {
            tracing::error!("usage event queue is closed; the publisher stopped early");
            Rejected
        };
        match self.sender.try_reserve() {
            Ok(permit) => return Ok(Slot(permit)),
            Err(mpsc::error::TrySendError::Full(())) => {}
            Err(mpsc::error::TrySendError::Closed(())) => return Err(closed()),
        }
        metrics::counter!(EVENT_QUEUE_FULL).increment(1);
        let mut spool_full = self.spool_full.clone();
        tokio::select! {
            permit = self.sender.reserve() => permit.map(Slot).map_err(|_| closed()),
            // A cancelled `reserve` holds no room.
            Ok(_) = spool_full.wait_for(|full| *full), if blocking => reject(),
        }
    }
}

fn reject<T>() -> Result<T, Rejected> {
    metrics::counter!(EVENTS_REJECTED).increment(1);
    Err(Rejected)
}

/// How the publisher publishes and spools.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Longest wait for an ack before the message is spooled instead.
    pub publish_timeout: Duration,
    pub full_policy: SpoolFullPolicy,
    pub fsync: FsyncPolicy,
}

pub struct Publisher {
    queue: mpsc::Receiver<UsageEvent>,
    target: Target,
    spool: Arc<Mutex<Spool>>,
    spool_full: watch::Sender<bool>,
    settings: Settings,
}

/// A queue of `capacity` events and the publisher that drains it to `subject`, spooling to `spool`.
pub fn channel(
    capacity: usize,
    nats: async_nats::Client,
    subject: String,
    spool: Spool,
    settings: Settings,
) -> (EventQueue, Publisher) {
    start_at_zero(&[
        EVENTS_PUBLISHED,
        EVENTS_PUBLISH_ERRORS,
        PUBLISH_RETRIES,
        EVENTS_SPOOLED,
        EVENTS_REPLAYED,
        EVENTS_DROPPED,
        EVENTS_REJECTED,
        EVENT_QUEUE_FULL,
        SPOOL_CORRUPT_RECORDS,
    ]);
    let (sender, queue) = mpsc::channel(capacity);
    let (spool_full, full) = watch::channel(false);
    let events = EventQueue { sender, spool_full: full, full_policy: settings.full_policy };
    let mut jetstream = jetstream::new(nats.clone());
    // Its own limit (5 s) would otherwise cut a longer publish timeout short.
    jetstream.set_timeout(settings.publish_timeout);
    let target = Target { nats, jetstream, subject: subject.into(), timeout: settings.publish_timeout };
    (events, Publisher { queue, target, spool: Arc::new(Mutex::new(spool)), spool_full, settings })
}

/// Where and how messages are published.
#[derive(Clone)]
struct Target {
    /// For the server's `max_payload`.
    nats: async_nats::Client,
    jetstream: jetstream::Context,
    subject: Arc<str>,
    timeout: Duration,
}

impl Target {
    /// The largest message to send: [`MAX_MESSAGE_BYTES`], or less if the server takes less (0: not connected yet).
    fn message_bytes(&self) -> usize {
        match self.nats.server_info().max_payload {
            0 => MAX_MESSAGE_BYTES,
            max_payload => MAX_MESSAGE_BYTES.min(max_payload.saturating_sub(HEADERS_ROOM)),
        }
    }

    /// [`Target::publish`] for a message read back from the spool. One larger than the server takes (spooled while
    /// its limit was not known yet, or by an earlier build) goes as parts that fit, each with an id derived from the
    /// message's and the events it holds, so that a part replayed again is dropped as a duplicate, and a part cut
    /// otherwise (the server's limit changed meanwhile) is not taken for one. One the stream refuses as too large (an
    /// operator set its `max_msg_size` below the server's limit) goes in halves, each cut again as needed.
    async fn publish_spooled(&self, message: &SpooledMessage) -> Result<(), async_nats::Error> {
        self.publish_within(message, self.message_bytes()).await
    }

    fn publish_within<'a>(
        &'a self,
        message: &'a SpooledMessage,
        bound: usize,
    ) -> BoxFuture<'a, Result<(), async_nats::Error>> {
        async move {
            if message.payload.len() <= bound || message.events <= 1 {
                return match self.publish(message).await {
                    Err(e) if refused_as_too_large(&e) && message.events > 1 => {
                        self.publish_within(message, message.payload.len() / 2).await
                    }
                    Err(e) if refused_as_too_large(&e) => {
                        // Retrying it would hold up everything behind it for good.
                        metrics::counter!(EVENTS_DROPPED).increment(u64::from(message.events));
                        tracing::error!(id = %message.id, bytes = message.payload.len(),
                            "dropping a usage event larger than the stream takes (its max_msg_size)");
                        Ok(())
                    }
                    other => other,
                };
            }
            let Ok(events) = codec::decode_batch(&message.payload) else {
                // The server would close the connection on it at every attempt, holding up everything behind it.
                metrics::counter!(EVENTS_DROPPED).increment(u64::from(message.events));
                tracing::error!(id = %message.id, bytes = message.payload.len(), events = message.events,
                    "dropping a spooled message larger than NATS or the stream takes that cannot be decoded to be cut");
                return Ok(());
            };
            let mut first = 0;
            for (payload, events) in codec::encode_batches(events, bound) {
                let id = format!("{}.{first}+{events}", message.id);
                let part = SpooledMessage { id, events: events as u32, payload: payload.into() };
                self.publish_within(&part, bound).await?;
                first += events;
            }
            Ok(())
        }
        .boxed()
    }

    /// One attempt at a message cut to [`Target::message_bytes`]: published and acknowledged within the timeout, or
    /// an error.
    async fn publish(&self, message: &SpooledMessage) -> Result<(), async_nats::Error> {
        // While it reconnects, the client reads nothing of its queue: an attempt would leave a copy of the message
        // there, to be sent once NATS is back, ahead of the replay (a long outage piled up hundreds of megabytes).
        if self.nats.connection_state() != async_nats::connection::State::Connected {
            metrics::counter!(EVENTS_PUBLISH_ERRORS).increment(1);
            return Err("not connected to NATS".into());
        }
        let started = Instant::now();
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, message.id.as_str());
        let attempt = async {
            self.jetstream
                .publish_with_headers(self.subject.to_string(), headers, message.payload.clone())
                .await?
                .await?;
            Ok::<_, async_nats::Error>(())
        };
        let result = match tokio::time::timeout(self.timeout, attempt).await {
            Ok(result) => result,
            Err(_) => Err(format!("no acknowledgement within {:?}", self.timeout).into()),
        };
        match &result {
            Ok(()) => metrics::histogram!(PUBLISH_DURATION).record(started.elapsed().as_secs_f64()),
            Err(_) => metrics::counter!(EVENTS_PUBLISH_ERRORS).increment(1),
        }
        result
    }
}

/// Whether JetStream answered that the message is larger than the stream takes: no retry of it can succeed.
fn refused_as_too_large(error: &async_nats::Error) -> bool {
    use async_nats::jetstream::{context::PublishError, ErrorCode};
    error
        .downcast_ref::<PublishError>()
        .and_then(std::error::Error::source)
        .and_then(|source| source.downcast_ref::<async_nats::jetstream::Error>())
        .is_some_and(|e| e.error_code() == ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM)
}

/// What one replay step did.
struct Replayed {
    events: u64,
    /// The spool let go of what NATS took.
    consumed: bool,
    failed: Option<async_nats::Error>,
}

/// Runs a spool operation off the async threads (it may fsync).
async fn on_spool<T: Send + 'static>(
    spool: &Arc<Mutex<Spool>>,
    operation: impl FnOnce(&mut Spool) -> T + Send + 'static,
) -> T {
    let spool = spool.clone();
    tokio::task::spawn_blocking(move || operation(&mut spool.lock().unwrap_or_else(PoisonError::into_inner)))
        .await
        // Spool operations return errors rather than panic, and the runtime outlives the publisher.
        .expect("a spool operation panicked or the runtime is shutting down")
}

/// Publishes the oldest spooled messages (after `delay`, when retrying) and consumes the acknowledged prefix.
async fn replay_step(spool: Arc<Mutex<Spool>>, target: Target, delay: Option<Duration>) -> Replayed {
    if let Some(delay) = delay {
        tokio::time::sleep(delay).await;
    }
    // After a failure, one message first: a NATS still away (or a connection that takes nothing, half open) then
    // costs a message read and sent, not a step's worth.
    let (messages, bytes) = if delay.is_some() { (1, usize::MAX) } else { (REPLAY_MESSAGES, REPLAY_BYTES) };
    let batch = match on_spool(&spool, move |s| s.read(messages, bytes)).await {
        Ok(batch) => batch,
        Err(e) => return Replayed { events: 0, consumed: false, failed: Some(e.into()) },
    };
    if delay.is_some() {
        metrics::counter!(PUBLISH_RETRIES).increment(batch.len() as u64);
    }
    let results = futures::future::join_all(batch.iter().map(|(message, _)| target.publish_spooled(message))).await;
    let mut events = 0;
    let mut consumed = None;
    let mut failed = None;
    for ((message, cursor), result) in batch.iter().zip(results) {
        match result {
            Ok(()) => {
                events += u64::from(message.events);
                consumed = Some(*cursor);
            }
            Err(e) => {
                // Later messages that did get through are replayed again with the same id, and dropped by
                // JetStream's duplicate window: order is kept.
                failed = Some(e);
                break;
            }
        }
    }
    let consumed = match consumed {
        Some(cursor) => {
            on_spool(&spool, move |s| s.consume_to(cursor)).await;
            true
        }
        None => false,
    };
    metrics::counter!(EVENTS_REPLAYED).increment(events);
    metrics::counter!(EVENTS_PUBLISHED).increment(events);
    Replayed { events, consumed, failed }
}

/// Backoff after a failure: doubling from [`RETRY_FIRST`] up to [`RETRY_MAX`].
fn next_delay(last: Option<Duration>) -> Duration {
    last.map_or(RETRY_FIRST, |d| (d * 2).min(RETRY_MAX))
}

/// Messages published directly and not yet acknowledged, in the order they were sent.
#[derive(Default)]
struct InFlight {
    acks: FuturesUnordered<BoxFuture<'static, (u64, Result<(), async_nats::Error>)>>,
    messages: BTreeMap<u64, SpooledMessage>,
    next: u64,
}

impl InFlight {
    fn send(&mut self, target: &Target, message: SpooledMessage) {
        let seq = self.next;
        self.next += 1;
        let target = target.clone();
        let copy = message.clone();
        self.acks.push(async move { (seq, target.publish(&copy).await) }.boxed());
        self.messages.insert(seq, message);
    }

    fn len(&self) -> usize {
        self.messages.len()
    }

    /// Gives up on every unacknowledged message, returning them in the order they were sent.
    fn abandon(&mut self) -> Vec<SpooledMessage> {
        self.acks.clear();
        std::mem::take(&mut self.messages).into_values().collect()
    }
}

/// The publisher's state between events.
struct Run {
    /// Messages go to the spool (and a replayer empties it) rather than straight to NATS.
    spooling: bool,
    /// Messages waiting for room in the spool (policy `block`), oldest first.
    held: VecDeque<SpooledMessage>,
    in_flight: InFlight,
    replay: Option<BoxFuture<'static, Replayed>>,
    retry_delay: Option<Duration>,
    /// The queue is closed and drained.
    closed: bool,
    /// After close, a replay failed: NATS is away, so what is in the spool stays there for the next start.
    gave_up: bool,
}

impl Publisher {
    /// Publishes until the queue is closed and drained, and every event is acknowledged or spooled.
    pub async fn run(mut self) {
        let spooled_before = {
            let spool = self.spool.lock().unwrap_or_else(PoisonError::into_inner);
            (!spool.is_empty()).then(|| spool.bytes())
        };
        if let Some(bytes) = spooled_before {
            tracing::warn!(bytes, "replaying usage events spooled by an earlier run");
        }
        let mut run = Run {
            spooling: spooled_before.is_some(),
            held: VecDeque::new(),
            in_flight: InFlight::default(),
            replay: None,
            retry_delay: None,
            closed: false,
            gave_up: false,
        };
        let mut fsync_timer = match self.settings.fsync {
            FsyncPolicy::Every(period) => {
                // A tick missed (a slow fsync) is not made up in a burst of syncs.
                let mut timer = tokio::time::interval(period);
                timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                Some(timer)
            }
            FsyncPolicy::Always | FsyncPolicy::Never => None,
        };
        let mut batch = Vec::with_capacity(MAX_EVENTS_PER_MESSAGE);
        loop {
            if !run.spooling && !run.closed && self.falling_behind(&run) {
                // What is in flight still completes; the replay delivers the rest as NATS allows.
                tracing::warn!(
                    in_flight = run.in_flight.len(),
                    queued = self.queue.len(),
                    "NATS acknowledges slower than events come; spooling them until it catches up"
                );
                run.spooling = true;
            }
            if run.spooling && run.replay.is_none() && !run.gave_up {
                run.replay = Some(replay_step(self.spool.clone(), self.target.clone(), run.retry_delay).boxed());
            }
            if run.closed && run.in_flight.len() == 0 && (!run.spooling || run.gave_up) {
                self.lose_held(&mut run);
                break;
            }
            // While messages wait for room, the queue waits too, unless it is closed: shutting down, what it still
            // holds joins them, and reading it is how the publisher learns of the shutdown (within RETRY_MAX).
            let has_room = run.held.is_empty() || self.queue.is_closed();
            let behind = self.queue.len() >= MAX_EVENTS_PER_MESSAGE.min(self.queue.max_capacity());
            let max_in_flight = if behind { MAX_IN_FLIGHT_BEHIND } else { MAX_IN_FLIGHT };
            let receive = !run.closed && has_room && (run.spooling || run.in_flight.len() < max_in_flight);
            // Acks so slow that a full message queues up before one comes back: look again then, not at the ack (with
            // the most in flight, to divert before the queue fills).
            let watch_backlog = !receive && !run.closed && !run.spooling;
            tokio::select! {
                Some((seq, result)) = run.in_flight.acks.next(), if run.in_flight.len() > 0 => {
                    self.acknowledged(&mut run, seq, result).await;
                }
                received = self.queue.recv_many(&mut batch, MAX_EVENTS_PER_MESSAGE), if receive => {
                    metrics::gauge!(EVENT_QUEUE_DEPTH).set(self.queue.len() as f64);
                    if received == 0 {
                        run.closed = true;
                        self.closing(&mut run).await;
                        continue;
                    }
                    run.closed = self.fill(&mut batch).await;
                    for (payload, events) in codec::encode_batches(std::mem::take(&mut batch), self.target.message_bytes()) {
                        let message =
                            SpooledMessage { id: Uuid::now_v7().to_string(), events: events as u32, payload: payload.into() };
                        if run.spooling {
                            run.held.push_back(message);
                        } else {
                            run.in_flight.send(&self.target, message);
                        }
                    }
                    if run.spooling {
                        self.spool_held(&mut run).await;
                    }
                    if run.closed {
                        self.closing(&mut run).await;
                    }
                }
                replayed = async { run.replay.as_mut().expect("polled only when set").await }, if run.replay.is_some() => {
                    run.replay = None;
                    self.replayed(&mut run, replayed).await;
                }
                _ = tokio::time::sleep(LINGER), if watch_backlog => {}
                _ = tokio::time::sleep(RETRY_MAX), if !run.held.is_empty() => {
                    self.spool_held(&mut run).await;
                }
                _ = async { fsync_timer.as_mut().expect("polled only when set").tick().await }, if fsync_timer.is_some() => {
                    if let Err(e) = on_spool(&self.spool, Spool::sync).await {
                        tracing::error!(error = %e, "cannot fsync the spool");
                    }
                }
            }
        }
        metrics::gauge!(EVENT_QUEUE_DEPTH).set(0.0);
        if let Err(e) = on_spool(&self.spool, Spool::sync).await {
            tracing::error!(error = %e, "cannot fsync the spool");
        }
        let left = self.spool.lock().unwrap_or_else(PoisonError::into_inner).bytes();
        if left > 0 {
            tracing::warn!(bytes = left, "NATS is away: usage events stay in the spool until the next start");
        }
    }

    /// Adds to `batch` what arrives within [`LINGER`], up to a full message; true if the queue is closed and empty.
    async fn fill(&mut self, batch: &mut Vec<UsageEvent>) -> bool {
        let deadline = tokio::time::Instant::now() + LINGER;
        loop {
            while batch.len() < MAX_EVENTS_PER_MESSAGE {
                match self.queue.try_recv() {
                    Ok(event) => batch.push(event),
                    Err(mpsc::error::TryRecvError::Disconnected) => return true,
                    Err(mpsc::error::TryRecvError::Empty) => break,
                }
            }
            if batch.len() == MAX_EVENTS_PER_MESSAGE || tokio::time::Instant::now() >= deadline {
                return false;
            }
            // One wake-up per message, where looking every millisecond cost five. A message that fills during this
            // sleep still waits out its linger; the next one then starts with what queued meanwhile.
            tokio::time::sleep_until(deadline).await;
        }
    }

    async fn acknowledged(&mut self, run: &mut Run, seq: u64, result: Result<(), async_nats::Error>) {
        match result {
            Ok(()) => {
                if let Some(message) = run.in_flight.messages.remove(&seq) {
                    metrics::counter!(EVENTS_PUBLISHED).increment(u64::from(message.events));
                }
            }
            Err(e) => {
                let diverted = run.in_flight.abandon();
                tracing::warn!(error = %e, messages = diverted.len(),
                    "publishing usage events failed; spooling them and everything after until NATS is back");
                run.spooling = true;
                run.gave_up = false;
                run.retry_delay = Some(next_delay(run.retry_delay));
                run.held.extend(diverted);
                self.spool_held(run).await;
            }
        }
    }

    async fn replayed(&mut self, run: &mut Run, replayed: Replayed) {
        match replayed.failed {
            // An empty spool proves nothing about NATS: keep the backoff of the last failure.
            None if replayed.events == 0 => {}
            None => run.retry_delay = None,
            Some(e) => {
                let delay = next_delay(run.retry_delay);
                run.retry_delay = Some(delay);
                tracing::warn!(error = %e, retry_in = ?delay, replayed = replayed.events,
                    "replaying spooled usage events failed; retrying");
                if run.closed {
                    run.gave_up = true;
                }
            }
        }
        self.spool_held(run).await;
        let empty = self.spool.lock().unwrap_or_else(PoisonError::into_inner).is_empty();
        if empty && run.spooling {
            tracing::info!("spool replayed; publishing directly again");
            run.spooling = false;
            if !run.held.is_empty() {
                // Too large for even an empty spool: publish them directly rather than hold them forever. If that
                // fails they are held again, and tried again after the next replay attempt.
                for message in run.held.drain(..) {
                    run.in_flight.send(&self.target, message);
                }
                self.spool_full.send_replace(false);
            }
        }
    }

    /// Even with the most messages in flight, NATS acknowledges them slower than events come (acks near the publish
    /// timeout, say): the queue is half full, and once it is full requests would wait for room in it.
    fn falling_behind(&self, run: &Run) -> bool {
        run.in_flight.len() >= MAX_IN_FLIGHT_BEHIND && self.queue.len() * 2 >= self.queue.max_capacity()
    }

    /// The queue is closed: messages waiting for room in the spool get it as long as replaying to NATS makes some;
    /// once NATS is away, what cannot be spooled now never will be, so it is counted as lost.
    async fn closing(&mut self, run: &mut Run) {
        self.spool_held(run).await;
        while !run.held.is_empty() && run.spooling {
            let replay = match run.replay.take() {
                Some(replay) => replay,
                None => replay_step(self.spool.clone(), self.target.clone(), None).boxed(),
            };
            let held = run.held.len();
            let replayed = replay.await;
            // NATS is away, or the spool could not be read: no room will come.
            let stuck = replayed.failed.is_some() || !replayed.consumed;
            self.replayed(run, replayed).await;
            if stuck && run.held.len() >= held {
                break;
            }
        }
        self.lose_held(run);
    }

    /// Shutting down with messages that neither NATS nor the spool took: count them and say so.
    fn lose_held(&self, run: &mut Run) {
        if !run.held.is_empty() {
            let lost: u64 = run.held.drain(..).map(|m| u64::from(m.events)).sum();
            metrics::counter!(EVENTS_DROPPED).increment(lost);
            tracing::error!(events = lost, "shutting down with the spool full and NATS away: these events are lost");
        }
    }

    /// Appends held messages to the spool in order, applying the full policy to those that do not fit.
    async fn spool_held(&mut self, run: &mut Run) {
        if run.held.is_empty() {
            return;
        }
        let messages: Vec<SpooledMessage> = run.held.drain(..).collect();
        let policy = self.settings.full_policy;
        let (spooled, dropped, kept, error) = on_spool(&self.spool, move |spool| {
            let mut spooled = 0u64;
            let mut dropped = 0u64;
            let mut kept = VecDeque::new();
            let mut error = None;
            for message in messages {
                if !kept.is_empty() {
                    kept.push_back(message);
                    continue;
                }
                match spool.append(&message) {
                    Ok(()) => spooled += u64::from(message.events),
                    Err(e) => {
                        if policy == SpoolFullPolicy::Drop {
                            dropped += u64::from(message.events);
                        } else {
                            kept.push_back(message);
                        }
                        if !matches!(e, SpoolError::Full { .. }) || error.is_none() {
                            error = Some(e);
                        }
                    }
                }
            }
            (spooled, dropped, kept, error)
        })
        .await;
        metrics::counter!(EVENTS_SPOOLED).increment(spooled);
        metrics::counter!(EVENTS_DROPPED).increment(dropped);
        run.held = kept;
        let full = !run.held.is_empty() || dropped > 0;
        let was_full = self.spool_full.send_replace(full);
        match (&error, was_full, full) {
            (Some(e), false, true) => match self.settings.full_policy {
                SpoolFullPolicy::Block => {
                    tracing::error!(error = %e, "cannot spool usage events: answering verifies with 503 until there is room")
                }
                SpoolFullPolicy::Drop => {
                    tracing::error!(error = %e, "cannot spool usage events: dropping them until there is room")
                }
            },
            (_, true, false) => tracing::warn!("the spool has room again; usage events are spooled again"),
            _ => {}
        }
        if dropped > 0 {
            tracing::error!(events = dropped, "usage events dropped: the spool is full (TOLLGATE_SPOOL_FULL=drop)");
        }
    }
}
