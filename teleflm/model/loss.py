"""Losses over the Tele-FLM readout: cross-entropy over chunks of tokens (never the whole logits), the
same from logits, per-sequence log-probabilities and the DPO objective.

At vocabulary 80,384 and 4,096 tokens the fp32 logits are 1.3 GB per sequence, and as much again for
their gradient. `readout_loss_sum` computes, chunk by chunk, the logits of a few tokens, their
log-sum-exp over the real vocabulary (padded ids get no mass), the target's logit, and at once the
gradients of the hidden states and of the readout weight (the softmax minus the one-hot, times muP's
logit scale), so backward only scales what forward kept: as many matmuls as the unchunked loss, and
a chunk's logits as the largest buffer. Under tensor parallel the readout weight is split by
vocabulary rows: each rank computes its slice's logits, the log-sum-exp is combined over the tp group
and the gradient of the (replicated) hidden states summed over it; the logits stay sharded.

`token_loss_sum` is the same loss from logits a model has already produced (pipeline stages, exported
models): the reference the chunked loss is tested against.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

# A target of this value is not learned (a prompt or padding token under a batch's loss_mask).
IGNORE_INDEX = -100
# Logits per chunk (fp32: 128 MiB): fewer, larger chunks ran faster on CPU (each chunk streams the
# whole readout weight and its gradient); small beside a long sequence's activations.
CHUNK_LOGITS = 1 << 25


def token_loss_sum(logits: torch.Tensor, targets: torch.Tensor, real_vocab_size: int) -> torch.Tensor:
    """Summed next-token NLL in fp32 over the tokenizer's real vocabulary (padded ids get no mass);
    targets equal to IGNORE_INDEX add nothing."""
    return F.cross_entropy(
        logits[..., :real_vocab_size].flatten(0, 1).float(),
        targets.flatten(),
        reduction="sum",
        ignore_index=IGNORE_INDEX,
    )


def readout_loss_sum(
    h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, scale: float, real_vocab_size: int
) -> torch.Tensor:
    """Summed next-token NLL (fp32) of `logits = scale * h @ weight.T` over the real vocabulary, equal to
    `token_loss_sum` of those logits, computed in chunks of tokens. `h` [..., D], `targets` [...]
    (IGNORE_INDEX: not learned); `weight` [V, D], or a DTensor split by vocabulary rows over a tp mesh
    (then the loss is vocabulary-parallel). Under autocast the matmuls run in its dtype."""
    group, vocab_start = None, 0
    if isinstance(weight, DTensor):
        mesh = weight.device_mesh
        if weight.placements[0].is_shard(0):
            group = mesh.get_group()
            vocab_start = mesh.get_local_rank() * weight.shape[0] // mesh.size()
        weight = weight.to_local()
    device = h.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
    with_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    return _ReadoutLoss.apply(
        h.flatten(0, -2),
        weight,
        targets.flatten(),
        scale,
        real_vocab_size,
        vocab_start,
        group,
        dtype,
        with_grad,
    )


class _ReadoutLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, scale, real_vocab_size, vocab_start, group, dtype, with_grad):
        with torch.autocast(h.device.type, enabled=False):
            loss, grad_h, grad_w = _chunked(
                h, weight, targets, scale, real_vocab_size, vocab_start, group, dtype, with_grad
            )
        if with_grad:
            ctx.save_for_backward(grad_h, grad_w)
            ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad):
        grad_h, grad_w = ctx.saved_tensors
        # In place: forward's gradients are used once (the loss is a scalar, backward runs once).
        return grad_h.mul_(grad.to(grad_h.dtype)), grad_w.mul_(grad).to(ctx.weight_dtype), *[None] * 7


def _chunked(h, weight, targets, scale, real_vocab_size, vocab_start, group, dtype, with_grad):
    """(loss sum, d loss / d h, d loss / d weight) over chunks of tokens; gradients None without grad."""
    n = h.shape[0]
    # This rank's real vocabulary rows: ids vocab_start + j < real_vocab_size.
    local = max(0, min(weight.shape[0], real_vocab_size - vocab_start))
    w = weight[:local].to(dtype)
    chunk = max(1, CHUNK_LOGITS // weight.shape[0])  # the same on every tp rank: chunks pair up
    grad_h = torch.empty_like(h) if with_grad else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if with_grad else None
    lse_sum = torch.zeros((), dtype=torch.float32, device=h.device)
    target_sum = torch.zeros((), dtype=torch.float32, device=h.device)
    # One buffer for every chunk's fp32 logits: a fresh allocation per chunk costs its page faults.
    buffer = (
        torch.empty(min(chunk, n), local, dtype=torch.float32, device=h.device)
        if dtype == torch.float32
        else None
    )
    for s in range(0, n, chunk):
        # The scale goes on the chunk's hidden states (width D), not its logits (width V): far cheaper.
        xs = h[s : s + chunk].to(dtype) * scale
        t = targets[s : s + chunk]
        learned = t != IGNORE_INDEX
        logits = torch.mm(xs, w.T, out=buffer[: len(xs)]) if buffer is not None else (xs @ w.T).float()
        # The target's logit where this rank holds the target's row.
        rows = torch.nonzero(learned & (t >= vocab_start) & (t < vocab_start + local)).squeeze(1)
        cols = t[rows] - vocab_start
        target_sum += logits[rows, cols].sum()
        # log-sum-exp with the chunk's logits turned in place into exp(logits - row max).
        top = logits.amax(dim=-1) if local else logits.new_full(logits.shape[:1], -torch.inf)
        e = logits.sub_(top[:, None]).exp_()
        lse = top + e.sum(dim=-1).log()
        if group is not None:  # combine the slices' log-sum-exps over the tp group
            gathered = [torch.empty_like(lse) for _ in range(dist.get_world_size(group))]
            dist.all_gather(gathered, lse, group=group)
            lse = torch.logsumexp(torch.stack(gathered), dim=0)
        lse_sum += lse[learned].sum()
        if with_grad:
            # d loss / d logits = softmax - one-hot on learned rows; the chain through `scale` is
            # carried by xs and by grad_h's factor.
            d = e.mul_(((top - lse).exp() * learned)[:, None])
            d[rows, cols] -= 1
            d = d.to(dtype)
            grad_h[s : s + chunk] = (d @ w).mul_(scale)
            if grad_w.dtype == dtype:
                grad_w[:local].addmm_(d.T, xs)
            else:  # fp32 accumulation of a lower-precision product
                grad_w[:local] += d.T @ xs
    if group is not None:
        dist.all_reduce(target_sum, group=group)
        if with_grad:  # each rank's vocabulary slice contributes to every token's hidden-state gradient
            dist.all_reduce(grad_h, group=group)
    return lse_sum - target_sum, grad_h, grad_w


def sequence_logps(
    logits: torch.Tensor, tokens: torch.Tensor, loss_mask: torch.Tensor, real_vocab_size: int
) -> torch.Tensor:
    """Per row, the summed log-probability (fp32) of the learned tokens; position t predicts t + 1 and
    padded vocabulary ids get no mass. logits: (rows, T, V) for tokens (rows, T + 1)."""
    logps = torch.log_softmax(logits[..., :real_vocab_size].float(), dim=-1)
    picked = logps.gather(-1, tokens[:, 1:, None]).squeeze(-1)
    return (picked * loss_mask[:, 1:]).sum(-1)


def dpo_losses(
    logps: torch.Tensor, ref_logps: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-pair losses, per-pair reward margins) for rows interleaved chosen, rejected, chosen, ..."""
    ratios = (logps - ref_logps).view(-1, 2)
    margins = ratios[:, 0] - ratios[:, 1]
    return -F.logsigmoid(beta * margins), margins
