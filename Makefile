# Two commands for a newcomer: `make demo` and `make test` (as root, or prefix sudo).
# Both bootstrap the machine first when needed (scripts/bootstrap is idempotent).
VENV := .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.bootstrap-stamp
JOBS ?= 2

.PHONY: demo test unit kernel net lint bootstrap clean

$(STAMP): pyproject.toml requirements-dev.txt scripts/bootstrap
	bash scripts/bootstrap

bootstrap:
	bash scripts/bootstrap

demo: $(STAMP)
	@mountpoint -q /sys/fs/bpf || bash scripts/bootstrap
	$(VENV)/bin/bpflab demo

test: $(STAMP)
	@mountpoint -q /sys/fs/bpf || bash scripts/bootstrap
	$(VENV)/bin/bpflab cleanup
	$(PYTHON) -m pytest -n $(JOBS) --dist loadgroup -rs -p no:cacheprovider tests

unit kernel net: $(STAMP)
	$(PYTHON) -m pytest -rs -p no:cacheprovider tests/$@

lint: $(STAMP)
	$(VENV)/bin/ruff check codegen harness netns tests conftest.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache .hypothesis artefacts
