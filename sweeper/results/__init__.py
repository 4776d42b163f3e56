"""What a sweep found: the sweep-records reader (``records``), ranking (``ranking``), exported
configs (``export``), `sweeper best`'s table (``best``), re-evaluation (``reeval``), replicates
(``replicates``), the report and phase diagram (``report``, ``phase``) and the dashboards (``ui``)."""
