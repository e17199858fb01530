"""Beyond one machine, on real local components: a multi-node Ray cluster with fake GPUs, S3 through
a moto server over HTTP (boto3 and pyarrow), and a real Ray head receiving `sertune search submit`."""

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SMOKE = yaml.safe_load((REPO / "search_spaces" / "smoke.yaml").read_text())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except Exception:
            assert proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.5)
    raise AssertionError(f"{url} did not come up:\n{log.read_text()[-3000:]}")


def write_spec(tmp_path: Path, name: str, edit=None) -> Path:
    raw = yaml.safe_load(yaml.safe_dump(SMOKE))
    raw["name"] = name
    if edit:
        edit(raw)
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 server on a free localhost port, with a bucket; AWS settings in the environment."""
    import boto3

    root = tmp_path_factory.mktemp("moto")
    port = free_port()
    log = root / "moto.log"
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)  # fmt: skip
    endpoint = f"http://127.0.0.1:{port}"
    wait_http(f"{endpoint}/moto-api/", proc, log)
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}  # fmt: skip
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="sertune")
    yield endpoint
    for k, v in saved.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    proc.terminate()
    proc.wait(timeout=30)


def keys(prefix: str) -> list[str]:
    from sertune.storage import list_objects

    return list_objects(prefix)


def test_fake_gpu_cluster_packs_trials_as_the_spec_asks(tmp_path, home, monkeypatch):
    """Two nodes with one (fake) GPU each; 0.5 GPU per trial: two trials share each GPU."""
    import ray
    from ray.cluster_utils import Cluster

    from sertune.search import run_search
    from sertune.spec import load_spec

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": True}
    )
    nodes = [cluster.add_node(num_cpus=2, num_gpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    monkeypatch.setenv("RAY_ADDRESS", cluster.address)
    try:

        def edit(raw):
            raw["budget"].update(
                trials=4, concurrency=4, max_epochs=2, grace_epochs=2, max_steps_per_epoch=4
            )
            raw["resources"] = {"workers": 1, "cpus_per_worker": 1, "gpus_per_worker": 0.5}
            raw["robustness"] = None

        result = run_search(load_spec(write_spec(tmp_path, "packing", edit)), log=lambda *a: None)
        assert result.errors == 0 and len(result.rows) == 4
        from ray.tune import ExperimentAnalysis

        from sertune.search import experiment_path

        ea = ExperimentAnalysis(experiment_path("packing"))
        placements = []
        for t in ea.trials:
            first = t.metric_analysis  # noqa: F841 - ensure results loaded
            df = ea.trial_dataframes[t.trial_id]
            row = df.iloc[0]
            placements.append((row["placement/node"], str(row["placement/gpu_ids"])))
        worker_ids = {n.node_id for n in nodes}
        per_node = Counter(node for node, _ in placements)
        assert set(per_node) == worker_ids  # never on the GPU-less head
        assert sorted(per_node.values()) == [2, 2]  # two 0.5-GPU trials per one-GPU node
        assert all(gpus == "0" for _, gpus in placements)  # each trial got (a share of) GPU 0
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_s3_storage_checkpoints_cache_and_mlflow_artifacts(tmp_path, home, s3, monkeypatch):
    import pyarrow.fs as pafs
    import ray

    from sertune.registry import predict_files, promote
    from sertune.search import init_ray, run_search
    from sertune.spec import load_spec
    from sertune.storage import pyarrow_fs

    monkeypatch.setenv("SERTUNE_STORAGE", "s3://sertune/searches")
    monkeypatch.setenv("SERTUNE_CACHE", "s3://sertune/cache")
    monkeypatch.setenv("SERTUNE_ARTIFACT_ROOT", "s3://sertune/mlartifacts")
    monkeypatch.setenv("SERTUNE_NODE_CACHE", str(tmp_path / "node-cache"))
    if ray.is_initialized():
        ray.shutdown()
    init_ray(num_cpus=2)
    try:
        result = run_search(load_spec(write_spec(tmp_path, "s3search")), log=lambda *a: None)
    finally:
        ray.shutdown()
    assert result.errors == 0 and result.path == "s3://sertune/searches/s3search"
    ckpts = [k for k in keys("s3://sertune/searches/s3search/_train/") if k.endswith("/state.pt")]
    assert ckpts, keys("s3://sertune/searches/")
    assert any(k.endswith("tuner.pkl") for k in keys("s3://sertune/searches/s3search/"))
    cache = keys("s3://sertune/cache/")
    assert any(k.endswith("/COMPLETE") for k in cache) and any(
        k.endswith("/CHECKSUMS.json") for k in cache
    )
    assert any((tmp_path / "node-cache").glob("*/COMPLETE"))  # pulled to this node once
    arts = keys("s3://sertune/mlartifacts/")
    assert any(k.endswith("robustness/robustness.json") for k in arts)
    assert any(k.endswith("model.safetensors") for k in arts)
    fs, path = pyarrow_fs("s3://sertune/searches/s3search")  # pyarrow talks to the same endpoint
    listed = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    assert any(i.path.endswith("state.pt") for i in listed)

    v = promote("s3search")
    wav = next((home / "data" / "synthetic-smoke" / "wav").rglob("*.wav"))
    rows = predict_files(f"models:/{v['name']}@champion", [str(wav)])
    assert abs(sum(rows[0]["probabilities"].values()) - 1) < 1e-5


def test_submit_to_a_real_ray_head(tmp_path, home, s3):
    """`ray start --head` on localhost; `sertune search submit` through Ray Jobs; results in
    MLflow and S3."""
    ray_bin = str(Path(sys.executable).with_name("ray"))
    port, dash = free_port(), free_port()
    temp = Path(f"/tmp/rt{port}")  # Ray's socket paths must stay short
    # the head's `python` is this venv's, as a cluster image's would be its own
    path = f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"
    env = {**os.environ, "SERTUNE_HOME": str(home), "RAY_AUTH_MODE": "token", "PATH": path}
    env.pop("RAY_ADDRESS", None)
    start = subprocess.run(
        [ray_bin, "start", "--head", "--port", str(port), "--dashboard-port", str(dash), "--num-cpus", "2",
         "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--temp-dir", str(temp),
         "--disable-usage-stats"],
        env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert start.returncode == 0, start.stdout[-2000:] + start.stderr[-2000:]
    try:
        db = tmp_path / "team-mlflow.db"
        sub_env = {**env, "SERTUNE_STORAGE": "s3://sertune/submitted",
                   "MLFLOW_TRACKING_URI": f"sqlite:///{db}"}  # fmt: skip
        spec = write_spec(tmp_path, "submitted")
        p = subprocess.run(
            [sys.executable, "-m", "sertune.cli", "search", "submit", str(spec),
             "--address", f"http://127.0.0.1:{dash}", "--wait"],
            env=sub_env, capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        out = p.stdout + p.stderr
        assert p.returncode == 0, out[-4000:]
        assert "best trials of 'submitted' (2 trials, 0 failed)" in out
        status = subprocess.run([sys.executable, "-m", "sertune.cli", "search", "status", "submitted"],
                                env=sub_env, capture_output=True, text=True, timeout=120)  # fmt: skip
        assert "SUCCEEDED" in status.stdout, status.stdout + status.stderr
    finally:
        subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True, timeout=120)

    from mlflow import MlflowClient

    c = MlflowClient(f"sqlite:///{db}")
    exp = c.get_experiment_by_name("sertune")
    runs = c.search_runs([exp.experiment_id], "tags.`sertune.search` = 'submitted'")
    assert sorted(r.data.tags["sertune.kind"] for r in runs) == ["search", "trial", "trial"]
    ckpts = [
        k for k in keys("s3://sertune/submitted/submitted/_train/") if k.endswith("/state.pt")
    ]
    assert (
        len({k.split("/_train/")[1].split("/")[0] for k in ckpts}) == 2
    )  # both trials checkpointed
