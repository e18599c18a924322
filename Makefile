# Quick start: `make demo` and `make test` each set up everything they need in .venv first.
# torch comes from TORCH_SPEC (default: the CPU build this project's machines carry); a GPU user
# can say e.g. `make demo TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124"`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PIP = $(VENV)/bin/python -m pip --disable-pip-version-check
STAMP = $(VENV)/.installed
# kohya-ss sd-scripts pins these; lora-monitor must work inside such a venv too
PINS = diffusers==0.32.1 transformers==4.54.1 accelerate==1.6.0 huggingface-hub==0.34.3 safetensors==0.4.5
PINS_VENV ?= .venv-pins

.PHONY: install models demo test test-all test-pins clean

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(TORCH_SPEC)
	$(PIP) install --quiet -e ".[dev]"
	touch $@

install: $(STAMP)

# the BRISQUE SVR model is data we do not ship: fetched once into ~/.cache/lora-monitor (instant when cached)
models: $(STAMP)
	$(VENV)/bin/lora-monitor models brisque

demo: models
	$(VENV)/bin/lora-monitor demo --output-dir demo-output

test: models
	$(VENV)/bin/python -m pytest

test-all: models
	$(VENV)/bin/python -m pytest -m ""

# the same suite against sd-scripts' pinned versions
test-pins: models
	test -x $(PINS_VENV)/bin/python || $(PYTHON) -m venv $(PINS_VENV)
	$(PINS_VENV)/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PINS_VENV)/bin/python -m pip install --quiet --disable-pip-version-check $(TORCH_SPEC)
	$(PINS_VENV)/bin/python -m pip install --quiet --disable-pip-version-check $(PINS) -e ".[dev]"
	$(PINS_VENV)/bin/python -m pytest

clean:
	rm -rf $(VENV) $(PINS_VENV) demo-output .pytest_cache
