# hvd-pcdarts: the two commands for a fresh machine are `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-done
PYTEST_ARGS ?=
# two pytest workers: one runs the multi-rank tests (marked `ranks`) one at a time, the other the single-process
# tests file by file (tests/conftest.py groups them); TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2
XDIST := $(if $(filter 0,$(TEST_WORKERS)),-p no:xdist,-n $(TEST_WORKERS) --dist loadgroup)

.PHONY: setup test test-fast lint demo clean bench

$(STAMP): pyproject.toml scripts/setup.sh scripts/install_horovod.sh
	bash scripts/setup.sh
	touch $(STAMP)

setup:
	bash scripts/setup.sh
	touch $(STAMP)

test: $(STAMP)
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m pytest $(XDIST) $(PYTEST_ARGS)

test-fast: $(STAMP)
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m pytest $(XDIST) -m "not slow and not ranks" $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check hvd_pcdarts bin tests

demo: $(STAMP)
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH bash scripts/demo.sh

# CPU benchmarks, small (a few minutes; results: benchmarks/RESULTS.md). On a GPU machine:
#   make bench BENCH_DEVICE=cuda   (or bash benchmarks/run_device.sh, which also builds Horovod with NCCL)
BENCH_DEVICE ?= cpu
bench: $(STAMP)
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) benchmarks/data.py --device $(BENCH_DEVICE)
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) benchmarks/search_step.py --device $(BENCH_DEVICE) \
	  $(if $(filter cpu,$(BENCH_DEVICE)),--batch 8 --steps 2 --warmup 1 --variants eager eager+cl eager+bnc eager+be eager+cl+be,--check)
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) benchmarks/scaling.py --ranks 1 2 --batch 16 --steps 3

clean:
	rm -rf runs/demo .pytest_cache
