"""Judging a generator: the metric registry with the built-in metrics (``registry``), the
evaluator that samples and extracts features once per evaluation (``evaluator``), feature
extractors (``features``), Frechet and kernel distances (``distances``), nearest training
images (``memorization``), the memorised / spurious / generalised lens (``sample_types``),
split standard errors (``uncertainty``) and the pictures (``pictures``)."""
