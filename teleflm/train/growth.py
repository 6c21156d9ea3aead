"""Grow a training checkpoint into a new one that the trainer resumes from, sharded over every rank.

Every rank of the process group (one process without one) builds its own FSDP shards of the grown
model and its AdamW state, over all the ranks, and reads from the source checkpoint only the parts
of the old tensors that land in them (torch.distributed.checkpoint reads any region of a tensor
saved in any layout). No rank holds the whole model: per rank, the grown shards (12 bytes per
parameter / world size), the old parts they need (at most as much again) and, transiently, one
saved chunk of the source and the rows of one parameter being drawn. The growth is planned and
validated before anything is written; the result is written under a `.tmp` name and renamed when
every rank has finished, so a crash mid-growth leaves nothing that is loaded, and growing again
gives the same checkpoint. The source is never modified.
"""

import dataclasses
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from teleflm.grow.masks import GrowthMasks
from teleflm.grow.operators import grown_region, layer_sources, old_name_of, old_part
from teleflm.grow.plan import GrowthError, GrowthPlan, make_plan
from teleflm.model import TeleFLMConfig
from teleflm.train import checkpoint
from teleflm.train.checkpoint import read_state, verify

KINDS = ("param", "exp_avg", "exp_avg_sq")


def plan_for_checkpoint(
    source: Path, target_fields: dict, layers_at: list[int] | None = None, layer_init: str = "copy"
) -> tuple[TeleFLMConfig, GrowthPlan]:
    """Validate a growth of a checkpoint from its trainer.json alone (no tensors read)."""
    source = Path(source)
    state = read_state(source)
    ramp = state.get("growth_masks")
    if ramp and state["step"] - ramp["start_step"] < ramp["ramp_steps"]:
        raise GrowthError(
            f"{source} is in the middle of a growth ramp (step {state['step']}, ramp from step "
            f"{ramp['start_step']} over {ramp['ramp_steps']} steps); "
            "train past the ramp before growing again"
        )
    return make_plan(TeleFLMConfig.from_dict(state["model_config"]), target_fields, layers_at, layer_init)


class _RegionPlanner(DefaultLoadPlanner):
    """Reads given regions (offsets, buffer shape) of saved tensors into the buffers, whatever the
    layout they were saved in."""

    def __init__(self, regions: list[tuple[str, tuple[int, ...], torch.Tensor]]):
        super().__init__()
        self.regions = regions

    def create_local_plan(self) -> LoadPlan:
        items = []
        for i, (key, offsets, buffer) in enumerate(self.regions):
            chunk = ChunkStorageMetadata(torch.Size(offsets), buffer.shape)
            for item in create_read_items_for_chunk_list(
                key, self.metadata.state_dict_metadata[key], [chunk]
            ):
                # The request's number as the index: one key may be read in several regions.
                items.append(
                    dataclasses.replace(item, dest_index=MetadataIndex(key, item.dest_index.offset, i))
                )
        return LoadPlan(items)

    def resolve_tensor(self, read_item):
        buffer = self.regions[read_item.dest_index.index][2]
        return narrow_tensor_by_index(buffer, read_item.dest_offsets, read_item.lengths)


def _spans(index: tuple[slice, ...]) -> tuple[tuple[int, int], ...]:
    return tuple((s.start, s.stop) for s in index)


def parts_read(new_name: str, kind: str, region: tuple[slice, ...], plan: GrowthPlan) -> list[tuple]:
    """(old name, kind, old spans) of every old part `grown_region` reads for this region."""
    old_name = old_name_of(new_name, plan)
    if old_name is None:
        if kind != "param":
            return []
        return [r for s in layer_sources(new_name, plan) for r in parts_read(s, kind, region, plan)]
    part = old_part(old_name, region, plan)
    return [] if part is None else [(old_name, kind, _spans(part[0]))]


def read_parts(source: Path, parts: list[tuple]) -> dict[tuple, torch.Tensor]:
    """Each (old name, kind, spans) of checkpoint `source` as a tensor, kind "param" for a weight,
    else a field of its flattened AdamW state; read by this process alone."""
    metadata = FileSystemReader(str(source)).read_metadata().state_dict_metadata
    regions = []
    for old_name, kind, spans in parts:
        key = f"model.{old_name}" if kind == "param" else f"optim.state.{old_name}.{kind}"
        shape = [b - a for a, b in spans]
        regions.append(
            (key, tuple(a for a, _ in spans), torch.empty(shape, dtype=metadata[key].properties.dtype))
        )
    dcp.load({}, checkpoint_id=str(source), planner=_RegionPlanner(regions), no_dist=True)
    return {part: buffer for part, (_, _, buffer) in zip(parts, regions, strict=True)}


@torch.no_grad()
def fill_grown(
    module, optimizer, source: Path, plan: GrowthPlan, config: TeleFLMConfig, hp, seed: int
) -> dict[str, int]:
    """Set this rank's shards of `module` (the grown model, any layout) and `optimizer`'s AdamW
    state to the growth of checkpoint `source`. Returns this rank's element counts: its shards of
    the weights ("local"), the old parts it read ("read"), the most elements drawn at once for a
    parameter's fresh rows ("drawn")."""
    from teleflm.parallel.mesh import local_region, model_fqn

    jobs, wanted = [], {}
    for name, p in module.named_parameters():
        fqn = model_fqn(name)
        state = optimizer.state[p] = {"exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
        region = local_region(p)[1]
        # Step counts: a parameter's own, a new layer's from its source.
        counter = old_name_of(fqn, plan) or old_name_of(layer_sources(fqn, plan)[0], plan)
        wanted[counter, "step", ()] = None
        for kind in KINDS:
            wanted.update(dict.fromkeys(parts_read(fqn, kind, region, plan)))
        jobs.append((fqn, p, state, region, counter))
    parts = read_parts(source, list(wanted))

    def read(old_name, kind, index):
        return parts[old_name, kind, _spans(index)]

    counts = {"local": 0, "read": sum(t.numel() for t in parts.values()), "drawn": 0}
    for fqn, p, state, region, counter in jobs:
        state["step"] = parts[counter, "step", ()].clone().float()
        targets = {"param": p, **state}
        if not local_region(p)[0].numel():
            continue
        counts["local"] += local_region(p)[0].numel()
        counts["drawn"] = max(counts["drawn"], (region[0].stop - region[0].start) * p.shape[1:].numel())
        for kind in KINDS:
            local_region(targets[kind])[0].copy_(
                grown_region(fqn, kind, region, plan, config, hp, seed, read)
            )
    return counts


def growth_module(config: TeleFLMConfig, world_size: int, device):
    """This rank's part of the grown model in the growth's layout: plain FSDP over every rank, the
    fewest bytes per rank (the checkpoint it writes loads into any layout)."""
    from teleflm.parallel.mesh import ParallelDims, build_mesh
    from teleflm.parallel.parallelize import build_module
    from teleflm.train.config import ParallelSection

    dims = ParallelDims(dp_shard=world_size)
    layout = ParallelSection(dp_shard=world_size, mixed_precision="fp32")
    return build_module(config, build_mesh(dims, device), dims, layout, device)


def grow_checkpoint(
    source: Path,
    target: Path,
    cfg,
    ramp_steps: int,
    layers_at: list[int] | None = None,
    layer_init: str = "copy",
    seed: int = 0,
    growth_stage: int | None = None,
) -> tuple[Path, GrowthPlan, dict[str, int]]:
    """Write checkpoint `target`: `source` grown to the model shape of `cfg` (the grown run's
    TrainConfig: its [model] shape, [mup] for the new entries' init and learning rates, [optim]),
    masks starting their ramp at the source's step; sharded over every rank of the process group
    (call it on all of them). Every check runs before anything is written. Returns (target, plan,
    this rank's element counts from `fill_grown`)."""
    from teleflm.parallel.mesh import device_and_backend
    from teleflm.train.trainer import make_optimizer

    if ramp_steps < 1:
        raise GrowthError(f"ramp_steps must be >= 1, got {ramp_steps}")
    source, target = Path(source), Path(target)
    new_config, plan = plan_for_checkpoint(source, cfg.model, layers_at, layer_init)
    state = verify(source)  # every file whole before any rank reads its parts
    device, _ = device_and_backend()
    module = growth_module(new_config, dist.get_world_size() if dist.is_initialized() else 1, device)
    optimizer = make_optimizer(module, new_config, cfg)
    counts = fill_grown(module, optimizer, source, plan, new_config, cfg.mup, seed)
    masks = GrowthMasks(plan, start_step=state["step"], ramp_steps=ramp_steps)
    state = {**state, "model_config": new_config.to_diff_dict(), "growth_masks": masks.state_dict()}
    if growth_stage is not None:
        state["growth_stage"] = growth_stage
    checkpoint.write(target, module, optimizer, state)
    return target, plan, counts
