"""A spec's searcher and scheduler, sharing one study; the scheduler chosen by name.

>>> spec = load_spec("search_spaces/demo.yaml")  # doctest: +SKIP
>>> searcher, scheduler = build_search(spec, default_storage("sweeps/demo"), "demo")  # doctest: +SKIP
>>> tuner = tune.Tuner(trainable, tune_config=tune.TuneConfig(  # doctest: +SKIP
...     search_alg=searcher, scheduler=scheduler, num_samples=spec.sweep["trials"],
...     max_concurrent_trials=spec.sweep["max_concurrent"]))
>>> tuner.fit()  # doctest: +SKIP
>>> summarize(searcher.study)["best"]  # doctest: +SKIP
{'number': 3, 'value': 41.2, 'params': {...}}
"""

from __future__ import annotations

from typing import Callable

from ray.tune.schedulers import TrialScheduler

from sweeper.search.asha import OptunaASHAScheduler
from sweeper.search.optuna_pruner import OptunaPrunerScheduler
from sweeper.search.promotion import OptunaPromotionScheduler
from sweeper.search.searcher import OptunaSearcher
from sweeper.config.space import Spec, promotion_rungs


def _asha(searcher: OptunaSearcher, spec: Spec) -> TrialScheduler:
    asha = spec.sweep["asha"]
    return OptunaASHAScheduler(searcher, grace_period=asha["grace_period"] or spec.run_config["eval"]["every"],
                               reduction_factor=asha["reduction_factor"])


def _promotion(searcher: OptunaSearcher, spec: Spec) -> TrialScheduler:
    p = spec.sweep["promotion"]
    return OptunaPromotionScheduler(searcher, rungs=promotion_rungs(p, spec.run_config),
                                    reduction_factor=p["reduction_factor"], planned=int(spec.sweep["trials"]))


# sweep.scheduler -> the scheduler of a sweep (the spec checks the name against this table's keys)
SCHEDULERS: dict[str, Callable[[OptunaSearcher, Spec], TrialScheduler]] = {
    "optuna": lambda searcher, spec: OptunaPrunerScheduler(searcher),
    "asha": _asha,
    "promotion": _promotion,
}


def build_search(spec: Spec, storage: str, study_name: str = "sweep") -> tuple[OptunaSearcher, TrialScheduler]:
    """The searcher and the scheduler of a spec, sharing one study.

    >>> searcher, scheduler = build_search(spec, default_storage(sweep_dir), "demo")  # doctest: +SKIP
    """
    searcher = OptunaSearcher(spec, storage, study_name)
    return searcher, SCHEDULERS[spec.sweep["scheduler"]](searcher, spec)
