//! Rate-limit tiers: the limits every key of a tier shares, as data operators edit.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;

use super::orgs::check_violation;
use super::AdminError;
use crate::domain::LimitSetting;

/// A tier: up to two rolling-window limits (the main one, typically per hour, and a burst one, typically per
/// minute), and whether they only run in shadow mode.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Tier {
    pub name: String,
    pub window_limit: Option<i64>,
    pub window_seconds: i32,
    pub burst_limit: Option<i64>,
    pub burst_seconds: i32,
    pub shadow: bool,
    pub updated_at: DateTime<Utc>,
}

const COLUMNS: &str = "name, window_limit, window_seconds, burst_limit, burst_seconds, shadow, updated_at";

/// One limit to set: how many requests per how many seconds (or no limit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowSetting {
    pub limit: LimitSetting,
    pub seconds: i32,
}

/// Fields to change; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct TierChanges {
    /// The main limit (e.g. `--per-hour`, or `--limit N --window 10s`).
    pub window: Option<WindowSetting>,
    /// The burst limit (e.g. `--per-minute`).
    pub burst: Option<WindowSetting>,
    pub shadow: Option<bool>,
}

pub async fn list_tiers(pool: &PgPool) -> Result<Vec<Tier>, AdminError> {
    let sql = format!("SELECT {COLUMNS} FROM rate_limit_tiers ORDER BY window_limit NULLS FIRST, name");
    Ok(sqlx::query_as(&sql).fetch_all(pool).await?)
}

/// Changes a tier, making it first (with no limits but those given) if none has this name; says whether it made
/// it. The change is marked with its transaction (a trigger), so validators pick it up for every key of the tier.
pub async fn set_tier(pool: &PgPool, name: &str, changes: TierChanges) -> Result<(Tier, bool), AdminError> {
    let refused = |e| check_violation(e).unwrap_or_else(AdminError::from);
    let mut tx = pool.begin().await?;
    let made = sqlx::query("INSERT INTO rate_limit_tiers (name) VALUES ($1) ON CONFLICT DO NOTHING")
        .bind(name)
        .execute(&mut *tx)
        .await
        .map_err(refused)?;
    let sql = format!(
        "UPDATE rate_limit_tiers SET
            window_limit = CASE WHEN $2 THEN $3 ELSE window_limit END,
            window_seconds = COALESCE($4, window_seconds),
            burst_limit = CASE WHEN $5 THEN $6 ELSE burst_limit END,
            burst_seconds = COALESCE($7, burst_seconds),
            shadow = COALESCE($8, shadow)
         WHERE name = $1 RETURNING {COLUMNS}"
    );
    let limit = |w: Option<WindowSetting>| w.and_then(|w| w.limit.as_option());
    let tier = sqlx::query_as(&sql)
        .bind(name)
        .bind(changes.window.is_some())
        .bind(limit(changes.window))
        .bind(changes.window.map(|w| w.seconds))
        .bind(changes.burst.is_some())
        .bind(limit(changes.burst))
        .bind(changes.burst.map(|w| w.seconds))
        .bind(changes.shadow)
        .fetch_one(&mut *tx)
        .await
        .map_err(refused)?;
    tx.commit().await?;
    Ok((tier, made.rows_affected() == 1))
}
