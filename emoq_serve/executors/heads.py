"""What reads the pooled embedding, as the bundle holds it: the projector and the chat prompt it
feeds the LLM (an "llm" bundle), or the stage-1 auxiliary head (an "aux" bundle).

The model's own classes build themselves from the bundle's weights (`Projector`, `AuxHead`,
`PromptBuilder`, `inject_soft_prompt`), so nothing here re-derives them. The LLM is not needed to
build prompt embeddings: `embed_tokens[ids]` is its first layer.
"""

from __future__ import annotations

import torch
from safetensors.torch import load_file
from torch import nn

from emoq_serve import bundle as names
from emoq_serve.bundle import Bundle, BundleError
from emoq_serve.model.heads import AuxHead
from emoq_serve.model.projector import Projector
from emoq_serve.model.prompt import PromptBuilder, inject_soft_prompt


def load_heads(bundle: Bundle) -> tuple[torch.Tensor, nn.Module]:
    """(pool_u [H,d], what reads the pooled embedding) from heads.safetensors, with its trained
    weights: the projector of an "llm" bundle, or the auxiliary head of an "aux" bundle."""
    heads = load_file(str(bundle.file(names.HEADS)))
    name = "projector" if bundle.head == "llm" else "aux_head"
    state = {k[len(name) + 1:]: v for k, v in heads.items() if k.startswith(f"{name}.")}
    if bundle.head == "llm":
        head: nn.Module = Projector.from_state_dict(state, int(bundle.manifest["prompt"]["num_soft_tokens"]))
    else:
        head = AuxHead.from_state_dict(state)
    return heads["pool_u"], head.eval()


def prompt_builder(bundle: Bundle) -> PromptBuilder:
    """The chat-prompt builder over the merged LLM's tokenizer, checked against the manifest.

    A tokenizer that maps the emotion words to other ids than export recorded would score the
    wrong tokens silently, so a mismatch refuses to load.
    """
    from emoq_serve.model.llm import load_tokenizer

    cfg = bundle.model_config
    prompt = bundle.manifest["prompt"]
    builder = PromptBuilder(load_tokenizer(bundle.file(names.LLM_DIR)), cfg.labels, prompt["emotion_words"],
                            int(prompt["num_soft_tokens"]), prompt.get("emotion_word_rule", "single"))
    if list(builder.emotion_token_ids) != list(prompt["emotion_token_ids"]):
        raise BundleError(f"the bundle's LLM tokenizer maps the emotion words to {builder.emotion_token_ids}, "
                          f"but the manifest records {prompt['emotion_token_ids']}")
    return builder


class PromptEmbedder:
    """Soft prompt [B,K,H] + transcripts -> one prompt embedding [T_i,H] per utterance."""

    def __init__(self, builder: PromptBuilder, embed_tokens: torch.Tensor) -> None:
        self.builder = builder
        self.embed_tokens = embed_tokens

    @classmethod
    def from_bundle(cls, bundle: Bundle) -> PromptEmbedder:
        table = load_file(str(bundle.file(names.EMBED_TOKENS)))["weight"]
        return cls(prompt_builder(bundle), table)

    @property
    def emotion_token_ids(self) -> list[int]:
        return list(self.builder.emotion_token_ids)

    def __call__(self, soft: torch.Tensor, transcripts: list[str], speakers: list[str | None]) -> list[torch.Tensor]:
        embeds = []
        for row, (text, speaker) in enumerate(zip(transcripts, speakers)):
            ids, positions = self.builder.encode(text, speaker)
            tokens = self.embed_tokens[torch.tensor(ids)]
            embeds.append(inject_soft_prompt(tokens, positions, soft[row]))
        return embeds
