# Two entry points on a fresh machine (Python >= 3.11): `make demo` and `make test`. Each makes
# .venv and installs kdjax (editable) with its extras (pyproject.toml) there first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# ACCEL picks JAX's build: cpu, cuda12 or cuda13 (NVIDIA GPUs; cuda = cuda12) or tpu (Cloud TPU
# VMs). A .venv keeps every build installed into it: `make clean` first to go back to cpu.
ACCEL ?= cpu
override BUILD := $(if $(filter cuda,$(ACCEL)),cuda12,$(ACCEL))
ifeq ($(filter cpu cuda12 cuda13 tpu,$(BUILD)),)
$(error ACCEL=$(ACCEL) is not one of cpu, cuda12, cuda13, cuda (= cuda12), tpu)
endif
# WITH_TORCH=1 adds PyTorch (`kdjax convert`, ImageNet backbones, the parity tests). PyPI's Linux
# wheel is PyTorch's CUDA 13 build; TORCH_INDEX=https://download.pytorch.org/whl/cpu gets the
# CPU build instead (docs/install.md).
WITH_TORCH ?= 0
TORCH_INDEX ?=
# The test tools come with the CPU install, the machine where tests run; a GPU node or TPU worker
# gets them only from `make test`.
comma := ,
TORCH_EXTRA := $(if $(filter 1,$(WITH_TORCH)),$(comma)torch,)
EXTRAS := all$(comma)$(if $(filter cpu,$(BUILD)),test,$(BUILD))$(TORCH_EXTRA)
# One stamp per build and WITH_TORCH, so asking for another build or for PyTorch later installs
# it into an existing environment. launch/slurm.sbatch looks for .installed-cuda*.
STAMP := $(VENV)/.installed-$(BUILD)$(if $(filter 1,$(WITH_TORCH)),-torch,)
# What the test targets need besides: nothing more on the CPU.
TEST_STAMP := $(if $(filter cpu,$(BUILD)),$(STAMP),$(VENV)/.installed-test)
PIP_INSTALL = $(BIN)/python -m pip install $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX),)

.PHONY: venv install demo test test-end-to-end test-slow test-without-torch test-newest camvid \
	docs dist check-core clean

# The oldest Python kdjax runs on, and what to do about an older one or a venv module without pip.
define check_python
version=$$($(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) || { \
	echo "make: cannot run $(PYTHON). kdjax needs Python 3.11 or newer: install it and name it," \
		"e.g. make install PYTHON=python3.11" >&2; exit 1; }; \
case $$version in 3.1[1-9]|3.[2-9][0-9]) ;; *) \
	echo "make: kdjax needs Python 3.11 or newer, and $(PYTHON) is $$version. Install a newer" \
		"Python (Ubuntu: sudo apt install python3.11 python3.11-venv; or pyenv, or" \
		"uv python install 3.11) and name it: make install PYTHON=python3.11" >&2; exit 1;; esac; \
$(PYTHON) -c 'import ensurepip' 2>/dev/null || { \
	echo "make: $(PYTHON) cannot make a virtual environment with pip: its ensurepip module is" \
		"missing. On Debian or Ubuntu: sudo apt install python$$version-venv" >&2; exit 1; }
endef

# The environment is kept when it runs pip on Python 3.11 or newer, else made again: a
# `python -m venv` that failed half-way (no ensurepip) leaves bin/python without pip behind. The
# marker is written only once pip runs in it.
$(VENV)/.created:
	@if $(BIN)/python -c 'import sys; assert sys.version_info >= (3, 11); import pip' 2>/dev/null; \
	then :; else \
		$(check_python); \
		echo "making $(VENV) with $(PYTHON)"; rm -rf $(VENV); \
		$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); exit 1; }; \
	fi
	$(BIN)/python -m pip --version
	touch $@

venv: $(VENV)/.created

# Which CUDA build the NVIDIA driver runs: CUDA 12 needs driver 525.60.13 or newer, CUDA 13
# 580.65 or newer. A machine without nvidia-smi (a SLURM login node) is only told what its GPU
# nodes need.
define check_driver
	@driver=$$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n 1); \
	if [ -z "$$driver" ]; then \
		echo "make: no NVIDIA driver found here (nvidia-smi); the GPU machines need driver" \
			"$(if $(filter cuda13,$(BUILD)),580.65,525.60.13) or newer for ACCEL=$(BUILD)." >&2; \
	elif [ "$$(printf '%s\n' 525.60.13 "$$driver" | sort -V | head -n 1)" != 525.60.13 ]; then \
		echo "make: NVIDIA driver $$driver is too old for JAX's CUDA builds (CUDA 12 needs" \
			"525.60.13 or newer). Update the driver." >&2; exit 1; \
	elif [ "$$(printf '%s\n' 580.65 "$$driver" | sort -V | head -n 1)" != 580.65 ]; then \
		if [ "$(BUILD)" = cuda13 ]; then \
			echo "make: NVIDIA driver $$driver runs CUDA 12, not 13: use ACCEL=cuda12 (or update" \
				"the driver to 580.65 or newer)." >&2; exit 1; fi; \
		echo "NVIDIA driver $$driver: CUDA 12 (ACCEL=cuda12) fits."; \
	else \
		echo "NVIDIA driver $$driver: both CUDA 12 and CUDA 13 fit (ACCEL=cuda12 or cuda13)."; \
	fi
endef

$(STAMP): $(VENV)/.created pyproject.toml
	$(if $(filter cuda%,$(BUILD)),$(check_driver),)
	$(PIP_INSTALL) -e '.[$(EXTRAS)]'
	touch $@

ifneq ($(TEST_STAMP),$(STAMP))
$(TEST_STAMP): $(VENV)/.created pyproject.toml
	$(PIP_INSTALL) -e '.[test]'
	touch $@
endif

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/kdjax compare --config=configs/demo.py --workdir=runs/demo

# The CamVid comparison at equal steps, then at the student alone's time with the same teacher
# (needs ../shared/data/camvid; CAMVID_MATCHED="seconds flops" adds equal FLOPs), then their
# published files in benchmarks/camvid/ (the overlays without dataset pixels: the data's licence).
# Interrupted, the same command resumes where it stopped. The finished runs' records (result, step
# cost, curve) are kept in benchmarks/camvid/records/ (committed) whenever the comparisons stop, and
# are restored from there first, so a clean checkout trains the teacher again and reports the
# recorded students without training them; CAMVID_REUSE=0 trains every run.
CAMVID_RUN ?= runs/camvid
CAMVID_MATCHED ?= seconds
CAMVID_REUSE ?= 1
CAMVID_RECORDS := $(BIN)/python benchmarks/camvid/run_records.py
camvid: $(STAMP)
	$(if $(filter 1,$(CAMVID_REUSE)),$(CAMVID_RECORDS) restore $(CAMVID_RUN))
	trap '$(CAMVID_RECORDS) save $(CAMVID_RUN)' EXIT; \
	$(BIN)/kdjax compare --config=configs/camvid/compare.py --workdir=$(CAMVID_RUN) && \
	for budget in $(CAMVID_MATCHED); do \
		$(BIN)/kdjax compare --config=configs/camvid/compare.py --workdir=$(CAMVID_RUN)/$$budget \
			--config.budget=$$budget:student_alone \
			--config.teacher.checkpoint=$(CAMVID_RUN)/teacher/model || exit 1; \
	done
	cp $(CAMVID_RUN)/results.json $(CAMVID_RUN)/results.md $(CAMVID_RUN)/results.png \
		$(CAMVID_RUN)/curves.png benchmarks/camvid/
	for budget in $(CAMVID_MATCHED); do \
		mkdir -p benchmarks/camvid/$$budget && \
		cp $(CAMVID_RUN)/$$budget/results.json $(CAMVID_RUN)/$$budget/results.md \
			$(CAMVID_RUN)/$$budget/results.png $(CAMVID_RUN)/$$budget/curves.png \
			benchmarks/camvid/$$budget/ || exit 1; \
	done
	cp $(CAMVID_RUN)/overlays/predictions_*.png benchmarks/camvid/

# pytest in two runs: first every test but the multi-process ones, one pytest-xdist worker per
# core (compiling is single-threaded, so two workers on two cores take about two thirds of the
# time of one); then the tests that start several JAX processes, one at a time and alone, since
# their processes wait on each other and a busy core beside them makes them time out. $(1): the
# interpreter, $(2): the marker expression, $(3): the test paths. Exit status 5 (no test selected)
# is not a failure.
define pytest_twice
	$(1) -m pytest -q -n auto -m "$(2) and not multiprocess" $(3) || [ $$? -eq 5 ]
	$(1) -m pytest -q -m "$(2) and multiprocess" $(3) || [ $$? -eq 5 ]
endef

# The whole runs (marked end_to_end: the trainer, a comparison or the kdjax command, tens of
# seconds each) are left out of `make test` and run by `make test-end-to-end`; CI runs both.
test: $(STAMP) $(TEST_STAMP)
	$(call pytest_twice,$(BIN)/python,not slow and not end_to_end,)

test-end-to-end: $(STAMP) $(TEST_STAMP)
	$(call pytest_twice,$(BIN)/python,end_to_end and not slow,)

# The long tests (marked slow), the same way.
test-slow: $(STAMP) $(TEST_STAMP)
	$(call pytest_twice,$(BIN)/python,slow,)

# Without PyTorch, cheaply: with PyTorch hidden from the test processes (tests/hidden_modules)
# rather than a second environment, every test module must import (its PyTorch tests skip), and
# the tests whose expectations change without PyTorch must pass, slow ones included.
WITHOUT_TORCH := PYTHONPATH=tests/hidden_modules HIDDEN_MODULES=torch
WITHOUT_TORCH_TESTS := tests/benchmarks/test_accelerator_check.py
test-without-torch: $(STAMP) $(TEST_STAMP)
	@echo "collecting every test with PyTorch hidden"; \
	out=$$($(WITHOUT_TORCH) $(BIN)/python -m pytest -q --collect-only 2>&1) || { \
		echo "$$out" | tail -n 40; exit 1; }; echo "$$out" | tail -n 1
	$(WITHOUT_TORCH) $(BIN)/python -m pytest -q -m "slow or not slow" $(WITHOUT_TORCH_TESTS)

# The core (losses, models, the trainer's step, checkpoints) on Python 3.12 with the newest JAX,
# Flax, Optax and Orbax, and without TensorFlow: a second environment, .venv-newest, with the
# train and test extras under requirements-newest.txt's constraints.
NEWEST_PYTHON ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12) python3.12)
NEWEST := .venv-newest
NEWEST_TESTS := tests/losses tests/models tests/ops tests/runtime tests/io/test_train_checkpointer.py \
	tests/io/test_model_store.py tests/training/test_without_tensorflow.py \
	tests/training/test_readme_example.py tests/distill/test_objective.py \
	tests/training/test_api.py tests/test_extras.py
$(NEWEST)/.installed: requirements-newest.txt pyproject.toml
	$(NEWEST_PYTHON) -m venv $(NEWEST)
	$(NEWEST)/bin/python -m pip install -c requirements-newest.txt -e '.[train,test]'
	touch $@

test-newest: $(NEWEST)/.installed
	$(call pytest_twice,$(NEWEST)/bin/python,not slow,$(NEWEST_TESTS))

# The docs site (mkdocs.yml) in site/, strictly: a broken link, a missing page or a docstring
# that does not render fails the build.
DOCS_STAMP := $(VENV)/.installed-docs
$(DOCS_STAMP): $(VENV)/.created pyproject.toml
	$(PIP_INSTALL) -e '.[docs]'
	touch $@

# NO_MKDOCS_2_WARNING: the theme's banner about its successor, printed on every build.
docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs build --strict --site-dir site

# The sdist and the wheel in dist/; the wheel is built from the sdist, so a file missing from the
# sdist fails here.
dist: $(STAMP) $(TEST_STAMP)
	rm -rf dist
	$(BIN)/python -m build --outdir dist .

# The sdist and the wheel built from it, the wheel installed without extras into a fresh
# environment, where a loss and its gradient run, the models build, TensorFlow is absent and the
# trainer names its extra (tests/test_packaging.py).
check-core: $(STAMP) $(TEST_STAMP)
	$(BIN)/python -m pytest -q -m slow tests/test_packaging.py

clean:
	rm -rf $(VENV) $(NEWEST) dist site
