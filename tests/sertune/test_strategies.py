"""Search strategies chosen in the spec: every sampler and scheduler of the registry builds and
proposes valid configurations, incompatible choices are refused before anything starts, and a
search warm-started from an earlier one begins with its trials."""

from pathlib import Path

import pytest
import yaml

from sertune import strategies
from sertune.spec import SpecError, load_spec
from sertune.trainable import EPOCHS_DONE
from tests.linear_trainable import linear_spec

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "search_spaces" / "smoke.yaml"
MULTI = {
    "metrics": [
        {"metric": "val_uar", "mode": "max"},
        {"metric": "val_robust/uar_snr0_white", "mode": "max"},
    ]
}


def smoke(**sets):
    return load_spec(SMOKE, sets=[f"{k}={v}" for k, v in sets.items()])


def refusal(edit) -> str:
    raw = yaml.safe_load(SMOKE.read_text())
    edit(raw)
    with pytest.raises(SpecError) as e:
        from sertune.spec import validate_spec

        validate_spec(raw, "x.yaml", check_paths=False)
    return str(e.value)


@pytest.mark.parametrize("sampler", list(strategies.SAMPLERS))
def test_every_sampler_validates_and_proposes_configurations_in_the_space(sampler):
    """Through Ray Tune's OptunaSearch, as a search uses it: 5 proposals, each told its result."""
    from sertune.tuner import build_tuner

    sets = {"search.sampler": sampler, "budget.trials": 5}
    if sampler == "grid":  # a grid needs discrete values
        sets.update(
            {
                "space.loss.w_aug.step": 0.5,
                "space.loss.w_rec.step": 0.5,
                "space.aug.p_white_noise.step": 0.25,
            }
        )
    spec = smoke(**sets)
    tuner = build_tuner(spec, f"s-{sampler}", lambda c: None)
    searcher = tuner._local_tuner._tune_config.search_alg  # what Tune will ask
    for i in range(5):
        config = searcher.suggest(f"t{i}")
        assert set(config) == set(spec.space), config
        for name, p in spec.space.items():
            assert p.low <= config[name] <= p.high, (name, config)
        searcher.on_trial_complete(f"t{i}", {"val_uar": 0.1 * i, EPOCHS_DONE: 2})
    assert (
        type(searcher._ot_study.sampler)
        .__name__.lower()
        .startswith(
            {
                "tpe": "tpe",
                "random": "random",
                "cmaes": "cmaes",
                "gp": "gp",
                "nsga2": "nsgaii",
                "grid": "grid",
            }[sampler]
        )
    )


@pytest.mark.parametrize("scheduler", list(strategies.SCHEDULERS))
def test_every_scheduler_builds_with_the_spec_knobs(scheduler):
    from sertune.tuner import build_tuner

    sets = {"search.scheduler": scheduler}
    if scheduler == "pbt":
        sets["search.sampler"] = "random"
    spec = smoke(**sets)
    tuner = build_tuner(spec, f"t-{scheduler}", lambda c: None)
    built = tuner._local_tuner._tune_config.scheduler
    assert (
        type(built).__name__
        == {
            "asha": "AsyncHyperBandScheduler",
            "hyperband": "AsyncHyperBandScheduler",
            "median": "MedianStoppingRule",
            "pbt": "PopulationBasedTraining",
            "none": "FIFOScheduler",
        }[scheduler]
    )
    if scheduler == "hyperband":
        assert len(built._brackets) == 3
    if scheduler == "pbt":  # the aux weights and the augmentation mix, by default
        assert set(built._hyperparam_mutations) == {
            "loss.w_aug",
            "loss.w_rec",
            "aug.p_white_noise",
        }


def test_presets_keep_tpe_and_asha():
    spec = load_spec(REPO / "search_spaces" / "mtl_aug.yaml")
    assert spec.search.sampler == "tpe" and spec.search.scheduler_name(False) == "asha"
    multi = smoke(**{"objective": MULTI})
    assert multi.search.scheduler_name(True) == "none"


def test_incompatible_or_unknown_choices_are_refused_naming_the_field():
    def cmaes_multi(raw):
        raw["objective"] = MULTI
        raw["search"] = {"sampler": "cmaes"}

    msg = refusal(cmaes_multi)
    assert (
        "x.yaml: search.sampler: 'cmaes' optimises one objective; this objective has several"
        in msg
    )

    def median_multi(raw):
        raw["objective"] = MULTI
        raw["search"] = {"sampler": "nsga2", "scheduler": "median"}

    assert "search.scheduler: 'median' ranks trials on one metric" in refusal(median_multi)

    def bad_knobs(raw):
        raw["search"] = {
            "sampler": "tpe",
            "sampler_options": {"n_startup": 3},
            "scheduler": "asha",
            "scheduler_options": {"reduction_factor": 1},
        }

    msg = refusal(bad_knobs)
    assert (
        "search.sampler_options.n_startup: unknown option of sampler 'tpe' (known: n_startup_trials, multivariate)"
        in msg
    )
    assert "search.scheduler_options.reduction_factor: must be > 1" in msg

    def unknown(raw):
        raw["search"] = {"sampler": "annealing", "scheduler": "pbt"}

    msg = refusal(unknown)
    assert (
        "search.sampler: unknown sampler 'annealing'; known: tpe, random, cmaes, gp, nsga2, grid"
        in msg
    )
    assert "search.scheduler: unknown scheduler 'pbt'" not in msg

    def pbt_with_tpe(raw):
        raw["search"] = {"sampler": "tpe", "scheduler": "pbt"}
        raw["confirm"] = {"top_k": 1, "seeds": 2}
        raw["execution"] = "per_trial"

    msg = refusal(pbt_with_tpe)
    assert "search.sampler: pbt explores the population itself" in msg
    assert "execution: pbt hands checkpoints between warm slots" in msg
    assert "confirm: a PBT result is a schedule" in msg

    def continuous_grid(raw):
        raw["search"] = {"sampler": "grid"}

    assert "space.loss.w_aug: grid needs a step for a float parameter" in refusal(continuous_grid)
    # NSGA-II with one objective is fine
    assert smoke(**{"search.sampler": "nsga2"}).search.sampler == "nsga2"


@pytest.mark.slow
@pytest.mark.usefixtures("ray_2cpu")
def test_a_warm_started_search_begins_with_the_earlier_trials(home, tmp_path):
    """Search A (random sampler, median stopping), then B (CMA-ES, async Hyperband) warm-started
    from A: B's Optuna study holds A's finished trials before its own, and says so."""
    from ray.tune.search.optuna import OptunaSearch

    from sertune.records import experiment_path, load_record
    from sertune.search import run_search

    def spec(name, search):
        space = {
            "optim.lr": {"type": "float", "low": 0.01, "high": 0.1, "log": True},
            "features.n_mels": {"type": "int", "low": 8, "high": 16},
        }
        raw = linear_spec(home, name, space=space, search=search)
        p = tmp_path / f"{name}.yaml"
        p.write_text(yaml.safe_dump(raw))
        return load_spec(p)

    a = run_search(spec("ws-a", {"sampler": "random", "scheduler": "median"}), log=lambda *m: None)
    assert a.errors == 0 and a.completed == 2
    lines: list[str] = []
    b_spec = spec(
        "ws-b",
        {
            "sampler": "cmaes",
            "scheduler": "hyperband",
            "sampler_options": {"n_startup_trials": 1},
            "warm_start": ["ws-a"],
        },
    )
    b = run_search(b_spec, log=lines.append)
    assert b.errors == 0 and b.completed == 2
    assert any(
        "warm start: 2 finished trial(s) seed the sampler (2 from 'ws-a')" in ln for ln in lines
    ), lines
    assert load_record("ws-b").warm_start["sources"] == {"ws-a": 2}

    # the saved searcher state: A's two trials first, then B's own two
    searcher = OptunaSearch()
    searcher.restore_from_dir(experiment_path("ws-b"))
    trials = searcher._ot_study.trials
    assert len(trials) == 4
    seeded = [t.user_attrs.get("sertune.warm_start", "") for t in trials]
    assert all(s.startswith("ws-a/") for s in seeded[:2]) and seeded[2:] == ["", ""]
    a_lrs = sorted(r["config"]["optim.lr"] for r in a.rows)
    assert sorted(t.params["optim.lr"] for t in trials[:2]) == pytest.approx(a_lrs)

    from mlflow import MlflowClient

    from sertune import settings
    from sertune.tracking import get_experiment_id

    c = MlflowClient(settings.tracking_uri())
    (parent,) = c.search_runs(
        [get_experiment_id(c)], "tags.`sertune.kind` = 'search' and tags.`sertune.search` = 'ws-b'"
    )
    assert parent.data.tags["sertune.warm_start"] == "ws-a (2 trials)"
    assert parent.data.params["search.sampler"] == "cmaes"
    assert parent.data.params["search.scheduler"] == "hyperband"

    with pytest.raises(
        Exception, match=r"search.warm_start.0: no search or MLflow experiment named 'nope'"
    ):
        run_search(spec("ws-c", {"warm_start": ["nope"]}), log=lambda *m: None)


@pytest.mark.slow
@pytest.mark.usefixtures("ray_2cpu")
def test_pbt_exploits_and_explores_with_warm_slots_and_records_the_schedule(home, tmp_path):
    """4 trials, 2 at a time, 6 epochs, perturbing optim.lr every epoch: weaker trials take a
    stronger trial's checkpoint (copied into their own storage, continued in their own slot)
    and go on with a perturbed value; MLflow has every trial's schedule, the parent the winner's."""
    import json

    from mlflow import MlflowClient

    from sertune import settings
    from sertune.search import run_search
    from sertune.tracking import get_experiment_id

    raw = linear_spec(
        home,
        "pbt",
        budget={"trials": 4, "concurrency": 2, "max_epochs": 6, "grace_epochs": 1},
        params={"features.n_mels": 16},
        space={"optim.lr": {"type": "float", "low": 0.001, "high": 0.5, "log": True}},
        search={
            "sampler": "random",
            "scheduler": "pbt",
            "scheduler_options": {
                "mutate": ["optim.lr"],
                "perturbation_interval": 1,
                "quantile_fraction": 0.5,
                "resample_probability": 0.5,
            },
        },
    )
    p = tmp_path / "pbt.yaml"
    p.write_text(yaml.safe_dump(raw))
    lines: list[str] = []
    result = run_search(load_spec(p), log=lines.append)
    assert result.errors == 0 and result.completed == 4, lines
    exploits = [ln for ln in lines if "'s checkpoint at epoch" in ln]
    assert exploits, "\n".join(lines)
    assert all(" goes on with optim.lr=" in ln for ln in exploits)

    c = MlflowClient(settings.tracking_uri())
    runs = c.search_runs([get_experiment_id(c)], "tags.`sertune.search` = 'pbt'")
    children = [r for r in runs if r.data.tags.get("sertune.kind") == "trial"]
    (parent,) = [r for r in runs if r.data.tags.get("sertune.kind") == "search"]
    assert len(children) == 4
    for ch in children:  # the learning rate each epoch trained with
        hist = c.get_metric_history(ch.info.run_id, "schedule/optim.lr")
        assert hist and all(0.001 <= m.value <= 0.5 for m in hist)
    assert any(k.startswith("sertune.pbt_exploit_epoch_") for ch in children for k in ch.data.tags)
    local = c.download_artifacts(parent.info.run_id, "summary", str(tmp_path / "dl"))
    assert (Path(local) / "pbt_schedule.png").is_file()
    sched = json.loads((Path(local) / "pbt_schedules.json").read_text())
    winner = sched["schedules"][sched["winner"]]
    epochs = [e[0] for e in winner]  # its whole lineage, epoch by epoch
    assert epochs == sorted(set(epochs)) and epochs[0] == 1 and epochs[-1] == 6
    assert sched["winner"] == result.rows[0]["trial"]


@pytest.mark.usefixtures("ray_2cpu")
@pytest.mark.parametrize(
    "search",
    [
        pytest.param({"sampler": "gp", "scheduler": "none"}, marks=pytest.mark.slow),
        pytest.param({"sampler": "nsga2", "scheduler": "asha"}, marks=pytest.mark.slow),
        pytest.param({"sampler": "grid", "scheduler": "median"}, marks=pytest.mark.slow),
    ],
    ids=lambda s: f"{s['sampler']}+{s['scheduler']}",
)
def test_a_two_trial_search_runs_with_each_remaining_sampler(home, tmp_path, search):
    """The samplers the other searches here do not train with (tpe+asha, random+median,
    cmaes+hyperband and pbt have theirs): a 2-trial search finishes and records its choice."""
    from sertune.records import load_record
    from sertune.search import run_search

    space = {
        "optim.lr": {"type": "float", "low": 0.01, "high": 0.1, "step": 0.03},
        "features.n_mels": {"type": "int", "low": 8, "high": 16},
    }
    name = f"two-{search['sampler']}"
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(linear_spec(home, name, space=space, search=search)))
    result = run_search(load_spec(p), log=lambda *m: None)
    assert result.errors == 0 and result.completed == 2
    assert len({tuple(sorted(r["config"].items())) for r in result.rows}) == 2  # two proposals
    spec = load_record(name).spec
    assert (spec.search.sampler, spec.search.scheduler) == (
        search["sampler"],
        search["scheduler"],
    )


def test_every_factory_gets_each_option_with_its_one_default_applied():
    """A factory reads a complete mapping: the spec's value where given, else the knob's default
    (a value, a function of the budget, or None for the library's own) - never its own."""
    import dataclasses

    ctx = strategies.Context(
        seed=0,
        trials=12,
        max_epochs=8,
        grace_epochs=2,
        reduction_factor=3.0,
        metric="val_uar",
        mode="max",
        space={},
    )
    for table in (strategies.SAMPLERS, strategies.SCHEDULERS):
        for name, entry in table.items():
            got = dataclasses.replace(entry, make=lambda o, c: o).build({}, ctx)
            assert set(got) == set(entry.knobs), name
    tpe = dataclasses.replace(strategies.SAMPLERS["tpe"], make=lambda o, c: o)
    assert tpe.build({}, ctx) == {"n_startup_trials": 4, "multivariate": False}
    assert tpe.build({"n_startup_trials": 7}, ctx)["n_startup_trials"] == 7
    asha = dataclasses.replace(strategies.SCHEDULERS["asha"], make=lambda o, c: o)
    assert asha.build({}, ctx) == {"grace_epochs": 2, "reduction_factor": 3.0}
    nsga = dataclasses.replace(strategies.SAMPLERS["nsga2"], make=lambda o, c: o)
    assert nsga.build({}, ctx) == {"population_size": 6, "crossover_prob": 0.9}
