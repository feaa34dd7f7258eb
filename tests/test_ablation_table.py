"""bench/ablation_table.py: variants over seeds from run folders (results.json and the saved test
similarities), their mean ± std and their paired difference to the full model."""
import json
import statistics

import numpy as np
import pytest

from bench import ablation_table
from lib import significance
from lib.metrics import evaluate_sims
from lib.sims_file import save_sims


def sims_for(seed, noise):
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((60, 16))
    img = latent + 0.5 * rng.standard_normal((60, 16))
    caps = np.repeat(latent, 5, 0)
    return (img @ (caps + noise * rng.standard_normal(caps.shape)).T).astype(np.float32)


def write_run(root, name, sims):
    folder = root / name
    folder.mkdir()
    (folder / 'results.json').write_text(json.dumps({'results': evaluate_sims(sims)}))
    save_sims(folder / 'results_demo.npy', sims)


def test_variants_against_the_full_model(tmp_path, capsys):
    full = {s: sims_for(s, 1.6) for s in (0, 1, 2)}
    better = {s: sims_for(s, 0.8) for s in (0, 1, 2)}  # the same images and captions, less noise
    for s, m in full.items():
        write_run(tmp_path, f'full_s{s}', m)
    for s, m in better.items():
        write_run(tmp_path, f'no_connection_s{s}', m)
    write_run(tmp_path, 'no_relevance_s0', full[0])  # identical to the full model
    write_run(tmp_path, 'no_relevance_s1', full[1])
    write_run(tmp_path, 'no_instance_relation_s0', better[0])  # one seed pair: no verdict
    for s in (0, 1, 2):
        write_run(tmp_path, f'no_regulariser_s{s}', sims_for(s, 3.0))  # more noise: worse
    rows, missing = ablation_table.main(['--runs', str(tmp_path), '--seeds', '0', '1', '2', '--bootstrap', '200'])
    out = capsys.readouterr().out
    by = {r['variant']: r for r in rows}
    rsums = [evaluate_sims(full[s])[0]['rsum'] for s in (0, 1, 2)]
    assert by['full']['rsum'][0] == pytest.approx(statistics.mean(rsums))
    assert by['full']['rsum'][1] == pytest.approx(statistics.stdev(rsums))
    c = by['no_connection']['vs_full']
    assert c['seeds'] == [0, 1, 2]
    want = significance.compare([full[s] for s in (0, 1, 2)], [better[s] for s in (0, 1, 2)], 200, 0)['metrics']['rsum']
    assert c['diff'] == pytest.approx(want['diff']) and c['ci95'] == pytest.approx(want['ci95'])
    assert c['diff'] == pytest.approx(np.mean(c['per_seed_diff'])) and c['ci95'][0] > 0
    same = by['no_relevance']['vs_full']
    assert same['diff'] == 0 and same['ci95'] == [0, 0] and same['p'] == 1
    assert by['no_cross_loss']['n'] == 0
    assert 'no_relevance_s2' in missing and 'no_cross_loss_s0' in missing and 'full_s0' not in missing
    lines = {line.split('|')[1].strip(): line for line in out.splitlines() if line.startswith('| ')}
    assert lines['no_connection'].rstrip().endswith('| yes |')
    assert lines['no_relevance'].rstrip().endswith('| no |')
    assert by['no_instance_relation']['vs_full']['ci95'][0] > 0
    assert lines['no_instance_relation'].rstrip().endswith('| not judged (one seed) |')
    assert by['no_regulariser']['vs_full']['ci95'][1] < 0 and lines['no_regulariser'].rstrip().endswith('| yes |')
    assert 'missing or unfinished' in out
