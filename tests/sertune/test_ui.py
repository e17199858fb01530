"""The MLflow UI as a person meets it, in a real browser (headless Chromium driven by Playwright):
`sertune ui` prints a URL that opens on the trials table (0 clicks) with the objective and the key
robustness metrics as columns; a trial's robustness plots are 1 click from there; the parent run
shows the leaderboard and the search's plots; the registry shows the champion. Screenshots go to
$SERTUNE_UI_SHOTS (or the test's temp folder). Outside CI they are skipped where Chromium or
Playwright is missing, with one line naming what; in CI (``CI`` set) that is a failure: `.ci/run`
installs Debian's Chromium and Playwright comes from the lock."""

import os
import re
import shutil
import signal
import time
from pathlib import Path

import pytest
import yaml

from sertune.testing import free_port, start_sertune

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

pytestmark = pytest.mark.browser


def missing() -> str | None:
    """What the browser tests lack here, in one line, or None."""
    if CHROMIUM is None:
        return "needs Chromium (Debian package chromium: apt-get install chromium)"
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "needs Playwright (in requirements-dev.lock: make install)"
    return None


@pytest.fixture(scope="module", autouse=True)
def browser_present():
    why = missing()
    if why and os.environ.get("CI"):
        pytest.fail(f"the browser tests run in CI: {why}", pytrace=False)
    if why:
        pytest.skip(why)


ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    from sertune.cluster import init_ray, shutdown_ray
    from sertune.errors import NotFound
    from sertune.registry import promote
    from sertune.search import run_search
    from sertune.spec import load_spec

    root = tmp_path_factory.mktemp("ui")
    home = root / "home"
    old = os.environ.get("SERTUNE_HOME")
    os.environ["SERTUNE_HOME"] = str(home)
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # this home's own store
    raw = yaml.safe_load((REPO / "search_spaces" / "smoke.yaml").read_text())
    raw["name"] = "ui"
    raw["budget"].update(trials=3, concurrency=2, max_epochs=2, grace_epochs=1)
    (root / "ui.yaml").write_text(yaml.safe_dump(raw))
    shutdown_ray()
    init_ray(num_cpus=2)
    try:
        said: list[str] = []
        result = run_search(
            load_spec(root / "ui.yaml"), log=lambda *a: said.append(" ".join(map(str, a)))
        )
        try:
            version = promote("ui", gates=["robust/uar_snr10_white>=0.0"])
        except NotFound as e:  # say what the search did, not only that it left nothing to promote
            from sertune.records import log_path

            tracebacks = log_path("ui").read_text()[-4000:] if log_path("ui").exists() else ""
            pytest.fail(
                f"{e}\nthe search said:\n" + "\n".join(said[-40:]) + f"\nits log:\n{tracebacks}",
                pytrace=False,
            )
    finally:
        shutdown_ray()
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.monotonic()
    proc, lines = start_sertune("ui", "--port", str(port), env=env)
    while not any("MLflow UI ready" in ln for ln in lines):
        assert proc.poll() is None and time.monotonic() - t0 < 120, "".join(lines)[-2000:]
        time.sleep(0.2)
    url = re.search(r"MLflow UI ready in [\d.]+s: (\S+)", "".join(lines)).group(1)
    shots = Path(os.environ.get("SERTUNE_UI_SHOTS", root / "shots"))
    shots.mkdir(parents=True, exist_ok=True)
    yield {
        "url": url,
        "result": result,
        "version": version,
        "proc": proc,
        "shots": shots,
        "started_s": time.monotonic() - t0,
    }
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    from sertune.testing import kill_owned

    kill_owned(session=proc.pid)
    if old is None:
        os.environ.pop("SERTUNE_HOME", None)
    else:
        os.environ["SERTUNE_HOME"] = old


@pytest.fixture
def page(ui):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield browser.new_page(viewport={"width": 1600, "height": 1000})
        browser.close()


def show_plot(page, name: str, shot) -> None:
    """Unfold the run's description if MLflow folded it (one click), wait until the plot ``name``
    in it has loaded, and take a screenshot with it in view."""
    more = page.get_by_text("Show more")
    if more.count():
        more.first.click()
    img = page.locator(f"img[src*='{name}']").first
    img.wait_for(timeout=30_000)
    page.wait_for_function(
        "img => img.complete && img.naturalWidth > 100", arg=img.element_handle()
    )
    img.scroll_into_view_if_needed()
    page.screenshot(path=str(shot))


def test_the_url_opens_on_the_trials_table_and_plots_are_one_click_away(ui, page):
    """0 clicks to the trials table with the objective and robustness columns, 1 to a trial's
    robustness plots."""
    trials = [r["trial"] for r in ui["result"].rows]
    page.goto(ui["url"])
    page.get_by_text(f"ui-{trials[0]}").first.wait_for(timeout=60_000)
    body = page.inner_text("body")
    for tid in trials:
        assert f"ui-{tid}" in body
    assert "ui\n" not in body.split("Run Name", 1)[-1][:200]  # the parent run is not a row
    # the metric columns read at a glance: the objective first, the test figure, then the gated
    # robustness metric; whole names, all inside the 1600 px viewport (no scrolling)
    headers = []
    for cell in page.locator("[role=columnheader][col-id^='metrics.']").all():
        box = cell.bounding_box()
        headers.append((box["x"], box["x"] + box["width"], cell.inner_text().strip()))
    headers.sort()
    names = [h[2] for h in headers]
    assert names[:3] == ["val_uar", "test_uar", "robust/uar_snr10_white"], headers
    assert all(right <= 1600 for _, right, _ in headers), headers
    assert len(set(names)) == len(names)
    page.screenshot(path=str(ui["shots"] / "1-trials-table.png"))

    page.get_by_text(f"ui-{trials[0]}").first.click()  # click 1: the trial's run page
    page.get_by_text("its result is its kept epoch").first.wait_for(timeout=60_000)
    show_plot(page, "uar_vs_snr.png", ui["shots"] / "2-trial-robustness.png")  # maybe click 2


def test_the_parent_run_shows_the_leaderboard_and_the_search_plots(ui, page):
    base, exp = re.match(r"(http://[^/]+)/#/experiments/(\d+)/", ui["url"]).groups()
    page.goto(f"{base}/#/experiments/{exp}/runs/{ui['result'].parent_run_id}")
    page.get_by_text("Search ui").first.wait_for(timeout=60_000)
    assert "kept epoch" in page.inner_text("body")
    show_plot(page, "optimisation_history.png", ui["shots"] / "3-parent-run.png")


def test_the_registry_shows_the_champion_and_why_it_won(ui, page):
    from sertune import tracking

    base = re.match(r"(http://[^/]+)/", ui["url"]).group(1)
    page.goto(f"{base}/#/models/ser-mtl-aug")
    page.get_by_text("champion").first.wait_for(timeout=60_000)
    assert "ser-mtl-aug" in page.inner_text("body")
    page.goto(f"{base}/#/models/ser-mtl-aug/versions/{ui['version']['version']}")
    page.get_by_text("Promoted by sertune from search").first.wait_for(timeout=60_000)
    body = page.inner_text("body")
    # the Description's figures are the source run's MLflow metrics
    metrics = tracking.Store(None).run(ui["version"]["run_id"]).metrics
    for name in ("val_uar", "test_uar", "robust/uar_snr10_white"):
        assert f"{metrics[name]:.3f}" in body, (name, metrics[name])
    assert "robust/uar_snr10_white >= 0" in body and "search ui" in body.replace("`", "")
    page.screenshot(path=str(ui["shots"] / "4-registry.png"), full_page=True)


def _descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (its MLflow server runs in a process group of its own)."""
    parent = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":
                parent[int(d.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        found += kids
        frontier += kids
    return found


def test_the_ui_starts_in_seconds_and_stops_with_its_children(ui):
    assert ui["started_s"] < 90
    proc = ui["proc"]
    children = _descendants(proc.pid)
    assert children  # its MLflow server
    os.kill(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 20
    alive = children
    while alive and time.monotonic() < deadline:
        alive = [
            c
            for c in children
            if Path(f"/proc/{c}").exists()
            and (Path(f"/proc/{c}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z")
        ]
        time.sleep(0.2)
    assert alive == []  # no orphaned server
