"""Both matching losses of spec section 5, against direct computations on small examples."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lib.losses import MatchingLoss, distance_weighted_triplet, dws_weights, positive_mask, vse_loss


def example(b=6, e=8, seed=0, ids=(0, 0, 1, 2, 3, 3)):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(b, e, generator=g), dim=1)
    cap = F.normalize(img + 0.7 * torch.randn(b, e, generator=g), dim=1)
    return img, cap, torch.tensor(ids[:b])


def vse_direct(s, ids, margin, hardest):
    """Hinge per anchor over the captions (images) of other images; hardest or summed."""
    n, total = len(s), 0.0
    for a in range(n):
        for direction in ('i2t', 't2i'):
            costs = []
            for j in range(n):
                if ids[j] == ids[a]:
                    continue  # same image: never a negative
                neg = s[a][j] if direction == 'i2t' else s[j][a]
                costs.append(max(0.0, margin + neg - s[a][a]))
            total += (max(costs) if hardest else sum(costs)) if costs else 0.0
    return total


@pytest.mark.parametrize('hardest', [True, False])
def test_vse_equals_a_direct_loop(hardest):
    img, cap, ids = example()
    sims = img @ cap.t()
    got = MatchingLoss('vse', margin=0.2)(img, cap, ids, max_violation=hardest)
    want = vse_direct(sims.tolist(), ids.tolist(), 0.2, hardest)
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_vse_never_uses_same_image_pairs():
    img, cap, ids = example()
    sims = img @ cap.t()
    pos = positive_mask(ids)
    base = vse_loss(sims, pos)
    bumped = sims.clone()
    bumped[0, 1] = bumped[1, 0] = 5.0  # same-image entries move: the loss must not
    assert vse_loss(bumped, pos).item() == pytest.approx(base.item())
    bumped[0, 2] = 5.0  # a true negative moves: it must
    assert vse_loss(bumped, pos).item() > base.item() + 1


def naive_dws_weights(s, pos, cutoff, n=512):
    """Spec section 5 in numpy fp32 (as the loss): clamp d at 0.5, log-weight, non-finite -> 0
    (positives' log-weight 0, as the authors), subtract row max, exp, zero positives and
    d >= cutoff, normalise."""
    s, pos = np.asarray(s, np.float32), np.asarray(pos)
    d = np.maximum(np.sqrt(np.maximum(2 - 2 * s, 0)), 0.5)
    with np.errstate(divide='ignore', invalid='ignore'):
        lw = (2 - n) * np.log(d) - ((n - 3) / 2) * np.log(1 - d * d / 4)
    lw[pos | ~np.isfinite(lw)] = 0
    w = np.exp(lw - lw.max(1, keepdims=True))
    w[pos | (d >= cutoff)] = 0
    sums = w.sum(1, keepdims=True)
    return np.divide(w, sums, out=np.zeros_like(w), where=sums > 0), d


def spread_sims(b=8, seed=0):
    """Similarities covering the whole range, so some distances exceed the cut-off."""
    rng = np.random.default_rng(seed)
    s = rng.uniform(-0.55, 0.95, (b, b))  # distances 0.32 .. 1.76
    s[np.arange(b), np.arange(b)] = 0.9
    return torch.tensor(s, dtype=torch.float32)


def test_dws_weights_equal_the_formula():
    sims = spread_sims()
    ids = torch.tensor([0, 0, 1, 2, 3, 4, 5, 6])
    pos = positive_mask(ids)
    got = dws_weights(sims, pos, cutoff=1.7).double().numpy()
    want, d = naive_dws_weights(sims.numpy(), pos.numpy(), 1.7)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)
    assert (got[pos.numpy()] == 0).all() and (got[d >= 1.7] == 0).all()
    np.testing.assert_allclose(got.sum(1), 1, rtol=1e-5)
    assert (got > 1e-6).sum() > len(got)  # several eligible negatives per row
    assert (d[~pos.numpy()] >= 1.7).any()  # and some beyond the cut-off


def test_sampled_negatives_and_the_loss_of_a_fixed_draw():
    sims = spread_sims(seed=1)
    ids = torch.tensor([0, 0, 1, 2, 3, 4, 5, 6])
    pos = positive_mask(ids)
    dist = (2 - 2 * sims).clamp(min=0).sqrt()
    anchors, positives = pos.nonzero(as_tuple=True)
    w = dws_weights(sims, pos, 1.7)[anchors]
    assert (w.sum(1) > 0.99).all()
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        drawn = torch.multinomial(w, 1, generator=torch.Generator().manual_seed(seed)).squeeze(1)
        assert not pos[anchors, drawn].any()
        assert (dist[anchors, drawn] < 1.7).all()
        want = sum(max(0.0, 0.2 + sims[a, n].item() - sims[a, p].item())
                   for a, p, n in zip(anchors.tolist(), positives.tolist(), drawn.tolist()))
        got = distance_weighted_triplet(sims, pos, 0.2, 1.7, generator=g)
        assert got.item() == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_a_row_without_eligible_negative_contributes_zero():
    sims = torch.full((4, 4), 0.5)
    sims[0] = -0.9                              # every negative of row 0 is beyond the cut-off (d = 1.95)
    sims[0, 0], sims[1, 1], sims[2, 2], sims[3, 3] = 0.9, 0.4, 0.4, 0.4
    pos = torch.eye(4, dtype=torch.bool)
    weights = dws_weights(sims, pos, 1.7)
    assert weights[0].sum() == 0 and (weights[1:].sum(1) > 0.99).all()
    # rows 1-3: every eligible negative scores 0.5, so any draw costs 0.2 + 0.5 - 0.4
    got = distance_weighted_triplet(sims, pos, 0.2, 1.7, generator=torch.Generator().manual_seed(0))
    assert got.item() == pytest.approx(3 * 0.3, rel=1e-5)
    assert distance_weighted_triplet(sims[:1], pos[:1], 0.2, 1.7).item() == 0.0


def test_trip_never_samples_same_image_pairs_in_both_directions():
    img, cap, ids = example(b=6, seed=3)
    loss = MatchingLoss('trip', cutoff=1.99)
    sims = img @ cap.t()
    pos = positive_mask(ids)
    for direction in (sims, sims.t()):
        w = dws_weights(direction, pos, 1.99)
        assert (w[pos] == 0).all()
    torch.manual_seed(0)
    assert torch.isfinite(loss(img, cap, ids))


def test_trip_in_both_directions_equals_a_per_anchor_loop(monkeypatch):
    """HREM's trip losses as --dataset coco --margin 0.35 builds them (cut-off 1.9), against a
    per-anchor loop in both directions; the draws are recorded, not re-made."""
    import arguments
    from conftest import tiny_bert
    from lib.models import HREM, config_from_args
    args = arguments.parse_train_args(['--dataset', 'coco', '--margin', '0.35', '--embed_size', '32',
                                       '--nhead', '4', '--base_loss', 'trip', '--gnn_loss', 'trip'])
    assert args.trip_cutoff == 1.9  # the authors' COCO cut-off
    model = HREM(config_from_args(args, 8), tiny_bert())
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(8, 3, generator=g), dim=1)  # 3-d: distances spread over 0 .. 2
    cap = F.normalize(img + 0.5 * torch.randn(8, 3, generator=g), dim=1)
    ids = torch.tensor([0, 0, 1, 2, 3, 4, 4, 5])
    s = (img @ cap.t()).numpy()
    pos = (ids[:, None] == ids[None, :]).numpy()

    draws = []
    real_multinomial = torch.multinomial

    def recording(weights, n, generator=None):
        drawn = real_multinomial(weights, n, generator=generator)
        draws.append((weights.clone(), drawn[:, 0].tolist()))
        return drawn
    monkeypatch.setattr(torch, 'multinomial', recording)

    between = 0
    for loss in (model.base_loss, model.relation_loss):
        draws.clear()
        got = loss(img, cap, ids).item()
        assert len(draws) == 2  # one draw per direction
        want = 0.0
        # direction 1: image anchors over captions (rows of s); direction 2: caption anchors over images
        for (weights, drawn), s_dir in zip(draws, (s, s.T)):
            naive_w, d = naive_dws_weights(s_dir, pos, 1.9)
            between += int(((naive_w > 0) & (d >= 1.7)).sum())
            row = 0
            for a in range(8):
                for p in range(8):
                    if ids[p] != ids[a]:
                        continue
                    if naive_w[a].sum() > 0:
                        w = weights[row].double().numpy()  # rows normalise with + 1e-20: compare shapes
                        np.testing.assert_allclose(w / w.sum(), naive_w[a], rtol=1e-4, atol=1e-7)
                        n = drawn[row]
                        assert ids[n] != ids[a] and d[a, n] < 1.9
                        want += max(0.0, 0.35 + s_dir[a, n] - s_dir[a, p])
                    row += 1
            assert row == len(drawn)
        assert got == pytest.approx(want, rel=1e-5)
        assert want > 0
    assert between > 0  # negatives between 1.7 and 1.9 were eligible: the COCO cut-off is in force


class Scalars:
    """A stand-in TensorBoard writer that keeps what train_one_epoch logs."""

    def __init__(self):
        self.values = {}

    def add_scalar(self, tag, value, step):
        self.values[tag] = value

    def flush(self):
        pass


def test_vse_sums_for_the_warmup_epochs_then_takes_the_hardest():
    """--vse_mean_warmup_epochs 2: epoch 1 still sums over negatives, epoch 2 takes the hardest;
    --max_violation: the hardest from epoch 0 on. The logged loss of one step of train.py's
    epoch loop against vse_direct on the same embeddings."""
    from conftest import tiny_args, tiny_bert
    from lib.distributed import DistEnv
    from lib.engine import train_one_epoch
    from lib.training import TrainState
    from lib.models import HREM, config_from_args
    from lib.optim import build_optimizer
    from lib.precision import grad_scaler
    from test_relations import fake_batch
    args = tiny_args('--base_loss', 'vse', '--gnn_loss', 'vse', '--dropout', '0', '--warmup', '100',
                     '--vse_mean_warmup_epochs', '2', '--margin', '0.3', '--batch_size', '6')
    model = HREM(config_from_args(args, 24), tiny_bert())
    optimizer, _ = build_optimizer(model, args)
    env = DistEnv(0, 1, 0, torch.device('cpu'))
    batch = fake_batch()
    ids = batch['img_ids'].tolist()
    for max_violation, epoch in ((False, 1), (False, 2), (True, 0)):
        args.max_violation = max_violation
        hardest_from = 0 if max_violation else 2
        model.train()
        with torch.no_grad():
            img, _ = model.encode_image(batch['regions'], batch['region_lengths'])
            cap, _ = model.encode_text(batch['tokens'], batch['token_lengths'])
        sims = (img @ cap.t()).tolist()
        summed, hardest = vse_direct(sims, ids, 0.3, False), vse_direct(sims, ids, 0.3, True)
        assert summed > hardest + 0.1  # the two objectives are told apart
        writer = Scalars()
        train_one_epoch(model, [batch], optimizer, grad_scaler(env.device, 'fp32'), TrainState(epoch), args, env,
                        writer)
        want = hardest if epoch >= hardest_from else summed
        assert writer.values['train/loss'] == pytest.approx(want, rel=1e-5), (max_violation, epoch)
