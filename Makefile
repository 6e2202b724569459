# ldm-paper: `make reproduce` (set up, then regenerate every figure at the cpu preset), `make test` (set up, then test).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
PRESET ?= cpu
export PATH := $(BIN):$(PATH)
export MPLBACKEND := Agg
export PYTHONUNBUFFERED := 1

.PHONY: setup venv data browser cluster system test-setup sync outputs outputs-check test test-fast reproduce gpu-check docs lab clean-cache

setup: venv data

# The virtual environment, with the package (editable) and its dev extras; redone when settings.ini or setup.py change.
venv: $(VENV)/.installed
# constraints.txt pins every package to the versions the committed notebook outputs were made with: numerical and
# plotting libraries change their last digits and pixels between releases, and make test compares against those outputs.
# pip compiles the bytecode of all 17k files (46 of the 129 s a fresh install takes on 2 cores): leave it, since with
# PYTHONDONTWRITEBYTECODE set (as on CI machines) nothing would cache it later and every process would compile again.
$(VENV)/.installed: settings.ini setup.py constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q -c constraints.txt -e ".[dev]"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (ldm-paper)" >/dev/null
	@touch $@

# Fashion-MNIST from Debian's package when it is missing (root or passwordless sudo); otherwise the loader's message.
data: venv
	@$(BIN)/python -c "from ldm_paper.data import fashion_mnist_dir as d; d()" 2>/dev/null && echo "data: Fashion-MNIST found" || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo apt-get update -qq && sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null; fi; \
	  $(BIN)/python -c "from ldm_paper.data import fashion_mnist_dir as d; print('data: Fashion-MNIST in', d())"; }

# Chromium for the headless-browser test of the course site (tests/test_docs_browser.py), installed like the dataset
# when it is missing and we may; without it that test is skipped.
browser:
	@if command -v chromium >/dev/null || command -v chromium-browser >/dev/null || command -v google-chrome >/dev/null; then echo "browser: Chromium found"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then { apt-get update -qq && apt-get install -y -qq chromium >/dev/null && echo "browser: Chromium installed"; } || echo "browser: installing Chromium failed: tests/test_docs_browser.py will be skipped"; \
	elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then { sudo apt-get update -qq && sudo apt-get install -y -qq chromium >/dev/null && echo "browser: Chromium installed"; } || echo "browser: installing Chromium failed: tests/test_docs_browser.py will be skipped"; \
	else echo "browser: no Chromium and no way to install it: tests/test_docs_browser.py will be skipped"; fi

# A single-node SLURM for tests/test_slurm.py (Debian's slurm-wlm and munge; the test starts the daemons itself), installed
# like Chromium when it is missing and we may; without it that test runs its scenario on submitit's local executor.
cluster:
	@if command -v slurmctld >/dev/null && command -v munged >/dev/null; then echo "cluster: SLURM found"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then { apt-get update -qq && apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null && echo "cluster: SLURM installed"; } || echo "cluster: installing SLURM failed: tests/test_slurm.py will use submitit's local executor"; \
	else echo "cluster: no SLURM and no way to install it: tests/test_slurm.py will use submitit's local executor"; fi

# The Debian packages of data, browser and cluster in one apt-get run (root only, and only those missing), so that
# make test can install them while pip fills the virtual environment; the three targets above then find them.
system:
	@pkgs=""; \
	dpkg-query -W -f='$${Status}' dataset-fashion-mnist 2>/dev/null | grep -q "ok installed" || pkgs="dataset-fashion-mnist"; \
	{ command -v chromium || command -v chromium-browser || command -v google-chrome; } >/dev/null || pkgs="$$pkgs chromium"; \
	{ command -v slurmctld && command -v munged; } >/dev/null || slurm="slurm-wlm munge"; \
	if [ -n "$$pkgs$$slurm" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -qq && { [ -z "$$pkgs" ] || apt-get install -y -qq $$pkgs >/dev/null; } \
	  && { [ -z "$$slurm" ] || apt-get install -y -qq --no-install-recommends $$slurm >/dev/null; } \
	  && echo "system: installed$$pkgs $$slurm" || echo "system: installing$$pkgs $$slurm failed (the targets data, browser and cluster say what follows)"; fi

# What make test needs: the venv and the Debian packages side by side, then the checks of data, browser and cluster
test-setup:
	@$(MAKE) --no-print-directory -j2 venv system
	@$(MAKE) --no-print-directory data browser cluster sync

# Fails when nbdev_export or nbdev_clean would change a file: the package must be what the notebooks export.
sync: venv
	$(BIN)/python tests/nbdev_sync.py

# Every notebook executed at its ci defaults, in order, in one fresh cache, its cleaned outputs written into it
# (nbs/96a_outputs.ipynb); commit the notebooks afterwards. `ldm-paper outputs 55_sampling` refreshes one.
outputs: setup
	OMP_WAIT_POLICY=PASSIVE $(BIN)/ldm-paper outputs --workers 3

# A fresh execution of every notebook compared with its committed outputs (what `make test` runs first).
outputs-check: setup
	OMP_WAIT_POLICY=PASSIVE $(BIN)/ldm-paper outputs --check --workers 3

# The README's test command: set up from nothing, check sync, then three things side by side (all CPU-bound but the
# SLURM scenarios, so two cores stay busy until the end instead of idling through each stage's last straggler):
# - every notebook at its ci defaults compared with its committed outputs (ldm-paper outputs --check: two kernels,
#   reused and reset between notebooks), log in .test-outputs.log;
# - the SLURM scenarios, which mostly wait on SLURM's queue (a requeued job sits there 2 min), log in .test-slurm.log;
# - pytest on three workers (pytest-xdist), each test file on one, one torch thread each: much of a test is starting
#   Python and importing torch, which one thread does; files are handed out in collection order, the paper-smoke test
#   first and then the slowest files (tests/conftest.py), so that the smoke test has one worker and the rest is spread
#   over two: with two, the rest ran on one worker alone for the last 7 minutes after the outputs check ended;
#   accelerate launches on one machine take a free port, so tests side by side do not collide.
# Two torch workers on two cores spin-wait each other to a crawl under OpenMP's default (active) wait policy: PASSIVE.
test: test-setup
	@export OMP_WAIT_POLICY=PASSIVE; \
	$(BIN)/python -m pytest tests/test_slurm.py --durations=5 > .test-slurm.log 2>&1 & slurm_pid=$$!; \
	$(BIN)/ldm-paper outputs --check --workers 2 > .test-outputs.log 2>&1 & outputs_pid=$$!; \
	trap 'kill $$slurm_pid $$outputs_pid 2>/dev/null' INT TERM; \
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest tests --ignore=tests/test_slurm.py -n 3 --dist loadfile --no-loadscope-reorder --durations=15; pytest=$$?; \
	wait $$outputs_pid; outputs=$$?; wait $$slurm_pid; slurm=$$?; \
	echo "--- every notebook against its committed outputs, run beside pytest (.test-outputs.log):"; cat .test-outputs.log; \
	echo "--- tests/test_slurm.py, run beside pytest (.test-slurm.log):"; cat .test-slurm.log; \
	echo "make test: pytest exit $$pytest, outputs check exit $$outputs, SLURM scenarios exit $$slurm"; \
	test $$pytest -eq 0 -a $$outputs -eq 0 -a $$slurm -eq 0

test-fast: venv
	$(BIN)/python -m pytest tests -x -q

# On a machine with CUDA: paper-smoke on the GPU in bf16, then a training and a sampling step of every paper width
# (figures/data/gpu_check.csv, which the paper preset's dry run turns into GPU-hours). Without CUDA: says so, exits 0.
gpu-check: setup
	$(BIN)/ldm-paper gpu-check

# The README's main command: set up from nothing, then regenerate the figures at PRESET (default: cpu).
# Resumable: a second run skips every entry whose done marker matches (runs/<preset>/); --force redoes.
reproduce: setup
	$(BIN)/ldm-paper family --scale paper
	$(BIN)/ldm-paper reproduce --preset $(PRESET)

# The course as an offline static site: every notebook executed at its ci defaults (never in place), one HTML page each,
# _site/index.html linking them all, figures copied in, _site/index.png a screenshot where Chromium exists.
# (Where Quarto is installed, `nbdev_docs` builds nbdev's own site into _docs/ from the committed notebooks.)
docs: setup
	OMP_WAIT_POLICY=PASSIVE $(BIN)/ldm-paper docs --out _site

lab: setup
	$(BIN)/jupyter lab nbs $$([ "$$(id -u)" = 0 ] && echo --allow-root)

clean-cache:
	rm -rf .cache
