"""The devices the planner knows (`devices.toml` beside this file, extended by a user's file)."""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from pathlib import Path

from distrib.errors import ConfigError

BUILTIN = Path(__file__).with_name("devices.toml")


@dataclass(frozen=True)
class Device:
    """One accelerator and its node's links; see devices.toml for each field."""

    key: str
    name: str
    memory_gb: float
    peak_bf16_tflops: float
    peak_fp32_tflops: float
    peak_fp8_tflops: float
    hbm_gbps: float
    intra_node_gbps: float
    inter_node_gbps: float
    gpus_per_node: int
    host_link_gbps: float
    host_memory_gbps: float
    reserved_gb: float
    matmul_efficiency: float
    float8_efficiency: float
    comm_efficiency: float
    comm_overlap: float

    def peak_tflops(self, dtype: str) -> float:
        """The dense peak for the compute dtype ("bfloat16", "float32", "float8")."""
        return {
            "bfloat16": self.peak_bf16_tflops,
            "float32": self.peak_fp32_tflops,
            "float8": self.peak_fp8_tflops,
        }[dtype]


_FIELDS = {f.name for f in dataclasses.fields(Device)} - {"key"}


def load_devices(extra: Path | None = None) -> dict[str, Device]:
    """The built-in devices, with `extra`'s tables added (a key already known is replaced
    whole). Every table must have every field; a missing or unknown one is named."""
    tables = tomllib.loads(BUILTIN.read_text())
    sources = {key: BUILTIN for key in tables}
    if extra is not None:
        if not extra.is_file():
            raise ConfigError(f"--devices: no such file: {extra}")
        try:
            theirs = tomllib.loads(extra.read_text())
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"--devices {extra}: not valid TOML: {err}") from None
        tables.update(theirs)
        sources.update({key: extra for key in theirs})
    devices = {}
    for key, table in tables.items():
        missing, unknown = _FIELDS - set(table), set(table) - _FIELDS
        if missing or unknown:
            raise ConfigError(
                f"{sources[key]}: device [{key}] "
                + (f"lacks {sorted(missing)}" if missing else f"has unknown keys {sorted(unknown)}")
                + f"; a device has exactly {sorted(_FIELDS)}"
            )
        devices[key] = Device(key=key, **table)
    return devices


def find_device(key: str, devices: dict[str, Device], memory_gb: float = 0.0) -> Device:
    """The device `key` (as given to --gpu), its memory replaced by `memory_gb` when > 0."""
    if key not in devices:
        raise ConfigError(
            f"--gpu {key}: unknown device; known: {', '.join(sorted(devices))} "
            "(add one with --devices FILE, see distrib/planning/devices.toml)"
        )
    device = devices[key]
    return dataclasses.replace(device, memory_gb=memory_gb) if memory_gb > 0 else device
