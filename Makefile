# One command per habit. CI calls `make test` (see .ci/run).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: venv run mesh up up-cluster down test unit integration lint format bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

## the main job on the embedded default: NATS + chDB + every service, a demo team, a trace
run: venv
	$(BIN)/beamline demo

## the embedded mesh (local NATS, chDB, every service) until Ctrl-C
mesh: venv
	$(BIN)/beamline up

## the mesh as containers (docker-compose.yml): build the image, start in the background
up:
	docker compose up -d --build

## the same on a 3-node NATS cluster with R3 streams (docker-compose.cluster.yml over the base);
## stop it with: docker compose -f docker-compose.yml -f docker-compose.cluster.yml down
up-cluster:
	docker compose -f docker-compose.yml -f docker-compose.cluster.yml up -d --build

## stop and remove the containers (named volumes keep NATS and ClickHouse data)
down:
	docker compose down

## lint, types, then the whole suite (pytest exits 5 when it collects nothing: that fails too)
test: venv lint
	$(BIN)/python -m pytest -p no:cacheprovider

unit: venv
	$(BIN)/python -m pytest tests/unit

integration: venv
	$(BIN)/python -m pytest tests/integration

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: venv
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

## figures and ratios against baselines measured in the same run -> bench/results/latest.json
bench: venv
	$(BIN)/python -m bench

clean:
	rm -rf .beamline bench/results .pytest_cache .mypy_cache .ruff_cache
