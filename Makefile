# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SPEC ?= launch/specs/demo.json
# Job history of the local test cluster: slurmdbd (real accounting: mariadbd + slurmdbd) or jobcomp.
SLURM_ACCOUNTING ?= $(or $(PIXPRO_SLURM_ACCOUNTING),slurmdbd)

.PHONY: venv lock demo test test-unit lint services slurm bench clean-services gpu-check gpu-wheels

PIP := $(PY) -m pip --disable-pip-version-check -q
LOCK := requirements.lock

# The venv from requirements.lock: every package pinned, so pip resolves nothing (resolving
# pyproject.toml's ranges against PyPI took about 70 of 148 s, backtracking over boto3's releases) and
# CI installs the same packages every day; pip check proves the pins satisfy pyproject.toml.
# Two pips at once on disjoint packages: torch's CUDA wheels (nvidia-*, cuda-*, triton: most of the
# bytes, few Python files) beside everything else (most of the Python files to byte-compile); one pip
# uses one core: 97 s against 122-139 s for one pip (benches/RESULTS.md).
CUDA_WHEELS := ^(nvidia|cuda|triton)
$(VENV)/.installed: pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	grep -E '$(CUDA_WHEELS)' $(LOCK) > $(VENV)/lock-cuda.txt || true  # none in a CPU build's lock
	grep -vE '$(CUDA_WHEELS)' $(LOCK) > $(VENV)/lock-rest.txt
	{ [ ! -s $(VENV)/lock-cuda.txt ] || $(PIP) install --no-deps -r $(VENV)/lock-cuda.txt; } & cuda=$$!; \
	$(PIP) install --no-deps -r $(VENV)/lock-rest.txt; rest=$$?; wait $$cuda && [ $$rest -eq 0 ]
	$(PIP) install --no-deps -e .
	$(PIP) check
	touch $@

venv: $(VENV)/.installed

# Re-pin requirements.lock after a change to pyproject.toml's dependencies: resolve them in a scratch venv.
lock:
	rm -rf $(VENV)-lock && $(PYTHON) -m venv $(VENV)-lock
	$(VENV)-lock/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]'
	{ sed -n '1,2p' $(LOCK); $(VENV)-lock/bin/python -m pip freeze --all --exclude-editable | grep -v '^pip=='; } > $(LOCK).new
	mv $(LOCK).new $(LOCK) && rm -rf $(VENV)-lock

demo: venv
	$(VENV)/bin/pixpro submit --executor local --follow $(SPEC)

# The cluster needs no venv: `make -j2 services` (as .ci/run) installs both at once.
services: venv slurm
	PYTHON=$(PY) bash cluster/s3/moto.sh start

slurm:
	PIXPRO_SLURM_ACCOUNTING=$(SLURM_ACCOUNTING) bash cluster/slurm/setup.sh

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# `make test` runs on three pytest-xdist workers on 2 cores, `--dist loadgroup` (tests in one xdist_group
# share a worker: every SLURM test is in group `slurm`, tests/conftest.py): one worker runs the SLURM
# tests against their one cluster (9 to 12 min) while two share the rest, each worker on one OpenMP
# thread: 12 min 04 s on 2 cores, 902 tests, commit 5ab23cd (README). PYTEST_PARALLEL= runs one
# process; more cores, e.g. PYTEST_PARALLEL="-n 8 --dist loadgroup". PYTEST_ARGS adds options (e.g.
# `-p randomly` to shuffle).
PYTEST_PARALLEL ?= -n 3 --dist loadgroup
PYTEST_ARGS ?=
# `make test-unit` on three workers: a third fills the time the deadline tests spend waiting on a stalled
# store (README has the figures).
UNIT_PARALLEL ?= -n 3 --dist loadgroup

# No root, no services (SLURM, moto server): the tests that start the trainer, its preflight or gloo
# ranks in fresh processes or work at ImageNet scale (slow) and the SLURM tests (cluster) are left to
# `make test`.
test-unit: venv
	$(PY) -m pytest -q $(UNIT_PARALLEL) -m "not cluster and not slow" $(PYTEST_ARGS)

# lint runs beside the tests (mypy's cold start is about a minute of one core, and the tests leave a core
# idle while SLURM jobs wait); its output follows theirs, and either failing fails the target.
test: services
	@$(MAKE) --no-print-directory lint > $(VENV)/lint.log 2>&1 & lint=$$!; \
	$(PY) -m pytest -q $(PYTEST_PARALLEL) $(PYTEST_ARGS); tests=$$?; \
	wait $$lint; lint=$$?; cat $(VENV)/lint.log; \
	[ $$lint -eq 0 ] || echo "make test: lint failed (above)"; [ $$tests -eq 0 ] && [ $$lint -eq 0 ]

bench: venv
	$(PY) benches/run_all.py

clean-services:
	-bash cluster/slurm/stop.sh --cancel-jobs
	-bash cluster/s3/moto.sh stop

# GPU acceptance check (benches/gpu_check.py, checks in benches/gpu_checks/): offline, at most 7.5 minutes
# on one GPU (per-check budgets that add up to the total), the real job under launch.run stopped and
# resumed included; gpu_check.json, gpu_check.md and gpu_check-files.tar.gz in $(OUT) (benches/gpu_check.sh).
# GPU_CHECK_ARGS: --cpu (toy CPU mode), --quick, --only NAME[,NAME] (rerun merges into the record),
# --total-s S. With no .venv (a lent GPU machine) it runs the machine's python3 and the wheels in .whl/.
OUT ?= runs/gpu-check
GPU_CHECK_ARGS ?=
gpu-check:
	bash benches/gpu_check.sh $(OUT) $(GPU_CHECK_ARGS)

# The wheels a lent GPU machine lacks (its image holds torch, numpy, numba, rich, fsspec...; not these),
# for its Python 3.12, at requirements.lock's versions: carried there in .whl/ (ignored by git).
GPU_WHEELS := pydantic pydantic_core annotated-types typing-inspection typing_extensions setproctitle
gpu-wheels:
	rm -rf .whl && mkdir .whl
	for name in $(GPU_WHEELS); do grep -iE "^$$name==" $(LOCK); done > .whl/wanted.txt
	test $$(wc -l < .whl/wanted.txt) -eq $(words $(GPU_WHEELS))
	$(PYTHON) -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
	  --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
	  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl -r .whl/wanted.txt
	rm .whl/wanted.txt && ls .whl
