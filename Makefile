# The two set-up commands of the README; each makes its own virtual environment.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000
# Triton's venv (benchmarks/peers/triton_app.py) needs a Python 3.12 with a shared libpython
# (pyenv's builds have one); nvidia-pytriton pins numpy<2, so it cannot share $(VENV).
TRITON_PYTHON ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python) python3.12)
TRITON_VENV ?= .venv-triton

.PHONY: serve dev test lint clean protos kserve-venv peers-venvs

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Serve the built-in OCR demo (ONNX Runtime on the CPU) in split mode.
serve: $(BIN)/python
	$(BIN)/pip install --quiet -e '.[ocr]'
	$(BIN)/splitserve serve examples.ocr.service:OCRService --host $(HOST) --port $(PORT)

# Everything the tests, the linters and the examples need.
dev: $(BIN)/python
	$(BIN)/pip install --quiet -e '.[ocr,build,bench,dev,ray,trace]'

# Install everything the tests need, then run the whole suite.
test: dev kserve-venv
	$(BIN)/python examples/noop/make_model.py
	$(BIN)/python -m pytest -q

# The KServe transformer of tests/test_v2_kserve.py runs in its own environment: kserve
# pins protobuf below the version splitserve's generated gRPC messages need.
KSERVE_VENV ?= .venv-kserve
kserve-venv: $(KSERVE_VENV)/installed
$(KSERVE_VENV)/installed: deploy/kserve/requirements.txt
	$(PYTHON) -m venv $(KSERVE_VENV)
	$(KSERVE_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(KSERVE_VENV)/bin/pip install --quiet -r deploy/kserve/requirements.txt
	$(KSERVE_VENV)/bin/pip install --quiet --no-deps -e .
	touch $@

# Regenerate the protocol v2 gRPC messages from their .proto (grpcio-tools, a dev tool).
protos: $(BIN)/python
	cd src/splitserve/protocol/grpc_v2 && $(CURDIR)/$(BIN)/python -m grpc_tools.protoc -I. --python_out=. inference.proto

# The other servers of benchmarks/peers: their packages in $(VENV) (the peers extra:
# Flask, gunicorn, LitServe, Ray Serve, BentoML), and Triton's venv of its own.
peers-venvs: $(BIN)/python
	$(BIN)/pip install --quiet -e '.[ocr,bench,peers]'
	$(TRITON_PYTHON) -c 'import sys, sysconfig; sys.exit(not sysconfig.get_config_var("Py_ENABLE_SHARED"))' \
		|| { echo "$(TRITON_PYTHON) has no shared libpython (Triton's stubs need one)"; exit 1; }
	test -x $(TRITON_VENV)/bin/python || $(TRITON_PYTHON) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(TRITON_VENV)/bin/pip install --quiet -r benchmarks/peers/triton-requirements.txt
	$(TRITON_VENV)/bin/pip install --quiet --no-deps -e .

# Style, formatting, and the package layering (pyproject.toml [tool.importlinter]).
lint: dev
	$(BIN)/ruff check src tests examples benchmarks
	$(BIN)/ruff format --check src tests examples benchmarks
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) $(KSERVE_VENV) $(TRITON_VENV) build *.egg-info src/*.egg-info tests/_models examples/noop/identity.onnx
