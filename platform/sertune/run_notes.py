"""What a search's runs say in MLflow besides their figures: a trial's note (its run page's
first words), which reported keys are metrics, and the parent run's params."""

from __future__ import annotations

from typing import Any

from . import tracking
from .spec import SearchSpec
from .trainable import BEST_EPOCH, REPORT_BOOKKEEPING

NOTE = "mlflow.note.content"  # the run page's description: markdown, shown first


def image(path: str, title: str) -> str:
    """A markdown image of one of the run's own artifacts, as the MLflow UI serves them."""
    return f"![{title}](get-artifact?path={path.replace('/', '%2F')}&run_uuid={{run_id}})"


def trial_note(
    trial_id: str, result: dict[str, Any], epochs: int, stopped: bool, shown: tuple[str, ...]
) -> str:
    """A trial's run page, first thing: which epoch it is, its robustness plots, the figures
    (``shown`` first - the objective and the trainable's display metrics - then every
    ``robust/*``)."""
    best = result.get(BEST_EPOCH)
    lines = [
        f"**Trial {trial_id}** — {'stopped early by the scheduler' if stopped else 'finished'} "
        f"after {epochs} epoch(s); its result is its kept epoch (smoothed validation best)"
        + (f" ({int(best) + 1})." if best is not None else "."),
        "",
        image("robustness/uar_vs_snr.png", "UAR vs SNR"),
        image("robustness/uar_vs_eps.png", "UAR vs adversarial ε"),
        "",
        "| figure | value |",
        "|---|---|",
    ]
    robust = sorted(k for k in result if k.startswith("robust/") and k not in shown)
    for k in dict.fromkeys([*shown, *robust]):
        if isinstance(result.get(k), (int, float)):
            lines.append(f"| {k} | {result[k]:.3f} |")
    lines += ["", "Report: Artifacts → robustness (robustness.json, summary.md)."]
    return "\n".join(lines)


# Tune's bookkeeping and the report contract's, never metrics
REPORTED_SKIP = {
    "timestamp",
    "time_this_iter_s",
    "time_total_s",
    "pid",
    "time_since_restore",
    "iterations_since_restore",
    "training_iteration",
    "epoch",
    "done",
    "checkpoint_dir_name",
    *REPORT_BOOKKEEPING,
}


def metric_rows(result: dict[str, Any], ts_ms: int) -> list[list[Any]]:
    rows = []
    for k, v in result.items():
        if k in REPORTED_SKIP or k.startswith(("config/", "placement/")):
            continue
        value = tracking.clean_value(v)
        if value is not None:
            rows.append([k, value, ts_ms])
    return rows


def parent_params(spec: SearchSpec) -> dict[str, Any]:
    """The search's settings as the parent run's params."""
    params = {f"budget.{k}": v for k, v in spec.budget.model_dump().items()}
    params |= {f"resources.{k}": v for k, v in spec.resources.model_dump().items()}
    params |= {"seed": spec.seed, "space": ",".join(sorted(spec.space))}
    params |= {f"fixed.{k}": v for k, v in spec.params.items()}
    params |= {"execution": spec.execution}
    params |= {"search.sampler": spec.search.sampler, "search.scheduler": spec.scheduler}
    params |= {f"search.sampler_options.{k}": v for k, v in spec.search.sampler_options.items()}
    params |= {
        f"search.scheduler_options.{k}": v for k, v in spec.search.scheduler_options.items()
    }
    return params
