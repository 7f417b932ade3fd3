//! The command line: every subcommand and flag, with `--help` everywhere.

use std::ffi::OsStr;

use chrono::{DateTime, Utc};
use clap::builder::{RangedU64ValueParser, TypedValueParser};
use clap::error::ErrorKind;
use clap::{Args, Parser, Subcommand};
use uuid::Uuid;

use tollgate_shared::codec;
use tollgate_shared::config::{MetricsArgs, NamespaceArgs, ServerArgs, ValidatorArgs, WorkerArgs};
use tollgate_shared::domain::{LimitSetting, PlanName, Role, TierName};
use tollgate_shared::key::KeyEnv;

/// Tollgate: API-key checking, rate limiting and usage metering for high-traffic APIs.
///
/// Start everything with `tollgate up --demo`, then manage organizations and keys with `tollgate org` and
/// `tollgate key`. Every server setting can also be set with the environment variable shown in its help.
#[derive(Parser, Debug)]
#[command(name = "tollgate", version, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub servers: ServerArgs,
    #[command(flatten)]
    pub namespace: NamespaceArgs,
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true, help_heading = "Output")]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create the database if it is missing and apply pending migrations.
    Migrate,
    /// Run the validator and all workers in one process (creating the database, schema and stream as needed).
    Up(UpArgs),
    /// Run only the validator (HTTP API); scale out by running several.
    Validator {
        #[command(flatten)]
        validator: ValidatorArgs,
        #[command(flatten)]
        metrics: MetricsArgs,
    },
    /// Run only a worker (usage events → PostgreSQL); scale out by running several.
    Worker {
        #[command(flatten)]
        worker: WorkerArgs,
        #[command(flatten)]
        metrics: MetricsArgs,
    },
    /// Manage organizations.
    #[command(subcommand)]
    Org(OrgCommand),
    /// Manage API keys.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Manage rate-limit tiers (the limits every key of a tier gets).
    #[command(subcommand)]
    Tier(TierCommand),
    /// Check usage, billing and the quota counters.
    #[command(subcommand)]
    Usage(UsageCommand),
    /// Look at and replay usage messages the workers could not decode.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Benchmarks that report figures for BENCHMARKS.md (each against a database and stream of its own, removed
    /// afterwards).
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Subcommand, Debug)]
pub enum UsageCommand {
    /// Check that billing = hourly rollup = usage rows for every organization and month, and compare this month's
    /// Redis quota counters with PostgreSQL. Exits non-zero when billing, rollup and usage rows disagree (a drifting quota
    /// counter is reported, and repaired with --fix, but does not fail the check).
    Reconcile {
        /// Only this organization (id or slug).
        #[arg(long)]
        org: Option<String>,
        /// Only this month (UTC), e.g. 2026-11.
        #[arg(long, value_name = "YYYY-MM", value_parser = parse_month)]
        month: Option<chrono::NaiveDate>,
        /// Set missing or drifting quota counters to PostgreSQL's totals (safe while workers run). Without Redis the
        /// check runs on billing alone, and this refuses.
        #[arg(long)]
        fix: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum DlqCommand {
    /// List dead letters: sequence, time, size, reason.
    List,
    /// Republish dead letters to the usage stream, then delete them from the dead-letter stream.
    #[command(group(clap::ArgGroup::new("which").args(["seq", "all"]).required(true)))]
    Replay {
        /// The dead letter's sequence (from `dlq list`).
        #[arg(long)]
        seq: Option<u64>,
        /// Every dead letter.
        #[arg(long)]
        all: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Publish synthetic usage events straight to a stream at a target rate, run workers in this process, and
    /// report committed rows/s, lag p50/p99, the raw binary-COPY ceiling and bytes per row.
    Pipeline(BenchPipelineArgs),
    /// Full verification over HTTP against a trivial handler on the same machine.
    Verify(crate::bench::verify::VerifyBenchArgs),
    /// The trivial handler `bench verify` compares against (started by it).
    #[command(hide = true)]
    TrivialServer {
        #[arg(long)]
        listen: std::net::SocketAddr,
        /// The validator's, so that both serve HTTP alike.
        #[command(flatten)]
        connections: tollgate_shared::config::ConnectionArgs,
    },
}

#[derive(Args, Debug)]
pub struct BenchPipelineArgs {
    /// Target events per second.
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub rate: u64,
    /// How long to publish, in seconds (at least 3: the first 2 s are a warm-up).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(3..=3600))]
    pub seconds: u64,
    /// Events per NATS message (as the validator's publisher batches them; at most 1000).
    #[arg(long, default_value_t = 100, value_parser = events_per_message)]
    pub events_per_message: usize,
    /// Organizations (and one key each) the events are spread over.
    #[arg(long, default_value_t = 100, value_parser = RangedU64ValueParser::<usize>::new().range(1..=1_000_000))]
    pub orgs: usize,
    #[command(flatten)]
    pub worker: WorkerArgs,
}

fn parse_month(s: &str) -> Result<chrono::NaiveDate, String> {
    chrono::NaiveDate::parse_from_str(&format!("{s}-01"), "%Y-%m-%d")
        .map_err(|_| "expected YYYY-MM, e.g. 2026-11".into())
}

#[derive(Subcommand, Debug)]
pub enum TierCommand {
    /// List the tiers and their limits.
    List,
    /// Change a tier's limits, or make a new tier. Examples: `--per-hour 1000 --per-minute 50`, `--limit 20 --window
    /// 10s`. A new tier has only the limits given.
    #[command(group(
        clap::ArgGroup::new("change").args(["per_hour", "limit", "per_minute", "burst_limit", "shadow"]).required(true).multiple(true)
    ))]
    Set {
        /// The tier: unlimited, premium, standard, limited, or a name of your own (a-z, 0-9, '_', '-').
        name: TierName,
        /// The main limit as units per hour (a request weighs its cost, 1 by default), or `none`.
        #[arg(long, value_name = "N|none", conflicts_with_all = ["limit", "window"])]
        per_hour: Option<LimitSetting>,
        /// The main limit with a window of your choice (with --window), or `none`.
        #[arg(long, value_name = "N|none", requires = "window")]
        limit: Option<LimitSetting>,
        /// The main limit's window (whole seconds, 1s to 24h), e.g. 10s, 1h.
        #[arg(long, value_parser = parse_window, requires = "limit")]
        window: Option<i32>,
        /// The burst limit as units per minute, or `none`.
        #[arg(long, value_name = "N|none", conflicts_with_all = ["burst_limit", "burst_window"])]
        per_minute: Option<LimitSetting>,
        /// The burst limit with a window of your choice (with --burst-window), or `none`.
        #[arg(long, value_name = "N|none", requires = "burst_window")]
        burst_limit: Option<LimitSetting>,
        /// The burst limit's window (whole seconds, 1s to 24h).
        #[arg(long, value_parser = parse_window, requires = "burst_limit")]
        burst_window: Option<i32>,
        /// Shadow mode: compute, count and record the tier's decisions but never deny (`--shadow` alone: true).
        #[arg(long, num_args = 0..=1, default_missing_value = "true")]
        shadow: Option<bool>,
    },
}

/// A window length in whole seconds between 1 s and 24 h.
fn parse_window(s: &str) -> Result<i32, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("expected a duration like 10s or 1h ({e})"))?;
    if d.subsec_nanos() != 0 || d.as_secs() == 0 || d.as_secs() > 86_400 {
        return Err("use whole seconds between 1s and 24h".to_owned());
    }
    i32::try_from(d.as_secs()).map_err(|_| "too long".to_owned())
}

#[derive(Args, Debug)]
pub struct UpArgs {
    /// Also create a demo organization and key, and print a ready-to-paste curl line.
    #[arg(long)]
    pub demo: bool,
    #[command(flatten)]
    pub validator: ValidatorArgs,
    #[command(flatten)]
    pub worker: WorkerArgs,
    #[command(flatten)]
    pub metrics: MetricsArgs,
}

#[derive(Subcommand, Debug)]
pub enum OrgCommand {
    /// Create an organization (plan free, 60 units per minute, no monthly limit and 100 keys unless given).
    Create {
        /// Display name.
        #[arg(long)]
        name: String,
        /// URL-safe identifier (a-z, 0-9, '-'); derived from the name when omitted.
        #[arg(long)]
        slug: Option<String>,
        #[command(flatten)]
        settings: OrgSettings,
    },
    /// List organizations.
    List,
    /// Change an organization's settings.
    Update {
        /// The organization's id or slug.
        org: String,
        /// New display name.
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        settings: OrgSettings,
        /// Enable or disable every key of the organization at once.
        #[arg(long)]
        active: Option<bool>,
        /// Shadow mode for the organization's own limits (per minute, monthly): computed, counted and recorded,
        /// but never denying (`--shadow` alone: true).
        #[arg(long, num_args = 0..=1, default_missing_value = "true")]
        shadow: Option<bool>,
    },
}

#[derive(Args, Debug)]
pub struct OrgSettings {
    /// Commercial plan: free (the default when creating), pro, enterprise, or one added to the `plans` table.
    #[arg(long)]
    pub plan: Option<PlanName>,
    /// Units per minute shared by all the organization's keys (a request weighs its cost, 1 by default), or `none`.
    #[arg(long, value_name = "N|none")]
    pub rate_limit_per_minute: Option<LimitSetting>,
    /// Units per calendar month (UTC), or `none`.
    #[arg(long, value_name = "N|none")]
    pub monthly_limit: Option<LimitSetting>,
    /// Most keys the organization may hold.
    #[arg(long, value_name = "N")]
    pub max_keys: Option<i32>,
}

#[derive(Subcommand, Debug)]
pub enum KeyCommand {
    /// Create a key; the key itself is printed this once and never stored.
    Create {
        #[command(flatten)]
        key: KeySpec,
        /// Live or test key (shown in the key's prefix).
        #[arg(long, value_enum, default_value = "live")]
        env: KeyEnv,
    },
    /// Store an existing key read from standard input (for keys made by another system), hashed like any other.
    Import {
        #[command(flatten)]
        key: KeySpec,
        /// A key given as an argument, refused: see [`KeyOnStdin`].
        #[arg(hide = true, allow_hyphen_values = true, value_parser = KeyOnStdin)]
        on_command_line: Option<std::convert::Infallible>,
    },
    /// List an organization's keys (prefix and last few characters only; never the key).
    List {
        /// The organization's id or slug.
        #[arg(long)]
        org: String,
    },
    /// Show one key.
    Show {
        /// The key's id (from `key list`).
        #[arg(value_name = "KEY_ID", value_parser = KeyIdParser)]
        id: Uuid,
    },
    /// Revoke a key for good.
    Revoke {
        /// The key's id (from `key list`).
        #[arg(value_name = "KEY_ID", value_parser = KeyIdParser)]
        id: Uuid,
        /// Why, for the audit trail.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Change a key's settings.
    Update {
        /// The key's id (from `key list`).
        #[arg(value_name = "KEY_ID", value_parser = KeyIdParser)]
        id: Uuid,
        /// Rate-limit tier (see `tier list`).
        #[arg(long)]
        tier: Option<TierName>,
        /// Comma-separated scopes, replacing the current ones (`--scopes ""` removes all).
        #[arg(long, value_delimiter = ',')]
        scopes: Option<Vec<String>>,
        /// The key's own per-minute limit, or `none`.
        #[arg(long, value_name = "N|none")]
        rate_limit_per_minute: Option<LimitSetting>,
        /// RFC 3339 time, or `none` for no expiry.
        #[arg(long, value_name = "RFC3339|none", value_parser = parse_expiry)]
        expires_at: Option<Expiry>,
        /// Disable (false) or enable again (true); a revoked key stays revoked.
        #[arg(long)]
        active: Option<bool>,
    },
}

#[derive(Args, Debug)]
pub struct KeySpec {
    /// The organization's id or slug.
    #[arg(long)]
    pub org: String,
    /// Display name, 1 to 200 characters and no line breaks (shown to the API as X-Tollgate-Key-Name).
    #[arg(long)]
    pub name: String,
    /// What the key may do (routes can require a role).
    #[arg(long, value_enum, default_value = "user")]
    pub role: Role,
    /// Rate-limit tier (see `tier list`).
    #[arg(long, default_value = TierName::DEFAULT)]
    pub tier: TierName,
    /// Comma-separated scopes.
    #[arg(long, value_delimiter = ',')]
    pub scopes: Vec<String>,
    /// The key's own limit in units per minute.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub rate_limit_per_minute: Option<u32>,
    /// Expire after this long (e.g. 30d, 12h).
    #[arg(long, value_parser = humantime::parse_duration, conflicts_with = "expires_at")]
    pub expires_in: Option<std::time::Duration>,
    /// Expire at this RFC 3339 time.
    #[arg(long, value_parser = parse_time)]
    pub expires_at: Option<DateTime<Utc>>,
}

/// An expiry to set: a time, or none.
#[derive(Debug, Clone, Copy)]
pub struct Expiry(pub Option<DateTime<Utc>>);

fn events_per_message(s: &str) -> Result<usize, String> {
    match s.parse() {
        Ok(n) if (1..=codec::MAX_EVENTS_PER_MESSAGE).contains(&n) => Ok(n),
        _ => Err(format!("expected a number of events from 1 to {}", codec::MAX_EVENTS_PER_MESSAGE)),
    }
}

/// A key's id, with a hint for what people paste instead: the key itself, or its listing. Unlike clap's own errors,
/// the refusal does not repeat the value, which may be a live key headed for a terminal's scrollback or a CI log.
#[derive(Clone)]
struct KeyIdParser;

impl TypedValueParser for KeyIdParser {
    type Value = Uuid;

    fn parse_ref(&self, cmd: &clap::Command, arg: Option<&clap::Arg>, value: &OsStr) -> Result<Uuid, clap::Error> {
        value.to_str().and_then(|s| Uuid::parse_str(s).ok()).ok_or_else(|| {
            let arg = arg.map_or_else(|| "KEY_ID".to_owned(), ToString::to_string);
            let message = format!(
                "invalid value for '{arg}': expected a key id (a UUID, as `tollgate key list --org ORG` shows it), \
                 not the key (the value is not repeated here, in case it was one)\n"
            );
            clap::Error::raw(ErrorKind::ValueValidation, message).with_cmd(cmd)
        })
    }
}

/// Refuses a key given to `key import` as an argument, where the shell's history and the process list keep it, and
/// does not repeat it, as clap's own "unexpected argument" would.
#[derive(Clone)]
struct KeyOnStdin;

impl TypedValueParser for KeyOnStdin {
    type Value = std::convert::Infallible;

    fn parse_ref(&self, cmd: &clap::Command, _: Option<&clap::Arg>, _: &OsStr) -> Result<Self::Value, clap::Error> {
        let message = "unexpected argument (not repeated here, in case it is the key): the key goes on standard input \
                       (`echo -n \"$KEY\" | tollgate key import …`), not on the command line, where the shell's \
                       history keeps it\n";
        Err(clap::Error::raw(ErrorKind::ValueValidation, message).with_cmd(cmd))
    }
}

fn parse_time(s: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| format!("expected an RFC 3339 time like 2027-01-31T00:00:00Z ({e})"))
}

fn parse_expiry(s: &str) -> Result<Expiry, String> {
    if s == "none" {
        Ok(Expiry(None))
    } else {
        parse_time(s).map(|t| Expiry(Some(t)))
    }
}

#[cfg(test)]
mod tests {
    use super::{Cli, Command, OrgCommand, TierCommand};
    use clap::{CommandFactory, Parser};

    /// The heading `--help` shows a flag under, in a subcommand.
    fn heading(path: &[&str], flag: &str) -> Option<String> {
        let mut command = Cli::command();
        command.build();
        let command = path.iter().fold(&command, |c, name| c.find_subcommand(name).expect("subcommand"));
        let arg = command.get_arguments().find(|a| a.get_long() == Some(flag)).expect("flag");
        arg.get_help_heading().map(str::to_owned)
    }

    #[test]
    fn each_flag_is_listed_under_the_part_it_configures() {
        for (path, flag, expected) in [
            (&["up"][..], "listen", "Validator"),
            (&["up"], "redis-timeout", "Rate limiting"),
            (&["up"], "batch-wait", "Workers"),
            (&["up"], "metrics-listen", "Metrics"),
            (&["validator"], "metrics-listen", "Metrics"),
            (&["worker"], "batch-events", "Workers"),
            (&["worker"], "metrics-listen", "Metrics"),
            (&["key", "create"], "database-url", "Servers"),
            (&["key", "create"], "redis-prefix", "Namespace"),
            (&["key", "create"], "json", "Output"),
        ] {
            assert_eq!(heading(path, flag).as_deref(), Some(expected), "{path:?} --{flag}");
        }
        assert_eq!(heading(&["up"], "demo"), None, "`up --demo` is the command's own option");
    }

    #[test]
    fn a_tier_limit_of_a_chosen_window_needs_the_window() {
        let parse = |args: &[&str]| Cli::try_parse_from([&["tollgate", "tier", "set", "limited"], args].concat());
        for (args, missing) in [(&["--limit", "20"][..], "--window"), (&["--burst-limit", "5"], "--burst-window")] {
            let error = parse(args).expect_err("a limit without its window").to_string();
            assert!(error.contains(missing), "{error}");
        }
        assert!(parse(&["--limit", "20", "--window", "10s", "--burst-limit", "5", "--burst-window", "1s"]).is_ok());
        assert!(parse(&["--per-hour", "none", "--per-minute", "50"]).is_ok());
        let error = parse(&[]).expect_err("nothing to set").to_string();
        assert!(error.contains("--per-hour") && error.contains("--shadow"), "{error}");
    }

    #[test]
    fn shadow_alone_means_true() {
        let shadow = |args: &[&str]| match Cli::try_parse_from(args).expect("parses").command {
            Command::Tier(TierCommand::Set { shadow, .. }) | Command::Org(OrgCommand::Update { shadow, .. }) => shadow,
            other => panic!("{other:?}"),
        };
        for command in [&["tollgate", "tier", "set", "limited"][..], &["tollgate", "org", "update", "acme"]] {
            assert_eq!(shadow(&[command, &["--shadow"]].concat()), Some(true), "{command:?}");
            assert_eq!(shadow(&[command, &["--shadow", "false"]].concat()), Some(false), "{command:?}");
        }
        assert_eq!(shadow(&["tollgate", "tier", "set", "limited", "--shadow", "--per-hour", "5"]), Some(true));
        assert_eq!(shadow(&["tollgate", "org", "update", "acme", "--shadow", "--active", "false"]), Some(true));
    }

    #[test]
    fn what_people_paste_instead_of_a_key_id_gets_told_what_to_paste() {
        for pasted in ["tg_live_4eC39HqLyjWDarjtT1zdp7dcZ8GJrC0ZXSYIanj10aVcn1", "tg_live_…aVcn"] {
            let error = Cli::try_parse_from(["tollgate", "key", "show", pasted]).expect_err("not an id").to_string();
            assert!(error.contains("expected a key id") && error.contains("key list"), "{error}");
            assert!(!error.contains(pasted), "the refusal repeats what was pasted: {error}");
        }
        let id = "0b6f3a52-1c3e-4f2a-9d8e-2f6a4c1b7e90";
        assert!(Cli::try_parse_from(["tollgate", "key", "revoke", id]).is_ok());
    }

    #[test]
    fn a_new_keys_own_limit_is_a_positive_number() {
        let parse = |n: &str| {
            Cli::try_parse_from([
                "tollgate",
                "key",
                "create",
                "--org",
                "acme",
                "--name",
                "ci",
                "--rate-limit-per-minute",
                n,
            ])
        };
        assert!(parse("0").is_err(), "0 admits nothing: a disabled key says so");
        assert!(parse("1").is_ok());
    }

    #[test]
    fn a_replay_names_both_ways_to_choose_what_it_replays() {
        let error = Cli::try_parse_from(["tollgate", "dlq", "replay"]).expect_err("nothing chosen").to_string();
        assert!(error.contains("--seq") && error.contains("--all"), "{error}");
        assert!(Cli::try_parse_from(["tollgate", "dlq", "replay", "--seq", "3", "--all"]).is_err());
        assert!(Cli::try_parse_from(["tollgate", "dlq", "replay", "--all"]).is_ok());
    }
}
