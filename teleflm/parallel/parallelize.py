"""Parallelism on PyTorch's own stack, applied to an unmodified Tele-FLM model in one place.

One device mesh (pp x dp_replicate x dp_shard x tp). `pipeline_split` keeps a pipeline stage's
share of the layers; `parallelize` then applies tensor parallel, activation checkpointing, compile
and FSDP2, in that order (the torchtitan order). Parameter names (FQNs) stay those of the full model,
so `torch.distributed.checkpoint` reshards between any two layouts.
"""

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from teleflm import mup
from teleflm.model.modeling_teleflm import TeleFLMForCausalLM, TeleFLMRotaryEmbedding

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


class PipelineStageModule(nn.Module):
    """One pipeline stage of a Tele-FLM model: embedding on the first stage (with muP's input_mult,
    applied there only), a contiguous run of layers, and norm + readout on the last. Holds the model's
    own submodules under their own names, so parameter FQNs equal the full model's."""

    def __init__(self, model: TeleFLMForCausalLM, first: int, last: int, num_stages: int, stage: int):
        super().__init__()
        self.config = model.config
        self.is_first, self.is_last = stage == 0, stage == num_stages - 1
        inner = model.model
        inner.layers = nn.ModuleDict({str(i): inner.layers[i] for i in range(first, last)})
        if not self.is_first:
            inner.embed_tokens = None
        if not self.is_last:
            inner.norm = None
        self.model = inner
        self.lm_head = model.lm_head if self.is_last else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.model.embed(x) if self.is_first else x
        positions = torch.arange(h.shape[1], device=h.device)[None].expand(h.shape[0], -1)
        rope = self.model.rotary_emb(h, positions)
        for layer in self.model.layers.values():
            h = layer(h, rope, None)
        if not self.is_last:
            return h
        logits = self.lm_head(self.model.norm(h))
        return logits * self.config.logit_scale if self.config.use_mup else logits


def pipeline_split(model: TeleFLMForCausalLM, pp_rank: int, pp: int) -> PipelineStageModule:
    layers = model.config.num_hidden_layers
    per_stage = layers // pp
    return PipelineStageModule(model, pp_rank * per_stage, (pp_rank + 1) * per_stage, pp, pp_rank)


def decoder_layers(module: nn.Module) -> nn.Module:
    """The container of decoder layers (ModuleList, or ModuleDict in a pipeline stage)."""
    return module.model.layers


def apply_tp(module: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Megatron-style tensor parallel: q/k/v and gate/up split by columns (heads, FFN units), o and
    down by rows; the embedding split by vocabulary rows and the readout by vocabulary columns, with
    replicated activations between blocks."""
    top = {}
    if module.model.embed_tokens is not None:
        top["model.embed_tokens"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
    if module.lm_head is not None:
        top["lm_head"] = ColwiseParallel(output_layouts=Replicate())
    parallelize_module(module, tp_mesh, top)
    block_plan = {
        "self_attn.q_proj": ColwiseParallel(),
        "self_attn.k_proj": ColwiseParallel(),
        "self_attn.v_proj": ColwiseParallel(),
        "self_attn.o_proj": RowwiseParallel(),
        "mlp.gate_proj": ColwiseParallel(),
        "mlp.up_proj": ColwiseParallel(),
        "mlp.down_proj": RowwiseParallel(),
    }
    for layer in decoder_layers(module).children():
        parallelize_module(layer, tp_mesh, block_plan)


def apply_ac(module: nn.Module) -> None:
    """Full activation checkpointing per decoder layer."""
    layers = decoder_layers(module)
    for name, layer in list(layers.named_children()):
        layers.register_module(name, checkpoint_wrapper(layer, preserve_rng_state=False))


def apply_compile(module: nn.Module, fullgraph: bool = True) -> None:
    """Compile each decoder layer in place (names unchanged; repeated blocks share one graph)."""
    for layer in decoder_layers(module).children():
        layer.compile(fullgraph=fullgraph)


def apply_fsdp(module: nn.Module, mesh: DeviceMesh, mixed_precision: str) -> None:
    dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float32
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for layer in decoder_layers(module).children():
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    # Root: embedding, final norm and readout, in one group each way (they run at the ends).
    fully_shard(module, mesh=mesh, mp_policy=policy, reshard_after_forward=False)


def parallelize(
    module: nn.Module, mesh: DeviceMesh | None, dims: ParallelDims, cfg, fullgraph: bool = True
) -> nn.Module:
    """TP, then activation checkpointing, then compile, then FSDP (cfg: the [parallel] section).
    `fullgraph=False` lets a compiled layer break its graph (document attention on CPU slices by data)."""
    if dims.tp > 1:
        apply_tp(module, mesh["tp"])
    if cfg.activation_checkpointing:
        apply_ac(module)
    if cfg.compile:
        apply_compile(module, fullgraph)
    if dims.dp > 1:
        apply_fsdp(module, dp_mesh(mesh, dims), cfg.mixed_precision)
    return module


def build_module(
    model_config,
    mesh: DeviceMesh | None,
    dims: ParallelDims,
    cfg,
    device,
    model_class: type[nn.Module] = TeleFLMForCausalLM,
    fullgraph: bool = True,
) -> nn.Module:
    """This rank's part of a `model_class` under a layout (cfg: the [parallel] section): built on the
    meta device, its pipeline stage kept, parallelized (`fullgraph`: see `parallelize`), then allocated
    on `device` with its values uninitialised (on the meta device it stays a shape: shards without
    memory)."""
    with torch.device("meta"):
        model = model_class(model_config)
    pp_rank = mesh["pp"].get_local_rank() if mesh is not None else 0
    module = pipeline_split(model, pp_rank, dims.pp) if dims.pp > 1 else model
    module = parallelize(module, mesh, dims, cfg, fullgraph=fullgraph)
    return module if torch.device(device).type == "meta" else module.to_empty(device=device)


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


@torch.no_grad()
def init_weights(module: nn.Module, config, hp: mup.MupHyperParams, seed: int) -> None:
    """Initialise by the muP rules, every row of a parameter from its own generator seeded by the
    parameter's name and the row: every layout (one process, FSDP, TP, a pipeline stage) gets the
    very same values as the unsharded model, and each rank draws only its own shard's rows (no
    communication, no full tensor)."""
    for name, p in module.named_parameters():
        local, region = local_region(p)
        if local.numel():
            rows = range(region[0].start, region[0].stop)
            local.copy_(mup.initial_value(model_fqn(name), p.shape, config, hp, seed, rows)[:, *region[1:]])
    # Non-persistent buffers (RoPE frequencies) are not parameters: recompute them on the device.
    for m in module.modules():
        if isinstance(m, TeleFLMRotaryEmbedding):
            m.inv_freq.copy_(TeleFLMRotaryEmbedding(config).inv_freq)
