//! `diff_bench`: build a COW device with many snapshots and exceptions,
//! then time `Store::diff` on it, for `benches/diff.sh` (see
//! `benches/DIFF.md`).
//!
//! ```text
//! diff_bench gen --cow COW --origin ORIGIN [--origin-size 1T] [--snapshots 10000]
//!                [--hot 30] [--zeroed-every 10] [--zeroed 700] [--burst-after 5005]
//!                [--burst 100000] [--cow-size 8G]
//! diff_bench measure --cow COW[,COW...] [--rounds 5] [--burst-after 5005]
//!                    [--cache-budget BYTES]
//! ```
//!
//! `gen` goes through the engine's public API only, 4 KiB chunks: format,
//! bind a sparse origin as `vol`, then `--snapshots` snapshots of the
//! origin. After each one the origin rewrites `--hot` chunks (spread over
//! the device): the first write after a snapshot copies the chunk, so each
//! hot chunk ends with one exception per snapshot, thousands in one chunk.
//! Every `--zeroed-every`-th snapshot has `--zeroed` chunks zeroed (zero
//! exceptions of its own, no data), each alone in its chunk, spread over
//! the device. After snapshot `--burst-after` the origin writes `--burst`
//! chunks spread over the device (one copy each). Then a clean close.
//!
//! `measure` opens each store read-only (default page-cache budget, as
//! `snapmv serve` runs, unless `--cache-budget`) and times each diff case:
//! the first call, then the median and minimum of `--rounds` more, the
//! devices taking turns call by call (others' load falls on them alike).
//! It also times `block_status` of one snapshot over 1 GiB, a walk that
//! resolves every chunk, as the reference for what a diff that went chunk
//! by chunk would cost.
//! Lines starting with `RESULT ` are `key=value` pairs for scripts.

use snapmv_engine::dev::OpenOptions;
use snapmv_engine::store::{Dev, DiffStrategy, FormatOptions, Store};
use snapmv_engine::FileDev;
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

type Res<T> = Result<T, String>;

const CS: u64 = 4096;
const ID: &str = "vol";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((cmd, rest)) = args.split_first() else {
        eprintln!("usage: diff_bench gen|measure --cow COW ... (see the source's header)");
        return ExitCode::from(2);
    };
    let r = Flags::parse(rest).and_then(|f| match cmd.as_str() {
        "gen" => gen(&f),
        "measure" => measure(&f),
        other => Err(format!("unknown command {other}")),
    });
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("diff_bench {cmd}: {e}");
            ExitCode::FAILURE
        }
    }
}

struct Flags(HashMap<String, String>);

impl Flags {
    fn parse(args: &[String]) -> Res<Flags> {
        let mut m = HashMap::new();
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let k = a
                .strip_prefix("--")
                .ok_or_else(|| format!("expected --flag, got {a}"))?;
            let v = it.next().ok_or_else(|| format!("--{k} needs a value"))?;
            m.insert(k.to_string(), v.clone());
        }
        Ok(Flags(m))
    }

    fn path(&self, k: &str) -> Res<PathBuf> {
        self.0
            .get(k)
            .map(PathBuf::from)
            .ok_or_else(|| format!("--{k} is required"))
    }

    /// A count or size; K/M/G/T suffixes are powers of 1024.
    fn num(&self, k: &str, default: u64) -> Res<u64> {
        let Some(s) = self.0.get(k) else {
            return Ok(default);
        };
        let s = s.replace('_', "");
        let (digits, shift) = match s.chars().last() {
            Some('K') => (&s[..s.len() - 1], 10),
            Some('M') => (&s[..s.len() - 1], 20),
            Some('G') => (&s[..s.len() - 1], 30),
            Some('T') => (&s[..s.len() - 1], 40),
            _ => (&s[..], 0),
        };
        digits
            .parse::<u64>()
            .map(|n| n << shift)
            .map_err(|_| format!("--{k}: cannot parse {s:?}"))
    }
}

fn file_dev(path: &PathBuf, create_size: Option<u64>, read_only: bool) -> Res<Dev> {
    let opts = OpenOptions {
        create_size,
        read_only,
        ..OpenOptions::default()
    };
    FileDev::open(path, &opts)
        .map(|d| Arc::new(d) as Dev)
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// The history `gen` writes.
struct Plan {
    chunks: u64,
    snapshots: u64,
    hot: u64,
    zeroed_every: u64,
    zeroed: u64,
    burst_after: u64,
    burst: u64,
}

impl Plan {
    // Offsets 1, 3 and 5 keep the three kinds from landing side by side
    // (where their extents would merge) when the strides are long.
    fn hot_chunk(&self, h: u64) -> u64 {
        h * (self.chunks / self.hot.max(1)) + 1
    }

    /// The k-th zeroed chunk of the z-th zeroed snapshot.
    fn zeroed_chunk(&self, z: u64, k: u64) -> u64 {
        let total = (self.snapshots / self.zeroed_every.max(1)) * self.zeroed;
        (z * self.zeroed + k) * (self.chunks / total.max(1)) + 3
    }

    fn burst_chunk(&self, b: u64) -> u64 {
        b * (self.chunks / self.burst.max(1)) + 5
    }

    /// Exceptions the history makes (every hot write after a snapshot
    /// copies; zeroed and burst chunks are distinct).
    fn exceptions(&self) -> u64 {
        self.snapshots * self.hot
            + (self.snapshots / self.zeroed_every.max(1)) * self.zeroed
            + self.burst
    }
}

fn gen(f: &Flags) -> Res<()> {
    let (cow, origin) = (f.path("cow")?, f.path("origin")?);
    for p in [&cow, &origin] {
        if p.exists() {
            return Err(format!("{} exists; remove it first", p.display()));
        }
    }
    let plan = Plan {
        chunks: f.num("origin-size", 1 << 40)? / CS,
        snapshots: f.num("snapshots", 10_000)?,
        hot: f.num("hot", 30)?,
        zeroed_every: f.num("zeroed-every", 10)?.max(1),
        zeroed: f.num("zeroed", 700)?,
        burst_after: f.num("burst-after", 5005)?,
        burst: f.num("burst", 100_000)?,
    };
    let t0 = Instant::now();
    let fo = FormatOptions {
        chunk_size: CS as u32,
        force: false,
    };
    let store = Store::format(
        file_dev(&cow, Some(f.num("cow-size", 8 << 30)?), false)?,
        &fo,
    )
    .map_err(|e| format!("format: {e}"))?;
    let odev = file_dev(&origin, Some(plan.chunks * CS), false)?;
    let opath = std::fs::canonicalize(&origin).map_err(|e| e.to_string())?;
    store
        .bind(ID, &opath.display().to_string(), odev, 0)
        .map_err(|e| format!("bind: {e}"))?;
    let vol = store.volume(ID, None).map_err(|e| e.to_string())?;
    let mut last_report = Instant::now();
    for i in 1..=plan.snapshots {
        let tag = store
            .snapshot(ID, None, "", i as i64)
            .map_err(|e| format!("snapshot {i}: {e}"))?;
        assert_eq!(tag, i, "tags count from 1");
        let stamp = [(i % 251) as u8 + 1; CS as usize];
        for h in 0..plan.hot {
            let c = plan.hot_chunk(h);
            vol.write(c * CS, &stamp, false)
                .map_err(|e| e.to_string())?;
        }
        if i % plan.zeroed_every == 0 {
            let snap = store.volume(ID, Some(tag)).map_err(|e| e.to_string())?;
            let z = i / plan.zeroed_every - 1;
            for k in 0..plan.zeroed {
                let c = plan.zeroed_chunk(z, k);
                snap.write_zeroes(c * CS, CS, false)
                    .map_err(|e| format!("zero chunk {c}: {e}"))?;
            }
        }
        if i == plan.burst_after {
            for b in 0..plan.burst {
                let c = plan.burst_chunk(b);
                vol.write(c * CS, &stamp, false)
                    .map_err(|e| e.to_string())?;
            }
        }
        if last_report.elapsed() >= Duration::from_secs(10) {
            last_report = Instant::now();
            println!("  {i} snapshots, {:.0} s", t0.elapsed().as_secs_f64());
        }
    }
    store.close().map_err(|e| format!("close: {e}"))?;
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "made {} snapshots and {} exceptions over {} chunks in {secs:.1} s",
        plan.snapshots,
        plan.exceptions(),
        plan.chunks
    );
    println!(
        "RESULT snapshots={} exceptions={} chunks={} hot={} zeroed_every={} zeroed={} \
         burst_after={} burst={} gen_s={secs:.3}",
        plan.snapshots,
        plan.exceptions(),
        plan.chunks,
        plan.hot,
        plan.zeroed_every,
        plan.zeroed,
        plan.burst_after,
        plan.burst
    );
    Ok(())
}

/// One diff to time: versions (None: the origin) and a byte range.
struct Case {
    name: &'static str,
    from: Option<u64>,
    to: Option<u64>,
    offset: u64,
    len: u64,
}

/// A snapshot an eighth of the way in that was not zeroed (with
/// `--zeroed-every 10`), nor next to the burst.
fn plain_tag(snapshots: u64) -> u64 {
    snapshots / 8 / 10 * 10 + 4
}

fn cases(size: u64, snapshots: u64, burst_after: u64) -> Vec<Case> {
    let n = snapshots;
    let plain = plain_tag(n);
    let whole = |name, from, to| Case {
        name,
        from,
        to,
        offset: 0,
        len: size,
    };
    let mid = size / 2 / CS * CS;
    vec![
        whole("adjacent, few changed", Some(plain), Some(plain + 1)),
        whole("adjacent, one zeroed", Some(plain - 4), Some(plain - 3)),
        whole(
            "adjacent, burst between",
            Some(burst_after),
            Some(burst_after + 1),
        ),
        whole("first and last", Some(1), Some(n)),
        whole("last and origin", Some(n), None),
        whole("first and origin", Some(1), None),
        Case {
            name: "burst pair, 64 MiB window",
            from: Some(burst_after),
            to: Some(burst_after + 1),
            offset: mid,
            len: 64 << 20,
        },
        Case {
            name: "burst pair, 1 GiB window",
            from: Some(burst_after),
            to: Some(burst_after + 1),
            offset: mid,
            len: 1 << 30,
        },
    ]
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// One device under measurement.
struct Device {
    name: String,
    store: Store,
    size: u64,
    snapshots: u64,
}

fn open_device(path: &str, budget: Option<u64>) -> Res<Device> {
    let mut resolver = |_id: &str, recorded: &str| -> snapmv_engine::Result<Dev> {
        let ro = OpenOptions {
            read_only: true,
            ..OpenOptions::default()
        };
        Ok(Arc::new(FileDev::open(recorded, &ro)?) as Dev)
    };
    let t0 = Instant::now();
    let store = Store::open_read_only(file_dev(&PathBuf::from(path), None, true)?, &mut resolver)
        .map_err(|e| format!("open {path}: {e}"))?;
    let open_ms = t0.elapsed().as_secs_f64() * 1e3;
    if let Some(b) = budget {
        store.set_cache_budget(b);
    }
    let size = store.volume(ID, None).map_err(|e| e.to_string())?.size();
    let snapshots = store.versions().len() as u64 - 1;
    let name = match size >> 30 {
        g if g >= 1024 => format!("{} TiB", g >> 10),
        g => format!("{g} GiB"),
    };
    println!(
        "{path}: opened in {open_ms:.0} ms; {snapshots} snapshots, {name} origin ({} chunks of {CS} B)",
        size / CS
    );
    Ok(Device {
        name,
        store,
        size,
        snapshots,
    })
}

/// Times of one case on one device: the first call (ms, extents, bytes),
/// then the others' ms.
#[derive(Default)]
struct Timing {
    first: Option<(f64, usize, u64)>,
    runs: Vec<f64>,
}

/// Run `case` on `d`, checking it gives the answer it gave first.
fn time_case(d: &Device, c: &Case, t: &mut Timing) -> Res<()> {
    let start = Instant::now();
    let got = d
        .store
        .diff(ID, c.from, c.to, c.offset, c.len)
        .map_err(|e| format!("{}: {e}", c.name))?;
    let ms = start.elapsed().as_secs_f64() * 1e3;
    let bytes: u64 = got.iter().map(|e| e.len).sum();
    match t.first {
        None => t.first = Some((ms, got.len(), bytes)),
        Some((_, n, b)) if (n, b) == (got.len(), bytes) => t.runs.push(ms),
        Some(_) => return Err(format!("{}: a read-only store gave two answers", c.name)),
    }
    Ok(())
}

/// Every case on every device given (`--cow A,B,...`): per case, the
/// devices take turns run by run, so the machine's load, which others
/// share, falls on them alike.
fn measure(f: &Flags) -> Res<()> {
    let rounds = f.num("rounds", 5)?.max(1);
    let budget = match f.0.contains_key("cache-budget") {
        true => Some(f.num("cache-budget", 0)?),
        false => None,
    };
    let strategy = match f.0.get("strategy").map(String::as_str) {
        None | Some("auto") => DiffStrategy::Auto,
        Some("by-chunk") => DiffStrategy::ByChunk,
        Some("by-node") => DiffStrategy::ByNode,
        Some(other) => return Err(format!("--strategy {other}: auto, by-chunk or by-node")),
    };
    let paths = f.0.get("cow").ok_or("--cow is required")?;
    let devices: Vec<Device> = paths
        .split(',')
        .map(|p| open_device(p, budget))
        .collect::<Res<_>>()?;
    for d in &devices {
        d.store.set_diff_strategy(strategy);
    }
    println!("diff strategy: {strategy:?}");
    let burst_after = f.num("burst-after", 5005)?;
    let opened: Vec<_> = devices.iter().map(|d| d.store.cache_stats()).collect();
    println!("| case | origin | range | extents | bytes | first ms | median ms | min ms |");
    println!("|---|---|---|---:|---:|---:|---:|---:|");
    // Each device's cases (the same ones, at its own size), case by case.
    let mut per_device: Vec<_> = devices
        .iter()
        .map(|d| cases(d.size, d.snapshots, burst_after).into_iter())
        .collect();
    while let Some(row) = per_device
        .iter_mut()
        .map(Iterator::next)
        .collect::<Option<Vec<Case>>>()
    {
        let mut timings: Vec<Timing> = devices.iter().map(|_| Timing::default()).collect();
        for _ in 0..=rounds {
            for ((d, c), t) in devices.iter().zip(&row).zip(&mut timings) {
                time_case(d, c, t)?;
            }
        }
        for ((d, c), t) in devices.iter().zip(&row).zip(&mut timings) {
            report_case(d, c, t);
        }
    }
    for (d, before) in devices.iter().zip(opened) {
        let st = d.store.cache_stats();
        println!(
            "{} page cache during the diffs: budget {} MiB, {} pages held, {} hits, {} misses \
             ({} under the write lock), {} evictions",
            d.name,
            st.budget >> 20,
            st.pages,
            st.hits - before.hits,
            st.misses - before.misses,
            st.locked_misses - before.locked_misses,
            st.evictions - before.evictions
        );
    }
    for d in &devices {
        per_chunk_reference(d)?;
    }
    for d in devices {
        d.store.close().map_err(|e| format!("close: {e}"))?;
    }
    Ok(())
}

fn report_case(d: &Device, c: &Case, t: &mut Timing) {
    let (first_ms, extents, bytes) = t.first.expect("timed at least once");
    let min = t.runs.iter().copied().fold(f64::MAX, f64::min);
    let med = median(&mut t.runs);
    let range = match c.len == d.size {
        true => "whole".to_string(),
        false => format!("{} MiB at {} GiB", c.len >> 20, c.offset >> 30),
    };
    println!(
        "| {} | {} | {range} | {extents} | {bytes} | {first_ms:.1} | {med:.1} | {min:.1} |",
        c.name, d.name
    );
    println!(
        "RESULT case={:?} origin={:?} offset={} len={} extents={extents} bytes={bytes} \
         first_ms={first_ms:.3} median_ms={med:.3} min_ms={min:.3}",
        c.name, d.name, c.offset, c.len
    );
}

/// `block_status` of a snapshot over 1 GiB: every chunk resolved, what a
/// diff walking chunk by chunk would pay, extrapolated to the device.
fn per_chunk_reference(d: &Device) -> Res<()> {
    let (store, size) = (&d.store, d.size);
    let vol = store
        .volume(ID, Some(plain_tag(d.snapshots)))
        .map_err(|e| e.to_string())?;
    let len = (1u64 << 30).min(size);
    let t = Instant::now();
    let mut pos = 0;
    while pos < len {
        let ext = vol
            .block_status(pos, len - pos)
            .map_err(|e| e.to_string())?;
        pos = ext.last().map_or(len, |e| e.offset + e.len);
    }
    let secs = t.elapsed().as_secs_f64();
    let per_chunk_ns = secs * 1e9 / (len / CS) as f64;
    let whole_s = per_chunk_ns * (size / CS) as f64 / 1e9;
    println!(
        "{} per-chunk reference: block_status over {} MiB ({} chunks) in {:.1} ms, {per_chunk_ns:.0} ns a chunk; \
         the whole device chunk by chunk: {whole_s:.1} s",
        d.name,
        len >> 20,
        len / CS,
        secs * 1e3
    );
    println!("RESULT case=\"per-chunk reference\" chunks={} ms={:.3} ns_per_chunk={per_chunk_ns:.1} whole_device_s={whole_s:.3}", len / CS, secs * 1e3);
    Ok(())
}
