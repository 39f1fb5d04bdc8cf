"""Training benchmark: the classic PyTorch MNIST tutorial network vs. this project's default recipe.

Each run trains on full MNIST in a subprocess of its own, so its peak memory (max RSS) is its own. The table shows
seconds per epoch, total wall time (process start to final test accuracy, imports included), peak RSS, test
accuracy on the 10,000 test digits, inference latency of the trained model at batch size 1, and each figure
relative to the reference.

    python bench/train.py                       # both, full MNIST (about 7 minutes on 2 quiet cores)
    python bench/train.py --only ours           # just this project's recipe
    python bench/train.py --limit 5000 --epochs-ref 1 --epochs 2   # a quick smoke run

The reference is the well-known tutorial design, written out here (and only here): conv 1->32 3x3, ReLU,
conv 32->64 3x3, ReLU, max-pool 2, dropout 0.25, linear 9216->128, ReLU, dropout 0.5, linear 128->10,
log_softmax + nll_loss, Adam lr 1e-3, batch 64, per-sample `ToTensor()` + `Normalize` in a `DataLoader`.
Both use the same number of torch threads (the CPU quota, as the project does).
Measure on a quiet machine: other processes on the same cores slow multi-threaded training a lot.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------- child runs
def _infer_latency(model, n: int = 300) -> float:
    "Median latency (microseconds) of the trained model on one 1x1x28x28 image (eval mode, float32)."
    import torch
    model.eval()
    x = torch.rand(1, 1, 28, 28)
    times = []
    with torch.inference_mode():
        for _ in range(20): model(x)
        for _ in range(n):
            t = time.perf_counter(); model(x); times.append(time.perf_counter() - t)
    return sorted(times)[n // 2] * 1e6


def run_reference(a) -> dict:
    import torch
    import torch.nn.functional as F
    from torch import nn
    from torch.utils.data import DataLoader, Subset
    from torchvision import datasets, transforms

    from mnist_k8s.config import default_threads
    torch.set_num_threads(default_threads())
    torch.manual_seed(a.seed)

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from reference_net import Net

    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    train_ds = datasets.MNIST(a.data_root, train=True, download=False, transform=transform)
    test_ds = datasets.MNIST(a.data_root, train=False, download=False, transform=transform)
    if a.limit: train_ds = Subset(train_ds, range(a.limit))
    train_loader = DataLoader(train_ds, batch_size=64, shuffle=True)
    test_loader = DataLoader(test_ds, batch_size=1000)
    model = Net()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    epochs = []
    for epoch in range(a.epochs_ref):
        t = time.perf_counter()
        model.train()
        for data, target in train_loader:
            optimizer.zero_grad()
            loss = F.nll_loss(model(data), target)
            loss.backward()
            optimizer.step()
        model.eval()
        correct = 0
        with torch.no_grad():
            for data, target in test_loader:
                correct += (model(data).argmax(1) == target).sum().item()
        acc = correct / len(test_ds)
        epochs.append(time.perf_counter() - t)
        print(f"  ref epoch {epoch + 1}/{a.epochs_ref}: test accuracy {acc:.2%} ({epochs[-1]:.1f} s)", flush=True)
    return dict(epochs=len(epochs), epoch_seconds=epochs, test_accuracy=acc, batch_size=64,
                params=sum(p.numel() for p in model.parameters()), infer_us=_infer_latency(model))


def run_ours(a) -> dict:
    from mnist_k8s.config import Settings
    from mnist_k8s.train import train_model
    s = Settings(_env_file=None)
    epochs = a.epochs or s.epochs
    with tempfile.TemporaryDirectory() as d:
        res = train_model(a.data_root, d, epochs=epochs, batch_size=s.batch_size, lr=s.lr, seed=a.seed,
                          limit=a.limit, progress=False, log=lambda m: print("  ours", m, flush=True))
    return dict(epochs=epochs, epoch_seconds=[h["seconds"] for h in res.history],
                test_accuracy=res.evaluation.accuracy, batch_size=s.batch_size, lr=s.lr,
                bf16=res.metadata["params"]["bf16"], params=res.metadata["n_parameters"],
                infer_us=_infer_latency(res.model))


# ---------------------------------------------------------------------------------------------- parent
def measure(which: str, a) -> dict:
    "Run one design in a fresh interpreter; wall time and peak RSS come from the OS."
    cmd = [sys.executable, __file__, "--child", which, "--data-root", str(a.data_root), "--seed", str(a.seed),
           "--epochs-ref", str(a.epochs_ref)]
    if a.limit: cmd += ["--limit", str(a.limit)]
    if a.epochs: cmd += ["--epochs", str(a.epochs)]
    load = os.getloadavg()[0]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=REPO)
    result = None
    for line in proc.stdout:
        if line.startswith("RESULT "): result = json.loads(line[7:])
        else: print(line, end="", flush=True)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t
    if proc.returncode or result is None: sys.exit(f"{which} run failed (exit {proc.returncode})")
    return dict(result, name=which, wall=wall, max_rss_mb=usage.ru_maxrss / 1024, load_before=load,
                load_after=os.getloadavg()[0])


def table(rows: list[dict]) -> str:
    ref = next((r for r in rows if r["name"] == "ref"), None)
    def ratio(r, k): return f" ({r[k] / ref[k]:.2f}x)" if ref and r is not ref else ""
    lines = ["| design | params | epochs | s/epoch | total wall s | peak RSS MB | test accuracy | 1-image latency us |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        r["s_per_epoch"] = sum(r["epoch_seconds"]) / len(r["epoch_seconds"])
        label = ("reference (tutorial CNN)" if r["name"] == "ref"
                 else f"ours (bs {r['batch_size']}, {'bf16' if r.get('bf16') else 'fp32'} autocast)")
        lines.append(f"| {label} | {r['params']:,} | {r['epochs']} | {r['s_per_epoch']:.1f}{ratio(r, 's_per_epoch')} "
                     f"| {r['wall']:.0f}{ratio(r, 'wall')} | {r['max_rss_mb']:.0f}{ratio(r, 'max_rss_mb')} "
                     f"| {r['test_accuracy']:.2%} | {r['infer_us']:.0f}{ratio(r, 'infer_us')} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data",
                   help="folder holding MNIST/raw (full MNIST; default: ../shared/data next to the repo)")
    p.add_argument("--epochs-ref", type=int, default=5, help="reference epochs (the tutorial's 5)")
    p.add_argument("--epochs", type=int, default=None, help="our epochs (default: the Settings default)")
    p.add_argument("--only", choices=["ours", "ref"], help="run just one of the two")
    p.add_argument("--limit", type=int, default=None, help="train on only this many digits (smoke runs)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--child", choices=["ours", "ref"], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        sys.path.insert(0, str(REPO))
        result = (run_ours if a.child == "ours" else run_reference)(a)
        print("RESULT " + json.dumps(result), flush=True)
        return
    if not (a.data_root / "MNIST" / "raw").is_dir(): sys.exit(f"no MNIST under {a.data_root}/MNIST/raw")
    import torch
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load {os.getloadavg()}, data {a.data_root}", flush=True)
    rows = [measure(w, a) for w in (["ref", "ours"] if not a.only else [a.only])]
    print()
    print(table(rows))
    for r in rows: print(f"{r['name']}: load average {r['load_before']:.2f} before, {r['load_after']:.2f} after")


if __name__ == "__main__":
    main()
