"""`teleflm plan --simulate`: a run's layout at its full world size, through the real code, on one CPU.

For each chosen rank, PyTorch's fake process-group backend makes this one process that rank of a
world of any size; the model is built on the meta device (shapes, no memory) and the real
`build_module` (pipeline split, tensor parallel, activation checkpointing, FSDP2) shards it as
training would. Per rank it reports what the local shards hold: fp32 master weights (FSDP2's padded
shard), gradients of the same size, AdamW's two moments; beside the planner's figures for that
rank's pipeline stage (`plan.stage_memory`) and the planner's activation estimate. For a `[[growth]]`
schedule it does so for every stage, and for every growth the per-rank peak of building the grown
shards (teleflm.train.growth): the grown model on the growth's own layout, the parts of the old
tensors those shards read (counted by the growth's own code), and the fresh rows drawn at once.
"""

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

from teleflm.model.size import parameter_counts
from teleflm.parallel.mesh import ParallelDims, build_mesh, local_region, model_fqn
from teleflm.parallel.parallelize import build_module
from teleflm.plan.estimate import GIB, growth_shards_per_device, stage_memory
from teleflm.train.config import dp_shard_degree


@contextlib.contextmanager
def fake_rank(rank: int, world_size: int):
    """This process as rank `rank` of a world of `world_size`, on PyTorch's fake backend (collectives
    return at once; nothing leaves the process)."""
    from torch.distributed.tensor.debug import _clear_sharding_prop_cache
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", rank=rank, world_size=world_size, store=FakeStore())
    try:
        yield
    finally:
        dist.destroy_process_group()
        # DTensor's sharding propagation caches results by spec, and a mesh of the same shape from
        # another rank compares equal: without this the next rank's shards would carry this rank's
        # mesh coordinates.
        _clear_sharding_prop_cache()


def default_ranks(world_size: int, dims: ParallelDims) -> list[int]:
    """The first rank (first pipeline stage), the last (last stage) and one in the middle of the
    world, off the edges of the mesh."""
    return sorted({0, min(world_size // 2 + dims.tp + 1, world_size - 1), world_size - 1})


def shard_bytes(p: torch.Tensor) -> int:
    """Bytes of a parameter's local storage: FSDP2 pads every rank's shard to the largest."""
    local = local_region(p)[0]
    return local.untyped_storage().nbytes() if local.is_meta else local.numel() * local.element_size()


@dataclass
class RankReport:
    rank: int
    coords: dict[str, int]  # the rank's place in the mesh
    simulated: dict[str, float]  # bytes: weights, gradients, optimizer (from the local shards)
    planned: dict[str, float]  # the planner's figures for the rank's stage (stage_memory)


def simulate_rank(cfg, world_size: int, rank: int) -> RankReport:
    c, p = cfg.model_config(), cfg.parallel
    dims = ParallelDims(p.dp_replicate, dp_shard_degree(cfg, world_size), p.tp, p.pp)
    with fake_rank(rank, world_size):
        mesh = build_mesh(dims, "meta")
        module = build_module(c, mesh, dims, p, "meta")
        assert all(q.is_meta for q in module.parameters())  # shapes only: nothing is allocated
        coords = (
            {name: mesh[name].get_local_rank() for name in mesh.mesh_dim_names} if mesh is not None else {}
        )
        weights = sum(shard_bytes(q) for q in module.parameters())
        moments = sum(8 * local_region(q)[0].numel() for q in module.parameters())
    pp_rank = coords.get("pp", 0)
    planned = stage_memory(
        c,
        dims,
        cfg.data.context_length,
        cfg.batch.micro_batch_size,
        p.activation_checkpointing,
        p.mixed_precision,
        first=pp_rank == 0,
        last=pp_rank == dims.pp - 1,
        micro_batches=cfg.micro_batches_per_step(dims.dp),
    )
    simulated = {"weights": weights, "gradients": weights, "optimizer": moments}
    return RankReport(rank, coords, simulated, planned)


def simulate_growth(old_cfg, new_cfg, growth, world_size: int, rank: int) -> dict[str, float]:
    """One rank's bytes while it builds its shards of the grown model (teleflm.train.growth): the
    grown weights and moments, the old parts they read (fp32), the fresh rows of one parameter."""
    from teleflm.grow.plan import make_plan
    from teleflm.train.growth import KINDS, growth_module, parts_read

    _, plan = make_plan(old_cfg.model_config(), new_cfg.model, growth.layers_at, growth.layer_init)
    c = new_cfg.model_config()
    with fake_rank(rank, world_size):
        module = growth_module(c, world_size, "meta")
        shards, read, drawn = 0, {}, 0
        for name, q in module.named_parameters():
            region = local_region(q)[1]
            shards += shard_bytes(q) + 8 * local_region(q)[0].numel()
            drawn = max(drawn, (region[0].stop - region[0].start) * q.shape[1:].numel())
            for kind in KINDS:
                read.update(dict.fromkeys(parts_read(model_fqn(name), kind, region, plan)))
    parts = sum(4 * torch.Size(b - a for a, b in spans).numel() for _, _, spans in read)
    return {
        "grown_shards": shards,
        "planned_grown_shards": growth_shards_per_device(c, world_size),
        "old_parts": parts,
        "fresh_rows": 4 * drawn,
        "peak": shards + parts + 4 * drawn,
    }


def planner_gaps(reports: list[RankReport]) -> dict[str, float]:
    """Per figure, the largest relative gap between the planner and the largest simulated shard of
    the same pipeline stage among `reports` (the planner gives the busiest rank; ranks whose FSDP
    shards of small tensors are empty hold less)."""
    gaps = {}
    for stage in {r.coords.get("pp", 0) for r in reports}:
        group = [r for r in reports if r.coords.get("pp", 0) == stage]
        for k in group[0].simulated:
            largest = max(r.simulated[k] for r in group)
            gaps[k] = max(gaps.get(k, 0.0), abs(largest / group[0].planned[k] - 1))
    return gaps


def simulate(cfg, world_size: int, ranks: list[int] | None = None) -> list[dict]:
    """Every stage of the run (one without `[[growth]]`): its config's layout on `world_size` ranks,
    per chosen rank; and, for each growth, the chosen ranks' peak while growing into that stage."""
    from teleflm.train.config import stage_config

    stages = []
    for k in range(len(cfg.growth) + 1):
        stage_cfg = stage_config(cfg, k) if cfg.growth else cfg
        p = stage_cfg.parallel
        dims = ParallelDims(p.dp_replicate, dp_shard_degree(stage_cfg, world_size), p.tp, p.pp)
        chosen = ranks or default_ranks(world_size, dims)
        stage = {"stage": k, "config": stage_cfg, "layout": dims}
        stage["ranks"] = [simulate_rank(stage_cfg, world_size, r) for r in chosen]
        if k:
            previous, growth = stages[-1]["config"], cfg.growth[k - 1]
            stage["growth"] = {r: simulate_growth(previous, stage_cfg, growth, world_size, r) for r in chosen}
        stages.append(stage)
    return stages


def format_simulation(stages: list[dict], world_size: int) -> str:
    def gib(x):
        return f"{x / GIB:7.2f}"

    lines = []
    for s in stages:
        d, n = s["layout"], s["config"].model_config()
        title = f"stage {s['stage']}: " if len(stages) > 1 else ""
        lines.append(
            f"{title}{parameter_counts(n)['total'] / 1e9:.1f}B parameters, TP {d.tp} / PP {d.pp} / DP {d.dp} on "
            f"{world_size} fake ranks (meta tensors)"
        )
        lines.append(
            "  rank  (pp, dp, tp)    weights  gradients  optimizer   | planned: weights  optimizer  activations"
        )
        for r in s["ranks"]:
            where = (
                r.coords.get("pp", 0),
                r.coords.get("dp_replicate", 0) * d.dp_shard + r.coords.get("dp_shard", 0),
                r.coords.get("tp", 0),
            )
            lines.append(
                f"  {r.rank:>4}  {str(where):14s} {gib(r.simulated['weights'])}  {gib(r.simulated['gradients'])}    "
                f"{gib(r.simulated['optimizer'])}   |          {gib(r.planned['weights'])}    "
                f"{gib(r.planned['optimizer'])}      {gib(r.planned['activations'])}"
            )
        gaps = planner_gaps(s["ranks"])
        lines.append(
            "  planner vs the largest simulated shard of each stage: "
            + ", ".join(f"{k} {v:.1%}" for k, v in gaps.items())
        )
        for rank, g in s.get("growth", {}).items():
            lines.append(
                f"  growth into this stage, rank {rank}: grown shards {gib(g['grown_shards'])} (planned "
                f"{gib(g['planned_grown_shards'])}), old parts read {gib(g['old_parts'])}, fresh rows "
                f"{gib(g['fresh_rows'])} -> peak {gib(g['peak'])} GiB"
            )
    lines.append(
        "GiB per rank; weights and gradients fp32 (FSDP2's padded shards), optimizer AdamW's two fp32 moments."
    )
    return "\n".join(lines)
