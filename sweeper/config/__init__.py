"""From a YAML file to a checked run: the run config (``run_config``: the one format `sweeper
train` runs), the sweep spec around it (``space``: the ``sweep:`` section, its params and
checks), the Optuna samplers and pruners a spec can name (``optuna_catalog``: how each is built
and how each pruner's decision is explained), and the bounds of ``sweep.constraints``
(``constraints``)."""
