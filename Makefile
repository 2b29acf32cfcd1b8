# The README's two commands: `make demo` and `make test`. Each builds .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

# --no-cache-dir: the wheels (several GB with torch's CUDA libraries) are not also kept in pip's cache, which halves
# the disk the first install needs.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-cache-dir -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/cbam-dsa demo $(ARGS)

test: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/python -m pytest -q $(ARGS)

bench: $(STAMP)
	$(BIN)/cbam-dsa bench $(ARGS)

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache .hypothesis
