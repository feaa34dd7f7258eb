"""The COCO path end to end, nothing patched: a COCO-shaped set (5000 testall images, 25000
captions, tiny features) is tested on 5K and the five 1K folds at the end of training, and
eval.py --fold5 gives the same numbers."""
import json

import numpy as np
import pytest

import eval as eval_script
import train
from conftest import write_precomp
from lib.sims_file import load_sims
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


def test_training_adds_eccv_caption_and_cxc_metrics(coco_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from lib.extended_metrics import KEYS, extended_metrics
    saved = json.loads((coco_run / 'results.json').read_text())
    want = extended_metrics(load_sims(str(coco_run / 'results_coco.npy')))
    assert set(saved['extended']) == set(KEYS)
    for key in KEYS:
        assert saved['extended'][key] == pytest.approx(want[key]), key
    # the package's COCO recalls are the protocol's
    assert saved['extended']['coco_5k_r5']['t2i'] == pytest.approx(saved['results'][0]['t2i']['r5'])
    assert saved['extended']['coco_1k_r1']['i2t'] == pytest.approx(saved['results'][-1]['i2t']['r1'])
    events = EventAccumulator(str(coco_run))
    events.Reload()
    tags = events.Tags()['scalars']
    assert 'test/eccv_map_at_r_i2t' in tags and 'test/cxc_r10_t2i' in tags
    assert events.Scalars('test/cxc_r1_i2t')[-1].value == pytest.approx(saved['extended']['cxc_r1']['i2t'], abs=1e-4)


def test_eval_eccv_on_the_checkpoint_and_its_ids_files(coco_run, tmp_path, capsys):
    from lib.extended_metrics import package_ids
    out = tmp_path / 'r.json'
    argv = ['--checkpoint', str(coco_run / 'model_best.pth'), '--device', 'cpu', '--batch_size', '1000', '--eccv']
    precomp = coco_run.parent / 'coco_precomp'
    caption_ids, _ = package_ids()
    (precomp / 'testall_capids.txt').write_text(''.join(f'{c}\n' for c in caption_ids))
    try:
        eval_script.main(argv + ['--json', str(out)])
        saved = json.loads((coco_run / 'results.json').read_text())['extended']
        got = json.loads(out.read_text())['extended']
        for key in saved:
            assert got[key] == pytest.approx(saved[key]), key
        capsys.readouterr()
        swapped = caption_ids.copy()
        swapped[[0, 1]] = swapped[[1, 0]]
        (precomp / 'testall_capids.txt').write_text(''.join(f'{c}\n' for c in swapped))
        with pytest.raises(SystemExit) as err:
            eval_script.main(argv)
        assert err.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and 'testall_capids.txt line 1' in lines[0] and 'Karpathy' in lines[0]
    finally:
        (precomp / 'testall_capids.txt').unlink()
