# soldout — the two commands of the quick start, and the project's own checks.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo lint bench bench-peer redis-server clean

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

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/soldout bench embedded

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache .hypothesis
