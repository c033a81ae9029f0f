#!/usr/bin/python3
"""One NBD connection writing stamped sectors as fast as the server lets it,
with many requests in flight, FUA and FLUSH mixed in, until it is killed
(or --max-secs passes).

Every event goes to the log with os.write as it happens, so it survives a
SIGKILL of this process:
    I wid first_sector nsectors fua t   write issued (logged before sending)
    R wid errno t                       write reply received (0 = success)
    F fid t                             flush issued (logged before sending)
    G fid errno t                       flush reply received
t is CLOCK_MONOTONIC in ns, one clock for every process on the machine, so
the checker can order events across connections (a reply logged before a
flush issue was logged was received before that flush was sent).
"""
import argparse
import os
import random
import sys
import time

import nbd

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import stamp  # noqa: E402

SIZES = [4096, 8192, 16384, 32768, 65536, 131072, 262144]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--socket", required=True)
    ap.add_argument("--export", required=True, help="NBD export name")
    ap.add_argument("--code", type=int, required=True, help="export code stamped in sectors")
    ap.add_argument("--conn", type=int, required=True, help="connection number (unique in the cut)")
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--log", required=True)
    ap.add_argument("--qdepth", type=int, default=16)
    ap.add_argument("--max-secs", type=float, default=30.0)
    ap.add_argument("--flush-pct", type=float, default=4.0)
    ap.add_argument("--fua-pct", type=float, default=15.0)
    a = ap.parse_args()

    rng = random.Random(a.seed)
    log = os.open(a.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    now = time.monotonic_ns

    def emit(line):
        os.write(log, line.encode())

    h = nbd.NBD()
    h.set_export_name(a.export)
    h.connect_unix(a.socket)
    size = h.get_size()
    nsec = size // stamp.SECTOR
    # A hot region (a few chunks) gets half the writes, so writes to the
    # same sectors race each other, across connections too.
    hot_len = min(nsec, 4 << 20 >> 9)
    emit("H conn=%d export=%s code=%d size=%d\n" % (a.conn, a.export, a.code, size))

    counter = [0]
    inflight = [0]
    bufs = {}  # keeps each write's buffer alive until its reply

    def next_id():
        counter[0] += 1
        return (a.conn << 40) | counter[0]

    def on_write(wid):
        def cb(err):
            emit("R %d %d %d\n" % (wid, err.value, now()))
            bufs.pop(wid, None)
            inflight[0] -= 1
            return 1
        return cb

    def on_flush(fid):
        def cb(err):
            emit("G %d %d %d\n" % (fid, err.value, now()))
            inflight[0] -= 1
            return 1
        return cb

    deadline = time.monotonic() + a.max_secs
    while time.monotonic() < deadline:
        while inflight[0] < a.qdepth:
            if rng.random() * 100 < a.flush_pct:
                fid = next_id()
                emit("F %d %d\n" % (fid, now()))
                h.aio_flush(completion=on_flush(fid))
                inflight[0] += 1
                continue
            ln = rng.choice(SIZES) >> 9
            if rng.random() < 0.125:
                # sector-granular: an odd length and an unaligned start
                ln = rng.randrange(1, ln + 1)
                span = nsec
                first = rng.randrange(0, span - ln + 1)
            else:
                span = hot_len if rng.random() < 0.5 else nsec
                first = rng.randrange(0, (span - ln) // 8 + 1) * 8
            fua = rng.random() * 100 < a.fua_pct
            wid = next_id()
            buf = nbd.Buffer.from_bytearray(stamp.write_buffer(a.code, first, ln, wid))
            bufs[wid] = buf
            emit("I %d %d %d %d %d\n" % (wid, first, ln, 1 if fua else 0, now()))
            h.aio_pwrite(buf, first * stamp.SECTOR, completion=on_write(wid),
                         flags=nbd.CMD_FLAG_FUA if fua else 0)
            inflight[0] += 1
        h.poll(-1)
    while inflight[0]:
        h.poll(-1)
    h.shutdown()


if __name__ == "__main__":
    try:
        main()
    except nbd.Error as e:
        # The server went away (the cut): nothing to report.
        print("client: %s" % e, file=sys.stderr)
        sys.exit(0)
