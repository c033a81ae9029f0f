#!/usr/bin/python3
"""Power cuts of the real `snapmv serve` on a disk that loses every unflushed
write. See README.md beside this file for the whole story; in short, each
cut:

1. builds the disk: for the COW file and for the origin file, an nbdkit
   serving a plain backing file through its cache filter in write-back mode
   (writes stay in nbdkit's memory until an NBD FLUSH or a FUA write), shown
   as a regular file by nbdfuse mounted over it. fsync/fdatasync on those
   files become NBD FLUSH.
2. formats the COW device, binds a 64 MiB origin (pre-filled with stamps),
   takes frozen snapshots with known content, a writable snapshot of a
   snapshot, and writes known data (flushed) between them.
3. goes live: 4 client connections write stamped sectors to the origin and 2
   to the writable snapshot, 16 requests in flight each, FUA and FLUSH mixed
   in; snapshot 2 is deleted (the cleaner hands its chunks on) and snapshots
   are taken and deleted live through the control socket.
4. cuts at a random instant: SIGKILL to both nbdkits at once (one kill of
   their process group: the power is gone, their caches with it), then to
   the server, the clients and any admin command; unmounts nbdfuse.
5. recovers on the backing files: `snapmv check` on the crash state, a new
   `snapmv serve`, every sector of every version read back and judged
   against the logs (check.py), a clean shutdown, `snapmv check` again.
"""
import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import check  # noqa: E402
import disk  # noqa: E402
from disk import Registry, is_mounted, wait_for  # noqa: E402
import stamp  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
PY = sys.executable
MiB = 1 << 20
ORIGIN_SIZE = 64 * MiB
COW_SIZE = 512 * MiB
NSEC = ORIGIN_SIZE // stamp.SECTOR
ORIGIN_CONNS = 4
WRITABLE_CONNS = 2

# Write ids of the known, flushed data written before the live phase (the
# live clients use (conn << 40) | n with conn >= 1).
WID_P0, WID_W1, WID_W2, WID_W3, WID_W4 = 1, 2, 3, 4, 5


class Stop(BaseException):  # not swallowed by any "except Exception"
    pass


def on_signal(signum, _frame):
    raise Stop("signal %d" % signum)


def now():
    return time.monotonic_ns()


def oneline(text):
    return " | ".join(line.strip() for line in text.splitlines() if line.strip())


def run(argv, log, check_rc=True, timeout=120):
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    with open(log, "a") as f:
        f.write("$ %s\n%s%s[rc=%d]\n" % (" ".join(argv), r.stdout, r.stderr, r.returncode))
    if check_rc and r.returncode != 0:
        raise RuntimeError("%s failed (rc %d): %s" % (" ".join(argv), r.returncode, r.stderr.strip()))
    return r


def extents(rng, count, lo, hi):
    """count random sector extents of lo..hi bytes, 4 KiB aligned."""
    out = []
    for _ in range(count):
        n = rng.randrange(lo, hi + 1, 4096) >> 9
        first = rng.randrange(0, NSEC - n + 1, 8)
        out.append((first, n))
    return out


def apply(base, exts, wid):
    for first, n in exts:
        base[first:first + n] = [wid] * n


class Cut:
    def __init__(self, args, k, seed, workdir):
        self.a = args
        self.k = k
        self.seed = seed
        self.rng = random.Random(seed)
        self.dir = os.path.join(workdir, "cut-%03d-seed-%d" % (k, seed))
        os.makedirs(self.dir)
        self.reg = Registry(workdir)
        self.bin = args.bin
        self.log = self.p("admin.log")

    def p(self, name):
        return os.path.join(self.dir, name)

    # ---- the disk ---------------------------------------------------------

    def start_disks(self):
        self.kits, self.kit_pgid, self.fuses = disk.start(
            self.reg, self.dir, [("cow", self.a.cache_mode), ("origin", self.a.origin_cache_mode)])

    def serve(self, cow, sock, extra=()):
        argv = [self.bin, "serve", cow, "--unix", sock] + list(extra)
        p = self.reg.spawn(argv, self.p("serve.log"), start_new_session=True,
                           env=dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "warn")))
        ctl = os.path.realpath(cow) + ".snapmv.sock"
        wait_for(lambda: os.path.exists(sock) and os.path.exists(ctl), "snapmv serve", procs=[p])
        return p

    def connect(self, sock, export):
        import nbd
        h = nbd.NBD()
        h.set_export_name(export)
        h.connect_unix(sock)
        return h

    def write_known(self, h, exts, code, wid):
        for first, n in exts:
            h.pwrite(stamp.write_buffer(code, first, n, wid), first * stamp.SECTOR)

    def note(self, op):
        with open(self.log, "a") as f:
            f.write("live: %s\n" % json.dumps(op, sort_keys=True))

    # ---- one cut ----------------------------------------------------------

    def run(self):
        a, rng = self.a, self.rng
        t_begin = time.monotonic()
        # Origin pre-fill P0: every other MiB stamped, the rest zero.
        with open(self.p("origin.back"), "wb") as f:
            f.truncate(ORIGIN_SIZE)
            for mib in range(0, ORIGIN_SIZE // MiB, 2):
                f.seek(mib * MiB)
                f.write(stamp.write_buffer(stamp.ORIGIN, mib * MiB // 512, MiB // 512, WID_P0))
        with open(self.p("cow.back"), "wb") as f:
            f.truncate(COW_SIZE)
        base_o = [0] * NSEC
        for mib in range(0, ORIGIN_SIZE // MiB, 2):
            base_o[mib * 2048:(mib + 1) * 2048] = [WID_P0] * 2048

        self.start_disks()
        cow, sock = self.p("cow.img"), self.p("serve.sock")
        run([self.bin, "format", cow], self.log)
        run([self.bin, "bind", cow, self.p("origin.img"), "--id", "orig"], self.log)
        assert run([self.bin, "snapshot", cow, "orig", "-m", "frozen-1"], self.log).stdout.strip() == "1"
        frozen1 = list(base_o)
        server = self.serve(cow, sock)

        # Known, flushed data between the snapshots.
        ho = self.connect(sock, "orig")
        w1 = extents(rng, 24, 64 << 10, 512 << 10)
        self.write_known(ho, w1, stamp.ORIGIN, WID_W1)
        ho.flush()
        apply(base_o, w1, WID_W1)
        assert run([self.bin, "snapshot", cow, "orig", "-m", "to-delete"], self.log).stdout.strip() == "2"
        frozen2 = list(base_o)
        w2 = extents(rng, 48, 256 << 10, 1 << 20)  # big: snapshot 2 gets many chunks to clean
        self.write_known(ho, w2, stamp.ORIGIN, WID_W2)
        ho.flush()
        apply(base_o, w2, WID_W2)
        assert run([self.bin, "snapshot", cow, "orig", "--of", "1", "-m", "writable"],
                   self.log).stdout.strip() == "3"
        assert run([self.bin, "snapshot", cow, "orig", "-m", "frozen-4"], self.log).stdout.strip() == "4"
        frozen4 = list(base_o)
        base_w = list(frozen1)
        w3 = extents(rng, 24, 64 << 10, 512 << 10)
        self.write_known(ho, w3, stamp.ORIGIN, WID_W3)
        apply(base_o, w3, WID_W3)
        hw = self.connect(sock, "orig@3")
        w4 = extents(rng, 16, 4 << 10, 256 << 10)
        self.write_known(hw, w4, stamp.WRITABLE, WID_W4)
        apply(base_w, w4, WID_W4)
        ho.flush()
        hw.flush()
        ho.shutdown()
        hw.shutdown()

        # ---- live ----
        clients = []
        conn = 0
        for export, code, count in (("orig", stamp.ORIGIN, ORIGIN_CONNS),
                                    ("orig@3", stamp.WRITABLE, WRITABLE_CONNS)):
            for _ in range(count):
                conn += 1
                clients.append(self.reg.spawn(
                    [PY, os.path.join(HERE, "client.py"), "--socket", sock, "--export", export,
                     "--code", str(code), "--conn", str(conn), "--seed", str(rng.getrandbits(32)),
                     "--log", self.p("client-%d.log" % conn), "--qdepth", str(a.qdepth),
                     "--max-secs", str(a.live_secs + 30)],
                    self.p("client-%d.err" % conn), start_new_session=True))
        # Let every client connect and start writing before the clock runs.
        wait_for(lambda: all(os.path.exists(self.p("client-%d.log" % c)) and
                             os.path.getsize(self.p("client-%d.log" % c)) > 200
                             for c in range(1, conn + 1)), "clients", procs=clients)
        live_start = time.monotonic()
        cut_at = live_start + rng.uniform(a.min_live, a.live_secs)

        admin = []  # dicts: kind, tag/of, memo, t0, t1, rc, out
        pending = None
        # Snapshot 2 (many chunks of its own) is deleted at a random moment
        # before the cut, so the cleaner is often mid-way when the power goes.
        delete2_at = live_start + rng.uniform(0, cut_at - live_start)
        queue = [{"kind": "delete", "tag": 2}]
        live_tags = []  # tags of live snapshots whose command returned
        nlive = 0
        next_admin = live_start
        while time.monotonic() < cut_at:
            if pending is not None and pending["proc"].poll() is not None:
                pending["t1"] = now()
                pending["rc"] = pending["proc"].returncode
                pending["out"] = pending["proc"].stdout.read()
                pending["proc"].stdout.close()
                if pending["kind"] == "snapshot" and pending["rc"] == 0:
                    pending["tag"] = int(pending["out"].strip())
                    live_tags.append(pending["tag"])
                del pending["proc"]
                self.note(pending)
                pending = None
                next_admin = time.monotonic() + rng.uniform(0.05, 0.4)
            if pending is None and time.monotonic() >= next_admin:
                if queue and time.monotonic() >= delete2_at:
                    op = queue.pop(0)
                elif len(live_tags) >= 2 and rng.random() < 0.4:
                    tag = live_tags.pop(rng.randrange(len(live_tags) - 1))
                    op = {"kind": "delete", "tag": tag}
                else:
                    nlive += 1
                    of = 3 if rng.random() < 0.3 else None
                    op = {"kind": "snapshot", "of": of, "memo": "live-%d" % nlive}
                if op["kind"] == "delete":
                    argv = [self.bin, "delete", cow, "orig", str(op["tag"])]
                else:
                    argv = [self.bin, "snapshot", cow, "orig", "-m", op["memo"]]
                    if op["of"]:
                        argv += ["--of", str(op["of"])]
                op["t0"] = now()
                op["proc"] = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                              stderr=subprocess.STDOUT, text=True,
                                              start_new_session=True)
                self.reg.track(op["proc"])
                op["rc"] = None
                op["t1"] = None
                admin.append(op)
                pending = op
            time.sleep(0.002)

        # ---- the cut ----
        os.killpg(self.kit_pgid, signal.SIGKILL)
        for p in [server] + clients:
            p.kill()
        if pending is not None:
            pending["proc"].kill()
            pending["proc"].wait()
            pending["proc"].stdout.close()
            del pending["proc"]
            self.note(pending)
        for p in self.kits + [server] + clients:
            self.reg.kill(p)
        self.reg.unmount_all()
        for fz in self.fuses:
            self.reg.kill(fz)
        for name in ("cow", "origin"):
            subprocess.run(["cp", "--sparse=always", self.p(name + ".back"),
                            self.p(name + ".crash")], check=True)
        # From here on the backing files are the disk; the origin is found at
        # the path recorded at bind time.
        os.unlink(self.p("origin.img"))
        os.symlink("origin.back", self.p("origin.img"))

        # ---- recovery ----
        logs = [self.p("client-%d.log" % c) for c in range(1, conn + 1)]
        model = check.Model(logs, NSEC, {stamp.ORIGIN: base_o, stamp.WRITABLE: base_w},
                            {WID_P0: stamp.ORIGIN, WID_W1: stamp.ORIGIN, WID_W2: stamp.ORIGIN,
                             WID_W3: stamp.ORIGIN, WID_W4: stamp.WRITABLE}, admin)
        res = {"seed": self.seed, "findings": [], "check_crash": "-", "check_after": "-",
               "cleaning_at_cut": False, "t_cut_after_live": cut_at - live_start,
               "live_snapshots": sum(1 for o in admin if o["kind"] == "snapshot"),
               "live_deletes": sum(1 for o in admin if o["kind"] == "delete")}
        res.update(model.stats())
        try:
            self.recover(model, admin, {1: frozen1, 2: frozen2, 4: frozen4}, res)
        except Exception as e:
            tail = ""
            if os.path.exists(self.p("serve.log")):
                with open(self.p("serve.log")) as f:
                    tail = " | ".join(f.read().strip().splitlines()[-3:])
            res["findings"].append("recovery failed: %s%s" % (e, "; serve.log: " + tail if tail else ""))
        res["lost_durable"] = len(model.lost)
        res["wall"] = time.monotonic() - t_begin
        return res

    def recover(self, model, admin, frozen, res):
        cowb = self.p("cow.back")
        r = run([self.bin, "check", cowb], self.log, check_rc=False)
        res["check_crash"] = r.returncode
        if r.returncode != 0:
            res["findings"].append("snapmv check on the crash state: rc %d: %s"
                                   % (r.returncode, oneline(r.stdout + r.stderr)))
        # What the crash state holds, before anything replays it (list and
        # check only read): was the cleaner's work still pending?
        r = run([self.bin, "list", cowb, "--json"], self.log, check_rc=False)
        if r.returncode == 0:
            res["cleaning_at_cut"] = bool(json.loads(r.stdout).get("cleaning"))
        rsock = self.p("recover.sock")
        server = self.serve(cowb, rsock)
        listing = json.loads(run([self.bin, "list", cowb, "--json"], self.log).stdout)
        versions = check.expected_versions(listing, admin, frozen=frozen, findings=res["findings"])
        for export, spec in versions:
            data = read_export(self, rsock, export)
            res["findings"].extend(model.check_version(export, spec, data))
        res["versions"] = len(versions)
        server.send_signal(signal.SIGTERM)
        try:
            rc = server.wait(timeout=120)
        except subprocess.TimeoutExpired:
            rc = "timeout"
            self.reg.kill(server)
        if rc != 0:
            res["findings"].append("recovery server exited with %s" % rc)
        r = run([self.bin, "check", cowb], self.log, check_rc=False)
        res["check_after"] = r.returncode
        if r.returncode != 0:
            res["findings"].append("snapmv check after a clean serve: rc %d: %s"
                                   % (r.returncode, oneline(r.stdout + r.stderr)))


def read_export(cut, sock, export):
    h = cut.connect(sock, export)
    size = h.get_size()
    out = bytearray()
    step = 4 * MiB
    for off in range(0, size, step):
        out += h.pread(min(step, size - off), off)
    h.shutdown()
    return bytes(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cuts", type=int, default=10)
    ap.add_argument("--seed", type=int, default=None, help="seed of the first cut (cut k uses seed+k)")
    ap.add_argument("--bin", required=True, help="the snapmv binary")
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--live-secs", type=float, default=3.0, help="latest cut, seconds into the live phase")
    ap.add_argument("--min-live", type=float, default=0.3, help="earliest cut")
    ap.add_argument("--qdepth", type=int, default=16)
    ap.add_argument("--keep", action="store_true", help="keep every cut's directory")
    ap.add_argument("--keep-images", type=int, default=5,
                    help="failing cuts whose disk images are kept (logs and findings are kept for all)")
    ap.add_argument("--cache-mode", default="writeback",
                    help="nbdkit cache filter mode; 'unsafe' ignores FLUSH: a negative control "
                         "that must produce findings")
    ap.add_argument("--origin-cache-mode", default=None, help="the same for the origin's disk alone")
    a = ap.parse_args()
    a.origin_cache_mode = a.origin_cache_mode or a.cache_mode
    if a.seed is None:
        a.seed = int.from_bytes(os.urandom(4), "little")
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print("powercut: %d cut(s), seeds %d..%d, binary %s, work dir %s"
          % (a.cuts, a.seed, a.seed + a.cuts - 1, a.bin, a.workdir), flush=True)
    totals = {"acked": 0, "durable": 0, "lost": 0, "failed": 0, "flushes": 0, "cleaning": 0,
              "snapshots": 0}
    rules = {}
    failed = []
    t0 = time.monotonic()
    for k in range(a.cuts):
        seed = a.seed + k
        cut = Cut(a, k, seed, a.workdir)
        try:
            res = cut.run()
        except Stop:
            cut.reg.cleanup()
            print("powercut: interrupted; work dir kept: %s" % a.workdir)
            return 130
        except Exception as e:  # a broken harness step is a failure too
            import traceback
            traceback.print_exc()
            res = {"seed": seed, "findings": ["harness: %s" % e], "acked": 0, "durable": 0,
                   "flushes_ok": 0, "check_crash": "-", "check_after": "-", "lost_durable": 0,
                   "live_snapshots": 0, "wall": 0, "t_cut_after_live": 0, "cleaning_at_cut": False}
        finally:
            cut.reg.cleanup()
        bad = bool(res["findings"])
        print("cut %3d seed %d: cut at %.2fs live, %d writes acked (%d durable by the rule), "
              "%d flushes, %d live snapshots, cleaner %s, lost durable %d, check %s/%s, %s (%.1fs)"
              % (k, seed, res["t_cut_after_live"], res["acked"], res["durable"], res["flushes_ok"],
                 res["live_snapshots"], "busy" if res["cleaning_at_cut"] else "idle",
                 res["lost_durable"], res["check_crash"], res["check_after"],
                 "FAIL" if bad else "ok", res["wall"]), flush=True)
        for f in res["findings"][:20]:
            print("    finding: " + f, flush=True)
        if len(res["findings"]) > 20:
            print("    ... %d more findings" % (len(res["findings"]) - 20), flush=True)
        totals["acked"] += res["acked"]
        totals["durable"] += res["durable"]
        totals["flushes"] += res["flushes_ok"]
        totals["lost"] += res["lost_durable"]
        totals["cleaning"] += 1 if res["cleaning_at_cut"] else 0
        totals["snapshots"] += res["live_snapshots"]
        for r, n in res.get("rules", {}).items():
            rules[r] = rules.get(r, 0) + n
        if bad:
            failed.append(seed)
            with open(os.path.join(cut.dir, "findings.txt"), "w") as f:
                f.write("\n".join(res["findings"]) + "\n")
            for name in ("cow.img", "origin.img"):  # empty mount points, not the symlink
                if (os.path.isfile(cut.p(name)) and not os.path.islink(cut.p(name))
                        and not is_mounted(cut.p(name))):
                    os.unlink(cut.p(name))
            if len(failed) > a.keep_images:
                # ~0.5 GB a cut: past the first few, keep logs and findings only.
                for name in ("cow.back", "origin.back", "cow.crash", "origin.crash"):
                    if os.path.exists(cut.p(name)):
                        os.unlink(cut.p(name))
        elif not a.keep:
            shutil.rmtree(cut.dir)
    print("powercut: %d cut(s) in %.0fs: %d writes acked, %d durable by the rule (%s), %d flushes, "
          "%d live snapshots, cleaner busy at %d cut(s); %d lost durable write(s); "
          "%d cut(s) with findings%s"
          % (a.cuts, time.monotonic() - t0, totals["acked"], totals["durable"],
             ", ".join("%s %d" % kv for kv in sorted(rules.items())), totals["flushes"],
             totals["snapshots"], totals["cleaning"], totals["lost"], len(failed),
             (" (seeds %s; images and logs kept under %s)" % (" ".join(map(str, failed)), a.workdir))
             if failed else ""), flush=True)
    print("powercut: %d passed, %d failed" % (a.cuts - len(failed), len(failed)), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
