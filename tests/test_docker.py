"""Static checks of docker/train.Dockerfile and docker/infer.Dockerfile (there is no Docker engine in CI):
digest-pinned multi-stage builds, CPU-only torch installed before the package, a non-root numeric user,
nothing to compile and no pip cache in the image, and what each image must (not) carry."""
from __future__ import annotations

import re
import shlex
from importlib import metadata

import pytest
from packaging.requirements import Requirement

from _deploy_fixtures import (DOCKERFILES, ROOT, console_script, copy_args, dockerignored, exec_form, pinned,
                              settings_ini, stages)

KINDS = list(DOCKERFILES)
DIGEST = re.compile(r"^[a-z0-9./-]+:[\w.-]+@sha256:[0-9a-f]{64}$")
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
JUPYTER = {"jupyter", "jupyter-core", "jupyter-client", "jupyterlab", "notebook", "ipykernel", "ipython",
           "papermill", "nbconvert", "nbclient", "nbformat"}
COMPILERS = re.compile(r"\b(gcc|g\+\+|clang|cc|make|build-essential|python3-dev|libc6-dev|cmake|gfortran)\b")


def pip_installs(stage) -> list[list[str]]:
    "The argument lists of every `pip install` in a stage's RUN instructions."
    out = []
    for run in stage.all("RUN"):
        for cmd in re.split(r"&&|\|\|", run.value):
            if "pip" not in cmd: continue
            words = shlex.split(cmd)
            if words[:2] == ["pip", "install"] or words[:4] == ["python", "-m", "pip", "install"]:
                out.append(words[words.index("install") + 1:])
    return out


def arg_default(stage, name: str) -> str | None:
    for i in stage.all("ARG"):
        k, _, v = i.value.partition("=")
        if k == name: return v
    return None


def expand(value: str, stage) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: arg_default(stage, m[1]) or m[0], value)


@pytest.mark.parametrize("kind", KINDS)
def test_bases_are_pinned_by_tag_and_digest(kind):
    ss = stages(DOCKERFILES[kind])
    names = {s.name for s in ss if s.name}
    bases = [s.base for s in ss if s.base not in names]
    assert bases and all(DIGEST.match(b) for b in bases), bases
    assert all(b.startswith("python:3.11-slim-bookworm@") for b in bases), bases
    # the venv copied from the build stage points at that stage's interpreter: same image in both
    assert len(set(bases)) == 1, bases


def test_both_images_share_one_base():
    bases = {s.base for k in KINDS for s in stages(DOCKERFILES[k]) if "@sha256:" in s.base}
    assert len(bases) == 1, bases


@pytest.mark.parametrize("kind", KINDS)
def test_multi_stage_copies_the_venv_only(kind):
    build, final = stages(DOCKERFILES[kind])[0], stages(DOCKERFILES[kind])[-1]
    assert build is not final and build.name
    venv = [i for i in final.all("COPY") if copy_args(i)[0].get("from") == build.name]
    assert [copy_args(i)[1:] for i in venv] == [(["/opt/venv"], "/opt/venv")]
    assert final.env()["PATH"].startswith("/opt/venv/bin:")


@pytest.mark.parametrize("kind", KINDS)
def test_final_stage_runs_as_a_numeric_non_root_user(kind):
    final = stages(DOCKERFILES[kind])[-1]
    users = final.all("USER")
    assert users, "no USER in the final stage: the container would run as root"
    uid, _, gid = users[-1].value.partition(":")
    assert uid.isdigit() and gid.isdigit() and int(uid) >= 10000 and int(gid) > 0
    # the user exists in the image (some tools look it up), with that UID
    assert any(f"--uid {uid}" in r.value for r in final.all("RUN"))
    # everything after USER runs unprivileged: nothing may need root there
    after = final.instrs[final.instrs.index(users[-1]):]
    assert not [i for i in after if i.cmd in ("RUN",) and re.search(r"apt|chown|chmod", i.value)]


@pytest.mark.parametrize("kind", KINDS)
def test_final_stage_environment(kind):
    env = stages(DOCKERFILES[kind])[-1].env()
    assert env["PYTHONUNBUFFERED"] == "1" and env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["HOME"] == "/tmp"  # writable under a read-only root filesystem (an emptyDir in Kubernetes)


@pytest.mark.parametrize("kind", KINDS)
def test_torch_comes_from_the_cpu_index_before_the_package(kind):
    build = stages(DOCKERFILES[kind])[0]
    installs = pip_installs(build)
    torch_i = next(i for i, args in enumerate(installs) if any(a.startswith("torch==") for a in args))
    args = [expand(a, build) for a in installs[torch_i]]
    assert args[args.index("--index-url") + 1] == CPU_INDEX
    assert f"torch=={pinned('requirements', 'torch')}" in args
    assert f"torchvision=={pinned('requirements', 'torchvision')}" in args
    package_i = next(i for i, args in enumerate(installs) if any(a in (".", ".[train]") for a in args))
    assert torch_i < package_i, "torch must be installed from the CPU index before `pip install .`"
    # no other install may pull torch from another index
    assert all("--extra-index-url" not in a and "--index-url" not in a for a in installs[package_i:])


@pytest.mark.parametrize("kind", KINDS)
def test_no_compilers_and_no_pip_cache_in_the_image(kind):
    ss = stages(DOCKERFILES[kind])
    final = ss[-1]
    assert not pip_installs(final), "the final stage installs nothing: it copies the built venv"
    for s in ss:
        for run in s.all("RUN"):
            if "apt-get install" in run.value or "apt install" in run.value:
                assert not COMPILERS.search(run.value) or s is not final, run.value
    build = ss[0]
    no_cache = build.env().get("PIP_NO_CACHE_DIR") in ("1", "true", "on")
    assert no_cache or all("--no-cache-dir" in args for args in pip_installs(build))


def test_train_image_carries_papermill_and_the_notebook():
    ss = stages(DOCKERFILES["train"])
    assert any(".[train]" in args for args in pip_installs(ss[0]))
    train_extra = {Requirement(r).name for r in settings_ini()["train_requirements"].split()}
    assert {"papermill", "ipykernel"} <= train_extra
    final = ss[-1]
    notebook = final.env()["MNIST_K8S_TRAIN_NOTEBOOK"]
    copies = {dest: src for i in final.all("COPY") if not copy_args(i)[0].get("from")
              for (src,), dest in [copy_args(i)[1:]]}
    assert copies.get(notebook) == "nbs/train.ipynb"
    # the build checks, as the final user, that papermill will find the `python3` kernel
    user_at = final.instrs.index(final.all("USER")[-1])
    checks = [i for i in final.instrs[user_at:] if i.cmd == "RUN" and "find_kernel_specs" in i.value]
    assert checks and "'python3'" in checks[0].value


def test_infer_image_installs_no_jupyter():
    ss = stages(DOCKERFILES["infer"])
    package_installs = [args for args in pip_installs(ss[0]) if not any(a.startswith("torch") for a in args)]
    assert package_installs == [["."]], "the inference image installs the package without extras"
    assert not any("nbs/" in i.value for s in ss for i in s.all("COPY"))
    base = [Requirement(r) for r in settings_ini()["requirements"].split()]
    assert not {r.name.lower() for r in base} & JUPYTER


def test_base_requirements_do_not_pull_jupyter_in():
    "Walk the installed dependency tree of the base requirements: no Jupyter package is reachable."
    seen, todo, reached = set(), [Requirement(r) for r in settings_ini()["requirements"].split()], set()
    while todo:
        req = todo.pop()
        name = req.name.lower().replace("_", "-")
        if name in seen: continue
        seen.add(name)
        try: dist = metadata.distribution(name)
        except metadata.PackageNotFoundError: continue
        reached.add(name)
        for r in dist.requires or []:
            r = Requirement(r)
            if r.marker and not r.marker.evaluate({"extra": ""}): continue  # optional extras
            todo.append(r)
    assert {"torch", "fastapi", "uvicorn"} <= reached, "the base requirements are not installed here"
    assert not reached & JUPYTER, reached & JUPYTER


@pytest.mark.parametrize("kind", KINDS)
def test_copy_sources_exist_and_reach_the_build_context(kind):
    for s in stages(DOCKERFILES[kind]):
        for i in s.all("COPY"):
            flags, sources, _ = copy_args(i)
            if "from" in flags: continue
            for src in sources:
                path = ROOT / src
                assert path.exists(), f"line {i.line}: COPY source {src} does not exist"
                files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
                for f in files:
                    rel = f.relative_to(ROOT).as_posix()
                    if "__pycache__" in rel: continue
                    assert not dockerignored(rel), f".dockerignore leaves {rel} out of the build context"


@pytest.mark.parametrize("kind", KINDS)
def test_package_is_installed_from_its_build_files(kind):
    "`pip install .` needs the nbdev build files and the package folder (templates and static included)."
    copied = {src for i in stages(DOCKERFILES[kind])[0].all("COPY") for src in copy_args(i)[1]}
    assert {"setup.py", "settings.ini", "pyproject.toml", "MANIFEST.in", "README.md", "mnist_k8s/"} <= copied
    manifest = (ROOT / "MANIFEST.in").read_text()
    assert "recursive-include mnist_k8s/templates" in manifest and "recursive-include mnist_k8s/static" in manifest


def test_dockerignore_keeps_secrets_and_data_out():
    for rel in [".env", ".git/config", "models/latest", "data/MNIST/raw/x", "nbs/01_data.ipynb",
                "mnist_k8s/__pycache__/x.pyc", "tests/test_k8s.py", ".venv/bin/python", "k8s/base/pvc.yaml"]:
        assert dockerignored(rel), rel
    for rel in ["setup.py", "mnist_k8s/config.py", "nbs/train.ipynb", "mnist_k8s/templates/index.html"]:
        assert not dockerignored(rel), rel


@pytest.mark.parametrize("kind,command", [("train", "train"), ("infer", "serve")])
def test_entrypoint_is_the_cli(kind, command):
    final = stages(DOCKERFILES[kind])[-1]
    assert exec_form(final.all("ENTRYPOINT")[-1]) == [console_script()]
    assert exec_form(final.all("CMD")[-1]) == [command]


def test_infer_image_listens_and_checks_its_health():
    final = stages(DOCKERFILES["infer"])[-1]
    env = final.env()
    assert env["MNIST_K8S_HOST"] == "0.0.0.0"
    assert [i.value for i in final.all("EXPOSE")] == [env["MNIST_K8S_PORT"]]
    check = " ".join(exec_form(final.all("HEALTHCHECK")[-1]))
    assert "/healthz" in check and "MNIST_K8S_PORT" in check


def test_train_image_declares_no_healthcheck():
    "A batch image: Kubernetes follows the Job's exit code, so the Dockerfile says NONE explicitly."
    assert [i.value for i in stages(DOCKERFILES["train"])[-1].all("HEALTHCHECK")] == ["NONE"]
