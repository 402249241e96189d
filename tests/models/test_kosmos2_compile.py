"""Kosmos-2's padded forward (transformers' names) under torch.compile(fullgraph=True): no graph breaks, and loss,
logits and gradients equal eager's (which drops the padding instead of keeping it as separate segments)."""

from __future__ import annotations

import pytest
import torch

from mmcore.models.kosmos2 import Kosmos2Config, Kosmos2ForConditionalGeneration
from mmcore.models.kosmos2.modeling import PaddedRows

LATENTS = 3


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    text = dict(vocab_size=140, embed_dim=32, layers=2, attention_heads=4, ffn_dim=37, max_position_embeddings=128)
    text.update(dropout=0.0, attention_dropout=0.0)
    vision = dict(image_size=32, patch_size=8, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=37)
    config = Kosmos2Config(text=text, vision=vision, latent_query_num=LATENTS, num_bins=4)
    return Kosmos2ForConditionalGeneration(config).init_weights().eval()


def make_batch(lengths, side="left", image_rows=(0, 2), seed=0):
    """Padded rows: bos, <image>, LATENTS image slots (rows in image_rows), random text; labels -100 on the prompt
    and the padding."""
    g = torch.Generator().manual_seed(seed)
    seq = max(lengths)
    ids = torch.ones(len(lengths), seq, dtype=torch.long)
    mask = torch.zeros_like(ids)
    img = torch.zeros_like(ids)
    for r, n in enumerate(lengths):
        start = seq - n if side == "left" else 0
        row = torch.randint(4, 90, (n,), generator=g)
        row[0] = 0
        ids[r, start : start + n] = row
        mask[r, start : start + n] = 1
        if r in image_rows:
            img[r, start + 2 : start + 2 + LATENTS] = 1
    labels = ids.masked_fill(mask == 0, -100)
    for r, n in enumerate(lengths):
        start = seq - n if side == "left" else 0
        labels[r, start : start + LATENTS + 3] = -100
    pixels = torch.randn(len(image_rows), 3, 32, 32, generator=g)
    return pixels, ids, img, mask, labels


def padded_forward(model):
    def fn(pixels, ids, img, mask, labels):
        out = model(pixel_values=pixels, input_ids=ids, image_embeds_position_mask=img, attention_mask=mask,
                    labels=labels)  # fmt: skip
        return out.loss, out.logits

    return fn


def report_close(name, got, want, tol=1e-5):
    err = (got - want).abs()
    where = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape)) if err.numel() else ()
    scale = want.abs().max().item() if want.numel() else 0.0
    msg = f"{name}: max error {err.max().item():.3g} at {where}, mean {err.mean().item():.3g}, max |want| {scale:.3g}"
    assert torch.allclose(got, want, rtol=tol, atol=tol), msg + f" (tolerance {tol})"


def test_padded_rows_segments():
    keep = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0], [0, 1, 1, 0]]).bool()
    rows = PaddedRows(keep, drop_padding=False)
    # left [pads][real]; right [real][pads]; full [real][]; empty [pads][]; both sides [pads][real pads]
    assert rows.cu_seqlens.tolist() == [0, 2, 4, 7, 8, 12, 12, 16, 16, 17, 20]
    assert rows.cu_seqlens.dtype == torch.int32
    assert PaddedRows(keep, drop_padding=True).cu_seqlens.tolist() == [0, 2, 5, 9, 9, 11]


def test_padded_forward_has_no_graph_breaks(model):
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(padded_forward(model))(*make_batch([10, 6, 8]))
    reasons = [b.reason.splitlines()[0] for b in explanation.break_reasons]
    assert explanation.graph_break_count == 0, reasons


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_forward_backward_compiled_equals_eager(model, side):
    torch._dynamo.reset()
    batch = make_batch([10, 6, 8], side=side)
    mask = batch[3].bool()
    params = [p for p in model.parameters() if p.requires_grad]
    loss, logits = padded_forward(model)(*batch)
    want = torch.autograd.grad(loss, params)
    compiled = torch.compile(padded_forward(model), fullgraph=True, backend="aot_eager")
    closs, clogits = compiled(*batch)
    got = torch.autograd.grad(closs, params)
    report_close("loss", closs, loss)
    report_close("logits at real positions", clogits[mask], logits[mask])
    assert bool((clogits[~mask] == 0).all()), "compiled logits at padded positions are zeros"
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for name, g, w in zip(names, got, want, strict=True):
        report_close(f"grad {name}", g, w)
