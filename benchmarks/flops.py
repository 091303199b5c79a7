"""FLOPs per request per stage, estimated from the model config, and a matmul peak measured now.

Why: latency alone does not say whether a stage is slow because it has much work or because it
runs the work badly. Counting the matmul FLOPs of each stage (2·m·n·k per matmul; norms,
activations and softmax are ignored, they are a few percent) and dividing by the stage's time
gives achieved GFLOP/s; dividing that by a 2048² matmul measured in the same run on the same
threads says how far the stage is from what this machine can do.

Shapes follow the modules: transformers' HuBERT (conv feature extractor with HuBERT's kernels and
strides, feature projection, grouped positional conv, post-LN encoder), the EmoQ-Former (frame
projection, self-attention over queries + text, cross-attention of the queries to the frames,
FFN over queries + text, per layer), attentive pooling, projector, and a Qwen2 prefill over the
prompt (GQA) with the LM head at the last position only (the runtimes read one position).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from emoq_serve.config import AudioEncoderConfig, FormerConfig, LLMConfig, ModelConfig

#: HuBERT's conv feature extractor (transformers' defaults, used by every preset).
CONV_KERNELS = (10, 3, 3, 3, 3, 2, 2)
CONV_STRIDES = (5, 2, 2, 2, 2, 2, 2)


def _linear(tokens: int, d_in: int, d_out: int) -> float:
    return 2.0 * tokens * d_in * d_out


def _attention(q_tokens: int, k_tokens: int, dim: int) -> float:
    """Scores q·kᵀ and the weighted sum of values."""
    return 2.0 * 2.0 * q_tokens * k_tokens * dim


def num_frames(samples: int) -> int:
    n = samples
    for k, s in zip(CONV_KERNELS, CONV_STRIDES):
        n = max((n - k) // s + 1, 0)
    return max(n, 1)


def audio_encoder_flops(cfg: AudioEncoderConfig, samples: int) -> float:
    total, length, channels = 0.0, samples, 1
    for k, s, out in zip(CONV_KERNELS, CONV_STRIDES, cfg.conv_dim):
        length = max((length - k) // s + 1, 1)
        total += 2.0 * length * channels * out * k
        channels = out
    frames, d = length, cfg.hidden_size
    total += _linear(frames, channels, d)  # feature projection
    total += 2.0 * frames * d * (d // cfg.num_conv_pos_embedding_groups) * cfg.num_conv_pos_embeddings
    per_layer = _linear(frames, d, 4 * d) + _attention(frames, frames, d) + 2 * _linear(frames, d, cfg.intermediate_size)
    return total + cfg.num_layers * per_layer


def former_flops(cfg: FormerConfig, audio_dim: int, frames: int, text_tokens: int) -> float:
    d, nq = cfg.hidden_size, cfg.num_queries
    seq = nq + text_tokens
    total = _linear(frames, audio_dim, d)
    per_layer = (
        _linear(seq, d, 4 * d) + _attention(seq, seq, d)  # self-attention over queries + text
        # cross-attention of the queries to the frames plus the learned null frame
        + _linear(nq, d, 2 * d) + _linear(frames + 1, d, 2 * d) + _attention(nq, frames + 1, d)
        + 2 * _linear(seq, d, cfg.intermediate_size)  # FFN
    )
    return total + cfg.num_layers * per_layer


def pooling_flops(cfg: FormerConfig) -> float:
    """Scores and weighted sum over the query states (the kernel's whole work)."""
    return 2.0 * 2.0 * cfg.num_queries * cfg.hidden_size


def llm_flops(cfg: LLMConfig, former_dim: int, prompt_tokens: int, cached_tokens: int = 0) -> float:
    """Projector + Qwen2 prefill over the prompt (causal attention) + LM head at the last position.

    `cached_tokens`: a prefix whose keys and values the engine reuses (vLLM's prefix cache): only
    the positions after it are computed, though they still attend to the cached ones."""
    h, p = cfg.hidden_size, prompt_tokens
    c = min(cached_tokens, p - 1)  # the last position is always computed: its logits are the answer
    kv = h // cfg.num_heads * cfg.num_kv_heads
    projector = _linear(1, former_dim, cfg.projector_hidden) + _linear(1, cfg.projector_hidden, cfg.num_soft_tokens * h)
    per_layer = (
        _linear(p - c, h, 2 * h + 2 * kv)  # q, o and the grouped k, v
        + 2.0 * 2.0 * h * (p * (p + 1) - c * (c + 1)) / 2  # causal scores + values of the new positions
        + 3 * _linear(p - c, h, cfg.intermediate_size)  # gate, up, down
    )
    return projector + cfg.num_layers * per_layer + _linear(1, h, cfg.vocab_size)


def cached_prefix_tokens(prompts: list[list[int]], block_size: int) -> int:
    """Prompt tokens a prefix cache of `block_size`-token blocks serves to every request: the
    whole blocks of the prefix all prompts share (the chat template before the transcript)."""
    if not prompts or block_size < 1:
        return 0
    shared = 0
    for column in zip(*prompts):
        if any(t != column[0] for t in column):
            break
        shared += 1
    return shared // block_size * block_size


@dataclass(frozen=True)
class RequestShape:
    """What the FLOPs of one request depend on."""

    samples: int
    text_tokens: int
    prompt_tokens: int | None  # None: an "aux" bundle, no LLM (its head's FLOPs are negligible)
    cached_tokens: int = 0  # of the prompt, served by the LLM engine's prefix cache


def request_flops(cfg: ModelConfig, shape: RequestShape) -> dict[str, float]:
    """FLOPs per stage (keys as in the runtime's STAGES, without `queue`)."""
    frames = num_frames(shape.samples)
    out = {
        "audio_encoder": audio_encoder_flops(cfg.audio, shape.samples),
        "former": former_flops(cfg.former, cfg.audio.hidden_size, frames, shape.text_tokens),
        "pooling": pooling_flops(cfg.former),
    }
    if shape.prompt_tokens is not None:
        out["llm"] = llm_flops(cfg.llm, cfg.former.hidden_size, shape.prompt_tokens, shape.cached_tokens)
    return out


@dataclass(frozen=True)
class Peak:
    """A measured matmul rate: the size actually used, its dtype and threads."""

    gflops: float
    n: int
    dtype: str
    threads: int


def matmul_peak(threads: int, dtype: str = "float32", n_max: int = 2048, seconds: float = 1.0) -> Peak:
    """Best-of GFLOP/s of an n×n matmul in torch with `threads` intra-op threads.

    n doubles from 256 up to `n_max` while one product stays well inside the time budget: on
    CPUs without native bf16 (AVX2 only), a 2048² bf16 product is emulated and takes tens of
    seconds, so the size adapts instead of hanging. Best-of, not mean: the peak is what the cores
    can do; other load on a shared machine only lowers individual repeats. The caller's thread
    setting is restored afterwards.
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        n, once = 256, 0.0
        while True:
            a, b = (torch.randn(n, n, dtype=getattr(torch, dtype)) for _ in range(2))
            torch.mm(a, b)  # warm-up: the first call allocates and picks kernels
            t = time.perf_counter()
            torch.mm(a, b)
            once = time.perf_counter() - t
            if n >= n_max or once * 8 > seconds / 4:
                break
            n *= 2
        best = once
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            t = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - t)
        return Peak(gflops=2.0 * n**3 / best / 1e9, n=n, dtype=dtype, threads=threads)
    finally:
        torch.set_num_threads(previous)


def stage_efficiency(flops_per_request: dict[str, float], server_ms: dict[str, float], requests_per_timing: float,
                     peak_gflops: float) -> dict[str, dict[str, float]]:
    """Achieved GFLOP/s and % of peak per stage at one load point.

    `requests_per_timing`: how many requests' work one reported stage time covers — the mean
    batch size for an engine that reports each request the wall time of its batch, 1 for one
    that times each request alone.
    """
    out = {}
    for stage, flops in flops_per_request.items():
        ms = server_ms.get(stage)
        if not ms or ms <= 0:
            continue
        achieved = flops * requests_per_timing / (ms / 1e3) / 1e9
        out[stage] = {"gflop": flops / 1e9, "achieved_gflops": achieved, "pct_of_peak": 100.0 * achieved / peak_gflops}
    return out
