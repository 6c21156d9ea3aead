"""The pre-training loop: one process or many (torchrun), any dp x pp x tp layout, exactly resumable.

Per step: each data-parallel rank draws its share of the global batch from the mixture stream,
runs forward/backward over micro-batches (or one pipeline schedule step), the loss and gradient
norm are reduced globally, the spike guard decides, the optimizer steps with the muP groups at the
scheduled learning rate, and checkpoints, evaluations and logs follow at their intervals.
"""

import contextlib
import os
import resource
import time
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.fsdp import register_fsdp_forward_method
from torch.distributed.tensor import DTensor

from teleflm import mup
from teleflm.grow.masks import advance_ramp, install_masks
from teleflm.model.loss import IGNORE_INDEX, token_loss_sum
from teleflm.model.size import flops_per_token
from teleflm.mup import init_weights
from teleflm.parallel.mesh import ParallelDims, build_mesh, dp_mesh, dp_rank, init_distributed
from teleflm.parallel.parallelize import build_module
from teleflm.train import checkpoint
from teleflm.train.config import TrainConfig, dp_shard_degree, validate
from teleflm.train.model import TeleFLMForTraining
from teleflm.train.monitor import Monitor
from teleflm.train.schedule import lr_factor
from teleflm.train.stability import SpikeGuard, SpikeStop


def grad_norm(params: list[torch.nn.Parameter], pp_group) -> torch.Tensor:
    """Global L2 norm of the gradients across every shard and pipeline stage."""
    by_mesh = defaultdict(list)
    for p in params:
        if p.grad is not None:
            by_mesh[p.grad.device_mesh if isinstance(p.grad, DTensor) else None].append(p.grad)
    square = torch.zeros((), dtype=torch.float32)
    for mesh, grads in by_mesh.items():
        norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
        if mesh is not None:
            norm = norm.full_tensor()
        square = square.to(norm.device) + norm.float() ** 2
    if pp_group is not None:
        dist.all_reduce(square, group=pp_group)
    return square.sqrt()


def make_optimizer(module: torch.nn.Module, model_config, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the muP parameter groups of `module` (this rank's part of the model). Fused: one
    kernel over all tensors instead of a loop of small ops per tensor; a whole compiled bf16 step at
    10M and 100M parameters ran 1.17x and 1.19x faster with it on a 2-core CPU (docs/benchmarks.md)."""
    return torch.optim.AdamW(
        mup.param_groups(module, model_config, cfg.mup),
        betas=(cfg.optim.beta1, cfg.optim.beta2),
        eps=cfg.optim.eps,
        fused=True,
    )


class Trainer:
    def __init__(
        self, cfg: TrainConfig, stream_factory=None, dpo_beta: float | None = None, growth_stage: int = 0
    ):
        """Trains one model: the run `cfg` (one stage of a growth schedule: teleflm.train.stages runs
        them). `stream_factory(dp_rank, dp_size)` replaces the configured data mixture: it returns an
        object with MixtureStream's methods (tests and benchmarks use synthetic streams). With
        `dpo_beta` the objective is DPO's (teleflm.sft.dpo): batches are pairs of rows with reference
        log-probabilities. `growth_stage` is recorded in checkpoints, for the stage driver."""
        self.growth_stage = growth_stage
        self.growth_masks = None  # a grown checkpoint's masks, ramping while training goes on
        self.cfg = cfg
        self.out = Path(cfg.out)
        world_size = int(os.environ.get("WORLD_SIZE", 1))
        validate(cfg, "config", world_size=world_size)
        self.device = init_distributed(cfg.parallel.timeout_s)
        p = cfg.parallel
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.dims = ParallelDims(p.dp_replicate, dp_shard_degree(cfg, world_size), p.tp, p.pp)
        self.mesh = build_mesh(self.dims, self.device)
        self.dp_rank = dp_rank(self.mesh, self.dims)
        self.pp_rank = self.mesh["pp"].get_local_rank() if self.mesh is not None else 0
        self.pp_group = self.mesh["pp"].get_group() if self.dims.pp > 1 else None
        self.dp_group = dp_mesh(self.mesh, self.dims)._flatten().get_group() if self.dims.dp > 1 else None

        torch.manual_seed(cfg.seed)
        self.model_config = cfg.model_config()
        self.module = build_module(
            self.model_config,
            self.mesh,
            self.dims,
            p,
            self.device,
            TeleFLMForTraining,
            fullgraph=not cfg.data.document_mask,
        )
        if self.dims.pp == 1:
            register_fsdp_forward_method(self.module, "loss_sum")
            register_fsdp_forward_method(self.module, "sequence_nll")
        if dpo_beta is not None and self.dims.pp > 1:
            raise ValueError("DPO runs under dp and tp, not pipeline parallel (parallel.pp must be 1)")
        self.dpo_beta = dpo_beta
        init_weights(self.module, self.model_config, cfg.mup, cfg.seed)
        self.module.train()
        self.optimizer = make_optimizer(self.module, self.model_config, cfg)
        self.params = [q for group in self.optimizer.param_groups for q in group["params"]]

        self.real_vocab_size = self._real_vocab_size()
        self.shards = None  # the prepared shards, when the stream reads them (held-out evaluation)
        self.stream = (
            stream_factory(self.dp_rank, self.dims.dp) if stream_factory is not None else self._build_stream()
        )
        self.sequences_per_rank = cfg.sequences_per_step() // self.dims.dp
        self.micro_batches = cfg.micro_batches_per_step(self.dims.dp)
        # Pre-training learns every target; fine-tuning's masks and DPO's pairs set their own count.
        self.set_step_targets(cfg.batch.global_batch_tokens)
        self.schedule = self._build_pipeline_schedule() if self.dims.pp > 1 else None
        # bf16 compute: FSDP's MixedPrecisionPolicy when dp > 1, else autocast (pipeline stages too).
        self.autocast = (
            torch.autocast(self.device.type, dtype=torch.bfloat16)
            if p.mixed_precision == "bf16" and self.dims.dp == 1
            else contextlib.nullcontext()
        )
        self.step, self.tokens, self.events = 0, 0, 0
        s = cfg.stability
        self.guard = SpikeGuard(
            s.window, s.sigma, s.min_loss_jump, s.min_grad_ratio, s.warmup_steps, s.patience
        )
        self.flops_per_token = flops_per_token(self.model_config, cfg.data.context_length)
        self.deadline = None  # a teleflm.train.deadline.Deadline: the run then ends by a wall-clock time

    # ----- construction helpers -----

    def _real_vocab_size(self) -> int:
        if not self.cfg.data.tokenizer:
            return self.model_config.vocab_size
        from teleflm.data.tokenizer import load_tokenizer

        n = len(load_tokenizer(self.cfg.data.tokenizer))
        if n > self.model_config.vocab_size:
            raise ValueError(
                f"tokenizer {self.cfg.data.tokenizer} has {n} entries, more than model.vocab_size "
                f"({self.model_config.vocab_size})"
            )
        return n

    def _build_stream(self):
        from teleflm.data.mixture import MixtureStream
        from teleflm.data.shards import open_shards
        from teleflm.data.tokenizer import tokenizer_hash

        d = self.cfg.data
        if not d.shards:
            raise ValueError(
                "config: data.shards is empty: point it at a folder made by `teleflm data prepare`"
            )
        expected = tokenizer_hash(d.tokenizer) if d.tokenizer else None
        self.shards = open_shards(d.shards, expected_tokenizer_hash=expected)
        mixture = d.mixture or self.shards.mixture()
        stream = MixtureStream(
            self.shards,
            mixture,
            context_length=d.context_length,
            seed=d.seed,
            dp_rank=self.dp_rank,
            dp_size=self.dims.dp,
            document_mask=d.document_mask,
        )
        # A stage sees the whole run's schedule: the budget is the run's.
        stream.check_budget(self.cfg.total_steps() * self.cfg.sequences_per_step(), d.repeat_past_epochs)
        return stream

    def _build_pipeline_schedule(self):
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        stage = PipelineStage(self.module, self.pp_rank, self.dims.pp, self.device, group=self.pp_group)
        schedule_cls = Schedule1F1B if self.cfg.parallel.pp_schedule == "1F1B" else ScheduleGPipe

        def loss_fn(logits, targets):
            return token_loss_sum(logits, targets, self.real_vocab_size) / self.normalizer

        # scale_grads=False: the loss is already normalised by the whole step's tokens.
        return schedule_cls(stage, n_microbatches=self.micro_batches, loss_fn=loss_fn, scale_grads=False)

    # ----- one step -----

    def forward_backward(self, batch: dict) -> torch.Tensor:
        """Gradients of this rank's share of the batch; returns this rank's summed token NLL."""
        tokens = torch.from_numpy(batch["tokens"]).to(self.device)
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        if self.dpo_beta is not None:
            return self.preference_forward_backward(inputs, targets, batch)
        if "loss_mask" in batch:
            targets = self.learned_targets(
                targets, torch.from_numpy(batch["loss_mask"]).to(self.device)[:, 1:]
            )
        if self.schedule is not None:
            losses: list[torch.Tensor] = []
            is_first, is_last = self.pp_rank == 0, self.pp_rank == self.dims.pp - 1
            args = (inputs,) if is_first else ()
            with self.autocast:
                self.schedule.step(  # the losses are all the step needs: no micro-batch's logits kept
                    *args,
                    target=targets if is_last else None,
                    losses=losses if is_last else None,
                    return_outputs=False,
                )
            if not is_last:
                return torch.zeros((), device=self.device)
            return torch.stack([loss.detach() for loss in losses]).sum() * self.normalizer
        total = torch.zeros((), device=self.device)
        mbs = self.cfg.batch.micro_batch_size
        doc_ids = torch.from_numpy(batch["doc_ids"]).to(self.device)[:, :-1] if "doc_ids" in batch else None
        for i in range(self.micro_batches):
            rows = slice(i * mbs, (i + 1) * mbs)
            if self.dims.dp > 1:
                self.module.set_requires_gradient_sync(i == self.micro_batches - 1)
            docs = doc_ids[rows] if doc_ids is not None else None
            with self.autocast:
                loss = self.module.loss_sum(inputs[rows], targets[rows], self.real_vocab_size, docs)
            (loss / self.normalizer).backward()
            total += loss.detach()
        return total

    def preference_forward_backward(
        self, inputs: torch.Tensor, targets: torch.Tensor, batch: dict
    ) -> torch.Tensor:
        """DPO: rows come as (chosen, rejected) pairs with their reference log-probabilities; the loss
        is each pair's `-log sigmoid(beta * reward margin)`, summed here and normalised by the pairs of
        the global batch. Returns this rank's summed pair loss."""
        from teleflm.model.loss import dpo_losses

        learned = torch.from_numpy(batch["loss_mask"]).to(self.device)[:, 1:]
        targets = targets.masked_fill(~learned, IGNORE_INDEX)
        ref = torch.from_numpy(batch["ref_logps"]).to(self.device)
        self.set_step_targets(len(inputs) // 2 * self.dims.dp)  # pairs in the global batch
        total = torch.zeros((), device=self.device)
        mbs = self.cfg.batch.micro_batch_size
        for i in range(self.micro_batches):
            rows = slice(i * mbs, (i + 1) * mbs)
            if self.dims.dp > 1:
                self.module.set_requires_gradient_sync(i == self.micro_batches - 1)
            with self.autocast:
                logps = -self.module.sequence_nll(inputs[rows], targets[rows], self.real_vocab_size)
            loss = dpo_losses(logps, ref[rows], self.dpo_beta)[0].sum()
            (loss / self.normalizer).backward()
            total += loss.detach()
        return total

    @torch.no_grad()
    def pair_logps(self, pairs) -> np.ndarray:
        """The model's log-probabilities of both sides of every pair (`teleflm.sft.preference.PairSet`):
        (pairs, 2), on every rank. Each data-parallel rank scores every dp-th pair (all ranks run the
        same number of forward passes, as FSDP needs) and the sums are all-reduced."""
        rows = pairs.tokens.reshape(-1, pairs.tokens.shape[-1])
        learned = pairs.loss_mask.reshape(rows.shape)
        mine = np.arange(self.dp_rank, len(pairs), self.dims.dp)
        per_rank = -(-len(pairs) // self.dims.dp)
        batch_pairs = max(1, self.cfg.batch.micro_batch_size // 2)
        out = torch.zeros(len(pairs), 2, dtype=torch.float64, device=self.device)
        self.module.eval()
        try:
            for start in range(0, per_rank, batch_pairs):
                index = mine[start : start + batch_pairs]
                take = index if len(index) else np.zeros(1, dtype=np.int64)  # an idle rank still runs
                row_index = np.stack([2 * take, 2 * take + 1], axis=1).reshape(-1)
                tokens = torch.from_numpy(rows[row_index]).to(self.device)
                mask = torch.from_numpy(learned[row_index]).to(self.device)[:, 1:]
                targets = tokens[:, 1:].masked_fill(~mask, IGNORE_INDEX)
                with self.autocast:
                    nll = self.module.sequence_nll(tokens[:, :-1], targets, self.real_vocab_size)
                if len(index):
                    out[torch.from_numpy(index).to(self.device)] = -nll.double().view(-1, 2)
        finally:
            self.module.train()
        if self.dp_group is not None:
            dist.all_reduce(out, group=self.dp_group)
        return out.cpu().numpy()

    def set_step_targets(self, count: int) -> None:
        """The step's loss is the mean over `count` targets (or pairs) of the global batch: each rank
        divides its sum by its share, and FSDP's gradient average over dp ranks gives the gradient of
        that mean (the pipeline's loss function reads `normalizer` when it runs)."""
        self.step_targets = max(count, 1)
        self.normalizer = self.step_targets / self.dims.dp

    def learned_targets(self, targets: torch.Tensor, learned: torch.Tensor) -> torch.Tensor:
        """`targets` with those outside `learned` (fine-tuning: prompts, padding) set to IGNORE_INDEX;
        the step's mean is over the learned targets of the global batch (counted over dp ranks; tp
        and pp peers hold the same rows)."""
        count = learned.sum().double()
        if self.dp_group is not None:
            dist.all_reduce(count, group=self.dp_group)
        self.set_step_targets(int(count.item()))
        return targets.masked_fill(~learned, IGNORE_INDEX)

    def global_mean_loss(self, rank_sum: torch.Tensor) -> float:
        """Mean NLL per target of the global batch. Every tp replica holds the same sum and only the
        last pipeline stage has one, so sum over the world and divide by tp."""
        value = rank_sum.detach().double().clone()
        if dist.is_initialized():
            dist.all_reduce(value)
        return value.item() / (self.dims.tp * self.step_targets)

    def set_lr(self) -> float:
        c = self.cfg
        warmup_tokens = c.schedule.warmup_steps * c.batch.global_batch_tokens
        factor = lr_factor(
            self.step,
            self.tokens,
            c.schedule.warmup_steps,
            warmup_tokens,
            c.schedule.total_tokens,
            c.mup.min_lr / c.mup.lr,
        )
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        return factor * c.mup.lr

    # ----- checkpoints -----

    @property
    def checkpoint_root(self) -> Path:
        return self.out / "checkpoints"

    def trainer_state(self) -> dict:
        return {
            "step": self.step,
            "tokens": self.tokens,
            "spike_guard": self.guard.state_dict(),
            "events": self.events,
            "stream": self.stream.state_dict(),
            "rng": checkpoint.rng_state(),
            "model_config": self.model_config.to_diff_dict(),
            "tokenizer": self.cfg.data.tokenizer,
            "growth_stage": self.growth_stage,
            "growth_masks": self.growth_masks.state_dict() if self.growth_masks is not None else None,
            "eval": self.eval_settings(),
        }

    def save_checkpoint(self) -> Path:
        path = checkpoint.save(
            self.checkpoint_root,
            self.step,
            self.module,
            self.optimizer,
            self.trainer_state(),
            self.cfg.checkpoint.keep_last,
        )
        return path

    def restore(self, path: Path, restore_stream: bool = True) -> None:
        state = checkpoint.load(path, self.module, self.optimizer, self.model_config)
        self.step, self.tokens = state["step"], state["tokens"]
        if "spike_guard" in state:  # checkpoints before the windowed guard start it afresh
            self.guard.load_state_dict(state["spike_guard"])
        self.events = max(self.events, state["events"])
        checkpoint.set_rng_state(state["rng"])
        tp = (self.mesh["tp"].get_local_rank(), self.dims.tp) if self.dims.tp > 1 else (0, 1)
        self.growth_masks = install_masks(self.growth_masks, state, self.module, *tp)
        if restore_stream:
            self.stream.load_state_dict(state["stream"])

    def restore_latest(self, restore_stream: bool = True) -> tuple[Path | None, list[tuple[Path, str]]]:
        """Restore the newest checkpoint that loads: (its path or None, [(set-aside path, why)]).
        Checkpoints newer than it that fail to load are set aside, never deleted; when none loads,
        a CheckpointError names them all and nothing is moved."""
        failed = []
        for path in checkpoint.complete_checkpoints(self.checkpoint_root):
            try:
                self.restore(path, restore_stream)
            except checkpoint.CheckpointError as e:
                failed.append((path, str(e)))
                continue
            set_aside = [(checkpoint.set_aside(bad), why) for bad, why in failed]
            for bad, why in set_aside:
                warnings.warn(
                    f"{why}; resuming from {path} instead and keeping that one as {bad}", stacklevel=2
                )
            return path, set_aside
        if failed:
            raise checkpoint.CheckpointError("; ".join(why for _, why in failed) + ": no checkpoint loads")
        return None, []

    def close(self) -> None:
        """Free the model and optimizer (between growth stages: the grown ones take their place)."""
        self.module = self.optimizer = self.params = self.schedule = self.growth_masks = None

    # ----- evaluation -----

    def eval_settings(self) -> dict:
        """What `evaluate` scores: the first `max_windows` windows of `context_length` tokens of each
        domain's held-out split (recorded in checkpoints: `teleflm eval bpb` scores the same)."""
        d = self.cfg.data
        return {
            "context_length": d.context_length,
            "max_windows": self.cfg.logging.eval_sequences,
            "document_mask": d.document_mask,
            "stride": self.cfg.logging.eval_stride,
        }

    def eval_loss(
        self, inputs: torch.Tensor, targets: torch.Tensor, doc_ids: torch.Tensor | None
    ) -> torch.Tensor | None:
        """Summed NLL of a batch as training computes it; under pipeline parallel (no document mask
        there) the activations go stage to stage (in fp32, exact for bf16 ones) and only the last
        stage returns a loss."""
        if self.dims.pp == 1:
            return self.module.loss_sum(inputs, targets, self.real_vocab_size, doc_ids)
        first, last = self.pp_rank == 0, self.pp_rank == self.dims.pp - 1
        if first:
            h = inputs
        else:
            h = torch.empty(*inputs.shape, self.model_config.hidden_size, device=self.device)
            dist.recv(h, dist.get_global_rank(self.pp_group, self.pp_rank - 1), group=self.pp_group)
        out = self.module(h)
        if last:
            return token_loss_sum(out, targets, self.real_vocab_size)
        dist.send(
            out.float().contiguous(),
            dist.get_global_rank(self.pp_group, self.pp_rank + 1),
            group=self.pp_group,
        )
        return None

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out bits per byte per domain with the documents and bytes scored, and the
        byte-weighted mean over domains as `val.bpb`; the same on every rank, under every layout.
        A domain without held-out documents reports 0 documents and no BPB."""
        if self.shards is None:
            return {}
        from teleflm.eval.bpb import bits_per_byte

        e = self.eval_settings()
        groups = tuple(g for g in (self.dp_group, self.pp_group) if g is not None)
        self.module.eval()
        results, nll_bits, total_bytes = {}, 0.0, 0
        try:
            for domain in self.shards.domains:
                r = bits_per_byte(
                    self.eval_loss,
                    self.shards.documents(domain, "val"),
                    e["context_length"],
                    max_windows=e["max_windows"],
                    batch_size=self.cfg.batch.micro_batch_size,
                    device=self.device,
                    dp_rank=self.dp_rank,
                    dp_size=self.dims.dp,
                    groups=groups,
                    document_mask=e["document_mask"],
                    stride=e["stride"],
                )
                results[f"val.{domain}.documents"] = r["documents"]
                results[f"val.{domain}.bytes"] = r["bytes"]
                if r["bytes"]:
                    results[f"val.{domain}.bpb"] = r["bpb"]
                    nll_bits += r["bpb"] * r["bytes"]
                    total_bytes += r["bytes"]
        finally:
            self.module.train()
        if total_bytes:
            results["val.bpb"] = nll_bits / total_bytes
        return results

    # ----- the loop -----

    def run(self, until_tokens: int | None = None) -> dict:
        """Train to the end of the run (final evaluation, export), or stop at the first step that has
        trained `until_tokens` (a growth stage's boundary): then its checkpoint is written and the
        figures carry `stopped_at`, its path."""
        c = self.cfg
        total_steps = c.total_steps()
        latest, set_aside = self.restore_latest()
        monitor = Monitor(self.out, total_steps, self.step, self.rank == 0, c.logging.progress_bar)
        for path, why in set_aside:
            monitor.event(self.step, "unloadable_checkpoint", set_aside_as=str(path), error=why)
        if latest is not None:
            monitor.event(self.step, "resumed", checkpoint=str(latest))
        last_loss, final_eval, stopped_at = float("nan"), {}, None
        try:
            while self.step < total_steps:
                if until_tokens is not None and self.tokens >= until_tokens:
                    stopped_at = checkpoint.step_dir(self.checkpoint_root, self.step)
                    if not checkpoint.is_complete(stopped_at):
                        stopped_at = self.save_checkpoint()
                    monitor.event(self.step, "stage_end", checkpoint=str(stopped_at))
                    break
                self.growth_masks = advance_ramp(self.growth_masks, self.step)
                t0 = time.perf_counter()
                lr = self.set_lr()
                batch = self.stream.next_sequences(self.sequences_per_rank)
                loss = self.global_mean_loss(self.forward_backward(batch))
                norm = grad_norm(self.params, self.pp_group).item()
                anomaly = self.guard.verdict(loss, norm)
                if anomaly == "level_shift":  # persistent, not a bad batch: the step goes through
                    # The spikes just before it were the new level too: they no longer count toward
                    # max_events (a run whose data moves between levels is not a run going wrong).
                    reclassified = len(self.guard.rejected)
                    self.events -= reclassified
                    monitor.event(
                        self.step,
                        anomaly,
                        loss=loss,
                        grad_norm=norm,
                        reclassified=reclassified,
                        **self.guard.summary(),
                    )
                    self.guard.shift_level(loss, norm)
                elif anomaly is not None:
                    self.handle_anomaly(anomaly, loss, norm, monitor)
                    continue
                if c.optim.grad_clip > 0 and norm > c.optim.grad_clip:
                    scale = c.optim.grad_clip / (norm + 1e-6)
                    for q in self.params:
                        if q.grad is not None:
                            q.grad.mul_(scale)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                self.tokens += c.batch.global_batch_tokens
                if anomaly is None:
                    self.guard.accept(loss, norm)
                last_loss = loss
                dt = time.perf_counter() - t0
                if self.deadline is not None:
                    total_steps = self.deadline.replan(self, dt)
                    monitor.set_total(total_steps)
                if self.step % c.logging.log_interval == 0 or self.step == total_steps:
                    monitor.log(self.step, self.step_record(loss, norm, lr, dt))
                monitor.advance()
                if c.logging.eval_interval and self.step % c.logging.eval_interval == 0:
                    monitor.log(self.step, {"tokens": self.tokens, **self.evaluate()})
                if self.step % c.checkpoint.interval_steps == 0 or self.step == total_steps:
                    path = self.save_checkpoint()
                    monitor.event(self.step, "checkpoint", path=str(path))
                    monitor.plot()
            if stopped_at is None:
                final_eval = self.evaluate()
                if final_eval:
                    monitor.log(self.step, {"tokens": self.tokens, **final_eval})
                if c.checkpoint.export_at_end:
                    self.export()
        finally:
            monitor.close()
        result = {"step": self.step, "tokens": self.tokens, "loss": last_loss, **final_eval}
        return result if stopped_at is None else {**result, "stopped_at": stopped_at}

    def step_record(self, loss: float, norm: float, lr: float, dt: float) -> dict:
        tokens_per_s = self.cfg.batch.global_batch_tokens / dt
        record = {
            "loss": loss,
            "lr": lr,
            "grad_norm": norm,
            "tokens": self.tokens,
            "tokens_per_s": tokens_per_s,
        }
        peak = self.cfg.logging.peak_flops_per_device
        if peak > 0:
            record["mfu"] = self.flops_per_token * tokens_per_s / (peak * self.dims.world_size)
        if self.device.type == "cuda":
            record["memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        else:
            record["memory_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        return record

    def handle_anomaly(self, kind: str, loss: float, norm: float, monitor: Monitor) -> None:
        """The spike guard's action; the offending batch is never applied to the weights."""
        action = self.cfg.stability.action
        self.optimizer.zero_grad(set_to_none=True)
        self.events += 1
        self.guard.reject(loss, norm)
        monitor.event(self.step, kind, loss=loss, grad_norm=norm, action=action, **self.guard.summary())
        limit = self.cfg.stability.max_events
        if action == "stop" or self.events > limit:
            why = (
                'stability.action is "stop"'
                if action == "stop"
                else f"more than stability.max_events = {limit}"
            )
            raise SpikeStop(
                f"stability guard: {kind} at step {self.step} (loss {loss:.4g}, grad norm {norm:.4g}), "
                f"event {self.events}, {why}; the events and the limits they were judged by are in "
                f"{self.out / 'events.jsonl'}, and [stability] sets the guard"
            )
        if action == "rollback":
            # Weights and optimizer go back; the data stream stays past the offending batch.
            latest, set_aside = self.restore_latest(restore_stream=False)
            for path, why in set_aside:
                monitor.event(self.step, "unloadable_checkpoint", set_aside_as=str(path), error=why)
            if latest is not None:
                monitor.event(self.step, "rolled_back", checkpoint=str(latest))
                self.guard.rejected = []  # back at a level the window knows

    def export(self) -> Path | None:
        """The final checkpoint as a Hugging Face folder (written by rank 0 from the DCP shards)."""
        target = self.out / "export"
        if self.rank == 0:
            from teleflm.model.io import export_hf

            model, _ = checkpoint.load_model(checkpoint.step_dir(self.checkpoint_root, self.step))
            export_hf(model, target, tokenizer_dir=self.cfg.data.tokenizer or None, overwrite=True)
        if dist.is_initialized():
            dist.barrier()
        return target


def close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
