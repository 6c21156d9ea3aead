"""Where a run computes: the device and backend (chosen at run time), the process group, the device
mesh (pp x dp_replicate x dp_shard x tp) and a rank's coordinates in it, and how a sharded tensor's
local part maps to the full tensor."""

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

# Prefixes that wrappers add to parameter names; stripped to recover the model's own FQN.
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")


@dataclass(frozen=True)
class ParallelDims:
    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    pp: int = 1

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp

    def __str__(self) -> str:
        replicas = f" x HSDP {self.dp_replicate}" if self.dp_replicate > 1 else ""
        return f"TP {self.tp} / PP {self.pp} / DP {self.dp}{replicas}"


def device_and_backend() -> tuple[torch.device, str]:
    """CUDA with NCCL when there is a GPU, else CPU with gloo; chosen at run time."""
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank), dist.Backend.NCCL
    return torch.device("cpu"), dist.Backend.GLOO


def init_distributed(timeout_s: int = 1800) -> torch.device:
    """Under torchrun (WORLD_SIZE > 1) join the process group, unless already in one, with collectives
    that fail after `timeout_s` instead of waiting for ever; returns this process's device."""
    device, backend = device_and_backend()
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return device


def build_mesh(dims: ParallelDims, device) -> DeviceMesh | None:
    """The device mesh of a layout (None in one process); a meta-device model (a simulation, no
    memory) has its mesh on the CPU."""
    if dims.world_size == 1:
        return None
    device = torch.device(device)
    return init_device_mesh(
        "cpu" if device.type == "meta" else device.type,
        (dims.pp, dims.dp_replicate, dims.dp_shard, dims.tp),
        mesh_dim_names=("pp", "dp_replicate", "dp_shard", "tp"),
    )


def dp_mesh(mesh: DeviceMesh, dims: ParallelDims) -> DeviceMesh:
    """The data-parallel sub-mesh: 1-D for FSDP, 2-D (replicate, shard) for HSDP."""
    if dims.dp_replicate > 1:
        return mesh["dp_replicate", "dp_shard"]
    return mesh["dp_shard"]


def dp_rank(mesh: DeviceMesh | None, dims: ParallelDims) -> int:
    if mesh is None:
        return 0
    return mesh["dp_replicate"].get_local_rank() * dims.dp_shard + mesh["dp_shard"].get_local_rank()


def model_fqn(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def local_region(p: torch.Tensor) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """(this rank's local tensor of `p`, the slices of the full tensor it holds): a DTensor's shard
    (FSDP, TP or both), or the whole of a plain tensor."""
    if not isinstance(p, DTensor):
        return p, tuple(slice(0, n) for n in p.shape)
    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return p.to_local(), tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True))
