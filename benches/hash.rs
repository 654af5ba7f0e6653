//! P9 (docs/PERFORMANCE.md): hashing a build's image, against coreutils' `sha256sum` on the same
//! file in the same run.
//!
//! A job folder is prepared as the daemon prepares one (`imaging::prepare`), an image of
//! P9_MB MiB (default 2048) of pseudo-random bytes is written into it (once; kept under
//! BENCH_DATA_DIR, default `<target>/bench-data`), and then, BENCH_RUNS times (default 5), in
//! pairs whose order alternates: `sha256sum IMAGE` (a child process, its output checked) and
//! `Prepared::seal` (the daemon's own step after mic: every file of the build hashed in one pass,
//! `SHA256SUMS` written tmp + fsync + rename). Both read the file from the page cache (the
//! image is read once before the runs), so what is compared is the hashing, not the disk.
//!
//! Also counted, from `/proc/self/io` (`rchar`: bytes this process read through read(2)): the
//! bytes one `seal` reads, which must be the image's size once (plus its small files): the image
//! is never read a second time for the statement or the sums.

mod common;

use build_image::domain::workitem;
use build_image::imaging;
use common::{env_u64, met, runs, stats};
use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

/// Bytes this process has read through read(2) so far.
fn rchar() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("rchar: ").map(|v| v.trim().parse().ok()))
                .flatten()
        })
        .expect("/proc/self/io has rchar")
}

/// Writes `mb` MiB of xorshift bytes to `path` (not zeros: nothing on the way may shortcut them).
fn make_image(path: &Path, mb: u64) {
    let tmp = path.with_extension("partial");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp).expect("create the image"));
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..mb {
        for chunk in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
        }
        f.write_all(&buf).expect("write the image");
    }
    f.into_inner()
        .expect("flush the image")
        .sync_all()
        .expect("sync the image");
    std::fs::rename(&tmp, path).expect("rename the image");
}

fn main() {
    let mb = env_u64("P9_MB", 2048);
    let base = common::data_dir().join("p9");
    let w = build_image::config::WorkerConfig {
        base_dir: base.clone(),
        base_url: "http://img.example.org/images".into(),
        ..build_image::config::WorkerConfig::default()
    };
    let spec = workitem::normalise(&common::workitem("p9-hash", "# P9\n"))
        .expect("the bench workitem is valid");
    let prepared = imaging::prepare(&w, &spec, 1).expect("prepare the job folder");
    let image = prepared.dir().join(format!("p9-{mb}.raw"));
    let want_len = mb << 20;
    if std::fs::metadata(&image).map(|m| m.len()).ok() != Some(want_len) {
        eprintln!("P9: writing a {mb} MiB image to {}", image.display());
        make_image(&image, mb);
    }
    // into the page cache, for both
    let (want, _) = build_image::artifacts::sums::hash_reader(
        std::fs::File::open(&image).expect("open the image"),
    )
    .expect("read the image");

    let n = runs();
    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    let mut read_per_seal = Vec::new();
    for i in 0..n {
        let mut run_ours = || {
            let before = rchar();
            let t = Instant::now();
            let sealed = prepared.seal(&image).expect("seal");
            let secs = t.elapsed().as_secs_f64();
            read_per_seal.push(rchar() - before);
            assert_eq!(sealed.image_sha256, want);
            ours.push(mb as f64 / secs);
        };
        let mut run_theirs = || {
            let t = Instant::now();
            let out = Command::new("sha256sum")
                .arg(&image)
                .output()
                .expect("run sha256sum");
            let secs = t.elapsed().as_secs_f64();
            assert!(out.status.success(), "{out:?}");
            assert_eq!(&out.stdout[..64], want.as_bytes());
            theirs.push(mb as f64 / secs);
        };
        if i % 2 == 0 {
            run_ours();
            run_theirs();
        } else {
            run_theirs();
            run_ours();
        }
    }
    let (o, t) = (stats(&ours), stats(&theirs));
    let ratio = o.median / t.median;
    let read = stats(&read_per_seal.iter().map(|b| *b as f64).collect::<Vec<_>>());
    println!("P9 hash, one {mb} MiB image, {n} pairs (order alternating), from the page cache");
    println!(
        "  seal (hash every build file once + SHA256SUMS): {}",
        o.show(0, " MiB/s")
    );
    println!(
        "  sha256sum (coreutils, same file):              {}",
        t.show(0, " MiB/s")
    );
    println!(
        "  ratio seal / sha256sum (medians): {ratio:.2}x (goal >= 0.9x: {})",
        met(ratio >= 0.9)
    );
    println!(
        "  bytes one seal read: {:.0} (the image is {want_len}: {:.4} reads of it)",
        read.median,
        read.median / want_len as f64
    );
    let _ = prepared.release();
}
