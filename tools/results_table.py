"""One table of several runs: the options that differ between them and their test results.

    python tools/results_table.py runs/*                       # Markdown
    python tools/results_table.py runs/* --csv > runs.csv
    python tools/results_table.py runs/* --where dataset=coco --sort t2i_r1 --plot   # writes runs/results.png

Reads each run folder's options.json and results.json (train.py writes both) and nothing else.
A folder without results.json (a run still training, or one that stopped) is skipped with a note
on stderr. Markdown and CSV have one row per evaluation of a run: the whole test split
(Flickr30K 1K, COCO 5K) and, where present, COCO's 5-fold 1K mean; --json prints one object
per run with every evaluation in its results.json.

Runs that differ only in --seed are folded into one row: every metric as mean ± standard deviation
(over the seeds, n - 1 in the denominator) with n and the seeds; in --json such a group is one
object whose metrics are {"mean", "std", "n"} and whose "runs" are the runs' own objects.
--no_group lists every run. COCO 5K runs with ECCV Caption / CxC metrics (results.json "extended")
get columns for ECCV mAP@R and CxC R@1.
"""
import argparse
import csv
import io
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import arguments  # noqa: E402
from lib.errors import UserError, exit_on_user_error  # noqa: E402
from lib.writing import save_figure  # noqa: E402
from lib.run_folder import OPTIONS, RESULTS  # noqa: E402

import numpy as np  # noqa: E402

# results.json entries shown as rows: the whole split and COCO's 5-fold mean (not each fold)
SHOWN_RESULTS = ('full', '1k-mean')
BAR_LABELS = {'full': 'whole test split', '1k-mean': '5-fold 1K mean'}
RECALLS = [(d, k) for d in ('i2t', 't2i') for k in ('r1', 'r5', 'r10')]
METRICS = [f'{d}_{k}' for d, k in RECALLS] + ['rsum']
# options that differ between any two runs without changing what they compute
IGNORED_OPTIONS = {'logger_name', 'resume', 'overwrite', 'workers', 'log_step'}
MISSING = '-'


def read_json(path):
    try:
        with open(path, encoding='utf-8') as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise UserError(f'{path} is not valid JSON ({err}); rerun the evaluation that writes it') from err


def read_run(folder):
    """{'run', 'folder', 'options', 'epoch', 'wall_time_s', 'split', 'results'}, or None (with a
    note on stderr) when the folder holds no results.json yet."""
    if not os.path.isdir(folder):
        raise UserError(f'{folder} is not a folder; pass run folders (the --logger_name of train.py)')
    results_path, options_path = os.path.join(folder, RESULTS), os.path.join(folder, OPTIONS)
    if not os.path.isfile(results_path):
        print(f'note: skipping {folder}: no {RESULTS} (still training, or stopped before the test evaluation)',
              file=sys.stderr)
        return None
    doc = read_json(results_path)
    if not isinstance(doc, dict) or not isinstance(doc.get('results'), list) or not doc['results']:
        raise UserError(f'{results_path} holds no "results" list; it is not a results.json of train.py')
    options = read_json(options_path) if os.path.isfile(options_path) else {}
    if not options:
        print(f'note: {folder} has no {OPTIONS}; its options show as {MISSING}', file=sys.stderr)
    else:  # an option added after the run was made has, as its default, the behaviour the run had
        options = {**vars(arguments.get_train_parser().parse_args([])), **options}
    return {'run': os.path.basename(os.path.normpath(folder)), 'folder': folder, 'options': options,
            'epoch': doc.get('epoch'), 'wall_time_s': doc.get('wall_time_s'), 'split': doc.get('split'),
            'results': doc['results'], 'extended': doc.get('extended')}


def matches(options, where):
    """--where key=value: the option equals value read as JSON (0.5, 100, [2], true) or as text."""
    for key, raw in where:
        if key not in options:
            return False
        try:
            wanted = json.loads(raw)
        except json.JSONDecodeError:
            wanted = raw
        if options[key] != wanted and str(options[key]) != raw:
            return False
    return True


def differing_options(runs):
    """Option names whose values are not the same in every run (a run without options.json shows
    MISSING)."""
    keys = sorted({k for r in runs for k in r['options']} - IGNORED_OPTIONS)
    return [k for k in keys if len({json.dumps(r['options'].get(k, MISSING), sort_keys=True) for r in runs}) > 1]


def metric(result, name):
    if name == 'rsum':
        return result['rsum']
    direction, k = name.split('_')
    return result[direction][k]


# ECCV Caption / CxC columns (results.json "extended", COCO 5K only): (column, key, direction)
EXTENDED = [('eccv_map_at_r_i2t', 'eccv_map_at_r', 'i2t'), ('eccv_map_at_r_t2i', 'eccv_map_at_r', 't2i'),
            ('cxc_r1_i2t', 'cxc_r1', 'i2t'), ('cxc_r1_t2i', 'cxc_r1', 't2i')]
EXTENDED_TITLES = {'eccv_map_at_r_i2t': 'ECCV mAP@R I2T', 'eccv_map_at_r_t2i': 'ECCV mAP@R T2I',
                   'cxc_r1_i2t': 'CxC R@1 I2T', 'cxc_r1_t2i': 'CxC R@1 T2I'}
SEED = 'seed'
SEED_SUFFIX = re.compile(r'[_-]?s(?:eed)?[_-]?\d+$')


def group_runs(runs, group=True):
    """Runs that differ only in --seed (and the IGNORED_OPTIONS), in the order of their first
    run: [{'run': label, 'runs': [...]}]. A run without options.json stays alone."""
    groups, by_key = [], {}
    for run in runs:
        key = (json.dumps({k: v for k, v in run['options'].items() if k not in IGNORED_OPTIONS | {SEED}},
                          sort_keys=True) if group and run['options'] else id(run))
        if key not in by_key:
            by_key[key] = {'runs': []}
            groups.append(by_key[key])
        by_key[key]['runs'].append(run)
    for g in groups:
        if len(g['runs']) > 1:  # the seeds in order
            g['runs'].sort(key=lambda r: (not isinstance(r['options'].get(SEED), int), r['options'].get(SEED) or 0))
        labels = {SEED_SUFFIX.sub('', r['run']) or r['run'] for r in g['runs']}
        g['run'] = g['runs'][0]['run'] if len(g['runs']) == 1 else labels.pop() if len(labels) == 1 \
            else g['runs'][0]['run'] + '...'
        g['seeds'] = [r['options'].get(SEED) for r in g['runs']]
    return groups


def stats(values):
    """{'mean', 'std', 'n'} of the values that are present (std: n - 1 in the denominator; None for n = 1)."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {'mean': float(np.mean(values)), 'std': float(np.std(values, ddof=1)) if len(values) > 1 else None,
            'n': len(values)}


def extended_value(run, column):
    _, key, side = next(e for e in EXTENDED if e[0] == column)
    return ((run.get('extended') or {}).get(key) or {}).get(side)


def sort_groups(groups, sort, ascending):
    """Groups of several seeds sorted by the mean of a metric (--sort); otherwise as they come."""
    if sort not in METRICS:
        return groups
    def key(g):
        values = [metric(r['results'][0], sort) for r in g['runs']]
        return float(np.mean(values))
    return sorted(groups, key=key, reverse=not ascending)


def evaluation_label(run, result):
    """'test 1K' for the whole split, 'testall 1K x5' for COCO's 5-fold mean."""
    if result['name'] == '1k-mean':
        return f"{run['split'] or ''} 1K x5".strip()
    n = result.get('n_images')
    size = f'{n / 1000:g}K' if n and n % 100 == 0 else f'{n} images' if n else ''
    return f"{run['split'] or ''} {size}".strip()


def sort_value(run, key):
    """(missing?, value) of a run for --sort: a metric of its first evaluation, epoch, wall time or an option."""
    if key in METRICS:
        value = metric(run['results'][0], key)
    elif key in ('epoch', 'wall_time_s', 'run'):
        value = run[key]
    else:
        value = run['options'].get(key)
    return value is None, value if isinstance(value, (int, float, str)) else json.dumps(value)


def select(runs, where=(), name=None, sort='rsum', ascending=False):
    runs = [r for r in runs if matches(r['options'], where) and (not name or name in r['run'])]
    present = [r for r in runs if not sort_value(r, sort)[0]]
    absent = [r for r in runs if sort_value(r, sort)[0]]  # runs lacking the key go last, in given order
    try:
        present.sort(key=lambda r: sort_value(r, sort)[1], reverse=not ascending)
    except TypeError as err:
        raise UserError(f'--sort {sort}: the runs hold values of different types ({err})') from err
    return present + absent


def fmt_option(value):
    return value if isinstance(value, str) else json.dumps(value)


def fmt_seconds(seconds):
    if seconds is None:
        return MISSING
    s = int(round(seconds))
    return f'{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}'


COLUMNS = [('test', 'test'), ('epoch', 'best epoch'), ('i2t_r1', 'I2T R@1'), ('i2t_r5', 'I2T R@5'),
           ('i2t_r10', 'I2T R@10'), ('t2i_r1', 'T2I R@1'), ('t2i_r5', 'T2I R@5'), ('t2i_r10', 'T2I R@10'),
           ('rsum', 'rsum'), ('wall_time_s', 'wall time')]


def rows(groups, options, extended=False):
    """One row (a dict) per shown evaluation of each group of seeds: run, its differing options,
    COLUMNS (and the EXTENDED columns); a metric of a group of several runs is stats() of them."""
    table = []
    for g in groups:
        first = g['runs'][0]
        shown = [r for r in first['results'] if r.get('name') in SHOWN_RESULTS] or first['results'][:1]
        for result in shown:
            def same(run):  # this evaluation in another run of the group
                return next((r for r in run['results'] if r.get('name') == result.get('name')), None)
            members = [same(run) for run in g['runs']]
            several = len(g['runs']) > 1
            row = {'run': g['run'], **{k: first['options'].get(k, MISSING) for k in options},
                   'test': evaluation_label(first, result)}
            epochs = sorted({run['epoch'] for run in g['runs']}, key=str)
            row['epoch'] = epochs[0] if len(epochs) == 1 else ','.join(map(str, epochs))
            for m in METRICS:
                values = [metric(r, m) for r in members if r is not None]
                row[m] = stats(values) if several else values[0]
            walls = [run['wall_time_s'] for run in g['runs'] if run['wall_time_s'] is not None]
            row['wall_time_s'] = float(np.mean(walls)) if several and walls else first['wall_time_s']
            if extended:
                for column, _, _ in EXTENDED:
                    values = [extended_value(run, column) for run in g['runs']] if result.get('name') == 'full' else []
                    row[column] = stats(values) if several else (values[0] if values else None)
            row['n'], row['seeds'] = len(g['runs']), g['seeds']
            table.append(row)
    return table


def table_keys(table, options, extended):
    """(keys, titles) of the columns: run, the differing options, n and seeds where seeds were
    folded, COLUMNS, then the EXTENDED columns."""
    grouped = any(row['n'] > 1 for row in table)
    keys = ['run', *options, *(['n', 'seeds'] if grouped else []), *(k for k, _ in COLUMNS)]
    titles = ['run', *options, *(['n', 'seeds'] if grouped else []), *(t for _, t in COLUMNS)]
    if extended:
        keys += [c for c, _, _ in EXTENDED]
        titles += [EXTENDED_TITLES[c] for c, _, _ in EXTENDED]
    return keys, titles


def fmt_stats(value):
    if isinstance(value, dict):
        return f"{value['mean']:.1f}" + (f" ± {value['std']:.1f}" if value['std'] is not None else '')
    return MISSING if value is None else f'{value:.1f}'


def markdown(table, options, extended=False):
    def cell(key, value):
        if key in METRICS or key in EXTENDED_TITLES:
            return fmt_stats(value)
        if key == 'wall_time_s':
            return fmt_seconds(value)
        if key == 'seeds':
            return MISSING if value is None else ', '.join(map(str, value))
        return MISSING if value is None else fmt_option(value)
    keys, header = table_keys(table, options, extended)
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    for row in table:
        lines.append('| ' + ' | '.join(str(cell(k, row.get(k))).replace('|', '\\|') for k in keys) + ' |')
    return '\n'.join(lines)


def csv_text(table, options, extended=False):
    keys, _ = table_keys(table, options, extended)
    grouped = 'n' in keys
    header = []
    for k in keys:  # a group's metric is two columns: its mean (under the metric's name) and its std
        header += [k, f'{k}_std'] if grouped and (k in METRICS or k in EXTENDED_TITLES) else [k]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator='\n')
    writer.writerow(header)

    def plain(v):
        return '' if v is None or v is MISSING else v if isinstance(v, (str, int, float)) else json.dumps(v)
    for row in table:  # full precision; options as JSON text (strings as they are), missing values empty
        cells = []
        for k in keys:
            v = row.get(k)
            if grouped and (k in METRICS or k in EXTENDED_TITLES):
                cells += ([v['mean'], plain(v['std'])] if isinstance(v, dict) else [plain(v), ''])
            elif k == 'seeds' and v is not None:
                cells.append(" ".join(map(str, v)))
            else:
                cells.append(plain(v))
        writer.writerow(cells)
    return out.getvalue().rstrip('\n')


def run_json(r, options):
    doc = {'run': r['run'], 'folder': r['folder'], 'options': {k: r['options'].get(k) for k in options},
           'split': r['split'], 'epoch': r['epoch'], 'wall_time_s': r['wall_time_s'], 'results': r['results']}
    if r.get('extended'):
        doc['extended'] = r['extended']
    return doc


def group_json(g, options):
    """A group of seeds: every number of its runs' results (and extended metrics) as {'mean', 'std', 'n'}."""
    runs = g['runs']
    first = runs[0]
    results = []
    for result in first['results']:
        members = [next((r for r in run['results'] if r.get('name') == result.get('name')), None) for run in runs]
        members = [m for m in members if m is not None]
        entry = {k: result[k] for k in ('name', 'n_images', 'n_captions') if k in result}
        for side in ('i2t', 't2i'):
            entry[side] = {k: stats([m[side][k] for m in members]) for k in result[side]}
        entry['rsum'] = stats([m['rsum'] for m in members])
        results.append(entry)
    doc = {'run': g['run'], 'n': len(runs), 'seeds': g['seeds'],
           'options': {k: first['options'].get(k) for k in options if k != SEED}, 'split': first['split'],
           'results': results, 'runs': [run_json(r, options) for r in runs]}
    ext = [r.get('extended') for r in runs if r.get('extended')]
    if ext:
        doc['extended'] = {key: {side: stats([e[key][side] for e in ext if key in e]) for side in sides}
                           for key, sides in ext[0].items()}
    return doc


def json_text(groups, options):
    return json.dumps([run_json(g['runs'][0], options) if len(g['runs']) == 1 else group_json(g, options)
                       for g in groups], indent=2)


def plot(runs, out, name='rsum'):
    """Bars of one metric per run, one bar per evaluation (e.g. COCO 5K and 1K side by side)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    import numpy as np
    shown = [n for n in SHOWN_RESULTS if any(r.get('name') == n for run in runs for r in run['results'])]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.0 + 0.9 * len(runs) * len(shown)), 4))
    width = 0.8 / len(shown)
    x = np.arange(len(runs))
    for j, which in enumerate(shown):
        values = [next((metric(r, name) for r in run['results'] if r.get('name') == which), np.nan) for run in runs]
        bars = ax.bar(x + (j - (len(shown) - 1) / 2) * width, values, width, label=BAR_LABELS[which], color=f'C{j}')
        ax.bar_label(bars, fmt='%.1f', fontsize=8)
    ax.set_xticks(x, [r['run'] for r in runs], rotation=20, ha='right')
    ax.set(ylabel=name, title=f'{name} per run (test)')
    ax.grid(axis='y', alpha=0.3)
    ax.margins(y=0.2)  # room for the values and the legend above the bars
    if len(shown) > 1:
        ax.legend(ncol=2, loc='upper left')
    fig.tight_layout()
    save_figure(fig, out, dpi=100)
    plt.close(fig)
    return out


def parse_where(text):
    key, sep, value = text.partition('=')
    if not sep or not key:
        raise argparse.ArgumentTypeError(f'{text!r} is not KEY=VALUE (e.g. dataset=coco, threshold=0.5)')
    return key, value


@exit_on_user_error
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=arguments.HelpFormatter)
    p.add_argument('runs', nargs='+', help='run folders (the --logger_name of train.py)')
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument('--csv', action='store_true', help='CSV instead of Markdown (full precision, seconds)')
    fmt.add_argument('--json', action='store_true', help='a JSON list, one object per run')
    p.add_argument('--sort', default='rsum',
                   help=f'sort by {", ".join(METRICS)} (of the first evaluation), epoch, wall_time_s, run '
                        'or an option name; largest first unless --ascending')
    p.add_argument('--ascending', action='store_true', help='smallest first')
    p.add_argument('--where', action='append', type=parse_where, default=[], metavar='KEY=VALUE',
                   help='keep runs whose option KEY equals VALUE (repeatable; all must hold)')
    p.add_argument('--name', default=None, help='keep runs whose folder name contains this text')
    p.add_argument('--plot', nargs='?', const='', default=None, metavar='FILE',
                   help='also write a bar chart of --metric per run; without FILE: results.png in the folder '
                        'that holds the runs')
    p.add_argument('--metric', default='rsum', choices=METRICS, help='metric of the bar chart')
    p.add_argument('--no_group', action='store_true',
                   help='one row per run, also for runs that differ only in --seed (which are otherwise '
                        'folded into one row of mean ± std)')
    args = p.parse_args(argv)

    runs = [r for r in map(read_run, args.runs) if r is not None]
    for key, _ in args.where:
        if runs and not any(key in r['options'] for r in runs):
            raise UserError(f'--where {key}=...: no run has an option {key!r} in its {OPTIONS}; '
                            'see `python train.py --help` for the option names')
    if runs and args.sort not in METRICS + ['epoch', 'wall_time_s', 'run'] and not any(
            args.sort in r['options'] for r in runs):
        raise UserError(f'--sort {args.sort}: not a metric ({", ".join(METRICS)}), epoch, wall_time_s, run, '
                        f'nor an option in any run\'s {OPTIONS}')
    runs = select(runs, args.where, args.name, args.sort, args.ascending)
    if not runs:
        filtered = args.where or args.name
        raise UserError('no run to show: ' + ('no run with results matches --where / --name' if filtered
                                              else 'none of the folders holds a results.json'))
    groups = sort_groups(group_runs(runs, not args.no_group), args.sort, args.ascending)
    folded = any(len(g['runs']) > 1 for g in groups)
    options = [k for k in differing_options(runs) if not (folded and k == SEED)]
    extended = any(r.get('extended') for r in runs)
    if args.json:
        print(json_text(groups, options))
    else:
        table = rows(groups, options, extended)
        print(csv_text(table, options, extended) if args.csv else markdown(table, options, extended))
    if args.plot is not None:
        out = args.plot or os.path.join(os.path.commonpath([os.path.abspath(r['folder']) for r in runs]), 'results.png')
        print(f'wrote {plot(runs, out, args.metric)}', file=sys.stderr)
    return runs


if __name__ == '__main__':
    main()
