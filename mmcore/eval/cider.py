"""CIDEr-D, the captioning metric COCO's evaluation code (pycocoevalcap's ``Cider``) reports as "CIDEr".

For each image, candidate c and references r_1..r_m (token lists):

    g_n(s)[w] = tf_s(w) * (log(N) - log(max(1, df(w))))      tf-idf of each n-gram w of length n, n = 1..4;
                                                             df(w): the images whose references contain w, N: images
    sim_n(c, r) = sum_w min(g_n(c)[w], g_n(r)[w]) * g_n(r)[w] / (|g_n(c)| |g_n(r)|)     (0 when either norm is 0)
                  * exp(-(l(c) - l(r))^2 / (2 sigma^2))        sigma = 6
    CIDEr-D(c, refs) = 10 * mean_n (1/m) sum_j sim_n(c, r_j)

The corpus score is the mean over images. As pycocoevalcap, the "length" l(s) in the penalty is the number of
bigrams of s (its tokens minus one), and the document frequencies come from the references of the evaluated images
themselves, so one image alone scores 0 (log N = 0).

Tokens are whitespace-separated: pycocoevalcap first runs the Stanford PTB tokenizer (Java), lower-casing and
removing punctuation; ``simple_tokenize`` does the lower-casing and punctuation removal for plain sentences (it is
not the PTB tokenizer: contractions such as "don't" stay one token).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence

SIGMA = 6.0
MAX_N = 4
_PUNCT = re.compile(r"[^\w\s']|(?<!\w)'|'(?!\w)")


def simple_tokenize(sentence: str) -> str:
    """Lower-case, drop punctuation (keeping apostrophes inside words), collapse whitespace."""
    return " ".join(_PUNCT.sub(" ", sentence.lower()).split())


def _ngrams(sentence: str, n: int) -> Counter:
    words = sentence.split()
    return Counter(tuple(words[i : i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def _vector(counts: Counter, df: Counter, log_n: float, n: int) -> tuple[list[dict], list[float], int]:
    """tf-idf per n-gram length, the norms, and the bigram count (pycocoevalcap's length)."""
    vec: list[dict] = [{} for _ in range(n)]
    for gram, tf in counts.items():
        vec[len(gram) - 1][gram] = tf * (log_n - math.log(max(1.0, df[gram])))
    norms = [math.sqrt(sum(v * v for v in g.values())) for g in vec]
    length = sum(tf for gram, tf in counts.items() if len(gram) == 2)
    return vec, norms, length


def cider_d(
    candidates: Sequence[str] | Mapping,
    references: Sequence[Sequence[str]] | Mapping,
    *,
    n: int = MAX_N,
    sigma: float = SIGMA,
) -> tuple[float, list[float]]:
    """(corpus CIDEr-D, per-image scores) of tokenised ``candidates`` (one string per image) against
    ``references`` (a non-empty list of strings per image). Mappings (image id -> caption / captions) are matched by
    key, in the candidates' order."""
    if isinstance(candidates, Mapping):
        if not isinstance(references, Mapping) or set(candidates) != set(references):
            raise ValueError("candidates and references must be mappings with the same image ids")
        references = [references[k] for k in candidates]
        candidates = list(candidates.values())
    if len(candidates) != len(references):
        raise ValueError(f"got {len(candidates)} candidates and {len(references)} reference lists")
    for i, (c, refs) in enumerate(zip(candidates, references, strict=True)):
        if not isinstance(c, str):
            raise TypeError(f"candidates[{i}] must be a string, got {type(c).__name__}")
        if isinstance(refs, str) or not refs or not all(isinstance(r, str) for r in refs):
            raise ValueError(f"references[{i}] must be a non-empty list of strings")
    if not candidates:
        return 0.0, []

    cand_counts = [_ngrams(c, n) for c in candidates]
    ref_counts = [[_ngrams(r, n) for r in refs] for refs in references]
    df: Counter = Counter()
    for refs in ref_counts:
        df.update({gram for counts in refs for gram in counts})
    log_n = math.log(float(len(candidates)))

    scores = []
    for counts, refs in zip(cand_counts, ref_counts, strict=True):
        vec, norm, length = _vector(counts, df, log_n, n)
        total = 0.0
        for ref in refs:
            rvec, rnorm, rlength = _vector(ref, df, log_n, n)
            penalty = math.exp(-((length - rlength) ** 2) / (2 * sigma**2))
            for k in range(n):
                dot = sum(min(v, rvec[k][g]) * rvec[k][g] for g, v in vec[k].items() if g in rvec[k])
                if norm[k] != 0 and rnorm[k] != 0:
                    dot /= norm[k] * rnorm[k]
                total += dot * penalty
        scores.append(10.0 * total / n / len(refs))
    return sum(scores) / len(scores), scores
