"""Training loss and validation rsum of one or several runs, side by side, from their TensorBoard events.

    python tools/plot_curves.py runs/NAME [runs/OTHER ...] --out imgs/curves.png
"""
import argparse
import glob
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import matplotlib  # noqa: E402

matplotlib.use('Agg')  # files only: works on servers without a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from lib.errors import UserError, exit_on_user_error  # noqa: E402
from lib.run_folder import EVENTS_GLOB  # noqa: E402

LOSS_TAG, RSUM_TAG = 'train/loss', 'val/rsum'


def read_scalars(run):
    """{tag: (steps, values)} of the loss and rsum tags in a run folder's event files. Events
    that a resumed run replaced (purge_step) are dropped by the accumulator."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator
    if not os.path.isdir(run) or not glob.glob(os.path.join(run, EVENTS_GLOB)):
        raise UserError(f'{run} holds no TensorBoard event files ({EVENTS_GLOB}); pass a run folder of train.py')
    acc = EventAccumulator(run, size_guidance={SCALARS: 0})  # 0: keep every point
    acc.Reload()
    tags = set(acc.Tags()['scalars'])
    return {tag: (np.array([e.step for e in acc.Scalars(tag)]), np.array([e.value for e in acc.Scalars(tag)]))
            for tag in (LOSS_TAG, RSUM_TAG) if tag in tags}


def smooth(values, window):
    """Trailing moving average (same length; the first points average what exists so far)."""
    csum = np.cumsum(np.insert(values.astype(np.float64), 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(idx - window, 0)
    return (csum[idx] - csum[lo]) / (idx - lo)


def plot(runs, out, window=20, labels=None):
    fig, (ax_loss, ax_rsum) = plt.subplots(1, 2, figsize=(11, 4))
    drawn = 0
    for n, run in enumerate(runs):
        curves = read_scalars(run)
        label = labels[n] if labels else os.path.basename(os.path.normpath(run))
        color = f'C{n % 10}'
        if LOSS_TAG in curves:
            steps, values = curves[LOSS_TAG]
            ax_loss.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
            ax_loss.plot(steps, smooth(values, window), color=color, label=label)
            drawn += 1
        if RSUM_TAG in curves:
            steps, values = curves[RSUM_TAG]
            ax_rsum.plot(steps, values, color=color, marker='o', label=label)
            drawn += 1
        missing = {LOSS_TAG, RSUM_TAG} - set(curves)
        if missing:
            print(f'warning: {run} has no {" / ".join(sorted(missing))} events', file=sys.stderr)
    if not drawn:
        raise UserError(f'none of {", ".join(runs)} logged {LOSS_TAG} or {RSUM_TAG}; nothing to plot')
    ax_loss.set(title=f'training loss (faint: per step, bold: mean of {window})', xlabel='step', ylabel='loss')
    ax_rsum.set(title='validation rsum (R@1+5+10, both directions)', xlabel='step', ylabel='rsum')
    for ax in (ax_loss, ax_rsum):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


@exit_on_user_error
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('runs', nargs='+', help='run folders (the --logger_name of train.py)')
    p.add_argument('--out', default='imgs/curves.png', help='PNG file to write')
    p.add_argument('--window', type=int, default=20, help='steps averaged in the bold loss line')
    p.add_argument('--labels', nargs='+', default=None, help='legend names, one per run (default: folder names)')
    args = p.parse_args(argv)
    if args.labels and len(args.labels) != len(args.runs):
        p.error(f'--labels gives {len(args.labels)} names for {len(args.runs)} runs')
    if args.window < 1:
        p.error('--window must be >= 1')
    print(f'wrote {plot(args.runs, args.out, args.window, args.labels)}')


if __name__ == '__main__':
    main()
