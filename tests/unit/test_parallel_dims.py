"""Layout degrees: inference, the world-size product, and every bad layout's message."""

import pytest

from distrib.cli import main
from distrib.config import ParallelConfig, load_config
from distrib.errors import ConfigError
from distrib.parallel.dims import ParallelDims

UNTIED = ["--model.tie_embeddings=false"]


def test_infers_the_minus_one_degree() -> None:
    dims = ParallelDims.from_config(ParallelConfig(dp_shard=-1, tp=2), world_size=8)
    assert (dims.dp_replicate, dims.dp_shard, dims.tp, dims.pp) == (1, 4, 2, 1)
    assert dims.dp == 4 and dims.world_size == 8


def test_product_must_equal_world() -> None:
    with pytest.raises(ConfigError, match=r"needs a world size of 4 .* but the launch has 8"):
        ParallelDims.from_config(ParallelConfig(dp_shard=2, tp=2), world_size=8)
    with pytest.raises(ConfigError, match="cannot be inferred.*multiply to 3"):
        ParallelDims.from_config(ParallelConfig(dp_shard=-1, tp=3), world_size=8)


def test_cp_counts_in_the_world_size_and_refuses_ep() -> None:
    dims = ParallelDims.from_config(ParallelConfig(dp_shard=-1, cp=2, tp=2), world_size=8)
    assert (dims.dp_shard, dims.cp, dims.tp, dims.dp, dims.world_size) == (2, 2, 2, 2, 8)
    with pytest.raises(
        ConfigError, match=r"dp_shard 1 x cp 2 x tp 1 x pp 1\) but the launch has 4"
    ):
        ParallelDims.from_config(ParallelConfig(cp=2), world_size=4)
    with pytest.raises(ConfigError, match=r"parallel.ep \(2\) with parallel.cp \(2\)"):
        ParallelDims.from_config(ParallelConfig(dp_shard=2, ep=2, cp=2), world_size=4)


def test_batch_must_split_over_data_parallel_ranks_and_pipeline() -> None:
    cfg = load_config(None, ["--training.global_batch_size=8", "--training.micro_batch_size=4"])
    dims = ParallelDims.from_config(ParallelConfig(dp_shard=2), world_size=2)
    assert dims.check_batch(cfg.training, ParallelConfig(dp_shard=2)) == 1
    with pytest.raises(ConfigError, match="not a multiple"):
        ParallelDims.from_config(ParallelConfig(dp_shard=4), 4).check_batch(
            cfg.training, ParallelConfig(dp_shard=4)
        )
    three = ParallelConfig(pp=2, pp_microbatches=3)
    with pytest.raises(ConfigError, match=r"pp_microbatches \(3\) must divide"):
        ParallelDims.from_config(three, 2).check_batch(cfg.training, three)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["--parallel.tp=3", *UNTIED], r"parallel.tp \(3\) must divide model.n_heads \(8\)"),
        (["--parallel.tp=2"], "tie_embeddings = true cannot be combined"),
        (["--parallel.pp=8", *UNTIED], r"= 8 stages exceeds model.n_layers \(4\)"),
        (["--parallel.pp=2", "--parallel.pp_stages_per_rank=2", *UNTIED], "needs an interleaved"),
        (
            ["--parallel.pp=2", "--parallel.pp_schedule=zero_bubble", *UNTIED],
            "pp_stages_per_rank >= 2",
        ),
        (["--parallel.pp=2", "--parallel.pp_split_points=1,2", *UNTIED], "2 stages need 1"),
        (["--parallel.pp=2", "--parallel.pp_split_points=x", *UNTIED], "comma-separated"),
        (["--parallel.pp=2", "--parallel.pp_split_points=4", *UNTIED], "within"),
        (["--parallel.pp=2", "--data.cross_document_attention=false", *UNTIED], "document ids"),
        (["--parallel.cp=3"], r"data.seq_len \(256\) must be a multiple of 6; valid cp: \[1, 2, 4"),
        (["--parallel.cp=0"], "parallel.cp must be >= 1"),
        (
            ["--parallel.cp=8", "--parallel.tp=2", "--parallel.cp_mode=alltoall", *UNTIED],
            r"4 query heads \(model.n_heads 8 / parallel.tp 2\) over parallel.cp = 8",
        ),
        (
            ["--parallel.cp=3", "--parallel.cp_mode=alltoall", "--data.seq_len=252", *UNTIED],
            r"which must divide them; use parallel.cp_mode = 'ring' or cp in \[1, 2, 4, 8\]",
        ),
        (["--parallel.cp=2", "--parallel.engine=deepspeed"], r"parallel.cp must be 1 \(got 2\)"),
        (["--parallel.tp=-1", "--parallel.pp=-1"], "at most one"),
        (["--parallel.dp_shard=0"], "positive or -1"),
        (["--parallel.activation_checkpoint=some"], "valid: none, full, selective"),
        (["--parallel.activation_checkpoint=memory_budget"], "needs training.compile = true"),
        (
            ["--parallel.activation_memory_budget=1.5"],
            r"activation_memory_budget must be in \[0, 1\]",
        ),
    ],
)
def test_bad_layouts(overrides: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_cli_refuses_a_bad_layout_before_any_process_group(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path
) -> None:
    import numpy as np
    import torch.distributed as dist

    from distrib.data.shards import write_token_dataset

    data = write_token_dataset(
        tmp_path / "d", {"train": np.arange(2000) % 50, "val": np.arange(500) % 50}, 64, 0
    )
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    code = main(["train", f"--data.dir={data}", "--parallel.dp_shard=2", "--model.vocab_size=64"])
    assert code == 2
    assert "needs a world size of 2 (" in capsys.readouterr().err
    assert not dist.is_initialized()
