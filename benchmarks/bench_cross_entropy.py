"""Fused linear cross-entropy vs PyTorch (linear + F.cross_entropy) and Liger-Kernel's fused linear
cross-entropy (when installed): time of forward + backward and extra peak memory.

Kosmos-2's head: H = 2048, V = 65037; N = 16k tokens on the GPU. The CPU case is smaller (N = 1024, H = 256)
so that a step takes about a second on 2 cores. Work = 3 matrix products of 2 N H V FLOP each (logits, dhidden,
dweight). Peak memory is measured beyond the inputs and the parameter gradient buffers: on CUDA with
torch.cuda.max_memory_allocated, on the CPU as the growth of the process's maximum resident set in a fresh
subprocess per implementation (ru_maxrss).
"""

from __future__ import annotations

import importlib.util
import json

import torch
from _harness import Case, Impl, parse_args, peak_rss_growth, report, run_cases

from mmcore.ops import fused_linear_cross_entropy

HAS_LIGER = importlib.util.find_spec("liger_kernel") is not None


def problem(n, h, v, dtype, device, seed=0):
    # Drawn on the device: on the CPU, the GPU case's 65037 x 2048 weight takes a second to draw, and a CUDA run
    # builds six problems.
    g = torch.Generator(device=device).manual_seed(seed)
    # in place: no temporaries, so a process's maximum resident set after this is the inputs themselves
    hidden = torch.randn(n, h, generator=g, device=device).div_(h**0.5).to(dtype).requires_grad_()
    weight = torch.randn(v, h, generator=g, device=device).div_(h**0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=g, device=device)
    labels[::10] = -100
    return hidden, weight, labels


def torch_step(hidden, weight, labels):
    logits = hidden @ weight.t()
    loss = torch.nn.functional.cross_entropy(logits.float(), labels)
    loss.backward()
    return loss


def mmcore_step(hidden, weight, labels):
    loss = fused_linear_cross_entropy(hidden, weight, labels)
    loss.backward()
    return loss


def liger_step(hidden, weight, labels):
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    loss = liger_fused_linear_cross_entropy(hidden, weight, labels)
    loss.backward()
    return loss


STEPS = {"mmcore": mmcore_step, "torch": torch_step, "liger": liger_step}


def check(n, h, v, dtype, device):
    """Loss and gradients of mmcore equal PyTorch's (to the dtype's rounding) before anything is timed."""
    a = problem(n, h, v, dtype, device)
    b = problem(n, h, v, dtype, device)
    la, lb = mmcore_step(*a), torch_step(*b)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert torch.allclose(la.float(), lb.float(), rtol=tol, atol=tol), (float(la), float(lb))
    for x, y in ((a[0].grad, b[0].grad), (a[1].grad, b[1].grad)):
        err = (x.float() - y.float()).abs().max() / y.float().abs().max()
        assert err < tol * 10, f"gradient relative error {float(err):.2e}"


def cuda_peak(step, n, h, v, dtype):
    args = problem(n, h, v, dtype, "cuda")
    for p in args[:2]:
        p.grad = torch.zeros_like(p)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step(*args)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def cpu_peak(name, n, h, v, dtype):
    setup = f"args = problem({n}, {h}, {v}, {dtype}, 'cpu')\nfor p in args[:2]: p.grad = torch.zeros_like(p)"
    return peak_rss_growth("bench_cross_entropy", setup, f"STEPS[{name!r}](*args)")


def main(argv=None):
    args = parse_args(__doc__.split("\n")[0], argv)
    cases, memory = [], {}
    # --device cuda runs the GPU problem only (the CPU one is the CPU machine's run; on the GPU machine it would
    # spend the short, shared time budget of gpu_check.sh)
    if args.device == "cuda":
        configs = [("cuda", 16384 if not args.quick else 1024, 2048, 65037, torch.bfloat16)]
    else:
        configs = [("cpu", 1024 if not args.quick else 128, 256, 65037, torch.float32)]
    for device, n, h, v, dtype in configs:
        check(min(n, 256), h, v, dtype, device)
        flop = 3 * 2 * n * h * v
        names = ["mmcore", "torch"] + (["liger"] if HAS_LIGER and device == "cuda" else [])
        impls = []
        for name in names:
            inputs = problem(n, h, v, dtype, device)

            def fn(step=STEPS[name], inputs=inputs):
                for p in inputs[:2]:
                    p.grad = None
                return step(*inputs)

            impls.append(Impl(name, fn, flop, peer=name != "mmcore", device=device))
        label = f"{device} N={n} H={h} V={v} {str(dtype).replace('torch.', '')} fwd+bwd"
        cases.append(Case(label, "FLOP", "3 * 2 * N * H * V", impls))
        for name in names:
            peak = cuda_peak(STEPS[name], n, h, v, dtype) if device == "cuda" else cpu_peak(name, n, h, v, dtype)
            memory[f"{label} / {name}"] = peak
    results = run_cases(cases, quick=args.quick)
    logits_bytes = {c.name: int(c.name.split("N=")[1].split()[0]) * 65037 * 4 for c in cases}
    print("\nextra peak memory (beyond inputs and gradient buffers):")
    for key, peak in memory.items():
        case = key.split(" / ")[0]
        print(f"  {key}: {peak / 2**20:.0f} MiB ({peak / logits_bytes[case]:.2f} x the float32 logits)")
    report(
        "cross_entropy",
        cases,
        results,
        device=args.device,
        quick=args.quick,
        save=not args.no_save,
        extra={"peak_memory_bytes": memory, "float32_logits_bytes": logits_bytes},
    )
    print(json.dumps({k: round(v / 2**20, 1) for k, v in memory.items()}))


if __name__ == "__main__":
    main()
