//! The workers: read usage messages from the JetStream consumer in batches, write them to PostgreSQL exactly once,
//! and acknowledge them only after the commit. Any number of workers can share the consumer.

mod copy;
mod dead_letter;
pub mod dlq;
pub mod quota;
pub mod reconcile;
mod store;
mod user_agents;

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::context::ConsumerInfoErrorKind;
use async_nats::jetstream::{self, consumer::pull, Message};
use async_nats::StatusCode;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use rand::Rng;
use tokio_util::sync::CancellationToken;

use tollgate_shared::codec::{self, CodecError};
use tollgate_shared::config::WorkerArgs;
use tollgate_shared::event::UsageEvent;
use tollgate_shared::metrics::{
    start_at_zero, start_labeled_at_zero, CONSUMER_ACK_PENDING, CONSUMER_PENDING, DEAD_LETTERS, DEAD_LETTERS_REFUSED,
    QUOTA_COUNTER_ERRORS, USAGE_DUPLICATES, USAGE_ROWS_WRITTEN, WORKER_BATCH_DURATION, WORKER_BATCH_ERRORS,
    WORKER_BATCH_SIZE, WORKER_LAG,
};
use tollgate_shared::topology::Topology;

pub use copy::CopyEncoder;
use dead_letter::DeadLetters;
pub use dead_letter::{REASON_HEADER, SUBJECT_HEADER};
pub use quota::QuotaCounters;
pub use store::{copy_statement, encode, PeriodTotal, UsageStore, Written};
pub use user_agents::{UserAgents, STORED_MAX as USER_AGENTS_STORED_MAX};

/// Retry policy while PostgreSQL is failing: exponential from 100 ms to 10 s, full jitter. The consumer's
/// `max_deliver` is unlimited (`nats/workers-consumer.json`), so nothing is ever dropped however long PostgreSQL is
/// away (the messages wait in the stream, which has no age limit).
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// In-progress acks per ack wait while a worker holds a batch (writing it, or waiting to retry): each restarts the
/// consumer's ack wait, so JetStream never hands a batch to another worker while one still has it, however long a
/// write waits (for a lock, or for PostgreSQL to answer).
const PROGRESS_PER_ACK_WAIT: u32 = 3;
/// The shortest period between in-progress acks, whatever the ack wait.
const PROGRESS_MIN: Duration = Duration::from_millis(100);
/// How often the consumer's pending counts are read into gauges.
const PENDING_REFRESH: Duration = Duration::from_secs(5);
/// How long past its expiry a pull is still read (see [`pull`]).
const PULL_GRACE: Duration = Duration::from_millis(250);

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
}

/// Called after each commit with the batch's events and the commit time (the benchmark measures lag with it).
pub type CommitObserver = Arc<dyn Fn(&[UsageEvent], DateTime<Utc>) + Send + Sync>;

/// A fetched message and what decoding it gave.
pub struct Delivery {
    pub message: Message,
    /// The events that decoded: all of them, unless the message is unreadable or holds impossible ones.
    pub events: Vec<UsageEvent>,
    /// Why the message goes to the dead-letter stream (the first impossible event's, if it is readable). Its good
    /// events are written all the same: a replay of it writes them again as no-ops.
    pub rejected: Option<CodecError>,
}

impl Delivery {
    /// Decodes `message`, keeping what went wrong for the dead-letter stream.
    pub fn decode(message: Message) -> Delivery {
        let (mut events, mut rejected) = (Vec::new(), None);
        match codec::decode_each(&message.payload) {
            Ok(each) => {
                for event in each {
                    match event {
                        Ok(event) => events.push(event),
                        Err(e) => {
                            rejected.get_or_insert(e);
                        }
                    }
                }
            }
            Err(e) => rejected = Some(e),
        }
        Delivery { message, events, rejected }
    }
}

/// The servers a worker uses.
pub struct Connections {
    pub pool: sqlx::PgPool,
    pub nats: async_nats::Client,
    pub redis: tollgate_shared::connect::BackgroundRedis,
}

/// One worker's state: the store, where dead letters go, the quota counters and an optional commit observer.
pub struct Worker {
    store: UsageStore,
    dead_letters: DeadLetters,
    quota: Option<quota::CounterRaiser>,
    observer: Option<CommitObserver>,
}

impl Worker {
    /// A worker; `quota` None leaves the Redis quota counters alone (tests of the write path alone).
    pub fn new(
        pool: sqlx::PgPool,
        jetstream: jetstream::Context,
        topology: &Topology,
        quota: Option<QuotaCounters>,
    ) -> Worker {
        start_at_zero(&[
            USAGE_ROWS_WRITTEN,
            USAGE_DUPLICATES,
            WORKER_BATCH_ERRORS,
            QUOTA_COUNTER_ERRORS,
            DEAD_LETTERS_REFUSED,
        ]);
        start_labeled_at_zero(DEAD_LETTERS, "reason", CodecError::KINDS);
        Worker {
            store: UsageStore::new(pool),
            dead_letters: DeadLetters::new(jetstream, topology),
            quota: quota.map(quota::CounterRaiser::spawn),
            observer: None,
        }
    }

    /// Lets the quota counters catch up with what this worker committed (briefly: Redis may be away).
    pub async fn finish(self) {
        if let Some(quota) = self.quota {
            quota.finish().await;
        }
    }

    /// Calls `observer` after every commit from now on.
    pub fn observe_commits(&mut self, observer: CommitObserver) {
        self.observer = Some(observer);
    }

    /// One step: write what was decoded in one transaction, dead-letter what was not, then ack everything but a
    /// message the dead-letter stream refused (delivered again after the ack wait). On error nothing is acked, so every
    /// message will be delivered again; dead-lettering only after the write means a batch retried while PostgreSQL is
    /// away does not copy its bad messages again at every attempt.
    pub async fn process_batch(&mut self, messages: &[Message]) -> Result<BatchOutcome, BatchError> {
        let deliveries: Vec<Delivery> = messages.iter().cloned().map(Delivery::decode).collect();
        self.process_deliveries(&deliveries).await
    }

    /// [`Worker::process_batch`] on messages already decoded.
    pub async fn process_deliveries(&mut self, deliveries: &[Delivery]) -> Result<BatchOutcome, BatchError> {
        let started = Instant::now();
        let events: Vec<UsageEvent> = deliveries.iter().flat_map(|d| &d.events).cloned().collect();
        let written = self.store.write(&events).await?;
        let committed_at = Utc::now();
        // Counted once committed, whatever fails after: a retry finds the rows there, as duplicates.
        metrics::counter!(USAGE_ROWS_WRITTEN).increment(written.inserted);
        metrics::counter!(USAGE_DUPLICATES).increment(written.duplicates);
        // Before anything else can fail: a batch retried after its commit raises its counters again, but only to
        // what is committed.
        if let Some(quota) = &self.quota {
            quota.raise(written.totals);
        }
        let mut dead_lettered = 0;
        let mut kept = vec![false; deliveries.len()];
        for (delivery, kept) in deliveries.iter().zip(&mut kept) {
            let Some(reason) = &delivery.rejected else { continue };
            match self.dead_letters.store(&delivery.message, reason).await {
                Ok(()) => dead_lettered += 1,
                // Not acked, so JetStream delivers it again after the ack wait; the rest of the batch, written, goes
                // on rather than wait with it.
                Err(e) => {
                    metrics::counter!(DEAD_LETTERS_REFUSED).increment(1);
                    tracing::warn!(error = %e, "cannot move an undecodable message to the dead-letter stream (if it \
                        is full, raise its limits with `nats stream edit`): it stays in the usage stream, tried again \
                        after the ack wait");
                    *kept = true;
                }
            }
        }
        for (delivery, _) in deliveries.iter().zip(kept).filter(|(_, kept)| !kept) {
            // A lost ack only means a re-delivery, which the write above makes harmless.
            if let Err(e) = delivery.message.ack().await {
                tracing::warn!(error = %e, "ack failed; the message will be re-delivered and skipped");
            }
        }
        let lag = metrics::histogram!(WORKER_LAG);
        for event in &events {
            lag.record((committed_at - event.ts).num_microseconds().unwrap_or(0).max(0) as f64 / 1e6);
        }
        if let Some(observer) = &self.observer {
            observer(&events, committed_at);
        }
        metrics::histogram!(WORKER_BATCH_SIZE).record(events.len() as f64);
        metrics::histogram!(WORKER_BATCH_DURATION).record(started.elapsed().as_secs_f64());
        Ok(BatchOutcome {
            messages: deliveries.len(),
            inserted: written.inserted,
            duplicates: written.duplicates,
            dead_lettered,
        })
    }
}

/// In-progress acks for a batch while its worker holds it (see [`PROGRESS_PER_ACK_WAIT`]), on one timer for the
/// whole time: the attempts and waits it spans are each shorter than its period.
struct Holding<'a> {
    deliveries: &'a [Delivery],
    nats: &'a async_nats::Client,
    timer: tokio::time::Interval,
}

impl<'a> Holding<'a> {
    fn new(deliveries: &'a [Delivery], nats: &'a async_nats::Client, ack_wait: Duration) -> Holding<'a> {
        let every = (ack_wait / PROGRESS_PER_ACK_WAIT).max(PROGRESS_MIN);
        let mut timer = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Holding { deliveries, nats, timer }
    }

    /// Runs `work`, sending the acks that fall due meanwhile.
    async fn during<T>(&mut self, work: impl Future<Output = T>) -> T {
        tokio::pin!(work);
        loop {
            tokio::select! {
                done = &mut work => return done,
                _ = self.timer.tick() => {
                    // While NATS reconnects, its client reads nothing of its queue: an ack would wait there (and
                    // hold up the write meanwhile) to arrive late anyway.
                    if self.nats.connection_state() != async_nats::connection::State::Connected {
                        continue;
                    }
                    for delivery in self.deliveries {
                        // A lost one costs at worst a re-delivery, which the write makes harmless.
                        let _ = delivery.message.ack_with(jetstream::AckKind::Progress).await;
                    }
                }
            }
        }
    }
}

/// Consumes until `shutdown` is cancelled. A batch already fetched is written and acked before returning; a batch
/// that cannot be written is retried with backoff (keeping its messages from being re-delivered meanwhile).
pub async fn run(
    args: WorkerArgs,
    topology: Topology,
    redis_prefix: String,
    connections: Connections,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    run_observed(args, topology, redis_prefix, connections, None, shutdown).await
}

/// [`run`], calling `observer` after each commit.
pub async fn run_observed(
    args: WorkerArgs,
    topology: Topology,
    redis_prefix: String,
    connections: Connections,
    observer: Option<CommitObserver>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    // Before anything registers a metric: it would count nowhere.
    tollgate_shared::metrics::install();
    let Connections { pool, nats, redis } = connections;
    let jetstream = jetstream::new(nats.clone());
    let mut consumer = topology.ensure_worker_side(&jetstream).await?;
    let mut fetcher = Fetcher::new(&args, &nats, jetstream.clone()).await?;
    let quota = QuotaCounters::new(redis, redis_prefix);
    let mut worker = Worker::new(pool, jetstream.clone(), &topology, Some(quota));
    if let Some(observer) = observer {
        worker.observe_commits(observer);
    }
    // JetStream does not answer a pull for a consumer that is gone: the consumer's regular reading finds out.
    let consumer_gone = Arc::new(AtomicBool::new(false));
    let limits = Arc::new(ConsumerLimits::new(&consumer.cached_info().config));
    // Aborted with this future too (a bench stopped midway drops it), or it would make the consumer again for ever.
    let watcher = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(watch_consumer(
        consumer.clone(),
        consumer_gone.clone(),
        limits.clone(),
    )));
    tracing::info!(stream = %topology.stream, consumer = %topology.workers_consumer(), "worker consuming");
    'consume: while !shutdown.is_cancelled() {
        // Not raced against shutdown: a pull abandoned mid-way would leave its messages delivered to nobody until
        // the ack wait expires. A fetch ends within `batch_wait` anyway.
        let deliveries = fetcher.fetch(&consumer, limits.max_batch()).await;
        if consumer_gone.swap(false, Ordering::Relaxed) {
            match recreate_consumer(&topology, &jetstream, &shutdown).await {
                Some(recreated) => consumer = recreated,
                None => break,
            }
            limits.update(&consumer.cached_info().config);
        }
        if deliveries.is_empty() {
            continue;
        }
        let mut holding = Holding::new(&deliveries, &nats, limits.ack_wait());
        let mut backoff = Backoff::new();
        loop {
            match holding.during(worker.process_deliveries(&deliveries)).await {
                Ok(_) => break,
                Err(e) => {
                    metrics::counter!(WORKER_BATCH_ERRORS).increment(1);
                    tracing::warn!(error = %e, retry_within = ?backoff.ceiling, "batch failed; retrying");
                    if shutdown.is_cancelled() {
                        // Not acked: JetStream re-delivers these to the next worker.
                        break 'consume;
                    }
                    if !holding.during(backoff.wait(&shutdown)).await {
                        break 'consume;
                    }
                }
            }
        }
    }
    watcher.abort();
    worker.finish().await;
    tracing::info!("worker stopped");
    Ok(())
}

/// Creates the streams and the consumer again after they went (deleted by hand, or NATS restarted without its
/// storage), retrying until NATS takes them; None on shutdown. The stream keeps every unacknowledged message, and
/// one already written is skipped by its event id, so nothing is lost or doubled.
async fn recreate_consumer(
    topology: &Topology,
    jetstream: &jetstream::Context,
    shutdown: &CancellationToken,
) -> Option<jetstream::consumer::Consumer<pull::Config>> {
    let mut backoff = Backoff::new();
    loop {
        match topology.ensure_worker_side(jetstream).await {
            Ok(consumer) => {
                tracing::info!(consumer = %topology.workers_consumer(), "workers' consumer created again");
                return Some(consumer);
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_within = ?backoff.ceiling, "cannot create the workers' consumer again")
            }
        }
        if !backoff.wait(shutdown).await {
            return None;
        }
    }
}

/// What the workers' consumer allows, as last read: an operator may edit it while the workers run.
struct ConsumerLimits {
    /// Its largest pull (0: any).
    max_batch: AtomicI64,
    /// Its ack wait, in microseconds: what in-progress acks must come within.
    ack_wait_us: AtomicU64,
}

impl ConsumerLimits {
    fn new(config: &jetstream::consumer::Config) -> ConsumerLimits {
        let limits = ConsumerLimits { max_batch: AtomicI64::new(0), ack_wait_us: AtomicU64::new(0) };
        limits.update(config);
        limits
    }

    fn update(&self, config: &jetstream::consumer::Config) {
        self.max_batch.store(config.max_batch, Ordering::Relaxed);
        let ack_wait_us = u64::try_from(config.ack_wait.as_micros()).unwrap_or(u64::MAX);
        self.ack_wait_us.store(ack_wait_us, Ordering::Relaxed);
    }

    fn max_batch(&self) -> i64 {
        self.max_batch.load(Ordering::Relaxed)
    }

    fn ack_wait(&self) -> Duration {
        Duration::from_micros(self.ack_wait_us.load(Ordering::Relaxed))
    }
}

/// Reads the consumer every few seconds: its pending counts into gauges, what it allows into `limits`, and sets
/// `gone` when the consumer or its stream no longer exists.
async fn watch_consumer(
    mut consumer: jetstream::consumer::Consumer<pull::Config>,
    gone: Arc<AtomicBool>,
    limits: Arc<ConsumerLimits>,
) {
    loop {
        match consumer.info().await {
            Ok(info) => {
                metrics::gauge!(CONSUMER_PENDING).set(info.num_pending as f64);
                metrics::gauge!(CONSUMER_ACK_PENDING).set(info.num_ack_pending as f64);
                limits.update(&info.config);
            }
            Err(e) if matches!(e.kind(), ConsumerInfoErrorKind::NotFound | ConsumerInfoErrorKind::StreamNotFound) => {
                tracing::warn!(error = %e, "the workers' consumer is gone; creating it again");
                gone.store(true, Ordering::Relaxed);
            }
            Err(e) => tracing::debug!(error = %e, "cannot read the consumer's pending counts"),
        }
        tokio::time::sleep(PENDING_REFRESH).await;
    }
}

/// Fills batches: the first pull waits up to `batch_wait`; more pulls follow, without waiting, until the batch holds
/// `batch_events` events or `batch_messages` messages or the stream has nothing more. Messages carry a variable
/// number of events, so each pull asks for as many messages as the recent average says will fill the batch.
///
/// Every pull of a worker is answered on one subscription that lives as long as the worker, each pull on a subject
/// of its own under it. A pull can outlive the worker's reading of it: read only until its expiry plus a grace period
/// (see [`Fetcher::pull`]), or made while NATS was away, when the client keeps the request and sends it on reconnect,
/// long after the worker moved on. The messages JetStream hands to such a pull still arrive here and go into the next
/// batch; with an inbox per pull they went to an inbox nobody read and waited out the 30 s ack wait.
struct Fetcher {
    batch_messages: usize,
    batch_events: usize,
    batch_wait: Duration,
    events_per_message: f64,
    jetstream: jetstream::Context,
    /// `<inbox>.<n>` is the reply subject of pull `n`.
    inbox: String,
    replies: async_nats::Subscriber,
    pulls: u64,
}

impl Fetcher {
    async fn new(
        args: &WorkerArgs,
        nats: &async_nats::Client,
        jetstream: jetstream::Context,
    ) -> Result<Fetcher, async_nats::SubscribeError> {
        let inbox = nats.new_inbox();
        let replies = nats.subscribe(format!("{inbox}.*")).await?;
        Ok(Fetcher {
            batch_messages: args.batch_messages.max(1),
            batch_events: args.batch_events.max(1),
            batch_wait: args.batch_wait,
            events_per_message: 1.0,
            jetstream,
            inbox,
            replies,
            pulls: 0,
        })
    }

    /// A batch from `consumer`, whose pulls may take at most `max_batch` messages (0: any number).
    async fn fetch(&mut self, consumer: &jetstream::consumer::Consumer<pull::Config>, max_batch: i64) -> Vec<Delivery> {
        let mut deliveries: Vec<Delivery> = Vec::new();
        let mut events = 0;
        // The first pull waits up to `batch_wait` for enough messages; the next ones take only what is there.
        let mut wait = Some(self.batch_wait);
        // A consumer edited to take smaller pulls refuses larger ones: asked for no more than it allows.
        let allowed = usize::try_from(max_batch).ok().filter(|n| *n > 0);
        while deliveries.len() < self.batch_messages && events < self.batch_events {
            let wanted = ((self.batch_events - events) as f64 / self.events_per_message).ceil() as usize;
            let wanted = wanted.clamp(1, self.batch_messages - deliveries.len()).min(allowed.unwrap_or(usize::MAX));
            let pulled = self.pull(consumer, wanted, wait.take()).await;
            if pulled.is_empty() {
                break;
            }
            for message in pulled {
                let delivery = Delivery::decode(message);
                events += delivery.events.len();
                deliveries.push(delivery);
            }
        }
        if !deliveries.is_empty() {
            let average = events as f64 / deliveries.len() as f64;
            self.events_per_message = (0.5 * self.events_per_message + 0.5 * average).max(1.0);
        }
        deliveries
    }

    /// Up to `max` messages, waiting at most `wait` for them (None: only those already there).
    ///
    /// The server ends a pull with a status message when it expires, or when nothing is there for a pull that does
    /// not wait. Under load that word can come late, which would hold a batch, so the pull is read until `wait` plus a
    /// grace period at most; what the server sends for it after that arrives with a later pull.
    async fn pull(
        &mut self,
        consumer: &jetstream::consumer::Consumer<pull::Config>,
        max: usize,
        wait: Option<Duration>,
    ) -> Vec<Message> {
        self.pulls += 1;
        let reply = format!("{}.{}", self.inbox, self.pulls);
        let request = pull::BatchConfig { batch: max, expires: wait, no_wait: wait.is_none(), ..Default::default() };
        if let Err(e) = consumer.request_batch(request, reply.clone().into()).await {
            tracing::warn!(error = %e, "cannot fetch from JetStream; retrying");
            tokio::time::sleep(BACKOFF_FIRST).await;
            return Vec::new();
        }
        let give_up = tokio::time::sleep(wait.unwrap_or_default() + PULL_GRACE);
        tokio::pin!(give_up);
        let mut messages = Vec::new();
        while messages.len() < max {
            tokio::select! {
                message = self.replies.next() => {
                    let Some(message) = message else {
                        tracing::warn!("the NATS client is closed; cannot fetch from JetStream");
                        tokio::time::sleep(BACKOFF_FIRST).await;
                        break;
                    };
                    match message.status {
                        None | Some(StatusCode::OK) => {
                            messages.push(Message { message, context: self.jetstream.clone() });
                        }
                        // The end of an earlier pull, come late: this one goes on.
                        Some(_) if message.subject.as_str() != reply => {}
                        Some(StatusCode::TIMEOUT | StatusCode::NOT_FOUND) => break,
                        Some(StatusCode::IDLE_HEARTBEAT) => {}
                        Some(status) => {
                            tracing::warn!(%status, description = ?message.description,
                                "error while fetching from JetStream");
                            // Such a refusal (a consumer edited to allow shorter pulls, say) comes again at once:
                            // pause as after a failed request rather than ask again in a tight loop.
                            if messages.is_empty() {
                                tokio::time::sleep(BACKOFF_FIRST).await;
                            }
                            break;
                        }
                    }
                }
                _ = &mut give_up => break,
            }
        }
        messages
    }
}

/// Retries' waits: a random time up to a ceiling that doubles from [`BACKOFF_FIRST`] to [`BACKOFF_MAX`] (full
/// jitter, so workers retrying together do not retry in lockstep).
struct Backoff {
    ceiling: Duration,
}

impl Backoff {
    fn new() -> Backoff {
        Backoff { ceiling: BACKOFF_FIRST }
    }

    /// Waits before the next attempt; false if `shutdown` came first.
    async fn wait(&mut self, shutdown: &CancellationToken) -> bool {
        let wait = self.ceiling.mul_f64(rand::rng().random::<f64>());
        self.ceiling = (self.ceiling * 2).min(BACKOFF_MAX);
        tokio::select! {
            _ = shutdown.cancelled() => false,
            _ = tokio::time::sleep(wait) => true,
        }
    }
}
