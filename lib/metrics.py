"""The field's retrieval metrics, pure functions of a similarity matrix: rank by counting, report
R@K / medr / meanr (no model, no files).

sims = img @ cap.T has shape (N, 5N), captions 5i..5i+4 belonging to image i, or (N, N) for a
split with one caption per image (caption i belongs to image i); P = 5 or 1 captions per image.
- image-to-text rank of image i: the best 0-based position among its P captions;
- text-to-image rank of caption j: the position of image j // P;
- R@K = 100 * fraction of ranks < K; medr = floor(median) + 1; meanr = mean + 1.
A rank is the number of candidates that score strictly higher than the positive, so no sort
is needed.
"""
import numpy as np
import torch

from lib.errors import UserError
from lib.progress import progress

RECALL_AT = (1, 5, 10)
ROW_CHUNK = 1024  # rows ranked at a time: bounds the temporary boolean matrix


def i2t_ranks(sims, per_image=5):
    s = torch.as_tensor(sims)
    n = s.shape[0]
    ranks = torch.empty(n, dtype=torch.long)
    for start in range(0, n, ROW_CHUNK):
        rows = s[start:start + ROW_CHUNK]
        idx = torch.arange(start, start + len(rows))
        own = rows.gather(1, idx[:, None] * per_image + torch.arange(per_image)[None])
        # the best of the positives is the one with the highest score
        ranks[start:start + len(rows)] = (rows > own.max(dim=1, keepdim=True).values).sum(1)
    return ranks.numpy()


def t2i_ranks(sims, per_image=5):
    s = torch.as_tensor(sims).t()
    m = s.shape[0]
    ranks = torch.empty(m, dtype=torch.long)
    for start in range(0, m, ROW_CHUNK):
        rows = s[start:start + ROW_CHUNK]
        own = rows.gather(1, (torch.arange(start, start + len(rows)) // per_image)[:, None])
        ranks[start:start + len(rows)] = (rows > own).sum(1)
    return ranks.numpy()


def recall_metrics(ranks):
    out = {f'r{k}': 100.0 * float(np.mean(ranks < k)) for k in RECALL_AT}
    out['medr'] = float(np.floor(np.median(ranks)) + 1)
    out['meanr'] = float(ranks.mean() + 1)
    return out


def check_sims_shape(sims, source='similarity matrix'):
    """Captions per image of a similarity matrix: 5 for (N, 5N), 1 for (N, N)."""
    if sims.ndim == 2 and sims.shape[0] > 0:
        for per_image in (5, 1):
            if sims.shape[1] == per_image * sims.shape[0]:
                return per_image
    raise UserError(f'{source} has shape {tuple(sims.shape)}; expected (N images, 5N captions) or, with one '
                    'caption per image, (N, N)')


def rank_metrics(sims, name='full'):
    """Metrics of one (N, 5N) or (N, N) similarity matrix."""
    per_image = check_sims_shape(sims)
    i2t = recall_metrics(i2t_ranks(sims, per_image))
    t2i = recall_metrics(t2i_ranks(sims, per_image))
    rsum = sum(i2t[f'r{k}'] + t2i[f'r{k}'] for k in RECALL_AT)
    return {'name': name, 'n_images': int(sims.shape[0]), 'n_captions': int(sims.shape[1]),
            'i2t': i2t, 't2i': t2i, 'rsum': rsum}


FOLD_IMAGES = 1000


def check_fold5(n_images, source='this matrix'):
    if n_images != 5 * FOLD_IMAGES:
        raise UserError(f'--fold5 needs the 5000-image COCO testall split; {source} has {n_images} images. '
                        'Drop --fold5 or pass --split testall')


def evaluate_sims(sims, fold5=False):
    """Results for the whole matrix and, with fold5 (COCO 1K), the five 1000-image folds and
    their mean (every metric averaged over folds, rsum included)."""
    sims = torch.as_tensor(np.asarray(sims, dtype=np.float32))
    results = [rank_metrics(sims)]
    if fold5:
        check_fold5(sims.shape[0])
        fold_caps = check_sims_shape(sims) * FOLD_IMAGES
        folds = [rank_metrics(sims[i * FOLD_IMAGES:(i + 1) * FOLD_IMAGES,
                                   i * fold_caps:(i + 1) * fold_caps], f'1k-fold{i}')
                 for i in progress(range(5), desc='ranking the 1K folds', unit='fold')]
        mean = {'name': '1k-mean', 'n_images': FOLD_IMAGES, 'n_captions': fold_caps}
        for side in ('i2t', 't2i'):
            mean[side] = {k: float(np.mean([f[side][k] for f in folds])) for k in folds[0][side]}
        mean['rsum'] = float(np.mean([f['rsum'] for f in folds]))
        results += folds + [mean]
    return results


def format_result(r):
    i, t = r['i2t'], r['t2i']
    return (f"{r['name']:>9} ({r['n_images']} images): "
            f"i2t R@1 {i['r1']:.1f} R@5 {i['r5']:.1f} R@10 {i['r10']:.1f} medr {i['medr']:.1f} meanr {i['meanr']:.1f} | "
            f"t2i R@1 {t['r1']:.1f} R@5 {t['r5']:.1f} R@10 {t['r10']:.1f} medr {t['medr']:.1f} meanr {t['meanr']:.1f} | "
            f"rsum {r['rsum']:.1f}")
