"""Pipeline parallel: a stage's share of an unmodified Tele-FLM, which torch.distributed.pipelining
schedules (1F1B or GPipe). Parameter names stay the full model's, so checkpoints reshard between
pipeline and non-pipeline layouts."""

import torch
from torch import nn

from teleflm.model.modeling_teleflm import TeleFLMForCausalLM


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
        # The model's own readout (lm_head with muP's logit scale), on the stage's lm_head and config.
        return TeleFLMForCausalLM.readout(self, self.model.norm(h))


def pipeline_split(model: TeleFLMForCausalLM, pp_rank: int, pp: int) -> PipelineStageModule:
    layers = model.config.num_hidden_layers
    per_stage = layers // pp
    return PipelineStageModule(model, pp_rank * per_stage, (pp_rank + 1) * per_stage, pp, pp_rank)
