//! `tollgate usage reconcile`.

use sqlx::PgPool;

use tollgate_shared::admin;
use tollgate_worker::reconcile::{self, Filter, Report};
use tollgate_worker::QuotaCounters;

use crate::cli::UsageCommand;
use crate::output::{or_dash, print, table};

pub async fn usage(pool: &PgPool, mut quota: QuotaCounters, json: bool, command: UsageCommand) -> anyhow::Result<()> {
    let UsageCommand::Reconcile { org, month, fix } = command;
    let org_id = match org {
        Some(org) => Some(admin::find_org(pool, &org).await?.id),
        None => None,
    };
    let report = reconcile::reconcile(pool, &mut quota, Filter { org_id, month }, fix).await?;
    print(json, &report, show)?;
    if report.violations > 0 {
        anyhow::bail!(
            "{} organization-month(s) where billing, the hourly rollup and the usage rows disagree",
            report.violations
        );
    }
    Ok(())
}

fn show(report: &Report) -> String {
    let rows = report
        .periods
        .iter()
        .map(|p| {
            vec![
                p.month.format("%Y-%m").to_string(),
                p.org_id.to_string(),
                p.billing_requests.to_string(),
                p.hourly_allowed.to_string(),
                p.rows_allowed.to_string(),
                p.billing_units.to_string(),
                or_dash(&p.counter),
                p.drift.to_string(),
                if p.invariant_holds() { "ok" } else { "MISMATCH" }.to_owned(),
                if p.repaired { "repaired" } else { "" }.to_owned(),
            ]
        })
        .collect();
    let header = ["MONTH", "ORG", "BILLED", "HOURLY", "ROWS", "UNITS", "COUNTER", "DRIFT", "INVARIANT", "COUNTER FIX"];
    format!(
        "{}\n\n{} period(s), {} invariant violation(s), quota counter drift {} unit(s), {} counter(s) repaired",
        table(&header, rows),
        report.periods.len(),
        report.violations,
        report.drift_units,
        report.repaired
    )
}
