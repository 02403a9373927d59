# Two entry points on a fresh machine (Python >= 3.11): `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Set WITH_TORCH=1 to install the optional PyTorch parity dependency as well; it has its own
# stamp, so asking for it later installs it into an existing environment.
WITH_TORCH ?= 0
TORCH_REQ := $(if $(filter 1,$(WITH_TORCH)),-r requirements-torch.txt,)
STAMP := $(VENV)/.installed$(if $(filter 1,$(WITH_TORCH)),-torch,)

.PHONY: demo test install camvid clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python requirements.txt requirements-torch.txt pyproject.toml
	$(BIN)/python -m pip install -r requirements.txt $(TORCH_REQ)
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
