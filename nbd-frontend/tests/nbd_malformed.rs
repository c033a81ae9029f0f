//! 1,000 garbage or truncated client streams, at every stage of the
//! protocol, while a healthy client keeps writing, reading and verifying.
//! The server must stay up, keep serving the healthy client, and never
//! hand out data it should not.
//!
//! Replay a failure with SNAPMV_SEED=<seed printed below>.

mod nbd_support;

use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nbd_support::{Harness, Opts};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const STREAMS: usize = 1000;
const THREADS: usize = 8;

fn opt(code: u32, data: &[u8]) -> Vec<u8> {
    let mut v = IHAVEOPT.to_be_bytes().to_vec();
    v.extend_from_slice(&code.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

fn go(name: &str) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&0u16.to_be_bytes());
    opt(7, &d)
}

fn req(flags: u16, cmd: u16, handle: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut v = REQUEST_MAGIC.to_be_bytes().to_vec();
    v.extend_from_slice(&flags.to_be_bytes());
    v.extend_from_slice(&cmd.to_be_bytes());
    v.extend_from_slice(&handle.to_be_bytes());
    v.extend_from_slice(&offset.to_be_bytes());
    v.extend_from_slice(&len.to_be_bytes());
    v
}

fn junk(rng: &mut ChaCha8Rng, max: usize) -> Vec<u8> {
    let n = rng.gen_range(0..=max);
    let mut v = vec![0u8; n];
    rng.fill(&mut v[..]);
    v
}

/// Build one bad stream: a valid prefix up to some stage, then garbage.
fn bad_stream(rng: &mut ChaCha8Rng) -> (u32, Vec<u8>) {
    let kind = rng.gen_range(0..12u32);
    let mut s = Vec::new();
    let flags = 3u32.to_be_bytes();
    match kind {
        // Nothing at all, or a few random bytes instead of client flags.
        0 => s.extend(junk(rng, 3)),
        1 => s.extend(junk(rng, 64)),
        // Unknown client flags.
        2 => s.extend_from_slice(&rng.gen_range(4u32..=u32::MAX).to_be_bytes()),
        // Valid flags, then a bad option magic or random bytes.
        3 => {
            s.extend_from_slice(&flags);
            s.extend(junk(rng, 100));
        }
        // An option header with a random code and length (often huge),
        // then fewer bytes than it promised.
        4 => {
            s.extend_from_slice(&flags);
            s.extend_from_slice(&IHAVEOPT.to_be_bytes());
            s.extend_from_slice(&rng.gen_range(0..16u32).to_be_bytes());
            let len: u32 = if rng.gen_bool(0.5) {
                rng.gen()
            } else {
                rng.gen_range(0..200)
            };
            s.extend_from_slice(&len.to_be_bytes());
            s.extend(junk(rng, 150));
        }
        // Options with inner lengths that lie (GO, INFO, META_CONTEXT).
        5 => {
            s.extend_from_slice(&flags);
            s.extend(opt(8, &[]));
            for _ in 0..rng.gen_range(1..5) {
                let code = [6u32, 7, 9, 10, 3, 1][rng.gen_range(0..6)];
                let mut d = junk(rng, 40);
                if rng.gen_bool(0.5) && d.len() >= 4 {
                    d[..4].copy_from_slice(&rng.gen_range(0u32..64).to_be_bytes());
                }
                s.extend(opt(code, &d));
            }
        }
        // A truncated option header.
        6 => {
            s.extend_from_slice(&flags);
            let h = opt(3, &[]);
            s.extend_from_slice(&h[..rng.gen_range(1..h.len())]);
        }
        // Into transmission, then a bad request magic or random bytes.
        7 => {
            s.extend_from_slice(&flags);
            s.extend(go("g"));
            s.extend(junk(rng, 100));
        }
        // Into transmission, then a truncated header.
        8 => {
            s.extend_from_slice(&flags);
            s.extend(go("g"));
            let r = req(0, 0, 1, 0, 512);
            s.extend_from_slice(&r[..rng.gen_range(1..r.len())]);
        }
        // Requests with random commands, flags, offsets and lengths
        // (WRITEs then send only part of their payload).
        9 | 10 => {
            s.extend_from_slice(&flags);
            if kind == 10 {
                s.extend(opt(8, &[]));
            }
            s.extend(go("g"));
            for h in 0..rng.gen_range(1..20u64) {
                let cmd = rng.gen_range(0..10u16);
                let fl = if rng.gen_bool(0.7) { 0 } else { rng.gen() };
                let off = if rng.gen_bool(0.7) {
                    rng.gen_range(0..1 << 24)
                } else {
                    rng.gen()
                };
                let len = if rng.gen_bool(0.7) {
                    rng.gen_range(0..70_000)
                } else {
                    rng.gen()
                };
                s.extend(req(fl, cmd, h, off, len));
                if cmd == 1 {
                    let n = (len as usize).min(rng.gen_range(0..70_000));
                    s.extend(std::iter::repeat_n(0x5Au8, n));
                }
            }
        }
        // Random bytes anywhere in an otherwise valid conversation.
        _ => {
            s.extend_from_slice(&flags);
            s.extend(opt(8, &[]));
            s.extend(go("g"));
            s.extend(req(0, 1, 1, 4096, 4096));
            s.extend(std::iter::repeat_n(0x33u8, 4096));
            s.extend(req(0, 0, 2, 0, 4096));
            let at = rng.gen_range(0..s.len());
            let n = rng.gen_range(1..8).min(s.len() - at);
            rng.fill(&mut s[at..at + n]);
            s.truncate(rng.gen_range(at..=s.len()));
        }
    }
    (kind, s)
}

/// Send one bad stream and read whatever comes back until the server
/// closes (or a short timeout). Returns false if the server did not even
/// greet us, which would mean it is down.
fn send_bad(addr: SocketAddr, bytes: &[u8], half_close: bool) -> bool {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let mut greeting = [0u8; 18];
    if s.read_exact(&mut greeting).is_err() || &greeting[..8] != b"NBDMAGIC" {
        return false;
    }
    let _ = s.write_all(bytes);
    // After a half-close the server sees EOF and must close promptly; with
    // the stream left open it may be waiting for more, so we just leave.
    let window = if half_close {
        let _ = s.shutdown(Shutdown::Write);
        Duration::from_secs(2)
    } else {
        Duration::from_millis(30)
    };
    let _ = s.set_read_timeout(Some(window));
    let mut sink = [0u8; 64 * 1024];
    let start = Instant::now();
    while start.elapsed() < window {
        match s.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    true
}

#[test]
fn malformed_clients_never_disturb_a_healthy_one() {
    let seed: u64 = std::env::var("SNAPMV_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().gen());
    println!("malformed-client seed: {seed} (replay with SNAPMV_SEED={seed})");
    let h = Harness::new(Opts {
        origins: &["o", "g"],
        ..Opts::default()
    });
    let addr = h.addr;

    // The healthy client: writes a block, reads it back, checks it, over
    // and over, in its own region of origin "o".
    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    let healthy = {
        let (stop, ops) = (stop.clone(), ops.clone());
        std::thread::spawn(move || -> Result<(), String> {
            let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xfeed);
            let mut tcp = nbd_support::connect(addr);
            let export = nbd::client::handshake(&mut tcp, b"o").map_err(|e| e.to_string())?;
            let mut c = nbd::client::NbdClient::new(&mut tcp, &export);
            let mut shadow = vec![0u8; 4 << 20];
            while !stop.load(Ordering::Relaxed) {
                let off = rng.gen_range(0..(shadow.len() / 4096) - 16) * 4096;
                let len = rng.gen_range(1..16) * 4096;
                let mut data = vec![0u8; len];
                rng.fill(&mut data[..]);
                c.seek(SeekFrom::Start(off as u64))
                    .map_err(|e| e.to_string())?;
                c.write_all(&data)
                    .map_err(|e| format!("write at {off}: {e}"))?;
                shadow[off..off + len].copy_from_slice(&data);
                let roff = rng.gen_range(0..(shadow.len() / 4096) - 16) * 4096;
                let mut back = vec![0u8; 16 * 4096];
                c.seek(SeekFrom::Start(roff as u64))
                    .map_err(|e| e.to_string())?;
                c.read_exact(&mut back)
                    .map_err(|e| format!("read at {roff}: {e}"))?;
                if back[..] != shadow[roff..roff + back.len()] {
                    return Err(format!("verify failed at {roff}"));
                }
                ops.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        })
    };

    let t0 = Instant::now();
    let mut workers = Vec::new();
    for t in 0..THREADS {
        workers.push(std::thread::spawn(move || {
            let mut rng = ChaCha8Rng::seed_from_u64(seed.wrapping_add(t as u64));
            let mut kinds = [0usize; 12];
            for _ in 0..STREAMS / THREADS {
                let (kind, bytes) = bad_stream(&mut rng);
                kinds[kind as usize] += 1;
                let half_close = rng.gen_bool(0.8);
                assert!(
                    send_bad(addr, &bytes, half_close),
                    "server stopped greeting (kind {kind})"
                );
            }
            kinds
        }));
    }
    let mut kinds = [0usize; 12];
    for w in workers {
        for (k, n) in w.join().unwrap().iter().enumerate() {
            kinds[k] += n;
        }
    }
    let garbage_time = t0.elapsed();
    let ops_during = ops.load(Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    healthy.join().unwrap().expect("healthy client");
    println!(
        "{STREAMS} bad streams in {garbage_time:?} (by kind {kinds:?}); \
         healthy client did {ops_during} write+read+verify rounds meanwhile"
    );
    assert!(ops_during > 0, "the healthy client made no progress");

    // Still serving: a fresh client can connect and work.
    let mut tcp = nbd_support::connect(addr);
    let export = nbd::client::handshake(&mut tcp, b"o").unwrap();
    let mut c = nbd::client::NbdClient::new(&mut tcp, &export);
    c.write_all(&[9u8; 4096]).unwrap();
    c.seek(SeekFrom::Start(0)).unwrap();
    let mut b = [0u8; 4096];
    c.read_exact(&mut b).unwrap();
    assert_eq!(b, [9u8; 4096]);
}
