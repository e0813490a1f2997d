# make quickstart   install into .venv, then train the tiny RAT model on 2 CPU processes
# make test         install into .venv, then run the whole test suite
VENV ?= .venv
NPROC ?= 2
# pytest-xdist workers for `make test`: three keep two cores busy while a test waits on its subprocesses.
TEST_WORKERS ?= 3
PY := $(VENV)/bin/python
# A fresh run directory per quick start, the same for both ranks.
RUN_NAME ?= quickstart-$(shell date +%Y%m%d-%H%M%S)

.PHONY: install quickstart test
install:
	bash scripts/install.sh $(VENV) dev

quickstart: install
	$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) launch/train.py run_name=$(RUN_NAME)

test: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal
