//! The text formats `/metrics` is served in, from one description of its families
//! ([`Family`]): Prometheus' classic text format (version 0.0.4) and OpenMetrics 1.0.0, and the
//! choice between them by the scraper's `Accept` header ([`Format::negotiate`]).
//!
//! Invariants:
//! - Both formats say the same samples with the same values; they differ only where the
//!   formats do: a counter's `# HELP`/`# TYPE` name (`x_total` in the classic format, `x` in
//!   OpenMetrics), and OpenMetrics' closing `# EOF`.
//! - OpenMetrics only to a scraper that asks for it (and prefers it to the classic format);
//!   everyone else (no `Accept`, `*/*`, `text/plain`) gets the classic format.
//! - Every family is written in full (its help, its type, its series in the order given), so
//!   the output is the same for the same numbers.

use std::fmt::Write as _;

/// A metric family.
#[derive(Debug, Clone, PartialEq)]
pub struct Family {
    /// Its name, without the `_total` a counter's samples carry.
    pub name: &'static str,
    pub help: &'static str,
    pub data: Data,
}

/// A label set: (name, value) pairs.
pub type Labels = Vec<(&'static str, String)>;

/// The samples of a family, by its type.
#[derive(Debug, Clone, PartialEq)]
pub enum Data {
    Counter(Vec<(Labels, u64)>),
    Gauge(Vec<(Labels, Number)>),
    /// Upper bounds with the count of observations at or below each (cumulative, without
    /// `+Inf`: the count is), the sum and the count.
    Histogram {
        buckets: Vec<(f64, u64)>,
        sum: f64,
        count: u64,
    },
}

/// A gauge's value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Number {
    Int(i64),
    Float(f64),
}

/// A text format of the exposition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Prometheus' text format, version 0.0.4.
    Classic,
    /// OpenMetrics 1.0.0.
    OpenMetrics,
}

impl Format {
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Classic => "text/plain; version=0.0.4; charset=utf-8",
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }

    /// The format an `Accept` header asks for: OpenMetrics when the header names it and
    /// gives it a quality above 0 and at least that of the classic format, else the classic
    /// format (also for no header, `*/*`, or a header naming neither).
    pub fn negotiate(accept: Option<&str>) -> Format {
        let Some(accept) = accept else {
            return Format::Classic;
        };
        if !accept
            .to_ascii_lowercase()
            .contains("application/openmetrics-text")
        {
            return Format::Classic;
        }
        let om = quality(
            accept,
            "application",
            "openmetrics-text",
            &["1.0.0", "0.0.1"],
        );
        let classic = quality(accept, "text", "plain", &["0.0.4"]).unwrap_or(0.0);
        match om {
            Some(q) if q > 0.0 && q >= classic => Format::OpenMetrics,
            _ => Format::Classic,
        }
    }
}

/// The quality the `Accept` header gives `kind/sub` (with a `version` parameter, if any, one
/// of `versions`): that of its most specific matching range (RFC 9110: `kind/sub;version=V`,
/// then `kind/sub`, then `kind/*`, then `*/*`). None when no range matches.
fn quality(accept: &str, kind: &str, sub: &str, versions: &[&str]) -> Option<f64> {
    let mut best: Option<(u8, f64)> = None;
    for range in accept.split(',') {
        let mut parts = range.split(';');
        let media = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        let (mut q, mut version) = (1.0f64, None);
        for p in parts {
            let Some((k, v)) = p.split_once('=') else {
                continue;
            };
            let v = v.trim().trim_matches('"');
            match k.trim().to_ascii_lowercase().as_str() {
                "q" => {
                    q = v
                        .parse::<f64>()
                        .ok()
                        .filter(|q| (0.0..=1.0).contains(q))
                        .unwrap_or(0.0)
                }
                "version" => version = Some(v.to_string()),
                _ => {}
            }
        }
        let Some((t, s)) = media.split_once('/') else {
            continue;
        };
        let specificity = if t == kind && s == sub {
            match &version {
                Some(v) if versions.contains(&v.as_str()) => 3,
                Some(_) => continue, // another version of this type: not what is served
                None => 2,
            }
        } else if t == kind && s == "*" {
            1
        } else if t == "*" && s == "*" {
            0
        } else {
            continue;
        };
        if best.is_none_or(|(sp, bq)| specificity > sp || (specificity == sp && q > bq)) {
            best = Some((specificity, q));
        }
    }
    best.map(|(_, q)| q)
}

/// The exposition of `families` in `format`.
pub fn encode(families: &[Family], format: Format) -> String {
    let mut out = String::with_capacity(4096);
    for f in families {
        let (kind, head_name) = match (&f.data, format) {
            (Data::Counter(_), Format::Classic) => ("counter", format!("{}_total", f.name)),
            (Data::Counter(_), Format::OpenMetrics) => ("counter", f.name.to_string()),
            (Data::Gauge(_), _) => ("gauge", f.name.to_string()),
            (Data::Histogram { .. }, _) => ("histogram", f.name.to_string()),
        };
        // Writing into a String cannot fail.
        let _ = writeln!(out, "# HELP {head_name} {}", escape_help(f.help, format));
        let _ = writeln!(out, "# TYPE {head_name} {kind}");
        match &f.data {
            Data::Counter(series) => {
                for (labels, v) in series {
                    sample(
                        &mut out,
                        &format!("{}_total", f.name),
                        labels,
                        &v.to_string(),
                    );
                }
            }
            Data::Gauge(series) => {
                for (labels, v) in series {
                    let v = match v {
                        Number::Int(i) => i.to_string(),
                        Number::Float(x) => float(*x),
                    };
                    sample(&mut out, f.name, labels, &v);
                }
            }
            Data::Histogram {
                buckets,
                sum,
                count,
            } => {
                let bucket = format!("{}_bucket", f.name);
                for (le, n) in buckets {
                    sample(&mut out, &bucket, &vec![("le", float(*le))], &n.to_string());
                }
                sample(
                    &mut out,
                    &bucket,
                    &vec![("le", "+Inf".into())],
                    &count.to_string(),
                );
                sample(&mut out, &format!("{}_sum", f.name), &vec![], &float(*sum));
                sample(
                    &mut out,
                    &format!("{}_count", f.name),
                    &vec![],
                    &count.to_string(),
                );
            }
        }
    }
    if format == Format::OpenMetrics {
        out.push_str("# EOF\n");
    }
    out
}

fn sample(out: &mut String, name: &str, labels: &Labels, value: &str) {
    out.push_str(name);
    if !labels.is_empty() {
        out.push('{');
        for (i, (k, v)) in labels.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let _ = write!(out, "{k}=\"{}\"", escape_label(v));
        }
        out.push('}');
    }
    out.push(' ');
    out.push_str(value);
    out.push('\n');
}

/// A float as both formats write it: `90.0`, `+Inf`, `-Inf`, `NaN`.
fn float(x: f64) -> String {
    if x.is_nan() {
        "NaN".into()
    } else if x.is_infinite() {
        if x > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        format!("{x:?}")
    }
}

fn escape_help(s: &str, format: Format) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '"' if format == Format::OpenMetrics => out.push_str("\\\""),
            c => out.push(c),
        }
    }
    out
}

fn escape_label(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '"' => out.push_str("\\\""),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn families() -> Vec<Family> {
        vec![
            Family {
                name: "x_builds",
                help: "Builds \"ended\", by result\\kind",
                data: Data::Counter(vec![
                    (vec![("result", "success".into())], 2),
                    (vec![("result", "fail\"ure\n".into())], 1),
                ]),
            },
            Family {
                name: "x_age_seconds",
                help: "Age",
                data: Data::Gauge(vec![(vec![], Number::Float(1.5))]),
            },
            Family {
                name: "x_duration_seconds",
                help: "Durations",
                data: Data::Histogram {
                    buckets: vec![(10.0, 1), (60.0, 3)],
                    sum: 90.0,
                    count: 4,
                },
            },
        ]
    }

    #[test]
    fn the_two_formats() {
        assert_eq!(
            encode(&families(), Format::Classic),
            "# HELP x_builds_total Builds \"ended\", by result\\\\kind\n\
             # TYPE x_builds_total counter\n\
             x_builds_total{result=\"success\"} 2\n\
             x_builds_total{result=\"fail\\\"ure\\n\"} 1\n\
             # HELP x_age_seconds Age\n\
             # TYPE x_age_seconds gauge\n\
             x_age_seconds 1.5\n\
             # HELP x_duration_seconds Durations\n\
             # TYPE x_duration_seconds histogram\n\
             x_duration_seconds_bucket{le=\"10.0\"} 1\n\
             x_duration_seconds_bucket{le=\"60.0\"} 3\n\
             x_duration_seconds_bucket{le=\"+Inf\"} 4\n\
             x_duration_seconds_sum 90.0\n\
             x_duration_seconds_count 4\n"
        );
        let om = encode(&families(), Format::OpenMetrics);
        assert!(om.starts_with(
            "# HELP x_builds Builds \\\"ended\\\", by result\\\\kind\n# TYPE x_builds counter\nx_builds_total{result=\"success\"} 2\n"
        ));
        assert!(om.ends_with("x_duration_seconds_count 4\n# EOF\n"), "{om}");
    }

    #[test]
    fn negotiation() {
        use Format::*;
        for (accept, want) in [
            (None, Classic),
            (Some("*/*"), Classic),
            (Some("text/plain"), Classic),
            (Some("text/plain; version=0.0.4"), Classic),
            (Some("text/plain;version=0.0.4;q=1,*/*;q=0.1"), Classic),
            (Some("application/openmetrics-text"), OpenMetrics),
            (
                Some("application/openmetrics-text; version=1.0.0; charset=utf-8"),
                OpenMetrics,
            ),
            // What Prometheus 2.x sends.
            (
                Some(
                    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
                ),
                OpenMetrics,
            ),
            (
                Some("application/openmetrics-text;q=0.2,text/plain;version=0.0.4;q=0.9"),
                Classic,
            ),
            (Some("application/openmetrics-text;q=0"), Classic),
            (Some("application/openmetrics-text;version=9.9"), Classic),
            (Some("application/json"), Classic),
            (Some("garbage;;;,=,"), Classic),
        ] {
            assert_eq!(Format::negotiate(accept), want, "{accept:?}");
        }
    }
}
