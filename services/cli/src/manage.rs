//! `tollgate org …` and `tollgate key …`: thin wrappers over the shared admin operations.

use std::io::{IsTerminal, Read};

use anyhow::Context;
use chrono::Utc;
use sqlx::PgPool;

use tollgate_shared::admin::{
    self, Actor, KeyChanges, KeyInfo, NewKey, NewOrg, OrgChanges, Organization, Tier, TierChanges, WindowSetting,
};
use tollgate_shared::domain::{LimitSetting, PlanName};
use tollgate_shared::key::ApiKey;

use crate::cli::{KeyCommand, KeySpec, OrgCommand, TierCommand};
use crate::output::{fields, or_dash, print, table};

pub async fn org(pool: &PgPool, json: bool, command: OrgCommand) -> anyhow::Result<()> {
    match command {
        OrgCommand::Create { name, slug, settings } => {
            let new = NewOrg {
                name,
                slug,
                plan: settings.plan.unwrap_or_else(|| PlanName::from_static(PlanName::DEFAULT)),
                rate_limit_per_minute: settings.rate_limit_per_minute,
                monthly_request_limit: settings.monthly_limit,
                max_api_keys: settings.max_keys,
            };
            let org = admin::create_org(pool, new).await?;
            print(json, &org, show_org)
        }
        OrgCommand::List => {
            let orgs = admin::list_orgs(pool).await?;
            print(json, &orgs, |orgs| {
                let rows = orgs
                    .iter()
                    .map(|o| {
                        vec![
                            o.id.to_string(),
                            o.slug.clone(),
                            o.name.clone(),
                            o.plan.to_string(),
                            o.active.to_string(),
                            or_dash(&o.rate_limit_per_minute),
                            or_dash(&o.monthly_request_limit),
                        ]
                    })
                    .collect();
                table(&["ID", "SLUG", "NAME", "PLAN", "ACTIVE", "PER MINUTE", "PER MONTH"], rows)
            })
        }
        OrgCommand::Update { org, name, settings, active, shadow } => {
            let changes = OrgChanges {
                name,
                plan: settings.plan,
                rate_limit_per_minute: settings.rate_limit_per_minute,
                monthly_request_limit: settings.monthly_limit,
                max_api_keys: settings.max_keys,
                active,
                shadow,
            };
            let org = admin::update_org(pool, &org, changes).await?;
            print(json, &org, show_org)
        }
    }
}

fn show_org(o: &Organization) -> String {
    fields(&[
        ("id", o.id.to_string()),
        ("name", o.name.clone()),
        ("slug", o.slug.clone()),
        ("plan", o.plan.to_string()),
        ("active", o.active.to_string()),
        ("rate limit per minute", or_dash(&o.rate_limit_per_minute)),
        ("monthly request limit", or_dash(&o.monthly_request_limit)),
        ("max keys", o.max_api_keys.to_string()),
        ("limits in shadow mode", o.rate_limit_shadow.to_string()),
        ("created", o.created_at.to_rfc3339()),
    ])
}

pub async fn key(pool: &PgPool, json: bool, command: KeyCommand) -> anyhow::Result<()> {
    let actor = Actor::cli();
    match command {
        KeyCommand::Create { key, env } => {
            let (info, plaintext) = admin::create_key(pool, &actor, new_key(key)?, env).await?;
            #[derive(serde::Serialize)]
            struct Created<'a> {
                key: &'a str,
                #[serde(flatten)]
                info: &'a KeyInfo,
            }
            let created = Created { key: plaintext.expose(), info: &info };
            if !json {
                eprintln!("Store this key now: it is shown only once and cannot be recovered.");
            }
            print(json, &created, |c| format!("{}\n\n{}", c.key, show_key(c.info)))
        }
        KeyCommand::Import { key, on_command_line: None } => {
            let mut text = String::new();
            if std::io::stdin().is_terminal() {
                eprintln!("Paste the key, then press Enter and Ctrl-D:");
            }
            std::io::stdin().read_to_string(&mut text).context("cannot read the key from standard input")?;
            let plaintext = ApiKey::parse(text.trim()).map_err(|e| anyhow::anyhow!("cannot import this key: {e}"))?;
            let info = admin::import_key(pool, &actor, new_key(key)?, &plaintext).await?;
            print(json, &info, show_key)
        }
        KeyCommand::List { org } => {
            let keys = admin::list_keys(pool, &org).await?;
            print(json, &keys, |keys| {
                let rows = keys
                    .iter()
                    .map(|k| {
                        vec![
                            k.id.to_string(),
                            k.name.clone(),
                            format!("{}…{}", k.prefix, k.key_hint),
                            k.role.to_string(),
                            k.rate_limit_tier.to_string(),
                            status(k).to_owned(),
                            or_dash(&k.last_used_at.map(|t| t.to_rfc3339())),
                        ]
                    })
                    .collect();
                table(&["ID", "NAME", "KEY", "ROLE", "TIER", "STATUS", "LAST USED"], rows)
            })
        }
        KeyCommand::Show { id } => print(json, &admin::show_key(pool, id).await?, show_key),
        KeyCommand::Revoke { id, reason } => print(json, &admin::revoke_key(pool, &actor, id, reason).await?, show_key),
        KeyCommand::Update { id, tier, scopes, rate_limit_per_minute, expires_at, active } => {
            let changes = KeyChanges {
                tier,
                scopes: scopes.map(|s| s.into_iter().filter(|s| !s.is_empty()).collect()),
                custom_rate_limit_per_minute: rate_limit_per_minute,
                expires_at: expires_at.map(|e| e.0),
                active,
            };
            print(json, &admin::update_key(pool, &actor, id, changes).await?, show_key)
        }
    }
}

pub async fn tier(pool: &PgPool, json: bool, command: TierCommand) -> anyhow::Result<()> {
    match command {
        TierCommand::List => {
            let tiers = admin::list_tiers(pool).await?;
            print(json, &tiers, |tiers| {
                let rows = tiers
                    .iter()
                    .map(|t| {
                        vec![
                            t.name.clone(),
                            limit_text(t.window_limit, t.window_seconds),
                            limit_text(t.burst_limit, t.burst_seconds),
                            t.shadow.to_string(),
                        ]
                    })
                    .collect();
                table(&["TIER", "LIMIT", "BURST", "SHADOW"], rows)
            })
        }
        TierCommand::Set { name, per_hour, limit, window, per_minute, burst_limit, burst_window, shadow } => {
            let setting = |limit: Option<LimitSetting>, seconds: Option<i32>| {
                limit.zip(seconds).map(|(limit, seconds)| WindowSetting { limit, seconds })
            };
            let changes = TierChanges {
                window: setting(per_hour, Some(3600)).or_else(|| setting(limit, window)),
                burst: setting(per_minute, Some(60)).or_else(|| setting(burst_limit, burst_window)),
                shadow,
            };
            let (tier, made) = admin::set_tier(pool, name.as_str(), changes).await?;
            if made {
                eprintln!("made a new tier {name}, with only the limits given");
            }
            print(json, &tier, show_tier)
        }
    }
}

fn limit_text(limit: Option<i64>, seconds: i32) -> String {
    match limit {
        None => "-".to_owned(),
        Some(n) => format!("{n} per {}", humantime::format_duration(std::time::Duration::from_secs(seconds as u64))),
    }
}

fn show_tier(t: &Tier) -> String {
    fields(&[
        ("tier", t.name.clone()),
        ("limit", limit_text(t.window_limit, t.window_seconds)),
        ("burst", limit_text(t.burst_limit, t.burst_seconds)),
        ("shadow", t.shadow.to_string()),
        ("updated", t.updated_at.to_rfc3339()),
    ])
}

fn new_key(spec: KeySpec) -> anyhow::Result<NewKey> {
    let expires_at = match (spec.expires_at, spec.expires_in) {
        (Some(at), _) => Some(at),
        (None, Some(period)) => Some(
            chrono::TimeDelta::from_std(period)
                .ok()
                .and_then(|period| Utc::now().checked_add_signed(period))
                .ok_or_else(|| {
                    anyhow::anyhow!("--expires-in {} is too far ahead", humantime::format_duration(period))
                })?,
        ),
        (None, None) => None,
    };
    Ok(NewKey {
        org: spec.org,
        name: spec.name,
        role: spec.role,
        tier: spec.tier,
        scopes: spec.scopes.into_iter().filter(|s| !s.is_empty()).collect(),
        custom_rate_limit_per_minute: spec.rate_limit_per_minute.map(i64::from),
        expires_at,
    })
}

fn status(k: &KeyInfo) -> &'static str {
    if k.revoked_at.is_some() {
        "revoked"
    } else if k.expires_at.is_some_and(|t| t <= Utc::now()) {
        "expired"
    } else if !k.active {
        "disabled"
    } else if !k.org_active {
        "org disabled"
    } else {
        "active"
    }
}

fn show_key(k: &KeyInfo) -> String {
    fields(&[
        ("id", k.id.to_string()),
        ("org", k.org_id.to_string()),
        ("name", k.name.clone()),
        ("key", format!("{}…{}", k.prefix, k.key_hint)),
        ("role", k.role.to_string()),
        ("scopes", k.scopes.join(",")),
        ("tier", k.rate_limit_tier.to_string()),
        ("rate limit per minute", or_dash(&k.custom_rate_limit_per_minute)),
        ("status", status(k).to_owned()),
        ("expires", or_dash(&k.expires_at.map(|t| t.to_rfc3339()))),
        ("revoked", or_dash(&k.revoked_at.map(|t| t.to_rfc3339()))),
        ("reason", or_dash(&k.deactivated_reason)),
        ("created", k.created_at.to_rfc3339()),
        ("last used", or_dash(&k.last_used_at.map(|t| t.to_rfc3339()))),
        ("total requests", k.total_requests.to_string()),
    ])
}
