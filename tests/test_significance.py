"""lib/significance.py: paired bootstrap intervals and sign-flip p-values between two models,
checked against a naive loop over the same resamples and on synthetic pairs whose truth is known."""
import json

import numpy as np
import pytest
import torch

from lib import metrics as evaluation, significance
from lib.metrics import evaluate_sims, i2t_ranks, t2i_ranks
from lib.sims_file import save_sims
from lib.errors import UserError


def embeddings_sims(n, rng, noise, per_image=5, dim=16):
    """A matching problem: images and captions share latent vectors; noise blurs the captions."""
    return model_sims(rng.standard_normal((n, dim)), rng, noise, per_image)


def model_sims(latent, rng, noise, per_image=5):
    """One trained model's matrix on a fixed test set (latent): its own noise draws, its quality
    set by noise (seed-to-seed variation)."""
    img = latent + 0.5 * rng.standard_normal(latent.shape)
    cap = np.repeat(latent, per_image, 0) + noise * rng.standard_normal((per_image * len(latent), latent.shape[1]))
    return (img @ cap.T).astype(np.float32)


def recall(ranks, k):
    return 100.0 * np.mean(ranks < k)


def naive_boot(sims_a, sims_b, idx):
    """For each resample (a row of image indices), the six R@K and rsum of B minus A, recounted
    from the ranks of the drawn images and of their captions, one resample at a time."""
    ra_i, ra_t, rb_i, rb_t = i2t_ranks(sims_a), t2i_ranks(sims_a), i2t_ranks(sims_b), t2i_ranks(sims_b)
    out = []
    for rows in idx:
        caps = (rows[:, None] * 5 + np.arange(5)).ravel()
        d = [recall(rb_i[rows], k) - recall(ra_i[rows], k) for k in (1, 5, 10)]
        d += [recall(rb_t[caps], k) - recall(ra_t[caps], k) for k in (1, 5, 10)]
        out.append(d + [sum(d)])
    return np.array(out)


def test_naive_loop_bootstrap_equals_the_vectorised_one():
    rng = np.random.default_rng(3)
    sims_a, sims_b = embeddings_sims(60, rng, 1.5), embeddings_sims(60, rng, 1.2)
    idx = significance.bootstrap_indices(60, 200, np.random.default_rng(5))
    want = naive_boot(sims_a, sims_b, idx)
    ranked = [significance.query_ranks(s) for s in (sims_a, sims_b)]
    got = significance.compare_ranks([ranked[0]], [ranked[1]], idx=idx)
    ci = np.percentile(want, [2.5, 97.5], axis=0).T
    for j, name in enumerate(significance.ALL_METRICS):
        m = got['metrics'][name]
        assert m['ci95'] == pytest.approx(list(ci[j]), abs=1e-9), name
    # the point values are the protocol's
    ra, rb = evaluate_sims(sims_a)[0], evaluate_sims(sims_b)[0]
    assert got['metrics']['rsum']['a'] == pytest.approx(ra['rsum'])
    assert got['metrics']['t2i_r5']['diff'] == pytest.approx(rb['t2i']['r5'] - ra['t2i']['r5'])
    # the resampled means themselves, not only their percentiles
    vals = significance.per_image_values(*ranked[1]) - significance.per_image_values(*ranked[0])
    np.testing.assert_allclose(significance.with_rsum(significance.resampled_means(vals, idx)), want, atol=1e-9)


def test_a_model_against_itself_gives_zero_and_p_one():
    sims = embeddings_sims(80, np.random.default_rng(0), 1.5)
    out = significance.compare(sims, sims.copy(), n_boot=300, seed=1)
    for name, m in out['metrics'].items():
        assert m['diff'] == 0 and m['ci95'] == [0.0, 0.0] and m['p'] == 1.0, name
        assert m['a'] == m['b']
    assert out['queries']['i2t'] == {'better': 0, 'worse': 0, 'same': 80}
    assert out['queries']['t2i'] == {'better': 0, 'worse': 0, 'same': 400}


def test_a_real_improvement_is_told_from_zero():
    rng = np.random.default_rng(11)
    latent = rng.standard_normal((200, 16))
    img = latent + 0.5 * rng.standard_normal((200, 16))
    caps = np.repeat(latent, 5, 0)
    noise = rng.standard_normal(caps.shape)
    sims_a = (img @ (caps + 1.6 * noise).T).astype(np.float32)
    sims_b = (img @ (caps + 1.0 * noise).T).astype(np.float32)  # the same captions, less noise
    out = significance.compare(sims_a, sims_b, n_boot=1000, seed=0)
    rsum = out['metrics']['rsum']
    assert rsum['diff'] > 0 and rsum['ci95'][0] > 0 and rsum['p'] < 0.01
    assert out['queries']['t2i']['better'] > out['queries']['t2i']['worse']


def test_pure_noise_holds_zero_in_at_least_90_of_100_repetitions(one_thread):
    """B is A with its noise drawn anew (the same distribution): no real difference."""
    held, small_p = 0, 0
    for rep in range(100):
        rng = np.random.default_rng(1000 + rep)
        latent = rng.standard_normal((100, 16))
        img = latent + 0.5 * rng.standard_normal((100, 16))
        caps = np.repeat(latent, 5, 0)
        sims_a = (img @ (caps + 1.5 * rng.standard_normal(caps.shape)).T).astype(np.float32)
        sims_b = (img @ (caps + 1.5 * rng.standard_normal(caps.shape)).T).astype(np.float32)
        m = significance.compare(sims_a, sims_b, n_boot=400, seed=rep)['metrics']['rsum']
        held += m['ci95'][0] <= 0 <= m['ci95'][1]
        small_p += m['p'] < 0.05
    assert held >= 90
    assert small_p <= 10


def test_fold5_resamples_inside_each_fold():
    idx = significance.bootstrap_indices(5000, 20, np.random.default_rng(0), strata=1000)
    assert ((idx // 1000) == (np.arange(5000) // 1000)).all()
    assert len(np.unique(idx[0, :1000])) < 1000  # drawn with replacement


def test_fold5_values_are_the_1k_mean(monkeypatch):
    monkeypatch.setattr(evaluation, 'FOLD_IMAGES', 40)  # five folds of 40 images
    rng = np.random.default_rng(2)
    sims = rng.standard_normal((200, 1000), dtype=np.float32)
    sims[np.arange(1000) // 5, np.arange(1000)] += 2.0
    mean = evaluate_sims(sims, fold5=True)[-1]
    out = significance.intervals(sims, n_boot=50, fold5=True)['metrics']
    assert out['rsum']['value'] == pytest.approx(mean['rsum'])
    assert out['i2t_r1']['value'] == pytest.approx(mean['i2t']['r1'])
    assert out['rsum']['ci95'][0] <= mean['rsum'] <= out['rsum']['ci95'][1]


def test_seeds_pairs_average_and_widen_with_seed_variation():
    rng = np.random.default_rng(4)
    a = [embeddings_sims(60, np.random.default_rng(s), 1.5) for s in range(3)]
    b = [s + 0.01 * rng.standard_normal(s.shape).astype(np.float32) for s in a]
    out = significance.compare(a, b, n_boot=200, seed=0)
    singles = [significance.compare(x, y, n_boot=200, seed=0)['metrics']['rsum']['diff'] for x, y in zip(a, b)]
    assert out['seeds'] == 3
    assert out['metrics']['rsum']['diff'] == pytest.approx(np.mean(singles))
    with pytest.raises(UserError, match='one of each per seed'):
        significance.compare(a, b[:2])


def test_seed_pairs_give_students_t_over_the_per_seed_differences():
    """With the image resamples fixed to the test set itself (no test-sampling variance), the
    interval and p are scipy's one-sample t on the per-seed rsum differences of the protocol."""
    from scipy import stats
    rng = np.random.default_rng(11)
    latent = rng.standard_normal((50, 16))
    a = [model_sims(latent, rng, 1.5) for _ in range(4)]
    b = [model_sims(latent, rng, 1.3) for _ in range(4)]
    d = [evaluate_sims(y)[0]['rsum'] - evaluate_sims(x)[0]['rsum'] for x, y in zip(a, b)]
    ranked = [[significance.query_ranks(s) for s in side] for side in (a, b)]
    idx = np.tile(np.arange(50), (20, 1))
    m = significance.compare_ranks(*ranked, idx=idx)['metrics']['rsum']
    want = stats.ttest_1samp(d, 0.0)
    lo, hi = want.confidence_interval(0.95)
    assert m['per_seed'] == pytest.approx(d)
    assert m['diff'] == pytest.approx(np.mean(d))
    assert m['ci95'] == pytest.approx([lo, hi])
    assert m['p'] == pytest.approx(want.pvalue)


def test_seed_pair_interval_covers_zero_when_only_seeds_differ():
    """A and B drawn from one distribution of trained models (each seed its own quality): no real
    difference, so the 3-seed interval must hold 0 in about 95% of repetitions. A bootstrap of
    the 3 seed pairs holds it only when the 3 differences do not share a sign (about 3 in 4)."""
    held = 0
    for rep in range(100):
        rng = np.random.default_rng(1000 + rep)
        latent = rng.standard_normal((60, 16))
        a, b = ([model_sims(latent, rng, 1.5 * np.exp(0.2 * rng.standard_normal())) for _ in range(3)]
                for _ in range(2))
        lo, hi = significance.compare(a, b, n_boot=200, seed=rep)['metrics']['rsum']['ci95']
        held += lo <= 0 <= hi
    assert held >= 90


def test_intervals_hold_the_value():
    sims = embeddings_sims(100, np.random.default_rng(7), 1.5)
    out = significance.intervals(sims, n_boot=300, seed=0)['metrics']
    want = evaluate_sims(sims)[0]
    assert out['t2i_r10']['value'] == pytest.approx(want['t2i']['r10'])
    for m in out.values():
        assert m['ci95'][0] <= m['value'] <= m['ci95'][1] and m['ci95'][0] < m['ci95'][1]


def test_eval_compare_cli(tmp_path, capsys):
    import eval as eval_script
    rng = np.random.default_rng(8)
    a, b = embeddings_sims(50, rng, 1.6), embeddings_sims(50, rng, 1.4)
    save_sims(tmp_path / 'a.npy', a)
    save_sims(tmp_path / 'b.npy', b)
    out_json = tmp_path / 'c.json'
    eval_script.main(['--compare', str(tmp_path / 'a.npy'), str(tmp_path / 'b.npy'), '--bootstrap', '100',
                      '--seed', '3', '--json', str(out_json)])
    text = capsys.readouterr().out
    assert 'rsum' in text and 'ranked better by B' in text
    doc = json.loads(out_json.read_text())['compare']
    assert doc['a'] == str(tmp_path / 'a.npy') and doc['bootstrap'] == 100
    assert set(doc['metrics']) == set(significance.ALL_METRICS)
    assert set(doc['metrics']['rsum']) == {'a', 'b', 'diff', 'ci95', 'p'}
    assert doc['metrics']['rsum'] == significance.compare(a, b, 100, 3)['metrics']['rsum']
    save_sims(tmp_path / 'small.npy', a[:10, :50])
    with pytest.raises(SystemExit) as err:
        eval_script.main(['--compare', str(tmp_path / 'a.npy'), str(tmp_path / 'small.npy')])
    assert err.value.code == 2
    assert 'different shapes' in capsys.readouterr().err


def test_eval_ci_cli(tmp_path, capsys):
    import eval as eval_script
    sims = embeddings_sims(50, np.random.default_rng(9), 1.5)
    save_sims(tmp_path / 'a.npy', sims)
    eval_script.main(['--sims', str(tmp_path / 'a.npy'), '--ci', '--bootstrap', '100', '--json',
                      str(tmp_path / 'r.json')])
    assert '95% intervals' in capsys.readouterr().out
    doc = json.loads((tmp_path / 'r.json').read_text())
    assert doc['ci']['full'] == significance.intervals(sims, 100, 0)
