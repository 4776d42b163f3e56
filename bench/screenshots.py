"""Look at the dashboards as a person would: headless Chromium screenshots of a finished sweep.

    make screenshots                                   # the sweep in ./sweeps (e.g. after `make demo`)
    .venv/bin/python bench/screenshots.py --sweep demo --storage ./sweeps --out /tmp/shots

Starts what `sweeper ui` and `sweeper ui --optuna` start (an `mlflow server` on the sweep's SQLite
store, optuna-dashboard on its journal, both on 127.0.0.1), opens the URLs they print, and writes
PNGs (default ``<sweep folder>/screenshots/``, which git ignores with the rest of ``sweeps/``):

- ``1_trials_table.png``   the runs page as `sweeper ui` opens it: trials as rows, best first
- ``2_trials_charts.png``  its chart view: parallel coordinates, objective curves, sample grids
- ``3_trial_<n>_step_<s>.png``  the best trial's pictures at each evaluation step: what MLflow's
  image charts show as their step slider moves (one temporary saved view per step, removed after)
- ``4_optuna_study.png``   optuna-dashboard's study page (history, intermediate values, ...)
- ``4_optuna_analytics.png``  its analytics page (slice, contour, rank, distribution of the objective)
- ``4_optuna_selection.png``  its selection page (parallel coordinates; the trials with prune reasons)
- ``5_optuna_trial.png``   its trial list, the best trial's sample grids beside it

Needs Chromium (`apt-get install chromium`; ``CHROMIUM`` names another binary). A React page needs
virtual time to render headless: ``--virtual-time-budget``. Look at the pictures: a chart still
showing a loading spinner means the machine was too busy for the budget.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sweeper.results.ranking import best_trials
from sweeper.results.records import locate_sweep, open_experiment  # noqa: E402
from sweeper.store.dashboard import SAVED_VIEW_PREFIX, trials_view, view_tag_value, view_url  # noqa: E402
from sweeper.errors import SweeperError  # noqa: E402
from sweeper.store.tracking import mlflow_client, artifact_root  # noqa: E402
from sweeper.results.ui import mlflow_server, optuna_server, prepare_view  # noqa: E402

# --run-all-compositor-stages-before-draw: MLflow renders a chart card only once an
# IntersectionObserver has seen it on screen; without it, on a loaded machine, the virtual time
# ran out with every card still a loading spinner.
CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
                "--run-all-compositor-stages-before-draw"]


def chromium() -> str:
    found = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        raise SweeperError("no Chromium found; install it (apt-get install chromium) or set CHROMIUM=/path/to/it")
    return found


def shoot(url: str, out: Path, size: str = "1920,1000", budget_ms: int = 20000) -> Path:
    """One screenshot of ``url``; every Chromium run gets a fresh profile."""
    with tempfile.TemporaryDirectory(prefix="sweeper-chromium-") as profile:
        cmd = [chromium(), *CHROME_FLAGS, f"--virtual-time-budget={budget_ms}", f"--user-data-dir={profile}",
               f"--screenshot={out}", f"--window-size={size}", url]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if r.returncode != 0 or not out.is_file():
        raise SweeperError(f"chromium could not take {out.name}: {(r.stderr or r.stdout).strip().splitlines()[-1:]}")
    print(f"  {out}   <- {url}", flush=True)
    return out


def pictures_view(trial_id: str, keys: list[str], step: int) -> dict:
    """A view of one trial's pictures at one step: the chart view filtered to that trial, one
    image chart per key side by side, each at ``step``."""
    view = trials_view("-", "min", [])
    section = {**view["compareRunSections"][0], "name": f"pictures at step {step}", "columns": len(keys),
               "cardHeight": 560}
    charts = [{"uuid": f"pictures-{k}", "type": "IMAGE", "metricSectionId": section["uuid"], "deleted": False,
               "isGenerated": False, "runsCountToCompare": 1, "imageKeys": [k], "step": step, "showRunParams": False}
              for k in keys]
    return {**view, "searchFilter": f"tags.`sweeper.trial_id` = '{trial_id}'", "compareRunCharts": charts,
            "compareRunSections": [section] + [s for s in view["compareRunSections"] if s.get("isGenerated")],
            "hideEmptyCharts": True}


def trial_pictures(url: str, client, exp_id: str, trial, out: Path) -> None:
    """Screenshots of one trial's pictures at each evaluation step, through temporary saved views."""
    keys = sorted({a.path.split("/")[1].split("+step+")[0] for a in client.list_artifacts(trial.run_id, "images")
                   if "+step+" in a.path})
    keys = [k for k in ("samples", "nearest", "clusters") if k in keys] or keys
    steps = sorted({m.step for m in client.get_metric_history(trial.run_id, "steps_per_s")})
    number = trial.tags.get("sweeper.optuna_trial", "x")
    for step in steps:
        view_id = f"sweeper-screenshot-step-{step}"
        client.set_experiment_tag(exp_id, SAVED_VIEW_PREFIX + view_id,
                                  view_tag_value(pictures_view(trial.trial_id, keys, step), f"screenshot: step {step}"))
        try:
            shoot(view_url(url, exp_id, charts=True, view_id=view_id), out / f"3_trial_{number}_step_{step}.png",
                  size="1920,1000")
        finally:
            client.delete_experiment_tag(exp_id, SAVED_VIEW_PREFIX + view_id)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sweep", default=None)
    p.add_argument("--space", default=None)
    p.add_argument("--storage", default=None)
    p.add_argument("--out", default=None, help="folder for the PNGs (default: SWEEP_DIR/screenshots)")
    a = p.parse_args(argv)
    try:
        ref = locate_sweep(sweep=a.sweep, space=a.space, storage_root=a.storage)
        if not ref.tracking.startswith("sqlite:"):
            raise SweeperError("screenshots serve the sweep's own SQLite store; this sweep is tracked on a server")
        out = Path(a.out) if a.out else ref.local_dir / "screenshots"
        out.mkdir(parents=True, exist_ok=True)
        print(f"screenshots of sweep {ref.name!r}:", flush=True)
        _, exp = open_experiment(ref)
        best = best_trials(ref, top=1, include_pruned=True).trials[0]
        with mlflow_server(ref.tracking, artifacts=artifact_root(ref.sweep_dir)) as url:
            if not prepare_view(mlflow_client(url), exp, ref):
                raise SweeperError(f"sweep {ref.name!r} stored no objective; pass --space SPACE.yaml")
            shoot(view_url(url, exp.experiment_id), out / "1_trials_table.png")
            shoot(view_url(url, exp.experiment_id, charts=True), out / "2_trials_charts.png", size="1920,2400")
            trial_pictures(url, mlflow_client(url), exp.experiment_id, best, out)
        server, study_id = optuna_server(ref)
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
        thread.start()
        try:
            base = f"http://127.0.0.1:{server.server_port}/dashboard/studies/{study_id}"
            shoot(base, out / "4_optuna_study.png", size="1920,2400")
            shoot(f"{base}/analytics", out / "4_optuna_analytics.png", size="1920,2400")
            shoot(f"{base}/smartSelection", out / "4_optuna_selection.png", size="1920,2400")
            shoot(f"{base}/trials?numbers={best.tags.get('sweeper.optuna_trial', 0)}", out / "5_optuna_trial.png",
                  size="1920,1400")
        finally:
            server.shutdown()
            server.server_close()
    except SweeperError as e:
        print(f"screenshots: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
