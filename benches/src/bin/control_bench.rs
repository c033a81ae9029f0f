//! The client side of benches/control.sh: speaks the control socket's JSON
//! line protocol (nbd-frontend/src/control/wire.rs) as any client would,
//! and times it.
//!
//!   control_bench fill SOCK ORIGIN N        take N snapshots of ORIGIN over one
//!                                           connection (pipelined, 64 in flight)
//!   control_bench rtt SOCK ORIGIN N LISTS   one connection: N each of hello and
//!                                           rollback_progress; N snapshots, then
//!                                           their N deletes; N/4 snapshot+delete
//!                                           pairs (rotating); LISTS list calls
//!   control_bench cli SOCK SNAPMV COW ORIGIN N
//!                                           N whole `snapmv snapshot COW ORIGIN`
//!                                           processes; then (untimed, over SOCK)
//!                                           their snapshots deleted
//!
//! Prints one line per measured call kind: `kind calls p50_us p99_us max_us`.

use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// Requests in flight at once while filling: enough to keep the server
/// busy between replies, few enough that its socket buffer holds them.
const PIPELINE: usize = 64;

struct Conn {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
    line: String,
}

impl Conn {
    fn connect(path: &str) -> Conn {
        let writer = UnixStream::connect(path).unwrap_or_else(|e| panic!("connect {path}: {e}"));
        let reader = BufReader::new(writer.try_clone().expect("clone socket"));
        Conn {
            writer,
            reader,
            line: String::new(),
        }
    }

    fn send(&mut self, request: &str) {
        self.writer
            .write_all(request.as_bytes())
            .expect("send request");
    }

    /// The next reply; an `error` reply stops the benchmark.
    fn receive(&mut self) -> Value {
        self.line.clear();
        self.reader.read_line(&mut self.line).expect("read reply");
        let v: Value = serde_json::from_str(&self.line).expect("reply is JSON");
        assert_ne!(v["reply"], "error", "server error: {v}");
        v
    }

    fn call(&mut self, request: &str) -> Value {
        self.send(request);
        self.receive()
    }

    /// The reply's length in bytes too (for `list`).
    fn call_sized(&mut self, request: &str) -> (Value, usize) {
        let v = self.call(request);
        (v, self.line.len())
    }
}

fn snapshot_request(origin: &str) -> String {
    format!("{{\"op\":\"snapshot\",\"origin\":\"{origin}\",\"of\":null,\"memo\":\"\"}}\n")
}

fn delete_request(origin: &str, tag: u64) -> String {
    format!("{{\"op\":\"delete\",\"origin\":\"{origin}\",\"tag\":{tag}}}\n")
}

fn tag_of(v: &Value) -> u64 {
    v["tag"].as_u64().unwrap_or_else(|| panic!("no tag in {v}"))
}

/// `kind calls p50 p99 max`, in microseconds.
fn report(kind: &str, mut times: Vec<Duration>) {
    times.sort_unstable();
    let at = |q: usize| times[(times.len() * q / 100).min(times.len() - 1)];
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "{kind} {} {:.1} {:.1} {:.1}",
        times.len(),
        us(at(50)),
        us(at(99)),
        us(times[times.len() - 1])
    );
}

fn timed(conn: &mut Conn, request: &str) -> (Value, Duration) {
    let t = Instant::now();
    let v = conn.call(request);
    (v, t.elapsed())
}

fn fill(sock: &str, origin: &str, n: usize) {
    let mut conn = Conn::connect(sock);
    let request = snapshot_request(origin);
    let started = Instant::now();
    let mut sent = 0;
    let mut done = 0;
    while done < n {
        while sent < n && sent - done < PIPELINE {
            conn.send(&request);
            sent += 1;
        }
        conn.receive();
        done += 1;
        if done % 10_000 == 0 {
            eprintln!(
                "  {done} snapshots, {:.1} s",
                started.elapsed().as_secs_f64()
            );
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!("fill {n} {secs:.2} s {:.0}/s", n as f64 / secs);
}

/// Until the server's cleaner has freed what deletes left (a `list` is
/// slow with many snapshots, which paces this loop).
fn wait_idle(conn: &mut Conn) {
    while conn.call("{\"op\":\"list\"}\n")["cleaning"] == true {}
}

fn rtt(sock: &str, origin: &str, n: usize, lists: usize) {
    let mut conn = Conn::connect(sock);
    let mut hello = Vec::with_capacity(n);
    let mut progress = Vec::with_capacity(n);
    for _ in 0..n {
        hello.push(timed(&mut conn, "{\"op\":\"hello\"}\n").1);
        progress.push(timed(&mut conn, "{\"op\":\"rollback_progress\"}\n").1);
    }
    report("hello", hello);
    report("rollback_progress", progress);
    // Snapshots back to back, then their deletes back to back.
    let mut snap = Vec::with_capacity(n);
    let mut tags = Vec::with_capacity(n);
    for _ in 0..n {
        let (v, d) = timed(&mut conn, &snapshot_request(origin));
        snap.push(d);
        tags.push(tag_of(&v));
    }
    report("snapshot", snap);
    let del = tags
        .iter()
        .map(|&t| timed(&mut conn, &delete_request(origin, t)).1)
        .collect();
    report("delete", del);
    wait_idle(&mut conn);
    // A rotating script: each snapshot deletes the one before, so the
    // cleaner runs between snapshots.
    let (mut snap, mut del) = (Vec::new(), Vec::new());
    for _ in 0..n / 4 {
        let (v, d) = timed(&mut conn, &snapshot_request(origin));
        snap.push(d);
        del.push(timed(&mut conn, &delete_request(origin, tag_of(&v))).1);
    }
    report("snapshot_rotating", snap);
    report("delete_rotating", del);
    wait_idle(&mut conn);
    let mut list = Vec::with_capacity(lists);
    let mut bytes = 0;
    for _ in 0..lists {
        let t = Instant::now();
        let (v, len) = conn.call_sized("{\"op\":\"list\"}\n");
        list.push(t.elapsed());
        bytes = len;
        assert_eq!(v["reply"], "status");
    }
    if lists > 0 {
        report("list", list);
        println!("list_reply_bytes {bytes}");
    }
}

fn cli(sock: &str, snapmv: &str, cow: &str, origin: &str, n: usize) {
    let mut times = Vec::with_capacity(n);
    let mut tags = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let out = std::process::Command::new(snapmv)
            .args(["snapshot", cow, origin])
            .output()
            .expect("run snapmv");
        times.push(t.elapsed());
        assert!(out.status.success(), "{out:?}");
        let tag: u64 = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("snapmv snapshot prints the tag");
        tags.push(tag);
    }
    report("cli_snapshot", times);
    let mut conn = Conn::connect(sock);
    for t in tags {
        conn.call(&delete_request(origin, t));
    }
    wait_idle(&mut conn);
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let num = |s: &str| -> usize { s.parse().expect("a count") };
    match a.as_slice() {
        ["fill", sock, origin, n] => fill(sock, origin, num(n)),
        ["rtt", sock, origin, n, lists] => rtt(sock, origin, num(n), num(lists)),
        ["cli", sock, snapmv, cow, origin, n] => cli(sock, snapmv, cow, origin, num(n)),
        _ => {
            eprintln!("usage: see the top of benches/src/bin/control_bench.rs");
            std::process::exit(2);
        }
    }
}
