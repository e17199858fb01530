"""Beyond one machine, on real local components: a multi-node Ray cluster with fake GPUs, S3 through
a moto server over HTTP (boto3 and pyarrow), and a real Ray head receiving `sertune search submit`."""

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
import yaml

from sertune.testing import free_port, start_ray_head, wait_http

REPO = Path(__file__).resolve().parents[2]
SMOKE = yaml.safe_load((REPO / "search_spaces" / "smoke.yaml").read_text())


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
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
    )
    endpoint = f"http://127.0.0.1:{port}"
    wait_http(f"{endpoint}/moto-api/", proc, log)
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
    }
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


@pytest.mark.slow
def test_fake_gpu_cluster_packs_trials_as_the_spec_asks(tmp_path, home, monkeypatch):
    """Two nodes with one (fake) GPU each; 0.5 GPU per trial: four warm slots, two sharing each
    node's GPU, none on the GPU-less head; every trial ran on a slot's GPU 0."""
    import ray
    from ray.cluster_utils import Cluster

    from sertune.cluster import shutdown_ray
    from sertune.search import run_search
    from sertune.spec import load_spec

    shutdown_ray()
    monkeypatch.setenv("RAY_worker_maximum_startup_concurrency", "8")
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
        slots = [
            pg["bundles_to_node_id"][0]
            for pg in ray.util.placement_group_table().values()
            if pg["bundles"].get(0, {}).get("GPU") == 0.5
        ]
        from ray.tune import ExperimentAnalysis

        from sertune.records import experiment_path

        ea = ExperimentAnalysis(experiment_path("packing"))
        placements = [
            (
                ea.trial_dataframes[t.trial_id].iloc[0]["placement/node"],
                str(ea.trial_dataframes[t.trial_id].iloc[0]["placement/gpu_ids"]),
            )
            for t in ea.trials
        ]
    finally:
        shutdown_ray()
        cluster.shutdown()
    worker_ids = {n.node_id for n in nodes}
    assert sorted(Counter(slots).values()) == [2, 2] and set(slots) == worker_ids
    assert {node for node, _ in placements} <= worker_ids  # never on the GPU-less head
    assert all(gpus == "0" for _, gpus in placements)  # each trial got (a share of) GPU 0


def test_s3_storage_checkpoints_cache_and_mlflow_artifacts(tmp_path, home, s3, monkeypatch):
    import pyarrow.fs as pafs

    from sertune.cluster import init_ray, shutdown_ray
    from sertune.inference import predict_files
    from sertune.registry import promote
    from sertune.search import run_search
    from sertune.spec import load_spec
    from sertune.storage import pyarrow_fs

    monkeypatch.setenv("SERTUNE_STORAGE", "s3://sertune/searches")
    monkeypatch.setenv("SERTUNE_CACHE", "s3://sertune/cache")
    monkeypatch.setenv("SERTUNE_ARTIFACT_ROOT", "s3://sertune/mlartifacts")
    monkeypatch.setenv("SERTUNE_NODE_CACHE", str(tmp_path / "node-cache"))
    shutdown_ray()
    init_ray(num_cpus=2)
    try:
        result = run_search(load_spec(write_spec(tmp_path, "s3search")), log=lambda *a: None)
    finally:
        shutdown_ray()
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


@pytest.fixture(scope="module")
def token_head(tmp_path_factory):
    """A real `ray start --head --block` with token authentication (Ray 2.60's default), in its
    own session and temp dir; stopped by its own processes, nothing else on the machine."""
    from sertune.testing import kill_owned

    tmp_path = tmp_path_factory.mktemp("head")
    home = tmp_path / "home"
    port, dash = free_port(), free_port()
    temp = f"/tmp/rt{port}"  # Ray's socket paths must stay short
    token = tmp_path / "cluster.token"
    token.write_text("sertune-test-" + os.urandom(16).hex())
    # distinctive fake secrets: the node's own credential chain has them, nothing may copy them
    secrets = {
        "AWS_SECRET_ACCESS_KEY": "SECRETaws" + os.urandom(8).hex(),
        "MLFLOW_TRACKING_PASSWORD": "SECRETmlflow" + os.urandom(8).hex(),
    }
    # the head's `python` is this venv's, as a cluster image's would be its own
    path = f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"
    env = {
        **os.environ,
        "SERTUNE_HOME": str(home),
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
        "PATH": path,
        "AWS_ACCESS_KEY_ID": "testing",
        "MLFLOW_TRACKING_USERNAME": "someone",
        **secrets,
    }
    env.pop("RAY_ADDRESS", None)
    log = tmp_path / "head.log"
    head = start_ray_head(port, dash, temp, env, log)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{dash}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:  # 401: up, and asking for the token
                break
            except OSError:
                assert head.poll() is None, log.read_text()[-3000:]
                time.sleep(0.5)
        yield {
            "address": f"http://127.0.0.1:{dash}",
            "token": token,
            "env": env,
            "temp": temp,
            "secrets": secrets,
            "home": home,
        }
    finally:
        kill_owned(session=head.pid, temp_dir=temp)


@pytest.mark.slow
def test_submit_to_a_token_authenticated_head(tmp_path, home, s3, token_head):
    """`sertune search submit` finds the token in Ray's standard places, never ships it, and the
    search runs on the head; results land in MLflow and S3. No credential (the token, AWS and
    MLflow secrets) reaches a file under the Ray temp dir, SERTUNE_HOME or the MLflow store."""
    db = tmp_path / "team-mlflow.db"
    sub_env = {
        **token_head["env"],
        "SERTUNE_STORAGE": "s3://sertune/submitted",
        "MLFLOW_TRACKING_URI": f"sqlite:///{db}",
    }
    sub_env.pop("RAY_AUTH_MODE")  # the client needs no Ray setting, only the token
    # robustness is not what this test checks: the report would only cost time on the head
    spec = write_spec(tmp_path, "submitted", lambda r: r.update(robustness=None))
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "sertune.cli",
            "search",
            "submit",
            str(spec),
            "--address",
            token_head["address"],
            "--wait",
        ],
        env=sub_env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    assert "best trials of 'submitted' (2 trials, 0 failed" in out
    assert token_head["token"].read_text() not in out
    status = subprocess.run(
        [sys.executable, "-m", "sertune.cli", "search", "status", "submitted"],
        env=sub_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "SUCCEEDED" in status.stdout, status.stdout + status.stderr

    from mlflow import MlflowClient

    c = MlflowClient(f"sqlite:///{db}")
    exp = c.get_experiment_by_name("sertune")
    runs = c.search_runs([exp.experiment_id], "tags.`sertune.search` = 'submitted'")
    assert sorted(r.data.tags["sertune.kind"] for r in runs) == ["search", "trial", "trial"]
    ckpts = [
        k for k in keys("s3://sertune/submitted/submitted/_train/") if k.endswith("/state.pt")
    ]
    assert len({k.split("/_train/")[1].split("/")[0] for k in ckpts}) == 2  # both checkpointed


def test_submit_without_a_token_says_where_to_put_it(tmp_path, home, token_head):
    env = {
        **token_head["env"],
        "HOME": str(tmp_path),
        "RAY_AUTH_TOKEN_PATH": str(tmp_path / "none"),
    }
    env.pop("RAY_AUTH_MODE")
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "sertune.cli",
            "search",
            "submit",
            str(write_spec(tmp_path, "x")),
            "--address",
            token_head["address"],
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2, p.stdout + p.stderr
    lines = p.stderr.strip().splitlines()
    assert (
        len(lines) == 1 and "requires an auth token" in lines[0] and "RAY_AUTH_TOKEN" in lines[0]
    )


@pytest.mark.slow
def test_a_second_ray_instance_on_the_host_does_not_disturb_a_search(tmp_path, home, token_head):
    """Another Ray (the head above) runs on this host: the search addresses its own cluster."""
    from sertune.cluster import shutdown_ray
    from sertune.search import run_search
    from sertune.spec import load_spec

    shutdown_ray()
    try:
        result = run_search(
            load_spec(write_spec(tmp_path, "beside", lambda r: r.update(robustness=None))),
            num_cpus=2,
            log=lambda *a: None,
        )
    finally:
        shutdown_ray()
    assert result.errors == 0 and result.completed == 2


@pytest.mark.slow
def test_a_study_submitted_to_a_head_runs_its_driver_there(tmp_path, home, token_head):
    """`sertune study submit` runs `sertune study run` as a Ray Job on the head (the same path
    as `search submit`): the job succeeds, the study's fold searches and its study run land in
    the team's MLflow store, and `study status` here shows the job's state."""
    import time

    db = tmp_path / "study-mlflow.db"
    sub_env = {**token_head["env"], "MLFLOW_TRACKING_URI": f"sqlite:///{db}"}
    sub_env.pop("RAY_AUTH_MODE")
    spec = write_spec(
        tmp_path,
        "substudy",
        lambda r: (
            r.update(robustness=None, reference=None)
            or r["budget"].update(trials=1, concurrency=1)
        ),
    )

    def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "sertune.cli", *args],
            env=sub_env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    p = cli("study", "submit", str(spec), "--outer", "0,1", "--address", token_head["address"])
    assert p.returncode == 0, p.stdout + p.stderr
    assert "submitted study 'substudy-study'" in p.stdout
    deadline, line = time.monotonic() + 900, ""
    while time.monotonic() < deadline:
        line = cli("study", "status", "substudy-study").stdout.splitlines()[0]
        if any(s in line for s in ("SUCCEEDED", "FAILED", "STOPPED")):
            break
        time.sleep(5)
    assert "SUCCEEDED" in line, line
    from mlflow import MlflowClient

    c = MlflowClient(f"sqlite:///{db}")
    exp = c.get_experiment_by_name("sertune").experiment_id
    study = c.search_runs([exp], "tags.`sertune.kind` = 'study'")
    assert len(study) == 1 and study[0].info.status == "FINISHED"
    kids = c.search_runs([exp], f"tags.`mlflow.parentRunId` = '{study[0].info.run_id}'")
    assert len(kids) == 4  # 2 outer folds x 2 arms
