# Two entry points on a fresh machine (Python >= 3.11): `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Set WITH_TORCH=1 to install the optional PyTorch parity dependency as well.
WITH_TORCH ?= 0
TORCH_REQ := $(if $(filter 1,$(WITH_TORCH)),-r requirements-torch.txt,)

.PHONY: demo test install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python requirements.txt requirements-torch.txt pyproject.toml
	$(BIN)/python -m pip install -r requirements.txt $(TORCH_REQ)
	$(BIN)/python -m pip install --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/kdjax demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV)
