# Two commands do all set-up on a fresh machine with Python 3.11 and pip:
#   make quickstart   # venv + install + fetch SST-2 + `loraforge run configs/quickstart.yaml`
#   make test         # venv + install + fetch all data + the test suite: the fast lane, then the slow one
#   make test-fast    # the fast lane alone (every test not marked slow), a few minutes
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: quickstart test test-fast test-slow test-data venv bench gpu-check clean

$(BIN)/loraforge: pyproject.toml docker/install.sh
	$(PYTHON) -m venv $(VENV)
	# the same install the Docker images run (docker/install.sh), plus the test tools
	LORAFORGE_WITH_TEST_TOOLS=1 docker/install.sh $(BIN)/python memory,test,eval,server --editable
	touch $@

venv: $(BIN)/loraforge

# Third-party data is not in git: `loraforge data fetch` fills data/ from $$LORAFORGE_DATA_MIRROR,
# ../shared/ beside the checkout, or the public sources, checking every file's sha256.
quickstart: venv
	$(BIN)/loraforge data fetch sst2
	HF_HUB_OFFLINE=1 $(BIN)/loraforge run configs/quickstart.yaml

PYTEST := HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

# Java and Perl's XML::Twig (the E2E metrics and their oracle, the official script), installed when missing
test-data: venv
	.ci/system-deps
	$(BIN)/loraforge data fetch

# Two lanes, fast first: a broken import or config fails in minutes, before the multi-process tests start.
test: test-data
	$(PYTEST) -m "not slow" --durations=10
	$(PYTEST) -m slow --durations=30

test-fast: test-data
	$(PYTEST) -m "not slow" --durations=10

test-slow: test-data
	$(PYTEST) -m slow --durations=30

bench: venv
	$(BIN)/loraforge data fetch sst2 e2e alpaca mt_bench sharegpt_identity
	HF_HUB_OFFLINE=1 $(BIN)/python bench/b2_trial_overhead.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/b4_double_quant.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/b5_tokens_per_s.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/b6_memory_strategies.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/b8_trainer_parity.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/b1_asha_vs_grid.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/b10_generation.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/b11_judge.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/b12_packed_trials.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/b13_tracking_overhead.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/b14_registry_round_trip.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/b15_cluster.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/b16_one_load.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/b16_routing.py

# The GPU acceptance run (bench/gpu_check.py; docs/benchmarks.md): on a CUDA machine, with the venv built by
# docker/install.sh from the CUDA index; elsewhere it says it skipped and exits 0.
gpu-check: venv
	$(BIN)/loraforge data fetch sharegpt_identity
	HF_HUB_OFFLINE=1 $(BIN)/python bench/gpu_check.py

clean:
	rm -rf $(VENV) loraforge_results mlruns.db mlartifacts reports
