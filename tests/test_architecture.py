"""The layers hold: every module has a place in the import-linter contract, a wrong import fails
`make lint`, and the Ray internals the workarounds rely on are where Ray 2.60 had them."""

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]


def layer_entries() -> list[str]:
    (layers,) = [c for c in CONFIG["contracts"] if c["type"] == "layers"]
    return [m.strip() for layer in layers["layers"] for m in layer.replace("|", ":").split(":")]


def modules(package_dir: Path, name: str) -> list[str]:
    out = []
    for py in package_dir.rglob("*.py"):
        rel = py.relative_to(package_dir).with_suffix("")
        parts = [p for p in rel.parts if p != "__init__" and p != "__main__"]
        out.append(".".join([name, *parts]))
    return sorted(set(out))


def test_every_module_has_a_place_in_the_layers():
    placed = layer_entries()
    everything = modules(REPO / "platform" / "sertune", "sertune") + modules(
        REPO / "trainables", "trainables"
    )
    unplaced = [
        m
        for m in everything
        if m not in ("sertune", "trainables")
        and not any(m == e or m.startswith(e + ".") for e in placed)
    ]
    assert not unplaced, f"add these to [tool.importlinter] layers in pyproject.toml: {unplaced}"


def test_no_module_imports_another_that_imports_it_back():
    """Stricter than import-linter's sibling contract: a package and its own modules count too
    (a command module importing ``sertune.cli`` while ``sertune.cli`` imports it)."""
    import grimp

    graph = grimp.build_graph("sertune", "trainables", "search_spaces")
    cycles = [
        " -> ".join(graph.find_shortest_chain(importer=b, imported=a))
        for a in sorted(graph.modules)
        for b in sorted(graph.find_modules_directly_imported_by(a))
        if a != b and graph.chain_exists(importer=b, imported=a)
    ]
    assert cycles == [], "imports that close a cycle (back chains):\n" + "\n".join(cycles)


# A fault drill reads what MLflow holds with MLflow's own client, as a user would, so that it checks
# what the code under test wrote rather than the code's own reading of it.
READS_MLFLOW_AS_A_USER = {"sertune.bench.faults"}


def test_only_tracking_talks_to_mlflow():
    """Every MLflow import is in ``sertune.tracking`` and no module elsewhere holds a client: they
    ask :class:`sertune.tracking.Store`, whose runs are plain frozen views."""
    import ast

    import grimp

    graph = grimp.build_graph("sertune", "trainables", include_external_packages=True)
    importers = {
        m
        for m in graph.find_modules_that_directly_import("mlflow")
        if not m.startswith("sertune.tracking")
    }
    assert importers <= READS_MLFLOW_AS_A_USER, sorted(importers - READS_MLFLOW_AS_A_USER)
    clients = []
    for py in (REPO / "platform" / "sertune").rglob("*.py"):
        if "tracking" in py.relative_to(REPO / "platform" / "sertune").parts:
            continue
        for node in ast.walk(ast.parse(py.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "client":
                base = node.value
                if isinstance(base, ast.Name) and base.id == "tracking":
                    clients.append(f"{py.relative_to(REPO)}:{node.lineno}")
    assert clients == [], f"ask tracking.Store instead of holding a client: {clients}"


def _lint(root: Path) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": f"{root / 'platform'}:{root}", "PATH": str(Path(sys.executable).parent)}
    return subprocess.run(
        [str(Path(sys.executable).with_name("lint-imports")), "--no-cache"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_lint_imports_keeps_the_contracts_and_catches_a_wrong_import(tmp_path):
    for part in ("platform", "trainables", "search_spaces", "pyproject.toml"):
        src = REPO / part
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp_path / part)
    ok = _lint(tmp_path)
    assert ok.returncode == 0, ok.stdout[-2000:]
    # the data layer reaching up into the control plane
    remote = tmp_path / "trainables" / "data" / "remote.py"
    remote.write_text(remote.read_text() + "\nfrom sertune import search  # noqa\n")
    bad = _lint(tmp_path)
    assert bad.returncode != 0 and "trainables.data.remote -> sertune.search" in bad.stdout, (
        bad.stdout[-2000:]
    )


def test_the_ray_internals_the_workarounds_use_are_still_there():
    """Fails on a Ray upgrade that moves them: see sertune/ray_compat.py for what each does."""
    from sertune import ray_compat

    assert ray_compat.missing_internals() == []
