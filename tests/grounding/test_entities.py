"""extract_entities: identical to transformers' clean_text_and_extract_entities_with_bboxes on any string."""

import random

import pytest
from transformers.models.kosmos2.processing_kosmos2 import clean_text_and_extract_entities_with_bboxes as hf_extract

from mmcore.grounding import extract_entities, extract_entities_batch, extract_entities_ref
from mmcore.ops import BackendError, available_backends

HAS_CPP = "cpp" in available_backends("extract_entities", "cpu")
PARSERS = [pytest.param("cpp", marks=pytest.mark.skipif(not HAS_CPP, reason="mmcore._C not built")), "torch"]

SNOWMAN = (
    "<grounding> An image of<phrase> a snowman</phrase><object><patch_index_0044><patch_index_0863></object>"
    " warming himself by<phrase> a fire</phrase><object><patch_index_0005><patch_index_0911></object>."
)

# Hand-picked cases where a re-implementation is most likely to drift from the regexes.
CASES = [
    SNOWMAN,
    "",
    "   ",
    "plain text, no tags",
    "<phrase>x</phrase><object><patch_index_0001></object>",  # one index: dropped
    "<object><patch_index_0001><patch_index_0002></object>",  # no phrase
    "a <object><patch_index_3><patch_index_40></delimiter_of_multi_objects/><patch_index_5><patch_index_6></object> b",
    "<phrase> two boxes </phrase><object><patch_index_0001><patch_index_0033></delimiter_of_multi_objects/>"
    "<patch_index_0100><patch_index_0200></object> end",
    "<phrase>   </phrase><object><patch_index_0001><patch_index_0002></object>",  # all-space phrase
    "<phrase>a<b</phrase><object><patch_index_0001><patch_index_0002></object>",  # '<' in phrase
    "<phrase>a</phrase> <object><patch_index_0001><patch_index_0002></object>",  # gap before object
    "x <y <object><patch_index_0001><patch_index_0002></object> z>",  # a tag straddling the entity
    "x <y\n<phrase>p</phrase><object><patch_index_0001><patch_index_0002></object>",  # '<' ended by a newline
    "<phrase>new\nline</phrase><object><patch_index_0001><patch_index_0002></object>",
    "<phrase>p</phrase><object><patch_index_٣٤><patch_index_١٠٠></object>",  # Arabic-Indic digits
    "<phrase>p</phrase><object><patch_index_𝟏𝟐><patch_index_0099></object>",  # mathematical digits
    "<phrase>p</phrase><object><patch_index_12345678901234567890123><patch_index_1></object>",  # beyond int64
    "<phrase>p</phrase><object><patch_index_99999><patch_index_0></object>",  # outside the grid
    "\u3000\u2003<phrase>\xa0wide\u2009</phrase><object><patch_index_0001><patch_index_0066></object>\x1c",
    "<phrase>é😀</phrase><object><patch_index_0001><patch_index_0066></object> ok \ud800",  # lone surrogate
    "<<phrase>a</phrase><object><patch_index_1><patch_index_2></object>>",
    "<phrase>a</phrase><phrase>b</phrase><object><patch_index_1><patch_index_2></object>",
    "<object><patch_index_1><patch_index_2></object><object><patch_index_3><patch_index_4></object>",
    "<phrase>a</phrase><object><patch_index_1><patch_index_2></delimiter_of_multi_objects/></object>",
    "<phrase>a</phrase><object><patch_index_><patch_index_2></object>",
    "<phrase>a</phrase><object><patch_index_1><patch_index_2></object",
    "<phrase>a</phrase><object><patch_index_-1><patch_index_2></object>",
]

PIECES = [
    "<phrase>",
    "</phrase>",
    "<object>",
    "</object>",
    "</delimiter_of_multi_objects/>",
    "<grounding>",
    "<patch_index_",
    ">",
    "<",
    " ",
    "  ",
    "\n",
    "\t",
    "a",
    "the dog",
    "é",
    "😀",
    "٣",
    "7",
    "0044",
    "<p>",
    "</",
    "\u3000",
    "\xa0",
    "<image>",
    "</image>",
    "x>y",
    "<patch_index_0044>",
    "<patch_index_1023>",
]


def _loc(rng):
    digits = rng.choice([f"{rng.randrange(1024):04d}", str(rng.randrange(10**6)), "٣٤", "", "x1"])
    return f"<patch_index_{digits}>"


def random_grounded(rng: random.Random) -> str:
    """Mostly well-formed entities, mixed with random pieces and damaged tags."""
    out = []
    for _ in range(rng.randrange(1, 12)):
        r = rng.random()
        if r < 0.35:
            phrase = rng.choice(["", f"<phrase>{rng.choice([' a cat', 'dog ', '  ', 'x<y', 'é'])}</phrase>"])
            boxes = "</delimiter_of_multi_objects/>".join(_loc(rng) + _loc(rng) for _ in range(rng.randrange(1, 4)))
            if rng.random() < 0.15:
                boxes = boxes[: rng.randrange(len(boxes) + 1)]
            out.append(f"{phrase}<object>{boxes}</object>")
        else:
            out.append("".join(rng.choice(PIECES) for _ in range(rng.randrange(1, 6))))
    return "".join(out)


@pytest.mark.parametrize("backend", PARSERS)
@pytest.mark.parametrize("text", CASES, ids=range(len(CASES)))
def test_cases_match_transformers(backend, text):
    assert extract_entities(text, backend=backend) == hf_extract(text)


@pytest.mark.parametrize("backend", PARSERS)
def test_random_strings_match_transformers(backend):
    rng = random.Random(7)
    texts = [random_grounded(rng) for _ in range(10_000)]
    expected = [hf_extract(t) for t in texts]
    got = extract_entities_batch(texts, backend=backend)
    bad = [i for i, (g, e) in enumerate(zip(got, expected, strict=True)) if g != e]
    assert not bad, f"{len(bad)} mismatches; first: {texts[bad[0]]!r}\n got {got[bad[0]]}\n want {expected[bad[0]]}"
    n_entities = sum(len(e[1]) for e in expected)
    assert n_entities > 3_000  # the generator exercises real entities, not only junk


@pytest.mark.parametrize("num_bins", [1, 7, 64])
def test_other_grids_match_transformers(num_bins):
    rng = random.Random(num_bins)
    texts = [random_grounded(rng) for _ in range(500)]
    assert extract_entities_batch(texts, num_bins) == [hf_extract(t, num_bins) for t in texts]


def test_batch_equals_single_and_reference():
    rng = random.Random(3)
    texts = [random_grounded(rng) for _ in range(300)] + CASES
    batch = extract_entities_batch(texts)
    assert batch == [extract_entities(t) for t in texts] == [extract_entities_ref(t) for t in texts]


def test_results_are_plain_python_types():
    clean, entities = extract_entities(SNOWMAN)
    name, span, boxes = entities[0]
    assert type(clean) is str and type(name) is str and type(span) is tuple and type(span[0]) is int
    assert type(boxes) is list and type(boxes[0]) is tuple and type(boxes[0][0]) is float


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: extract_entities(b"<phrase>"), TypeError, "text must be str"),
        (lambda: extract_entities(None), TypeError, "text must be str"),
        (lambda: extract_entities_batch("abc"), TypeError, "sequence of str"),
        (lambda: extract_entities_batch(["ok", 3]), TypeError, r"texts\[1\] must be str"),
        (lambda: extract_entities("x", num_bins=0), ValueError, "num_bins"),
        (lambda: extract_entities("x", backend="triton"), BackendError, "no 'triton' backend"),
    ],
)
def test_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_empty_batch():
    assert extract_entities_batch([]) == []
