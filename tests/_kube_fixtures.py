"""Helpers for the deploy-hook tests (test_kube, test_redeploy, test_gke): a fake `kubectl` executable that
replays a cluster's states, API objects shaped as the API server returns them (built from the rendered
manifests), and skaffold.yaml with its profiles applied the way Skaffold applies them."""
from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import yaml

from _deploy_fixtures import ROOT, find, kubectl, pod_spec, profile, rendered, skaffold

NS = "mnist-k8s"
T0 = "2026-11-29T08:00:00Z"


def ts(seconds: float, micro: bool = False) -> str:
    "A timestamp `seconds` after T0, as the API server writes it (eventTime has microseconds)."
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    base = f"2026-11-29T{8 + h:02d}:{m:02d}:{s:02d}"
    return base + (".000000Z" if micro else "Z")


# ---- the fake kubectl ----------------------------------------------------------------------------------
# A real executable placed first on PATH. Its scenario file holds `frames` (the cluster's state at each
# look: a look starts with `get job`; the last frame repeats), `refuse` (stderr + exit code for every
# call), and `live` (the state the preflight's dry run and patch see). It records every call.
FAKE_KUBECTL = textwrap.dedent('''\
    import json, os, subprocess, sys
    args = sys.argv[1:]
    scenario_path, log_path = os.environ["FAKE_KUBE_SCENARIO"], os.environ["FAKE_KUBE_LOG"]
    with open(log_path, "a") as f: f.write(json.dumps(args) + "\\n")
    sc = json.load(open(scenario_path))
    opts, rest, i = {}, [], 0
    while i < len(args):
        if args[i] in ("--context", "--namespace"): opts[args[i]] = args[i + 1]; i += 2
        else: rest.append(args[i]); i += 1
    def done(out="", err="", rc=0):
        sys.stdout.write(out); sys.stderr.write(err); sys.exit(rc)
    if "refuse" in sc: done(err=sc["refuse"]["stderr"], rc=sc["refuse"].get("rc", 1))
    if opts.get("--context") and opts["--context"] not in sc.get("contexts", [opts["--context"]]):
        done(err='error: context "%s" does not exist\\n' % opts["--context"], rc=1)
    ns = opts.get("--namespace", "default")
    def stripped(a):
        out, i = [], 0
        while i < len(a):
            if a[i] in ("--context", "--namespace"): i += 2
            else: out.append(a[i]); i += 1
        return out
    looks = sum(1 for l in open(log_path) if stripped(json.loads(l))[:2] == ["get", "job"])
    frames = sc.get("frames") or [{}]
    frame = frames[max(0, min(looks, len(frames)) - 1)]
    if "fail" in frame: done(err=frame["fail"], rc=1)
    RES = {"job": ("jobs.batch", "job"), "deployment": ("deployments.apps", "deployments"),
           "pvc": ("persistentvolumeclaims", "pvcs"), "persistentvolumeclaim": ("persistentvolumeclaims", "pvcs"),
           "pv": ("persistentvolumes", "pvs"), "persistentvolume": ("persistentvolumes", "pvs"),
           "namespace": ("namespaces", "namespaces")}
    def lst(items): return json.dumps({"apiVersion": "v1", "kind": "List", "items": items, "metadata": {"resourceVersion": ""}})
    if rest[:1] == ["get"]:
        kind = rest[1]
        if kind in ("pods", "events"): done(lst([o for o in frame.get(kind, []) if o["metadata"].get("namespace", ns) == ns]))
        res, key = RES[kind]
        src = sc["live"] if "live" in sc else frame   # the preflight's scenarios describe one live state
        obj = (src.get("job") if kind == "job" else (src.get(key) or {}).get(rest[2]))
        if kind == "job" and obj is not None and obj["metadata"]["name"] != rest[2]: obj = None
        if obj is None: done(err='Error from server (NotFound): %s "%s" not found\\n' % (res, rest[2]), rc=1)
        done(json.dumps(obj))
    if rest[:1] == ["logs"]:
        pod, container = rest[1].split("/", 1)[1], rest[rest.index("-c") + 1]
        text = frame.get("logs", {}).get(pod, {}).get(container)
        if text is None: done(err='Error from server (BadRequest): container "%s" in pod "%s" is waiting to start\\n' % (container, pod), rc=1)
        done(text)
    if rest[:1] == ["patch"]:
        live = sc.setdefault("live", {}); name = rest[2]
        pv = (live.get("pvs") or {}).get(name)
        if pv is None: done(err='Error from server (NotFound): persistentvolumes "%s" not found\\n' % name, rc=1)
        for k, v in json.loads(rest[rest.index("-p") + 1])["spec"]["claimRef"].items():
            if v is None: pv["spec"]["claimRef"].pop(k, None)
        pv["status"]["phase"] = "Available"
        json.dump(sc, open(scenario_path, "w")); done("persistentvolume/%s patched\\n" % name)
    if rest[:2] == ["apply", "--dry-run=server"]:
        import yaml
        d = rest[rest.index("-k") + 1]; key, _, value = rest[rest.index("-l") + 1].partition("=")
        res = subprocess.run([os.environ["FAKE_KUBE_REAL"], "kustomize", d], capture_output=True, text=True, check=True)
        objs = [o for o in yaml.safe_load_all(res.stdout) if o and o["metadata"].get("labels", {}).get(key) == value]
        live, out, errs = sc.get("live", {}), [], []
        for o in objs:
            kind, name = o["kind"], o["metadata"]["name"]
            onns = o["metadata"].get("namespace")
            if kind == "PersistentVolume" and name in live.get("pvs", {}) and live["pvs"][name]["spec"]["csi"] != o["spec"]["csi"]:
                errs.append('Error from server (Invalid): error when applying patch:\\n{"spec":{"csi":%s}}\\nto:\\n'
                            'Resource: "/v1, Resource=persistentvolumes", GroupVersionKind: "/v1, Kind=PersistentVolume"\\n'
                            'Name: "%s", Namespace: ""\\nfor: "%s": error when patching "%s": PersistentVolume "%s" is invalid: '
                            'spec.persistentvolumesource: Forbidden: spec.persistentvolumesource is immutable after creation'
                            % (json.dumps(o["spec"]["csi"]), name, d, d, name)); continue
            if kind == "PersistentVolumeClaim":
                cur = live.get("pvcs", {}).get(name)
                nsobj = live.get("namespaces", {}).get(onns)
                if nsobj is None:
                    errs.append('Error from server (NotFound): error when creating "%s": namespaces "%s" not found' % (d, onns)); continue
                if cur is None and nsobj["status"]["phase"] == "Terminating":
                    errs.append('Error from server (Forbidden): error when creating "%s": persistentvolumeclaims "%s" is forbidden: '
                                'unable to create new content in namespace %s because it is being terminated' % (d, name, onns)); continue
                if cur is not None and any(cur["spec"].get(f) != o["spec"].get(f) for f in ("accessModes", "storageClassName", "volumeName")
                                           if f in o["spec"]):
                    errs.append('Error from server (Invalid): error when applying patch:\\n{}\\nto:\\nResource: '
                                '"/v1, Resource=persistentvolumeclaims", GroupVersionKind: "/v1, Kind=PersistentVolumeClaim"\\n'
                                'Name: "%s", Namespace: "%s"\\nfor: "%s": error when patching "%s": PersistentVolumeClaim "%s" is '
                                'invalid: spec: Forbidden: spec is immutable after creation except resources.requests and '
                                'volumeAttributesClassName for bound claims' % (name, onns, d, d, name)); continue
            out.append(o)
        text = "" if not out else json.dumps(out[0] if len(out) == 1 else {"apiVersion": "v1", "kind": "List", "items": out})
        done(text, "".join(e + "\\n" for e in errs), 1 if errs else 0)
    done(err="fake kubectl: unexpected call %r\\n" % (args,), rc=2)
    ''')


class FakeKubectl:
    "The fake kubectl in `tmp/bin`, its scenario and its call log."
    def __init__(self, tmp: Path, scenario: dict):
        self.bin, self.scenario_path, self.log = tmp / "bin", tmp / "scenario.json", tmp / "calls.log"
        self.bin.mkdir(exist_ok=True)
        exe = self.bin / "kubectl"
        exe.write_text(f"#!{sys.executable}\n" + FAKE_KUBECTL)
        exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
        self.scenario_path.write_text(json.dumps(scenario))
        self.real = os.environ.get("FAKE_KUBE_REAL") or kubectl()   # not an earlier fake already on PATH

    def run(self, argv, **kw) -> subprocess.CompletedProcess:
        "The same fake, executed in this process: a `subprocess.run` stand-in, far quicker than a process a call."
        out, err, code, saved = io.StringIO(), io.StringIO(), 0, sys.argv
        sys.argv = [str(self.bin / "kubectl"), *argv[1:]]
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                exec(compile(FAKE_KUBECTL, str(self.bin / "kubectl"), "exec"), {"__name__": "__main__"})
        except SystemExit as e: code = e.code or 0
        finally: sys.argv = saved
        return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())

    def env(self, **extra) -> dict:
        return {"PATH": f"{self.bin}:{os.environ['PATH']}", "FAKE_KUBE_SCENARIO": str(self.scenario_path),
                "FAKE_KUBE_LOG": str(self.log), "FAKE_KUBE_REAL": self.real, **extra}

    def calls(self) -> list[list[str]]:
        return [json.loads(l) for l in self.log.read_text().splitlines()] if self.log.exists() else []

    def scenario(self) -> dict: return json.loads(self.scenario_path.read_text())


class FakeClock:
    "Time that moves only when the code under test sleeps."
    def __init__(self): self.now = 0.0
    def clock(self) -> float: return self.now
    def sleep(self, s: float): self.now += s


# ---- API objects, shaped as `kubectl get -o json` prints them -----------------------------------------------
def job_obj(overlay: str = "local", *conditions: str, reason: str = "BackoffLimitExceeded",
            message: str = "Job has reached the specified backoff limit") -> dict:
    "The rendered Job as the API server returns it: uid, the controller-uid selector and labels, status."
    j = copy.deepcopy(find(rendered(overlay), "Job"))
    uid = "5f0c3a52-6a1e-4a57-9a35-0d4c1b7e2c11"
    j["metadata"].update(uid=uid, generation=1, creationTimestamp=T0, resourceVersion="1234")
    sel = {"batch.kubernetes.io/controller-uid": uid}
    j["spec"]["selector"] = {"matchLabels": sel}
    j["spec"]["template"]["metadata"]["labels"].update(sel, **{"batch.kubernetes.io/job-name": j["metadata"]["name"],
                                                             "controller-uid": uid, "job-name": j["metadata"]["name"]})
    conds = [{"type": t, "status": "True", "reason": reason if t in ("Failed", "FailureTarget") else "CompletionsReached",
              "message": message if t in ("Failed", "FailureTarget") else "Reached expected number of succeeded pods",
              "lastProbeTime": ts(600), "lastTransitionTime": ts(600)} for t in conditions]
    j["status"] = {"startTime": T0, "active": 0 if conditions else 1, "ready": 0, "terminating": 0,
                   "uncountedTerminatedPods": {}, **({"conditions": conds} if conds else {})}
    return j


def deployment_obj(overlay: str = "local", ready: int = 0) -> dict:
    d = copy.deepcopy(find(rendered(overlay), "Deployment"))
    d["metadata"].update(uid="9a4e7f1d-2b8c-4d3e-8f6a-1c2b3d4e5f60", generation=1, creationTimestamp=T0)
    n = d["spec"].setdefault("replicas", 2)   # set by the API server (default 1), then by the autoscaler
    d["status"] = {"observedGeneration": 1, "replicas": n, "updatedReplicas": n, "readyReplicas": ready,
                   "availableReplicas": ready, "unavailableReplicas": n - ready,
                   "conditions": [{"type": "Available", "status": "True" if ready >= n else "False",
                                   "reason": "MinimumReplicasAvailable" if ready >= n else "MinimumReplicasUnavailable"},
                                  {"type": "Progressing", "status": "True", "reason": "ReplicaSetUpdated"}]}
    return d


def running(name: str, image: str) -> dict:
    return {"name": name, "image": image, "imageID": f"docker.io/library/{image}@sha256:" + "0" * 64, "ready": True,
            "restartCount": 0, "started": True, "state": {"running": {"startedAt": ts(30)}}}


def waiting(name: str, image: str, reason: str, message: str = "") -> dict:
    w = {"reason": reason, **({"message": message} if message else {})}
    return {"name": name, "image": image, "imageID": "", "ready": False, "restartCount": 0, "started": False,
            "state": {"waiting": w}}


def pod_obj(owner: dict, name: str, created: float = 0, phase: str = "Pending", node: str | None = "kind-control-plane",
            containers: list[dict] | None = None, init: list[dict] | None = None, conditions: list[dict] | None = None) -> dict:
    "A pod of `owner` (a Job or Deployment object as the API returns it), with the given status."
    tpl = owner["spec"]["template"]
    labels = dict(tpl["metadata"].get("labels", {}))
    if owner["kind"] == "Deployment": labels["pod-template-hash"] = "7d9c6b5f48"
    spec = copy.deepcopy(tpl["spec"])
    if node: spec["nodeName"] = node
    kind = "Job" if owner["kind"] == "Job" else "ReplicaSet"
    meta = {"name": name, "namespace": NS, "uid": f"uid-{name}", "labels": labels, "creationTimestamp": ts(created),
            "annotations": dict(tpl["metadata"].get("annotations", {})),
            "ownerReferences": [{"apiVersion": "batch/v1" if kind == "Job" else "apps/v1", "kind": kind,
                                 "name": owner["metadata"]["name"], "uid": owner["metadata"]["uid"], "controller": True}]}
    cs = containers if containers is not None else [waiting(c["name"], c["image"], "ContainerCreating")
                                                     for c in spec["containers"]]
    status = {"phase": phase, "qosClass": "Burstable", "startTime": ts(created), "containerStatuses": cs,
              "conditions": conditions if conditions is not None else
              [{"type": "PodScheduled", "status": "True", "lastTransitionTime": ts(created)}]}
    if init is not None: status["initContainerStatuses"] = init
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec, "status": status}


def event(kind: str, name: str, reason: str, message: str, at: float, type: str = "Warning",
          component: str = "kubelet", count: int = 1) -> dict:
    "A core/v1 Event; the scheduler's (events.k8s.io/v1) have eventTime and no lastTimestamp."
    scheduler = component == "default-scheduler"
    return {"apiVersion": "v1", "kind": "Event",
            "metadata": {"name": f"{name}.{abs(hash((reason, at))) % 10**16:x}", "namespace": NS,
                         "creationTimestamp": ts(at)},
            "involvedObject": {"apiVersion": "v1", "kind": kind, "name": name, "namespace": NS, "uid": f"uid-{name}"},
            "reason": reason, "message": message, "type": type, "source": {} if scheduler else {"component": component},
            "firstTimestamp": None if scheduler else ts(at), "lastTimestamp": None if scheduler else ts(at),
            "count": None if scheduler else count, "eventTime": ts(at, micro=True) if scheduler else None,
            "reportingComponent": component, "reportingInstance": "" if scheduler else "kind-control-plane",
            **({"action": "Scheduling"} if scheduler else {})}


def pvc_obj(overlay: str, phase: str = "Bound", volume: str | None = None) -> dict:
    c = copy.deepcopy(find(rendered(overlay), "PersistentVolumeClaim"))
    c["metadata"].update(uid="c1a1m-0000", creationTimestamp=T0)
    c["spec"].setdefault("volumeMode", "Filesystem")
    if volume: c["spec"]["volumeName"] = volume
    if overlay == "local": c["spec"].setdefault("storageClassName", "standard")
    c["status"] = {"phase": phase, **({"accessModes": c["spec"]["accessModes"],
                                       "capacity": {"storage": c["spec"]["resources"]["requests"]["storage"]}}
                                      if phase == "Bound" else {})}
    return c


def pv_obj(phase: str = "Bound", bucket: str | None = None, claim_uid: str | None = "c1a1m-0000") -> dict:
    "GKE's bucket volume as the API returns it (claimRef completed by the binder)."
    v = copy.deepcopy(find(rendered("gke"), "PersistentVolume"))
    v["metadata"].update(uid="p0v-0000", creationTimestamp=T0)
    if bucket: v["spec"]["csi"]["volumeHandle"] = bucket
    if claim_uid: v["spec"]["claimRef"].update(uid=claim_uid, kind="PersistentVolumeClaim", apiVersion="v1",
                                               resourceVersion="4321")
    v["status"] = {"phase": phase, "lastPhaseTransitionTime": T0}
    return v


def namespace_obj(phase: str = "Active") -> dict:
    n = copy.deepcopy(find(rendered("local"), "Namespace"))
    n["status"] = {"phase": phase}
    return n


# ---- skaffold.yaml with profiles, as Skaffold applies them ---------------------------------------------------
def _pointer(doc, path: str):
    parts = [p.replace("~1", "/").replace("~0", "~") for p in path.lstrip("/").split("/")]
    for p in parts[:-1]: doc = doc[int(p)] if isinstance(doc, list) else doc[p]
    return doc, (int(parts[-1]) if isinstance(doc, list) else parts[-1])


def effective_skaffold(*profiles: str) -> dict:
    """skaffold.yaml with `profiles` activated in order, as Skaffold's schema/profiles.go does it: each field a
    profile sets replaces the config's (a `build` type such as `local` as a whole block), then its JSON patches
    apply (replace/add; a path that does not exist is an error)."""
    cfg = copy.deepcopy({k: v for k, v in skaffold().items() if k != "profiles"})
    for name in profiles:
        p = copy.deepcopy(profile(name))
        for field in ("manifests", "deploy", "portForward"):
            if field in p: cfg[field] = p[field]
        if "build" in p:
            for k, v in p["build"].items():
                if k in ("local", "googleCloudBuild", "cluster"):
                    for t in ("local", "googleCloudBuild", "cluster"): cfg["build"].pop(t, None)
                cfg["build"][k] = v
        for patch in p.get("patches", []):
            parent, key = _pointer(cfg, patch["path"])
            op = patch.get("op", "replace")
            if op == "replace":
                if isinstance(parent, list): assert key < len(parent), patch
                else: assert key in parent, f"invalid path: {patch['path']}"
                parent[key] = patch["value"]
            elif op == "add":
                if isinstance(parent, list): parent.insert(key, patch["value"])
                else: parent[key] = patch["value"]
            else: raise AssertionError(f"unsupported patch op {op}")
    return cfg


def hook_command(cfg: dict, phase: str) -> list[str]:
    hooks = cfg["deploy"]["kubectl"]["hooks"][phase]
    assert len(hooks) == 1 and set(hooks[0]) == {"host"}, hooks
    return hooks[0]["host"]["command"]


def selector_matches(selector: str, labels: dict) -> bool:
    "A kubectl label selector made of `k=v`, `k==v`, `k!=v`, `k` and `!k` terms, joined by commas."
    for term in selector.split(","):
        term = term.strip()
        if "!=" in term:
            k, v = term.split("!=")
            if labels.get(k) == v: return False
        elif "=" in term:
            k, v = term.replace("==", "=").split("=")
            if labels.get(k) != v: return False
        elif term.startswith("!"):
            if term[1:] in labels: return False
        elif term not in labels: return False
    return True


def delete_selector(cfg: dict) -> str:
    "The --selector of deploy.kubectl.flags.delete (what `skaffold delete` and `skaffold dev` cleanup keep)."
    flags = cfg["deploy"]["kubectl"]["flags"].get("delete", [])
    sels = [f.split("=", 1)[1] for f in flags if f.startswith(("--selector=", "-l="))]
    assert len(sels) == 1, flags
    return sels[0]
