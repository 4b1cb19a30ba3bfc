//! A strict reader of the Prometheus text exposition format (0.0.4), strict where a scraper
//! would be lenient: every sample must belong to a family announced by `# HELP` and `# TYPE`
//! lines before it, a family's samples are contiguous, and histograms are complete and
//! cumulative. It panics with the offending line.

use std::collections::{BTreeMap, HashMap};

#[derive(Debug, Clone)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

#[derive(Debug, Default)]
pub struct Exposition {
    /// Family name → type, in the order the families appear.
    pub families: Vec<(String, String)>,
    pub samples: Vec<Sample>,
}

impl Exposition {
    /// The value of the sample with exactly these labels.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let wanted: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        self.samples
            .iter()
            .find(|s| s.name == name && s.labels == wanted)
            .map(|s| s.value)
    }

    pub fn family_names(&self) -> Vec<&str> {
        self.families.iter().map(|(n, _)| n.as_str()).collect()
    }
}

fn is_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn is_label_name(s: &str) -> bool {
    is_name(s) && !s.contains(':') && !s.starts_with("__")
}

fn parse_value(raw: &str, line: &str) -> f64 {
    match raw {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        _ => raw
            .parse()
            .unwrap_or_else(|_| panic!("bad sample value {raw:?} in line {line:?}")),
    }
}

/// `{a="x",b="y"}` (the braces already removed) → labels; quotes and escapes checked.
fn parse_labels(mut rest: &str, line: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    while !rest.is_empty() {
        let (name, after) = rest
            .split_once("=\"")
            .unwrap_or_else(|| panic!("label without =\"…\" in line {line:?}"));
        assert!(is_label_name(name), "bad label name {name:?} in {line:?}");
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next() {
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    Some((_, 'n')) => value.push('\n'),
                    other => panic!("bad escape {other:?} in line {line:?}"),
                },
                Some((_, '\n')) => panic!("raw newline in a label value: {line:?}"),
                Some((_, c)) => value.push(c),
                None => panic!("unterminated label value in line {line:?}"),
            }
        };
        assert!(
            labels.insert(name.to_owned(), value).is_none(),
            "label {name} twice in {line:?}"
        );
        rest = &after[end + 1..];
        rest = match rest.strip_prefix(',') {
            Some(r) => r,
            None if rest.is_empty() => rest,
            None => panic!("labels not separated by commas in {line:?}"),
        };
    }
    labels
}

fn parse_sample(line: &str) -> Sample {
    let (series, value) = line
        .rsplit_once(' ')
        .unwrap_or_else(|| panic!("sample without a value: {line:?}"));
    let (name, labels) = match series.split_once('{') {
        Some((name, labels)) => {
            let labels = labels
                .strip_suffix('}')
                .unwrap_or_else(|| panic!("unclosed labels in {line:?}"));
            (name, parse_labels(labels, line))
        }
        None => (series, BTreeMap::new()),
    };
    assert!(is_name(name), "bad metric name {name:?} in {line:?}");
    Sample {
        name: name.to_owned(),
        labels,
        value: parse_value(value, line),
    }
}

/// The family a sample belongs to, given the declared types.
fn family_of<'a>(name: &'a str, types: &HashMap<String, String>) -> &'a str {
    if types.contains_key(name) {
        return name;
    }
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix)
            && types.get(base).map(String::as_str) == Some("histogram")
        {
            return base;
        }
    }
    panic!("sample {name} belongs to no family announced with # TYPE before it")
}

pub fn parse(text: &str) -> Exposition {
    assert!(text.ends_with('\n'), "exposition must end with a newline");
    let mut out = Exposition::default();
    let mut types: HashMap<String, String> = HashMap::new();
    let mut helps: HashMap<String, String> = HashMap::new();
    let mut current: Option<String> = None;
    let mut finished: Vec<String> = Vec::new();
    for line in text.lines() {
        assert!(!line.is_empty(), "empty line in the exposition");
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            assert!(is_name(name), "bad HELP name in {line:?}");
            assert!(!help.trim().is_empty(), "empty HELP for {name}");
            assert!(
                helps.insert(name.to_owned(), help.to_owned()).is_none(),
                "second HELP for {name}"
            );
            assert!(
                !finished.contains(&name.to_owned()) && current.as_deref() != Some(name),
                "HELP for {name} after its samples"
            );
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest
                .split_once(' ')
                .unwrap_or_else(|| panic!("TYPE without a type: {line:?}"));
            assert!(
                ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                "unknown type in {line:?}"
            );
            assert!(
                helps.contains_key(name),
                "TYPE for {name} before its HELP (this exposition always gives both)"
            );
            assert!(
                types.insert(name.to_owned(), kind.to_owned()).is_none(),
                "second TYPE for {name}"
            );
            if kind == "counter" {
                assert!(
                    name.ends_with("_total"),
                    "counter {name} should end in _total"
                );
            }
            out.families.push((name.to_owned(), kind.to_owned()));
            continue;
        }
        assert!(!line.starts_with('#'), "unexpected comment {line:?}");
        let sample = parse_sample(line);
        let family = family_of(&sample.name, &types).to_owned();
        if current.as_deref() != Some(family.as_str()) {
            assert!(
                !finished.contains(&family),
                "samples of {family} are not contiguous (line {line:?})"
            );
            if let Some(previous) = current.replace(family.clone()) {
                finished.push(previous);
            }
        }
        if types[&family] == "counter" {
            assert!(sample.value >= 0.0, "negative counter in {line:?}");
        }
        out.samples.push(sample);
    }
    check_histograms(&out);
    out
}

/// A series' labels other than `le`, in order.
type LabelSet = Vec<(String, String)>;

/// Buckets ascend by `le`, counts never decrease, the last is `+Inf` and equals `_count`, and
/// `_sum` is there.
fn check_histograms(exp: &Exposition) {
    for (family, kind) in &exp.families {
        if kind != "histogram" {
            continue;
        }
        let mut series: BTreeMap<LabelSet, Vec<(f64, f64)>> = BTreeMap::new();
        for s in exp
            .samples
            .iter()
            .filter(|s| s.name == format!("{family}_bucket"))
        {
            let le = s
                .labels
                .get("le")
                .unwrap_or_else(|| panic!("{family} bucket without le: {s:?}"));
            let key: LabelSet = s
                .labels
                .iter()
                .filter(|(k, _)| k.as_str() != "le")
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            series
                .entry(key)
                .or_default()
                .push((parse_value(le, le), s.value));
        }
        for (key, buckets) in &series {
            for pair in buckets.windows(2) {
                assert!(pair[0].0 < pair[1].0, "{family}{key:?}: le not ascending");
                assert!(
                    pair[0].1 <= pair[1].1,
                    "{family}{key:?}: buckets are not cumulative"
                );
            }
            let last = buckets.last().expect("at least one bucket");
            assert!(last.0.is_infinite(), "{family}{key:?}: no +Inf bucket last");
            let labels: Vec<(&str, &str)> =
                key.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            let count = exp
                .value(&format!("{family}_count"), &labels)
                .unwrap_or_else(|| panic!("{family}{key:?}: no _count"));
            assert_eq!(last.1, count, "{family}{key:?}: +Inf bucket != _count");
            assert!(
                exp.value(&format!("{family}_sum"), &labels).is_some(),
                "{family}{key:?}: no _sum"
            );
        }
    }
}

#[test]
fn the_reader_rejects_what_prometheus_would_choke_on() {
    let good = "# HELP a_total A.\n# TYPE a_total counter\na_total{x=\"1\"} 2\n\
                # HELP h H.\n# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 3\nh_count 2\n";
    let exp = parse(good);
    assert_eq!(exp.value("a_total", &[("x", "1")]), Some(2.0));
    for bad in [
        "a_total 1\n",
        "# HELP a_total A.\n# TYPE a_total counter\na_total{x=1} 2\n",
        "# HELP h H.\n# TYPE h histogram\nh_bucket{le=\"1\"} 3\nh_bucket{le=\"+Inf\"} 2\nh_sum 3\nh_count 2\n",
        "# HELP h H.\n# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 3\nh_count 3\n",
        "# HELP h H.\n# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_sum 3\nh_count 1\n",
    ] {
        assert!(
            std::panic::catch_unwind(|| parse(bad)).is_err(),
            "accepted: {bad}"
        );
    }
}
