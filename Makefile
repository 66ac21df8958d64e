# retrain: make demo | make test | make wheel-check | make cache IMAGE_DIR=... | make train IMAGE_DIR=... | make label IMAGE=... | make bench [BENCH_ARGS=...]
#          make report-screenshot [OUTPUT_DIR=...]  (rebuilds OUTPUT_DIR/report.html, renders it to report.png; needs chromium)
# Every target creates the virtual environment .venv first if it is missing.

PYTHON_SYSTEM ?= python3
VENV ?= .venv
PYTHON := $(VENV)/bin/python

DEMO_DIR ?= output/demo
IMAGE_DIR ?= $(DEMO_DIR)/digits
BOTTLENECK_DIR ?= cache
OUTPUT_DIR ?= output
ARCHITECTURE ?= efficientnet_lite0
IMAGE ?= $(DEMO_DIR)/digits/3/digit_0003.png

.PHONY: venv demo wheel-check test cache train label report-screenshot bench-exports bench bench-int8 bench-paths bench-unknown bench-memory bench-startup hostile-check clean

venv: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PYTHON) || $(PYTHON_SYSTEM) -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -e '.[test,beam,onnx]'
	touch $@

# The installed package's own demo (retrain/demo.py, also the `retrain-demo` command):
# writes the digits to DEMO_DIR/digits, trains into DEMO_DIR/output, labels one digit.
demo: venv
	$(PYTHON) -m retrain.demo --output_dir $(DEMO_DIR)

# A wheel built from a clean clone of HEAD, installed with its dependencies into a new
# virtual environment, runs the demo outside the repository (benchmarks/wheel_demo.sh;
# minutes: it installs TensorFlow; WHEEL_DIR=... keeps the work folder).
wheel-check:
	PYTHON=$(PYTHON_SYSTEM) bash benchmarks/wheel_demo.sh $(WHEEL_DIR)

LINTED := retrain tests benchmarks examples

test: venv
	$(PYTHON) -m ruff check $(LINTED)
	$(PYTHON) -m ruff format --check $(LINTED)
	$(PYTHON) -m pytest

cache: venv
	$(PYTHON) -m retrain --image_dir $(IMAGE_DIR) --bottleneck_dir $(BOTTLENECK_DIR) \
	    --architecture $(ARCHITECTURE) --cache_only

train: venv
	$(PYTHON) -m retrain --image_dir $(IMAGE_DIR) --bottleneck_dir $(BOTTLENECK_DIR) \
	    --architecture $(ARCHITECTURE) --output_dir $(OUTPUT_DIR)

label: venv
	$(PYTHON) -m retrain.label_image --graph $(OUTPUT_DIR)/model.keras \
	    --labels $(OUTPUT_DIR)/labels.txt --image $(IMAGE)

report-screenshot: venv
	$(PYTHON) -m retrain.report $(OUTPUT_DIR) --screenshot $(OUTPUT_DIR)/report.png
# Size, latency and held-out accuracy of every export format (README table).
EXPORTS_DATA ?= ../shared/data/flowers128
bench-exports: venv
	$(PYTHON) benchmarks/exports.py --image_dir $(EXPORTS_DATA) --work_dir output/bench_exports

# One table: engines' forward-only speed, our cold and warm runs, retrain.py's
# method and the Keras recipe (see benchmarks/bench.py; e.g. BENCH_ARGS="--data DIR --images 0").
bench: venv
	$(PYTHON) benchmarks/bench.py $(BENCH_ARGS)
bench-paths: venv
	$(PYTHON) benchmarks/paths.py
# The cached head on int8 vectors against float vectors, every set in ../shared/data (INT8_ARGS=...).
bench-int8: venv
	$(PYTHON) benchmarks/int8_accuracy.py $(INT8_ARGS)
# Share called unknown of held-out, scikit-image and Caltech-101 photos; ECE before/after
# (docs/unknown.md; UNKNOWN_ARGS="--compare" compares the methods on cached vectors).
bench-unknown: venv
	$(PYTHON) benchmarks/unknown.py $(UNKNOWN_ARGS)

bench-memory: venv
	$(PYTHON) benchmarks/cache_memory.py --rows 2000000
# Start-up: --help, a usage error, import retrain.run, label_image on one picture, warm reruns
# (medians of 5; docs/benchmarks.md, "Start-up"; STARTUP_ARGS="--source OLD_TREE ." compares).
bench-startup: venv
	$(PYTHON) benchmarks/startup.py $(STARTUP_ARGS)
# Every hostile-input case of issue 21 through the real commands (~10 min; tmpfs cases need root).
hostile-check: venv
	$(PYTHON) benchmarks/hostile_check.py $(HOSTILE_ARGS)

clean:
	rm -rf output examples/digits
