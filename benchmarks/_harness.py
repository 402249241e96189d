"""Shared benchmark harness: one timer, a data description of cases, one report.

A benchmark script declares its cases (``Case``: a workload, the unit its throughput is counted in and the
formula), the implementations that run each one (``Impl``: mmcore's or a peer's, with the amount of work one
call does), checks correctness itself, then calls ``run_cases`` and ``report``. ``report`` prints a table
with throughput and the speedup of every mmcore implementation over every peer of the same case (ratios of
throughput, so a peer timed on a smaller subset is still compared per item), appends one JSON line per
result to ``benchmarks/results/<bench>.jsonl`` and, when ``$OUT`` is set, writes the table as markdown there.

Every script takes ``--device {cpu,cuda}`` and ``--quick`` (see ``parse_args``); ``benchmarks/gpu_check.sh``
runs each ``bench_*.py`` with ``--device cuda``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"

# The machine's 1-minute load average when the benchmark started (this module is imported first). It lags by a
# minute, so the warning below rests on what other processes used while timing (``_others_cpu``).
LOADAVG_AT_START = os.getloadavg()[0]
# Cores' worth of CPU that other processes used during the last ``run_cases`` (None: not measurable here).
OTHERS_CPU: float | None = None
# Above this many cores of other work during a run, report() warns that the CPU numbers are unreliable.
OTHERS_CPU_WARN = 0.1

# Seconds of measurement per implementation on the CPU (blocked_autorange's min_run_time).
CPU_MIN_RUN_TIME = 2.0
CPU_MIN_RUN_TIME_QUICK = 0.2
# CUDA calls longer than this on their warm-up run are timed over CUDA_LONG_CALL_RUNS runs (see time_fn).
CUDA_LONG_CALL_S = 0.25
CUDA_LONG_CALL_RUNS = 3


def time_fn(
    fn: Callable[[], object], *, device: str, min_run_time: float = CPU_MIN_RUN_TIME, threads: int | None = None
) -> float:
    """Median seconds per call of ``fn()``, after warm-up.

    CUDA: after one warm-up call, ``triton.testing.do_bench`` (it warms up, flushes L2 between calls and
    synchronises), median; but a call whose second run takes more than ``CUDA_LONG_CALL_S`` -- a whole
    ``generate`` or training step -- is timed over ``CUDA_LONG_CALL_RUNS`` runs (that one included), median:
    do_bench would make at least eight more calls, more than the GPU machine's short time allows for such calls.
    CPU: ``torch.utils.benchmark.Timer.blocked_autorange`` for at least ``min_run_time`` seconds, median of
    its blocks. ``threads`` is the intra-op thread count while timing on the CPU (default: torch's current
    setting, so ATen ``parallel_for`` kernels use the cores a user would get); ``Timer`` alone would pin 1.
    """
    if torch.device(device).type == "cuda":
        import triton.testing

        def once() -> float:
            start = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            return time.perf_counter() - start

        once()  # warm-up: compilation, autotuning, allocator growth (not timed, not used to decide)
        first = once()
        if first <= CUDA_LONG_CALL_S:  # a short call: do_bench's many timed calls cost little
            return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
        runs = sorted([first] + [once() for _ in range(CUDA_LONG_CALL_RUNS - 1)])
        return runs[len(runs) // 2]
    from torch.utils import benchmark

    fn()  # warm-up: first-call costs (lazy imports, regex compilation, allocator growth) are not timed
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads or torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def peak_rss_growth(module: str, setup: str, run: str) -> int:
    """Bytes by which a fresh Python process's resident set rises above its level at the start of ``run``, at
    its highest while ``run`` executes (``setup`` and ``run`` both execute after ``from <module> import *``, with
    benchmarks/ on the path). The CPU's peak-memory measure.

    The process's high-water mark (VmHWM) is reset just before ``run`` (``/proc/self/clear_refs``, Linux), so
    nothing ``setup`` or the imports touched hides the run's peak; and glibc is told to serve every allocation
    above 64 KiB by mmap and give it back on free (``MALLOC_MMAP_THRESHOLD_``), so the resident set follows the
    live tensors instead of heap pages kept from earlier frees (with glibc's default, growing threshold, pages
    freed by ``setup`` were reused by ``run`` and an earlier version of this measure read 0 for runs that
    allocate 100+ MiB). Raises RuntimeError where /proc/self/clear_refs cannot be written."""
    import sys
    import textwrap

    code = "\n".join(
        [
            "import sys",
            f"sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})",
            f"from {module} import *",
            textwrap.dedent(setup),
            "def _status(key):",
            "    for line in open('/proc/self/status'):",
            "        if line.startswith(key + ':'):",
            "            return int(line.split()[1]) * 1024",
            "    raise RuntimeError(f'/proc/self/status has no {key}')",
            "try:",
            "    open('/proc/self/clear_refs', 'w').write('5')",
            "except OSError as e:",
            "    raise RuntimeError(f'peak memory needs a writable /proc/self/clear_refs (Linux): {e}') from None",
            "before = _status('VmRSS')",
            textwrap.dedent(run),
            "print(_status('VmHWM') - before)",
        ]
    )
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"peak-memory subprocess failed (rc {out.returncode}):\n{out.stderr[-2000:]}")
    return int(out.stdout.split()[-1])


@dataclass(frozen=True)
class Impl:
    """One implementation of a case. ``fn()`` does ``work`` units of the case's work (strings, boxes, FLOP)."""

    name: str
    fn: Callable[[], object]
    work: float
    peer: bool = False  # True for what mmcore is compared against (transformers, PyTorch, ...)
    device: str = "cpu"  # where fn runs, which picks the timer
    threads: int | None = None  # CPU intra-op threads while timing (None: torch's current setting)
    note: str = ""


@dataclass(frozen=True)
class Case:
    """A workload. Throughput of an implementation = ``impl.work / seconds``, in ``unit``/s; ``formula`` says
    how ``work`` was counted (it is printed under the table and stored with the results)."""

    name: str
    unit: str
    formula: str
    impls: Sequence[Impl]


@dataclass
class Result:
    case: str
    impl: str
    peer: bool
    device: str
    threads: int
    seconds: float
    work: float
    unit: str
    note: str = ""
    speedup: dict[str, float] = field(default_factory=dict)  # mmcore rows: peer name -> throughput ratio

    @property
    def throughput(self) -> float:
        return self.work / self.seconds


def parse_args(description: str, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The flags every bench script takes. ``--device cuda`` adds the CUDA implementations (CPU-only
    workloads still run on the CPU); ``--quick`` is a small smoke run whose numbers are not results."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--quick", action="store_true", help="small sizes and short timing: a smoke run")
    p.add_argument("--no-save", action="store_true", help="print the table only; append nothing to results/")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible to torch")
    return args


def _cpu_snapshot() -> tuple[float, float, float] | None:
    """(busy seconds of all cores from /proc/stat, this process's CPU seconds, wall seconds), or None."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    t = os.times()
    busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
    return busy, t.user + t.system, time.monotonic()


def _others_cpu(start, end) -> float | None:
    """Average number of cores busy with other processes between two snapshots."""
    if start is None or end is None or end[2] <= start[2]:
        return None
    return max(0.0, ((end[0] - start[0]) - (end[1] - start[1])) / (end[2] - start[2]))


def run_cases(cases: Sequence[Case], *, quick: bool = False) -> list[Result]:
    """Time every implementation of every case; fill in the speedups of mmcore over each peer. Also measures how
    much CPU other processes took meanwhile (``OTHERS_CPU``), which ``report`` stores and warns about."""
    global OTHERS_CPU
    min_run_time = CPU_MIN_RUN_TIME_QUICK if quick else CPU_MIN_RUN_TIME
    results = []
    before = _cpu_snapshot()
    for case in cases:
        rows = []
        for impl in case.impls:
            threads = impl.threads or torch.get_num_threads()
            seconds = time_fn(impl.fn, device=impl.device, min_run_time=min_run_time, threads=threads)
            rows.append(
                Result(case.name, impl.name, impl.peer, impl.device, threads, seconds, impl.work, case.unit, impl.note)
            )
            # the throughput too, so a run cut off before its table (a GPU step's time limit) still gives figures
            print(
                f"  timed {case.name} / {impl.name}: {_fmt_seconds(seconds)}, "
                f"{_fmt_rate(impl.work / seconds, case.unit)}",
                flush=True,
            )
        peers = [r for r in rows if r.peer]
        for r in rows:
            if not r.peer:
                r.speedup = {p.impl: r.throughput / p.throughput for p in peers}
        results.extend(rows)
    OTHERS_CPU = _others_cpu(before, _cpu_snapshot())
    return results


# ------------------------------------------------------------------------------------------- metadata


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout


def dirty_paths(limit: int = 20) -> list[str]:
    """The paths where the tree differs from HEAD (first ``limit``; result files excluded), so a reader can
    tell whether they touch the code that was measured."""
    status = _git("status", "--porcelain", "--", ".", ":(exclude)benchmarks/results") or ""
    return [line[3:] for line in status.splitlines()][:limit]


def git_commit() -> str:
    """``git rev-parse --short HEAD``, with ``-dirty`` when tracked or untracked files (other than result files)
    differ from it."""
    head = _git("rev-parse", "--short", "HEAD")
    if head is None:
        return "unknown"
    return head.strip() + ("-dirty" if dirty_paths(1) else "")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name()
    return f"{cpu_name()} ({os.cpu_count()} cores)"


def environment(device: str) -> dict:
    """Device, versions, commit and date recorded with every result."""
    import importlib.metadata as md

    def version(dist: str) -> str | None:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return None

    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": git_commit(),
        "dirty_paths": dirty_paths(),
        "device_name": device_name(device),
        "cpu": f"{cpu_name()} ({os.cpu_count()} cores)",
        "torch_threads": torch.get_num_threads(),
        "others_cpu": OTHERS_CPU,  # cores' worth of CPU other processes used while timing
        "loadavg_start": LOADAVG_AT_START,
        "loadavg_end": os.getloadavg()[0],  # includes this benchmark's own threads
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": version("triton"),
        "transformers": version("transformers"),
    }


# --------------------------------------------------------------------------------------------- report


def _fmt_seconds(s: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if s >= scale:
            return f"{s / scale:.3g} {unit}"
    return f"{s / 1e-9:.3g} ns"


def _fmt_rate(x: float, unit: str) -> str:
    for prefix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.3g} {prefix}{unit}/s"
    return f"{x:.3g} {unit}/s"


def _table(results: Sequence[Result]) -> list[list[str]]:
    peers = list(dict.fromkeys(r.impl for r in results if r.peer))
    head = ["case", "implementation", "device", "threads", "time", "work", "throughput"]
    head += [f"x vs {p}" for p in peers] + ["note"]
    rows = [head]
    for r in results:
        ratios = [
            ("peer" if r.impl == p else "") if r.peer else (f"{r.speedup[p]:.2f}x" if p in r.speedup else "")
            for p in peers
        ]
        rows.append(
            [
                r.case,
                r.impl,
                r.device,
                str(r.threads),
                _fmt_seconds(r.seconds),
                f"{r.work:g} {r.unit}",
                _fmt_rate(r.throughput, r.unit),
                *ratios,
                r.note,
            ]
        )
    return rows


def format_table(results: Sequence[Result], markdown: bool = False) -> str:
    rows = _table(results)
    if markdown:
        lines = ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
        lines.insert(1, "|" + "|".join("---" for _ in rows[0]) + "|")
        return "\n".join(lines)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def report(
    bench: str,
    cases: Sequence[Case],
    results: Sequence[Result],
    *,
    device: str,
    quick: bool = False,
    save: bool = True,
    extra: dict | None = None,
) -> dict:
    """Print the table; append the results to ``benchmarks/results/<bench>.jsonl`` (unless ``save`` is False
    or the run is ``quick``); write ``$OUT/<bench>.md`` and ``$OUT/<bench>.jsonl`` when ``$OUT`` is set.
    ``extra``: benchmark facts stored with every row (input sizes, seeds). Returns the environment record."""
    env = environment(device)
    env.update({"bench": bench, "quick": quick, **(extra or {})})
    formulas = [f"- {c.name}: throughput = {c.formula} / time" for c in cases]
    header = (
        f"{bench}: {env['device_name']}, torch {env['torch']}, triton {env['triton']}, "
        f"transformers {env['transformers']}, commit {env['commit']}, {env['date']}"
        + (" (QUICK: smoke run, not a result)" if quick else "")
    )
    print()
    print(header)
    print(format_table(results))
    print("\n".join(formulas))
    print("x vs P: throughput of the mmcore implementation / throughput of peer P, both measured in this run.")
    if OTHERS_CPU is not None and OTHERS_CPU > OTHERS_CPU_WARN:
        print(
            f"WARNING: other processes used {OTHERS_CPU:.2f} of {os.cpu_count()} cores while this ran: "
            "the CPU numbers are unreliable."
        )

    lines = [
        json.dumps(
            {
                **env,
                "case": r.case,
                "impl": r.impl,
                "peer": r.peer,
                "impl_device": r.device,
                "threads": r.threads,
                "seconds": r.seconds,
                "work": r.work,
                "unit": r.unit,
                "throughput": r.throughput,
                "speedup": r.speedup,
                "note": r.note,
            },
            sort_keys=True,
        )
        for r in results
    ]
    if save and not quick:
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / f"{bench}.jsonl"
        with path.open("a") as f:
            f.write("\n".join(lines) + "\n")
        print(f"appended {len(lines)} results to {path.relative_to(ROOT)}")
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        md = [f"## {header}", "", format_table(results, markdown=True), "", *formulas, ""]
        with (Path(out) / f"{bench}.md").open("a") as f:
            f.write("\n".join(md) + "\n")
        with (Path(out) / f"{bench}.jsonl").open("a") as f:
            f.write("\n".join(lines) + "\n")
        print(f"wrote {out}/{bench}.md and {out}/{bench}.jsonl")
    return env
