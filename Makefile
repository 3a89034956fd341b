# Two commands: `make run` serves the studio, `make test` runs the whole test suite.
# Each creates .venv and installs what is missing; nothing is reinstalled when nothing changed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test test-heavy test-gpu browser clean-venv flash3

run: $(STAMP)
	$(PY) app.py $(ARGS)

test: $(STAMP) browser
	$(PY) -m pytest $(PYTEST_ARGS)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Cases that take minutes on 2 cores (the short demo LoRA run), outside the default suite.
test-heavy: $(STAMP)
	$(PY) -m pytest -m heavy $(PYTEST_ARGS)

# The GPU acceptance suite (tests/gpu): real studio jobs on this machine's GPUs (2 needed; over
# 20 minutes on two H100s). Results and frames of the generated videos land in test-artifacts/gpu/.
test-gpu: $(STAMP)
	$(PY) -m pytest tests/gpu -m gpu -v $(PYTEST_ARGS)

# Debian's chromium for the browser tests (Playwright drives it; never `playwright install`).
browser:
	@command -v chromium >/dev/null 2>&1 || scripts/install-chromium.sh

# FlashAttention-3 for H100/H200 (optional; docs/performance.md). SRC= a flash-attention checkout.
flash3: $(STAMP)
	scripts/build-flash-attention-3.sh $(SRC)

clean-venv:
	rm -rf $(VENV)
