"""Pipeline parallelism: cut the Llama into stages, place them on ranks, run a schedule.

The model is cut by layer: stage s holds the blocks `stage_layers(...)[s]`, the first stage also
the embedding and the last the final norm, output head and loss. Each rank builds only its own
stages (on meta, then parallelized and materialized like a whole model), wraps them in
`torch.distributed.pipelining.PipelineStage`s and drives them with one of torch's schedules.

Loss and gradient scaling. Torch's schedules can divide every `.grad` by the number of pipeline
micro-batches after each step (`scale_grads=True`), but that division also hits the gradients
the caller accumulated over earlier training micro-batches. So we build the schedules with
`scale_grads=False` and scale the loss instead: each pipeline micro-batch's mean loss is
multiplied by `loss_scale / n_microbatches`, whose sum over the step is `loss_scale` times the
mean loss over the whole training micro-batch (the pipeline micro-batches are equal in size).

Shape legend: B sequences in one training micro-batch, L sequence, D model dim, V vocab.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
)
from torch.distributed.tensor import DTensor

from distrib.config import ModelConfig, ParallelConfig
from distrib.config.rules import (
    check_stages_per_rank,
    check_tied_embeddings,
    pipeline_microbatches,
    split_points,
    stage_layers,
)
from distrib.models.build import build_on_meta
from distrib.models.loss import causal_lm_loss
from distrib.models.moe import moe_layers
from distrib.models.transformer import Transformer
from distrib.parallel.init import materialize

# Schedule name -> (torch schedule, how stages are placed on ranks). "single": one stage per rank;
# "loop": rank r holds stages r, r + pp, r + 2 pp, ... (what torch's interleaved schedules expect).
# zero_bubble is ScheduleInterleavedZeroBubble (ZB1P) rather than ScheduleZBVZeroBubble: it takes
# the same looped placement as interleaved_1f1b and any number of stages per rank, where ZBV
# needs exactly two in a V; and ZBV's forward-only `eval()` fails on torch 2.13 (its same-rank
# V hand-off asks for backward state that an evaluation never creates).
SCHEDULES: dict[str, tuple[type, str]] = {
    "gpipe": (ScheduleGPipe, "single"),
    "1f1b": (Schedule1F1B, "single"),
    "interleaved_1f1b": (ScheduleInterleaved1F1B, "loop"),
    "zero_bubble": (ScheduleInterleavedZeroBubble, "loop"),
}


def stages_of_rank(pp_rank: int, pp: int, stages_per_rank: int, schedule: str) -> list[int]:
    """The stage indices pipeline rank `pp_rank` holds, in the order its schedule expects."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {schedule!r}: one of {sorted(SCHEDULES)}")
    check_stages_per_rank(schedule, stages_per_rank)
    return [pp_rank + i * pp for i in range(stages_per_rank)]


def build_stage(
    model_cfg: ModelConfig, layer_ids: list[int], first: bool, last: bool
) -> Transformer:
    """A Transformer on meta holding only `layer_ids` (under their original keys, so parameter
    names are the whole model's), the embedding if `first`, the norm and head if `last`."""
    model = build_on_meta(model_cfg)
    keep = {str(i) for i in layer_ids}
    for key in list(model.layers.keys()):
        if key not in keep:
            del model.layers[key]
    if not first:
        model.tok_embeddings = None
    if not last:
        model.norm = None
        model.output = None
    return model


class _ScaledLoss:
    """The schedule's loss function: mean cross-entropy of one pipeline micro-batch (or its sum
    over the training micro-batch's `denominator`), scaled for backward; the unscaled values
    are recorded for reporting."""

    def __init__(self) -> None:
        self.scale = 1.0
        self.denominator: float | None = None
        self.values: list[Tensor] = []

    def __call__(self, logits_BLV: Tensor, labels_BL: Tensor) -> Tensor:
        loss = causal_lm_loss(logits_BLV, labels_BL, self.denominator)
        value = loss.detach()
        # Under loss parallelism the loss is a replicated DTensor; report a plain tensor.
        self.values.append(value.full_tensor() if isinstance(value, DTensor) else value)
        return loss * self.scale


class Pipeline:
    """This rank's pipeline stages and the schedule that runs them."""

    def __init__(
        self,
        parts: list[Transformer],
        stages: list[PipelineStage],
        schedule: object,
        n_microbatches: int,
        loss_fn: _ScaledLoss,
        loss_context: Callable[[], AbstractContextManager],
    ) -> None:
        self.parts = parts
        self.stages = stages
        self.schedule = schedule
        self.n_microbatches = n_microbatches
        self.has_first = any(stage.is_first for stage in stages)
        self.has_last = any(stage.is_last for stage in stages)
        self._loss_fn = loss_fn
        self._loss_context = loss_context
        self._inferred = False

    def step(
        self,
        inputs_BL: Tensor | None,
        labels_BL: Tensor | None,
        loss_scale: float = 1.0,
        denominator: float | None = None,
    ) -> Tensor | None:
        """Forward and backward over one training micro-batch, accumulating into `.grad`.

        Gradients are those of `loss_scale * mean loss` over the micro-batch's sequences (with
        `denominator`, of the summed loss over it: see `Batch.loss_denominator`); that loss
        comes back, detached, on the rank holding the last stage (None elsewhere). Inputs are
        read only where the first stage lives, labels only where the last does.
        """
        return self._run(self.schedule.step, inputs_BL, labels_BL, loss_scale, denominator)

    def eval_step(
        self,
        inputs_BL: Tensor | None,
        labels_BL: Tensor | None,
        denominator: float | None = None,
    ) -> Tensor | None:
        """Forward only: the micro-batch's loss on the last-stage rank, else None."""
        return self._run(self.schedule.eval, inputs_BL, labels_BL, 1.0, denominator)

    def _run(
        self,
        run: Callable[..., object],
        inputs_BL: Tensor | None,
        labels_BL: Tensor | None,
        loss_scale: float,
        denominator: float | None = None,
    ) -> Tensor | None:
        if self.has_first and inputs_BL is None:
            raise ValueError("this rank holds the first pipeline stage: pass the input tokens")
        if self.has_last and labels_BL is None:
            raise ValueError("this rank holds the last pipeline stage: pass the labels")
        # A mean per pipeline micro-batch is averaged over them; sums over one denominator add.
        self._loss_fn.scale = loss_scale if denominator else loss_scale / self.n_microbatches
        self._loss_fn.denominator = denominator
        self._loss_fn.values.clear()
        # Contiguous: torch 2.11 records a model input's metadata through .to("meta"), which
        # drops a view's strides, then checks each micro-batch's strides against it, so the
        # loader's tokens[:, :-1] failed there once a pipeline micro-batch held two sequences.
        args = (inputs_BL.contiguous(),) if self.has_first else ()
        target = labels_BL if self.has_last else None
        if not self._inferred:
            # On its first run the schedule pushes one extra forward through each stage to learn
            # the activations' shapes (meta tensors on torch 2.11, uninitialized ones on 2.13);
            # MoE layers must not count its routing as training load.
            self._inferred = True
            for part in self.parts:
                for layer in moe_layers(part).values():
                    layer.skip_stats += 1
        with self._loss_context():
            # return_outputs=False: the last stage would otherwise keep and concatenate every
            # micro-batch's logits, a B x L x V tensor nobody reads.
            run(*args, target=target, return_outputs=False)
        if not self.has_last:
            return None
        # The last n: on its first step torch may call the loss once more to infer shapes.
        values = torch.stack(self._loss_fn.values[-self.n_microbatches :])
        self._loss_fn.values.clear()
        return values.sum() if denominator else values.mean()


def build_pipeline(
    model_cfg: ModelConfig,
    parallel: ParallelConfig,
    pp_mesh: DeviceMesh,
    device: torch.device,
    seed: int,
    micro_batch_size: int,
    parallelize: Callable[[Transformer], None] = lambda m: None,
    loss_context: Callable[[], AbstractContextManager] = contextlib.nullcontext,
) -> Pipeline:
    """Build this rank's stages (parallelized by `parallelize`, then materialized from `seed`)
    and the schedule `parallel.pp_schedule` over `pp_mesh`.

    Each training micro-batch of `micro_batch_size` sequences is cut into
    `parallel.pp_microbatches` pipeline micro-batches (0: one per sequence).
    """
    pp, pp_rank = pp_mesh.size(), pp_mesh.get_local_rank()
    num_stages = pp * parallel.pp_stages_per_rank
    n_microbatches = pipeline_microbatches(parallel, micro_batch_size)
    check_tied_embeddings(model_cfg, parallel.tp, pp)
    layers = stage_layers(
        model_cfg.n_layers, num_stages, split_points(parallel, model_cfg.n_layers)
    )
    indices = stages_of_rank(pp_rank, pp, parallel.pp_stages_per_rank, parallel.pp_schedule)
    group = pp_mesh.get_group()
    parts: list[Transformer] = []
    stages: list[PipelineStage] = []
    for index in indices:
        part = build_stage(model_cfg, layers[index], index == 0, index == num_stages - 1)
        parallelize(part)
        materialize(part, device, seed)
        parts.append(part)
        # No example inputs: shapes and dtypes are inferred on the first step, so whatever the
        # parallelize callback made of the activations (dtype, DTensor) is what travels.
        stages.append(PipelineStage(part, index, num_stages, device, group=group))
    schedule_cls, placement = SCHEDULES[parallel.pp_schedule]
    loss_fn = _ScaledLoss()
    schedule = schedule_cls(
        stages[0] if placement == "single" else stages,
        n_microbatches=n_microbatches,
        loss_fn=loss_fn,
        scale_grads=False,  # the loss is scaled instead; see the module docstring
    )
    return Pipeline(parts, stages, schedule, n_microbatches, loss_fn, loss_context)
