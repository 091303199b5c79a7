"""Training device as configuration: `emoq train stage1/stage2 --device cpu --bf16` runs the same
code the CUDA path runs (model moved once, every batch moved, autocast on the chosen device type).
With no GPU here, spies show the moves and the autocast happen; on a GPU the `gpu` test below runs
the same path on CUDA."""

from __future__ import annotations

import argparse

import pytest
import torch

from emoq_serve.model.emoq import EmoQStage1
from emoq_serve.model.stage2 import EmoQStage2
from training import common, stage1, stage2
from training.cli import register


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="emoq")
    register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


class DeviceSpy:
    """Records where models are moved and where each batch's tensors end up, and whether the
    model ran under autocast for the expected device type."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, device_type: str) -> None:
        self.model_moves: list[str] = []
        self.batch_devices: set[str] = set()
        self.batches = 0
        self.autocast_forwards: list[bool] = []
        real_move = common.move_batch
        real_to = torch.nn.Module.to

        def move_batch(batch, device):
            moved = real_move(batch, device)
            self.batches += 1
            self.batch_devices |= {str(v.device) for k, v in moved.items() if isinstance(v, torch.Tensor) and k != "index"}
            return moved

        def to(module, *args, **kwargs):
            if isinstance(module, (EmoQStage1, EmoQStage2)):
                self.model_moves.append(str(torch.device(args[0] if args else kwargs["device"])))
            return real_to(module, *args, **kwargs)

        def watch(cls):
            method = "forward" if cls is EmoQStage1 else "loss_terms"  # what each trainer calls
            real_forward = getattr(cls, method)

            def forward(model, *args, **kwargs):
                self.autocast_forwards.append(torch.is_autocast_enabled(device_type))
                return real_forward(model, *args, **kwargs)

            monkeypatch.setattr(cls, method, forward)

        monkeypatch.setattr(stage1, "move_batch", move_batch)
        monkeypatch.setattr(torch.nn.Module, "to", to)
        watch(EmoQStage1)
        watch(EmoQStage2)


def _train_both(tmp_path, monkeypatch, device: str, spy_type: str) -> DeviceSpy:
    spy = DeviceSpy(monkeypatch, spy_type)
    common_flags = ["--preset", "tiny", "--data", "synthetic:2", "--epochs", "1", "--batch-size", "8",
                    "--threads", "1", "--device", device, "--bf16"]
    args = _parse(["train", "stage1", *common_flags, "--out", str(tmp_path / "s1")])
    assert args.func(args) == 0
    args = _parse(["train", "stage2", *common_flags, "--from-stage1", str(tmp_path / "s1"), "--out", str(tmp_path / "s2"),
                   "--gradient-checkpointing"])
    assert args.func(args) == 0
    return spy


def test_stage1_and_stage2_move_model_and_batches_to_the_chosen_device(tmp_path, monkeypatch):
    spy = _train_both(tmp_path, monkeypatch, "cpu", "cpu")
    # Both trainers moved their models (stage 1: trained + best reloaded; stage 2: the same).
    assert spy.model_moves and set(spy.model_moves) == {"cpu"}
    assert spy.batches > 0 and spy.batch_devices == {"cpu"}
    # Every forward of both stages (train, dev, test) ran under CPU bf16 autocast.
    assert spy.autocast_forwards and all(spy.autocast_forwards)
    s2 = (tmp_path / "s2" / "summary.json").read_text()
    assert '"device": "cpu"' in s2 and '"bf16": true' in s2


def test_cuda_without_a_gpu_fails_before_building_a_model(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="torch sees no CUDA GPU.*--device cpu"):
        common.resolve_device("cuda")
    assert common.resolve_device("auto") == torch.device("cpu")


def test_move_batch_moves_tensors_and_keeps_index_and_strings():
    batch = {"waveforms": torch.zeros(2, 3), "index": torch.tensor([1, 0]), "transcripts": ["a", "b"]}
    moved = common.move_batch(batch, torch.device("meta"))  # a device that is not the CPU, on any machine
    assert moved["waveforms"].device.type == "meta"
    assert moved["index"].device.type == "cpu" and moved["transcripts"] == ["a", "b"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_stage1_and_stage2_train_one_step_on_cuda_in_bf16(tmp_path, monkeypatch):
    spy = _train_both(tmp_path, monkeypatch, "cuda", "cuda")
    assert set(spy.model_moves) == {"cuda"} and spy.batch_devices == {"cuda:0"}
    assert all(spy.autocast_forwards)
