//! The Grafana dashboards of `deploy/grafana/`, read as Grafana reads them, so the tests can run
//! every panel's query against a real Prometheus scraping the mesh.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// The directory of the dashboards (`deploy/grafana` of the source tree).
pub fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana")
}

/// One query of one panel.
#[derive(Debug, Clone)]
pub struct PanelQuery {
    /// The dashboard's title.
    pub dashboard: String,
    /// The panel's title.
    pub panel: String,
    /// Its PromQL, with Grafana's variables (`$service`, `$__rate_interval`, ...) as written.
    pub expr: String,
}

/// A dashboard variable filled by a query (`label_values(<selector>, <label>)`).
#[derive(Debug, Clone)]
pub struct Variable {
    /// The dashboard's title.
    pub dashboard: String,
    /// Its name (`$<name>` in the queries).
    pub name: String,
    /// Its query.
    pub query: String,
}

/// A dashboard file, checked for what Grafana needs to show it against a Prometheus data source
/// chosen when importing: a uid and a title, a `datasource` variable every panel and query uses,
/// and panels with a title and a position.
#[derive(Debug, Clone)]
pub struct Dashboard {
    /// Its file.
    pub file: PathBuf,
    /// Its title.
    pub title: String,
    /// Its panels' queries.
    pub queries: Vec<PanelQuery>,
    /// Its query variables.
    pub variables: Vec<Variable>,
}

/// Every dashboard of [`dir`], in file-name order.
pub fn all() -> Result<Vec<Dashboard>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir())?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<Vec<PathBuf>>>()?
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    files.iter().map(|f| read(f)).collect()
}

/// Reads and checks one dashboard file.
pub fn read(file: &Path) -> Result<Dashboard> {
    let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let doc: Value = serde_json::from_str(&text).with_context(|| format!("{} is not JSON", file.display()))?;
    let name = file.display();
    let title = doc["title"].as_str().with_context(|| format!("{name}: no title"))?.to_owned();
    if doc["uid"].as_str().is_none_or(str::is_empty) {
        bail!("{name}: no uid (links between dashboards need one)");
    }
    let templating = doc["templating"]["list"].as_array().with_context(|| format!("{name}: no templating list"))?;
    if !templating.iter().any(|v| v["name"] == "datasource" && v["type"] == "datasource" && v["query"] == "prometheus")
    {
        bail!("{name}: no `datasource` variable of type prometheus");
    }
    let uses_datasource = |v: &Value| v["uid"] == "${datasource}" && v["type"] == "prometheus";
    let mut variables = Vec::new();
    for v in templating.iter().filter(|v| v["type"] == "query") {
        if !uses_datasource(&v["datasource"]) {
            bail!("{name}: variable {} does not query the chosen data source", v["name"]);
        }
        variables.push(Variable {
            dashboard: title.clone(),
            name: v["name"].as_str().context("a variable without a name")?.to_owned(),
            query: v["query"]["query"].as_str().context("a variable without a query")?.to_owned(),
        });
    }
    let mut queries = Vec::new();
    for panel in doc["panels"].as_array().with_context(|| format!("{name}: no panels"))? {
        let panel_title = panel["title"].as_str().with_context(|| format!("{name}: a panel without a title"))?;
        if panel["gridPos"]["w"].as_u64().is_none() || panel["gridPos"]["h"].as_u64().is_none() {
            bail!("{name}: panel {panel_title:?} has no size");
        }
        if panel["type"] == "row" {
            continue;
        }
        if !uses_datasource(&panel["datasource"]) {
            bail!("{name}: panel {panel_title:?} does not use the chosen data source");
        }
        let targets =
            panel["targets"].as_array().with_context(|| format!("{name}: panel {panel_title:?}: no queries"))?;
        for t in targets {
            let expr =
                t["expr"].as_str().with_context(|| format!("{name}: panel {panel_title:?}: a query without expr"))?;
            queries.push(PanelQuery { dashboard: title.clone(), panel: panel_title.to_owned(), expr: expr.to_owned() });
        }
    }
    Ok(Dashboard { file: file.to_owned(), title, queries, variables })
}

/// `expr` with Grafana's variables replaced: `$name` by `values` (longest names first, so
/// `$namespace` is not read as `$name` + `space`), `$__rate_interval` and `$__range` by `window`.
pub fn substitute(expr: &str, values: &[(&str, &str)], window: &str) -> String {
    let mut out = expr.replace("$__rate_interval", window).replace("$__range", window);
    let mut values = values.to_vec();
    values.sort_by_key(|(name, _)| std::cmp::Reverse(name.len()));
    for (name, value) in values {
        out = out.replace(&format!("${name}"), value);
    }
    out
}

/// Grafana's `label_values(<selector>, <label>)` as the PromQL that lists the same values:
/// `group by (<label>) (<selector>)`.
pub fn label_values_promql(query: &str) -> Result<(String, String)> {
    let inner = query
        .strip_prefix("label_values(")
        .and_then(|q| q.strip_suffix(')'))
        .with_context(|| format!("{query}: not label_values(<selector>, <label>)"))?;
    let (selector, label) = inner.rsplit_once(',').with_context(|| format!("{query}: no label"))?;
    let label = label.trim().to_owned();
    Ok((format!("group by ({label}) ({})", selector.trim()), label))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_dashboard_reads_and_variables_substitute() {
        let boards = all().unwrap();
        let titles: Vec<&str> = boards.iter().map(|b| b.title.as_str()).collect();
        assert_eq!(titles, ["Ambient mesh", "Ambient service", "Ambient workload"]);
        assert!(boards.iter().all(|b| !b.queries.is_empty()));
        assert_eq!(
            substitute(
                r#"x{a="$namespace", b="$name"}[$__rate_interval]"#,
                &[("name", "n"), ("namespace", "ns")],
                "1m"
            ),
            r#"x{a="ns", b="n"}[1m]"#
        );
        assert_eq!(
            label_values_promql(r#"label_values(m{a="b"}, destination_service)"#).unwrap(),
            (r#"group by (destination_service) (m{a="b"})"#.to_owned(), "destination_service".to_owned())
        );
    }
}
