PYTHON ?= python3

.PHONY: install demo test lint typecheck format

# Where torch wheels come from when none is installed, e.g. PyTorch's CPU index (see README).
TORCH_INDEX ?=

# torch first, pinned, and only where none is installed (a user's CPU or CUDA torch is kept).
install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q "torch==2.13.0" \
		$(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	@$(PYTHON) -m pip install -q -e ".[test]"
	@$(PYTHON) -m pip install -q -e plugins/adapterctl-fused
	@$(PYTHON) -m pip install -q -e plugins/adapterctl-gguf
	@$(PYTHON) -m pip install -q -e plugins/adapterctl-diffusers

demo: install
	adapterctl demo

lint:
	$(PYTHON) -m ruff check adapterctl tests bench plugins
	$(PYTHON) -m ruff format --check adapterctl tests bench plugins

typecheck:
	$(PYTHON) -m mypy

test: install lint typecheck
	$(PYTHON) -m pytest

format:
	$(PYTHON) -m ruff format adapterctl tests bench plugins
	$(PYTHON) -m ruff check --fix adapterctl tests bench plugins
