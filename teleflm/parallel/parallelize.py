"""Parallelism on PyTorch's own stack, applied to an unmodified Tele-FLM model in one place.

`parallelize` applies tensor parallel, activation checkpointing, compile and FSDP2, in that order (the
torchtitan order), each an `apply_*` step; `build_module` makes a rank's part of a model under a
layout (its pipeline stage kept first, teleflm.parallel.pipeline). Parameter names (FQNs) stay those of
the full model, so `torch.distributed.checkpoint` reshards between any two layouts.
"""

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from teleflm.model.modeling_teleflm import TeleFLMForCausalLM
from teleflm.parallel.mesh import ParallelDims, dp_mesh
from teleflm.parallel.pipeline import pipeline_split


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
