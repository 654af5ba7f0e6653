//! Helpers for the tests of the HTTP server: a farm that serves HTTP, raw requests (and
//! connections held open), the metrics' text formats parsed, `promtool` found.

use super::*;
use serde_json::Value;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// A farm whose daemon serves HTTP on a free loopback port.
pub fn http_farm(max_connections: u64) -> Farm {
    let mut farm = Farm::new();
    farm.cfg.http.listen = Some("127.0.0.1:0".into());
    farm.cfg.http.max_connections = max_connections;
    farm
}

/// The address the daemon bound (it writes it beside its log).
pub fn http_addr(farm: &Farm) -> String {
    let p = farm.cfg.state_dir().join("http.addr");
    assert!(
        wait_for(Duration::from_secs(10), || p.exists()),
        "no http.addr"
    );
    std::fs::read_to_string(p).unwrap().trim().to_string()
}

pub struct Answer {
    pub status: u16,
    pub head: String,
    pub body: String,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }
}

/// Sends a raw request and reads the answer to its end (HTTP/1.0: no chunked bodies).
pub fn request(addr: &str, raw: &str) -> Answer {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(raw.as_bytes()).unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    Answer {
        status,
        head: head.to_string(),
        body: body.to_string(),
    }
}

/// GET from a server that may not listen yet: None while the connection is refused.
pub fn try_get(addr: &str, path: &str) -> Option<Answer> {
    TcpStream::connect(addr).ok()?;
    Some(get(addr, path))
}

pub fn get(addr: &str, path: &str) -> Answer {
    request(addr, &format!("GET {path} HTTP/1.0\r\nHost: test\r\n\r\n"))
}

/// GET with an `Accept` header.
pub fn get_accepting(addr: &str, path: &str, accept: &str) -> Answer {
    request(
        addr,
        &format!("GET {path} HTTP/1.0\r\nHost: test\r\nAccept: {accept}\r\n\r\n"),
    )
}

pub fn get_json(addr: &str, path: &str) -> Value {
    let a = get(addr, path);
    assert_eq!(a.status, 200, "{path}: {}", a.body);
    assert_eq!(
        a.header("content-type").as_deref(),
        Some("application/json")
    );
    serde_json::from_str(&a.body).unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {}", a.body))
}

pub fn bin_json(farm: &Farm, args: &[&str]) -> Value {
    let (code, out, err) = output(farm.bin().args(args));
    assert_eq!(code, 0, "{args:?}: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {out}"))
}

/// The job number of an image_id.
pub fn job_of(farm: &Farm, image_id: &str) -> u64 {
    bin_json(farm, &["show", image_id, "--json"])["job"]["id"]
        .as_u64()
        .unwrap()
}

/// What Prometheus 2.x sends as `Accept` when it scrapes.
pub const PROMETHEUS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

/// One sample of the text exposition.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: HashMap<String, String>,
    pub value: f64,
}

/// Parses the Prometheus text format (`openmetrics`: OpenMetrics, which ends with `# EOF`):
/// `# TYPE`/`# HELP`/`# UNIT` lines and samples `name{label="value",...} number`. Returns the
/// samples and the families' types; panics on any line it cannot read.
pub fn parse_metrics(text: &str, openmetrics: bool) -> (Vec<Sample>, HashMap<String, String>) {
    let mut samples = Vec::new();
    let mut types = HashMap::new();
    let mut lines: Vec<&str> = text.lines().collect();
    if openmetrics {
        assert_eq!(lines.last(), Some(&"# EOF"), "{text}");
        lines.pop();
    } else {
        assert!(!text.contains("# EOF"), "{text}");
    }
    for line in lines {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, ty) = rest.split_once(' ').expect("TYPE name type");
            types.insert(name.to_string(), ty.to_string());
            continue;
        }
        if line.starts_with("# HELP ") || line.starts_with("# UNIT ") {
            continue;
        }
        assert!(!line.starts_with('#'), "unknown comment line {line:?}");
        let (series, value) = line.rsplit_once(' ').expect("sample: series value");
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("not a number in {line:?}"));
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => (n, l.strip_suffix('}').expect("labels end with }")),
            None => (series, ""),
        };
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "{name}"
        );
        let mut map = HashMap::new();
        for pair in labels.split(',').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').expect("label k=v");
            let v = v
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .expect("quoted label value");
            map.insert(k.to_string(), v.to_string());
        }
        samples.push(Sample {
            name: name.to_string(),
            labels: map,
            value,
        });
    }
    (samples, types)
}

pub fn sample(samples: &[Sample], name: &str, label: Option<(&str, &str)>) -> f64 {
    samples
        .iter()
        .find(|s| {
            s.name == name
                && label.is_none_or(|(k, v)| s.labels.get(k).map(String::as_str) == Some(v))
        })
        .map(|s| s.value)
        .unwrap_or_else(|| panic!("no sample {name} {label:?}"))
}

/// The sum of the samples of `name` with the label `k="v"` (over its other labels).
pub fn total(samples: &[Sample], name: &str, (k, v): (&str, &str)) -> f64 {
    let found: Vec<f64> = samples
        .iter()
        .filter(|s| s.name == name && s.labels.get(k).map(String::as_str) == Some(v))
        .map(|s| s.value)
        .collect();
    assert!(!found.is_empty(), "no sample {name} {k}={v}");
    found.iter().sum()
}

/// `/metrics` in the classic text format (what a client that asks for nothing gets), parsed.
pub fn metrics(addr: &str) -> (Vec<Sample>, HashMap<String, String>) {
    // 503 while the daemon counts the log's jobs at a start
    assert!(wait_for(Duration::from_secs(30), || get(addr, "/metrics")
        .status
        == 200));
    let a = get(addr, "/metrics");
    assert_eq!(a.status, 200);
    assert_eq!(
        a.header("content-type").as_deref(),
        Some("text/plain; version=0.0.4; charset=utf-8"),
        "{}",
        a.head
    );
    parse_metrics(&a.body, false)
}

/// A connection that sent half a request head and holds it open.
pub fn half_sent(addr: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.write_all(b"GET / HTTP/1.1\r\nHost: test\r\nX-Slow: ")
        .unwrap();
    s
}

/// A live log stream of job `job` from stream position `from`, its answer head read: the
/// status and the connection (None when the answer is not a stream).
pub fn open_stream(addr: &str, job: u64, from: u64) -> (u16, Option<TcpStream>) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(s, "GET /jobs/{job}/log/stream?from={from} HTTP/1.0\r\n\r\n").unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => break,
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let stream = head
        .to_ascii_lowercase()
        .contains("content-type: text/event-stream")
        .then_some(s);
    (status, stream)
}

/// Reads a server-sent event stream until `done` says so (given everything read so far) or
/// `deadline`; returns what was read.
pub fn read_stream_until(
    s: &mut TcpStream,
    deadline: Instant,
    done: impl Fn(&str) -> bool,
) -> String {
    let mut text = String::new();
    let mut buf = vec![0u8; 1 << 16];
    while !done(&text) && Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => text.push_str(&String::from_utf8_lossy(&buf[..n])),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => continue,
            Err(e) => panic!("stream: {e}"),
        }
    }
    text
}

/// A tool of the host (promtool, prometheus), or None outside CI when it is not installed.
pub fn host_tool(name: &str) -> Option<PathBuf> {
    let found = build_image::health::find_on_path(std::path::Path::new(name));
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{name} is not installed (.ci/run installs it)"
        );
        eprintln!("SKIPPED: {name} is not installed");
    }
    found
}

/// Headless chromium, or None (outside CI) when it is not installed.
pub fn chromium() -> Option<PathBuf> {
    let found = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists());
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "chromium is not installed (.ci/run installs it)"
        );
        eprintln!("SKIPPED: chromium is not installed");
    }
    found
}

/// Runs headless chromium with `args` (a fresh profile each time).
pub fn run_chromium(bin: &std::path::Path, profile: &std::path::Path, args: &[String]) -> String {
    let mut cmd = std::process::Command::new(bin);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .args(args);
    let (code, out, err) = output(&mut cmd);
    assert_eq!(code, 0, "chromium {args:?}: {err}");
    out
}
