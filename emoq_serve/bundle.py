"""Reading and verifying a serving bundle (the directory `emoq export` writes).

A bundle is only trustworthy if what is served is byte-for-byte what was verified at export
time, so opening one checks the manifest schema, the format version and (by default) the
sha256 of every listed file. Every failure is a `BundleError` whose message names the problem,
because the person reading it is usually deploying someone else's export.

The writer lives in `export/bundle_writer.py`; the names below are the contract both sides use.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from emoq_serve.config import ModelConfig
from emoq_serve.hashing import sha256_file

FORMAT_VERSION = 1
MANIFEST = "manifest.json"

# File and folder names inside a bundle.
AUDIO_ENCODER_ONNX = "audio_encoder.onnx"
AUDIO_ENCODER_FP16_ONNX = "audio_encoder.fp16.onnx"
FORMER_ONNX = "former.onnx"
HEADS = "heads.safetensors"
EMBED_TOKENS = "embed_tokens.safetensors"
FORMER_TOKENIZER_DIR = "former_tokenizer"
LLM_DIR = "llm"
EAGER_AUDIO_ENCODER_DIR = "eager/audio_encoder"
EAGER_FORMER = "eager/former.safetensors"
#: The trained model's outputs, stage by stage, on export's fixed verification batch.
PARITY_REFERENCE = "parity_reference.safetensors"

#: Top-level manifest fields and the type each must have.
MANIFEST_FIELDS: dict[str, type | tuple[type, ...]] = {
    "format_version": int,
    "bundle_id": str,
    "created": str,
    "preset": str,
    "labels": list,
    "sample_rate": int,
    "model_config": dict,
    "prompt": dict,
    "files": dict,
    "parity": dict,
    "onnx_optimizations": dict,
    "versions": dict,
}
PROMPT_FIELDS = ("placeholder_token", "num_soft_tokens", "emotion_words", "emotion_token_ids")
PARITY_FIELDS = ("embedding_max_abs", "posterior_max_abs", "tolerances", "backend", "cases")
#: What scores the pooled embedding: "llm" (projector, soft prompt, the merged LLM: a stage-2
#: export) or "aux" (the stage-1 auxiliary head in heads.safetensors: no LLM, no prompt). The
#: manifest's `head` field; bundles written before it existed are "llm".
HEADS_KINDS = ("llm", "aux")
#: What the served model reads: "both" (audio and transcript, either may be missing) or "text"
#: (a stage-2 model trained with `modality="text"`: it answers from the transcript alone, so its
#: bundle has no audio graph and the engine never encodes audio). The stage-1 model has no
#: modality setting: an "aux" bundle reads both. Taken from `model_config.llm.modality`.
MODALITIES = ("both", "text")
#: Files (or, for folders, one file inside them) that every bundle must list, by head; a
#: text-only bundle drops AUDIO_ENCODER_ONNX (see `required_files`).
REQUIRED_FILES = {
    "aux": (AUDIO_ENCODER_ONNX, FORMER_ONNX, HEADS, f"{EAGER_AUDIO_ENCODER_DIR}/config.json", EAGER_FORMER),
    "llm": (AUDIO_ENCODER_ONNX, FORMER_ONNX, HEADS, EMBED_TOKENS, f"{LLM_DIR}/config.json",
            f"{EAGER_AUDIO_ENCODER_DIR}/config.json", EAGER_FORMER),
}


class BundleError(Exception):
    """A bundle that must not be served: malformed manifest, unknown version, bad or missing file."""


def compute_bundle_id(files: dict[str, str]) -> str:
    """First 12 hex of the sha256 over the sorted `path hash` lines: equal content, equal id."""
    lines = "\n".join(f"{path} {digest}" for path, digest in sorted(files.items()))
    return hashlib.sha256(lines.encode()).hexdigest()[:12]


def modality_of(head: str, cfg: ModelConfig) -> str:
    """What a bundle of `head` serving the model `cfg` reads (see `MODALITIES`)."""
    return "both" if head == "aux" else cfg.llm.modality


def required_files(head: str, modality: str) -> tuple[str, ...]:
    """The files a bundle of `head` and `modality` must list."""
    return tuple(f for f in REQUIRED_FILES[head] if not (modality == "text" and f == AUDIO_ENCODER_ONNX))


def validate_manifest(manifest: Any) -> None:
    """Schema check; raises `BundleError` naming the first missing or mistyped field."""
    if not isinstance(manifest, dict):
        raise BundleError(f"{MANIFEST} must hold a JSON object, got {type(manifest).__name__}")
    if "format_version" not in manifest:
        raise BundleError(f"{MANIFEST} is missing the field 'format_version'")
    if manifest["format_version"] != FORMAT_VERSION:
        raise BundleError(
            f"unknown bundle format_version {manifest['format_version']!r}; "
            f"this emoq_serve reads format_version {FORMAT_VERSION}"
        )
    for name, kind in MANIFEST_FIELDS.items():
        if name not in manifest:
            raise BundleError(f"{MANIFEST} is missing the field {name!r}")
        if not isinstance(manifest[name], kind) or isinstance(manifest[name], bool):
            raise BundleError(f"{MANIFEST} field {name!r} has type {type(manifest[name]).__name__}")
    head = manifest.get("head", "llm")
    if head not in HEADS_KINDS:
        raise BundleError(f"{MANIFEST} field 'head' is {head!r}; expected one of {', '.join(HEADS_KINDS)}")
    sections = (("prompt", PROMPT_FIELDS), ("parity", PARITY_FIELDS)) if head == "llm" else (("parity", PARITY_FIELDS),)
    for section, fields in sections:
        for name in fields:
            if name not in manifest[section]:
                raise BundleError(f"{MANIFEST} is missing the field '{section}.{name}'")
    try:
        cfg = ModelConfig.from_dict(manifest["model_config"])
    except (KeyError, TypeError, ValueError) as e:
        raise BundleError(f"{MANIFEST} field 'model_config' is invalid: {e}") from e
    modality = modality_of(head, cfg)
    if modality not in MODALITIES:
        raise BundleError(f"{MANIFEST} model_config.llm.modality is {modality!r}; a bundle serves "
                          f"{' or '.join(MODALITIES)}")
    for name in required_files(head, modality):
        if name not in manifest["files"]:
            raise BundleError(f"{MANIFEST} 'files' does not list the required file {name!r}")
    if head == "llm" and len(manifest["prompt"]["emotion_token_ids"]) != len(manifest["labels"]):
        raise BundleError(f"{MANIFEST} has {len(manifest['labels'])} labels but "
                          f"{len(manifest['prompt']['emotion_token_ids'])} emotion_token_ids")


def verify_files(root: Path, files: dict[str, str]) -> None:
    """Every listed file exists, stays inside the bundle and has its recorded sha256, and no
    other file is there: loaders read whole folders (llm/, tokenizers), so an unlisted file
    would be served without ever having been hashed or verified."""
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and rel != MANIFEST and rel not in files:
            raise BundleError(f"bundle file {rel!r} is not listed in {MANIFEST}: remove it, or re-export the bundle")
    resolved_root = root.resolve()
    for rel, digest in sorted(files.items()):
        path = (root / rel).resolve()
        if not path.is_relative_to(resolved_root):
            raise BundleError(f"bundle file {rel!r} points outside the bundle")
        if not path.is_file():
            raise BundleError(f"bundle file {rel!r} is missing")
        actual = sha256_file(path)
        if actual != digest:
            raise BundleError(f"bundle file {rel!r} does not match its sha256 "
                              f"(manifest {digest[:12]}..., file {actual[:12]}...): the file was modified")


class Bundle:
    """An opened, validated bundle. Construct with `Bundle.open`."""

    def __init__(self, path: Path, manifest: dict[str, Any], hashes_verified: bool = False) -> None:
        self.path = path
        self.manifest = manifest
        self.model_config = ModelConfig.from_dict(manifest["model_config"])
        #: Whether the files were checked against the manifest's sha256s at open (then those
        #: hashes name the files' content, e.g. as cache keys).
        self.hashes_verified = hashes_verified

    @classmethod
    def open(cls, path: str | Path, verify_hashes: bool = True) -> Bundle:
        """Validate the manifest (always) and the file hashes (unless told not to)."""
        root = Path(path)
        manifest_path = root / MANIFEST
        if not manifest_path.is_file():
            raise BundleError(f"{root} is not a bundle: {MANIFEST} is missing")
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as e:
            raise BundleError(f"{MANIFEST} is not valid JSON: {e}") from e
        validate_manifest(manifest)
        if verify_hashes:
            verify_files(root, manifest["files"])
            if compute_bundle_id(manifest["files"]) != manifest["bundle_id"]:
                raise BundleError(f"{MANIFEST} bundle_id {manifest['bundle_id']!r} does not match its file list")
        return cls(root, manifest, verify_hashes)

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(self.manifest["labels"])

    @property
    def head(self) -> str:
        """"llm" or "aux" (see `HEADS_KINDS`)."""
        return self.manifest.get("head", "llm")

    @property
    def modality(self) -> str:
        """"both" or "text" (see `MODALITIES`)."""
        return modality_of(self.head, self.model_config)

    @property
    def bundle_id(self) -> str:
        return self.manifest["bundle_id"]

    def file(self, name: str) -> Path:
        """Path of a bundle file or folder; a name the manifest does not know is an error."""
        if name not in self.manifest["files"] and not any(k.startswith(name.rstrip("/") + "/")
                                                          for k in self.manifest["files"]):
            raise BundleError(f"bundle {self.bundle_id} has no file {name!r}")
        return self.path / name
