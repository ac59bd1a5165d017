# smtpgw: one entry point. `make demo` and `make test` are the README's two commands.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
ROOT := $(CURDIR)
export PATH := $(ROOT)/.venv/bin:$(PATH)
export CONTAINERS_CONF := $(ROOT)/.lab/containers.conf
export ANSIBLE_CONFIG := $(ROOT)/ansible.cfg
export MOLECULE_GLOB := molecule/*/molecule.yml
# Scenarios `make test` runs, side by side (scripts/run-scenarios.sh; SMTPGW_MOLECULE_JOBS at once).
SCENARIOS ?= gateway cluster
# The lab `make test` runs the demo in: beside the user's smtpgw-lab, never it.
DEMO_CHECK_LAB := smtpgw-democheck
DEMO_CHECK_SUBNET := 10.89.59.0/24
# The checkout as the collection smtpgw.gateway, on the collections path ansible.cfg names.
COLLECTION_LINK := .lab/collections/ansible_collections/smtpgw/gateway

.PHONY: setup demo demo-check test lint unit molecule bench lab-up lab-down lab-status clean

# A relative link (../../../.. is the checkout), so a moved or copied checkout keeps working.
$(COLLECTION_LINK):
	mkdir -p $(@D) && ln -sfn ../../../.. $@

setup:  ## install everything and build the lab image (safe to repeat)
	@scripts/setup.sh

demo: setup  ## set up, then run the main job on the local lab
	@scripts/demo.sh

test: setup lint unit | $(COLLECTION_LINK)  ## everything CI runs
	@scripts/run-scenarios.sh $(SCENARIOS) demo-check

# The README's first command, as a newcomer runs it, in a lab of its own that is removed after.
demo-check: | $(COLLECTION_LINK)
	@export SMTPGW_LAB_NAME=$(DEMO_CHECK_LAB) SMTPGW_LAB_SUBNET=$(DEMO_CHECK_SUBNET); \
	  trap 'smtpgw lab down >/dev/null; rm -rf .lab/$(DEMO_CHECK_LAB)' EXIT; \
	  smtpgw lab down >/dev/null; rm -rf .lab/$(DEMO_CHECK_LAB); \
	  scripts/demo.sh

lint: | $(COLLECTION_LINK)
	yamllint --strict .
	ruff check .
	ruff format --check .
	ansible-lint

unit: | $(COLLECTION_LINK)
	pytest

molecule: | $(COLLECTION_LINK)
	@scripts/run-scenarios.sh $(SCENARIOS)

bench: setup
	@for b in bench/bench_*.py; do python $$b || exit 1; done

lab-up:
	smtpgw lab up
lab-down:
	smtpgw lab down
lab-status:
	smtpgw lab status

clean: lab-down
