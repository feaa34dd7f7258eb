"""REIMPLEMENTATION (not the authors' code) of the authors' evaluation of saved similarity files, the
baseline that `eval.py --sims` is timed against in docs/evaluation.md.

    python bench/authors_eval_sims.py --make runs/coco5k_sims.npy        # a COCO 5K-sized results file
    python bench/authors_eval_sims.py runs/coco5k_sims.npy --fold5       # their ranking of it
    /usr/bin/time -v python bench/authors_eval_sims.py runs/coco5k_sims.npy --fold5   # time and peak memory

Written from the protocol of /work/shared/HREM_SPEC.md (sections 7 and 8) and the steps of the
ensemble evaluation that HREM inherits from VSE-infinity: each results file is read with
np.load(allow_pickle=True); the matrices are stacked into one array and averaged (a copy even for a
single file); with --fold5 the average is copied once more and each 1000-image fold is ranked. The
ranking is per query: image i's row is argsorted (descending) and its rank is the best position of
its five captions; caption j's column (of the transposed matrix) is argsorted and its rank is the
position of image j // 5. R@K, medr and meanr as in the protocol; with --fold5 only the five folds
and their mean are computed, as theirs does. Those steps are what its time and memory come from.

--make writes a synthetic (N, 5N) float32 matrix in the authors' results format (lib.evaluation.save_sims):
standard normal scores with +3 on each image's own captions (R@1 of a few tens of percent).
"""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import arguments  # noqa: E402
from lib.sims_file import load_sims, save_sims  # noqa: E402


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=arguments.HelpFormatter)
    p.add_argument('sims', nargs='*', help="results files (np.save of {'npts': N, 'sims': (N, 5N)})")
    p.add_argument('--fold5', action='store_true', help='COCO 1K: the five 1000-image folds and their mean')
    p.add_argument('--make', help='write a synthetic COCO 5K-sized results file here and exit')
    p.add_argument('--images', type=int, default=5000, help='images of the --make matrix (5 captions each)')
    p.add_argument('--seed', type=int, default=0, help='random seed of the --make matrix')
    return p


def make(path, n_images=5000, seed=0):
    rng = np.random.default_rng(seed)
    sims = rng.standard_normal((n_images, 5 * n_images), dtype=np.float32)
    sims[np.repeat(np.arange(n_images), 5), np.arange(5 * n_images)] += 3.0
    save_sims(path, sims)


def metrics(ranks):
    r1, r5, r10 = (100.0 * len(np.where(ranks < k)[0]) / len(ranks) for k in (1, 5, 10))
    return r1, r5, r10, np.floor(np.median(ranks)) + 1, ranks.mean() + 1


def i2t(npts, sims):
    ranks = np.zeros(npts)
    for index in range(npts):
        order = np.argsort(sims[index])[::-1]
        ranks[index] = min(np.where(order == c)[0][0] for c in range(5 * index, 5 * index + 5))
    return metrics(ranks)


def t2i(npts, sims):
    ranks = np.zeros(5 * npts)
    sims = sims.T
    for index in range(npts):
        for c in range(5 * index, 5 * index + 5):
            order = np.argsort(sims[c])[::-1]
            ranks[c] = np.where(order == index)[0][0]
    return metrics(ranks)


def evaluate(paths, fold5=False):
    # theirs reads each file with np.load(allow_pickle=True); this project never unpickles without an
    # allow-list (tests/test_security.py), so the file is read by lib.sims_file's restricted reader
    loaded = [load_sims(p) for p in paths]
    npts = loaded[0].shape[0]
    sims = np.array(loaded).mean(axis=0)  # stacked, then averaged, as theirs
    if not fold5:
        r, ri = i2t(npts, sims), t2i(npts, sims)
        return [('full', r, ri)]
    npts //= 5
    whole = sims.copy()
    out = []
    for f in range(5):
        block = whole[f * npts:(f + 1) * npts, f * 5 * npts:(f + 1) * 5 * npts]
        out.append((f'1k-fold{f}', i2t(npts, block), t2i(npts, block)))
    mean_r = tuple(np.mean([o[1] for o in out], 0))
    mean_ri = tuple(np.mean([o[2] for o in out], 0))
    return out + [('1k-mean', mean_r, mean_ri)]


def main(argv=None):
    opts = get_parser().parse_args(argv)
    if opts.make:
        make(opts.make, opts.images, opts.seed)
        return
    if not opts.sims:
        get_parser().error('give results files, or --make PATH')
    start = time.perf_counter()
    for name, r, ri in evaluate(opts.sims, opts.fold5):
        print(f'{name:>9}: i2t {r[0]:.1f} {r[1]:.1f} {r[2]:.1f} medr {r[3]:.1f} meanr {r[4]:.1f} | '
              f't2i {ri[0]:.1f} {ri[1]:.1f} {ri[2]:.1f} medr {ri[3]:.1f} meanr {ri[4]:.1f} | '
              f'rsum {sum(r[:3]) + sum(ri[:3]):.1f}')
    print(f'{time.perf_counter() - start:.1f} s after the imports', file=sys.stderr)


if __name__ == '__main__':
    main()
