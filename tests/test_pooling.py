"""MaxK / mean pooling and padding masks over variable lengths, against per-sample loops."""
import torch

from lib.encoders import ImageEncoder, TextEncoder, maxk_pool, mean_pool, valid_mask
from conftest import tiny_bert


def naive_maxk(x, n):
    """Per dimension, the mean of the min(2, n) largest of the first n rows."""
    k = min(2, n)
    cols = []
    for d in range(x.shape[1]):
        values = sorted(x[:n, d].tolist(), reverse=True)
        cols.append(sum(values[:k]) / k)
    return torch.tensor(cols)


def test_masks_and_pools_equal_per_sample_loops():
    torch.manual_seed(0)
    lengths = torch.tensor([1, 2, 3, 7, 5])
    x = torch.randn(5, 7, 6)
    x[0, 1:] = 100.0  # padding larger than any valid value must not leak into MaxK
    mask = valid_mask(lengths, 7)
    for i, n in enumerate(lengths.tolist()):
        assert mask[i].tolist() == [True] * n + [False] * (7 - n)
    got_max, got_mean = maxk_pool(x, lengths), mean_pool(x, lengths)
    for i, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(got_max[i], naive_maxk(x[i], n))
        torch.testing.assert_close(got_mean[i], x[i, :n].mean(0))


def test_maxk_with_a_single_position():
    x = torch.randn(3, 1, 4)
    torch.testing.assert_close(maxk_pool(x, torch.ones(3, dtype=torch.long)), x[:, 0])


def test_image_embedding_ignores_padded_regions():
    torch.manual_seed(0)
    enc = ImageEncoder(16, 32, nhead=4).eval()
    regions = torch.randn(3, 6, 16).abs()
    lengths = torch.tensor([6, 2, 4])
    emb, _ = enc(regions, lengths)
    changed = regions.clone()
    changed[~valid_mask(lengths, 6)] = 50.0
    emb2, _ = enc(changed, lengths)
    torch.testing.assert_close(emb, emb2)
    # and the padded sample equals the sample encoded alone, without padding
    alone, _ = enc(regions[1:2, :2], lengths[1:2])
    torch.testing.assert_close(emb[1:2], alone, rtol=1e-5, atol=1e-6)


def test_fragment_transformer_ignores_padded_words():
    torch.manual_seed(0)
    enc = TextEncoder(tiny_bert(), 32, nhead=4).eval()
    x = torch.randn(3, 5, 32)
    lengths = torch.tensor([5, 2, 3])
    pooled = enc.pool(x, lengths, enc.aggr)
    changed = x.clone()
    changed[~valid_mask(lengths, 5)] = torch.randn(int((~valid_mask(lengths, 5)).sum()), 32) * 10
    torch.testing.assert_close(enc.pool(changed, lengths, enc.aggr), pooled)

    tokens = torch.tensor([[101, 2003, 2004, 2005, 102], [101, 2003, 102, 0, 0]])
    emb, _ = enc(tokens, torch.tensor([5, 3]))
    alone, _ = enc(tokens[1:, :3], torch.tensor([3]))
    torch.testing.assert_close(emb[1:], alone, rtol=1e-5, atol=1e-5)
