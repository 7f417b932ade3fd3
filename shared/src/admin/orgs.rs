use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

use super::{conflict_or, AdminError};
use crate::domain::{LimitSetting, PlanName};

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Organization {
    pub id: Uuid,
    pub name: String,
    pub slug: String,
    #[sqlx(try_from = "String")]
    pub plan: PlanName,
    pub active: bool,
    pub rate_limit_per_minute: Option<i32>,
    pub monthly_request_limit: Option<i64>,
    pub max_api_keys: i32,
    /// The organization's own limits (per minute, monthly) only run in shadow mode.
    pub rate_limit_shadow: bool,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

const COLUMNS: &str = "id, name, slug, plan, active, rate_limit_per_minute, monthly_request_limit, max_api_keys, \
                       rate_limit_shadow, created_at, updated_at";

#[derive(Debug, Clone)]
pub struct NewOrg {
    pub name: String,
    /// Derived from the name when absent.
    pub slug: Option<String>,
    pub plan: PlanName,
    /// Absent: 60 per minute.
    pub rate_limit_per_minute: Option<LimitSetting>,
    /// Absent: unlimited.
    pub monthly_request_limit: Option<LimitSetting>,
    pub max_api_keys: Option<i32>,
}

/// Fields to change; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct OrgChanges {
    pub name: Option<String>,
    pub plan: Option<PlanName>,
    pub rate_limit_per_minute: Option<LimitSetting>,
    pub monthly_request_limit: Option<LimitSetting>,
    pub max_api_keys: Option<i32>,
    pub active: Option<bool>,
    pub shadow: Option<bool>,
}

const DEFAULT_RATE_LIMIT_PER_MINUTE: i64 = 60;
const DEFAULT_MAX_API_KEYS: i32 = 100;

pub async fn create_org(pool: &PgPool, new: NewOrg) -> Result<Organization, AdminError> {
    let slug = slug_for(&new.name, new.slug)?;
    let per_minute = new.rate_limit_per_minute.unwrap_or(LimitSetting::Max(DEFAULT_RATE_LIMIT_PER_MINUTE));
    let sql = format!(
        "INSERT INTO organizations (id, name, slug, plan, rate_limit_per_minute, monthly_request_limit, max_api_keys)
         VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING {COLUMNS}"
    );
    sqlx::query_as(&sql)
        .bind(Uuid::now_v7())
        .bind(&new.name)
        .bind(&slug)
        .bind(new.plan.as_str())
        .bind(to_i32(per_minute.as_option(), "rate limit per minute")?)
        .bind(new.monthly_request_limit.and_then(LimitSetting::as_option))
        .bind(new.max_api_keys.unwrap_or(DEFAULT_MAX_API_KEYS))
        .fetch_one(pool)
        .await
        .map_err(|e| {
            check_violation(e)
                .unwrap_or_else(|e| conflict_or(e, || format!("an organization with slug {slug:?} exists")))
        })
}

pub async fn list_orgs(pool: &PgPool) -> Result<Vec<Organization>, AdminError> {
    Ok(sqlx::query_as(&format!("SELECT {COLUMNS} FROM organizations ORDER BY created_at")).fetch_all(pool).await?)
}

/// Finds an organization by id or slug: by id first, so that an organization whose slug is another's id (made
/// before slugs that are UUIDs were refused) is found by its slug only when no organization has that id.
pub async fn find_org(pool: &PgPool, id_or_slug: &str) -> Result<Organization, AdminError> {
    let id = Uuid::parse_str(id_or_slug).ok();
    let sql = format!(
        "SELECT {COLUMNS} FROM organizations WHERE id = $1 OR slug = $2 ORDER BY id = $1 DESC NULLS LAST LIMIT 1"
    );
    sqlx::query_as(&sql).bind(id).bind(id_or_slug).fetch_optional(pool).await?.ok_or_else(|| {
        AdminError::NotFound(format!("organization {id_or_slug:?} not found (`tollgate org list` lists them)"))
    })
}

pub async fn update_org(pool: &PgPool, id_or_slug: &str, changes: OrgChanges) -> Result<Organization, AdminError> {
    let org = find_org(pool, id_or_slug).await?;
    let sql = format!(
        "UPDATE organizations SET
            name = COALESCE($2, name),
            plan = COALESCE($3, plan),
            rate_limit_per_minute = CASE WHEN $4 THEN $5 ELSE rate_limit_per_minute END,
            monthly_request_limit = CASE WHEN $6 THEN $7 ELSE monthly_request_limit END,
            max_api_keys = COALESCE($8, max_api_keys),
            active = COALESCE($9, active),
            rate_limit_shadow = COALESCE($10, rate_limit_shadow)
         WHERE id = $1 RETURNING {COLUMNS}"
    );
    sqlx::query_as(&sql)
        .bind(org.id)
        .bind(changes.name)
        .bind(changes.plan.as_ref().map(PlanName::as_str))
        .bind(changes.rate_limit_per_minute.is_some())
        .bind(to_i32(changes.rate_limit_per_minute.and_then(LimitSetting::as_option), "rate limit per minute")?)
        .bind(changes.monthly_request_limit.is_some())
        .bind(changes.monthly_request_limit.and_then(LimitSetting::as_option))
        .bind(changes.max_api_keys)
        .bind(changes.active)
        .bind(changes.shadow)
        .fetch_one(pool)
        .await
        .map_err(|e| check_violation(e).unwrap_or_else(AdminError::from))
}

/// Turns a CHECK violation (or a key's tier, or an organization's plan, that no row has) into a message that says which value was refused
/// and what it may be. The database stays the one place that decides; this only words its answer.
pub(super) fn check_violation(e: sqlx::Error) -> Result<AdminError, sqlx::Error> {
    match e.as_database_error() {
        Some(d) if d.constraint() == Some("api_keys_rate_limit_tier_fkey") => Ok(AdminError::Invalid(
            "no such tier: `tollgate tier list` shows them, `tollgate tier set NAME …` makes one".to_owned(),
        )),
        Some(d) if d.constraint() == Some("organizations_plan_fkey") => Ok(AdminError::Invalid(
            "no such plan: add it to the `plans` table first (name, included_units, price_per_thousand_minor, \
             currency)"
                .to_owned(),
        )),
        Some(d) if d.code().is_some_and(|c| c == "23514") => {
            let constraint = d.constraint().unwrap_or("check");
            Ok(AdminError::Invalid(match refused_value(constraint) {
                Some(rule) => rule.to_owned(),
                None => format!("value refused by the database ({constraint})"),
            }))
        }
        _ => Err(e),
    }
}

/// What a value an operator gives must be, by the CHECK constraint that refused it.
fn refused_value(constraint: &str) -> Option<&'static str> {
    Some(match constraint {
        "organizations_name_check" | "api_keys_name_check" => "a name must be 1 to 200 characters",
        "organizations_slug_check" => "a slug must be 1 to 63 of a-z, 0-9 and '-', not starting with '-'",
        "rate_limit_tiers_name_check" => {
            "a tier name must be 1 to 63 of a-z, 0-9, '_' and '-', not starting with '_' or '-'"
        }
        "organizations_rate_limit_per_minute_check"
        | "organizations_monthly_request_limit_check"
        | "organizations_max_api_keys_check"
        | "api_keys_custom_rate_limit_per_minute_check"
        | "rate_limit_tiers_window_limit_check"
        | "rate_limit_tiers_burst_limit_check" => "a limit must be a positive number",
        "rate_limit_tiers_window_seconds_check" | "rate_limit_tiers_burst_seconds_check" => {
            "a window must be 1 second to 24 hours"
        }
        _ => return None,
    })
}

pub(super) fn to_i32(value: Option<i64>, what: &str) -> Result<Option<i32>, AdminError> {
    value.map(|v| i32::try_from(v).map_err(|_| AdminError::Invalid(format!("{what} {v} is too large")))).transpose()
}

/// The slug given, or else one made from the name.
fn slug_for(name: &str, given: Option<String>) -> Result<String, AdminError> {
    let slug = match given {
        Some(slug) => slug,
        // An empty name gets the name's own refusal.
        None if name.is_empty() => String::new(),
        None => {
            let slug = slugify(name);
            if slug.is_empty() {
                return Err(AdminError::Invalid(format!(
                    "no slug can be made from the name {name:?} (it has no letter a-z or digit): give one with --slug"
                )));
            }
            slug
        }
    };
    // Another organization's id, were it one: `--org` takes either, and would then name two.
    if Uuid::parse_str(&slug).is_ok() {
        return Err(AdminError::Invalid(format!(
            "a slug cannot be a UUID ({slug:?}), since --org takes ids too: pick another with --slug"
        )));
    }
    Ok(slug)
}

/// "Acme Corp." → "acme-corp".
fn slugify(name: &str) -> String {
    let mut slug = String::new();
    for c in name.chars().flat_map(char::to_lowercase) {
        if c.is_ascii_alphanumeric() {
            slug.push(c);
        } else if !slug.is_empty() && !slug.ends_with('-') {
            slug.push('-');
        }
    }
    slug.truncate(63);
    slug.trim_end_matches('-').to_owned()
}

#[cfg(test)]
mod tests {
    #[test]
    fn slugs_are_derived_from_names() {
        assert_eq!(super::slugify("Acme Corp."), "acme-corp");
        assert_eq!(super::slugify("  Zoë & Co  "), "zo-co");
    }

    #[test]
    fn a_name_no_slug_can_be_made_from_asks_for_one() {
        assert_eq!(super::slug_for("Acme", None).expect("a slug"), "acme");
        assert_eq!(super::slug_for("株式会社", Some("kk".into())).expect("the slug given"), "kk");
        // A slug given empty is the slug's to refuse (the database's check says what a slug must be).
        assert_eq!(super::slug_for("Acme", Some(String::new())).expect("left to the check"), "");
        for name in ["株式会社", "!!!"] {
            let error = super::slug_for(name, None).expect_err("no slug").to_string();
            assert!(error.contains("--slug") && error.contains(name), "{error}");
        }
        let id = "0190a0b0-0000-7000-8000-000000000001";
        assert!(super::slug_for(id, None).expect_err("a UUID").to_string().contains("UUID"));
    }
}
