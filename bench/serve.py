#!/usr/bin/env python
"""Serving benchmark: mnist-k8s against a typical tutorial FastAPI service, on loopback, in one run.

    python bench/serve.py                      # 1, 16 and 64 connections, 5 s each, 3 rounds
    python bench/serve.py --duration 3 --conns 1,16
    python bench/serve.py --ours-workers 3     # also try mnist-k8s with three server processes
    python bench/serve.py --alternatives       # also the process models mnist-k8s did not pick
    python bench/serve.py --frameworks --alone # also BentoML and LitServe (pip install -e ".[bench]"), each
                                               # service running only while it is measured
    python bench/serve.py --ablation           # also mnist-k8s analysing the upload as it does a photo: what that costs

The reference service (written to a temporary file here, it is not part of the library) is what most
tutorials do: PIL open, convert("L"), resize((28, 28)), normalize, and a forward pass of the classic
PyTorch-examples CNN (conv 1->32, conv 32->64, max-pool, dropout, linear 9216->128, linear 128->10) inside an
`async def` FastAPI endpoint with `UploadFile`, one uvicorn worker, uvicorn's defaults. It runs on plain h11 +
asyncio (how the brief's reference figures were taken) and on uvicorn's `auto` stack (httptools + uvloop when
installed), so the comparison separates the server stack from the rest; and once more with one torch thread
(OMP_NUM_THREADS=1): with torch's default of one thread per core, the reference's forward pass stalls badly
whenever another process takes a core (an OpenMP barrier waits for a descheduled thread), which on a shared
machine makes it look far worse than it is at its best.

mnist-k8s runs through its CLI (`mnist-k8s serve`) as it is deployed: with its default number of server
processes (one per CPU of the quota: gunicorn's arbiter forking its own ASGI workers from the app it built),
and once more limited to one worker process (as in the cluster; unless that is the default already, or
--skip-ours-1worker), with a freshly initialised model of the real architecture published into
a temporary model store (an untrained net costs the same as a trained one), and the real preprocessing
(`mnist_k8s.preprocess`).

`--alternatives` adds what `mnist_k8s.server` did not pick. First its single worker (as in the cluster)
without freezing the garbage collector after building the app: every full collection then walks the few
hundred thousand objects of torch and FastAPI while requests wait. Then the HTTP stacks and process models
it did not pick, serving the same app: one plain uvicorn process on its h11 parser (what the cluster ran
before), mnist-k8s's own gunicorn setup with uvicorn-worker's worker on h11 in place of gunicorn's ASGI
worker (what a laptop ran before; h11 is uvicorn's parser that bounds the request head), uvicorn's own
`--workers` (a supervisor that spawns fresh interpreters, each importing torch again; settings from the
environment; one listening socket shared by the workers), and gunicorn with uvicorn-worker's stock worker,
on uvicorn's httptools parser (faster than h11, but with no bound on the request head). They need uvicorn
and uvicorn-worker (extra `dev`).

`--frameworks` adds what users would pick instead, serving this project's model (the same published
version, loaded by `mnist_k8s.serving.ModelHolder`), preprocessing (`mnist_k8s.preprocess`) and calibration
(the model's `calibration`, so they answer ten probabilities and the chance of "not a digit", as we do): BentoML
1.4 (a `@bentoml.service` with as many workers as mnist-k8s has processes) and LitServe 0.2 (a `LitAPI`
with dynamic batching). They are the optional extra `bench` (`pip install -e ".[bench]"`); if their pins
conflict with the project's, install them in a separate venv that sees the project
(`python -m venv --system-site-packages /tmp/benchvenv`) and pass `--frameworks-python
/tmp/benchvenv/bin/python`. A framework that is not installed is skipped with a message. LitServe's workers
keep 0.3 of a core busy while idle, which every other service would pay for while it is measured: pass
`--alone` with `--frameworks`, and each service runs only while it is measured.

Load comes from `wrk` in a separate process (Debian: `apt-get install -y wrk`) posting a real MNIST test digit
as a multipart PNG; without wrk a small asyncio HTTP/1.1 client in a subprocess is used instead (it costs more
CPU, which matters on 2 cores). Cold start is the time from launching the process until it answers ready: the
median of `--starts` launches per service, the services taking turns and each starting with nothing else
running (a single launch on a shared machine varies by a third or more). The services then take turns under
load, `--rounds` times per connection count, so that changes in background load hit them alike; the table
shows medians. "CPU ms/req" is the server's CPU time (all threads and workers) per answered request, which
background load on a shared machine disturbs far less than requests/s. Memory is read from /proc after the
load: RSS adds up each process's resident pages, so pages that forked workers share with their parent (torch's
code and data) count once per process; PSS divides each shared page among the processes sharing it, so it is
what the processes really cost together. Each round's line also says how the connections were shared out
among the server's processes halfway through the load (e.g. 11/5 over two workers). mnist-k8s's workers each
listen on their own socket (`reuse_port`) and the kernel hashes each new connection to one of them, so the
split changes from round to round, and a worker with more connections answers each of them later. "waited"
is how long the server's threads were ready to run but waited for a CPU, per answered request (from each
thread's /proc schedstat): when the server and the load generator beside it want more CPU than the machine
has, every thread waits its turn, and those waits are part of each latency. A last table compares, in-process
and without HTTP, the micro-batcher with one forward pass per request on a thread pool.

The upload is an MNIST digit, already laid out as MNIST lays out its digits, so `mnist_k8s.preprocess` takes
it as it is (`_already_mnist`). `--ablation` shows what the analysis that photos, scans and drawings need
costs in the running service (CPU that a profile of one function cannot show: the inference thread shares
each process with the event loop): it adds mnist-k8s analysing every upload as it analyses a photo (the
digit found, cropped, scaled and centred again).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BOUNDARY = "mnistk8sbenchboundary"

REFERENCE = textwrap.dedent('''
    """A typical tutorial MNIST service (the benchmark's reference; not part of mnist-k8s)."""
    import io, sys
    import numpy as np, torch, torch.nn as nn, torch.nn.functional as F
    import uvicorn
    from fastapi import FastAPI, File, UploadFile
    from PIL import Image

    sys.path.insert(0, "{bench}")
    from reference_net import Net  # bench/reference_net.py

    model = Net()
    model.eval()
    app = FastAPI()

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.post("/predict")
    async def predict(file: UploadFile = File(...)):
        img = Image.open(io.BytesIO(await file.read())).convert("L").resize((28, 28))
        x = torch.tensor(np.array(img, dtype=np.float32) / 255.0).unsqueeze(0).unsqueeze(0)
        x = (x - 0.1307) / 0.3081
        with torch.no_grad():
            out = model(x)
        probs = torch.exp(out)[0].tolist()
        return {"digit": int(np.argmax(probs)), "probabilities": probs}

    if __name__ == "__main__":
        port, stack = int(sys.argv[1]), sys.argv[2]
        kw = {"http": "h11", "loop": "asyncio"} if stack == "h11" else {}
        uvicorn.run(app, host="127.0.0.1", port=port, **kw)
''')

BENTOML = textwrap.dedent('''
    """This project's model and preprocessing served by BentoML (the benchmark's comparison)."""
    from pathlib import Path
    import bentoml, torch
    from mnist_k8s import preprocess
    from mnist_k8s.serving import ModelHolder

    @bentoml.service(workers={workers}, threads=1, resources={{"cpu": "{workers}"}})
    class Digits:
        def __init__(self):
            torch.set_num_threads(1)
            self.holder = ModelHolder("{model_dir}"); self.holder.check()

        @bentoml.api
        def predict(self, file: Path) -> dict:
            x = torch.from_numpy(preprocess.preprocess(file.read_bytes())).view(1, 1, 28, 28)
            m = self.holder.current
            with torch.inference_mode(): p, not_digit, _, _ = m.calibration(m.net(x))   # as mnist-k8s answers
            return {{"digit": int(p[0].argmax()), "probabilities": p[0].tolist(), "not_digit": float(not_digit[0])}}
''')

LITSERVE = textwrap.dedent('''
    """This project's model and preprocessing served by LitServe with dynamic batching (the benchmark's comparison)."""
    import sys
    import litserve as ls, numpy as np, torch
    from mnist_k8s import preprocess
    from mnist_k8s.serving import ModelHolder

    class Digits(ls.LitAPI):
        def setup(self, device):
            torch.set_num_threads(1)
            self.holder = ModelHolder("{model_dir}"); self.holder.check()

        def decode_request(self, request):           # the multipart form, parsed by LitServe
            return preprocess.preprocess(request["file"].file.read())

        def batch(self, inputs): return torch.from_numpy(np.stack(inputs)).view(-1, 1, 28, 28)

        def predict(self, x):
            m = self.holder.current
            with torch.inference_mode(): p, not_digit, _, _ = m.calibration(m.net(x))   # as mnist-k8s answers
            return list(zip(p, not_digit))

        def unbatch(self, output): return output

        def encode_response(self, out):
            p, not_digit = out
            return {{"digit": int(p.argmax()), "probabilities": p.tolist(), "not_digit": float(not_digit)}}

    if __name__ == "__main__":
        ls.LitServer(Digits(max_batch_size=16, batch_timeout=0.005), accelerator="cpu",
                     workers_per_device={workers}).run(port=int(sys.argv[1]), log_level="warning")
''')

WRK_LUA = textwrap.dedent('''
    local f = assert(io.open("{body}", "rb"))
    wrk.method = "POST"
    wrk.body = f:read("*all")
    f:close()
    wrk.headers["Content-Type"] = "multipart/form-data; boundary={boundary}"
''')

# A fallback load generator (when wrk is missing): N keep-alive connections, raw HTTP/1.1, for `duration` s.
PYLOAD = textwrap.dedent('''
    import asyncio, json, sys, time
    host, port, path, conns, duration, body_file, ctype = sys.argv[1:8]
    body = open(body_file, "rb").read()
    req = (f"POST {path} HTTP/1.1\\r\\nHost: {host}\\r\\nContent-Type: {ctype}\\r\\n"
           f"Content-Length: {len(body)}\\r\\n\\r\\n").encode() + body
    lat, errors, non2xx = [], 0, 0
    async def worker(stop):
        global errors, non2xx
        r, w = await asyncio.open_connection(host, int(port))
        while time.perf_counter() < stop:
            t = time.perf_counter()
            try:
                w.write(req); await w.drain()
                status = int((await r.readline()).split()[1]); n = 0
                while (line := await r.readline()) not in (b"\\r\\n", b""):
                    if line.lower().startswith(b"content-length:"): n = int(line.split(b":")[1])
                await r.readexactly(n)
            except Exception:
                errors += 1; r, w = await asyncio.open_connection(host, int(port)); continue
            lat.append(time.perf_counter() - t)
            if not 200 <= status < 300: non2xx += 1
    async def main():
        stop = time.perf_counter() + float(duration)
        t0 = time.perf_counter()
        await asyncio.gather(*[worker(stop) for _ in range(int(conns))])
        return time.perf_counter() - t0
    took = asyncio.run(main())
    lat.sort()
    q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] * 1e3 if lat else float("nan")
    print(json.dumps({"rps": len(lat) / took, "p50": q(.5), "p99": q(.99), "requests": len(lat),
                      "errors": errors, "non2xx": non2xx}))
''')


# ---------------------------------------------------------------- helpers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]

def http(method: str, url: str, body: bytes | None = None, ctype: str | None = None, timeout=5.0):
    req = urllib.request.Request(url, data=body, method=method, headers={"Content-Type": ctype} if ctype else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r: return r.status, r.read()
    except urllib.error.HTTPError as e: return e.code, e.read()

def mnist_digit_png(data_root: Path, index: int = 0) -> tuple[bytes, int]:
    "A real MNIST test digit as PNG bytes, read straight from the idx files."
    import numpy as np
    from PIL import Image
    raw = data_root / "MNIST" / "raw"
    images = np.fromfile(raw / "t10k-images-idx3-ubyte", dtype=np.uint8, offset=16).reshape(-1, 28, 28)
    labels = np.fromfile(raw / "t10k-labels-idx1-ubyte", dtype=np.uint8, offset=8)
    buf = io.BytesIO(); Image.fromarray(images[index]).save(buf, "PNG")
    return buf.getvalue(), int(labels[index])

def multipart(png: bytes) -> bytes:
    return (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="digit.png"\r\n'
            f"Content-Type: image/png\r\n\r\n").encode() + png + f"\r\n--{BOUNDARY}--\r\n".encode()

def family(pid: int) -> list[int]:
    "`pid` and all its descendants (workers, and the workers' own children)."
    out, todo = [], [pid]
    while todo:
        p = todo.pop(); out.append(p)
        try:
            for t in os.listdir(f"/proc/{p}/task"):
                todo += [int(c) for c in Path(f"/proc/{p}/task/{t}/children").read_text().split()]
        except OSError: pass
    return out

def cpu_seconds(pid: int) -> float:
    "CPU time (user + system) used so far by `pid` and its descendants (workers)."
    total = 0.0
    for p in family(pid):
        try: fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError: continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total

def cpu_wait_seconds(pid: int) -> float:
    """Time the threads of `pid` and its descendants spent runnable but waiting for a CPU (the second field of
    each thread's /proc schedstat, in ns; 0 where the kernel does not keep it)."""
    total = 0
    for p in family(pid):
        try: tasks = os.listdir(f"/proc/{p}/task")
        except OSError: continue
        for t in tasks:
            with contextlib.suppress(OSError, IndexError, ValueError):
                total += int(Path(f"/proc/{p}/task/{t}/schedstat").read_text().split()[1])
    return total / 1e9

def connections(pid: int, port: int) -> list[int]:
    "Established TCP connections to `port` held by each process of `pid`'s family that holds some, most first."
    established = set()                          # socket inodes, from the kernel's tables (no `ss` needed)
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try: rows = Path(table).read_text().splitlines()[1:]
        except OSError: continue
        for f in map(str.split, rows):
            if f[3] == "01" and int(f[1].rsplit(":", 1)[1], 16) == port: established.add(f"socket:[{f[9]}]")
    counts = []
    for p in family(pid):
        try: fds = os.listdir(f"/proc/{p}/fd")
        except OSError: continue
        n = 0
        for fd in fds:
            with contextlib.suppress(OSError): n += os.readlink(f"/proc/{p}/fd/{fd}") in established
        if n: counts.append(n)
    return sorted(counts, reverse=True)

def rss_mb(pid: int) -> tuple[float, float, float]:
    "Resident, peak resident and proportional (PSS) MiB of `pid` and its descendants."
    cur, peak, pss = 0.0, 0.0, 0.0
    for p in family(pid):
        try: status, rollup = Path(f"/proc/{p}/status").read_text(), Path(f"/proc/{p}/smaps_rollup").read_text()
        except OSError: continue
        cur += int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024
        peak += int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 1024
        pss += int(re.search(r"^Pss:\s+(\d+)", rollup, re.M).group(1)) / 1024
    return cur, peak, pss


def publish_untrained(model_dir: Path, seed: int = 0) -> str:
    """Publish a freshly initialised network of the architecture `mnist-k8s train` publishes (with the "not a
    digit" output and a calibration, so `/predict` does all its work); it costs the same to run as a trained one."""
    import torch
    from mnist_k8s import store
    from mnist_k8s.model import build_model
    torch.manual_seed(seed)
    net = build_model(not_digit=True)
    return store.publish(model_dir, net.state_dict(), {"arch": net.arch, "untrained": True,
                                                        "calibration": {"temperature": 0.4, "threshold": 0.13}})


class Service:
    def __init__(self, name: str, cmd: list[str], ready_path: str, port: int, env: dict | None = None,
                 cwd: Path | None = None):
        self.name, self.cmd, self.ready_path, self.port, self.env, self.cwd = name, cmd, ready_path, port, env, cwd
        self.proc: subprocess.Popen | None = None
        self.cold_start = float("nan")

    def start(self, timeout: float = 120.0):
        t0 = time.perf_counter()
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(self.cmd, env={**os.environ, **(self.env or {})}, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True, cwd=self.cwd)
        url = f"http://127.0.0.1:{self.port}{self.ready_path}"
        while time.perf_counter() - t0 < timeout:
            if self.proc.poll() is not None: break
            try:
                if http("GET", url, timeout=1)[0] == 200:
                    self.cold_start = time.perf_counter() - t0; return self
            except OSError: pass
            time.sleep(0.01)
        self.log.seek(0)
        raise RuntimeError(f"{self.name} did not become ready:\n{self.log.read().decode(errors='replace')[-3000:]}")

    def stop(self):
        "SIGTERM, then whatever is left of its process group (workers a framework left behind) is killed."
        if self.proc is None: return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try: self.proc.wait(30)
            except subprocess.TimeoutExpired: pass
        try: os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError: pass
        self.proc.wait()


def run_load(url: str, conns: int, duration: float, body_file: Path, lua: Path) -> dict:
    if shutil.which("wrk"):
        run = subprocess.run(["wrk", "-t1", f"-c{conns}", f"-d{max(1, round(duration))}s", "--timeout", "10s",
                              "--latency", "-s", str(lua), url], capture_output=True, text=True, timeout=duration + 60)
        out = run.stdout
        if "Requests/sec" not in out: raise RuntimeError(f"wrk failed: {run.stdout}\n{run.stderr}")
        def ms(label):
            m = re.search(rf"^\s*{label}\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
            return float(m.group(1)) * {"us": 1e-3, "ms": 1, "s": 1e3}[m.group(2)] if m else float("nan")
        errs = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
        non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)), "p50": ms("50%"),
                "p99": ms("99%"), "requests": int(re.search(r"(\d+) requests in", out).group(1)),
                "errors": sum(map(int, errs.groups())) if errs else 0,
                "non2xx": int(non2xx.group(1)) if non2xx else 0}
    host, port = url.split("//")[1].split("/")[0].split(":")
    out = subprocess.run([sys.executable, "-c", PYLOAD, host, port, "/predict", str(conns), str(duration),
                          str(body_file), f"multipart/form-data; boundary={BOUNDARY}"],
                         capture_output=True, text=True, timeout=duration + 60)
    return json.loads(out.stdout)


def check(svc: Service, body: bytes):
    "One request answered correctly before any load."
    status, answer = http("POST", f"http://127.0.0.1:{svc.port}/predict", body, f"multipart/form-data; boundary={BOUNDARY}")
    answer = json.loads(answer)
    assert status == 200 and len(answer["probabilities"]) == 10, (svc.name, status, answer)


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2


def measure(services: list[Service], conns: list[int], duration: float, rounds: int, body: bytes,
            body_file: Path, lua: Path, alone: bool = False, starts: int = 3) -> dict:
    """First the cold starts: each service started and stopped `starts` times, the services taking turns and
    nothing else running (medians). Then the services are started one after the other and loaded in turns,
    `rounds` times per connection count, so that a change in background load hits all of them alike; medians.
    With `alone`, a service runs only while it is measured: started, checked and warmed up before each load,
    stopped after it. A service that keeps the CPU busy while idle (LitServe's workers) then takes nothing
    from the one under load."""
    runs = {svc.name: {c: [] for c in conns} for svc in services}
    cold, mem = {svc.name: [] for svc in services}, {}

    def up(svc):
        svc.start(); check(svc, body)
        run_load(f"http://127.0.0.1:{svc.port}/predict", 4, 1.0, body_file, lua)    # warm-up

    try:
        for _ in range(starts):
            for svc in services:
                svc.start(); cold[svc.name].append(svc.cold_start); svc.stop()
        if not alone:
            for svc in services: up(svc)
        for r in range(rounds):
            for c in conns:
                for svc in services:
                    if alone: up(svc)
                    cpu0, wait0, split = cpu_seconds(svc.proc.pid), cpu_wait_seconds(svc.proc.pid), []
                    count = threading.Timer(duration / 2, lambda: split.extend(connections(svc.proc.pid, svc.port)))
                    count.start()                       # how the connections are shared out, mid-load
                    res = run_load(f"http://127.0.0.1:{svc.port}/predict", c, duration, body_file, lua)
                    count.join()
                    res["cpu_ms"] = (cpu_seconds(svc.proc.pid) - cpu0) / max(1, res["requests"]) * 1e3
                    res["wait_ms"] = (cpu_wait_seconds(svc.proc.pid) - wait0) / max(1, res["requests"]) * 1e3
                    runs[svc.name][c].append(res)
                    print(f"  round {r + 1} @{c:>3} {svc.name:50s} {res['rps']:7.0f} req/s  p50 {res['p50']:7.2f} ms"
                          f"  p99 {res['p99']:8.2f} ms  CPU {res['cpu_ms']:.2f} ms/req, waited {res['wait_ms']:.2f}"
                          f"  errors {res['errors'] + res['non2xx']}  connections {'/'.join(map(str, split)) or '-'}",
                          flush=True)
                    if alone: mem[svc.name] = rss_mb(svc.proc.pid); svc.stop()
        out = {}
        for svc in services:
            o = out[svc.name] = {"cold_start": median(cold[svc.name])}
            o["rss"], o["peak_rss"], o["pss"] = mem.get(svc.name) or rss_mb(svc.proc.pid)
            for c in conns:
                rs = runs[svc.name][c]
                o[c] = {"rps": median([x["rps"] for x in rs]), "p50": median([x["p50"] for x in rs]),
                        "p99": median([x["p99"] for x in rs]), "cpu_ms": median([x["cpu_ms"] for x in rs]),
                        "errors": sum(x["errors"] for x in rs),
                        "non2xx": sum(x["non2xx"] for x in rs)}
        return out
    finally:
        for svc in services: svc.stop()


def inference_strategies(model_dir: Path, duration: float, conns: list[int]) -> list[list[str]]:
    """In-process, no HTTP: images/s of the micro-batcher against one forward pass per request on a thread pool,
    with `c` concurrent asyncio callers (the event loop's view of inference)."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor
    import numpy as np
    import torch
    from mnist_k8s.serving import BatchPredictor, ModelHolder, inference_threads
    threads = inference_threads()
    torch.set_num_threads(threads)
    holder = ModelHolder(model_dir); holder.check()
    x = np.random.default_rng(0).random((28, 28), dtype=np.float32)

    bf16 = BatchPredictor(holder).bf16            # the same arithmetic as the batcher's (bfloat16 where native)

    def one(img):
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return torch.softmax(holder.current.net(torch.from_numpy(img).view(1, 1, 28, 28)).float(), 1).numpy()[0]

    async def drive(predict, c):
        n, stop = 0, time.perf_counter() + duration
        async def caller():
            nonlocal n
            while time.perf_counter() < stop:
                await predict(x); n += 1
        t = time.perf_counter()
        await asyncio.gather(*[caller() for _ in range(c)])
        return n / (time.perf_counter() - t)

    rows = []
    for c in conns:
        row = [str(c)]
        for max_batch in (32, 1):
            p = BatchPredictor(holder, max_batch=max_batch, threads=threads).start()
            row.append(f"{asyncio.run(drive(p.predict, c)):.0f}")
            p.stop()
        pool = ThreadPoolExecutor(threads)
        async def pooled(img): return await asyncio.get_running_loop().run_in_executor(pool, one, img)
        row.append(f"{asyncio.run(drive(pooled, c)):.0f}")
        pool.shutdown()
        rows.append(row)
    return rows


ABLATION = textwrap.dedent('''
    import sys
    import mnist_k8s.preprocess as pp
    pp._already_mnist = lambda img: None        # ablation: no upload is taken as it is, each one is analysed
    from mnist_k8s.cli import main
    sys.exit(main(sys.argv[1:]))
''')


def _app_env(tmp: Path) -> dict:
    "The environment of a process model that reads its settings from it (and counts metrics across processes)."
    metrics = tmp / f"metrics-{free_port()}"; metrics.mkdir()
    return {"MNIST_K8S_MODEL_DIR": str(tmp / "models"), "MNIST_K8S_LOG_LEVEL": "warning",
            "PROMETHEUS_MULTIPROC_DIR": str(metrics)}

# `mnist_k8s.server.serve` with gunicorn's worker class changed: uvicorn-worker's, on uvicorn's h11 parser with its
# bound on the request head (64 KiB), as mnist-k8s served before (what `limits.SERVER_OPTIONS` held then).
UVICORN_WORKER = """import sys
from uvicorn_worker import UvicornWorker
from mnist_k8s import server
from mnist_k8s.config import Settings
class H11Worker(UvicornWorker):
    CONFIG_KWARGS = {"loop": "auto", "proxy_headers": True, "server_header": False, "http": "h11",
                     "h11_max_incomplete_event_size": 64 * 1024, "timeout_keep_alive": 5}
s = Settings(host="127.0.0.1", port=int(sys.argv[1]))
server.configure_logging(s.log_level)
def load_app():
    from mnist_k8s.api import create_app
    return create_app(s)
server.Gunicorn(load_app, {**server.gunicorn_options(s, int(sys.argv[2])), "worker_class": H11Worker}).run()
"""

# One uvicorn process on h11, as the Deployment ran before: the app built with the collector off, then frozen.
ONE_UVICORN = """import gc, sys, uvicorn
from mnist_k8s import server
from mnist_k8s.config import Settings
s = Settings(host="127.0.0.1", port=int(sys.argv[1]), model_dir=sys.argv[2], workers=1)
server.configure_logging(s.log_level)
gc.disable()
from mnist_k8s.api import create_app
app = create_app(s)
gc.freeze(); gc.enable()
uvicorn.run(app, host=s.host, port=s.port, log_level=s.log_level, server_header=False, http="h11",
            h11_max_incomplete_event_size=64 * 1024, timeout_keep_alive=5)
"""

# `mnist_k8s.server.serve` with one worker whose garbage collector was never frozen: the app built and served as is.
ONE_UNFROZEN = """import gc, sys
from mnist_k8s import server
from mnist_k8s.config import Settings
s = Settings(host="127.0.0.1", port=int(sys.argv[1]), model_dir=sys.argv[2], workers=1)
server.configure_logging(s.log_level)
def load_app():
    gc.enable()
    from mnist_k8s.api import create_app
    return create_app(s)
server.Gunicorn(load_app, {**server.gunicorn_options(s, 1), "pre_fork": lambda server, worker: None}).run()
"""

def alternatives(tmp: Path, workers: int) -> list[Service]:
    "The same app under the process models `mnist_k8s.server` did not pick, with `workers` processes."
    out = []
    port = free_port()
    out.append(Service("alternative: mnist-k8s (1 process), garbage collector not frozen",
                       [sys.executable, "-c", ONE_UNFROZEN, str(port), str(tmp / "models")], "/readyz", port,
                       env={"MNIST_K8S_LOG_LEVEL": "warning"}))
    port = free_port()
    out.append(Service("alternative: one uvicorn process (h11)",
                       [sys.executable, "-c", ONE_UVICORN, str(port), str(tmp / "models")], "/readyz", port,
                       env={"MNIST_K8S_LOG_LEVEL": "warning"}))
    port = free_port()
    out.append(Service(f"alternative: mnist-k8s on uvicorn-worker (h11, {workers} processes)",
                       [sys.executable, "-c", UVICORN_WORKER, str(port), str(workers)], "/readyz", port,
                       env=_app_env(tmp)))
    port = free_port()
    out.append(Service(f"alternative: uvicorn --workers {workers} (spawned)",
                       [sys.executable, "-m", "uvicorn", "mnist_k8s.api:create_app", "--factory", "--workers",
                        str(workers), "--host", "127.0.0.1", "--port", str(port), "--http", "h11",
                        "--h11-max-incomplete-event-size", "65536", "--no-server-header", "--log-level", "warning"],
                       "/readyz", port, env=_app_env(tmp)))
    port = free_port()
    out.append(Service(f"alternative: gunicorn -w {workers}, uvicorn-worker on httptools",
                       [sys.executable, "-m", "gunicorn", "mnist_k8s.api:create_app()", "-w", str(workers),
                        "--preload", "--reuse-port", "-k", "uvicorn_worker.UvicornWorker", "-b", f"127.0.0.1:{port}",
                        "--log-level", "warning"], "/readyz", port, env=_app_env(tmp)))
    return out

def frameworks(tmp: Path, workers: int, python: str) -> list[Service]:
    "BentoML and LitServe serving this project's model and preprocessing; each skipped if not installed."
    out = []
    for name, module, source, ready in [("BentoML", "bentoml", BENTOML, "/readyz"), ("LitServe", "litserve", LITSERVE, "/health")]:
        probe = subprocess.run([python, "-c", f"import {module}; print({module}.__version__)"], capture_output=True, text=True)
        if probe.returncode:
            print(f"{name} skipped: `import {module}` fails with {python} (pip install -e '.[bench]')", flush=True)
            continue
        port, version = free_port(), probe.stdout.strip()
        (script := tmp / f"{module}_service.py").write_text(source.format(workers=workers, model_dir=tmp / "models"))
        cmd = ([python, "-m", "bentoml", "serve", f"{module}_service:Digits", "--port", str(port), "--host", "127.0.0.1"]
               if module == "bentoml" else [python, str(script), str(port)])
        out.append(Service(f"{name} {version} ({workers} workers{', batching' if module == 'litserve' else ''})",
                           cmd, ready, port, env={"PYTHONPATH": str(tmp), "BENTOML_HOME": str(tmp / "bentoml")},
                           cwd=tmp))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per load level and round (default 5)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds, services taking turns (default 3; medians)")
    ap.add_argument("--starts", type=int, default=3,
                    help="launches per service for its cold start, each alone, services taking turns "
                         "(default 3; median)")
    ap.add_argument("--conns", default="1,16,64", help="concurrent connections, comma-separated")
    ap.add_argument("--ours-workers", type=int, default=None, help="also run mnist-k8s with this many processes")
    ap.add_argument("--skip-ours-1worker", action="store_true", help="do not run mnist-k8s limited to one process")
    ap.add_argument("--skip-h11", action="store_true", help="do not run the reference on h11 + asyncio")
    ap.add_argument("--skip-ref-1thread", action="store_true",
                    help="do not run the reference variant limited to one torch thread")
    ap.add_argument("--skip-strategies", action="store_true", help="skip the in-process inference comparison")
    ap.add_argument("--alternatives", action="store_true",
                    help="also what mnist_k8s.server did not pick: one process with the collector not frozen, "
                         "one uvicorn process, uvicorn-worker on h11, uvicorn --workers, gunicorn on httptools")
    ap.add_argument("--frameworks", action="store_true", help="also BentoML and LitServe (extra `bench`)")
    ap.add_argument("--alone", action="store_true",
                    help="run each service only while it is measured (LitServe's idle workers keep the CPU busy)")
    ap.add_argument("--ablation", action="store_true",
                    help="also mnist-k8s analysing every upload as it does a photo: what that analysis costs")
    ap.add_argument("--markdown", type=Path, default=None, help="also write the tables to this file")
    ap.add_argument("--frameworks-python", default=sys.executable,
                    help="the Python that has BentoML and LitServe installed (default: this one)")
    ap.add_argument("--data-root", type=Path, default=REPO / "tests" / "data", help="folder holding MNIST/raw")
    a = ap.parse_args(argv)
    conns = [int(c) for c in a.conns.split(",")]

    tmp = Path(tempfile.mkdtemp(prefix="mnist-k8s-bench-"))
    try:
        png, label = mnist_digit_png(a.data_root)
        body = multipart(png)
        (body_file := tmp / "body.bin").write_bytes(body)
        (lua := tmp / "post.lua").write_text(WRK_LUA.format(body=body_file, boundary=BOUNDARY))
        (tmp / "reference.py").write_text(REFERENCE.replace("{bench}", str(Path(__file__).resolve().parent)))
        publish_untrained(tmp / "models")

        from mnist_k8s.config import default_workers
        default = default_workers()
        def ours(workers=None, ablation=False):
            port = free_port()
            code = "import sys; from mnist_k8s.cli import main; sys.exit(main(sys.argv[1:]))"
            if ablation: code = ABLATION
            n = workers or default
            what = ", ablation: every upload analysed" if ablation else ""
            return Service(f"mnist-k8s ({'default: ' if workers is None and not what else ''}{n} process{'es' * (n > 1)}{what})",
                           [sys.executable, "-c", code, "serve", "--host", "127.0.0.1", "--port", str(port),
                            *(["--workers", str(workers)] if workers else []), "--model-dir", str(tmp / "models")],
                           "/readyz", port, env={"MNIST_K8S_LOG_LEVEL": "warning"})
        def reference(stack, threads=None):
            port = free_port()
            name = "h11+asyncio" if stack == "h11" else "uvicorn auto stack"
            return Service(f"reference ({name}{', 1 torch thread' if threads else ''})",
                           [sys.executable, str(tmp / "reference.py"), str(port), stack], "/health", port,
                           env={"OMP_NUM_THREADS": str(threads)} if threads else None)

        services = ([] if a.skip_h11 else [reference("h11")]) + [reference("auto")]
        if not a.skip_ref_1thread: services.append(reference("auto", threads=1))
        services.append(ours())
        if default > 1 and not a.skip_ours_1worker: services.append(ours(1))
        if a.ours_workers and a.ours_workers not in (1, default): services.append(ours(a.ours_workers))
        if a.ablation: services.append(ours(ablation=True))
        if a.alternatives: services += alternatives(tmp, default)
        if a.frameworks: services += frameworks(tmp, default, a.frameworks_python)
        print(f"wrk: {shutil.which('wrk') or 'not found, using the Python load generator'}; "
              f"{os.cpu_count()} CPUs; digit label {label}; {a.duration:g} s per level", flush=True)
        results = measure(services, conns, a.duration, a.rounds, body, body_file, lua, alone=a.alone,
                          starts=a.starts)
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf): report(results, conns)
        print(buf.getvalue(), end="")
        if a.markdown:
            a.markdown.parent.mkdir(parents=True, exist_ok=True)
            a.markdown.write_text(f"Output of `python bench/serve.py {' '.join(argv if argv is not None else sys.argv[1:])}` "
                                  f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} CPUs, "
                                  f"{a.duration:g} s per level, medians of {a.rounds} rounds and {a.starts} cold "
                                  f"starts):\n{buf.getvalue()}")
        if not a.skip_strategies:
            from mnist_k8s.serving import inference_threads
            from mnist_k8s.serving import _native_bf16
            print(f"\nInference only, in-process (no HTTP, torch threads {inference_threads()}, "
                  f"{'bfloat16' if _native_bf16() else 'float32'}): images/s")
            print("| concurrent callers | micro-batcher (32) | batcher without batching | thread pool, 1 forward per request |")
            print("|---|---|---|---|")
            for row in inference_strategies(tmp / "models", min(a.duration, 3.0), conns):
                print("| " + " | ".join(row) + " |")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def report(results: dict, conns: list[int]):
    names = list(results)
    cols = ["service", "cold start s", "RSS MiB", "PSS MiB", "peak RSS MiB"]
    for c in conns: cols += [f"req/s @{c}", f"p50 ms @{c}", f"p99 ms @{c}", f"CPU ms/req @{c}", f"err @{c}"]
    rows = []
    for n in names:
        r = results[n]
        row = [n, f"{r['cold_start']:.2f}", f"{r['rss']:.0f}", f"{r['pss']:.0f}", f"{r['peak_rss']:.0f}"]
        for c in conns:
            x = r[c]
            row += [f"{x['rps']:.0f}", f"{x['p50']:.2f}", f"{x['p99']:.2f}", f"{x['cpu_ms']:.2f}",
                    str(x["errors"] + x["non2xx"])]
        rows.append(row)
    print()
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join("---" for _ in cols) + "|")
    for row in rows: print("| " + " | ".join(row) + " |")
    refs = [n for n in names if n.startswith("reference")]
    ours = [n for n in names if n.startswith("mnist-k8s")]
    others = [n for n in names if n not in refs and n not in ours]      # alternatives and frameworks
    for o in ours:
        for ref in refs + (others if "default" in o else []):
            parts = [f"cold start {results[o]['cold_start'] / results[ref]['cold_start']:.2f}x"]
            for c in conns:
                parts.append(f"@{c}: {results[o][c]['rps'] / results[ref][c]['rps']:.2f}x req/s, "
                             f"p99 {results[o][c]['p99'] / results[ref][c]['p99']:.2f}x")
            print(f"\n{o} / {ref}: " + "; ".join(parts))


if __name__ == "__main__":
    main()
