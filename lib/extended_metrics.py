"""ECCV Caption and CxC metrics of a COCO 5K similarity matrix, computed by the PyPI package
eccv-caption (spec section 10), which ships both annotation sets and the test ids.

SCAN's testall split is the Karpathy test order, the order of the package's coco_test_ids.npy:
caption j of the matrix is caption id coco_test_ids[j], image i is the COCO image of captions
5i..5i+4. The package takes, per query, a list of retrieved ids (best first); it only ever looks at
the first K (R@K) or the first R (mAP@R and R-Precision, R = the query's number of positives), so
each query gets its top max(10, R) from one torch.topk, not its whole ranking. COCO 1K is the
package's too: it filters each query's list to the query's fold, which is the same as ranking
inside the fold, so each query gets its top 10 inside its fold.

Keys are the package's metric names, values percentages like the rest of the evaluation:
{'eccv_map_at_r': {'i2t', 't2i'}, 'eccv_rprecision', 'eccv_r1', 'cxc_r1', 'cxc_r5', 'cxc_r10',
 'coco_5k_r1', 'coco_5k_r5', 'coco_5k_r10', 'coco_1k_r1', 'coco_1k_r5', 'coco_1k_r10'}.
"""
import contextlib
import functools
import io
import os
import warnings

import numpy as np
import torch

from lib.errors import UserError

N_IMAGES, N_CAPTIONS = 5000, 25000
KS = (1, 5, 10)
FOLD = 1000
IDS_FILE = '{split}_ids.txt'  # one COCO image id per caption line (some SCAN releases)
CAPIDS_FILE = '{split}_capids.txt'  # one COCO caption id per caption line (VSE-infinity's CxC files)
TARGET_METRICS = ('coco_5k_recalls', 'cxc_recalls', 'eccv_map_at_r', 'eccv_rprecision', 'eccv_r1')
KEYS = ('eccv_map_at_r', 'eccv_rprecision', 'eccv_r1', *(f'cxc_r{k}' for k in KS),
        *(f'coco_5k_r{k}' for k in KS), *(f'coco_1k_r{k}' for k in KS))


@functools.lru_cache(maxsize=1)
def package_metrics():
    """The package's Metrics object (annotations loaded once per process)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # "failed to import ujson": its json fallback is fine
            from eccv_caption import Metrics
    except ImportError as err:
        raise UserError('--eccv needs the package eccv-caption: pip install "eccv-caption>=0.1.0" '
                        '(it is in requirements.txt)') from err
    return Metrics()


def package_ids():
    """(caption ids (25000,), image ids (5000,)) of the COCO 5K test split in the Karpathy order."""
    m = package_metrics()
    caption_ids = np.asarray(m.coco_ids, dtype=np.int64)
    c2i = m.coco_gts['t2i']
    image_ids = np.array([c2i[int(c)][0] for c in caption_ids[::5]], dtype=np.int64)
    return caption_ids, image_ids


def _read_ids(path):
    try:
        with open(path) as f:
            return np.array([int(line) for line in f if line.strip()], dtype=np.int64)
    except ValueError as err:
        raise UserError(f'{path} is not one integer id per line ({err}); fix or remove it') from err


def check_split_ids(folder, split='testall'):
    """Check the ids files of a precomp folder (where present) against the package's order.
    Returns the names of the files checked."""
    caption_ids, image_ids = package_ids()
    checked = []
    for pattern, want, what in ((IDS_FILE, np.repeat(image_ids, 5), 'image id'),
                                (CAPIDS_FILE, caption_ids, 'caption id')):
        path = os.path.join(folder, pattern.format(split=split))
        if not os.path.isfile(path):
            continue
        got = _read_ids(path)
        if len(got) != len(want):
            raise UserError(f'{path} has {len(got)} ids, the COCO 5K test split has {len(want)} captions; '
                            'ECCV Caption and CxC need the 5K test split in the Karpathy order')
        bad = np.flatnonzero(got != want)
        if len(bad):
            raise UserError(f'{path} line {bad[0] + 1}: {what} {got[bad[0]]}, but the Karpathy test order of '
                            f'eccv-caption has {want[bad[0]]} there ({len(bad)} lines differ); ECCV Caption and '
                            'CxC need the testall split in that order')
        checked.append(path)
    return checked


def check_shape(sims, source='the similarity matrix'):
    if tuple(sims.shape) != (N_IMAGES, N_CAPTIONS):
        raise UserError(f'--eccv needs the COCO 5K test split (5000 x 25000 similarities); {source} has shape '
                        f'{tuple(sims.shape)}')


def _top(rows, k):
    """Indices of the k largest scores of each row, best first."""
    return torch.topk(rows, k, dim=1, sorted=True).indices.numpy()


def retrieved_items(sims):
    """The package's inputs: (i2t, t2i, i2t_1k, t2i_1k) dicts of id -> ids, best first, each as
    long as its query needs (top max(10, R) of the whole split; top 10 inside the fold for 1K)."""
    m = package_metrics()
    caption_ids, image_ids = package_ids()
    sims = torch.as_tensor(np.asarray(sims, dtype=np.float32))
    kmax = max(KS)
    need_i2t = {int(k): len(set(v)) for k, v in m.eccv_gts['i2t'].items()}  # R per ECCV image query
    need_t2i = {int(k): len(set(v)) for k, v in m.eccv_gts['t2i'].items()}
    top_i2t = caption_ids[_top(sims, min(N_CAPTIONS, max(kmax, *need_i2t.values())))].tolist()
    top_t2i = image_ids[_top(sims.t(), min(N_IMAGES, max(kmax, *need_t2i.values())))].tolist()
    i2t = {iid: row[:max(kmax, need_i2t.get(iid, 0))] for iid, row in zip(image_ids.tolist(), top_i2t)}
    t2i = {cid: row[:max(kmax, need_t2i.get(cid, 0))] for cid, row in zip(caption_ids.tolist(), top_t2i)}
    i2t_1k, t2i_1k = {}, {}
    for f in range(N_IMAGES // FOLD):
        rows = slice(f * FOLD, (f + 1) * FOLD)
        cols = slice(5 * f * FOLD, 5 * (f + 1) * FOLD)
        block = sims[rows, cols]
        fold_caps, fold_imgs = caption_ids[cols], image_ids[rows]
        i2t_1k.update(zip(image_ids[rows].tolist(), fold_caps[_top(block, kmax)].tolist()))
        t2i_1k.update(zip(caption_ids[cols].tolist(), fold_imgs[_top(block.t(), kmax)].tolist()))
    return i2t, t2i, i2t_1k, t2i_1k


def extended_metrics(sims):
    """ECCV Caption (mAP@R, R-Precision, R@1), CxC R@1/5/10, and the package's COCO 5K and 1K
    R@1/5/10 of a (5000, 25000) matrix in the Karpathy test order; {key: {'i2t', 't2i'}} in percent."""
    check_shape(sims)
    m = package_metrics()
    i2t, t2i, i2t_1k, t2i_1k = retrieved_items(sims)
    with contextlib.redirect_stderr(io.StringIO()):  # the package's mAP@R shows a tqdm bar regardless
        scores = m.compute_all_metrics(i2t, t2i, target_metrics=TARGET_METRICS, Ks=KS, verbose=False)
        for k in KS:
            scores[f'coco_1k_r{k}'] = m.coco_1k_recalls({'i2t': i2t_1k, 't2i': t2i_1k}, 'all', K=k)
    return {key: {side: 100.0 * float(scores[key][side]) for side in ('i2t', 't2i')} for key in KEYS}


def format_extended(ext):
    names = {'eccv_map_at_r': 'ECCV mAP@R', 'eccv_rprecision': 'ECCV R-P', 'eccv_r1': 'ECCV R@1',
             'cxc_r1': 'CxC R@1', 'cxc_r5': 'CxC R@5', 'cxc_r10': 'CxC R@10'}
    return '\n'.join(f"{side}: " + ', '.join(f"{title} {ext[key][side]:.1f}" for key, title in names.items())
                     for side in ('i2t', 't2i'))
