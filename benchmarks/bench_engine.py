"""Rows engine / engine_json / engine_local: the Docker plugin on a real engine against Docker's own
drivers (issue 9). Each runs ``docker run --rm zl-busybox sh -c 'yes <100 chars> | head -n N'``
with its log driver and times the ``docker run`` (what a user waits for):

  engine        --log-driver <a `zeroline plugin` started here> (push to a `zeroline collect` here)
  engine_json   --log-driver json-file
  engine_local  --log-driver local

CPU seconds per run, from /proc: the plugin's (cpu_send_s), the collector's (cpu_recv_s) and
dockerd's (cpu_dockerd_s). The zeroline row also checks that the collector wrote N lines.
Skipped, with the reason, where no engine answers ``docker info`` (scripts/docker-engine.sh start
sets one up). Standalone: ``python -m benchmarks.bench_engine [--lines N] [--rounds R]``.
"""

import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid

ROWS = ("engine", "engine_json", "engine_local")
IMAGE = "zl-busybox"
LINE = "x" * 100
LINES = 2_000_000
PLUGIN_DIR = "/run/docker/plugins"
_TICK = os.sysconf("SC_CLK_TCK")


def available():
    """None when an engine answers and has the image, else the reason to skip."""
    try:
        if subprocess.run(["docker", "info"], capture_output=True, timeout=20,
                          check=False).returncode != 0:
            return "no Docker engine answers docker info (bash scripts/docker-engine.sh start)"
        if subprocess.run(["docker", "image", "inspect", IMAGE], capture_output=True,
                          timeout=20, check=False).returncode != 0:
            return "no %s image (bash scripts/docker-engine.sh start makes it)" % IMAGE
    except (OSError, subprocess.TimeoutExpired) as exc:
        return "docker CLI unusable: %s" % exc
    return None


def cpu_s(pid):
    """utime + stime of a live process, in seconds (0.0 when it is gone)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


def dockerd_pid():
    try:
        with open("/var/run/docker.pid") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def _wait(predicate, timeout_s):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _count_lines(out_dir):
    total = 0
    for root, _, files in os.walk(out_dir):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                while True:
                    chunk = f.read(1 << 20)
                    if not chunk:
                        break
                    total += chunk.count(b"\n")
    return total


def measure(row, tmp, lines=LINES):
    """One run of ``row``; the result dict the benchmark table expects."""
    nbytes = lines * (len(LINE) + 1)
    work = tempfile.mkdtemp(prefix="zl-bench-engine-", dir=tmp)
    procs = []
    res = {"lines": lines, "nbytes": nbytes}
    try:
        args = ["docker", "run", "--rm"]
        collector = plugin = None
        if row == "engine":
            name = "zlbench-%s" % uuid.uuid4().hex[:8]
            sock = os.path.join(PLUGIN_DIR, name + ".sock")
            os.makedirs(PLUGIN_DIR, exist_ok=True)
            address = "ipc://%s/c.ipc" % work
            out = os.path.join(work, "out")
            exe = [sys.executable, "-m", "zeroline"]
            with open(os.path.join(work, "collect.log"), "wb") as log:
                collector = subprocess.Popen(exe + ["collect", "--bind", address, "--out", out],
                                             stdout=log, stderr=subprocess.STDOUT)
            procs.append(collector)
            with open(os.path.join(work, "plugin.log"), "wb") as log:
                plugin = subprocess.Popen(exe + ["plugin", "--socket", sock, "--state-dir",
                                                 os.path.join(work, "state")],
                                          stdout=log, stderr=subprocess.STDOUT)
            procs.append(plugin)
            if not _wait(lambda: os.path.exists(sock) and os.path.exists(address[6:]), 30):
                return dict(res, error="the plugin or the collector did not start")
            args += ["--log-driver", name, "--log-opt", "zmq-address=" + address,
                     "--log-opt", "zmq-socket=push"]
        else:
            args += ["--log-driver", "json-file" if row == "engine_json" else "local"]
        args += [IMAGE, "sh", "-c", "yes %s | head -n %d" % (LINE, lines)]
        profile = os.environ.get("ZL_BENCH_PYSPY")     # a py-spy profile of the plugin's run
        if plugin is not None and profile:
            procs.append(subprocess.Popen(["py-spy", "record", "--pid", str(plugin.pid), "-r",
                                           "200", "--format", "raw", "-o", profile, "-d", "20"],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        dpid = dockerd_pid()
        before = [cpu_s(p.pid) for p in (plugin, collector) if p] + [cpu_s(dpid) if dpid else 0]
        t0 = time.monotonic()
        done = subprocess.run(args, capture_output=True, timeout=900, check=False)
        wall = time.monotonic() - t0
        if done.returncode != 0:
            return dict(res, error="docker run: %s" % done.stderr.decode("utf-8", "replace")[-300:])
        res["wall_s"] = wall
        if row == "engine":
            # Delivered: the collector has every line (not timed: docker run already returned).
            if not _wait(lambda: _count_lines(out) >= lines, 120):
                return dict(res, error="the collector got %d of %d lines" % (_count_lines(out),
                                                                              lines))
            res["verified"] = "%d lines at the collector" % lines
            res["cpu_send_s"] = cpu_s(plugin.pid) - before[0]
            res["cpu_recv_s"] = cpu_s(collector.pid) - before[1]
        res["cpu_dockerd_s"] = (cpu_s(dpid) - before[-1]) if dpid else None
        return res
    finally:
        for proc in procs[2:]:
            proc.wait(60)       # the profiler writes its file when its duration is over
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        shutil.rmtree(work, ignore_errors=True)


def main(argv=None):
    import argparse

    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_engine")
    p.add_argument("--lines", type=int, default=LINES)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--rows", default=",".join(ROWS))
    args = p.parse_args(argv)
    why = available()
    if why:
        print("skipped: " + why)
        return 0
    rows = args.rows.split(",")
    results = {row: [] for row in rows}
    tmp = tempfile.mkdtemp(prefix="zl-bench-")
    try:
        for rnd in range(args.rounds):
            for row in (rows if rnd % 2 == 0 else rows[::-1]):
                res = measure(row, tmp, args.lines)
                results[row].append(res)
                if "error" in res:
                    print("round %d %-12s ERROR %s" % (rnd + 1, row, res["error"]), flush=True)
                    continue
                cpu = " ".join("%s %.2f s" % (k[4:-2], res[k]) for k in
                               ("cpu_send_s", "cpu_recv_s", "cpu_dockerd_s")
                               if res.get(k) is not None)
                print("round %d %-12s %8.0f lines/s  wall %.2f s  cpu: %s" % (
                    rnd + 1, row, args.lines / res["wall_s"], res["wall_s"], cpu), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
