"""The sweep's Optuna study, and which Ray trial is which Optuna trial.

Ray Tune runs the trials; one Optuna study (a journal file or an SQL database in the sweep
folder) decides what to try and what to stop, and is the record of the sweep. :class:`StudyLink`
is the one object the searcher and the scheduler share.

Resume. The Optuna storage is the real state; Ray's searcher checkpoint only keeps the map of Ray
trial ids to Optuna numbers. Whatever the way back in:

- ``Tuner.restore`` re-runs unfinished Ray trials with their original config; the scheduler sees
  each in ``on_trial_add`` and re-attaches it, by the config's ``__optuna_trial``, to its Optuna
  trial, which continues (RUNNING, its earlier intermediate values kept). A trial that Optuna
  already records as PRUNED is stopped at its first result.
- At the first ``suggest`` of a process, any trial still RUNNING in the study that no Ray trial
  re-attached to (the driver died and the trial is not being resumed: a fresh Tuner on an old
  study, or Ray's resume skipped it) is an orphan: it is told FAIL with ``fail_reason`` saying so
  and ``requeued: True``, and its parameters are queued again (``enqueue_trial``; the retry has
  ``retry_of: <number>``) so the next trial retries the same point. A trial Ray removes before it
  ran to the end (``on_trial_complete`` without a result or without ``done``, e.g. at the end of
  a time budget) is handled the same way.
- The planned number of trials counts COMPLETE, PRUNED and FAIL trials plus the trials running
  now; a FAIL that was queued again counts through its retry, not twice. With 2 finished and
  ``trials: 5`` the searcher asks exactly 3 more, then returns ``Searcher.FINISHED``.
- A trial that raised is FAIL and is not retried by the searcher (a deterministic crash would
  loop). If ``Tuner.restore(..., resume_errored=True)`` runs it again, Optuna cannot reopen the
  FAIL trial, so the rerun is recorded as a new Optuna trial with the same parameters
  (``retry_of``) and the Ray trial is bound to that number: ``link.number_of(ray_trial_id)`` is
  the authority, the config's ``__optuna_trial`` names the trial it was created for.
- One driver per study: a second driver running on the same storage would see the first one's
  trials as orphans.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from ray.tune.experiment import Trial as RayTrial

from sweeper.errors import SweeperError
from sweeper.keys import FAIL_REASON, OPTUNA_TRIAL_KEY, RAY_TRIAL_ID, REQUEUED, RETRY_OF
from sweeper.config.optuna_catalog import build_pruner, build_sampler, set_constraints
from sweeper.config.space import Spec, distributions

log = logging.getLogger(__name__)

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def default_storage(sweep_dir: str | Path) -> str:
    """Where a sweep's Optuna study lives by default: a journal file in the sweep folder.

    >>> default_storage("sweeps/demo")
    'sweeps/demo/optuna.journal'
    """
    return str(Path(sweep_dir) / "optuna.journal")


def open_storage(storage: str) -> str | optuna.storages.BaseStorage:
    """A URL (``sqlite:///…``, ``postgresql://…``) as is; any other string is a journal file path."""
    if storage.split("://", 1)[0] in ("s3", "gs", "gcs", "http", "https", "file"):
        raise SweeperError(
            f"{storage}: the Optuna study needs a local journal file or an SQL database URL "
            "(sqlite:///..., postgresql://...); object storage holds checkpoints and artifacts, not the study"
        )
    if "://" in storage:
        return storage
    Path(storage).parent.mkdir(parents=True, exist_ok=True)
    from optuna.storages.journal import JournalFileBackend

    return optuna.storages.JournalStorage(JournalFileBackend(str(storage)))


def open_study(spec: Spec, storage: str, study_name: str) -> optuna.Study:
    """Create or load the sweep's study, checking a loaded one matches the spec.

    On resume the sampler's seed is offset by the number of existing trials: a seeded sampler
    re-created with the same seed would otherwise propose the first session's points again. Not
    the grid sampler's: it shuffles its grid with the seed and records each trial's place in it
    (``grid_id``), so another seed would map the recorded places to other points (a point run
    twice, another never).
    """
    sweep = spec.sweep
    direction = "minimize" if sweep["objective"]["mode"] == "min" else "maximize"
    st = open_storage(storage)

    def create(seed: int | None) -> optuna.Study:
        return optuna.create_study(
            study_name=study_name,
            storage=st,
            load_if_exists=True,
            sampler=build_sampler(sweep, seed=seed),
            pruner=build_pruner(sweep) if sweep["scheduler"] == "optuna" else optuna.pruners.NopPruner(),
            direction=direction,
        )

    study = create(None)
    n = len(study.get_trials(deepcopy=False))
    if n and sweep["sampler"]["type"] != "grid":
        study = create(int(sweep["sampler"]["seed"] or 0) + n)
    check_matches(study, spec, storage, direction)
    return study


def check_matches(study: optuna.Study, spec: Spec, storage: str, direction: str) -> None:
    if len(study.directions) != 1 or study.direction.name.lower() != direction:
        raise SweeperError(
            f"{storage}: study {study.study_name!r} was created to {study.direction.name.lower()} but "
            f"{spec.path} asks to {direction}; use another study name or start the sweep afresh"
        )
    want = distributions(spec.sweep["params"])
    for t in study.get_trials(deepcopy=False):
        for name, dist in t.distributions.items():
            if name in want and want[name] != dist:
                raise SweeperError(
                    f"{storage}: study {study.study_name!r} searched {name} over {dist} (trial {t.number}) but "
                    f"{spec.path} says {want[name]}; use another study name or start the sweep afresh"
                )


def optuna_number(config: dict[str, Any]) -> int | None:
    """The Optuna trial number a Ray trial config belongs to (None if it did not come from us)."""
    n = config.get(OPTUNA_TRIAL_KEY)
    return int(n) if n is not None else None


class StudyLink:
    """The sweep's Optuna study plus which Ray trial is which Optuna trial.

    One object shared by the searcher and the scheduler (they are pickled together in Ray's
    ``tuner.pkl``, so the sharing survives ``Tuner.restore``). Only the identity of the study
    and the id map are pickled; the study is reopened from storage on first use.
    """

    def __init__(self, spec: Spec, storage: str, study_name: str):
        self.spec = spec
        self.storage = storage
        self.study_name = study_name
        self.ray_to_number: dict[str, int] = {}
        self._reset_runtime()
        self._study = open_study(spec, storage, study_name)  # fail now, not inside Tuner.fit

    def _reset_runtime(self) -> None:
        self._study: optuna.Study | None = None
        self._trials: dict[int, optuna.Trial] = {}  # live handles for report/should_prune
        self._live: set[int] = set()  # numbers run by a Ray trial of this process
        self.paused: set[int] = set()  # numbers the promotion scheduler holds paused (no resources)
        self._reconciled = False

    def __getstate__(self) -> dict[str, Any]:
        return {"spec": self.spec, "storage": self.storage, "study_name": self.study_name,
                "ray_to_number": dict(self.ray_to_number)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset_runtime()

    @property
    def study(self) -> optuna.Study:
        if self._study is None:
            self._study = open_study(self.spec, self.storage, self.study_name)
        return self._study

    # -- trials ------------------------------------------------------------------------------

    def frozen(self, number: int) -> FrozenTrial:
        for t in self.study.get_trials(deepcopy=False):
            if t.number == number:
                return t
        raise KeyError(f"no trial number {number} in study {self.study_name!r}")

    def trial(self, number: int) -> optuna.Trial:
        """A live handle on trial ``number``: the one ``ask`` returned, or re-attached after a restart."""
        if number not in self._trials:
            fr = self.frozen(number)
            # Optuna has no public "trial by number" handle; ``Trial(study, trial_id)`` is what
            # ``Study.ask`` itself builds, and FrozenTrial keeps the storage id as ``_trial_id``.
            self._trials[number] = optuna.trial.Trial(self.study, fr._trial_id)
        return self._trials[number]

    def ask(self, ray_trial_id: str) -> optuna.Trial:
        t = self.study.ask()
        self._trials[t.number] = t
        self.bind(ray_trial_id, t.number)
        return t

    def bind(self, ray_trial_id: str, number: int) -> None:
        self.ray_to_number[ray_trial_id] = number
        self._live.add(number)

    def release(self, number: int) -> None:
        self._live.discard(number)
        self._trials.pop(number, None)

    def number_of(self, ray_trial_id: str, config: dict[str, Any] | None = None) -> int | None:
        n = self.ray_to_number.get(ray_trial_id)
        if n is None and config is not None:
            n = optuna_number(config)
            if n is not None:
                self.ray_to_number[ray_trial_id] = n
        return n

    def attach(self, ray_trial: RayTrial) -> None:
        """Called for every trial Ray adds, including those restored from an experiment checkpoint."""
        n = self.number_of(ray_trial.trial_id, ray_trial.config)
        if n is None:
            return
        if ray_trial.status in (RayTrial.TERMINATED, RayTrial.ERROR):
            return  # Ray will not run it again; if Optuna still has it RUNNING it is an orphan
        self._live.add(n)
        try:
            fr = self.frozen(n)
        except KeyError:
            log.warning("Ray trial %s names Optuna trial %s, which the study does not have", ray_trial.trial_id, n)
            return
        if fr.state == TrialState.FAIL and not fr.user_attrs.get(REQUEUED):
            # Ray runs an errored trial again (Tuner.restore with resume_errored/restart_errored).
            # Optuna cannot reopen a finished trial: the rerun gets a new RUNNING trial with the
            # same parameters (retry_of), and this Ray trial is bound to it from now on.
            self._live.discard(n)
            self.bind(ray_trial.trial_id, self._rerun(fr, ray_trial.trial_id))
            return
        if fr.state == TrialState.RUNNING and fr.user_attrs.get(RAY_TRIAL_ID) != ray_trial.trial_id:
            # Ray's RESTART resume gives the trial a new id; keep the record pointing at it
            self.trial(n).set_user_attr(RAY_TRIAL_ID, ray_trial.trial_id)

    def _rerun(self, failed: FrozenTrial, ray_trial_id: str) -> int:
        """A new RUNNING trial with the parameters of ``failed``; returns its number."""
        self.study.add_trial(optuna.trial.create_trial(
            state=TrialState.RUNNING, params=failed.params, distributions=failed.distributions,
            user_attrs={RETRY_OF: failed.number, RAY_TRIAL_ID: ray_trial_id}))
        new = [t.number for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
               if t.user_attrs.get(RETRY_OF) == failed.number and t.user_attrs.get(RAY_TRIAL_ID) == ray_trial_id]
        log.info("Ray re-runs failed Optuna trial %d as Optuna trial %d", failed.number, new[-1])
        return new[-1]

    def report(self, number: int, value: float, step: int) -> None:
        """``Trial.report`` once per step (a resumed trial may send a step again)."""
        if step in self.frozen(number).intermediate_values:
            return
        self.trial(number).report(value, step)

    def tell(self, number: int, value: float | None = None, *, state: TrialState = TrialState.COMPLETE,
             attrs: dict[str, Any] | None = None) -> None:
        t = self.trial(number)
        for k, v in (attrs or {}).items():
            t.set_user_attr(k, v)  # before tell: a finished trial's attributes are read-only
        if state in (TrialState.COMPLETE, TrialState.PRUNED) and self.spec.sweep.get("constraints"):
            set_constraints(t, self.spec.sweep["constraints"])  # what a constrained sampler reads after tell
        try:
            self.study.tell(t, value if state == TrialState.COMPLETE else None, state=state, skip_if_finished=True)
        except RuntimeError as e:
            # GridSampler.after_trial calls study.stop() once the grid is used up, which raises
            # outside Study.optimize (Ray drives our trials). The trial's state is stored before
            # after_trial's exception propagates, and the searcher stops at the trial budget.
            if "Study.stop" not in str(e):
                raise
        self.release(number)

    # -- budget and orphans -----------------------------------------------------------------------

    def reconcile(self) -> list[int]:
        """Fail and re-queue RUNNING trials no Ray trial of this process runs (see module doc).

        Runs once per process, at the first ``suggest``: by then Ray has re-added every trial it
        resumes, so every trial it will run again is attached. Returns the orphans' numbers.
        """
        if self._reconciled:
            return []
        self._reconciled = True
        orphans = [t for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                   if t.number not in self._live]
        for t in orphans:
            log.warning("Optuna trial %d was RUNNING with no Ray trial resuming it; failing it and "
                        "retrying its parameters in a new trial", t.number)
            self.tell(t.number, state=TrialState.FAIL, attrs={
                FAIL_REASON: "orphaned: RUNNING when the sweep restarted and not resumed by Ray; "
                               "its parameters were queued again",
                REQUEUED: True})
            self.study.enqueue_trial(dict(t.params), user_attrs={RETRY_OF: t.number}, skip_if_exists=False)
        return [t.number for t in orphans]

    def running(self) -> int:
        """Trials of this process that Optuna has RUNNING (asked, re-attached or re-run), less the
        ones paused at a rung: they hold no resources, so they leave room for new trials."""
        return sum(t.state == TrialState.RUNNING and t.number in self._live and t.number not in self.paused
                   for t in self.study.get_trials(deepcopy=False))

    def used(self) -> int:
        """Trials that count against the plan: finished and running now; a FAIL whose parameters
        were queued again (``retry_of`` on the retry) is replaced by its retry, so it does not count."""
        trials = self.study.get_trials(deepcopy=False)
        retried = {t.user_attrs.get(RETRY_OF) for t in trials} - {None}
        n = 0
        for t in trials:
            if t.state in FINISHED and not (t.state == TrialState.FAIL and t.number in retried):
                n += 1
            elif t.state == TrialState.RUNNING and t.number in self._live:
                n += 1
        return n

