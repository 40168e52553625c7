//! The Grafana dashboard (`manifests/components/grafana-dashboard`) cannot
//! drift from the metrics: every metric name and label name its queries
//! use is checked against what a real agent and router expose after real
//! traffic (HTTP/2 streams through the router, TCP connections at L4, an
//! endpoint ejected by the router's failure accrual, the Kubernetes source
//! for the apiserver's metrics), so renaming a metric or a label without
//! updating the dashboard fails here.
//!
//! PromQL is read by a small extractor of this file, not a full parser:
//! metric names are identifiers followed by `{`, `[` or standing alone as
//! an operand (function arguments included), minus PromQL's functions,
//! aggregations and keywords; label names are those of `{...}` matchers,
//! of `by`/`without` (checked on every metric of the aggregated
//! expression) and `on`/`ignoring`/`group_left`/`group_right` (on at least
//! one metric of the enclosing parentheses), and those of `{{label}}` in a
//! legend. Names are checked as samples are exposed (`_total`, `_bucket`,
//! `_seconds` and so on included), which is also what Prometheus stores;
//! the suffix is stripped to find the family's TYPE, so that `rate()` and
//! `increase()` over a gauge fail too. `instance` and `job` are added by
//! Prometheus when it scrapes, so they are never in an exposition.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use balancer_tests::{
    agent::Agent,
    fakeapi::{FakeApi, Kind},
    peers::{H2_PORT, h2_client, short_connections},
    process::require_root,
    topology::{ROUTER_ADDR, Topology},
};
use serde_json::{Value, json};

/// The http2 service: `lbt-h2` on every pod, through the router.
const VIP_H2: &str = "198.19.0.110";
/// The tcp service: `lbt-peer` on 8080 of every pod, balanced at L4.
const VIP_TCP: &str = "198.19.0.111";
const SVC_H2: &str = "dash-grpc";
const SVC_TCP: &str = "dash-tcp";
/// The router's metrics, in the node namespace.
const ROUTER_METRICS: &str = "198.18.0.1:9465";
/// Labels Prometheus adds to every series it scrapes.
const TARGET_LABELS: [&str; 2] = ["instance", "job"];
/// What every panel and query reads from: the `datasource` variable.
const DATASOURCE_UID: &str = "${datasource}";
/// The matcher every selector carries: the nodes the `node` variable picks.
const NODE_MATCHER: (&str, &str, &str) = ("instance", "=~", "$node:.*");

fn component_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../manifests/components/grafana-dashboard")
}

fn dashboard_text() -> String {
    std::fs::read_to_string(component_dir().join("balancer.json")).expect("read balancer.json")
}

fn dashboard() -> Value {
    serde_json::from_str(&dashboard_text()).expect("balancer.json is JSON")
}

/// Every panel, those inside collapsed rows too.
fn panels(d: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().expect("panels") {
        out.push(p);
        out.extend(p["panels"].as_array().into_iter().flatten());
    }
    out
}

/// Each query of the dashboard: where it is (for messages), its expression
/// and its legend.
struct Query {
    at: String,
    expr: String,
    legend: String,
}

fn queries(d: &Value) -> Vec<Query> {
    let mut out = Vec::new();
    for p in panels(d) {
        for t in p["targets"].as_array().into_iter().flatten() {
            out.push(Query {
                at: format!(
                    "panel {} {:?} query {}",
                    p["id"],
                    p["title"].as_str().unwrap_or(""),
                    t["refId"].as_str().unwrap_or("?")
                ),
                expr: t["expr"].as_str().unwrap_or("").to_owned(),
                legend: t["legendFormat"].as_str().unwrap_or("").to_owned(),
            });
        }
    }
    out
}

/// The query of a template variable of the Prometheus data source (the
/// object form of schema 39, or a plain string).
fn variable_query(v: &Value) -> Option<String> {
    match &v["query"] {
        Value::String(s) if v["type"] == "query" => Some(s.clone()),
        Value::Object(o) => o.get("query").and_then(Value::as_str).map(str::to_owned),
        _ => None,
    }
}

// ---------------------------------------------------------------------------
// The PromQL extractor.

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Str(String),
    /// A number or a duration (`0.99`, `5m`).
    Num,
    /// A Grafana variable outside a string or a range (`$quantile`).
    Var,
    /// `[...]`, skipped whole: a range or a subquery, `$__rate_interval`.
    Range,
    LParen,
    RParen,
    LBrace,
    RBrace,
    Comma,
    Op(String),
}

fn tokens(expr: &str) -> Result<Vec<Tok>, String> {
    let c: Vec<char> = expr.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    let ident_start = |ch: char| ch.is_ascii_alphabetic() || ch == '_' || ch == ':';
    let ident_char = |ch: char| ch.is_ascii_alphanumeric() || ch == '_' || ch == ':';
    while i < c.len() {
        let ch = c[i];
        if ch.is_whitespace() {
            i += 1;
        } else if ch == '"' || ch == '\'' || ch == '`' {
            let mut s = String::new();
            i += 1;
            loop {
                match c.get(i) {
                    None => return Err(format!("unterminated string in {expr}")),
                    Some('\\') if ch != '`' => {
                        if let Some(&n) = c.get(i + 1) {
                            s.push(n);
                        }
                        i += 2;
                    }
                    Some(&q) if q == ch => {
                        i += 1;
                        break;
                    }
                    Some(&o) => {
                        s.push(o);
                        i += 1;
                    }
                }
            }
            out.push(Tok::Str(s));
        } else if ch == '[' {
            let end = c[i..]
                .iter()
                .position(|&x| x == ']')
                .ok_or_else(|| format!("unterminated [ in {expr}"))?;
            i += end + 1;
            out.push(Tok::Range);
        } else if ch == '$' {
            i += 1;
            if c.get(i) == Some(&'{') {
                while i < c.len() && c[i] != '}' {
                    i += 1;
                }
                i += 1;
            } else {
                while i < c.len() && ident_char(c[i]) {
                    i += 1;
                }
            }
            out.push(Tok::Var);
        } else if ident_start(ch) {
            let s: String = c[i..].iter().take_while(|&&x| ident_char(x)).collect();
            i += s.chars().count();
            out.push(Tok::Ident(s));
        } else if ch.is_ascii_digit()
            || (ch == '.' && c.get(i + 1).is_some_and(char::is_ascii_digit))
        {
            while i < c.len() && (c[i].is_ascii_alphanumeric() || c[i] == '.' || c[i] == '_') {
                i += 1;
            }
            out.push(Tok::Num);
        } else {
            i += 1;
            out.push(match ch {
                '(' => Tok::LParen,
                ')' => Tok::RParen,
                '{' => Tok::LBrace,
                '}' => Tok::RBrace,
                ',' => Tok::Comma,
                _ => {
                    let mut op = ch.to_string();
                    while i < c.len() && "=!~<>".contains(c[i]) && "=!<>".contains(ch) {
                        op.push(c[i]);
                        i += 1;
                    }
                    if !"+-*/%^=!~<>@".contains(ch) {
                        return Err(format!("unexpected {ch:?} in {expr}"));
                    }
                    Tok::Op(op)
                }
            });
        }
    }
    Ok(out)
}

/// PromQL's functions (as of Prometheus 3), which take parentheses and are
/// never metric names.
const FUNCTIONS: &[&str] = &[
    "abs",
    "absent",
    "absent_over_time",
    "acos",
    "acosh",
    "asin",
    "asinh",
    "atan",
    "atanh",
    "avg_over_time",
    "ceil",
    "changes",
    "clamp",
    "clamp_max",
    "clamp_min",
    "cos",
    "cosh",
    "count_over_time",
    "day_of_month",
    "day_of_week",
    "day_of_year",
    "days_in_month",
    "deg",
    "delta",
    "deriv",
    "double_exponential_smoothing",
    "end",
    "exp",
    "floor",
    "histogram_avg",
    "histogram_count",
    "histogram_fraction",
    "histogram_quantile",
    "histogram_stddev",
    "histogram_stdvar",
    "histogram_sum",
    "holt_winters",
    "hour",
    "idelta",
    "increase",
    "info",
    "irate",
    "label_join",
    "label_replace",
    "last_over_time",
    "ln",
    "log10",
    "log2",
    "mad_over_time",
    "max_over_time",
    "min_over_time",
    "minute",
    "month",
    "pi",
    "predict_linear",
    "present_over_time",
    "quantile_over_time",
    "rad",
    "rate",
    "resets",
    "round",
    "scalar",
    "sgn",
    "sin",
    "sinh",
    "sort",
    "sort_by_label",
    "sort_by_label_desc",
    "sort_desc",
    "sqrt",
    "start",
    "stddev_over_time",
    "stdvar_over_time",
    "sum_over_time",
    "tan",
    "tanh",
    "time",
    "timestamp",
    "vector",
    "year",
];

const AGGREGATIONS: &[&str] = &[
    "avg",
    "bottomk",
    "count",
    "count_values",
    "group",
    "limit_ratio",
    "limitk",
    "max",
    "min",
    "quantile",
    "stddev",
    "stdvar",
    "sum",
    "topk",
];

/// Keywords that are neither metrics nor functions.
const KEYWORDS: &[&str] = &[
    "and", "or", "unless", "atan2", "bool", "offset", "inf", "nan",
];

/// Functions whose range argument must be a counter (or histogram buckets).
const COUNTER_FUNCTIONS: &[&str] = &["rate", "irate", "increase", "resets"];

/// A metric selector: `name{label op "value", ...}[range]`.
#[derive(Debug, Clone, PartialEq)]
struct Selector {
    metric: String,
    matchers: Vec<(String, String, String)>,
    /// The function applied to its range, if it has one.
    range_fn: Option<String>,
    /// Its token index, to place it inside parentheses.
    at: usize,
}

/// A label list of `by`, `without`, `on`, `ignoring`, `group_left`,
/// `group_right`, and the selectors it applies to.
#[derive(Debug, Clone, PartialEq)]
struct Grouping {
    clause: String,
    labels: Vec<String>,
    selectors: Vec<usize>,
    /// `by`/`without`: on every metric aggregated; the others: on one.
    every: bool,
}

impl Grouping {
    fn new(clause: String, labels: Vec<String>, every: bool) -> Self {
        Self {
            clause,
            labels,
            selectors: Vec::new(),
            every,
        }
    }
}

#[derive(Debug, Default, PartialEq)]
struct Uses {
    selectors: Vec<Selector>,
    groupings: Vec<Grouping>,
}

/// `( a, b, ... )` from token `open`: the labels and the index of `)`.
fn label_list(toks: &[Tok], open: usize) -> Result<(Vec<String>, usize), String> {
    if toks.get(open) != Some(&Tok::LParen) {
        return Err(format!("a label list must follow at token {open}"));
    }
    let mut labels = Vec::new();
    let mut i = open + 1;
    loop {
        match toks.get(i) {
            Some(Tok::Ident(l)) => labels.push(l.clone()),
            Some(Tok::Comma) => {}
            Some(Tok::RParen) => return Ok((labels, i)),
            other => return Err(format!("unexpected {other:?} in a label list")),
        }
        i += 1;
    }
}

/// What one PromQL expression uses: its selectors and label lists.
fn extract(expr: &str) -> Result<Uses, String> {
    let toks = tokens(expr)?;
    // Matching parentheses, both ways.
    let mut close_of = BTreeMap::new();
    let mut open_of = BTreeMap::new();
    let mut stack = Vec::new();
    for (i, t) in toks.iter().enumerate() {
        match t {
            Tok::LParen => stack.push(i),
            Tok::RParen => {
                let o = stack
                    .pop()
                    .ok_or_else(|| format!("unbalanced ) in {expr}"))?;
                close_of.insert(o, i);
                open_of.insert(i, o);
            }
            _ => {}
        }
    }
    if !stack.is_empty() {
        return Err(format!("unbalanced ( in {expr}"));
    }
    // The innermost parentheses around token `i`: (open, close), or the
    // whole expression.
    let enclosing = |i: usize| -> (usize, usize) {
        close_of
            .iter()
            .filter(|&(&o, &c)| o < i && i < c)
            .max_by_key(|&(&o, _)| o)
            .map_or((0, toks.len()), |(&o, &c)| (o, c))
    };
    let mut uses = Uses::default();
    // Each label list, and the tokens (open, close) it applies to.
    let mut lists: Vec<(Grouping, (usize, usize))> = Vec::new();
    let mut i = 0;
    while i < toks.len() {
        let id = match &toks[i] {
            Tok::Ident(id) => id.clone(),
            Tok::LBrace => return Err(format!("a selector without a metric name in {expr}")),
            _ => {
                i += 1;
                continue;
            }
        };
        let next = toks.get(i + 1);
        if id == "by" || id == "without" {
            let (labels, close) = label_list(&toks, i + 1)?;
            // `sum(x) by (l)` or `sum by (l) (x)`.
            let group = if i > 0 && toks[i - 1] == Tok::RParen {
                (open_of[&(i - 1)], i - 1)
            } else if toks.get(close + 1) == Some(&Tok::LParen) {
                (close + 1, close_of[&(close + 1)])
            } else {
                return Err(format!("{id} (...) with nothing to aggregate in {expr}"));
            };
            lists.push((Grouping::new(id, labels, true), group));
            i = close + 1;
            continue;
        }
        if matches!(
            id.as_str(),
            "on" | "ignoring" | "group_left" | "group_right"
        ) {
            if next == Some(&Tok::LParen) {
                let (labels, close) = label_list(&toks, i + 1)?;
                lists.push((Grouping::new(id, labels, false), enclosing(i)));
                i = close + 1;
            } else {
                i += 1;
            }
            continue;
        }
        if KEYWORDS.contains(&id.to_ascii_lowercase().as_str()) {
            i += 1;
            continue;
        }
        if next == Some(&Tok::LParen)
            || matches!(next, Some(Tok::Ident(n)) if n == "by" || n == "without")
        {
            if !FUNCTIONS.contains(&id.as_str()) && !AGGREGATIONS.contains(&id.as_str()) {
                return Err(format!("unknown function {id} in {expr}"));
            }
            i += 1;
            continue;
        }
        // A metric selector.
        let mut s = Selector {
            metric: id,
            matchers: Vec::new(),
            range_fn: None,
            at: i,
        };
        let mut j = i + 1;
        if toks.get(j) == Some(&Tok::LBrace) {
            j += 1;
            loop {
                match (toks.get(j), toks.get(j + 1), toks.get(j + 2)) {
                    (Some(Tok::RBrace), _, _) => {
                        j += 1;
                        break;
                    }
                    (Some(Tok::Comma), _, _) => j += 1,
                    (Some(Tok::Ident(l)), Some(Tok::Op(op)), Some(Tok::Str(v))) => {
                        if l == "__name__" {
                            return Err(format!("name the metric, not __name__, in {expr}"));
                        }
                        s.matchers.push((l.clone(), op.clone(), v.clone()));
                        j += 3;
                    }
                    other => return Err(format!("bad matcher {other:?} in {expr}")),
                }
            }
        }
        if toks.get(j) == Some(&Tok::Range) {
            let (open, _) = enclosing(i);
            if open > 0
                && let Some(Tok::Ident(f)) = toks.get(open - 1)
            {
                s.range_fn = Some(f.clone());
            }
            j += 1;
        }
        uses.selectors.push(s);
        i = j;
    }
    for (mut g, (open, close)) in lists {
        g.selectors = uses
            .selectors
            .iter()
            .enumerate()
            .filter(|(_, s)| open <= s.at && s.at <= close)
            .map(|(k, _)| k)
            .collect();
        if g.selectors.is_empty() {
            return Err(format!(
                "{} ({}) over no metric in {expr}",
                g.clause,
                g.labels.join(", ")
            ));
        }
        uses.groupings.push(g);
    }
    Ok(uses)
}

/// The labels `{{name}}` of a legend.
fn legend_labels(legend: &str) -> Vec<String> {
    legend
        .split("{{")
        .skip(1)
        .filter_map(|s| s.split_once("}}").map(|(l, _)| l.trim().to_owned()))
        .collect()
}

// ---------------------------------------------------------------------------
// The exposition (Prometheus text format 0.0.4).

#[derive(Debug, Default, Clone)]
struct Exposition {
    /// Family name -> its TYPE.
    types: BTreeMap<String, String>,
    /// Sample name -> the label names its samples carry.
    samples: BTreeMap<String, BTreeSet<String>>,
}

impl Exposition {
    fn parse(text: &str) -> Self {
        let mut e = Self::default();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut it = rest.split_whitespace();
                if let (Some(n), Some(t)) = (it.next(), it.next()) {
                    e.types.insert(n.to_owned(), t.to_owned());
                }
                continue;
            }
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            let name = line[..end].to_owned();
            let labels = e.samples.entry(name).or_default();
            if line[end..].starts_with('{') {
                labels.extend(sample_labels(&line[end + 1..]));
            }
        }
        e
    }

    fn merge(mut self, other: &Self) -> Self {
        self.types.extend(other.types.clone());
        for (k, v) in &other.samples {
            self.samples.entry(k.clone()).or_default().extend(v.clone());
        }
        self
    }

    /// The family a sample name belongs to, and its TYPE.
    fn family(&self, sample: &str) -> Option<(&str, &str)> {
        for suffix in ["", "_total", "_bucket", "_count", "_sum", "_created"] {
            if let Some(base) = sample.strip_suffix(suffix)
                && let Some((n, t)) = self.types.get_key_value(base)
            {
                return Some((n.as_str(), t.as_str()));
            }
        }
        None
    }
}

/// Label names of `a="x",b="y\"z"} 1`.
fn sample_labels(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let c: Vec<char> = s.chars().collect();
    let mut i = 0;
    while i < c.len() && c[i] != '}' {
        let name: String = c[i..].iter().take_while(|&&x| x != '=').collect();
        i += name.chars().count() + 2; // `="`
        while i < c.len() && c[i] != '"' {
            i += if c[i] == '\\' { 2 } else { 1 };
        }
        i += 1;
        if c.get(i) == Some(&',') {
            i += 1;
        }
        out.push(name.trim().to_owned());
    }
    out
}

// ---------------------------------------------------------------------------
// The check.

/// What [`check`] looked at, and what it found wrong.
#[derive(Debug, Default)]
struct Report {
    problems: Vec<String>,
    metrics: BTreeSet<String>,
    /// (metric, label) pairs found on the exposition.
    labels: BTreeSet<(String, String)>,
    queries: usize,
}

fn is_target_label(l: &str) -> bool {
    TARGET_LABELS.contains(&l)
}

/// Every metric and label `d`'s queries and variables use, against `e`.
fn check(d: &Value, e: &Exposition) -> Report {
    let mut r = Report::default();
    let has = |r: &mut Report, metric: &str, label: &str| -> bool {
        let ok = e.samples.get(metric).is_some_and(|ls| ls.contains(label));
        if ok {
            r.labels.insert((metric.to_owned(), label.to_owned()));
        }
        ok
    };
    let exposed = |r: &mut Report, at: &str, metric: &str| -> bool {
        r.metrics.insert(metric.to_owned());
        if e.samples.contains_key(metric) {
            return true;
        }
        let hint = match e.family(metric) {
            Some((f, t)) => format!(" (family {f}, {t}, is declared but has no such sample)"),
            None => String::new(),
        };
        r.problems
            .push(format!("{at}: metric {metric} is not exposed{hint}"));
        false
    };
    for q in queries(d) {
        r.queries += 1;
        let uses = match extract(&q.expr) {
            Ok(u) => u,
            Err(err) => {
                r.problems.push(format!("{}: {err}", q.at));
                continue;
            }
        };
        for s in &uses.selectors {
            if !exposed(&mut r, &q.at, &s.metric) {
                continue;
            }
            if let Some(f) = &s.range_fn
                && COUNTER_FUNCTIONS.contains(&f.as_str())
            {
                let t = e.family(&s.metric).map_or("untyped", |(_, t)| t);
                let bucket_or_counter = (t == "counter" && s.metric.ends_with("_total"))
                    || (t == "histogram"
                        && ["_bucket", "_count", "_sum"]
                            .iter()
                            .any(|x| s.metric.ends_with(x)));
                if !bucket_or_counter {
                    r.problems.push(format!(
                        "{}: {f}() over {}, a {t}, not a counter",
                        q.at, s.metric
                    ));
                }
            }
            for (l, _, _) in &s.matchers {
                if !is_target_label(l) && !has(&mut r, &s.metric, l) {
                    r.problems
                        .push(format!("{}: {} has no label {l}", q.at, s.metric));
                }
            }
        }
        for g in &uses.groupings {
            for l in g.labels.iter().filter(|l| !is_target_label(l)) {
                let metrics: Vec<&str> = g
                    .selectors
                    .iter()
                    .map(|&k| uses.selectors[k].metric.as_str())
                    .collect();
                let on: Vec<bool> = metrics.iter().map(|m| has(&mut r, m, l)).collect();
                let ok = if g.every {
                    on.iter().all(|&b| b)
                } else {
                    on.iter().any(|&b| b)
                };
                if !ok {
                    r.problems.push(format!(
                        "{}: {} ({l}): not on {} of {metrics:?}",
                        q.at,
                        g.clause,
                        if g.every { "every one" } else { "any" }
                    ));
                }
            }
        }
        for l in legend_labels(&q.legend)
            .iter()
            .filter(|l| !is_target_label(l))
        {
            let metrics: Vec<String> = uses.selectors.iter().map(|s| s.metric.clone()).collect();
            if !metrics.iter().any(|m| has(&mut r, m, l)) {
                r.problems.push(format!(
                    "{}: legend {{{{{l}}}}} is no label of {metrics:?}",
                    q.at
                ));
            }
        }
    }
    for v in d["templating"]["list"].as_array().into_iter().flatten() {
        let Some(query) = variable_query(v) else {
            continue;
        };
        let at = format!("variable {}", v["name"]);
        let toks = tokens(&query).unwrap_or_default();
        match toks.as_slice() {
            [
                Tok::Ident(f),
                Tok::LParen,
                Tok::Ident(metric),
                Tok::Comma,
                Tok::Ident(label),
                Tok::RParen,
            ] if f == "label_values" => {
                if exposed(&mut r, &at, metric)
                    && !is_target_label(label)
                    && !has(&mut r, metric, label)
                {
                    r.problems
                        .push(format!("{at}: {metric} has no label {label}"));
                }
            }
            _ => r
                .problems
                .push(format!("{at}: not label_values(metric, label): {query}")),
        }
    }
    r
}

// ---------------------------------------------------------------------------
// Tests without a cluster: the JSON, the extractor, the component.

#[test]
fn the_dashboard_is_well_formed_and_every_query_reads_the_chosen_nodes() {
    let d = dashboard();
    assert!(
        d["schemaVersion"].as_u64().is_some_and(|v| v >= 36),
        "schemaVersion {}",
        d["schemaVersion"]
    );
    assert!(d["uid"].as_str().is_some_and(|u| !u.is_empty()));
    let vars = d["templating"]["list"].as_array().expect("templating.list");
    let var = |name: &str| {
        vars.iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no variable {name}"))
    };
    let ds = var("datasource");
    assert_eq!(ds["type"], "datasource", "{ds}");
    assert_eq!(ds["query"], "prometheus", "{ds}");
    let node = var("node");
    assert_eq!(node["type"], "query", "{node}");
    assert_eq!(node["datasource"]["uid"], DATASOURCE_UID, "{node}");
    assert_eq!(node["datasource"]["type"], "prometheus", "{node}");
    assert!(
        variable_query(node).is_some_and(|q| q.starts_with("label_values(")),
        "{node}"
    );

    let all = panels(&d);
    let mut ids = BTreeSet::new();
    let mut boxes: Vec<(u64, u64, u64, u64, &Value)> = Vec::new();
    for p in &all {
        let id = p["id"]
            .as_u64()
            .unwrap_or_else(|| panic!("a panel without an id: {p}"));
        assert!(ids.insert(id), "panel id {id} is used twice");
        let g = &p["gridPos"];
        let [x, y, w, h] = ["x", "y", "w", "h"].map(|k| {
            g[k].as_u64()
                .unwrap_or_else(|| panic!("panel {id}: gridPos.{k}"))
        });
        assert!(w > 0 && h > 0 && x + w <= 24, "panel {id}: {g}");
        for (bx, by, bw, bh, other) in &boxes {
            let apart = x + w <= *bx || *bx + *bw <= x || y + h <= *by || *by + *bh <= y;
            assert!(apart, "panel {id} overlaps panel {}", other["id"]);
        }
        boxes.push((x, y, w, h, *p));
        if p["type"] == "row" {
            assert!(p["targets"].is_null(), "row {id} has queries");
            continue;
        }
        assert!(
            p["title"].as_str().is_some_and(|t| !t.is_empty()),
            "panel {id}"
        );
        assert_eq!(
            p["datasource"],
            json!({"type": "prometheus", "uid": DATASOURCE_UID}),
            "panel {id}: its data source is the variable"
        );
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {id} has no query");
        let mut refs = BTreeSet::new();
        for t in targets {
            assert_eq!(
                t["datasource"], p["datasource"],
                "panel {id}: a query with another data source"
            );
            assert!(
                refs.insert(t["refId"].as_str().unwrap_or("").to_owned()),
                "panel {id}: refId twice"
            );
        }
    }
    let qs = queries(&d);
    assert!(qs.len() >= 20, "{} queries", qs.len());
    for q in &qs {
        let uses = extract(&q.expr).unwrap_or_else(|e| panic!("{}: {e}", q.at));
        assert!(!uses.selectors.is_empty(), "{}: no metric", q.at);
        for s in &uses.selectors {
            assert!(
                s.metric.starts_with("balancer_"),
                "{}: {} is not ours",
                q.at,
                s.metric
            );
            let (l, op, v) = NODE_MATCHER;
            assert!(
                s.matchers
                    .iter()
                    .any(|m| (m.0.as_str(), m.1.as_str(), m.2.as_str()) == (l, op, v)),
                "{}: {} does not filter on the node variable ({l}{op}\"{v}\")",
                q.at,
                s.metric
            );
        }
    }
}

#[test]
fn the_extractor_finds_metrics_and_labels_and_refuses_what_it_cannot_read() {
    let u = extract(
        r#"histogram_quantile(0.99, sum by (instance, le) (rate(a_seconds_bucket{instance=~"$node:.*", x!="}"}[$__rate_interval])))"#,
    )
    .expect("extract");
    assert_eq!(u.selectors.len(), 1);
    let s = &u.selectors[0];
    assert_eq!(s.metric, "a_seconds_bucket");
    assert_eq!(s.range_fn.as_deref(), Some("rate"));
    assert_eq!(
        s.matchers,
        vec![
            ("instance".into(), "=~".into(), "$node:.*".into()),
            ("x".into(), "!=".into(), "}".into())
        ]
    );
    assert_eq!(u.groupings.len(), 1);
    assert_eq!(u.groupings[0].labels, ["instance", "le"]);
    assert!(u.groupings[0].every);

    // Postfix `by`, bare operands, `on`/`group_left`, numbers, keywords.
    let u = extract(
        "sum(rate(b_total[5m] offset 1h)) by (svc) / on (svc) group_left (pod) c > bool 0.5 and d",
    )
    .expect("extract");
    let names: Vec<&str> = u.selectors.iter().map(|s| s.metric.as_str()).collect();
    assert_eq!(names, ["b_total", "c", "d"]);
    let g: Vec<(&str, Vec<String>, Vec<usize>, bool)> = u
        .groupings
        .iter()
        .map(|g| {
            (
                g.clause.as_str(),
                g.labels.clone(),
                g.selectors.clone(),
                g.every,
            )
        })
        .collect();
    assert_eq!(
        g,
        [
            ("by", vec!["svc".to_owned()], vec![0], true),
            ("on", vec!["svc".to_owned()], vec![0, 1, 2], false),
            ("group_left", vec!["pod".to_owned()], vec![0, 1, 2], false),
        ]
    );
    assert_eq!(
        legend_labels("{{service}} {{ endpoint }} p99"),
        ["service", "endpoint"]
    );

    for bad in [
        "sum(rate(x[5m])",
        "rat(x[5m])",
        r#"{__name__="x"}"#,
        r#"x{__name__="y"}"#,
        "sum by (l) (1)",
        "x # y",
    ] {
        assert!(extract(bad).is_err(), "{bad} must not be read");
    }

    // The check against an exposition: names, labels, types.
    let e = Exposition::parse(
        "# TYPE a_seconds histogram\na_seconds_bucket{le=\"0.1\"} 1\na_seconds_sum 1\na_seconds_count 1\n\
         # TYPE g gauge\ng{side=\"pod\",v=\"a\\\"b,c=d\"} 1\n# TYPE n counter\nn_total 3\n# TYPE empty gauge\n",
    );
    assert_eq!(
        e.samples["g"],
        BTreeSet::from(["side".to_owned(), "v".to_owned()])
    );
    let dash = |exprs: &[&str]| json!({"panels": [{"id": 1, "targets": exprs.iter().map(|x| json!({"expr": x, "refId": "A"})).collect::<Vec<_>>()}]});
    let r = check(
        &dash(&[
            "histogram_quantile(0.5, sum by (le) (rate(a_seconds_bucket[1m])))",
            "sum by (side) (g)",
            "rate(n_total[1m])",
        ]),
        &e,
    );
    assert!(r.problems.is_empty(), "{:?}", r.problems);
    assert_eq!(r.metrics.len(), 3);
    for (expr, why) in [
        ("sum by (sid) (g)", "by (sid)"),
        ("g{kind=\"x\"}", "no label kind"),
        ("rate(g[1m])", "a gauge"),
        ("n", "not exposed"),
        ("empty", "declared but has no such sample"),
        ("a_seconds", "not exposed"),
    ] {
        let r = check(&dash(&[expr]), &e);
        assert!(
            r.problems.iter().any(|p| p.contains(why)),
            "{expr}: {:?}",
            r.problems
        );
    }
}

/// `to` relative to `from` (both absolute): kustomize takes relative paths
/// only.
fn relative(from: &Path, to: &Path) -> PathBuf {
    let from: Vec<_> = from.components().collect();
    let to: Vec<_> = to.components().collect();
    let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
    let mut p = PathBuf::new();
    for _ in common..from.len() {
        p.push("..");
    }
    for c in &to[common..] {
        p.push(c);
    }
    p
}

/// Built with `kubectl kustomize` (kubectl is on the project's machines;
/// `cargo xtask setup` does not install it).
#[test]
fn the_component_is_opt_in_and_builds_a_configmap_the_grafana_sidecar_loads() {
    let k: Value = serde_saphyr::from_str(
        &std::fs::read_to_string(component_dir().join("kustomization.yaml")).expect("read"),
    )
    .expect("kustomization.yaml");
    assert_eq!(k["apiVersion"], "kustomize.config.k8s.io/v1alpha1");
    assert_eq!(k["kind"], "Component");
    let base = std::fs::read_to_string(component_dir().join("../../kustomization.yaml"))
        .expect("read the base kustomization");
    assert!(
        !base.contains("components"),
        "the dashboard is opt-in: the base must not list it"
    );

    // Built the way a user enables it: the manifests plus the component.
    let manifests = component_dir()
        .join("../..")
        .canonicalize()
        .expect("manifests");
    let overlay = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("lbt-dashboard-overlay-{}", std::process::id()));
    std::fs::create_dir_all(&overlay).expect("overlay dir");
    let overlay = overlay.canonicalize().expect("overlay");
    let rel = relative(&overlay, &manifests);
    std::fs::write(
        overlay.join("kustomization.yaml"),
        format!(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - {}\ncomponents:\n  - {}\n",
            rel.display(),
            rel.join("components/grafana-dashboard").display()
        ),
    )
    .expect("write overlay");
    let out = std::process::Command::new("kubectl")
        .arg("kustomize")
        .arg(&overlay)
        .output()
        .expect("kubectl (kustomize) is needed to build the manifests");
    let _ = std::fs::remove_dir_all(&overlay);
    assert!(
        out.status.success(),
        "kubectl kustomize: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let built = String::from_utf8_lossy(&out.stdout).into_owned();
    let cm = built
        .split("\n---\n")
        .map(|doc| serde_saphyr::from_str::<Value>(doc).expect("built YAML"))
        .find(|v| v["kind"] == "ConfigMap" && v["metadata"]["name"] == "balancer-grafana-dashboard")
        .unwrap_or_else(|| panic!("no dashboard ConfigMap in:\n{built}"));
    assert_eq!(cm["metadata"]["namespace"], "balancer-system");
    let labels = &cm["metadata"]["labels"];
    assert_eq!(labels["grafana_dashboard"], "1", "a string: {labels}");
    assert_eq!(labels["app.kubernetes.io/name"], "balancer");
    assert_eq!(
        cm["data"]["balancer.json"].as_str(),
        Some(dashboard_text().as_str()),
        "the ConfigMap carries the file as it is"
    );
    // Everything else is the base, unchanged.
    assert!(built.contains("kind: DaemonSet"), "{built}");
}

// ---------------------------------------------------------------------------
// Against a real agent and router.

fn service(name: &str, vip: &str, target_port: u16, h2: bool) -> Value {
    let mut port = json!({"name": "p", "port": 80, "protocol": "TCP", "targetPort": target_port});
    if h2 {
        port["appProtocol"] = json!("kubernetes.io/h2c");
    }
    json!({"metadata": {"name": name, "namespace": "default"},
           "spec": {"type": "ClusterIP", "clusterIP": vip, "clusterIPs": [vip], "ports": [port]}})
}

fn slice(service: &str, port: u16, t: &Topology) -> Value {
    let eps: Vec<Value> = t
        .pods
        .iter()
        .map(|p| {
            json!({"addresses": [p.v4.to_string()],
                        "conditions": {"ready": true, "serving": true, "terminating": false}})
        })
        .collect();
    json!({"metadata": {"name": format!("{service}-a"), "namespace": "default",
                        "labels": {"kubernetes.io/service-name": service}},
           "addressType": "IPv4",
           "ports": [{"name": "p", "port": port, "protocol": "TCP"}],
           "endpoints": eps})
}

/// `GET /metrics` on the agent's listener (root namespace loopback).
fn scrape(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect the agent's metrics");
    write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    let (head, body) = out.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    body.to_owned()
}

/// The endpoint of `pod` in service `svc`, from `endpoints -o json`.
fn endpoint(agent: &Agent, svc: &str, pod: &str) -> Value {
    let v = agent.endpoints_json().unwrap_or_default();
    v["services"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["name"] == format!("default/{svc}"))
        .flat_map(|s| s["endpoints"].as_array().cloned().unwrap_or_default())
        .find(|e| e["address"] == pod)
        .unwrap_or_default()
}

#[test]
fn every_query_of_the_dashboard_reads_metrics_a_real_agent_and_router_expose() {
    require_root();
    let started = Instant::now();
    let d = dashboard();
    let mut t = Topology::new("dashboard", 4, &[8080]).expect("topology");
    t.start_h2().expect("h2 servers");
    // The Kubernetes source: the apiserver's metrics exist only with it.
    let dir = std::env::temp_dir().join(format!("{}-api", t.prefix));
    let api = FakeApi::start(&dir).expect("fake apiserver");
    api.apply(Kind::Service, service(SVC_H2, VIP_H2, H2_PORT, true));
    api.apply(Kind::EndpointSlice, slice(SVC_H2, H2_PORT, &t));
    api.apply(Kind::Service, service(SVC_TCP, VIP_TCP, 8080, false));
    api.apply(Kind::EndpointSlice, slice(SVC_TCP, 8080, &t));
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let agent_metrics = format!("127.0.0.1:{port}");
    // The agent in the root namespace (to reach the fake apiserver on
    // loopback), its router in the node namespace.
    let agent = Agent::start_kube(
        &t.prefix,
        &t.cgroup.path,
        &api.kubeconfig,
        &[
            "--metrics-addr",
            &agent_metrics,
            "--proxy-addr",
            ROUTER_ADDR,
            "--router-netns",
            &t.node.name,
            "--router-metrics-addr",
            ROUTER_METRICS,
        ],
    )
    .expect("agent");
    Topology::wait_for("the first sync", Duration::from_secs(20), || {
        Ok(agent.router_synced()?
            && agent.status_json()?["router"]["process"]["routes"] == 1
            && t.pods.iter().all(|p| {
                let a = p.v4.to_string();
                endpoint(&agent, SVC_H2, &a).is_object()
                    && endpoint(&agent, SVC_TCP, &a).is_object()
            }))
    })
    .unwrap_or_else(|e| panic!("{e}: {}", agent.log()));

    // HTTP/2 streams through the router, TCP connections at L4.
    let h2 = format!("{VIP_H2}:80");
    let v = h2_client(
        &t.client.name,
        Some(&t.cgroup.path),
        &h2,
        &[
            "--path",
            "/unary",
            "--requests",
            "200",
            "--concurrency",
            "8",
        ],
    )
    .expect("h2 client");
    assert!(v["errors"].as_object().is_none_or(|e| e.is_empty()), "{v}");
    let r = short_connections(
        &t.client.name,
        Some(&t.cgroup.path),
        &format!("{VIP_TCP}:80"),
        20,
    )
    .expect("tcp client");
    assert!(r.errors.is_empty(), "{:?}", r.errors);

    // An ejection, so that the reason label exists: pod3's HTTP/2 server
    // dies, the router's connects to it fail.
    t.pods[3].h2.as_mut().expect("h2").kill();
    let dead = t.pods[3].v4.to_string();
    Topology::wait_for(
        "pod3 ejected by the router",
        Duration::from_secs(20),
        || {
            let _ = h2_client(
                &t.client.name,
                Some(&t.cgroup.path),
                &h2,
                &["--path", "/unary", "--requests", "40", "--concurrency", "4"],
            );
            Ok(endpoint(&agent, SVC_H2, &dead)["ejected"].is_string())
        },
    )
    .unwrap_or_else(|e| panic!("{e}: {}", endpoint(&agent, SVC_H2, &dead)));

    let agent_text = scrape(&agent_metrics);
    let router_text = t
        .node
        .exec(
            "curl",
            &["-sf", &format!("http://{ROUTER_METRICS}/metrics")],
        )
        .expect("the router's metrics");
    let agent_exp = Exposition::parse(&agent_text);
    let router_exp = Exposition::parse(&router_text);
    let both = agent_exp.clone().merge(&router_exp);
    let r = check(&d, &both);
    assert!(
        r.problems.is_empty(),
        "the dashboard drifted from the metrics:\n  {}\n\nagent:\n{agent_text}\nrouter:\n{router_text}",
        r.problems.join("\n  ")
    );
    // Both processes' metrics are used.
    for (who, e) in [("agent", &agent_exp), ("router", &router_exp)] {
        assert!(
            r.metrics.iter().any(|m| e.samples.contains_key(m)),
            "no metric of the {who}'s"
        );
    }
    let families = |e: &Exposition| e.types.keys().cloned().collect::<BTreeSet<_>>();
    let used: BTreeSet<String> = r
        .metrics
        .iter()
        .filter_map(|m| both.family(m).map(|(f, _)| f.to_owned()))
        .collect();
    let unused: Vec<String> = families(&agent_exp)
        .union(&families(&router_exp))
        .filter(|f| !used.contains(*f))
        .cloned()
        .collect();
    eprintln!(
        "dashboard: {} queries, {} metric names and {} (metric, label) pairs checked against the \
         agent's and the router's metrics in {:.1?}; families not on it: {unused:?}",
        r.queries,
        r.metrics.len(),
        r.labels.len(),
        started.elapsed()
    );

    // A rename on either side fails the check: a metric, a label, in the
    // dashboard or in the exposition.
    let renamed = |from: &str, to: &str| -> Value {
        serde_json::from_str(&dashboard_text().replace(from, to)).expect("json")
    };
    for (d2, why) in [
        (
            renamed(
                "balancer_router_held_bytes",
                "balancer_router_buffered_bytes",
            ),
            "balancer_router_buffered_bytes is not exposed",
        ),
        (renamed("by (kind)", "by (flood)"), "by (flood)"),
        (renamed("{{reason}}", "{{why}}"), "legend {{why}}"),
    ] {
        let r = check(&d2, &both);
        assert!(
            r.problems.iter().any(|p| p.contains(why)),
            "{why}: {:?}",
            r.problems
        );
    }
    for (from, to) in [
        (
            "balancer_endpoint_streams_total",
            "balancer_endpoint_requests_total",
        ),
        ("reason=", "why="),
    ] {
        let e = Exposition::parse(&agent_text.replace(from, to)).merge(&router_exp);
        assert!(
            !check(&d, &e).problems.is_empty(),
            "{from} renamed {to} in the agent's metrics must fail"
        );
    }
}
