"""muP as Tele-FLM uses it: parameter classes, initialisation and AdamW groups (docs/mup.md).

The width multiplier is the config's own `mup_scale_factor` (hidden_size / proxy width), the same
number the forward pass divides the logits by, so model, init and optimizer can never disagree.
Likewise the depth multiplier is `mup_depth_factor` (layers / proxy layers), which the forward pass
divides each residual branch by (CompleteP, alpha = 1). Without `use_mup` the same functions give
standard parametrization: no width or depth scaling anywhere.
"""

import math
import zlib
from dataclasses import dataclass

import torch
from torch import nn

from teleflm.model.modeling_teleflm import TeleFLMRotaryEmbedding
from teleflm.parallel.mesh import local_region, model_fqn

MATRIX = "matrix"  # hidden-to-hidden weights: q, k, v, o, gate, up, down
EMBEDDING = "embedding"
READOUT = "readout"  # lm_head
VECTOR = "vector"  # norm weights (and biases, if any)

# Residual output projections: their init is further divided by sqrt(2 * num_layers).
RESIDUAL_OUTPUTS = ("o_proj", "down_proj")


@dataclass
class MupHyperParams:
    """The card's searched hyper-parameters (defaults are the card's values)."""

    lr: float = 1.5e-4  # AdamW lr of embedding, norms and readout
    matrix_lr: float = 1.5e-4  # AdamW lr of hidden matrices at the proxy width (divided by width_mult)
    std: float = 4e-3  # init std of embedding and readout
    matrix_std: float = 4.242e-3  # init std of hidden matrices at the proxy width (/ sqrt(width_mult))
    weight_decay: float = 0.0  # decoupled; on matrices scaled by width_mult
    scale_residual_init: bool = True  # o_proj and down_proj init further / sqrt(2 x base layers)


def width_mult(config) -> float:
    return float(config.mup_scale_factor) if config.use_mup else 1.0


def depth_mult(config) -> float:
    return float(getattr(config, "mup_depth_factor", 1.0)) if config.use_mup else 1.0


def param_class(name: str) -> str:
    """The muP class of a parameter, from its state-dict name (FQN; wrappers' prefixes are ignored)."""
    if name.endswith("embed_tokens.weight"):
        return EMBEDDING
    if name.endswith("lm_head.weight"):
        return READOUT
    if name.endswith(".weight") and "_proj." in name:
        return MATRIX
    return VECTOR


def init_std(name: str, config, hp: MupHyperParams) -> float | None:
    """The init std of a parameter (None for vectors: norm weights start at 1, biases at 0)."""
    kind = param_class(name)
    if kind == VECTOR:
        return None
    if kind != MATRIX:
        return hp.std
    std = hp.matrix_std / math.sqrt(width_mult(config))
    if hp.scale_residual_init and name.rsplit(".", 2)[-2] in RESIDUAL_OUTPUTS:
        # By the proxy's depth: under CompleteP the branch multiplier does the depth scaling, so the
        # init of every matrix is the proxy's whatever the depth (with depth_mult 1, the model's own).
        std /= math.sqrt(2 * config.num_hidden_layers / depth_mult(config))
    return std


def initial_value(
    name: str, shape, config, hp: MupHyperParams, seed: int, rows: range | None = None
) -> torch.Tensor:
    """A parameter's initial value (fp32), or only `rows` of it (dim 0): norm weights 1, biases 0,
    the rest N(0, init_std^2). Each row is drawn from its own generator, seeded by the parameter's
    name, the row and `seed`: every process and layout gets the very same values (training's init
    and growth's new entries), and a shard is drawn at the cost of its own rows, never the whole
    tensor."""
    shape = torch.Size(shape)
    rows = range(shape[0]) if rows is None else rows
    std = init_std(name, config, hp)
    if std is None:
        fill = 1.0 if name.endswith("norm.weight") else 0.0
        return torch.full((len(rows), *shape[1:]), fill)
    out = torch.empty(len(rows), *shape[1:])
    gen = torch.Generator()
    base = seed * 1_000_003 + zlib.crc32(name.encode())
    for i, row in enumerate(rows):
        gen.manual_seed((base * 6364136223846793005 + row * 1442695040888963407 + 1) % 2**64)
        torch.randn(shape[1:], generator=gen, out=out[i])
    return out.mul_(std)


def param_groups(model: nn.Module, config, hp: MupHyperParams) -> list[dict]:
    """AdamW parameter groups: matrices at `matrix_lr / width_mult` with weight decay scaled by
    `width_mult` (so decoupled decay lr * wd stays width-independent); embedding and readout at `lr`
    with `weight_decay`; vectors at `lr` without decay. No group depends on the depth: CompleteP's
    Adam rule at alpha = 1 is lr x depth_mult^(alpha - 1) = lr. Each group carries `base_lr` for schedulers
    and `mup_class` for logs."""
    m = width_mult(config)
    spec = {
        MATRIX: (hp.matrix_lr / m, hp.weight_decay * m),
        EMBEDDING: (hp.lr, hp.weight_decay),
        READOUT: (hp.lr, hp.weight_decay),
        VECTOR: (hp.lr, 0.0),
    }
    params: dict[str, list] = {k: [] for k in spec}
    for name, p in model.named_parameters():
        if p.requires_grad:
            params[param_class(name)].append(p)
    return [
        {"params": params[k], "lr": lr, "base_lr": lr, "weight_decay": wd, "mup_class": k}
        for k, (lr, wd) in spec.items()
        if params[k]
    ]


@torch.no_grad()
def init_weights(module: nn.Module, config, hp: MupHyperParams, seed: int = 0) -> None:
    """Initialise by the muP rules, every row of a parameter from its own generator seeded by the
    parameter's name and the row: every layout (one process, FSDP, TP, a pipeline stage) gets the
    very same values as the unsharded model, and each rank draws only its own shard's rows (no
    communication, no full tensor)."""
    for name, p in module.named_parameters():
        local, region = local_region(p)
        if local.numel():
            rows = range(region[0].start, region[0].stop)
            local.copy_(initial_value(model_fqn(name), p.shape, config, hp, seed, rows)[:, *region[1:]])
    # Non-persistent buffers (RoPE frequencies) are not parameters: recompute them on the device.
    for m in module.modules():
        if isinstance(m, TeleFLMRotaryEmbedding):
            m.inv_freq.copy_(TeleFLMRotaryEmbedding(config).inv_freq)
