//! `scale_gen`: build and probe a COW device with many exceptions, for
//! `benches/scale.sh` (see `benches/SCALE.md`).
//!
//! ```text
//! scale_gen gen  --cow COW --origin ORIGIN --exceptions N [--chunk-size 4096]
//!                [--cow-size 8G] [--origin-size 1T] [--run 16] [--data M] [--id vol]
//! scale_gen open --cow COW [--origin PATH]
//! scale_gen read --cow COW [--origin PATH] [--tag 1] [--secs 10] [--threads 1] [--bs 4096]
//! scale_gen wait --unix SOCKET --t0 EPOCH_SECONDS [--pid PID]
//! scale_gen check --cow COW [--part store|meta]
//! scale_gen status --cow COW [--origin PATH]
//! ```
//!
//! `gen` creates both files sparse (it refuses existing ones), formats the
//! COW device, binds the origin as `--id`, takes one snapshot of it (tag 1)
//! and gives that snapshot exactly N exceptions through the engine's public
//! API: runs of `--run` consecutive chunks, spread evenly over the whole
//! origin (so random reads anywhere on the snapshot touch every part of the
//! exception tree), each run made a zero exception with one
//! `Volume::write_zeroes` (no data chunk, no data I/O). `--data M` turns the
//! first chunk of M evenly spaced runs into a real data chunk instead (a
//! whole-chunk `Volume::write`, one data chunk on the COW device each). Then
//! a clean close. It prints the layout, its time, and one `RESULT` line.
//!
//! `open` times `Store::open` (writable, as `snapmv serve` opens) and
//! `Store::close`, and prints the process's peak RSS after the open.
//!
//! `read` opens the store and reads random `--bs` blocks of snapshot
//! `--tag` through `Volume::read` on `--threads` threads for `--secs`
//! seconds: the engine's read path with no NBD in between; prints reads/s
//! and RSS once a second.
//!
//! `check` runs the engine's checker alone, read-only: `store::check`
//! (what `snapmv check` runs: the metadata walk, then the store's own
//! invariants) or, with `--part meta`, only `meta::check` (the metadata
//! walk); it prints its time and the process's peak RSS. `snapmv check`
//! does more than this (it also opens the store to look at the origin
//! devices), so the difference is the frontend's share.
//!
//! `status` opens the store read-only and times one `Store::status()` (the
//! space accounting behind `snapmv list`, which resolves every live
//! snapshot chunk by chunk over the exceptions), with RSS before and after.
//!
//! `wait` connects to the Unix socket every millisecond until it accepts
//! (giving up when process `--pid` is gone, or after 300 s), and prints
//! the milliseconds since `--t0` (e.g. `date +%s.%N` taken just before the
//! server was started): a start-up timer with no interpreter start-up of
//! its own in the measurement.
//!
//! Output lines starting with `RESULT ` are `key=value` pairs for scripts.

use snapmv_engine::dev::OpenOptions;
use snapmv_engine::store::{Dev, FormatOptions, Store};
use snapmv_engine::FileDev;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

type Res<T> = Result<T, String>;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((cmd, rest)) = args.split_first() else {
        eprintln!("usage: scale_gen gen|open|read --cow COW ... (see the source's header)");
        return ExitCode::from(2);
    };
    let r = parse_flags(rest).and_then(|f| match cmd.as_str() {
        "gen" => gen(&f),
        "open" => open_time(&f),
        "read" => read(&f),
        "wait" => wait_socket(&f),
        "check" => check(&f),
        "status" => status(&f),
        other => Err(format!("unknown command {other}")),
    });
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("scale_gen {cmd}: {e}");
            ExitCode::FAILURE
        }
    }
}

struct Flags(HashMap<String, String>);

fn parse_flags(args: &[String]) -> Res<Flags> {
    let mut m = HashMap::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let k = a
            .strip_prefix("--")
            .ok_or_else(|| format!("expected --flag, got {a}"))?;
        let (k, v) = match k.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (
                k.to_string(),
                it.next()
                    .ok_or_else(|| format!("--{k} needs a value"))?
                    .clone(),
            ),
        };
        m.insert(k, v);
    }
    Ok(Flags(m))
}

impl Flags {
    fn str(&self, k: &str) -> Option<&str> {
        self.0.get(k).map(|s| s.as_str())
    }
    fn path(&self, k: &str) -> Res<PathBuf> {
        self.str(k)
            .map(PathBuf::from)
            .ok_or_else(|| format!("--{k} is required"))
    }
    /// A count or size; accepts K/M/G/T suffixes (powers of 1024) and `_`.
    fn num(&self, k: &str, default: u64) -> Res<u64> {
        match self.str(k) {
            None => Ok(default),
            Some(s) => parse_num(s).ok_or_else(|| format!("--{k}: cannot parse {s:?}")),
        }
    }
}

fn parse_num(s: &str) -> Option<u64> {
    let s = s.replace('_', "");
    let (digits, mul) = match s.chars().last()?.to_ascii_uppercase() {
        'K' => (&s[..s.len() - 1], 1u64 << 10),
        'M' => (&s[..s.len() - 1], 1 << 20),
        'G' => (&s[..s.len() - 1], 1 << 30),
        'T' => (&s[..s.len() - 1], 1 << 40),
        _ => (&s[..], 1),
    };
    digits.parse::<u64>().ok()?.checked_mul(mul)
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// VmRSS and VmHWM of this process, in KiB.
fn rss_kib() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn file_dev(path: &Path, create_size: Option<u64>) -> Res<Dev> {
    let opts = OpenOptions {
        create_size,
        ..OpenOptions::default()
    };
    FileDev::open(path, &opts)
        .map(|d| Arc::new(d) as Dev)
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// Open the store on `cow` the way `snapmv serve` does (writable); the
/// origin from `--origin` if given, else from the path recorded at bind.
fn open_store(f: &Flags) -> Res<Store> {
    let cow = f.path("cow")?;
    let over = f.str("origin").map(PathBuf::from);
    let dev = file_dev(&cow, None)?;
    let mut resolver = |_id: &str, recorded: &str| -> snapmv_engine::Result<Dev> {
        let p = over.clone().unwrap_or_else(|| PathBuf::from(recorded));
        Ok(Arc::new(FileDev::open(&p, &OpenOptions::default())?) as Dev)
    };
    Store::open(dev, &mut resolver).map_err(|e| format!("open {}: {e}", cow.display()))
}

fn check(f: &Flags) -> Res<()> {
    let cow = f.path("cow")?;
    let part = f.str("part").unwrap_or("store").to_string();
    let dev: Dev = Arc::new(
        FileDev::open(
            &cow,
            &OpenOptions {
                read_only: true,
                ..OpenOptions::default()
            },
        )
        .map_err(|e| format!("{}: {e}", cow.display()))?,
    );
    let t0 = Instant::now();
    let rep = match part.as_str() {
        "store" => snapmv_engine::store::check(dev),
        "meta" => snapmv_engine::meta::check(dev),
        other => return Err(format!("--part {other}: store or meta")),
    }
    .map_err(|e| format!("check: {e}"))?;
    let el = t0.elapsed().as_secs_f64();
    let (_, hwm) = rss_kib();
    println!(
        "{part}::check {el:.2} s, peak RSS {:.0} MiB: {} errors, {} pages, {} exceptions",
        mib(hwm),
        rep.errors.len(),
        rep.pages_checked,
        rep.exceptions
    );
    for e in rep.errors.iter().take(10) {
        println!("  {e}");
    }
    println!(
        "RESULT part={part} secs={el:.3} hwm_kib={hwm} errors={} pages={} exceptions={}",
        rep.errors.len(),
        rep.pages_checked,
        rep.exceptions
    );
    if rep.errors.is_empty() {
        Ok(())
    } else {
        Err("damage found".into())
    }
}

fn status(f: &Flags) -> Res<()> {
    let cow = f.path("cow")?;
    let over = f.str("origin").map(PathBuf::from);
    let ro = OpenOptions {
        read_only: true,
        ..OpenOptions::default()
    };
    let dev: Dev =
        Arc::new(FileDev::open(&cow, &ro).map_err(|e| format!("{}: {e}", cow.display()))?);
    let mut resolver = |_id: &str, recorded: &str| -> snapmv_engine::Result<Dev> {
        let p = over.clone().unwrap_or_else(|| PathBuf::from(recorded));
        Ok(Arc::new(FileDev::open(&p, &ro)?) as Dev)
    };
    let t0 = Instant::now();
    let store = Store::open_read_only(dev, &mut resolver)
        .map_err(|e| format!("open {}: {e}", cow.display()))?;
    let t_open = t0.elapsed().as_secs_f64();
    let (rss0, _) = rss_kib();
    let t1 = Instant::now();
    let st = store.status();
    let t_status = t1.elapsed().as_secs_f64();
    let (rss1, hwm) = rss_kib();
    let snaps: usize = st.origins.iter().map(|o| o.snapshots.len()).sum();
    store.close().map_err(|e| format!("close: {e}"))?;
    println!(
        "open (read-only) {:.1} ms; status() {:.2} s ({} origins, {snaps} snapshots, {} chunks used); \
         RSS {:.1} -> {:.1} MiB (peak {:.1})",
        t_open * 1e3,
        t_status,
        st.origins.len(),
        st.chunks_used,
        mib(rss0),
        mib(rss1),
        mib(hwm)
    );
    println!(
        "RESULT open_ms={:.3} status_s={t_status:.3} rss_before_kib={rss0} rss_after_kib={rss1} hwm_kib={hwm}",
        t_open * 1e3
    );
    Ok(())
}

fn gen(f: &Flags) -> Res<()> {
    let cow = f.path("cow")?;
    let origin = f.path("origin")?;
    let n = f.num("exceptions", 10_000)?;
    let cs = f.num("chunk-size", 4096)?;
    let cow_size = f.num("cow-size", 8 << 30)?;
    let origin_size = f.num("origin-size", 1 << 40)?;
    let run = f.num("run", 16)?.max(1);
    let data = f.num("data", 0)?;
    let id = f.str("id").unwrap_or("vol").to_string();
    for p in [&cow, &origin] {
        if p.exists() {
            return Err(format!("{} exists; remove it first", p.display()));
        }
    }
    let origin_chunks = origin_size / cs;
    let runs = n.div_ceil(run);
    if n == 0 || runs == 0 {
        return Err("--exceptions must be at least 1".into());
    }
    let stride = origin_chunks / runs;
    if stride < run {
        return Err(format!(
            "{n} exceptions in runs of {run} do not fit in {origin_chunks} chunks"
        ));
    }
    if data > runs {
        return Err(format!("--data {data} is more than the {runs} runs"));
    }
    println!(
        "layout: {n} exceptions on snapshot {id}@1, {runs} runs of {run} chunks of {cs} B, \
         one every {stride} chunks ({} KiB) over a {} GiB origin; {data} of them data chunks",
        stride * cs / 1024,
        origin_size >> 30
    );

    let t0 = Instant::now();
    let cow_dev = file_dev(&cow, Some(cow_size))?;
    let origin_dev = file_dev(&origin, Some(origin_size))?;
    let store = Store::format(
        cow_dev,
        &FormatOptions {
            chunk_size: cs as u32,
            force: false,
        },
    )
    .map_err(|e| format!("format: {e}"))?;
    let opath = std::fs::canonicalize(&origin).map_err(|e| e.to_string())?;
    store
        .bind(&id, &opath.display().to_string(), origin_dev, now())
        .map_err(|e| format!("bind: {e}"))?;
    let tag = store
        .snapshot(&id, None, "scale", now())
        .map_err(|e| format!("snapshot: {e}"))?;
    let vol = store.volume(&id, Some(tag)).map_err(|e| e.to_string())?;

    // Data runs: run index floor(j * runs / data) for j in 0..data.
    let mut next_data = 0u64;
    let data_run = |j: u64| j * runs / data.max(1);
    let mut buf = vec![0u8; cs as usize];
    let mut made = 0u64;
    let mut last_report = Instant::now();
    for i in 0..runs {
        let len = run.min(n - made);
        let first = i * stride;
        let mut zero_from = first;
        if next_data < data && data_run(next_data) == i {
            // A recognisable pattern: the chunk number in every 8 bytes.
            for w in buf.chunks_exact_mut(8) {
                w.copy_from_slice(&first.to_le_bytes());
            }
            vol.write(first * cs, &buf, false)
                .map_err(|e| format!("write chunk {first}: {e}"))?;
            next_data += 1;
            zero_from += 1;
        }
        let zlen = first + len - zero_from;
        if zlen > 0 {
            vol.write_zeroes(zero_from * cs, zlen * cs, false)
                .map_err(|e| format!("write_zeroes at chunk {zero_from}: {e}"))?;
        }
        made += len;
        if last_report.elapsed() >= Duration::from_secs(10) {
            last_report = Instant::now();
            let (rss, hwm) = rss_kib();
            println!(
                "  {made} / {n} exceptions, {:.0} s, {:.0} exceptions/s, RSS {:.0} MiB (peak {:.0})",
                t0.elapsed().as_secs_f64(),
                made as f64 / t0.elapsed().as_secs_f64(),
                mib(rss),
                mib(hwm)
            );
        }
    }
    let t_fill = t0.elapsed();
    let t1 = Instant::now();
    store.close().map_err(|e| format!("close: {e}"))?;
    let t_close = t1.elapsed();
    let total = t0.elapsed();
    let (_, hwm) = rss_kib();
    let used = std::fs::metadata(&cow)
        .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
        .unwrap_or(0);
    println!(
        "made {made} exceptions ({next_data} data) in {:.1} s ({:.0}/s), close {:.1} s, \
         total {:.1} s; peak RSS {:.0} MiB; COW file {:.0} MiB allocated",
        t_fill.as_secs_f64(),
        made as f64 / t_fill.as_secs_f64(),
        t_close.as_secs_f64(),
        total.as_secs_f64(),
        mib(hwm),
        used as f64 / 1048576.0
    );
    println!(
        "RESULT exceptions={made} data={next_data} runs={runs} run={run} stride={stride} \
         chunk_size={cs} gen_s={:.3} close_s={:.3} total_s={:.3} peak_rss_kib={hwm} cow_alloc_bytes={used}",
        t_fill.as_secs_f64(),
        t_close.as_secs_f64(),
        total.as_secs_f64()
    );
    Ok(())
}

fn open_time(f: &Flags) -> Res<()> {
    let (_, hwm0) = rss_kib();
    let t0 = Instant::now();
    let store = open_store(f)?;
    let t_open = t0.elapsed();
    let (rss, hwm) = rss_kib();
    let t1 = Instant::now();
    store.close().map_err(|e| format!("close: {e}"))?;
    let t_close = t1.elapsed();
    println!(
        "Store::open {:.1} ms, Store::close {:.1} ms; RSS after open {:.1} MiB (peak {:.1}, \
         {:.1} before the open)",
        t_open.as_secs_f64() * 1e3,
        t_close.as_secs_f64() * 1e3,
        mib(rss),
        mib(hwm),
        mib(hwm0)
    );
    println!(
        "RESULT open_ms={:.3} close_ms={:.3} rss_after_open_kib={rss} hwm_after_open_kib={hwm} hwm_before_kib={hwm0}",
        t_open.as_secs_f64() * 1e3,
        t_close.as_secs_f64() * 1e3
    );
    Ok(())
}

fn read(f: &Flags) -> Res<()> {
    let store = open_store(f)?;
    let id = f.str("id").unwrap_or("vol").to_string();
    let tag = f.num("tag", 1)?;
    let secs = f.num("secs", 10)?;
    let threads = f.num("threads", 1)?.max(1);
    let bs = f.num("bs", 4096)?;
    let vol = store
        .volume(&id, if tag == 0 { None } else { Some(tag) })
        .map_err(|e| e.to_string())?;
    let blocks = vol.size() / bs;
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let (_, hwm0) = rss_kib();
    let t0 = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (vol, stop, count) = (vol.clone(), stop.clone(), count.clone());
            std::thread::spawn(move || -> Res<()> {
                let mut buf = vec![0u8; bs as usize];
                let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ (t + 1);
                while !stop.load(Ordering::Relaxed) {
                    for _ in 0..64 {
                        // splitmix64
                        x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
                        let mut z = x;
                        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                        z ^= z >> 31;
                        vol.read((z % blocks) * bs, &mut buf)
                            .map_err(|e| e.to_string())?;
                    }
                    count.fetch_add(64, Ordering::Relaxed);
                }
                Ok(())
            })
        })
        .collect();
    let mut prev = 0;
    for s in 1..=secs {
        std::thread::sleep(Duration::from_secs(1));
        let c = count.load(Ordering::Relaxed);
        let (rss, hwm) = rss_kib();
        println!(
            "  {s:>3} s: {:>8} reads/s, RSS {:.1} MiB (peak {:.1})",
            c - prev,
            mib(rss),
            mib(hwm)
        );
        prev = c;
    }
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.join().map_err(|_| "reader panicked".to_string())??;
    }
    let el = t0.elapsed().as_secs_f64();
    let total = count.load(Ordering::Relaxed);
    let (rss, hwm) = rss_kib();
    store.close().map_err(|e| format!("close: {e}"))?;
    println!(
        "RESULT reads={total} secs={el:.3} reads_per_s={:.0} threads={threads} rss_kib={rss} hwm_kib={hwm} hwm_before_kib={hwm0}",
        total as f64 / el
    );
    Ok(())
}

fn wait_socket(f: &Flags) -> Res<()> {
    let path = f.path("unix")?;
    let t0: f64 = f
        .str("t0")
        .ok_or("--t0 is required")?
        .parse()
        .map_err(|e| format!("--t0: {e}"))?;
    let pid = f.num("pid", 0)?;
    let start = Instant::now();
    loop {
        if std::os::unix::net::UnixStream::connect(&path).is_ok() {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0);
            println!("{:.1}", (now - t0) * 1e3);
            return Ok(());
        }
        if pid != 0 && !Path::new(&format!("/proc/{pid}")).exists() {
            return Err(format!(
                "process {pid} exited before {} accepted",
                path.display()
            ));
        }
        if start.elapsed() > Duration::from_secs(300) {
            return Err(format!("{} did not accept within 300 s", path.display()));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}
