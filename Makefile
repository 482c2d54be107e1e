# hvd-pcdarts: the two commands for a fresh machine are `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-done
PYTEST_ARGS ?=

.PHONY: setup test test-fast lint demo clean

$(STAMP): pyproject.toml scripts/setup.sh scripts/install_horovod.sh
	bash scripts/setup.sh
	touch $(STAMP)

setup:
	bash scripts/setup.sh
	touch $(STAMP)

test: $(STAMP)
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check hvd_pcdarts bin tests

demo: $(STAMP)
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH bash scripts/demo.sh

clean:
	rm -rf runs/demo .pytest_cache
