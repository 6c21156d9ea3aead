"""Masked structural growth (MSG): hooks that make a grown model compute its old function, then ramp.

The model stays a plain Tele-FLM: masks are forward hooks attached from outside and removed when
the ramp ends. With m the ramp value (0 at growth, 1 after `ramp_steps` optimizer steps):
  hidden: every write into the residual stream (embedding, o_proj, down_proj) has its new dims
    multiplied by m, and RMSNorm divides by the live width old + m (new - old) instead of new;
  heads: the new query heads' attention outputs (o_proj's input) are multiplied by m; this is the
    mask on their v when they own their kv heads and stays exact when GQA makes them share old ones;
  FFN: the new units' gate pre-activations are multiplied by m (SiLU(0) = 0);
  layers: a new block computes m * block(h) + (1 - m) * h.
At m = 0 the old function is computed exactly (zeros in, zeros out); at m = 1 every mask is the
identity and the hooks are removed. Under tensor parallel, hooks see their rank's shard of heads and
FFN units and take the matching slice of the mask.
"""

import torch
from torch import nn

from teleflm.grow.plan import GrowthPlan
from teleflm.parallel.mesh import model_fqn

NORMS = ("input_layernorm", "post_attention_layernorm")


def _new_part(size: int, old_slots: torch.Tensor) -> torch.Tensor:
    """1.0 at new entries, 0.0 at old ones."""
    part = torch.ones(size)
    part[old_slots] = 0.0
    return part


class GrowthMasks:
    """The masks of one growth: installed on a (possibly wrapped, sharded, pipeline-split) module,
    stepped by the trainer, saved in its checkpoint state so a resume mid-ramp is exact."""

    def __init__(
        self, plan: GrowthPlan, start_step: int, ramp_steps: int, tp_rank: int = 0, tp_size: int = 1
    ):
        self.plan, self.start_step, self.ramp_steps = plan, start_step, max(ramp_steps, 1)
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.m = 0.0
        self.handles: list = []
        p, hd = plan, plan.head_dim
        self.hidden_new = _new_part(p.new_hidden, torch.arange(p.old_hidden))
        q_slots = torch.cat([torch.arange(i * hd, (i + 1) * hd) for i in p.q_head_positions])
        self.heads_new = self._local(_new_part(p.new_heads * hd, q_slots))
        self.ffn_new = self._local(_new_part(p.new_ffn, torch.arange(p.old_ffn)))

    def _local(self, full: torch.Tensor) -> torch.Tensor:
        """This tensor-parallel rank's slice (heads and FFN units are split evenly, in order)."""
        return full.chunk(self.tp_size)[self.tp_rank]

    # ----- the ramp -----

    def set_step(self, step: int) -> None:
        self.m = min(max((step - self.start_step) / self.ramp_steps, 0.0), 1.0)

    def finished(self, step: int) -> bool:
        return step - self.start_step >= self.ramp_steps

    def state_dict(self) -> dict:
        return {"plan": self.plan.to_dict(), "start_step": self.start_step, "ramp_steps": self.ramp_steps}

    @classmethod
    def from_state(cls, state: dict, tp_rank: int = 0, tp_size: int = 1) -> "GrowthMasks":
        return cls(
            GrowthPlan.from_dict(state["plan"]), state["start_step"], state["ramp_steps"], tp_rank, tp_size
        )

    # ----- hooks -----

    def _scale(self, x: torch.Tensor, new_part: torch.Tensor) -> torch.Tensor:
        return x * (1.0 - (1.0 - self.m) * new_part.to(x.device, x.dtype))

    def _mask_hidden(self, module, args, out):
        return self._scale(out, self.hidden_new)

    def _mask_ffn(self, module, args, out):
        return self._scale(out, self.ffn_new)

    def _mask_heads(self, module, args):
        return (self._scale(args[0], self.heads_new), *args[1:])

    def _masked_norm(self, module, args, out):
        """RMSNorm over the live dims: mean square = sum of squares / (old + m (new - old))."""
        x = args[0]
        live = self.plan.old_hidden + self.m * (self.plan.new_hidden - self.plan.old_hidden)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) / live + module.eps)
        return module.weight * xf.to(x.dtype)

    def _mix_layer(self, module, args, out):
        return self.m * out + (1.0 - self.m) * args[0]

    def install(self, module: nn.Module) -> "GrowthMasks":
        """Attach the hooks to `module`'s Tele-FLM submodules (found by their model FQN, so wrappers,
        FSDP and pipeline stages are all fine). Call once; `remove` undoes it."""
        p = self.plan
        new_layers = {f"model.layers.{i}" for i in p.new_layer_positions}
        seen = set()
        for name, sub in module.named_modules():
            fqn = model_fqn(name)
            if fqn in seen:  # an activation-checkpoint wrapper and its inner layer share a name
                continue
            seen.add(fqn)
            leaf = fqn.rsplit(".", 1)[-1]
            if p.grows_hidden:
                if leaf in ("embed_tokens", "o_proj", "down_proj"):
                    self.handles.append(sub.register_forward_hook(self._mask_hidden))
                if leaf in NORMS or fqn == "model.norm":
                    self.handles.append(sub.register_forward_hook(self._masked_norm))
            if p.grows_heads and leaf == "o_proj":
                # prepend: run before tensor parallel's input hook turns the local shard into a DTensor
                self.handles.append(sub.register_forward_pre_hook(self._mask_heads, prepend=True))
            if p.grows_ffn and leaf == "gate_proj":
                self.handles.append(sub.register_forward_hook(self._mask_ffn))
            if fqn in new_layers:
                self.handles.append(sub.register_forward_hook(self._mix_layer))
        return self

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def advance_ramp(masks: GrowthMasks | None, step: int) -> GrowthMasks | None:
    """Set the masks for the coming step; remove them (returning None) once the ramp is complete."""
    if masks is None:
        return None
    if masks.finished(step):
        masks.remove()
        return None
    masks.set_step(step)
    return masks


def install_masks(
    masks: GrowthMasks | None, state: dict, module, tp_rank: int = 0, tp_size: int = 1
) -> GrowthMasks | None:
    """After a checkpoint load: drop the masks installed before, install the checkpoint's (if any)."""
    if masks is not None:
        masks.remove()
    if not state.get("growth_masks"):
        return None
    return GrowthMasks.from_state(state["growth_masks"], tp_rank, tp_size).install(module)
