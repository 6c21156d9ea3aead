"""`teleflm plan`: parameters, FLOPs, memory per device, time and cost of a run before renting it.

Memory follows how teleflm trains (docs/training.md; details in `memory_per_device`): FSDP2
shards fp32 master weights, fp32 gradients and AdamW's two fp32 moments (16 bytes per parameter);
tensor parallel splits every matrix by `tp`; under 1F1B pipeline stage 0 holds `pp` micro-batches of
activations. Activations are counted from what the model's own forward saves for backward (fused
attention, no dropout), so the estimate can be checked against a measured peak
(tests/plan/test_estimate_memory.py).
"""

from teleflm.model.size import flops_per_token, parameter_counts
from teleflm.parallel.mesh import ParallelDims

GIB = 2**30

# name: (memory in GiB, peak dense bf16 FLOP/s)
DEVICES = {
    "a800": (80, 312e12),
    "a100": (80, 312e12),
    "a100-40g": (40, 312e12),
    "h800": (80, 989e12),
    "h100": (80, 989e12),
    "h200": (141, 989e12),
    "b200": (180, 2250e12),
    "l40s": (48, 362e12),
    "v100": (32, 125e12),
    "mi300x": (192, 1307e12),
}


def layer_activation_elements(c, tp: int) -> float:
    """Elements one decoder layer saves for backward per token (fused attention, no dropout, no
    sequence parallel), counted from the model's own forward: each RMSNorm keeps its input, the
    normalised input and the weighted output (3h, replicated under TP); attention keeps q, k, v, its
    output and the reshaped output (3h + 2 kv); the SwiGLU MLP keeps gate, silu(gate), up and their
    product (4 i). The rest is split by tensor parallelism."""
    h, kv, i = c.hidden_size, c.num_key_value_heads * c.head_dim, c.intermediate_size
    return 6 * h + (3 * h + 2 * kv + 4 * i) / tp


def stage_memory(
    c,
    layout: ParallelDims,
    context_length: int,
    micro_batch_size: int,
    activation_checkpointing: bool,
    mixed_precision: str,
    first: bool,
    last: bool,
    micro_batches: int = 1,
) -> dict[str, float]:
    """Bytes of what a device of a pipeline stage holds in a step (`first`: it holds the embedding
    and, under 1F1B, `pp` micro-batches in flight; `last`: the readout and the logits); `peak_bytes`
    adds up what is alive at once.

    FSDP2 keeps fp32 master weights, fp32 gradients and AdamW's two fp32 moments sharded over
    `tp x dp_shard` (16 bytes per parameter); under FSDP the root (embedding, readout) stays gathered
    from forward to backward, two layers are gathered at a time, and a group's unsharded gradient
    lives until its reduce-scatter (the root's, the largest, at the end of backward). The trainer
    reduce-scatters on a step's last micro-batch only, so with several micro-batches FSDP2 keeps
    every unsharded gradient, fp32, through the step (`accumulated_gradients`), and under a pipeline
    the stage's weights stay gathered from its first backward to the last. Without FSDP, bf16
    autocast caches a bf16 copy of every weight. The readout: without pipeline parallel the
    trainer's chunked loss (teleflm.model.loss) holds one chunk of fp32 logits at a time and keeps
    the gradients of the hidden states and of the readout weight that its forward computes; a
    pipeline's last stage has the whole logits, their own copy, log-softmax's saved fp32 output and
    two fp32 gradients."""
    act_bytes = 2 if mixed_precision == "bf16" else 4
    n = parameter_counts(c)
    tokens, h = context_length * micro_batch_size, c.hidden_size
    shard = layout.tp * layout.dp_shard
    layers = c.num_hidden_layers / layout.pp
    per_layer_act = act_bytes * tokens * layer_activation_elements(c, layout.tp)
    root = (n["embedding"] if first else 0) + (n["readout"] + n["final_norm"] if last else 0)
    params = n["per_layer"] * layers + root
    in_flight = layout.pp if first else 1
    if activation_checkpointing:  # layer inputs, plus one layer recomputed in backward
        activations = in_flight * layers * act_bytes * tokens * h + per_layer_act
    else:
        activations = in_flight * layers * per_layer_act
    activations += act_bytes * tokens * 4 * h  # embedding output, final norm
    vocab = c.vocab_size / layout.tp
    if not last:
        logits = 0
    elif layout.pp == 1:
        from teleflm.model.loss import CHUNK_LOGITS

        chunk = min(tokens, max(1, CHUNK_LOGITS // vocab))
        lower = mixed_precision == "bf16"  # a bf16 copy of the chunk's gradient and of the weight
        logits = (4 + 2 * lower) * chunk * vocab + act_bytes * tokens * h + (4 + 2 * lower) * vocab * h
    else:
        logits = (act_bytes + 12) * tokens * vocab
    gradients = 4 * params / shard
    if layout.dp_shard > 1 and layout.pp > 1 and micro_batches > 1:
        # torch's pipeline schedules keep an FSDP stage unsharded from its first backward to the
        # step's last (reshard_after_backward off until the gradients are reduced)
        gathered = act_bytes * params / layout.tp
    elif layout.dp_shard > 1:
        gathered = act_bytes * (root + 2 * n["per_layer"]) / layout.tp
    else:
        gathered = 2 * params / layout.tp if mixed_precision == "bf16" else 0
    if layout.dp_shard > 1:
        # The unsharded gradient, FSDP2's fp32 reduce-scatter input and the collective's own
        # buffer (gloo copies; NCCL reduces in place, so this errs high on GPUs by 4 bytes).
        unsharded_grads = (act_bytes + 8) * (root + n["per_layer"]) / layout.tp
        accumulated = 4 * params / layout.tp if micro_batches > 1 else 0
    else:
        unsharded_grads = 0
        accumulated = gradients if micro_batches > 1 else 0  # the .grad tensors themselves
    return {
        "weights": 4 * params / shard,
        "gathered_weights": gathered,
        "optimizer": 8 * params / shard,
        "activations": activations + logits,
        "accumulated_gradients": accumulated,
        "gradients": gradients,
        "unsharded_gradients": unsharded_grads,
    }


def peak_bytes(memory: dict[str, float]) -> float:
    """The step's peak from `stage_memory`'s figures. Weights, gathered weights and moments live
    throughout; the rest peaks at one of two moments: the start of the last backward, with every
    activation and the gradients accumulated so far, or the end of backward, with the sharded
    gradients and the root's unsharded gradient in its reduce-scatter (activations are freed layer
    by layer as backward runs, and `zero_grad` frees the gradients before the next step)."""
    held = memory["weights"] + memory["gathered_weights"] + memory["optimizer"]
    start = memory["activations"] + memory["accumulated_gradients"]
    end = memory["gradients"] + memory["unsharded_gradients"]
    return held + max(start, end)


def memory_per_device(
    c,
    layout: ParallelDims,
    context_length: int,
    micro_batch_size: int,
    activation_checkpointing: bool,
    mixed_precision: str = "bf16",
    micro_batches: int = 1,
) -> dict[str, float]:
    """Bytes on the busiest device (`stage_memory`): the pipeline stage 0 or the last, whichever
    peaks higher; "total" is that peak (`peak_bytes`)."""
    stages = [(True, layout.pp == 1)] + ([(False, True)] if layout.pp > 1 else [])
    args = (c, layout, context_length, micro_batch_size, activation_checkpointing, mixed_precision)
    memory = max((stage_memory(*args, *s, micro_batches) for s in stages), key=peak_bytes)
    memory["total"] = peak_bytes(memory)
    return memory


def growth_shards_per_device(c, world: int) -> float:
    """Bytes of a rank's shards of a grown model and its two AdamW moments while growth builds them
    (fp32, plain FSDP over all `world` ranks, teleflm.train.growth)."""
    return 12 * parameter_counts(c)["total"] / world


def run_time(c, tokens: float, context_length: int, gpus: int, peak: float, mfu: float) -> dict[str, float]:
    flops = flops_per_token(c, context_length) * tokens
    seconds = flops / (gpus * peak * mfu)
    return {"flops": flops, "seconds": seconds, "days": seconds / 86400, "tflops_per_gpu": peak * mfu / 1e12}


def pipeline_bubble(layout: ParallelDims, micro_batches: int) -> float:
    """Idle share of a 1F1B / GPipe step: (pp - 1) / (micro_batches + pp - 1)."""
    return (layout.pp - 1) / (micro_batches + layout.pp - 1)


def candidate_layouts(c, gpus: int) -> list[ParallelDims]:
    """Every TP (within a node, dividing heads) x PP (dividing layers) whose DP fills the GPUs."""
    layouts = []
    for tp in (1, 2, 4, 8):
        if c.num_attention_heads % tp or c.num_key_value_heads % tp or c.vocab_size % tp:
            continue
        for pp in range(1, c.num_hidden_layers + 1):
            if c.num_hidden_layers % pp or gpus % (tp * pp) or pp > 32:
                continue
            layouts.append(ParallelDims(dp_shard=gpus // (tp * pp), tp=tp, pp=pp))
    return layouts


def plan(
    cfg,
    gpus: int,
    gpu_type: str,
    tokens: float | None = None,
    price_per_gpu_hour: float | None = None,
    mfu: float = 0.5,
) -> dict:
    """Everything `teleflm plan` prints, for a TrainConfig on `gpus` devices of `gpu_type`."""
    if gpu_type not in DEVICES:
        raise ValueError(f"unknown --gpu-type {gpu_type!r}; known: {', '.join(DEVICES)}")
    if not 0 < mfu <= 1:
        raise ValueError(f"--mfu must be in (0, 1], got {mfu}")
    memory_gib, peak = DEVICES[gpu_type]
    c = cfg.model_config()
    p = cfg.parallel
    T, mbs, ac = cfg.data.context_length, cfg.batch.micro_batch_size, p.activation_checkpointing
    mp = p.mixed_precision
    rest = p.dp_replicate * p.tp * p.pp
    if gpus % rest:
        raise ValueError(f"{gpus} GPUs do not divide into dp_replicate x tp x pp = {rest}")
    layout = ParallelDims(dp_shard=gpus // rest, tp=p.tp, pp=p.pp, dp_replicate=p.dp_replicate)
    tokens = tokens or cfg.schedule.total_tokens
    micro_batches = max(cfg.micro_batches_per_step(layout.dp), 1)
    memory = memory_per_device(c, layout, T, mbs, ac, mp, micro_batches)

    def peak_gib(checkpointing: bool) -> float:
        return memory_per_device(c, layout, T, mbs, checkpointing, mp, micro_batches)["total"] / GIB

    timing = run_time(c, tokens, T, gpus, peak, mfu)
    result = {
        "parameters": parameter_counts(c),
        "flops_per_token": flops_per_token(c, T),
        "layout": str(layout),
        "memory_gib": {k: v / GIB for k, v in memory.items()},
        "memory_without_checkpointing_gib": peak_gib(False),
        "memory_with_checkpointing_gib": peak_gib(True),
        "device_memory_gib": memory_gib,
        "fits": memory["total"] / GIB <= 0.9 * memory_gib,  # 10% for the allocator and NCCL buffers
        "pipeline_bubble": pipeline_bubble(layout, micro_batches),
        "tokens": tokens,
        "step_seconds": cfg.batch.global_batch_tokens * flops_per_token(c, T) / (gpus * peak * mfu),
        **timing,
        "cost": timing["seconds"] / 3600 * gpus * price_per_gpu_hour if price_per_gpu_hour else None,
        "mfu": mfu,
    }
    fitting = []
    for candidate in candidate_layouts(c, gpus):
        for checkpointing in (False, True):
            steps = max(cfg.micro_batches_per_step(candidate.dp), 1)
            total = memory_per_device(c, candidate, T, mbs, checkpointing, mp, steps)["total"] / GIB
            if total <= 0.9 * memory_gib:
                fitting.append((candidate.tp * candidate.pp, checkpointing, str(candidate), total))
                break
    result["layouts_that_fit"] = [
        {"layout": name, "activation_checkpointing": ckpt, "memory_gib": round(total, 1)}
        for _, ckpt, name, total in sorted(fitting)[:6]
    ]
    return result


def format_plan(r: dict, gpus: int, gpu_type: str) -> str:
    n = r["parameters"]
    m = r["memory_gib"]
    lines = [
        f"parameters      {n['total'] / 1e9:.3f}B ({n['total']:,}; embedding {n['embedding'] / 1e9:.2f}B, layers {n['layers'] / 1e9:.2f}B, readout {n['readout'] / 1e9:.2f}B)",
        f"FLOPs per token {r['flops_per_token'] / 1e9:.1f} GFLOP (6N + attention)",
        f"layout          {r['layout']} on {gpus} x {gpu_type}",
        "memory / device "
        + ", ".join(f"{k} {v:.1f}" for k, v in m.items() if k != "total")
        + f" -> peak {m['total']:.1f} GiB of {r['device_memory_gib']} ({'fits' if r['fits'] else 'DOES NOT FIT'})",
        f"                without activation checkpointing {r['memory_without_checkpointing_gib']:.1f} GiB, with {r['memory_with_checkpointing_gib']:.1f} GiB",
        f"pipeline bubble {r['pipeline_bubble']:.1%}",
        f"time            {r['tokens'] / 1e9:,.0f}B tokens at {r['mfu']:.0%} MFU ({r['tflops_per_gpu']:.0f} TFLOP/s per GPU): "
        f"{r['step_seconds']:.1f} s per step, {r['days']:.1f} days",
    ]
    if r["cost"] is not None:
        lines.append(f"cost            {r['cost']:,.0f} at the given price per GPU-hour")
    lines.append("layouts that fit (fewest model-parallel GPUs first):")
    lines += [
        f"  {x['layout']}{' + activation checkpointing' if x['activation_checkpointing'] else ''}: {x['memory_gib']} GiB"
        for x in r["layouts_that_fit"]
    ]
    if not r["layouts_that_fit"]:
        lines.append("  none: more GPUs, a smaller micro-batch or a larger device")
    return "\n".join(lines)
