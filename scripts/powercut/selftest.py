#!/usr/bin/python3
"""Checks the power-cut disk itself (disk.py) before any cut relies on it:
that it keeps what was flushed and loses what was not. Run at the start of
every scripts/powercut.sh; exits non-zero if the disk does not behave.

Through the nbdfuse file (what snapmv uses):
  A  pwrite + fsync                      -> must survive
  B  pwrite, then C pwrite + fdatasync   -> both must survive (B was written
                                            before the flush)
  D  pwrite, no sync, after all flushes -> must be lost
Straight to nbdkit over NBD (two connections):
  E  write with FUA                      -> must survive
  F  plain write on conn 1, FLUSH on conn 2 -> must survive (multi-conn)
  G  plain write, no flush               -> must be lost
Every one is first read back through the live disk (so the lost ones were
really accepted), then nbdkit is SIGKILLed: an fsync must now fail (no
FLUSH can succeed once the power is gone), and the backing file is read.
"""
import os
import signal
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import disk  # noqa: E402

MiB = 1 << 20
BLK = 4096


def main():
    import nbd
    workdir = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="powercut-selftest.")
    d = tempfile.mkdtemp(prefix="selftest.", dir=workdir)
    reg = disk.Registry(workdir)
    try:
        with open(os.path.join(d, "t.back"), "wb") as f:
            f.truncate(16 * MiB)
        kits, pgid, _ = disk.start(reg, d, [("t", "writeback")])
        img = os.path.join(d, "t.img")
        pat = {k: bytes([ord(k)]) * BLK for k in "ABCDEFG"}
        off = {k: i * MiB for i, k in enumerate("ABCDEFG")}
        fd = os.open(img, os.O_RDWR)
        os.pwrite(fd, pat["A"], off["A"])
        os.fsync(fd)
        os.pwrite(fd, pat["B"], off["B"])
        os.pwrite(fd, pat["C"], off["C"])
        os.fdatasync(fd)
        sock = os.path.join(d, "kit-t.sock")
        h1, h2 = nbd.NBD(), nbd.NBD()
        h1.connect_unix(sock)
        h2.connect_unix(sock)
        h1.pwrite(pat["E"], off["E"], nbd.CMD_FLAG_FUA)
        h1.pwrite(pat["F"], off["F"])
        h2.flush()
        # The flushes are all done: D and G are the only unflushed writes.
        os.pwrite(fd, pat["D"], off["D"])
        h1.pwrite(pat["G"], off["G"])
        for k in "ABCDEFG":
            if h2.pread(BLK, off[k]) != pat[k] or os.pread(fd, BLK, off[k]) != pat[k]:
                raise SystemExit("selftest: %s does not read back from the live disk" % k)
        os.killpg(pgid, signal.SIGKILL)
        for k in kits:
            reg.kill(k)
        # With the power gone, a write may be taken (into the page cache) but
        # a flush must fail: a disk that said yes here would let the server
        # acknowledge a FLUSH after the cut.
        try:
            os.pwrite(fd, pat["D"], off["D"])
            os.fsync(fd)
            raise SystemExit("selftest: fsync succeeded on the nbdfuse file after nbdkit was killed")
        except OSError:
            pass
        try:
            os.close(fd)  # the fd is gone even if close reports the dead disk
        except OSError:
            pass
        reg.unmount_all()
        with open(os.path.join(d, "t.back"), "rb") as f:
            back = f.read()
        bad = []
        for k in "ABCEF":
            if back[off[k]:off[k] + BLK] != pat[k]:
                bad.append("%s (flushed) did not survive" % k)
        for k in "DG":
            if back[off[k]:off[k] + BLK] != bytes(BLK):
                bad.append("%s (never flushed) survived: the disk is not volatile" % k)
        if bad:
            raise SystemExit("selftest: the power-cut disk misbehaves: " + "; ".join(bad))
        print("powercut selftest: nbdkit cache=writeback behind nbdfuse keeps fsync'd, fdatasync'd, "
              "FUA and other-connection-FLUSHed writes and loses unflushed ones at SIGKILL")
    finally:
        reg.cleanup()
        for name in os.listdir(d):
            os.unlink(os.path.join(d, name))
        os.rmdir(d)


if __name__ == "__main__":
    main()
