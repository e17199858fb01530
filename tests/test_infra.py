"""infra/ is well formed and agrees with pyproject.toml on versions."""

import re
import tomllib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
DEPS = PYPROJECT["project"]["dependencies"]


def pin(name: str) -> str:
    """'2.60' for ray[...]==2.60.*, '2.11' for torch==2.11.0 (or ==2.11.*)."""
    for d in DEPS:
        m = re.match(rf"^{re.escape(name)}(\[[^\]]*\])?==(\d+\.\d+)(\.\*|\.\d+)$", d)
        if m:
            return m.group(2)
    raise AssertionError(f"{name} is not pinned as ==X.Y.* or ==X.Y.Z in pyproject.toml")


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def images(obj) -> list[str]:
    found = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == "image" and isinstance(v, str):
                found.append(v)
            else:
                found += images(v)
    elif isinstance(obj, list):
        for v in obj:
            found += images(v)
    return found


def test_every_manifest_parses():
    files = sorted(INFRA.rglob("*.yaml"))
    assert len(files) >= 4
    for f in files:
        assert docs(f), f


def test_sertune_images_carry_the_pinned_versions():
    ray, torch = pin("ray"), pin("torch")
    version = PYPROJECT["project"]["version"]
    tag = f"{version}-ray{ray}.0-torch{torch}"
    for f in (
        INFRA / "kuberay" / "raycluster.yaml",
        INFRA / "kuberay" / "rayjob.yaml",
        INFRA / "cluster" / "aws-gpu.yaml",
    ):
        imgs = [i for d in docs(f) for i in images(d) if "sertune" in i]
        assert imgs and all(i.endswith(f":{tag}") for i in imgs), (f, imgs)
    dockerfile = (INFRA / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{ray}.0-" in dockerfile


def run_lines(dockerfile: str) -> list[str]:
    """The Dockerfile's RUN instructions, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", dockerfile)
    return [ln.strip()[4:] for ln in text.splitlines() if ln.strip().startswith("RUN ")]


def test_the_image_installs_from_the_lock_and_resolves_nothing():
    dockerfile = (INFRA / "Dockerfile").read_text()
    assert "COPY --chown=ray:users requirements.lock /opt/sertune/requirements.lock" in dockerfile
    installs = [r for r in run_lines(dockerfile) if "pip install" in r]
    assert installs, "no pip install in the Dockerfile"
    # every package from the lock, hashes checked, no resolution of its own
    assert any(
        "-r /opt/sertune/requirements.lock" in r and "--require-hashes" in r and "--no-deps" in r
        for r in installs
    ), installs
    # the project on top, without dependencies or a build environment from the network
    assert any(
        r.split("&&")[0].rstrip().endswith("/opt/sertune")
        and "--no-deps" in r
        and "--no-build-isolation" in r
        for r in installs
    ), installs
    for r in installs:  # no package named by range anywhere (torch, torchaudio, ...)
        assert "--no-deps" in r and not re.search(r"[\"'][A-Za-z0-9_.-]+\s*[=<>~!]=", r), r
    # the build refuses an image that cannot run a trial, checking against the same lock
    assert "ENV SERTUNE_LOCK=/opt/sertune/requirements.lock" in dockerfile
    assert any(r.endswith("sertune doctor") for r in installs)


def test_raycluster_has_a_cpu_head_and_an_autoscaling_gpu_group():
    (rc, cm) = docs(INFRA / "kuberay" / "raycluster.yaml")
    assert rc["apiVersion"] == "ray.io/v1" and rc["kind"] == "RayCluster"
    assert rc["spec"]["rayVersion"] == f"{pin('ray')}.0"
    assert rc["spec"]["enableInTreeAutoscaling"] is True
    head = rc["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert "nvidia.com/gpu" not in str(head)
    (gpu,) = rc["spec"]["workerGroupSpecs"]
    assert gpu["minReplicas"] < gpu["maxReplicas"]
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1"
    assert cm["kind"] == "ConfigMap" and cm["data"]["SERTUNE_STORAGE"].startswith("s3://")
    assert not any(k.startswith("AWS_SECRET") or "PASSWORD" in k for k in cm["data"])  # no secrets


def test_rayjob_runs_a_search_from_a_shipped_spec():
    (job,) = docs(INFRA / "kuberay" / "rayjob.yaml")
    assert job["kind"] == "RayJob" and job["spec"]["shutdownAfterJobFinishes"] is True
    entry = job["spec"]["entrypoint"]
    assert entry.startswith("sertune search run /opt/sertune/search_spaces/")
    spec_file = entry.split()[3]
    assert (REPO / "search_spaces" / Path(spec_file).name).exists()
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == f"{pin('ray')}.0"


def test_mlflow_compose_is_postgres_s3_and_basic_auth():
    (compose,) = docs(INFRA / "mlflow" / "docker-compose.yaml")
    svc = compose["services"]
    assert {"postgres", "minio", "mlflow"} <= set(svc)
    cmd = svc["mlflow"]["command"]
    assert "--app-name basic-auth" in cmd and "postgresql://" in cmd and "s3://" in cmd
    installed = re.search(r"mlflow:v([\d.]+)", svc["mlflow"]["image"]).group(1)
    assert f"mlflow[auth]=={installed}" in cmd
    mlflow_floor = next(d for d in DEPS if d.startswith("mlflow"))
    assert tuple(map(int, installed.split("."))) >= tuple(
        map(int, mlflow_floor.split(">=")[1].split("."))
    )
    for s in svc.values():  # passwords come from .env, never from the file
        for v in (s.get("environment") or {}).values():
            assert "${" in str(v) or "PASSWORD" not in str(v)
    ini = (INFRA / "mlflow" / "basic_auth.ini").read_text()
    assert "authorization_function = mlflow.server.auth:authenticate_request_basic_auth" in ini


def test_cluster_launcher_config():
    (cfg,) = docs(INFRA / "cluster" / "aws-gpu.yaml")
    assert cfg["provider"]["type"] == "aws"
    gpu = cfg["available_node_types"]["gpu"]
    assert gpu["node_config"]["InstanceType"].startswith(("g", "p"))
    assert cfg["available_node_types"][cfg["head_node_type"]]["resources"] == {"CPU": 0}
    assert (
        "ami-REPLACE-ME" in (INFRA / "README.md").read_text()
    )  # the one value operators must set


# -- KubeRay manifests against KubeRay v1.7.0's own CRD schemas (infra/kuberay/crds/) -------------


def crd_schema(kind: str) -> dict:
    import gzip

    name = {"RayCluster": "ray.io_rayclusters.yaml.gz", "RayJob": "ray.io_rayjobs.yaml.gz"}[kind]
    crd = yaml.safe_load(gzip.decompress((INFRA / "kuberay" / "crds" / name).read_bytes()))
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


def as_json_schema(node):
    """Kubernetes' OpenAPI dialect -> JSON Schema (int-or-string, preserved unknown fields)."""
    if isinstance(node, list):
        return [as_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: as_json_schema(v) for k, v in node.items() if not k.startswith("x-kubernetes")}
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    return out


def pruned(obj, schema, path="") -> list[str]:
    """Fields of ``obj`` that the schema does not declare: Kubernetes would silently drop them."""
    if isinstance(obj, dict) and schema.get("type") == "object":
        if schema.get("x-kubernetes-preserve-unknown-fields") or "properties" not in schema:
            return []
        found = []
        for k, v in obj.items():
            if k not in schema["properties"]:
                found.append(f"{path}.{k}")
            else:
                found += pruned(v, schema["properties"][k], f"{path}.{k}")
        return found
    if isinstance(obj, list) and "items" in schema:
        return [p for i, v in enumerate(obj) for p in pruned(v, schema["items"], f"{path}[{i}]")]
    return []


def test_kuberay_manifests_validate_against_the_crd_schemas():
    import jsonschema

    checked = 0
    for f in sorted((INFRA / "kuberay").glob("*.yaml")):
        for doc in docs(f):
            if doc.get("apiVersion") != "ray.io/v1":
                continue
            schema = crd_schema(doc["kind"])
            jsonschema.validate(doc, as_json_schema(schema))  # types, enums, required fields
            assert pruned(doc, schema) == [], f"{f.name}: fields Kubernetes would drop"
            checked += 1
    assert checked == 2


def test_the_validator_catches_a_misplaced_field():
    (rc, _) = docs(INFRA / "kuberay" / "raycluster.yaml")
    rc["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0  # not a string
    rc["spec"]["authOption"] = {"mode": "token"}  # typo: would be pruned silently
    import jsonschema
    import pytest

    schema = crd_schema("RayCluster")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(rc, as_json_schema(schema))
    assert ".spec.authOption" in pruned(rc, schema)


def test_clusters_are_token_authenticated():
    (rc, _) = docs(INFRA / "kuberay" / "raycluster.yaml")
    assert rc["spec"]["authOptions"]["mode"] == "token"
    (job,) = docs(INFRA / "kuberay" / "rayjob.yaml")
    assert job["spec"]["rayClusterSpec"]["authOptions"]["mode"] == "token"
    (cfg,) = docs(INFRA / "cluster" / "aws-gpu.yaml")
    assert all(
        "RAY_AUTH_MODE=token ray start" in c
        for c in cfg["head_start_ray_commands"][1:] + cfg["worker_start_ray_commands"][1:]
    )
    assert "/home/ray/.ray/auth_token" in cfg["file_mounts"]
    readme = (INFRA / "README.md").read_text()
    assert "RAY_AUTH_TOKEN" in readme and "auth_token" in readme
