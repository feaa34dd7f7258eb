"""Splits with one caption per image train, evaluate and search (R@K, medr, meanr over N x N)."""
import json

import numpy as np
import pytest

import eval as eval_script
import search
import train
from lib.sims_file import load_sims
from test_evaluation import naive_i2t, naive_metrics, naive_t2i
from test_errors import WORDS, bert_folder, train_argv, write_split

N_IMAGES = 8


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp('one_caption')
    rng = np.random.default_rng(0)
    for seed, split in enumerate(('train', 'dev', 'test')):
        write_split(root, split, N_IMAGES, seed=seed,
                    captions=[' '.join(rng.choice(WORDS, 5)) for _ in range(N_IMAGES)])
    bert = bert_folder(root / 'bert')
    train.main(train_argv(root, bert, 'run', '--warmup', '1'))
    return root / 'run'


def check(result, sims):
    assert (result['n_images'], result['n_captions']) == (N_IMAGES, N_IMAGES)
    for side, ranks in (('i2t', naive_i2t(sims, 1)), ('t2i', naive_t2i(sims, 1))):
        for k, v in naive_metrics(ranks).items():
            assert result[side][k] == pytest.approx(v), (side, k)


def test_training_validates_and_tests(run):
    log = (run / 'train.log').read_text()
    assert 'epoch 0: dev rsum' in log and 'done: test rsum' in log
    saved = json.loads((run / 'results.json').read_text())['results'][0]
    sims = load_sims(str(run / 'results_tiny.npy'))
    assert sims.shape == (N_IMAGES, N_IMAGES)
    check(saved, sims)


def test_eval_scores_it(run, tmp_path):
    results = eval_script.main(['--checkpoint', str(run / 'model_best.pth'), '--device', 'cpu',
                                '--save_sims', str(tmp_path / 'sims.npy')])
    sims = load_sims(str(tmp_path / 'sims.npy'))
    check(results[0], sims)
    saved = json.loads((run / 'results.json').read_text())['results'][0]
    for side in ('i2t', 't2i'):  # the same model, split and protocol
        assert results[0][side] == pytest.approx(saved[side])
    assert eval_script.main(['--sims', str(tmp_path / 'sims.npy')])[0] == results[0]


def test_search_both_ways(run, capsys):
    test_caps = (run.parent / 'tiny_precomp' / 'test_caps.txt').read_text().splitlines()
    doc = search.main(['--checkpoint', str(run / 'model_best.pth'), '--device', 'cpu', '--json',
                       '--query', test_caps[3], '--k', str(N_IMAGES)])
    assert sorted(r['image'] for r in doc['results']) == list(range(N_IMAGES))
    assert all(r['captions'] == [test_caps[r['image']]] for r in doc['results'])
    doc = search.main(['--checkpoint', str(run / 'model_best.pth'), '--device', 'cpu', '--json',
                       '--image', '3', '--k', str(N_IMAGES)])
    assert sorted(r['caption'] for r in doc['results']) == list(range(N_IMAGES))
    for r in doc['results']:
        assert r['image'] == r['caption'] and r['ground_truth'] == (r['caption'] == 3)
        assert r['text'] == test_caps[r['caption']]


def test_compare_a_checkpoint_with_its_own_saved_sims(run, tmp_path, capsys):
    """--compare reads a checkpoint on one side and a saved matrix on the other (N x N here)."""
    eval_script.main(['--compare', str(run / 'model_best.pth'), str(run / 'results_tiny.npy'), '--device', 'cpu',
                      '--bootstrap', '50', '--json', str(tmp_path / 'c.json')])
    doc = json.loads((tmp_path / 'c.json').read_text())['compare']
    saved = json.loads((run / 'results.json').read_text())['results'][0]
    assert doc['metrics']['rsum']['a'] == pytest.approx(saved['rsum'])
    for name, m in doc['metrics'].items():
        assert m['diff'] == pytest.approx(0, abs=1e-9) and m['p'] == 1.0, name
    assert doc['queries']['t2i']['better'] == doc['queries']['t2i']['worse'] == 0
