PYTHON ?= python3

.PHONY: install demo test lint typecheck format

# torch first, pinned: an unpinned torch requirement on a machine without one pulls a CUDA build.
install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q "torch==2.13.0"
	@$(PYTHON) -m pip install -q -e ".[test]"

demo: install
	adapterctl demo

lint:
	$(PYTHON) -m ruff check adapterctl tests bench
	$(PYTHON) -m ruff format --check adapterctl tests bench

typecheck:
	$(PYTHON) -m mypy

test: install lint typecheck
	$(PYTHON) -m pytest

format:
	$(PYTHON) -m ruff format adapterctl tests bench
	$(PYTHON) -m ruff check --fix adapterctl tests bench
