"""Training loss, its parts and validation rsum of one or several runs, from their TensorBoard events.

    python tools/plot_curves.py runs/NAME [runs/OTHER ...]    # writes runs/NAME/curves.png

The loss parts are the base loss l(v, t), the relation terms l(v, t^) + l(v^, t) + l(v^, t^) and the
regulariser (reg_loss_weight x KL, the weight read from the run's options.json). The relation terms
and the regulariser exist from the warm-up step on, when the instance-level relations switch on:
a dotted line marks that step, so the jump of the total loss there reads as new terms, not as
training going wrong.
"""
import argparse
import glob
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import matplotlib  # noqa: E402

matplotlib.use('Agg')  # files only: works on servers without a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import arguments  # noqa: E402
from lib.errors import UserError, exit_on_user_error  # noqa: E402
from lib.writing import save_figure  # noqa: E402
from lib.run_folder import EVENTS_GLOB, OPTIONS  # noqa: E402

LOSS_TAG, RSUM_TAG = 'train/loss', 'val/rsum'
PART_PREFIX = 'train/loss_'  # train/loss_base, train/loss_gnn, train/loss_reg (lib/engine.py)
PART_LABELS = {'base': 'base l(v,t)', 'gnn': "relation terms l(v,t^)+l(v^,t)+l(v^,t^)",
               'reg': 'regulariser (weight x KL)'}
PART_STYLES = {'base': '--', 'gnn': ':', 'reg': '-.'}


def read_scalars(run):
    """{tag: (steps, values)} of the loss, loss-part and rsum tags in a run folder's event files.
    Events that a resumed run replaced (purge_step) are dropped by the accumulator."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator
    if not os.path.isdir(run) or not glob.glob(os.path.join(run, EVENTS_GLOB)):
        raise UserError(f'{run} holds no TensorBoard event files ({EVENTS_GLOB}); pass a run folder of train.py')
    acc = EventAccumulator(run, size_guidance={SCALARS: 0})  # 0: keep every point
    acc.Reload()
    tags = set(acc.Tags()['scalars'])
    return {tag: (np.array([e.step for e in acc.Scalars(tag)]), np.array([e.value for e in acc.Scalars(tag)]))
            for tag in sorted(tags) if tag in (LOSS_TAG, RSUM_TAG) or tag.startswith(PART_PREFIX)}


def loss_parts(curves, reg_weight=1.0):
    """{part name: (steps, values)}, the regulariser scaled by its weight as it enters the loss."""
    parts = {tag[len(PART_PREFIX):]: curves[tag] for tag in curves if tag.startswith(PART_PREFIX)}
    if 'reg' in parts:
        parts['reg'] = (parts['reg'][0], reg_weight * parts['reg'][1])
    return parts


def warmup_step(parts):
    """The first step with a relation term or regulariser logged: when the relations switched on."""
    starts = [steps[0] for name, (steps, _) in parts.items() if name != 'base' and len(steps)]
    return int(min(starts)) if starts else None


def reg_weight(run):
    """reg_loss_weight from the run's options.json; None without one (the KL is then drawn
    unweighted, and the legend says so)."""
    path = os.path.join(run, OPTIONS)
    if not os.path.isfile(path):
        return None
    with open(path, encoding='utf-8') as f:
        return json.load(f).get('reg_loss_weight')


def smooth(values, window):
    """Trailing moving average (same length; the first points average what exists so far)."""
    csum = np.cumsum(np.insert(values.astype(np.float64), 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(idx - window, 0)
    return (csum[idx] - csum[lo]) / (idx - lo)


def plot(runs, out, window=20, labels=None):
    fig, (ax_loss, ax_parts, ax_rsum) = plt.subplots(1, 3, figsize=(16, 4.2))
    drawn, weights, present = 0, set(), []
    for n, run in enumerate(runs):
        curves = read_scalars(run)
        label = labels[n] if labels else os.path.basename(os.path.normpath(run))
        color = f'C{n % 10}'
        weight = reg_weight(run)
        weights.add(weight)
        parts = loss_parts(curves, 1.0 if weight is None else weight)
        start = warmup_step(parts)
        if LOSS_TAG in curves:
            steps, values = curves[LOSS_TAG]
            ax_loss.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
            # the mean restarts where the relations switch on: it shows the jump instead of a ramp
            after = steps >= start if start is not None else np.zeros(len(steps), bool)
            for seg, name in ((~after, label), (after, None)):
                if seg.any():
                    ax_loss.plot(steps[seg], smooth(values[seg], window), color=color, label=name)
            drawn += 1
        for name, (steps, values) in parts.items():
            present += [name] if name not in present else []
            ax_parts.plot(steps, smooth(values, window), color=color, linestyle=PART_STYLES.get(name, '-'))
        if RSUM_TAG in curves:
            steps, values = curves[RSUM_TAG]
            ax_rsum.plot(steps, values, color=color, marker='o', label=label)
            drawn += 1
        if start is not None:
            for ax in (ax_loss, ax_parts, ax_rsum):
                ax.axvline(start, color=color, linestyle=':', linewidth=1)
            ax_loss.annotate(f'relations on (step {start})', (start, 1), xycoords=('data', 'axes fraction'),
                             xytext=(3, -12 * (n + 1)), textcoords='offset points', color=color, fontsize=8)
        missing = {LOSS_TAG, RSUM_TAG} - set(curves)
        if missing:
            print(f'warning: {run} has no {" / ".join(sorted(missing))} events', file=sys.stderr)
    if not drawn:
        raise UserError(f'none of {", ".join(runs)} logged {LOSS_TAG} or {RSUM_TAG}; nothing to plot')
    ax_loss.set(title=f'training loss (faint: per step, bold: mean of {window})', xlabel='step', ylabel='loss')
    ax_parts.set(title=f'loss parts (mean of {window} steps)', xlabel='step', ylabel='loss')
    ax_rsum.set(title='validation rsum (R@1+5+10, both directions)', xlabel='step', ylabel='rsum')
    # one legend entry per part, in black: the colours are the runs' (left and right panels)
    names = dict(PART_LABELS)
    if weights == {None}:
        names['reg'] = 'regulariser (KL, unweighted: no options.json)'
    elif len(weights) == 1:
        names['reg'] = f'regulariser ({weights.pop():g} x KL)'
    if present:
        ax_parts.legend([plt.Line2D([], [], color='black', linestyle=PART_STYLES.get(p, '-')) for p in present],
                        [names.get(p, p) for p in present], fontsize=8)
    for ax in (ax_loss, ax_parts, ax_rsum):
        ax.grid(alpha=0.3)
    for ax in (ax_loss, ax_rsum):
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    save_figure(fig, out, dpi=100)
    plt.close(fig)
    return out


@exit_on_user_error
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=arguments.HelpFormatter)
    p.add_argument('runs', nargs='+', help='run folders (the --logger_name of train.py)')
    p.add_argument('--out', default=None, help='PNG file to write; when not given: curves.png in the first run folder')
    p.add_argument('--window', type=int, default=20, help='steps averaged in the bold loss line')
    p.add_argument('--labels', nargs='+', default=None, help='legend names, one per run; when not given: the folder names')
    args = p.parse_args(argv)
    if args.labels and len(args.labels) != len(args.runs):
        p.error(f'--labels gives {len(args.labels)} names for {len(args.runs)} runs')
    if args.window < 1:
        p.error('--window must be >= 1')
    out = args.out or os.path.join(args.runs[0], 'curves.png')
    print(f'wrote {plot(args.runs, out, args.window, args.labels)}')


if __name__ == '__main__':
    main()
