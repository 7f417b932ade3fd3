use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

use super::orgs::{check_violation, to_i32};
use super::{conflict_or, find_org, Actor, AdminError};
use crate::domain::{LimitSetting, Role, TierName};
use crate::key::ApiKey;

/// A key as operators see it: everything but the key.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct KeyInfo {
    pub id: Uuid,
    pub org_id: Uuid,
    pub name: String,
    pub prefix: String,
    pub key_hint: String,
    #[sqlx(try_from = "String")]
    pub role: Role,
    pub scopes: Vec<String>,
    #[sqlx(try_from = "String")]
    pub rate_limit_tier: TierName,
    pub custom_rate_limit_per_minute: Option<i32>,
    pub active: bool,
    /// Whether its organization is (a key of one that is not is refused as a disabled key is).
    pub org_active: bool,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub deactivated_reason: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub total_requests: i64,
}

const COLUMNS: &str =
    "id, org_id, name, prefix, key_hint, role, scopes, rate_limit_tier, custom_rate_limit_per_minute, \
                       active, (SELECT o.active FROM organizations o WHERE o.id = api_keys.org_id) AS org_active, \
                       expires_at, revoked_at, deactivated_reason, created_at, updated_at, last_used_at, \
                       total_requests";

#[derive(Debug, Clone)]
pub struct NewKey {
    pub org: String,
    pub name: String,
    pub role: Role,
    pub tier: TierName,
    pub scopes: Vec<String>,
    pub custom_rate_limit_per_minute: Option<i64>,
    pub expires_at: Option<DateTime<Utc>>,
}

/// Fields to change; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct KeyChanges {
    pub tier: Option<TierName>,
    pub scopes: Option<Vec<String>>,
    pub custom_rate_limit_per_minute: Option<LimitSetting>,
    /// `Some(None)` removes the expiry.
    pub expires_at: Option<Option<DateTime<Utc>>>,
    pub active: Option<bool>,
}

/// Creates a key and returns it in plaintext: the only time it exists outside the caller's hands.
pub async fn create_key(
    pool: &PgPool,
    actor: &Actor,
    new: NewKey,
    env: crate::key::KeyEnv,
) -> Result<(KeyInfo, ApiKey), AdminError> {
    let key = ApiKey::generate(env);
    let info = insert_key(pool, actor, new, &key, "created").await?;
    Ok((info, key))
}

/// Stores a key that was made elsewhere (e.g. `sk_prod_…`), hashed like any other.
pub async fn import_key(pool: &PgPool, actor: &Actor, new: NewKey, key: &ApiKey) -> Result<KeyInfo, AdminError> {
    insert_key(pool, actor, new, key, "imported").await
}

async fn insert_key(
    pool: &PgPool,
    actor: &Actor,
    new: NewKey,
    key: &ApiKey,
    action: &str,
) -> Result<KeyInfo, AdminError> {
    validate_scopes(&new.scopes)?;
    validate_name(&new.name)?;
    if let Some(expires_at) = new.expires_at.filter(|t| *t <= Utc::now()) {
        return Err(AdminError::Invalid(format!("the expiry {expires_at} has passed: the key would never work")));
    }
    let org = find_org(pool, &new.org).await?;
    let mut tx = pool.begin().await?;
    // Serializes key creation per organization so the max_api_keys check cannot be raced, and reads the limit under
    // the same lock, so that a concurrent change of it cannot be either.
    let max_api_keys: i32 = sqlx::query_scalar("SELECT max_api_keys FROM organizations WHERE id = $1 FOR UPDATE")
        .bind(org.id)
        .fetch_one(&mut *tx)
        .await?;
    let live: i64 = sqlx::query_scalar("SELECT count(*) FROM api_keys WHERE org_id = $1 AND revoked_at IS NULL")
        .bind(org.id)
        .fetch_one(&mut *tx)
        .await?;
    if live >= i64::from(max_api_keys) {
        return Err(AdminError::Conflict(format!(
            "organization {} already has {live} keys (max_api_keys = {max_api_keys}); revoke one or raise the limit \
             with `tollgate org update {} --max-keys N`",
            org.slug, org.slug
        )));
    }
    let sql = format!(
        "INSERT INTO api_keys (id, org_id, name, prefix, key_hint, key_hash, role, scopes, rate_limit_tier,
                               custom_rate_limit_per_minute, expires_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) RETURNING {COLUMNS}"
    );
    let info: KeyInfo = sqlx::query_as(&sql)
        .bind(Uuid::now_v7())
        .bind(org.id)
        .bind(&new.name)
        .bind(key.prefix())
        .bind(key.hint())
        .bind(key.hash().as_bytes())
        .bind(new.role.as_str())
        .bind(&new.scopes)
        .bind(new.tier.as_str())
        .bind(to_i32(new.custom_rate_limit_per_minute, "rate limit per minute")?)
        .bind(new.expires_at)
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| {
            check_violation(e).unwrap_or_else(|e| conflict_or(e, || "this key is already stored".to_owned()))
        })?;
    audit(&mut tx, actor, &info, action, serde_json::json!({ "name": info.name })).await?;
    tx.commit().await?;
    Ok(info)
}

pub async fn list_keys(pool: &PgPool, org: &str) -> Result<Vec<KeyInfo>, AdminError> {
    let org = find_org(pool, org).await?;
    Ok(sqlx::query_as(&format!("SELECT {COLUMNS} FROM api_keys WHERE org_id = $1 ORDER BY created_at"))
        .bind(org.id)
        .fetch_all(pool)
        .await?)
}

pub async fn show_key(pool: &PgPool, id: Uuid) -> Result<KeyInfo, AdminError> {
    sqlx::query_as(&format!("SELECT {COLUMNS} FROM api_keys WHERE id = $1"))
        .bind(id)
        .fetch_optional(pool)
        .await?
        .ok_or_else(|| AdminError::NotFound(format!("key {id} not found (`tollgate key list --org ORG` lists them)")))
}

/// Revokes a key for good. Revoking twice keeps the first revocation's time and reason.
pub async fn revoke_key(pool: &PgPool, actor: &Actor, id: Uuid, reason: Option<String>) -> Result<KeyInfo, AdminError> {
    let mut tx = pool.begin().await?;
    let sql = format!(
        "UPDATE api_keys SET active = false, revoked_at = COALESCE(revoked_at, now()),
                deactivated_reason = CASE WHEN revoked_at IS NULL THEN COALESCE($2, 'revoked')
                                          ELSE deactivated_reason END
         WHERE id = $1 RETURNING {COLUMNS}"
    );
    let info: KeyInfo =
        sqlx::query_as(&sql).bind(id).bind(&reason).fetch_optional(&mut *tx).await?.ok_or_else(|| {
            AdminError::NotFound(format!("key {id} not found (`tollgate key list --org ORG` lists them)"))
        })?;
    audit(&mut tx, actor, &info, "revoked", serde_json::json!({ "reason": reason })).await?;
    tx.commit().await?;
    Ok(info)
}

pub async fn update_key(pool: &PgPool, actor: &Actor, id: Uuid, changes: KeyChanges) -> Result<KeyInfo, AdminError> {
    if let Some(scopes) = &changes.scopes {
        validate_scopes(scopes)?;
    }
    let mut tx = pool.begin().await?;
    // A revoked key is refused by the statement itself, so that a revocation that commits meanwhile still wins.
    let sql = format!(
        "UPDATE api_keys SET
            rate_limit_tier = COALESCE($2, rate_limit_tier),
            scopes = COALESCE($3, scopes),
            custom_rate_limit_per_minute = CASE WHEN $4 THEN $5 ELSE custom_rate_limit_per_minute END,
            expires_at = CASE WHEN $6 THEN $7 ELSE expires_at END,
            active = COALESCE($8, active),
            deactivated_reason = CASE WHEN $8 IS NULL OR revoked_at IS NOT NULL THEN deactivated_reason
                                      WHEN $8 THEN NULL ELSE 'disabled' END
         WHERE id = $1 AND NOT ($8 IS TRUE AND revoked_at IS NOT NULL) RETURNING {COLUMNS}"
    );
    let info: Option<KeyInfo> = sqlx::query_as(&sql)
        .bind(id)
        .bind(changes.tier.as_ref().map(TierName::as_str))
        .bind(&changes.scopes)
        .bind(changes.custom_rate_limit_per_minute.is_some())
        .bind(to_i32(changes.custom_rate_limit_per_minute.and_then(LimitSetting::as_option), "rate limit per minute")?)
        .bind(changes.expires_at.is_some())
        .bind(changes.expires_at.flatten())
        .bind(changes.active)
        .fetch_optional(&mut *tx)
        .await
        .map_err(|e| check_violation(e).unwrap_or_else(AdminError::from))?;
    let Some(info) = info else {
        // No row: the key is missing ("not found"), or it is revoked.
        show_key(pool, id).await?;
        return Err(AdminError::Invalid(format!("key {id} is revoked; create a new key instead")));
    };
    let details = serde_json::json!({
        "tier": changes.tier,
        "scopes": changes.scopes,
        "custom_rate_limit_per_minute": changes.custom_rate_limit_per_minute.map(|l| l.as_option()),
        "expires_at": changes.expires_at,
        "active": changes.active,
    });
    audit(&mut tx, actor, &info, "updated", details).await?;
    tx.commit().await?;
    Ok(info)
}

async fn audit(
    tx: &mut sqlx::PgConnection,
    actor: &Actor,
    key: &KeyInfo,
    action: &str,
    details: serde_json::Value,
) -> Result<(), AdminError> {
    sqlx::query("INSERT INTO key_audit (key_id, org_id, action, actor, details) VALUES ($1, $2, $3, $4, $5)")
        .bind(key.id)
        .bind(key.org_id)
        .bind(action)
        .bind(&actor.0)
        .bind(details)
        .execute(tx)
        .await?;
    Ok(())
}

/// A key's name goes to the upstream as `X-Tollgate-Key-Name` (percent-encoded past printable ASCII); a control
/// character in it (a line break, say) is refused all the same, as a mistake in a name shown in listings and logs.
fn validate_name(name: &str) -> Result<(), AdminError> {
    if name.chars().any(|c| c.is_ascii_control() && c != '\t') {
        return Err(AdminError::Invalid(format!(
            "a key's name cannot hold line breaks or other control characters (it goes in a header): {name:?}"
        )));
    }
    Ok(())
}

fn validate_scopes(scopes: &[String]) -> Result<(), AdminError> {
    let valid = |s: &String| {
        !s.is_empty() && s.len() <= 100 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-.:/*".contains(&b))
    };
    match scopes.iter().find(|s| !valid(s)) {
        Some(bad) => Err(AdminError::Invalid(format!(
            "scope {bad:?} is not valid: use letters, digits and _ - . : / * (at most 100 characters)"
        ))),
        None => Ok(()),
    }
}
