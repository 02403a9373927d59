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

.PHONY: demo test install camvid clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python requirements.txt $(REQ) requirements-torch.txt pyproject.toml
	$(BIN)/python -m pip install -r $(REQ) $(TORCH_REQ)
	$(BIN)/python -m pip install --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/kdjax compare --config=configs/demo.py --workdir=runs/demo

# The CamVid comparison (about 2 h on 2 cores; needs ../shared/data/camvid), then its published
# files in benchmarks/camvid/ (the overlays without dataset pixels: the data's licence).
CAMVID_RUN ?= runs/camvid
camvid: $(STAMP)
	$(BIN)/kdjax compare --config=configs/camvid/compare.py --workdir=$(CAMVID_RUN)
	cp $(CAMVID_RUN)/results.json $(CAMVID_RUN)/results.md $(CAMVID_RUN)/results.png benchmarks/camvid/
	cp $(CAMVID_RUN)/overlays/predictions_*.png benchmarks/camvid/

# One pytest worker per core (pytest-xdist): compiling is single-threaded, so two workers on two
# cores run the suite in about two thirds of the time of one.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n auto

clean:
	rm -rf $(VENV)
