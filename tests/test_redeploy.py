"""Redeploys keep the models and never wedge: what each flow renders, what `skaffold delete` (and `skaffold dev`
when it stops) deletes, and what the preflight hook (`python3 -m mnist_k8s.kube preflight`, before every deploy)
says against a fake kubectl whose server-side dry run answers from the real rendered overlays and a live state."""
from __future__ import annotations

import io
import shutil

import pytest

from _deploy_fixtures import OVERLAYS, ROOT, find, rendered, skaffold
from _kube_fixtures import (NS, FakeKubectl, delete_selector, effective_skaffold, hook_command, namespace_obj,
                            pv_obj, pvc_obj, selector_matches)
from mnist_k8s import kube

pytestmark = pytest.mark.deploy

KEPT = {"local": {"Namespace", "PersistentVolumeClaim"}, "gke": {"Namespace", "PersistentVolumeClaim", "PersistentVolume"}}
PROFILES = {"local": (), "gke": ("gke",)}
CLEAR = '{"spec":{"claimRef":{"uid":null,"resourceVersion":null}}}'


def preflight_args(overlay: str) -> list[str]:
    cmd = hook_command(effective_skaffold(*PROFILES[overlay]), "before")
    assert cmd[:4] == ["python3", "-m", "mnist_k8s.kube", "preflight"], cmd
    return cmd[3:]


def run_preflight(tmp_path, monkeypatch, overlay, live, manifests=None, scenario=None):
    fake = FakeKubectl(tmp_path, {"live": live, **(scenario or {})})
    for k, v in fake.env().items(): monkeypatch.setenv(k, v)
    monkeypatch.chdir(ROOT)   # Skaffold runs host hooks in its working directory, the repository root
    args = preflight_args(overlay)
    if manifests: args[args.index("--manifests") + 1] = str(manifests)
    out, err = io.StringIO(), io.StringIO()
    rc = kube.main(args, env={}, run=fake.run, out=out, err=err)
    return rc, out.getvalue(), err.getvalue(), fake


def live_state(overlay, ns="Active", pvc="Bound", pv=None):
    state = {"namespaces": {NS: namespace_obj(ns)} if ns else {}, "pvcs": {}, "pvs": {}}
    if pvc: state["pvcs"]["mnist-k8s-data"] = pvc_obj(overlay, pvc)
    if pv: state["pvs"]["mnist-k8s-data-gcs"] = pv
    return state


def overlay_with_bucket(tmp_path, bucket: str):
    "A copy of k8s/ whose gke overlay names `bucket` (what a user does after the first deploy)."
    k8s = tmp_path / "k8s"
    shutil.copytree(ROOT / "k8s", k8s)
    vol = k8s / "overlays" / "gke" / "gcs-volume.yaml"
    vol.write_text(vol.read_text().replace(f"volumeHandle: {kube.PLACEHOLDER_BUCKET}", f"volumeHandle: {bucket}"))
    return k8s / "overlays" / "gke"


# ---- what the flows render and delete ------------------------------------------------------------------------
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_the_objects_that_hold_the_models_are_kept(overlay):
    objs = rendered(overlay)
    kept = {o["kind"] for o in objs if o["metadata"].get("labels", {}).get(kube.KEEP_LABEL) == "true"}
    assert kept == KEPT[overlay]
    assert all(o["metadata"]["labels"][kube.KEEP_LABEL] == "true" for o in objs if o["kind"] in KEPT[overlay])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_skaffold_delete_and_dev_cleanup_leave_the_models(overlay):
    """`skaffold delete` and a stopping `skaffold dev` run the deployer's Cleanup: `kubectl delete -f -` on the
    rendered manifests plus deploy.kubectl.flags.delete. kubectl filters file objects by --selector."""
    cfg = effective_skaffold(*PROFILES[overlay])
    sel = delete_selector(cfg)
    assert sel == f"{kube.KEEP_LABEL}!=true"
    objs = rendered(overlay)
    deleted = {(o["kind"], o["metadata"]["name"]) for o in objs if selector_matches(sel, o["metadata"].get("labels", {}))}
    kept = {(o["kind"], o["metadata"]["name"]) for o in objs} - deleted
    assert {k for k, _ in kept} == KEPT[overlay]
    assert {"Job", "Deployment", "Service"} <= {k for k, _ in deleted}   # the app itself goes
    assert ("PersistentVolumeClaim", "mnist-k8s-data") in kept and ("Namespace", NS) in kept


def test_profiles_keep_the_delete_flags_and_the_force_apply():
    for profiles in [(), ("gke",), ("gke", "cloudbuild")]:
        flags = effective_skaffold(*profiles)["deploy"]["kubectl"]["flags"]
        assert flags["apply"] == ["--force"] and delete_selector(effective_skaffold(*profiles)) == f"{kube.KEEP_LABEL}!=true"


# ---- skaffold run, then skaffold run again (also: skaffold delete, then skaffold run; skaffold dev, stop, start) -------
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_redeploy_over_a_kept_namespace_and_claim(tmp_path, monkeypatch, overlay):
    manifests = overlay_with_bucket(tmp_path, "acme-mnist-models") if overlay == "gke" else None
    pv = pv_obj("Bound", "acme-mnist-models") if overlay == "gke" else None
    rc, out, err, fake = run_preflight(tmp_path, monkeypatch, overlay, live_state(overlay, pv=pv), manifests)
    assert (rc, err) == (0, "")
    names = "namespace/mnist-k8s, persistentvolumeclaim/mnist-k8s-data" + (
        ", persistentvolume/mnist-k8s-data-gcs" if overlay == "gke" else "")
    assert sorted(out.removeprefix("Preflight: ").removesuffix(" can be applied as they are.\n").split(", ")) == \
        sorted(names.split(", "))
    assert not any("patch" in c for c in fake.calls())


def test_first_local_deploy_creates_the_namespace_and_claim(tmp_path, monkeypatch):
    "No namespace yet: the dry run of the claim says `namespaces not found`, which this very deploy fixes."
    rc, out, err, fake = run_preflight(tmp_path, monkeypatch, "local", live_state("local", ns=None, pvc=None))
    assert (rc, err) == (0, "")
    assert out == "Preflight: namespace/mnist-k8s can be applied as they are.\n"
    dry = fake.calls()[0]
    assert dry == ["apply", "--dry-run=server", "-k", "k8s/overlays/local", "-l", f"{kube.KEEP_LABEL}=true", "-o", "json"]


# ---- GKE: the bucket name ---------------------------------------------------------------------------------------
def test_the_placeholder_bucket_is_refused_before_the_first_deploy(tmp_path, monkeypatch):
    rc, out, err, _ = run_preflight(tmp_path, monkeypatch, "gke", live_state("gke", ns=None, pvc=None))
    assert rc == 1
    assert err == ("persistentvolume/mnist-k8s-data-gcs names the placeholder bucket: Placeholder: volumeHandle: "
                   "your-project-mnist-k8s (k8s/overlays/gke/gcs-volume.yaml)\nNext: create a bucket (`gcloud storage "
                   "buckets create gs://BUCKET --location=REGION --uniform-bucket-level-access`), let the pods' service "
                   "account use the bucket: `gcloud storage buckets add-iam-policy-binding gs://BUCKET --member=principal:"
                   "//iam.googleapis.com/projects/PROJECT_NUMBER/locations/global/workloadIdentityPools/PROJECT_ID.svc."
                   "id.goog/subject/ns/mnist-k8s/sa/mnist-k8s --role=roles/storage.objectUser` (the cluster needs "
                   "Workload Identity Federation), put its name in volumeHandle in k8s/overlays/gke/gcs-volume.yaml, "
                   "then run skaffold again\n")


def test_the_placeholder_is_the_shipped_bucket_name_and_the_service_account_is_the_pods():
    objs = rendered("gke")
    assert find(objs, "PersistentVolume")["spec"]["csi"]["volumeHandle"] == kube.PLACEHOLDER_BUCKET
    for kind in ("Job", "Deployment"):
        assert find(objs, kind)["spec"]["template"]["spec"]["serviceAccountName"] == kube.SERVICE_ACCOUNT


def test_correcting_the_bucket_after_the_first_deploy(tmp_path, monkeypatch):
    """The first deploy went out with another bucket: the volume's source is immutable, and `apply --force` would
    delete the bound volume (Terminating for as long as pods use it). The check stops before, with the commands;
    once they have run, the deploy goes through."""
    manifests = overlay_with_bucket(tmp_path, "acme-mnist-models")
    live = live_state("gke", pv=pv_obj("Bound", kube.PLACEHOLDER_BUCKET))
    rc, out, err, fake = run_preflight(tmp_path, monkeypatch, "gke", live, manifests)
    assert rc == 1
    assert err == ("persistentvolume/mnist-k8s-data-gcs names another bucket than the one it was created with: "
                   "FieldImmutable: spec.persistentvolumesource: Forbidden: spec.persistentvolumesource is immutable "
                   "after creation\nNext: a volume's source cannot change, and `kubectl apply --force` would leave it "
                   "Terminating. Replace it (the models published so far stay in gs://your-project-mnist-k8s; the deploy "
                   "then trains one into the new bucket): `kubectl -n mnist-k8s delete deployment,job -l "
                   "app.kubernetes.io/instance=mnist-k8s`; `kubectl -n mnist-k8s delete persistentvolumeclaim/"
                   "mnist-k8s-data`; `kubectl delete persistentvolume/mnist-k8s-data-gcs`; then run skaffold again\n")
    assert not any(c[0] == "patch" for c in fake.calls())
    # after the three commands: the namespace remains, the claim and the volume are gone
    rc, out, err, _ = run_preflight(tmp_path, monkeypatch, "gke", live_state("gke", pvc=None), manifests)
    assert (rc, err) == (0, "")


# ---- delete the namespace, then deploy again ------------------------------------------------------------------------
def test_gke_volume_released_by_a_deleted_namespace_binds_again(tmp_path, monkeypatch):
    manifests = overlay_with_bucket(tmp_path, "acme-mnist-models")
    live = live_state("gke", ns=None, pvc=None, pv=pv_obj("Released", "acme-mnist-models", claim_uid="0ld-c1a1m"))
    rc, out, err, fake = run_preflight(tmp_path, monkeypatch, "gke", live, manifests)
    assert (rc, err) == (0, "")
    assert out.splitlines()[0] == ("persistentvolume/mnist-k8s-data-gcs was Released (its claim mnist-k8s/mnist-k8s-data "
                                   "was deleted); cleared the old claim's uid so that the new claim binds to it, data "
                                   "untouched.")
    assert ["patch", "persistentvolume", "mnist-k8s-data-gcs", "--type", "merge", "-p", CLEAR] in fake.calls()
    pv = fake.scenario()["live"]["pvs"]["mnist-k8s-data-gcs"]
    assert pv["spec"]["claimRef"] == {"namespace": NS, "name": "mnist-k8s-data", "kind": "PersistentVolumeClaim",
                                      "apiVersion": "v1"}   # pre-bound by name again, no uid
    assert pv["spec"]["csi"]["volumeHandle"] == "acme-mnist-models"   # the same bucket, the same models


def test_a_volume_released_by_another_claim_is_left_alone(tmp_path, monkeypatch):
    manifests = overlay_with_bucket(tmp_path, "acme-mnist-models")
    pv = pv_obj("Released", "acme-mnist-models", claim_uid="0ld")
    pv["spec"]["claimRef"].update(namespace="someone-else", name="their-claim")
    rc, out, err, fake = run_preflight(tmp_path, monkeypatch, "gke", live_state("gke", ns=None, pvc=None, pv=pv), manifests)
    assert rc == 0 and not any(c[0] == "patch" for c in fake.calls())


def test_redeploy_while_the_namespace_is_still_being_deleted(tmp_path, monkeypatch):
    rc, out, err, _ = run_preflight(tmp_path, monkeypatch, "local", live_state("local", ns="Terminating", pvc=None))
    assert rc == 1
    assert err == ("namespace/mnist-k8s is being deleted: Terminating: unable to create new content in namespace "
                   "mnist-k8s because it is being terminated\nNext: wait until it is gone: `kubectl wait "
                   "--for=delete namespace/mnist-k8s --timeout=10m`; then run skaffold again\n")


def test_changing_the_claim_after_the_first_deploy(tmp_path, monkeypatch):
    "A bound claim's spec is immutable: the check names the commands, and that a local claim takes the models along."
    live = live_state("local")
    live["pvcs"]["mnist-k8s-data"]["spec"]["accessModes"] = ["ReadWriteMany"]
    rc, out, err, _ = run_preflight(tmp_path, monkeypatch, "local", live)
    assert rc == 1
    assert err == ("persistentvolumeclaim/mnist-k8s-data differs from the claim created first (storage class, access "
                   "modes, volume, or a size its class cannot grow to): FieldImmutable: spec: Forbidden: spec is "
                   "immutable after creation except resources.requests and volumeAttributesClassName for bound claims\n"
                   "Next: a bound claim's spec cannot change, and `kubectl apply --force` would leave it Terminating. "
                   "Replace it: `kubectl -n mnist-k8s delete deployment,job -l app.kubernetes.io/instance=mnist-k8s`; "
                   "`kubectl -n mnist-k8s delete persistentvolumeclaim/mnist-k8s-data`; then run skaffold again. On a "
                   "local cluster this deletes the volume and the models on it (its reclaim policy is Delete); on GKE "
                   "they stay in the bucket\n")


def test_a_claim_being_deleted_stops_the_deploy(tmp_path, monkeypatch):
    live = live_state("local")
    live["pvcs"]["mnist-k8s-data"]["metadata"]["deletionTimestamp"] = "2026-11-29T08:10:00Z"
    rc, out, err, _ = run_preflight(tmp_path, monkeypatch, "local", live)
    assert rc == 1 and err.startswith("persistentvolumeclaim/mnist-k8s-data is being deleted: Terminating: ")
    assert "`kubectl -n mnist-k8s wait --for=delete persistentvolumeclaim/mnist-k8s-data`" in err


def test_preflight_refused_by_rbac(tmp_path, monkeypatch):
    forbidden = ('Error from server (Forbidden): error when retrieving current configuration of:\nResource: '
                 '"/v1, Resource=persistentvolumes", GroupVersionKind: "/v1, Kind=PersistentVolume"\nName: '
                 '"mnist-k8s-data-gcs", Namespace: ""\nfrom server for: "k8s/overlays/gke": persistentvolumes '
                 '"mnist-k8s-data-gcs" is forbidden: User "dev@example.com" cannot get resource "persistentvolumes" in '
                 'API group "" at the cluster scope\n')
    rc, out, err, _ = run_preflight(tmp_path, monkeypatch, "gke", {}, scenario={"refuse": {"stderr": forbidden}})
    assert rc == 1 and err == (
        'kubectl was refused: Forbidden: from server for: "k8s/overlays/gke": persistentvolumes "mnist-k8s-data-gcs" is '
        'forbidden: User "dev@example.com" cannot get resource "persistentvolumes" in API group "" at the cluster scope\n'
        "Next: deploy with an account that may read and apply this app's objects in namespace mnist-k8s (check: "
        "`kubectl auth can-i get persistentvolumes -n mnist-k8s`), or pick the right cluster with --kube-context\n")


# ---- skaffold.yaml: the hooks and the profiles ---------------------------------------------------------------------
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_hooks_run_the_module_directly_for_the_profiles_overlay(overlay):
    "No `sh -c`: Skaffold starts host hooks in its working directory (SKAFFOLD_WORK_DIR), the repository root."
    cfg = effective_skaffold(*PROFILES[overlay])
    before, after = hook_command(cfg, "before"), hook_command(cfg, "after")
    assert before[:3] == after[:3] == ["python3", "-m", "mnist_k8s.kube"]
    assert before[before.index("--manifests") + 1] == cfg["manifests"]["kustomize"]["paths"][0] == f"k8s/overlays/{overlay}"
    args = kube.parser({}).parse_args(after[3:])
    objs = rendered(overlay)
    job, dep = find(objs, "Job"), find(objs, "Deployment")
    assert (args.namespace, args.job, args.deployment) == (job["metadata"]["namespace"], job["metadata"]["name"],
                                                           [dep["metadata"]["name"]])
    assert args.timeout is None   # the wait reads activeDeadlineSeconds from the Job itself
    assert cfg["deploy"]["statusCheck"] is False
    assert not any(set(h["host"]) - {"command"} for phase in ("before", "after")
                   for h in cfg["deploy"]["kubectl"]["hooks"][phase])   # no `dir`, no `os` filter


def test_gke_profile_keeps_the_local_build_settings():
    "A profile's build.local would replace the whole block: the gke profile patches `push` only."
    base, gke = effective_skaffold()["build"]["local"], effective_skaffold("gke")["build"]["local"]
    assert base["push"] is False and gke["push"] is True
    assert {k: v for k, v in gke.items() if k != "push"} == {k: v for k, v in base.items() if k != "push"}
    assert gke["useBuildkit"] is True and gke["concurrency"] == 1
    assert "build" not in next(p for p in skaffold()["profiles"] if p["name"] == "gke")
    cloud = effective_skaffold("gke", "cloudbuild")["build"]
    assert "local" not in cloud and cloud["googleCloudBuild"]["concurrency"] >= 1
