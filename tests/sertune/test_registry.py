"""A registered version's Description, on its own (no MLflow): why this version won."""

from sertune.registry import version_description
from sertune.tracking import Run


def test_a_single_trial_s_description_names_its_figures_gates_and_search():
    best = {
        "run": Run(run_id="r1", tags={"sertune.trial_id": "abc12"}),
        "metrics": {
            "val_uar": 0.6123,
            "test_uar": 0.5,
            "robust/uar_snr10_white": 0.41,
            "val_robust/uar_snr10_white": 0.45,
        },
        "sd": {},
        "n": 1,
        "label": "trial abc12",
        "origin": None,
    }
    gates = [
        ("val_robust/uar_snr10_white", ">= 0.4", "0.4500", "pass"),  # chose the champion
        ("robust/uar_snr10_white", ">= 0.3", "0.4100", "pass"),  # only reported on it
    ]
    text = version_description(
        "demo", best, "val_uar", ["test_uar", "robust/uar_snr10_white"], gates
    )
    assert text.splitlines()[0] == (
        "**Promoted by sertune from search `demo`**: trial abc12, its kept epoch (its smoothed validation curve's best) "
        "(MLflow run `r1`)."
    )
    assert "| val_uar (objective) | 0.612 |" in text
    assert "| test_uar | 0.500 |" in text and "| robust/uar_snr10_white | 0.410 |" in text
    assert (
        "Gates passed: `val_robust/uar_snr10_white >= 0.4` (0.4500); "
        "`robust/uar_snr10_white >= 0.3` (0.4100, reported on the test speakers; it did not "
        "choose the champion)." in text
    )


def test_a_confirmed_configuration_shows_means_and_spread_over_its_seeds():
    best = {
        "run": Run(run_id="r2", tags={"sertune.trial_id": "A1"}),
        "metrics": {"val_uar": 0.71, "test_uar": 0.66},
        "sd": {"val_uar": 0.01, "test_uar": 0.02},
        "n": 3,
        "label": "configuration of trial A",
        "origin": "A",
    }
    text = version_description("steady", best, "val_uar", ["test_uar", "robust/missing"], [])
    assert "the median seed of configuration of trial A, confirmed with 3 fresh seeds" in text
    assert "| val_uar (objective) | 0.710 ± 0.010 (mean ± sd, 3 seeds) |" in text
    assert "| test_uar | 0.660 ± 0.020 (mean ± sd, 3 seeds) |" in text
    assert "| robust/missing | - |" in text and "No gates were asked for." in text
