"""Static checks of docker/train.Dockerfile and docker/infer.Dockerfile (there is no Docker engine in CI):
digest-pinned multi-stage builds, CPU-only torch installed before the package, the dependencies (generated
from settings.ini) installed before any source is copied, a non-root numeric user, nothing to compile and no
pip cache in the image, and what each image holds: the packages of its settings.ini extras, and no Jupyter,
papermill or matplotlib in the inference image."""
from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from importlib import metadata

import pytest
from packaging.requirements import Requirement

from _deploy_fixtures import (DOCKERFILES, ROOT, console_script, copy_args, dockerignored, exec_form, pinned,
                              settings_ini, stages)

KINDS = list(DOCKERFILES)
DIGEST = re.compile(r"^[a-z0-9./-]+:[\w.-]+@sha256:[0-9a-f]{64}$")
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
JUPYTER = {"jupyter", "jupyter-core", "jupyter-client", "jupyterlab", "notebook", "ipykernel", "ipython",
           "papermill", "nbconvert", "nbclient", "nbformat", "matplotlib", "matplotlib-inline"}
# The settings.ini keys each image installs: the base requirements, plus the `train` extra for training.
EXTRAS = {"infer": ["requirements"], "train": ["requirements", "train_requirements"]}

pytestmark = pytest.mark.deploy
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


def stage(kind: str, name: str):
    return next(s for s in stages(DOCKERFILES[kind]) if s.name == name)


def build_stage(kind: str): return stage(kind, "build")


def generator(kind: str) -> tuple[str, list[str]]:
    "The requirements stage's command that writes requirements.txt, and the settings.ini keys it reads."
    (run,) = stage(kind, "requirements").all("RUN")
    command, sep, target = run.value.rpartition(">")
    assert sep and target.strip() == "requirements.txt", run.value
    words = shlex.split(command)
    assert words[:2] == ["python", "-c"], words
    return run.value, words[3:]


def normalized(name: str) -> str: return re.sub(r"[-_.]+", "-", name).lower()


def requirement_names(keys: list[str]) -> set[str]:
    return {normalized(Requirement(r).name) for k in keys for r in settings_ini()[k].split()}


def reachable(names: set[str]) -> set[str]:
    "The installed distributions `names` depend on, transitively (optional extras left out), with them."
    seen, todo = set(), list(names)
    while todo:
        name = normalized(todo.pop())
        if name in seen: continue
        seen.add(name)
        try: dist = metadata.distribution(name)
        except metadata.PackageNotFoundError: continue
        for r in dist.requires or []:
            r = Requirement(r)
            if r.marker and not r.marker.evaluate({"extra": ""}): continue
            todo.append(r.name)
    return seen


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
    build, final = build_stage(kind), stages(DOCKERFILES[kind])[-1]
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
    build = build_stage(kind)
    installs = pip_installs(build)
    torch_i = next(i for i, args in enumerate(installs) if any(a.startswith("torch==") for a in args))
    args = [expand(a, build) for a in installs[torch_i]]
    assert args[args.index("--index-url") + 1] == CPU_INDEX
    assert f"torch=={pinned('requirements', 'torch')}" in args
    assert f"torchvision=={pinned('requirements', 'torchvision')}" in args
    package_i = next(i for i, args in enumerate(installs) if "." in args)
    assert torch_i < package_i, "torch must be installed from the CPU index before `pip install .`"
    # no later install may pull torch from another index
    assert all("--extra-index-url" not in a and "--index-url" not in a for a in installs[torch_i + 1:])


@pytest.mark.parametrize("kind", KINDS)
def test_no_compilers_and_no_pip_cache_in_the_image(kind):
    ss = stages(DOCKERFILES[kind])
    final = ss[-1]
    assert not pip_installs(final), "the final stage installs nothing: it copies the built venv"
    for s in ss:
        for run in s.all("RUN"):
            if "apt-get install" in run.value or "apt install" in run.value:
                assert not COMPILERS.search(run.value) or s is not final, run.value
    build = build_stage(kind)
    no_cache = build.env().get("PIP_NO_CACHE_DIR") in ("1", "true", "on")
    assert no_cache or all("--no-cache-dir" in args for args in pip_installs(build))


@pytest.mark.parametrize("kind", KINDS)
def test_dependencies_are_installed_before_the_sources_are_copied(kind):
    """Layer order: CPU torch, then every dependency (a file generated from settings.ini alone, in its own
    stage), then the sources, then the package without dependencies. Editing the code reuses the first
    layers; only the last two are rebuilt."""
    req = stage(kind, "requirements")
    copies = [copy_args(i) for i in req.all("COPY")]
    assert copies == [({}, ["settings.ini"], "./")], "the requirements stage sees settings.ini only"
    build = build_stage(kind)
    steps = []
    for i in build.instrs:
        if i.cmd == "COPY":
            flags, srcs, dest = copy_args(i)
            steps.append(("copy-requirements" if flags.get("from") == "requirements" else
                          "copy-venv" if flags.get("from") else "copy-sources", srcs))
        elif i.cmd == "RUN":
            for cmd in re.split(r"&&", i.value):
                words = shlex.split(cmd)
                if "install" not in words: continue
                args = words[words.index("install") + 1:]
                steps.append(("torch" if any(a.startswith("torch==") for a in args) else
                              "requirements" if "-r" in args else "package" if "." in args else "other", args))
    kinds = [k for k, _ in steps]
    assert kinds == ["torch", "copy-requirements", "requirements", "copy-sources", "copy-sources", "package"], steps
    (_, (src,)), (_, req_args) = steps[1], steps[2]
    assert src == "/req/requirements.txt" and req_args[req_args.index("-r") + 1] == "/tmp/requirements.txt"
    package_args = steps[-1][1]
    assert package_args == ["--no-deps", "."], package_args
    # `pip check` right after: the package's own metadata must be satisfied by what the list installed
    last = build.all("RUN")[-1].value
    assert "pip install --no-deps ." in last and last.rstrip().endswith("pip check")


def setup_arguments(monkeypatch) -> dict:
    "The keyword arguments setup.py passes to setuptools.setup (run here without building anything)."
    import runpy
    import setuptools
    captured = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kw: captured.update(kw))
    monkeypatch.chdir(ROOT)
    runpy.run_path(str(ROOT / "setup.py"))
    return captured


@pytest.mark.parametrize("kind", KINDS)
def test_requirements_file_is_the_extras_of_settings_ini(kind, tmp_path, monkeypatch):
    """The requirements stage's own command, run here on settings.ini, writes exactly the requirements of the
    image's extras: the base list for serving, plus `train_requirements` for training."""
    command, keys = generator(kind)
    assert keys == EXTRAS[kind]
    shutil.copy(ROOT / "settings.ini", tmp_path / "settings.ini")
    res = subprocess.run(["sh", "-c", command.replace("python -c", f"{shlex.quote(sys.executable)} -c", 1)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    written = (tmp_path / "requirements.txt").read_text().split()
    assert written == [r for k in keys for r in settings_ini()[k].split()]
    # the same lists setup.py makes the package's dependencies and its `train` extra (pip install .[train])
    setup = setup_arguments(monkeypatch)
    image = {"infer": setup["install_requires"], "train": setup["install_requires"] + setup["extras_require"]["train"]}
    assert written == image[kind]


def test_inference_image_holds_no_jupyter_and_no_plotting():
    "Nothing the inference image installs is, or depends on, Jupyter, papermill, nbconvert or matplotlib."
    installs = pip_installs(build_stage("infer"))
    assert all(not any("[" in a for a in args) for args in installs), "no extras in the inference image"
    named = {normalized(Requirement(a).name) for args in installs for a in args
             if not a.startswith("-") and a not in (".", "/tmp/requirements.txt") and not a.startswith("$")}
    assert not named & JUPYTER, named & JUPYTER
    _, keys = generator("infer")
    assert not requirement_names(keys) & JUPYTER
    tree = reachable(requirement_names(keys))
    assert {"torch", "fastapi", "gunicorn"} <= tree, "the base requirements are not installed here"
    assert not tree & JUPYTER, tree & JUPYTER
    assert not any("nbs/" in i.value for s in stages(DOCKERFILES["infer"]) for i in s.all("COPY"))


def test_training_image_holds_papermill_its_kernel_and_the_notebook():
    _, keys = generator("train")
    names = requirement_names(keys)
    assert {"papermill", "ipykernel", "nbconvert", "matplotlib"} <= names
    assert {"matplotlib-inline", "jupyter-client"} <= reachable(names)  # the kernel's figure backend
    final = stages(DOCKERFILES["train"])[-1]
    env = final.env()
    # ipykernel picks the inline backend (figures in the report) only when MPLBACKEND is unset
    assert "MPLBACKEND" not in env
    notebook = env["MNIST_K8S_TRAIN_NOTEBOOK"]
    copies = {dest: src for i in final.all("COPY") if not copy_args(i)[0].get("from")
              for (src,), dest in [copy_args(i)[1:]]}
    assert copies.get(notebook) == "nbs/train.ipynb"
    # the build checks, as the final user, that papermill will find the `python3` kernel
    user_at = final.instrs.index(final.all("USER")[-1])
    checks = [i for i in final.instrs[user_at:] if i.cmd == "RUN" and "find_kernel_specs" in i.value]
    assert checks and "'python3'" in checks[0].value


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
    copied = {src for i in build_stage(kind).all("COPY") for src in copy_args(i)[1]}
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
