"""Judges what a version holds after the power cut, sector by sector, against
the clients' logs (see client.py for their format) and the admin commands.

Durability (a write W to export e is *durable* when its success reply was
received and any of these holds):
  (a) W carried FUA;
  (b) a FLUSH on W's connection got a success reply after W's reply (replies
      on one connection arrive in the order the server sent them, so W
      completed before that FLUSH completed: contract item 3);
  (c) W's reply was received before a FLUSH was *issued*, on any connection,
      that got a success reply (across connections only issue time proves the
      server had completed W before the FLUSH: NBD's multi-conn rule);
  (d) W's reply was received before a snapshot of e was started whose
      command succeeded (contract item 3: a snapshot first makes every
      completed write to its source durable).

A sector of a live version (the origin, the writable snapshot) may hold
only: its content from before the live phase, or a stamp of a live write to
that very sector of that export. And it must not be *strictly older* than a
durable write D covering it: content X is strictly older than D when X's
reply was received before D was issued (X completed before D began), and
the pre-live content is older than every live write. A sector failing that
is a lost durable write (D is the one named).

A snapshot taken live of source e, its command started at t0 and returned
at t1 (t1 = the cut if it had not returned), must hold per sector: e's
pre-live content or a stamp of a write to e at that sector issued before t1,
and nothing strictly older than a write to e at that sector whose reply was
received before t0 (contract item 2). Frozen snapshots taken before the live
phase must hold exactly their known content.

All times are CLOCK_MONOTONIC ns, taken before an issue is sent and after a
reply arrives, so every comparison above errs towards demanding less.
"""
import stamp

INF = float("inf")


class W:
    __slots__ = ("wid", "conn", "code", "first", "n", "fua", "t_issue", "t_reply", "err", "why",
                 "cover")

    def __init__(self, wid, conn, code, first, n, fua, t_issue):
        self.wid, self.conn, self.code = wid, conn, code
        self.first, self.n, self.fua, self.t_issue = first, n, fua, t_issue
        self.t_reply, self.err, self.why, self.cover = None, None, None, None

    def ok(self):
        return self.err == 0


class Model:
    def __init__(self, logs, nsec, bases, base_codes, admin):
        self.nsec = nsec
        self.bases = bases            # code -> list of base wid per sector
        self.base_codes = base_codes  # pre-live wid -> export code stamped
        self.writes = {}
        self.flushes = []             # (conn, t_issue, t_reply, err)
        self.lost = set()
        self.admin = admin
        for path in logs:
            self._parse(path)
        self._durability()

    def _parse(self, path):
        code = conn = None
        pend = {}
        with open(path) as f:
            for line in f:
                if not line.endswith("\n"):
                    break  # a torn last line (never an issue line: see client.py)
                p = line.split()
                t = p[0]
                if t == "H":
                    kv = dict(x.split("=", 1) for x in p[1:])
                    conn, code = int(kv["conn"]), int(kv["code"])
                elif t == "I":
                    wid = int(p[1])
                    self.writes[wid] = W(wid, conn, code, int(p[2]), int(p[3]), p[4] == "1", int(p[5]))
                elif t == "R":
                    w = self.writes[int(p[1])]
                    w.err, w.t_reply = int(p[2]), int(p[3])
                elif t == "F":
                    pend[int(p[1])] = int(p[2])
                elif t == "G":
                    self.flushes.append((conn, pend.pop(int(p[1])), int(p[3]), int(p[2])))
        for ti in pend.values():
            self.flushes.append((conn, ti, None, None))

    def _durability(self):
        reply_max = {}
        issue_max = -1
        self.ok_flushes = ok = [f for f in self.flushes if f[3] == 0]
        for conn, ti, tr, err in ok:
            reply_max[conn] = max(reply_max.get(conn, -1), tr)
            issue_max = max(issue_max, ti)
        snap_t0 = {}
        for op in self.admin:
            if op["kind"] == "snapshot" and op["rc"] == 0:
                code = stamp.WRITABLE if op.get("of") else stamp.ORIGIN
                snap_t0[code] = max(snap_t0.get(code, -1), op["t0"])
        self.rules = {"fua": 0, "flush same conn": 0, "flush any conn": 0, "snapshot": 0}
        for w in self.writes.values():
            if not w.ok():
                continue
            if w.fua:
                w.why = "fua"
            elif w.t_reply < reply_max.get(w.conn, -1):
                w.why = "flush same conn"
            elif w.t_reply < issue_max:
                w.why = "flush any conn"
            elif w.t_reply < snap_t0.get(w.code, -1):
                w.why = "snapshot"
            if w.why:
                self.rules[w.why] += 1

    def stats(self):
        acked = sum(1 for w in self.writes.values() if w.ok())
        return {
            "issued": len(self.writes),
            "acked": acked,
            "errors": sum(1 for w in self.writes.values() if w.err not in (None, 0)),
            "durable": sum(1 for w in self.writes.values() if w.why),
            "rules": dict(self.rules),
            "flushes_ok": sum(1 for f in self.flushes if f[3] == 0),
        }

    def _floor(self, code, pick):
        """Per sector: the latest issue time among the writes to `code` that
        pick() selects, and which write that was."""
        thr = [-1] * self.nsec
        who = [0] * self.nsec
        for w in self.writes.values():
            if w.code != code or not pick(w):
                continue
            ti = w.t_issue
            for s in range(w.first, w.first + w.n):
                if ti > thr[s]:
                    thr[s] = ti
                    who[s] = w.wid
        return thr, who

    def describe(self, wid):
        w = self.writes.get(wid)
        if w is None:
            return "pre-live write %d" % wid if wid else "zeros"
        # The FLUSH that makes it durable, to name in a finding.
        ok = self.ok_flushes
        if w.why == "flush same conn":
            w.cover = min((f for f in ok if f[0] == w.conn and f[2] > w.t_reply), key=lambda f: f[2])
        elif w.why == "flush any conn":
            w.cover = min((f for f in ok if f[1] > w.t_reply), key=lambda f: f[1])
        return ("write %d (conn %d, sectors %d+%d, fua %d, issued %.6f, %s%s%s)"
                % (wid, w.conn, w.first, w.n, w.fua, w.t_issue / 1e9,
                   "replied %.6f err %d" % (w.t_reply / 1e9, w.err) if w.t_reply else "no reply",
                   ", durable by " + w.why if w.why else "",
                   ": FLUSH on conn %d issued %.6f replied %.6f" % (w.cover[0], w.cover[1] / 1e9,
                                                                   w.cover[2] / 1e9)
                   if w.cover else ""))

    def check_version(self, export, spec, data):
        """spec: {"kind": "frozen", "expect": [wid per sector]} or
        {"kind": "live", "code": c} or {"kind": "snapshot", "code": c, "t0":, "t1":}."""
        out = {}

        def finding(kind, s, text):
            e = out.setdefault(kind, [0, []])
            e[0] += 1
            if len(e[1]) < 3:
                e[1].append("sector %d: %s" % (s, text))

        if len(data) != self.nsec * stamp.SECTOR:
            return ["%s: size %d, expected %d" % (export, len(data), self.nsec * stamp.SECTOR)]
        kind = spec["kind"]
        if kind == "frozen":
            expect = spec["expect"]
        else:
            code = spec["code"]
            base = self.bases[code]
            if kind == "live":
                thr, who = self._floor(code, lambda w: w.why is not None)
                t1 = INF
            else:
                t0 = spec["t0"]
                thr, who = self._floor(code, lambda w: w.ok() and w.t_reply < t0)
                t1 = spec["t1"] if spec["t1"] is not None else INF
        writes = self.writes
        for s, k, scode, ssec, wid in stamp.decode(data):
            if k == "garbage":
                finding("garbage", s, "neither zero nor a valid stamp")
                continue
            if k == "stamp":
                if ssec != s:
                    finding("misplaced", s, "holds the stamp of sector %d (%s)" % (ssec, self.describe(wid)))
                    continue
                w = writes.get(wid)
                want = w.code if w else self.base_codes.get(wid)
                if want != scode:
                    finding("bad export code", s, "stamp says export %d, %s" % (scode, self.describe(wid)))
                    continue
            if kind == "frozen":
                if wid != expect[s]:
                    finding("frozen snapshot changed", s, "holds %s, expected %s"
                            % (self.describe(wid), self.describe(expect[s])))
                continue
            if wid == base[s]:
                t_rep = -1
            else:
                w = writes.get(wid)
                if w is None:
                    finding("pre-live (flushed) content lost", s, "holds %s, expected %s"
                            % (self.describe(wid), self.describe(base[s])))
                    continue
                if w.code != code or not (w.first <= s < w.first + w.n):
                    finding("foreign data", s, "holds %s, not a write to this sector of this version "
                            "(pre-live content: %s)" % (self.describe(wid), self.describe(base[s])))
                    continue
                if w.t_issue >= t1:
                    finding("write newer than the snapshot", s, "holds %s, issued after the snapshot "
                            "command returned" % self.describe(wid))
                    continue
                t_rep = w.t_reply if w.t_reply is not None else INF
            if t_rep < thr[s]:
                if kind == "live":
                    self.lost.add(who[s])
                    finding("lost durable write", s, "holds %s, older than durable %s"
                            % (self.describe(wid), self.describe(who[s])))
                else:
                    finding("snapshot misses a write completed before it began", s,
                            "holds %s, older than %s" % (self.describe(wid), self.describe(who[s])))
        return ["%s: %s in %d sector(s); e.g. %s" % (export, kind_, n, "; ".join(ex))
                for kind_, (n, ex) in out.items()]


def expected_versions(listing, admin, frozen, findings):
    """Which versions must (or may) exist after recovery, and what each must
    hold. Appends to findings any snapshot present or missing against the
    admin commands' results."""
    origin = [o for o in listing["origins"] if o["id"] == "orig"]
    if not origin:
        findings.append("origin orig missing from `snapmv list`")
        return []
    snaps = {s["tag"]: s for s in origin[0]["snapshots"]}
    by_memo = {s["memo"]: s["tag"] for s in snaps.values()}
    out = [("orig", {"kind": "live", "code": stamp.ORIGIN})]
    known = set()
    for tag in (1, 3, 4):
        known.add(tag)
        if tag not in snaps:
            findings.append("snapshot %d (taken before the live phase) missing" % tag)
    if 1 in snaps:
        out.append(("orig@1", {"kind": "frozen", "expect": frozen[1]}))
    if 4 in snaps:
        out.append(("orig@4", {"kind": "frozen", "expect": frozen[4]}))
    if 3 in snaps:
        out.append(("orig@3", {"kind": "live", "code": stamp.WRITABLE}))
        if snaps[3].get("parent") != 1:
            findings.append("snapshot 3 should be a child of 1: %r" % snaps[3])
    deleted = {}
    for op in admin:
        if op["kind"] == "delete":
            deleted[op["tag"]] = op["rc"]
    known.add(2)
    if 2 in snaps:
        if deleted.get(2) == 0:
            findings.append("snapshot 2 still listed after its delete returned")
        elif 2 in frozen:
            out.append(("orig@2", {"kind": "frozen", "expect": frozen[2]}))
    for op in admin:
        if op["kind"] != "snapshot":
            continue
        tag = op.get("tag") if op["rc"] == 0 else by_memo.get(op["memo"])
        if tag is None:
            if op["rc"] is not None and op["rc"] != 0:
                findings.append("snapshot command %s failed (rc %s): %s"
                                % (op["memo"], op["rc"], op.get("out", "").strip()))
            continue  # never returned and not created: fine
        known.add(tag)
        if op["rc"] not in (None, 0):
            findings.append("snapshot %s exists although its command failed (rc %s)" % (tag, op["rc"]))
        if tag not in snaps:
            if op["rc"] == 0 and (tag not in deleted or deleted[tag] not in (None, 0)):
                findings.append("live snapshot %d (%s) missing although its command returned"
                                % (tag, op["memo"]))
            continue
        if deleted.get(tag) == 0:
            findings.append("live snapshot %d still listed after its delete returned" % tag)
            continue
        if snaps[tag]["memo"] != op["memo"]:
            findings.append("snapshot %d has memo %r, expected %r" % (tag, snaps[tag]["memo"], op["memo"]))
            continue
        code = stamp.WRITABLE if op.get("of") else stamp.ORIGIN
        out.append(("orig@%d" % tag, {"kind": "snapshot", "code": code, "t0": op["t0"], "t1": op["t1"]}))
    for tag in snaps:
        if tag not in known:
            findings.append("unexpected snapshot %r" % snaps[tag])
    return out
