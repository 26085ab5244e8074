# Two entry points for a new machine: `make demo` (the whole lifecycle) and `make test`.
# Both create .venv and install lmctl with the pinned constraints (torch 2.13.0 CPU wheel).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lmctl-installed

.PHONY: demo test test-all install clean browser peers

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) scripts/demo.py

# Headless Chromium renders the HTML eval report in one test; installed where apt-get and root allow.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	  && (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
	  || echo "note: no chromium; the HTML render test will be skipped"; }

test: $(STAMP) browser
	$(PY) -m pytest -m "not slow and not team" -q

test-all: $(STAMP) browser
	$(PY) -m pytest -q

# lmctl against TRL, lm-eval-harness and transformers serve (scripts/bench_peers.py): the peer table.
peers: $(STAMP)
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,peers]'
	$(PY) -m lmctl models pull smollm2-135m
	$(PY) scripts/bench_peers.py

clean:
	rm -rf $(VENV) .lmctl runs
