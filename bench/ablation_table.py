"""The ablations over seeds: each variant's mean ± std and its paired difference to the full model.

    python bench/ablation_table.py --seeds 0 1 2            # after bash bench/ablations.sh 0 1 2
    python bench/ablation_table.py --runs runs/ablations --seeds 0 1 2 --json ablations.json

Reads runs/ablations/<variant>_s<seed>/ (results.json and the test similarities results_*.npy that
train.py writes). For each variant: the seeds it has, rsum and R@1 as mean ± standard deviation over
them, and against the full model of the same seeds (seed s paired with seed s) the mean difference
of rsum, its 95% interval and p-value from lib/significance.py (Student's t over the seed pairs, the
test images' bootstrap variance added). "yes" in the last column: the interval excludes 0; with a
single seed pair no verdict is given, since one pair's interval covers the test images but not the
variation between training seeds. A run that is missing or unfinished is listed as missing and left out.
"""
import argparse
import glob
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import arguments  # noqa: E402
from lib import significance  # noqa: E402
from lib.errors import UserError, exit_on_user_error  # noqa: E402
from lib.sims_file import load_sims  # noqa: E402
from lib.writing import atomic_write  # noqa: E402

VARIANTS = ['full', 'no_instance_relation', 'no_connection', 'no_relevance', 'no_regulariser', 'no_cross_loss',
            'no_fragment_transformer']
FULL = 'full'


def finished(folder):
    """(results.json contents, path of the similarity file), or None for a missing or unfinished run."""
    results = os.path.join(folder, 'results.json')
    sims = sorted(glob.glob(os.path.join(glob.escape(folder), 'results_*.npy')))
    if not (os.path.isfile(results) and sims):
        return None
    with open(results) as f:
        return json.load(f), sims[0]


def mean_std(values):
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else None


def fmt(mean, std):
    return f'{mean:.1f}' + (f' ± {std:.1f}' if std is not None else '')


def summarise(root, seeds, variants=VARIANTS, n_boot=1000, seed=0):
    runs = {(v, s): finished(os.path.join(root, f'{v}_s{s}')) for v in variants for s in seeds}
    missing = [f'{v}_s{s}' for (v, s), r in runs.items() if r is None]
    out = []
    for v in variants:
        have = [s for s in seeds if runs[(v, s)] is not None]
        if not have:
            out.append({'variant': v, 'seeds': [], 'n': 0})
            continue
        full = [r['results'][0] for r in (runs[(v, s)][0] for s in have)]
        row = {'variant': v, 'seeds': have, 'n': len(have),
               'rsum': mean_std([r['rsum'] for r in full]),
               'i2t_r1': mean_std([r['i2t']['r1'] for r in full]),
               't2i_r1': mean_std([r['t2i']['r1'] for r in full]),
               'rsum_per_seed': [r['rsum'] for r in full]}
        paired = [s for s in have if runs[(FULL, s)] is not None]
        if v != FULL and paired:
            a = [load_sims(runs[(FULL, s)][1]) for s in paired]
            b = [load_sims(runs[(v, s)][1]) for s in paired]
            rsum = significance.compare(a, b, n_boot, seed)['metrics']['rsum']
            # compare() gives the per-seed differences for several seed pairs; one pair's is the difference
            per_seed = rsum.pop('per_seed', [rsum['diff']])
            row['vs_full'] = {'seeds': paired, **rsum, 'per_seed_diff': per_seed}
        out.append(row)
    return out, missing


def markdown(rows):
    lines = ['| variant | seeds | rsum | I2T R@1 | T2I R@1 | rsum - full (per seed) | 95% interval | p | '
             'distinguishable from 0 |', '|---|---|---|---|---|---|---|---|---|']
    for r in rows:
        if not r['n']:
            lines.append(f"| {r['variant']} | none | - | - | - | - | - | - | - |")
            continue
        cells = [r['variant'], ', '.join(map(str, r['seeds'])), fmt(*r['rsum']), fmt(*r['i2t_r1']), fmt(*r['t2i_r1'])]
        c = r.get('vs_full')
        if c:
            per_seed = ', '.join(f'{d:+.1f}' for d in c['per_seed_diff'])
            lo, hi = c['ci95']
            # one seed pair: the interval covers the test images only, not the seed-to-seed variation
            verdict = ('yes' if lo > 0 or hi < 0 else 'no') if len(c['seeds']) > 1 else 'not judged (one seed)'
            cells += [f"{c['diff']:+.1f} ({per_seed})", f'[{lo:+.1f}, {hi:+.1f}]', f"{c['p']:.3f}", verdict]
        else:
            cells += ['-'] * 4
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


@exit_on_user_error
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=arguments.HelpFormatter)
    p.add_argument('--runs', default='runs/ablations', help='folder holding <variant>_s<seed> run folders')
    p.add_argument('--seeds', type=int, nargs='+', default=[0], help='training seeds to include')
    p.add_argument('--bootstrap', type=int, default=1000, help='bootstrap resamples of the paired intervals')
    p.add_argument('--seed', type=int, default=0, help='random seed of the resamples')
    p.add_argument('--json', help='also write the rows as JSON')
    args = p.parse_args(argv)
    if not os.path.isdir(args.runs):
        raise UserError(f'{args.runs} is not a folder; run bash bench/ablations.sh first or pass --runs')
    rows, missing = summarise(args.runs, args.seeds, n_boot=args.bootstrap, seed=args.seed)
    print(markdown(rows))
    if missing:
        print(f"\nmissing or unfinished, left out: {', '.join(missing)}")
    if args.json:
        with atomic_write(args.json, 'w') as f:
            json.dump({'rows': rows, 'missing': missing, 'bootstrap': args.bootstrap}, f, indent=2)
    return rows, missing


if __name__ == '__main__':
    main()
