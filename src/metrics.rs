//! Counters for `/metrics` (Prometheus text format, version 0.0.4).
//!
//! Calls record what happened to them when they end (outcome, menus visited, invalid keys and
//! timeouts per menu, RTP figures, 911 redirects), so the hot path takes no lock: one short
//! mutex per finished call. Gauges (live calls, dialogs, free RTP ports) are read at scrape time
//! by the API.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;

/// A counter family: help text and values by label set.
#[derive(Debug, Default)]
struct Family {
    help: &'static str,
    values: BTreeMap<Vec<(&'static str, String)>, u64>,
}

/// All counters.
#[derive(Debug, Default)]
pub struct Metrics {
    families: Mutex<BTreeMap<&'static str, Family>>,
}

impl Metrics {
    /// Add `n` to counter `name` with these labels.
    pub(crate) fn add(
        &self,
        name: &'static str,
        help: &'static str,
        labels: &[(&'static str, &str)],
        n: u64,
    ) {
        let key: Vec<(&'static str, String)> =
            labels.iter().map(|(k, v)| (*k, (*v).to_owned())).collect();
        let mut f = match self.families.lock() {
            Ok(f) => f,
            Err(p) => p.into_inner(),
        };
        let fam = f.entry(name).or_insert_with(|| Family {
            help,
            values: BTreeMap::new(),
        });
        *fam.values.entry(key).or_insert(0) += n;
    }

    /// The current value (for tests and the admin view).
    #[cfg(test)]
    pub(crate) fn get(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        let f = match self.families.lock() {
            Ok(f) => f,
            Err(p) => p.into_inner(),
        };
        f.get(name)
            .and_then(|fam| {
                fam.values.iter().find_map(|(k, v)| {
                    let same = k.len() == labels.len()
                        && k.iter()
                            .zip(labels)
                            .all(|((a, b), (c, d))| a == c && b == d);
                    same.then_some(*v)
                })
            })
            .unwrap_or(0)
    }

    /// Render every counter, then the given gauges, in Prometheus text format.
    pub(crate) fn render(&self, gauges: &[(&str, &str, f64)]) -> String {
        let mut out = String::with_capacity(4096);
        let f = match self.families.lock() {
            Ok(f) => f,
            Err(p) => p.into_inner(),
        };
        for (name, fam) in f.iter() {
            let _ = writeln!(out, "# HELP {name} {}", fam.help);
            let _ = writeln!(out, "# TYPE {name} counter");
            for (labels, v) in &fam.values {
                let _ = writeln!(out, "{name}{} {v}", label_text(labels));
            }
        }
        drop(f);
        for (name, help, v) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} gauge");
            let _ = writeln!(out, "{name} {v}");
        }
        out
    }
}

fn label_text(labels: &[(&'static str, String)]) -> String {
    if labels.is_empty() {
        return String::new();
    }
    let inner: Vec<String> = labels
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
        .collect();
    format!("{{{}}}", inner.join(","))
}

/// Label values escape backslash, quote and newline.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        m.add(
            "ivr311_calls_total",
            "Calls by outcome.",
            &[("outcome", "ticket")],
            2,
        );
        m.add(
            "ivr311_calls_total",
            "Calls by outcome.",
            &[("outcome", "emergency")],
            1,
        );
        m.add(
            "ivr311_calls_total",
            "Calls by outcome.",
            &[("outcome", "ticket")],
            1,
        );
        m.add("ivr311_weird_total", "Escaping.", &[("menu", "a\"b\\c")], 1);
        assert_eq!(m.get("ivr311_calls_total", &[("outcome", "ticket")]), 3);
        let text = m.render(&[("ivr311_live_calls", "Calls in progress.", 4.0)]);
        assert!(text.contains("# TYPE ivr311_calls_total counter\n"));
        assert!(text.contains("ivr311_calls_total{outcome=\"ticket\"} 3\n"));
        assert!(text.contains("ivr311_calls_total{outcome=\"emergency\"} 1\n"));
        assert!(text.contains("ivr311_weird_total{menu=\"a\\\"b\\\\c\"} 1\n"));
        assert!(text.contains("# TYPE ivr311_live_calls gauge\nivr311_live_calls 4\n"));
    }
}
