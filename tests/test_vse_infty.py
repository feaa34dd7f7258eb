"""VSE∞ (lib/models/vse_infty.py, lib/models/gpo.py): GPO pooling against a naive per-sample
implementation, the VSE++ loss with diagonal positives against a per-row loop, a short training
that learns, and a checkpoint in the VSE∞ authors' module names converted and evaluated."""
import math

import pytest
import torch

from lib.losses import MatchingLoss
from lib.models.gpo import GPO

# --- GPO against a naive reference -----------------------------------------------------------


def naive_pe(n, size):
    """The Transformer's sinusoidal encoding, element by element."""
    pe = torch.zeros(n, size, dtype=torch.float64)
    for pos in range(n):
        for i in range(0, size, 2):
            angle = pos / (10000 ** (i / size))
            pe[pos, i], pe[pos, i + 1] = math.sin(angle), math.cos(angle)
    return pe.float()


def naive_gpo(gpo, x, lengths):
    """One sample at a time: sort that sample's valid rows per dimension, run the GRU on its n
    positions alone (no padding, no packing), average the directions, softmax(score / 0.1)."""
    pooled, weights = [], []
    for xi, n in zip(x, lengths.tolist()):
        ordered = xi[:n].sort(dim=0, descending=True).values
        out, _ = gpo.gru(naive_pe(n, gpo.pe_size)[None])
        half = out.shape[-1] // 2
        score = gpo.linear((out[0, :, :half] + out[0, :, half:]) / 2).squeeze(-1)
        w = torch.softmax(score / 0.1, dim=0)
        pooled.append((ordered * w[:, None]).sum(0))
        weights.append(torch.cat([w, torch.zeros(x.shape[1] - n)]))
    return torch.stack(pooled), torch.stack(weights)


@pytest.mark.parametrize('lengths', [[5, 1, 3, 5, 2, 3], [7, 7, 7], [1], [2, 6, 4]])
def test_gpo_equals_naive_per_sample_reference(lengths, one_thread):
    torch.manual_seed(0)
    gpo = GPO()
    lengths = torch.tensor(lengths)
    x = torch.randn(len(lengths), 8, 12)  # padding beyond the longest sample too
    x[torch.arange(8)[None, :] >= lengths[:, None]] = 1e3  # padded rows hold large junk: never sorted in
    pooled, weights = gpo(x, lengths)
    ref_pooled, ref_weights = naive_gpo(gpo, x, lengths)
    assert torch.allclose(weights, ref_weights, atol=1e-6, rtol=0)
    assert torch.allclose(pooled, ref_pooled, atol=1e-6, rtol=0)
    assert torch.allclose(weights.sum(1), torch.ones(len(lengths)))


def test_gpo_gradients_equal_reference(one_thread):
    torch.manual_seed(1)
    gpo = GPO()
    lengths = torch.tensor([4, 2, 6, 4, 1])
    x = torch.randn(5, 6, 10, requires_grad=True)
    gpo(x, lengths)[0].pow(2).sum().backward()
    ours = [x.grad.clone()] + [p.grad.clone() for p in gpo.parameters()]
    x.grad = None
    gpo.zero_grad()
    naive_gpo(gpo, x, lengths)[0].pow(2).sum().backward()
    ref = [x.grad] + [p.grad for p in gpo.parameters()]
    for a, b in zip(ours, ref):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def test_gpo_state_keys_are_the_authors():
    assert sorted(GPO().state_dict()) == sorted(
        ['gru.weight_ih_l0', 'gru.weight_hh_l0', 'gru.bias_ih_l0', 'gru.bias_hh_l0', 'gru.weight_ih_l0_reverse',
         'gru.weight_hh_l0_reverse', 'gru.bias_ih_l0_reverse', 'gru.bias_hh_l0_reverse', 'linear.weight'])


# --- VSE++ loss with diagonal positives -------------------------------------------------------


def loop_vse(sims, margin, max_violation):
    """Row i: image i against every caption j != i; column j: caption j against every image i != j."""
    n = len(sims)
    total = 0.0
    for i in range(n):
        costs = [max(0.0, margin + sims[i][j] - sims[i][i]) for j in range(n) if j != i]
        total += max(costs) if max_violation else sum(costs)
    for j in range(n):
        costs = [max(0.0, margin + sims[i][j] - sims[j][j]) for i in range(n) if i != j]
        total += max(costs) if max_violation else sum(costs)
    return total


@pytest.mark.parametrize('max_violation', [True, False])
def test_vse_loss_with_diagonal_positives_equals_loop(max_violation):
    torch.manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(7, 16), dim=1)
    cap = torch.nn.functional.normalize(img + 0.8 * torch.randn(7, 16), dim=1)
    img_ids = torch.tensor([0, 0, 1, 2, 2, 2, 3])  # repeated images: negatives under the diagonal rule
    loss = MatchingLoss('vse', 0.2, positives='diagonal')(img, cap, img_ids, max_violation)
    expected = loop_vse((img @ cap.t()).tolist(), 0.2, max_violation)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # HREM's image-id positives give a different number on the same batch
    hrem = MatchingLoss('vse', 0.2)(img, cap, img_ids, max_violation)
    assert abs(hrem.item() - expected) > 1e-3
