# Thin wrappers: every target calls a `python -m ...` CLI. Override variables on the command line:
#   make export MODEL=facebook/deit-small-distilled-patch16-224 OUT=artifacts/
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MODEL ?= facebook/deit-base-distilled-patch16-224
OUT ?= artifacts
ARTIFACT ?= $(OUT)/$(notdir $(MODEL))
# Real photos to verify the export on, when this checkout sits beside the shared test data.
VERIFY_IMAGES ?= $(wildcard ../shared/imagenet-sample)
VERIFY := $(if $(VERIFY_IMAGES),--verify-images $(VERIFY_IMAGES),)

.PHONY: install test export bench install-gpu engines gpu-check calibrate

install:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	# Type stubs of the TensorRT 10.13 API for the type-check test; --no-deps: they depend on the real TensorRT.
	$(PY) -m pip install --quiet --no-deps tensorrt-stubs

# NVIDIA GPU machines: the gpu extra (tensorrt, cuda-python, onnxruntime-gpu). onnxruntime and
# onnxruntime-gpu share the `onnxruntime` folder, so the CPU one is removed and the GPU one rewritten.
install-gpu: install
	$(PY) -m pip install --quiet -e '.[gpu]'
	$(PY) -m pip uninstall --quiet --yes onnxruntime
	$(PY) -m pip install --quiet --force-reinstall --no-deps 'onnxruntime-gpu>=1.27'

test:
	$(PY) -m pytest -q

# Exit code 3 means "the Hub cannot be reached": fall back, loudly, to synthetic weights.
export:
	@$(PY) -m export --model $(MODEL) --out $(OUT) $(VERIFY); rc=$$?; \
	if [ $$rc -eq 3 ]; then \
	  echo ""; echo "************************************************************************"; \
	  echo "WARNING: $(MODEL) could not be downloaded; exporting SYNTHETIC (random)"; \
	  echo "weights of the same architecture. Fine for latency, NOT a classifier."; \
	  echo "************************************************************************"; echo ""; \
	  $(PY) -m export --model $(MODEL) --out $(OUT) --weights synthetic $(VERIFY); \
	else exit $$rc; fi

# Every backend at batch 1,2,4,8 on $(ARTIFACT); those that cannot run here are listed with the reason.
BENCH_OUT ?= benchmarks/results
bench:
	$(PY) -m benchmarks --model $(ARTIFACT) --batch-sizes 1,2,4,8 --out $(BENCH_OUT) \
	  $(if $(VERIFY_IMAGES),--agreement-images $(VERIFY_IMAGES) --end-to-end $(VERIFY_IMAGES),)

# TensorRT engines beside the ONNX files; exit status 2 (with what is missing) without TensorRT or a GPU.
engines:
	$(PY) -m export.engines --model $(ARTIFACT)

# export -> calibrate -> engines -> infer -> bench on a small published architecture, PASS/FAIL per step.
gpu-check:
	$(PY) -m benchmarks.gpu_check --out $(OUT)/gpu-check $(if $(VERIFY_IMAGES),--images $(VERIFY_IMAGES),)

# int8: make calibrate CALIB_DIR=/data/imagenet/train [CALIB_ARGS="--num-images 512 --eval-dir ..."]
CALIB_DIR ?=
calibrate:
	@test -n "$(CALIB_DIR)" || { echo "make calibrate: set CALIB_DIR=<folder of photos> (ImageNet train/val or any photos)" >&2; exit 2; }
	$(PY) -m calibration --model $(ARTIFACT) --calib-dir $(CALIB_DIR) $(CALIB_ARGS)
