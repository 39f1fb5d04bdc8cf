"""The Kubernetes manifests and skaffold.yaml, checked without a cluster: both kustomize overlays render,
every object validates strictly against the Kubernetes versions we support, checkov finds nothing, and
the manifests agree with the images, the settings, the CLI and the app they run."""
from __future__ import annotations

import json
import os
import subprocess

import pytest
import yaml

from _deploy_fixtures import (CHECKOV_VERSION, DOCKERFILES, OVERLAYS, ROOT, all_containers, checkov_executable,
                              console_script, container, downward_cpu, env_map, find, mount_of, pod_spec,
                              pod_template_labels, profile, quantity, rendered, rendered_text, settings_ini,
                              skaffold, stages, with_profile, deploy_hook, workloads)

pytestmark = pytest.mark.deploy

K8S_VERSIONS = ["1.30", "1.31", "1.32", "1.33"]
MOUNT = "/var/lib/mnist-k8s"   # where the shared volume is mounted in both images
RECOMMENDED = ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/part-of",
               "app.kubernetes.io/managed-by", "app.kubernetes.io/version")
# Volume types the "restricted" Pod Security Standard admits.
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}


def job(objs): return find(objs, "Job")
def deployment(objs): return find(objs, "Deployment")
def autoscaler(objs): return find(objs, "HorizontalPodAutoscaler")


# ---- rendering and schema validation ---------------------------------------------------------------
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_the_whole_application(overlay):
    kinds = sorted(o["kind"] for o in rendered(overlay))
    for kind in ["Namespace", "ServiceAccount", "PersistentVolumeClaim", "Job", "Deployment", "Service",
                 "PodDisruptionBudget", "NetworkPolicy", "HorizontalPodAutoscaler"]:
        assert kind in kinds, f"{overlay}: no {kind}"
    namespaced = [o for o in rendered(overlay) if o["kind"] not in ("Namespace", "PersistentVolume")]
    assert {o["metadata"].get("namespace") for o in namespaced} == {"mnist-k8s"}


def test_kubernetes_validate_knows_the_versions():
    from kubernetes_validate.utils import all_versions, major_minor
    known = {major_minor(v) for v in all_versions()}
    assert {major_minor(v) for v in K8S_VERSIONS} <= known, sorted(known)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_objects_validate_strictly(overlay, version):
    "Every object against the API schema of `version`, rejecting unknown fields (typos, misplaced keys)."
    import kubernetes_validate
    errors = []
    for obj in rendered(overlay):
        try: kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append(f"{obj['kind']}/{obj['metadata']['name']}: {e.message} at {list(e.path)}")
    assert not errors, "\n".join(errors)


# ---- checkov -------------------------------------------------------------------------------------------
def checkov_config() -> dict: return yaml.safe_load((ROOT / ".checkov.yaml").read_text())


def annotation_skips(overlay: str) -> dict[str, str]:
    "Checks skipped for one object with a `checkov.io/skip<n>: CHECK=reason` annotation, with the reasons."
    out = {}
    for o in rendered(overlay):
        for k, v in o["metadata"].get("annotations", {}).items():
            if k.startswith("checkov.io/skip"):
                check, _, reason = v.partition("=")
                out[check] = reason
    return out


def test_checkov_skips_are_deliberate():
    "Each skipped check carries its reason: on its line in .checkov.yaml, or in its annotation."
    skips = checkov_config()["skip-check"]
    lines = (ROOT / ".checkov.yaml").read_text().splitlines()
    for check in skips:
        line = next(l for l in lines if l.strip().startswith(f"- {check}"))
        reason = line.partition("#")[2].strip()
        assert len(reason.split()) >= 5, f"{check}: give the reason in a comment on its line"
    for overlay in OVERLAYS:
        for check, reason in annotation_skips(overlay).items():
            assert len(reason.split()) >= 5, f"{overlay}: {check} skipped without a reason"
    assert not annotation_skips("gke"), "the gke overlay is audited without per-object skips"


@pytest.mark.slow
def test_checkov_finds_nothing(tmp_path):
    "checkov's Kubernetes and Dockerfile policies on both rendered overlays and both Dockerfiles."
    files = []
    for overlay in OVERLAYS:
        (tmp_path / f"{overlay}.yaml").write_text(rendered_text(overlay))
        files += ["-f", str(tmp_path / f"{overlay}.yaml")]
    for path in DOCKERFILES.values(): files += ["-f", str(path)]
    res = subprocess.run([checkov_executable(), "--config-file", str(ROOT / ".checkov.yaml"), *files,
                          "--output", "json", "--quiet"],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path,
                         env={**os.environ, "BC_SKIP_MAPPING": "TRUE"})
    try: reports = json.loads(res.stdout)
    except json.JSONDecodeError: pytest.fail(f"checkov {CHECKOV_VERSION} gave no JSON:\n{res.stdout}\n{res.stderr}")
    reports = reports if isinstance(reports, list) else [reports]
    assert {r["check_type"] for r in reports} == {"kubernetes", "dockerfile"}, res.stdout[:2000]
    failed = [f"{r['check_type']}: {c['check_id']} {c['check_name']} ({c['resource']})"
              for r in reports for c in r["results"]["failed_checks"]]
    assert not failed, "\n".join(failed)
    for r in reports:
        assert r["summary"]["parsing_errors"] == 0 and r["summary"]["passed"] > 0, r["summary"]
        skipped = {c["check_id"] for c in r["results"].get("skipped_checks", [])}
        allowed = set(checkov_config()["skip-check"]).union(*(annotation_skips(o) for o in OVERLAYS))
        assert skipped <= allowed, skipped


def test_checkov_skips_cannot_hide_foreign_images():
    "The image checks are skipped because the images are Skaffold's artifacts: no other image may appear."
    artifacts = {a["image"] for a in skaffold()["build"]["artifacts"]}
    for overlay in OVERLAYS:
        for w in workloads(rendered(overlay)):
            for c in all_containers(pod_spec(w)):
                assert c["image"] in artifacts, f"{overlay}: {c['image']} is not built by Skaffold"


# ---- skaffold.yaml ------------------------------------------------------------------------------------
# The keys of the skaffold/v4beta14 schema for the parts of skaffold.yaml we use (a typo guard: Skaffold
# rejects unknown fields, and we cannot run Skaffold here).
SCHEMA_KEYS = {
    "config": {"apiVersion", "kind", "metadata", "requires", "build", "test", "manifests", "deploy",
               "portForward", "resourceSelector", "verify", "customActions", "profiles"},
    "build": {"artifacts", "insecureRegistries", "tagPolicy", "platforms", "local", "googleCloudBuild",
              "cluster", "hooks"},
    "artifact": {"image", "context", "sync", "requires", "hooks", "platforms", "runtimeType", "docker"},
    "docker": {"dockerfile", "target", "buildArgs", "network", "addHost", "cacheFrom", "cliFlags",
               "pullParent", "noCache", "squash", "secrets", "ssh"},
    "local": {"push", "tryImportMissing", "useDockerCLI", "useBuildkit", "concurrency"},
    "googleCloudBuild": {"projectId", "diskSizeGb", "machineType", "timeout", "logging", "logStreamingOption",
                         "dockerImage", "kanikoImage", "mavenImage", "gradleImage", "packImage", "koImage",
                         "bucket", "concurrency", "workerPool", "region", "platformEmulatorInstallStep",
                         "serviceAccount"},
    "manifests": {"rawYaml", "remoteManifests", "kustomize", "helm", "kpt", "hooks", "transform", "validate",
                  "output"},
    "kustomize": {"paths", "buildArgs"},
    "deploy": {"docker", "helm", "kpt", "kubectl", "cloudrun", "statusCheck", "statusCheckDeadlineSeconds",
               "tolerateFailuresUntilDeadline", "kubeContext", "logs"},
    "kubectl": {"flags", "remoteManifests", "defaultNamespace", "hooks"},
    "flags": {"global", "apply", "delete", "disableValidation"},
    "hooks": {"before", "after"},
    "hookItem": {"host", "container"},
    "host": {"command", "os", "dir"},
    "portForward": {"resourceType", "resourceName", "namespace", "port", "address", "localPort"},
    "profile": {"name", "activation", "requiresAllActivations", "patches", "build", "test", "manifests",
                "deploy", "portForward", "resourceSelector", "verify", "customActions"},
}


def _check_keys(d: dict, kind: str, where: str):
    unknown = set(d) - SCHEMA_KEYS[kind]
    assert not unknown, f"{where}: unknown skaffold fields {unknown}"


def _check_build(b: dict, where: str):
    _check_keys(b, "build", where)
    assert len({"local", "googleCloudBuild", "cluster"} & set(b)) <= 1, f"{where}: one build type only"
    for a in b.get("artifacts", []):
        _check_keys(a, "artifact", f"{where}.artifacts")
        _check_keys(a.get("docker", {}), "docker", f"{where}.artifacts.docker")
    for k in ("local", "googleCloudBuild"):
        if k in b: _check_keys(b[k], k, f"{where}.{k}")


def _check_manifests(m: dict, where: str):
    _check_keys(m, "manifests", where)
    _check_keys(m["kustomize"], "kustomize", f"{where}.kustomize")


def test_skaffold_config_uses_known_fields():
    cfg = skaffold()
    assert cfg["apiVersion"] == "skaffold/v4beta14" and cfg["kind"] == "Config"
    _check_keys(cfg, "config", "skaffold.yaml")
    _check_build(cfg["build"], "build")
    _check_manifests(cfg["manifests"], "manifests")
    _check_keys(cfg["deploy"], "deploy", "deploy")
    kubectl = cfg["deploy"]["kubectl"]
    _check_keys(kubectl, "kubectl", "deploy.kubectl")
    _check_keys(kubectl["flags"], "flags", "deploy.kubectl.flags")
    _check_keys(kubectl["hooks"], "hooks", "deploy.kubectl.hooks")
    for item in kubectl["hooks"]["after"]:
        _check_keys(item, "hookItem", "deploy.kubectl.hooks.after")
        _check_keys(item["host"], "host", "deploy.kubectl.hooks.after.host")
    for pf in cfg["portForward"]: _check_keys(pf, "portForward", "portForward")
    for p in cfg["profiles"]:
        _check_keys(p, "profile", f"profiles.{p['name']}")
        if "build" in p: _check_build(p["build"], f"profiles.{p['name']}.build")
        if "manifests" in p: _check_manifests(p["manifests"], f"profiles.{p['name']}.manifests")
        for pf in p.get("portForward", []): _check_keys(pf, "portForward", f"profiles.{p['name']}.portForward")


def test_skaffold_artifacts_match_the_manifests_and_dockerfiles():
    arts = {a["image"]: a for a in skaffold()["build"]["artifacts"]}
    assert set(arts) == {"mnist-k8s-train", "mnist-k8s-infer"}
    for name, art in arts.items():
        assert art.get("context", ".") == "."  # the Dockerfiles COPY paths relative to the repository root
        dockerfile = ROOT / art["docker"]["dockerfile"]
        assert dockerfile == DOCKERFILES[name.rsplit("-", 1)[1]] and dockerfile.is_file()
    for overlay in OVERLAYS:
        objs = rendered(overlay)
        assert container(job(objs))["image"] == "mnist-k8s-train"
        assert container(deployment(objs))["image"] == "mnist-k8s-infer"


def test_skaffold_profiles_pick_the_overlays():
    cfg = skaffold()
    assert cfg["manifests"]["kustomize"]["paths"] == ["k8s/overlays/local"]
    assert cfg["build"]["local"]["push"] is False  # local clusters use the local daemon's images
    gke = with_profile("gke")
    assert gke["manifests"]["kustomize"]["paths"] == ["k8s/overlays/gke"]
    assert gke["build"]["local"]["push"] is True   # to the registry given by --default-repo
    # the profile changes push alone: the local build's other settings stay
    assert {k: v for k, v in gke["build"]["local"].items() if k != "push"} == \
        {k: v for k, v in cfg["build"]["local"].items() if k != "push"}
    assert "googleCloudBuild" in profile("cloudbuild")["build"]
    for p in [cfg["manifests"], gke["manifests"]]:
        for path in p["kustomize"]["paths"]: assert (ROOT / path / "kustomization.yaml").is_file()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_port_forward_targets_the_service(overlay):
    forwards = (skaffold() if overlay == "local" else profile(overlay))["portForward"]
    assert len(forwards) == 1
    pf = forwards[0]
    svc = find(rendered(overlay), "Service", pf["resourceName"])
    assert pf["resourceType"].lower() == "service" and pf["namespace"] == svc["metadata"]["namespace"]
    assert pf["port"] in [p["port"] for p in svc["spec"]["ports"]]
    assert pf["localPort"] == 8000


def test_redeploys_replace_the_job():
    "A Job's template is immutable: `kubectl apply --force` re-creates it when a deploy changes it."
    assert "--force" in skaffold()["deploy"]["kubectl"]["flags"]["apply"]


def test_deploy_hooks_name_the_rendered_objects():
    "`python3 -m mnist_k8s.kube wait` waits for the Job and Deployment the overlay renders, in its namespace."
    assert skaffold()["deploy"]["statusCheck"] is False  # the hook checks Job then Deployment, in order
    for overlay, cfg in [("local", skaffold()), ("gke", with_profile("gke"))]:
        hook = deploy_hook("after", cfg)
        assert hook.module == "mnist_k8s.kube" and (ROOT / "mnist_k8s" / "kube.py").is_file()
        assert hook.args[0] == "wait"
        opts: dict[str, list[str]] = {}
        for flag, value in zip(hook.args[1::2], hook.args[2::2]): opts.setdefault(flag, []).append(value)
        objs = rendered(overlay)
        j = job(objs)
        assert (opts["--namespace"], opts["--job"]) == ([j["metadata"]["namespace"]], [j["metadata"]["name"]])
        assert opts["--deployment"] == [deployment(objs)["metadata"]["name"]]
        # the hook must not give up while the Job may still run
        assert "--timeout" not in opts or float(opts["--timeout"][0]) >= j["spec"]["activeDeadlineSeconds"]
        before = deploy_hook("before", cfg)
        assert before.module == "mnist_k8s.kube" and before.args[:3] == ["preflight", "--manifests",
                                                                          cfg["manifests"]["kustomize"]["paths"][0]]


# ---- security --------------------------------------------------------------------------------------------
VOLUME_PERMISSIONS = "volume-permissions"   # the local overlay's root init container (see its kustomization)


def test_namespace_enforces_the_pod_security_standards():
    "gke enforces restricted; local enforces baseline (for the chown init container) and warns on restricted."
    for overlay, enforce in [("gke", "restricted"), ("local", "baseline")]:
        labels = find(rendered(overlay), "Namespace")["metadata"]["labels"]
        assert labels["pod-security.kubernetes.io/enforce"] == enforce
        assert labels["pod-security.kubernetes.io/warn"] == labels["pod-security.kubernetes.io/audit"] == "restricted"


def app_containers(overlay: str, w: dict) -> list[dict]:
    "Every container except the local overlay's volume-permissions init container."
    cs = all_containers(pod_spec(w))
    return [c for c in cs if not (overlay == "local" and c["name"] == VOLUME_PERMISSIONS)]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_pass_the_restricted_pod_security_standard(overlay):
    for w in workloads(rendered(overlay)):
        name, spec = w["metadata"]["name"], pod_spec(w)
        psc = spec.get("securityContext", {})
        assert not any(spec.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")), name
        assert spec.get("hostUsers", True) is True, name
        assert spec.get("automountServiceAccountToken") is False, name
        assert spec.get("serviceAccountName") == "mnist-k8s", name
        assert psc.get("runAsNonRoot") is True and psc.get("seccompProfile", {}).get("type") == "RuntimeDefault"
        for v in spec.get("volumes", []):
            assert set(v) - {"name"} <= RESTRICTED_VOLUMES, f"{name}: volume {v}"
        for c in app_containers(overlay, w):
            sc = c.get("securityContext", {})
            where = f"{name}/{c['name']}"
            assert sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True, where
            assert sc.get("runAsUser", psc.get("runAsUser", 1)) != 0, where
            assert sc.get("allowPrivilegeEscalation") is False, where
            assert not sc.get("privileged"), where
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
            assert set(sc.get("capabilities", {}).get("add", [])) <= {"NET_BIND_SERVICE"}, where
            seccomp = sc.get("seccompProfile", psc.get("seccompProfile", {})).get("type")
            assert seccomp in ("RuntimeDefault", "Localhost"), where
            assert sc.get("readOnlyRootFilesystem") is True, where
            assert not any(p.get("hostPort") for p in c.get("ports", [])), where


def test_only_the_local_job_has_the_chown_init_container():
    "It can chown the volume's top folder to the pods' user and nothing else, within the baseline standard."
    assert all(len(app_containers("gke", w)) == len(all_containers(pod_spec(w))) for w in workloads(rendered("gke")))
    objs = rendered("local")
    assert all("initContainers" not in pod_spec(w) for w in workloads(objs) if w["kind"] != "Job")
    j = job(objs)
    (init,) = pod_spec(j)["initContainers"]
    assert init["name"] == VOLUME_PERMISSIONS and init["image"] == container(j)["image"]
    psc, sc = pod_spec(j)["securityContext"], init["securityContext"]
    _, mount = mount_of(j, init, "persistentVolumeClaim")
    assert init["command"] == ["chown", f"{psc['runAsUser']}:{psc['runAsGroup']}", mount["mountPath"]]
    assert mount["mountPath"] == MOUNT and not init.get("args")
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN"]}
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["seccompProfile"]["type"] == "RuntimeDefault" and not sc.get("privileged")
    assert len(init["volumeMounts"]) == 1  # sees the volume only


def test_pods_run_as_the_images_user():
    "The UID in the manifests is the numeric USER of both images, so files on the volume match."
    users = {stages(p)[-1].all("USER")[-1].value for p in DOCKERFILES.values()}
    assert len(users) == 1
    uid, gid = users.pop().split(":")
    for overlay in OVERLAYS:
        for w in workloads(rendered(overlay)):
            psc = pod_spec(w)["securityContext"]
            assert (psc["runAsUser"], psc["runAsGroup"], psc["fsGroup"]) == (int(uid), int(gid), int(gid))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_has_requests_and_limits(overlay):
    for w in workloads(rendered(overlay)):
        for c in all_containers(pod_spec(w)):
            r = c.get("resources", {})
            for res in ("cpu", "memory"):
                req, lim = r.get("requests", {}).get(res), r.get("limits", {}).get(res)
                assert req and lim, f"{c['name']}: {res} needs a request and a limit"
                assert quantity(req) <= quantity(lim), f"{c['name']}: {res} request above limit"


# ---- agreement with the settings, CLI and app ------------------------------------------------------------
def settings_fields() -> set[str]:
    from mnist_k8s.config import Settings
    return {f"MNIST_K8S_{name.upper()}" for name in Settings.model_fields}


def env_values(c: dict) -> dict[str, str]:
    "A container's environment as the kubelet would set it (downward-API CPU limits resolved)."
    out = {}
    for e in c.get("env", []):
        ref = e.get("valueFrom", {}).get("resourceFieldRef")
        if ref:
            assert ref["resource"] == "limits.cpu", ref
            out[e["name"]] = str(downward_cpu(c["resources"]["limits"]["cpu"], ref.get("divisor", "1")))
        else: out[e["name"]] = e["value"]
    return out


def test_env_names_are_settings_fields_and_values_parse(monkeypatch):
    "Every MNIST_K8S_* variable in the manifests and Dockerfiles is a Settings field with a valid value."
    from mnist_k8s.config import Settings
    fields = settings_fields()
    groups = {f"docker/{k}": stages(p)[-1].env() for k, p in DOCKERFILES.items()}
    for overlay in OVERLAYS:
        for w in workloads(rendered(overlay)):
            for c in all_containers(pod_spec(w)):
                groups[f"{overlay}/{w['metadata']['name']}/{c['name']}"] = env_values(c)
    checked = 0
    for where, env in groups.items():
        ours = {k: v for k, v in env.items() if k.startswith("MNIST_K8S_")}
        if not ours: continue
        checked += 1
        assert set(ours) <= fields, f"{where}: not settings: {set(ours) - fields}"
        for k in list(os.environ):
            if k.startswith("MNIST_K8S_"): monkeypatch.delenv(k)
        for k, v in ours.items(): monkeypatch.setenv(k, v)
        Settings(_env_file=None)  # raises if a value does not parse
    assert checked == 2 + 2 * len(OVERLAYS)  # both images, and the Job and Deployment of each overlay


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_job_and_deployment_share_the_volume_where_the_settings_expect_it(overlay):
    objs = rendered(overlay)
    (jvol, jmount), (dvol, dmount) = [mount_of(w, container(w), "persistentVolumeClaim")
                                      for w in (job(objs), deployment(objs))]
    claim = jvol["persistentVolumeClaim"]["claimName"]
    assert dvol["persistentVolumeClaim"]["claimName"] == claim
    find(objs, "PersistentVolumeClaim", claim)
    assert jmount["mountPath"] == dmount["mountPath"] == MOUNT
    assert not jmount.get("readOnly") and dmount.get("readOnly") is True  # only training writes
    jenv, denv = env_map(container(job(objs))), env_map(container(deployment(objs)))
    model_dir = jenv["MNIST_K8S_MODEL_DIR"]["value"]
    assert model_dir.startswith(MOUNT + "/") and denv["MNIST_K8S_MODEL_DIR"]["value"] == model_dir
    assert jenv["MNIST_K8S_DATA_ROOT"]["value"].startswith(MOUNT + "/")
    # the images' defaults point at the same places, for `docker run -v ...:/var/lib/mnist-k8s`
    assert stages(DOCKERFILES["train"])[-1].env()["MNIST_K8S_MODEL_DIR"] == model_dir
    assert stages(DOCKERFILES["infer"])[-1].env()["MNIST_K8S_MODEL_DIR"] == model_dir


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_writable_paths_are_volumes(overlay):
    "With a read-only root filesystem, every path a container writes to must be a mounted volume."
    for w in workloads(rendered(overlay)):
        c = container(w)
        mounts = {m["mountPath"] for m in c["volumeMounts"]}
        assert "/tmp" in mounts
        env = {k: e.get("value", "") for k, e in env_map(c).items()}
        for k in ("HOME", "MPLCONFIGDIR", "MNIST_K8S_MODEL_DIR", "MNIST_K8S_DATA_ROOT"):
            if k in env:
                assert any(env[k] == m or env[k].startswith(m + "/") for m in mounts), f"{k}={env[k]}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_shared_memory_volume(overlay):
    "Training makes its batches in its own process (no DataLoader workers): nothing needs a /dev/shm volume."
    for w in workloads(rendered(overlay)):
        for c in all_containers(pod_spec(w)):
            assert all(m["mountPath"] != "/dev/shm" for m in c.get("volumeMounts", [])), w["metadata"]["name"]
        assert not [v for v in pod_spec(w).get("volumes", []) if v.get("emptyDir", {}).get("medium") == "Memory"]
    code = [p.read_text() for p in (ROOT / "mnist_k8s").glob("*.py")] + [(ROOT / "nbs" / "train.ipynb").read_text()]
    assert not [t for t in code if "DataLoader" in t or "num_workers" in t], "worker processes need /dev/shm"


def test_commands_are_cli_subcommands():
    from mnist_k8s.cli import build_parser
    for overlay in OVERLAYS:
        objs = rendered(overlay)
        for w, expected in [(job(objs), "train"), (deployment(objs), "serve")]:
            c = container(w)
            argv = [*c["command"], *c.get("args", [])]
            assert argv[0] == console_script()
            assert build_parser().parse_args(argv[1:]).command == expected


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ports_and_probes_match_the_app(overlay):
    objs = rendered(overlay)
    d = deployment(objs)
    c = container(d)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    env = env_map(c)
    assert ports["http"] == int(env["MNIST_K8S_PORT"]["value"])
    assert env["MNIST_K8S_HOST"]["value"] == "0.0.0.0"
    probes = {k: c[k]["httpGet"] for k in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert {k: p["path"] for k, p in probes.items()} == {
        "startupProbe": "/healthz", "readinessProbe": "/readyz", "livenessProbe": "/healthz"}
    assert all(p["port"] == "http" for p in probes.values())
    # generous startup, quick readiness
    assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= 60
    svc = find(objs, "Service")
    assert [p["targetPort"] for p in svc["spec"]["ports"]] == ["http"]
    # that the server answers these paths on this port is what tests/test_contract.py checks, live


def test_threads_follow_the_cpu_limit_and_a_pod_runs_one_server_process():
    """The training Job's MNIST_K8S_TORCH_THREADS is the container's own CPU limit, rounded up by the downward
    API; the server runs one process per pod (MNIST_K8S_WORKERS=1): the autoscaler scales by pods."""
    from mnist_k8s.config import Settings
    for overlay in OVERLAYS:
        objs = rendered(overlay)
        c = container(job(objs))
        ref = env_map(c)["MNIST_K8S_TORCH_THREADS"]["valueFrom"]["resourceFieldRef"]
        assert (ref["containerName"], ref["resource"], str(ref["divisor"])) == (c["name"], "limits.cpu", "1")
        n = downward_cpu(c["resources"]["limits"]["cpu"], ref["divisor"])
        assert n >= 1 and Settings(_env_file=None, torch_threads=n).torch_threads == n
        workers = env_map(container(deployment(objs)))["MNIST_K8S_WORKERS"]
        assert workers == {"name": "MNIST_K8S_WORKERS", "value": "1"}, workers
        assert Settings(_env_file=None, workers=int(workers["value"])).workers == 1
    assert downward_cpu("500m") == 1 and downward_cpu("1500m") == 2 and downward_cpu("2") == 2


# ---- availability -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_serving_stays_available(overlay):
    objs = rendered(overlay)
    d = deployment(objs)
    spec, c = d["spec"], container(d)
    assert autoscaler(objs)["spec"]["minReplicas"] >= 2
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pod_labels = pod_template_labels(d)
    selector = spec["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()
    pdb = find(objs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == selector
    svc = find(objs, "Service")
    assert svc["spec"]["selector"] == selector
    (spread,) = pod_spec(d)["topologySpreadConstraints"]
    assert spread["topologyKey"] == "kubernetes.io/hostname"
    assert spread["whenUnsatisfiable"] == "ScheduleAnyway"  # a one-node cluster still runs every replica
    assert spread["labelSelector"]["matchLabels"] == selector
    http = next(p for p in find(objs, "NetworkPolicy", "mnist-k8s-infer-http")["spec"]["ingress"][0]["ports"])
    assert http["port"] == "http"
    # shutdown: leave the endpoints (preStop), drain (graceful timeout), all within the grace period
    pause = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    drain = float(env_map(c)["MNIST_K8S_GRACEFUL_TIMEOUT"]["value"])
    assert pod_spec(d)["terminationGracePeriodSeconds"] > pause + drain


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_training_job_retries_and_resumes(overlay):
    j = job(rendered(overlay))
    spec = j["spec"]
    assert 1 <= spec["backoffLimit"] <= 6 and spec["activeDeadlineSeconds"] > 0
    assert pod_spec(j)["restartPolicy"] == "Never"  # a failed pod is replaced; the checkpoints are on the volume
    rules = spec["podFailurePolicy"]["rules"]
    assert any(r["action"] == "Ignore" and r["onPodConditions"][0]["type"] == "DisruptionTarget" for r in rules)
    assert "ttlSecondsAfterFinished" not in spec  # keep the finished Job (and its log) for inspection


def test_objects_carry_the_recommended_labels():
    version = settings_ini()["version"]
    for overlay in OVERLAYS:
        for o in rendered(overlay):
            labels = o["metadata"].get("labels", {})
            where = f"{overlay}: {o['kind']}/{o['metadata']['name']}"
            assert all(k in labels for k in RECOMMENDED), f"{where}: {labels}"
            assert labels["app.kubernetes.io/version"] == version, f"{where}: version is not settings.ini's"
            assert labels["app.kubernetes.io/part-of"] == "mnist-k8s"
        for w in workloads(rendered(overlay)):
            tl = pod_template_labels(w)
            assert tl["app.kubernetes.io/component"] == w["metadata"]["labels"]["app.kubernetes.io/component"]


# ---- scale-out ----------------------------------------------------------------------------------------------
CAPACITY = "capacity.mnist-k8s.io/"   # the HPA's annotations: the measured capacity it is derived from


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_autoscaler_agrees_with_the_deployment_and_the_disruption_budget(overlay):
    objs = rendered(overlay)
    d, hpa, pdb = deployment(objs), autoscaler(objs), find(objs, "PodDisruptionBudget")
    c = container(d)
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["apiVersion"], ref["kind"], ref["name"]) == ("apps/v1", "Deployment", d["metadata"]["name"])
    assert hpa["metadata"]["namespace"] == d["metadata"]["namespace"]
    # the autoscaler owns the replica count: a `replicas` here would reset it on every `kubectl apply`
    assert "replicas" not in d["spec"]
    low, high = hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]
    assert 2 <= low < high
    # disruptions take one pod at a time, whatever the count: at the minimum one pod keeps serving
    assert "minAvailable" not in pdb["spec"] and pdb["spec"]["maxUnavailable"] == 1 < low
    # rolling updates: never fewer ready pods than the autoscaler asked for, one extra pod at a time
    rolling = d["spec"]["strategy"]["rollingUpdate"]
    assert rolling["maxUnavailable"] == 0 and rolling["maxSurge"] == 1
    # one server process per pod, so that a pod is the unit the capacity figures describe
    assert env_map(c)["MNIST_K8S_WORKERS"]["value"] == "1"
    # the metric: the server container's own CPU, as an amount (the local overlay lowers the request, and
    # a Utilization target would be a share of that request; on GKE the pod also holds the gcsfuse sidecar)
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "ContainerResource"
    target = metric["containerResource"]
    assert target["name"] == "cpu" and target["container"] == c["name"]
    assert target["target"]["type"] == "AverageValue" and set(target["target"]) == {"type", "averageValue"}
    limit, request = (quantity(c["resources"][k]["cpu"]) for k in ("limits", "requests"))
    assert 0 < quantity(target["target"]["averageValue"]) < limit
    if overlay != "local":  # a real cluster reserves the CPU the capacity was measured with, and the
        assert request == limit  # autoscaler adds pods before they use all of it
        assert quantity(target["target"]["averageValue"]) < request
    assert hpa == autoscaler(rendered("local")) or overlay == "local"  # the same autoscaler everywhere


def test_autoscaler_follows_the_measured_capacity():
    """maxReplicas and the CPU target are computed from the capacity recorded in the annotations, the way
    bench/capacity.py computes them, for pods of the size the Deployment has."""
    import math
    objs = rendered("gke")
    hpa, c = autoscaler(objs), container(deployment(objs))
    a = {k[len(CAPACITY):]: v for k, v in hpa["metadata"]["annotations"].items() if k.startswith(CAPACITY)}
    assert set(a) == {"requests-per-second-per-pod", "cpu-per-pod-at-capacity", "headroom",
                      "peak-requests-per-second"}, a
    rps, cpu, headroom, peak = (float(a["requests-per-second-per-pod"]), quantity(a["cpu-per-pod-at-capacity"]),
                                float(a["headroom"]), float(a["peak-requests-per-second"]))
    assert rps > 0 and 0 < headroom < 1 and peak > 0
    assert 0 < cpu <= quantity(c["resources"]["limits"]["cpu"])  # measured on a pod of this size
    target = hpa["spec"]["metrics"][0]["containerResource"]["target"]["averageValue"]
    assert round(quantity(target) * 1000) == int(round(headroom * cpu * 1000, 6)) // 10 * 10, target
    assert hpa["spec"]["maxReplicas"] == max(2, math.ceil(peak / (headroom * rps)))


# ---- the overlays' differences ----------------------------------------------------------------------------
def test_local_overlay_suits_a_one_node_cluster():
    objs = rendered("local")
    pvc = find(objs, "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"] and "storageClassName" not in pvc["spec"]
    assert find(objs, "Service")["spec"]["type"] == "ClusterIP"
    replicas = {"Job": 1, "Deployment": autoscaler(objs)["spec"]["minReplicas"]}
    requests = sum(quantity(container(w)["resources"]["requests"]["cpu"]) * replicas[w["kind"]]
                   for w in workloads(objs))
    assert requests <= 1.0  # training and the minimum of serving replicas fit a laptop cluster with ~2 CPUs


def test_gke_overlay_shares_a_bucket_across_nodes():
    objs = rendered("gke")
    pvc = find(objs, "PersistentVolumeClaim")
    pv = find(objs, "PersistentVolume")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]  # pods on several nodes: no Multi-Attach error
    assert pvc["spec"]["volumeName"] == pv["metadata"]["name"]
    assert pvc["spec"]["storageClassName"] == pv["spec"]["storageClassName"] != ""
    assert pv["spec"]["claimRef"] == {"namespace": pvc["metadata"]["namespace"], "name": pvc["metadata"]["name"]}
    assert quantity(pvc["spec"]["resources"]["requests"]["storage"]) <= quantity(pv["spec"]["capacity"]["storage"])
    assert pv["spec"]["csi"]["driver"] == "gcsfuse.csi.storage.gke.io"
    assert pv["spec"]["persistentVolumeReclaimPolicy"] == "Retain"  # deleting the claim keeps the models
    opts = dict(o.split("=", 1) for o in pv["spec"]["mountOptions"] if "=" in o)
    for w in workloads(objs):
        psc = pod_spec(w)["securityContext"]
        assert (int(opts["uid"]), int(opts["gid"])) == (psc["runAsUser"], psc["runAsGroup"])
        assert w["spec"]["template"]["metadata"]["annotations"]["gke-gcsfuse/volumes"] == "true"
    svc = find(objs, "Service")
    assert svc["spec"]["type"] == "LoadBalancer"
