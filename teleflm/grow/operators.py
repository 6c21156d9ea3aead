"""Growth operators, keyed by the model's parameter names (FQNs).

Every weight of the grown model holds the old weight in the old slots (top-left, or at the heads'
planned positions) and fresh muP-initialised values elsewhere; Adam moments hold the old moments in
the same slots and zeros elsewhere. New layers are copies (or means) of their old neighbours after
those have been widened. Function preservation is the masks' job (teleflm.grow.masks), not the init's.

One function computes any rectangular region of any grown tensor (`grown_region`) from the parts of
the old tensors that land in it, so a rank builds its own shards of the grown model and optimizer
reading only those parts (teleflm.train.growth); `grow_weights` and `grow_adam_state` apply it to
whole tensors in memory.
"""

import re

import torch

from teleflm import mup
from teleflm.grow.plan import GrowthPlan

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_ADAM_KEY = re.compile(r"^(state|param_groups)\.(.+\.(?:weight|bias))\.(\w+)$")  # flattened AdamW state


def _arange(n: int) -> torch.Tensor:
    return torch.arange(n)


def _leaf(name: str) -> str:
    """The module of a parameter: `q_proj` of `model.layers.0.self_attn.q_proj.weight`."""
    return name.rsplit(".", 2)[-2]


def slot_maps(name: str, plan: GrowthPlan) -> tuple[torch.Tensor, ...]:
    """For each dim of parameter `name`, the grown-model indices that its old entries move to (a
    bias moves with its weight's rows)."""
    if name.endswith(".bias"):
        return slot_maps(name.removesuffix(".bias") + ".weight", plan)[:1]
    hidden, ffn = _arange(plan.old_hidden), _arange(plan.old_ffn)
    hd = plan.head_dim
    q_rows = torch.cat([torch.arange(p * hd, (p + 1) * hd) for p in plan.q_head_positions])
    kv_rows = _arange(plan.old_kv_heads * hd)
    leaf = _leaf(name)
    if name.endswith("norm.weight"):
        return (hidden,)
    if leaf in ("embed_tokens", "lm_head"):
        return (None, hidden)  # None: every row (vocabulary) is old
    return {
        "q_proj": (q_rows, hidden),
        "k_proj": (kv_rows, hidden),
        "v_proj": (kv_rows, hidden),
        "o_proj": (hidden, q_rows),
        "gate_proj": (ffn, hidden),
        "up_proj": (ffn, hidden),
        "down_proj": (hidden, ffn),
    }[leaf]


def place(old: torch.Tensor, grown: torch.Tensor, maps: tuple) -> torch.Tensor:
    """Write `old` into `grown` at the slots `maps` names (in place; returns `grown`)."""
    index = tuple(
        (m if m is not None else _arange(n)).view([-1 if d == i else 1 for d in range(old.dim())])
        for i, (m, n) in enumerate(zip(maps, old.shape, strict=True))
    )
    grown[index] = old
    return grown


def grown_shape(name: str, config) -> torch.Size:
    if name.endswith(".bias"):
        return grown_shape(name.removesuffix(".bias") + ".weight", config)[:1]
    c = config
    hd = c.head_dim
    leaf = _leaf(name)
    if name.endswith("norm.weight"):
        return torch.Size([c.hidden_size])
    return torch.Size(
        {
            "embed_tokens": (c.vocab_size, c.hidden_size),
            "lm_head": (c.vocab_size, c.hidden_size),
            "q_proj": (c.num_attention_heads * hd, c.hidden_size),
            "k_proj": (c.num_key_value_heads * hd, c.hidden_size),
            "v_proj": (c.num_key_value_heads * hd, c.hidden_size),
            "o_proj": (c.hidden_size, c.num_attention_heads * hd),
            "gate_proj": (c.intermediate_size, c.hidden_size),
            "up_proj": (c.intermediate_size, c.hidden_size),
            "down_proj": (c.hidden_size, c.intermediate_size),
        }[leaf]
    )


def renumber(name: str, plan: GrowthPlan) -> str:
    """The grown-model name of old parameter `name` (old layers move to their new positions)."""
    m = _LAYER.match(name)
    return name if m is None else f"model.layers.{plan.old_layer_positions[int(m[1])]}.{m[2]}"


def old_name_of(new_name: str, plan: GrowthPlan) -> str | None:
    """The old parameter grown parameter `new_name` is made from; None in a new layer."""
    m = _LAYER.match(new_name)
    if m is None:
        return new_name
    position = int(m[1])
    if position not in plan.old_layer_positions:
        return None
    return f"model.layers.{plan.old_layer_positions.index(position)}.{m[2]}"


def layer_sources(new_name: str, plan: GrowthPlan) -> list[str]:
    """The grown-model parameters a new layer's parameter is the mean of (its neighbours, widened)."""
    m = _LAYER.match(new_name)
    k = plan.new_layer_positions.index(int(m[1]))
    return [f"model.layers.{plan.old_layer_positions[s]}.{m[2]}" for s in plan.layer_sources[k]]


def grown_names(old_names: list[str], plan: GrowthPlan) -> list[str]:
    """Every parameter of the grown model: the old ones renamed, then the new layers'."""
    per_layer = sorted({m[2] for n in old_names if (m := _LAYER.match(n))})
    new = [f"model.layers.{pos}.{suffix}" for pos in plan.new_layer_positions for suffix in per_layer]
    return [renumber(n, plan) for n in old_names] + new


def old_part(old_name: str, region: tuple[slice, ...], plan: GrowthPlan):
    """The old entries of `old_name` that land in `region` (slices of the grown tensor): (their
    slices of the old tensor, their positions within the region, per dim); None if none do. Slot
    maps increase, so the old entries landing in a range of grown indices are a range too."""
    old_index, positions = [], []
    for m, r in zip(slot_maps(old_name, plan), region, strict=True):
        if m is None:  # every old index keeps its place (the vocabulary)
            j0, j1, dest = r.start, r.stop, torch.arange(r.stop - r.start)
        else:
            j0, j1 = int(torch.searchsorted(m, r.start)), int(torch.searchsorted(m, r.stop))
            dest = m[j0:j1] - r.start
        if j1 <= j0:
            return None
        old_index.append(slice(j0, j1))
        positions.append(dest)
    return tuple(old_index), tuple(positions)


# The readout's rescale W' = cW acts on its moments as g' = g / c does: exp_avg / c, exp_avg_sq / c^2.
_RESCALE_POWER = {"param": 1, "exp_avg": -1, "exp_avg_sq": -2}


@torch.no_grad()
def grown_region(
    new_name: str, kind: str, region: tuple[slice, ...], plan: GrowthPlan, config, hp, seed: int, read
) -> torch.Tensor:
    """`region` (one slice per dim) of grown tensor `kind` ("param", "exp_avg", "exp_avg_sq") of
    parameter `new_name` (fp32); `read(old_name, kind, slices)` gives a part of an old tensor.
    Weights: fresh muP values (drawn for the region's rows only) with the old weight in its slots;
    moments: zeros with the old moments in their slots; a new layer: the mean of its sources' grown
    weights, zero moments."""
    old_name = old_name_of(new_name, plan)
    shape = [r.stop - r.start for r in region]
    if old_name is None:
        if kind != "param":
            return torch.zeros(shape)
        sources = [
            grown_region(s, kind, region, plan, config, hp, seed, read) for s in layer_sources(new_name, plan)
        ]
        return torch.stack(sources).mean(0)
    if kind == "param":
        rows = range(region[0].start, region[0].stop)
        out = mup.initial_value(new_name, grown_shape(new_name, config), config, hp, seed, rows)[
            :, *region[1:]
        ]
    else:
        out = torch.zeros(shape)
    part = old_part(old_name, region, plan)
    if part is None:
        return out
    old_index, positions = part
    old = read(old_name, kind, old_index).float()
    if new_name.endswith("lm_head.weight"):
        old = old * plan.readout_rescale ** _RESCALE_POWER[kind]
    return place(old, out, positions)


def _whole(shape) -> tuple[slice, ...]:
    return tuple(slice(0, n) for n in shape)


def grow_weights(
    weights: dict[str, torch.Tensor], plan: GrowthPlan, config, hp: mup.MupHyperParams, seed: int
) -> dict[str, torch.Tensor]:
    """The grown model's weights (names of the grown model) from the old ones, in memory."""

    def read(name, kind, index):
        return weights[name][index]

    return {
        name: grown_region(name, "param", _whole(grown_shape(name, config)), plan, config, hp, seed, read)
        for name in grown_names(list(weights), plan)
    }


def group_value(field: str, value, is_matrix: bool, old_width_mult: float, new_width_mult: float):
    """A parameter group's setting after growth: matrices' learning rates follow the new width
    (lr / width_mult) and their weight decay too (wd x width_mult); the rest is kept."""
    if is_matrix and field in ("lr", "base_lr"):
        return value * old_width_mult / new_width_mult
    if is_matrix and field == "weight_decay":
        return value * new_width_mult / old_width_mult
    return value


def grow_adam_state(
    state: dict[str, torch.Tensor], plan: GrowthPlan, config, old_width_mult: float, new_width_mult: float
) -> dict[str, object]:
    """Flattened AdamW state (`state.<fqn>.<key>`, `param_groups.<fqn>.<key>`) for the grown model,
    in memory: moments by `grown_region`, step counts kept (a new layer takes its source's), group
    settings by `group_value`. Nothing aliases the source optimizer's tensors."""
    by_name: dict[str, dict[tuple[str, str], object]] = {}
    for key, value in state.items():
        kind, name, field = _ADAM_KEY.match(key).groups()
        by_name.setdefault(name, {})[kind, field] = value

    def read(name, kind, index):
        return by_name[name]["state", kind][index]

    out = {}
    for new_name in grown_names(list(by_name), plan):
        source = old_name_of(new_name, plan) or old_name_of(layer_sources(new_name, plan)[0], plan)
        entries = by_name[source]
        is_matrix = entries.get(("param_groups", "mup_class")) == mup.MATRIX
        for (kind, field), value in entries.items():
            if kind == "state" and field in ("exp_avg", "exp_avg_sq"):
                shape = grown_shape(new_name, config)
                value = grown_region(new_name, field, _whole(shape), plan, config, None, 0, read)
            elif kind == "param_groups":
                value = group_value(field, value, is_matrix, old_width_mult, new_width_mult)
            out[f"{kind}.{new_name}.{field}"] = value.clone() if isinstance(value, torch.Tensor) else value
    return out
