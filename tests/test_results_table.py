"""tools/results_table.py: three run folders written by hand -> the options that differ between
them and their metrics exactly as in their results.json, in Markdown, CSV and JSON; sorting,
filtering, unfinished runs and the bar chart."""
import csv
import io
import json

import cv2
import pytest

from tools import results_table

OPTIONS = {  # 'logger_name' always differs and is not an option worth a column
    'a': {'dataset': 'f30k', 'threshold': 0.5, 'topk': 10, 'lr_schedules': [15, 25], 'logger_name': 'runs/a'},
    'b': {'dataset': 'f30k', 'threshold': 0.3, 'topk': 10, 'lr_schedules': [15, 25], 'logger_name': 'runs/b'},
    'c': {'dataset': 'coco', 'threshold': 0.5, 'topk': 10, 'lr_schedules': [15], 'logger_name': 'runs/c'},
}
RSUM = {'a': 401.25, 'b': 433.75, 'c': 350.5}


def result(name, n_images, base, rsum):
    return {'name': name, 'n_images': n_images, 'n_captions': 5 * n_images,
            'i2t': {'r1': base + 0.04, 'r5': base + 10.26, 'r10': base + 20.3, 'medr': 1.0, 'meanr': 2.5},
            't2i': {'r1': base - 5.11, 'r5': base + 5.5, 'r10': base + 9.87, 'medr': 2.0, 'meanr': 4.25}, 'rsum': rsum}


def results_doc(run):
    base = {'a': 60.0, 'b': 70.0, 'c': 50.0}[run]
    if run == 'c':  # COCO: 5K, five 1K folds and their mean
        results = ([result('full', 5000, base, RSUM['c'])]
                   + [result(f'1k-fold{i}', 1000, base + i, 0.0) for i in range(5)]
                   + [result('1k-mean', 1000, base + 12, 420.0)])
        return {'results': results, 'split': 'testall', 'checkpoint': 'model_best.pth', 'epoch': 12,
                'wall_time_s': 7322.4}
    doc = {'results': [result('full', 1000, base, RSUM[run])], 'split': 'test', 'checkpoint': 'model_best.pth',
           'epoch': {'a': 3, 'b': 2}[run]}
    if run == 'a':
        doc['wall_time_s'] = 191.0  # b is a run from before wall_time_s was recorded
    return doc


@pytest.fixture
def runs(tmp_path):
    for run in 'abc':
        (tmp_path / run).mkdir()
        (tmp_path / run / 'options.json').write_text(json.dumps(OPTIONS[run]))
        (tmp_path / run / 'results.json').write_text(json.dumps(results_doc(run)))
    (tmp_path / 'training').mkdir()  # unfinished: options only
    (tmp_path / 'training' / 'options.json').write_text(json.dumps(OPTIONS['a']))
    return tmp_path


def folders(root, names='abc'):
    return [str(root / n) for n in names]


def expected_row(res):
    """The numbers of one results.json entry, in the table's column order."""
    return [res['i2t']['r1'], res['i2t']['r5'], res['i2t']['r10'], res['t2i']['r1'], res['t2i']['r5'],
            res['t2i']['r10'], res['rsum']]


def test_markdown_shows_differing_options_and_the_results(runs, capsys):
    results_table.main(folders(runs) + [str(runs / 'training')])
    out, err = capsys.readouterr()
    assert 'training' in err and 'no results.json' in err
    lines = out.strip().splitlines()
    header = [c.strip() for c in lines[0].strip('|').split('|')]
    # only the options that differ; topk (equal everywhere) and logger_name (ignored) are not shown
    assert header[:4] == ['run', 'dataset', 'lr_schedules', 'threshold']
    cells = [[c.strip() for c in line.strip('|').split('|')] for line in lines[2:]]
    # sorted by rsum of the first evaluation, largest first: b 433.75, a 401.25, c 350.5 (two rows)
    assert [c[0] for c in cells] == ['b', 'a', 'c', 'c']
    for row in cells:
        run = row[0]
        doc = results_doc(run)
        res = doc['results'][0] if row[4] != 'testall 1K x5' else doc['results'][-1]
        assert row[1:4] == [OPTIONS[run]['dataset'], json.dumps(OPTIONS[run]['lr_schedules']),
                            str(OPTIONS[run]['threshold'])]
        assert row[5] == str(doc['epoch'])
        assert row[6:13] == [f'{v:.1f}' for v in expected_row(res)]
    assert [c[4] for c in cells] == ['test 1K', 'test 1K', 'testall 5K', 'testall 1K x5']
    assert [c[13] for c in cells] == ['-', '0:03:11', '2:02:02', '2:02:02']


def test_csv_has_full_precision(runs, capsys):
    results_table.main(folders(runs) + ['--csv'])
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r['run'] for r in rows] == ['b', 'a', 'c', 'c']
    for r in rows:
        doc = results_doc(r['run'])
        res = doc['results'][-1] if r['test'].endswith('x5') else doc['results'][0]
        got = [float(r[k]) for k in ('i2t_r1', 'i2t_r5', 'i2t_r10', 't2i_r1', 't2i_r5', 't2i_r10', 'rsum')]
        assert got == expected_row(res)
        assert r['threshold'] == str(OPTIONS[r['run']]['threshold'])
        assert r['wall_time_s'] == ('' if 'wall_time_s' not in doc else str(doc['wall_time_s']))


def test_json_is_one_object_per_run(runs, capsys):
    results_table.main(folders(runs) + ['--json'])
    doc = json.loads(capsys.readouterr().out)
    assert [d['run'] for d in doc] == ['b', 'a', 'c']
    for d in doc:
        assert d['folder'] == str(runs / d['run'])
        assert d['results'] == results_doc(d['run'])['results']
        assert d['options'] == {k: OPTIONS[d['run']][k] for k in ('dataset', 'lr_schedules', 'threshold')}
        assert d['epoch'] == results_doc(d['run'])['epoch']


def test_sort_and_filter(runs, capsys):
    results_table.main(folders(runs) + ['--json', '--sort', 't2i_r1', '--ascending'])
    assert [d['run'] for d in json.loads(capsys.readouterr().out)] == ['c', 'a', 'b']  # t2i R@1 44.9 < 54.9 < 64.9
    results_table.main(folders(runs) + ['--json', '--where', 'threshold=0.5'])
    doc = json.loads(capsys.readouterr().out)
    # among a and c, the dataset and lr_schedules differ, the threshold no longer does
    assert [d['run'] for d in doc] == ['a', 'c'] and set(doc[0]['options']) == {'dataset', 'lr_schedules'}
    results_table.main(folders(runs) + ['--json', '--where', 'lr_schedules=[15, 25]', '--where', 'dataset=f30k'])
    assert [d['run'] for d in json.loads(capsys.readouterr().out)] == ['b', 'a']
    results_table.main(folders(runs) + ['--json', '--name', 'c'])
    assert [d['run'] for d in json.loads(capsys.readouterr().out)] == ['c']


def test_unknown_filter_key_is_a_user_error(runs, capsys):
    with pytest.raises(SystemExit) as exc:
        results_table.main(folders(runs) + ['--where', 'treshold=0.5'])
    assert exc.value.code == 2 and "'treshold'" in capsys.readouterr().err


def test_bar_chart(runs, tmp_path):
    out = tmp_path / 'bars.png'
    results_table.main(folders(runs) + ['--plot', str(out)])
    image = cv2.imread(str(out))
    assert image is not None and image.std() > 10


def test_bar_chart_without_a_file_goes_to_the_folder_of_the_runs(runs):
    results_table.main(folders(runs) + ['--plot'])
    assert cv2.imread(str(runs / 'results.png')) is not None


def test_an_option_added_after_a_run_takes_its_default(runs, capsys):
    """A run made before an option existed ran with the behaviour that option's default keeps:
    it is not a difference (here: 'a' lacks --cross_loss, 'b' has the default 1 written out)."""
    (runs / 'b' / 'options.json').write_text(json.dumps({**OPTIONS['b'], 'cross_loss': 1}))
    results_table.main(folders(runs, 'ab') + ['--json'])
    assert {k for d in json.loads(capsys.readouterr().out) for k in d['options']} == {'threshold'}
    (runs / 'b' / 'options.json').write_text(json.dumps({**OPTIONS['b'], 'cross_loss': 0}))
    results_table.main(folders(runs, 'ab') + ['--json'])
    doc = json.loads(capsys.readouterr().out)
    assert [d['options'] for d in doc] == [{'threshold': 0.3, 'cross_loss': 0}, {'threshold': 0.5, 'cross_loss': 1}]


# ----------------------------------------------------------------------------- seeds folded into one row

SEED_RSUM = {0: 400.0, 1: 410.0, 2: 433.0}  # mean 414.333..., sample std 17.0098...


@pytest.fixture
def seed_runs(tmp_path):
    """full_s0..full_s2: the same options but --seed; other_s0: another threshold. COCO 5K runs
    with ECCV Caption / CxC metrics in their results.json."""
    def write(name, seed, threshold, rsum):
        folder = tmp_path / name
        folder.mkdir()
        (folder / 'options.json').write_text(json.dumps({'dataset': 'coco', 'threshold': threshold, 'seed': seed,
                                                         'logger_name': f'runs/{name}'}))
        doc = {'results': [result('full', 5000, 50.0 + seed, rsum)], 'split': 'testall', 'epoch': 3,
               'wall_time_s': 100.0 + seed,
               'extended': {'eccv_map_at_r': {'i2t': 30.0 + seed, 't2i': 40.0 + 2 * seed},
                            'cxc_r1': {'i2t': 55.0, 't2i': 45.0 + seed}}}
        (folder / 'results.json').write_text(json.dumps(doc))
    for seed, rsum in SEED_RSUM.items():
        write(f'full_s{seed}', seed, 0.5, rsum)
    write('other_s0', 0, 0.3, 300.0)
    return tmp_path


def seed_folders(root):
    return [str(root / n) for n in ('full_s0', 'full_s1', 'full_s2', 'other_s0')]


def test_runs_differing_only_in_seed_are_one_row_of_mean_and_std(seed_runs, capsys):
    import statistics
    results_table.main(seed_folders(seed_runs))
    lines = capsys.readouterr().out.strip().splitlines()
    header = [c.strip() for c in lines[0].strip('|').split('|')]
    cells = [[c.strip() for c in line.strip('|').split('|')] for line in lines[2:]]
    assert header[:4] == ['run', 'threshold', 'n', 'seeds']  # seed is no column of its own
    assert [c[:4] for c in cells] == [['full', '0.5', '3', '0, 1, 2'], ['other_s0', '0.3', '1', '0']]
    row = dict(zip(header, cells[0]))
    rsums = list(SEED_RSUM.values())
    assert row['rsum'] == f'{statistics.mean(rsums):.1f} ± {statistics.stdev(rsums):.1f}'
    assert row['I2T R@1'] == f'{statistics.mean([50.04, 51.04, 52.04]):.1f} ± {statistics.stdev([50.04, 51.04, 52.04]):.1f}'
    assert row['ECCV mAP@R T2I'] == f'{statistics.mean([40, 42, 44]):.1f} ± {statistics.stdev([40, 42, 44]):.1f}'
    assert row['CxC R@1 I2T'] == '55.0 ± 0.0'
    assert dict(zip(header, cells[1]))['rsum'] == '300.0'  # one run: no ± at all


def test_seed_groups_in_json_and_csv(seed_runs, capsys):
    import statistics
    results_table.main(seed_folders(seed_runs) + ['--json'])
    doc = json.loads(capsys.readouterr().out)
    assert [d['run'] for d in doc] == ['full', 'other_s0']
    group = doc[0]
    assert group['n'] == 3 and group['seeds'] == [0, 1, 2]
    assert [r['run'] for r in group['runs']] == ['full_s0', 'full_s1', 'full_s2']
    rsum = group['results'][0]['rsum']
    assert rsum['n'] == 3 and rsum['mean'] == pytest.approx(statistics.mean(SEED_RSUM.values()))
    assert rsum['std'] == pytest.approx(statistics.stdev(SEED_RSUM.values()))
    assert group['results'][0]['t2i']['r1']['mean'] == pytest.approx(51.0 - 5.11)
    assert group['extended']['eccv_map_at_r']['i2t']['mean'] == pytest.approx(31.0)
    assert doc[1]['results'] == [result('full', 5000, 50.0, 300.0)]  # a lone run as before
    results_table.main(seed_folders(seed_runs) + ['--csv'])
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert float(rows[0]['rsum']) == pytest.approx(statistics.mean(SEED_RSUM.values()))
    assert float(rows[0]['rsum_std']) == pytest.approx(statistics.stdev(SEED_RSUM.values()))
    assert rows[0]['seeds'] == '0 1 2' and rows[1]['rsum_std'] == ''


def test_no_group_lists_every_run(seed_runs, capsys):
    results_table.main(seed_folders(seed_runs) + ['--no_group'])
    lines = capsys.readouterr().out.strip().splitlines()
    header = [c.strip() for c in lines[0].strip('|').split('|')]
    assert header[:3] == ['run', 'seed', 'threshold'] and '±' not in '\n'.join(lines)
    assert [line.split('|')[1].strip() for line in lines[2:]] == ['full_s2', 'full_s1', 'full_s0', 'other_s0']
