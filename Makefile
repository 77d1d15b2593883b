# The README's two set-up commands: `make demo` (the offline demo) and `make test` (the test suite).
# Both work on a fresh machine with only Python 3.11 or 3.12: they create .venv and install the
# tested versions from constraints.txt.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast lint format docs clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install -c constraints.txt -e '.[dev,deepspeed,wandb,quantization]'
	@# optimum-quanto compiles its CPU kernels (int2/int4 unpacking) into the environment the first
	@# time a run needs them (~35 s on 2 cores); build them here, as a cluster image build would.
	$(BIN)/python -c "from optimum.quanto.library.extensions import get_extension; get_extension('quanto_cpp').lib" \
		|| echo "optimum-quanto's CPU kernels did not build here (no C++ compiler?): int2/int4 quanto on a CPU worker will try again"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/raytuner demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy raytuner

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# The SimpleTuner compatibility doc is generated from raytuner/config/data/compatibility.tsv;
# a test fails when the committed copy is stale.
docs: $(STAMP)
	mkdir -p docs
	$(BIN)/raytuner check-config --keys --format markdown > docs/simpletuner-compatibility.md

# pytest exits 5 when it collects nothing: that is a broken suite, never a pass.
PYTEST_RUN = status=$$?; if [ $$status -eq 5 ]; then echo "pytest collected no tests: failing"; fi; exit $$status

# Everything (CI): lint, then every test, with the slowest listed.
test: lint
	@HF_HUB_OFFLINE=1 $(BIN)/pytest --durations=25; $(PYTEST_RUN)

# The inner loop: the tests that start no Ray and run no end-to-end pipeline (see the markers in
# pyproject.toml); no lint.
test-fast: $(STAMP)
	@HF_HUB_OFFLINE=1 $(BIN)/pytest -m "not ray and not slow" --durations=10; $(PYTEST_RUN)

clean:
	rm -rf $(VENV) output .pytest_cache .ruff_cache .mypy_cache
