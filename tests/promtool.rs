//! The shipped monitoring files: `conf/prometheus/httpmapd-rules.yml` (alerting
//! rules) and `conf/grafana/httpmapd-dashboard.json` (a Grafana dashboard).
//!
//! - The rules pass `promtool check rules`, and their unit tests
//!   (`conf/prometheus/httpmapd-rules.test.yml`) pass `promtool test rules`;
//!   every alert is tested firing and quiet.
//! - The rules and the dashboard use only metrics the daemon exposes (the
//!   list below is the `/metrics` contract).
//! - The dashboard parses, has its datasource, job, instance and map
//!   variables, every query honours them, and every PromQL expression parses:
//!   promtool 2.42 has no query linter, so the expressions (Grafana variables
//!   replaced by concrete values) go into a scratch rules file as recording
//!   rules, which `promtool check rules` parses.
//!
//! promtool comes from Debian's `prometheus` package (`.ci/run` installs it);
//! `PROMTOOL=/path/to/promtool` picks another. Without it these tests fail.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

const RULES: &str = "conf/prometheus/httpmapd-rules.yml";
const RULE_TESTS: &str = "conf/prometheus/httpmapd-rules.test.yml";
const DASHBOARD: &str = "conf/grafana/httpmapd-dashboard.json";

/// Every metric `GET /metrics` exposes, with its labels (beyond the `job`
/// and `instance` Prometheus adds).
const METRICS: &[(&str, &[&str])] = &[
    ("httpmapd_build_info", &["version"]),
    ("httpmapd_lookups_total", &["map", "outcome"]),
    ("httpmapd_fetch_duration_seconds", &["map"]),
    ("httpmapd_cache_hits_total", &["map"]),
    ("httpmapd_cache_misses_total", &["map"]),
    ("httpmapd_cache_coalesced_total", &[]),
    ("httpmapd_cache_evictions_total", &[]),
    ("httpmapd_cache_refreshes_total", &[]),
    ("httpmapd_cache_not_stored_total", &[]),
    ("httpmapd_cache_entries", &["map"]),
    ("httpmapd_cache_max_entries", &[]),
    ("httpmapd_cache_bytes", &[]),
    ("httpmapd_cache_max_bytes", &[]),
    ("httpmapd_requests_total", &[]),
    ("httpmapd_bad_requests_total", &[]),
    ("httpmapd_client_connections_total", &[]),
    ("httpmapd_client_connections_open", &[]),
    (
        "httpmapd_server_requests_total",
        &["map", "server", "outcome"],
    ),
    (
        "httpmapd_server_protocol_errors_total",
        &["map", "server", "kind"],
    ),
    ("httpmapd_server_up", &["map", "server"]),
    ("httpmapd_server_connections", &["map", "server"]),
    (
        "httpmapd_server_request_duration_seconds",
        &["map", "server"],
    ),
    ("httpmapd_config_last_reload_successful", &[]),
    ("httpmapd_config_last_reload_success_timestamp_seconds", &[]),
    ("httpmapd_config_reloads_total", &["result"]),
    ("process_resident_memory_bytes", &[]),
    ("process_virtual_memory_bytes", &[]),
    ("process_open_fds", &[]),
    ("process_max_fds", &[]),
    ("process_cpu_seconds_total", &[]),
    ("process_start_time_seconds", &[]),
];

/// The histograms among them: `_bucket`, `_sum` and `_count` series.
const HISTOGRAMS: &[&str] = &[
    "httpmapd_fetch_duration_seconds",
    "httpmapd_server_request_duration_seconds",
];

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// The promtool to run: `PROMTOOL`, else the first on PATH, /usr/bin or
/// /usr/local/bin. Fails the test when there is none.
fn promtool() -> PathBuf {
    if let Some(p) = std::env::var_os("PROMTOOL") {
        return PathBuf::from(p);
    }
    common::find_program("promtool", &["$PATH", "/usr/bin", "/usr/local/bin"]).unwrap_or_else(
        || {
            common::missing(
                "promtool (looked for on PATH, in /usr/bin and /usr/local/bin)",
                "the Debian package prometheus (apt-get install prometheus), \
             or set PROMTOOL=/path/to/promtool",
            )
        },
    )
}

/// Runs promtool with `args` from the repository's top; returns whether it
/// exited 0 and its stdout and stderr together.
fn run(promtool: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(promtool)
        .args(args)
        .current_dir(root())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", promtool.display()));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// `promtool check rules FILE`: exit 0 and `SUCCESS: N rules found` with
/// the expected N (promtool counts what it parsed).
fn check_rules(promtool: &Path, file: &str, rules: usize) {
    let (ok, out) = run(promtool, &["check", "rules", file]);
    let expected = format!("SUCCESS: {rules} rules found");
    assert!(
        ok && out.lines().any(|l| l.trim() == expected),
        "promtool check rules {file}: expected exit 0 and {expected:?}, got (success {ok}):\n{out}"
    );
}

// ---------------------------------------------------------------------------
// Text helpers (no YAML or PromQL parser: promtool is the parser)
// ---------------------------------------------------------------------------

/// The values of `key: value` lines whose key is `key` (YAML list items
/// included: `- alert: X`).
fn yaml_values<'a>(text: &'a str, key: &str) -> Vec<&'a str> {
    let prefix = format!("{key}:");
    text.lines()
        .filter_map(|l| {
            let t = l.trim_start();
            let t = t.strip_prefix("- ").unwrap_or(t).trim_start();
            t.strip_prefix(&prefix)
        })
        .map(|v| v.trim().trim_matches(|c| c == '"' || c == '\''))
        .collect()
}

fn is_name_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b':'
}

/// Every `httpmapd_...` and `process_...` name in `text` with its byte
/// offset, skipping those inside a longer name (e.g. a recording rule
/// `job:httpmapd_x:rate5m`).
fn metric_names(text: &str) -> Vec<(usize, &str)> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let rest = &text[i..];
        let starts = (rest.starts_with("httpmapd_") || rest.starts_with("process_"))
            && (i == 0 || !is_name_char(b[i - 1]));
        if starts {
            let mut j = i;
            while j < b.len() && (b[j].is_ascii_lowercase() || b[j] == b'_') {
                j += 1;
            }
            if j == b.len() || !is_name_char(b[j]) {
                out.push((i, &text[i..j]));
            }
            i = j;
        } else {
            i += 1;
        }
    }
    out
}

/// The exposed metric `name` belongs to (a histogram's `_bucket`, `_sum` or
/// `_count` series belongs to the histogram), or None.
fn known_metric(name: &str) -> Option<&'static (&'static str, &'static [&'static str])> {
    let base = ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|s| name.strip_suffix(s).filter(|b| HISTOGRAMS.contains(b)))
        .unwrap_or(name);
    METRICS.iter().find(|(m, _)| *m == base)
}

/// Names in `text` that are not exposed metrics.
fn unknown_metrics(text: &str) -> BTreeSet<String> {
    metric_names(text)
        .into_iter()
        .filter(|(_, n)| known_metric(n).is_none())
        .map(|(_, n)| n.to_string())
        .collect()
}

/// The label matchers after the metric name at `at` (`{...}`), or None for
/// a bare name.
fn selector_after<'a>(expr: &'a str, at: usize, name: &str) -> Option<&'a str> {
    let rest = expr[at + name.len()..].trim_start();
    let body = rest.strip_prefix('{')?;
    let mut quoted = false;
    let mut escaped = false;
    for (i, c) in body.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '}' if !quoted => return Some(&body[..i]),
            _ => {}
        }
    }
    None
}

/// What is wrong with the metric selectors of a dashboard expression: each
/// must filter on the `$job` and `$instance` variables, and on `$map` where
/// the metric has a `map` label.
fn selector_problems(expr: &str) -> Vec<String> {
    let mut problems = Vec::new();
    for (at, name) in metric_names(expr) {
        let Some((_, labels)) = known_metric(name) else {
            continue;
        };
        let mut need = vec![r#"job=~"$job""#, r#"instance=~"$instance""#];
        if labels.contains(&"map") {
            need.push(r#"map=~"$map""#);
        }
        let sel = selector_after(expr, at, name).unwrap_or("");
        for n in need {
            if !sel.contains(n) {
                problems.push(format!("{name} lacks {n}"));
            }
        }
    }
    problems
}

/// A Grafana expression with its variables replaced by concrete values, as
/// Grafana would send it to Prometheus.
fn substitute(expr: &str) -> String {
    let mut s = expr
        .replace("$__rate_interval", "5m")
        .replace("${__rate_interval}", "5m")
        .replace("$__interval", "1m")
        .replace("${__interval}", "1m")
        .replace("$__range", "1h")
        .replace("${__range}", "1h");
    // Any other variable is a label value regex: `.*` (the "All" value).
    while let Some(i) = s.find('$') {
        let rest = &s[i + 1..];
        let len = if let Some(r) = rest.strip_prefix('{') {
            match r.find('}') {
                Some(e) => e + 3,
                None => break,
            }
        } else {
            1 + rest
                .bytes()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == b'_')
                .count()
        };
        if len == 1 {
            break;
        }
        s.replace_range(i..i + len, ".*");
    }
    s
}

/// A rules file holding each expression as a recording rule, for
/// `promtool check rules` to parse.
fn recording_rules(exprs: &[String]) -> String {
    let mut y = String::from("groups:\n  - name: dashboard-check\n    rules:\n");
    for (i, e) in exprs.iter().enumerate() {
        // A JSON string is a valid YAML double-quoted scalar.
        y.push_str(&format!(
            "      - record: dashboard:check:{i}\n        expr: {}\n",
            serde_json::to_string(e).unwrap()
        ));
    }
    y
}

/// Writes `exprs` as recording rules to a scratch file and returns its path.
fn scratch_rules(tag: &str, exprs: &[String]) -> PathBuf {
    let path = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("promtool-{tag}-{}.yml", std::process::id()));
    std::fs::write(&path, recording_rules(exprs)).unwrap();
    path
}

// ---------------------------------------------------------------------------
// The alerting rules
// ---------------------------------------------------------------------------

#[test]
fn rules_pass_promtool_check() {
    let text = read(RULES);
    let alerts = yaml_values(&text, "alert");
    let records = yaml_values(&text, "record");
    assert!(alerts.len() >= 8, "alerts: {alerts:?}");
    let unknown = unknown_metrics(&text);
    assert!(
        unknown.is_empty(),
        "{RULES} names metrics httpmapd does not expose: {unknown:?}"
    );
    // Each alert has a `for:`, a severity and both annotations.
    for key in ["for", "severity", "summary", "description"] {
        assert_eq!(
            yaml_values(&text, key).len(),
            alerts.len(),
            "every alert needs a {key}"
        );
    }
    let promtool = promtool();
    check_rules(&promtool, RULES, alerts.len() + records.len());
}

#[test]
fn rules_unit_tests_pass() {
    let rules = read(RULES);
    let tests = read(RULE_TESTS);
    let alerts: BTreeSet<&str> = yaml_values(&rules, "alert").into_iter().collect();

    // Which alerts the tests show firing (`exp_alerts:` with items) and
    // quiet (`exp_alerts: []`). An alert name the rules lack would make its
    // quiet cases pass for nothing.
    let mut seen: BTreeMap<&str, (bool, bool)> = BTreeMap::new();
    let mut current = None;
    for line in tests.lines() {
        let t = line.trim();
        if let Some(name) = t.strip_prefix("alertname:") {
            let name = name.trim();
            assert!(
                alerts.contains(name),
                "{RULE_TESTS} tests {name:?}, which {RULES} lacks"
            );
            current = Some(name);
        } else if let Some(rest) = t.strip_prefix("exp_alerts:") {
            let name = current.take().expect("exp_alerts before alertname");
            let e = seen.entry(name).or_default();
            if rest.trim() == "[]" {
                e.1 = true;
            } else {
                e.0 = true;
            }
        }
    }
    for a in &alerts {
        let (fires, quiet) = seen.get(a).copied().unwrap_or_default();
        assert!(fires, "{RULE_TESTS} never shows {a} firing");
        assert!(quiet, "{RULE_TESTS} never shows {a} quiet");
    }

    let promtool = promtool();
    let (ok, out) = run(&promtool, &["test", "rules", RULE_TESTS]);
    assert!(
        ok && out.lines().any(|l| l.trim() == "SUCCESS") && !out.contains("FAILED"),
        "promtool test rules {RULE_TESTS}: expected exit 0 and SUCCESS, got (success {ok}):\n{out}"
    );
}

// ---------------------------------------------------------------------------
// The dashboard
// ---------------------------------------------------------------------------

/// Every panel, those inside rows included.
fn panels(list: &Value, out: &mut Vec<Value>) {
    for p in list.as_array().into_iter().flatten() {
        out.push(p.clone());
        if let Some(inner) = p.get("panels") {
            panels(inner, out);
        }
    }
}

fn uses_datasource_variable(ds: &Value) -> bool {
    ds.as_str() == Some("${datasource}") || ds["uid"].as_str() == Some("${datasource}")
}

#[test]
fn dashboard_is_valid() {
    let text = read(DASHBOARD);
    let d: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{DASHBOARD}: {e}"));
    assert!(
        d["title"].as_str().is_some_and(|t| !t.is_empty()),
        "no title"
    );
    assert!(d["uid"].as_str().is_some_and(|t| !t.is_empty()), "no uid");
    assert!(d["id"].is_null(), "an exported dashboard has id null");
    let schema = d["schemaVersion"].as_u64().unwrap_or(0);
    assert!(
        (36..=39).contains(&schema),
        "schemaVersion {schema}: Grafana 9/10 expected"
    );

    // Variables: a Prometheus datasource, then job, instance and map.
    let vars = d["templating"]["list"].as_array().expect("templating.list");
    let var = |name: &str| {
        vars.iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no ${name} variable"))
    };
    let ds = var("datasource");
    assert_eq!(ds["type"], "datasource");
    assert_eq!(ds["query"], "prometheus");
    let mut var_selectors = Vec::new();
    for name in ["job", "instance", "map"] {
        let v = var(name);
        assert_eq!(v["type"], "query", "${name}");
        assert!(
            uses_datasource_variable(&v["datasource"]),
            "${name} datasource"
        );
        let q = v["query"]["query"]
            .as_str()
            .or(v["query"].as_str())
            .unwrap_or_else(|| panic!("${name} has no query"));
        // label_values(SELECTOR, LABEL): SELECTOR must be valid PromQL.
        let inner = q
            .strip_prefix("label_values(")
            .and_then(|r| r.strip_suffix(&format!(", {name})")))
            .unwrap_or_else(|| panic!("${name}: expected label_values(..., {name}), got {q}"));
        var_selectors.push(inner.to_string());
    }

    // Panels: unique ids, inside the 24-column grid, the datasource
    // variable, and PromQL over exposed metrics filtered by the variables.
    let mut all = Vec::new();
    panels(&d["panels"], &mut all);
    assert!(all.len() >= 20, "only {} panels", all.len());
    let mut ids = HashSet::new();
    let mut exprs = Vec::new();
    let mut problems = Vec::new();
    for p in &all {
        let title = p["title"].as_str().unwrap_or("?");
        let id = p["id"].as_u64().unwrap_or_else(|| panic!("{title}: no id"));
        assert!(ids.insert(id), "panel id {id} twice");
        let g = &p["gridPos"];
        let (x, w, h) = (g["x"].as_u64(), g["w"].as_u64(), g["h"].as_u64());
        assert!(
            matches!((x, w, h), (Some(x), Some(w), Some(h)) if w > 0 && h > 0 && x + w <= 24),
            "{title}: gridPos {g}"
        );
        if p["type"] == "row" {
            continue;
        }
        assert!(
            uses_datasource_variable(&p["datasource"]),
            "{title}: datasource {}",
            p["datasource"]
        );
        let targets = p["targets"].as_array().filter(|t| !t.is_empty());
        let targets = targets.unwrap_or_else(|| panic!("{title}: no targets"));
        for t in targets {
            assert!(
                uses_datasource_variable(&t["datasource"]),
                "{title}: target datasource"
            );
            let e = t["expr"].as_str().filter(|e| !e.trim().is_empty());
            let e = e.unwrap_or_else(|| panic!("{title}: a target without expr"));
            let unknown = unknown_metrics(e);
            if !unknown.is_empty() {
                problems.push(format!("{title}: unknown metrics {unknown:?} in {e}"));
            }
            if metric_names(e).is_empty() {
                problems.push(format!("{title}: no httpmapd or process metric in {e}"));
            }
            for s in selector_problems(e) {
                problems.push(format!("{title}: {s} in {e}"));
            }
            exprs.push(e.to_string());
        }
    }
    for s in &var_selectors {
        let unknown = unknown_metrics(s);
        if !unknown.is_empty() {
            problems.push(format!(
                "variable query: unknown metrics {unknown:?} in {s}"
            ));
        }
    }
    assert!(problems.is_empty(), "{DASHBOARD}:\n{}", problems.join("\n"));

    // Syntax: every expression, variables substituted, parsed by promtool.
    let checked: Vec<String> = exprs
        .iter()
        .chain(&var_selectors)
        .map(|e| substitute(e))
        .collect();
    for e in &checked {
        assert!(!e.contains('$'), "a variable left after substitution: {e}");
    }
    let promtool = promtool();
    let file = scratch_rules("dashboard", &checked);
    check_rules(&promtool, file.to_str().unwrap(), checked.len());
    let _ = std::fs::remove_file(file);
}

/// The checks above catch what they are for: an unknown metric, a missing
/// variable filter, a PromQL syntax error.
#[test]
fn dashboard_checks_catch_mistakes() {
    assert_eq!(
        unknown_metrics("rate(httpmapd_lookup_total[5m]) + httpmapd_fetch_duration_seconds_bucket + process_open_fds + httpmapd_cache_bytes_bucket"),
        BTreeSet::from(["httpmapd_lookup_total".to_string(), "httpmapd_cache_bytes_bucket".to_string()])
    );
    assert!(unknown_metrics("job:httpmapd_x:rate5m").is_empty());
    let good = r#"sum by (map) (rate(httpmapd_lookups_total{job=~"$job", instance=~"$instance", map=~"$map"}[$__rate_interval]))"#;
    assert!(selector_problems(good).is_empty());
    assert_eq!(
        selector_problems(r#"httpmapd_cache_entries{job=~"$job", instance=~"$instance"}"#),
        [r#"httpmapd_cache_entries lacks map=~"$map""#]
    );
    assert_eq!(selector_problems("process_open_fds").len(), 2);
    assert_eq!(
        substitute(good),
        r#"sum by (map) (rate(httpmapd_lookups_total{job=~".*", instance=~".*", map=~".*"}[5m]))"#
    );

    let promtool = promtool();
    let file = scratch_rules(
        "broken",
        &[
            substitute(good),
            "sum(rate(httpmapd_requests_total[5m])".into(),
        ],
    );
    let (ok, out) = run(&promtool, &["check", "rules", file.to_str().unwrap()]);
    let _ = std::fs::remove_file(file);
    assert!(
        !ok && !out.contains("SUCCESS"),
        "promtool took a broken expression:\n{out}"
    );
}
