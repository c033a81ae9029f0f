//! 16 fio jobs (16 NBD connections) writing and verifying with crc32c for a
//! bounded time, while the test takes a snapshot of the origin every few
//! seconds. fio must report zero verify errors.

mod nbd_support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nbd_support::{run, tool, Harness, Opts};

const JOBS: usize = 16;
const REGION: u64 = 4 << 20;
const RUNTIME_S: u64 = 20;
const SNAP_EVERY: Duration = Duration::from_secs(3);

#[test]
fn fio_16_connections_verify_under_snapshots() {
    let Some(fio) = tool("fio") else {
        return;
    };
    let h = Harness::new(Opts {
        origin_size: JOBS as u64 * REGION,
        cow_size: 1 << 30,
        ..Opts::default()
    });
    let stop = Arc::new(AtomicBool::new(false));
    let snapper = {
        let (store, stop) = (h.store.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut tags = Vec::new();
            let mut worst = Duration::ZERO;
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(SNAP_EVERY);
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let t = Instant::now();
                let tag = store
                    .snapshot(
                        "o",
                        None,
                        &format!("during fio #{}", tags.len()),
                        nbd_support::now(),
                    )
                    .expect("snapshot under load");
                worst = worst.max(t.elapsed());
                tags.push(tag);
            }
            (tags, worst)
        })
    };
    let uri = h.uri("o");
    let runtime = RUNTIME_S.to_string();
    let args = [
        "--name=verify",
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        "--thread",
        &format!("--numjobs={JOBS}"),
        &format!("--size={REGION}"),
        &format!("--offset_increment={REGION}"),
        "--rw=randrw",
        "--rwmixread=30",
        "--bsrange=4k-128k",
        "--iodepth=8",
        "--verify=crc32c",
        "--verify_backlog=64",
        "--verify_fatal=1",
        // No verify-state files in the working directory.
        "--verify_state_save=0",
        "--time_based",
        &format!("--runtime={runtime}"),
        "--group_reporting",
        "--output-format=json",
    ];
    let t0 = Instant::now();
    let out = run(&fio, &args, Duration::from_secs(RUNTIME_S + 60));
    let elapsed = t0.elapsed();
    stop.store(true, Ordering::Relaxed);
    let (tags, worst) = snapper.join().unwrap();
    assert!(out.ok, "fio failed\n{out}");
    let json = &out.stdout;
    let num = |key: &str| -> Vec<u64> {
        json.match_indices(&format!("\"{key}\" : "))
            .filter_map(|(i, m)| {
                let rest = &json[i + m.len()..];
                rest.split(|c: char| !c.is_ascii_digit())
                    .next()?
                    .parse()
                    .ok()
            })
            .collect()
    };
    let errs = num("error");
    assert!(!errs.is_empty(), "no error counts in fio's JSON\n{out}");
    let errors: u64 = errs.iter().sum();
    let ios: u64 = num("total_ios").iter().sum();
    println!(
        "fio: {JOBS} connections for {elapsed:?}, {ios} I/Os, {errors} errors; \
         {} snapshots taken during the run (slowest {worst:?})",
        tags.len()
    );
    assert_eq!(errors, 0, "fio reported errors\n{out}");
    assert!(!out.stderr.contains("verify: bad"), "{out}");
    assert!(ios > 0, "fio did no I/O\n{out}");
    assert!(
        tags.len() >= (RUNTIME_S as usize / 3) - 1,
        "too few snapshots: {tags:?}"
    );

    // Every snapshot taken under load reads back whole, and the newest
    // snapshot equals the origin now that writes have stopped.
    let size = (JOBS as u64 * REGION) as usize;
    for t in &tags {
        let _ = h.read(&format!("o@{t}"), 0, size);
    }
    let last = h.snapshot("after fio");
    assert!(h.read(&format!("o@{last}"), 0, size) == h.read("o", 0, size));
}
