"""The model as the trainer runs it: the Tele-FLM decoder with its loss computed from the hidden
states by the chunked readout (teleflm.model.loss), attending within packed documents when told."""

import torch

from teleflm.model.loss import readout_loss_sum
from teleflm.model.modeling_teleflm import TeleFLMForCausalLM
from teleflm.train.attention import document_attention


class TeleFLMForTraining(TeleFLMForCausalLM):
    """The model as the trainer runs it: `loss_sum` goes from token ids to the summed loss without the
    whole logits, attending within packed documents when given their ids; `sequence_nll` gives each
    row's summed loss (DPO's log-probabilities, negated). FSDP knows both as forward methods
    (`register_fsdp_forward_method`); parameter names are the model's own."""

    def loss_sum(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor,
        real_vocab_size: int,
        doc_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        mask = document_attention(doc_ids) if doc_ids is not None else None
        h = self.model(input_ids=input_ids, attention_mask=mask, use_cache=False).last_hidden_state
        return readout_loss_sum(h, self.lm_head.weight, targets, self.config.logit_scale, real_vocab_size)

    def sequence_nll(
        self, input_ids: torch.Tensor, targets: torch.Tensor, real_vocab_size: int
    ) -> torch.Tensor:
        """Per row, the summed NLL (fp32) of its targets, without the whole logits: (rows,). Each row's
        readout is its own chunked loss, so autograd carries each row's own weight back (DPO's)."""
        h = self.model(input_ids=input_ids, use_cache=False).last_hidden_state
        weight, scale = self.lm_head.weight, self.config.logit_scale
        return torch.stack(
            [readout_loss_sum(h[r], weight, targets[r], scale, real_vocab_size) for r in range(len(h))]
        )
