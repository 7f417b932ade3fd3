//! Configuration: parsed and validated once at start (flags, each also an environment variable), then passed down.
//! A bad value fails at start with clap's message, which names the variable (`value_name`).

use std::fmt;
use std::net::SocketAddr;
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

    /// The same server with another database path (PostgreSQL).
    pub fn with_path(&self, path: &str) -> ServerUrl {
        let mut url = self.0.clone();
        url.set_path(path);
        ServerUrl(url)
    }
}

impl FromStr for ServerUrl {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Url::parse(s).map(ServerUrl).map_err(|e| format!("not a URL ({e})"))
    }
}

impl fmt::Display for ServerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut shown = self.0.clone();
        if shown.password().is_some() {
            // Only fails for URLs that cannot have a password, which this one has.
            let _ = shown.set_password(Some("***"));
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
    /// PostgreSQL; `up` and `migrate` create the database if it is missing.
    #[arg(
        long,
        env = "DATABASE_URL",
        value_name = "DATABASE_URL",
        global = true,
        hide_env_values = true,
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
        default_value = "redis://127.0.0.1:6379"
    )]
    pub redis_url: ServerUrl,
}

/// Names that let several deployments (and tests) share the same servers.
#[derive(clap::Args, Debug, Clone)]
#[command(next_help_heading = "Namespace")]
pub struct NamespaceArgs {
    /// JetStream stream for usage events.
    #[arg(long, env = "TOLLGATE_STREAM", value_name = "TOLLGATE_STREAM", global = true,
          default_value = "TOLLGATE_USAGE", value_parser = parse_stream_name)]
    pub stream: String,
    /// First token of every NATS subject (usage events go to `<prefix>.usage.>`).
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
pub struct MetricsArgs {
    /// Address of the Prometheus endpoint (`/metrics`).
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
pub struct ValidatorArgs {
    /// Address of the HTTP API.
    #[arg(long, env = "TOLLGATE_LISTEN", value_name = "TOLLGATE_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Comma-separated CIDRs whose X-Forwarded-For / X-Real-IP headers are believed.
    #[arg(
        long,
        env = "TOLLGATE_TRUSTED_PROXIES",
        value_name = "TOLLGATE_TRUSTED_PROXIES",
        value_delimiter = ',',
        default_value = "127.0.0.0/8,::1/128"
    )]
    pub trusted_proxies: Vec<IpNet>,
    /// Events held in memory between the HTTP handlers and the NATS publisher.
    #[arg(long, env = "TOLLGATE_EVENT_QUEUE", value_name = "TOLLGATE_EVENT_QUEUE", default_value_t = 100_000)]
    pub event_queue: usize,
    /// Most key records held in the in-process cache.
    #[arg(long, env = "TOLLGATE_KEY_CACHE", value_name = "TOLLGATE_KEY_CACHE", default_value_t = 1_000_000)]
    pub key_cache: u64,
    /// How long an unknown key is remembered as unknown (one database lookup per key per this period at most).
    #[arg(long, env = "TOLLGATE_NEGATIVE_CACHE_TTL", value_name = "TOLLGATE_NEGATIVE_CACHE_TTL",
          default_value = "30s", value_parser = humantime::parse_duration)]
    pub negative_cache_ttl: Duration,
    /// How often the validator asks PostgreSQL which keys and organizations changed (revocations reach the cache
    /// within about this long).
    #[arg(long, env = "TOLLGATE_KEY_REFRESH", value_name = "TOLLGATE_KEY_REFRESH",
          default_value = "1s", value_parser = humantime::parse_duration)]
    pub key_refresh: Duration,
}

/// The workers' batching.
#[derive(clap::Args, Debug, Clone)]
pub struct WorkerArgs {
    /// Most NATS messages per batch (each message carries up to 1000 events).
    #[arg(long, env = "TOLLGATE_BATCH_MESSAGES", value_name = "TOLLGATE_BATCH_MESSAGES", default_value_t = 50)]
    pub batch_messages: usize,
    /// Longest a worker waits to fill a batch.
    #[arg(long, env = "TOLLGATE_BATCH_WAIT", value_name = "TOLLGATE_BATCH_WAIT",
          default_value = "50ms", value_parser = humantime::parse_duration)]
    pub batch_wait: Duration,
    /// A batch closes once it holds this many events (or on `TOLLGATE_BATCH_MESSAGES`, or `TOLLGATE_BATCH_WAIT`).
    #[arg(long, env = "TOLLGATE_BATCH_EVENTS", value_name = "TOLLGATE_BATCH_EVENTS", default_value_t = 5000)]
    pub batch_events: usize,
    /// Worker loops in this process sharing the consumer; several keep PostgreSQL busy while others fetch and
    /// decode.
    #[arg(long, env = "TOLLGATE_WORKER_TASKS", value_name = "TOLLGATE_WORKER_TASKS", default_value_t = 4,
          value_parser = clap::value_parser!(u16).range(1..=64))]
    pub worker_tasks: u16,
}

fn parse_stream_name(s: &str) -> Result<String, String> {
    let ok = !s.is_empty() && s.len() <= 200 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    ok.then(|| s.to_owned()).ok_or_else(|| "use letters, digits, '_' and '-' only".to_owned())
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
    fn passwords_never_show() {
        let url: ServerUrl = "postgres://alice:s3cret@db:5432/tollgate".parse().expect("url");
        assert_eq!(url.to_string(), "postgres://alice:***@db:5432/tollgate");
        assert!(!format!("{url:?}").contains("s3cret"));
        assert!(url.expose().contains("s3cret"));
    }

    #[test]
    fn names_are_checked() {
        assert!(parse_stream_name("IT_abc-1").is_ok());
        assert!(parse_stream_name("a.b").is_err());
        assert!(parse_subject_prefix("tollgate.eu").is_ok());
        assert!(parse_subject_prefix("a..b").is_err());
        assert!(parse_subject_prefix("a.>").is_err());
    }
}
