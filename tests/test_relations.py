"""Instance-level relations (graph_lib.py) and the objective around them (HREM.forward)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from graph_lib import InstanceRelation, region_word_scores, top_proportion
from lib.models import HREM, config_from_args
from conftest import tiny_args, tiny_bert


def authors_loop(regions, words, lengths, topk):
    """Per caption, as CrossmodalGroup/HREM lib/mca.py AdjacencyLearning (img_len_use=False)."""
    regions = F.normalize(regions, dim=-1)
    t2i_topk, t2i_mean, i2t_topk, i2t_mean = [], [], [], []
    for c in range(words.shape[0]):
        n = int(lengths[c])
        window = max(topk, n)  # short captions are filled up to K with their padding positions
        w = F.normalize(words[c, :window], dim=-1)
        sim = torch.stack([F.leaky_relu(w @ regions[i].t(), 0.1) for i in range(regions.shape[0])])
        row = F.normalize(sim, dim=1).max(dim=2).values            # (images, window): best region per word
        t2i_mean.append(row[:, :n].mean(dim=1))
        t2i_topk.append(row.topk(min(topk, row.shape[1]), dim=1).values)
        col = F.normalize(sim, dim=2)[:, :n].max(dim=1).values     # (images, R): best word per region
        i2t_mean.append(col.mean(dim=1))
        i2t_topk.append(col.topk(min(topk, col.shape[1]), dim=1).values)
    return (torch.stack(t2i_topk), torch.stack(t2i_mean),
            torch.stack(i2t_topk).transpose(0, 1), torch.stack(i2t_mean).t())


def test_region_word_scores_equal_the_per_caption_loop():
    torch.manual_seed(0)
    topk = 4
    regions = torch.randn(5, 7, 8)          # padded regions are included, as the authors do
    words = torch.randn(5, 9, 8)            # padding positions hold non-zero features
    lengths = torch.tensor([9, 2, 4, 6, 3])  # shorter and longer than K
    got = region_word_scores(regions, words, lengths, topk)
    want = authors_loop(regions, words, lengths, topk)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w)


def test_region_word_means_with_fewer_positions_than_k():
    torch.manual_seed(1)
    regions, words, lengths = torch.randn(3, 3, 8), torch.randn(3, 4, 8), torch.tensor([4, 2, 3])
    _, t2i_mean, _, i2t_mean = region_word_scores(regions, words, lengths, topk=5)
    # the means of the loop over the real regions, with zero words filling captions up to K
    _, want_t2i, _, want_i2t = authors_loop(regions, F.pad(words, (0, 0, 0, 1)), lengths, topk=5)
    torch.testing.assert_close(t2i_mean, want_t2i)
    torch.testing.assert_close(i2t_mean, want_i2t)


def naive_top(scores, k):
    """Keep, per row, every entry >= the row's k-th largest value (ties kept)."""
    out = np.zeros(scores.shape, bool)
    for i, row in enumerate(scores):
        kth = sorted(row, reverse=True)[k - 1]
        out[i] = [v >= kth for v in row]
    return out


def test_top_proportion_keeps_ties():
    scores = torch.tensor([[3., 1., 3., 2.], [0., 0., 0., 0.], [1., 2., 3., 4.]])
    got = top_proportion(scores, 2)
    assert got.tolist() == naive_top(scores.numpy(), 2).tolist()
    assert got[0].sum() == 2 and got[1].all() and got[2].tolist() == [False, False, True, True]


def make_inputs(b=6, e=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(b, e, generator=g), dim=-1)
    cap = F.normalize(img + 0.8 * torch.randn(b, e, generator=g), dim=-1)
    regions, words = torch.randn(b, 10, e, generator=g), torch.randn(b, 12, e, generator=g)
    lengths = torch.randint(3, 13, (b,), generator=g)
    return img, cap, regions, words, lengths


def softmax(x):
    z = np.exp(x - x.max(1, keepdims=True))
    return z / z.sum(1, keepdims=True)


@pytest.mark.parametrize('threshold', [0.5, 0.34])
def test_connections_relevance_and_regulariser(threshold):
    torch.manual_seed(0)
    b = 6
    rel = InstanceRelation(16, nhead=4, topk=4, threshold=threshold, sigma=0.7)
    img, cap, regions, words, lengths = make_inputs(b)
    connect, relevance, reg = rel.relations(img, cap, regions, words, lengths)
    k = int(np.floor(b * threshold))
    i, c = img.double().numpy(), cap.double().numpy()
    t2i_topk, t2i_mean, i2t_topk, i2t_mean = (x.detach().double().numpy()
                                              for x in authors_loop(regions, words, lengths, 4))

    # connections: top-k per row of cosine (intra) and of the mean region-word score (cross)
    assert (connect[:b, :b].numpy() == naive_top(i @ i.T, k)).all()
    assert (connect[b:, b:].numpy() == naive_top(c @ c.T, k)).all()
    assert (connect[:b, b:].numpy() == naive_top(i2t_mean, k)).all()
    assert (connect[b:, :b].numpy() == naive_top(t2i_mean, k)).all()
    assert connect.diagonal().all()
    assert (connect.sum(1) >= k).all()

    # relevance: exp(-distance / sigma) within a modality, MLP(top-K) + mean across
    dist = lambda a, z: np.sqrt(((a[:, None] - z[None]) ** 2).sum(-1))
    np.testing.assert_allclose(relevance[:b, :b].detach().numpy(), np.exp(-dist(i, i) / 0.7), atol=1e-5)
    np.testing.assert_allclose(relevance[b:, b:].detach().numpy(), np.exp(-dist(c, c) / 0.7), atol=1e-5)

    def mlp(layers, x):
        w1, b1 = layers[0].weight.detach().double().numpy(), layers[0].bias.detach().double().numpy()
        w2, b2 = layers[2].weight.detach().double().numpy(), layers[2].bias.detach().double().numpy()
        return (np.maximum(x @ w1.T + b1, 0) @ w2.T + b2)[..., 0]
    r_i2t = mlp(rel.mlp_i2t, i2t_topk) + i2t_mean
    r_t2i = mlp(rel.mlp_t2i, t2i_topk) + t2i_mean
    np.testing.assert_allclose(relevance[:b, b:].detach().numpy(), r_i2t, atol=1e-5)
    np.testing.assert_allclose(relevance[b:, :b].detach().numpy(), r_t2i, atol=1e-5)

    # regulariser: KL(softmax(relevance) || softmax(exp(-cdist))) per row, batchmean, both directions
    s = np.exp(-dist(i, c) / 0.7)
    kl = lambda p, q: float((p * (np.log(p) - np.log(q))).sum() / len(p))
    want = kl(softmax(r_i2t), softmax(s)) + kl(softmax(r_t2i), softmax(s.T))
    assert reg.item() == pytest.approx(want, rel=1e-4)
    assert reg.requires_grad and reg.item() > 0


def test_a_row_keeps_itself_even_below_a_near_duplicate():
    rel = InstanceRelation(16, nhead=4, topk=4, threshold=0.4)  # B = 3 -> one connection per row
    img, cap, regions, words, lengths = make_inputs(3)
    img = torch.stack([img[0], img[0] * 1.001, img[2]])  # row 0 scores row 1 above itself
    connect, _, _ = rel.relations(img, cap, regions[:3], words[:3], lengths[:3])
    assert connect[:3, :3].diagonal().all() and connect[3:, 3:].diagonal().all()


def test_a_node_ignores_nodes_it_is_not_connected_to():
    torch.manual_seed(0)
    b = 6
    rel = InstanceRelation(16, nhead=4, topk=4, threshold=0.5).eval()
    img, cap, regions, words, lengths = make_inputs(b)
    connect, relevance, _ = rel.relations(img, cap, regions, words, lengths)
    nodes = torch.cat([img, cap])
    out = torch.cat(rel.attend(img, cap, connect, relevance))
    checked = 0
    for q in range(2 * b):
        for j in range(2 * b):
            moved = nodes.clone()
            moved[j] = F.normalize(torch.randn(16), dim=0)
            out2 = torch.cat(rel.attend(moved[:b], moved[b:], connect, relevance))
            if q == j:
                continue
            if connect[q, j]:
                assert not torch.allclose(out2[q], out[q], atol=1e-6)
            else:
                torch.testing.assert_close(out2[q], out[q])
                checked += 1
    assert checked > 0


def fake_batch(b=6, regions=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4, 9, (b,), generator=g)
    tokens = torch.zeros(b, int(lengths.max()), dtype=torch.long)
    for i, n in enumerate(lengths.tolist()):
        tokens[i, :n] = torch.randint(1000, 5000, (n,), generator=g)
        tokens[i, 0], tokens[i, n - 1] = 101, 102
    return {'regions': torch.rand(b, regions, 24, generator=g),
            'region_lengths': torch.tensor([5, 3, 5, 4, 5, 2][:b]),
            'tokens': tokens, 'token_lengths': lengths,
            'img_ids': torch.tensor([0, 0, 1, 2, 3, 3][:b])}  # an image with two captions


def test_hrem_forward_before_and_after_warmup():
    args = tiny_args('--base_loss', 'vse', '--gnn_loss', 'vse', '--dropout', '0', '--warmup', '5',
                     '--topk', '3', '--reg_loss_weight', '7')
    model = HREM(config_from_args(args, 24), tiny_bert())
    batch = fake_batch()
    img, regions = model.encode_image(batch['regions'], batch['region_lengths'])
    cap, words = model.encode_text(batch['tokens'], batch['token_lengths'])
    base = model.base_loss(img, cap, batch['img_ids'])

    before = model(batch, step=4)
    assert before.loss.item() == pytest.approx(base.item(), rel=1e-5)
    assert set(before.parts) == {'base', 'total'}

    after = model(batch, step=5)
    img_hat, cap_hat, reg = model.relation(img, cap, regions, words, batch['token_lengths'])
    ids = batch['img_ids']
    want = (base + model.relation_loss(img, cap_hat, ids) + model.relation_loss(img_hat, cap, ids)
            + model.relation_loss(img_hat, cap_hat, ids) + 7 * reg)
    assert after.loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert after.loss.item() > before.loss.item()
    assert after.parts['reg'].item() == pytest.approx(reg.item(), rel=1e-5)


def naive_encoder_layer(layer, x, mask):
    """nn.TransformerEncoderLayer (post-norm, ReLU, no dropout) by hand: per-head scaled
    dot-product attention plus the additive mask, residual + LayerNorm, feed-forward, residual +
    LayerNorm."""
    n, e = x.shape
    heads = layer.self_attn.num_heads
    dh = e // heads
    w, b = layer.self_attn.in_proj_weight, layer.self_attn.in_proj_bias
    q, k, v = (x @ w[i * e:(i + 1) * e].t() + b[i * e:(i + 1) * e] for i in range(3))
    out = []
    for h in range(heads):
        cols = slice(h * dh, (h + 1) * dh)
        scores = q[:, cols] @ k[:, cols].t() / dh ** 0.5 + mask
        out.append(torch.softmax(scores, dim=-1) @ v[:, cols])
    x = layer.norm1(x + layer.self_attn.out_proj(torch.cat(out, 1)))
    return layer.norm2(x + layer.linear2(torch.relu(layer.linear1(x))))


def naive_attend(rel, img, cap, connect, relevance, mask_weight):
    """Spec: attention logits + mask_weight * relevance where connected, -inf elsewhere; every
    layer of the instance Transformer in turn; L2-normalised."""
    mask = torch.where(connect, mask_weight * relevance, torch.full_like(relevance, float('-inf')))
    x = torch.cat([img, cap])
    layers = [m for m in rel.modules() if isinstance(m, torch.nn.TransformerEncoderLayer)]
    for layer in layers:
        x = naive_encoder_layer(layer, x, mask)
    return F.normalize(x, dim=-1), layers


@pytest.mark.parametrize('layers', [1, 2])
def test_attention_uses_the_relevance_scaled_by_mask_weight(layers):
    """HREM built from --mask_weight 1.5 --num_layers_enc N: attend equals the naive masked
    attention; the output moves with mask_weight and with the relevance values while the
    connections stay fixed; with two layers, the second one is used."""
    args = tiny_args('--mask_weight', '1.5', '--num_layers_enc', str(layers), '--dropout', '0', '--topk', '4')
    rel = HREM(config_from_args(args, 24), tiny_bert()).relation.eval()
    img, cap, regions, words, lengths = make_inputs(6, e=32)
    # grad mode on purpose: under no_grad an eval-mode nn.TransformerEncoder takes PyTorch's fast
    # path, which returns NaN with this -inf mask (the module itself only runs in training)
    connect, relevance, _ = rel.relations(img, cap, regions, words, lengths)
    relevance = relevance.detach() * 3  # relevance of a size that moves attention visibly
    got = torch.cat(rel.attend(img, cap, connect, relevance)).detach()
    want, found = naive_attend(rel, img, cap, connect, relevance, 1.5)
    assert len(found) == layers
    torch.testing.assert_close(got, want.detach(), rtol=1e-4, atol=1e-5)

    # the same connections, another mask_weight or other relevance values: another output
    for mask_weight, rel_values in ((0.0, relevance), (1.5, relevance.flip(1))):
        rel.mask_weight = mask_weight
        other = torch.cat(rel.attend(img, cap, connect, rel_values)).detach()
        rel.mask_weight = 1.5
        torch.testing.assert_close(other, naive_attend(rel, img, cap, connect, rel_values, mask_weight)[0].detach(),
                                   rtol=1e-4, atol=1e-5)
        assert (other - got).abs().max() > 1e-3, mask_weight
    if layers == 2:  # the second layer's weights change the output
        with torch.no_grad():
            found[1].linear2.weight.mul_(-1)
        assert (torch.cat(rel.attend(img, cap, connect, relevance)).detach() - got).abs().max() > 1e-3


def test_attention_of_a_trained_module_under_no_grad_equals_training_mode():
    """Inspecting the module (eval mode, no grad) must give the numbers of the grad-mode pass;
    PyTorch's inference fast path would read the additive mask as a boolean one."""
    torch.manual_seed(0)
    rel = InstanceRelation(16, nhead=4, topk=4, threshold=0.5, dropout=0.0).eval()
    img, cap, regions, words, lengths = make_inputs(6)
    connect, relevance, _ = rel.relations(img, cap, regions, words, lengths)
    with_grad = torch.cat(rel.attend(img, cap, connect, relevance))
    with torch.no_grad():
        inspected = torch.cat(rel.attend(img, cap, connect, relevance))
    torch.testing.assert_close(inspected, with_grad)
