"""Initialise the EmoQ-Former's text side from a local BERT, RoBERTa or MPNet checkpoint (as BLIP-2).

Mapped: word/position/token-type embeddings, the embedding LayerNorm, and per layer the
self-attention q/k/v/o, both LayerNorms around it and the FFN. New (kept at their random init):
queries, audio projection, null frame, cross-attention + its LayerNorm, pooling vector.

RoBERTa numbers positions from padding_idx + 1; its table is shifted by that offset so that
former position i is RoBERTa position i + offset, i.e. the same embedding for a full sequence.

MPNet (all-mpnet-base-v2, alias `mpnet`) is mapped the same way: RoBERTa's position offset
(padding_idx 1), no token-type embedding (the former's is set to zero), its attention tensors
under `attention.attn.{q,k,v,o}`, and its relative position bias table
(`encoder.relative_attention_bias`, buckets x heads, shared by all layers) into the former's
`relative_attention_bias`, which needs `FormerConfig.relative_attention_buckets` equal to the
checkpoint's. A former with that bias refuses a BERT/RoBERTa checkpoint (they have no table).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import torch
from transformers import AutoConfig, AutoModel

from emoq_serve.config import resolve_local_path
from emoq_serve.model.former import EmoQFormer

log = logging.getLogger(__name__)

#: Former tensor names (a regex) that no BERT/RoBERTa checkpoint provides: `init_from_pretrained`
#: leaves exactly these at their fresh initialisation (its `InitReport.new`), so the trainers
#: give them a larger learning rate than the pretrained body.
FRESH_FORMER_PARTS = r"(queries|audio_proj\.|null_frame|pool_u|layers\.\d+\.cross_(attn|norm)\.)"


@dataclass
class InitReport:
    """Which former tensors came from the checkpoint and which kept their fresh initialisation."""

    loaded: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)


#: Checkpoint families `init_from_pretrained` maps.
SUPPORTED = ("bert", "roberta", "mpnet")


def _layer_map(i: int, model_type: str = "bert") -> dict[str, str]:
    src = f"encoder.layer.{i}."
    dst = f"layers.{i}."
    attention = ({"attention.attn.q": "self_attn.q", "attention.attn.k": "self_attn.k",
                  "attention.attn.v": "self_attn.v", "attention.attn.o": "self_attn.o",
                  "attention.LayerNorm": "self_norm"} if model_type == "mpnet" else
                 {"attention.self.query": "self_attn.q", "attention.self.key": "self_attn.k",
                  "attention.self.value": "self_attn.v", "attention.output.dense": "self_attn.o",
                  "attention.output.LayerNorm": "self_norm"})
    pairs = {
        **attention,
        "intermediate.dense": "ffn.up",
        "output.dense": "ffn.down",
        "output.LayerNorm": "ffn_norm",
    }
    return {f"{dst}{d}.{p}": f"{src}{s}.{p}" for s, d in pairs.items() for p in ("weight", "bias")}


def _check_shape(former: EmoQFormer, hf: AutoConfig) -> None:
    cfg = former.cfg
    wanted = {
        "hidden_size": (cfg.hidden_size, hf.hidden_size),
        "num_heads": (cfg.num_heads, hf.num_attention_heads),
        "intermediate_size": (cfg.intermediate_size, hf.intermediate_size),
    }
    bad = [f"{k}: former {a} vs checkpoint {b}" for k, (a, b) in wanted.items() if a != b]
    if cfg.num_layers > hf.num_hidden_layers:
        bad.append(f"num_layers: former {cfg.num_layers} > checkpoint {hf.num_hidden_layers}")
    if former.embeddings.word.num_embeddings != hf.vocab_size:
        bad.append(f"vocab: former {former.embeddings.word.num_embeddings} vs checkpoint {hf.vocab_size}")
    if hf.hidden_act != "gelu":
        bad.append(f"activation {hf.hidden_act!r} (the former uses exact gelu)")
    buckets = getattr(hf, "relative_attention_num_buckets", 0) if hf.model_type == "mpnet" else 0
    if cfg.relative_attention_buckets != buckets:
        bad.append(f"relative_attention_buckets: former {cfg.relative_attention_buckets} vs checkpoint {buckets} "
                   f"({hf.model_type} {'has' if buckets else 'has no'} relative position bias)")
    if bad:
        raise ValueError("text_init checkpoint does not fit the former: " + "; ".join(bad))
    if abs(cfg.layer_norm_eps - hf.layer_norm_eps) > 0:
        log.warning("former layer_norm_eps %g differs from the checkpoint's %g", cfg.layer_norm_eps, hf.layer_norm_eps)


@torch.no_grad()
def init_from_pretrained(former: EmoQFormer, path: str) -> InitReport:
    """Copy the BERT/RoBERTa/MPNet tensors at `path` (a local folder, `minilm` or `mpnet`) into `former`."""
    folder = resolve_local_path(path)
    hf_cfg = AutoConfig.from_pretrained(folder)
    if hf_cfg.model_type not in SUPPORTED:
        raise ValueError(f"text_init supports {', '.join(SUPPORTED)} checkpoints, not {hf_cfg.model_type!r}")
    _check_shape(former, hf_cfg)
    source = AutoModel.from_pretrained(folder, add_pooling_layer=False).state_dict()

    offset = hf_cfg.pad_token_id + 1 if hf_cfg.model_type in ("roberta", "mpnet") else 0
    n_pos = former.cfg.max_text_tokens
    positions = source["embeddings.position_embeddings.weight"][offset : offset + n_pos]
    if positions.shape[0] < n_pos:
        raise ValueError(f"checkpoint has {positions.shape[0]} positions, former needs max_text_tokens={n_pos}")
    tensors = {
        "embeddings.word.weight": source["embeddings.word_embeddings.weight"],
        "embeddings.position.weight": positions,
        "embed_norm.weight": source["embeddings.LayerNorm.weight"],
        "embed_norm.bias": source["embeddings.LayerNorm.bias"],
    }
    if hf_cfg.model_type == "mpnet":  # no token types; one relative bias table for all layers
        tensors["embeddings.token_type"] = torch.zeros_like(former.embeddings.token_type)
        tensors["relative_attention_bias.weight"] = source["encoder.relative_attention_bias.weight"]
    else:
        tensors["embeddings.token_type"] = source["embeddings.token_type_embeddings.weight"][0]
    for i in range(former.cfg.num_layers):
        tensors.update({dst: source[src] for dst, src in _layer_map(i, hf_cfg.model_type).items()})

    own = former.state_dict()
    for name, value in tensors.items():
        own[name].copy_(value)
    report = InitReport(loaded=sorted(tensors), new=sorted(set(own) - set(tensors)))
    new_kinds = sorted({re.sub(r"^layers\.\d+\.", "layers.*.", name) for name in report.new})
    log.info(
        "former initialised from %s (%s): %d tensors loaded, %d new (%s)",
        path, hf_cfg.model_type, len(report.loaded), len(report.new), ", ".join(new_kinds),
    )
    return report
