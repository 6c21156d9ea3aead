"""bf16 or fp32, by measurement. CPUs of one kind differ: with avx512_bf16 or AMX a bf16 matmul runs at
2-5x fp32, without them torch emulates it at about 1 GFLOP/s. So the rate is measured, never assumed."""

import time

import torch


def matmul_rate(dtype: torch.dtype, n: int = 2048, repeats: int = 4, trials: int = 3, device=None) -> float:
    """FLOP/s of an n x n matmul: the best of a few timings (a noisy neighbour only ever slows one)."""
    device = device or torch.device("cpu")
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    a @ b  # warm-up (kernel selection)
    best = float("inf")
    for _ in range(trials):
        if device.type != "cpu":
            torch.accelerator.synchronize()
        started = time.perf_counter()
        for _ in range(repeats):
            a @ b
        if device.type != "cpu":
            torch.accelerator.synchronize()
        best = min(best, (time.perf_counter() - started) / repeats)
    return 2 * n**3 / best


def bf16_is_fast(device=None) -> bool:
    """Whether bf16 matmuls run at least half as fast as fp32 here (native bf16), measured on a matmul
    small enough that emulated bf16 answers in a fraction of a second."""
    bf16 = matmul_rate(torch.bfloat16, n=512, repeats=2, trials=2, device=device)
    return bf16 >= 0.5 * matmul_rate(torch.float32, n=512, repeats=2, trials=2, device=device)
