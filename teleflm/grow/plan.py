"""What a growth does, decided and checked before any tensor is touched.

`make_plan(source_config, target_fields, ...)` validates a target shape against the source and
returns the grown config and a `GrowthPlan`: where each old head and layer lands in the grown model,
which old layers each new layer is made from, and the readout rescale that keeps the muP logit scale
exact. The plan is plain data (JSON in checkpoints): operators and masks both read it.
"""

import math
from dataclasses import asdict, dataclass

from teleflm.model import TeleFLMConfig

# The config fields a growth may change; every other field must stay as it is.
SHAPE_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
)
LAYER_INITS = ("copy", "interpolate", "stack")


class GrowthError(ValueError):
    """A growth that cannot be done as asked; raised before anything is changed."""


@dataclass
class GrowthPlan:
    old_hidden: int
    new_hidden: int
    old_ffn: int
    new_ffn: int
    old_heads: int
    new_heads: int
    old_kv_heads: int
    new_kv_heads: int
    old_layers: int
    new_layers: int
    head_dim: int
    q_head_positions: list[int]  # grown-model position of old query head i
    old_layer_positions: list[int]  # grown-model position of old layer i
    new_layer_positions: list[int]  # grown-model positions of the new layers
    layer_sources: list[list[int]]  # old layers each new layer is copied (1) or averaged (2) from
    readout_rescale: float  # old logit scale / new: lm_head x this keeps the logits exact

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GrowthPlan":
        return cls(**d)

    @property
    def grows_hidden(self) -> bool:
        return self.new_hidden > self.old_hidden

    @property
    def grows_heads(self) -> bool:
        return self.new_heads > self.old_heads

    @property
    def grows_ffn(self) -> bool:
        return self.new_ffn > self.old_ffn


def target_config(source: TeleFLMConfig, target_fields: dict) -> TeleFLMConfig:
    """The grown config: the source's fields with the target's shape fields. `mup_scale_factor`
    follows the width (width_mult = hidden / proxy width); an explicit value must agree with that."""
    unknown = sorted(set(target_fields) - set(SHAPE_FIELDS) - {"mup_scale_factor"})
    changed = [k for k in unknown if target_fields[k] != getattr(source, k, None)]
    if changed:
        raise GrowthError(f"growth changes only {list(SHAPE_FIELDS)}; the target also changes {changed}")
    fields = source.to_dict()
    fields.update({k: target_fields[k] for k in SHAPE_FIELDS if k in target_fields})
    if (
        "num_key_value_heads" not in target_fields
        and source.num_key_value_heads == source.num_attention_heads
    ):
        fields["num_key_value_heads"] = fields["num_attention_heads"]  # multi-head stays multi-head
    for name in SHAPE_FIELDS:
        if fields[name] < getattr(source, name):
            raise GrowthError(
                f"target {name} ({fields[name]}) is smaller than the source's ({getattr(source, name)}): "
                "growth never shrinks a model"
            )
    hidden, heads, kv = fields["hidden_size"], fields["num_attention_heads"], fields["num_key_value_heads"]
    if hidden % heads:
        raise GrowthError(f"target num_attention_heads ({heads}) does not divide hidden_size ({hidden})")
    if hidden // heads != source.head_dim:
        raise GrowthError(
            f"target head_dim hidden_size / num_attention_heads = {hidden} / {heads} = {hidden // heads} "
            f"differs from the source's {source.head_dim}: grow the heads with the width"
        )
    if heads % kv:
        raise GrowthError(f"target num_key_value_heads ({kv}) does not divide num_attention_heads ({heads})")
    if heads // kv < source.num_attention_heads // source.num_key_value_heads:
        raise GrowthError(
            f"target has {heads // kv} query heads per kv head, fewer than the source's "
            f"{source.num_attention_heads // source.num_key_value_heads}: old query heads could not keep "
            "their kv head"
        )
    if source.use_mup:
        msf = source.mup_scale_factor * hidden / source.hidden_size
        given = target_fields.get("mup_scale_factor")
        if given is not None and not math.isclose(given, msf, rel_tol=1e-9):
            raise GrowthError(
                f"target mup_scale_factor {given} disagrees with the width: {source.mup_scale_factor} x "
                f"{hidden} / {source.hidden_size} = {msf} (leave it out to have it computed)"
            )
        fields["mup_scale_factor"] = msf
    try:
        return TeleFLMConfig(**fields)
    except ValueError as e:
        raise GrowthError(str(e)) from None


def default_layer_positions(old_layers: int, new_layers: int) -> list[int]:
    """New layers spread evenly: new layer j goes after old layer ceil((j + 1) * L / k) - 1, so depth
    x2 interleaves old, new, old, new, ..."""
    k = new_layers - old_layers
    after = [math.ceil((j + 1) * old_layers / k) - 1 for j in range(k)]
    positions, pos = [], 0
    for i in range(old_layers):
        pos += 1  # old layer i
        for _ in range(after.count(i)):
            positions.append(pos)
            pos += 1
    return positions


def make_plan(
    source: TeleFLMConfig,
    target_fields: dict,
    layers_at: list[int] | None = None,
    layer_init: str = "copy",
) -> tuple[TeleFLMConfig, GrowthPlan]:
    """Validate a growth and decide it. `layers_at`: grown-model positions of the new layers (empty:
    spread evenly); `layer_init`: new layers copy the old layer before them, average the old
    layers on either side ("interpolate"), or, in order, copy old layers 0, 1, ... L-1, 0, ...
    ("stack": with layers_at = L .. gL-1 the old stack repeated g times, as G_stack grows)."""
    target = target_config(source, target_fields)
    if all(getattr(target, k) == getattr(source, k) for k in SHAPE_FIELDS):
        raise GrowthError("target shape equals the source's: nothing to grow")
    if layer_init not in LAYER_INITS:
        raise GrowthError(f"layer_init must be one of {LAYER_INITS}, got {layer_init!r}")
    old_n, new_n = source.num_hidden_layers, target.num_hidden_layers
    if layers_at:
        if len(layers_at) != new_n - old_n:
            raise GrowthError(
                f"layers_at names {len(layers_at)} positions, but {old_n} -> {new_n} layers adds {new_n - old_n}"
            )
        bad = [p for p in layers_at if not 0 <= p < new_n]
        if bad:
            raise GrowthError(f"layers_at positions {bad} are out of range 0..{new_n - 1} (the grown model)")
        if len(set(layers_at)) != len(layers_at):
            raise GrowthError(f"layers_at has repeated positions: {layers_at}")
        new_positions = sorted(layers_at)
    else:
        new_positions = default_layer_positions(old_n, new_n) if new_n > old_n else []
    old_positions = [p for p in range(new_n) if p not in set(new_positions)]

    sources = []
    for k, p in enumerate(new_positions):
        before = [i for i, q in enumerate(old_positions) if q < p]
        after = [i for i, q in enumerate(old_positions) if q > p]
        neighbours = ([before[-1]] if before else []) + ([after[0]] if after else [])
        if layer_init == "stack":
            sources.append([k % old_n])
        else:
            sources.append(neighbours if layer_init == "interpolate" else neighbours[:1])

    # Query heads keep their kv head: old head i (kv head i // g) goes to slot i % g of the same kv
    # head's group of g' >= g slots. With g' == g this is top-left placement.
    g_old = source.num_attention_heads // source.num_key_value_heads
    g_new = target.num_attention_heads // target.num_key_value_heads
    q_positions = [(i // g_old) * g_new + i % g_old for i in range(source.num_attention_heads)]
    plan = GrowthPlan(
        old_hidden=source.hidden_size,
        new_hidden=target.hidden_size,
        old_ffn=source.intermediate_size,
        new_ffn=target.intermediate_size,
        old_heads=source.num_attention_heads,
        new_heads=target.num_attention_heads,
        old_kv_heads=source.num_key_value_heads,
        new_kv_heads=target.num_key_value_heads,
        old_layers=old_n,
        new_layers=new_n,
        head_dim=source.head_dim,
        q_head_positions=q_positions,
        old_layer_positions=old_positions,
        new_layer_positions=new_positions,
        layer_sources=sources,
        readout_rescale=source.logit_scale / target.logit_scale,
    )
    return target, plan
