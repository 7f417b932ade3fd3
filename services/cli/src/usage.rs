//! `tollgate usage reconcile`.

use sqlx::PgPool;

use tollgate_shared::admin;
use tollgate_worker::reconcile::{self, Filter, Report};
use tollgate_worker::QuotaCounters;

use crate::cli::UsageCommand;
use crate::output::{or_dash, print, table};

/// `quota` None: Redis does not answer, and the counters are not compared (the billing check needs PostgreSQL only,
/// and must alert while Redis is away too).
pub async fn usage(
    pool: &PgPool,
    mut quota: Option<QuotaCounters>,
    json: bool,
    command: UsageCommand,
) -> anyhow::Result<()> {
    let UsageCommand::Reconcile { org, month, fix } = command;
    let org_id = match org {
        Some(org) => Some(admin::find_org(pool, &org).await?.id),
        None => None,
    };
    if fix && quota.is_none() {
        anyhow::bail!("--fix sets the quota counters in Redis, which does not answer: run it once Redis is back");
    }
    let report = reconcile::reconcile(pool, quota.as_mut(), Filter { org_id, month }, fix).await?;
    print(json, &report, show)?;
    if report.violations > 0 {
        anyhow::bail!(
            "{} organization-month(s) where billing, the hourly rollup and the usage rows disagree (the MISMATCH rows \
             above; --fix sets quota counters only, and does not mend these)",
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
                or_dash(&p.drift),
                if p.invariant_holds() { "ok" } else { "MISMATCH" }.to_owned(),
                if p.repaired { "repaired" } else { "" }.to_owned(),
            ]
        })
        .collect();
    let header = ["MONTH", "ORG", "BILLED", "HOURLY", "ROWS", "UNITS", "COUNTER", "DRIFT", "INVARIANT", "COUNTER FIX"];
    let counters = match report.drift_units {
        Some(drift) => format!("quota counter drift {drift} unit(s), {} counter(s) repaired", report.repaired),
        None => "quota counters not checked (Redis does not answer)".to_owned(),
    };
    format!(
        "{}\n\n{} period(s), {} invariant violation(s), {counters}",
        table(&header, rows),
        report.periods.len(),
        report.violations
    )
}
