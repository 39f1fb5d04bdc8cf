#!/usr/bin/env python
"""All the figures behind the README's claims, in one run, each beside the reference design's figure measured
in the same run:

- serving (`bench/serve.py`): requests/s, p50 and p99 latency at 1, 16 and 64 connections, failed requests,
  resident memory after the load, cold start; against the typical tutorial FastAPI service;
- hot reload (here): publish a new version into the served model store, time until `GET /model` reports it
  (with the default reload interval). The reference design has no hot reload: it must be restarted, which
  costs its cold start, with requests failing meanwhile;
- training (`bench/train.py`): wall time, seconds per epoch, peak memory and test accuracy on full MNIST;
  against the classic PyTorch MNIST tutorial network and recipe.

    python bench/all.py                 # everything (about 15 minutes on 2 cores); on a quiet machine
    python bench/all.py --quick         # a smoke run: short load levels, few reloads, a small training run
    python bench/all.py --skip-train    # serving and hot reload only

The detailed tables of `bench/serve.py` and `bench/train.py` are printed as they finish; the summary table
comes last."""
from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CLI = "import sys; from mnist_k8s.cli import main; sys.exit(main(sys.argv[1:]))"


def _load(name: str):
    "Import a sibling benchmark script as a module (they are scripts, not a package)."
    spec = importlib.util.spec_from_file_location(f"bench_{name}", Path(__file__).with_name(f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


serve_bench, train_bench = _load("serve"), _load("train")


# ---------------------------------------------------------------------------------------------- serving
def run_serving(a) -> dict:
    "bench/serve.py's measurement, its own table printed as usual; its results returned."
    captured = {}
    original = serve_bench.report
    def report(results, conns):
        captured.update(results=results, conns=conns)
        original(results, conns)
    serve_bench.report = report
    try:
        argv = ["--duration", str(a.duration), "--rounds", str(a.rounds), "--conns", a.conns, "--skip-strategies"]
        if a.quick: argv += ["--skip-h11", "--skip-ref-1thread"]
        serve_bench.main(argv)
    finally:
        serve_bench.report = original
    return captured


# ---------------------------------------------------------------------------------------------- hot reload
def run_hot_reload(n: int) -> dict:
    """Serve a model store with `mnist-k8s serve` (default settings), publish `n` new versions one after the
    other, and time each from the moment `latest` switches until `GET /model` reports the new version."""
    import json
    publish_untrained = serve_bench.publish_untrained
    tmp = Path(tempfile.mkdtemp(prefix="mnist-k8s-reload-"))
    port = serve_bench.free_port()
    svc = serve_bench.Service("mnist-k8s", [sys.executable, "-c", CLI, "serve", "--host", "127.0.0.1", "--port",
                                            str(port), "--model-dir", str(tmp / "models")], "/readyz", port,
                              env={"MNIST_K8S_LOG_LEVEL": "warning"})
    times = []
    try:
        publish_untrained(tmp / "models", seed=0)
        svc.start()
        from mnist_k8s.config import Settings
        interval = Settings(_env_file=None).reload_interval
        for i in range(n):
            time.sleep(interval * 0.37 * (i % 3))      # publish at different points of the reload cycle
            t0 = time.perf_counter()
            version = publish_untrained(tmp / "models", seed=i + 1)
            while time.perf_counter() - t0 < 60:
                status, body = serve_bench.http("GET", f"http://127.0.0.1:{port}/model", timeout=5)
                if status == 200 and json.loads(body).get("version") == version: break
                time.sleep(0.005)
            else:
                raise RuntimeError(f"version {version} not served within 60 s")
            times.append(time.perf_counter() - t0)
    finally:
        svc.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return {"times": times, "median": statistics.median(times), "max": max(times), "interval": interval}


# ---------------------------------------------------------------------------------------------- training
def run_training(a) -> dict:
    "bench/train.py's two child runs (reference, ours); their results."
    args = argparse.Namespace(data_root=a.data_root, seed=42, epochs_ref=a.epochs_ref, epochs=a.epochs,
                              limit=a.train_limit)
    rows = [train_bench.measure(which, args) for which in ("ref", "ours")]
    print()
    print(train_bench.table(rows))
    return {r["name"]: r for r in rows}


# ---------------------------------------------------------------------------------------------- summary
def _ratio(ours, ref) -> str:
    try: return f"{ours / ref:.2f}x" if ref else ""
    except TypeError: return ""


def summary(serving: dict | None, reload: dict | None, training: dict | None) -> str:
    rows = []
    if serving:
        res, conns = serving["results"], serving["conns"]
        ours = next(n for n in res if n.startswith("mnist-k8s"))
        ref = next((n for n in res if n == "reference (uvicorn auto stack)"), None) or \
              next(n for n in res if n.startswith("reference"))
        o, r = res[ours], res[ref]
        for c in conns:
            rows.append((f"requests/s @ {c} connection{'s' * (c > 1)}", f"{o[c]['rps']:.0f}", f"{r[c]['rps']:.0f}",
                         _ratio(o[c]["rps"], r[c]["rps"])))
            rows.append((f"p50 latency ms @ {c}", f"{o[c]['p50']:.2f}", f"{r[c]['p50']:.2f}", _ratio(o[c]["p50"], r[c]["p50"])))
            rows.append((f"p99 latency ms @ {c}", f"{o[c]['p99']:.2f}", f"{r[c]['p99']:.2f}", _ratio(o[c]["p99"], r[c]["p99"])))
        err = lambda x: sum(x[c]["errors"] + x[c]["non2xx"] for c in conns)
        rows.append(("failed or non-2xx requests (all levels)", str(err(o)), str(err(r)), ""))
        rows.append(("RSS after the load, MiB", f"{o['rss']:.0f}", f"{r['rss']:.0f}", _ratio(o["rss"], r["rss"])))
        rows.append(("PSS after the load, MiB (shared pages divided among processes)", f"{o['pss']:.0f}",
                     f"{r['pss']:.0f}", _ratio(o["pss"], r["pss"])))
        rows.append(("peak RSS, MiB", f"{o['peak_rss']:.0f}", f"{r['peak_rss']:.0f}", _ratio(o["peak_rss"], r["peak_rss"])))
        rows.append(("cold start s (launch to ready)", f"{o['cold_start']:.2f}", f"{r['cold_start']:.2f}",
                     _ratio(o["cold_start"], r["cold_start"])))
    if reload:
        restart = f"restart: {serving['results'][ref]['cold_start']:.2f} s down" if serving else "restart needed"
        rows.append((f"new model served, s (publish → /model; {len(reload['times'])} reloads, interval "
                     f"{reload['interval']:g} s): median / max", f"{reload['median']:.2f} / {reload['max']:.2f}",
                     restart, ""))
    if training:
        o, r = training["ours"], training["ref"]
        rows.append(("training wall time s (process start to test accuracy)", f"{o['wall']:.0f}", f"{r['wall']:.0f}",
                     _ratio(o["wall"], r["wall"])))
        rows.append(("training epochs", str(o["epochs"]), str(r["epochs"]), ""))
        rows.append(("seconds per epoch", f"{o['s_per_epoch']:.1f}", f"{r['s_per_epoch']:.1f}",
                     _ratio(o["s_per_epoch"], r["s_per_epoch"])))
        rows.append(("test accuracy", f"{o['test_accuracy']:.2%}", f"{r['test_accuracy']:.2%}", ""))
        rows.append(("training peak RSS, MB", f"{o['max_rss_mb']:.0f}", f"{r['max_rss_mb']:.0f}",
                     _ratio(o["max_rss_mb"], r["max_rss_mb"])))
    out = ["| figure | mnist-k8s | reference | mnist-k8s / reference |", "|---|---|---|---|"]
    out += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: short levels, 1 round, few reloads, tiny training")
    p.add_argument("--duration", type=float, default=None, help="seconds per load level and round (default 5; quick 1)")
    p.add_argument("--rounds", type=int, default=None, help="load rounds (default 3; quick 1)")
    p.add_argument("--conns", default="1,16,64", help="connection counts (default 1,16,64)")
    p.add_argument("--reloads", type=int, default=None, help="hot reloads to time (default 9; quick 3)")
    p.add_argument("--data-root", type=Path, default=None,
                   help="MNIST for training (default: ../shared/data if present, else tests/data)")
    p.add_argument("--train-limit", type=int, default=None, help="training digits (default all; quick 2000)")
    p.add_argument("--epochs", type=int, default=None, help="our epochs (default: the Settings default; quick 1)")
    p.add_argument("--epochs-ref", type=int, default=None, help="reference epochs (default 5; quick 1)")
    p.add_argument("--skip-serve", action="store_true")
    p.add_argument("--skip-reload", action="store_true")
    p.add_argument("--skip-train", action="store_true")
    a = p.parse_args(argv)
    q = a.quick
    a.duration = a.duration or (1.0 if q else 5.0)
    a.rounds = a.rounds or (1 if q else 3)
    a.reloads = a.reloads or (3 if q else 9)
    a.train_limit = a.train_limit or (2000 if q else None)
    a.epochs = a.epochs or (1 if q else None)
    a.epochs_ref = a.epochs_ref or (1 if q else 5)
    shared = REPO.parent / "shared" / "data"
    a.data_root = a.data_root or (shared if (shared / "MNIST" / "raw").is_dir() else REPO / "tests" / "data")

    sys.path.insert(0, str(REPO))
    import torch
    print(f"mnist-k8s benchmarks{' (quick smoke run)' if q else ''}: torch {torch.__version__}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f}, wrk {'found' if shutil.which('wrk') else 'missing (Python load generator)'}",
          flush=True)
    t0 = time.perf_counter()
    serving = reload = training = None
    if not a.skip_serve:
        print("\n== serving (bench/serve.py)", flush=True)
        serving = run_serving(a)
    if not a.skip_reload:
        print(f"\n== hot reload ({a.reloads} new versions)", flush=True)
        reload = run_hot_reload(a.reloads)
        print("  " + ", ".join(f"{t:.2f} s" for t in reload["times"]))
    if not a.skip_train:
        print(f"\n== training (bench/train.py, data {a.data_root}, limit {a.train_limit or 'none'})", flush=True)
        training = run_training(a)
    print(f"\n== summary ({time.perf_counter() - t0:.0f} s, load average now {os.getloadavg()[0]:.2f})\n")
    print(summary(serving, reload, training))


if __name__ == "__main__":
    main()
