//! The in-process key cache: the hot path never asks PostgreSQL about a key it has seen recently.
//!
//! Known keys are held by hash; unknown hashes are held in a bounded negative cache for a TTL, so a flood of
//! made-up keys costs at most one lookup per key per TTL. A refresher asks PostgreSQL every `key_refresh` which
//! keys, organizations and tiers changed and applies those changes, so a revocation reaches the cache within about
//! that long, on a connection of its own: a flood of made-up keys may hold every pooled one, and must not hold up a
//! revocation. Changes are found by the transaction that made them: each refresh reads, in one snapshot, the changes
//! of the transactions the previous one's snapshot could not see yet, so that one whose commit became visible late is
//! found all the same, and none is read twice. A record older than
//! `key_recheck` is read again in the background while it keeps deciding, so that no answer waits for PostgreSQL, and
//! an outage of PostgreSQL fails no key the cache holds. A read that was under way while a change was applied is not
//! kept (it may predate the change). [`KeyCache::apply`] and [`KeyCache::flush`] are the entry points a pushed change
//! feed will use.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use quick_cache::sync::Cache;
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnection, PgPoolOptions, Postgres};
use sqlx::{Connection, FromRow, PgPool, Row};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use tollgate_shared::domain::Role;
use tollgate_shared::key::KeyHash;
use tollgate_shared::metrics::{LabeledCounter, KEY_LOOKUPS, KEY_REFRESH_AGE};

/// What the validator needs to decide on a key: the key's own settings and its organization's.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct KeyRecord {
    pub id: Uuid,
    pub org_id: Uuid,
    pub name: String,
    #[sqlx(try_from = "String")]
    pub role: Role,
    pub scopes: Vec<String>,
    pub custom_rate_limit_per_minute: Option<i32>,
    pub active: bool,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub org_active: bool,
    pub org_rate_limit_per_minute: Option<i32>,
    pub org_monthly_request_limit: Option<i64>,
    /// The organization's limits run in shadow mode.
    pub org_shadow: bool,
    /// The tier's main window (e.g. 1000 per 3600 s) and burst window (e.g. 50 per 60 s); `None` = no such limit.
    pub tier_window_limit: Option<i64>,
    pub tier_window_seconds: i32,
    pub tier_burst_limit: Option<i64>,
    pub tier_burst_seconds: i32,
    pub tier_shadow: bool,
}

const RECORD_SELECT: &str = "SELECT k.id, k.org_id, k.name, k.role, k.scopes, k.custom_rate_limit_per_minute, k.active, k.expires_at, k.revoked_at, o.active AS org_active,
        o.rate_limit_per_minute AS org_rate_limit_per_minute,
        o.monthly_request_limit AS org_monthly_request_limit, o.rate_limit_shadow AS org_shadow,
        t.window_limit AS tier_window_limit, t.window_seconds AS tier_window_seconds,
        t.burst_limit AS tier_burst_limit, t.burst_seconds AS tier_burst_seconds, t.shadow AS tier_shadow, k.key_hash
    FROM api_keys k JOIN organizations o ON o.id = k.org_id JOIN rate_limit_tiers t ON t.name = k.rate_limit_tier";

const NEGATIVE_CAPACITY: usize = 100_000;
/// Stale records remembered as being read again (past this many, one may be read twice: no harm).
const RELOADING_CAPACITY: usize = 10_000;
/// How long a refresh waits for PostgreSQL's first answer (after which PostgreSQL counts as away), and a missed key
/// for its record (after which lookups of that key fail at once for as long again).
const DATABASE_TIMEOUT: Duration = Duration::from_secs(1);
/// Keys whose last read failed remembered (past this many, one may be read again sooner: no harm).
const FAILED_READS_CAPACITY: usize = 10_000;
/// How long a stale record waits before it is read again after a failed attempt (PostgreSQL away).
const RELOAD_RETRY: Duration = Duration::from_secs(10);
/// Changed records a refresh applies before it lets other tasks run. A bulk change (100 000 keys imported at once)
/// read and applied in one go held the runtime for 40–60 ms at a time: long enough for requests' Redis calls to time
/// out, open the breaker, and be decided by the failure policy.
const APPLIED_PER_TURN: usize = 256;

/// The caches are plain concurrent maps with eviction (quick_cache: a lookup is a hash probe under a shard's read
/// lock, with no per-read bookkeeping), so each entry carries the time it was stored.
#[derive(Clone)]
pub struct KeyCache {
    known: Arc<Cache<KeyHash, Cached>>,
    /// Hashes no key has, with when that was found.
    unknown: Arc<Cache<KeyHash, Instant>>,
    negative_ttl: Duration,
    /// Age past which a known record is read again.
    recheck: Duration,
    /// Whether the refresher's last attempt, or a lookup's since, could not reach PostgreSQL: then only the refresher
    /// asks it.
    database_away: Arc<AtomicBool>,
    /// Stale records being read again, with when the attempt began: one attempt per key at a time, and none for
    /// [`RELOAD_RETRY`] after a failed one.
    reloading: Arc<Cache<KeyHash, Instant>>,
    /// Keys whose last read failed (timed out, or found a row this release cannot read), with when: their lookups
    /// fail at once for [`DATABASE_TIMEOUT`] rather than each waiting out a read of its own, or logging again.
    failed_reads: Arc<Cache<KeyHash, Instant>>,
    /// For lookups and rechecks.
    pool: PgPool,
    /// The refresher's own connection (made when first needed), on the same server and settings.
    refresher: PgPool,
    /// Lookups by where the answer came from.
    lookups: Arc<LabeledCounter<1>>,
    /// The transactions whose changes the last refresh (or, before the first, the cache's creation) could not see yet:
    /// what the next refresh looks for.
    unseen: Arc<Mutex<Unseen>>,
    /// Changes applied so far: a read during which this moved may predate one of them, and is not kept.
    applied: Arc<AtomicU64>,
}

#[derive(Clone)]
struct Cached {
    record: Arc<KeyRecord>,
    stored: Instant,
}

impl Cached {
    fn new(record: Arc<KeyRecord>) -> Cached {
        Cached { record, stored: Instant::now() }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    /// Not asked: PostgreSQL could not be reached lately, so this one would wait out the pool's timeout for nothing.
    #[error("PostgreSQL does not answer (the key cache's last query failed)")]
    DatabaseAway,
    /// Not asked: this key's last read failed a moment ago.
    #[error("this key's record could not be read a moment ago")]
    ReadFailedLately,
    #[error("key lookup failed: {0}")]
    Query(String),
    /// The key's row holds what this validator cannot read (a role or value a newer release added, say).
    #[error("the key's row cannot be read: {0}")]
    Unreadable(sqlx::Error),
}

/// Why a refresh read no changes.
#[derive(Debug, thiserror::Error)]
pub enum RefreshError {
    #[error("PostgreSQL did not answer within {DATABASE_TIMEOUT:?}")]
    NoAnswer,
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// Why a cache miss produced no record.
enum Miss {
    Unknown,
    Failed(LookupError),
}

impl KeyCache {
    /// A cache of up to `capacity` keys. Asks PostgreSQL where to look for changes from before any lookup, so that
    /// every change a lookup's read misses is found by a later refresh.
    pub async fn new(
        pool: PgPool,
        capacity: u64,
        negative_ttl: Duration,
        recheck: Duration,
    ) -> Result<KeyCache, RefreshError> {
        let capacity = usize::try_from(capacity).unwrap_or(usize::MAX).max(1);
        let cache = KeyCache {
            known: Arc::new(Cache::new(capacity)),
            unknown: Arc::new(Cache::new(NEGATIVE_CAPACITY)),
            negative_ttl,
            recheck,
            database_away: Arc::new(AtomicBool::new(false)),
            reloading: Arc::new(Cache::new(RELOADING_CAPACITY)),
            failed_reads: Arc::new(Cache::new(FAILED_READS_CAPACITY)),
            refresher: PgPoolOptions::new()
                .max_connections(1)
                // Kept for good, rather than made again every 30 minutes by sqlx's default, which on a server out of
                // connections would fail a refresh that needed none.
                .max_lifetime(None)
                .idle_timeout(None)
                .connect_lazy_with((*pool.connect_options()).clone()),
            pool,
            lookups: Arc::new(LabeledCounter::new(
                KEY_LOOKUPS,
                ["source"],
                [["cache"], ["negative_cache"], ["database"], ["recheck"]],
            )),
            unseen: Arc::new(Mutex::new(Unseen::default())),
            applied: Arc::new(AtomicU64::new(0)),
        };
        let mut connection = cache.refresher_connection().await?;
        let unseen = tokio::time::timeout(DATABASE_TIMEOUT, Unseen::now(&mut connection));
        *cache.unseen() = unseen.await.map_err(|_| RefreshError::NoAnswer)??;
        Ok(cache)
    }

    /// Whether the key's record is cached: its lookup would ask nothing of PostgreSQL.
    pub fn holds(&self, hash: &KeyHash) -> bool {
        self.known.get(hash).is_some()
    }

    /// The record for a key hash, or `None` if no such key exists. Concurrent misses on one hash share one query.
    pub async fn lookup(&self, hash: KeyHash) -> Result<Option<Arc<KeyRecord>>, LookupError> {
        if let Some(cached) = self.known.get(&hash) {
            self.lookups.increment(["cache"]);
            if cached.stored.elapsed() >= self.recheck {
                self.reload_in_background(hash);
            }
            return Ok(Some(cached.record));
        }
        if self.is_known_unknown(&hash) {
            self.lookups.increment(["negative_cache"]);
            return Ok(None);
        }
        // Answered at once rather than after the pool's wait for a connection: a flood of new or made-up keys during
        // an outage would otherwise hold a task and a waiting request each for that long.
        if self.database_away.load(Ordering::Relaxed) {
            return Err(LookupError::DatabaseAway);
        }
        // Set when this lookup reads the record itself (rather than waiting on another's read), with `applied` then.
        let mut read_here = None;
        let loaded = self
            .known
            .get_or_insert_async(&hash, async {
                // Lookups of one hash wait for each other's query; one that waited on a query that found no key
                // finds the answer here instead of asking again, and one that waited on a query that failed fails
                // too, rather than each waiting out a query of its own in turn.
                if self.is_known_unknown(&hash) {
                    return Err(Miss::Unknown);
                }
                if self.database_away.load(Ordering::Relaxed) {
                    return Err(Miss::Failed(LookupError::DatabaseAway));
                }
                if self.failed_reads.get(&hash).is_some_and(|failed| failed.elapsed() < DATABASE_TIMEOUT) {
                    return Err(Miss::Failed(LookupError::ReadFailedLately));
                }
                self.lookups.increment(["database"]);
                let applied = self.changes_applied();
                read_here = Some(applied);
                match self.read(hash).await {
                    Ok(Some(record)) => Ok(Cached::new(Arc::new(record))),
                    Ok(None) => {
                        self.remember_unknown(hash, applied);
                        Err(Miss::Unknown)
                    }
                    Err(e) => {
                        self.failed_reads.insert(hash, Instant::now());
                        Err(Miss::Failed(e))
                    }
                }
            })
            .await;
        // A change applied while the record was being read found it not cached yet, and replaced nothing: the record
        // answers the lookups that waited for it, and the next one reads it again.
        if let (Ok(_), Some(applied)) = (&loaded, read_here) {
            if self.changes_applied() != applied {
                self.known.remove(&hash);
            }
        }
        match loaded {
            Ok(cached) => Ok(Some(cached.record)),
            Err(Miss::Failed(e)) => Err(e),
            Err(Miss::Unknown) => Ok(None),
        }
    }

    /// The key's record as PostgreSQL has it now, or `None` if no key has this hash; at most [`DATABASE_TIMEOUT`]
    /// is waited for it. A query that fails (PostgreSQL not reached) marks PostgreSQL away until the refresher hears
    /// from it again; one that is only slow does not (a cold cache's burst of lookups can queue for a connection).
    async fn read(&self, hash: KeyHash) -> Result<Option<KeyRecord>, LookupError> {
        let sql = format!("{RECORD_SELECT} WHERE k.key_hash = $1");
        let query = sqlx::query(&sql).bind(hash.as_bytes()).fetch_optional(&self.pool);
        let row = match tokio::time::timeout(DATABASE_TIMEOUT, query).await {
            Ok(Ok(row)) => row,
            Ok(Err(e)) => {
                self.database_away.store(true, Ordering::Relaxed);
                return Err(LookupError::Query(e.to_string()));
            }
            Err(_) => return Err(LookupError::Query(format!("no answer within {DATABASE_TIMEOUT:?}"))),
        };
        let record = row.as_ref().map(KeyRecord::from_row).transpose();
        record.map_err(|e| {
            self.forget_unreadable(hash, row.and_then(|row| row.try_get("id").ok()), &e);
            LookupError::Unreadable(e)
        })
    }

    /// Reads a stale record again without making its request wait. Until that succeeds, the stale record keeps
    /// deciding (the refresher still applies every change it sees); a key whose row is gone becomes unknown.
    fn reload_in_background(&self, hash: KeyHash) {
        if self.database_away.load(Ordering::Relaxed)
            || self.reloading.get(&hash).is_some_and(|began| began.elapsed() < RELOAD_RETRY)
        {
            return;
        }
        self.reloading.insert(hash, Instant::now());
        let cache = self.clone();
        tokio::spawn(async move {
            // Not a lookup a request waited on: counted apart.
            cache.lookups.increment(["recheck"]);
            let applied = cache.changes_applied();
            match cache.read(hash).await {
                Ok(Some(record)) => {
                    cache.store(hash, record);
                    // A change applied meanwhile may be newer than what was read: the key is read again on its
                    // next use.
                    if cache.changes_applied() != applied {
                        cache.known.remove(&hash);
                    }
                }
                Ok(None) => {
                    cache.known.remove(&hash);
                    cache.remember_unknown(hash, applied);
                }
                // Forgotten by `read` already.
                Err(LookupError::Unreadable(_)) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read a stale key record again; it keeps deciding meanwhile");
                    return;
                }
            }
            cache.reloading.remove(&hash);
        });
    }

    /// Forgets a key whose row this release cannot read: its lookups fail until the row is readable again.
    fn forget_unreadable(&self, hash: KeyHash, key_id: Option<Uuid>, e: &sqlx::Error) {
        tracing::error!(?key_id, error = %e, "cannot read a key's row; the key gets 503 until it can be read");
        // A change too: a read under way may predate it.
        self.applied.fetch_add(1, Ordering::SeqCst);
        self.known.remove(&hash);
        self.unknown.remove(&hash);
    }

    /// How many changes have been applied: a read is kept only if this has not moved while it ran.
    fn changes_applied(&self) -> u64 {
        self.applied.load(Ordering::SeqCst)
    }

    /// Remembers that a read, begun when `applied` changes had been applied, found no key with this hash; unless a
    /// change was applied meanwhile (the key may have been made since the read, and the change found nothing to
    /// replace).
    fn remember_unknown(&self, hash: KeyHash, applied: u64) {
        self.unknown.insert(hash, Instant::now());
        if self.changes_applied() != applied {
            self.unknown.remove(&hash);
        }
    }

    /// Whether `hash` was found to be no key's within the negative-cache TTL.
    fn is_known_unknown(&self, hash: &KeyHash) -> bool {
        match self.unknown.get(hash) {
            Some(found) if found.elapsed() < self.negative_ttl => true,
            Some(_) => {
                self.unknown.remove(hash);
                false
            }
            None => false,
        }
    }

    /// Applies a changed record: replaces it if cached, and forgets that its hash was unknown.
    pub fn apply(&self, hash: KeyHash, record: KeyRecord) {
        // Before the record is stored: a read under way now, which may predate the change, sees it moved once done.
        self.applied.fetch_add(1, Ordering::SeqCst);
        self.store(hash, record);
    }

    /// Replaces a cached record, and forgets that its hash was unknown.
    fn store(&self, hash: KeyHash, record: KeyRecord) {
        self.unknown.remove(&hash);
        // Not cached: nothing to replace (the next lookup loads it).
        let _ = self.known.replace(hash, Cached::new(Arc::new(record)), true);
    }

    /// Forgets everything (after a change feed lost track, say).
    pub fn flush(&self) {
        self.applied.fetch_add(1, Ordering::SeqCst);
        self.known.clear();
        self.unknown.clear();
    }

    async fn refresher_connection(&self) -> Result<PoolConnection<Postgres>, RefreshError> {
        let acquire = tokio::time::timeout(DATABASE_TIMEOUT, self.refresher.acquire());
        Ok(acquire.await.map_err(|_| RefreshError::NoAnswer)??)
    }

    fn unseen(&self) -> std::sync::MutexGuard<'_, Unseen> {
        // A plain value, always valid: a poisoned lock is safe to reuse.
        self.unseen.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies every key, organization and tier change not applied yet; returns how many keys changed (each once,
    /// whether the key, its organization or its tier changed, or all three).
    pub async fn refresh(&self) -> Result<usize, RefreshError> {
        let mut connection = self.refresher_connection().await?;
        // What this snapshot cannot see yet is what the next refresh looks for.
        let snapshot = async {
            let mut snapshot = connection.begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY").await?;
            let now = Unseen::now(&mut snapshot).await?;
            Ok::<_, sqlx::Error>((snapshot, now))
        };
        let (mut snapshot, now) =
            tokio::time::timeout(DATABASE_TIMEOUT, snapshot).await.map_err(|_| RefreshError::NoAnswer)??;
        let mut last = self.unseen().clone();
        let mut before = now.next;
        // A session of the refresher's other than the last one's: PostgreSQL may have restarted (after a crash, its
        // last transactions lost and their ids given out again), or be another server (a restore, a fail-over, a
        // cut-over), whose transactions do not follow on from those seen. Every key's row is read once again, whatever
        // its mark (a restore's rows keep another server's).
        if last.session != now.session {
            tracing::info!("a new connection to PostgreSQL, perhaps to another server: reading every key again");
            last = Unseen::default();
            before = i64::MAX;
        }
        // Changes by transactions the last snapshot could not see, which this one can. (Marks past every transaction
        // of this server's, copied from another server's rows by a restore or logical replication, are not read
        // again and again.)
        let changed =
            |table| format!("({table}.changed_in >= $1 OR {table}.changed_in = ANY($2)) AND {table}.changed_in < $3");
        let (key, org, tier) = (changed("k"), changed("o"), changed("t"));
        // Index scans per table rather than one OR, which would scan every key each time; each arm leaves out the
        // keys an earlier one returns, so that a key whose organization or tier changed with it is read once.
        let sql = format!(
            "{RECORD_SELECT} WHERE {key} \
             UNION ALL {RECORD_SELECT} WHERE {org} AND NOT ({key}) \
             UNION ALL {RECORD_SELECT} WHERE {tier} AND NOT ({key}) AND NOT ({org})"
        );
        let query = sqlx::query(&sql).bind(last.next).bind(&last.running).bind(before);
        let mut rows = query.fetch(&mut *snapshot);
        let mut changed = 0usize;
        while let Some(row) = rows.try_next().await? {
            changed += 1;
            let hash = row.try_get::<Vec<u8>, _>("key_hash").ok().and_then(|hash| hash.try_into().ok());
            let Some(hash) = hash.map(KeyHash) else { continue };
            // One row this release cannot read must not hold up every later change: its key is forgotten (its
            // lookups fail until the row is readable again) and the refresh goes on.
            match KeyRecord::from_row(&row) {
                Ok(record) => self.apply(hash, record),
                Err(e) => self.forget_unreadable(hash, row.try_get("id").ok(), &e),
            }
            if changed.is_multiple_of(APPLIED_PER_TURN) {
                tokio::task::yield_now().await;
            }
        }
        drop(rows);
        snapshot.commit().await?;
        *self.unseen() = now;
        Ok(changed)
    }

    /// Polls for changes every `interval` until `shutdown`.
    pub async fn keep_fresh(self, interval: Duration, shutdown: CancellationToken) {
        let mut heard = Instant::now();
        let age = metrics::gauge!(KEY_REFRESH_AGE);
        age.set(0.0);
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticker.tick() => {}
            }
            match self.refresh().await {
                Ok(_) => {
                    heard = Instant::now();
                    self.database_away.store(false, Ordering::Relaxed);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot refresh the key cache; keys not cached get 503 until it can");
                    self.database_away.store(true, Ordering::Relaxed);
                }
            }
            age.set(heard.elapsed().as_secs_f64());
        }
    }
}

/// The transactions a snapshot of PostgreSQL's could not see (by their 64-bit ids, as `pg_current_xact_id()`, which the
/// triggers put in `changed_in`): those running then, and every one from `next` on.
#[derive(Clone, Debug, Default)]
struct Unseen {
    next: i64,
    running: Vec<i64>,
    /// The session the snapshot was taken in: its server's start and its process. The refresher keeps its connection
    /// for good, so a new one follows a broken one: ids are known to follow on from those seen only in the same one.
    session: Option<(DateTime<Utc>, i32)>,
}

impl Unseen {
    /// As the snapshot of the statement it runs in (of its transaction, in one of repeatable read) sees them.
    async fn now(connection: &mut PgConnection) -> Result<Unseen, sqlx::Error> {
        let sql = "SELECT pg_snapshot_xmax(now)::text::bigint, \
                          ARRAY(SELECT pg_snapshot_xip(now)::text::bigint), pg_postmaster_start_time(), pg_backend_pid() \
                   FROM pg_current_snapshot() AS now";
        let (next, running, started, process) = sqlx::query_as(sql).fetch_one(connection).await?;
        Ok(Unseen { next, running, session: Some((started, process)) })
    }
}
