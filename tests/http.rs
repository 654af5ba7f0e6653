//! The HTTP server (`[http] listen`) of a daemon run in-process, on real builds (the mic
//! fixture): pages and API read for content, `/api/jobs` compared with `status --json` run as
//! the binary, `/metrics` parsed, refusals (methods, traversal, sizes, slow and surplus
//! clients), the live log stream, and the pages rendered by headless chromium.

mod common;

use common::*;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(60);

/// A farm whose daemon serves HTTP on a free loopback port.
fn farm(max_connections: u64) -> Farm {
    let mut farm = Farm::new();
    farm.cfg.http.listen = Some("127.0.0.1:0".into());
    farm.cfg.http.max_connections = max_connections;
    farm
}

/// The address the daemon bound (it writes it beside its log).
fn http_addr(farm: &Farm) -> String {
    let p = farm.cfg.state_dir().join("http.addr");
    assert!(
        wait_for(Duration::from_secs(10), || p.exists()),
        "no http.addr"
    );
    std::fs::read_to_string(p).unwrap().trim().to_string()
}

struct Answer {
    status: u16,
    head: String,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }
}

/// Sends a raw request and reads the answer to its end (HTTP/1.0: no chunked bodies).
fn request(addr: &str, raw: &str) -> Answer {
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

fn get(addr: &str, path: &str) -> Answer {
    request(addr, &format!("GET {path} HTTP/1.0\r\nHost: test\r\n\r\n"))
}

fn get_json(addr: &str, path: &str) -> Value {
    let a = get(addr, path);
    assert_eq!(a.status, 200, "{path}: {}", a.body);
    assert_eq!(
        a.header("content-type").as_deref(),
        Some("application/json")
    );
    serde_json::from_str(&a.body).unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {}", a.body))
}

fn bin_json(farm: &Farm, args: &[&str]) -> Value {
    let (code, out, err) = output(farm.bin().args(args));
    assert_eq!(code, 0, "{args:?}: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {out}"))
}

/// One sample of the text exposition.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: HashMap<String, String>,
    value: f64,
}

/// Parses the Prometheus / OpenMetrics text format: `# TYPE`/`# HELP`/`# UNIT` lines, samples
/// `name{label="value",...} number`, and `# EOF` last. Returns the samples and the families'
/// types; panics on any line it cannot read.
fn parse_metrics(text: &str) -> (Vec<Sample>, HashMap<String, String>) {
    let mut samples = Vec::new();
    let mut types = HashMap::new();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.last(), Some(&"# EOF"), "{text}");
    for line in &lines[..lines.len() - 1] {
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

fn sample(samples: &[Sample], name: &str, label: Option<(&str, &str)>) -> f64 {
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
fn total(samples: &[Sample], name: &str, (k, v): (&str, &str)) -> f64 {
    let found: Vec<f64> = samples
        .iter()
        .filter(|s| s.name == name && s.labels.get(k).map(String::as_str) == Some(v))
        .map(|s| s.value)
        .collect();
    assert!(!found.is_empty(), "no sample {name} {k}={v}");
    found.iter().sum()
}

fn metrics(addr: &str) -> (Vec<Sample>, HashMap<String, String>) {
    // 503 while the daemon counts the log's jobs at a start
    assert!(wait_for(Duration::from_secs(30), || get(addr, "/metrics")
        .status
        == 200));
    let a = get(addr, "/metrics");
    assert_eq!(a.status, 200);
    assert!(
        a.header("content-type")
            .is_some_and(|c| c.starts_with("application/openmetrics-text")),
        "{}",
        a.head
    );
    parse_metrics(&a.body)
}

/// The job number of an image_id.
fn job_of(farm: &Farm, image_id: &str) -> u64 {
    bin_json(farm, &["show", image_id, "--json"])["job"]["id"]
        .as_u64()
        .unwrap()
}

#[test]
fn pages_api_and_metrics() {
    init_log();
    let farm = farm(32);
    let d = farm.start();
    let addr = http_addr(&farm);
    farm.drop_json("a.json", &workitem("web-a", "ks\n"));
    farm.drop_json("b.json", &workitem("web-b", "# mic-fixture: fail 4\n"));
    let mut xss = workitem("web-x", "ks\n");
    xss["image"]["name"] = json!("<script>alert(1)");
    farm.drop_json("x.json", &xss);
    for f in ["a.json", "b.json", "x.json"] {
        farm.wait_outbox(f, T);
    }
    farm.wait_pushed_events(6);

    // The status page: every job, states, the name escaped.
    let page = get(&addr, "/");
    assert_eq!(page.status, 200);
    assert_eq!(
        page.header("content-type").as_deref(),
        Some("text/html; charset=utf-8")
    );
    assert!(page.header("content-security-policy").is_some());
    for id in ["web-a", "web-b", "web-x"] {
        assert!(page.body.contains(id), "{id} missing from /");
    }
    assert!(page.body.contains("badge s-done") && page.body.contains("badge s-error"));
    assert!(
        page.body.contains("&lt;script&gt;alert(1)"),
        "the name is shown, escaped"
    );
    assert!(!page.body.contains("<script>alert"), "never as markup");
    let a = job_of(&farm, "web-a");
    let b = job_of(&farm, "web-b");
    assert!(page.body.contains(&format!("href=\"/jobs/{a}/log\"")));
    assert!(
        page.body.contains("http://img.test/images/requests/web-a"),
        "files link"
    );
    // newest first
    let pos = |s: &str| page.body.find(&format!("data-job=\"{s}\"")).unwrap();
    assert!(pos(&b.to_string()) < pos(&a.to_string()));

    let errors = get(&addr, "/?state=error");
    assert_eq!(errors.status, 200);
    assert!(errors.body.contains("web-b") && !errors.body.contains("web-a"));
    let one = get(&addr, "/?limit=1");
    assert_eq!(one.body.matches("<tr data-job=").count(), 1);
    assert!(one.body.contains("older jobs"), "a link to the next page");
    assert_eq!(get(&addr, "/?state=bogus").status, 400);
    assert_eq!(get(&addr, "/?limit=x").status, 400);

    // A job's page: the timeline, the answer, the log's tail; by number and by image_id.
    for path in [format!("/jobs/{a}"), "/jobs/web-a".to_string()] {
        let jp = get(&addr, &path);
        assert_eq!(jp.status, 200, "{path}");
        for kind in [
            "claimed",
            "queued",
            "started",
            "finished",
            "delivered",
            "pushed",
        ] {
            assert!(
                jp.body.contains(&format!("data-kind=\"{kind}\"")),
                "{path}: {kind}"
            );
        }
        assert!(jp.body.contains("image.files_url"), "answer fields");
        assert!(jp.body.contains("mic-fixture argc:"), "log tail");
        assert!(
            !jp.body.contains("/live.js"),
            "a finished job is not streamed"
        );
    }
    let xp = get(&addr, "/jobs/web-x");
    assert!(xp.body.contains("&lt;script&gt;alert(1)") && !xp.body.contains("<script>alert"));
    let log = get(&addr, &format!("/jobs/{b}/log"));
    assert_eq!(log.status, 200);
    assert!(log.body.contains("mic-fixture: fail 4"), "{}", log.body);
    assert_eq!(get(&addr, "/jobs/999999").status, 404);
    assert_eq!(get(&addr, "/api/jobs/no-such-job").status, 404);

    // The API is the operator commands' JSON.
    assert_eq!(
        get_json(&addr, "/api/jobs"),
        bin_json(&farm, &["status", "--json"])
    );
    assert_eq!(
        get_json(&addr, "/api/jobs?state=done&limit=1"),
        bin_json(
            &farm,
            &["status", "--json", "--state", "done", "--limit", "1"]
        )
    );
    for id in ["web-a", "web-b", &a.to_string()] {
        assert_eq!(
            get_json(&addr, &format!("/api/jobs/{id}")),
            bin_json(&farm, &["show", id, "--json"]),
            "{id}"
        );
    }
    assert_eq!(get(&addr, "/api/jobs?state=nope").status, 400);

    // Metrics: counted from the events of these builds.
    let (s, types) = metrics(&addr);
    assert_eq!(types["build_image_jobs"], "gauge");
    assert_eq!(types["build_image_builds"], "counter");
    assert_eq!(types["build_image_build_duration_seconds"], "histogram");
    assert_eq!(types["build_image_push_failures"], "counter");
    assert_eq!(types["build_image_oldest_queued_age_seconds"], "gauge");
    assert_eq!(types["build_image_last_event_seq"], "gauge");
    assert_eq!(sample(&s, "build_image_jobs", Some(("state", "done"))), 2.0);
    assert_eq!(
        sample(&s, "build_image_jobs", Some(("state", "error"))),
        1.0
    );
    assert_eq!(
        sample(&s, "build_image_jobs", Some(("state", "queued"))),
        0.0
    );
    assert_eq!(
        total(&s, "build_image_builds_total", ("result", "success")),
        2.0
    );
    assert_eq!(
        total(&s, "build_image_builds_total", ("result", "failure")),
        1.0
    );
    assert_eq!(
        sample(&s, "build_image_build_duration_seconds_count", None),
        3.0
    );
    assert_eq!(
        sample(
            &s,
            "build_image_build_duration_seconds_bucket",
            Some(("le", "+Inf"))
        ),
        3.0
    );
    assert_eq!(sample(&s, "build_image_push_failures_total", None), 0.0);
    assert_eq!(
        sample(&s, "build_image_oldest_queued_age_seconds", None),
        0.0
    );
    assert_eq!(sample(&s, "build_image_log_writable", None), 1.0);
    let (_, events, _) = output(farm.bin().args(["events", "--json"]));
    let last: Value = serde_json::from_str(events.lines().last().unwrap()).unwrap();
    assert_eq!(
        sample(&s, "build_image_last_event_seq", None),
        last["seq"].as_f64().unwrap()
    );
    let h = get(&addr, "/healthz");
    assert_eq!((h.status, h.body.as_str()), (200, "ok\n"));
    let js = get(&addr, "/live.js");
    assert_eq!(js.status, 200);
    assert!(js.body.contains("EventSource"));

    // Refused: other methods, traversal, ids of another syntax, oversize heads.
    for m in ["POST", "PUT", "DELETE", "PATCH"] {
        let r = request(
            &addr,
            &format!("{m} /api/jobs HTTP/1.0\r\nContent-Length: 0\r\n\r\n"),
        );
        assert_eq!(r.status, 405, "{m}");
        assert_eq!(r.header("allow").as_deref(), Some("GET, HEAD"));
    }
    for p in [
        "/jobs/../../etc/passwd",
        "/jobs/..%2F..%2Fetc%2Fpasswd",
        "/jobs/%2e%2e/log",
        "/api/jobs/..",
        "/jobs/a%2Fb/log",
        "/jobs/%3Cscript%3E",
    ] {
        let r = get(&addr, p);
        assert_eq!(r.status, 400, "{p}: {}", r.body);
        assert!(!r.body.contains("root:"), "{p}");
    }
    let big = format!(
        "GET / HTTP/1.0\r\nX-Fill: {}\r\n\r\n",
        "x".repeat(build_image::http::MAX_HEAD * 2)
    );
    assert_eq!(request(&addr, &big).status, 431);
    let head = request(&addr, "HEAD / HTTP/1.0\r\n\r\n");
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty(), "HEAD has no body");

    // Nothing the server did changed the log.
    let (_, events_after, _) = output(farm.bin().args(["events", "--json"]));
    assert_eq!(events, events_after);
    d.stop().unwrap();

    // A restart counts the jobs and builds again from the log.
    assert!(
        !farm.cfg.state_dir().join("http.addr").exists(),
        "a stopped daemon leaves no address behind"
    );
    let d = farm.start();
    let addr2 = http_addr(&farm);
    let (s, _) = metrics(&addr2);
    assert_eq!(sample(&s, "build_image_jobs", Some(("state", "done"))), 2.0);
    assert_eq!(
        sample(&s, "build_image_jobs", Some(("state", "error"))),
        1.0
    );
    assert_eq!(
        total(&s, "build_image_builds_total", ("result", "success")),
        2.0
    );
    assert_eq!(
        total(&s, "build_image_builds_total", ("result", "failure")),
        1.0
    );
    assert_eq!(
        sample(&s, "build_image_build_duration_seconds_count", None),
        3.0
    );
    d.stop().unwrap();
}

#[test]
fn bounded_connections_and_slow_clients() {
    init_log();
    let farm = farm(3);
    let d = farm.start();
    let addr = http_addr(&farm);
    // Three clients that send nothing hold every slot: a fourth is answered 503 at once.
    let idle: Vec<TcpStream> = (0..3).map(|_| TcpStream::connect(&addr).unwrap()).collect();
    assert!(wait_for(Duration::from_secs(5), || get(&addr, "/healthz")
        .status
        == 503));
    let busy = get(&addr, "/healthz");
    assert_eq!(busy.header("retry-after").as_deref(), Some("1"));
    // A slow client is cut off after HEAD_TIMEOUT; its slot is free again.
    let started = Instant::now();
    let mut first = idle.into_iter().next().unwrap();
    first
        .set_read_timeout(Some(build_image::http::HEAD_TIMEOUT * 3))
        .unwrap();
    let mut buf = [0u8; 64];
    let n = first.read(&mut buf).unwrap_or(0);
    let waited = started.elapsed();
    assert!(
        waited < build_image::http::HEAD_TIMEOUT * 2,
        "a silent client was kept {waited:?}"
    );
    let _ = n; // hyper may answer 408 or just close: either way the connection ends
    assert!(wait_for(Duration::from_secs(20), || get(&addr, "/healthz")
        .status
        == 200));
    d.stop().unwrap();
}

#[test]
fn the_log_of_a_running_build_is_streamed() {
    init_log();
    let farm = farm(32);
    let d = farm.start();
    let addr = http_addr(&farm);
    farm.drop_json("s.json", &workitem("web-s", "# mic-fixture: sleep 3\n"));
    farm.wait_mic_running("web-s");
    let job = job_of(&farm, "web-s");
    let page = get(&addr, &format!("/jobs/{job}"));
    assert!(page.body.contains("badge s-building"));
    assert!(
        page.body.contains("/live.js"),
        "a building job's page streams its log"
    );
    assert!(
        page.body
            .contains(&format!("data-stream=\"/jobs/{job}/log/stream\""))
    );
    assert!(
        page.body.contains("mic-fixture: sleeping"),
        "the tail so far is in the page"
    );

    // The stream from the start: the lines so far, then the rest, then its end.
    let mut s = TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(s, "GET /jobs/{job}/log/stream?from=0 HTTP/1.0\r\n\r\n").unwrap();
    let mut text = String::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + T;
    while !text.contains("event: end") && Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => text.push_str(&String::from_utf8_lossy(&buf[..n])),
            Err(e) => panic!("stream: {e}; so far {text}"),
        }
    }
    assert!(text.contains("content-type: text/event-stream"), "{text}");
    assert!(text.contains("data: mic-fixture: sleeping 3 s"), "{text}");
    assert!(
        text.contains("data: Info: Finished."),
        "output after the page was made: {text}"
    );
    assert!(text.contains("event: end"), "{text}");
    let ids: Vec<u64> = text
        .lines()
        .filter_map(|l| l.strip_prefix("id: "))
        .map(|v| v.parse().unwrap())
        .collect();
    assert!(
        ids.windows(2).all(|w| w[0] <= w[1]),
        "offsets grow: {ids:?}"
    );
    let log_len = std::fs::metadata(farm.base().join("requests/web-s/img-web-s.log"))
        .unwrap()
        .len();
    assert_eq!(
        ids.last().copied(),
        Some(log_len),
        "the stream ends at the log's end"
    );

    // Resuming where a browser left off (Last-Event-ID) sends only what came after.
    let r = request(
        &addr,
        &format!("GET /jobs/{job}/log/stream HTTP/1.0\r\nLast-Event-ID: {log_len}\r\n\r\n"),
    );
    assert!(!r.body.contains("data: mic-fixture"), "{}", r.body);
    assert!(r.body.contains("event: end"));
    d.stop().unwrap();
}

/// Headless chromium, or None (outside CI) when it is not installed.
fn chromium() -> Option<PathBuf> {
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
fn run_chromium(bin: &Path, profile: &Path, args: &[String]) -> String {
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

/// Jobs in every interesting state for the browser: done, error, escaped name, building.
fn browser_farm() -> (Farm, Daemon, String) {
    let mut farm = farm(32);
    // the long build below must outlast every chromium run of the test (each can take 30 s on a
    // loaded machine): it is cancelled at the end
    farm.cfg.worker.timeout = 900;
    let d = farm.start();
    let addr = http_addr(&farm);
    let mut a = workitem("mer-core-i586-1201", "ks\n");
    a["image"]["name"] = json!("mer-core-i586-sdk");
    a["image"]["image_type"] = json!("fs");
    farm.drop_json("a.json", &a);
    let mut b = workitem("nemo-armv7hl-88", "# mic-fixture: fail 4\n");
    b["image"]["name"] = json!("nemo-armv7hl-handset");
    b["image"]["arch"] = json!("armv7hl");
    b["image"]["image_type"] = json!("raw");
    farm.drop_json("b.json", &b);
    let mut x = workitem("xss-3", "ks\n");
    x["image"]["name"] = json!("<script>alert(1)");
    farm.drop_json("x.json", &x);
    for f in ["a.json", "b.json", "x.json"] {
        farm.wait_outbox(f, T);
    }
    let mut s = workitem(
        "mer-core-x86_64-1202",
        "# mic-fixture: spew 6\n# mic-fixture: sleep 600\n",
    );
    s["image"]["name"] = json!("mer-core-x86_64-live");
    s["image"]["arch"] = json!("x86_64");
    s["image"]["image_type"] = json!("livecd");
    farm.drop_json("s.json", &s);
    let log = farm
        .base()
        .join("requests/mer-core-x86_64-1202/mer-core-x86_64-live.log");
    assert!(wait_for(T, || std::fs::read_to_string(&log)
        .is_ok_and(|l| l.contains("mic-fixture: sleeping"))));
    (farm, d, addr)
}

#[test]
fn pages_render_in_chromium() {
    init_log();
    let Some(bin) = chromium() else { return };
    let (farm, d, addr) = browser_farm();
    let tmp = tempfile::tempdir().unwrap();

    let dom = run_chromium(
        &bin,
        &tmp.path().join("p1"),
        &["--dump-dom".into(), format!("http://{addr}/")],
    );
    assert!(dom.contains("<table id=\"jobs\""), "{dom}");
    assert_eq!(dom.matches("<tr data-job=").count(), 4, "{dom}");
    for (id, state) in [
        ("mer-core-i586-1201", "done"),
        ("nemo-armv7hl-88", "error"),
        ("mer-core-x86_64-1202", "building"),
    ] {
        assert!(dom.contains(id), "{id}");
        assert!(dom.contains(&format!("badge s-{state}")), "{state}");
    }
    assert!(dom.contains("&lt;script&gt;alert(1)"), "rendered as text");
    assert!(!dom.contains("<script>alert"), "never run");

    // A running build's page streams its log; at the stream's end (the build is over) the
    // script reloads the page, which then shows the answer. (Chromium's virtual time runs
    // until the page is quiet: that is after the stream ended.)
    farm.drop_json("l.json", &workitem("live-1", "# mic-fixture: sleep 3\n"));
    farm.wait_mic_running("live-1");
    let job = job_of(&farm, "live-1");
    let page = get(&addr, &format!("/jobs/{job}"));
    assert!(page.body.contains("badge s-building") && page.body.contains("/live.js"));
    let dom = run_chromium(
        &bin,
        &tmp.path().join("p2"),
        &[
            "--virtual-time-budget=30000".into(),
            "--dump-dom".into(),
            format!("http://{addr}/jobs/{job}"),
        ],
    );
    assert!(
        dom.contains("badge s-done"),
        "reloaded after the stream's end: {dom}"
    );
    assert!(dom.contains("data-kind=\"finished\""), "timeline");
    assert!(dom.contains("Info: Finished."), "the whole log");
    assert!(!dom.contains("/live.js"), "a finished job is not streamed");

    // A finished job's page.
    let a = job_of(&farm, "nemo-armv7hl-88");
    let dom = run_chromium(
        &bin,
        &tmp.path().join("p3"),
        &["--dump-dom".into(), format!("http://{addr}/jobs/{a}")],
    );
    assert!(
        dom.contains("badge s-error") && dom.contains("mic-fixture: fail 4"),
        "{dom}"
    );
    assert!(dom.contains("__error__"), "answer fields: {dom}");
    let (code, _, err) = output(farm.bin().args(["cancel", "mer-core-x86_64-1202"]));
    assert_eq!(code, 0, "{err}");
    d.stop().unwrap();
}

/// Makes docs/status-page.png and docs/job-page.png:
/// `cargo test --test http -- --ignored screenshots`.
#[test]
#[ignore]
fn screenshots() {
    init_log();
    let Some(bin) = chromium() else { return };
    let (farm, d, addr) = browser_farm();
    let tmp = tempfile::tempdir().unwrap();
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs");
    let job = job_of(&farm, "mer-core-x86_64-1202");
    for (name, url, size) in [
        ("status-page.png", format!("http://{addr}/"), "1280,540"),
        (
            "job-page.png",
            format!("http://{addr}/jobs/{job}"),
            "1280,1000",
        ),
    ] {
        let out = docs.join(name);
        run_chromium(
            &bin,
            &tmp.path().join(name),
            &[
                format!("--screenshot={}", out.display()),
                format!("--window-size={size}"),
                url,
            ],
        );
        assert!(out.metadata().unwrap().len() > 10_000, "{name}");
    }
    let _ = output(farm.bin().args(["cancel", "mer-core-x86_64-1202"]));
    d.stop().unwrap();
}

#[test]
fn off_by_default_and_a_taken_port_is_a_clear_error() {
    init_log();
    // Without [http] nothing listens.
    let farm = Farm::new();
    assert_eq!(farm.cfg.http.listen, None);
    let d = farm.start();
    farm.drop_json("a.json", &workitem("off-a", "ks\n"));
    farm.wait_outbox("a.json", T);
    assert!(!farm.cfg.state_dir().join("http.addr").exists());
    d.stop().unwrap();

    // A port another process holds: the daemon does not start, and says why.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut farm = Farm::new();
    farm.cfg.http.listen = Some(taken.local_addr().unwrap().to_string());
    let (tx, rx) = crossbeam_channel::bounded(1);
    let err = build_image::daemon::run(farm.cfg.clone(), rx).unwrap_err();
    drop(tx);
    let msg = format!("{err:#}");
    assert!(msg.contains("cannot serve HTTP on 127.0.0.1:"), "{msg}");
    // Refused before anything was started: no log was even opened.
    assert!(!farm.cfg.state_dir().join("db").exists());
}
