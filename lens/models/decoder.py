"""One readable decoder for the Llama (SmolLM2) and Qwen3 architectures, with hook points.

The whole model is in this file.  Hook names follow TransformerLens so ``run_with_hooks`` /
``run_with_cache`` work on it.  Every block takes an ``attend`` function that turns the
block's rotated queries, keys and values into the per-head mixed values ``z``; the dense
causal path (:meth:`Decoder.forward`) uses :meth:`Attention.dense`, the BlockSearch engine
passes the block-sparse prefill and the corpus-attention kernels instead, so there is one
implementation of everything outside attention.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformer_lens import HookedRootModule
from transformer_lens.hook_points import HookPoint

from kernels.masks import causal, create_mask
from kernels.score_functions import ScoreContext, ScoreFunction, apply_score_function


@dataclass
class DecoderConfig:
    architecture: str  # "llama" or "qwen3"
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_mlp: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    qk_norm: bool = False  # Qwen3 normalises q and k per head before RoPE
    attention_bias: bool = False
    tie_embeddings: bool = True
    max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.architecture not in ("llama", "qwen3"):
            raise ValueError(f"unsupported architecture {self.architecture!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")

    def to_dict(self) -> dict:
        return asdict(self)


# attend(layer, q [b, pos, head, d_head], k [b, pos, kv_head, d_head], v) -> z [b, pos, head, d_head]
AttendFn = Callable[[int, Tensor, Tensor, Tensor], Tensor]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.hook_normalized = HookPoint()  # [..., dim]

    def forward(self, x: Tensor) -> Tensor:
        # In fp32 then back, as transformers does, so bf16 runs round the same way.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.hook_normalized(self.weight * x32.to(x.dtype))


def rotary_cos_sin(positions: Tensor, d_head: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos, sin [b, pos, 1, d_head] for integer positions [b, pos]."""
    inv_freq = 1.0 / theta ** (torch.arange(0, d_head, 2, dtype=torch.int64).float() / d_head)
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def repeat_kv(x: Tensor, n_rep: int, head_dim: int) -> Tensor:
    """Grouped-query attention: KV head j serves query heads j*n_rep .. (j+1)*n_rep-1."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=head_dim)


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.d_head, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.d_head, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.d_head, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.d_head, cfg.d_model, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.d_head, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.d_head, cfg.rms_norm_eps)
        self.scale = cfg.d_head**-0.5
        self.hook_q = HookPoint()  # [batch, pos, head, d_head], projected (before QK-norm, RoPE)
        self.hook_k = HookPoint()  # [batch, pos, kv_head, d_head]
        self.hook_v = HookPoint()  # [batch, pos, kv_head, d_head]
        self.hook_rot_q = HookPoint()  # [batch, pos, head, d_head], after QK-norm and RoPE
        self.hook_rot_k = HookPoint()  # [batch, pos, kv_head, d_head]
        self.hook_attn_scores = HookPoint()  # [batch, head, query_pos, key_pos], scaled, intervened, masked
        self.hook_pattern = HookPoint()  # [batch, head, query_pos, key_pos]
        self.hook_z = HookPoint()  # [batch, pos, head, d_head]

    def qkv(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, t, _ = x.shape
        cfg = self.cfg
        q = self.hook_q(self.q_proj(x).view(b, t, cfg.n_heads, cfg.d_head))
        k = self.hook_k(self.k_proj(x).view(b, t, cfg.n_kv_heads, cfg.d_head))
        v = self.hook_v(self.v_proj(x).view(b, t, cfg.n_kv_heads, cfg.d_head))
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = self.hook_rot_q(apply_rotary(q, cos, sin))
        k = self.hook_rot_k(apply_rotary(k, cos, sin))
        return q, k, v

    def dense(
        self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor, score_fn: ScoreFunction | None = None,
        key_doc: Tensor | None = None, n_docs: int = 0,
    ) -> Tensor:
        """Materialised attention for small inputs: the reference, and where the pattern hooks fire.

        ``mask`` is boolean ``[b or 1, 1, Q, K]``, True where a query may attend to a key."""
        n_rep = self.cfg.n_heads // self.cfg.n_kv_heads
        qh = q.transpose(1, 2)  # [b, head, Q, d]
        kh = repeat_kv(k, n_rep, 2).transpose(1, 2)
        vh = repeat_kv(v, n_rep, 2).transpose(1, 2)
        scores = (qh @ kh.transpose(-1, -2)) * self.scale
        ctx = ScoreContext(self.layer, self.cfg.n_heads, mask.sum(-1, keepdim=True), n_docs, key_doc, mask=mask)
        scores, sink = apply_score_function(scores, score_fn, ctx)
        scores = self.hook_attn_scores(scores.masked_fill(~mask, float("-inf")))
        if sink is None:
            pattern = torch.softmax(scores.float(), dim=-1)
        else:
            lse = torch.logaddexp(torch.logsumexp(scores.float(), -1, keepdim=True), sink.to(scores.device))
            pattern = torch.exp(scores.float() - lse)
        pattern = self.hook_pattern(pattern.to(v.dtype))
        return (pattern @ vh).transpose(1, 2)  # [b, Q, head, d]

    def out(self, z: Tensor) -> Tensor:
        z = self.hook_z(z)
        return self.o_proj(z.reshape(*z.shape[:2], -1))


class MLP(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_mlp, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_mlp, bias=False)
        self.down_proj = nn.Linear(cfg.d_mlp, cfg.d_model, bias=False)
        self.hook_post = HookPoint()  # [batch, pos, d_mlp]

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.hook_post(F.silu(self.gate_proj(x)) * self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, cfg: DecoderConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.ln1 = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.attn = Attention(cfg, layer)
        self.ln2 = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)
        self.hook_resid_pre = HookPoint()  # [batch, pos, d_model]
        self.hook_attn_out = HookPoint()  # [batch, pos, d_model]
        self.hook_resid_mid = HookPoint()  # [batch, pos, d_model]
        self.hook_mlp_out = HookPoint()  # [batch, pos, d_model]
        self.hook_resid_post = HookPoint()  # [batch, pos, d_model]

    def forward(self, resid: Tensor, cos: Tensor, sin: Tensor, attend: AttendFn) -> Tensor:
        resid, (q, k, v) = self.attention_inputs(resid, cos, sin)
        return self.finish(resid, attend(self.layer, q, k, v))

    # The two halves of forward, for engines that run many sequences through one layer at a
    # time and attend for all of them together in between.
    def attention_inputs(self, resid: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
        resid = self.hook_resid_pre(resid)
        return resid, self.attn.qkv(self.ln1(resid), cos, sin)

    def finish(self, resid: Tensor, z: Tensor) -> Tensor:
        """resid: the block's (hooked) input; z [b, pos, head, d_head] from attention."""
        resid = self.hook_resid_mid(resid + self.hook_attn_out(self.attn.out(z)))
        return self.hook_resid_post(resid + self.hook_mlp_out(self.mlp(self.ln2(resid))))


class Decoder(HookedRootModule):
    """Llama / Qwen3 decoder.  ``model(tokens)`` returns logits ``[batch, pos, vocab]``."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.ln_final = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.hook_embed = HookPoint()  # [batch, pos, d_model]
        self.setup()

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def rotary(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        return rotary_cos_sin(positions, self.cfg.d_head, self.cfg.rope_theta, self.dtype)

    def embed(self, tokens: Tensor) -> Tensor:
        return self.hook_embed(self.embed_tokens(tokens))

    def run_blocks(self, resid: Tensor, positions: Tensor, attend: AttendFn, layers: range | None = None) -> Tensor:
        cos, sin = self.rotary(positions)
        for layer in layers if layers is not None else range(self.cfg.n_layers):
            resid = self.blocks[layer](resid, cos, sin, attend)
        return resid

    def unembed(self, resid: Tensor) -> Tensor:
        return self.lm_head(self.ln_final(resid))

    def forward(
        self,
        tokens: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        score_fn: ScoreFunction | None = None,
        key_doc: Tensor | None = None,
        return_type: str = "logits",
    ) -> Tensor:
        """Dense forward over ``tokens`` [batch, pos].

        ``attention_mask``: None (causal), or boolean ``[b or 1, 1, pos, pos]`` (True: attend),
        e.g. a BlockSearch block mask.  ``position_ids`` [batch, pos] default to 0..pos-1.
        ``score_fn`` intervenes on every row's scores; ``key_doc`` [pos] names each token's
        document (-1 for none) for score functions that need it.
        """
        b, t = tokens.shape
        if position_ids is None:
            position_ids = torch.arange(t, device=tokens.device).expand(b, t)
        if attention_mask is None:
            attention_mask = create_mask(causal, t, t, device=tokens.device)[None, None]
        elif attention_mask.dtype != torch.bool:
            raise TypeError("attention_mask must be boolean (True = attend); lens never adds float masks")
        n_docs = int(key_doc.max()) + 1 if key_doc is not None and key_doc.numel() else 0

        def attend(layer, q, k, v):
            return self.blocks[layer].attn.dense(q, k, v, attention_mask, score_fn, key_doc, n_docs)

        resid = self.run_blocks(self.embed(tokens), position_ids, attend)
        if return_type == "residual":
            return resid
        return self.unembed(resid)
