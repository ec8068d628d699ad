"""Static checks of the deployment configs under cluster/ (no network, no Kubernetes).

Each `problems_in_*` function returns what is wrong with one manifest, as readable strings; the
shipped files must give none, and a broken copy of each must give some, so that a check that
never fires is caught too. What the checks hold the files to, and why:
- the head runs no shard math (no GPU), the workers have GPUs, images match the pinned Ray;
- every Ray pod runs in token-auth mode with the token from the one Secret, and the operator is
  told too (authOptions), since it calls the dashboard itself to follow a RayJob;
- every entrypoint names a script in ray_jobs/ and configs that exist, parses with the real
  `merge-pipeline` CLI, and writes only to the shared volume, the one thing that outlives a
  job's pods;
- the object-store variant (`*-objectstore.yaml`, for clusters with no ReadWriteMany volume)
  has no PVC or shared volume at all (only pod-local emptyDir, i.e. /dev/shm), gives every Ray
  pod the store credentials from one Secret (never literals, never the runtime env), and names
  every location in its entrypoint (inputs, --out, history, report, work dirs, cache) as an
  object-store URI: a local path there is on one pod's disk, unseen by the others and gone
  with the pod;
- the nightly never overlaps itself.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import re
import shlex
import urllib.parse
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
RAY_VERSION = "2.60.0"
AUTH_SECRET, AUTH_KEY = "ray-auth-token", "auth_token"  # KubeRay's authOptions reads this key
SHARED_MOUNT, SHARED_CLAIM = "/mnt/shared", "merge-shared"
# The object-store variant: pyarrow reads the store's settings from these variables.
STORE_SECRET = "merge-object-store"
STORE_CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")  # required, from the Secret
STORE_SECRETS = {*STORE_CREDENTIALS, "AWS_SESSION_TOKEN"}  # never a literal anywhere
# Entrypoint flags that name a place to read or write, and their nightly/merge YAML keys.
LOCATION_FLAGS = {"--base": "base", "--finetuned": "finetuned", "--out": "out",
                  "--history": "history", "--report": "report", "--work-dir": "work_dir",
                  "--cache": "cache", "--artefact": "artefact"}
DAY_SECONDS = 24 * 3600
# RayCronJob spec fields of KubeRay v1.6 (timeZone came in 1.7): anything else is an invented
# field that the API server would refuse or drop.
RAYCRONJOB_FIELDS = {"schedule", "jobTemplate", "suspend"}


# ----------------------------------------------------------------------------- loading

def load_docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def embedded_manifests(configmap: dict) -> list[dict]:
    """Kubernetes manifests stored as strings in a ConfigMap (the nightly RayJob)."""
    found = []
    for text in (configmap.get("data") or {}).values():
        for doc in yaml.safe_load_all(text):
            if isinstance(doc, dict) and "kind" in doc:
                found.append(doc)
    return found


def manifests(path: Path) -> list[dict]:
    """Every Kubernetes object of a file, the ones inside its ConfigMaps included."""
    docs = [d for d in load_docs(path) if isinstance(d, dict) and "kind" in d]
    return docs + [m for d in docs if d["kind"] == "ConfigMap" for m in embedded_manifests(d)]


def is_launcher_config(doc) -> bool:
    return isinstance(doc, dict) and "cluster_name" in doc and "available_node_types" in doc


def storage_of(path: Path) -> str:
    """Where a manifest keeps what must outlive its pods: "shared" (the PVC) or "object-store"
    (the variant with no ReadWriteMany volume, named `*-objectstore.yaml`)."""
    return "object-store" if path.stem.endswith("-objectstore") else "shared"


YAML_FILES = sorted(CLUSTER.rglob("*.yaml"))
K8S_FILES = [p for p in YAML_FILES if any("kind" in d for d in load_docs(p) if isinstance(d, dict))]
LAUNCHER_FILES = [p for p in YAML_FILES if any(is_launcher_config(d) for d in load_docs(p))]


def the(kind: str, name: str) -> dict:
    """The one object of `kind` in cluster/kuberay/<name>, as a fresh copy to mutate."""
    found = [d for d in manifests(CLUSTER / "kuberay" / name) if d["kind"] == kind]
    assert len(found) == 1, f"{name}: expected one {kind}, found {len(found)}"
    return copy.deepcopy(found[0])


def entrypoints() -> list[tuple[str, str]]:
    found = []
    for path in K8S_FILES:
        for doc in manifests(path):
            spec = doc.get("spec") or {}
            job = spec.get("jobTemplate") if doc["kind"] == "RayCronJob" else spec
            if doc["kind"] in ("RayJob", "RayCronJob") and (job or {}).get("entrypoint"):
                found.append((f"{path.relative_to(REPO)}:{doc['kind']}", job["entrypoint"]))
    return found


# ----------------------------------------------------------------------------- checkers

def gpus(container: dict, field: str) -> int:
    return int(str(((container.get("resources") or {}).get(field) or {}).get("nvidia.com/gpu", 0)))


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env") or []}


def problems_in_ray_container(container: dict, where: str) -> list[str]:
    """Token auth on, with the token from the Secret (never a literal in the manifest)."""
    env, problems = env_of(container), []
    if (env.get("RAY_AUTH_MODE") or {}).get("value") != "token":
        problems.append(f"{where}: RAY_AUTH_MODE is not 'token'")
    ref = ((env.get("RAY_AUTH_TOKEN") or {}).get("valueFrom") or {}).get("secretKeyRef") or {}
    if (ref.get("name"), ref.get("key")) != (AUTH_SECRET, AUTH_KEY):
        problems.append(f"{where}: RAY_AUTH_TOKEN does not come from secret "
                        f"{AUTH_SECRET}/{AUTH_KEY}")
    return problems


def image_tag(image: str) -> str:
    return image.rsplit(":", 1)[1] if ":" in image.rsplit("/", 1)[-1] else ""


def python_of(image: str) -> str | None:
    match = re.search(r"-py(\d+)", image_tag(image))
    return match.group(1) if match else None


def secret_ref(entry: dict | None) -> dict:
    return (((entry or {}).get("valueFrom") or {}).get("secretKeyRef")) or {}


def problems_in_store_access(container: dict, where: str) -> list[str]:
    """The object-store credentials reach this container from the Secret, key = variable name
    (AWS_ENDPOINT_URL and AWS_REGION may come from it too, optional: plain AWS S3 needs
    neither)."""
    env, problems = env_of(container), []
    for name in STORE_CREDENTIALS:
        ref = secret_ref(env.get(name))
        if (ref.get("name"), ref.get("key")) != (STORE_SECRET, name) or ref.get("optional"):
            problems.append(f"{where}: {name} does not come from secret {STORE_SECRET}/{name} "
                            "(required, not optional)")
    for name in sorted(STORE_SECRETS & set(env)):
        if "value" in env[name]:
            problems.append(f"{where}: {name} is a literal in the manifest, not a secretKeyRef")
    return problems


def problems_in_volumes(pod_spec: dict, where: str) -> list[str]:
    """The object-store variant: no PVC, no shared or node volume, nothing at /mnt/shared; only
    pod-local emptyDir (Ray's /dev/shm), which dies with the pod and is seen by no other."""
    problems = []
    for volume in pod_spec.get("volumes") or []:
        sources = sorted(set(volume) - {"name"})
        if sources != ["emptyDir"]:
            problems.append(f"{where}: volume {volume.get('name')!r} is {'/'.join(sources)}; "
                            "only pod-local emptyDir here (no PVC, no shared volume)")
    for container in (pod_spec.get("containers") or []) + (pod_spec.get("initContainers") or []):
        for mount in container.get("volumeMounts") or []:
            if mount.get("mountPath", "").rstrip("/") == SHARED_MOUNT:
                problems.append(f"{where}: {container.get('name')} mounts {SHARED_MOUNT}")
    return problems


def problems_in_pod(pod_spec: dict, where: str, *, storage: str | None) -> list[str]:
    """A Ray pod. storage: "shared" (PVC at /mnt/shared), "object-store" (no shared volume,
    store credentials from the Secret), None (the RayJob submitter: it only talks to the
    dashboard, so it needs neither)."""
    problems = []
    containers = pod_spec.get("containers") or []
    if not containers:
        return [f"{where}: no containers"]
    ray = containers[0]  # KubeRay takes the first container as the Ray one
    problems += problems_in_ray_container(ray, where)
    if not image_tag(ray.get("image", "")).startswith(RAY_VERSION):
        problems.append(f"{where}: image {ray.get('image')!r} is not Ray {RAY_VERSION}")
    if storage == "object-store":
        problems += problems_in_volumes(pod_spec, where)
        problems += problems_in_store_access(ray, where)
    elif storage == "shared":
        claims = {v["name"]: (v.get("persistentVolumeClaim") or {}).get("claimName")
                  for v in pod_spec.get("volumes") or []}
        mounted = {m["mountPath"]: claims.get(m["name"]) for m in ray.get("volumeMounts") or []}
        if mounted.get(SHARED_MOUNT) != SHARED_CLAIM:
            problems.append(f"{where}: PVC {SHARED_CLAIM} is not mounted at {SHARED_MOUNT}")
    return problems


def problems_in_cluster_spec(spec: dict, where: str, storage: str = "shared") -> list[str]:
    problems = []
    if spec.get("rayVersion") != RAY_VERSION:
        problems.append(f"{where}: rayVersion {spec.get('rayVersion')!r} != {RAY_VERSION!r}")
    auth = spec.get("authOptions") or {}
    if auth.get("mode") != "token" or auth.get("secretName") != AUTH_SECRET:
        problems.append(f"{where}: authOptions must be mode token, secretName {AUTH_SECRET} "
                        "(the operator needs the token to follow jobs)")
    head = spec.get("headGroupSpec") or {}
    head_pod = (head.get("template") or {}).get("spec") or {}
    problems += problems_in_pod(head_pod, f"{where} head", storage=storage)
    if str((head.get("rayStartParams") or {}).get("num-gpus")) != "0":
        problems.append(f"{where}: head rayStartParams num-gpus is not '0'")
    if any(gpus(c, f) for c in head_pod.get("containers") or [] for f in ("limits", "requests")):
        problems.append(f"{where}: head asks for a GPU")
    groups = spec.get("workerGroupSpecs") or []
    if not groups:
        problems.append(f"{where}: no workerGroupSpecs")
    pythons = {python_of(c["image"]) for c in head_pod.get("containers", [])[:1]}
    for group in groups:
        name = f"{where} worker group {group.get('groupName')}"
        pod = (group.get("template") or {}).get("spec") or {}
        problems += problems_in_pod(pod, name, storage=storage)
        ray = (pod.get("containers") or [{}])[0]
        pythons.add(python_of(ray.get("image", "")))
        if gpus(ray, "limits") < 1 or gpus(ray, "requests") != gpus(ray, "limits"):
            problems.append(f"{name}: needs nvidia.com/gpu >= 1 in limits, the same in requests")
        low, n, high = (group.get(k, 0) for k in ("minReplicas", "replicas", "maxReplicas"))
        if not 0 <= low <= n <= high or high < 1:
            problems.append(f"{name}: replicas need 0 <= min <= replicas <= max, max >= 1")
    if len(pythons) != 1:
        problems.append(f"{where}: head and workers run different Pythons "
                        f"{sorted(map(str, pythons))}")
    return problems


def problems_in_raycluster(doc: dict, storage: str = "shared") -> list[str]:
    return problems_in_cluster_spec(doc.get("spec") or {}, f"RayCluster {doc['metadata']['name']}",
                                    storage)


def problems_in_rayjob_spec(spec: dict, where: str, storage: str = "shared") -> list[str]:
    problems = []
    if not spec.get("entrypoint"):
        problems.append(f"{where}: no entrypoint")
    elif storage == "object-store":
        problems += [f"{where}: {problem}"
                     for problem in problems_in_object_store_entrypoint(spec["entrypoint"])]
    if spec.get("shutdownAfterJobFinishes") is not True:
        problems.append(f"{where}: shutdownAfterJobFinishes is not true (GPUs left running)")
    if spec.get("rayClusterSpec"):
        problems += problems_in_cluster_spec(spec["rayClusterSpec"], where, storage)
    elif not spec.get("clusterSelector"):
        problems.append(f"{where}: neither rayClusterSpec nor clusterSelector")
    if not 0 < int(spec.get("activeDeadlineSeconds") or 0) < DAY_SECONDS:
        problems.append(f"{where}: activeDeadlineSeconds must be set, under a day")
    if spec.get("submissionMode", "K8sJobMode") == "K8sJobMode":
        submitter = ((spec.get("submitterPodTemplate") or {}).get("spec") or {})
        problems += problems_in_pod(submitter, f"{where} submitter", storage=None)
        if storage == "object-store":
            problems += problems_in_volumes(submitter, f"{where} submitter")
    try:
        runtime_env = yaml.safe_load(spec.get("runtimeEnvYAML") or "{}") or {}
        if not isinstance(runtime_env, dict):
            problems.append(f"{where}: runtimeEnvYAML is not a mapping")
        else:
            if any(re.match(r"[A-Za-z0-9_.-]*", str(p)).group().lower() == "ray"
                   for p in runtime_env.get("pip") or []):
                problems.append(f"{where}: runtime_env pip reinstalls ray over the image's")
            # The runtime env is shown by the dashboard and kept with the job: no secrets there.
            leaked = STORE_SECRETS & set(runtime_env.get("env_vars") or {})
            if leaked:
                problems.append(f"{where}: runtime_env env_vars carry {sorted(leaked)}; "
                                f"credentials come from secret {STORE_SECRET} in the pods' env")
    except yaml.YAMLError as error:
        problems.append(f"{where}: runtimeEnvYAML does not parse: {error}")
    return problems


def problems_in_rayjob(doc: dict, storage: str = "shared") -> list[str]:
    meta = doc.get("metadata") or {}
    return problems_in_rayjob_spec(doc.get("spec") or {},
                                   f"RayJob {meta.get('name') or meta.get('generateName')}",
                                   storage)


def is_five_field_cron(schedule) -> bool:
    fields = str(schedule).split()
    return len(fields) == 5 and all(re.fullmatch(r"[0-9A-Za-z*/,\-?]+", f) for f in fields)


def problems_in_raycronjob(doc: dict, storage: str = "shared") -> list[str]:
    where, spec = f"RayCronJob {doc['metadata']['name']}", doc.get("spec") or {}
    problems = []
    if not is_five_field_cron(spec.get("schedule")):
        problems.append(f"{where}: schedule {spec.get('schedule')!r} is not a 5-field cron")
    unknown = set(spec) - RAYCRONJOB_FIELDS
    if unknown:
        problems.append(f"{where}: fields the v1.6 CRD does not have: {sorted(unknown)}")
    if not isinstance(spec.get("jobTemplate"), dict):
        problems.append(f"{where}: no jobTemplate")
    else:
        problems += problems_in_rayjob_spec(spec["jobTemplate"], f"{where} jobTemplate", storage)
    return problems


def role_can_create_rayjobs(role: dict) -> bool:
    return any("ray.io" in r.get("apiGroups", []) and "rayjobs" in r.get("resources", [])
               and {"create", "get"} <= set(r.get("verbs", [])) for r in role.get("rules") or [])


def problems_in_cronjob(cronjob: dict, same_file: list[dict], storage: str = "shared"
                        ) -> list[str]:
    """The CronJob, the RayJob it creates from its ConfigMap, and the RBAC that allows that."""
    where, spec = f"CronJob {cronjob['metadata']['name']}", cronjob.get("spec") or {}
    problems = []
    if spec.get("concurrencyPolicy") != "Forbid":
        problems.append(f"{where}: concurrencyPolicy is not Forbid (nights could overlap)")
    if not is_five_field_cron(spec.get("schedule")):
        problems.append(f"{where}: schedule {spec.get('schedule')!r} is not a 5-field cron")
    for key in ("startingDeadlineSeconds", "successfulJobsHistoryLimit", "failedJobsHistoryLimit"):
        if key not in spec:
            problems.append(f"{where}: no {key}")
    job = (spec.get("jobTemplate") or {}).get("spec") or {}
    if job.get("backoffLimit") != 0:
        problems.append(f"{where}: launcher backoffLimit must be 0 (a rerun makes a 2nd RayJob)")
    pod = (job.get("template") or {}).get("spec") or {}
    by_kind_name = {(d["kind"], d["metadata"]["name"]): d
                    for d in same_file if "name" in d["metadata"]}
    account = pod.get("serviceAccountName")
    if ("ServiceAccount", account) not in by_kind_name:
        problems.append(f"{where}: service account {account!r} is not defined alongside")
    bound = [by_kind_name.get(("Role", b["roleRef"]["name"])) for b in same_file
             if b["kind"] == "RoleBinding"
             and any(s.get("name") == account for s in b.get("subjects") or [])]
    if not any(role and role_can_create_rayjobs(role) for role in bound):
        problems.append(f"{where}: {account!r} is not bound to a Role that can create rayjobs")
    rayjobs = []
    for volume in pod.get("volumes") or []:
        name = (volume.get("configMap") or {}).get("name")
        if name:
            configmap = by_kind_name.get(("ConfigMap", name))
            rayjobs += embedded_manifests(configmap) if configmap else []
    if len(rayjobs) != 1 or rayjobs[0].get("kind") != "RayJob":
        problems.append(f"{where}: its ConfigMap must hold exactly one RayJob")
    else:
        rayjob = rayjobs[0]
        if not rayjob["metadata"].get("generateName") or rayjob["metadata"].get("name"):
            problems.append(f"{where}: the RayJob needs generateName (a new name each night)")
        problems += problems_in_rayjob(rayjob, storage)
        own_deadline = int(rayjob["spec"].get("activeDeadlineSeconds") or 0)
        if int(job.get("activeDeadlineSeconds") or 0) <= own_deadline:
            problems.append(f"{where}: the launcher must outlive the RayJob's own deadline")
    return problems


def problems_in_entrypoint(entrypoint: str) -> list[str]:
    """Names a script under ray_jobs/ that exists; repo-relative paths exist; absolute paths
    are on the shared volume (anything else is lost with the job's pods)."""
    argv, problems = shlex.split(entrypoint), []
    if len(argv) < 2 or argv[0] != "python" or not argv[1].startswith("ray_jobs/"):
        return [f"{entrypoint!r}: not `python ray_jobs/<script>.py ...`"]
    if not (REPO / argv[1]).is_file():
        problems.append(f"{entrypoint!r}: {argv[1]} does not exist in the repo")
    for flag, value in zip(argv[2:], argv[3:]):
        if not flag.startswith("--") or value.startswith("--"):
            continue
        if value.startswith("/"):
            if not value.startswith(SHARED_MOUNT + "/"):
                problems.append(f"{entrypoint!r}: {flag} {value} is not under {SHARED_MOUNT}")
        elif value.endswith((".yaml", ".yml")) and not (REPO / value).is_file():
            problems.append(f"{entrypoint!r}: {flag} {value} does not exist in the repo")
    return problems


def flag_values(argv: list[str]) -> list[tuple[str, str]]:
    """(flag, value) for every value on a command line: `--finetuned a b` gives two pairs,
    `--out=x` one; a switch (`--resume`) none."""
    pairs, flag = [], None
    for token in argv:
        if token.startswith("--"):
            flag, has_value, value = token.partition("=")
            if has_value:
                pairs.append((flag, value))
        elif flag is not None:
            pairs.append((flag, token))
    return pairs


def is_object_store_uri(value: str) -> bool:
    """scheme://bucket/prefix on a store every pod reaches over the network: not file://
    (a local path), a prefix inside the bucket, no query string (the product refuses one in an
    output; the store is configured by the environment)."""
    parsed = urllib.parse.urlparse(value)
    return ("://" in value and parsed.scheme.lower() not in ("", "file") and bool(parsed.netloc)
            and bool(parsed.path.strip("/")) and not parsed.query and not parsed.fragment)


def problems_in_object_store_entrypoint(entrypoint: str) -> list[str]:
    """No shared volume: every location the job reads or writes (flags, and the fields of a
    --config it names, which must be a file of the repo, i.e. of the working_dir) is an
    object-store URI. A local path would be on the head pod's disk only: unseen by the workers,
    gone with the cluster."""
    argv = shlex.split(entrypoint)
    pairs, problems = flag_values(argv[2:]), []
    locations: dict[str, list[tuple[str, str]]] = {}  # config key -> [(where, value)]
    config = dict(pairs).get("--config")
    if config is not None:
        if config.startswith("/") or "://" in config:
            problems.append(f"--config {config}: not a file of the repo (working_dir); "
                            "there is no volume to hold it")
        elif (REPO / config).is_file():
            from pipeline.engine.config import load_yaml
            for key, value in load_yaml(str(REPO / config)).items():
                if key in LOCATION_FLAGS.values() and value is not None:
                    values = value if isinstance(value, list) else [value]
                    locations[key] = [(f"{config}: {key}", str(v)) for v in values]
    given: dict[str, list[tuple[str, str]]] = {}
    for flag, value in pairs:
        if flag in LOCATION_FLAGS:
            given.setdefault(LOCATION_FLAGS[flag], []).append((flag, value))
        elif flag != "--config" and value.startswith("/"):
            problems.append(f"{flag} {value}: a local path, on the head pod's disk only")
    locations.update(given)  # flags win over the config file, as in the CLI
    for key in LOCATION_FLAGS.values():
        for where, value in locations.get(key, []):
            if not is_object_store_uri(value):
                problems.append(f"{where} {value} is not an object-store URI "
                                "(scheme://bucket/prefix, no query string)")
    return problems


def _load_script(relative: str):
    spec = importlib.util.spec_from_file_location(Path(relative).stem, REPO / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # the scripts run main() only under __main__
    return module


def problems_in_arguments(entrypoint: str) -> list[str]:
    """The arguments parse with the real `merge-pipeline` parser, as the ray_jobs script builds
    them (so a flag that does not exist fails here, not on the cluster); a merge given as flags
    alone is also validated as a merge config."""
    from pipeline.cli.main import build_parser, merge_config_from_args
    from pipeline.cli.ray_job import job_argv
    from pipeline.errors import InputError
    from pipeline.methods.registry import get_method
    argv = shlex.split(entrypoint)
    scripts = {"ray_jobs/merge.py": lambda a: job_argv("merge", a),
               "ray_jobs/nightly.py": lambda a: job_argv("nightly", a),
               "ray_jobs/evaluate.py": lambda a: _load_script("ray_jobs/evaluate.py")
               .evaluate_argv(a)}
    if len(argv) < 2 or argv[1] not in scripts:
        return [f"{entrypoint!r}: no known ray_jobs script to parse the arguments of"]
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            args = build_parser().parse_args(scripts[argv[1]](argv[2:]))
    except SystemExit:
        last = (errors.getvalue().strip().splitlines() or ["?"])[-1]
        return [f"{entrypoint!r}: does not parse: {last}"]
    if args.command == "merge" and not args.config:
        try:
            get_method(merge_config_from_args(args).method)
        except InputError as error:
            return [f"{entrypoint!r}: not a valid merge: {error}"]
    return []


def problems_in_object_store_doc(doc: dict) -> list[str]:
    """Anywhere in an object-store manifest (every pod, every embedded object): no PVC or
    claim template, and no mention of the shared mount."""
    problems = []

    def walk(node, path):
        if isinstance(node, dict):
            if node.get("kind") in ("PersistentVolumeClaim", "PersistentVolume"):
                problems.append(f"{path}: a {node['kind']}")
            for key, value in node.items():
                if key in ("persistentVolumeClaim", "volumeClaimTemplate", "volumeClaimTemplates"):
                    problems.append(f"{path}.{key}: a PVC in the object-store variant")
                walk(value, f"{path}.{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{path}.{i}")
        elif isinstance(node, str) and SHARED_MOUNT in node:
            problems.append(f"{path}: names {SHARED_MOUNT}, which this variant does not have")

    walk(doc, doc.get("kind", "?"))
    return problems


def problems_in_launcher(config: dict) -> list[str]:
    """The cluster-launcher YAML (merge-cluster.yaml)."""
    problems = []
    types = config.get("available_node_types") or {}
    head_type = config.get("head_node_type")
    if head_type not in types:
        return [f"head_node_type {head_type!r} is not one of {sorted(types)}"]
    head = types[head_type]
    if (head.get("resources") or {}).get("GPU", 0) != 0:
        problems.append("the head node type has a GPU resource")
    if head.get("max_workers", 0) != 0:
        problems.append("the head node type has max_workers != 0")
    workers = {name: t for name, t in types.items() if name != head_type}
    if not any((t.get("resources") or {}).get("GPU", 0) >= 1 for t in workers.values()):
        problems.append("no worker node type has GPU >= 1")
    total = config.get("max_workers", 0)
    if sum(t.get("min_workers", 0) for t in types.values()) > total:
        problems.append("global max_workers is below the sum of min_workers")
    if any(t.get("max_workers", 0) > total for t in workers.values()):
        problems.append("a node type's max_workers exceeds the global max_workers")
    starts = [c for key in ("head_start_ray_commands", "worker_start_ray_commands")
              for c in config.get(key) or [] if "ray start" in c]
    if len(starts) < 2 or not all("RAY_AUTH_MODE=token" in c for c in starts):
        problems.append("every `ray start` must run with RAY_AUTH_MODE=token")
    if "~/.ray/auth_token" not in (config.get("file_mounts") or {}):
        problems.append("the token file ~/.ray/auth_token is not copied to the nodes")
    if not any(f"ray[default]=={RAY_VERSION}" in c for c in config.get("setup_commands") or []):
        problems.append(f"setup_commands do not pin ray[default]=={RAY_VERSION}")
    return problems


def problems_in_file(path: Path) -> list[str]:
    if path in LAUNCHER_FILES:
        return [p for d in load_docs(path) if is_launcher_config(d)
                for p in problems_in_launcher(d)]
    docs, storage = manifests(path), storage_of(path)
    problems = []
    for doc in docs:
        kind = doc["kind"]
        if kind in ("RayCluster", "RayJob", "RayCronJob") and doc.get("apiVersion") != "ray.io/v1":
            problems.append(f"{kind}: apiVersion is not ray.io/v1")
        if storage == "object-store":
            problems += problems_in_object_store_doc(doc)
        if kind == "RayCluster":
            problems += problems_in_raycluster(doc, storage)
        elif kind == "RayJob":
            problems += problems_in_rayjob(doc, storage)
        elif kind == "RayCronJob":
            problems += problems_in_raycronjob(doc, storage)
        elif kind == "CronJob":
            problems += problems_in_cronjob(doc, docs, storage)
    return problems


# ----------------------------------------------------------------------------- the shipped files

def test_every_yaml_under_cluster_parses():
    assert YAML_FILES, "no YAML under cluster/"
    for path in YAML_FILES:
        load_docs(path)  # raises on a syntax error


def test_all_the_kinds_are_shipped():
    kinds = {d["kind"] for p in K8S_FILES for d in manifests(p)}
    assert {"RayCluster", "RayJob", "RayCronJob", "CronJob", "ConfigMap", "ServiceAccount",
            "Role", "RoleBinding"} <= kinds
    assert [p.name for p in LAUNCHER_FILES] == ["merge-cluster.yaml"]
    # The object-store rules apply to something: a standing cluster and a merge RayJob.
    object_store = {d["kind"] for p in K8S_FILES if storage_of(p) == "object-store"
                    for d in manifests(p)}
    assert {"RayCluster", "RayJob"} <= object_store


@pytest.mark.parametrize("path", K8S_FILES + LAUNCHER_FILES, ids=lambda p: p.name)
def test_shipped_config_has_no_problems(path):
    assert problems_in_file(path) == []


def test_every_cluster_spec_is_the_same_cluster():
    """Six copies of the cluster (standing, merge, two nightlies, and the standing and merge
    clusters of the object-store variant, which differ only in storage): they must not drift."""
    def summary(spec):
        head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
        workers = [(g["groupName"], g["template"]["spec"]["containers"][0]["image"],
                    g["template"]["spec"]["containers"][0]["resources"])
                   for g in spec["workerGroupSpecs"]]
        return spec["rayVersion"], spec["authOptions"], head["image"], head["resources"], workers
    specs = [the("RayCluster", "raycluster.yaml")["spec"],
             the("RayJob", "rayjob-merge.yaml")["spec"]["rayClusterSpec"],
             the("RayJob", "nightly-cronjob.yaml")["spec"]["rayClusterSpec"],
             the("RayCronJob", "nightly-raycronjob.yaml")["spec"]["jobTemplate"]["rayClusterSpec"],
             the("RayCluster", "raycluster-objectstore.yaml")["spec"],
             the("RayJob", "rayjob-merge-objectstore.yaml")["spec"]["rayClusterSpec"]]
    assert all(summary(s) == summary(specs[0]) for s in specs[1:])


def test_both_variants_run_the_same_merge_job():
    """The object-store RayJob is rayjob-merge.yaml but for storage: same runtime env, deadlines,
    retry and submitter."""
    def summary(spec):
        return {k: v for k, v in spec.items() if k not in ("entrypoint", "rayClusterSpec")}
    assert (summary(the("RayJob", "rayjob-merge-objectstore.yaml")["spec"])
            == summary(the("RayJob", "rayjob-merge.yaml")["spec"]))


def test_both_nightlies_run_the_same_job_on_the_same_schedule():
    cron = the("CronJob", "nightly-cronjob.yaml")["spec"]
    job = the("RayJob", "nightly-cronjob.yaml")["spec"]
    ray_cron = the("RayCronJob", "nightly-raycronjob.yaml")["spec"]
    assert cron["schedule"] == ray_cron["schedule"]
    assert job == ray_cron["jobTemplate"]


def test_the_launcher_config_passes_rays_own_schema():
    # Ray's cluster-launcher validation (a private module, but what `ray up` runs); it fills in
    # the AWS defaults from files inside the wheel, no network.
    from ray.autoscaler._private.util import prepare_config, validate_config
    for path in LAUNCHER_FILES:
        validate_config(prepare_config(load_docs(path)[0]))


@pytest.mark.parametrize("entrypoint", [pytest.param(e, id=w) for w, e in entrypoints()])
def test_entrypoint_names_scripts_and_configs_that_exist(entrypoint):
    assert problems_in_entrypoint(entrypoint) == []


@pytest.mark.parametrize("entrypoint", [pytest.param(e, id=w) for w, e in entrypoints()])
def test_entrypoint_parses_with_the_real_cli(entrypoint):
    assert problems_in_arguments(entrypoint) == []


def test_the_nightly_entrypoint_config_loads(monkeypatch):
    """The nightly's --config is loaded the way the job will load it: repo-relative, from the
    root of the working_dir."""
    from pipeline.history.nightly import load_nightly_config
    nightly = [e for _, e in entrypoints() if "ray_jobs/nightly.py" in e]
    assert nightly
    monkeypatch.chdir(REPO)
    for entrypoint in nightly:
        argv = shlex.split(entrypoint)
        config = argv[argv.index("--config") + 1]
        assert config == "cluster/nightly.yaml"
        loaded = load_nightly_config(config)
        # What it writes must outlive the job's pods: the shared volume, or a URI.
        for path in (loaded.history, loaded.report, loaded.work_dir, loaded.cache):
            assert path is None or "://" in path or path.startswith(SHARED_MOUNT + "/"), path


# ----------------------------------------------------------------------------- each check can fail

def _set(path, value):
    """A mutation that sets (or, with None, deletes) the field at a dotted path like "a.0.b"."""
    def mutate(d):
        *parents, last = path.split(".")
        for key in parents:
            d = d[int(key)] if isinstance(d, list) else d[key]
        if value is None:
            del d[last]
        else:
            d[last] = value
    return mutate


def _head(spec):
    return spec["headGroupSpec"]["template"]["spec"]["containers"][0]


def _worker(spec):
    return spec["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]


def _drop_gpu_limit(d):
    del _worker(d["spec"])["resources"]["limits"]["nvidia.com/gpu"]


def _gpu_on_head(d):
    _head(d["spec"])["resources"]["limits"]["nvidia.com/gpu"] = 1


def _literal_token_on_worker(d):
    _worker(d["spec"])["env"][1] = {"name": "RAY_AUTH_TOKEN", "value": "hunter2"}


def _other_python_on_worker(d):
    _worker(d["spec"])["image"] = "rayproject/ray:2.60.0-py310-gpu"


def _no_auth_mode_on_submitter(d):
    d["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["env"].pop(0)


def _no_shared_volume_on_worker(d):
    _worker(d["spec"]["rayClusterSpec"])["volumeMounts"] = []


def _spec_of(d):
    return d["spec"].get("rayClusterSpec") or d["spec"]


def _pvc_on_worker(d):
    """The shared volume of raycluster.yaml put back into an object-store manifest."""
    pod = _spec_of(d)["workerGroupSpecs"][0]["template"]["spec"]
    pod["volumes"].append({"name": "shared", "persistentVolumeClaim": {"claimName": SHARED_CLAIM}})
    _worker(_spec_of(d))["volumeMounts"].append({"name": "shared", "mountPath": SHARED_MOUNT})


def _host_path_on_head(d):
    _spec_of(d)["headGroupSpec"]["template"]["spec"]["volumes"].append(
        {"name": "scratch", "hostPath": {"path": "/data"}})


def _store_env(container, name):
    return next(e for e in container["env"] if e["name"] == name)


def _literal_store_secret_on_worker(d):
    entry = _store_env(_worker(_spec_of(d)), "AWS_SECRET_ACCESS_KEY")
    entry.pop("valueFrom")
    entry["value"] = "hunter2"


def _no_store_key_on_head(d):
    head = _head(_spec_of(d))
    head["env"] = [e for e in head["env"] if e["name"] != "AWS_ACCESS_KEY_ID"]


def _store_key_from_other_secret(d):
    _store_env(_worker(_spec_of(d)), "AWS_ACCESS_KEY_ID")["valueFrom"]["secretKeyRef"]["name"] = \
        "someone-elses"


def _store_key_optional(d):
    _store_env(_head(_spec_of(d)), "AWS_SECRET_ACCESS_KEY")["valueFrom"]["secretKeyRef"][
        "optional"] = True


def _edit_entrypoint(old, new):
    def edit(d):
        assert old in d["spec"]["entrypoint"], old
        d["spec"]["entrypoint"] = d["spec"]["entrypoint"].replace(old, new)
    return edit


def _credentials_in_runtime_env(d):
    d["spec"]["runtimeEnvYAML"] += "env_vars: {AWS_SECRET_ACCESS_KEY: hunter2}\n"


OUT = "s3://YOUR_BUCKET/merged/tsv_m-4-tasks"


BROKEN = [
    ("RayCluster", "raycluster.yaml", _drop_gpu_limit, "nvidia.com/gpu >= 1"),
    ("RayCluster", "raycluster.yaml", _gpu_on_head, "head asks for a GPU"),
    ("RayCluster", "raycluster.yaml", _set("spec.headGroupSpec.rayStartParams.num-gpus", "1"),
     "num-gpus"),
    ("RayCluster", "raycluster.yaml", _set("spec.rayVersion", "2.40.0"), "rayVersion"),
    ("RayCluster", "raycluster.yaml", _set("spec.authOptions", None), "authOptions"),
    ("RayCluster", "raycluster.yaml", _literal_token_on_worker, "RAY_AUTH_TOKEN does not come"),
    ("RayCluster", "raycluster.yaml", _other_python_on_worker, "different Pythons"),
    ("RayJob", "rayjob-merge.yaml", _set("spec.shutdownAfterJobFinishes", None),
     "shutdownAfterJobFinishes"),
    ("RayJob", "rayjob-merge.yaml", _set("spec.entrypoint", None), "no entrypoint"),
    ("RayJob", "rayjob-merge.yaml", _set("spec.rayClusterSpec", None), "neither rayClusterSpec"),
    ("RayJob", "rayjob-merge.yaml", _no_auth_mode_on_submitter, "submitter: RAY_AUTH_MODE"),
    ("RayJob", "rayjob-merge.yaml", _no_shared_volume_on_worker, "not mounted"),
    ("RayJob", "rayjob-merge.yaml", _set("spec.runtimeEnvYAML", "pip: ['ray[default]==2.40']"),
     "reinstalls ray"),
    ("RayCronJob", "nightly-raycronjob.yaml", _set("spec.schedule", "0 2 * * * *"), "5-field"),
    ("RayCronJob", "nightly-raycronjob.yaml", _set("spec.jobTemplate", None), "no jobTemplate"),
    ("RayCronJob", "nightly-raycronjob.yaml", _set("spec.concurrencyPolicy", "Forbid"),
     "v1.6 CRD"),
    ("RayCronJob", "nightly-raycronjob.yaml", _set("spec.jobTemplate.activeDeadlineSeconds", None),
     "activeDeadline"),
    # The object-store variant: the checks of the shared one still apply ...
    ("RayCluster", "raycluster-objectstore.yaml", _drop_gpu_limit, "nvidia.com/gpu >= 1"),
    ("RayCluster", "raycluster-objectstore.yaml", _gpu_on_head, "head asks for a GPU"),
    ("RayCluster", "raycluster-objectstore.yaml", _set("spec.authOptions", None), "authOptions"),
    ("RayCluster", "raycluster-objectstore.yaml", _literal_token_on_worker,
     "RAY_AUTH_TOKEN does not come"),
    ("RayJob", "rayjob-merge-objectstore.yaml", _no_auth_mode_on_submitter,
     "submitter: RAY_AUTH_MODE"),
    ("RayJob", "rayjob-merge-objectstore.yaml", _set("spec.shutdownAfterJobFinishes", None),
     "shutdownAfterJobFinishes"),
    # ... and its own: no PVC or shared volume ...
    ("RayCluster", "raycluster-objectstore.yaml", _pvc_on_worker, "volume 'shared' is "
     "persistentVolumeClaim"),
    ("RayCluster", "raycluster-objectstore.yaml", _pvc_on_worker,
     "persistentVolumeClaim: a PVC in the object-store variant"),
    ("RayCluster", "raycluster-objectstore.yaml", _host_path_on_head, "only pod-local emptyDir"),
    ("RayJob", "rayjob-merge-objectstore.yaml", _pvc_on_worker, "mounts /mnt/shared"),
    ("RayJob", "rayjob-merge-objectstore.yaml",
     _edit_entrypoint("--resume", "--resume --cache /mnt/shared/suite-cache"),
     "names /mnt/shared, which this variant does not have"),
    ("RayJob", "rayjob-merge-objectstore.yaml",
     _set("spec.submitterPodTemplate.spec.volumes", [{"name": "shared", "nfs": {
         "server": "nfs.example", "path": "/export"}}]), "submitter: volume 'shared' is nfs"),
    # ... the store's credentials from the Secret, on every Ray pod, never in the open ...
    ("RayCluster", "raycluster-objectstore.yaml", _literal_store_secret_on_worker,
     "AWS_SECRET_ACCESS_KEY does not come from secret merge-object-store"),
    ("RayCluster", "raycluster-objectstore.yaml", _literal_store_secret_on_worker,
     "AWS_SECRET_ACCESS_KEY is a literal"),
    ("RayCluster", "raycluster-objectstore.yaml", _no_store_key_on_head,
     "head: AWS_ACCESS_KEY_ID does not come"),
    ("RayJob", "rayjob-merge-objectstore.yaml", _store_key_from_other_secret,
     "AWS_ACCESS_KEY_ID does not come from secret"),
    ("RayJob", "rayjob-merge-objectstore.yaml", _store_key_optional, "not optional"),
    ("RayJob", "rayjob-merge-objectstore.yaml", _credentials_in_runtime_env,
     "env_vars carry ['AWS_SECRET_ACCESS_KEY']"),
    # ... and every location in the entrypoint on the store.
    ("RayJob", "rayjob-merge-objectstore.yaml", _edit_entrypoint(OUT, "/tmp/merged"),
     "--out /tmp/merged is not an object-store URI"),
    ("RayJob", "rayjob-merge-objectstore.yaml", _edit_entrypoint(OUT, "merged"),
     "--out merged is not an object-store URI"),
    ("RayJob", "rayjob-merge-objectstore.yaml", _edit_entrypoint(OUT, "file:///tmp/merged"),
     "--out file:///tmp/merged is not"),
    ("RayJob", "rayjob-merge-objectstore.yaml", _edit_entrypoint(OUT, OUT + "?region=eu-west-1"),
     "no query string"),
    ("RayJob", "rayjob-merge-objectstore.yaml",
     _edit_entrypoint("s3://YOUR_BUCKET/merge-history", "/mnt/shared/merge-history"),
     "--history /mnt/shared/merge-history is not an object-store URI"),
    ("RayJob", "rayjob-merge-objectstore.yaml",
     _edit_entrypoint("s3://YOUR_BUCKET/checkpoints/task-3", "/data/task-3"),
     "--finetuned /data/task-3 is not"),
    ("RayJob", "rayjob-merge-objectstore.yaml",
     _edit_entrypoint("--assembly workers", "--config /mnt/shared/configs/merge.yaml"),
     "not a file of the repo"),
]


@pytest.mark.parametrize("kind,name,mutate,expected", BROKEN,
                         ids=[f"{k}-{e}" for k, _, _, e in BROKEN])
def test_a_broken_copy_is_reported(kind, name, mutate, expected):
    doc, storage = the(kind, name), storage_of(Path(name))
    checker = {"RayCluster": problems_in_raycluster, "RayJob": problems_in_rayjob,
               "RayCronJob": problems_in_raycronjob}[kind]

    def problems():
        found = checker(doc, storage)
        return found + (problems_in_object_store_doc(doc) if storage == "object-store" else [])
    assert problems() == []
    mutate(doc)
    assert any(expected in p for p in problems()), problems()


def _in(kind, mutate):
    """Apply `mutate` to the one object of `kind` among a file's documents."""
    return lambda docs: mutate(next(d for d in docs if d["kind"] == kind))


def _edit_nightly_rayjob(old, new):
    def edit(configmap):
        configmap["data"]["rayjob.yaml"] = configmap["data"]["rayjob.yaml"].replace(old, new)
    return _in("ConfigMap", edit)


@pytest.mark.parametrize("mutate,expected", [
    (_in("CronJob", _set("spec.concurrencyPolicy", "Allow")), "Forbid"),
    (_in("CronJob", _set("spec.schedule", "@nightly")), "5-field"),
    (_in("CronJob", _set("spec.jobTemplate.spec.backoffLimit", 3)), "backoffLimit"),
    (_in("CronJob", _set("spec.jobTemplate.spec.activeDeadlineSeconds", 3600)), "outlive"),
    (_in("Role", _set("rules.0.verbs", ["get", "list", "watch"])), "create rayjobs"),
    (_in("ConfigMap", lambda c: c.update(data={"rayjob.yaml": "kind: Job\nmetadata: {name: x}"})),
     "exactly one RayJob"),
    (_edit_nightly_rayjob("generateName: merge-nightly-", "name: merge-nightly"), "generateName"),
    (_edit_nightly_rayjob("shutdownAfterJobFinishes: true", ""), "shutdownAfterJobFinishes"),
], ids=["not-forbid", "not-5-field", "launcher-retries", "launcher-deadline", "rbac-no-create",
        "configmap-not-rayjob", "fixed-name", "rayjob-keeps-cluster"])
def test_a_broken_cronjob_is_reported(mutate, expected):
    docs = load_docs(CLUSTER / "kuberay" / "nightly-cronjob.yaml")
    cronjob = next(d for d in docs if d["kind"] == "CronJob")
    assert problems_in_cronjob(cronjob, docs) == []
    mutate(docs)
    problems = problems_in_cronjob(cronjob, docs)
    assert any(expected in p for p in problems), problems


def test_a_claim_anywhere_in_an_object_store_file_is_reported():
    assert problems_in_object_store_doc(the("RayJob", "rayjob-merge-objectstore.yaml")) == []
    claim = {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "x"}}
    assert any("a PersistentVolumeClaim" in p for p in problems_in_object_store_doc(claim))
    template = {"kind": "RayCluster", "spec": {"volumes": [
        {"name": "scratch", "ephemeral": {"volumeClaimTemplate": {"spec": {}}}}]}}
    assert any("volumeClaimTemplate: a PVC" in p for p in problems_in_object_store_doc(template))


@pytest.mark.parametrize("entrypoint,expected", [
    ("python ray_jobs/no_such_job.py --config cluster/merge-cluster.yaml", "does not exist"),
    ("python ray_jobs/merge.py --config cluster/no-such.yaml", "does not exist"),
    ("python ray_jobs/merge.py --config /tmp/merge.yaml", "not under /mnt/shared"),
    ("bash -c 'python ray_jobs/merge.py'", "not `python ray_jobs/"),
])
def test_a_broken_entrypoint_is_reported(entrypoint, expected):
    fine = "python ray_jobs/merge.py --config /mnt/shared/configs/m.yaml"
    assert problems_in_entrypoint(fine) == []
    assert any(expected in p for p in problems_in_entrypoint(entrypoint))


FLAGS_MERGE = ("python ray_jobs/merge.py --base s3://b/base --finetuned s3://b/t1 s3://b/t2 "
               "--method tsv_m --alpha 1 --out s3://b/merged")


@pytest.mark.parametrize("entrypoint,expected", [
    (FLAGS_MERGE + " --no-such-flag", "unrecognized arguments: --no-such-flag"),
    (FLAGS_MERGE + " --assembly everywhere", "--assembly = 'everywhere': must be"),
    (FLAGS_MERGE.replace("--out s3://b/merged", ""), "not a valid merge"),
    (FLAGS_MERGE.replace("tsv_m", "no_such_method"), "unknown method 'no_such_method'"),
    ("python ray_jobs/nightly.py --config cluster/nightly.yaml --reports s3://b/r.html",
     "unrecognized arguments"),
    ("python ray_jobs/evaluate.py bench --suite standard --out s3://b/x --no-such-flag",
     "unrecognized arguments: --no-such-flag"),
    ("python ray_jobs/unknown.py", "no known ray_jobs script"),
])
def test_a_broken_argument_list_is_reported(entrypoint, expected):
    for fine in (FLAGS_MERGE, "python ray_jobs/nightly.py --config cluster/nightly.yaml",
                 "python ray_jobs/evaluate.py bench --suite standard --out s3://b/bench"):
        assert problems_in_arguments(fine) == [], fine
    problems = problems_in_arguments(entrypoint)
    assert any(expected in p for p in problems), problems


@pytest.mark.parametrize("entrypoint,expected", [
    (FLAGS_MERGE + " --history /var/merge-history", "--history /var/merge-history is not"),
    (FLAGS_MERGE.replace("s3://b/t2", "gs://"), "--finetuned gs:// is not"),
    (FLAGS_MERGE.replace("s3://b/merged", "s3://b"), "--out s3://b is not"),
    (FLAGS_MERGE.replace("s3://b/merged", "s3://b/merged#x"), "no query string"),
    ("python ray_jobs/nightly.py --config cluster/nightly.yaml --history s3://b/h "
     "--report s3://b/r.html", "cluster/nightly.yaml: work_dir /mnt/shared/nightly is not"),
    ("python ray_jobs/nightly.py --config cluster/nightly.yaml --history s3://b/h "
     "--report s3://b/r.html --work-dir s3://b/w", "cache /mnt/shared/suite-cache is not"),
    ("python ray_jobs/nightly.py --history s3://b/h --report /tmp/r.html", "--report /tmp/r.html"),
    ("python ray_jobs/merge.py --config /etc/merge.yaml", "not a file of the repo"),
    (FLAGS_MERGE + " --suites /data/suite", "--suites /data/suite: a local path"),
])
def test_a_broken_object_store_entrypoint_is_reported(entrypoint, expected):
    assert problems_in_object_store_entrypoint(FLAGS_MERGE + " --history s3://b/h") == []
    assert problems_in_object_store_entrypoint(
        "python ray_jobs/nightly.py --history s3://b/h --report s3://b/r.html "
        "--work-dir s3://b/w --cache gs://c/suites") == []
    problems = problems_in_object_store_entrypoint(entrypoint)
    assert any(expected in p for p in problems), problems


@pytest.mark.parametrize("mutate,expected", [
    (lambda c: c["available_node_types"]["head"]["resources"].update(GPU=1),
     "head node type has a GPU"),
    (lambda c: c.update(head_node_type="gpu_head"), "head_node_type"),
    (lambda c: c["available_node_types"]["gpu_worker"]["resources"].update(GPU=0), "GPU >= 1"),
    (lambda c: c.update(max_workers=4), "exceeds the global max_workers"),
    (lambda c: c["available_node_types"]["gpu_worker"].update(min_workers=9), "sum of min_workers"),
    (lambda c: c.update(worker_start_ray_commands=["ray start --address=$RAY_HEAD_IP:6379"]),
     "RAY_AUTH_MODE=token"),
    (lambda c: c.pop("file_mounts"), "auth_token"),
    (lambda c: c.update(setup_commands=["pip install ray[default]"]), "pin ray"),
], ids=lambda x: x if isinstance(x, str) else "")
def test_a_broken_launcher_config_is_reported(mutate, expected):
    config = load_docs(CLUSTER / "merge-cluster.yaml")[0]
    assert problems_in_launcher(config) == []
    mutate(config)
    assert any(expected in p for p in problems_in_launcher(config)), problems_in_launcher(config)
