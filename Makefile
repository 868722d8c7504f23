# streamrec: `make demo` and `make test` work on a fresh clone (they build .venv themselves).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: env demo test test-unit test-integration lint format bench bench-recovery eval eval-quick clean

# torch is installed first and pinned: any other spec pulls GBs of CUDA wheels on this box.
# click<8.4: sentence-transformers (issue 5) would otherwise upgrade it past faust's pin.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -e '.[train,text,dev,faust]' 'click<8.4'
	touch $(STAMP)

env: $(STAMP)

demo: env
	$(BIN)/streamrec demo

test: env
	$(BIN)/pytest -q

test-unit: env
	$(BIN)/pytest -q tests/unit

test-integration: env
	$(BIN)/pytest -q tests/integration

lint: env
	$(BIN)/ruff check stream model export tests benchmarks
	$(BIN)/ruff format --check stream model export tests benchmarks
	$(BIN)/mypy stream export

format: env
	$(BIN)/ruff check --fix stream model export tests benchmarks
	$(BIN)/ruff format stream model export tests benchmarks

# Speed benchmarks: JSON in benchmarks/results/, summarised in BENCHMARKS.md.
bench: env
	$(BIN)/python -m benchmarks.pipeline --out benchmarks/results/pipeline.json
	$(BIN)/python -m benchmarks.latency --max-rate measure --out benchmarks/results/latency.json
	$(BIN)/python -m benchmarks.scaling --out benchmarks/results/scaling.json
	$(MAKE) bench-recovery

# Restore 100k/1M users from the changelog, and a 5-minute kill-loop soak (lost/duplicated).
bench-recovery: env
	$(BIN)/python -m benchmarks.recovery --out benchmarks/results/recovery.json

# Model quality: every model and baseline on ML-1M and Video (~50 min on 2 cores), JSON +
# learning curves in benchmarks/results/, summary in BENCHMARKS.md. DATA=... moves the data root.
DATA ?= ../shared/data
eval: env
	$(BIN)/python -m benchmarks.eval --data-root $(DATA) --out benchmarks/results/eval.json

# CI-sized: synthetic data + a short ML-1M smoke (skipped when $(DATA) is missing), ≤ 3 min;
# results stay in .eval/ (git-ignored).
eval-quick: env
	$(BIN)/python -m benchmarks.eval --quick --data-root $(DATA) --out .eval/eval-quick.json

clean:
	rm -rf .demo .pytest_cache .mypy_cache .ruff_cache
