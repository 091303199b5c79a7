"""Bundle reading and `--verify`'s cheap checks on a copy of the real tiny bundle: every way a
bundle can be broken (edited file, missing file, manifest field, format version, bundle id,
file list escaping the bundle) is rejected with a message naming the problem."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from emoq_serve import bundle as names
from emoq_serve.bundle import Bundle, BundleError, compute_bundle_id
from export.cli import register


def emoq_export(argv: list[str]) -> int:
    """`emoq export ...` through the command's own parser (what the `emoq` entry point registers)."""
    parser = argparse.ArgumentParser(prog="emoq")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["export", *argv])
    return args.func(args)


def edit_manifest(root: Path, edit) -> None:
    manifest = json.loads((root / names.MANIFEST).read_text())
    edit(manifest)
    (root / names.MANIFEST).write_text(json.dumps(manifest))


def remove_listed(root: Path, name: str) -> None:
    """Delete a file and its manifest entry (id recomputed), as an older exporter would have written it."""
    (root / name).unlink()
    edit_manifest(root, lambda m: m["files"].pop(name))
    edit_manifest(root, lambda m: m.update(bundle_id=compute_bundle_id(m["files"])))


def test_open_reads_a_valid_bundle(tiny_bundle):
    b = Bundle.open(tiny_bundle)
    assert b.labels == ("neutral", "angry", "sad", "happy")
    assert b.model_config.preset == "tiny"
    assert b.bundle_id == compute_bundle_id(b.manifest["files"]) and len(b.bundle_id) == 12
    assert b.file(names.FORMER_ONNX).is_file()
    assert b.file(names.LLM_DIR).is_dir()
    assert len(b.manifest["prompt"]["emotion_token_ids"]) == len(b.labels)
    for key in ("torch", "onnxruntime", "transformers", "vllm", "peft", "onnx", "emoq_serve"):
        assert b.manifest["versions"][key] != "not installed", key
    with pytest.raises(BundleError, match="no file 'nope.onnx'"):
        b.file("nope.onnx")


def test_every_data_file_is_hashed(tiny_bundle):
    listed = set(Bundle.open(tiny_bundle).manifest["files"])
    on_disk = {p.relative_to(tiny_bundle).as_posix() for p in tiny_bundle.rglob("*") if p.is_file()}
    assert on_disk - listed == {names.MANIFEST}
    assert {names.AUDIO_ENCODER_ONNX + ".data", names.FORMER_ONNX + ".data", "llm/model.safetensors"} <= listed


@pytest.mark.parametrize("target", [names.FORMER_ONNX + ".data", "llm/model.safetensors", "former_tokenizer/tokenizer.json"])
def test_modified_file_is_rejected_by_name(bundle_copy, target):
    with open(bundle_copy / target, "r+b") as f:
        first = f.read(1)
        f.seek(0)
        f.write(bytes([first[0] ^ 1]))
    with pytest.raises(BundleError, match=f"{target}.*does not match its sha256"):
        Bundle.open(bundle_copy)
    Bundle.open(bundle_copy, verify_hashes=False)  # schema alone still passes


def test_missing_file_is_rejected_by_name(bundle_copy):
    (bundle_copy / names.HEADS).unlink()
    with pytest.raises(BundleError, match="'heads.safetensors' is missing"):
        Bundle.open(bundle_copy)


@pytest.mark.parametrize("field", ["labels", "files", "parity", "versions", "model_config"])
def test_missing_manifest_field_is_rejected_by_name(bundle_copy, field):
    edit_manifest(bundle_copy, lambda m: m.pop(field))
    with pytest.raises(BundleError, match=f"missing the field '{field}'"):
        Bundle.open(bundle_copy)


def test_missing_nested_field_and_unlisted_required_file(bundle_copy):
    edit_manifest(bundle_copy, lambda m: m["prompt"].pop("emotion_token_ids"))
    with pytest.raises(BundleError, match="missing the field 'prompt.emotion_token_ids'"):
        Bundle.open(bundle_copy)
    edit_manifest(bundle_copy, lambda m: m["prompt"].update(emotion_token_ids=[1, 2, 3, 4]))
    edit_manifest(bundle_copy, lambda m: m["files"].pop(names.FORMER_ONNX))
    with pytest.raises(BundleError, match="does not list the required file 'former.onnx'"):
        Bundle.open(bundle_copy)


def test_the_head_field_names_what_scores_and_what_must_be_there(bundle_copy):
    """No `head`: an "llm" bundle (written before the field existed); an unknown head is refused;
    an "aux" bundle needs no prompt or LLM files, but still the graphs and heads."""
    assert Bundle.open(bundle_copy).head == "llm"
    edit_manifest(bundle_copy, lambda m: m.update(head="svm"))
    with pytest.raises(BundleError, match="field 'head' is 'svm'"):
        Bundle.open(bundle_copy)
    edit_manifest(bundle_copy, lambda m: m.update(head="aux", prompt={}))
    assert Bundle.open(bundle_copy, verify_hashes=False).head == "aux"
    edit_manifest(bundle_copy, lambda m: m["files"].pop(names.HEADS))
    with pytest.raises(BundleError, match="does not list the required file 'heads.safetensors'"):
        Bundle.open(bundle_copy, verify_hashes=False)


@pytest.mark.parametrize("version", [2, 0, "1"])
def test_unknown_format_version_is_rejected(bundle_copy, version):
    edit_manifest(bundle_copy, lambda m: m.update(format_version=version))
    with pytest.raises(BundleError, match="unknown bundle format_version"):
        Bundle.open(bundle_copy)


def test_bundle_id_must_match_the_file_list(bundle_copy):
    edit_manifest(bundle_copy, lambda m: m.update(bundle_id="0123456789ab"))
    with pytest.raises(BundleError, match="bundle_id '0123456789ab' does not match"):
        Bundle.open(bundle_copy)


@pytest.mark.parametrize("stray", ["notes.txt", "llm/adapter_model.safetensors", "eager/audio_encoder/extra.bin"])
def test_file_the_manifest_does_not_list_is_rejected_by_name(bundle_copy, stray):
    """A file nobody hashed could still be loaded (a folder is read as a whole), so it must not sit there."""
    (bundle_copy / stray).write_bytes(b"not in the manifest")
    with pytest.raises(BundleError, match=f"'{stray}' is not listed in manifest.json"):
        Bundle.open(bundle_copy)


def test_file_list_cannot_point_outside_the_bundle(bundle_copy, tmp_path):
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"x")
    edit_manifest(bundle_copy, lambda m: m["files"].update({"../outside.bin": names.sha256_file(outside)}))
    with pytest.raises(BundleError, match="points outside the bundle"):
        Bundle.open(bundle_copy)


def test_not_a_bundle_and_bad_json(tmp_path):
    with pytest.raises(BundleError, match="manifest.json is missing"):
        Bundle.open(tmp_path)
    (tmp_path / names.MANIFEST).write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        Bundle.open(tmp_path)


@pytest.mark.parametrize(
    "tamper, message",
    [
        (lambda root: (root / names.EMBED_TOKENS).write_bytes(b"tampered"), "'embed_tokens.safetensors' does not match"),
        (lambda root: edit_manifest(root, lambda m: m.pop("prompt")), "missing the field 'prompt'"),
        (lambda root: edit_manifest(root, lambda m: m.update(format_version=99)), "unknown bundle format_version 99"),
        (lambda root: (root / "stray.onnx").write_bytes(b"x"), "'stray.onnx' is not listed in manifest.json"),
        (lambda root: remove_listed(root, names.PARITY_REFERENCE), "has no parity_reference.safetensors"),
    ],
    ids=["hash", "field", "version", "unlisted", "no_reference"],
)
def test_cli_verify_rejects_tampering_with_exit_1(bundle_copy, capsys, tamper, message):
    tamper(bundle_copy)
    assert emoq_export(["--verify", str(bundle_copy)]) == 1
    err = capsys.readouterr().err
    assert "FAILED" in err and message in err
