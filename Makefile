# Two commands for a newcomer: `make demo` and `make test` (as root, or prefix sudo).
# Both bootstrap the machine first when needed (scripts/bootstrap is idempotent).
VENV := .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.bootstrap-stamp
JOBS ?= 2

.PHONY: demo test test-noisy unit kernel net lint lint-checks bootstrap clean

$(STAMP): pyproject.toml requirements-dev.txt scripts/bootstrap
	bash scripts/bootstrap

bootstrap:
	bash scripts/bootstrap

demo: $(STAMP)
	@mountpoint -q /sys/fs/bpf || bash scripts/bootstrap
	$(VENV)/bin/bpflab demo

# The suite writes bytecode even where the environment says not to (PYTHONDONTWRITEBYTECODE):
# it starts bpflab (and iptables under `bpflab exec`) hundreds of times, each importing the
# project and its packages again, 0.3 s more each from source. Into the gitignored __pycache__.
test: $(STAMP)
	@mountpoint -q /sys/fs/bpf || bash scripts/bootstrap
	@echo "make test: what earlier runs left (bpflab cleanup):"
	@$(VENV)/bin/bpflab cleanup
	PYTHONDONTWRITEBYTECODE= $(PYTHON) -m pytest -n $(JOBS) --dist loadgroup -rs -p no:cacheprovider tests

# `make test-noisy` runs `make test` beside a bounded noise job that the target starts and stops
# itself (scripts/noise: a busy loop per core; foreign `nz` namespaces joined by a veth pair with
# UDP and TCP traffic between them, iptables-legacy rules with conntrack reloaded over and over,
# conntrack flushes, sysctls changed inside them, namespaces created and deleted; the host-wide
# nf_log_all_netns toggled and restored under the lock the test that needs it holds), and exits
# with the suite's status. The job ends itself after NOISE_SECONDS even if make is killed.
NOISE_SECONDS ?= 3600
test-noisy: $(STAMP)
	@bash scripts/noise start $(NOISE_SECONDS)
	@trap 'bash scripts/noise stop' EXIT; trap 'exit 130' INT TERM HUP; \
	$(MAKE) --no-print-directory test

unit kernel net: $(STAMP)
	$(PYTHON) -m pytest -rs -p no:cacheprovider tests/$@

# Lint checks what cannot run here as well as the code, and fails when a checker is missing
# (scripts/bootstrap installs them all): ruff; shellcheck on every shell script (a *.sh file or a
# sh/bash shebang); actionlint on the GitHub workflows, which runs shellcheck on their `run:`
# steps; `vagrant validate` on the Vagrantfile, provider blocks ignored as no provider is installed
# here, its .vagrant/ kept out of the tree. `lint-checks` is the same without bootstrapping first
# (tox -e lint runs it with its own ruff and actionlint).
RUFF ?= $(VENV)/bin/ruff
ACTIONLINT ?= $(VENV)/bin/actionlint
WORKFLOWS = $(wildcard .github/workflows/*.yml .github/workflows/*.yaml)
SHELL_SCRIPTS = $(shell find . \( -name .git -o -name .venv -o -name .tox -o -name artefacts \) \
	-prune -o -type f -print | LC_ALL=C sort | xargs awk 'FNR == 1 { \
	if (FILENAME ~ /\.sh$$/ || $$0 ~ /^\#!.*[\/ ](ba|da)?sh([ \t]|$$)/) print FILENAME; nextfile }')

define lint-commands
@for tool in $(RUFF) $(ACTIONLINT) shellcheck vagrant; do command -v $$tool >/dev/null \
	|| { echo "lint: $$tool not found (scripts/bootstrap installs it)" >&2; exit 1; }; done
$(RUFF) check codegen harness netns tests conftest.py
shellcheck $(SHELL_SCRIPTS)
$(ACTIONLINT) $(WORKFLOWS)
@dotfiles=$$(mktemp -d) && trap 'rm -rf "$$dotfiles"' EXIT \
	&& echo "vagrant validate --ignore-provider" \
	&& VAGRANT_CHECKPOINT_DISABLE=1 VAGRANT_DOTFILE_PATH="$$dotfiles" vagrant validate --ignore-provider
endef

lint: $(STAMP)
	$(lint-commands)

lint-checks:
	$(lint-commands)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache .hypothesis artefacts
