"""Names that cross module boundaries, each defined once: what trials report to Ray Tune, what Ray
hands a trial, what the driver adds to the sweep section it hands trials, the trial statuses, the
MLflow tags and metric names that `best`, `report`, `ui` and the dashboard read back, and the
Optuna user attributes the searcher and the schedulers keep on each trial."""

# Ray Tune results a trial reports
STEP_KEY = "step"  # the training step a reported value belongs to
FAILURE_KEY = "failure"  # a trial that ended on a named failure (not retried)

# the flat config Ray hands a trial
OPTUNA_TRIAL_KEY = "__optuna_trial"  # the Optuna trial number of a Ray trial
RUN_TAGS_KEY = "__run_tags"  # extra tags for the trial's MLflow run (a replicate's: sweeper.results.replicates)

# keys the driver adds to the sweep section it hands every trial (never in a spec file)
PARENT_RUN_KEY = "_parent_run_id"  # the sweep's MLflow parent run
OPTUNA_JOURNAL_KEY = "_optuna_journal"  # the study's journal, where trials attach their pictures
HEADLINE_KEY = "_headline_metrics"  # the family's HEADLINE metrics, charted on the dashboard's first screen

# trial statuses: the STATUS tag of a trial run, and what summaries count
COMPLETED = "completed"  # trained its whole budget
PRUNED = "pruned"  # stopped early by the scheduler (its reason in PRUNE_REASON_TAG)
FAILED = "failed"  # raised, diverged, or ended without the objective
RUNNING = "running"
PAUSED = "paused"  # held at a rung by the promotion scheduler (no resources)
STATUSES = (COMPLETED, PRUNED, FAILED, RUNNING)  # what `sweeper best` counts

# MLflow run roles (the ROLE tag)
SWEEP_ROLE = "sweep"  # the sweep's parent run
TRIAL_ROLE = "trial"
REPLICATE_ROLE = "replicate"  # a retraining of a trial's config with another seed (not a trial of the sweep)

# MLflow tags
TRIAL_TAG = "sweeper.trial_id"  # run tag: Ray's trial id
TRIAL_NAME_TAG = "sweeper.trial_name"  # run tag: Ray's trial name (the run is named trial-<optuna number>)
OPTUNA_NUMBER_TAG = "sweeper.optuna_trial"  # run tag: the Optuna trial number
ROLE = "sweeper.role"  # run tag: SWEEP_ROLE, TRIAL_ROLE or REPLICATE_ROLE
REPLICATE_OF = "sweeper.replicate_of"  # run tag of a replicate: the MLflow run id of the trial it repeats
REPLICATE_SEED = "sweeper.replicate_seed"  # run tag of a replicate: its training seed (the config's seed:)
STATUS = "sweeper.status"  # run tag: running | completed | pruned | failed | paused
CODE_VERSION_TAG = "sweeper.code_version"  # run tag: the git commit (or package version) that ran it
CHECKPOINT_DIR_TAG = "sweeper.checkpoint_dir"  # run tag: where Ray keeps the trial's checkpoints
SWEPT_TAG = "sweeper.swept"  # run tag: the comma-separated dotted keys the sweep chose
NODE_TAG = "sweeper.node_id"  # run tag: the Ray node that ran the trial
FINAL_STEP_TAG = "sweeper.final_step"  # run tag: the step training ended at
PRUNE_REASON_TAG = "sweeper.prune_reason"  # run tag: why the scheduler stopped it
PRUNED_AT_TAG = "sweeper.pruned_at_step"
FAILURE_TAG = "sweeper.failure"  # run tag: the error, one line
FAILED_AT_TAG = "sweeper.failed_at_step"
TRACEBACK_TAG = "sweeper.failure_traceback"
PAUSED_AT_TAG = "sweeper.paused_at_step"  # run tag: the rung a paused trial waits at ("" once resumed)
PROMOTED_AT_TAG = "sweeper.promoted_at_steps"  # run tag: the rung steps it was promoted from
REEVAL_TAG = "sweeper.reeval"  # run tag: what `sweeper best --reeval` measured
REEVAL_RANK_TAG = "sweeper.reeval_rank"
OBJECTIVE_TAG = "sweeper.objective"  # experiment tags: the sweep's objective, for `sweeper best`
MODE_TAG = "sweeper.objective_mode"
VIOLATES = "sweeper.violates"  # run tag: the sweep.constraints the latest evaluation broke ("" = none)
COLLAPSED_TAG = "sweeper.collapsed"  # run tag: the collapse rule the latest evaluation broke, in words ("" = varied)

# metric names read back across modules
MEMORIZED = "memorized_frac"  # the memorisation metric of a sweep from before the sample types
SPREAD = ("diversity", "precision", "recall", "density", "coverage")  # sweeper.eval.diversity, each also with _px
DIVERSITY = "diversity_px"  # the collapse guard's metric: samples' pixel diversity (sweeper.eval.diversity)
FRACTIONS = ("frac_memorized", "frac_spurious", "frac_generalized")  # the sample-type fractions (sweeper.eval.sample_types)
# what a trial cost (sweeper.run.cost), cumulative at every evaluation, in Ray results and MLflow
ACCELERATOR_S = "accelerator_s"  # workers x GPUs per worker x wall seconds
CPU_S = "cpu_s"  # CPU time of the training process (rank 0)
WALL_S = "trial_wall_s"  # wall seconds of training and evaluation

# Optuna user attributes of a trial (the study is the record of every decision)
RAY_TRIAL_ID = "ray_trial_id"  # the Ray trial that runs it now
PRUNE_REASON = "prune_reason"  # why a scheduler stopped it (one line)
PRUNED_AT = "pruned_at_step"
PRUNED_BY = "pruned_by"  # the scheduler or pruner type that decided, or "patience"
FAIL_REASON = "fail_reason"
FAILED_AT = "failed_at_step"
REQUEUED = "requeued"  # a FAIL whose parameters were queued again (its retry has RETRY_OF)
RETRY_OF = "retry_of"  # the number of the trial this one retries
PROMOTION = "promotion"  # "paused at step S" | "promoted at step S"
PAUSED_AT = "paused_at_step"
PROMOTED_AT = "promoted_at_steps"
RESUMED_FROM = "resumed_from_steps"
CONSTRAINT_ATTR = "constraint"  # its latest constraint values (sweeper.eval.guards)
COLLAPSED_ATTR = "collapsed"  # its latest collapse verdict in words ("" = varied; sweeper.eval.guards)


def best_value_key(metric: str) -> str:
    """A trial run's metric: the best value of the objective so far (final value = the trial's best)."""
    return f"{metric}_best"


def best_step_key(metric: str) -> str:
    """A trial run's metric: the step of that best value (the earliest, on a tie)."""
    return f"{metric}_best_step"
