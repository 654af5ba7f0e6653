//! The provenance of a build: an in-toto Statement v1 whose subjects are the build's files with
//! their sha256, and whose predicate is SLSA Provenance v1 (DESIGN.md, "Images are artifacts"),
//! as serde types, built from the [`Facts`] a build collected and rendered to the bytes written
//! as `provenance.json` (and signed, byte for byte, by `dsse`).
//!
//! Invariant: the subjects' digests are the ones the build's one pass took (`sums`); nothing
//! here reads an image. The statement is a pure function of its facts.

use super::sums::FileSum;
use crate::domain::workitem::Spec;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::SystemTime;

/// The statement's file in a job folder.
pub const PROVENANCE_FILE: &str = "provenance.json";
/// in-toto Statement v1.
pub const STATEMENT_TYPE: &str = "https://in-toto.io/Statement/v1";
/// SLSA Provenance v1.
pub const PREDICATE_TYPE: &str = "https://slsa.dev/provenance/v1";
/// What kind of build this is: an image built by mic from a kickstart, by this program
/// (versioned: a change of what the parameters mean is a new version).
pub const BUILD_TYPE: &str = "urn:build-image:buildtype:mic-image:v1";

/// in-toto Statement v1.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Statement {
    #[serde(rename = "_type")]
    pub type_: String,
    pub subject: Vec<ResourceDescriptor>,
    #[serde(rename = "predicateType")]
    pub predicate_type: String,
    pub predicate: Provenance,
}

/// in-toto ResourceDescriptor v1 (the fields used here).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ResourceDescriptor {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub digest: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<Map<String, Value>>,
}

/// SLSA Provenance v1.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Provenance {
    pub build_definition: BuildDefinition,
    pub run_details: RunDetails,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BuildDefinition {
    pub build_type: String,
    pub external_parameters: ExternalParameters,
    pub internal_parameters: InternalParameters,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resolved_dependencies: Vec<ResourceDescriptor>,
}

/// What the workitem asked for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExternalParameters {
    /// The workitem's image fields.
    pub image: ImageFields,
    pub kickstart: Kickstart,
    pub extra_opts: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageFields {
    pub image_id: String,
    pub name: String,
    pub arch: String,
    pub image_type: String,
    pub prefix: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenmap: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Kickstart {
    /// The kickstart's file name in the job folder.
    pub name: String,
    pub sha256: String,
}

/// How this host built it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InternalParameters {
    /// native or kvm.
    pub mode: String,
    pub mic: Mic,
    /// KVM: the guest's base image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_image: Option<BaseImage>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Mic {
    /// mic or mic2 (mic-image-creator).
    pub ict: String,
    pub path: String,
    /// What `mic --version` printed (None when it could not be asked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// `[worker] mic_opts`.
    pub opts: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BaseImage {
    pub path: String,
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunDetails {
    pub builder: Builder,
    pub metadata: BuildMetadata,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Builder {
    /// The worker id.
    pub id: String,
    pub version: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BuildMetadata {
    /// The job number.
    pub invocation_id: String,
    /// RFC 3339, UTC.
    pub started_on: String,
    pub finished_on: String,
}

/// A `repo` line of a kickstart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repo {
    pub name: Option<String>,
    pub baseurl: String,
}

/// The package list mic wrote (`--record-pkgs=name`: `<name>.packages`).
#[derive(Debug, Clone, PartialEq)]
pub struct Packages {
    /// The file, as hashed with the build's files.
    pub file: FileSum,
    /// Its lines (one package each), blank ones left out.
    pub packages: Vec<String>,
}

/// What the host knows of how it builds (the same for every build of a daemon's life).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct HostFacts {
    pub mode: String,
    pub ict: String,
    pub mic_path: PathBuf,
    pub mic_version: Option<String>,
    pub mic_opts: Vec<String>,
    /// KVM: the base image and its sha256.
    pub base_image: Option<(PathBuf, String)>,
}

/// Everything a statement says, collected by the build.
#[derive(Debug, Clone)]
pub struct Facts<'a> {
    pub spec: &'a Spec,
    /// The kickstart's file name in the job folder and its sha256.
    pub kickstart: (String, String),
    /// The kickstart's repos, tokenmap applied.
    pub repos: &'a [Repo],
    /// Every file of the build, hashed once.
    pub files: &'a [FileSum],
    pub packages: Option<Packages>,
    pub host: &'a HostFacts,
    pub worker: &'a str,
    pub job: u64,
    pub started: SystemTime,
    pub finished: SystemTime,
}

/// The statement the facts make.
pub fn statement(f: &Facts) -> Statement {
    let subject = f
        .files
        .iter()
        .map(|s| ResourceDescriptor {
            name: Some(s.path.to_string_lossy().into_owned()),
            digest: sha256(&s.sha256),
            ..ResourceDescriptor::default()
        })
        .collect();
    let mut deps: Vec<ResourceDescriptor> = f
        .repos
        .iter()
        .map(|r| {
            let mut notes = Map::new();
            notes.insert("kind".into(), "repo".into());
            ResourceDescriptor {
                name: r.name.clone(),
                uri: Some(r.baseurl.clone()),
                annotations: Some(notes),
                ..ResourceDescriptor::default()
            }
        })
        .collect();
    if let Some(p) = &f.packages {
        let mut notes = Map::new();
        notes.insert("kind".into(), "package-list".into());
        notes.insert(
            "packages".into(),
            Value::Array(p.packages.iter().cloned().map(Value::String).collect()),
        );
        deps.push(ResourceDescriptor {
            name: Some(p.file.path.to_string_lossy().into_owned()),
            digest: sha256(&p.file.sha256),
            annotations: Some(notes),
            ..ResourceDescriptor::default()
        });
    }
    let s = f.spec;
    let h = f.host;
    Statement {
        type_: STATEMENT_TYPE.into(),
        subject,
        predicate_type: PREDICATE_TYPE.into(),
        predicate: Provenance {
            build_definition: BuildDefinition {
                build_type: BUILD_TYPE.into(),
                external_parameters: ExternalParameters {
                    image: ImageFields {
                        image_id: s.image_id.clone(),
                        name: s.name.clone(),
                        arch: s.arch.clone(),
                        image_type: s.image_type.clone(),
                        prefix: s.prefix.clone(),
                        release: s.release.clone(),
                        tokenmap: s.tokenmap.clone(),
                    },
                    kickstart: Kickstart {
                        name: f.kickstart.0.clone(),
                        sha256: f.kickstart.1.clone(),
                    },
                    extra_opts: s.extra_opts.clone(),
                },
                internal_parameters: InternalParameters {
                    mode: h.mode.clone(),
                    mic: Mic {
                        ict: h.ict.clone(),
                        path: h.mic_path.to_string_lossy().into_owned(),
                        version: h.mic_version.clone(),
                        opts: h.mic_opts.clone(),
                    },
                    base_image: h.base_image.as_ref().map(|(p, sha)| BaseImage {
                        path: p.to_string_lossy().into_owned(),
                        sha256: sha.clone(),
                    }),
                },
                resolved_dependencies: deps,
            },
            run_details: RunDetails {
                builder: Builder {
                    id: f.worker.to_string(),
                    version: BTreeMap::from([(
                        "build-image".to_string(),
                        env!("CARGO_PKG_VERSION").to_string(),
                    )]),
                },
                metadata: BuildMetadata {
                    invocation_id: f.job.to_string(),
                    started_on: rfc3339(f.started),
                    finished_on: rfc3339(f.finished),
                },
            },
        },
    }
}

/// The bytes of `provenance.json`: the statement as pretty JSON, ending in a newline.
pub fn render(s: &Statement) -> Vec<u8> {
    // serialising plain strings and maps cannot fail
    let mut out = serde_json::to_vec_pretty(s).unwrap_or_default();
    out.push(b'\n');
    out
}

fn sha256(hex: &str) -> BTreeMap<String, String> {
    BTreeMap::from([("sha256".to_string(), hex.to_string())])
}

/// A time as RFC 3339 in UTC with microseconds (protobuf's Timestamp JSON form).
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_micros(t).to_string()
}

/// The kickstart text as mic reads it with `--tokenmap=T`: each `TOKEN:VALUE` pair of the
/// comma-separated map replaces `@TOKEN@`.
pub fn apply_tokenmap(kickstart: &str, tokenmap: Option<&str>) -> String {
    let mut text = kickstart.to_string();
    for pair in tokenmap.unwrap_or("").split(',') {
        if let Some((token, value)) = pair.split_once(':')
            && !token.is_empty()
        {
            text = text.replace(&format!("@{token}@"), value);
        }
    }
    text
}

/// Every `repo` line's `--baseurl` (and `--name`) of a kickstart, tokenmap applied; the
/// options may be written `--opt=value` or `--opt value`, quoted as a shell quotes.
pub fn repos(kickstart: &str, tokenmap: Option<&str>) -> Vec<Repo> {
    let text = apply_tokenmap(kickstart, tokenmap);
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if !line.starts_with("repo ") && !line.starts_with("repo\t") {
            continue;
        }
        let Ok(words) = shell_words::split(line) else {
            continue;
        };
        let mut name = None;
        let mut baseurl = None;
        let mut it = words.iter().skip(1);
        while let Some(w) = it.next() {
            let (opt, value) = match w.split_once('=') {
                Some((o, v)) => (o, Some(v.to_string())),
                None => (w.as_str(), None),
            };
            let slot = match opt {
                "--name" => &mut name,
                "--baseurl" => &mut baseurl,
                _ => continue,
            };
            *slot = value.or_else(|| it.next().cloned());
        }
        if let Some(baseurl) = baseurl {
            out.push(Repo { name, baseurl });
        }
    }
    out
}

/// The lines of a package list, blank ones left out.
pub fn package_lines(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn repos_after_tokenmap_in_both_option_forms() {
        let ks = "# ks\nrepo --name=core --baseurl=http://repo/@RELEASE@/@ARCH@/ --save\n\
                  repo --name \"a b\" --baseurl 'http://x/y z'\n  repo --mirrorlist=http://m\n\
                  repository --baseurl=http://no\n";
        assert_eq!(
            repos(ks, Some("RELEASE:1.0,ARCH:i586")),
            vec![
                Repo {
                    name: Some("core".into()),
                    baseurl: "http://repo/1.0/i586/".into()
                },
                Repo {
                    name: Some("a b".into()),
                    baseurl: "http://x/y z".into()
                }
            ]
        );
        assert_eq!(repos(ks, None)[0].baseurl, "http://repo/@RELEASE@/@ARCH@/");
        // a value holding ':' keeps the rest
        assert_eq!(apply_tokenmap("@U@", Some("U:http://h:80")), "http://h:80");
    }

    #[test]
    fn the_statement_holds_every_fact() {
        let spec = Spec::sample("mer-core", "loop");
        let files = vec![FileSum {
            path: "a/mer-core.img".into(),
            sha256: "ab".repeat(32),
            bytes: 3,
        }];
        let host = HostFacts {
            mode: "native".into(),
            ict: "mic".into(),
            mic_path: "/usr/bin/mic".into(),
            mic_version: Some("mic 0.28".into()),
            mic_opts: vec!["--record-pkgs=name".into()],
            base_image: None,
        };
        let repos = repos("repo --name=r --baseurl=http://r/\n", None);
        let f = Facts {
            spec: &spec,
            kickstart: ("mer-core.ks".into(), "cd".repeat(32)),
            repos: &repos,
            files: &files,
            packages: Some(Packages {
                file: FileSum {
                    path: "mer-core.packages".into(),
                    sha256: "ef".repeat(32),
                    bytes: 9,
                },
                packages: package_lines("bash\n\nkernel\n"),
            }),
            host: &host,
            worker: "w1",
            job: 17,
            started: UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            finished: UNIX_EPOCH + Duration::from_micros(1_700_000_060_500_000),
        };
        let v: Value = serde_json::from_slice(&render(&statement(&f))).unwrap();
        assert_eq!(v["_type"], STATEMENT_TYPE);
        assert_eq!(v["subject"][0]["digest"]["sha256"], "ab".repeat(32));
        let p = &v["predicate"];
        let b = &p["buildDefinition"];
        assert_eq!(
            b["externalParameters"]["kickstart"]["sha256"],
            "cd".repeat(32)
        );
        assert_eq!(b["externalParameters"]["image"]["image_type"], "loop");
        assert_eq!(b["internalParameters"]["mic"]["version"], "mic 0.28");
        assert!(b["internalParameters"].get("base_image").is_none());
        assert_eq!(b["resolvedDependencies"][0]["uri"], "http://r/");
        assert_eq!(
            b["resolvedDependencies"][1]["annotations"]["packages"],
            serde_json::json!(["bash", "kernel"])
        );
        let m = &p["runDetails"]["metadata"];
        assert_eq!(m["invocationId"], "17");
        assert_eq!(m["startedOn"], "2023-11-14T22:13:20.000000Z");
        assert_eq!(m["finishedOn"], "2023-11-14T22:14:20.500000Z");
        assert_eq!(p["runDetails"]["builder"]["id"], "w1");
        // what is written reads back as the same statement
        let back: Statement = serde_json::from_value(v).unwrap();
        assert_eq!(back, statement(&f));
    }
}
