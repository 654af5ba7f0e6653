//! mic and mic2 command lines, as pure functions of the job and the worker config.

use crate::config::{Ict, WorkerConfig};
use crate::workitem::Spec;
use std::ffi::OsString;
use std::path::Path;

/// The image creator's arguments (without the program and without sudo).
pub fn mic_args(spec: &Spec, ks: &Path, outdir: &Path, w: &WorkerConfig) -> Vec<OsString> {
    let mut a: Vec<OsString> = Vec::new();
    match w.ict {
        Ict::Mic => {
            a.push("create".into());
            a.push(spec.image_type.clone().into());
            a.push(ks.into());
            a.push(format!("--arch={}", spec.arch).into());
            a.push(join_opt("--outdir=", outdir));
            if let Some(r) = &spec.release {
                a.push(format!("--release={r}").into());
            }
            if let Some(t) = &spec.tokenmap {
                a.push(format!("--tokenmap={t}").into());
            }
            if spec.image_type == "fs" && !w.fs_pack.is_empty() {
                a.push(format!("--pack-to={}", w.fs_pack).into());
            }
        }
        Ict::Mic2 => {
            a.push(format!("--format={}", spec.image_type).into());
            a.push(join_opt("--config=", ks));
            a.push(format!("--arch={}", spec.arch).into());
            a.push(join_opt("--outdir=", outdir));
            if let Some(r) = &spec.release {
                a.push(format!("--release={r}").into());
            }
        }
    }
    a.extend(spec.extra_opts.iter().map(OsString::from));
    a.extend(w.mic_opts.iter().map(OsString::from));
    a
}

/// The whole native command line: `[sudo -n] <mic> <args>`.
pub fn mic_command(spec: &Spec, ks: &Path, outdir: &Path, w: &WorkerConfig) -> Vec<OsString> {
    let mut argv: Vec<OsString> = Vec::new();
    if w.sudo {
        argv.push("sudo".into());
        argv.push("-n".into());
    }
    argv.push(w.mic_path().into());
    argv.extend(mic_args(spec, ks, outdir, w));
    argv
}

fn join_opt(opt: &str, p: &Path) -> OsString {
    let mut s = OsString::from(opt);
    s.push(p.as_os_str());
    s
}

/// A command line as one shell-quoted line, for logs.
pub fn display(argv: &[OsString]) -> String {
    let words: Vec<String> = argv
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    shell_words::join(words)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn spec() -> Spec {
        Spec::sample("mer-core", "fs")
    }

    fn s(v: &[OsString]) -> Vec<String> {
        v.iter().map(|a| a.to_string_lossy().into_owned()).collect()
    }

    #[test]
    fn mic_native_with_sudo_and_fs_pack() {
        let w = WorkerConfig::default();
        let ks = PathBuf::from("/srv/img/requests/7-1/mer-core.ks");
        let out = PathBuf::from("/srv/img/requests/7-1");
        assert_eq!(
            s(&mic_command(&spec(), &ks, &out, &w)),
            vec![
                "sudo",
                "-n",
                "/usr/bin/mic",
                "create",
                "fs",
                "/srv/img/requests/7-1/mer-core.ks",
                "--arch=i586",
                "--outdir=/srv/img/requests/7-1",
                "--pack-to=@NAME@.tar.bz2"
            ]
        );
    }

    #[test]
    fn mic_release_tokenmap_extra_and_worker_opts() {
        let mut w = WorkerConfig {
            sudo: false,
            ..WorkerConfig::default()
        };
        w.mic_opts = vec!["--copy-kernel".into()];
        let mut sp = spec();
        sp.image_type = "loop".into();
        sp.release = Some("0.2011".into());
        sp.tokenmap = Some("RELEASE:1.0".into());
        sp.extra_opts = vec!["--pkgmgr=zypp".into(), "; touch /x".into()];
        assert_eq!(
            s(&mic_command(&sp, Path::new("k.ks"), Path::new("/o"), &w)),
            vec![
                "/usr/bin/mic",
                "create",
                "loop",
                "k.ks",
                "--arch=i586",
                "--outdir=/o",
                "--release=0.2011",
                "--tokenmap=RELEASE:1.0",
                "--pkgmgr=zypp",
                "; touch /x",
                "--copy-kernel"
            ]
        );
    }

    #[test]
    fn mic2_line() {
        let w = WorkerConfig {
            sudo: true,
            ict: Ict::Mic2,
            ..WorkerConfig::default()
        };
        let mut sp = spec();
        sp.release = Some("r1".into());
        sp.tokenmap = Some("ignored".into());
        assert_eq!(
            s(&mic_command(&sp, Path::new("/j/n.ks"), Path::new("/j"), &w)),
            vec![
                "sudo",
                "-n",
                "mic-image-creator",
                "--format=fs",
                "--config=/j/n.ks",
                "--arch=i586",
                "--outdir=/j",
                "--release=r1"
            ]
        );
    }

    #[test]
    fn display_quotes() {
        let v: Vec<OsString> = vec!["mic".into(), "a b".into(), "; touch /x".into()];
        assert_eq!(display(&v), "mic 'a b' '; touch /x'");
    }
}
