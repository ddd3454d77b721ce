"""Mixture-of-Experts feed-forward: a router, routed SwiGLU experts, optional shared experts.

Token choice with dropless dispatch: each token goes to its top-k experts (softmax or sigmoid
scores; an optional per-expert bias shifts the choice but not the weights, as in DeepSeek-V3's
auxiliary-loss-free balancing), every chosen (token, expert) pair is computed, none is dropped.
The pairs are sorted by expert so each expert multiplies one contiguous block of rows: with
`torch._grouped_mm` on CUDA in one kernel, elsewhere one matmul per expert.

Parameter layout (Hugging Face's per-expert tensors stacked on a leading expert dim):
  router.weight [E, D]; experts.w1 / w3 [E, F, D] (gate / up), experts.w2 [E, D, F] (down);
  shared.w1 / w2 / w3 (a dense SwiGLU) when there are shared experts; buffer expert_bias [E].

Expert parallelism is applied from outside (distrib.parallel.expert): it shards the experts'
leading dim and wraps `GroupedExperts.forward` with the all-to-all that carries rows to the
rank holding their expert and back, so nothing here knows about processes.

Auxiliary losses (load balancing, router z-loss) never appear in the model's output: each one
is attached to the layer's output by `_AttachAuxLoss`, whose backward feeds the loss's
gradient (times the engine's loss scale) into the graph. So they train under every layout,
pipeline stages included, without the loss code knowing about them (Megatron-Core's approach).

Shape legend: T tokens (B * L flattened), D model dim, E experts, K top-k, F expert hidden dim,
N = T * K routed (token, expert) pairs, X this rank's experts.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distrib.config import ModelConfig
from distrib.config.families import resolved_moe_ffn_dim

KERNELS = ("auto", "grouped_mm", "loop")
# torch._grouped_mm runs (forward and backward) on CUDA sm90+ in bfloat16; its CPU version has
# no working backward in torch 2.13, so elsewhere the experts loop.
_GROUPED_MM_MIN_CAPABILITY = (9, 0)


def _local(weight: Tensor) -> Tensor:
    # Under expert parallelism the stacked weights are DTensors sharded on the expert dim; the
    # matmuls want this rank's experts as a plain tensor. Duck-typed so that models/ needs no
    # torch.distributed import.
    to_local = getattr(weight, "to_local", None)
    return to_local() if to_local is not None else weight


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype matmuls on `x` run in: autocast's where it is on for x's device, else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def grouped_mm_available(x: Tensor) -> bool:
    """Whether `torch._grouped_mm` can run forward and backward on `x`'s device, in the dtype
    its matmuls run in (float32 activations under bfloat16 autocast count as bfloat16)."""
    return (
        hasattr(torch, "_grouped_mm")
        and x.is_cuda
        and compute_dtype(x) == torch.bfloat16
        and torch.cuda.get_device_capability(x.device) >= _GROUPED_MM_MIN_CAPABILITY
    )


class Routing(NamedTuple):
    """Where a layer sends its tokens (T tokens, K chosen experts each, E experts)."""

    ids_TK: Tensor  # the chosen experts
    weights_TK: Tensor  # their weights in the output, float32
    logits_TE: Tensor  # the router's logits, float32
    scores_TE: Tensor  # softmax or sigmoid of the logits


class GroupedExperts(nn.Module):
    """`num_experts` SwiGLU experts as stacked weights, applied to rows grouped by expert."""

    def __init__(self, num_experts: int, dim: int, hidden_dim: int, kernel: str = "auto") -> None:
        super().__init__()
        self.num_experts = num_experts
        self.kernel = kernel
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.w3 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        # A factor on the weights' gradients, set by data parallelism over experts: expert
        # parallelism sums the gradient over more ranks' tokens than FSDP divides by.
        self.grad_scale = 1.0

    def forward(self, x_ND: Tensor, counts_X: Tensor) -> Tensor:
        """Rows `x_ND` sorted by expert, `counts_X[e]` of them for expert e, in; outputs in the
        same order out. Under expert parallelism X is this rank's share of the experts."""
        w1, w2, w3 = (_local(w) for w in (self.w1, self.w2, self.w3))
        if self.grad_scale != 1.0:
            w1, w2, w3 = (_ScaleGrad.apply(w, self.grad_scale) for w in (w1, w2, w3))
        kernel = self.kernel
        if kernel == "auto":
            kernel = "grouped_mm" if grouped_mm_available(x_ND) else "loop"
        if kernel == "grouped_mm":
            if not grouped_mm_available(x_ND):
                raise ValueError(
                    f"model.moe_kernel = 'grouped_mm' needs torch._grouped_mm on a CUDA GPU of "
                    f"compute capability >= 9.0 in bfloat16 (here: {x_ND.device}, {x_ND.dtype}); "
                    "use moe_kernel = 'auto' or 'loop'"
                )
            return self._grouped(x_ND, counts_X, w1, w2, w3)
        return self._loop(x_ND, counts_X, w1, w2, w3)

    @staticmethod
    def _grouped(x_ND: Tensor, counts_X: Tensor, w1: Tensor, w2: Tensor, w3: Tensor) -> Tensor:
        offsets_X = torch.cumsum(counts_X, 0, dtype=torch.int32)
        # Autocast does not cover the private op: cast to its dtype by hand.
        dtype = compute_dtype(x_ND)
        x_ND, w1, w2, w3 = (t.to(dtype) for t in (x_ND, w1, w2, w3))
        h_NF = F.silu(torch._grouped_mm(x_ND, w1.transpose(-2, -1), offs=offsets_X))
        h_NF = h_NF * torch._grouped_mm(x_ND, w3.transpose(-2, -1), offs=offsets_X)
        return torch._grouped_mm(h_NF, w2.transpose(-2, -1), offs=offsets_X)

    @staticmethod
    def _loop(x_ND: Tensor, counts_X: Tensor, w1: Tensor, w2: Tensor, w3: Tensor) -> Tensor:
        # One host read of the counts per layer; the split sizes must be Python ints.
        outputs = []
        for e, x_nD in enumerate(torch.split(x_ND, counts_X.tolist())):
            h_nF = F.silu(x_nD @ w1[e].transpose(0, 1)) * (x_nD @ w3[e].transpose(0, 1))
            outputs.append(h_nF @ w2[e].transpose(0, 1))
        return torch.cat(outputs) if outputs else x_ND.new_zeros(0, w2.shape[1])


class _ScaleGrad(torch.autograd.Function):
    """Identity in forward; multiplies the gradient by `scale` in backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.scale, None


class _AttachAuxLoss(torch.autograd.Function):
    """Identity on `out`; in backward, gives `aux` (a scalar loss) the gradient `scale`."""

    @staticmethod
    def forward(ctx: Any, out: Tensor, aux: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        ctx.aux_meta = (aux.dtype, aux.device)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, Tensor, None]:
        dtype, device = ctx.aux_meta
        return grad_out, torch.full((), ctx.scale, dtype=dtype, device=device), None


class MoE(nn.Module):
    """The routed feed-forward of one block: `x -> sum_k w_k expert_k(x) (+ shared(x))`."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        from distrib.models.transformer import FeedForward  # the dense SwiGLU; no import cycle

        self.num_experts = cfg.moe_experts
        self.top_k = cfg.moe_top_k
        self.score = cfg.moe_score
        self.norm_topk = cfg.moe_norm_topk
        self.route_scale = cfg.moe_route_scale
        self.aux_loss_coef = cfg.moe_aux_loss_coef
        self.z_loss_coef = cfg.moe_z_loss_coef
        hidden = resolved_moe_ffn_dim(cfg)
        self.router = nn.Linear(cfg.dim, cfg.moe_experts, bias=False)
        self.experts = GroupedExperts(cfg.moe_experts, cfg.dim, hidden, cfg.moe_kernel)
        self.shared = (
            FeedForward(cfg.dim, hidden * cfg.moe_shared_experts)
            if cfg.moe_shared_experts > 0
            else None
        )
        # Persistent: the balancing bias is training state, saved and resumed with the weights.
        self.register_buffer("expert_bias", torch.zeros(cfg.moe_experts), persistent=True)
        # Not persistent: what the layer saw since `take_stats`, for balancing and metrics.
        self.register_buffer("tokens_per_expert", torch.zeros(cfg.moe_experts), persistent=False)
        self.register_buffer("aux_sums", torch.zeros(3), persistent=False)  # aux, z, forwards
        # The factor the engine applies to the loss before backward (1 / micro-batches, ...),
        # which the attached auxiliary losses must share; set by `set_aux_loss_scale`.
        self.aux_loss_scale = 1.0
        # Forwards still to come that are not training (a pipeline's shape inference): their
        # routing is not recorded. Set by distrib.parallel.pipeline.
        self.skip_stats = 0

    def reset_buffers(self) -> None:
        """Zero the routing bias and the statistics (after `to_empty`, or a fresh start)."""
        for buf in (self.expert_bias, self.tokens_per_expert, self.aux_sums):
            buf.zero_()

    def route(self, x_TD: Tensor) -> Routing:
        """Each token's top-k experts and their weights, with the router's logits and scores."""
        logits_TE = self.router(x_TD).float()
        scores_TE = logits_TE.softmax(dim=-1) if self.score == "softmax" else logits_TE.sigmoid()
        # The bias only decides which experts are chosen; the weights stay the router's scores.
        choice_TE = scores_TE + self.expert_bias.float()
        ids_TK = choice_TE.topk(self.top_k, dim=-1).indices
        weights_TK = scores_TE.gather(-1, ids_TK)
        if self.norm_topk:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        return Routing(ids_TK, weights_TK * self.route_scale, logits_TE, scores_TE)

    def dispatch_order(self, ids_TK: Tensor) -> tuple[Tensor, Tensor]:
        """(the order of the N = T*K routed pairs sorted by expert, rows per expert [E])."""
        flat_N = ids_TK.flatten()
        counts_E = torch.bincount(flat_N, minlength=self.num_experts)
        return torch.argsort(flat_N, stable=True), counts_E

    def forward(self, x_BLD: Tensor) -> Tensor:
        """Route every token to its top-k experts and sum their weighted outputs."""
        record = self.training and self.skip_stats == 0
        self.skip_stats = max(self.skip_stats - 1, 0)
        if x_BLD.is_meta:  # shape inference (torch 2.11's pipeline stages): nothing to route
            return torch.empty_like(x_BLD)
        shape = x_BLD.shape
        x_TD = x_BLD.reshape(-1, shape[-1])
        routing = self.route(x_TD)
        order_N, counts_E = self.dispatch_order(routing.ids_TK)
        token_N = order_N // self.top_k
        y_ND = self.experts(x_TD[token_N], counts_E)
        y_ND = y_ND * routing.weights_TK.flatten()[order_N, None].to(y_ND.dtype)
        out_TD = torch.zeros_like(x_TD, dtype=y_ND.dtype).index_add_(0, token_N, y_ND)
        if self.shared is not None:
            out_TD = out_TD + self.shared(x_TD)
        out_BLD = out_TD.reshape(shape)
        if record:
            out_BLD = self._aux_losses(out_BLD, routing, counts_E)
        return out_BLD

    def _aux_losses(self, out_BLD: Tensor, routing: Routing, counts_E: Tensor) -> Tensor:
        """Record what was routed; attach the enabled auxiliary losses to the output. A loss
        whose coefficient is 0 is still computed for the metrics, outside autograd."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.aux_loss_coef > 0):
            aux = load_balancing_loss(routing.scores_TE, counts_E, self.score)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.z_loss_coef > 0):
            z = router_z_loss(routing.logits_TE)
        with torch.no_grad():
            self.tokens_per_expert += counts_E.to(self.tokens_per_expert.dtype)
            self.aux_sums += torch.stack([aux.detach(), z.detach(), aux.new_ones(())])
        total = None
        if self.aux_loss_coef > 0:
            total = self.aux_loss_coef * aux
        if self.z_loss_coef > 0:
            total = self.z_loss_coef * z if total is None else total + self.z_loss_coef * z
        if total is None or not torch.is_grad_enabled():
            return out_BLD
        return _AttachAuxLoss.apply(out_BLD, total, self.aux_loss_scale)

    @torch.no_grad()
    def take_stats(self) -> tuple[Tensor, Tensor]:
        """(tokens per expert [E], mean aux and z losses [2]) since the last call; resets them.

        The counts are for balancing and imbalance only, which need proportions: a forward
        recomputed by activation checkpointing counts twice, for every expert alike.
        """
        counts = self.tokens_per_expert.clone()
        sums = self.aux_sums.clone()
        self.tokens_per_expert.zero_()
        self.aux_sums.zero_()
        return counts, sums[:2] / sums[2].clamp_min(1)

    @torch.no_grad()
    def update_bias(self, counts_E: Tensor, rate: float) -> None:
        """DeepSeek-V3's auxiliary-loss-free balancing: move each expert's bias by `rate`
        towards uniform load (up when it got fewer tokens than the mean, down when more)."""
        load = counts_E.to(self.expert_bias.dtype)
        self.expert_bias += rate * torch.sign(load.mean() - load)


def load_balancing_loss(scores_TE: Tensor, counts_E: Tensor, score: str) -> Tensor:
    """Switch Transformer's load-balancing loss, `E * sum_e f_e * P_e`: f_e the fraction of
    routed pairs sent to expert e (`counts_E`, no gradient), P_e the mean routing probability
    of e. It is 1 at perfect balance. Sigmoid scores are normalized per token to be
    probabilities."""
    probs_TE = scores_TE if score == "softmax" else scores_TE / scores_TE.sum(-1, keepdim=True)
    fraction_E = counts_E.float() / counts_E.sum()
    return scores_TE.shape[-1] * (fraction_E * probs_TE.mean(dim=0)).sum()


def router_z_loss(logits_TE: Tensor) -> Tensor:
    """ST-MoE's router z-loss: the mean squared log-partition of the router logits, which keeps
    them small (float32 routing stays accurate)."""
    return torch.logsumexp(logits_TE, dim=-1).pow(2).mean()


def moe_layers(module: nn.Module) -> dict[str, MoE]:
    """The MoE layers inside `module`, by block index (e.g. "3"), in model order."""
    found: dict[str, MoE] = {}
    for name, sub in module.named_modules():
        if isinstance(sub, MoE):
            parts = name.split(".")
            found[parts[parts.index("layers") + 1] if "layers" in parts else name] = sub
    return found


def set_aux_loss_scale(modules: list[nn.Module], scale: float) -> None:
    """Tell every MoE layer in `modules` the scale the engine applies to the loss before the
    next backward, so the attached auxiliary losses are scaled alike."""
    for module in modules:
        for layer in moe_layers(module).values():
            layer.aux_loss_scale = scale
