"""Counting bad input instead of stopping on it: malformed rows, missing images, boxes out of range.

Data readers, ``mmcore grit`` and ``mmcore eval`` skip what they cannot use, note it here, and report the counts
at the end (``summary()`` for a JSON report, ``line()`` for stderr). A few examples of each kind are kept, so the
report says where to look without holding every bad row in memory.
"""

from __future__ import annotations

from collections import Counter

MAX_EXAMPLES = 5  # per kind: enough to find the rows, bounded for runs over millions of them


class Problems:
    """Counts of skipped input by kind (``"malformed_row"``, ``"missing_image"``, ``"bad_box"``, ...), with the first
    ``MAX_EXAMPLES`` details of each kind."""

    def __init__(self):
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}

    def note(self, kind: str, detail: str | None = None, count: int = 1) -> None:
        self.counts[kind] += count
        if detail is not None:
            kept = self.examples.setdefault(kind, [])
            if len(kept) < MAX_EXAMPLES:
                kept.append(detail[:300])

    def update(self, other: Problems) -> None:
        """Add the counts (and examples, while room is left) of ``other``."""
        self.counts.update(other.counts)
        for kind, details in other.examples.items():
            kept = self.examples.setdefault(kind, [])
            kept.extend(details[: MAX_EXAMPLES - len(kept)])

    def __getitem__(self, kind: str) -> int:
        return self.counts[kind]

    def __bool__(self) -> bool:
        return any(self.counts.values())

    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> dict:
        """``{"counts": {kind: n}, "examples": {kind: [detail, ...]}}``, kinds sorted by name."""
        return {
            "counts": dict(sorted(self.counts.items())),
            "examples": {k: list(v) for k, v in sorted(self.examples.items())},
        }

    def line(self, prefix: str = "") -> str:
        """One line for stderr: ``prefix: 3 malformed_row, 1 missing_image`` (or ``no problems``)."""
        body = ", ".join(f"{n} {kind}" for kind, n in sorted(self.counts.items()) if n) or "no problems"
        return f"{prefix}: {body}" if prefix else body
