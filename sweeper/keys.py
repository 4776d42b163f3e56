"""Names that cross module boundaries, in one place: what trials report to Ray Tune, what Ray
hands a trial, what the driver adds to the sweep section it hands trials, and the MLflow tags
and metric names that `best`, `report`, `ui` and the dashboard read back."""

# Ray Tune results a trial reports
STEP_KEY = "step"  # the training step a reported value belongs to
FAILURE_KEY = "failure"  # a trial that ended on a named failure (not retried)

# the flat config Ray hands a trial
OPTUNA_TRIAL_KEY = "__optuna_trial"  # the Optuna trial number of a Ray trial
RUN_TAGS_KEY = "__run_tags"  # extra tags for the trial's MLflow run (a replicate's: sweeper.replicates)

# keys the driver adds to the sweep section it hands every trial (never in a spec file)
PARENT_RUN_KEY = "_parent_run_id"  # the sweep's MLflow parent run
OPTUNA_JOURNAL_KEY = "_optuna_journal"  # the study's journal, where trials attach their pictures

# MLflow
TRIAL_TAG = "sweeper.trial_id"  # run tag: Ray's trial id
ROLE = "sweeper.role"  # run tag: "sweep" (the parent run), "trial" or "replicate"
REPLICATE_ROLE = "replicate"  # a retraining of a trial's config with another seed (not a trial of the sweep)
REPLICATE_OF = "sweeper.replicate_of"  # run tag of a replicate: the MLflow run id of the trial it repeats
REPLICATE_SEED = "sweeper.replicate_seed"  # run tag of a replicate: its training seed (the config's seed:)
STATUS = "sweeper.status"  # run tag: running | completed | pruned | failed
OBJECTIVE_TAG = "sweeper.objective"  # experiment tags: the sweep's objective, for `sweeper best`
MODE_TAG = "sweeper.objective_mode"
VIOLATES = "sweeper.violates"  # run tag: the sweep.constraints the latest evaluation broke ("" = none)
MEMORIZED = "memorized_frac"  # the memorisation metric `best --max-memorized` filters on
# what a trial cost (sweeper.cost), cumulative at every evaluation, in Ray results and MLflow
ACCELERATOR_S = "accelerator_s"  # workers x GPUs per worker x wall seconds
CPU_S = "cpu_s"  # CPU time of the training process (rank 0)
WALL_S = "trial_wall_s"  # wall seconds of training and evaluation


def best_value_key(metric: str) -> str:
    """A trial run's metric: the best value of the objective so far (final value = the trial's best)."""
    return f"{metric}_best"


def best_step_key(metric: str) -> str:
    """A trial run's metric: the step of that best value (the earliest, on a tie)."""
    return f"{metric}_best_step"
