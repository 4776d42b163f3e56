"""Running a sweep: the Ray Tune sweep (``sweep``), one trial as a Ray trainable (``trial``), the
training loop of one configuration (``trainer``), and what a trial cost (``cost``)."""
