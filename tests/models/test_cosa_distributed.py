"""COSA across two processes (gloo, CPU): gathered ITC negatives, global partners and hard negatives. Each rank holds
half of a global batch of 4 and checks its distributed results against the same quantities computed on the whole
batch in one process."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def _worker(rank: int, init_file: str) -> None:
    from cosa_tiny import CLS, MASK, RANDOM_START, SEP, VOCAB, captions, pixels

    from mmcore.models.cosa import COSAConfig, COSAModel, concatenate, pack_padded
    from mmcore.models.cosa.concat import concat_captions, gather_batch, gather_packed
    from mmcore.models.cosa.objectives import itc_loss, sample_hard_negatives

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)  # the same weights on both ranks; built directly (importing transformers is slow)
        text_ids = dict(cls_token_id=CLS, sep_token_id=SEP, mask_token_id=MASK, random_token_start=RANDOM_START)
        config = COSAConfig(
            text=dict(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=20, max_position_embeddings=64, **text_ids),
            vision=dict(hidden_size=8, intermediate_size=10, num_layers=1, num_heads=2, image_size=16, patch_size=8),
            contra_dim=4, max_concat_tokens=24,
        )  # fmt: skip
        model = COSAModel(config).init_weights().eval()
        ids, mask = captions([5, 7, 4, 6], seed=1)  # rank 0 holds 5 + 7 tokens, rank 1 holds 4 + 6
        px = pixels(4, 1, seed=2)
        local = slice(2 * rank, 2 * rank + 2)

        x = torch.arange(4.0)[local].clone().requires_grad_()
        gathered, offset = gather_batch(x)
        assert gathered.tolist() == [0.0, 1.0, 2.0, 3.0] and offset == 2 * rank
        gathered.sum().backward()
        assert x.grad.tolist() == [1.0, 1.0]  # this rank's rows carry gradients

        y = torch.arange(4.0)[local].clone().requires_grad_()
        gathered, _ = gather_batch(y, with_grad=True)
        (gathered * torch.arange(1.0, 5.0)).sum().backward()
        # with_grad: both ranks' losses reach every row (row i's weight i + 1, once per rank)
        assert y.grad.tolist() == [2.0 * (2 * rank + 1), 2.0 * (2 * rank + 2)]

        text, full = pack_padded(ids[local], mask[local]), pack_padded(ids, mask)
        all_text, first = gather_packed(text)
        assert torch.equal(all_text.input_ids, full.input_ids) and torch.equal(all_text.cu_seqlens, full.cu_seqlens)
        assert first == 2 * rank

        # the fixed-shape (compiled) layout, each rank padded to its own width: rows padded to the widest
        width = 9 if rank == 0 else 6
        own_ids = torch.nn.functional.pad(ids[local], (0, 2))[:, :width]
        own_mask = torch.nn.functional.pad(mask[local], (0, 2))[:, :width]
        all_rows, first = gather_packed(pack_padded(own_ids, own_mask, keep_padding=True))
        assert all_rows.padded and all_rows.max_seqlen == 9 and first == 2 * rank
        assert all_rows.lengths.tolist() == [5, 7, 4, 6]
        assert torch.equal(all_rows.input_ids[all_rows.real()], full.input_ids)

        with torch.no_grad():
            feats = model.encode_vision(px)
            sim_t2v, sim_v2t, targets = model.contrastive(text, feats[local])
            t, v = model.text_features(full), model.video_features(feats)
            ref_t2v, ref_v2t = t @ v.t() / model.contra_temp, v @ t.t() / model.contra_temp
        assert targets.tolist() == [2 * rank, 2 * rank + 1]
        assert torch.allclose(sim_t2v, ref_t2v[local], atol=1e-5) and torch.allclose(sim_v2t, ref_v2t[local], atol=1e-5)
        loss = itc_loss(sim_t2v, sim_v2t, targets)
        assert abs(float(loss) - float(itc_loss(ref_t2v[local], ref_v2t[local], targets))) < 1e-6

        g = torch.Generator().manual_seed(rank)  # seeded per rank (the original seeds every rank alike)
        negatives = torch.stack([sample_hard_negatives(sim_t2v, targets, g) for _ in range(50)])
        assert (negatives != targets).all() and int(negatives.max()) < 4 and int(negatives.min()) >= 0

        batch = concatenate(text, feats[local], 3, max_tokens=24, cls_id=CLS, sep_id=SEP, generator=g)
        assert batch.members[:, 0].tolist() == [2 * rank, 2 * rank + 1]
        for i, row in enumerate(batch.members.tolist()):
            for j, s in enumerate(row):
                assert torch.equal(batch.features[i, j], feats[s, 0])
        ref = concat_captions(full, batch.members, 24, CLS, SEP).text
        assert torch.equal(batch.text.input_ids, ref.input_ids)
        model.train()
        out = model(px[local], ids[local], mask[local], concat=3, generator=g)
        out["loss"].backward()
        assert torch.isfinite(out["loss"]) and all(
            p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters()
        )

        # a last batch of unequal size (no drop_last): a clear error on every rank, not an abort inside gloo
        n = 2 if rank == 0 else 1
        with pytest.raises(ValueError, match=r"same batch size, got \[2, 1\]"):
            model(px[local][:n], ids[local][:n], mask[local][:n], concat=3, generator=g)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_gather_partners_and_negatives(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "rendezvous"),), nprocs=WORLD, join=True)
