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
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import register_fsdp_forward_method
from torch.distributed.tensor import DTensor

from teleflm import mup
from teleflm.grow import schedule as growth
from teleflm.grow.masks import advance_ramp
from teleflm.parallel.parallelize import (
    ParallelDims,
    build_mesh,
    device_and_backend,
    dp_mesh,
    dp_rank,
    init_weights,
    parallelize,
    pipeline_split,
)
from teleflm.parallel.plan import flops_per_token
from teleflm.train import checkpoint
from teleflm.train.config import TrainConfig, dp_shard_degree, validate
from teleflm.train.loss import IGNORE_INDEX, TeleFLMForTraining, token_loss_sum
from teleflm.train.monitor import Monitor
from teleflm.train.schedule import lr_factor
from teleflm.train.stability import SpikeGuard


class SpikeStop(RuntimeError):
    """The stability guard stopped the run (action "stop", or too many events)."""


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


class Trainer:
    def __init__(self, cfg: TrainConfig, stream_factory=None):
        """`stream_factory(dp_rank, dp_size)` replaces the configured data mixture: it returns an object
        with MixtureStream's methods (tests and benchmarks use synthetic streams)."""
        # A [[growth]] schedule: this trainer trains the stage of the latest checkpoint (its shape and
        # layout); at the next stage boundary it grows that checkpoint and hands over to a new Trainer.
        self.run_cfg, self.stream_factory = cfg, stream_factory
        self.growth_stage, cfg = growth.current_stage(cfg)
        self.growth_masks = None
        self.cfg = cfg
        self.out = Path(cfg.out)
        world_size = int(os.environ.get("WORLD_SIZE", 1))
        validate(cfg, "config", world_size=world_size)
        self.device, backend = device_and_backend()
        if world_size > 1 and not dist.is_initialized():
            dist.init_process_group(backend)
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        p = cfg.parallel
        self.dims = ParallelDims(p.dp_replicate, dp_shard_degree(cfg, world_size), p.tp, p.pp)
        self.mesh = build_mesh(self.dims, self.device)
        self.dp_rank = dp_rank(self.mesh, self.dims)
        self.pp_rank = self.mesh["pp"].get_local_rank() if self.mesh is not None else 0
        self.pp_group = self.mesh["pp"].get_group() if self.dims.pp > 1 else None
        self.dp_group = dp_mesh(self.mesh, self.dims)._flatten().get_group() if self.dims.dp > 1 else None

        torch.manual_seed(cfg.seed)
        self.model_config = cfg.model_config()
        with torch.device("meta"):
            model = TeleFLMForTraining(self.model_config)
        module = pipeline_split(model, self.pp_rank, self.dims.pp) if self.dims.pp > 1 else model
        self.module = parallelize(module, self.mesh, self.dims, p, fullgraph=not cfg.data.document_mask)
        if self.dims.pp == 1:
            register_fsdp_forward_method(self.module, "loss_sum")
        self.module.to_empty(device=self.device)
        init_weights(self.module, self.model_config, cfg.mup, cfg.seed)
        self.module.train()
        self.optimizer = torch.optim.AdamW(
            mup.param_groups(self.module, self.model_config, cfg.mup),
            betas=(cfg.optim.beta1, cfg.optim.beta2),
            eps=cfg.optim.eps,
        )
        self.params = [q for group in self.optimizer.param_groups for q in group["params"]]

        self.real_vocab_size = self._real_vocab_size()
        self.stream = (
            stream_factory(self.dp_rank, self.dims.dp) if stream_factory is not None else self._build_stream()
        )
        self.sequences_per_rank = cfg.sequences_per_step() // self.dims.dp
        self.micro_batches = self.sequences_per_rank // cfg.batch.micro_batch_size
        # Each rank's loss is normalised by its share of the global batch; FSDP's gradient average
        # over dp ranks then gives exactly the gradient of the global per-token mean.
        self.normalizer = self.sequences_per_rank * cfg.data.context_length
        self.step_targets = cfg.batch.global_batch_tokens  # targets in the global batch
        self.schedule = self._build_pipeline_schedule() if self.dims.pp > 1 else None
        self.autocast = (
            torch.autocast(self.device.type, dtype=torch.bfloat16)
            if p.mixed_precision == "bf16" and self.dims.dp == 1
            else contextlib.nullcontext()
        )
        self.step, self.tokens, self.events = 0, 0, 0
        s = cfg.stability
        self.guard = SpikeGuard(s.window, s.sigma, s.min_loss_jump, s.min_grad_ratio, s.warmup_steps)
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
        from teleflm.data.mixture import DomainWeight, MixtureStream
        from teleflm.data.shards import open_shards
        from teleflm.data.tokenizer import tokenizer_hash

        d = self.cfg.data
        if not d.shards:
            raise ValueError(
                "config: data.shards is empty: point it at a folder made by `teleflm data prepare`"
            )
        expected = tokenizer_hash(d.tokenizer) if d.tokenizer else None
        self.shards = open_shards(d.shards, expected_tokenizer_hash=expected)
        mixture = [DomainWeight(m.name, m.proportion, m.epochs) for m in d.mixture] or self.shards.mixture()
        return MixtureStream(
            self.shards,
            mixture,
            context_length=d.context_length,
            seed=d.seed,
            dp_rank=self.dp_rank,
            dp_size=self.dims.dp,
            document_mask=d.document_mask,
        )

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
        if "loss_mask" in batch:
            targets = self.mask_targets(targets, torch.from_numpy(batch["loss_mask"]).to(self.device)[:, 1:])
        if self.schedule is not None:
            losses: list[torch.Tensor] = []
            is_first, is_last = self.pp_rank == 0, self.pp_rank == self.dims.pp - 1
            args = (inputs,) if is_first else ()
            self.schedule.step(*args, target=targets if is_last else None, losses=losses if is_last else None)
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

    def mask_targets(self, targets: torch.Tensor, learned: torch.Tensor) -> torch.Tensor:
        """Targets outside `learned` (fine-tuning: prompts, padding) become IGNORE_INDEX, and the loss
        is normalised by the learned targets of the whole global batch (counted over dp ranks; tp and
        pp peers hold the same rows), so the step's gradient is that of their mean."""
        count = learned.sum().double()
        if self.dp_group is not None:
            dist.all_reduce(count, group=self.dp_group)
        self.step_targets = max(int(count.item()), 1)
        self.normalizer = self.step_targets / self.dims.dp  # FSDP averages gradients over dp ranks
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
        state = checkpoint.load(path, self.module, self.optimizer)
        self.step, self.tokens = state["step"], state["tokens"]
        if "spike_guard" in state:  # checkpoints before the windowed guard start it afresh
            self.guard.load_state_dict(state["spike_guard"])
        self.events = max(self.events, state["events"])
        checkpoint.set_rng_state(state["rng"])
        tp = (self.mesh["tp"].get_local_rank(), self.dims.tp) if self.dims.tp > 1 else (0, 1)
        self.growth_masks = growth.install_masks(self.growth_masks, state, self.module, *tp)
        if restore_stream:
            self.stream.load_state_dict(state["stream"])

    def grow_checkpoint(self) -> Path:
        """Stage boundary: the checkpoint of this step (written unless it exists) is grown by rank 0,
        in one process, into `step-N-grown`, which the next stage's trainer resumes from."""
        source = checkpoint.step_dir(self.checkpoint_root, self.step)
        if not checkpoint.is_complete(source):
            source = self.save_checkpoint()
        if self.rank == 0:
            growth.grow_run_checkpoint(self.run_cfg, self.growth_stage, source)
        if dist.is_initialized():
            dist.barrier()
        return source.with_name(source.name + "-grown")

    # ----- evaluation -----

    def evaluate(self) -> dict:
        """Held-out bits per byte per domain (and their byte-weighted mean as `val.bpb`)."""
        if self.dims.pp > 1 or getattr(self, "shards", None) is None:
            return {}
        from teleflm.eval.bpb import bits_per_byte

        self.module.eval()
        results, nll_bits, total_bytes = {}, 0.0, 0
        try:
            for domain in self.shards.domains:
                r = bits_per_byte(
                    lambda x, t, docs: self.module.loss_sum(x, t, self.real_vocab_size, docs),
                    self.shards.documents(domain, "val"),
                    self.cfg.data.context_length,
                    document_mask=self.cfg.data.document_mask,
                    max_windows=self.cfg.logging.eval_sequences,
                    batch_size=self.cfg.batch.micro_batch_size,
                    device=self.device,
                    dp_rank=self.dp_rank,
                    dp_size=self.dims.dp,
                    dp_group=self.dp_group,
                )
                results[f"val.{domain}.bpb"] = r["bpb"]
                nll_bits += r["bpb"] * r["bytes"]
                total_bytes += r["bytes"]
        finally:
            self.module.train()
        results["val.bpb"] = nll_bits / max(total_bytes, 1)
        return results

    # ----- the loop -----

    def run(self) -> dict:
        c = self.cfg
        total_steps = c.total_steps()
        latest = checkpoint.latest_checkpoint(self.checkpoint_root)
        if latest is not None:
            self.restore(latest)
        monitor = Monitor(self.out, total_steps, self.step, self.rank == 0, c.logging.progress_bar)
        if latest is not None:
            monitor.event(self.step, "resumed", checkpoint=str(latest))
        last_loss, final_eval, grown = float("nan"), {}, None
        try:
            while self.step < total_steps:
                if growth.growth_due(self.run_cfg, self.growth_stage, self.tokens):
                    grown = self.grow_checkpoint()
                    monitor.event(self.step, "grown", checkpoint=str(grown))
                    break
                self.growth_masks = advance_ramp(self.growth_masks, self.step)
                t0 = time.perf_counter()
                lr = self.set_lr()
                batch = self.stream.next_sequences(self.sequences_per_rank)
                loss = self.global_mean_loss(self.forward_backward(batch))
                norm = grad_norm(self.params, self.pp_group).item()
                anomaly = self.guard.verdict(loss, norm)
                if anomaly is not None:
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
            if grown is None:
                final_eval = self.evaluate()
                if final_eval:
                    monitor.log(self.step, {"tokens": self.tokens, **final_eval})
                if c.checkpoint.export_at_end:
                    self.export()
        finally:
            monitor.close()
        if grown is not None:
            # The next stage: a fresh trainer at the grown shape and the stage's layout resumes from it.
            self.module = self.optimizer = self.params = self.schedule = None
            return Trainer(self.run_cfg, self.stream_factory).run()
        return {"step": self.step, "tokens": self.tokens, "loss": last_loss, **final_eval}

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
        monitor.event(self.step, kind, loss=loss, grad_norm=norm, action=action, **self.guard.summary())
        if action == "stop" or self.events > self.cfg.stability.max_events:
            raise SpikeStop(
                f"stability guard: {kind} at step {self.step} (loss {loss:.4g}, grad norm {norm:.4g})"
            )
        if action == "rollback":
            latest = checkpoint.latest_checkpoint(self.checkpoint_root)
            if latest is not None:
                # Weights and optimizer go back; the data stream stays past the offending batch.
                self.restore(latest, restore_stream=False)
                monitor.event(self.step, "rolled_back", checkpoint=str(latest))

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
