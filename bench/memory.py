"""Peak memory of one call, in a fresh process: on CUDA the allocator's peak, on CPU (Linux) the growth
of the resident set (its high-water mark, reset just before the call, less what was resident then)."""

import multiprocessing


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        kb = next(line.split()[1] for line in f if line.startswith(field + ":"))
    return int(kb) * 1024


def _child(setup, args, queue) -> None:
    import torch

    run = setup(*args)  # builds the inputs; returns the call to measure
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        queue.put(torch.cuda.max_memory_allocated() - before)
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the high-water mark to what is resident now
        before = _status_bytes("VmRSS")
        run()
        queue.put(_status_bytes("VmHWM") - before)


def peak_bytes(setup, *args) -> int:
    """Peak bytes that `setup(*args)()` adds (`setup` a module-level function, so a child can import it)."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_child, args=(setup, args, queue))
    child.start()
    value = queue.get(timeout=1800)
    child.join()
    return value
