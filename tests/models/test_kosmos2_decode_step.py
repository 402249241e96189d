"""The fused Kosmos-2 decoder step (``TextDecoder.step``, ``mmcore::kosmos2_decode_step``) against the module path
it replaces during CPU generation: hidden states, KV-cache writes, generated tokens, and its input checks."""

from __future__ import annotations

import pytest
import torch

from mmcore.models.kosmos2 import Kosmos2Config, Kosmos2ForConditionalGeneration, generation, modeling
from mmcore.models.kosmos2.modeling import KVCache
from mmcore.ops import _library

pytestmark = pytest.mark.skipif(not modeling._FUSED_STEP_ON_CPU, reason="mmcore._C has no kosmos2_decode_step")


def tiny(activation="gelu", embed_dim=32, heads=4, ffn_dim=37, layers=2, seed=0):
    torch.manual_seed(seed)
    text = dict(vocab_size=120, embed_dim=embed_dim, layers=layers, attention_heads=heads, ffn_dim=ffn_dim)
    text.update(activation_function=activation, dropout=0.0, attention_dropout=0.0, max_position_embeddings=64)
    vision = dict(image_size=32, patch_size=8, hidden_size=32, num_layers=1, num_heads=4, intermediate_size=37)
    config = Kosmos2Config(text=text, vision=vision, latent_query_num=3, num_bins=4)
    model = Kosmos2ForConditionalGeneration(config).init_weights()
    with torch.no_grad():  # LayerNorm weights and biases away from 1 / 0, so a swapped pair shows
        for name, p in model.text_model.named_parameters():
            if "norm" in name or "_ln" in name:
                p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


def step_inputs(model, starts, end, seed=1):
    """A cache filled with random keys/values for rows with keys [starts_r, end - 1), and the step that writes each
    row's token at slot end - 1: (x, layout, cache)."""
    t = model.config.text
    g = torch.Generator().manual_seed(seed)
    batch, max_len = len(starts), end + 3
    cache = KVCache(t.layers, batch, max_len, t.attention_heads, t.head_dim, dtype=torch.float32, device="cpu")
    cache.k.copy_(torch.randn(cache.k.shape, generator=g))
    cache.v.copy_(torch.randn(cache.v.shape, generator=g))
    starts = torch.tensor(starts)
    cache.write_index = torch.arange(batch) * max_len + (end - 1)
    x = torch.randn(batch, t.embed_dim, generator=g)
    return x, generation._StepLayouts(starts, max_len).at(end), cache


def run_both(model, x, layout, cache):
    """(fused output, fused cache) and (module output, module cache) from the same inputs."""
    results = []
    for fused in (True, False):
        c = KVCache.__new__(KVCache)
        c.__dict__.update(cache.__dict__, k=cache.k.clone(), v=cache.v.clone())
        model.text_model.fused_step = fused
        with torch.no_grad():
            assert model.text_model._fused_step_applies(x, c, None) == fused
            results.append((model.text_model(x, layout, c), c))
    model.text_model.fused_step = True
    return results


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "quick_gelu"])
@pytest.mark.parametrize("dims", [(32, 4, 37), (64, 2, 128), (80, 1, 64)], ids=["d32-ffn37", "d64-hd32", "d80-hd80"])
def test_step_equals_the_module_path(activation, dims):
    embed_dim, heads, ffn = dims
    model = tiny(activation, embed_dim, heads, ffn)
    x, layout, cache = step_inputs(model, [0, 3, 5, 1, 0], end=9)
    (fused, fused_cache), (ref, ref_cache) = run_both(model, x, layout, cache)
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5)
    # this step's keys and values land at write_index in every layer, the other slots untouched
    torch.testing.assert_close(fused_cache.k, ref_cache.k, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused_cache.v, ref_cache.v, rtol=1e-5, atol=1e-5)
    untouched = torch.ones(cache.k.shape[1], dtype=torch.bool)
    untouched[cache.write_index] = False
    assert torch.equal(fused_cache.k[:, untouched], cache.k[:, untouched])
    assert not torch.equal(fused_cache.k[:, cache.write_index], cache.k[:, cache.write_index])


def test_several_queries_per_row_and_more_rows_than_a_tile():
    """Two new tokens per row (a short prefill without ``keep``), 6 rows: 12 queries, causal within each row."""
    model = tiny()
    t = model.config.text
    starts, end, max_len = torch.tensor([0, 2, 1, 0, 4, 3]), 10, 12
    g = torch.Generator().manual_seed(3)
    cache = KVCache(t.layers, 6, max_len, t.attention_heads, t.head_dim, dtype=torch.float32, device="cpu")
    cache.k.copy_(torch.randn(cache.k.shape, generator=g))
    cache.v.copy_(torch.randn(cache.v.shape, generator=g))
    cache.write_index = (torch.arange(6)[:, None] * max_len + torch.tensor([end - 2, end - 1])).reshape(-1)
    layout = generation._layout(starts, end, torch.full((6,), 2), max_len, 2)
    x = torch.randn(12, t.embed_dim, generator=g)
    (fused, fused_cache), (ref, ref_cache) = run_both(model, x, layout, cache)
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused_cache.v, ref_cache.v, rtol=1e-5, atol=1e-5)


def test_zero_layers_is_the_final_layer_norm():
    model = tiny(layers=1)
    model.text_model.layers = torch.nn.ModuleList()
    model.config.text.layers = 0
    t = model.config.text
    x = torch.randn(3, t.embed_dim)
    cache = KVCache(0, 3, 5, t.attention_heads, t.head_dim, dtype=torch.float32, device="cpu")
    cache.write_index = torch.tensor([2, 7, 12])
    layout = generation._StepLayouts(torch.tensor([0, 1, 2]), 5).at(3)
    (fused, _), (ref, _) = run_both(model, x, layout, cache)
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("constrain", [False, True])
def test_generation_gives_the_same_tokens(constrain):
    model = tiny()
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(5, 100, (4, 11), generator=g)
    ids[:, 0] = 0
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[3, :6] = 0
    ids = ids.masked_fill(mask == 0, 1)
    img = torch.zeros_like(ids)
    for r, s in enumerate((0, 4, 0, 6)):
        img[r, s + 2 : s + 5] = 1
    pixels = torch.randn(4, 3, 32, 32, generator=g)
    out = {}
    for fused in (True, False):
        model.text_model.fused_step = fused
        out[fused] = model.generate(pixels, ids, img, mask, max_new_tokens=12, constrain_boxes=constrain)
    model.text_model.fused_step = True
    assert torch.equal(out[True], out[False])


def test_not_taken_in_training_with_grad_or_off_the_float32_cpu_path():
    model = tiny()
    x, layout, cache = step_inputs(model, [0, 2], end=5)
    td = model.text_model
    with torch.no_grad():
        assert td._fused_step_applies(x, cache, None)
        assert not td._fused_step_applies(x, cache, (torch.tensor([0]), layout))  # prefill keep
        assert not td._fused_step_applies(x, None, None)
        assert not td._fused_step_applies(x.double(), cache, None)
        assert not td._fused_step_applies(torch.randn(17, x.shape[1]), cache, None)  # > LINEAR_SMALL_ROWS
        td.train()
        assert not td._fused_step_applies(x, cache, None)
        td.eval()
    assert not td._fused_step_applies(x, cache, None)  # grad enabled


def call(model, x, layout, cache, params=None, **over):
    t = model.config.text
    args = dict(params=model.text_model.step_params() if params is None else params, k=cache.k, v=cache.v,
                index=cache.write_index, heads=t.attention_heads, activation=t.activation_function)  # fmt: skip
    args.update(over)
    return _library.op("kosmos2_decode_step")(
        x, args["params"], args["k"], args["v"], args["index"], layout.cu_seqlens_q, layout.cu_seqlens_k,
        layout.max_seqlen_q, layout.max_seqlen_k, args["heads"], t.layer_norm_eps, args["activation"],
    )  # fmt: skip


def test_bad_input_names_the_problem():
    model = tiny()
    x, layout, cache = step_inputs(model, [0, 2], end=5)
    params = model.text_model.step_params()
    with pytest.raises(ValueError, match="16 tensors per layer"):
        call(model, x, layout, cache, params=params[:-1])
    bad = list(params)
    bad[2] = bad[2][:, :-1].contiguous()
    with pytest.raises(ValueError, match="layer 0 qkv.weight must have shape"):
        call(model, x, layout, cache, params=bad)
    bad = list(params)
    bad[16 + 14] = bad[16 + 14].t().contiguous().t()
    with pytest.raises(ValueError, match="layer 1 fc2.weight must be contiguous"):
        call(model, x, layout, cache, params=bad)
    bad = list(params)
    bad[5] = bad[5].double()
    with pytest.raises(TypeError, match="layer 0 inner_attn_ln.bias must be float32"):
        call(model, x, layout, cache, params=bad)
    with pytest.raises(ValueError, match=r"write_index\[1\] = 99 is outside the cache's 16 slots"):
        call(model, x, layout, cache, index=torch.tensor([3, 99]))
    with pytest.raises(ValueError, match="write_index must be a"):
        call(model, x, layout, cache, index=torch.tensor([3, 4], dtype=torch.int32))
    with pytest.raises(ValueError, match="caches must be contiguous float32"):
        call(model, x, layout, cache, k=cache.k[:1])
    with pytest.raises(ValueError, match="heads"):
        call(model, x, layout, cache, heads=3)
    with pytest.raises(ValueError, match="activation must be"):
        call(model, x, layout, cache, activation="relu")
    with pytest.raises(ValueError, match="x must be"):
        call(model, x.double(), layout, cache)
