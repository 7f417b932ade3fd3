//! Configuration: parsed and validated once at start (flags, each also an environment variable), then passed down.
//! A bad value fails at start with clap's message, which names the variable (`value_name`).

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use ipnet::IpNet;
use url::Url;

/// A server URL whose password never reaches `Debug`, `Display` or logs.
#[derive(Clone, PartialEq, Eq)]
pub struct ServerUrl(Url);

impl ServerUrl {
    /// The full URL, password included, for the client library only.
    pub fn expose(&self) -> &str {
        self.0.as_str()
    }

    pub fn url(&self) -> &Url {
        &self.0
    }

    /// The same server with another database (PostgreSQL): named by the path, and without a `dbname` parameter,
    /// which would stand before the path.
    pub fn with_database(&self, database: &str) -> ServerUrl {
        let mut url = self.0.clone();
        url.set_path(&format!("/{database}"));
        let kept: Vec<(String, String)> = url
            .query_pairs()
            .filter(|(name, _)| name != "dbname")
            .map(|(n, v)| (n.into_owned(), v.into_owned()))
            .collect();
        url.set_query(None);
        if !kept.is_empty() {
            url.query_pairs_mut().extend_pairs(kept);
        }
        ServerUrl(url)
    }
}

impl FromStr for ServerUrl {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Url::parse(s).map(ServerUrl).map_err(|e| format!("not a URL ({e})"))
    }
}

/// Parses a [`ServerUrl`] for clap without repeating the value in its error, as clap's own message would: the value
/// may hold a password.
#[derive(Clone)]
struct ServerUrlParser;

impl clap::builder::TypedValueParser for ServerUrlParser {
    type Value = ServerUrl;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<ServerUrl, clap::Error> {
        let name = arg.and_then(|a| a.get_value_names()).and_then(|names| names.first()).map(|n| n.to_string());
        let parsed = value.to_str().ok_or_else(|| "not UTF-8".to_owned()).and_then(str::parse);
        parsed.map_err(|e| {
            let message = format!(
                "{} is {e}; its value is not shown, since it may hold a password\n",
                name.as_deref().unwrap_or("a server URL")
            );
            clap::Error::raw(clap::error::ErrorKind::ValueValidation, message).with_cmd(cmd)
        })
    }
}

/// Query parameters that carry a secret (PostgreSQL takes `?password=`).
pub(crate) const SECRET_PARAMETERS: &[&str] = &["password", "sslpassword", "token", "pass"];

impl fmt::Display for ServerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut shown = self.0.clone();
        // These only fail for URLs that cannot have a user or password, which this one has.
        if shown.password().is_some() {
            let _ = shown.set_password(Some("***"));
        } else if ["nats", "tls", "ws", "wss"].contains(&shown.scheme()) && !shown.username().is_empty() {
            // nats://TOKEN@host
            let _ = shown.set_username("***");
        }
        if shown.query_pairs().any(|(name, _)| SECRET_PARAMETERS.contains(&name.as_ref())) {
            let pairs: Vec<(String, String)> = shown
                .query_pairs()
                .map(|(name, value)| {
                    let secret = SECRET_PARAMETERS.contains(&name.as_ref());
                    (name.into_owned(), if secret { "***".to_owned() } else { value.into_owned() })
                })
                .collect();
            shown.query_pairs_mut().clear().extend_pairs(pairs);
        }
        f.write_str(shown.as_str())
    }
}

impl fmt::Debug for ServerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ServerUrl({self})")
    }
}

/// Where the three servers are.
#[derive(clap::Args, Debug, Clone)]
#[command(next_help_heading = "Servers")]
pub struct ServerArgs {
    /// PostgreSQL; `migrate`, `up`, `validator` and `worker` create the database if it is missing and migrate it.
    #[arg(
        long,
        env = "DATABASE_URL",
        value_name = "DATABASE_URL",
        global = true,
        hide_env_values = true,
        value_parser = ServerUrlParser,
        default_value = "postgres://postgres@127.0.0.1:5432/tollgate"
    )]
    pub database_url: ServerUrl,
    /// NATS with JetStream.
    #[arg(
        long,
        env = "NATS_URL",
        value_name = "NATS_URL",
        global = true,
        hide_env_values = true,
        value_parser = ServerUrlParser,
        default_value = "nats://127.0.0.1:4222"
    )]
    pub nats_url: ServerUrl,
    /// Redis.
    #[arg(
        long,
        env = "REDIS_URL",
        value_name = "REDIS_URL",
        global = true,
        hide_env_values = true,
        value_parser = ServerUrlParser,
        default_value = "redis://127.0.0.1:6379"
    )]
    pub redis_url: ServerUrl,
}

/// Names that let several deployments (and tests) share the same servers.
#[derive(clap::Args, Debug, Clone)]
#[command(next_help_heading = "Namespace")]
pub struct NamespaceArgs {
    /// JetStream stream for usage events (dead letters go to `<stream>_DLQ`).
    #[arg(long, env = "TOLLGATE_STREAM", value_name = "TOLLGATE_STREAM", global = true,
          default_value = "TOLLGATE_USAGE", value_parser = parse_stream_name)]
    pub stream: String,
    /// First token of every NATS subject (usage events go to `<prefix>.usage.>`, dead letters to `<prefix>.dlq.>`).
    #[arg(long, env = "TOLLGATE_SUBJECT_PREFIX", value_name = "TOLLGATE_SUBJECT_PREFIX", global = true,
          default_value = "tollgate", value_parser = parse_subject_prefix)]
    pub subject_prefix: String,
    /// Prefix of every Redis key.
    #[arg(
        long,
        env = "TOLLGATE_REDIS_PREFIX",
        value_name = "TOLLGATE_REDIS_PREFIX",
        global = true,
        default_value = "tollgate:"
    )]
    pub redis_prefix: String,
}

/// The Prometheus endpoint every process serves.
#[derive(clap::Args, Debug, Clone)]
#[command(next_help_heading = "Metrics")]
pub struct MetricsArgs {
    /// Address of the Prometheus endpoint (`/metrics`) and of the liveness probe (`/healthz`); each process on a host
    /// needs its own.
    #[arg(
        long,
        env = "TOLLGATE_METRICS_LISTEN",
        value_name = "TOLLGATE_METRICS_LISTEN",
        global = true,
        default_value = "127.0.0.1:9464"
    )]
    pub metrics_listen: SocketAddr,
}

/// The validator's HTTP API and hot path.
#[derive(clap::Args, Debug, Clone)]
#[command(next_help_heading = "Validator")]
pub struct ValidatorArgs {
    /// Address of the HTTP API.
    #[arg(long, env = "TOLLGATE_LISTEN", value_name = "TOLLGATE_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Comma-separated networks (CIDRs) or addresses whose X-Forwarded-For / X-Real-IP headers are believed;
    /// `none` (or empty) for none.
    #[arg(
        long,
        env = "TOLLGATE_TRUSTED_PROXIES",
        value_name = "TOLLGATE_TRUSTED_PROXIES",
        default_value = "127.0.0.0/8,::1/128"
    )]
    pub trusted_proxies: ProxyNets,
    #[command(flatten)]
    pub connections: ConnectionArgs,
    /// How long, after SIGTERM or Ctrl-C, the validator goes on serving while its `/healthz` answers 503, so that load
    /// balancers take it out before it stops accepting connections (Kubernetes takes a few seconds to update its
    /// endpoints). 0 stops accepting at once.
    #[arg(long, env = "TOLLGATE_SHUTDOWN_DELAY", value_name = "TOLLGATE_SHUTDOWN_DELAY", default_value = "0s",
          value_parser = period(Duration::ZERO, LONGEST))]
    pub shutdown_delay: Duration,
    /// Events held in memory between the HTTP handlers and the NATS publisher.
    #[arg(long, env = "TOLLGATE_EVENT_QUEUE", value_name = "TOLLGATE_EVENT_QUEUE", default_value_t = 100_000,
          value_parser = count_up_to(10_000_000))]
    pub event_queue: usize,
    /// Most key records held in the in-process cache.
    #[arg(long, env = "TOLLGATE_KEY_CACHE", value_name = "TOLLGATE_KEY_CACHE", default_value_t = 1_000_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub key_cache: u64,
    /// How long an unknown key is remembered as unknown (one database lookup per key per this period at most).
    #[arg(long, env = "TOLLGATE_NEGATIVE_CACHE_TTL", value_name = "TOLLGATE_NEGATIVE_CACHE_TTL",
          default_value = "30s", value_parser = positive_duration)]
    pub negative_cache_ttl: Duration,
    /// How often the validator asks PostgreSQL which keys, organizations and tiers changed (revocations reach the cache
    /// within about this long).
    #[arg(long, env = "TOLLGATE_KEY_REFRESH", value_name = "TOLLGATE_KEY_REFRESH",
          default_value = "1s", value_parser = period(Duration::from_millis(10), LONGEST))]
    pub key_refresh: Duration,
    /// How old a cached key record may get before a request that uses it has it read again, in the background (no
    /// answer waits for it, and while PostgreSQL is away the record keeps deciding): a safety net for changes the
    /// refresher cannot see, such as a key row deleted outright.
    #[arg(long, env = "TOLLGATE_KEY_RECHECK", value_name = "TOLLGATE_KEY_RECHECK",
          default_value = "5m", value_parser = period(Duration::from_millis(10), LONGEST))]
    pub key_recheck: Duration,
    /// Where usage messages wait on disk while NATS is unreachable or slow (relative paths are from the working
    /// directory). One validator per directory: a lock file refuses a second one.
    #[arg(long, env = "TOLLGATE_SPOOL_DIR", value_name = "TOLLGATE_SPOOL_DIR", default_value = ".tollgate/spool")]
    pub spool_dir: PathBuf,
    /// When spooled messages are fsynced: `always` (after every message), `never` (left to the OS), or a period
    /// such as `1s` (at most that much is unsynced).
    #[arg(long, env = "TOLLGATE_SPOOL_FSYNC", value_name = "TOLLGATE_SPOOL_FSYNC", default_value = "always")]
    pub spool_fsync: FsyncPolicy,
    /// Largest size of the spool on disk, in bytes (suffixes KiB, MiB, GiB allowed), at least 1 MiB (a message may
    /// take 512 KiB).
    #[arg(long, env = "TOLLGATE_SPOOL_MAX_BYTES", value_name = "TOLLGATE_SPOOL_MAX_BYTES",
          default_value = "1GiB", value_parser = parse_bytes)]
    pub spool_max_bytes: u64,
    /// What a full spool does to new events: `block` answers verifies with 503, `drop` loses them (counted).
    #[arg(long, env = "TOLLGATE_SPOOL_FULL", value_name = "TOLLGATE_SPOOL_FULL", default_value = "block")]
    pub spool_full: SpoolFullPolicy,
    /// Longest the publisher waits for JetStream to acknowledge a message before it spools it instead.
    #[arg(long, env = "TOLLGATE_PUBLISH_TIMEOUT", value_name = "TOLLGATE_PUBLISH_TIMEOUT",
          default_value = "2s", value_parser = positive_duration)]
    pub publish_timeout: Duration,
    #[command(flatten)]
    pub limits: LimiterArgs,
}

/// How many connections an HTTP server holds, and how long it waits for each request.
#[derive(clap::Args, Debug, Clone, Copy)]
pub struct ConnectionArgs {
    /// Connections served at once (gateways keep theirs open); more wait to be accepted until one closes. Each is an
    /// open file: keep it under the hard limit of `ulimit -n`.
    #[arg(long, env = "TOLLGATE_MAX_CONNECTIONS", value_name = "TOLLGATE_MAX_CONNECTIONS", default_value_t = 10_000,
          value_parser = connection_count)]
    pub max_connections: usize,
    /// Longest wait for a request: for its headers, from when its connection opened or its previous answer went (so
    /// a keep-alive connection idle this long is closed too), then for its body; and, between two writes of an answer,
    /// for the client to take more of it. Keep it above your gateway's idle timeout for upstream connections (nginx's
    /// `keepalive_timeout` is 60 s), so that the gateway closes them first.
    #[arg(long, env = "TOLLGATE_READ_TIMEOUT", value_name = "TOLLGATE_READ_TIMEOUT", default_value = "65s",
          value_parser = positive_duration)]
    pub read_timeout: Duration,
    /// Longest a shutdown (SIGTERM, Ctrl-C) waits for requests in flight before it closes their connections. Keep it,
    /// with TOLLGATE_SHUTDOWN_DELAY and a few seconds for the usage events to reach JetStream or the spool, under the
    /// time your orchestrator allows before it kills the process (Kubernetes: 30 s).
    #[arg(long, env = "TOLLGATE_SHUTDOWN_GRACE", value_name = "TOLLGATE_SHUTDOWN_GRACE", default_value = "20s",
          value_parser = period(Duration::ZERO, LONGEST))]
    pub shutdown_grace: Duration,
}

/// How the rate limiter behaves, above all when Redis is slow or away.
#[derive(clap::Args, Debug, Clone, PartialEq, Eq)]
#[command(next_help_heading = "Rate limiting")]
pub struct LimiterArgs {
    /// Longest a decision waits for Redis, queueing for the next script call included, before the failure policy
    /// decides instead (1s at most: Redis's connection waits no longer for an answer).
    #[arg(long, env = "TOLLGATE_REDIS_TIMEOUT", value_name = "TOLLGATE_REDIS_TIMEOUT",
          default_value = "50ms", value_parser = period(Duration::from_nanos(1), crate::connect::REDIS_RESPONSE_TIMEOUT))]
    pub redis_timeout: Duration,
    /// Consecutive failed Redis calls (each decides a batch of concurrent requests) that open the circuit breaker (no
    /// Redis calls until the cooldown has passed).
    #[arg(long, env = "TOLLGATE_BREAKER_FAILURES", value_name = "TOLLGATE_BREAKER_FAILURES", default_value_t = 5,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub breaker_failures: u32,
    /// How long the breaker stays open before one request probes Redis again.
    #[arg(long, env = "TOLLGATE_BREAKER_COOLDOWN", value_name = "TOLLGATE_BREAKER_COOLDOWN",
          default_value = "1s", value_parser = positive_duration)]
    pub breaker_cooldown: Duration,
    /// What a limit does without Redis: `open` (allow), `closed` (deny with 503) or `local` (enforce limit ÷
    /// TOLLGATE_REPLICAS in this process). One policy for all limits, or per limit kind, e.g.
    /// `local,quota=open,org=closed` (kinds: key, tier, org, quota, ip).
    #[arg(
        long,
        env = "TOLLGATE_LIMIT_FAILURE_POLICY",
        value_name = "TOLLGATE_LIMIT_FAILURE_POLICY",
        default_value = "local"
    )]
    pub failure_policy: FailurePolicies,
    /// Validator replicas sharing the limits; the `local` policy enforces each limit ÷ this in each process.
    #[arg(long, env = "TOLLGATE_REPLICAS", value_name = "TOLLGATE_REPLICAS", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub replicas: u32,
    /// Bad-key answers (401) per client IP per minute before that IP gets 429 instead; 0 turns this off.
    #[arg(
        long,
        env = "TOLLGATE_IP_FAILURES_PER_MINUTE",
        value_name = "TOLLGATE_IP_FAILURES_PER_MINUTE",
        default_value_t = 100
    )]
    pub ip_failures_per_minute: u32,
}

impl LimiterArgs {
    /// The defaults, as the flags' defaults state them.
    pub fn defaults() -> LimiterArgs {
        LimiterArgs {
            redis_timeout: Duration::from_millis(50),
            breaker_failures: 5,
            breaker_cooldown: Duration::from_secs(1),
            failure_policy: FailurePolicies::all(FailurePolicy::Local),
            replicas: 1,
            ip_failures_per_minute: 100,
        }
    }
}

/// What one limit does when Redis cannot decide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailurePolicy {
    /// Allow the request.
    Open,
    /// Deny it with 503.
    Closed,
    /// Enforce the limit ÷ replicas from an in-process limiter.
    Local,
}

impl FailurePolicy {
    pub const ALL: [FailurePolicy; 3] = [FailurePolicy::Open, FailurePolicy::Closed, FailurePolicy::Local];

    pub fn as_str(self) -> &'static str {
        match self {
            FailurePolicy::Open => "open",
            FailurePolicy::Closed => "closed",
            FailurePolicy::Local => "local",
        }
    }
}

impl FromStr for FailurePolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "open" => Ok(FailurePolicy::Open),
            "closed" => Ok(FailurePolicy::Closed),
            "local" => Ok(FailurePolicy::Local),
            other => Err(format!("unknown policy {other:?}: use open, closed or local")),
        }
    }
}

/// When the spool's appends reach the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// After every appended message (the default): a crash loses nothing that was spooled.
    Always,
    /// At most this long after an append.
    Every(Duration),
    /// Never explicitly; the OS writes back when it likes (a process crash loses nothing, a power cut may).
    Never,
}

impl FromStr for FsyncPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "always" => Ok(FsyncPolicy::Always),
            "never" => Ok(FsyncPolicy::Never),
            every => match period(Duration::from_millis(10), LONGEST)(every) {
                Ok(d) => Ok(FsyncPolicy::Every(d)),
                Err(e) => Err(format!("use `always`, `never` or a period such as `1s` ({e})")),
            },
        }
    }
}

/// The failure policy of each kind of limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FailurePolicies {
    pub key: FailurePolicy,
    pub tier: FailurePolicy,
    pub org: FailurePolicy,
    pub quota: FailurePolicy,
    pub ip: FailurePolicy,
}

impl FailurePolicies {
    pub fn all(policy: FailurePolicy) -> FailurePolicies {
        FailurePolicies { key: policy, tier: policy, org: policy, quota: policy, ip: policy }
    }
}

impl FromStr for FailurePolicies {
    type Err = String;
    /// `local`, or `local,quota=open`, or `key=local,tier=local,org=closed,quota=open,ip=local`.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut policies = FailurePolicies::all(FailurePolicy::Local);
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part.split_once('=') {
                None => policies = FailurePolicies::all(part.parse()?),
                Some((kind, policy)) => {
                    let policy: FailurePolicy = policy.trim().parse()?;
                    match kind.trim() {
                        "key" => policies.key = policy,
                        "tier" => policies.tier = policy,
                        "org" => policies.org = policy,
                        "quota" => policies.quota = policy,
                        "ip" => policies.ip = policy,
                        other => return Err(format!("unknown limit kind {other:?}: use key, tier, org, quota or ip")),
                    }
                }
            }
        }
        Ok(policies)
    }
}

/// What happens to new events when the spool is full.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpoolFullPolicy {
    /// Verifies answer 503 until there is room again; nothing is lost.
    Block,
    /// Events that do not fit are dropped and counted in `tollgate_events_dropped_total`.
    Drop,
}

/// The workers' batching.
#[derive(clap::Args, Debug, Clone)]
#[command(next_help_heading = "Workers")]
pub struct WorkerArgs {
    /// Most NATS messages per batch (each message carries up to 1000 events).
    #[arg(long, env = "TOLLGATE_BATCH_MESSAGES", value_name = "TOLLGATE_BATCH_MESSAGES", default_value_t = 50,
          value_parser = count_up_to(10_000))]
    pub batch_messages: usize,
    /// Longest a worker waits to fill a batch (1ms to 10s: well under the consumer's 30 s ack wait).
    #[arg(long, env = "TOLLGATE_BATCH_WAIT", value_name = "TOLLGATE_BATCH_WAIT",
          default_value = "50ms", value_parser = period(Duration::from_millis(1), Duration::from_secs(10)))]
    pub batch_wait: Duration,
    /// A batch closes once it holds this many events (or on `TOLLGATE_BATCH_MESSAGES`, or `TOLLGATE_BATCH_WAIT`).
    #[arg(long, env = "TOLLGATE_BATCH_EVENTS", value_name = "TOLLGATE_BATCH_EVENTS", default_value_t = 5000,
          value_parser = count_up_to(1_000_000))]
    pub batch_events: usize,
    /// Worker loops in this process sharing the consumer; several keep PostgreSQL busy while others fetch and
    /// decode.
    #[arg(long, env = "TOLLGATE_WORKER_TASKS", value_name = "TOLLGATE_WORKER_TASKS", default_value_t = 4,
          value_parser = clap::value_parser!(u16).range(1..=64))]
    pub worker_tasks: u16,
}

/// The networks of trusted proxies: comma-separated CIDRs or single addresses, spaces allowed; empty or `none` for
/// none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyNets(pub Vec<IpNet>);

impl FromStr for ProxyNets {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if matches!(s.trim(), "" | "none") {
            return Ok(ProxyNets(Vec::new()));
        }
        let net = |entry: &str| {
            entry.parse::<IpNet>().or_else(|_| entry.parse::<std::net::IpAddr>().map(IpNet::from)).map_err(|_| {
                format!("{entry:?} is neither an address nor a network (such as 10.0.0.0/8); `none` trusts none")
            })
        };
        s.split(',').map(|entry| net(entry.trim())).collect::<Result<_, _>>().map(ProxyNets)
    }
}

/// The longest any setting's period may be: none needs more, and a clock moved on by much more overflows.
const LONGEST: Duration = Duration::from_secs(24 * 3600);

/// A period from `min` to `max`: a zero one would make a timer spin or every call time out.
pub fn period(
    min: Duration,
    max: Duration,
) -> impl Fn(&str) -> Result<Duration, String> + Clone + Send + Sync + 'static {
    move |s| {
        let parsed = humantime::parse_duration(s).map_err(|e| e.to_string())?;
        if parsed < min || parsed > max {
            let (min, max) = (humantime::format_duration(min), humantime::format_duration(max));
            return Err(format!("must be from {min} to {max}"));
        }
        Ok(parsed)
    }
}

/// A period longer than zero and no longer than a day.
fn positive_duration(s: &str) -> Result<Duration, String> {
    period(Duration::from_nanos(1), LONGEST)(s)
}

/// A count of at least 1 (of a queue's places, say, which cannot be 0).
fn positive_count(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".to_owned()),
        parsed => parsed.map_err(|e| e.to_string()),
    }
}

/// A count from 1 to `max` (what one process can hold in memory, say).
fn count_up_to(max: usize) -> impl Fn(&str) -> Result<usize, String> + Clone + Send + Sync + 'static {
    move |s| match positive_count(s)? {
        count if count > max => Err(format!("must be at most {max}")),
        count => Ok(count),
    }
}

/// At least 1, and no more than a semaphore counts.
fn connection_count(s: &str) -> Result<usize, String> {
    let count = positive_count(s)?;
    let max = tokio::sync::Semaphore::MAX_PERMITS;
    if count > max {
        return Err(format!("must be at most {max}"));
    }
    Ok(count)
}

/// A byte count: digits with an optional `KiB`, `MiB` or `GiB` suffix.
fn parse_bytes(s: &str) -> Result<u64, String> {
    let (digits, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => s.split_at(at),
        None => (s, ""),
    };
    let multiplier: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        _ => return Err("use a number of bytes, optionally with KiB, MiB or GiB".to_owned()),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(multiplier))
        .filter(|n| *n >= MIN_SPOOL_BYTES)
        .ok_or_else(|| "use a number of bytes of at least 1 MiB, optionally with KiB, MiB or GiB".to_owned())
}

/// The smallest spool: room for the largest message the publisher writes (512 KiB).
const MIN_SPOOL_BYTES: u64 = 1 << 20;

fn parse_stream_name(s: &str) -> Result<String, String> {
    let ok = !s.is_empty() && s.len() <= 200 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    ok.then(|| s.to_owned()).ok_or_else(|| "use 1 to 200 letters, digits, '_' and '-'".to_owned())
}

fn parse_subject_prefix(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.split('.').all(|token| !token.is_empty())
        && !s.bytes().any(|b| b.is_ascii_whitespace() || b == b'*' || b == b'>');
    ok.then(|| s.to_owned()).ok_or_else(|| "use dot-separated tokens without spaces or wildcards".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn another_database_is_the_one_the_server_is_asked_for() {
        use std::str::FromStr;
        let url: ServerUrl = "postgres://alice@db:5432/tollgate?dbname=tollgate&sslmode=disable".parse().expect("url");
        let other = url.with_database("tollgate_bench_1");
        assert_eq!(other.expose(), "postgres://alice@db:5432/tollgate_bench_1?sslmode=disable");
        let options = sqlx::postgres::PgConnectOptions::from_str(other.expose()).expect("options");
        assert_eq!(options.get_database(), Some("tollgate_bench_1"));
        let plain: ServerUrl = "postgres://alice@db:5432/tollgate".parse().expect("url");
        assert_eq!(plain.with_database("postgres").expose(), "postgres://alice@db:5432/postgres");
    }

    #[test]
    fn passwords_never_show() {
        let url: ServerUrl = "postgres://alice:s3cret@db:5432/tollgate".parse().expect("url");
        assert_eq!(url.to_string(), "postgres://alice:***@db:5432/tollgate");
        assert!(!format!("{url:?}").contains("s3cret"));
        assert!(url.expose().contains("s3cret"));
        let shown = |url: &str| url.parse::<ServerUrl>().expect("url").to_string();
        assert_eq!(shown("nats://t0ken@nats:4222"), "nats://***@nats:4222");
        assert_eq!(shown("tls://t0ken@nats:4222"), "tls://***@nats:4222");
        assert_eq!(shown("nats://app:pw@nats:4222"), "nats://app:***@nats:4222");
        assert_eq!(
            shown("postgres://app@db/x?sslmode=require&password=s3cret"),
            "postgres://app@db/x?sslmode=require&password=***"
        );
        assert_eq!(shown("postgres://app@db/x"), "postgres://app@db/x");
    }

    #[test]
    fn limiter_defaults_match_the_flags() {
        #[derive(clap::Parser)]
        struct Only {
            #[command(flatten)]
            limits: LimiterArgs,
        }
        let parsed = <Only as clap::Parser>::try_parse_from(["tollgate"]).expect("defaults parse");
        assert_eq!(parsed.limits, LimiterArgs::defaults());
    }

    #[test]
    fn periods_and_counts_that_cannot_be_zero_are_refused_at_start() {
        #[derive(clap::Parser)]
        struct Both {
            #[command(flatten)]
            validator: ValidatorArgs,
            #[command(flatten)]
            worker: WorkerArgs,
        }
        let parse = |args: &[&str]| <Both as clap::Parser>::try_parse_from([&["tollgate"], args].concat());
        assert!(parse(&[]).is_ok(), "the defaults");
        assert!(parse(&["--key-refresh", "250ms", "--event-queue", "1", "--batch-events", "1"]).is_ok());
        for zero in [
            &["--key-refresh", "0s"][..],
            &["--key-recheck", "0ms"],
            &["--publish-timeout", "0s"],
            &["--redis-timeout", "0s"],
            &["--event-queue", "0"],
            &["--batch-messages", "0"],
            &["--batch-events", "0"],
            // Past what a setting needs, and what a clock or a process can hold.
            &["--redis-timeout", "300000000000y"],
            // Past what Redis's connection waits for.
            &["--redis-timeout", "2s"],
            &["--breaker-cooldown", "0s"],
            &["--negative-cache-ttl", "0s"],
            &["--batch-wait", "0s"],
            &["--batch-wait", "1m"],
            &["--event-queue", "3000000000000000000"],
            &["--batch-events", "100000000"],
        ] {
            let refused = parse(zero).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(refused.contains("must be"), "{zero:?}: {refused}");
        }
    }

    #[test]
    fn trusted_proxies_are_networks_or_addresses_or_none() {
        let nets = |s: &str| s.parse::<ProxyNets>().map(|list| list.0.iter().map(IpNet::to_string).collect::<Vec<_>>());
        assert_eq!(nets("127.0.0.0/8,::1/128"), Ok(vec!["127.0.0.0/8".into(), "::1/128".into()]));
        assert_eq!(
            nets("10.0.0.5, 2001:db8::1 , 10.1.0.0/16"),
            Ok(vec!["10.0.0.5/32".into(), "2001:db8::1/128".into(), "10.1.0.0/16".into()])
        );
        assert_eq!(nets(""), Ok(vec![]));
        assert_eq!(nets("none"), Ok(vec![]));
        for bad in ["10.0.0.300", "10.0.0.0/33", "10.0.0.1,", "proxy.internal"] {
            assert!(nets(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn server_urls_that_do_not_parse_are_named_but_not_shown() {
        #[derive(clap::Parser)]
        struct Only {
            #[command(flatten)]
            servers: ServerArgs,
        }
        let refused =
            <Only as clap::Parser>::try_parse_from(["tollgate", "--database-url", "postgres://app:ab/cd@db/x"])
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
        assert!(refused.contains("DATABASE_URL is not a URL"), "{refused}");
        assert!(!refused.contains("ab/cd"), "the password was shown: {refused}");
    }

    #[test]
    fn failure_policies_parse_per_kind() {
        let all: FailurePolicies = "closed".parse().expect("policy");
        assert_eq!(all, FailurePolicies::all(FailurePolicy::Closed));
        let mixed: FailurePolicies = "open, quota=closed,ip=local".parse().expect("policy");
        assert_eq!(mixed.key, FailurePolicy::Open);
        assert_eq!(mixed.quota, FailurePolicy::Closed);
        assert_eq!(mixed.ip, FailurePolicy::Local);
        assert!("sometimes".parse::<FailurePolicies>().is_err());
        assert!("month=open".parse::<FailurePolicies>().is_err());
    }

    #[test]
    fn names_are_checked() {
        assert!(parse_stream_name("IT_abc-1").is_ok());
        assert!(parse_stream_name("a.b").is_err());
        assert!(parse_subject_prefix("tollgate.eu").is_ok());
        assert!(parse_subject_prefix("a..b").is_err());
        assert!(parse_subject_prefix("a.>").is_err());
    }

    #[test]
    fn spool_settings_parse() {
        assert_eq!(parse_bytes("1GiB"), Ok(1 << 30));
        assert_eq!(parse_bytes("1048576"), Ok(1 << 20));
        assert_eq!(parse_bytes("64 MiB"), Ok(64 << 20));
        assert!(parse_bytes("0").is_err());
        assert!(parse_bytes("512KiB").is_err(), "a spool that cannot hold the largest message twice");
        assert!(parse_bytes("1GB").is_err());
        assert_eq!("always".parse(), Ok(FsyncPolicy::Always));
        assert_eq!("never".parse(), Ok(FsyncPolicy::Never));
        assert_eq!("200ms".parse(), Ok(FsyncPolicy::Every(Duration::from_millis(200))));
        assert!("sometimes".parse::<FsyncPolicy>().is_err());
        assert!("1ns".parse::<FsyncPolicy>().is_err(), "a timer that could never keep up");
    }
}
