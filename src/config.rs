//! The TOML configuration: every key optional with a working default, unknown keys rejected.
//!
//! `[worker]` keeps the original IMG names and meanings (see REFERENCE.md); `[spool]` and `[hooks]`
//! are this program's own. Times in `[worker]` and `[hooks]` are whole seconds, `[spool]` times are
//! milliseconds, as their names say.

pub use crate::edges::amqp::config::AmqpConfig;
use serde::{Deserialize, Deserializer, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid config value: {0}")]
    Value(String),
}

/// Which image creator the workitems are built with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Ict {
    Mic,
    Mic2,
}

/// Which qemu accelerator a KVM-mode build uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum VmAccel {
    /// `kvm` when /dev/kvm is usable (opens read-write and the CPU has vmx or svm), else `tcg`.
    Auto,
    /// Hardware virtualisation; a build fails with a clear error when /dev/kvm is not usable.
    Kvm,
    /// Software emulation (slow, but works anywhere).
    Tcg,
}

/// How `incoming/` is watched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WatchMode {
    /// inotify plus a periodic full rescan (the rescan covers NFS, where inotify is blind).
    Auto,
    /// Periodic rescan only.
    Poll,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub worker: WorkerConfig,
    pub spool: SpoolConfig,
    pub hooks: HooksConfig,
    pub http: HttpConfig,
    pub amqp: AmqpConfig,
    pub artifacts: ArtifactsConfig,
}

/// `[artifacts]`: what a build's images are known by after it, how long they are kept, and the
/// disk budget under base_dir (DESIGN.md, "Images are artifacts"). Every key optional: without
/// `sign_key` the provenance is written unsigned; every default keeps every image.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ArtifactsConfig {
    /// An OpenSSH ed25519 private key file (unencrypted) that signs each build's provenance as
    /// a DSSE envelope (`provenance.intoto.jsonl`).
    #[serde(deserialize_with = "empty_is_none")]
    pub sign_key: Option<PathBuf>,
    /// An OpenSSH public key file that `verify` checks signatures with (default: the public
    /// half of `sign_key`).
    #[serde(deserialize_with = "empty_is_none")]
    pub verify_key: Option<PathBuf>,
    /// Images of builds finished more than this many days ago expire (0: no age limit).
    pub keep_days: u64,
    /// Only the newest this many images of each image name are kept (0: no count limit).
    pub keep_last: u64,
    /// Below this many MiB free under base_dir no build starts, and images expire (past the
    /// policy first, then the oldest unpinned) until there is room again (0: no budget).
    pub min_free_mb: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    pub base_dir: PathBuf,
    pub base_url: String,
    pub use_kvm: bool,
    pub ict: Ict,
    /// Path of the image creator; default `/usr/bin/mic` (mic) or `mic-image-creator` (mic2).
    #[serde(deserialize_with = "empty_is_none")]
    pub mic_path: Option<PathBuf>,
    /// Extra options appended to every mic command line. A TOML list, or the original
    /// colon-separated string.
    #[serde(deserialize_with = "list_or_colon_string")]
    pub mic_opts: Vec<String>,
    /// Added as `--pack-to=<fs_pack>` for image_type `fs` (mic itself expands `@NAME@`).
    pub fs_pack: String,
    pub img_tmp: PathBuf,
    #[serde(deserialize_with = "empty_is_none")]
    pub vm_kernel: Option<PathBuf>,
    #[serde(deserialize_with = "empty_is_none")]
    pub vm_initrd: Option<PathBuf>,
    pub vm_append: String,
    /// Guest memory, as qemu's `-m` takes it: digits with an optional K, M, G or T suffix.
    pub vm_memory: String,
    /// Guest CPUs, 1..=256.
    pub vm_smp: u32,
    #[serde(deserialize_with = "empty_is_none")]
    pub vm_ssh_key: Option<PathBuf>,
    #[serde(deserialize_with = "empty_is_none")]
    pub vm_base_img: Option<PathBuf>,
    /// qemu accelerator: auto, kvm or tcg.
    pub vm_accel: VmAccel,
    /// Per-command timeout, seconds, 1..=604800 (a week).
    pub timeout: u64,
    pub use_9p_cache: bool,
    pub mic_cachedir: PathBuf,
    /// Seconds to wait for the guest's ssh, 1..=3600.
    pub vm_wait: u64,
    /// KVM: guests kept booted ahead, each on a fresh overlay, for builds to take (issue 24,
    /// docs/plan-issue-24.md), 0..=64 and at most `workers`; 0: every build boots its own.
    pub vm_warm: u64,
    /// Run mic through `sudo -n`.
    pub sudo: bool,
    /// Build slots, 1..=256 (each runs a thread and a mic or a qemu).
    pub workers: usize,
    /// Attempts of one job before an interrupted build is answered with an error, 1..=100.
    pub max_attempts: u32,
    /// Seconds a stopping daemon lets running builds finish before it kills them,
    /// 0..=604800 (a week; 0: kill at once).
    pub grace: u64,
    /// A job log's size limit, in MiB, 1..=65536: beyond it, its head (half the limit) and its
    /// latest tail (cut back to half the limit whenever it reaches it) are kept, with a marker
    /// line between: the file stays below 1.5 x the limit.
    pub job_log_max_mb: u64,
    /// Put each build's processes into a cgroup v2 of their own, where the host has one (found
    /// in /proc/self/mountinfo); false: find them by the environment marker only.
    pub use_cgroup: bool,
    /// Seconds a build may go without output (mic silent) before it is killed as stalled,
    /// 0..=604800; 0: no stall limit (`timeout` stays the hard limit).
    pub stall_timeout: u64,
    /// Automatic new tries of a build that failed for the infrastructure (timeout, stall, guest
    /// boot, ssh, disk full, killed by the host), 0..=100, before it is answered with its class.
    pub infra_retries: u32,
    /// Run mic in a private mount namespace of its own where possible (the daemon is root, mic
    /// runs without sudo): its mounts are never seen by the host and go with its processes.
    pub mount_namespace: bool,
    /// Seconds between two writes of this daemon's host record (`hosts/<worker>.json` in the
    /// spool, and the farm exchange with AMQP), 1..=3600; a record older than 3 of them is
    /// shown as gone.
    pub host_record_interval: u64,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            base_dir: PathBuf::from("/var/www/images"),
            base_url: "http://localhost/images".to_string(),
            use_kvm: false,
            ict: Ict::Mic,
            mic_path: None,
            mic_opts: Vec::new(),
            fs_pack: "@NAME@.tar.bz2".to_string(),
            img_tmp: PathBuf::from("/var/tmp"),
            vm_kernel: None,
            vm_initrd: None,
            vm_append: "root=/dev/vda panic=1 quiet rw elevator=noop ip=dhcp".to_string(),
            vm_memory: "1G".to_string(),
            vm_smp: 2,
            vm_ssh_key: None,
            vm_base_img: None,
            vm_accel: VmAccel::Auto,
            timeout: 3600,
            use_9p_cache: false,
            mic_cachedir: PathBuf::from("/var/tmp/mic/cache"),
            vm_wait: 20,
            vm_warm: 0,
            sudo: true,
            workers: 1,
            max_attempts: 2,
            grace: 7200,
            job_log_max_mb: 64,
            use_cgroup: true,
            stall_timeout: 0,
            infra_retries: 1,
            mount_namespace: true,
            host_record_interval: 5,
        }
    }
}

impl WorkerConfig {
    /// The image creator's path, by `ict` when `mic_path` is not set.
    pub fn mic_path(&self) -> PathBuf {
        match (&self.mic_path, self.ict) {
            (Some(p), _) => p.clone(),
            (None, Ict::Mic) => PathBuf::from("/usr/bin/mic"),
            (None, Ict::Mic2) => PathBuf::from("mic-image-creator"),
        }
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout)
    }

    /// The stall limit of a build (None: `stall_timeout = 0`, no limit).
    pub fn stall_timeout(&self) -> Option<Duration> {
        (self.stall_timeout > 0).then(|| Duration::from_secs(self.stall_timeout))
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpoolConfig {
    pub dir: PathBuf,
    pub watch: WatchMode,
    /// Milliseconds between full rescans of `incoming/`, 10..=3600000 (an hour).
    pub poll_interval_ms: u64,
    /// Milliseconds a file's size and mtime must stay unchanged before it is claimed,
    /// 0..=3600000 (an hour).
    pub min_age_ms: u64,
    /// The largest input read, in bytes, 1..=1073741824 (1 GiB); a larger one is rejected unread.
    pub max_bytes: u64,
    /// Default: the host name.
    pub worker_id: Option<String>,
    /// Default: `<dir>/state/<worker_id>`.
    #[serde(deserialize_with = "empty_is_none")]
    pub state_dir: Option<PathBuf>,
    /// The event log's page cache, MiB, 1..=65536: more makes `replay` and `status` over a long
    /// log faster, less keeps an idle daemon small.
    pub log_cache_mb: u64,
    /// Free space kept on the state disk, MiB, 0..=1048576: below it nothing is written to the
    /// event log (claiming stops) until space returns.
    pub state_min_free_mb: u64,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        SpoolConfig {
            dir: PathBuf::from("spool"),
            watch: WatchMode::Auto,
            poll_interval_ms: 2000,
            min_age_ms: 1000,
            max_bytes: 16 * 1024 * 1024,
            worker_id: None,
            state_dir: None,
            log_cache_mb: 8,
            state_min_free_mb: 64,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HooksConfig {
    /// Path of the push utility, run as `<push> <STATUS>`; none: statuses are only logged.
    #[serde(deserialize_with = "empty_is_none")]
    pub push: Option<PathBuf>,
    /// Seconds one push may take, 1..=86400 (a day).
    pub timeout: u64,
    /// Further attempts after a failed push, 0..=1000.
    pub retries: u32,
    /// Delay before the first retry, in milliseconds, 0..=86400000 (a day); each further retry
    /// waits twice as long.
    pub retry_delay_ms: u64,
    /// `hooks.log` is rotated (to `hooks.log.1`) when it grows past this many MiB, 1..=65536.
    pub log_max_mb: u64,
}

impl Default for HooksConfig {
    fn default() -> Self {
        HooksConfig {
            push: None,
            timeout: 60,
            retries: 3,
            retry_delay_ms: 10_000,
            log_max_mb: 16,
        }
    }
}

/// An empty string means "not set", as in the original INI file.
fn empty_is_none<'de, D: Deserializer<'de>>(d: D) -> Result<Option<PathBuf>, D::Error> {
    let s: Option<PathBuf> = Option::deserialize(d)?;
    Ok(s.filter(|p| !p.as_os_str().is_empty()))
}

fn list_or_colon_string<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Opts {
        List(Vec<String>),
        Colon(String),
    }
    Ok(match Opts::deserialize(d)? {
        Opts::List(v) => v,
        Opts::Colon(s) => s
            .split(':')
            .filter(|p| !p.is_empty())
            .map(str::to_string)
            .collect(),
    })
}

impl Config {
    /// What the lifecycle is set to do for every job.
    pub fn policy(&self) -> crate::domain::lifecycle::Policy {
        crate::domain::lifecycle::Policy {
            push: self.hooks.push.is_some(),
            push_retries: self.hooks.retries,
            max_attempts: self.worker.max_attempts,
        }
    }

    /// Parses a config text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &Path) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_path_buf(),
            message: e.to_string(),
        })?;
        cfg.check()?;
        Ok(cfg)
    }

    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text, path).map_err(|e| match e {
            // The original IMG file given as it is: say what it is and how to convert it.
            // (Not for TOML with a wrong key: INI syntax only when it is no TOML at all.)
            ConfigError::Parse { path, message }
                if text.parse::<toml::Table>().is_err() && crate::legacy::looks_like_ini(&text) =>
            {
                ConfigError::Parse {
                    message: format!(
                        "it looks like the original IMG build_image.conf (INI), not TOML: convert \
                         it with `build-image config import {}` ({})",
                        path.display(),
                        message.lines().next().unwrap_or_default()
                    ),
                    path,
                }
            }
            e => e,
        })
    }

    /// The numeric keys with their values and allowed ranges (inclusive), as checked at load.
    fn numeric_keys(&self) -> [(&'static str, u64, u64, u64); 23] {
        let (w, s, h) = (&self.worker, &self.spool, &self.hooks);
        [
            ("[worker] timeout", w.timeout, 1, WEEK_S),
            ("[worker] grace", w.grace, 0, WEEK_S),
            ("[worker] workers", w.workers as u64, 1, 256),
            ("[worker] max_attempts", w.max_attempts.into(), 1, 100),
            ("[worker] vm_smp", w.vm_smp.into(), 1, 256),
            ("[worker] vm_wait", w.vm_wait, 1, 3600),
            ("[worker] vm_warm", w.vm_warm, 0, 64),
            ("[worker] job_log_max_mb", w.job_log_max_mb, 1, 65536),
            ("[worker] stall_timeout", w.stall_timeout, 0, WEEK_S),
            ("[worker] infra_retries", w.infra_retries.into(), 0, 100),
            (
                "[worker] host_record_interval",
                w.host_record_interval,
                1,
                3600,
            ),
            ("[spool] poll_interval_ms", s.poll_interval_ms, 10, HOUR_MS),
            ("[spool] min_age_ms", s.min_age_ms, 0, HOUR_MS),
            ("[spool] max_bytes", s.max_bytes, 1, 1 << 30),
            ("[spool] log_cache_mb", s.log_cache_mb, 1, 65536),
            ("[spool] state_min_free_mb", s.state_min_free_mb, 0, 1 << 20),
            ("[hooks] timeout", h.timeout, 1, 86400),
            ("[hooks] retries", h.retries.into(), 0, 1000),
            ("[hooks] retry_delay_ms", h.retry_delay_ms, 0, 24 * HOUR_MS),
            ("[hooks] log_max_mb", h.log_max_mb, 1, 65536),
            ("[artifacts] keep_days", self.artifacts.keep_days, 0, 36500),
            (
                "[artifacts] keep_last",
                self.artifacts.keep_last,
                0,
                1_000_000,
            ),
            (
                "[artifacts] min_free_mb",
                self.artifacts.min_free_mb,
                0,
                1 << 30,
            ),
        ]
    }

    /// Checks every value against its range (done by [`Config::parse`]; call it on a config
    /// built in code).
    pub fn check(&self) -> Result<(), ConfigError> {
        for (key, value, lo, hi) in self.numeric_keys() {
            if !(lo..=hi).contains(&value) {
                return Err(ConfigError::Value(format!(
                    "{key} = {value} is out of range: it must be {lo}..={hi}"
                )));
            }
        }
        self.http.check()?;
        if self.worker.vm_warm > self.worker.workers as u64 {
            return Err(ConfigError::Value(format!(
                "[worker] vm_warm = {} is more than workers = {}: no more guests than build slots \
                 are ever taken at once, the others would only hold memory",
                self.worker.vm_warm, self.worker.workers
            )));
        }
        if !is_qemu_size(&self.worker.vm_memory) {
            return Err(ConfigError::Value(format!(
                "[worker] vm_memory = {:?} is not a size qemu's -m takes: digits with an optional \
                 K, M, G or T suffix, e.g. \"1G\" or \"2048\" (MiB)",
                self.worker.vm_memory
            )));
        }
        self.amqp.check().map_err(ConfigError::Value)?;
        if let Some(id) = &self.spool.worker_id
            && !is_safe_component(id)
        {
            return Err(ConfigError::Value(format!(
                "[spool] worker_id {id:?} must be one file name ([A-Za-z0-9._-], not starting with '.')"
            )));
        }
        Ok(())
    }

    /// The worker id: configured, else the host name made safe as a file name.
    pub fn worker_id(&self) -> String {
        if let Some(id) = &self.spool.worker_id {
            return id.clone();
        }
        let host = nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_default();
        let safe: String = host
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let safe = safe.trim_start_matches('.').to_string();
        if safe.is_empty() {
            "worker".to_string()
        } else {
            safe
        }
    }

    pub fn state_dir(&self) -> PathBuf {
        match &self.spool.state_dir {
            Some(d) => d.clone(),
            None => self.spool.dir.join("state").join(self.worker_id()),
        }
    }
}

/// `[http]`: the read-only status page, API and metrics (src/http). Off unless `listen` is set.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Where the server listens: `"127.0.0.1:8080"`, or a bare port (`"8080"`), which means
    /// 127.0.0.1. An address other than loopback is taken only as written (the pages have no
    /// authentication). Port 0 picks a free port (written to `<state_dir>/http.addr`). Unset or
    /// empty: no server.
    #[serde(deserialize_with = "empty_string_is_none")]
    pub listen: Option<String>,
    /// Pages, API answers and whole logs served at once, 1..=1024; more are answered 503 at
    /// once. `/healthz` and `/metrics` have a budget of their own, and so do live log streams.
    pub max_connections: u64,
    /// Live log streams (`/jobs/ID/log/stream`) served at once, 1..=1024; more are answered
    /// 503 at once (the page tries again a little later).
    pub max_streams: u64,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: None,
            max_connections: 32,
            max_streams: 64,
        }
    }
}

impl HttpConfig {
    /// The address to listen on, if the server is on.
    pub fn addr(&self) -> Result<Option<std::net::SocketAddr>, ConfigError> {
        let Some(listen) = &self.listen else {
            return Ok(None);
        };
        let bad = |why: &str| {
            ConfigError::Value(format!(
                "[http] listen = {listen:?} {why}: write an address and port, e.g. \"127.0.0.1:8080\", or a port alone (127.0.0.1)"
            ))
        };
        if let Ok(port) = listen.parse::<u16>() {
            return Ok(Some(std::net::SocketAddr::from(([127, 0, 0, 1], port))));
        }
        listen
            .parse::<std::net::SocketAddr>()
            .map(Some)
            .map_err(|_| bad("is not an address"))
    }

    fn check(&self) -> Result<(), ConfigError> {
        self.addr()?;
        for (key, v) in [
            ("max_connections", self.max_connections),
            ("max_streams", self.max_streams),
        ] {
            if !(1..=1024).contains(&v) {
                return Err(ConfigError::Value(format!(
                    "[http] {key} = {v} is out of range: it must be 1..=1024"
                )));
            }
        }
        Ok(())
    }
}

fn empty_string_is_none<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let s: Option<String> = Option::deserialize(d)?;
    Ok(s.filter(|p| !p.trim().is_empty()))
}

const WEEK_S: u64 = 7 * 24 * 3600;
const HOUR_MS: u64 = 3600 * 1000;

/// A memory size as qemu's `-m` takes it: digits (a MiB count) with an optional K, M, G or T
/// suffix (either case), not zero.
fn is_qemu_size(s: &str) -> bool {
    let digits = s
        .strip_suffix(['K', 'M', 'G', 'T', 'k', 'm', 'g', 't'])
        .unwrap_or(s);
    !digits.is_empty()
        && digits.len() <= 12
        && digits.bytes().all(|b| b.is_ascii_digit())
        && digits.bytes().any(|b| b != b'0')
}

fn is_safe_component(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with('.')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_config_has_defaults() {
        let cfg = Config::parse("", Path::new("x.toml")).unwrap();
        assert_eq!(cfg.spool.dir, PathBuf::from("spool"));
        assert_eq!(cfg.worker.workers, 1);
        assert!(cfg.worker.sudo);
        assert_eq!(cfg.worker.mic_path(), PathBuf::from("/usr/bin/mic"));
        assert_eq!(cfg.worker.fs_pack, "@NAME@.tar.bz2");
    }

    #[test]
    fn unknown_key_is_an_error() {
        let err = Config::parse("[worker]\nbase_dirr = \"/x\"\n", Path::new("c.toml")).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("base_dirr"), "{msg}");
        assert!(msg.contains("c.toml"), "{msg}");
        assert!(Config::parse("[nope]\n", Path::new("c.toml")).is_err());
    }

    #[test]
    fn mic_opts_list_or_colon_string() {
        let a = Config::parse(
            "[worker]\nmic_opts = \"--pack-to=@NAME@.tar.bz2:--copy-kernel\"\n",
            Path::new("a"),
        )
        .unwrap();
        assert_eq!(
            a.worker.mic_opts,
            vec!["--pack-to=@NAME@.tar.bz2", "--copy-kernel"]
        );
        let b = Config::parse(
            "[worker]\nmic_opts = [\"--a=b:c\", \"--d\"]\n",
            Path::new("b"),
        )
        .unwrap();
        assert_eq!(b.worker.mic_opts, vec!["--a=b:c", "--d"]);
    }

    #[test]
    fn bad_values_are_errors() {
        assert!(Config::parse("[worker]\nworkers = 0\n", Path::new("a")).is_err());
        assert!(Config::parse("[spool]\nworker_id = \"../x\"\n", Path::new("a")).is_err());
        assert!(Config::parse("[spool]\nwatch = \"sometimes\"\n", Path::new("a")).is_err());
    }

    #[test]
    fn vm_accel_values() {
        let c = Config::parse("", Path::new("a")).unwrap();
        assert_eq!(c.worker.vm_accel, VmAccel::Auto);
        let c = Config::parse("[worker]\nvm_accel = \"tcg\"\n", Path::new("a")).unwrap();
        assert_eq!(c.worker.vm_accel, VmAccel::Tcg);
        let c = Config::parse("[worker]\nvm_accel = \"kvm\"\n", Path::new("a")).unwrap();
        assert_eq!(c.worker.vm_accel, VmAccel::Kvm);
        assert!(Config::parse("[worker]\nvm_accel = \"xen\"\n", Path::new("a")).is_err());
    }

    #[test]
    fn empty_paths_are_unset() {
        let c = Config::parse(
            "[worker]\nvm_initrd = \"\"\nmic_path = \"\"\n[hooks]\npush = \"\"\n",
            Path::new("a"),
        )
        .unwrap();
        assert_eq!(c.worker.vm_initrd, None);
        assert_eq!(c.hooks.push, None);
        assert_eq!(c.worker.mic_path(), PathBuf::from("/usr/bin/mic"));
    }

    #[test]
    fn mic2_default_path() {
        let c = Config::parse("[worker]\nict = \"mic2\"\n", Path::new("a")).unwrap();
        assert_eq!(c.worker.mic_path(), PathBuf::from("mic-image-creator"));
    }

    /// Every numeric key: section, key, lowest and highest accepted value.
    const RANGES: [(&str, &str, u64, u64); 23] = [
        ("worker", "timeout", 1, 604800),
        ("worker", "grace", 0, 604800),
        ("worker", "workers", 1, 256),
        ("worker", "max_attempts", 1, 100),
        ("worker", "vm_smp", 1, 256),
        ("worker", "vm_wait", 1, 3600),
        ("worker", "vm_warm", 0, 64),
        ("worker", "job_log_max_mb", 1, 65536),
        ("worker", "stall_timeout", 0, 604800),
        ("worker", "infra_retries", 0, 100),
        ("worker", "host_record_interval", 1, 3600),
        ("spool", "poll_interval_ms", 10, 3600000),
        ("spool", "min_age_ms", 0, 3600000),
        ("spool", "max_bytes", 1, 1073741824),
        ("spool", "log_cache_mb", 1, 65536),
        ("spool", "state_min_free_mb", 0, 1048576),
        ("hooks", "timeout", 1, 86400),
        ("hooks", "retries", 0, 1000),
        ("hooks", "retry_delay_ms", 0, 86400000),
        ("hooks", "log_max_mb", 1, 65536),
        ("artifacts", "keep_days", 0, 36500),
        ("artifacts", "keep_last", 0, 1000000),
        ("artifacts", "min_free_mb", 0, 1073741824),
    ];

    fn with(section: &str, key: &str, value: &str) -> Result<Config, ConfigError> {
        // vm_warm is also bounded by workers: as many slots as there may be, for its own range
        let slots = if key == "vm_warm" {
            "workers = 256\n"
        } else {
            ""
        };
        Config::parse(
            &format!("[{section}]\n{slots}{key} = {value}\n"),
            Path::new("r.toml"),
        )
    }

    #[test]
    fn vm_warm_is_at_most_the_build_slots() {
        let c = Config::parse("[worker]\nworkers = 2\nvm_warm = 2\n", Path::new("a")).unwrap();
        assert_eq!(c.worker.vm_warm, 2);
        assert_eq!(Config::default().worker.vm_warm, 0, "0: today's behaviour");
        let e = Config::parse("[worker]\nworkers = 2\nvm_warm = 3\n", Path::new("a"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("vm_warm = 3 is more than workers = 2"), "{e}");
    }

    #[test]
    fn every_numeric_key_has_a_range() {
        assert_eq!(
            RANGES.len(),
            Config::default().numeric_keys().len(),
            "a key without a test"
        );
        for (section, key, lo, hi) in RANGES {
            for ok in [lo, hi] {
                if let Err(e) = with(section, key, &ok.to_string()) {
                    panic!("[{section}] {key} = {ok}: {e}");
                }
            }
            let mut bad = vec![hi + 1, i64::MAX as u64];
            if lo > 0 {
                bad.push(lo - 1);
            }
            for v in bad {
                let msg = match with(section, key, &v.to_string()).unwrap_err() {
                    ConfigError::Value(msg) => {
                        assert!(msg.contains(&format!("{lo}..={hi}")), "{msg}");
                        msg
                    }
                    // Beyond the field's type (a u32 key): the parser names the key and value.
                    ConfigError::Parse { message, .. } if v > u32::MAX.into() => message,
                    e => panic!("[{section}] {key} = {v}: {e:?}"),
                };
                assert!(msg.contains(key) && msg.contains(&v.to_string()), "{msg}");
            }
            // Not a u64 at all: a parse error naming the key, never a panic.
            for v in ["-1", "18446744073709551616", "99999999999999999999999"] {
                let msg = with(section, key, v).unwrap_err().to_string();
                assert!(msg.contains(key), "{key} = {v}: {msg}");
            }
        }
    }

    #[test]
    fn defaults_are_in_range() {
        let c = Config::default();
        for (key, value, lo, hi) in c.numeric_keys() {
            assert!((lo..=hi).contains(&value), "{key}");
        }
        assert!(c.check().is_ok());
    }

    #[test]
    fn http_listen() {
        let c = Config::parse("", Path::new("a")).unwrap();
        assert_eq!(c.http.addr().unwrap(), None, "off by default");
        let c = Config::parse("[http]\nlisten = \"8080\"\n", Path::new("a")).unwrap();
        assert_eq!(
            c.http.addr().unwrap(),
            Some("127.0.0.1:8080".parse().unwrap()),
            "a bare port is loopback"
        );
        let c = Config::parse("[http]\nlisten = \"0.0.0.0:9\"\n", Path::new("a")).unwrap();
        assert_eq!(c.http.addr().unwrap(), Some("0.0.0.0:9".parse().unwrap()));
        let c = Config::parse("[http]\nlisten = \"[::1]:80\"\n", Path::new("a")).unwrap();
        assert_eq!(c.http.addr().unwrap(), Some("[::1]:80".parse().unwrap()));
        let c = Config::parse("[http]\nlisten = \"\"\n", Path::new("a")).unwrap();
        assert_eq!(c.http.addr().unwrap(), None);
        for bad in ["localhost:80", "127.0.0.1", "70000", "1.2.3.4:99999", "x"] {
            let msg = Config::parse(&format!("[http]\nlisten = {bad:?}\n"), Path::new("a"))
                .unwrap_err()
                .to_string();
            assert!(msg.contains("[http] listen") && msg.contains(bad), "{msg}");
        }
        for key in ["max_connections", "max_streams"] {
            for (v, ok) in [(0, false), (1, true), (1024, true), (1025, false)] {
                let r = Config::parse(&format!("[http]\n{key} = {v}\n"), Path::new("a"));
                assert_eq!(r.is_ok(), ok, "{key} = {v}");
                if !ok {
                    let msg = r.unwrap_err().to_string();
                    assert!(msg.contains(&format!("[http] {key} = {v}")), "{msg}");
                }
            }
        }
        assert!(Config::parse("[http]\nport = 1\n", Path::new("a")).is_err());
    }

    #[test]
    fn vm_memory_is_a_qemu_size() {
        for ok in ["1G", "2048", "512M", "1t", "4096k", "16g"] {
            if let Err(e) = with("worker", "vm_memory", &format!("{ok:?}")) {
                panic!("{ok}: {e}");
            }
        }
        for bad in [
            "",
            "0",
            "0G",
            "1.5G",
            "G",
            "1GB",
            "-1G",
            "1 G",
            "1G,slots=2",
            "9999999999999G",
        ] {
            let msg = with("worker", "vm_memory", &format!("{bad:?}"))
                .unwrap_err()
                .to_string();
            assert!(msg.contains("vm_memory"), "{bad}: {msg}");
        }
    }

    /// `[amqp]` (the section belongs to `edges::amqp::config`; read as part of the config).
    #[test]
    fn the_password_is_never_shown() {
        assert_eq!(
            crate::edges::amqp::config::redact("amqp://boss:s3cret@mq.example.org:5672/%2f"),
            "amqp://boss:***@mq.example.org:5672/%2f"
        );
        assert_eq!(
            crate::edges::amqp::config::redact("amqp://boss:p@ss@h/v"),
            "amqp://boss:***@h/v"
        );
        assert_eq!(
            crate::edges::amqp::config::redact("amqp://h:5672/v"),
            "amqp://h:5672/v"
        );
        assert_eq!(crate::edges::amqp::config::redact("not a url"), "not a url");
        let cfg = Config::parse(
            "[amqp]\nurl = \"amqp://u:topsecret@h:5672/%2f\"\n",
            Path::new("t.toml"),
        )
        .unwrap();
        assert!(!format!("{cfg:?}").contains("topsecret"));
        let e = Config::parse("[amqp]\nurl = \"http://u:topsecret@h/\"\n", Path::new("t"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("not an AMQP url") && !e.contains("topsecret"),
            "{e}"
        );
    }

    #[test]
    fn queue_arguments_take_strings_integers_and_booleans() {
        use crate::edges::amqp::config::Argument;
        let cfg = Config::parse(
            "[amqp]\nqueue_arguments = { \"x-queue-type\" = \"quorum\", \"x-max-length\" = 10 }\n\
             reply_queue_arguments = { \"x-single-active-consumer\" = true }\n",
            Path::new("t"),
        )
        .unwrap();
        assert_eq!(
            cfg.amqp.queue_arguments.get("x-queue-type"),
            Some(&Argument::Text("quorum".into()))
        );
        assert_eq!(
            cfg.amqp.queue_arguments.get("x-max-length"),
            Some(&Argument::Int(10))
        );
        assert_eq!(
            cfg.amqp
                .reply_queue_arguments
                .get("x-single-active-consumer"),
            Some(&Argument::Bool(true))
        );
        assert!(
            Config::parse("", Path::new("t"))
                .unwrap()
                .amqp
                .queue_arguments
                .is_empty()
        );
        for bad in [
            "[amqp]\nqueue_arguments = { \"x-max-length\" = 1.5 }\n",
            "[amqp]\nqueue_arguments = { \"x\" = [1] }\n",
            "[amqp]\nqueue_arguments = { \"\" = 1 }\n",
            "[amqp]\nqueue_arguments = 3\n",
        ] {
            assert!(Config::parse(bad, Path::new("t")).is_err(), "{bad}");
        }
    }

    #[test]
    fn config_defaults_ranges_and_urls() {
        let cfg = Config::parse("", Path::new("t")).unwrap();
        assert_eq!(cfg.amqp.url, None);
        assert_eq!(cfg.amqp.queue, "build_image");
        assert_eq!(cfg.amqp.reply_queue, "ruote_workitems");
        assert_eq!(cfg.amqp.prefetch_for(3), 3);
        let cfg = Config::parse("[amqp]\nurl = \"\"\nprefetch = 5\n", Path::new("t")).unwrap();
        assert_eq!(cfg.amqp.url, None, "empty = unset");
        assert_eq!(cfg.amqp.prefetch_for(3), 5);
        for bad in [
            "[amqp]\nprefetch = 1001\n",
            "[amqp]\nprefetch = -1\n",
            "[amqp]\nqueue = \"\"\n",
            "[amqp]\nnope = 1\n",
            "[amqp]\nurl = \"amqps://h/\"\n",
            "[amqp]\nurl = \"amqp://:5672/\"\n",
        ] {
            assert!(Config::parse(bad, Path::new("t")).is_err(), "{bad}");
        }
        let uri =
            crate::edges::amqp::config::parse_url("amqp://u:p@mq:5673/build%2fvhost").unwrap();
        assert_eq!(
            crate::edges::amqp::config::source_label(&uri, "build_image"),
            "amqp://mq:5673/build%2Fvhost/build_image"
        );
    }
}
