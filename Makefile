# Two entry points on a fresh machine (Python >= 3.11): `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# ACCEL picks JAX's build: cpu, cuda (NVIDIA GPUs) or tpu (Cloud TPU VMs). The cuda and tpu sets
# add JAX's plugin for the same jax release as requirements.txt. A .venv keeps every build installed
# into it: `make clean` first to go back to cpu.
ACCEL ?= cpu
ifeq ($(filter cpu cuda tpu,$(ACCEL)),)
$(error ACCEL=$(ACCEL) is not one of cpu, cuda, tpu)
endif
REQ := $(if $(filter cpu,$(ACCEL)),requirements.txt,requirements-$(ACCEL).txt)
# Set WITH_TORCH=1 to install the optional PyTorch parity dependency as well.
WITH_TORCH ?= 0
TORCH_REQ := $(if $(filter 1,$(WITH_TORCH)),-r requirements-torch.txt,)
# One stamp per ACCEL and WITH_TORCH, so asking for another build or for PyTorch later installs it
# into an existing environment.
STAMP := $(VENV)/.installed-$(ACCEL)$(if $(filter 1,$(WITH_TORCH)),-torch,)

.PHONY: demo test test-newest install camvid clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python requirements.txt $(REQ) requirements-torch.txt pyproject.toml
	$(BIN)/python -m pip install -r $(REQ) $(TORCH_REQ)
	$(BIN)/python -m pip install --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/kdjax compare --config=configs/demo.py --workdir=runs/demo

# The CamVid comparison at equal steps, then at the student alone's time and at its FLOPs with the
# same teacher (needs ../shared/data/camvid), then their published files in benchmarks/camvid/ (the
# overlays without dataset pixels: the data's licence).
CAMVID_RUN ?= runs/camvid
CAMVID_MATCHED := seconds flops
camvid: $(STAMP)
	$(BIN)/kdjax compare --config=configs/camvid/compare.py --workdir=$(CAMVID_RUN)
	for budget in $(CAMVID_MATCHED); do \
		$(BIN)/kdjax compare --config=configs/camvid/compare.py --workdir=$(CAMVID_RUN)/$$budget \
			--config.budget=$$budget:student_alone \
			--config.teacher.checkpoint=$(CAMVID_RUN)/teacher/model || exit 1; \
	done
	cp $(CAMVID_RUN)/results.json $(CAMVID_RUN)/results.md $(CAMVID_RUN)/results.png benchmarks/camvid/
	for budget in $(CAMVID_MATCHED); do \
		mkdir -p benchmarks/camvid/$$budget && \
		cp $(CAMVID_RUN)/$$budget/results.json $(CAMVID_RUN)/$$budget/results.md \
			$(CAMVID_RUN)/$$budget/results.png benchmarks/camvid/$$budget/ || exit 1; \
	done
	cp $(CAMVID_RUN)/overlays/predictions_*.png benchmarks/camvid/

# One pytest worker per core (pytest-xdist): compiling is single-threaded, so two workers on two
# cores run the suite in about two thirds of the time of one.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n auto

# The core (losses, models, the trainer's step, checkpoints) on Python 3.12 with the newest JAX,
# Flax, Optax and Orbax, and without TensorFlow: a second environment, .venv-newest.
NEWEST_PYTHON ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12) python3.12)
NEWEST := .venv-newest
NEWEST_TESTS := tests/losses tests/models tests/ops tests/checkpoint tests/runtime \
	tests/trainer/test_without_tensorflow.py tests/trainer/test_readme_example.py \
	tests/trainer/test_distill.py
$(NEWEST)/.installed: requirements-newest.txt pyproject.toml
	$(NEWEST_PYTHON) -m venv $(NEWEST)
	$(NEWEST)/bin/python -m pip install -r requirements-newest.txt
	$(NEWEST)/bin/python -m pip install --no-deps -e .
	touch $@

test-newest: $(NEWEST)/.installed
	$(NEWEST)/bin/python -m pytest -q -n auto $(NEWEST_TESTS)

clean:
	rm -rf $(VENV) $(NEWEST)
