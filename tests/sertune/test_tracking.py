"""MLflow end to end: smoke search -> parent/child runs with metrics, robustness.json and plots
-> promote (gates) -> alias champion -> predict. Against SQLite and a real `mlflow server`."""

import builtins
import json
import os
import pickle
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import yaml

from sertune.testing import free_port, start_mlflow, start_sertune

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.usefixtures("ray_2cpu")


def run_smoke(home: Path, name: str, tracking_uri: str | None):
    from sertune.search import run_search
    from sertune.spec import load_spec

    raw = yaml.safe_load((REPO / "search_spaces" / "smoke.yaml").read_text())
    raw["name"] = name
    raw["budget"]["max_epochs"] = 3
    raw["budget"]["grace_epochs"] = 3  # no early stop: both trials get a model and a report
    # every val_robust/* twin measured: the promotions below gate on twins val_uar does not read
    raw["robustness"]["validation"] = "all"
    spec_path = home.parent / f"{name}.yaml"
    spec_path.write_text(yaml.safe_dump(raw))
    return run_search(load_spec(spec_path), tracking_uri=tracking_uri, log=lambda *a: None)


class Env:
    """Module-scoped environment edits (monkeypatch is per test)."""

    def __init__(self, **values):
        self.values, self.saved = values, {}

    def __enter__(self):
        for k, v in self.values.items():
            self.saved[k] = os.environ.get(k)
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        return self

    def __exit__(self, *exc):
        for k, v in self.saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def sqlite_search(tmp_path_factory):
    home = tmp_path_factory.mktemp("sqlite") / "home"
    with Env(SERTUNE_HOME=str(home), MLFLOW_TRACKING_URI=None):
        result = run_smoke(home, "track", None)
        yield home, result


ADMIN_PASSWORD = "s3cret-not-in-any-log"


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` process on a free localhost port (SQLite backend, proxied artifacts)
    that asks for credentials (MLflow's basic-auth app)."""
    root = tmp_path_factory.mktemp("server")
    port = free_port()
    (root / "auth.ini").write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = sqlite:///{root / 'auth.db'}\n"
        f"admin_username = admin\nadmin_password = {ADMIN_PASSWORD}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        # check each credential's scrypt hash once, not on every request (hundreds in a search,
        # ~0.1 s of CPU each); a request without credentials is still refused
        "auth_cache_ttl_seconds = 3600\n"
    )
    env = {
        **os.environ,
        "MLFLOW_AUTH_CONFIG_PATH": str(root / "auth.ini"),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-secret-key",
    }
    proc = start_mlflow(root, port, app_name="basic-auth", env=env)
    url = f"http://127.0.0.1:{port}"
    yield url, root
    proc.terminate()
    proc.wait(timeout=30)


def a_wav(path: Path, seed=0) -> Path:
    from trainables.data.synth import make_speakers, synth_utterance

    rng = np.random.default_rng(seed)
    sf.write(path, synth_utterance(make_speakers(1, rng)[0], "angry", rng), 16000)
    return path


def check_runs_and_artifacts(tmp_path):
    from mlflow import MlflowClient

    from sertune import settings
    from sertune.tracking import get_experiment_id

    c = MlflowClient(settings.tracking_uri())
    runs = c.search_runs([get_experiment_id(c)], "tags.`sertune.kind` = 'trial'")
    assert len(runs) == 2
    for r in runs:
        assert r.info.status == "FINISHED" and r.data.tags["sertune.status"] == "finished"
        assert len(c.get_metric_history(r.info.run_id, "val_uar")) == 3  # per epoch
        for key in (
            "train_loss_emo",
            "train_loss_aug",
            "train_loss_rec",
            "test_uar",
            "robust/uar_snr10_white",
            "robust/uar_fgsm0.01",
        ):
            assert key in r.data.metrics, key
        d = c.download_artifacts(r.info.run_id, "robustness", str(tmp_path / r.info.run_id))
        report = json.loads((Path(d) / "robustness.json").read_text())
        assert (
            report["schema"] == "sertune.robustness/1"
            and report["noise"]
            and report["adversarial"]
        )
        assert (Path(d) / "uar_vs_snr.png").stat().st_size > 1000
    return runs


def test_sqlite_end_to_end(sqlite_search, tmp_path):
    from sertune.inference import predict_files
    from sertune.registry import promote
    from sertune.trainable import objective_value

    home, result = sqlite_search
    runs = check_runs_and_artifacts(tmp_path)
    v = promote("track", gates=["robust/uar_snr10_white>=0.0"])
    assert v["version"] == "1" and v["previous"] is None
    best = max(runs, key=lambda r: objective_value(r.data.metrics, "val_uar"))  # kept epoch's
    assert v["run_id"] == best.info.run_id

    from mlflow import MlflowClient

    from sertune import settings

    c = MlflowClient(settings.tracking_uri())
    mv = c.get_model_version_by_alias("ser-mtl-aug", "champion")
    assert str(mv.version) == "1"
    for tag in (
        "sertune.search",
        "sertune.trial_id",
        "sertune.data_fingerprint",
        "sertune.code_version",
    ):
        assert mv.tags[tag]
    # the version's Description: the figures of the run it came from, the gate it passed
    metrics = c.get_run(v["run_id"]).data.metrics
    for name in ("val_uar", "test_uar", "robust/uar_snr10_white"):
        label = f"{name} (objective)" if name == "val_uar" else name
        assert f"| {label} | {metrics[name]:.3f} |" in mv.description, mv.description
    assert "Gates passed: `robust/uar_snr10_white >= 0`" in mv.description
    rows = predict_files("models:/ser-mtl-aug@champion", [str(a_wav(tmp_path / "x.wav"))])
    assert rows[0]["emotion"] in ("angry", "happy", "neutral", "sad")
    assert abs(sum(rows[0]["probabilities"].values()) - 1) < 1e-5

    again = promote("track")  # idempotent: the same model keeps its version, no `previous`
    assert again["version"] == "1" and again["reused"] and again["previous"] is None
    # another trial's model (a choosing gate the champion fails, on a validation figure where
    # the two differ): a new version, and the old champion becomes `previous`
    other = next(r for r in runs if r.info.run_id != best.info.run_id)
    name = next(
        m
        for m, x in sorted(other.data.metrics.items())
        if m.startswith("val_robust/") and x != best.data.metrics.get(m, x)
    )
    x = other.data.metrics[name]
    op = "<=" if best.data.metrics[name] > x else ">="
    v2 = promote("track", gates=[f"{name}{op}{x!r}"])
    assert v2["run_id"] == other.info.run_id and not v2["reused"]
    assert v2["version"] == "2" and v2["previous"] == "1"
    assert str(c.get_model_version_by_alias("ser-mtl-aug", "previous").version) == "1"


def test_gate_failure_refuses_with_a_table(sqlite_search, capsys):
    from sertune.cli import main

    code = main(
        [
            "promote",
            "track",
            "--gate",
            "robust/uar_snr10_white>=1.01",
            "--gate",
            "val_uar>=0",
            "--name",
            "gated",
        ]
    )
    err = capsys.readouterr().err
    assert code == 3
    # val_uar chose the champion; the test speakers' gate only reports on it, and refuses it
    assert "refusing to promote trial" in err and "FAIL" in err and "pass" in err
    assert "robust/uar_snr10_white" in err and "it did not choose the champion" in err
    # a gate on the validation twin chooses: no trial passes it
    code = main(
        ["promote", "track", "--gate", "val_robust/uar_snr10_white>=1.01", "--name", "gated"]
    )
    err = capsys.readouterr().err
    assert code == 3 and "refusing to promote: no trial" in err
    assert "val_robust/uar_snr10_white" in err and "FAIL" in err
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from sertune import settings

    with pytest.raises(MlflowException):
        MlflowClient(settings.tracking_uri()).get_model_version_by_alias("gated", "champion")


def test_promoted_model_loads_without_pickle_or_training_code(
    sqlite_search, tmp_path, monkeypatch
):
    """Nothing in the artifact is unpickled; the training loop need not even be importable."""
    import torch

    from sertune.inference import load_pyfunc
    from sertune.registry import promote

    promote("track", model_name="nopickle")

    def refuse(*a, **k):
        raise AssertionError("pickle was used to load the model")

    for mod, names in ((pickle, ("load", "loads", "Unpickler")), (torch, ("load",))):
        for n in names:
            monkeypatch.setattr(mod, n, refuse)
    import cloudpickle

    monkeypatch.setattr(cloudpickle, "load", refuse)
    monkeypatch.setattr(cloudpickle, "loads", refuse)
    for m in [m for m in sys.modules if m.startswith("trainables.mtl_aug.train")]:
        monkeypatch.delitem(sys.modules, m)
    real_import = builtins.__import__

    def no_training_code(name, *a, **k):
        if name.startswith("trainables.mtl_aug.train") or name.startswith("ray"):
            raise ImportError(f"{name} is unavailable in this test")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_training_code)
    model = load_pyfunc("models:/nopickle@champion")
    import pandas as pd

    out = model.predict(
        pd.DataFrame({"waveform": [np.zeros(16000).tolist(), (0.1 * np.ones(9000)).tolist()]})
    )
    probs = out[[c for c in out.columns if c.startswith("p_")]].to_numpy()
    assert np.allclose(probs.sum(1), 1.0, atol=1e-5)


def test_mlflow_models_predict_cli(sqlite_search, tmp_path):
    from sertune import settings

    inp = tmp_path / "in.json"
    inp.write_text(
        json.dumps({"dataframe_split": {"columns": ["waveform"], "data": [[[0.0] * 8000]]}})
    )
    out = tmp_path / "out.json"
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlflow",
            "models",
            "predict",
            "-m",
            "models:/ser-mtl-aug@champion",
            "-i",
            str(inp),
            "-t",
            "json",
            "-o",
            str(out),
            "--env-manager",
            "local",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "MLFLOW_TRACKING_URI": settings.tracking_uri()},
    )
    assert p.returncode == 0, p.stderr[-2000:]
    preds = json.loads(out.read_text())["predictions"][0]
    assert preds["emotion"] in ("angry", "happy", "neutral", "sad")
    assert abs(sum(v for k, v in preds.items() if k.startswith("p_")) - 1) < 1e-5


def test_mlflow_server_end_to_end(mlflow_server, tmp_path, capfd):
    """Against a real server that asks for credentials; they come from the environment only."""
    from mlflow import MlflowClient

    from sertune.inference import predict_files
    from sertune.registry import promote

    url, root = mlflow_server
    home = tmp_path / "home"
    anonymous = dict(MLFLOW_TRACKING_USERNAME=None, MLFLOW_TRACKING_PASSWORD=None)
    with Env(SERTUNE_HOME=str(home), MLFLOW_TRACKING_URI=url, **anonymous):
        with pytest.raises(Exception, match="401|nauthori|credentials"):
            MlflowClient(url).search_experiments()  # the server really asks
    # the credentials in the URL, as users paste them: kept only in MLflow's variables
    secret_url = url.replace("http://", f"http://admin:{ADMIN_PASSWORD}@")
    with Env(SERTUNE_HOME=str(home), MLFLOW_TRACKING_URI=secret_url, **anonymous):
        run_smoke(home, "server", secret_url)
        runs = check_runs_and_artifacts(tmp_path)
        v = promote("server")
        assert v["version"] == "1"
        again = promote("server")  # idempotent: the same model keeps its version
        assert again["version"] == "1" and again["reused"] and not again["previous"]
        rows = predict_files("models:/ser-mtl-aug@champion", [str(a_wav(tmp_path / "y.wav"))])
        assert abs(sum(rows[0]["probabilities"].values()) - 1) < 1e-5
        parent = MlflowClient(url).get_run(runs[0].data.tags["mlflow.parentRunId"])
    assert any((root / "artifacts").rglob("robustness.json"))  # stored by the server, not locally
    assert not (home / "mlflow.db").exists()
    # the password is never logged or echoed: not in runs, tags, the search record or the output
    for r in [*runs, parent]:
        assert ADMIN_PASSWORD not in json.dumps({**r.data.params, **r.data.tags})
    assert ADMIN_PASSWORD not in (home / "state" / "searches" / "server.json").read_text()
    # nor in any file the search left under its home (Tune's pickles included)
    holding = [
        str(f)
        for f in home.rglob("*")
        if f.is_file() and ADMIN_PASSWORD.encode() in f.read_bytes()
    ]
    assert holding == []
    assert any(home.rglob("tuner.pkl"))
    out, err = capfd.readouterr()
    assert ADMIN_PASSWORD not in out + err


def test_report_command_on_a_registered_model(sqlite_search, tmp_path, capsys):
    from sertune.cli import main
    from sertune.registry import promote

    home, _ = sqlite_search
    promote("track", model_name="reported")
    out = tmp_path / "report"
    code = main(
        [
            "report",
            "models:/reported@champion",
            "--corpus",
            "synthetic",
            "--root",
            str(home / "data" / "synthetic-smoke"),
            "--out",
            str(out),
            "--max-utterances",
            "16",
        ]
    )
    assert code == 0
    report = json.loads((out / "robustness.json").read_text())
    assert report["data"]["utterances"] == 16 and len(report["noise"]) == 8  # 2 noises x 4 SNRs
    assert "Clean UAR" in capsys.readouterr().out
    assert (
        main(
            [
                "report",
                "models:/reported@champion",
                "--corpus",
                "emodb",
                "--root",
                str(tmp_path / "no"),
            ]
        )
        == 2
    )


@pytest.mark.slow
def test_an_mlflow_outage_loses_no_record(tmp_path):
    """The tracking server goes down in the middle of a search and comes back: training goes on,
    the console says MLflow is unreachable and when it caught up, and every record arrives in
    order (each trial's val_uar at steps 1..N, every run closed, every model logged)."""
    import os
    import re
    import signal

    from mlflow import MlflowClient

    from sertune.testing import kill_owned

    root, home, port = tmp_path / "server", tmp_path / "home", free_port()
    root.mkdir()
    server = start_mlflow(root, port)
    raw = yaml.safe_load((REPO / "search_spaces" / "smoke.yaml").read_text())
    raw.update(name="outage", robustness=None)
    raw["budget"].update(trials=3, concurrency=1, max_epochs=3, grace_epochs=3)
    # epochs of about a second with warm slots (3x smoke's corpus in batches of 2, without
    # smoke's cap of 3 steps), so records keep coming while the server is down
    raw["data"]["synthetic"]["per_class"] = 18
    raw["params"]["optim.min_steps_per_epoch"] = 200
    raw["budget"]["max_steps_per_epoch"] = 200
    spec = tmp_path / "outage.yaml"
    spec.write_text(yaml.safe_dump(raw))
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "SERTUNE_HOME": str(home),
        "SERTUNE_RAY_NUM_CPUS": "2",
        "PYTHONUNBUFFERED": "1",
        "MLFLOW_TRACKING_URI": url,
        # a request caught by the shutdown fails after 10 s (sertune's default is 20 s), so the
        # outage below need only be longer than that
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    }
    proc, lines = start_sertune("search", "run", str(spec), env=env)
    try:
        deadline = time.monotonic() + 300
        while not re.search(r"trial \w+ epoch 1/3", "".join(lines)):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)[-3000:]
            time.sleep(0.1)
        os.killpg(server.pid, signal.SIGTERM)  # the outage
        server.wait(timeout=30)
        # down longer than the driver's MLflow request timeout (10 s, above): a request caught
        # by the shutdown fails within the outage instead of succeeding on its retry after it;
        # back before the journal's retry at ~31 s (its backoff 1+2+4+8+16 s), not at ~61 s
        time.sleep(15)
        server = start_mlflow(root, port)  # back, same store
        proc.wait(timeout=600)
    finally:
        kill_owned(session=proc.pid)
    out = "".join(lines)
    assert proc.returncode == 0, out[-4000:]
    assert re.search(rf"\[mlflow\] {re.escape(url)} unreachable", out), out
    assert re.search(r"\[mlflow\] caught up after \d+s \(\d+ records sent in order\)", out), out
    try:
        c = MlflowClient(url)
        runs = c.search_runs(
            [c.get_experiment_by_name("sertune").experiment_id], "tags.`sertune.search` = 'outage'"
        )
        trials = [r for r in runs if r.data.tags["sertune.kind"] == "trial"]
        assert len(runs) == 4 and len(trials) == 3
        for r in runs:
            assert r.info.status == "FINISHED", r.info
        for r in trials:
            hist = c.get_metric_history(r.info.run_id, "val_uar")
            assert [m.step for m in hist] == [1, 2, 3], [m.step for m in hist]
            assert r.data.tags.get("sertune.model_uri")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_a_registered_model_serves_without_this_checkout(sqlite_search, tmp_path):
    """The model carries the code that loads it and needs only public packages: in a Python
    where `sertune` and `trainables` are not importable (third-party packages only), it loads,
    predicts, and `mlflow models serve` answers a REST request."""
    import mlflow

    from sertune import settings
    from sertune.registry import promote
    from sertune.testing import kill_owned

    promote("track", model_name="portable")
    mlflow.set_tracking_uri(settings.tracking_uri())
    mlflow.set_registry_uri(settings.tracking_uri())
    model = mlflow.artifacts.download_artifacts(
        "models:/portable@champion", dst_path=str(tmp_path / "m")
    )
    reqs = (Path(model) / "requirements.txt").read_text()
    assert "sertune" not in reqs and "torch==2.11.0" in reqs and "torchaudio==2.11.0" in reqs

    # a Python with this venv's third-party packages but not the project (no editable finder)
    env_dir = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    site = next(p for p in sys.path if p.endswith("site-packages"))
    (next(env_dir.glob("lib/python*/site-packages")) / "deps.pth").write_text(site + "\n")
    py = str(env_dir / "bin" / "python")
    uvicorn = env_dir / "bin" / "uvicorn"  # the console script `mlflow models serve` runs
    uvicorn.write_text(f"#!{py}\nimport sys\nfrom uvicorn.main import main\nsys.exit(main())\n")
    uvicorn.chmod(0o755)
    clean = {"PATH": f"{env_dir / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path)}
    code = (
        "import importlib.util, sys, numpy as np, pandas as pd, mlflow.pyfunc\n"
        "assert importlib.util.find_spec('sertune') is None, 'the checkout leaked in'\n"
        f"m = mlflow.pyfunc.load_model({model!r})\n"
        "out = m.predict(pd.DataFrame({'waveform': [np.zeros(8000).tolist(), (0.1*np.ones(40000)).tolist()]}))\n"
        "print(sys.modules['sertune.serving'].__file__)\n"
        "print(out.to_json(orient='records'))\n"
    )
    p = subprocess.run(
        [py, "-c", code], cwd=tmp_path, env=clean, capture_output=True, text=True, timeout=300
    )
    assert p.returncode == 0, p.stderr[-3000:]
    loaded_from, rows = p.stdout.strip().splitlines()[-2:]
    assert loaded_from.startswith(str(Path(model) / "code"))  # the model's own copy of the loader
    rows = json.loads(rows)
    assert len(rows) == 2 and all(
        abs(sum(v for k, v in r.items() if k.startswith("p_")) - 1) < 1e-5 for r in rows
    )

    port = free_port()
    server = subprocess.Popen(
        [
            py,
            "-m",
            "mlflow",
            "models",
            "serve",
            "-m",
            model,
            "-p",
            str(port),
            "--env-manager",
            "local",
        ],
        cwd=tmp_path,
        env=clean,
        stdout=open(tmp_path / "serve.log", "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        body = json.dumps(
            {"dataframe_split": {"columns": ["waveform"], "data": [[[0.0] * 8000]]}}
        ).encode()
        deadline = time.monotonic() + 180
        while True:
            try:
                req = urllib.request.Request(
                    f"http://127.0.0.1:{port}/invocations",
                    data=body,
                    headers={"Content-Type": "application/json"},
                )
                answer = json.loads(urllib.request.urlopen(req, timeout=10).read())
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, (
                    tmp_path / "serve.log"
                ).read_text()[-3000:]
                time.sleep(1)
        (pred,) = answer["predictions"]
        assert pred["emotion"] in ("angry", "happy", "neutral", "sad")
    finally:
        kill_owned(session=server.pid)


def test_a_resume_names_the_ended_trials_a_stale_state_lacks(sqlite_search):
    """Tune's saved state with a trial fewer than MLflow saw end (a state older than its
    trials): the resume's check names it; the search's whole state has every one."""
    import shutil

    from sertune.driver import Search
    from sertune.records import experiment_path, load_record

    record = load_record("track")
    search = Search("track", record.spec, record, log=lambda *a: None)
    assert search.restored_note("track") is None
    stale = Path(experiment_path("track-stale"))
    shutil.copytree(experiment_path("track"), stale)
    for f in stale.glob("experiment_state-*.json"):
        state = json.loads(f.read_text())
        dropped = json.loads(state["trial_data"][0][0])["trial_id"]
        state["trial_data"] = state["trial_data"][1:]
        f.write_text(json.dumps(state))
    note = search.restored_note("track-stale")
    assert note and f"but not 1 that ended before the stop ({dropped})" in note
