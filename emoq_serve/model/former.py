"""The EmoQ-Former: a BLIP-2-style Q-Former over HuBERT frames and transcript tokens.

Nq learned queries are concatenated with BERT-style text embeddings; each post-LN layer runs
shared self-attention over [queries; text] (text padding masked), then cross-attention from the
query part only to the projected audio frames, then the BERT FFN over both parts. The query
states are pooled (multi-head attentive pooling, L2-normalised) into the utterance embedding z.

Missing modalities run without NaN: a learned *null audio frame* is prepended to the projected
frames and is always a valid key, so a row without audio (all `frame_mask` False, or F = 0)
cross-attends to it alone; the queries are always valid self-attention keys, so a row without
text (all `text_mask` False, or T = 0) still has something to attend to.

Attention is `F.scaled_dot_product_attention` with boolean key masks (exports to ONNX with
dynamic batch/length; `nn.MultiheadAttention` does not).

MPNet (`FormerConfig.relative_attention_buckets` > 0): MPNet adds a learned bias per head and
relative-distance bucket (T5's bidirectional log buckets, max distance 128, one table shared by
all layers) to its self-attention scores. The former adds it between text tokens only, so the
text path is MPNet's own. The queries get none (zero bias to and from them): they are an
unordered set with no position, any position-independent constant would only rescale the
query keys against the text keys, which the learned queries and projections do anyway, and zero
keeps the text-to-text scores exactly MPNet's. The bucket table is precomputed for
`max_text_tokens` and sliced, so the ONNX graph carries the bias table and a constant gather.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from emoq_serve.config import FormerConfig, resolve_local_path
from emoq_serve.kernels import attentive_pool


def load_text_tokenizer(cfg: FormerConfig) -> PreTrainedTokenizerBase:
    """The transcript tokenizer (a local Hugging Face folder, or the packaged MiniLM one)."""
    return AutoTokenizer.from_pretrained(resolve_local_path(cfg.tokenizer))


class TextEmbeddings(nn.Module):
    """BERT embeddings: word + absolute position + (single) token type; LayerNorm is applied by
    the former over [queries; text], which is per-token and so identical to BERT's for text."""

    def __init__(self, cfg: FormerConfig, vocab_size: int) -> None:
        super().__init__()
        self.word = nn.Embedding(vocab_size, cfg.hidden_size)
        self.position = nn.Embedding(cfg.max_text_tokens, cfg.hidden_size)
        self.token_type = nn.Parameter(torch.zeros(cfg.hidden_size))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.word(input_ids) + self.position(positions)[None] + self.token_type


def relative_position_buckets(length: int, num_buckets: int, max_distance: int = 128) -> torch.Tensor:
    """[length, length] bucket of key position j seen from query position i (MPNet's
    `relative_position_bucket`, bidirectional: half the buckets for each sign, exact up to
    num_buckets/4, logarithmic up to max_distance)."""
    pos = torch.arange(length)
    n = pos[:, None] - pos[None, :]  # -(key - query)
    half = num_buckets // 2
    ret = (n < 0).long() * half
    n = n.abs()
    max_exact = half // 2
    large = max_exact + (torch.log(n.float() / max_exact) / math.log(max_distance / max_exact)
                         * (half - max_exact)).long()
    large = large.clamp(max=half - 1)
    return ret + torch.where(n < max_exact, n, large)


class Attention(nn.Module):
    """Multi-head attention with separate q/k/v/o projections (BERT's layout, so weights map 1:1)."""

    def __init__(self, hidden: int, heads: int, dropout: float) -> None:
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden size {hidden} is not divisible by {heads} heads")
        self.heads = heads
        self.q = nn.Linear(hidden, hidden)
        self.k = nn.Linear(hidden, hidden)
        self.v = nn.Linear(hidden, hidden)
        self.o = nn.Linear(hidden, hidden)
        self.dropout = dropout

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        return x.view(b, n, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: torch.Tensor, key_mask: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [B,Nq,D] attends to context [B,Nk,D] where key_mask [B,Nk] is True; `bias`
        [B or 1,H,Nq,Nk] (float, -inf at masked keys) replaces the mask when given."""
        q, k, v = self._split(self.q(x)), self._split(self.k(context)), self._split(self.v(context))
        if bias is None:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=key_mask[:, None, None, :], dropout_p=self.dropout if self.training else 0.0)
        else:
            # Written out (MPNet's own order: scale, add the bias, softmax): the ONNX exporter's
            # decomposition of SDPA with a float mask fails on symbolic lengths.
            scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias.to(q.dtype)
            probs = F.dropout(torch.softmax(scores, dim=-1), self.dropout, self.training)
            out = probs @ v
        b, h, n, d = out.shape
        return self.o(out.transpose(1, 2).reshape(b, n, h * d))


class FeedForward(nn.Module):
    """BERT FFN: up-projection, exact GELU, down-projection."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.up = nn.Linear(hidden, intermediate)
        self.down = nn.Linear(intermediate, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class FormerLayer(nn.Module):
    """Post-LN: self-attention over all tokens, cross-attention for the queries, FFN for all."""

    def __init__(self, cfg: FormerConfig) -> None:
        super().__init__()
        d, eps = cfg.hidden_size, cfg.layer_norm_eps
        self.self_attn = Attention(d, cfg.num_heads, cfg.dropout)
        self.self_norm = nn.LayerNorm(d, eps=eps)
        self.cross_attn = Attention(d, cfg.num_heads, cfg.dropout)
        self.cross_norm = nn.LayerNorm(d, eps=eps)
        self.ffn = FeedForward(d, cfg.intermediate_size)
        self.ffn_norm = nn.LayerNorm(d, eps=eps)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(
        self,
        h: torch.Tensor,
        key_mask: torch.Tensor,
        num_queries: int,
        audio: torch.Tensor,
        audio_mask: torch.Tensor,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        h = self.self_norm(h + self.drop(self.self_attn(h, h, key_mask, bias)))
        if num_queries:
            q, t = h[:, :num_queries], h[:, num_queries:]
            q = self.cross_norm(q + self.drop(self.cross_attn(q, audio, audio_mask)))
            h = torch.cat([q, t], dim=1)
        return self.ffn_norm(h + self.drop(self.ffn(h)))


class EmoQFormer(nn.Module):
    """Queries + text in, query states [B,Nq,D] out; `pool` turns them into z [B,D]."""

    def __init__(self, cfg: FormerConfig, audio_dim: int, vocab_size: int) -> None:
        super().__init__()
        if cfg.hidden_size % cfg.pool_heads:
            raise ValueError(f"pool_heads {cfg.pool_heads} does not divide hidden size {cfg.hidden_size}")
        self.cfg = cfg
        d = cfg.hidden_size
        self.embeddings = TextEmbeddings(cfg, vocab_size)
        self.embed_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.embed_drop = nn.Dropout(cfg.dropout)
        self.queries = nn.Parameter(torch.empty(cfg.num_queries, d))
        self.audio_proj = nn.Linear(audio_dim, d)
        self.null_frame = nn.Parameter(torch.empty(d))
        self.layers = nn.ModuleList(FormerLayer(cfg) for _ in range(cfg.num_layers))
        if cfg.relative_attention_buckets:
            # MPNet's table, shared by all layers; the buckets of every text-text pair up front.
            self.relative_attention_bias = nn.Embedding(cfg.relative_attention_buckets, cfg.num_heads)
            self.register_buffer("rel_buckets", relative_position_buckets(
                cfg.max_text_tokens, cfg.relative_attention_buckets), persistent=False)
        self.pool_u = nn.Parameter(torch.empty(cfg.pool_heads, d // cfg.pool_heads))
        self._init_weights()

    def _init_weights(self) -> None:
        """Fresh weights: linear layers normal(0, 1/√fan_in), embeddings normal(0, 0.02), zero
        bias, unit LayerNorm. BERT's fixed 0.02 suits 768 wide layers; in a 64-wide former it
        shrinks every attention output to a few percent of the residual and a from-scratch model
        barely learns. (Text-initialised parts are overwritten by `init_from_pretrained`.)"""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=module.in_features**-0.5)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for p in (self.queries, self.null_frame):
            nn.init.normal_(p, std=0.02)
        nn.init.normal_(self.pool_u, std=1.0 / math.sqrt(self.pool_u.shape[1]))

    def _audio_keys(self, frames: torch.Tensor, frame_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected frames with the always-valid null frame in front."""
        b = frames.shape[0]
        audio = self.audio_proj(frames.to(self.audio_proj.weight.dtype))
        null = self.null_frame.to(audio.dtype).expand(b, 1, -1)
        valid = torch.ones(b, 1, dtype=torch.bool, device=frame_mask.device)
        return torch.cat([null, audio], dim=1), torch.cat([valid, frame_mask.to(torch.bool)], dim=1)

    def _encode(
        self,
        queries: torch.Tensor,
        input_ids: torch.Tensor,
        text_mask: torch.Tensor,
        audio: torch.Tensor,
        audio_mask: torch.Tensor,
    ) -> torch.Tensor:
        b, nq = input_ids.shape[0], queries.shape[0]
        h = torch.cat([queries.expand(b, -1, -1), self.embeddings(input_ids)], dim=1)
        h = self.embed_drop(self.embed_norm(h))
        query_valid = torch.ones(b, nq, dtype=torch.bool, device=text_mask.device)
        key_mask = torch.cat([query_valid, text_mask.to(torch.bool)], dim=1)
        bias = self._position_bias(nq, input_ids.shape[1], key_mask)
        for layer in self.layers:
            h = layer(h, key_mask, nq, audio, audio_mask, bias)
        return h

    def _position_bias(self, nq: int, t: int, key_mask: torch.Tensor) -> torch.Tensor | None:
        """MPNet's relative bias between text tokens, zero to and from queries, -inf at masked
        keys -> [B,H,Nq+T,Nq+T]; None without the bias (the boolean key mask is used)."""
        if not self.cfg.relative_attention_buckets:
            return None
        text = self.relative_attention_bias(self.rel_buckets[:t, :t]).permute(2, 0, 1)  # [H,T,T]
        bias = F.pad(text, (nq, 0, nq, 0))  # zeros for every pair with a query
        return bias[None].masked_fill(~key_mask[:, None, None, :], float("-inf"))

    def forward(
        self,
        frames: torch.Tensor,
        frame_mask: torch.Tensor,
        input_ids: torch.Tensor,
        text_mask: torch.Tensor,
    ) -> torch.Tensor:
        """frames [B,F,Da], frame_mask [B,F], input_ids [B,T], text_mask [B,T] -> [B,Nq,D]."""
        audio, audio_mask = self._audio_keys(frames, frame_mask)
        h = self._encode(self.queries, input_ids, text_mask, audio, audio_mask)
        return h[:, : self.cfg.num_queries]

    def encode_text(self, input_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """The text path alone (no queries, so no cross-attention) -> [B,T,D].

        With BERT/RoBERTa-initialised weights this is the checkpoint's own last_hidden_state,
        which is how the initialisation is verified.
        """
        empty = self.queries[:0]
        no_audio = torch.zeros(input_ids.shape[0], 0, self.cfg.hidden_size, device=input_ids.device)
        no_mask = torch.zeros(input_ids.shape[0], 0, dtype=torch.bool, device=input_ids.device)
        return self._encode(empty, input_ids, text_mask, no_audio, no_mask)

    def pool(self, query_states: torch.Tensor) -> torch.Tensor:
        """Multi-head attentive pooling + L2 norm (ARCHITECTURE.md's exact math) -> z [B,D]."""
        return attentive_pool(query_states, self.pool_u)

    def embed(
        self,
        frames: torch.Tensor,
        frame_mask: torch.Tensor,
        input_ids: torch.Tensor,
        text_mask: torch.Tensor,
    ) -> torch.Tensor:
        """pool(forward(...)): the utterance embedding z [B,D] that stage 2 projects."""
        return self.pool(self.forward(frames, frame_mask, input_ids, text_mask))
