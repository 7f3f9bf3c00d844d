# make demo   -- start Kafka if needed, then walk Examples 1 -> 2 -> 3 -> 4 (the main job)
# make test   -- the tests, against a throwaway Kafka they start themselves
# make check  -- lint and the tests that need no broker (seconds): the inner loop while changing code
# make kafka-up / kafka-down -- a broker on localhost:9092: Docker compose where a Docker engine answers, else local_kafka
# make lint   -- ruff
# make bench  -- bench.py: throughput, latency, failover, restart gap and memory, side by side (about 8 minutes)
# make reset  -- start the walkthrough over: delete its topics, consumer groups, state, reports.db and security.db
# make walkthrough -- a tmux session with one window per script of Example 1, for the examples by hand
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DOCKER_ENGINE := $(shell docker info >/dev/null 2>&1 && echo yes)

.PHONY: demo test check kafka-up kafka-down lint bench reset walkthrough console

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

demo: kafka-up
	$(PY) demo.py

test: $(VENV)/.installed
	$(PY) -m pytest

check: lint
	$(PY) -m pytest -q -m no_broker -p no:cacheprovider

kafka-up: $(VENV)/.installed
ifeq ($(DOCKER_ENGINE),yes)
	docker compose -f docker-compose-expose.yml up -d --wait
else
	@$(PY) -c "import local_kafka, sys; sys.exit(not local_kafka.metadata_ok('127.0.0.1:9092'))" 2>/dev/null \
		&& echo "Kafka already answers at localhost:9092" || $(PY) -m local_kafka start
endif

kafka-down:
ifeq ($(DOCKER_ENGINE),yes)
	docker compose -f docker-compose-expose.yml down -v
else
	$(PY) -m local_kafka stop
endif

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

$(VENV)/.bench-installed: $(VENV)/.installed requirements-bench.txt
	$(PY) -m pip install -q -r requirements-bench.txt
	touch $@

bench: $(VENV)/.bench-installed
	$(PY) bench.py --json bench.json

reset: $(VENV)/.installed
	$(PY) demo.py --reset

walkthrough: $(VENV)/.installed
	$(PY) demo.py --tmux

console: $(VENV)/.installed
	$(PY) console.py
