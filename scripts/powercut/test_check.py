#!/usr/bin/python3
"""Unit test of the checker (check.py) on hand-made logs and images: every
durability rule, and every kind of finding it must (and must not) report.
Needs no server; scripts/powercut.sh runs it first."""
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import check  # noqa: E402
import stamp  # noqa: E402

NSEC = 64
O = stamp.ORIGIN
FAILS = []


def expect(cond, what):
    if not cond:
        FAILS.append(what)


def log(d, name, conn, code, lines):
    p = os.path.join(d, name)
    with open(p, "w") as f:
        f.write("H conn=%d export=x code=%d size=%d\n" % (conn, code, NSEC * 512))
        f.write("".join(line + "\n" for line in lines))
    return p


def image(content):
    """content: list of (wid, code) per sector, wid 0 = zeros."""
    return b"".join(stamp.ZERO if w == 0 else stamp.sector_bytes(c, s, w)
                    for s, (w, c) in enumerate(content))


def kinds(findings):
    return " ".join(findings)


def main():
    d = tempfile.mkdtemp(prefix="powercut-test-check.")
    c1 = 1 << 40
    c2 = 2 << 40
    # conn 1: A with FUA; B, then a FLUSH on conn 1; C after everything:
    # not durable. conn 2: D replied before conn 1's FLUSH was issued:
    # durable; E replied before the snapshot began: durable; F never replied.
    A, B, C = c1 | 1, c1 | 2, c1 | 3
    D, E, F = c2 | 1, c2 | 2, c2 | 3
    l1 = log(d, "c1", 1, O, [
        "I %d 0 4 1 100" % A, "R %d 0 110" % A,
        "I %d 4 4 0 120" % B, "R %d 0 130" % B,
        "F %d 140" % (c1 | 9), "G %d 0 150" % (c1 | 9),
        "I %d 8 4 0 300" % C, "R %d 0 310" % C,
    ])
    l2 = log(d, "c2", 2, O, [
        "I %d 12 4 0 100" % D, "R %d 0 105" % D,
        "I %d 16 4 0 200" % E, "R %d 0 210" % E,
        "I %d 20 4 0 220" % F,
    ])
    base = [1] * NSEC
    admin = [{"kind": "snapshot", "of": None, "memo": "live-1", "t0": 250, "t1": 260, "rc": 0, "tag": 5}]
    m = check.Model([l1, l2], NSEC, {O: base}, {1: O}, admin)
    why = {w.wid: w.why for w in m.writes.values()}
    expect(why[A] == "fua", "A durable by fua: %r" % why[A])
    expect(why[B] == "flush same conn", "B durable by its conn's flush: %r" % why[B])
    expect(why[C] is None, "C not durable: %r" % why[C])
    expect(why[D] == "flush any conn", "D durable by a flush issued after its reply: %r" % why[D])
    expect(why[E] == "snapshot", "E durable by the snapshot: %r" % why[E])
    expect(why[F] is None, "F not durable")

    def content(over):
        c = [(1, O)] * NSEC
        for s, v in over.items():
            c[s] = v
        return c

    good = {s: (w, O) for w, first in ((A, 0), (B, 4), (D, 12), (E, 16)) for s in range(first, first + 4)}
    f = m.check_version("orig", {"kind": "live", "code": O}, image(content(good)))
    expect(f == [], "all durable writes present, C and F not: no finding, got %s" % f)
    # C and F may be there too (written but not durable).
    more = dict(good)
    more.update({s: (C, O) for s in range(8, 12)})
    more.update({s: (F, O) for s in range(20, 24)})
    f = m.check_version("orig", {"kind": "live", "code": O}, image(content(more)))
    expect(f == [], "non-durable writes present: no finding, got %s" % f)
    # B lost: its sectors hold the pre-live content.
    lost = dict(good)
    del lost[5]
    m.lost.clear()
    f = m.check_version("orig", {"kind": "live", "code": O}, image(content(lost)))
    expect("lost durable write in 1 sector" in kinds(f) and m.lost == {B}, "B lost must be found: %s" % f)
    # garbage, a misplaced stamp, another export's stamp, a write outside its range
    bad = dict(good)
    bad[30] = (A, O)
    img = bytearray(image(content(bad)))
    img[31 * 512 + 100] ^= 1
    img[32 * 512:33 * 512] = stamp.sector_bytes(O, 33, 1)
    img[34 * 512:35 * 512] = stamp.sector_bytes(stamp.WRITABLE, 34, 1)
    f = kinds(m.check_version("orig", {"kind": "live", "code": O}, bytes(img)))
    for k in ("garbage in 1", "misplaced in 1", "bad export code in 1", "foreign data in 1"):
        expect(k in f, "%s expected in %s" % (k, f))
    # zeros where the pre-live content was
    z = dict(good)
    z[40] = (0, O)
    f = kinds(m.check_version("orig", {"kind": "live", "code": O}, image(content(z))))
    expect("pre-live (flushed) content lost in 1" in f, "zeros over pre-live data: %s" % f)
    # frozen: exact
    f = m.check_version("orig@1", {"kind": "frozen", "expect": base}, image(content({})))
    expect(f == [], "frozen intact: %s" % f)
    f = kinds(m.check_version("orig@1", {"kind": "frozen", "expect": base}, image(content({3: (A, O)}))))
    expect("frozen snapshot changed in 1" in f, "frozen changed: %s" % f)
    # live snapshot [250, 260]: must hold A B D E (replied before 250), may
    # hold F (issued 220, before it returned), must not hold C (issued 300).
    snap = {"kind": "snapshot", "code": O, "t0": 250, "t1": 260}
    withf = dict(good)
    withf.update({s: (F, O) for s in range(20, 24)})
    f = m.check_version("orig@5", snap, image(content(withf)))
    expect(f == [], "snapshot with everything completed before it: %s" % f)
    f = kinds(m.check_version("orig@5", snap, image(content(more))))
    expect("write newer than the snapshot in 4" in f, "C issued after the snapshot returned: %s" % f)
    miss = dict(withf)
    del miss[13]  # D replied at 105 < t0: the snapshot must have it
    f = kinds(m.check_version("orig@5", snap, image(content(miss))))
    expect("snapshot misses a write completed before it began in 1" in f, "snapshot missing D: %s" % f)
    early = {"kind": "snapshot", "code": O, "t0": 90, "t1": 215}
    f = kinds(m.check_version("orig@5", early, image(content(withf))))
    expect("write newer than the snapshot in 4" in f, "F issued after the snapshot returned: %s" % f)
    # expected_versions: a deleted snapshot still listed, a missing one
    listing = {"origins": [{"id": "orig", "snapshots": [
        {"tag": 1, "memo": "frozen-1", "parent": None}, {"tag": 2, "memo": "to-delete", "parent": None},
        {"tag": 3, "memo": "writable", "parent": 1}, {"tag": 4, "memo": "frozen-4", "parent": None},
        {"tag": 9, "memo": "stray", "parent": None}]}]}
    ops = [{"kind": "delete", "tag": 2, "rc": 0}] + admin
    fnd = []
    vs = check.expected_versions(listing, ops, {1: base, 2: base, 4: base}, fnd)
    fk = kinds(fnd)
    expect("snapshot 2 still listed" in fk, "delete not honoured: %s" % fk)
    expect("live snapshot 5 (live-1) missing" in fk, "missing live snapshot: %s" % fk)
    expect("unexpected snapshot" in fk, "stray snapshot: %s" % fk)
    expect([v for v, _ in vs] == ["orig", "orig@1", "orig@4", "orig@3"], "versions %s" % vs)
    for name in os.listdir(d):
        os.unlink(os.path.join(d, name))
    os.rmdir(d)
    if FAILS:
        print("test_check: %d failed:\n  %s" % (len(FAILS), "\n  ".join(FAILS)))
        return 1
    print("test_check: checker rules and findings as expected")
    return 0


if __name__ == "__main__":
    sys.exit(main())
