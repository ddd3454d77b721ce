"""The decoder of every family: pre-norm RMSNorm, RoPE (Hugging Face rotate_half layout), GQA,
and a SwiGLU or Mixture-of-Experts feed-forward; the family differences are ModelConfig keys
(q/k/v bias, q/k RMS norm, head dim, sliding window, RoPE scaling, tied head, MoE options; see
docs/models.md), not subclasses.

Plain nn.Module code that knows nothing of parallelism: tensor-parallel plans, FSDP, activation
checkpointing and pipeline cuts are applied from outside. To make that easy, blocks live in an
nn.ModuleDict keyed "0".."n-1" (names survive pipeline cuts), the embedding, final norm and output
head may be set to None on a pipeline stage, and the model is built on the meta device and then
materialized with `to_empty(device=...)` and `init_weights()`.

Parameter names follow Hugging Face's Llama layout (distrib.models.hf_families maps each family):
  tok_embeddings <-> model.embed_tokens, layers.i.attention.wq/wk/wv/wo <-> self_attn.q/k/v/o_proj,
  attention.q_norm/k_norm <-> self_attn.q_norm/k_norm, feed_forward.w1/w2/w3 <->
  mlp.gate/down/up_proj (an MoE layer: distrib.models.moe), attention_norm <-> input_layernorm,
  ffn_norm <-> post_attention_layernorm, norm <-> model.norm, output <-> lm_head.

Shape legend: B batch, L sequence, D model dim, H query heads, G kv heads, K head dim,
F feed-forward hidden dim, V vocab, P max positions (max_seq_len).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distrib.config import ModelConfig
from distrib.config.families import is_moe_layer, resolved_head_dim
from distrib.models.attention import DocSegments, attention, document_segments
from distrib.models.lora import lora_a_initial
from distrib.models.loss import causal_lm_loss, chunked_causal_lm_loss
from distrib.models.moe import MoE
from distrib.models.rope import apply_rope, model_rope_cache
from distrib.models.rope import rope_cache as rope_cache  # re-exported: callers import it here

# (q_BHLK, k_BGLK, v_BGLK, doc_ids_BL or their DocSegments or None, window) -> out_BHLK.
ContextAttention = Callable[[Tensor, Tensor, Tensor, "Tensor | DocSegments | None", int], Tensor]

# Projections that write into the residual stream: initialized smaller, by 1/sqrt(2 n_layers).
_RESIDUAL_WRITERS = (
    "attention.wo.weight",
    "feed_forward.w2.weight",
    "feed_forward.experts.w2",
    "feed_forward.shared.w2.weight",
)


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale; statistics in float32 whatever the input."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        """Scale of one: the identity on normalized activations."""
        nn.init.ones_(self.weight)

    def forward(self, x_BLD: Tensor) -> Tensor:
        """Normalize over the last dim; same op order as HF so bf16 results match too."""
        xf_BLD = x_BLD.float()
        xf_BLD = xf_BLD * torch.rsqrt(xf_BLD.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf_BLD.to(x_BLD.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE; the kernel is chosen by `backend`.

    The family options live here: biases on the q/k/v projections (`qkv_bias`; wo never has
    one), an RMSNorm over each query and key head applied before RoPE (`qk_norm`, Qwen3's
    order), a head dim of its own (`head_dim`, so H * K may differ from D) and a sliding window
    (`sliding_window`: position i sees j with i - window < j <= i).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.head_dim = resolved_head_dim(cfg)
        self.backend = cfg.attention
        self.window = cfg.sliding_window
        hk = self.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * hk, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * hk, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * hk, bias=cfg.qkv_bias)
        self.wo = nn.Linear(cfg.n_heads * hk, cfg.dim, bias=False)
        self.q_norm: RMSNorm | None = RMSNorm(hk, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm: RMSNorm | None = RMSNorm(hk, cfg.norm_eps) if cfg.qk_norm else None
        # Set from outside by context parallelism (distrib.parallel.context.apply_cp): attention
        # over this rank's share of each sequence that exchanges keys and values with the other
        # cp ranks; called as (q, k, v, doc_ids, window) in place of `attention`.
        self.context_parallel: ContextAttention | None = None

    def forward(
        self, x_BLD: Tensor, cos_PK: Tensor, sin_PK: Tensor, doc_ids_BL: Tensor | None = None
    ) -> Tensor:
        """Attend causally (and within documents when `doc_ids_BL` is given); the RoPE tables
        cover all positions and are sliced to this input's length."""
        B, L, _ = x_BLD.shape
        if cos_PK.shape[0] < L:
            raise ValueError(f"sequence length {L} exceeds model.max_seq_len ({cos_PK.shape[0]})")
        cos_LK, sin_LK = cos_PK[:L], sin_PK[:L]
        # -1 rather than n_heads: under tensor parallelism each rank holds only its share of the
        # heads, and the module must not need to know how many that is.
        q_BLHK = self.wq(x_BLD).view(B, L, -1, self.head_dim)
        k_BLGK = self.wk(x_BLD).view(B, L, -1, self.head_dim)
        v_BGLK = self.wv(x_BLD).view(B, L, -1, self.head_dim).transpose(1, 2)
        if self.q_norm is not None and self.k_norm is not None:
            # On [B, L, heads, K], before the transpose: the heads dim (2) is the one tensor
            # parallelism shards, and the norm's parallel style expects it there.
            q_BLHK, k_BLGK = self.q_norm(q_BLHK), self.k_norm(k_BLGK)
        q_BHLK = apply_rope(q_BLHK.transpose(1, 2), cos_LK, sin_LK)
        k_BGLK = apply_rope(k_BLGK.transpose(1, 2), cos_LK, sin_LK)
        if self.context_parallel is not None:
            out_BHLK = self.context_parallel(q_BHLK, k_BGLK, v_BGLK, doc_ids_BL, self.window)
        else:
            out_BHLK = attention(q_BHLK, k_BGLK, v_BGLK, self.backend, doc_ids_BL, self.window)
        return self.wo(out_BHLK.transpose(1, 2).reshape(B, L, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), with w1 the gate, w3 the up and w2 the down projection."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x_BLD: Tensor) -> Tensor:
        """Gated feed-forward over the last dim."""
        h_BLF = F.silu(self.w1(x_BLD)) * self.w3(x_BLD)
        return self.w2(h_BLF)


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attention(norm(x)), then h + feed_forward(norm(h))."""

    def __init__(self, cfg: ModelConfig, layer: int = 0) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward: FeedForward | MoE = (
            MoE(cfg) if is_moe_layer(cfg, layer) else FeedForward(cfg.dim, cfg.ffn_dim)
        )

    def forward(
        self, x_BLD: Tensor, cos_PK: Tensor, sin_PK: Tensor, doc_ids_BL: Tensor | None = None
    ) -> Tensor:
        """One residual attention step and one residual feed-forward step."""
        h_BLD = x_BLD + self.attention(self.attention_norm(x_BLD), cos_PK, sin_PK, doc_ids_BL)
        return h_BLD + self.feed_forward(self.ffn_norm(h_BLD))


class Transformer(nn.Module):
    """Llama decoder. Build on meta, `to_empty(device=...)`, then `init_weights()`."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings: nn.Embedding | None = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(cfg, i) for i in range(cfg.n_layers)})
        self.norm: RMSNorm | None = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output: nn.Linear | None = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # Not persistent: derived from the config, so they stay out of checkpoints and HF exports;
        # to_empty leaves them as garbage, which is why init_weights recomputes them.
        cos_PK, sin_PK = model_rope_cache(cfg)
        self.register_buffer("rope_cos", cos_PK, persistent=False)
        self.register_buffer("rope_sin", sin_PK, persistent=False)

    def _retie(self) -> None:
        # to_empty replaces each module's parameters separately, which breaks the sharing; put it
        # back before init so one tensor is initialized and one appears in parameters().
        emb, out = self.tok_embeddings, self.output
        tie = self.cfg.tie_embeddings and emb is not None and out is not None
        if tie and out.weight is not emb.weight:
            out.weight = emb.weight

    def init_weights(self, seed: int | None = None) -> None:
        """Initialize every parameter and the RoPE tables on their devices.

        Each parameter's value depends only on `seed` and its name (see `initial_value`), not on
        the order of initialization or on which modules this instance holds, so a pipeline stage
        or a sharded copy gets exactly the numbers the whole model would. `seed=None` draws one
        from torch's global generator, so `torch.manual_seed` beforehand still decides the init.
        """
        if seed is None:
            seed = int(torch.randint(0, 2**62, (), device="cpu"))
        self.init_buffers()
        self._retie()
        with torch.no_grad():
            for name, param in self.named_parameters():  # a tied weight comes once
                param.copy_(self.initial_value(name, param.shape, param.device, seed))

    def init_buffers(self) -> None:
        """Recompute the RoPE tables and zero the MoE layers' routing bias and statistics (all
        garbage after `to_empty`); a checkpoint load then restores the saved bias."""
        self.init_rope()
        for module in self.modules():
            if isinstance(module, MoE):
                module.reset_buffers()

    def init_rope(self) -> None:
        """Recompute the RoPE tables (non-persistent buffers, garbage after `to_empty`)."""
        cfg = self.cfg
        self.rope_cos, self.rope_sin = model_rope_cache(cfg, device=self.rope_cos.device)

    def initial_value(
        self, name: str, shape: torch.Size, device: torch.device, seed: int
    ) -> Tensor:
        """The initial value of parameter `name` (its full, unsharded shape), float32.

        RMSNorm scales are one; other weights are normal(init_std), the projections that write
        into the residual stream (wo, w2) scaled by 1/sqrt(2 * n_layers) so the stream's
        variance does not grow with depth. The generator is seeded from `seed` and `name`.
        LoRA adapters (distrib.models.lora): `lora_a` kaiming-uniform, `lora_b` zero, so the
        adapted model starts as its base.
        """
        if name.endswith("norm.weight"):
            return torch.ones(shape, device=device)
        if name.endswith((".bias", ".lora_b")):
            return torch.zeros(shape, device=device)
        std = self.cfg.init_std
        if name.endswith(_RESIDUAL_WRITERS):
            std /= math.sqrt(2 * self.cfg.n_layers)
        digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
        generator = torch.Generator(device=device).manual_seed(
            int.from_bytes(digest[:8], "big") >> 1
        )
        if name.endswith(".lora_a"):
            return lora_a_initial(shape, device, generator)
        return torch.empty(shape, device=device).normal_(0.0, std, generator=generator)

    def _is_tied(self) -> bool:
        emb, out = self.tok_embeddings, self.output
        return emb is not None and out is not None and out.weight is emb.weight

    def forward(
        self,
        tokens_BL: Tensor,
        doc_ids_BL: Tensor | None = None,
        labels_BL: Tensor | None = None,
        loss_chunk_tokens: int = 0,
        loss_denominator: float | None = None,
    ) -> Tensor:
        """Logits `[B, L, V]` in the compute dtype; with `labels_BL`, the mean loss instead.

        On a pipeline stage without `tok_embeddings` the input is already hidden states `h_BLD`;
        without `norm`/`output` the hidden states are returned. `doc_ids_BL` (same shape as the
        tokens, non-decreasing along L) confines attention to each token's own document; RoPE
        positions are not reset per document, since attention only sees relative positions.

        Given `labels_BL`, the float32 mean next-token cross-entropy is returned (the sum over
        `loss_denominator` when given, see `causal_lm_loss`), computed here
        rather than by the caller because under FSDP2 the output weight is whole only inside
        this forward. With `loss_chunk_tokens > 0` the output head and loss run that many tokens
        at a time (recomputed in backward), so the full float32 logits never exist at once.
        """
        h_BLD = self.tok_embeddings(tokens_BL) if self.tok_embeddings is not None else tokens_BL
        # The full RoPE tables go down and each attention slices them to the length it sees:
        # under sequence parallelism the residual stream here holds only this rank's positions,
        # while attention works on all of them.
        # flash_attn's varlen layout of the documents, once here rather than in every layer.
        doc_ids_BL = document_segments(doc_ids_BL, self.cfg.attention)
        for layer in self.layers.values():
            h_BLD = layer(h_BLD, self.rope_cos, self.rope_sin, doc_ids_BL)
        if self.norm is not None:
            h_BLD = self.norm(h_BLD)
        if self.output is None:
            return h_BLD
        if labels_BL is None:
            return self.output(h_BLD)
        if loss_chunk_tokens > 0:
            return chunked_causal_lm_loss(
                h_BLD, self.output.weight, labels_BL, loss_chunk_tokens, loss_denominator
            )
        return causal_lm_loss(self.output(h_BLD), labels_BL, loss_denominator)


def num_params(model: nn.Module, exclude_embeddings: bool = False) -> int:
    """Number of parameters, each shared tensor counted once.

    `exclude_embeddings` drops the input embedding table (a lookup, no FLOPs). With tied
    embeddings that same tensor is also the output projection, which does matmul work, so it is
    kept: the result is then the same for the tied and untied variants of one shape (6 * N per
    token is the training FLOPs either way).
    """
    total = sum(p.numel() for p in model.parameters())  # parameters() de-duplicates shared tensors
    if exclude_embeddings:
        emb = getattr(model, "tok_embeddings", None)
        out = getattr(model, "output", None)
        if isinstance(emb, nn.Embedding):
            tied = isinstance(out, nn.Linear) and out.weight is emb.weight
            if not tied:
                total -= emb.weight.numel()
    return total
