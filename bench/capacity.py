#!/usr/bin/env python
"""Capacity of one inference pod, for the HorizontalPodAutoscaler (k8s/base/hpa.yaml).

    python bench/capacity.py                         # 0.5, 1 and 2 CPUs; 1..32 connections, 2 x 10 s each
    python bench/capacity.py --cpus 1 --duration 5   # one size, shorter runs
    python bench/capacity.py --weight 8              # on a busy machine (root): the server gets its CPU
    python bench/capacity.py --peak 10000            # size the autoscaler's maximum for 10000 requests/s

Each CPU size runs `mnist-k8s serve --workers 1`, one server process as in the pod (the Deployment sets
MNIST_K8S_WORKERS=1), with as many torch threads as the pod would take from its CPU limit. Whole CPUs are
given with `taskset` (the load generator then runs on the other cores when there are any); a fractional
size with the kernel's CFS bandwidth control, the mechanism the kubelet uses for `limits.cpu`: cgroup v2
`cpu.max` when this machine's unified hierarchy has the cpu controller, else cgroup v1's
`cpu.cfs_quota_us`/`cpu.cfs_period_us` (both need root; without them fractional sizes are skipped, and
the output says so). On a busy machine other processes take the server's CPU, which a pod's CPU request
prevents on a node (the kubelet sets CFS weights from requests): `--weight 8` puts the server and wrk in a
cgroup that weighs eight times a default one (root), so they get their CPU the same way.

`wrk` (Debian: `apt-get install -y wrk`) posts a real MNIST test digit, drawn as the page's drawing pad sends
it (a 280x280 RGBA PNG, white ink on black), as a multipart form to /predict over keep-alive connections, at several connection counts, --rounds times each, keeping the best round (other
processes on the machine only ever slow the server down). For each it prints requests/s, the median and
p99 latency, the CPU the server used (all its processes and threads, from /proc) as cores and as a share of
the size, and CPU milliseconds per request. A size's capacity is its best requests/s with p99 within
--slo-ms and no failed request.

From the capacity of the pod size the Deployment uses (--pod-cpu), it derives what hpa.yaml holds: the
CPU target per pod (--headroom times the CPU used at capacity: the autoscaler adds pods before they
saturate, leaving room for the ~15 s metrics cycle and a new pod's start), the maximum replica count for
--peak requests/s, and the table "N requests/s needs M pods". The figures depend on the machine: on a
shared one, run it when it is quiet, and compare several runs.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from PIL import Image

from serve import BOUNDARY, WRK_LUA, cpu_seconds, free_port, mnist_digit_png, multipart  # bench/serve.py

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "tests" / "data"
CGROUP_NAME = f"mnist-k8s-capacity-{os.getpid()}"

# wrk: POST the body file (serve.py's script); at the end print one JSON line with the figures we need.
WRK_SCRIPT = WRK_LUA + """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('CAPACITY {{"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, ' ..
    '"non2xx": %d, "errors": %d}}\\n', summary.requests, summary.duration, latency:percentile(50),
    latency:percentile(99), e.status, e.connect + e.read + e.write + e.timeout))
end
"""


def digit_body() -> bytes:
    """The first test digit of the repository's MNIST sample, as the page's pad sends a drawing (280x280 RGBA
    PNG), in a multipart form. Users' uploads are analysed in full; a 28x28 MNIST digit would not be (it is
    taken as it is), and would overstate what a pod serves."""
    digit = Image.open(io.BytesIO(mnist_digit_png(SAMPLE)[0])).resize((280, 280), Image.Resampling.BILINEAR)
    out = io.BytesIO()
    digit.convert("RGBA").save(out, "PNG")
    return multipart(out.getvalue())


# ---- CPU limits and weight ----------------------------------------------------------------------
def cpu_hierarchy() -> tuple[Path, str] | None:
    "(root of the cgroup hierarchy with the cpu controller, 'v2' or 'v1'), or None."
    controllers = Path("/sys/fs/cgroup/cgroup.controllers")
    if controllers.exists() and "cpu" in controllers.read_text().split(): return controllers.parent, "v2"
    v1 = Path("/sys/fs/cgroup/cpu")
    if (v1 / "cpu.cfs_quota_us").exists(): return v1, "v1"
    return None


class CpuGroups:
    """A cgroup for the run, weighted `weight` times a default group (as a pod's CPU request weighs on its
    node), holding two: `server` (capped to the size under test by a CFS quota) and `load` (wrk). None of
    it when there is no writable cpu controller (not root): then only whole CPUs, with taskset."""

    PERIOD = 100_000

    def __init__(self, weight: float):
        self.top, self.version, self.note = None, None, ""
        found = cpu_hierarchy()
        if not found:
            self.note = "no cgroup cpu controller here (v2 cpu.max / v1 CFS quota)"
            return
        root, self.version = found
        try:
            top = root / CGROUP_NAME
            top.mkdir()
        except OSError as e:
            self.note = f"cannot create a cgroup in {root} ({e.strerror}; root is needed)"
            return
        self.top = top
        if self.version == "v2":
            (top / "cgroup.subtree_control").write_text("+cpu")
            (top / "cpu.weight").write_text(str(min(10000, round(100 * weight))))
        else: (top / "cpu.shares").write_text(str(round(1024 * weight)))
        for name in ("server", "load"): (top / name).mkdir()

    def limit(self, cpus: float | None):
        "Cap the server group at `cpus` CPUs (None: no cap)."
        quota = round(cpus * self.PERIOD) if cpus else None
        g = self.top / "server"
        if self.version == "v2": (g / "cpu.max").write_text(f"{quota or 'max'} {self.PERIOD}")
        else:
            (g / "cpu.cfs_period_us").write_text(str(self.PERIOD))
            (g / "cpu.cfs_quota_us").write_text(str(quota or -1))

    def joiner(self, name: str):
        "A preexec_fn that moves the child into group `name`."
        if self.top is None: return None
        procs = self.top / name / "cgroup.procs"
        return lambda: procs.write_text(str(os.getpid()))

    def close(self):
        if self.top is None: return
        for g in (self.top / "server", self.top / "load", self.top):
            for _ in range(50):
                try:
                    g.rmdir()
                    break
                except OSError: time.sleep(0.1)  # the processes are still leaving


class Size:
    "How a CPU size is given to the server: taskset for whole CPUs, the server group's CFS quota for fractions."

    def __init__(self, cpus: float, groups: CpuGroups, all_cores: list[int]):
        self.cpus, self.groups = cpus, groups
        whole = cpus == int(cpus)
        if not whole and groups.top is None: raise OSError(groups.note)
        self.server_cores = all_cores[:int(cpus)] if whole else all_cores
        self.load_cores = [c for c in all_cores if c not in self.server_cores] or None
        if groups.top is not None: groups.limit(None if whole else cpus)
        self.how = (f"taskset -c {','.join(map(str, self.server_cores))}" if whole else
                    f"cgroup {groups.version} CFS quota {round(cpus * CpuGroups.PERIOD)}/{CpuGroups.PERIOD} us")

    def wrap(self, argv: list[str], cores: list[int] | None) -> list[str]:
        return ["taskset", "-c", ",".join(map(str, cores)), *argv] if cores else argv


# ---- the server -------------------------------------------------------------------------------------
def start_server(size: Size, model_dir: Path, port: int, log: Path) -> subprocess.Popen:
    exe = shutil.which("mnist-k8s")
    if not exe: sys.exit("mnist-k8s is not on PATH: pip install -e . first")
    # the torch threads the pod would take from its CPU limit (the app reads its own cgroup's quota there)
    env = {**os.environ, "MNIST_K8S_TORCH_THREADS": str(max(1, math.ceil(size.cpus)))}
    argv = size.wrap([exe, "serve", "--workers", "1", "--host", "127.0.0.1", "--port", str(port),
                      "--model-dir", str(model_dir)], size.server_cores if size.cpus == int(size.cpus) else None)
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                                preexec_fn=size.groups.joiner("server"))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None: sys.exit(f"the server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                if r.status == 200: return proc
        except (urllib.error.URLError, OSError): pass
        time.sleep(0.25)
    proc.kill()
    sys.exit(f"the server did not become ready within 120 s:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen):
    proc.send_signal(signal.SIGTERM)
    try: proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# ---- load -----------------------------------------------------------------------------------------------
def run_wrk(size: Size, url: str, script: Path, conns: int, duration: float) -> dict:
    argv = size.wrap(["wrk", "-t1", f"-c{conns}", f"-d{duration:g}s", "--timeout", "10s", "-s", str(script), url],
                     size.load_cores)
    res = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60,
                         preexec_fn=size.groups.joiner("load"))
    line = next((l for l in res.stdout.splitlines() if l.startswith("CAPACITY ")), None)
    if res.returncode or not line: sys.exit(f"wrk failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return json.loads(line.split(" ", 1)[1])


def measure(cpus: float, args, groups: CpuGroups, model_dir: Path, script: Path, work: Path) -> list[dict]:
    size = Size(cpus, groups, sorted(os.sched_getaffinity(0)))
    port = free_port()
    url = f"http://127.0.0.1:{port}/predict"
    where = f"cores {','.join(map(str, size.load_cores))}" if size.load_cores else "any core"
    print(f"\n{cpus:g} CPU ({size.how}); wrk on {where}", flush=True)
    proc = start_server(size, model_dir, port, work / f"serve-{cpus:g}.log")
    rows = []
    try:
        run_wrk(size, url, script, max(args.conns), min(3.0, args.duration))  # warm-up
        print(f"  {'conns':>5} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'CPU used':>9} {'of size':>8} "
              f"{'CPU ms/req':>10} {'failed':>7}")
        for conns in args.conns:
            tries = []
            for _ in range(args.rounds):  # other processes only ever slow it down: keep the best round
                cpu0, t0 = cpu_seconds(proc.pid), time.monotonic()
                r = run_wrk(size, url, script, conns, args.duration)
                cores_used = (cpu_seconds(proc.pid) - cpu0) / (time.monotonic() - t0)
                rps = r["requests"] / (r["duration_us"] / 1e6)
                tries.append(dict(cpus=cpus, conns=conns, rps=rps, p50_ms=r["p50_us"] / 1000,
                                  p99_ms=r["p99_us"] / 1000, cores=cores_used, failed=r["non2xx"] + r["errors"],
                                  cpu_ms=1000 * cores_used / rps if rps else float("nan")))
            row = max(tries, key=lambda t: t["rps"])
            rows.append(row)
            print(f"  {conns:>5} {row['rps']:>8.0f} {row['p50_ms']:>8.1f} {row['p99_ms']:>8.1f} "
                  f"{row['cores']:>9.2f} {row['cores'] / cpus:>8.0%} {row['cpu_ms']:>10.2f} {row['failed']:>7}",
                  flush=True)
    finally:
        stop(proc)
    return rows


def capacity(rows: list[dict], slo_ms: float) -> dict | None:
    "The row with the most requests/s whose p99 is within the SLO and that failed nothing."
    ok = [r for r in rows if r["p99_ms"] <= slo_ms and not r["failed"]]
    return max(ok, key=lambda r: r["rps"]) if ok else None


def ensure_model(model_dir: Path):
    if (model_dir / "latest").exists(): return
    cmd = ["mnist-k8s", "train", "--epochs", "1", "--limit", "2000", "--model-dir", str(model_dir)]
    print(f"no model in {model_dir}: training one ({' '.join(cmd)}; MNIST_K8S_DATA_ROOT="
          f"{os.environ.get('MNIST_K8S_DATA_ROOT', 'the default')})", flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpus", default="0.5,1,2", help="CPU sizes to measure (comma-separated)")
    p.add_argument("--conns", default="1,2,4,8,16,32", help="wrk connection counts (comma-separated)")
    p.add_argument("--duration", type=float, default=10, help="seconds of load per connection count")
    p.add_argument("--rounds", type=int, default=2, help="runs per connection count (the best one counts)")
    p.add_argument("--slo-ms", type=float, default=100, help="p99 latency a pod must keep at capacity")
    p.add_argument("--pod-cpu", type=float, default=1, help="the CPU size of the Deployment's pods")
    p.add_argument("--headroom", type=float, default=0.7, help="share of capacity the autoscaler keeps pods at")
    p.add_argument("--peak", type=float, default=5000, help="requests/s the autoscaler's maximum must serve")
    p.add_argument("--weight", type=float, default=1,
                   help="CPU weight of the server and wrk against the machine's other process groups (root): "
                        "on a busy machine a higher one gives them their CPU, as a pod's request does on a node")
    p.add_argument("--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "capmodels",
                   help="model store to serve (a small model is trained there if it has none)")
    args = p.parse_args(argv)
    args.cpus = [float(c) for c in args.cpus.split(",")]
    args.conns = [int(c) for c in args.conns.split(",")]
    if not shutil.which("wrk"): sys.exit("wrk is not installed (Debian: apt-get install -y wrk)")
    ensure_model(args.model_dir)
    groups = CpuGroups(args.weight)
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} before the run; "
          + (f"cgroup {groups.version} weight {args.weight:g}; " if groups.top else f"{groups.note}; ") +
          f"{args.rounds} x {args.duration:g} s per connection count (best round shown); "
          f"capacity = best req/s with p99 <= {args.slo_ms:g} ms")
    caps = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "body").write_bytes(digit_body())
        script = work / "post.lua"
        script.write_text(WRK_SCRIPT.format(body=work / "body", boundary=BOUNDARY))
        try:
            for cpus in args.cpus:
                try: rows = measure(cpus, args, groups, args.model_dir, script, work)
                except OSError as e:
                    print(f"\n{cpus:g} CPU: skipped, {e}")
                    continue
                caps[cpus] = capacity(rows, args.slo_ms)
        finally: groups.close()
    print(f"\ncapacity per pod (one server process), p99 <= {args.slo_ms:g} ms:")
    for cpus, c in caps.items():
        print(f"  {cpus:g} CPU: " + (f"{c['rps']:.0f} req/s at p99 {c['p99_ms']:.1f} ms, using {c['cores']:.2f} CPU "
                                     f"({c['cores'] / cpus:.0%}), {c['conns']} connections" if c else
                                     "none within the SLO"))
    print(f"  (load average {os.getloadavg()[0]:.2f} after the run: on a busy machine the server may get less than "
          f"its size, which understates a dedicated CPU: see --weight; CPU ms/req is the steadier figure)")
    c = caps.get(args.pod_cpu)
    if not c:
        print(f"no capacity figure for the pod size {args.pod_cpu:g} CPU: nothing to derive")
        return 1
    per_pod = args.headroom * c["rps"]
    used_m = min(round(c["cores"] * 1000), round(args.pod_cpu * 1000))  # /proc sampling may round above it
    target_m = int(round(args.headroom * used_m, 6)) // 10 * 10  # rounded down to 10m
    max_replicas = max(2, math.ceil(args.peak / per_pod))
    print(f"\nautoscaler for pods of {args.pod_cpu:g} CPU, kept at {args.headroom:.0%} of capacity "
          f"({per_pod:.0f} req/s each):")
    print(f"  target: averageValue {target_m}m CPU per pod ({args.headroom:g} x {used_m}m CPU used at capacity)")
    print(f"  maxReplicas: {max_replicas} (ceil({args.peak:g} / {per_pod:.0f}), at least 2)")
    print("  hpa.yaml annotations:")
    print(f'    capacity.mnist-k8s.io/requests-per-second-per-pod: "{c["rps"]:.0f}"')
    print(f'    capacity.mnist-k8s.io/cpu-per-pod-at-capacity: "{used_m}m"')
    print(f'    capacity.mnist-k8s.io/headroom: "{args.headroom:g}"')
    print(f'    capacity.mnist-k8s.io/peak-requests-per-second: "{args.peak:g}"')
    print(f"\n  {'requests/s':>10}  pods of {args.pod_cpu:g} CPU")
    for n in sorted({100, 250, 500, 1000, 2000, 5000, int(args.peak)}):
        print(f"  {n:>10}  {max(2, math.ceil(n / per_pod))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
