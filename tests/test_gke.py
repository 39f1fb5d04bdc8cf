"""The gke overlay's Cloud Storage volume: every mount option it needs (and no `implicit-dirs`), the Cloud Storage
FUSE sidecar's resource annotations, and the request rate the serving pods' reload check makes of the bucket."""
from __future__ import annotations

import pytest

from _deploy_fixtures import env_map, find, quantity, rendered
from mnist_k8s import store

pytestmark = pytest.mark.deploy

# The annotations the GCS FUSE CSI driver's webhook reads (gcs-fuse-csi-driver pkg/webhook/mutatingwebhook.go),
# and its defaults (cmd/webhook/main.go): what each pod would reserve for the sidecar without them.
SIDECAR = {"cpu": ("250m", "250m"), "memory": ("256Mi", "256Mi"), "ephemeral-storage": ("5Gi", "5Gi")}
# gcsfuse streaming writes: at most write-global-max-blocks (4) buffers of write-block-size-mb (32 MiB) in memory.
STREAMING_WRITE_BUFFERS = 4 * 32 * 2**20
LARGEST_FILE = 47_040_016   # MNIST's train-images-idx3-ubyte: 60000 x 28 x 28 bytes + a 16-byte header


def mount_options() -> tuple[dict[str, str], dict[str, str]]:
    "The volume's mount options: gcsfuse flags (`name` or `name=value`) and config entries (`section:key:value`)."
    flags, config = {}, {}
    for o in find(rendered("gke"), "PersistentVolume")["spec"]["mountOptions"]:
        if ":" in o:
            key, _, value = o.rpartition(":")
            config[key] = value
        else:
            name, _, value = o.partition("=")
            flags[name] = value
    return flags, config


def test_every_mount_option_the_volume_needs():
    flags, config = mount_options()
    assert set(flags) == {"uid", "gid", "file-mode", "dir-mode", "rename-dir-limit"}
    assert set(config) == {"metadata-cache:ttl-secs", "metadata-cache:negative-ttl-secs"}
    objs = rendered("gke")
    for kind in ("Job", "Deployment"):
        psc = find(objs, kind)["spec"]["template"]["spec"]["securityContext"]
        assert (int(flags["uid"]), int(flags["gid"])) == (psc["runAsUser"], psc["runAsGroup"])   # files are the pods'
    assert (flags["file-mode"], flags["dir-mode"]) == ("644", "755")
    # Publishing renames the staging folder of a version: gcsfuse refuses folders of more descendants than this.
    files_per_version = len({store.MODEL_FILE, store.METADATA_FILE, store.REPORT_FILE, store.REPORT_HTML})
    assert int(flags["rename-dir-limit"]) >= 100 * files_per_version
    # A new `latest` shows within the reload interval plus the metadata TTL; a first model is not hidden by a
    # cached "not found".
    assert int(config["metadata-cache:ttl-secs"]) == 1 and config["metadata-cache:negative-ttl-secs"] == "0"


def test_no_implicit_dirs():
    "Each lookup would also list objects (class A, 12x a metadata read): every folder is made through the mount."
    flags, _ = mount_options()
    assert "implicit-dirs" not in flags and "implicit_dirs" not in flags


@pytest.mark.parametrize("kind", ["Job", "Deployment"])
def test_sidecar_resources_are_set_and_justified(kind):
    ann = find(rendered("gke"), kind)["spec"]["template"]["metadata"]["annotations"]
    assert ann["gke-gcsfuse/volumes"] == "true"
    for res, (default_req, _) in SIDECAR.items():
        req, lim = quantity(ann[f"gke-gcsfuse/{res}-request"]), quantity(ann[f"gke-gcsfuse/{res}-limit"])
        assert 0 < req <= lim, res
        if res != "memory": assert req < quantity(default_req), f"{res}: no smaller than the driver's default"
    memory = quantity(ann["gke-gcsfuse/memory-request"])
    assert memory >= STREAMING_WRITE_BUFFERS + 64 * 2**20   # the write buffers, plus gcsfuse itself
    assert quantity(ann["gke-gcsfuse/ephemeral-storage-request"]) >= 2 * LARGEST_FILE   # a staged (non-streamed) write
    assert set(k for k in ann if k.startswith("gke-gcsfuse/")) == {"gke-gcsfuse/volumes"} | {
        f"gke-gcsfuse/{r}-{w}" for r in SIDECAR for w in ("request", "limit")}


def reload_check_requests_per_month(replicas: int, interval: float, ttl: float, implicit_dirs: bool) -> tuple[float, float]:
    """(class A, class B) Cloud Storage operations a month from the serving pods' reload check (ModelHolder.check):
    it reads `models/latest`, then `versions/<v>/metadata.json`, and stats `versions/<v>/model.pt`: 6 path lookups
    (models, latest, versions, <v>, metadata.json, model.pt) and 2 object reads. When the metadata cache (TTL) has
    expired, gcsfuse looks a name up with two object stats (`name` and `name/`, class B); with implicit-dirs, one stat
    and one object listing (class A) instead."""
    checks = 30 * 24 * 3600 / interval * replicas
    fresh = 1.0 if ttl < interval else 0.0   # share of checks that find the cache expired
    lookups, reads = 6 * fresh, 2
    if implicit_dirs: return checks * lookups, checks * (lookups + reads)
    return 0.0, checks * (2 * lookups + reads)


def test_the_reload_check_costs_what_the_readme_says():
    "The figures in the README's GKE cost section: ~36M class B ops a month at 2 s, ~7.3M at the overlay's 10 s."
    objs = rendered("gke")
    d = find(objs, "Deployment")
    interval = float(env_map(d["spec"]["template"]["spec"]["containers"][0])["MNIST_K8S_RELOAD_INTERVAL"]["value"])
    hpa = [o for o in objs if o["kind"] == "HorizontalPodAutoscaler"]
    replicas = hpa[0]["spec"]["minReplicas"] if hpa else d["spec"]["replicas"]
    _, config = mount_options()
    a, b = reload_check_requests_per_month(replicas, interval, float(config["metadata-cache:ttl-secs"]), False)
    assert (interval, replicas, a) == (10.0, 2, 0.0)
    assert round(b / 1e6, 2) == 7.26                     # 2 x 259,200 checks x 14 class B operations
    assert round(b / 1e6 * 0.40, 2) == 2.90              # at $0.0004 per 1,000 class B operations
    a2, b2 = reload_check_requests_per_month(2, 2.0, 1.0, True)   # before: 2 s with implicit-dirs
    assert round(a2 / 1e6, 2) == 15.55 and round(a2 / 1e6 * 5 + b2 / 1e6 * 0.40, 2) == 86.05
