# soldout — the two commands of the quick start, and the project's own checks.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo demo-cluster lint bench bench-peer redis-server clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: $(STAMP) redis-server
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

# The Redis peer's tests and benchmark run a real redis-server; each starts its own on
# a free loopback port, so the system service is stopped right after installing.
redis-server:
	@command -v redis-server >/dev/null 2>&1 || { \
		echo "installing redis-server with apt-get"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; \
		(service redis-server stop || true) >/dev/null 2>&1; }

bench-peer: $(STAMP) redis-server
	$(BIN)/soldout bench flash --spawn --durable --peer redis
	$(BIN)/soldout bench catalog --spawn --durable --peer redis

demo: $(STAMP)
	$(BIN)/soldout bench flash --spawn --memory

# Three NATS servers and two soldout nodes on loopback, the flash crowd through both
# gateways (open loop, so the sale lasts), kill -9 of the hot SKU's owner 2 s in; prints the
# owners before and after, the failover time and the checks. Stops everything it started.
demo-cluster: $(STAMP)
	$(BIN)/soldout bench flash --cluster 2 --buyers 24000 --stock 10000 --rate 2000 --kill-owner-after 2

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/soldout bench embedded

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache .hypothesis
