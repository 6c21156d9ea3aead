"""Growth operators on plain tensors keyed by the model's parameter names (FQNs).

Every weight of the grown model holds the old weight in the old slots (top-left, or at the heads'
planned positions) and fresh muP-initialised values elsewhere; Adam moments hold the old moments in
the same slots and zeros elsewhere. New layers are copies (or means) of their old neighbours after
those have been widened. Function preservation is the masks' job (teleflm.grow.masks), not the init's.
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


def new_layer_names(old_names: list[str], plan: GrowthPlan) -> dict[str, list[str]]:
    """Each new layer's parameter names -> the grown-model names of the parameters it is made from."""
    per_layer = sorted({m[2] for n in old_names if (m := _LAYER.match(n))})
    out = {}
    for pos, sources in zip(plan.new_layer_positions, plan.layer_sources, strict=True):
        for suffix in per_layer:
            out[f"model.layers.{pos}.{suffix}"] = [
                f"model.layers.{plan.old_layer_positions[s]}.{suffix}" for s in sources
            ]
    return out


@torch.no_grad()
def grow_weights(
    weights: dict[str, torch.Tensor], plan: GrowthPlan, config, hp: mup.MupHyperParams, seed: int
) -> dict[str, torch.Tensor]:
    """The grown model's weights (names of the grown model) from the old ones."""
    grown = {}
    for name, old in weights.items():
        new_name = renumber(name, plan)
        tensor = mup.initial_value(new_name, grown_shape(new_name, config), config, hp, seed).to(old.dtype)
        if name.endswith("lm_head.weight"):
            old = old * plan.readout_rescale
        grown[new_name] = place(old, tensor, slot_maps(name, plan))
    for name, sources in new_layer_names(list(weights), plan).items():
        grown[name] = torch.stack([grown[s] for s in sources]).mean(0)
    return grown


@torch.no_grad()
def grow_adam_state(
    state: dict[str, torch.Tensor], plan: GrowthPlan, config, old_width_mult: float, new_width_mult: float
) -> dict[str, object]:
    """Flattened AdamW state (`state.<fqn>.<key>`, `param_groups.<fqn>.<key>`) for the grown model.

    Moments: old slots kept, new entries zero; new layers start with zero moments and their source's
    step count. The readout's moments follow its rescale (W' = cW has gradient g / c). Matrix groups'
    learning rates and weight decay follow the new width (lr / width_mult, wd x width_mult)."""
    by_name: dict[str, dict[tuple[str, str], object]] = {}
    for key, value in state.items():
        kind, name, field = _ADAM_KEY.match(key).groups()
        by_name.setdefault(name, {})[kind, field] = value
    grown: dict[str, dict[tuple[str, str], object]] = {}
    for name, entries in by_name.items():
        is_matrix = entries.get(("param_groups", "mup_class")) == mup.MATRIX
        out = {}
        for (kind, field), value in entries.items():
            if kind == "state" and field in ("exp_avg", "exp_avg_sq"):
                if name.endswith("lm_head.weight"):
                    value = value / plan.readout_rescale ** (1 if field == "exp_avg" else 2)
                zeros = torch.zeros(grown_shape(renumber(name, plan), config), dtype=value.dtype)
                value = place(value, zeros, slot_maps(name, plan))
            elif kind == "param_groups" and is_matrix and field in ("lr", "base_lr"):
                value = value * old_width_mult / new_width_mult
            elif kind == "param_groups" and is_matrix and field == "weight_decay":
                value = value * new_width_mult / old_width_mult
            out[kind, field] = _copy(value)  # never an alias of the source optimizer's state
        grown[renumber(name, plan)] = out
    for name, sources in new_layer_names(list(by_name), plan).items():
        grown[name] = {
            (kind, field): torch.zeros_like(v) if kind == "state" and field != "step" else _copy(v)
            for (kind, field), v in grown[sources[0]].items()
        }
    return {
        f"{kind}.{name}.{field}": v for name, entries in grown.items() for (kind, field), v in entries.items()
    }


def _copy(value):
    return value.clone() if isinstance(value, torch.Tensor) else value
