//! Connections to the three servers, with errors that name the server and the URL tried (never a password).

use std::str::FromStr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgPool};

use crate::config::{ServerUrl, SECRET_PARAMETERS};

/// Migrations in `migrations/`, embedded at build time. Those a newer release applied are let be: during a rolling
/// update, or after rolling one back, a process of this release restarted against a database the newer one migrated
/// must still start (each release reads what it knows of the schema and leaves the rest).
pub static MIGRATOR: sqlx::migrate::Migrator =
    sqlx::migrate::Migrator { ignore_missing: true, ..sqlx::migrate!("../migrations") };

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the NATS client pings the server: a connection that went dead without a reset (a host gone, a firewall
/// dropping it) is found after a few pings go unanswered, some 30 s rather than the client's default 3 minutes.
const NATS_PING_INTERVAL: Duration = Duration::from_secs(10);
/// How often a connection made in the background is tried while its server does not answer.
const BACKGROUND_RETRY: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// A setting to mend, not a server away: nothing was tried.
    #[error("{variable} (or --{flag}) is not a {server} URL Tollgate can use: {reason}. Expected {example}.")]
    BadUrl { server: &'static str, variable: &'static str, flag: &'static str, example: &'static str, reason: String },
    #[error(
        "cannot reach {server} at {url}: {reason}. Is it running? Set {variable} (or --{flag}) to point elsewhere."
    )]
    Unreachable { server: &'static str, url: String, variable: &'static str, flag: &'static str, reason: String },
    #[error("{server} at {url} refused the login: {reason}. Set {variable} (or --{flag}) to a login it accepts.")]
    LoginRefused { server: &'static str, url: String, variable: &'static str, flag: &'static str, reason: String },
    #[error("database {database:?} does not exist on {url}: `tollgate migrate` (or `tollgate up`) creates it")]
    NoDatabase { database: String, url: String },
    #[error(
        "database {database:?} does not exist on {url}, and cannot be created ({reason}): create it as a role that may \
         (createdb {database}), or let this one connect to the postgres database with CREATEDB, then run \
         `tollgate migrate`"
    )]
    CreateDatabase { database: String, url: String, reason: String },
    #[error("cannot apply migrations to {url}: {reason}")]
    Migrate { url: String, reason: String },
}

fn bad_url(server: &'static str, variable: &'static str, reason: impl ToString) -> ConnectError {
    let example = match variable {
        "DATABASE_URL" => "postgres://USER[:PASSWORD]@HOST:5432/DATABASE",
        "NATS_URL" => "nats://[USER:PASSWORD@]HOST:4222",
        _ => "redis://[:PASSWORD@]HOST:6379[/DB]",
    };
    ConnectError::BadUrl { server, variable, flag: flag(variable), example, reason: reason.to_string() }
}

fn unreachable(server: &'static str, url: &ServerUrl, variable: &'static str, reason: impl ToString) -> ConnectError {
    ConnectError::Unreachable {
        server,
        url: url.to_string(),
        variable,
        flag: flag(variable),
        reason: reason.to_string(),
    }
}

/// The server answered, and refused the credentials (or the user) the URL gives.
fn login_refused(server: &'static str, url: &ServerUrl, variable: &'static str, reason: impl ToString) -> ConnectError {
    ConnectError::LoginRefused {
        server,
        url: url.to_string(),
        variable,
        flag: flag(variable),
        reason: reason.to_string(),
    }
}

/// The flag that sets the same as `variable`.
fn flag(variable: &'static str) -> &'static str {
    match variable {
        "DATABASE_URL" => "database-url",
        "NATS_URL" => "nats-url",
        _ => "redis-url",
    }
}

/// A pool on an existing database.
pub async fn postgres(url: &ServerUrl, max_connections: u32) -> Result<PgPool, ConnectError> {
    let options = postgres_options(url)?;
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(CONNECT_TIMEOUT)
        .connect_with(options.clone())
        .await
        .map_err(|e| postgres_refused(url, &options, e))
}

/// What `url` asks of a PostgreSQL connection. A secret the client does not read is left out, with a warning that
/// names it: the client would log it, value and all, as a parameter it ignores.
fn postgres_options(url: &ServerUrl) -> Result<PgConnectOptions, ConnectError> {
    let unread = |name: &str| name != "password" && SECRET_PARAMETERS.contains(&name);
    let mut url = url.url().clone();
    let (left_out, kept): (Vec<_>, Vec<_>) =
        url.query_pairs().map(|(name, value)| (name.into_owned(), value.into_owned())).partition(|(n, _)| unread(n));
    if !left_out.is_empty() {
        // Said once, though a migrating process reads the URL twice.
        static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
            let names: Vec<_> = left_out.into_iter().map(|(name, _)| name).collect();
            tracing::warn!(parameters = ?names, "ignoring these DATABASE_URL parameters: Tollgate's PostgreSQL client does not read them");
        }
        url.set_query(None);
        if !kept.is_empty() {
            url.query_pairs_mut().extend_pairs(kept);
        }
    }
    let options = PgConnectOptions::from_str(url.as_str()).map_err(|e| bad_url("PostgreSQL", "DATABASE_URL", e))?;
    Ok(options.application_name("tollgate").log_statements(tracing::log::LevelFilter::Trace))
}

fn postgres_refused(url: &ServerUrl, options: &PgConnectOptions, e: sqlx::Error) -> ConnectError {
    if matches!(e, sqlx::Error::Configuration(_)) {
        return bad_url("PostgreSQL", "DATABASE_URL", e);
    }
    if is_missing_database(&e) {
        return ConnectError::NoDatabase { database: database_name(options), url: url.to_string() };
    }
    // Class 28: invalid authorization (no such role, a wrong password, no pg_hba.conf entry for this login).
    if e.as_database_error().and_then(|d| d.code()).is_some_and(|c| c.starts_with("28")) {
        login_refused("PostgreSQL", url, "DATABASE_URL", e)
    } else {
        unreachable("PostgreSQL", url, "DATABASE_URL", e)
    }
}

fn is_missing_database(e: &sqlx::Error) -> bool {
    e.as_database_error().and_then(|d| d.code()).is_some_and(|c| c == "3D000")
}

/// The database `options` name, as the server reads it: the URL's path (percent-decoded) or `dbname`, else the user's.
fn database_name(options: &PgConnectOptions) -> String {
    options.get_database().unwrap_or(options.get_username()).to_owned()
}

/// Creates the database named in `url` if it does not exist, by way of the server's `postgres` database: only then,
/// since a role may be allowed to connect to its own database alone.
pub async fn create_database_if_missing(url: &ServerUrl) -> Result<(), ConnectError> {
    let options = postgres_options(url)?;
    let connecting = tokio::time::timeout(CONNECT_TIMEOUT, sqlx::PgConnection::connect_with(&options));
    match connecting.await.unwrap_or(Err(sqlx::Error::PoolTimedOut)) {
        Ok(connection) => {
            let _ = connection.close().await;
            return Ok(());
        }
        Err(e) if !is_missing_database(&e) => return Err(postgres_refused(url, &options, e)),
        Err(_) => {}
    }
    let database = database_name(&options);
    // The server answered for the database's own URL: what fails here is this role's access to `postgres`.
    let mut admin = sqlx::PgConnection::connect_with(&options.database("postgres")).await.map_err(|e| {
        ConnectError::CreateDatabase {
            database: database.clone(),
            url: url.to_string(),
            reason: format!("cannot connect to the server's postgres database to create it: {e}"),
        }
    })?;
    let create = format!("CREATE DATABASE \"{}\"", database.replace('"', "\"\""));
    match sqlx::query(&create).execute(&mut admin).await {
        Ok(_) => Ok(()),
        // Another process created it in the meantime: that is success.
        Err(e) if e.as_database_error().and_then(|d| d.code()).is_some_and(|c| c == "42P04" || c == "23505") => Ok(()),
        Err(e) => Err(ConnectError::CreateDatabase { database, url: url.to_string(), reason: e.to_string() }),
    }
}

/// Creates the database if needed, connects and applies pending migrations.
pub async fn postgres_migrated(url: &ServerUrl, max_connections: u32) -> Result<PgPool, ConnectError> {
    create_database_if_missing(url).await?;
    let pool = postgres(url, max_connections).await?;
    MIGRATOR.run(&pool).await.map_err(|e| ConnectError::Migrate { url: url.to_string(), reason: e.to_string() })?;
    Ok(pool)
}

/// Migrations applied to the database after this release's last (a newer release ran them), as `VERSION
/// description`, oldest first.
pub async fn newer_migrations(pool: &PgPool) -> Result<Vec<String>, sqlx::Error> {
    let last = MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0);
    sqlx::query_scalar("SELECT version || ' ' || description FROM _sqlx_migrations WHERE version > $1 ORDER BY version")
        .bind(last)
        .fetch_all(pool)
        .await
}

/// How long a Redis connection waits for an answer at most, whatever the caller would wait.
pub const REDIS_RESPONSE_TIMEOUT: Duration = Duration::from_secs(1);

/// A Redis connection that reconnects by itself; calls time out instead of hanging when Redis is away. A `PING`
/// makes sure Redis takes commands from it (a password it wants and the URL lacks shows only then).
pub async fn redis(url: &ServerUrl) -> Result<redis::aio::ConnectionManager, ConnectError> {
    let client = redis::Client::open(url.expose()).map_err(|e| bad_url("Redis", "REDIS_URL", e))?;
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(CONNECT_TIMEOUT)
        .set_response_timeout(REDIS_RESPONSE_TIMEOUT)
        // One attempt per reconnection: the crate waits 1 to 2 s before a retry (its backoff starts at a second
        // whatever the factor), and every call made meanwhile waits with it, so a Redis back from a restart went
        // unused for that long. The long-running callers retry on their own terms (the limiter's breaker, the quota
        // raiser, the background connect); a one-off command fails at once with the error, as when Redis is away.
        .set_number_of_retries(0);
    let refused = |e: redis::RedisError| match (e.kind(), e.code()) {
        (redis::ErrorKind::AuthenticationFailed, _) | (_, Some("NOAUTH")) => {
            login_refused("Redis", url, "REDIS_URL", e)
        }
        // Redis answered, and refused what the URL asks (a database index it does not have, say).
        (redis::ErrorKind::ResponseError, _) => bad_url("Redis", "REDIS_URL", e),
        _ => unreachable("Redis", url, "REDIS_URL", e),
    };
    let connect = async {
        let mut connection = redis::aio::ConnectionManager::new_with_config(client, config).await?;
        redis::cmd("PING").query_async::<()>(&mut connection).await?;
        Ok(connection)
    };
    tokio::time::timeout(CONNECT_TIMEOUT, connect)
        .await
        .map_err(|_| unreachable("Redis", url, "REDIS_URL", "timed out"))?
        .map_err(refused)
}

/// A Redis connection that may not be made yet: the validator starts while Redis is away (its rate limits follow
/// their failure policies meanwhile), so its first connection may come later, from the background. Once made, it
/// reconnects by itself.
#[derive(Clone)]
pub struct BackgroundRedis(Arc<OnceLock<redis::aio::ConnectionManager>>);

impl BackgroundRedis {
    /// The connection, once made.
    pub fn get(&self) -> Option<redis::aio::ConnectionManager> {
        self.0.get().cloned()
    }
}

impl From<redis::aio::ConnectionManager> for BackgroundRedis {
    fn from(connection: redis::aio::ConnectionManager) -> BackgroundRedis {
        BackgroundRedis(Arc::new(OnceLock::from(connection)))
    }
}

/// Like [`redis`], but when Redis does not answer, warns (saying what happens `meanwhile`) and keeps trying in the
/// background instead of failing (a malformed URL still fails).
pub async fn redis_in_background(url: &ServerUrl, meanwhile: &'static str) -> Result<BackgroundRedis, ConnectError> {
    redis::Client::open(url.expose()).map_err(|e| bad_url("Redis", "REDIS_URL", e))?;
    let e = match redis(url).await {
        Ok(connection) => return Ok(connection.into()),
        // Not away: refusing the login, which waiting will not mend.
        Err(e @ ConnectError::LoginRefused { .. }) => return Err(e),
        Err(e) => e,
    };
    tracing::warn!(error = %e, "starting anyway; until Redis answers, {meanwhile}");
    let later = BackgroundRedis(Arc::new(OnceLock::new()));
    let (cell, url) = (later.0.clone(), url.clone());
    tokio::spawn(async move {
        // Until it connects, or nobody holds the connection-to-be any more.
        while Arc::strong_count(&cell) > 1 {
            tokio::time::sleep(BACKGROUND_RETRY).await;
            if let Ok(connection) = redis(&url).await {
                let _ = cell.set(connection);
                tracing::info!(url = %url, "Redis answers");
                return;
            }
        }
    });
    Ok(later)
}

/// A NATS client that reconnects by itself after the first connection.
pub async fn nats(url: &ServerUrl) -> Result<async_nats::Client, ConnectError> {
    nats_url_readable(url)?;
    nats_options(url).connect(url.expose()).await.map_err(|e| match e.kind() {
        async_nats::ConnectErrorKind::AuthorizationViolation => login_refused("NATS", url, "NATS_URL", e),
        _ => unreachable("NATS", url, "NATS_URL", e),
    })
}

/// A NATS client that makes even its first connection in the background: for the validator, which serves (and
/// spools usage events) while NATS is away, start included.
pub async fn nats_in_background(url: &ServerUrl) -> Result<async_nats::Client, ConnectError> {
    nats_url_readable(url)?;
    nats_options(url)
        .retry_on_initial_connect()
        .connect(url.expose())
        .await
        .map_err(|e| unreachable("NATS", url, "NATS_URL", e))
}

/// Whether `NATS_URL` names NATS servers: checked before connecting, since the client's own parse error also comes
/// from addresses a reachable server advertises.
fn nats_url_readable(url: &ServerUrl) -> Result<(), ConnectError> {
    async_nats::ToServerAddrs::to_server_addrs(url.expose()).map(drop).map_err(|e| bad_url("NATS", "NATS_URL", e))
}

/// With the URL's credentials (`nats://user:password@host` or `nats://token@host`), which async-nats itself
/// ignores.
fn nats_options(url: &ServerUrl) -> async_nats::ConnectOptions {
    let options = async_nats::ConnectOptions::new()
        .name("tollgate")
        .connection_timeout(CONNECT_TIMEOUT)
        .ping_interval(NATS_PING_INTERVAL);
    let decoded = |text: &str| percent_encoding::percent_decode_str(text).decode_utf8_lossy().into_owned();
    match (url.url().username(), url.url().password()) {
        ("", _) => options,
        (user, Some(password)) => options.user_and_password(decoded(user), decoded(password)),
        (token, None) => options.token(decoded(token)),
    }
}
