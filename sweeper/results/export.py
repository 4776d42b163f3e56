"""Exporting winners: each ranked trial's run config as a file `sweeper train` runs unchanged,
with a header saying where it came from, what it scored, and the checkpoint it was ranked at.

    paths = write_configs(ref, ranking, out="best")   # best/1.yaml, best/2.yaml, best/3.yaml
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import yaml

from sweeper.errors import SweeperError
from sweeper.eval.uncertainty import TIE_SE
from sweeper.results.ranking import Ranking, margin_text, score
from sweeper.results.records import SweepRef
from sweeper.store.trial_runs import TrialResult
from sweeper.config.run_config import dump_config
from sweeper.store import storage
from sweeper.store.tracking import code_version, mlflow_client
from sweeper.keys import (
    CHECKPOINT_DIR_TAG,
    CODE_VERSION_TAG,
    FINAL_STEP_TAG,
    OPTUNA_NUMBER_TAG,
    PRUNED,
    PRUNED_AT_TAG,
    PRUNE_REASON_TAG,
)


# ---------------------------------------------------------------------------- configs
def checkpoint_at(checkpoint_dir: str, step: int | None) -> tuple[str | None, str]:
    """``(path, note)``: the ``checkpoint_XXXXXX/state.pt`` Ray kept in a trial folder that holds
    training ``step`` (read from the state dict), else the newest one, with a note saying so."""
    if not checkpoint_dir:
        return None, "unknown (the trial recorded no checkpoint folder)"
    try:
        names = storage.list(checkpoint_dir.rstrip("/") + "/")
    except (SweeperError, OSError):
        names = []
    found = sorted((u for u in names if u.rstrip("/").endswith("/state.pt") and "/checkpoint_" in u), reverse=True)
    if not found:
        return None, f"{checkpoint_dir} (no checkpoint found there)"
    if step is None:
        return found[0], "the newest kept"
    from sweeper.run.trainer import load_checkpoint  # torch: only when a config is written

    for uri in found:
        try:
            if int(load_checkpoint(uri)["step"]) == step:
                return uri, f"step {step}"
        except (SweeperError, KeyError):
            continue
    return found[0], (f"the newest kept; none holds step {step} (Ray keeps the best by the sweep's objective "
                      "and the latest)")


def provenance(ref: SweepRef, t: TrialResult, ranking: Ranking, renamed_from: str) -> str:
    """The comment header of a written config: where it came from, what it scored, and the
    checkpoint of the evaluation it was ranked by."""
    ckpt_dir = t.tags.get(CHECKPOINT_DIR_TAG, "")
    ckpt, note = checkpoint_at(ckpt_dir, t.step)
    value = score(t, ranking.metric, ranking.at)
    lines = [
        f"sweeper best: rank {t.rank} of {ranking.eligible} by {ranking.at} {ranking.metric} ({ranking.mode}) "
        f"in sweep {ref.name!r}",
        f"ranked by: {ranking.metric} = {value:.6g} at step {t.step}",
        f"uncertainty: {uncertainty_line(t, ranking)}",
        *([f"re-evaluated: {t.reeval.header_line()}"] if t.reeval is not None else []),
        f"tracking: {ref.tracking}",
        f"run: {t.run_id} ({t.run_name})   trial: {t.trial_id}   optuna trial: {t.tags.get(OPTUNA_NUMBER_TAG, '?')}",
        f"status: {t.status}" + (f" at step {t.tags.get(PRUNED_AT_TAG)}: {t.tags.get(PRUNE_REASON_TAG)}"
                                 if t.status == PRUNED else f", final step {t.tags.get(FINAL_STEP_TAG, t.final_step)}"),
        f"final metrics (step {t.final_step}):",
    ]
    lines += [f"  {k} = {v:.6g}" for k, v in sorted(t.metrics.items()) if "_split/" not in k]
    lines += [
        f"checkpoint: {ckpt or note}",
        *([f"checkpoint holds: {note}"] if ckpt else []),
        f"code version: {t.tags.get(CODE_VERSION_TAG, 'unknown')} (this checkout: {code_version()})",
        f"name: {renamed_from!r} in the sweep; renamed so that `sweeper train` writes to its own folder",
    ]
    return "\n".join(lines)


def config_text(client, ref: SweepRef, t: TrialResult, ranking: Ranking) -> str:
    """The trial's run config (its ``config.yaml`` artifact) with a provenance header."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # keep the CLI output clean
    with tempfile.TemporaryDirectory() as d:
        try:
            path = client.download_artifacts(t.run_id, "config.yaml", d)
        except Exception as e:  # MLflow raises several types for a missing artifact
            raise SweeperError(f"run {t.run_id} (trial {t.trial_id}) has no readable config.yaml artifact "
                               f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        cfg = yaml.safe_load(Path(path).read_text())
    original = cfg.get("name", ref.name)
    # Every trial of a sweep has the sweep's name, and `sweeper train` writes to STORAGE/NAME:
    # without a new name the top configs would all train into the sweep's own folder.
    cfg["name"] = f"{original}-best{t.rank}"
    return dump_config(cfg, header=provenance(ref, t, ranking, original))


def write_configs(ref: SweepRef, ranking: Ranking, out: str = "best") -> list[str]:
    """Write ``OUT/1.yaml``, ``OUT/2.yaml``, ... for the ranked trials; returns the paths.
    ``out="-"`` writes nothing and returns the first config's text as the only element."""
    client = mlflow_client(ref.tracking)
    if out == "-":
        return [config_text(client, ref, ranking.trials[0], ranking)]
    os.makedirs(out, exist_ok=True)
    paths = []
    for t in ranking.trials:
        p = os.path.join(out, f"{t.rank}.yaml")
        Path(p).write_text(config_text(client, ref, t, ranking))
        paths.append(p)
    return paths


def uncertainty_line(t: TrialResult, ranking: Ranking) -> str:
    """The config header's line on how sure the ranked value is, and whether it beats the next."""
    if t.se is None:
        text = "no standard error logged"
    else:
        text = f"+- {t.se:.3g} (standard error over {len(t.splits) if t.splits else 'the'} splits of the latent bank)"
    c, was = t.lead, (t.reeval.was if t.reeval is not None else t.rank)  # the rank this evaluation gave
    if c is None:
        return text + ("; no trial ranked after it" if was == ranking.eligible else "")
    how = "paired standard errors" if c.paired else "standard errors (not paired)"
    if c.tie:
        return text + f"; TIED with rank {was + 1} (ahead by {margin_text(c).split()[0]} {how}, below {TIE_SE:g})"
    return text + f"; ahead of rank {was + 1} by {margin_text(c)} {how}"
