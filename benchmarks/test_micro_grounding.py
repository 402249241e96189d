"""pytest-benchmark micro-benchmarks of the grounding helpers on the CPU, each checked against transformers.

    pytest benchmarks/test_micro_grounding.py --benchmark-enable

The repo's pytest options include ``--benchmark-disable``, so without ``--benchmark-enable`` each benchmark runs
its function once and the file is a quick correctness test. Inputs come from bench_grounding.py's generators.
"""

import pytest
import torch
from bench_grounding import NUM_BINS, grounded_strings, random_boxes, random_indices

import mmcore.grounding as g

hf = pytest.importorskip("transformers.models.kosmos2.processing_kosmos2")

N_STRINGS = 1_000
N_BOXES = 10_000


@pytest.fixture(scope="module")
def texts():
    return grounded_strings(N_STRINGS)


@pytest.fixture(scope="module")
def boxes():
    return random_boxes(N_BOXES)


@pytest.fixture(scope="module")
def indices():
    return random_indices(N_BOXES)


def test_extract_entities_batch(benchmark, texts):
    want = [hf.clean_text_and_extract_entities_with_bboxes(t, NUM_BINS) for t in texts]
    got = benchmark(g.extract_entities_batch, texts, NUM_BINS, backend="cpp")
    assert got == want


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_boxes_to_loc_indices(benchmark, boxes, backend):
    want = torch.tensor([hf.coordinate_to_patch_index(tuple(b), NUM_BINS) for b in boxes.tolist()])
    got = benchmark(g.boxes_to_loc_indices, boxes, NUM_BINS, backend=backend)
    assert torch.equal(got, want)


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_loc_indices_to_boxes(benchmark, indices, backend):
    want = torch.tensor([hf.patch_index_to_coordinate(ul, lr, NUM_BINS) for ul, lr in indices.tolist()])
    got = benchmark(g.loc_indices_to_boxes, indices, NUM_BINS, backend=backend)
    assert got.dtype == torch.float64
    assert torch.equal(got, want)  # bit-identical to transformers' Python floats
