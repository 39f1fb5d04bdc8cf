"""What the containers run, read from the images and the manifests, and run here as the kubelet would run it.

A container runs its image's ENTRYPOINT and CMD in the image's WORKDIR with the image's ENV, as the image's
USER, unless the manifest overrides them (command, args, workingDir, env, securityContext). The first test
checks, without running anything, that the manifests and the Dockerfiles agree on all of it (so `docker
run` and the cluster run the same thing), plus ports and probes.

The second runs both containers of the rendered local overlay as local processes, with exactly that
command line, working directory and environment (every ENV of the Dockerfile's final stage, then the
manifest's env with the downward API resolved), as the pod's user and group, with a temporary folder
standing in for each mounted volume. When the tests run as root, the children run as the pod's UID with
the pod's volumes as the only places that UID owns: the repository, the installed packages and the working
directory are read-only to it, as the read-only root filesystem makes them in the pod. (They also keep one
capability, CAP_DAC_READ_SEARCH, so that they can read this machine's Python under root's home folder;
it grants reading only, never writing.) Afterwards no file of that UID may exist outside the volumes.

The story is the one a cluster sees on first deploy: the serving pod starts on an empty volume and stays
unready; the Job trains (on the small MNIST sample, with tiny parameters) and publishes a model version
whose report shows its figures; the serving pod loads it by itself, turns ready, predicts, and shuts down
gracefully on SIGTERM."""
from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from helpers import free_port
from _deploy_fixtures import (OVERLAYS, ROOT, console_script, copy_args, downward_cpu, exec_form,
                              find, pod_spec, rendered, skaffold, stages, workloads)

# Tiny training run: enough to publish a real model, quick enough for CI.
TRAIN_OVERRIDES = {"MNIST_K8S_EPOCHS": "1", "MNIST_K8S_LIMIT": "512", "MNIST_K8S_TEST_LIMIT": "256",
                   "MNIST_K8S_DOWNLOAD": "false"}  # the sample is on disk; tests stay off the network
HOST_ENV = ("LANG", "LC_ALL", "LC_CTYPE", "TZ", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "SYSTEMROOT")
TRAIN_TIMEOUT = 900
# The report's figures: the heading of each section of nbs/train.ipynb that draws one.
FIGURES = ("Learning curves", "Confusion matrix", "Misclassified digits")
PNG = b"\x89PNG\r\n\x1a\n"
# Where an unprivileged process can create files on a Linux machine outside its own folders.
WORLD_WRITABLE = ("/tmp", "/var/tmp", "/dev/shm")


def dockerfile_of(c: dict) -> Path:
    "The Dockerfile Skaffold builds a container's image from."
    art = next(a for a in skaffold()["build"]["artifacts"] if a["image"] == c["image"])
    return ROOT / art["docker"]["dockerfile"]


class Container:
    "One workload's container: what its image says, overridden by what its manifest says."

    def __init__(self, obj: dict):
        self.obj, self.spec = obj, pod_spec(obj)
        (self.c,) = self.spec["containers"]
        self.name = obj["metadata"]["name"]
        self.image = stages(dockerfile_of(self.c))[-1]  # the final stage is the image

    def image_argv(self) -> list[str]:
        "What `docker run IMAGE` runs: ENTRYPOINT then CMD."
        entry, cmd = self.image.all("ENTRYPOINT"), self.image.all("CMD")
        return [*(exec_form(entry[-1]) if entry else []), *(exec_form(cmd[-1]) if cmd else [])]

    def argv(self) -> list[str]:
        "What the kubelet runs: `command` replaces ENTRYPOINT (and drops CMD), `args` replaces CMD."
        entry, cmd = self.image.all("ENTRYPOINT"), self.image.all("CMD")
        command = self.c["command"] if "command" in self.c else (exec_form(entry[-1]) if entry else [])
        args = self.c["args"] if "args" in self.c else ([] if "command" in self.c or not cmd
                                                         else exec_form(cmd[-1]))
        return [*command, *args]

    def image_workdir(self) -> str:
        return self.image.all("WORKDIR")[-1].value

    def workdir(self) -> str: return self.c.get("workingDir", self.image_workdir())

    def image_user(self) -> tuple[int, int]:
        uid, _, gid = self.image.all("USER")[-1].value.partition(":")
        return int(uid), int(gid or uid)

    def security(self, key: str):
        "A securityContext field: the container's, else the pod's."
        return self.c.get("securityContext", {}).get(key, self.spec.get("securityContext", {}).get(key))

    def user(self) -> tuple[int, int, int | None]:
        "(uid, gid, fsGroup) the container runs as."
        uid, gid = self.image_user()
        return (self.security("runAsUser") or uid, self.security("runAsGroup") or gid,
                self.spec.get("securityContext", {}).get("fsGroup"))

    def manifest_env(self) -> dict[str, str]:
        "The manifest's env as the kubelet sets it (downward-API CPU limits resolved)."
        out = {}
        for e in self.c.get("env", []):
            ref = e.get("valueFrom", {}).get("resourceFieldRef")
            if ref:
                resource = ref["resource"].split(".")[1]
                out[e["name"]] = str(downward_cpu(self.c["resources"]["limits"][resource], ref.get("divisor", "1")))
            else: out[e["name"]] = e["value"]
        return out

    def env(self) -> dict[str, str]:
        "The process environment in the container: the image's ENV, then the manifest's env."
        return {**self.image.env(), **self.manifest_env()}

    def mounts(self) -> dict[str, tuple[dict, dict]]:
        "mountPath -> (volume, volumeMount)."
        vols = {v["name"]: v for v in self.spec.get("volumes", [])}
        return {m["mountPath"]: (vols[m["name"]], m) for m in self.c.get("volumeMounts", [])}

    def writable(self, path: str) -> bool:
        "Whether `path` is on a volume the container may write (the root filesystem is read-only)."
        assert self.security("readOnlyRootFilesystem") is True
        return any((path == m or path.startswith(m.rstrip("/") + "/")) and not mount.get("readOnly")
                   and not vol.get("persistentVolumeClaim", {}).get("readOnly")
                   for m, (vol, mount) in self.mounts().items())

    def image_files(self) -> dict[str, str]:
        "Paths in the image that come from the checkout (COPY without --from): image path -> source."
        out = {}
        for i in self.image.all("COPY"):
            flags, srcs, dest = copy_args(i)
            if "from" not in flags and len(srcs) == 1: out[dest] = srcs[0]
        return out

    def port(self, port) -> int:
        if isinstance(port, int): return port
        return next(p["containerPort"] for p in self.c["ports"] if p["name"] == port)


# ---- 1. the manifests agree with the images ----------------------------------------------------------------
PATH_SETTINGS = ("HOME", "MPLCONFIGDIR", "TMPDIR")


@pytest.mark.deploy
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_manifests_run_what_the_images_run(overlay):
    from mnist_k8s.cli import build_parser
    for w in workloads(rendered(overlay)):
        k = Container(w)
        where = f"{overlay}/{k.name}"
        # command and arguments: the manifest runs what `docker run` runs, through the console script
        assert k.argv() == k.image_argv(), f"{where}: {k.argv()} but the image runs {k.image_argv()}"
        assert k.argv()[0] == console_script()
        expected = {"Job": "train", "Deployment": "serve"}[w["kind"]]
        assert build_parser().parse_args(k.argv()[1:]).command == expected, where
        # working directory
        assert k.workdir() == k.image_workdir(), where
        # environment: where both set a variable, they agree
        image_env, manifest_env = k.image.env(), k.manifest_env()
        clash = {n: (image_env[n], v) for n, v in manifest_env.items() if n in image_env and image_env[n] != v}
        assert not clash, f"{where}: image ENV and manifest env disagree: {clash}"
        env = k.env()
        assert "MPLBACKEND" not in env, f"{where}: MPLBACKEND keeps ipykernel from drawing inline figures"
        for n in PATH_SETTINGS:
            if n in env: assert k.writable(env[n]), f"{where}: {n}={env[n]} is not on a writable volume"
        # user: the image's numeric non-root user, which owns the volume's files
        uid, gid, fs_group = k.user()
        assert (uid, gid) == k.image_user() and uid != 0 and k.security("runAsNonRoot") is True, where
        assert fs_group == gid, where
        # files the image's ENV names were copied into the image
        for n, v in env.items():
            if n.startswith("MNIST_K8S_") and v.startswith("/app/"):
                assert v in k.image_files(), f"{where}: {n}={v} is not in the image"
        if w["kind"] == "Job":
            assert k.writable(env["MNIST_K8S_MODEL_DIR"]) and k.writable(env["MNIST_K8S_DATA_ROOT"]), where
            # a batch job: no ports, and the image says so with HEALTHCHECK NONE
            assert not k.c.get("ports") and [i.value for i in k.image.all("HEALTHCHECK")] == ["NONE"], where
            continue
        # the server: the port the app listens on is the one declared, exposed, probed and health-checked
        port = int(env["MNIST_K8S_PORT"])
        assert env["MNIST_K8S_HOST"] == "0.0.0.0"
        assert [p["containerPort"] for p in k.c["ports"]] == [port], where
        assert [int(i.value) for i in k.image.all("EXPOSE")] == [port], where
        probes = {p: k.c[p]["httpGet"] for p in ("startupProbe", "readinessProbe", "livenessProbe")}
        assert all(k.port(p["port"]) == port for p in probes.values()), where
        healthcheck = " ".join(exec_form(k.image.all("HEALTHCHECK")[-1]))
        assert probes["livenessProbe"]["path"] in healthcheck and "MNIST_K8S_PORT" in healthcheck, where
        assert env["MNIST_K8S_WORKERS"] == "1", f"{where}: one server process per pod"
        assert not k.writable(env["MNIST_K8S_MODEL_DIR"]), f"{where}: serving only reads the models"


# ---- 2. the containers, run here as the kubelet would run them ----------------------------------------------
class Process:
    "A container translated to a local process: each volume is a local folder, owned as in the pod."

    def __init__(self, k: Container, volume_dirs: dict[str, Path], scratch: Path):
        self.k = k
        self.uid, self.gid, self.fs_group = k.user()
        self.drop = os.geteuid() == 0  # as root: run as the pod's user; otherwise we are non-root already
        self.paths: dict[str, Path] = {}
        for mount_path, (vol, _) in k.mounts().items():
            if "persistentVolumeClaim" in vol:   # the same claim is the same folder for every pod
                local = volume_dirs.setdefault(vol["persistentVolumeClaim"]["claimName"], scratch / "volume")
            else:                                # emptyDir: private to this pod
                local = scratch / f"{k.name}-{vol['name']}"
            local.mkdir(parents=True, exist_ok=True)
            if self.drop:                        # the pod's user may write its volumes (fsGroup, chown)
                os.chown(local, self.uid, self.fs_group or self.gid)
                local.chmod(0o2770)
            self.paths[mount_path] = local
        for dest, src in k.image_files().items():  # files baked into the image come from the checkout
            self.paths.setdefault(dest, ROOT / src)
        # the image's WORKDIR: an empty folder the user cannot write to (root-owned, like /app in the image)
        self.workdir = scratch / f"{k.name}-workdir"
        self.workdir.mkdir()
        assert k.workdir() not in self.paths
        self.writable = [p for m, p in self.paths.items() if k.writable(m)]

    def local(self, value: str) -> str:
        "A container path (or any value) with the mount points replaced by their local folders."
        for inside in sorted(self.paths, key=len, reverse=True):
            if value == inside or value.startswith(inside.rstrip("/") + "/"):
                return str(self.paths[inside]) + value[len(inside):]
        return value

    def env(self, overrides: dict[str, str]) -> dict[str, str]:
        "The container's environment with local paths; PATH puts this Python's scripts first, as the image its venv."
        env = {k: os.environ[k] for k in HOST_ENV if k in os.environ}
        for name, value in self.k.env().items():
            if name not in ("PATH", "VIRTUAL_ENV"): env[name] = self.local(value)
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", os.defpath)])
        if "/tmp" in self.paths: env.setdefault("TMPDIR", str(self.paths["/tmp"]))  # /tmp is the emptyDir
        return {**env, **overrides}

    def argv(self) -> list[str]:
        argv = self.k.argv()
        exe = Path(sys.executable).parent / argv[0]
        if not exe.exists():   # not pip-installed here: call the console script's entry point the same way
            exe_argv = [sys.executable, "-c", "import sys; from mnist_k8s.cli import main; sys.exit(main())"]
        else: exe_argv = [str(exe)]
        if not self.drop: return [*exe_argv, *argv[1:]]
        groups = sorted({self.gid, self.fs_group or self.gid})
        return [shutil.which("setpriv") or pytest.fail("setpriv (util-linux) is needed to drop root"),
                f"--reuid={self.uid}", f"--regid={self.gid}", f"--groups={','.join(map(str, groups))}",
                "--inh-caps=-all,+dac_read_search", "--ambient-caps=-all,+dac_read_search",
                "--bounding-set=-all,+dac_read_search", "--", *exe_argv, *argv[1:]]

    def probe(self, kind: str) -> str: return self.k.c[kind]["httpGet"]["path"]


def files_of(uid: int, allowed: list[Path]) -> set[str]:
    "Files and folders owned by `uid` under the world-writable folders, outside `allowed`."
    found, allowed_s = set(), [str(a) for a in allowed]
    for top in WORLD_WRITABLE:
        for dirpath, dirnames, filenames in os.walk(top):
            if any(dirpath == a or dirpath.startswith(a + "/") for a in allowed_s):
                dirnames[:] = []
                continue
            keep = []
            for name in dirnames + filenames:
                p = os.path.join(dirpath, name)
                try: st = os.lstat(p)
                except OSError: continue
                if st.st_uid == uid and not any(p == a or p.startswith(a + "/") for a in allowed_s): found.add(p)
                # only folders this uid could write into can hold its files
                if name in dirnames and stat.S_ISDIR(st.st_mode) and (st.st_uid == uid or st.st_mode & 0o002):
                    keep.append(name)
            dirnames[:] = [d for d in dirnames if d in keep]
    return found


def digit_png(sample: Path) -> bytes:
    "The first test digit of the sample as a PNG (white ink on black, as MNIST stores it)."
    from PIL import Image
    raw = (sample / "MNIST" / "raw" / "t10k-images-idx3-ubyte").read_bytes()
    _, _, rows, cols = struct.unpack(">IIII", raw[:16])
    img = Image.frombytes("L", (cols, rows), raw[16:16 + rows * cols])
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def tail(path: Path, n: int = 60) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else ""


def wait_for(check, seconds: float, what: str, log: Path, proc: subprocess.Popen):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if (result := check()) is not None: return result
        if proc.poll() is not None: pytest.fail(f"{what}: the server exited ({proc.returncode})\n{tail(log)}")
        time.sleep(0.25)
    pytest.fail(f"{what} within {seconds:g} s\n--- log ---\n{tail(log)}")


def figures_in_notebook(path: Path) -> dict[str, list[bytes]]:
    "The PNG images each figure section of an executed notebook shows (the section is its markdown heading)."
    nb = json.loads(path.read_text())
    out, section = {}, None
    for cell in nb["cells"]:
        src = "".join(cell["source"])
        if cell["cell_type"] == "markdown":
            section = next((f for f in FIGURES if re.search(rf"^#+\s*{f}", src, re.M)), None)
            if section: out.setdefault(section, [])
            continue
        if section:
            out[section] += [base64.b64decode(o["data"]["image/png"]) for o in cell.get("outputs", [])
                             if "image/png" in o.get("data", {})]
    return out


def figures_in_html(html: str) -> dict[str, list[bytes]]:
    "The PNG images (embedded as data URIs) between each figure section's heading and the next heading."
    out = {}
    parts = re.split(r"<h[1-6][^>]*>", html)
    for part in parts:
        title = re.sub(r"<[^>]+>", "", part.split("</h", 1)[0]).replace("¶", "").strip()
        section = next((f for f in FIGURES if title.startswith(f)), None)
        if section:
            out[section] = [base64.b64decode(b) for b in re.findall(r'src="data:image/png;base64,([^"]+)"', part)]
    return out


@pytest.fixture
def scratch():
    """A folder for the pods' volumes that every user can traverse (root-owned, 0755), with a short path:
    in the pod HOME and TMPDIR are /tmp, and the kernel's IPC sockets there must fit in 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="mnist-k8s-pods-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.deploy
@pytest.mark.server
@pytest.mark.slow
def test_job_and_deployment_run_as_their_containers_would(scratch, sample_root):
    import httpx2
    tmp_path = scratch
    objs = rendered("local")
    volumes: dict[str, Path] = {}
    train = Process(Container(find(objs, "Job")), volumes, tmp_path)
    infer = Process(Container(find(objs, "Deployment")), volumes, tmp_path)
    assert len(volumes) == 1, volumes  # one claim, shared by the Job and the Deployment
    allowed = sorted({*train.writable, *infer.writable})
    if train.drop: before = files_of(train.uid, allowed)

    port = free_port()
    server_env = infer.env({"MNIST_K8S_HOST": "127.0.0.1", "MNIST_K8S_PORT": str(port)})
    train_env = train.env(TRAIN_OVERRIDES)
    model_dir = Path(train_env["MNIST_K8S_MODEL_DIR"])
    assert Path(server_env["MNIST_K8S_MODEL_DIR"]) == model_dir and str(model_dir).startswith(str(tmp_path))
    assert Path(train_env["HOME"]) in train.writable and Path(server_env["HOME"]) in infer.writable
    data_root = Path(train_env["MNIST_K8S_DATA_ROOT"])
    shutil.copytree(sample_root / "MNIST", data_root / "MNIST")
    if train.drop:
        for p in [data_root, *data_root.rglob("*")]: os.chown(p, train.uid, train.gid)
    assert Path(train_env["MNIST_K8S_TRAIN_NOTEBOOK"]) == ROOT / "nbs" / "train.ipynb"

    url = lambda path: f"http://127.0.0.1:{port}{path}"  # noqa: E731
    status = lambda path: (lambda r: r.status_code)(httpx2.get(url(path), timeout=5))  # noqa: E731

    def answers(path, code):
        def check():
            try: return True if status(path) == code else None
            except httpx2.TransportError: return None
        return check

    server_log = tmp_path / "serve.log"
    with open(server_log, "wb") as out:
        server = subprocess.Popen(infer.argv(), env=server_env, cwd=infer.workdir, stdout=out,
                                  stderr=subprocess.STDOUT)
    try:
        # 1. the pod starts on an empty volume: alive (startup and liveness probes), not ready
        p = infer.k.c["startupProbe"]
        wait_for(answers(infer.probe("startupProbe"), 200), min(p["periodSeconds"] * p["failureThreshold"], 120),
                 "startup probe did not answer 200", server_log, server)
        assert status(infer.probe("livenessProbe")) == 200
        ready_path = infer.probe("readinessProbe")
        assert status(ready_path) == 503, "ready without a model"

        # 2. the training Job, as its container would run it
        train_log = tmp_path / "train.log"
        with open(train_log, "wb") as out:
            try:
                res = subprocess.run(train.argv(), env=train_env, cwd=train.workdir, stdout=out,
                                     stderr=subprocess.STDOUT, timeout=TRAIN_TIMEOUT)
            except subprocess.TimeoutExpired: pytest.fail(f"training did not finish\n{tail(train_log)}")
        assert res.returncode == 0, tail(train_log)
        version = (model_dir / "latest").read_text().strip()
        folder = model_dir / "versions" / version
        for name in ("model.pt", "metadata.json", "report.ipynb", "report.html"):
            assert (folder / name).is_file(), f"{name} missing from {folder}"
        meta = json.loads((folder / "metadata.json").read_text())
        assert meta["version"] == version
        assert meta["sha256"] == hashlib.sha256((folder / "model.pt").read_bytes()).hexdigest()
        assert meta["params"]["epochs"] == 1  # the overrides reached the notebook through the environment
        if train.drop: assert (folder / "model.pt").stat().st_uid == train.uid  # written by the pod's user

        # what a user sees: the report's figures, in the notebook and in the HTML page
        report = json.loads((folder / "report.ipynb").read_text())
        assert report["metadata"].get("papermill"), "the report is not an executed notebook"
        for where, figures in [("report.ipynb", figures_in_notebook(folder / "report.ipynb")),
                               ("report.html", figures_in_html((folder / "report.html").read_text()))]:
            for title in FIGURES:
                images = figures.get(title)
                assert images, f"{where}: no figure under '{title}' (MPLBACKEND set? see docker/train.Dockerfile)"
                assert all(i.startswith(PNG) and len(i) > 1000 for i in images), f"{where}: '{title}' is not a PNG"

        # 3. the serving pod picks the model up by itself and turns ready
        wait_for(answers(ready_path, 200), 30, "the server did not load the published model", server_log, server)
        assert httpx2.get(url("/model"), timeout=5).json()["version"] == version
        r = httpx2.get(url("/report"), timeout=10)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert all(figures_in_html(r.text).get(t) for t in FIGURES), "the served report lost its figures"
        r = httpx2.post(url("/predict"), files={"file": ("digit.png", digit_png(sample_root), "image/png")},
                        timeout=30)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["digit"] in range(10) and body["version"] == version

        # 4. Kubernetes stops a pod with SIGTERM: it drains and exits within the grace period
        grace = infer.k.spec["terminationGracePeriodSeconds"]
        server.send_signal(signal.SIGTERM)
        try: rc = server.wait(timeout=grace)
        except subprocess.TimeoutExpired: pytest.fail(f"no exit within {grace} s of SIGTERM\n{tail(server_log)}")
        assert rc == 0, tail(server_log)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(timeout=30)
    # 5. nothing was written outside the pods' volumes
    if train.drop:
        stray = files_of(train.uid, allowed) - before
        assert not stray, f"written outside the pods' volumes (read-only in the pod): {sorted(stray)[:20]}"
