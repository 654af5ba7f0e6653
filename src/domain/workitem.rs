//! Workitems: the JSON upstream tools drop, normalised into a typed [`Spec`], and the reply built
//! from the input plus the documented OUT fields.
//!
//! Invariant: the reply is the input with only `fields.image.{result,files_url,image_url,
//! image_sha256,provenance_url,logfile_url,error}`, `fields.result`, `fields.msg` and `fields.__error__` changed, added or
//! removed (each written from the job's own outcome, none carried from the input; `msg` gets one
//! line appended); every other key, and the envelope/bare and new/old API form, is kept as given.

use super::text;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// A workitem file that parsed as JSON but cannot be answered as a workitem is rejected;
/// one that is a workitem but fails validation is answered with an error.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum WorkitemError {
    #[error("not a workitem: {0}")]
    NotAWorkitem(String),
    #[error("{0}")]
    Invalid(String),
}

/// The normalised job, as recorded in the `queued` event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Spec {
    /// image_id as given.
    pub image_id: String,
    /// image_id stripped to `[A-Za-z0-9_-]`: the job directory's name.
    pub dir_id: String,
    /// Not stored in the log's `queued` event (the input workitem there holds it): see
    /// [`Spec::with_kickstart_from`].
    #[serde(default, skip_serializing)]
    pub kickstart: String,
    pub image_type: String,
    pub name: String,
    pub arch: String,
    pub prefix: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenmap: Option<String>,
    #[serde(default)]
    pub extra_opts: Vec<String>,
}

impl Spec {
    /// A spec read back from the log gets its kickstart from the input it was made from: moved
    /// out of it (the input is dropped after), not copied.
    pub fn with_kickstart_taken(mut self, mut input: Value) -> Spec {
        if self.kickstart.is_empty() {
            let obj = match input.as_object_mut() {
                Some(o) if matches!(o.get("fields"), Some(Value::Object(_))) => {
                    o.get_mut("fields").and_then(Value::as_object_mut)
                }
                other => other,
            };
            let img = obj.and_then(|f| {
                if matches!(f.get("image"), Some(Value::Object(_))) {
                    f.get_mut("image").and_then(Value::as_object_mut)
                } else {
                    Some(f)
                }
            });
            if let Some(Value::String(ks)) = img.and_then(|i| i.get_mut("kickstart")) {
                self.kickstart = std::mem::take(ks);
            }
        }
        self
    }
}

#[cfg(test)]
impl Spec {
    /// A valid spec for unit tests: image_id 7-1 under `requests`, kickstart "ks", i586.
    pub(crate) fn sample(name: &str, image_type: &str) -> Spec {
        Spec {
            image_id: "7-1".into(),
            dir_id: "7-1".into(),
            kickstart: "ks".into(),
            image_type: image_type.into(),
            name: name.into(),
            arch: "i586".into(),
            prefix: DEFAULT_PREFIX.into(),
            release: None,
            tokenmap: None,
            extra_opts: vec![],
        }
    }
}

pub const DEFAULT_PREFIX: &str = "requests";
const KNOWN_IN: [&str; 9] = [
    "image_id",
    "kickstart",
    "image_type",
    "name",
    "arch",
    "prefix",
    "release",
    "extra_opts",
    "tokenmap",
];

/// Parses the bytes of a dropped file into a JSON object. Anything else is not a workitem.
pub fn parse_object(bytes: &[u8]) -> Result<Value, WorkitemError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(WorkitemError::NotAWorkitem("empty file".into()));
    }
    let v: Value = serde_json::from_slice(bytes)
        .map_err(|e| WorkitemError::NotAWorkitem(format!("not valid JSON: {e}")))?;
    if !v.is_object() {
        return Err(WorkitemError::NotAWorkitem(format!(
            "JSON {} where a workitem object was expected",
            json_type(&v)
        )));
    }
    Ok(v)
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Is this the Ruote envelope (`fields` object around the fields) or bare fields?
fn fields(input: &Value) -> Option<&Map<String, Value>> {
    let obj = input.as_object()?;
    match obj.get("fields") {
        Some(Value::Object(f)) => Some(f),
        _ => Some(obj),
    }
}

fn fields_mut(input: &mut Value) -> Option<&mut Map<String, Value>> {
    let obj = input.as_object_mut()?;
    if matches!(obj.get("fields"), Some(Value::Object(_))) {
        obj.get_mut("fields").and_then(Value::as_object_mut)
    } else {
        Some(obj)
    }
}

/// The image namespace (`fields.image`, new API) or, when absent, the flat fields (old API).
fn image_fields(f: &Map<String, Value>) -> &Map<String, Value> {
    match f.get("image") {
        Some(Value::Object(img)) => img,
        _ => f,
    }
}

/// The image_id as given, if it is a string, for naming a job whose workitem is invalid.
pub fn raw_image_id(input: &Value) -> Option<String> {
    let img = image_fields(fields(input)?);
    img.get("image_id")
        .and_then(Value::as_str)
        .map(str::to_string)
}

/// Strips an image id to `[A-Za-z0-9_-]`, as the original did for the directory name.
pub fn sanitise_id(id: &str) -> String {
    id.chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-')
        .collect()
}

/// Validates a workitem object and normalises it.
pub fn normalise(input: &Value) -> Result<Spec, WorkitemError> {
    let f = fields(input).ok_or_else(|| WorkitemError::NotAWorkitem("not an object".into()))?;
    let img = image_fields(f);

    let mut missing = Vec::new();
    let mut problems = Vec::new();
    let mut text = |key: &str, mandatory: bool| -> Option<String> {
        match img.get(key) {
            None | Some(Value::Null) => {
                if mandatory {
                    missing.push(key.to_string());
                }
                None
            }
            Some(Value::String(s)) if s.trim().is_empty() => {
                if mandatory {
                    missing.push(key.to_string());
                }
                None
            }
            Some(Value::String(s)) => Some(s.clone()),
            Some(other) => {
                problems.push(format!("{key} must be a string, not {}", json_type(other)));
                None
            }
        }
    };
    let image_id = text("image_id", true);
    let kickstart = text("kickstart", true);
    let image_type = text("image_type", true);
    let name = text("name", true);
    let arch = text("arch", true);
    let prefix = text("prefix", false);
    let release = text("release", false);
    let tokenmap = text("tokenmap", false);

    let extra_opts = match img.get("extra_opts") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => {
            let mut opts = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                match item {
                    Value::String(s) => opts.push(s.clone()),
                    other => problems.push(format!(
                        "extra_opts[{i}] must be a string, not {}",
                        json_type(other)
                    )),
                }
            }
            opts
        }
        Some(other) => {
            problems.push(format!(
                "extra_opts must be a list of strings, not {}",
                json_type(other)
            ));
            Vec::new()
        }
    };

    let mut errors = Vec::new();
    if !missing.is_empty() {
        errors.push(format!(
            "missing mandatory fields: {} (a workitem needs image_id, kickstart, image_type, name and arch)",
            missing.join(", ")
        ));
    }
    errors.extend(problems);

    let dir_id = image_id.as_deref().map(sanitise_id);
    if let (Some(id), Some(dir)) = (&image_id, &dir_id)
        && dir.is_empty()
    {
        errors.push(format!(
            "image_id {id:?} has no character of [A-Za-z0-9_-] to name its directory"
        ));
    }
    if let Some(id) = &image_id
        && id.chars().any(text::is_unsafe)
    {
        errors.push(format!("image_id {id:?} {CONTROL}"));
    }
    if let Some(n) = &name
        && let Err(e) = check_component(n)
    {
        errors.push(format!("name {n:?} {e}"));
    }
    if let Some(r) = &release
        && let Err(e) = check_component(r)
    {
        errors.push(format!("release {r:?} {e}"));
    }
    let prefix = prefix.unwrap_or_else(|| DEFAULT_PREFIX.to_string());
    if let Err(e) = check_prefix(&prefix) {
        errors.push(format!("prefix {prefix:?} {e}"));
    }
    for (key, value) in [("image_type", &image_type), ("arch", &arch)] {
        if let Some(v) = value
            && !is_word(v)
        {
            errors.push(format!(
                "{key} {v:?} must be a word of [A-Za-z0-9._-] not starting with '-'"
            ));
        }
    }
    if !errors.is_empty() {
        return Err(WorkitemError::Invalid(errors.join("; ")));
    }
    match (image_id, dir_id, kickstart, image_type, name, arch) {
        (
            Some(image_id),
            Some(dir_id),
            Some(kickstart),
            Some(image_type),
            Some(name),
            Some(arch),
        ) => Ok(Spec {
            image_id,
            dir_id,
            kickstart,
            image_type,
            name,
            arch,
            prefix,
            release,
            tokenmap,
            extra_opts,
        }),
        _ => Err(WorkitemError::Invalid("mandatory field missing".into())),
    }
}

fn is_word(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with('-')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
}

/// Why a name, prefix, release or image_id with a character [`text::is_unsafe`] is refused: it
/// is printed by every command and shown on every page, and a terminal would act on it.
const CONTROL: &str = "must not contain control characters (such as a newline, a tab, ESC or \
                       DEL) or bidirectional formatting characters (such as U+202E)";

/// One path component: not empty, not `.`/`..`, no `/`, no NUL, control or bidirectional
/// formatting character, not hidden.
fn check_component(s: &str) -> Result<(), &'static str> {
    if s.is_empty() {
        Err("is empty")
    } else if s == "." || s == ".." {
        Err("must not be '.' or '..'")
    } else if s.contains('/') {
        Err("must be one path component (no '/')")
    } else if s.contains('\0') {
        Err("must not contain NUL")
    } else if s.chars().any(text::is_unsafe) {
        Err(CONTROL)
    } else if s.starts_with('.') {
        Err("must not start with '.'")
    } else {
        Ok(())
    }
}

/// A relative path of safe components (no control or bidirectional formatting character).
fn check_prefix(p: &str) -> Result<(), &'static str> {
    if p.starts_with('/') {
        return Err("must be a relative path");
    }
    for part in p.split('/') {
        if part.is_empty() {
            return Err("must not have an empty component");
        }
        if part == ".." || part == "." {
            return Err("must not have a '.' or '..' component");
        }
        if part.contains('\0') {
            return Err("must not contain NUL");
        }
        if part.chars().any(text::is_unsafe) {
            return Err(CONTROL);
        }
    }
    Ok(())
}

/// What a finished job tells upstream.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Urls {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logfile_url: Option<String>,
    /// The sha256 (lowercase hex) of the file at `image_url`, taken once as the build found it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_sha256: Option<String>,
    /// The bytes of the build's files (the ones `SHA256SUMS` lists): what an expiry frees. Not
    /// an answer field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_bytes: Option<u64>,
    /// The build's provenance statement (`provenance.json` in the job folder).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provenance_url: Option<String>,
}

/// The human summary line appended to `msg`, exactly one per reply.
pub fn summary(
    name: Option<&str>,
    arch: Option<&str>,
    result: bool,
    error: Option<&str>,
    urls: &Urls,
) -> String {
    let name = name.unwrap_or("(unnamed)");
    let arch = arch.unwrap_or("(unknown)");
    if result {
        format!(
            "Image {name} build for arch {arch} succeeded: image {} (files {}, log {})",
            urls.image_url.as_deref().unwrap_or("-"),
            urls.files_url.as_deref().unwrap_or("-"),
            urls.logfile_url.as_deref().unwrap_or("-"),
        )
    } else {
        let mut s = format!(
            "Image {name} build for arch {arch} failed: {}",
            error.unwrap_or(UNKNOWN_ERROR)
        );
        if let Some(log) = &urls.logfile_url {
            s.push_str(&format!(" (log {log})"));
        }
        s
    }
}

/// The input with the OUT fields set: the answer when `result` is Some, else the workitem of a
/// job not answered yet (the BUILDING push, `show` before the end: the URLs known so far, no
/// result). Every OUT field is written from the arguments alone, never carried from the input: a
/// field the build did not make (an image_url after a failure, an error after a success) is
/// removed, whatever the input held.
pub fn reply(input: &Value, result: Option<bool>, error: Option<&str>, urls: &Urls) -> Value {
    reply_owned(input.clone(), result, error, urls)
}

/// What a failure whose cause was not recorded says.
const UNKNOWN_ERROR: &str = "unknown error";

/// The `fields.image` OUT fields (README, "The workitem and its answer").
const OUT_IMAGE: [&str; 8] = [
    "result",
    "files_url",
    "image_url",
    "image_sha256",
    "provenance_url",
    "logfile_url",
    "error",
    "failure",
];

/// Adds a failed build's class to an answer: `image.failure` beside `image.error` (the OUT
/// fields' image namespace, made by [`reply_owned`]).
pub fn set_failure(out: &mut Value, failure: &str) {
    if let Some(Value::Object(img)) = fields_mut(out).and_then(|f| f.get_mut("image")) {
        img.insert("failure".into(), Value::String(failure.to_string()));
    }
}

/// [`reply`], changing the input in place (a large workitem is not copied).
pub fn reply_owned(
    mut out: Value,
    result: Option<bool>,
    error: Option<&str>,
    urls: &Urls,
) -> Value {
    let Some(f) = fields_mut(&mut out) else {
        return out;
    };
    // Old API: the original copied the flat keys into fields.image before answering.
    if !matches!(f.get("image"), Some(Value::Object(_))) {
        let mut img = Map::new();
        for key in KNOWN_IN {
            if let Some(v) = f.get(key) {
                img.insert(key.to_string(), v.clone());
            }
        }
        f.insert("image".to_string(), Value::Object(img));
    }
    let (name, arch) = {
        let img = image_fields(f);
        (
            img.get("name").and_then(Value::as_str).map(str::to_string),
            img.get("arch").and_then(Value::as_str).map(str::to_string),
        )
    };
    if let Some(Value::Object(img)) = f.get_mut("image") {
        // A failure always says why; a success or a job not answered yet has no error.
        let error = (result == Some(false)).then(|| error.unwrap_or(UNKNOWN_ERROR));
        for key in OUT_IMAGE {
            let value = match key {
                "result" => result.map(Value::Bool),
                "files_url" => urls.files_url.clone().map(Value::String),
                "image_url" => urls.image_url.clone().map(Value::String),
                "image_sha256" => urls.image_sha256.clone().map(Value::String),
                "provenance_url" => urls.provenance_url.clone().map(Value::String),
                "logfile_url" => urls.logfile_url.clone().map(Value::String),
                _ => error.map(|e| Value::String(e.to_string())),
            };
            match value {
                Some(v) => {
                    img.insert(key.to_string(), v);
                }
                None => {
                    img.shift_remove(key);
                }
            }
        }
    }
    if result != Some(false) {
        f.shift_remove("__error__");
    }
    if result.is_none() {
        f.shift_remove("result");
    }
    if let Some(r) = result {
        f.insert("result".into(), Value::Bool(r));
        let line = summary(name.as_deref(), arch.as_deref(), r, error, urls);
        let msg = f.entry("msg").or_insert_with(|| Value::Array(Vec::new()));
        match msg {
            Value::Array(items) => items.push(Value::String(line)),
            other => {
                let old = other.take();
                *other = Value::Array(vec![old, Value::String(line)]);
            }
        }
        if !r {
            f.insert(
                "__error__".into(),
                Value::String(format!(
                    "Image build FAILED: {}",
                    error.unwrap_or(UNKNOWN_ERROR)
                )),
            );
        }
    }
    out
}

/// The key a cancel and its workitem share: a `fei` (Ruote's flow expression id) as canonical
/// JSON (object keys sorted, at every depth), so that the same id written with its keys in
/// another order is the same key. None for a `fei` that is not an object.
pub fn fei_key(fei: &Value) -> Option<String> {
    fn canonical(v: &Value) -> Value {
        match v {
            Value::Object(m) => {
                let mut keys: Vec<&String> = m.keys().collect();
                keys.sort();
                Value::Object(
                    keys.into_iter()
                        .map(|k| (k.clone(), canonical(&m[k])))
                        .collect(),
                )
            }
            Value::Array(a) => Value::Array(a.iter().map(canonical).collect()),
            other => other.clone(),
        }
    }
    fei.is_object()
        .then(|| serde_json::to_string(&canonical(fei)).ok())
        .flatten()
}

/// How much of a body over `max_bytes` is kept (in `rejected/`) and read for its `fei`.
pub const HEAD_BYTES: usize = 1 << 20;

/// The `fei` of a workitem read from the head of its body (a body too big to be read whole): the
/// value of the first `"fei"` key, when it is an object that ends within the head. Ruote writes
/// the envelope's `fei` first, so it is found however long the fields after it are.
pub fn fei_in_head(head: &[u8]) -> Option<Value> {
    let at = head.windows(5).position(|w| w == b"\"fei\"")?;
    let rest = &head[at + 5..];
    let colon = rest.iter().position(|b| !b.is_ascii_whitespace())?;
    if rest[colon] != b':' {
        return None;
    }
    let value = serde_json::Deserializer::from_slice(&rest[colon + 1..])
        .into_iter::<Value>()
        .next()?
        .ok()?;
    value.is_object().then_some(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn bare(img: Value) -> Value {
        json!({"image": img, "msg": [], "params": {}})
    }

    fn good() -> Value {
        json!({"image_id": "7-1", "kickstart": "lang en_US\n", "image_type": "fs", "name": "mer-core", "arch": "i586"})
    }

    #[test]
    fn parses_objects_only() {
        assert!(parse_object(b"{}").is_ok());
        for (bytes, want) in [
            (&b""[..], "empty"),
            (b"  \n", "empty"),
            (b"[1,2]", "array"),
            (b"\"s\"", "string"),
            (b"{garbage", "not valid JSON"),
        ] {
            let e = parse_object(bytes).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
    }

    #[test]
    fn new_api_envelope_and_bare() {
        let env = json!({"fei": {"wfid": "x"}, "participant_name": "build_image", "fields": bare(good())});
        let s = normalise(&env).unwrap();
        assert_eq!(s.image_id, "7-1");
        assert_eq!(s.prefix, "requests");
        assert_eq!(normalise(&bare(good())).unwrap(), s);
        // old API: flat in fields, bare and in envelope
        assert_eq!(normalise(&good()).unwrap(), s);
        assert_eq!(normalise(&json!({"fields": good()})).unwrap(), s);
    }

    #[test]
    fn missing_fields_are_named() {
        let e = normalise(&json!({"image": {"image_id": "x", "kickstart": ""}}))
            .unwrap_err()
            .to_string();
        let named = e.split(" (a workitem").next().unwrap();
        assert_eq!(
            named.trim(),
            "missing mandatory fields: kickstart, image_type, name, arch",
            "{e}"
        );
    }

    #[test]
    fn extra_opts_must_be_list_of_strings() {
        let mut w = good();
        w["extra_opts"] = json!("--foo");
        assert!(
            normalise(&w)
                .unwrap_err()
                .to_string()
                .contains("extra_opts must be a list")
        );
        w["extra_opts"] = json!(["--a", 3]);
        assert!(
            normalise(&w)
                .unwrap_err()
                .to_string()
                .contains("extra_opts[1]")
        );
        w["extra_opts"] = json!(["--a", "--b=c d"]);
        assert_eq!(normalise(&w).unwrap().extra_opts, vec!["--a", "--b=c d"]);
    }

    #[test]
    fn paths_are_checked() {
        let cases = [
            ("prefix", json!("../etc")),
            ("prefix", json!("/abs")),
            ("prefix", json!("a//b")),
            ("prefix", json!("a/../b")),
            ("name", json!("a/b")),
            ("name", json!("..")),
            ("name", json!(".hidden")),
            ("release", json!("../x")),
            ("image_id", json!("../..")),
            ("image_type", json!("--help")),
            ("arch", json!("i586 x")),
        ];
        for (key, val) in cases {
            let mut w = good();
            w[key] = val.clone();
            let e = normalise(&w).unwrap_err().to_string();
            assert!(e.contains(key), "{key}={val}: {e}");
        }
        let mut w = good();
        w["prefix"] = json!("queue/user");
        w["image_id"] = json!("a b/../c!");
        let s = normalise(&w).unwrap();
        assert_eq!(s.prefix, "queue/user");
        assert_eq!(s.dir_id, "abc");
    }

    #[test]
    fn control_characters_are_refused() {
        for key in ["name", "prefix", "release"] {
            for bad in [
                "a\nb",
                "a\tb",
                "a\rb",
                "x\u{1b}[31m",
                "a\u{7f}",
                "a\u{85}b",
                "a\u{9b}",
            ] {
                let mut w = good();
                w[key] = json!(bad);
                let e = normalise(&w).unwrap_err().to_string();
                assert!(
                    e.contains(key) && e.contains("control"),
                    "{key}={bad:?}: {e}"
                );
            }
        }
        for bad in ["a\u{202e}b", "\u{2066}x", "x\u{200f}", "a\u{2028}b"] {
            for key in ["name", "prefix", "release", "image_id"] {
                let mut w = good();
                w[key] = json!(bad);
                let e = normalise(&w).unwrap_err().to_string();
                assert!(
                    e.contains(key) && e.contains("bidirectional"),
                    "{key}={bad:?}: {e}"
                );
            }
        }
        for bad in [
            "7-1\u{1b}[31m",
            "7\u{1b}]0;t\u{7}",
            "a\nFAKE-LINE done ok",
            "x\u{85}",
        ] {
            let mut w = good();
            w["image_id"] = json!(bad);
            let e = normalise(&w).unwrap_err().to_string();
            assert!(
                e.contains("image_id") && e.contains("control"),
                "{bad:?}: {e}"
            );
        }
        let mut w = good();
        w["prefix"] = json!("queue/us\u{1}er");
        assert!(normalise(&w).unwrap_err().to_string().contains("prefix"));
        let mut w = good();
        w["name"] = json!("mer-core-é-i586");
        w["release"] = json!("0.1 beta");
        w["prefix"] = json!("queue/ユーザー");
        assert!(normalise(&w).is_ok());
    }

    #[test]
    fn out_fields_are_never_carried_from_the_input() {
        let stale = json!({"image": {"image_id": "7-1", "kickstart": "ks", "image_type": "fs",
            "name": "n", "arch": "i586", "image_url": "javascript:alert(1)", "files_url": "x",
            "logfile_url": "y", "error": "stale", "result": true, "custom": 1,
            "image_sha256": "stale", "provenance_url": "stale"},
            "result": true, "__error__": "stale", "msg": []});
        let built = Urls {
            files_url: Some("http://h/requests/7-1".into()),
            image_url: Some("http://h/requests/7-1/n.img".into()),
            logfile_url: Some("http://h/requests/7-1/n.log".into()),
            image_sha256: Some("ab".repeat(32)),
            artifact_bytes: Some(300),
            provenance_url: Some("http://h/requests/7-1/provenance.json".into()),
        };
        let planned = Urls {
            image_url: None,
            image_sha256: None,
            provenance_url: None,
            ..built.clone()
        };
        // a failure that made no image: no image_url, its own error
        let r = reply(&stale, Some(false), Some("mic failed"), &planned);
        let img = &r["image"];
        assert!(img.get("image_url").is_none(), "{r}");
        assert!(img.get("image_sha256").is_none(), "{r}");
        assert!(img.get("provenance_url").is_none(), "{r}");
        assert_eq!(img["files_url"], json!("http://h/requests/7-1"));
        assert_eq!(img["error"], json!("mic failed"));
        assert_eq!(
            (&img["result"], &r["result"]),
            (&json!(false), &json!(false))
        );
        assert_eq!(r["__error__"], json!("Image build FAILED: mic failed"));
        assert_eq!(img["custom"], json!(1), "other keys stay");
        // a success: no error anywhere
        let r = reply(&stale, Some(true), None, &built);
        assert!(
            r["image"].get("error").is_none() && r.get("__error__").is_none(),
            "{r}"
        );
        assert_eq!(
            r["image"]["image_url"],
            json!("http://h/requests/7-1/n.img")
        );
        assert_eq!(r["image"]["image_sha256"], json!("ab".repeat(32)));
        // what the files hold is the log's, not an answer field
        assert!(!r.to_string().contains("artifact_bytes"), "{r}");
        assert_eq!(
            r["image"]["provenance_url"],
            json!("http://h/requests/7-1/provenance.json")
        );
        // answered without a build (invalid): no URL at all
        let r = reply(&stale, Some(false), Some("invalid"), &Urls::default());
        for k in ["files_url", "image_url", "logfile_url"] {
            assert!(r["image"].get(k).is_none(), "{k}: {r}");
        }
        // not answered yet (BUILDING): the planned URLs, no result, no error
        let r = reply(&stale, None, None, &planned);
        for k in ["image_url", "error", "result"] {
            assert!(r["image"].get(k).is_none(), "{k}: {r}");
        }
        assert!(
            r.get("result").is_none() && r.get("__error__").is_none(),
            "{r}"
        );
        assert_eq!(
            r["image"]["logfile_url"],
            json!("http://h/requests/7-1/n.log")
        );
        // old API: the flat keys are input keys, the OUT fields go to fields.image
        let mut old = good();
        old["image_url"] = json!("javascript:alert(1)");
        let r = reply(&old, Some(false), Some("e"), &planned);
        assert!(r["image"].get("image_url").is_none(), "{r}");
    }

    #[test]
    fn reply_keeps_form_and_unknown_keys() {
        let env = json!({"fei": {"wfid": "x"}, "participant_name": "build_image",
            "fields": {"image": good(), "msg": ["earlier"], "custom": {"k": [1, 2]}}});
        let urls = Urls {
            files_url: Some("http://h/requests/7-1".into()),
            image_url: Some("http://h/requests/7-1/a.img".into()),
            logfile_url: Some("http://h/requests/7-1/mer-core.log".into()),
            image_sha256: None,
            artifact_bytes: None,
            provenance_url: None,
        };
        let r = reply(&env, Some(true), None, &urls);
        assert_eq!(r["fei"], env["fei"]);
        assert_eq!(r["fields"]["custom"], json!({"k": [1, 2]}));
        assert_eq!(r["fields"]["result"], json!(true));
        assert_eq!(r["fields"]["image"]["result"], json!(true));
        assert_eq!(
            r["fields"]["image"]["image_url"],
            json!("http://h/requests/7-1/a.img")
        );
        assert_eq!(r["fields"]["msg"][0], json!("earlier"));
        assert!(
            r["fields"]["msg"][1]
                .as_str()
                .unwrap()
                .contains("succeeded")
        );
        assert!(r["fields"].get("__error__").is_none());

        let old = good();
        let r = reply(&old, Some(false), Some("mic exited with status 1"), &urls);
        assert_eq!(r["image_id"], json!("7-1"));
        assert_eq!(r["image"]["image_id"], json!("7-1"));
        assert_eq!(r["image"]["error"], json!("mic exited with status 1"));
        assert_eq!(r["result"], json!(false));
        assert_eq!(
            r["__error__"],
            json!("Image build FAILED: mic exited with status 1")
        );
        assert!(r["msg"][0].as_str().unwrap().contains("failed: mic exited"));
    }

    #[test]
    fn a_fei_key_does_not_depend_on_the_order_of_keys() {
        let a = serde_json::json!({"wfid": "w", "expid": "0_1", "sub": {"b": 1, "a": 2}});
        let b: Value =
            serde_json::from_str(r#"{"sub": {"a": 2, "b": 1}, "expid": "0_1", "wfid": "w"}"#)
                .unwrap();
        assert_eq!(fei_key(&a), fei_key(&b));
        assert!(fei_key(&a).is_some());
        assert_eq!(fei_key(&Value::Null), None);
        assert_ne!(fei_key(&a), fei_key(&serde_json::json!({"wfid": "x"})));
    }

    #[test]
    fn a_fei_is_read_from_the_head_of_a_body() {
        let body =
            br#"{"fei" : {"wfid": "w", "expid": "0"}, "fields": {"image": {"kickstart": "xxxxxxxx"#;
        assert_eq!(
            fei_in_head(body),
            Some(serde_json::json!({"wfid": "w", "expid": "0"}))
        );
        assert_eq!(fei_in_head(br#"{"fields": {"a": 1}}"#), None);
        assert_eq!(fei_in_head(br#"{"fei": {"wfid": "w", "exp"#), None, "cut");
        assert_eq!(fei_in_head(br#"{"fei": 3}"#), None);
    }
}
