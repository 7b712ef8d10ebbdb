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
# Every dependency but torch comes from the lock; torch is pinned exactly in pyproject.toml and
# installed first, so nothing can pull a multi-GB CUDA build onto a CPU machine.
LOCK := requirements.lock
EXTRAS := cpu,distributed,serve,dev
PIP_VERSION := 26.3
PIP_TOOLS := pip-tools==7.6.2
TENSORRT_STUBS := tensorrt-stubs==10.13.0.35.1
COMPILE = CUSTOM_COMPILE_COMMAND="make lock" $(VENV)/bin/pip-compile --quiet --strip-extras --no-emit-index-url --no-emit-find-links \
	--unsafe-package torch $(foreach e,$(subst $(comma), ,$(EXTRAS)),--extra $(e)) pyproject.toml
comma := ,

.PHONY: install lock check-lock test export bench install-gpu install-tensorrt engines gpu-check calibrate serve install-mlserver

install:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet pip==$(PIP_VERSION)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -r $(LOCK)
	$(PY) -m pip install --quiet --no-deps -e .
	# Type stubs of the TensorRT 10.13 API for the type-check test; --no-deps: they depend on the real TensorRT.
	$(PY) -m pip install --quiet --no-deps $(TENSORRT_STUBS)

# Refresh the lock on purpose (newest releases that pyproject.toml allows).
lock:
	$(PY) -m pip install --quiet $(PIP_TOOLS)
	$(COMPILE) --upgrade --output-file $(LOCK)

# Fails when pyproject.toml and the lock disagree (CI runs it): resolve again, keeping the locked
# versions wherever pyproject.toml still allows them, and compare.
check-lock:
	$(PY) -m pip install --quiet $(PIP_TOOLS)
	@cp $(LOCK) $(VENV)/lock-check.txt
	@$(COMPILE) --output-file $(VENV)/lock-check.txt
	@diff -u $(LOCK) $(VENV)/lock-check.txt || { echo "requirements.lock does not match pyproject.toml: run 'make lock' and commit it" >&2; exit 1; }

# NVIDIA GPU machines, in steps, so that what PyPI has is installed even where NVIDIA's index cannot be reached:
# torch (`make install`: PyPI's torch 2.13.0 is the CUDA 13 build), the gpu extra (onnxruntime-gpu, cuda-python,
# Polygraphy), the onnxruntime -> onnxruntime-gpu swap (both share the `onnxruntime` folder, so the CPU one is
# removed and the GPU one rewritten), and TensorRT last. TensorRT's wheels are only on NVIDIA's index (PyPI's
# tensorrt-cu13 is a stub that downloads them from there): if that fails, one line says so and the target still
# succeeds; `make gpu-check` then SKIPs the TensorRT rows with the reason. TensorRT 10, not 11: it is the major that
# onnxruntime-gpu's TensorRT provider links (libnvinfer.so.10), so `trt` and `ort-trt` share it.
NVIDIA_INDEX := https://pypi.nvidia.com
TENSORRT := tensorrt-cu13>=10.14,<11
install-gpu: install
	$(PY) -m pip install --quiet -e '.[gpu]'
	$(PY) -m pip uninstall --quiet --yes onnxruntime
	$(PY) -m pip install --quiet --force-reinstall --no-deps 'onnxruntime-gpu>=1.27'
	@if $(MAKE) --no-print-directory install-tensorrt PY=$(PY) >$(VENV)/install-tensorrt.log 2>&1; then \
	  echo "install-gpu: TensorRT installed from $(NVIDIA_INDEX)"; \
	else \
	  echo "install-gpu: TensorRT not installed: its libraries come only from NVIDIA's index $(NVIDIA_INDEX), which this machine could not use (see $(VENV)/install-tensorrt.log; retry with make install-tensorrt); everything else is installed and make gpu-check skips the TensorRT rows"; \
	fi

# TensorRT alone (the last step of install-gpu), from NVIDIA's index.
install-tensorrt:
	$(PY) -m pip install --quiet --timeout 20 --retries 1 --extra-index-url $(NVIDIA_INDEX) '$(TENSORRT)'

# The Ray tests get a process of their own: an in-process Ray driver installs its own signal handlers and
# leaves threads behind, which must not outlive into the other tests.
test:
	$(PY) -m pytest -q --ignore=tests/test_distributed.py
	$(PY) -m pytest -q tests/test_distributed.py

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

# Every backend at batch 1,2,4,8 on $(ARTIFACT) (GPU rows on a GPU machine, CPU rows elsewhere);
# those that cannot run here are listed with the reason.
BENCH_OUT ?= benchmarks/results
bench:
	$(PY) -m benchmarks --model $(ARTIFACT) --batch-sizes 1,2,4,8 --out $(BENCH_OUT) \
	  $(if $(VERIFY_IMAGES),--agreement-images $(VERIFY_IMAGES) --end-to-end $(VERIFY_IMAGES),)

# TensorRT engines beside the ONNX files; exit status 6 (with what is missing) without TensorRT or a GPU.
engines:
	$(PY) -m export.engines --model $(ARTIFACT)

# Every GPU step that can run here, PASS/FAIL/SKIP per step (TensorRT steps SKIP where it is missing).
gpu-check:
	$(PY) -m benchmarks.gpu_check --out $(OUT)/gpu-check $(if $(VERIFY_IMAGES),--images $(VERIFY_IMAGES),)

# int8: make calibrate CALIB_DIR=/data/imagenet/train [CALIB_ARGS="--num-images 512 --eval-dir ..."]
CALIB_DIR ?=
calibrate:
	@test -n "$(CALIB_DIR)" || { echo "make calibrate: set CALIB_DIR=<folder of photos> (ImageNet train/val or any photos)" >&2; exit 2; }
	$(PY) -m calibration --model $(ARTIFACT) --calib-dir $(CALIB_DIR) $(CALIB_ARGS)

# An Open Inference Protocol endpoint (Triton's HTTP API) on 127.0.0.1:8000: make serve SERVE_ARGS="--port 9000 --max-batch-size 16"
SERVE_ARGS ?=
serve:
	$(PY) -m runtime.serve --model $(ARTIFACT) $(SERVE_ARGS)

# MLServer for `python -m benchmarks.serve --peer mlserver`, in a virtual environment of its own (it pins its own
# FastAPI, uvicorn and protobuf); the same ONNX Runtime as the lock; uvloop 0.22+ stops MLServer 1.7.1's workers.
MLSERVER_VENV ?= .venv-mlserver
install-mlserver:
	$(PYTHON) -m venv $(MLSERVER_VENV)
	$(MLSERVER_VENV)/bin/pip install --quiet mlserver==1.7.1 'uvloop<0.22' $$(grep '^onnxruntime==' $(LOCK))
