//! `submit`: drop workitem files, or build one from a kickstart, safely (tmp + rename); with
//! `--wait`, block until the answer is in the outbox and exit with the build's result.

use super::drop_file;
use crate::config::Config;
use crate::domain::text::{escape, escape_lines};
use anyhow::Context;
use clap::Args;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

#[derive(Args, Debug)]
pub struct SubmitArgs {
    /// Workitem JSON files (or use --kickstart and its companions).
    #[arg(required_unless_present = "kickstart", conflicts_with = "kickstart")]
    pub files: Vec<PathBuf>,
    /// Kickstart file to build a workitem from.
    #[arg(long, requires_all = ["name", "arch", "image_type"])]
    pub kickstart: Option<PathBuf>,
    /// Image name ($VERTICAL-$ARCH-$VARIANT).
    #[arg(long)]
    pub name: Option<String>,
    /// Architecture (i586, armv7hl, ...).
    #[arg(long)]
    pub arch: Option<String>,
    /// mic image type (fs, loop, raw, livecd, ...).
    #[arg(long = "type", id = "image_type")]
    pub image_type: Option<String>,
    /// image_id (default: generated from the name and the time).
    #[arg(long)]
    pub id: Option<String>,
    /// Release id: mic gets `--release=<R>` (a release tree, @BUILD_ID@ replaced).
    #[arg(long)]
    pub release: Option<String>,
    /// Directory layer under base_dir (default "requests").
    #[arg(long)]
    pub prefix: Option<String>,
    /// An option passed to mic verbatim (repeat for more).
    #[arg(long = "extra-opt", allow_hyphen_values = true)]
    pub extra_opts: Vec<String>,
    /// Wait for the answer and exit with the build's result.
    #[arg(long)]
    pub wait: bool,
    /// With --wait: give up after this many seconds (exit 3).
    #[arg(long)]
    pub timeout: Option<u64>,
}

/// A generated image_id: name, UTC time and a few random-ish hex digits.
fn generate_id(name: &str) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let stamp = humantime::format_rfc3339_seconds(SystemTime::now())
        .to_string()
        .replace(['-', ':', 'T', 'Z'], "");
    let salt = (now.subsec_nanos() ^ std::process::id().rotate_left(16)) & 0xffff;
    crate::domain::workitem::sanitise_id(&format!("{name}-{stamp}-{salt:04x}"))
}

/// The workitem `submit --kickstart` drops (bare fields, new API).
pub fn workitem_from(args: &SubmitArgs, kickstart: &str, id: &str) -> Value {
    let mut image = json!({
        "image_id": id,
        "kickstart": kickstart,
        "image_type": args.image_type,
        "name": args.name,
        "arch": args.arch,
    });
    if let Some(r) = &args.release {
        image["release"] = json!(r);
    }
    if let Some(p) = &args.prefix {
        image["prefix"] = json!(p);
    }
    if !args.extra_opts.is_empty() {
        image["extra_opts"] = json!(args.extra_opts);
    }
    json!({"image": image, "msg": []})
}

pub fn run(cfg: &Config, args: &SubmitArgs) -> anyhow::Result<i32> {
    let spool = &cfg.spool.dir;
    let mut dropped: Vec<String> = Vec::new();
    let mut code = 0;
    if let Some(ks_path) = &args.kickstart {
        let ks = std::fs::read_to_string(ks_path)
            .with_context(|| format!("cannot read kickstart {}", ks_path.display()))?;
        let name = args.name.clone().unwrap_or_default();
        let id = args.id.clone().unwrap_or_else(|| generate_id(&name));
        let wi = workitem_from(args, &ks, &id);
        // The workitem is made of the arguments: one it refuses is a bad argument (exit 2).
        crate::domain::workitem::normalise(&wi).map_err(|e| super::Usage(e.to_string()))?;
        let file = format!("{}.json", crate::domain::workitem::sanitise_id(&id));
        anyhow::ensure!(
            !spool.join("outbox").join(&file).exists(),
            "outbox/{file} exists already (an earlier job with this id): choose another --id"
        );
        let used = drop_named(spool, &file, &serde_json::to_vec_pretty(&wi)?)?;
        println!("{}", escape(&id));
        dropped.push(used);
    } else {
        for f in &args.files {
            let res = (|| -> anyhow::Result<String> {
                let bytes =
                    std::fs::read(f).with_context(|| format!("cannot read {}", f.display()))?;
                let v = crate::domain::workitem::parse_object(&bytes)
                    .with_context(|| format!("{} is not a workitem", f.display()))?;
                let id = crate::domain::workitem::raw_image_id(&v).unwrap_or_default();
                let name = f
                    .file_name()
                    .and_then(|n| n.to_str())
                    .filter(|n| !crate::edges::spool::ignored_name(n))
                    .with_context(|| {
                        format!("{}: not a usable file name for incoming/", f.display())
                    })?;
                let used = drop_named(spool, name, &bytes)?;
                dropped.push(used);
                Ok(id)
            })();
            match res {
                Ok(id) => println!("{}", escape(&id)),
                Err(e) => {
                    eprintln!("build-image: {}", escape(&super::describe(&e)));
                    code = 1;
                }
            }
        }
    }
    if !args.wait || code != 0 {
        return Ok(code);
    }
    let deadline = args
        .timeout
        .map(|s| Instant::now() + Duration::from_secs(s));
    for file in &dropped {
        match wait_answer(spool, file, deadline)? {
            Answer::Result(true) => {}
            Answer::Result(false) => code = code.max(1),
            Answer::Rejected(reason) => {
                eprintln!(
                    "build-image: {} was rejected: {}",
                    escape(file),
                    escape_lines(&reason)
                );
                code = code.max(1);
            }
            Answer::TimedOut => {
                eprintln!("build-image: no answer for {} in time", escape(file));
                return Ok(3);
            }
        }
    }
    Ok(code)
}

/// Drops `bytes` as `incoming/<name>`, or under a free numbered name when that one is taken (said
/// on stderr, so that stdout stays one image_id per line). Returns the name used.
fn drop_named(spool: &Path, name: &str, bytes: &[u8]) -> anyhow::Result<String> {
    let path = drop_file(spool, name, bytes)?;
    let used = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or(name)
        .to_string();
    if used != name {
        eprintln!(
            "incoming/{} was taken: dropped as incoming/{}",
            escape(name),
            escape(&used)
        );
    }
    Ok(used)
}

enum Answer {
    Result(bool),
    Rejected(String),
    TimedOut,
}

/// The result of an outbox answer: `image.result` (envelope or bare).
pub fn answer_result(v: &Value) -> bool {
    let f = v.get("fields").unwrap_or(v);
    f.get("image")
        .and_then(|i| i.get("result"))
        .or_else(|| f.get("result"))
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

fn wait_answer(spool: &Path, file: &str, deadline: Option<Instant>) -> anyhow::Result<Answer> {
    let out = spool.join("outbox").join(file);
    let reason = spool.join("rejected").join(format!("{file}.reason"));
    loop {
        if let Ok(bytes) = std::fs::read(&out)
            && let Ok(v) = serde_json::from_slice::<Value>(&bytes)
        {
            let ok = answer_result(&v);
            let f = v.get("fields").unwrap_or(&v);
            let img = f.get("image").unwrap_or(f);
            let field = |k: &str| escape_lines(img.get(k).and_then(Value::as_str).unwrap_or("-"));
            if ok {
                eprintln!("{}: built: {}", escape(file), field("image_url"));
            } else {
                eprintln!("{}: FAILED: {}", escape(file), field("error"));
            }
            return Ok(Answer::Result(ok));
        }
        if let Ok(r) = std::fs::read_to_string(&reason) {
            return Ok(Answer::Rejected(r.trim().to_string()));
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Ok(Answer::TimedOut);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
