"""The after-deploy wait (`python3 -m mnist_k8s.kube wait`, as skaffold.yaml runs it) against a fake `kubectl`
executable that replays each failure users meet first, plus success. The cluster's answers have the shapes
kubectl prints (core/v1 Pod, Event, PersistentVolumeClaim, PersistentVolume; kubectl's own stderr), built from
the rendered manifests. Time is a fake clock: each scenario asserts the exact message and when the wait stopped."""
from __future__ import annotations

import io
import subprocess
import sys
import time

import pytest

from _deploy_fixtures import ROOT, find, rendered
from _kube_fixtures import (NS, FakeClock, FakeKubectl, deployment_obj, effective_skaffold, event, hook_command,
                            job_obj, pod_obj, pv_obj, pvc_obj, running, waiting)
from mnist_k8s import kube

pytestmark = pytest.mark.deploy

TRAIN, INFER = "registry.example/mnist-k8s-train:3f2a1b0", "registry.example/mnist-k8s-infer:3f2a1b0"
INTERVAL = 25.0   # seconds between looks here (fewer fake kubectl runs); the grace period is the default
GRACE = kube.WaitOptions().grace
FORBIDDEN = ('Error from server (Forbidden): jobs.batch "mnist-k8s-train" is forbidden: User "dev@example.com" cannot '
             'get resource "jobs" in API group "batch" in the namespace "mnist-k8s"\n')
UNREACHABLE = ('E1129 08:00:01.004099   13180 memcache.go:265] "Unhandled Error" err="couldn\'t get current server API '
               'group list: Get \\"https://127.0.0.1:6443/api?timeout=32s\\": dial tcp 127.0.0.1:6443: connect: connection '
               'refused"\nThe connection to the server 127.0.0.1:6443 was refused - did you specify the right host or port?\n')


def hook_args(overlay: str) -> list[str]:
    "The wait hook's arguments as skaffold.yaml gives them (after `python3 -m mnist_k8s.kube`)."
    cmd = hook_command(effective_skaffold(*(["gke"] if overlay == "gke" else [])), "after")
    assert cmd[:4] == ["python3", "-m", "mnist_k8s.kube", "wait"], cmd
    return cmd[3:]


def run_wait(tmp_path, monkeypatch, frames, overlay="local", env=None, scenario=None, process=False):
    """The wait hook with skaffold.yaml's arguments against the fake kubectl: run in this process, or (`process`)
    as the executable found first on PATH, one process per call."""
    fake = FakeKubectl(tmp_path, {"frames": frames, **(scenario or {})})
    for k, v in fake.env().items(): monkeypatch.setenv(k, v)
    clock, out, err = FakeClock(), io.StringIO(), io.StringIO()
    rc = kube.main(hook_args(overlay), env={"WAIT_INTERVAL": str(INTERVAL), **(env or {})}, clock=clock.clock,
                   sleep=clock.sleep, out=out, err=err, run=subprocess.run if process else fake.run)
    return rc, clock.now, out.getvalue(), err.getvalue(), fake


def objects(overlay="local"):
    j, d = job_obj(overlay), deployment_obj(overlay)
    for o, image in ((j, TRAIN), (d, INFER)):
        for c in o["spec"]["template"]["spec"].get("initContainers", []) + o["spec"]["template"]["spec"]["containers"]:
            c["image"] = image
    return j, d


def frame(job, dep, pods=(), events=(), **kw):
    return {"job": job, "deployments": {dep["metadata"]["name"]: dep}, "pods": list(pods), "events": list(events),
            "pvcs": kw.pop("pvcs", {}), **kw}


def serving_pods(d, ready=False):
    cs = [running("infer", INFER) | {"ready": ready}]
    return [pod_obj(d, f"mnist-k8s-infer-7d9c6b5f48-{s}", created=1, phase="Running", containers=cs) for s in ("b8x2q", "k4m9z")]


# ---- success -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("process", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_waits_for_training_then_serving(tmp_path, monkeypatch, process):
    j, d = objects()
    train = pod_obj(j, "mnist-k8s-train-x7k2p", phase="Running", containers=[running("train", TRAIN)])
    done_j = job_obj("local", "SuccessCriteriaMet", "Complete")
    rc, now, out, err, fake = run_wait(tmp_path, monkeypatch, [
        frame(j, d, [train, *serving_pods(d)]), frame(j, d, [train, *serving_pods(d)]),
        frame(done_j, d, serving_pods(d)), frame(done_j, deployment_obj("local", ready=2), serving_pods(d, True))],
        process=process)
    budget = find(rendered("local"), "Job")["spec"]["activeDeadlineSeconds"] + int(kube.WaitOptions().margin)
    assert (rc, err) == (0, "")
    assert out == (f"Waiting up to {budget}s for job/mnist-k8s-train in namespace {NS} (training)...\n"
                   f"job/mnist-k8s-train completed after {2 * INTERVAL:.0f}s.\n"
                   "Waiting up to 300s for deployment/mnist-k8s-infer (serving)...\n"
                   "deployment/mnist-k8s-infer: every replica is ready.\n")
    assert all(c[:2] == ["--namespace", NS] for c in fake.calls())


def test_timeout_leaves_a_margin_past_the_jobs_deadline(tmp_path, monkeypatch):
    "No problem, no end: the wait gives up at the Job's own activeDeadlineSeconds (read from the Job) + margin."
    j, d = objects()
    j["spec"]["activeDeadlineSeconds"] = 1200    # the wait reads the live Job, not a number of its own
    train = pod_obj(j, "mnist-k8s-train-x7k2p", phase="Running", containers=[running("train", TRAIN)])
    rc, now, out, err, _ = run_wait(tmp_path, monkeypatch, [frame(j, d, [train, *serving_pods(d)])])
    assert rc == 1 and now == 1200 + kube.WaitOptions().margin == 1500
    assert err == (f"job/mnist-k8s-train did not finish within 1500s; see: kubectl -n {NS} describe job/mnist-k8s-train\n")
    assert f"Waiting up to 1500s for job/mnist-k8s-train" in out
    assert "still training after 75s (follow it: kubectl -n mnist-k8s logs -f pod/mnist-k8s-train-x7k2p -c train)" in out


def test_failed_job_shows_the_newest_pods_log_from_the_training_container(tmp_path, monkeypatch):
    j, d = objects("gke")
    failed = job_obj("gke", "FailureTarget", "Failed")
    sidecar = running("gke-gcsfuse-sidecar", "gke.gcr.io/gcs-fuse-csi-driver-sidecar-mounter:v1.17.2")
    old, new = (pod_obj(j, f"mnist-k8s-train-{s}", created=t, phase="Failed", init=[sidecar],
                        containers=[{**running("train", TRAIN), "ready": False, "state": {"terminated": {"exitCode": 1}}}])
                for s, t in (("a1b2c", 0), ("z9y8x", 300)))
    logs = {"mnist-k8s-train-z9y8x": {"train": "epoch 3/6\nTraceback (most recent call last):\nMemoryError\n"},
            "mnist-k8s-train-a1b2c": {"train": "an older failure\n"}}
    rc, now, out, err, fake = run_wait(tmp_path, monkeypatch, [frame(failed, d, [new, old], logs=logs)], "gke")
    assert (rc, now) == (1, 0)
    assert err == ("job/mnist-k8s-train failed: BackoffLimitExceeded: Job has reached the specified backoff limit\n"
                   f"--- kubectl -n {NS} logs pod/mnist-k8s-train-z9y8x -c train --tail=40 ---\n"
                   "epoch 3/6\nTraceback (most recent call last):\nMemoryError\n")
    assert ["--namespace", NS, "logs", "pod/mnist-k8s-train-z9y8x", "-c", "train", "--tail=40"] in fake.calls()


# ---- images and containers -----------------------------------------------------------------------------------
PULL = (f'rpc error: code = NotFound desc = failed to pull and unpack image "{TRAIN}": failed to resolve reference '
        f'"{TRAIN}": {TRAIN}: not found')


def test_image_that_cannot_be_pulled(tmp_path, monkeypatch):
    "ErrImagePull and ImagePullBackOff alternate while kubelet retries: one problem, stopped after the grace period."
    j, d = objects()
    pod = lambda reason, msg: pod_obj(j, "mnist-k8s-train-x7k2p", init=[running("volume-permissions", TRAIN)],
                                      containers=[waiting("train", TRAIN, reason, msg)])
    backoff = f'Back-off pulling image "{TRAIN}"'
    rc, now, out, err, _ = run_wait(tmp_path, monkeypatch, [
        frame(j, d, [pod("ErrImagePull", PULL)]), frame(j, d, [pod("ImagePullBackOff", backoff)]),
        frame(j, d, [pod("ErrImagePull", PULL)]), frame(j, d, [pod("ImagePullBackOff", backoff)])])
    assert (rc, now) == (1, GRACE)
    assert err == (f"pod/mnist-k8s-train-x7k2p cannot pull the image of container train ({TRAIN}): ImagePullBackOff: "
                   f"{backoff}\nNext: {kube.NEXT_IMAGE}\n")


def test_invalid_image_name_stops_at_once(tmp_path, monkeypatch):
    j, d = objects()
    bad = "Registry.Example/mnist-k8s-infer:3f2a1b0"
    msg = (f'Failed to apply default image tag "{bad}": couldn\'t parse image name "{bad}": invalid reference format: '
           'repository name must be lowercase')
    pods = [pod_obj(d, "mnist-k8s-infer-7d9c6b5f48-b8x2q", containers=[waiting("infer", bad, "InvalidImageName", msg)])]
    rc, now, out, err, _ = run_wait(tmp_path, monkeypatch, [frame(j, d, pods)])
    assert (rc, now) == (1, 0)
    assert err == (f"pod/mnist-k8s-infer-7d9c6b5f48-b8x2q cannot pull the image of container infer ({bad}): "
                   f"InvalidImageName: {msg}\nNext: {kube.NEXT_IMAGE}\n")


def test_container_config_error_of_a_serving_pod_stops_the_wait_during_training(tmp_path, monkeypatch):
    j, d = objects()
    msg = ('container has runAsNonRoot and image will run as root (pod: "mnist-k8s-infer-7d9c6b5f48-b8x2q_mnist-k8s'
           '(uid-mnist-k8s-infer-7d9c6b5f48-b8x2q)", container: infer)')
    train = pod_obj(j, "mnist-k8s-train-x7k2p", phase="Running", containers=[running("train", TRAIN)])
    infer = pod_obj(d, "mnist-k8s-infer-7d9c6b5f48-b8x2q", containers=[waiting("infer", INFER, "CreateContainerConfigError", msg)])
    rc, now, out, err, _ = run_wait(tmp_path, monkeypatch, [frame(j, d, [train, infer])])
    assert (rc, now) == (1, GRACE)
    assert err == ("pod/mnist-k8s-infer-7d9c6b5f48-b8x2q cannot create container infer: CreateContainerConfigError: "
                   f"{msg}\nNext: fix what the message names (a missing Secret or ConfigMap, a user the image lacks) in "
                   "k8s/, then run skaffold again; details: `kubectl describe pod/mnist-k8s-infer-7d9c6b5f48-b8x2q`\n")


# ---- volumes ---------------------------------------------------------------------------------------------------
NO_BUCKET = ('MountVolume.SetUp failed for volume "mnist-k8s-data-gcs" : rpc error: code = NotFound desc = failed to '
             'get GCS bucket "your-project-mnist-k8s": googleapi: Error 404: The specified bucket does not exist., notFound')
NO_ACCESS = ('MountVolume.SetUp failed for volume "mnist-k8s-data-gcs" : rpc error: code = PermissionDenied desc = failed '
             'to get GCS bucket "acme-mnist-models": googleapi: Error 403: Caller does not have storage.objects.list access '
             'to the Google Cloud Storage bucket. Permission \'storage.objects.list\' denied on resource (or it may not '
             'exist)., forbidden')


def mount_frames(message, later=()):
    j, d = objects("gke")
    pod = pod_obj(j, "mnist-k8s-train-x7k2p", containers=[waiting("train", TRAIN, "ContainerCreating")],
                  init=[waiting("gke-gcsfuse-sidecar", "gke.gcr.io/gcs-fuse-csi-driver-sidecar-mounter:v1.17.2",
                                "PodInitializing")])
    evs = [event("Pod", pod["metadata"]["name"], "Scheduled", "Successfully assigned mnist-k8s/mnist-k8s-train-x7k2p "
                 "to gk3-mnist-pool-1-8c1d", 0, "Normal", "default-scheduler"),
           event("Pod", pod["metadata"]["name"], "FailedMount", message, 3, count=4)]
    pvcs = {"mnist-k8s-data": pvc_obj("gke", "Bound")}
    return [frame(j, d, [pod], evs, pvcs=pvcs), *(frame(j, d, [pod], evs + list(e), pvcs=pvcs) for e in later)]


def test_placeholder_bucket_fails_the_mount(tmp_path, monkeypatch):
    rc, now, out, err, _ = run_wait(tmp_path, monkeypatch, mount_frames(NO_BUCKET), "gke")
    assert (rc, now) == (1, GRACE)
    assert err == (f"pod/mnist-k8s-train-x7k2p cannot mount its volumes: FailedMount: {NO_BUCKET}\n"
                   "Next: create the bucket (`gcloud storage buckets create gs://your-project-mnist-k8s "
                   "--location=REGION --uniform-bucket-level-access`), or put the name of yours in volumeHandle in "
                   "k8s/overlays/gke/gcs-volume.yaml and run skaffold again (its preflight check says how to replace "
                   "the volume)\n")


def test_missing_iam_binding_fails_the_mount(tmp_path, monkeypatch):
    rc, now, out, err, _ = run_wait(tmp_path, monkeypatch, mount_frames(NO_ACCESS), "gke")
    assert (rc, now) == (1, GRACE)
    assert err == (f"pod/mnist-k8s-train-x7k2p cannot mount its volumes: FailedMount: {NO_ACCESS}\n"
                   "Next: let the pods' service account use the bucket: `gcloud storage buckets add-iam-policy-binding "
                   "gs://acme-mnist-models --member=principal://iam.googleapis.com/projects/PROJECT_NUMBER/locations/"
                   "global/workloadIdentityPools/PROJECT_ID.svc.id.goog/subject/ns/mnist-k8s/sa/mnist-k8s "
                   "--role=roles/storage.objectUser` (the cluster needs Workload Identity Federation)\n")


def test_a_mount_that_succeeds_late_is_not_stuck(tmp_path, monkeypatch):
    "The IAM binding arrives a minute late: kubelet mounts, pulls, starts; the wait goes on (here, to its end)."
    pulled = [event("Pod", "mnist-k8s-train-x7k2p", "Pulling", f'Pulling image "{TRAIN}"', 70, "Normal")]
    frames = mount_frames(NO_ACCESS, later=[pulled])
    j, d = objects("gke")
    frames.append(frame(job_obj("gke", "Complete"), deployment_obj("gke", ready=2), serving_pods(d, True)))
    frames[1:1] = [frames[0], frames[0]]   # stuck for 75 s, then the pull starts
    rc, now, out, err, _ = run_wait(tmp_path, monkeypatch, frames, "gke")
    assert (rc, err) == (0, "") and now == 4 * INTERVAL


def test_claim_that_stays_pending_behind_a_released_volume(tmp_path, monkeypatch):
    "The namespace was deleted outside Skaffold: the bucket's volume (Retain) is Released and binds no new claim."
    j, d = objects("gke")
    unbound = ("0/3 nodes are available: pod has unbound immediate PersistentVolumeClaims. preemption: 0/3 nodes are "
               "available: 3 Preemption is not helpful for scheduling.")
    cond = [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": unbound}]
    pods = [pod_obj(j, "mnist-k8s-train-x7k2p", node=None, conditions=cond, containers=[])]
    binding = 'volume "mnist-k8s-data-gcs" already bound to a different claim.'
    evs = [event("PersistentVolumeClaim", "mnist-k8s-data", "FailedBinding", binding, 1, component="persistentvolume-controller"),
           event("Pod", "mnist-k8s-train-x7k2p", "FailedScheduling", unbound, 1, component="default-scheduler")]
    f = frame(j, d, pods, evs, pvcs={"mnist-k8s-data": pvc_obj("gke", "Pending")},
              pvs={"mnist-k8s-data-gcs": pv_obj("Released", "acme-mnist-models", claim_uid="0ld-c1a1m")})
    rc, now, out, err, _ = run_wait(tmp_path, monkeypatch, [f], "gke")
    assert (rc, now) == (1, GRACE)
    assert err == (f"persistentvolumeclaim/mnist-k8s-data stays Pending: FailedBinding: {binding}\n"
                   "Next: its volume mnist-k8s-data-gcs is Released: its previous claim was deleted. Let it bind again "
                   "with `kubectl patch persistentvolume/mnist-k8s-data-gcs --type merge "
                   """-p '{"spec":{"claimRef":{"uid":null,"resourceVersion":null}}}'` (the preflight check does this """
                   "by itself before the next deploy)\n")


def test_claim_pending_without_a_default_storage_class(tmp_path, monkeypatch):
    j, d = objects()
    msg = "no persistent volumes available for this claim and no storage class is set"
    pvc = pvc_obj("local", "Pending")
    pvc["spec"].pop("storageClassName")
    f = frame(j, d, [], [event("PersistentVolumeClaim", "mnist-k8s-data", "FailedBinding", msg, 1,
                               component="persistentvolume-controller")], pvcs={"mnist-k8s-data": pvc})
    rc, now, out, err, _ = run_wait(tmp_path, monkeypatch, [f])
    assert (rc, now) == (1, GRACE)
    assert err == (f"persistentvolumeclaim/mnist-k8s-data stays Pending: FailedBinding: {msg}\nNext: the cluster has "
                   "no default StorageClass: see `kubectl get storageclass`, and make one the default\n")


# ---- scheduling -------------------------------------------------------------------------------------------------
INSUFFICIENT = ("0/1 nodes are available: 1 Insufficient memory. preemption: 0/1 nodes are available: 1 No preemption "
                "victims found for incoming pod.")


def unschedulable_frame(extra_events=()):
    j, d = objects()
    cond = [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": INSUFFICIENT,
             "lastTransitionTime": "2026-11-29T08:00:01Z"}]
    pods = [pod_obj(j, "mnist-k8s-train-x7k2p", node=None, conditions=cond, containers=[])]
    evs = [event("Pod", "mnist-k8s-train-x7k2p", "FailedScheduling", INSUFFICIENT, 1, component="default-scheduler"),
           *extra_events]
    return j, d, frame(j, d, pods, evs)


def test_pod_that_fits_no_node(tmp_path, monkeypatch):
    j, d, f = unschedulable_frame()
    rc, now, out, err, _ = run_wait(tmp_path, monkeypatch, [f])
    assert (rc, now) == (1, GRACE)
    assert err == (f"pod/mnist-k8s-train-x7k2p cannot be scheduled: Unschedulable: {INSUFFICIENT}\nNext: {kube.NEXT_SCHEDULE}\n")


def test_a_node_on_its_way_is_not_stuck(tmp_path, monkeypatch):
    "The cluster autoscaler answered with TriggeredScaleUp (as GKE Autopilot does): keep waiting."
    scale = event("Pod", "mnist-k8s-train-x7k2p", "TriggeredScaleUp", "pod triggered scale-up: [{mig-1 1->2 (max: 6)}]",
                  5, "Normal", "cluster-autoscaler")
    j, d, f = unschedulable_frame([scale])
    done = frame(job_obj("local", "Complete"), deployment_obj("local", ready=2), serving_pods(d, True))
    rc, now, out, err, _ = run_wait(tmp_path, monkeypatch, [f] * 8 + [done])
    assert (rc, err) == (0, "") and now > GRACE


def test_grace_period_is_configurable(tmp_path, monkeypatch):
    j, d, f = unschedulable_frame()
    rc, now, *_ = run_wait(tmp_path, monkeypatch, [f], env={"WAIT_GRACE": "50"})
    assert (rc, now) == (1, 50)


# ---- kubectl refused ----------------------------------------------------------------------------------------------
def test_rbac_refusal_stops_at_once_with_kubectls_stderr(tmp_path, monkeypatch):
    rc, now, out, err, _ = run_wait(tmp_path, monkeypatch, [{}], scenario={"refuse": {"stderr": FORBIDDEN}},
                                    process=True)
    assert (rc, now) == (1, 0)
    assert err == ("kubectl get job mnist-k8s-train -o json failed:\n  " + FORBIDDEN +
                   f"kubectl was refused: Forbidden: {FORBIDDEN.strip()}\nNext: deploy with an account that may read "
                   "and apply this app's objects in namespace mnist-k8s (check: `kubectl auth can-i get jobs -n "
                   "mnist-k8s`), or pick the right cluster with --kube-context\n")


def test_unknown_context_stops_at_once(tmp_path, monkeypatch):
    rc, now, out, err, fake = run_wait(tmp_path, monkeypatch, [{}], env={"SKAFFOLD_KUBE_CONTEXT": "kind-typo"},
                                       scenario={"contexts": ["kind-kind"]}, process=True)
    assert (rc, now) == (1, 0)
    assert err == ('kubectl get job mnist-k8s-train -o json failed:\n  error: context "kind-typo" does not exist\n'
                   """kubectl does not know the context 'kind-typo': ContextNotFound: error: context "kind-typo" does """
                   "not exist\nNext: list the contexts with `kubectl config get-contexts`, then run skaffold with "
                   "--kube-context=NAME (or `kubectl config use-context NAME`)\n")
    assert fake.calls()[0][:2] == ["--context", "kind-typo"]


def test_unreachable_cluster_is_given_the_grace_period(tmp_path, monkeypatch):
    rc, now, out, err, _ = run_wait(tmp_path, monkeypatch, [{}], scenario={"refuse": {"stderr": UNREACHABLE}})
    assert (rc, now) == (1, GRACE)
    first = "The connection to the server 127.0.0.1:6443 was refused - did you specify the right host or port?"
    assert err == (f"kubectl get job mnist-k8s-train -o json failed:\n  {first}\n"   # printed once, without client-go's log
                   f"kubectl cannot reach the cluster: Unreachable: {first}\nNext: check that the cluster is running "
                   "and that `kubectl config current-context` names it\n")


# ---- the namespace Skaffold gives ------------------------------------------------------------------------------
def test_follows_the_namespace_skaffold_deployed_to(tmp_path, monkeypatch):
    "The kustomization's namespace was changed: SKAFFOLD_NAMESPACES names it (with the context's default)."
    j, d = objects()
    done = frame(job_obj("local", "Complete"), deployment_obj("local", ready=2))
    rc, now, out, err, fake = run_wait(tmp_path, monkeypatch, [done],
                                       env={"SKAFFOLD_NAMESPACES": "default,team-a", "SKAFFOLD_KUBE_CONTEXT": "kind-kind"})
    assert rc == 0 and "in namespace team-a" in out
    assert all(c[:4] == ["--context", "kind-kind", "--namespace", "team-a"] for c in fake.calls())


# ---- as Skaffold runs it: a process with only the standard library ------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("case", ["success", "image"])
def test_the_hook_command_runs_without_the_packages_dependencies(tmp_path, case):
    j, d = objects()
    if case == "success":
        frames = [frame(job_obj("local", "Complete"), deployment_obj("local", ready=2))]
    else:
        frames = [frame(j, d, [pod_obj(j, "mnist-k8s-train-x7k2p", containers=[waiting("train", TRAIN, "ErrImagePull", PULL)])])]
    fake = FakeKubectl(tmp_path, {"frames": frames})
    cmd = hook_command(effective_skaffold(), "after")
    env = fake.env(WAIT_INTERVAL="0.05", WAIT_GRACE="0.3", PYTHONNOUSERSITE="1")
    start = time.monotonic()
    res = subprocess.run([sys.executable, "-S", *cmd[1:]], capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert time.monotonic() - start < 30
    if case == "success":
        assert res.returncode == 0 and res.stderr == "", res.stderr
        assert res.stdout.endswith("deployment/mnist-k8s-infer: every replica is ready.\n")
    else:
        assert res.returncode == 1
        assert res.stderr == (f"pod/mnist-k8s-train-x7k2p cannot pull the image of container train ({TRAIN}): "
                              f"ErrImagePull: {PULL}\nNext: {kube.NEXT_IMAGE}\n")
