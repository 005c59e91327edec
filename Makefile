# The two commands of the README: `make demo` and `make test`. Both create
# .venv and install pinned versions (project/constraints.txt) first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint format bench audit clean

$(STAMP): pyproject.toml project/constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c project/constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m project.demo.run

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m tests.benchmarks.run $(BENCH_ARGS)

# The pinned versions against the published vulnerabilities (pip-audit; needs
# pypi.org or api.osv.dev: AUDIT_ARGS=--service osv). The script exits 1 for
# a finding and 3 for "dependency audit could not run: <reason>" (never a
# pass); make itself exits 2 for either (its status for any failed recipe),
# so .ci/run reads the printed line. Call `python -m project.audit` for 1/3.
audit: $(STAMP)
	$(BIN)/python -m project.audit $(AUDIT_ARGS)

clean:
	rm -rf $(VENV) var .pytest_cache .ruff_cache .hypothesis
