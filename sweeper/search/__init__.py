"""The Optuna side of a sweep as Ray Tune sees it: the study link (``study``), the searcher
(``searcher``), one module per scheduler over a shared base (``scheduler``: ``optuna_pruner``,
``asha``, ``promotion``), the builder with its name table (``build``) and the summary
(``summary``). The samplers and pruners a spec can name are in :mod:`sweeper.config.optuna_catalog`."""
