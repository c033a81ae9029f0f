"""The power-cut disk: a plain backing file served by nbdkit through its
cache filter in write-back mode, shown as a regular file by nbdfuse mounted
over it. What reaches the backing file is exactly what was flushed (NBD
FLUSH, which fsync/fdatasync on the nbdfuse file send) or written with FUA,
plus whatever else shares a 4 KiB cache block with those; everything else
lives only in nbdkit's (unlinked) cache file and dies with nbdkit.
selftest.py checks exactly that on every run.

Also the bookkeeping shared with scripts/powercut.sh: every process started
goes to WORKDIR/pids ("pid starttime"), every mount to WORKDIR/mounts, so the
shell's trap can clean up after a killed Python process.
"""
import os
import subprocess
import sys
import time


class Registry:
    """Every process started and every mount made, so that nothing outlives
    the run: cleaned here, and (if this process is killed) by the trap in
    scripts/powercut.sh, which reads the same files."""

    def __init__(self, workdir):
        self.procs = []
        self.mounts = []
        self.pidfile = os.path.join(workdir, "pids")
        self.mountfile = os.path.join(workdir, "mounts")

    def spawn(self, argv, log, **kw):
        out = open(log, "ab")
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, **kw)
        out.close()
        self.procs.append(p)
        self.track(p)
        return p

    def track(self, p):
        """Record p for the shell's trap (pid and start time, so that a
        recycled pid is never killed)."""
        try:
            with open("/proc/%d/stat" % p.pid) as f:
                start = f.read().rsplit(")", 1)[1].split()[19]
        except OSError:
            return  # already gone
        with open(self.pidfile, "a") as f:
            f.write("%d %s\n" % (p.pid, start))

    def mounted(self, path):
        self.mounts.append(path)
        with open(self.mountfile, "a") as f:
            f.write(path + "\n")

    def kill(self, p):
        if p.poll() is None:
            try:
                p.kill()
            except ProcessLookupError:
                pass
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            print("warning: pid %d did not die" % p.pid, file=sys.stderr)

    def unmount_all(self):
        for m in reversed(self.mounts):
            if is_mounted(m):
                r = subprocess.run(["fusermount3", "-u", m], capture_output=True)
                if r.returncode != 0 and is_mounted(m):
                    subprocess.run(["umount", "-l", m], capture_output=True)
        self.mounts = []

    def cleanup(self):
        for p in reversed(self.procs):
            self.kill(p)
        self.unmount_all()
        for p in self.procs:
            self.kill(p)
        self.procs = []
        for f in (self.pidfile, self.mountfile):
            if os.path.exists(f):
                os.unlink(f)


def is_mounted(path):
    path = os.path.realpath(path)
    with open("/proc/self/mounts") as f:
        for line in f:
            if line.split()[1] == path:
                return True
    return False


def wait_for(cond, what, timeout=20.0, procs=()):
    deadline = time.monotonic() + timeout
    while not cond():
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError("%s: process %s exited (%s)" % (what, p.args[0], p.returncode))
        if time.monotonic() > deadline:
            raise RuntimeError("timed out waiting for " + what)
        time.sleep(0.01)



def start(reg, d, disks):
    """For each (name, cache mode): nbdkit on d/NAME.back, nbdfuse over
    d/NAME.img. All the nbdkits share one new process group, so that one
    killpg() cuts the power to every disk at the same instant. Returns
    (nbdkit procs, their process group, nbdfuse procs)."""
    env = dict(os.environ, TMPDIR=d)  # where nbdkit keeps its cache file (unlinked)
    kits = []
    pgid = 0
    for name, mode in disks:
        sock = os.path.join(d, "kit-%s.sock" % name)
        argv = ["nbdkit", "-f", "--exit-with-parent", "-U", sock, "--filter=cache",
                "file", os.path.join(d, name + ".back"), "cache=" + mode,
                "cache-min-block-size=4096"]
        kit = reg.spawn(argv, os.path.join(d, "nbdkit-%s.log" % name), env=env,
                        process_group=pgid)  # 0: a new group, led by the first
        pgid = pgid or kit.pid
        kits.append(kit)
        wait_for(lambda: os.path.exists(sock), "nbdkit " + name, procs=[kit])
    fuses = []
    for name, _ in disks:
        img = os.path.join(d, name + ".img")
        open(img, "w").close()
        pidf = os.path.join(d, "nbdfuse-%s.pid" % name)
        fz = reg.spawn(["nbdfuse", "-P", pidf, img, "--unix", os.path.join(d, "kit-%s.sock" % name)],
                       os.path.join(d, "nbdfuse-%s.log" % name), start_new_session=True)
        reg.mounted(img)
        wait_for(lambda: os.path.exists(pidf) and os.path.getsize(pidf) > 0,
                 "nbdfuse " + name, procs=[fz])
        fuses.append(fz)
    return kits, pgid, fuses
