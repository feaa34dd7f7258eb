"""The COCO path end to end, nothing patched: a COCO-shaped set (5000 testall images, 25000
captions, tiny features) is tested on 5K and the five 1K folds at the end of training, and
eval.py --fold5 gives the same numbers."""
import json

import numpy as np
import pytest

import eval as eval_script
import train
from conftest import write_precomp
from lib.evaluation import load_sims
from test_errors import WORDS, bert_folder
from test_evaluation import naive_i2t, naive_metrics, naive_t2i

FOLDS = ['full'] + [f'1k-fold{i}' for i in range(5)] + ['1k-mean']


def captions(n, seed):
    rng = np.random.default_rng(seed)
    # unique captions: no two captions tie, so the argsort reference is well defined
    return [' '.join(rng.choice(WORDS, 3)) + f' {i}' for i in range(n)]


@pytest.fixture(scope='module')
def coco_run(tmp_path_factory):
    root = tmp_path_factory.mktemp('coco')
    for seed, (split, n) in enumerate([('train', 8), ('dev', 8), ('testall', 5000)]):
        write_precomp(root, 'coco', split, n, captions(5 * n, seed), regions=2, dim=8, seed=seed)
    bert = bert_folder(root / 'bert')
    run = root / 'run'
    train.main(['--data_path', str(root), '--dataset', 'coco', '--bert_path', bert, '--embed_size', '32',
                '--nhead', '4', '--batch_size', '8', '--workers', '0', '--device', 'cpu', '--num_epochs', '1',
                '--warmup', '0', '--eval_batch_size', '1000', '--logger_name', str(run)])
    return run


def test_training_ends_with_5k_and_the_five_1k_folds(coco_run):
    saved = json.loads((coco_run / 'results.json').read_text())
    assert saved['split'] == 'testall'
    results = saved['results']
    assert [r['name'] for r in results] == FOLDS
    assert (results[0]['n_images'], results[0]['n_captions']) == (5000, 25000)
    assert all((r['n_images'], r['n_captions']) == (1000, 5000) for r in results[1:])
    sims = load_sims(str(coco_run / 'results_coco.npy'))
    assert sims.shape == (5000, 25000)
    block = sims[2000:3000, 10000:15000]  # fold 2, against the argsort loops
    for side, ranks in (('i2t', naive_i2t(block)), ('t2i', naive_t2i(block))):
        for k, v in naive_metrics(ranks).items():
            assert results[3][side][k] == pytest.approx(v), (side, k)
    for side in ('i2t', 't2i'):
        for k in results[0][side]:
            assert results[6][side][k] == pytest.approx(np.mean([r[side][k] for r in results[1:6]]))
    assert results[6]['rsum'] == pytest.approx(np.mean([r['rsum'] for r in results[1:6]]))


def test_eval_gives_the_same_5k_and_1k_numbers(coco_run):
    results = eval_script.main(['--checkpoint', str(coco_run / 'model_best.pth'), '--device', 'cpu', '--fold5',
                                '--batch_size', '1000'])
    saved = json.loads((coco_run / 'results.json').read_text())['results']
    assert [r['name'] for r in results] == [r['name'] for r in saved] == FOLDS
    for got, want in zip(results, saved):
        assert (got['n_images'], got['n_captions']) == (want['n_images'], want['n_captions'])
        for side in ('i2t', 't2i'):
            assert got[side] == pytest.approx(want[side]), (got['name'], side)
        assert got['rsum'] == pytest.approx(want['rsum'])
