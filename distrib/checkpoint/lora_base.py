"""The frozen base of a LoRA run: which weights it is, recorded in every checkpoint's manifest and
checked wherever the run's adapters are put back on it.

A LoRA run's checkpoint holds only the adapters and their optimizer state (`lora.rank > 0`); the
base comes from `model.init_from` whenever the run is built (resume, `distrib generate`,
`distrib export`). Had those weights changed since (the HF folder overwritten by another model,
`run:DIR` now meaning a newer checkpoint of a run that went on), the adapters would silently sit
on other weights. So each manifest records the base's digest under "lora_base", and resuming and
loading the run refuse a base whose digest differs.

The digest: for `hf:PATH`, of the sha256 of each safetensors file and the index (hashed once when
the run starts, the files split over the ranks); for `run:DIR[@STEP]`, of the source checkpoint's
manifest, which already holds the sha256 of every file of that checkpoint.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from distrib.checkpoint import manifest
from distrib.config.rules import lora_targets
from distrib.errors import CheckpointError, ConfigError

BASE_KEY = "lora_base"
_NEW_RUN = (
    "start a new run folder (job.run_dir), or start over in this one with "
    "checkpoint.resume = never and job.overwrite = true"
)


def _source_checkpoint(spec: str) -> Path:
    # Sizes only: the weights were read from this checkpoint, checksums verified, just before.
    from distrib.checkpoint.init_from import parse_run_source
    from distrib.checkpoint.run import find_checkpoint

    run_dir, step = parse_run_source(spec)
    return find_checkpoint(run_dir, step, verify=False)


def base_files(spec: str) -> tuple[Path, list[str]]:
    """The folder and file names whose contents are the base weights `spec` names."""
    if spec.startswith("run:"):
        return _source_checkpoint(spec), [manifest.MANIFEST]
    folder = Path(spec.removeprefix("hf:")).expanduser().resolve()
    if not folder.is_dir():
        raise CheckpointError(f"model.init_from = '{spec}': {folder} is not a folder")
    names = sorted(
        p.name
        for p in folder.iterdir()
        if p.is_file()
        and (p.suffix == ".safetensors" or p.name.endswith(".safetensors.index.json"))
    )
    return folder, names


def base_digest(spec: str, collective: bool = True) -> dict[str, str]:
    """What identifies the base `spec` names: {"init_from", "source" (folder or checkpoint read),
    "sha256"}. With `collective` every rank calls this and each hashes a share of the files."""
    folder, names = base_files(spec)
    digests = manifest.hash_files(folder, names, collective)
    h = hashlib.sha256()
    for name in names:
        h.update(f"{name} {digests[name]}\n".encode())
    return {"init_from": spec, "source": str(folder), "sha256": h.hexdigest()}


def base_record(config: dict[str, Any]) -> dict[str, Any]:
    """The manifest entry of a run `config` (as `to_dict` writes it): its base's digest when it
    trains LoRA adapters, else nothing. Every rank calls this together."""
    if not int(config.get("lora", {}).get("rank", 0)):
        return {}
    return {BASE_KEY: base_digest(config["model"]["init_from"])}


def _lora_shape(config: dict[str, Any]) -> tuple[int, str]:
    """(rank, targets in canonical order) of a run config's adapters; (0, "") without."""
    lora = config.get("lora", {})
    rank = int(lora.get("rank", 0))
    return (rank, ",".join(lora_targets(str(lora.get("targets", ""))))) if rank else (0, "")


def check_lora_fits(path: Path, info: dict[str, Any]) -> None:
    """Refuse to resume from checkpoint `path` a run (`info`: its manifest entries, with the
    config) whose adapters differ from the checkpoint's (rank, targets, or LoRA on one side
    only), or whose base weights are not those the checkpoint's adapters were trained on."""
    if "config" not in info:
        return
    try:
        saved = manifest.read(path)
    except ValueError:
        return  # validation reports a damaged manifest
    theirs, ours = _lora_shape(saved.get("config", {})), _lora_shape(info["config"])
    if theirs != ours:
        raise CheckpointError(
            f"checkpoint {path} was written with lora.rank = {theirs[0]}"
            + (f", lora.targets = '{theirs[1]}'" if theirs[0] else "")
            + f"; this run has lora.rank = {ours[0]}"
            + (f", lora.targets = '{ours[1]}'" if ours[0] else "")
            + f": its weights do not fit this model; {_NEW_RUN}"
        )
    if ours[0]:
        check_same_base(path, saved.get(BASE_KEY), info.get(BASE_KEY))


def check_same_base(path: Path, saved: Any, ours: Any) -> None:
    """Refuse adapters of checkpoint `path` (trained on the base `saved`, its manifest entry) on
    the base `ours` (`base_digest` of the base at hand) if the two differ."""
    if not isinstance(saved, dict) or not isinstance(ours, dict):
        return  # a manifest without the entry: nothing to compare against
    if saved.get("sha256") == ours.get("sha256"):
        return
    raise CheckpointError(
        f"the LoRA adapters of checkpoint {path} were trained on other base weights: "
        f"model.init_from = '{saved.get('init_from')}' ({saved.get('source')}) had sha256 "
        f"{str(saved.get('sha256'))[:16]}..., but '{ours.get('init_from')}' "
        f"({ours.get('source')}) now has {str(ours.get('sha256'))[:16]}...; " + _pin_hint(saved)
    )


def _pin_hint(saved: dict[str, Any]) -> str:
    source = Path(str(saved.get("source", "")))
    if str(saved.get("init_from", "")).startswith("run:") and source.name.startswith("step-"):
        # <run_dir>/checkpoints/step-NNNNNNNN: the checkpoint the adapters were trained on.
        return (
            f"set model.init_from = 'run:{source.parent.parent}@{int(source.name[5:])}' to "
            "use the checkpoint they were trained on"
        )
    return "put the original base weights back"


def refuse_lora_source(spec: str) -> None:
    """Refuse `model.init_from = run:DIR` when that run trained LoRA adapters: its checkpoints
    hold only the adapters, not weights to start from (its config.json says; a run cannot
    change lora.rank on resume)."""
    from distrib.checkpoint.init_from import parse_run_source

    run_dir, _ = parse_run_source(spec)
    try:
        config = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        return  # loading the weights reports a run folder that is not one
    rank, _ = _lora_shape(config if isinstance(config, dict) else {})
    if rank:
        raise ConfigError(
            f"model.init_from = '{spec}': that run trained LoRA adapters (lora.rank = {rank}), "
            "so its checkpoints hold the adapters only; export it with the adapters merged "
            f"(distrib export --run_dir {run_dir} --format hf OUT) and start from "
            "model.init_from = 'hf:OUT'"
        )
