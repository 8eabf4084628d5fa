# The verbs people type. `make test` and `make demo` set up what they need themselves.
PYTHON ?= python3
VENV ?= .venv
DEPS_HASH := $(shell sha256sum requirements.lock | cut -c1-16)
DEPS_STAMP := $(VENV)/.deps-$(DEPS_HASH)
SETUP_STAMP := build/.setup-$(DEPS_HASH)
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: setup test lock clean

setup: $(SETUP_STAMP)

# Third-party dependencies: installed once per lock file (CI caches $(VENV) keyed on the same hash).
$(DEPS_STAMP): requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.lock
	rm -f $(VENV)/.deps-*
	touch $@

# The package itself, editable, re-linked for every checkout.
$(SETUP_STAMP): $(DEPS_STAMP) pyproject.toml
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	mkdir -p build && rm -f build/.setup-*
	touch $@

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Regenerate requirements.lock from the top-level pins in requirements.in.
lock:
	rm -rf build/lockenv && $(PYTHON) -m venv build/lockenv
	build/lockenv/bin/pip install --quiet --upgrade pip && build/lockenv/bin/pip install --quiet -r requirements.in
	{ echo "# Full resolved dependency set (generated: pip freeze of requirements.in in a fresh venv, Python 3.11, linux x86_64)."; \
	  echo "# Shared by CI, the container and the cluster. Regenerate with: make lock"; \
	  build/lockenv/bin/pip freeze | grep -v -E '^(pip|setuptools|wheel)=='; } > requirements.lock

clean:
	rm -rf build .pytest_cache
