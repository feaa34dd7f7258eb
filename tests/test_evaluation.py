"""The retrieval protocol (spec section 7) against the authors' argsort loops, and the results files."""
import os
import re

import numpy as np
import pytest

from lib import metrics as evaluation
from lib.errors import UserError
from lib.metrics import evaluate_sims, i2t_ranks, rank_metrics, t2i_ranks
from lib.sims_file import load_sims, save_sims


def naive_i2t(sims, per_image=5):
    ranks = np.zeros(sims.shape[0])
    for index in range(sims.shape[0]):
        inds = np.argsort(sims[index])[::-1]
        ranks[index] = min(np.where(inds == i)[0][0]
                           for i in range(per_image * index, per_image * index + per_image))
    return ranks


def naive_t2i(sims, per_image=5):
    ranks = np.zeros(sims.shape[1])
    for c in range(sims.shape[1]):
        inds = np.argsort(sims[:, c])[::-1]
        ranks[c] = np.where(inds == c // per_image)[0][0]
    return ranks


def naive_metrics(ranks):
    return {'r1': 100.0 * len(np.where(ranks < 1)[0]) / len(ranks),
            'r5': 100.0 * len(np.where(ranks < 5)[0]) / len(ranks),
            'r10': 100.0 * len(np.where(ranks < 10)[0]) / len(ranks),
            'medr': np.floor(np.median(ranks)) + 1, 'meanr': ranks.mean() + 1}


def random_sims(n, seed=0, signal=2.0, per_image=5):
    """Continuous scores (no ties) with some signal, so that recalls are neither 0 nor 100."""
    rng = np.random.default_rng(seed)
    m = per_image * n
    sims = rng.standard_normal((n, m)).astype(np.float32)
    sims[np.arange(m) // per_image, np.arange(m)] += signal * rng.random(m).astype(np.float32)
    return sims


def check_result(result, sims, per_image=5):
    want_i2t = naive_metrics(naive_i2t(sims, per_image))
    want_t2i = naive_metrics(naive_t2i(sims, per_image))
    for side, want in (('i2t', want_i2t), ('t2i', want_t2i)):
        for k, v in want.items():
            assert result[side][k] == pytest.approx(v, abs=1e-9), (side, k)
    rsum = sum(want_i2t[k] + want_t2i[k] for k in ('r1', 'r5', 'r10'))
    assert result['rsum'] == pytest.approx(rsum)
    assert result['n_images'] == sims.shape[0] and result['n_captions'] == sims.shape[1]


def test_ranks_equal_the_argsort_loops():
    sims = random_sims(120)
    np.testing.assert_array_equal(i2t_ranks(sims), naive_i2t(sims))
    np.testing.assert_array_equal(t2i_ranks(sims), naive_t2i(sims))


def test_ranks_across_row_chunks(monkeypatch):
    monkeypatch.setattr(evaluation, 'ROW_CHUNK', 7)
    sims = random_sims(30, seed=4)
    np.testing.assert_array_equal(i2t_ranks(sims), naive_i2t(sims))
    np.testing.assert_array_equal(t2i_ranks(sims), naive_t2i(sims))


@pytest.mark.parametrize('seed,signal', [(1, 2.0), (2, 0.5), (3, 6.0)])
def test_metrics_equal_the_protocol(seed, signal):
    sims = random_sims(80, seed, signal)
    check_result(rank_metrics(sims), sims)


def test_i2t_meanr_is_not_the_t2i_one():
    sims = random_sims(60, seed=5, signal=1.0)
    r = rank_metrics(sims)
    assert r['i2t']['meanr'] != pytest.approx(r['t2i']['meanr'])
    assert r['i2t']['meanr'] == pytest.approx(naive_i2t(sims).mean() + 1)
    assert r['t2i']['meanr'] == pytest.approx(naive_t2i(sims).mean() + 1)


@pytest.mark.parametrize('seed,signal', [(7, 1.0), (8, 3.0)])
def test_one_caption_per_image_equals_the_argsort_loops(seed, signal):
    sims = random_sims(90, seed, signal, per_image=1)
    np.testing.assert_array_equal(i2t_ranks(sims, 1), naive_i2t(sims, 1))
    np.testing.assert_array_equal(t2i_ranks(sims, 1), naive_t2i(sims, 1))
    (result,) = evaluate_sims(sims)
    check_result(result, sims, per_image=1)
    assert result['n_captions'] == 90 and 0 < result['rsum'] < 600


@pytest.mark.parametrize('shape', [(4, 6), (4, 10), (4,), (0, 0)])
def test_other_shapes_are_refused_naming_the_shape(shape):
    with pytest.raises(UserError, match=re.escape(str(shape))):
        evaluate_sims(np.zeros(shape, np.float32))


@pytest.mark.parametrize('per_image', [5, 1])
def test_fold5_averages_five_diagonal_blocks(monkeypatch, per_image):
    monkeypatch.setattr(evaluation, 'FOLD_IMAGES', 20)
    sims = random_sims(100, seed=6, signal=1.5, per_image=per_image)
    results = evaluate_sims(sims, fold5=True)
    assert [r['name'] for r in results] == ['full'] + [f'1k-fold{i}' for i in range(5)] + ['1k-mean']
    check_result(results[0], sims, per_image)
    c = 20 * per_image
    blocks = [sims[i * 20:(i + 1) * 20, i * c:(i + 1) * c] for i in range(5)]
    for r, block in zip(results[1:6], blocks):
        check_result(r, block, per_image)
    mean = results[6]
    assert mean['n_captions'] == c
    for side, naive in (('i2t', naive_i2t), ('t2i', naive_t2i)):
        for k in ('r1', 'r5', 'r10', 'medr', 'meanr'):
            want = np.mean([naive_metrics(naive(b, per_image))[k] for b in blocks])
            assert mean[side][k] == pytest.approx(want)
    assert mean['rsum'] == pytest.approx(np.mean([r['rsum'] for r in results[1:6]]))
    assert mean['rsum'] < 600  # the mean of the folds, not six times it
    with pytest.raises(UserError):
        evaluate_sims(random_sims(30), fold5=True)


@pytest.mark.parametrize('per_image', [5, 1])
def test_save_and_load_round_trip(tmp_path, per_image):
    sims = random_sims(12, per_image=per_image)
    path = str(tmp_path / 'results_f30k.npy')
    save_sims(path, sims)
    loaded = np.load(path, allow_pickle=True).item()  # the authors' reader
    assert set(loaded) == {'npts', 'sims'} and loaded['npts'] == 12
    np.testing.assert_array_equal(load_sims(path), sims)


@pytest.mark.parametrize('npts_type,dtype', [(int, np.float32), (np.int64, np.float64)])
def test_load_the_authors_file(tmp_path, npts_type, dtype):
    sims = random_sims(10).astype(dtype)
    path = str(tmp_path / 'results_coco.npy')
    np.save(path, {'npts': npts_type(10), 'sims': sims})  # as their evaluation code writes it
    np.testing.assert_array_equal(load_sims(path), sims)


class _Payload:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, 'w')


def test_load_refuses_a_pickle_that_would_run_code(tmp_path):
    marker = str(tmp_path / 'pwned')
    path = str(tmp_path / 'evil.npy')
    np.save(path, np.array({'npts': 1, 'sims': _Payload(marker)}, dtype=object), allow_pickle=True)
    with pytest.raises(UserError) as err:
        load_sims(path)
    assert 'evil.npy' in str(err.value)
    assert not os.path.exists(marker)
    # the payload is live: numpy's own unpickling runs it
    np.load(path, allow_pickle=True)
    assert os.path.exists(marker)


def test_load_refuses_other_contents(tmp_path):
    bad_keys = str(tmp_path / 'keys.npy')
    np.save(bad_keys, {'npts': 2, 'sims': random_sims(2), 'extra': 1})
    bad_shape = str(tmp_path / 'shape.npy')
    np.save(bad_shape, {'npts': 4, 'sims': np.zeros((4, 6), np.float32)})
    for path in (bad_keys, bad_shape, str(tmp_path / 'missing.npy')):
        with pytest.raises(UserError):
            load_sims(path)
