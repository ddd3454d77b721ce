"""`distrib plan`: layouts checked as training checks them, exact state counts, the devices
file, the arithmetic `--explain` shows, and the command line."""

from __future__ import annotations

from pathlib import Path

import pytest

from distrib.cli import main
from distrib.config import load_config
from distrib.errors import ConfigError
from distrib.planning.hardware import find_device, load_devices
from distrib.planning.search import Layout, candidates, estimate, parse_layout, plan
from distrib.planning.states import deepspeed_partition, state_counts
from tests.support.tiny import tiny_flags

TINY = [
    *tiny_flags(max_seq_len=256),
    "--data.seq_len=256",
    "--training.global_batch_size=16",
    "--training.micro_batch_size=4",
]


def _cfg(*more: str):
    return load_config(None, [*TINY, *more])


def test_state_counts_are_the_shards_training_holds() -> None:
    cfg = _cfg()
    whole = state_counts(cfg, 1)
    assert whole.params == whole.total_params == whole.trainable
    # tp = 2 splits every linear and the embedding; the norms stay whole on each rank.
    tp = state_counts(_cfg("--parallel.tp=2"), 2)
    norms = (2 * 4 + 1) * 32
    assert tp.params == (whole.total_params - norms) // 2 + norms
    # A pipeline reports its busiest rank: both halves have 2 blocks, and the last the head.
    pp = state_counts(_cfg("--parallel.pp=2"), 2)
    assert pp.pp_rank in (0, 1) and pp.params < whole.params
    # FSDP over dp_shard x cp: four shards, each rounded up per parameter.
    fsdp = state_counts(_cfg("--parallel.dp_shard=2", "--parallel.cp=2"), 4)
    assert whole.total_params / 4 <= fsdp.params <= whole.total_params / 4 + 4 * 64


def test_layout_labels_round_trip_and_bad_ones_are_named() -> None:
    layout = Layout(2, 4, 2, 2, 1, "full", 2)
    assert layout.label == "dp_replicate=2,dp_shard=4,cp=2,tp=2,ac=full,mbs=2"
    assert parse_layout(layout.label) == layout
    assert parse_layout("tp=2") == Layout(1, 1, 1, 2, 1, "none", 1)
    ds = Layout(1, 8, 1, 1, 1, "none", 2, zero=3, offload="all")
    assert ds.label == "dp_shard=8,zero=3,offload=all,ac=none,mbs=2"
    assert parse_layout(ds.label) == ds
    assert parse_layout("dp_shard=4,ep=2").ep == 2
    with pytest.raises(ConfigError, match="'sp=2' is not KEY=VALUE"):
        parse_layout("dp_shard=2,sp=2")
    with pytest.raises(ConfigError, match="offload must be one of none, optimizer, all"):
        parse_layout("zero=2,offload=gpu")
    with pytest.raises(ConfigError, match="ac must be one of none, selective, full"):
        parse_layout("ac=some")
    with pytest.raises(ConfigError, match="whole numbers"):
        parse_layout("tp=two")


def test_every_listed_layout_is_one_training_accepts() -> None:
    cfg = _cfg()
    device = find_device("h100", load_devices())
    found = plan(cfg, 8, device, 8)
    assert found and all(e.fits for e in found)  # a tiny model fits anywhere
    labels = {e.layout.label for e in found}
    # 16 sequences over 8 data-parallel ranks: 2 each, so a micro-batch of 4 is refused.
    assert "dp_shard=8,ac=none,mbs=2" in labels and "dp_shard=8,ac=none,mbs=4" not in labels
    assert any("cp=2" in label for label in labels) and any("pp=2" in label for label in labels)
    for e in found:
        cfg_e = e.layout.apply(cfg)
        assert cfg_e.training.global_batch_size % (e.layout.dp_replicate * e.layout.dp_shard) == 0
    speeds = [e.tokens_per_s_per_gpu for e in found]
    assert speeds == sorted(speeds, reverse=True)
    # Candidates the config refuses (tp 8 does not divide 4 heads) never appear.
    assert not any(e.layout.tp == 8 for e in found)
    assert any(c.tp == 8 for c in candidates(8, 8))


def test_memory_and_time_respond_as_they_should() -> None:
    cfg = _cfg("--model.n_layers=4")
    device = find_device("h100", load_devices())
    none = estimate(cfg, parse_layout("dp_shard=2,ac=none,mbs=4"), 2, device, 8)
    full = estimate(cfg, parse_layout("dp_shard=2,ac=full,mbs=4"), 2, device, 8)
    selective = estimate(cfg, parse_layout("dp_shard=2,ac=selective,mbs=4"), 2, device, 8)
    assert full.memory.activations < none.memory.activations / 4
    assert full.time.compute == none.time.compute and none.time.recompute == 0
    # Full: one more forward of the blocks (a third of their FLOPs) plus the elementwise ops
    # that selective checkpointing alone repeats (memory-bound).
    assert 0 < selective.time.recompute < full.time.recompute
    again = full.time.recompute - selective.time.recompute
    assert none.time.compute / 4 < again < none.time.compute / 3
    half = estimate(cfg, parse_layout("dp_shard=2,cp=2,ac=none,mbs=4"), 4, device, 8)
    assert half.memory.activations == pytest.approx(none.memory.activations / 2)
    # Twice the GPUs for the same global batch: half the computation each.
    four = estimate(cfg, parse_layout("dp_shard=4,ac=none,mbs=4"), 4, device, 8)
    assert four.time.compute == pytest.approx(none.time.compute / 2)


def test_devices_file_adds_and_refuses(tmp_path: Path) -> None:
    builtin = load_devices()
    assert {"h100", "h200", "a100", "b200", "cpu"} <= set(builtin)
    extra = tmp_path / "mine.toml"
    fields = {**vars(builtin["h100"])}
    fields.pop("key")
    fields["name"] = "Mine"
    extra.write_text("[mine]\n" + "\n".join(f"{k} = {v!r}" for k, v in fields.items()) + "\n")
    extra.write_text(extra.read_text().replace("'", '"'))
    assert load_devices(extra)["mine"].name == "Mine"
    assert find_device("h100", builtin, 40.0).memory_gb == 40.0
    with pytest.raises(ConfigError, match="unknown device; known: a100, b200, cpu, h100, h200"):
        find_device("tpu", builtin)
    extra.write_text('[broken]\nname = "x"\n')
    with pytest.raises(ConfigError, match=r"device \[broken\] lacks \['comm_efficiency'"):
        load_devices(extra)


def test_cli_plans_and_explains(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--gpus", "4", *TINY, "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "valid layouts" in out and "tok/s/GPU" in out
    ranked = [line for line in out.splitlines() if "ac=" in line]
    assert len(ranked) == 3
    assert main(["plan", "--gpus", "4", *TINY, "--explain", "dp_shard=2,cp=2,ac=full,mbs=4"]) == 0
    text = capsys.readouterr().out
    for term in ("params", "activations", "logits", "recompute", "compute:", "cp ring", "fsdp"):
        assert term in text
    assert main(["plan", "--gpus", "4", *TINY, "--explain", "dp_shard=4,zero=3,offload=all"]) == 0
    text = capsys.readouterr().out
    assert "zero-3 over 4" in text and "host link" in text and "offloaded by DeepSpeed" in text
    assert main(["plan", "--gpus", "4", "--gpu", "tpu", *TINY]) == 2
    assert "unknown device" in capsys.readouterr().err
    assert main(["plan", "--gpus", "3", *TINY, "--explain", "dp_shard=2"]) == 2
    assert "needs a world size of 2" in capsys.readouterr().err


def test_deepspeed_layouts_are_enumerated_and_shard_their_states() -> None:
    cfg = _cfg("--model.n_layers=4")
    device = find_device("h100", load_devices())
    labels = {e.layout.label for e in plan(cfg, 4, device, 8)}
    # Every stage and offload on data-parallel layouts; never with tp, cp or pp (refused).
    for stage in ("zero=0,", "zero=1,", "zero=2,", "zero=3,", "zero=3,offload=all,"):
        assert f"dp_shard=4,{stage}ac=none,mbs=4" in labels, stage
    assert not any("zero=" in label and ("tp=" in label or "cp=" in label) for label in labels)
    by = {
        s: estimate(cfg, parse_layout(f"dp_shard=4,zero={s},ac=none,mbs=4"), 4, device, 8)
        for s in range(4)
    }
    total = state_counts(cfg, 1).total_params
    # ZeRO-1 shards the optimizer, ZeRO-2 also the gradients, ZeRO-3 also the weights.
    assert by[0].memory.optimizer == pytest.approx(8 * total, rel=1e-6)  # float32: no master
    assert by[1].memory.optimizer == pytest.approx(12 * total / 4, rel=0.01)
    assert by[2].memory.grads < by[1].memory.grads / 2
    assert by[3].memory.params == pytest.approx(by[2].memory.params / 4, rel=0.01)
    offload = estimate(
        cfg, parse_layout("dp_shard=4,zero=2,offload=optimizer,ac=none,mbs=4"), 4, device, 8
    )
    assert offload.memory.optimizer == 0 and offload.memory.host >= by[2].memory.optimizer
    assert offload.time.optimizer > by[2].time.optimizer  # PCIe and the host's AdamW


def test_deepspeed_partitions_follow_deepspeed_padding() -> None:
    # ZeRO-1/2: each group padded to a multiple of 2 x dp; ZeRO-3: each parameter to dp.
    assert deepspeed_partition([[5, 3], [7]], 4, 1) == 8 // 4 + 8 // 4
    assert deepspeed_partition([[5, 3], [7]], 4, 3) == 2 + 1 + 2
    assert deepspeed_partition([[5, 3], [7]], 4, 0) == 15


def test_expert_parallel_layouts_of_an_moe_model() -> None:
    moe = _cfg(
        "--model.family=custom",
        "--model.moe_experts=4",
        "--model.moe_top_k=2",
        "--model.moe_ffn_dim=32",
        "--model.n_layers=2",
    )
    device = find_device("h100", load_devices())
    labels = {e.layout.label for e in plan(moe, 4, device, 8)}
    assert "dp_shard=4,ep=2,ac=none,mbs=4" in labels and "dp_shard=4,ep=4,ac=none,mbs=4" in labels
    assert not any("ep=" in label and "cp=" in label for label in labels)  # refused by training
    one = estimate(moe, parse_layout("dp_shard=4,ac=none,mbs=4"), 4, device, 8)
    ep = estimate(moe, parse_layout("dp_shard=4,ep=4,ac=none,mbs=4"), 4, device, 8)
    assert ep.time.ep > 0 and one.time.ep == 0
    # Compute is the active parameters' (top-2 of 4 experts), whatever ep is.
    assert ep.time.compute == one.time.compute
    # ep=4 holds one expert per rank whole, ep=1 a quarter of each: the same count here.
    assert abs(ep.memory.params - one.memory.params) / one.memory.params < 0.05
    text = explain_text(moe, "dp_shard=4,ep=2,ac=selective,mbs=4")
    assert "ep all-to-all" in text and "recompute (selective AC)" in text


def explain_text(cfg, layout: str) -> str:  # noqa: ANN001
    from distrib.commands.plan import explain

    device = find_device("h100", load_devices())
    return explain(estimate(cfg, parse_layout(layout), 4, device, 8), device)
