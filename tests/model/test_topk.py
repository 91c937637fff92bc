"""pluglm.topk: the one exact search and the one top-k merge behind every index."""
from __future__ import annotations

import torch

import pluglm_kernels
from pluglm.topk import exact_topk, merge_topk


def test_exact_topk_pads_past_the_valid_rows(fresh_seed):
    keys = torch.randn(13, 7)
    valid = torch.zeros(13, dtype=torch.bool)
    valid[[2, 5, 11]] = True
    q = torch.randn(4, 7)
    s, i = exact_topk(q, keys, 5, valid=valid, pad=True)
    rs, ri = pluglm_kernels.mips_topk(q, keys, 3, valid=valid, backend="reference")
    assert torch.equal(i[:, :3], ri) and torch.allclose(s[:, :3], rs, rtol=1e-5)
    assert bool((i[:, 3:] == -1).all()) and bool(torch.isinf(s[:, 3:]).all())
    s0, i0 = exact_topk(q, keys, 2, valid=torch.zeros(13, dtype=torch.bool), pad=True)
    assert bool((i0 == -1).all()) and s0.dtype == torch.float32


def test_exact_topk_float64_keys_use_the_reference(fresh_seed):
    keys = torch.randn(9, 5, dtype=torch.float64)
    q = torch.randn(3, 5)
    s, i = exact_topk(q, keys, 4)
    assert torch.equal(i, (q.double() @ keys.T).topk(4).indices)


def test_merge_topk_orders_by_score_then_id_and_drops_dead():
    scores = torch.tensor([[1.0, 3.0, 3.0, float("-inf"), 2.0]])
    ids = torch.tensor([[4, 9, 2, -1, 7]])
    s, i = merge_topk(scores, ids, 6)
    assert i.tolist() == [[2, 9, 7, 4, -1, -1]]
    assert s[0, :4].tolist() == [3.0, 3.0, 2.0, 1.0] and bool(torch.isinf(s[0, 4:]).all())
    live = torch.tensor([[True, False, True, False, True]])
    assert merge_topk(scores, ids, 2, live)[1].tolist() == [[2, 7]]
