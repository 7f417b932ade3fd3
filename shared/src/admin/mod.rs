//! Operations on organizations, keys and rate-limit tiers: the one implementation behind the CLI (and, later, the admin HTTP API).
//! Every change sets `changed_in` (its transaction) and `updated_at` (its time): the tables' triggers (migrations
//! `…_changes_stamp_themselves`, `…_changes_found_by_transaction`) do, for these operations and an operator's own SQL
//! alike, and validators learn by `changed_in` that a cached key changed.

mod keys;
mod orgs;
mod tiers;

pub use keys::{create_key, import_key, list_keys, revoke_key, show_key, update_key, KeyChanges, KeyInfo, NewKey};
pub use orgs::{create_org, find_org, list_orgs, update_org, NewOrg, OrgChanges, Organization};
pub use tiers::{list_tiers, set_tier, Tier, TierChanges, WindowSetting};

/// Who made a change, as written to `key_audit` (e.g. `cli:alice`).
#[derive(Debug, Clone)]
pub struct Actor(pub String);

impl Actor {
    /// The operator at the terminal.
    pub fn cli() -> Actor {
        let user = std::env::var("USER").or_else(|_| std::env::var("LOGNAME")).unwrap_or_else(|_| "unknown".into());
        Actor(format!("cli:{user}"))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// What was not found, and how to list what there is.
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Invalid(String),
    #[error(
        "the database has no Tollgate tables, or older ones ({0}): run `tollgate migrate`, unless DATABASE_URL points \
         at another database than Tollgate's"
    )]
    Unmigrated(sqlx::Error),
    #[error("database error: {0}")]
    Database(sqlx::Error),
}

impl From<sqlx::Error> for AdminError {
    fn from(e: sqlx::Error) -> AdminError {
        // A table, column, function or type that is not there: a database never migrated, or by an older release.
        let undefined = e.as_database_error().and_then(|d| d.code());
        if undefined.is_some_and(|code| matches!(&*code, "42P01" | "42703" | "42883" | "42704")) {
            AdminError::Unmigrated(e)
        } else {
            AdminError::Database(e)
        }
    }
}

/// Maps a unique violation to a message the operator can act on.
fn conflict_or(e: sqlx::Error, message: impl FnOnce() -> String) -> AdminError {
    let unique = e.as_database_error().and_then(|d| d.code()).is_some_and(|c| c == "23505");
    if unique {
        AdminError::Conflict(message())
    } else {
        AdminError::from(e)
    }
}
