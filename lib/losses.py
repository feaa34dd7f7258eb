"""Matching losses on a batch of normalised image and caption embeddings (both directions).

Positives are pairs with the same image id (HREM); they are never used as negatives. VSE∞'s
VSE++ loss takes the diagonal alone as positives (positives='diagonal'): another caption of the
same image in the batch is a negative there. Losses are sums over the batch, as in the authors'
code. Everything is computed in fp32.
"""
import torch
import torch.nn.functional as F

DWS_MIN_DISTANCE = 0.5  # distance-weighted sampling clamps distances below this
DWS_DIM = 512           # the "n" of the distance distribution on the unit sphere


POSITIVES = ('image_id', 'diagonal')


def positive_mask(img_ids, positives='image_id'):
    """(B, B) bool, True where image i and caption j are a positive pair."""
    if positives == 'diagonal':
        return torch.eye(len(img_ids), dtype=torch.bool, device=img_ids.device)
    return img_ids[:, None] == img_ids[None, :]


def vse_loss(sims, pos, margin=0.2, max_violation=True):
    """VSE++: hinge against the hardest negative (or the sum over all negatives).

    sims: (B, B) image x caption; pair i (image i, caption i) is the positive of row/column i.
    """
    diag = sims.diagonal()[:, None]
    cost_cap = (margin + sims - diag).clamp(min=0).masked_fill(pos, 0)     # image anchors
    cost_img = (margin + sims - diag.t()).clamp(min=0).masked_fill(pos, 0)  # caption anchors
    if max_violation:
        return cost_cap.max(dim=1).values.sum() + cost_img.max(dim=0).values.sum()
    return cost_cap.sum() + cost_img.sum()


@torch.no_grad()
def dws_weights(sims, pos, cutoff):
    """Per row, the sampling distribution over negatives (all zero when none is eligible).

    Positives' log-weights are zeroed before the row max, as the authors do.
    """
    neg = ~pos
    dist = (2 - 2 * sims).clamp(min=0).sqrt().clamp(min=DWS_MIN_DISTANCE)
    log_w = (2.0 - DWS_DIM) * dist.log() - ((DWS_DIM - 3) / 2.0) * (1.0 - 0.25 * dist * dist).log()
    log_w = torch.where(torch.isfinite(log_w), log_w * neg, torch.zeros_like(log_w))
    weight = (log_w - log_w.max(dim=1, keepdim=True).values).exp()
    weight = weight * (neg & (dist < cutoff))
    return weight / (weight.sum(dim=1, keepdim=True) + 1e-20)


def distance_weighted_triplet(sims, pos, margin=0.2, cutoff=1.7, generator=None):
    """Distance-weighted negative sampling (Wu et al., ICCV 2017), rows are anchors.

    For every positive pair (a, p) one negative n of row a is drawn with probability
    proportional to q(d)^-1 (d = sqrt(2 - 2 s), the inverse density of distances between
    random points on the n-sphere), restricted to d < cutoff; loss relu(margin + s_an - s_ap).
    A row with no eligible negative contributes 0.
    """
    weight = dws_weights(sims, pos, cutoff)
    anchor, positive = pos.nonzero(as_tuple=True)
    w = weight[anchor]
    has_negative = w.sum(dim=1) > 0
    # rows without an eligible negative draw from a dummy uniform row and are zeroed below
    w = torch.where(has_negative[:, None], w, torch.ones_like(w))
    negative = torch.multinomial(w, 1, generator=generator).squeeze(1)
    loss = F.relu(margin + sims[anchor, negative] - sims[anchor, positive])
    return (loss * has_negative).sum()


class MatchingLoss:
    """l(v, t) in both directions: image anchors over captions and caption anchors over images."""

    def __init__(self, kind, margin=0.2, cutoff=1.7, positives='image_id'):
        if kind not in ('trip', 'vse'):
            raise ValueError(f'unknown loss {kind!r}')
        if positives not in POSITIVES:
            raise ValueError(f'unknown positives {positives!r}')
        self.kind, self.margin, self.cutoff, self.positives = kind, margin, cutoff, positives

    def __call__(self, img, cap, img_ids, max_violation=True):
        """max_violation False: the sum over negatives (the vse loss's first-epoch warm-up)."""
        sims = img.float() @ cap.float().t()
        pos = positive_mask(img_ids, self.positives)
        if self.kind == 'vse':
            return vse_loss(sims, pos, self.margin, max_violation)
        return (distance_weighted_triplet(sims, pos, self.margin, self.cutoff)
                + distance_weighted_triplet(sims.t(), pos.t(), self.margin, self.cutoff))
