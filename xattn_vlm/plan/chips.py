"""The accelerators plans are made for, and the trainer's MFU is quoted against.

Per chip: HBM, dense bf16 peak, HBM bandwidth, the bandwidth its collectives get inside a TPU
slice or a GPU node (ICI, NVLink) and, for GPUs, between nodes; and its TensorCores (a JAX
device may be one core of a chip: TPU v4 without megacore).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  """An accelerator chip: HBM, dense bf16 peak, HBM bandwidth, the bandwidth its collectives get
  inside a TPU slice or a GPU node (ICI, NVLink) and, for GPUs, between nodes, all per chip; and
  its TensorCores (a JAX device may be one core of a chip: TPU v4 without megacore)."""
  name: str
  hbm_bytes: float
  peak_flops: float
  hbm_bandwidth: float
  interconnect: float
  network: float | None = None  # None: the interconnect spans the whole slice (TPU)
  cores: int = 1


# Keyed by JAX's ``device_kind``: the per-chip figures of the Cloud TPU documentation (ICI: the
# chip's total interchip bandwidth).
TPU_CHIPS = {
    "TPU v4": Chip("TPU v4", 32 * GiB, 275e12, 1.2e12, 300e9, cores=2),
    "TPU v5 lite": Chip("TPU v5e", 16 * GiB, 197e12, 0.819e12, 200e9),
    "TPU v5": Chip("TPU v5p", 95 * GiB, 459e12, 2.765e12, 600e9, cores=2),
    "TPU v6 lite": Chip("TPU v6e", 32 * GiB, 918e12, 1.64e12, 448e9),
}
# NVIDIA data sheets (SXM parts, dense bf16; NVLink one direction), 8 GPUs per node, and one
# InfiniBand NIC per GPU between nodes (NDR 400 Gb/s; HDR 200 Gb/s for A100).
GPU_CHIPS = {
    "A100": Chip("A100 80GB", 80e9, 312e12, 2.039e12, 300e9, network=25e9),
    "H100": Chip("H100", 80e9, 989e12, 3.35e12, 450e9, network=50e9),
    "H200": Chip("H200", 141e9, 989e12, 4.8e12, 450e9, network=50e9),
}
GPUS_PER_NODE = 8


def bandwidth(chip: Chip, mesh_shape: Mapping[str, int]) -> float:
  """Bytes/s per chip for FSDP's collectives: the slice's ICI on TPU; on GPU, NVLink while the
  fsdp and tensor axes fit in one node, the inter-node network once they do not."""
  if chip.network is None or mesh_shape["fsdp"] * mesh_shape["tensor"] <= GPUS_PER_NODE:
    return chip.interconnect
  return chip.network
