//! The Grafana dashboard against what the services export: every series a panel queries is there, with the labels
//! the panel groups by, as soon as a validator and a worker have started and served one request. A misspelt metric
//! or label, or a counter that only appears after its first event, would show "No data" where the truth is 0.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use serde_json::Value;

use crate::harness::{wait_until, TestEnv, NATS_URL};
use crate::servers::free_port;

const DASHBOARD: &str = include_str!("../../../../grafana/dashboards/operations.json");
const CATALOG: &str = include_str!("../../../../shared/src/metrics.rs");

#[tokio::test]
async fn every_dashboard_query_reads_series_that_a_fresh_validator_and_worker_export() {
    let env = TestEnv::new().await;
    let org = env.org().await;
    let (_, key) = env.key_with(&org, |k| k.custom_rate_limit_per_minute = Some(1000)).await;
    let validator = env.spawn_validator_process(&[]);
    let worker_metrics = free_port();
    let worker = env.spawn_service(
        "worker",
        NATS_URL,
        &[("TOLLGATE_METRICS_LISTEN", format!("127.0.0.1:{worker_metrics}")), ("TOLLGATE_BATCH_WAIT", "20ms".into())],
    );

    let client = reqwest::Client::new();
    let auth = client.get(validator.url("/v1/auth")).bearer_auth(key.expose());
    let status = wait_until(
        Duration::from_secs(20),
        || async { auth.try_clone().expect("clones").send().await.map(|r| r.status().as_u16()).ok() },
        |status| status.is_some(),
    )
    .await;
    assert_eq!(status, Some(200), "the validator's answer to a good key");
    env.wait_for_count("SELECT count(*) FROM api_usage", 1).await;

    let mut exported = HashMap::new();
    for url in [validator.metrics_url(), format!("http://127.0.0.1:{worker_metrics}/metrics")] {
        let text = client.get(url).send().await.expect("scrape");
        for (name, labels) in series(&text.text().await.expect("exposition")) {
            exported.entry(name).or_insert_with(BTreeSet::new).extend(labels);
        }
    }
    let queries = queries(DASHBOARD);
    assert!(queries.len() >= 10, "the dashboard's queries: {queries:?}");
    let mut missing = Vec::new();
    for query in &queries {
        for name in metric_names(query) {
            match exported.get(&name) {
                None => missing.push(format!("{name} (in {query})")),
                Some(labels) => missing.extend(
                    grouping_labels(query)
                        .into_iter()
                        .filter(|label| !labels.contains(label))
                        .map(|label| format!("label {label} of {name} (in {query})")),
                ),
            }
        }
    }
    assert!(missing.is_empty(), "queried but not exported:\n{}", missing.join("\n"));
    // Every counter of the catalog is there from the start, at 0 if nothing happened yet: a rare event's counter
    // that appears only when it first happens cannot be alerted on with rate() or increase().
    let counters: Vec<&str> = CATALOG
        .lines()
        .filter_map(|line| line.strip_prefix("pub const ")?.split('"').nth(1))
        .filter(|name| name.ends_with("_total"))
        .collect();
    assert!(counters.len() >= 15, "the catalog's counters: {counters:?}");
    let absent: Vec<&&str> = counters.iter().filter(|name| !exported.contains_key(**name)).collect();
    assert!(absent.is_empty(), "counters not exported by a fresh validator and worker: {absent:?}");
    drop((validator, worker));
    env.cleanup().await;
}

/// Every panel's query expressions, each naming at least one Tollgate metric.
fn queries(dashboard: &str) -> Vec<String> {
    let dashboard: Value = serde_json::from_str(dashboard).expect("the dashboard is JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    let ids: BTreeSet<_> = panels.iter().map(|panel| panel["id"].as_u64().expect("a panel id")).collect();
    assert_eq!(ids.len(), panels.len(), "panel ids are unique");
    // Imported into a Grafana whose Prometheus has another uid, the dashboard asks which one rather than breaking.
    let variables = dashboard["templating"]["list"].as_array().expect("templating variables");
    assert!(
        variables.iter().any(|v| v["name"] == "datasource" && v["type"] == "datasource" && v["query"] == "prometheus"),
        "a Prometheus data source variable named datasource: {variables:?}"
    );
    for panel in panels {
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "panel {} picks the variable's source", panel["id"]);
    }
    let queries: Vec<String> = panels
        .iter()
        .flat_map(|panel| panel["targets"].as_array().expect("targets"))
        .map(|target| target["expr"].as_str().expect("expr").to_owned())
        .collect();
    for query in &queries {
        assert!(!metric_names(query).is_empty(), "{query} queries no Tollgate metric");
    }
    queries
}

/// The Tollgate metric names in a PromQL expression.
fn metric_names(query: &str) -> Vec<String> {
    query
        .match_indices("tollgate_")
        .map(|(at, _)| {
            let rest = &query[at..];
            let end = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(rest.len());
            rest[..end].to_owned()
        })
        .collect()
}

/// The labels a PromQL expression aggregates `by`.
fn grouping_labels(query: &str) -> Vec<String> {
    query
        .match_indices("by (")
        .flat_map(|(at, by)| {
            let list = &query[at + by.len()..];
            list[..list.find(')').unwrap_or(list.len())].split(',').map(|label| label.trim().to_owned())
        })
        .collect()
}

/// Each sample line's series name and label names, in a Prometheus text exposition.
fn series(exposition: &str) -> Vec<(String, Vec<String>)> {
    exposition
        .lines()
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| {
            let name_end = line.find(['{', ' ']).unwrap_or(line.len());
            let mut labels = Vec::new();
            if let Some(mut rest) = line[name_end..].strip_prefix('{') {
                // name="value" pairs, values escaped with backslashes.
                while let Some(eq) = rest.find("=\"") {
                    labels.push(rest[..eq].trim_start_matches(',').to_owned());
                    let value = &rest[eq + 2..];
                    let mut escaped = false;
                    let close = value
                        .char_indices()
                        .find(|&(_, c)| {
                            let closes = c == '"' && !escaped;
                            escaped = c == '\\' && !escaped;
                            closes
                        })
                        .map_or(value.len(), |(i, _)| i);
                    rest = &value[(close + 1).min(value.len())..];
                    if rest.starts_with('}') {
                        break;
                    }
                }
            }
            (line[..name_end].to_owned(), labels)
        })
        .collect()
}

#[test]
fn exposition_lines_give_their_series_names_and_label_names() {
    let text = "# HELP a_total x\n# TYPE a_total counter\na_total{limit=\"key\",result=\"a,\\\"b=\"} 3\nb 1\n\
                c_bucket{le=\"0.5\"} 0\n";
    let parsed = series(text);
    assert_eq!(
        parsed,
        vec![
            ("a_total".to_owned(), vec!["limit".to_owned(), "result".to_owned()]),
            ("b".to_owned(), vec![]),
            ("c_bucket".to_owned(), vec!["le".to_owned()]),
        ]
    );
}

#[test]
fn a_query_gives_its_metric_names_and_grouping_labels() {
    let query = "histogram_quantile(0.99, sum by (le, kind) (rate(tollgate_x_seconds_bucket[1m]))) / tollgate_y";
    assert_eq!(metric_names(query), ["tollgate_x_seconds_bucket", "tollgate_y"]);
    assert_eq!(grouping_labels(query), ["le", "kind"]);
}
