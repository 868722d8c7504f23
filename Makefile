# streamrec: `make demo` and `make test` work on a fresh clone (they build .venv themselves).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: env demo test test-unit test-integration lint format bench bench-quick bench-recovery eval eval-quick clean

# torch is installed first and pinned: any other spec pulls GBs of CUDA wheels on this box.
# click<8.4: sentence-transformers (issue 5) would otherwise upgrade it past faust's pin.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -e '.[train,text,dev,faust,ann]' 'click<8.4'
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

# Speed benchmarks: JSON in benchmarks/results/, a PNG, and the generated section of
# BENCHMARKS.md (command, machine, date, commit per table). Run on an idle box: ~25 min.
R := benchmarks/results
bench: env
	$(BIN)/python -m benchmarks.pipeline --repeat 3 --out $(R)/pipeline.json
	$(BIN)/python -m benchmarks.model_ceiling --out $(R)/model_ceiling.json
	$(BIN)/python -m benchmarks.model_ceiling --time --out $(R)/model_ceiling_time.json
	$(BIN)/python -m benchmarks.latency --max-rate measure --out $(R)/latency.json
	$(BIN)/python -m benchmarks.scaling --out $(R)/scaling.json
	$(BIN)/python -m benchmarks.catalogue --out $(R)/catalogue.json
	$(MAKE) bench-recovery
	$(BIN)/python -m benchmarks.plot --results $(R) --out $(R)/bench.png
	$(BIN)/python -m benchmarks.report --results $(R) --md BENCHMARKS.md --png $(R)/bench.png

# CI-sized harness check (~3 min): every module end to end with short settings on one quickly
# trained bundle, into .bench-quick/ (git-ignored); checks the results' keys, never speed.
Q := .bench-quick
bench-quick: env
	rm -rf $(Q) && mkdir -p $(Q)
	$(BIN)/streamrec generate --out $(Q)/data
	$(BIN)/streamrec train --data synthetic:$(Q)/data --out $(Q)/train --max-seconds 5
	$(BIN)/streamrec export --checkpoint $(Q)/train/ckpt.pt --out $(Q)/bundle
	$(BIN)/python -m benchmarks.pipeline --bundle $(Q)/bundle --events 4000 --users 2000 --repeat 2 \
	  --out $(Q)/pipeline.json
	$(BIN)/python -m benchmarks.model_ceiling --bundle $(Q)/bundle --short --out $(Q)/model_ceiling.json
	$(BIN)/python -m benchmarks.model_ceiling --time --short --out $(Q)/model_ceiling_time.json
	$(BIN)/python -m benchmarks.latency --bundle $(Q)/bundle --max-rate 800 --fractions 0.5 \
	  --warmup-s 1 --measure-s 3 --pipeline-json $(Q)/pipeline.json --out $(Q)/latency.json
	$(BIN)/python -m benchmarks.scaling --bundle $(Q)/bundle --sizes 1000,3000 --batches 2 \
	  --batch-size 500 --out $(Q)/scaling.json
	$(BIN)/python -m benchmarks.catalogue --bundle $(Q)/bundle --sizes base,5000 --queries 100 \
	  --end-to-end-from 5000 --users 1000 \
	  --ef 32,64 --model-seconds 0.2 --out $(Q)/catalogue.json
	$(BIN)/python -m benchmarks.recovery --bundle $(Q)/bundle --users 2000 --soak-minutes 0.2 \
	  --out $(Q)/recovery.json
	$(BIN)/python -m benchmarks.plot --results $(Q) --out $(Q)/bench.png
	$(BIN)/python -m benchmarks.report --results $(Q) --md $(Q)/BENCHMARKS.md --png $(Q)/bench.png
	$(BIN)/python -m benchmarks.report --results $(Q) --check

# Restore 100k/1M users from the changelog, and a 5-minute kill-loop soak (lost/duplicated).
bench-recovery: env
	$(BIN)/python -m benchmarks.recovery --out benchmarks/results/recovery.json

# Model quality: every model and baseline on ML-1M and Video (~40 min on 2 cores), then issue 5's
# cold-start (6 short SASRec runs, ~20 min) and time-aware (3 seeds x 2 runs, ~17 min)
# sections; JSON + plots in benchmarks/results/, summary in BENCHMARKS.md. DATA=... moves the
# data root. One section alone: $(BIN)/python -m benchmarks.eval --sections cold (or models, time).
DATA ?= ../shared/data
eval: env
	$(BIN)/python -m benchmarks.eval --data-root $(DATA) --out benchmarks/results/eval.json

# CI-sized: synthetic data + a short ML-1M smoke (skipped when $(DATA) is missing), then the
# cold-start and time sections on synthetic data (MiniLM embeds its titles once, cached under
# ~/.cache/streamrec/), ~6 min; results stay in .eval/ (git-ignored).
eval-quick: env
	$(BIN)/python -m benchmarks.eval --quick --data-root $(DATA) --out .eval/eval-quick.json

clean:
	rm -rf .demo .pytest_cache .mypy_cache .ruff_cache
