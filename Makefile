# make quickstart   install into .venv, then train the tiny RAT model on 2 CPU processes
# make test         install into .venv, then run the whole test suite
VENV ?= .venv
NPROC ?= 2
PY := $(VENV)/bin/python

.PHONY: install quickstart test
install:
	bash scripts/install.sh $(VENV) dev

quickstart: install
	$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) launch/train.py run_name=quickstart resume=none

test: install
	$(PY) -m pytest -q
