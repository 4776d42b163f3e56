"""The Optuna side of a sweep, as Ray Tune sees it: a Searcher, a pruning scheduler, a summary.

Ray Tune runs the trials; one Optuna study (a journal file or an SQL database in the sweep
folder) decides what to try and what to stop, and is the record of the sweep:

- :class:`OptunaSearcher` asks the study for each new trial's parameters and tells it how the
  trial ended (COMPLETE with the last reported objective, FAIL, or nothing when already PRUNED).
- :class:`OptunaPrunerScheduler` (``scheduler: optuna``) feeds every reported objective value to
  the study (``Trial.report``) and stops the trial when the study's pruner says so
  (``should_prune`` then ``tell(state=PRUNED)``), with a readable reason kept in the trial's user
  attributes ``prune_reason`` / ``pruned_at_step``.
- :class:`OptunaASHAScheduler` (``scheduler: asha``) is Ray's ASHA; the trials it stops before
  ``train.steps`` are told to Optuna as PRUNED the same way.
- :class:`OptunaPromotionScheduler` (``scheduler: promotion``) pauses trials at rungs and resumes
  the promoted ones from their checkpoints; the ones a closed rung does not promote end PRUNED.

Ray's own ``OptunaSearch`` is not used: it never consults an Optuna pruner and records
scheduler-stopped trials as COMPLETE.

>>> spec = load_spec("search_spaces/demo.yaml")  # doctest: +SKIP
>>> searcher, scheduler = build_search(spec, default_storage("sweeps/demo"), "demo")  # doctest: +SKIP
>>> tuner = tune.Tuner(trainable, tune_config=tune.TuneConfig(  # doctest: +SKIP
...     search_alg=searcher, scheduler=scheduler, num_samples=spec.sweep["trials"],
...     max_concurrent_trials=spec.sweep["max_concurrent"]))
>>> tuner.fit()  # doctest: +SKIP
>>> summarize(searcher.study)["best"]  # doctest: +SKIP
{'number': 3, 'value': 41.2, 'params': {...}}

The trainable gets a flat config: the dotted param values plus ``"__optuna_trial"`` (the Optuna
trial number; :func:`optuna_number`); ``sweeper.spec.apply(run_config, config)`` turns it into a
run config. It must report the objective with a ``"step"`` key: ``tune.report({"step": s, "fid": v})``
(results without the objective, e.g. training losses, are fine: neither the searcher nor the
schedulers advertise a metric to Ray, so Ray does not demand it in every result). The searcher
limits concurrency itself (``sweep.max_concurrent``, or Ray's ``max_concurrent_trials``).

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
import math
import pickle
import time
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from ray.tune.experiment import Trial as RayTrial
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher

from sweeper.constraints import violations
from sweeper.errors import SweeperError
from sweeper.optuna_catalog import CONSTRAINT_ATTR, build_pruner, build_sampler, explain_prune, rung_reason
from sweeper.spec import Spec, distributions, promotion_rungs
from sweeper.spec import suggest as suggest_values

log = logging.getLogger(__name__)

from sweeper.keys import FAILURE_KEY, OPTUNA_TRIAL_KEY, STEP_KEY  # noqa: E402,F401  (re-exported)

_FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


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
    re-created with the same seed would otherwise propose the first session's points again.
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
    if n:
        study = create(int(sweep["sampler"]["seed"] or 0) + n)
    _check_matches(study, spec, storage, direction)
    return study


def _check_matches(study: optuna.Study, spec: Spec, storage: str, direction: str) -> None:
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
        if fr.state == TrialState.FAIL and not fr.user_attrs.get("requeued"):
            # Ray runs an errored trial again (Tuner.restore with resume_errored/restart_errored).
            # Optuna cannot reopen a finished trial: the rerun gets a new RUNNING trial with the
            # same parameters (retry_of), and this Ray trial is bound to it from now on.
            self._live.discard(n)
            self.bind(ray_trial.trial_id, self._rerun(fr, ray_trial.trial_id))
            return
        if fr.state == TrialState.RUNNING and fr.user_attrs.get("ray_trial_id") != ray_trial.trial_id:
            # Ray's RESTART resume gives the trial a new id; keep the record pointing at it
            self.trial(n).set_user_attr("ray_trial_id", ray_trial.trial_id)

    def _rerun(self, failed: FrozenTrial, ray_trial_id: str) -> int:
        """A new RUNNING trial with the parameters of ``failed``; returns its number."""
        self.study.add_trial(optuna.trial.create_trial(
            state=TrialState.RUNNING, params=failed.params, distributions=failed.distributions,
            user_attrs={"retry_of": failed.number, "ray_trial_id": ray_trial_id}))
        new = [t.number for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
               if t.user_attrs.get("retry_of") == failed.number and t.user_attrs.get("ray_trial_id") == ray_trial_id]
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
                "fail_reason": "orphaned: RUNNING when the sweep restarted and not resumed by Ray; "
                               "its parameters were queued again",
                "requeued": True})
            self.study.enqueue_trial(dict(t.params), user_attrs={"retry_of": t.number}, skip_if_exists=False)
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
        retried = {t.user_attrs.get("retry_of") for t in trials} - {None}
        n = 0
        for t in trials:
            if t.state in _FINISHED and not (t.state == TrialState.FAIL and t.number in retried):
                n += 1
            elif t.state == TrialState.RUNNING and t.number in self._live:
                n += 1
        return n


class OptunaSearcher(Searcher):
    """Ray Tune Searcher backed by one Optuna study (ask/tell).

    >>> searcher = OptunaSearcher(spec, default_storage("sweeps/demo"), study_name="demo")  # doctest: +SKIP
    >>> searcher.suggest("ray_trial_1")  # doctest: +SKIP
    {'model.moca.memory_size': 12, 'model.moca.momentum': 0.41, '__optuna_trial': 0}
    """

    def __init__(self, spec: Spec, storage: str, study_name: str = "sweep"):
        # metric/mode are not given to Ray: it would then require the objective in every result,
        # and trainers report losses between evaluations. The objective lives in the spec.
        super().__init__(metric=None, mode=None)
        self.spec = spec
        self.objective: dict[str, str] = dict(spec.sweep["objective"])
        self.max_concurrent = int(spec.sweep["max_concurrent"])
        self.link = StudyLink(spec, storage, study_name)

    @property
    def study(self) -> optuna.Study:
        return self.link.study

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        _check_same_objective(self.objective, metric, mode)
        return True

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        # We limit concurrency ourselves (see suggest), so Ray's ConcurrencyLimiter passes every
        # call through: it forgets trials Ray re-runs after a restore and would swallow their
        # on_trial_complete, leaving them RUNNING in Optuna.
        self.max_concurrent = int(max_concurrent)
        return True

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        self.link.reconcile()
        if self.link.used() >= self.spec.sweep["trials"]:
            return Searcher.FINISHED
        if self.link.running() >= self.max_concurrent:
            return None  # Ray asks again when a trial ends
        t = self.link.ask(trial_id)
        values = suggest_values(t, self.spec.sweep["params"])
        t.set_user_attr("ray_trial_id", trial_id)
        return {**values, OPTUNA_TRIAL_KEY: t.number}

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        number = self.link.number_of(trial_id)
        if number is None:
            return
        fr = self.link.frozen(number)
        if fr.state.is_finished():  # already PRUNED by the scheduler (or told before a restart)
            self.link.release(number)
            return
        metric = self.objective["metric"]
        value = (result or {}).get(metric)
        if error:
            self.link.tell(number, state=TrialState.FAIL, attrs={
                "fail_reason": "the trial raised an error; see error.txt in its Ray trial folder"})
        elif result is None or not result.get("done"):
            # Removed before it ran to the end: Ray calls this without a result for a pending
            # trial, and with a result lacking ``done`` when the experiment stops (time budget).
            # Ray sets ``done`` on a natural end and on scheduler/stopper STOPs. Retry on resume.
            self.link.tell(number, state=TrialState.FAIL, attrs={
                "fail_reason": "stopped before it finished (the sweep ended or was interrupted); "
                               "its parameters were queued again", "requeued": True})
            self.study.enqueue_trial(dict(fr.params), user_attrs={"retry_of": number}, skip_if_exists=False)
        elif result.get(FAILURE_KEY):
            # The trial ended itself on a failure it can name (e.g. a non-finite loss at a step):
            # not retried by Ray, recorded as FAIL with its reason.
            self.link.tell(number, state=TrialState.FAIL, attrs={
                "fail_reason": str(result[FAILURE_KEY]), "failed_at_step": result.get(STEP_KEY)})
        elif value is None:
            self.link.tell(number, state=TrialState.FAIL, attrs={
                "fail_reason": f"finished without reporting {metric!r}; the evaluation must report it"})
        elif not _finite(value):
            self.link.tell(number, state=TrialState.FAIL, attrs={"fail_reason": f"{metric} was {value}"})
        else:
            self.link.tell(number, float(value))

    # Ray's Searcher checkpoint: the Optuna storage is the real state, this is only the id map.
    def get_state(self) -> dict[str, Any]:
        return {"study_name": self.link.study_name, "storage": self.link.storage,
                "ray_to_number": dict(self.link.ray_to_number)}

    def set_state(self, state: dict[str, Any]) -> None:
        if state.get("study_name") != self.link.study_name:
            log.warning("searcher checkpoint is for study %r, this searcher uses %r",
                        state.get("study_name"), self.link.study_name)
        self.link.ray_to_number.update(state.get("ray_to_number", {}))  # in place: shared with the scheduler

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.get_state(), f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.set_state(pickle.load(f))


def _check_same_objective(objective: dict[str, str], metric: str | None, mode: str | None) -> None:
    if metric not in (None, objective["metric"]) or mode not in (None, objective["mode"]):
        raise SweeperError(
            f"TuneConfig asks for metric={metric!r} mode={mode!r} but the sweep's objective is "
            f"{objective['metric']!r} {objective['mode']!r}; pass the same or none"
        )


def _finite(v: Any) -> bool:
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def _step_of(result: dict[str, Any]) -> int | None:
    s = result.get(STEP_KEY, result.get("training_iteration"))
    return int(s) if s is not None else None


def no_new_best(values: dict[int, float], mode: str, evaluations: int, metric: str) -> str | None:
    """The patience stop (``sweep.patience.evaluations``): the reason to stop a trial whose last
    ``evaluations`` reported values (``{step: value}``, Optuna's intermediate values) brought no
    new best, else None. Only a strict improvement is a new best; a NaN never is.

    >>> no_new_best({100: 3.5, 200: 3.12, 300: 3.2, 400: 3.3, 500: 3.12}, "min", 3, "fd_randcnn")
    'no new best fd_randcnn in the last 3 evaluations (best 3.12 at step 200)'
    """
    steps = sorted(values)
    best_at: int | None = None
    for i, s in enumerate(steps):
        v = values[s]
        if v == v and (best_at is None or (v < values[steps[best_at]] if mode == "min" else v > values[steps[best_at]])):
            best_at = i
    since = len(steps) - 1 - best_at if best_at is not None else len(steps)
    if since < evaluations:
        return None
    best = f"best {values[steps[best_at]]:.4g} at step {steps[best_at]}" if best_at is not None else "no finite value"
    return f"no new best {metric} in the last {since} evaluations ({best})"


class _PruneRecord:
    """Shared by both schedulers: tell PRUNED with a reason, and read the record back."""

    link: StudyLink
    objective: dict[str, str]
    patience: int | None = None  # sweep.patience.evaluations
    constraints: dict[str, dict[str, float]] = {}  # sweep.constraints

    def _out_of_patience(self, ray_trial_id: str, number: int, step: int) -> bool:
        """Apply the patience stop to a live trial; True (and recorded PRUNED) when it stops."""
        if not self.patience:
            return False
        reason = no_new_best(self.link.frozen(number).intermediate_values, self.objective["mode"], self.patience,
                             self.objective["metric"])
        if reason is None:
            return False
        self._prune(ray_trial_id, number, step, reason, by="patience")
        return True

    def _prune(self, ray_trial_id: str, number: int, step: int, reason: str, by: str) -> None:
        self.link.tell(number, state=TrialState.PRUNED, attrs={
            "prune_reason": reason, "pruned_at_step": int(step), "pruned_by": by, "ray_trial_id": ray_trial_id})
        log.info("pruned Optuna trial %d (Ray %s) at step %d: %s", number, ray_trial_id, step, reason)

    @property
    def pruned(self) -> dict[str, dict[str, Any]]:
        """``{ray_trial_id: {"step", "reason", "optuna_number"}}`` read from the study, so it
        includes trials pruned before a restart."""
        out: dict[str, dict[str, Any]] = {}
        for t in self.link.study.get_trials(deepcopy=False, states=(TrialState.PRUNED,)):
            if "prune_reason" in t.user_attrs:
                rid = t.user_attrs.get("ray_trial_id", f"optuna-{t.number}")
                out[rid] = {"step": t.user_attrs.get("pruned_at_step"), "reason": t.user_attrs["prune_reason"],
                            "optuna_number": t.number}
        return out

    def _observe(self, trial: RayTrial, result: dict[str, Any]) -> tuple[str, int, float, int]:
        """Report the objective value of ``result`` to Optuna.

        Returns ``(what, number, value, step)``; ``what`` is ``"skip"`` (no objective or step in
        this result, not our trial, or already finished in Optuna), ``"pruned"`` (Optuna already
        records it PRUNED, e.g. before a restart: stop it) or ``"live"`` (reported; judge it).
        """
        value, step = result.get(self.objective["metric"]), _step_of(result)
        number = self.link.number_of(trial.trial_id, trial.config)
        if value is None or step is None or number is None:
            return "skip", -1, math.nan, -1
        state = self.link.frozen(number).state
        if state == TrialState.PRUNED:
            return "pruned", number, float(value), step
        if state.is_finished():
            return "skip", number, float(value), step
        self.link.report(number, float(value), step)
        if self.constraints:
            # the constrained sampler's constraints_func reads them when the trial is told
            self.link.trial(number).set_user_attr(CONSTRAINT_ATTR, violations(result, self.constraints))
        return "live", number, float(value), step


class OptunaPrunerScheduler(_PruneRecord, FIFOScheduler):
    """Ray TrialScheduler that lets the study's Optuna pruner stop trials (``scheduler: optuna``).

    >>> scheduler = OptunaPrunerScheduler(searcher)  # doctest: +SKIP
    >>> scheduler.pruned  # doctest: +SKIP
    {'a1b2c3': {'step': 400, 'reason': 'fd_randcnn 88.1 at step 400 > median 61.3 of 5 completed trials',
                'optuna_number': 7}}
    """

    def __init__(self, searcher: OptunaSearcher):
        super().__init__()
        self.link = searcher.link
        self.objective = dict(searcher.objective)
        self.pruner_spec = searcher.spec.sweep["pruner"]
        self.patience = searcher.spec.sweep["patience"]["evaluations"]
        self.constraints = searcher.spec.sweep.get("constraints") or {}
        self.final_step = int(searcher.spec.run_config["train"]["steps"])

    @property
    def metric(self) -> None:
        # Not advertised to Ray, which would then demand the objective in every result (see searcher).
        return None

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        _check_same_objective(self.objective, metric, mode)
        return True

    def on_trial_add(self, tune_controller: Any, trial: RayTrial) -> None:
        self.link.attach(trial)

    def on_trial_result(self, tune_controller: Any, trial: RayTrial, result: dict) -> str:
        what, number, value, step = self._observe(trial, result)
        if what == "pruned":
            return TrialScheduler.STOP  # pruned before a restart: the decision stands
        if what == "live" and step < self.final_step and self._out_of_patience(trial.trial_id, number, step):
            return TrialScheduler.STOP
        if what == "skip" or step >= self.final_step or not self.link.trial(number).should_prune():
            # A trial that reached its full budget has finished: it completes, it is not pruned.
            return TrialScheduler.CONTINUE
        reason = explain_prune(self.link.study, self.link.frozen(number), self.pruner_spec,
                               self.objective["metric"], value, step)
        self._prune(trial.trial_id, number, step, reason, by=self.pruner_spec["type"])
        return TrialScheduler.STOP

    def debug_string(self) -> str:
        return f"Optuna pruner bridge ({self.pruner_spec['type']}); {len(self.pruned)} pruned"


class OptunaASHAScheduler(_PruneRecord, ASHAScheduler):
    """Ray's ASHA (``scheduler: asha``) that also records its stops in Optuna as PRUNED.

    ASHA returns STOP both for a trial it cuts at a rung and for one that reached ``max_t``; only a
    stop before ``max_t`` (= ``train.steps``) is a prune. Values are reported to Optuna too, so the
    study holds the same curves as with the Optuna bridge.
    """

    def __init__(self, searcher: OptunaSearcher, *, max_t: int, grace_period: int, reduction_factor: int = 3):
        obj = searcher.objective
        super().__init__(time_attr=STEP_KEY, metric=obj["metric"], mode=obj["mode"], max_t=max_t,
                         grace_period=grace_period, reduction_factor=reduction_factor, brackets=1)
        self.link = searcher.link
        self.objective = dict(obj)
        self.reduction_factor = reduction_factor
        self.max_t = max_t
        self.patience = searcher.spec.sweep["patience"]["evaluations"]
        self.constraints = searcher.spec.sweep.get("constraints") or {}

    @property
    def metric(self) -> None:
        return None  # see OptunaPrunerScheduler.metric; ASHA itself reads self._metric

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        _check_same_objective(self.objective, metric, mode)
        return True

    def on_trial_add(self, tune_controller: Any, trial: RayTrial) -> None:
        super().on_trial_add(tune_controller, trial)
        self.link.attach(trial)

    def on_trial_result(self, tune_controller: Any, trial: RayTrial, result: dict) -> str:
        what, number, value, step = self._observe(trial, result)
        if what == "pruned":
            return TrialScheduler.STOP
        if what == "live" and step < self.max_t and self._out_of_patience(trial.trial_id, number, step):
            # ASHA's own bookkeeping never sees this result; a stopped trial no longer needs it
            return TrialScheduler.STOP
        decision = super().on_trial_result(tune_controller, trial, result)
        if what == "skip" or decision != TrialScheduler.STOP or step >= self.max_t:
            return decision  # a STOP at max_t is the trial's natural end, not a prune
        reason = rung_reason(self.link.study, "asha", self.objective["metric"], value, step, self.reduction_factor)
        self._prune(trial.trial_id, number, step, reason, by="asha")
        return decision


class OptunaPromotionScheduler(_PruneRecord, FIFOScheduler):
    """``scheduler: promotion``: successive halving that pauses trials at rungs and resumes the
    promoted ones from their checkpoints (asynchronous successive halving with promotion, as in Li et
    al.'s ASHA paper; Ray's ``ASHAScheduler`` is its stopping variant).

    A trial that reports the objective at a rung step (``sweeper.spec.promotion_rungs``: each an
    evaluation step, so the checkpoint reported with that value is the one at that very step)
    goes on at once if it is in the best ``1/reduction_factor`` of the trials that reached the rung
    so far; otherwise Ray pauses it (its actor stops and frees its resources; it keeps its latest
    checkpoint). Whenever Ray has room for a trial it asks :meth:`choose_trial_to_run`: a paused
    trial that is now in the best fraction of its rung resumes first (from its checkpoint, so no
    step is trained twice), otherwise a new trial starts. Once no new trial will come (the
    searcher has asked its planned number) and every live trial has reached a rung, that rung is
    closed: its best ``max(1, n // reduction_factor)`` go on and the rest are PRUNED with the
    cutoff as the reason. A paused trial stays RUNNING in Optuna (user attrs ``promotion``,
    ``paused_at_step``, ``promoted_at_steps``) and its MLflow run is tagged ``sweeper.status=paused``
    until it resumes (``running``, ``sweeper.promoted_at_steps``) or ends.

    >>> scheduler = OptunaPromotionScheduler(searcher, rungs=[20, 60, 180], reduction_factor=3, planned=24)  # doctest: +SKIP
    >>> scheduler.state_of("a1b2c3")  # doctest: +SKIP
    'paused at step 60'
    """

    CLOSE_CHECK_S = 0.5  # how often choose_trial_to_run looks for closed rungs (it runs every loop)

    def __init__(self, searcher: OptunaSearcher, *, rungs: list[int], reduction_factor: int, planned: int):
        super().__init__()
        self.link = searcher.link
        self.objective = dict(searcher.objective)
        self.rungs = sorted(int(r) for r in rungs)
        self.reduction_factor = int(reduction_factor)
        self.planned = int(planned)
        self.max_t = int(searcher.spec.run_config["train"]["steps"])
        self.patience = searcher.spec.sweep["patience"]["evaluations"]
        self.constraints = searcher.spec.sweep.get("constraints") or {}
        self.at_rung: dict[int, dict[str, float]] = {r: {} for r in self.rungs}  # rung -> {ray id: value}
        self.paused: dict[str, int] = {}  # ray trial id -> the rung step it waits at
        self.promoted: dict[str, list[int]] = {}  # ray trial id -> the rung steps it was promoted from
        self.resumed: dict[str, list[int]] = {}  # ... of those, the ones it had been paused at
        self.tracking: tuple[str, str, str] | None = None  # (uri, sweep name, sweep dir): MLflow tags
        self._closed: set[int] = set()
        self._checked = 0.0

    @property
    def metric(self) -> None:
        return None  # see OptunaPrunerScheduler.metric

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        _check_same_objective(self.objective, metric, mode)
        return True

    def state_of(self, ray_trial_id: str) -> str | None:
        """``'paused at step S'``, ``'promoted at step S'`` (its latest promotion) or None."""
        if ray_trial_id in self.paused:
            return f"paused at step {self.paused[ray_trial_id]}"
        if self.promoted.get(ray_trial_id):
            return f"promoted at step {self.promoted[ray_trial_id][-1]}"
        return None

    # -- Ray's hooks ---------------------------------------------------------------------------

    def on_trial_add(self, tune_controller: Any, trial: RayTrial) -> None:
        self.link.attach(trial)
        n = self.link.number_of(trial.trial_id, trial.config)
        if trial.trial_id in self.paused and n is not None:
            # Restored from an experiment checkpoint while paused: Ray re-adds it PENDING and would
            # start it unpromoted; it waits PAUSED instead (add_trial files it by the status it has
            # after this hook) until choose_trial_to_run promotes or prunes it.
            self.link.paused.add(n)
            if trial.status == RayTrial.PENDING:
                trial.set_status(RayTrial.PAUSED)

    def on_trial_result(self, tune_controller: Any, trial: RayTrial, result: dict) -> str:
        what, number, value, step = self._observe(trial, result)
        if what == "pruned":
            return TrialScheduler.STOP
        if what == "live" and step < self.max_t and self._out_of_patience(trial.trial_id, number, step):
            return TrialScheduler.STOP
        if what == "skip" or step not in self.at_rung:
            return TrialScheduler.CONTINUE
        tid = trial.trial_id
        if tid in self.at_rung[step]:  # the rung's result again (a restored trial): the decision stands
            return TrialScheduler.CONTINUE if step in self.promoted.get(tid, []) else TrialScheduler.PAUSE
        self.at_rung[step][tid] = value
        if self._in_top(tid, step, closed=False):
            self._promote(tid, number, step)
            return TrialScheduler.CONTINUE
        self._pause(tid, number, step)
        return TrialScheduler.PAUSE

    def choose_trial_to_run(self, tune_controller: Any) -> RayTrial | None:
        trials = tune_controller.get_trials()
        by_id = {t.trial_id: t for t in trials}
        closed = self._closed_rungs(trials)
        for step in reversed(self.rungs):  # the furthest first: the closest to a finished trial
            for tid in self._ranked(step):
                t = by_id.get(tid)
                if self.paused.get(tid) != step or t is None or t.status not in (RayTrial.PAUSED, RayTrial.PENDING):
                    continue
                number = self.link.number_of(tid, t.config)
                if self._in_top(tid, step, closed=step in closed):
                    self._promote(tid, number, step)
                    return t  # Ray restores it from its latest checkpoint: the one at this rung
                if step in closed:
                    self._prune_paused(tune_controller, t, number, step)
        for t in trials:
            if t.status == RayTrial.PENDING and t.trial_id not in self.paused:
                return t
        return None

    # -- the rule --------------------------------------------------------------------------------

    def _order(self, value: float) -> float:
        if not _finite(value):
            return math.inf  # NaN or inf: last
        return value if self.objective["mode"] == "min" else -value

    def _ranked(self, step: int) -> list[str]:
        vals = self.at_rung[step]
        return sorted(vals, key=lambda tid: self._order(vals[tid]))

    def _quota(self, step: int, closed: bool) -> int:
        n = len(self.at_rung[step]) // self.reduction_factor
        return max(1, n) if closed else n  # a closed rung always lets its best trial go on

    def _in_top(self, tid: str, step: int, closed: bool) -> bool:
        return tid in self._ranked(step)[: self._quota(step, closed)]

    def _closed_rungs(self, trials: list[RayTrial]) -> set[int]:
        """Rungs no further trial can reach: the searcher has asked all its trials and every live
        trial has a value at the rung (or beyond). Checked every CLOSE_CHECK_S while any trial waits."""
        now = time.monotonic()
        if not self.paused or now - self._checked < self.CLOSE_CHECK_S:
            return self._closed
        self._checked = now
        if self.link.used() < self.planned:
            return self._closed
        lowest = len(self.rungs)
        for t in trials:
            if t.status in (RayTrial.TERMINATED, RayTrial.ERROR):
                continue
            reached = max((i for i, r in enumerate(self.rungs) if t.trial_id in self.at_rung[r]), default=-1)
            lowest = min(lowest, reached)
        self._closed = set(self.rungs[: lowest + 1])
        return self._closed

    # -- records -----------------------------------------------------------------------------------

    def _pause(self, tid: str, number: int, step: int) -> None:
        self.paused[tid] = step
        self.link.paused.add(number)
        t = self.link.trial(number)
        t.set_user_attr("promotion", f"paused at step {step}")
        t.set_user_attr("paused_at_step", int(step))
        self._tag(tid, "paused", **{"sweeper.paused_at_step": step})
        log.info("paused Optuna trial %d (Ray %s) at rung step %d", number, tid, step)

    def _promote(self, tid: str, number: int, step: int) -> None:
        self.promoted.setdefault(tid, []).append(int(step))
        was_paused = self.paused.pop(tid, None) is not None
        self.link.paused.discard(number)
        t = self.link.trial(number)
        t.set_user_attr("promotion", f"promoted at step {step}")
        t.set_user_attr("promoted_at_steps", list(self.promoted[tid]))
        if was_paused:
            self.resumed.setdefault(tid, []).append(int(step))
            t.set_user_attr("paused_at_step", None)
            t.set_user_attr("resumed_from_steps", list(self.resumed[tid]))
            self._tag(tid, "running", **{"sweeper.promoted_at_steps": ",".join(map(str, self.promoted[tid])),
                                         "sweeper.paused_at_step": ""})
        else:
            self._tag(tid, None, **{"sweeper.promoted_at_steps": ",".join(map(str, self.promoted[tid]))})
        log.info("promoted Optuna trial %d (Ray %s) at rung step %d", number, tid, step)

    def _prune_paused(self, tune_controller: Any, trial: RayTrial, number: int, step: int) -> None:
        ranked, k = self._ranked(step), self._quota(step, closed=True)
        metric, value = self.objective["metric"], self.at_rung[step][trial.trial_id]
        cut = self.at_rung[step][ranked[k - 1]]
        sign = ">" if self.objective["mode"] == "min" else "<"
        reason = (f"promotion: {metric} {value:.4g} at rung step {step} {sign} cutoff {cut:.4g}, the best "
                  f"{k} (1/{self.reduction_factor}) of the {len(ranked)} trials that reached it; not promoted")
        self.paused.pop(trial.trial_id, None)
        self.link.paused.discard(number)
        self._prune(trial.trial_id, number, step, reason, by="promotion")
        tune_controller.stop_trial(trial)  # PRUNED in Optuna first: the searcher then sees it finished

    def _tag(self, tid: str, status: str | None, **tags: Any) -> None:
        if self.tracking is None:
            return
        from sweeper.tracking import set_trial_state

        try:
            set_trial_state(*self.tracking, tid, status, **tags)
        except Exception as e:  # a record, not a decision: never stall the sweep on it
            log.warning("could not tag the MLflow run of trial %s: %s", tid, e)

    def debug_string(self) -> str:
        return (f"promotion scheduler (rungs {self.rungs}, 1/{self.reduction_factor}); {len(self.paused)} paused, "
                f"{len(self.promoted)} promoted, {len(self.pruned)} pruned")


def build_search(spec: Spec, storage: str, study_name: str = "sweep") -> tuple[OptunaSearcher, TrialScheduler]:
    """The searcher and the scheduler of a spec, sharing one study.

    >>> searcher, scheduler = build_search(spec, default_storage(sweep_dir), "demo")  # doctest: +SKIP
    """
    searcher = OptunaSearcher(spec, storage, study_name)
    if spec.sweep["scheduler"] == "asha":
        asha = spec.sweep["asha"]
        grace = asha["grace_period"] or spec.run_config["eval"]["every"]
        max_t = spec.run_config["train"]["steps"]
        return searcher, OptunaASHAScheduler(searcher, max_t=max_t, grace_period=min(grace, max_t),
                                             reduction_factor=asha["reduction_factor"])
    if spec.sweep["scheduler"] == "promotion":
        p = spec.sweep["promotion"]
        return searcher, OptunaPromotionScheduler(searcher, rungs=promotion_rungs(p, spec.run_config),
                                                  reduction_factor=p["reduction_factor"],
                                                  planned=int(spec.sweep["trials"]))
    return searcher, OptunaPrunerScheduler(searcher)


# ------------------------------------------------------------------------------------------------
# summary


def summarize(study: optuna.Study) -> dict[str, Any]:
    """Counts by state and the best COMPLETE trial.

    >>> summarize(study)  # doctest: +SKIP
    {'trials': 8, 'completed': 5, 'pruned': 2, 'failed': 1, 'running': 0, 'waiting': 0,
     'direction': 'minimize', 'best': {'number': 3, 'value': 41.2, 'params': {...}},
     'pruned_trials': [{'number': 6, 'step': 400, 'reason': '...'}],
     'failed_trials': [{'number': 7, 'reason': '...'}]}
    """
    trials = study.get_trials(deepcopy=False)

    def count(state: TrialState) -> int:
        return sum(t.state == state for t in trials)

    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    minimize = study.direction == optuna.study.StudyDirection.MINIMIZE
    best = None
    if complete:
        b = (min if minimize else max)(complete, key=lambda t: t.value)
        best = {"number": b.number, "value": b.value, "params": dict(b.params)}
    return {
        "trials": len(trials),
        "completed": count(TrialState.COMPLETE),
        "pruned": count(TrialState.PRUNED),
        "failed": count(TrialState.FAIL),
        "running": count(TrialState.RUNNING),
        "waiting": count(TrialState.WAITING),
        "direction": "minimize" if minimize else "maximize",
        "best": best,
        "pruned_trials": [
            {"number": t.number, "step": t.user_attrs.get("pruned_at_step", t.last_step),
             "reason": t.user_attrs.get("prune_reason", "pruned")}
            for t in trials if t.state == TrialState.PRUNED
        ],
        "failed_trials": [
            {"number": t.number, "reason": t.user_attrs.get("fail_reason", "failed")}
            for t in trials if t.state == TrialState.FAIL
        ],
    }
