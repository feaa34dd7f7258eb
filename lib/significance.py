"""Is a difference between two models real? Paired bootstrap intervals and sign-flip p-values.

Ranks are counted once per matrix (lib.metrics); what is resampled are per-image values:
for each R@K, the image's own image-to-text hit (0/1) and the mean text-to-image hit of its P
captions. The resampling unit is the image with its captions, so the two directions stay
paired, and a model A and a model B are paired on the same images. The COCO 1K protocol
(fold5) ranks inside each 1000-image fold and resamples inside each fold (strata).

A resample is a row of counts (how often each image was drawn); every metric of every resample
is then one matrix product, counts (B, N) @ values (N, M), so 1000 resamples of COCO 5K take
well under a second.

Several seeds per side (A_1..A_S against B_1..B_S, seed s paired with seed s): the difference is
the mean d of the S per-seed differences d_s. Its standard error adds the two sources of noise,
se^2 = var(d_s) / S + the bootstrap variance of d over the test images, and the interval and
p-value are Student's t with S - 1 degrees of freedom: with a handful of seeds the seed-to-seed
spread is itself uncertain, which t accounts for. (A bootstrap of 3 seed pairs would not: its
interval never reaches past the range of the 3 differences, so 3 differences of one sign, a
1-in-4 event when nothing differs, would always exclude 0.)
"""
import numpy as np
import torch

from lib import metrics as evaluation
from lib.metrics import RECALL_AT, check_fold5, check_sims_shape, i2t_ranks, t2i_ranks

METRICS = [f'{d}_r{k}' for d in ('i2t', 't2i') for k in RECALL_AT]  # the six R@K, then 'rsum'
ALL_METRICS = METRICS + ['rsum']


def query_ranks(sims, fold5=False):
    """(i2t ranks (N,), t2i ranks (P N,), P) of a (N, P N) matrix; with fold5, ranks inside each
    1000-image fold (the COCO 1K protocol)."""
    sims = torch.as_tensor(np.asarray(sims, dtype=np.float32))
    per_image = check_sims_shape(sims)
    if not fold5:
        return i2t_ranks(sims, per_image), t2i_ranks(sims, per_image), per_image
    check_fold5(sims.shape[0])
    fold = evaluation.FOLD_IMAGES
    caps = per_image * fold
    blocks = [sims[f * fold:(f + 1) * fold, f * caps:(f + 1) * caps] for f in range(5)]
    return (np.concatenate([i2t_ranks(b, per_image) for b in blocks]),
            np.concatenate([t2i_ranks(b, per_image) for b in blocks]), per_image)


def per_image_values(i2t, t2i, per_image):
    """(N, 6) float64: for each image and each R@K (METRICS order), 100 x its i2t hit, then
    100 x the mean t2i hit of its captions. The column means are the R@K of the split."""
    n = len(i2t)
    t2i = np.asarray(t2i).reshape(n, per_image)
    cols = [np.asarray(i2t) < k for k in RECALL_AT] + [(t2i < k).mean(1) for k in RECALL_AT]
    return 100.0 * np.stack(cols, 1).astype(np.float64)


def with_rsum(values):
    """Append the rsum column (sum of the six R@K) to (..., 6) values."""
    return np.concatenate([values, values.sum(-1, keepdims=True)], -1)


def bootstrap_indices(n, n_boot, rng, strata=None):
    """(n_boot, n) image indices drawn with replacement; with strata (the size of consecutive
    equal blocks, e.g. 1000 for COCO 1K), each block is resampled inside itself."""
    if strata is None or strata >= n:
        return rng.integers(0, n, size=(n_boot, n))
    if n % strata:
        raise ValueError(f'{n} images do not split into blocks of {strata}')
    offsets = np.repeat(np.arange(0, n, strata), strata)
    return rng.integers(0, strata, size=(n_boot, n)) + offsets


def resample_counts(idx, n):
    """(B, n) float64 counts: how often each image appears in each resample (row) of idx."""
    n_boot = idx.shape[0]
    flat = (idx + n * np.arange(n_boot)[:, None]).ravel()
    return np.bincount(flat, minlength=n_boot * n).reshape(n_boot, n).astype(np.float64)


def resampled_means(values, idx):
    """(B, M): the mean of each column of values (N, M) over the images of each resample."""
    return resample_counts(idx, values.shape[0]) @ values / idx.shape[1]


def sign_flip_p(diffs, n_perm, rng):
    """Two-sided p-value per column of the per-image paired differences diffs (N, M): the share
    of random sign flips (and the observed one) whose |mean| is at least the observed |mean|.
    A column of zeros gets 1."""
    n = diffs.shape[0]
    signs = rng.integers(0, 2, size=(n_perm, n)).astype(np.float64) * 2 - 1
    observed = np.abs(diffs.mean(0))
    flipped = np.abs(signs @ diffs / n)
    tol = 1e-9 * np.maximum(1.0, observed)  # float rounding must not turn a tie into a miss
    return (1 + (flipped >= observed - tol).sum(0)) / (1 + n_perm)


def percentile_interval(samples):
    """95% percentile interval of each column of samples (B, M) -> (M, 2)."""
    return np.percentile(samples, [2.5, 97.5], axis=0).T


def _as_list(x):
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _check_same_shape(mats):
    shapes = {tuple(np.shape(m)) for m in mats}
    if len(shapes) > 1:
        from lib.errors import UserError
        raise UserError(f'the matrices to compare have different shapes {sorted(shapes)}; compare models '
                        'evaluated on the same split')


def compare(sims_a, sims_b, n_boot=1000, seed=0, fold5=False):
    """Paired comparison of model A and model B on the same split.

    sims_a, sims_b: one similarity matrix each, or lists of S matrices (seed s of A paired with
    seed s of B). Returns {'bootstrap', 'seeds', 'metrics': {name: {'a', 'b', 'diff', 'ci95',
    'p'}}, 'queries': {'i2t'|'t2i': {'better', 'worse', 'same'}}} with metrics in percent;
    'queries' counts the queries whose rank B improved, worsened or kept (summed over seed pairs)."""
    sims_a, sims_b = _as_list(sims_a), _as_list(sims_b)
    if len(sims_a) != len(sims_b):
        from lib.errors import UserError
        raise UserError(f'{len(sims_a)} matrices for A but {len(sims_b)} for B; give one of each per seed')
    _check_same_shape(sims_a + sims_b)
    ranked_a = [query_ranks(s, fold5) for s in sims_a]
    ranked_b = [query_ranks(s, fold5) for s in sims_b]
    return compare_ranks(ranked_a, ranked_b, n_boot, seed, fold5)


def compare_ranks(ranked_a, ranked_b, n_boot=1000, seed=0, fold5=False, idx=None):
    """compare() from precomputed query_ranks() triples (lists, one per seed). idx (B, N) may be
    given to fix the image resamples (tests)."""
    vals_a = np.stack([per_image_values(*r) for r in ranked_a])  # (S, N, 6)
    vals_b = np.stack([per_image_values(*r) for r in ranked_b])
    n_seeds, n = vals_a.shape[:2]
    rng = np.random.default_rng(seed)
    if idx is None:
        idx = bootstrap_indices(n, n_boot, rng, evaluation.FOLD_IMAGES if fold5 else None)
    n_boot = idx.shape[0]
    mean_diff = with_rsum(vals_b - vals_a).mean(0)  # (N, 7): per image, averaged over the seed pairs
    diff = mean_diff.mean(0)  # (7,)
    boot = resampled_means(mean_diff, idx)  # (B, 7): the same image draw for every seed pair
    if n_seeds == 1:
        ci = percentile_interval(boot)
        p = sign_flip_p(mean_diff, n_boot, rng)
        per_seed = None
    else:
        from scipy import stats  # only here: eval.py and a one-seed comparison need no scipy (0.6 s to import)
        per_seed = with_rsum((vals_b - vals_a).mean(1))  # (S, 7)
        se = np.sqrt(per_seed.var(0, ddof=1) / n_seeds + boot.var(0, ddof=1))
        t = stats.t(df=n_seeds - 1)
        half = t.ppf(0.975) * se
        ci = np.stack([diff - half, diff + half], 1)
        with np.errstate(divide='ignore', invalid='ignore'):
            p = np.where(se > 0, 2 * t.sf(np.abs(diff) / se), 1.0)
    a, b = with_rsum(vals_a.mean((0, 1))), with_rsum(vals_b.mean((0, 1)))
    metrics = {name: {'a': float(a[j]), 'b': float(b[j]), 'diff': float(diff[j]),
                      'ci95': [float(ci[j, 0]), float(ci[j, 1])], 'p': float(p[j])}
               for j, name in enumerate(ALL_METRICS)}
    if per_seed is not None:
        for j, name in enumerate(ALL_METRICS):
            metrics[name]['per_seed'] = [float(d[j]) for d in per_seed]
    queries = {}
    for side, j in (('i2t', 0), ('t2i', 1)):
        ra = np.concatenate([r[j] for r in ranked_a])
        rb = np.concatenate([r[j] for r in ranked_b])
        queries[side] = {'better': int((rb < ra).sum()), 'worse': int((rb > ra).sum()),
                         'same': int((rb == ra).sum())}
    return {'bootstrap': int(n_boot), 'seeds': int(n_seeds), 'metrics': metrics, 'queries': queries}


def intervals(sims, n_boot=1000, seed=0, fold5=False):
    """One model's metrics with 95% bootstrap intervals (images resampled, inside the folds with
    fold5): {'bootstrap', 'metrics': {name: {'value', 'ci95'}}}."""
    vals = per_image_values(*query_ranks(sims, fold5))
    rng = np.random.default_rng(seed)
    idx = bootstrap_indices(vals.shape[0], n_boot, rng, evaluation.FOLD_IMAGES if fold5 else None)
    boot = with_rsum(resampled_means(vals, idx))
    ci = percentile_interval(boot)
    value = with_rsum(vals.mean(0))
    return {'bootstrap': int(n_boot),
            'metrics': {name: {'value': float(value[j]), 'ci95': [float(ci[j, 0]), float(ci[j, 1])]}
                        for j, name in enumerate(ALL_METRICS)}}


def format_compare(result, label_a='A', label_b='B'):
    lines = [f"{'metric':>8} {label_a:>8} {label_b:>8} {'B - A':>7}     95% interval        p"]
    for name, m in result['metrics'].items():
        lo, hi = m['ci95']
        lines.append(f"{name:>8} {m['a']:8.2f} {m['b']:8.2f} {m['diff']:+7.2f}   [{lo:+7.2f}, {hi:+7.2f}] {m['p']:6.3f}")
    pairs = f" over {result['seeds']} seed pairs" if result['seeds'] > 1 else ''
    for side, q in result['queries'].items():
        lines.append(f"{side} queries{pairs}: {q['better']} ranked better by B, {q['worse']} worse, {q['same']} the same")
    if result['seeds'] > 1:
        lines.append(f"per seed pair, rsum B - A: {', '.join(f'{d:+.2f}' for d in result['metrics']['rsum']['per_seed'])}")
        lines.append(f"interval and p: Student's t over the {result['seeds']} seed pairs ({result['seeds'] - 1} degrees "
                     f"of freedom), the standard error adding {result['bootstrap']} paired bootstrap resamples of "
                     'the test images')
    else:
        lines.append(f"{result['bootstrap']} paired bootstrap resamples of the images (with their captions); "
                     'p: two-sided sign-flip permutation test. One seed pair: the interval covers the test images, '
                     'not the variation between training seeds')
    return '\n'.join(lines)


def format_intervals(result, name='full'):
    parts = [f"{k} {m['value']:.1f} [{m['ci95'][0]:.1f}, {m['ci95'][1]:.1f}]" for k, m in result['metrics'].items()]
    return f"{name:>9} 95% intervals ({result['bootstrap']} bootstrap resamples): " + ', '.join(parts)
