"""What both demos share: config checks, the optimizer, the learning-rate schedule, the thread count."""

from __future__ import annotations

import math
import os
import time

import torch


def check_positive_ints(config, names) -> None:
    """Each of ``names`` on ``config`` must be an int >= 1 (not a bool); the error names the config's class."""
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{type(config).__name__}.{name} must be a positive int, got {value!r}")


def check_threads(config) -> None:
    """``config.threads``: None (``default_threads``) or an int >= 1."""
    t = config.threads
    if t is not None and (isinstance(t, bool) or not isinstance(t, int) or t < 1):
        raise ValueError(f"{type(config).__name__}.threads must be None or a positive int, got {t!r}")


def make_optimizer(model, config) -> torch.optim.AdamW:
    """AdamW at ``config.lr``, betas (0.9, 0.98); ``config.weight_decay`` on matrices except embeddings, none on the
    rest (biases, norms, embeddings)."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.98))


def lr_at(config, step: int, steps: int) -> float:
    """Linear warmup over ``warmup_steps``, then cosine decay to a tenth of ``lr`` at ``steps``."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    t = min(1.0, (step - config.warmup_steps) / max(1, steps - config.warmup_steps))
    return config.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * t)))


def idle_cores(seconds: float = 0.5) -> float | None:
    """How many of this process's cores sat idle over the next ``seconds`` (Linux ``/proc/stat``), None where that
    cannot be read. Unlike the load average, which trails by a minute, this sees the machine as it is now."""

    def read():
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return values[3] + values[4], sum(values)  # idle + iowait, all

    try:
        idle0, total0 = read()
        time.sleep(seconds)
        idle1, total1 = read()
    except (OSError, ValueError, IndexError):
        return None
    cpus = os.cpu_count() or 1
    return cpus * (idle1 - idle0) / max(1, total1 - total0)


def default_threads() -> int:
    """The cores left idle by other work (``idle_cores``; the load average where that is unavailable), at least one
    and at most this process's cores. NOTE: on a busy machine one thread is several times faster than two: each of
    torch's parallel regions waits for its slowest thread's next time slice (measured on 2 cores at load 5:
    0.66-0.70 s per step with one thread, 3.2-6.3 s with two)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    idle = idle_cores()
    if idle is None:
        idle = cores - (os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0)
    return max(1, min(cores, round(idle)))
