"""Decoding-step benchmark: mmcore.ops.grounded_decode_step against transformers' logits processors and sampling.

One step of Kosmos-2 grounded generation, vocabulary 65,037, sequences of about 200 tokens, batch 1, 8 and 64, in two
modes: greedy (Kosmos-2's default: no-repeat-3-gram, the box grammar, argmax) and sampling (the same, plus
temperature 0.7 and top-p 0.9, then a draw). The peer is what transformers' ``generate`` runs per step for the
same work: ``LogitsProcessorList([NoRepeatNGramLogitsProcessor(3), PrefixConstrainedLogitsProcessor(fn, 1)])``
(plus ``TemperatureLogitsWarper`` and ``TopPLogitsWarper`` when sampling), ``softmax`` + ``multinomial`` or
``argmax``, the pad mix of finished rows and the append of the token; ``fn`` is the box grammar as a
``prefix_allowed_tokens_fn`` (``mmcore.ops.decoding.prefix_allowed_tokens_fn``: the state from the sequence's tail,
allowed lists built once). A second peer row returns those lists as index tensors (cached), the fastest way to
feed that processor.

Before timing, every implementation's processed logits are compared with transformers' (equal; when sampling, the
top-p kept sets may differ only by tokens at the cutoff, where transformers' float32 softmax and mmcore's float64
sums round differently) and the greedy tokens must equal transformers' argmax.

``--device cpu`` times the ``cpp`` (all threads and one) and ``torch`` backends against transformers on the CPU;
``--device cuda`` times only the GPU rows (the CPU ones are the CPU machine's run): the ``triton`` and ``torch``
backends against transformers on CUDA tensors.

    python benchmarks/bench_decoding.py [--quick] [--device {cpu,cuda}] [--no-save]
"""

from __future__ import annotations

import sys

import torch
from _harness import Case, Impl, parse_args, report, run_cases
from transformers.generation.logits_process import (
    LogitsProcessorList,
    NoRepeatNGramLogitsProcessor,
    PrefixConstrainedLogitsProcessor,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from mmcore.ops import DecodeState, GroundingTokens, grounded_decode_step
from mmcore.ops.decoding import prefix_allowed_tokens_fn

TOKENS = GroundingTokens.kosmos2()
VOCAB = 65037
SEQ_LEN = 200  # a Kosmos-2 prompt (<s> <image> 64 image ids </image> <grounding> ...) and its grounded output so far
NGRAM = 3
BATCHES, BATCHES_QUICK = (1, 8, 64), (1, 8)
MODES = {"greedy": {}, "sample": {"do_sample": True, "temperature": 0.7, "top_p": 0.9}}
MAX_NEW_TOKENS = 64  # the timed state is rewound every MAX_NEW_TOKENS steps, so sequences stay at 200-264 tokens
SEED = 0
# mmcore rows: (backend, device, threads; None: torch's setting)
CPU_RUNS = [("cpp", "cpu", None), ("cpp", "cpu", 1), ("torch", "cpu", None)]
GPU_RUNS = [("triton", "cuda", None), ("torch", "cuda", None)]


def prompts(batch: int, seed: int = SEED) -> torch.Tensor:
    """(batch, SEQ_LEN) Kosmos-2-like sequences: image ids, then words with grounded spans, each row ending so that
    the grammar is in one state of a cycle that is half TEXT (rows 0, 1, 2, 7 of every 8) and then, in turn,
    right after ``</phrase>``, after ``<object>``, after a top-left, after a bottom-right."""
    g = torch.Generator().manual_seed(seed)
    t = TOKENS
    rows = []
    for r in range(batch):
        head = [0, 64003, *range(4, 68), 64004, 64012]
        body = []
        while len(head) + len(body) < SEQ_LEN:
            words = torch.randint(100, 60000, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g).tolist()
            tl = int(torch.randint(0, 31, (1,), generator=g)) * 32 + int(torch.randint(0, 16, (1,), generator=g))
            body += [t.phrase_open, *words[:2], t.phrase_close, t.object_open, t.first_loc + tl]
            body += [t.first_loc + tl + 33, t.object_close, *words[2:]]
        tail = {
            3: [t.phrase_open, 500, t.phrase_close],
            4: [t.phrase_open, 500, t.phrase_close, t.object_open],
            5: [t.phrase_open, 500, t.phrase_close, t.object_open, t.first_loc + 100],
            6: [t.phrase_open, 500, t.phrase_close, t.object_open, t.first_loc + 100, t.first_loc + 200],
        }.get(r % 8, [700, 800, 900])
        row = head + body
        rows.append(row[: SEQ_LEN - len(tail)] + tail)
    return torch.tensor(rows, dtype=torch.int64)


def hf_processors(mode: str) -> LogitsProcessorList:
    procs = LogitsProcessorList(
        [
            NoRepeatNGramLogitsProcessor(NGRAM),
            PrefixConstrainedLogitsProcessor(prefix_allowed_tokens_fn(TOKENS, VOCAB), num_beams=1),
        ]
    )
    if mode == "sample":
        procs += [TemperatureLogitsWarper(MODES[mode]["temperature"]), TopPLogitsWarper(MODES[mode]["top_p"])]
    return procs


def hf_processors_tensor_fn(mode: str, device: str) -> LogitsProcessorList:
    """The same, with the allowed lists handed over as cached index tensors (no list -> tensor per call)."""
    lists = prefix_allowed_tokens_fn(TOKENS, VOCAB)
    cache: dict[int, torch.Tensor] = {}

    def fn(batch_id, input_ids):
        allowed = lists(batch_id, input_ids)
        if id(allowed) not in cache:
            cache[id(allowed)] = torch.tensor(allowed, device=device)
        return cache[id(allowed)]

    procs = hf_processors(mode)
    procs[1] = PrefixConstrainedLogitsProcessor(fn, num_beams=1)
    return procs


def hf_step(procs: LogitsProcessorList, input_ids: torch.Tensor, logits: torch.Tensor, do_sample: bool):
    """One step of transformers' sampling loop (generation/utils.py ``_sample``) after the model call."""
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.int64, device=input_ids.device)

    def run():
        scores = procs(input_ids, logits)
        if do_sample:
            next_tokens = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
        else:
            next_tokens = torch.argmax(scores, dim=-1)
        next_tokens = next_tokens * unfinished + TOKENS.pad * (1 - unfinished)
        return torch.cat([input_ids, next_tokens[:, None]], dim=-1)

    return run


def mmcore_step(backend: str, input_ids: torch.Tensor, logits: torch.Tensor, options: dict):
    """Steps a state; rewinds it (six small copies) when it is full, every MAX_NEW_TOKENS calls."""
    state = DecodeState.create(input_ids, MAX_NEW_TOKENS, TOKENS, seed=SEED)
    start = state.clone()

    def run():
        if state.steps_taken == MAX_NEW_TOKENS:
            for name in ("lengths", "box_state", "top_left", "steps", "finished"):
                getattr(state, name).copy_(getattr(start, name))
            state.steps_taken = 0
        return grounded_decode_step(logits, state, TOKENS, no_repeat_ngram_size=NGRAM, backend=backend, **options)

    return run


# ------------------------------------------------------------------------------------------ correctness


def check_scores(got: torch.Tensor, want: torch.Tensor, what: str, exact: bool) -> int:
    """Raise AssertionError unless the processed logits equal transformers'. With ``exact=False`` (top-p), a row
    may keep or drop up to 3 more tokens than transformers when they sit at the cutoff (their score lies between
    the two smallest kept scores). Returns the number of such rows."""
    got, want = got.cpu(), want.cpu()
    both = torch.isfinite(got) & torch.isfinite(want)
    if not torch.equal(got[both], want[both]):
        r, c = ((got != want) & both).nonzero()[0].tolist()
        raise AssertionError(f"{what}: processed logits differ at row {r} token {c}: {got[r, c]} vs {want[r, c]}")
    differ = torch.isfinite(got) != torch.isfinite(want)
    rows = differ.any(1).nonzero().flatten().tolist()
    if rows and exact:
        r = rows[0]
        raise AssertionError(f"{what}: banned tokens differ in row {r}: {differ[r].nonzero().flatten()[:8].tolist()}")
    for r in rows:
        lo = min(got[r][torch.isfinite(got[r])].min(), want[r][torch.isfinite(want[r])].min())
        hi = max(got[r][torch.isfinite(got[r])].min(), want[r][torch.isfinite(want[r])].min())
        vals = torch.where(torch.isfinite(got[r]), got[r], want[r])[differ[r]]
        if differ[r].sum() > 3 or not ((vals >= lo) & (vals <= hi)).all():
            raise AssertionError(f"{what}: row {r} keeps other tokens than transformers away from the top-p cutoff")
    return len(rows)


def check_case(backends, input_ids, logits, mode) -> str:
    procs = hf_processors(mode)
    want_scores = procs(input_ids, logits.clone())
    notes = []
    tokens = {}
    for backend in backends:
        state = DecodeState.create(input_ids, 1, TOKENS, seed=SEED)
        got, scores = grounded_decode_step(
            logits, state, TOKENS, no_repeat_ngram_size=NGRAM, backend=backend, return_scores=True, **MODES[mode]
        )
        n = check_scores(scores, want_scores, f"{backend} ({logits.device.type}, {mode})", exact=mode == "greedy")
        if n:
            notes.append(f"{backend}: {n} row(s) with a top-p cutoff token kept/dropped unlike transformers")
        if mode == "greedy":
            want = want_scores.argmax(-1)
            assert torch.equal(got.cpu(), want.cpu()), f"{backend}: greedy tokens differ from transformers' argmax"
        else:
            assert torch.isfinite(scores.gather(1, got[:, None])).all(), f"{backend}: sampled a filtered token"
        tokens[backend] = got.cpu()
    if {"cpp", "torch"} <= set(tokens):
        assert torch.equal(tokens["cpp"], tokens["torch"]), "cpp and torch backends drew different tokens"
    return "; ".join(notes)


# ------------------------------------------------------------------------------------------ cases


def decoding_cases(batch: int, runs: list[tuple[str, str, int | None]]) -> list[Case]:
    """The greedy and sampling cases at ``batch``: the mmcore ``runs`` and transformers on each of their devices."""
    input_ids = prompts(batch)
    logits = torch.randn(batch, VOCAB, generator=torch.Generator().manual_seed(batch)) * 2
    devices = sorted({d for _, d, _ in runs})
    cases = []
    for mode, options in MODES.items():
        notes = []
        for dev in devices:
            backends = [b for b, d, t in runs if d == dev and t is None]
            note = check_case(backends, input_ids.to(dev), logits.to(dev), mode)
            if note:
                notes.append(note)
        if notes:
            print(f"  batch {batch} {mode}: " + "; ".join(notes))
        impls = [
            Impl(
                f"mmcore {backend} ({dev}{', 1 thread' if threads == 1 else ''})",
                mmcore_step(backend, input_ids.to(dev), logits.to(dev), options),
                batch,
                device=dev,
                threads=threads,
                note="grounded_decode_step (one launch on CUDA)",
            )
            for backend, dev, threads in runs
        ]
        for dev in devices:
            ids, lg = input_ids.to(dev), logits.to(dev)
            do_sample = mode == "sample"
            impls.append(
                Impl(f"transformers ({dev})", hf_step(hf_processors(mode), ids, lg, do_sample), batch, peer=True,
                     device=dev, note="LogitsProcessorList + softmax/multinomial or argmax + pad mix + append")
            )  # fmt: skip
            impls.append(
                Impl(f"transformers, tensor fn ({dev})", hf_step(hf_processors_tensor_fn(mode, dev), ids, lg,
                     do_sample), batch, peer=True, device=dev, note="prefix_allowed_tokens_fn returns cached tensors")
            )  # fmt: skip
        cases.append(
            Case(
                f"{mode} batch {batch}",
                "rows",
                f"{batch} rows x 1 step (vocab {VOCAB}, ~{SEQ_LEN} tokens, logits {batch * VOCAB * 4 / 1e6:.2f} MB)",
                impls,
            )
        )
    return cases


def main(argv=None) -> int:
    args = parse_args(__doc__.splitlines()[0], argv)
    batches = BATCHES_QUICK if args.quick else BATCHES
    cases = [c for b in batches for c in decoding_cases(b, GPU_RUNS if args.device == "cuda" else CPU_RUNS)]
    print("processed logits equal to transformers' on every case (top-p: up to the cutoff token); timing")
    results = run_cases(cases, quick=args.quick)
    report(
        "decoding",
        cases,
        results,
        device=args.device,
        quick=args.quick,
        save=not args.no_save,
        extra={"seed": SEED, "vocab": VOCAB, "seq_len": SEQ_LEN, "ngram": NGRAM, "batches": list(batches),
               "modes": MODES, "max_new_tokens": MAX_NEW_TOKENS},
    )  # fmt: skip
    print()
    for r in results:
        if r.impl.startswith("mmcore cpp (cpu)") and r.case.endswith(f"batch {max(batches)}"):
            ratio = r.speedup["transformers (cpu)"]
            print(f"{r.case}: mmcore cpp vs transformers on the CPU {ratio:.1f}x (target >= 5x: "
                  f"{'met' if ratio >= 5 else 'NOT met'}); vs the tensor-fn variant "
                  f"{r.speedup['transformers, tensor fn (cpu)']:.1f}x")  # fmt: skip
        if r.impl.startswith("mmcore triton (cuda)") and r.case.endswith(f"batch {max(batches)}"):
            ratio = r.speedup["transformers (cuda)"]
            print(f"{r.case}: mmcore triton vs transformers on the GPU {ratio:.1f}x (target >= 10x: "
                  f"{'met' if ratio >= 10 else 'NOT met'})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
