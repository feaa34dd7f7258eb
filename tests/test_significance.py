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


# ----------------------------------------------------------------------------- each rule, against a plain loop

def naive_ranks(sims, per_image=5):
    """Ranks by sorting each query's row (no ties in random scores): the protocol's definition,
    independent of lib.evaluation's counting."""
    n = sims.shape[0]
    order_i = np.argsort(-sims, axis=1)
    i2t = np.array([min(np.where(order_i[i] == c)[0][0] for c in range(per_image * i, per_image * (i + 1)))
                    for i in range(n)])
    order_t = np.argsort(-sims.T, axis=1)
    t2i = np.array([np.where(order_t[c] == c // per_image)[0][0] for c in range(per_image * n)])
    return i2t, t2i


def naive_image_values(i2t, t2i, per_image=5):
    """(N, 7) per image: 100 x its i2t hit at 1, 5, 10, 100 x the share of its captions hit at 1, 5,
    10, and the sum of the six."""
    rows = []
    for i in range(len(i2t)):
        caps = t2i[per_image * i:per_image * (i + 1)]
        row = [100.0 * (i2t[i] < k) for k in (1, 5, 10)] + [100.0 * np.mean(caps < k) for k in (1, 5, 10)]
        rows.append(row + [sum(row)])
    return np.array(rows)


def fold5_values(sims, fold, per_image=5):
    """Per-image values (N, 7) with each fold ranked inside itself: fold f is the block of images
    f*fold.. and of their captions."""
    out = []
    for f in range(5):
        block = sims[f * fold:(f + 1) * fold, f * per_image * fold:(f + 1) * per_image * fold]
        out.append(naive_image_values(*naive_ranks(block, per_image), per_image))
    return np.concatenate(out)


def strat_draws(rng, n_boot, fold):
    """n_boot resamples of 5 folds: in each, fold f's images are `fold` draws from fold f only
    (a position inside the fold, drawn for every slot at once, plus the fold's first image)."""
    return rng.integers(0, fold, size=(n_boot, 5 * fold)) + fold * (np.arange(5 * fold) // fold)


def loop_over_folds(values, draws, fold):
    """For each resample: each fold's mean over its own draws, then the mean over the 5 folds."""
    out = []
    for row in draws:
        per_fold = [values[row[f * fold:(f + 1) * fold]].mean(0) for f in range(5)]
        out.append(np.mean(per_fold, 0))
    return np.array(out)


def loop_sign_flip_p(diffs, signs):
    """The sign-flip p-value as the textbook states it: the observed labelling counts as one of the
    1 + len(signs) labellings, and a flip whose |mean| ties the observed one counts as extreme."""
    observed = abs(diffs.mean())
    hits = 1
    for s in signs:
        hits += abs((s * diffs).mean()) >= observed - 1e-9
    return hits / (1 + len(signs))


@pytest.fixture
def folds_of_40(monkeypatch):
    """Five folds of 40 images (the COCO 1K protocol scaled down)."""
    monkeypatch.setattr(evaluation, 'FOLD_IMAGES', 40)
    return 40


def two_models(n, seed, noise_a=1.5, noise_b=1.2):
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((n, 16))
    return model_sims(latent, rng, noise_a), model_sims(latent, rng, noise_b)


def test_fold5_comparison_equals_a_plain_loop_over_folds_with_the_same_draws(folds_of_40):
    fold, n_boot, seed = folds_of_40, 300, 6
    a, b = two_models(5 * fold, 21)
    out = significance.compare(a, b, n_boot=n_boot, seed=seed, fold5=True)
    diffs = fold5_values(b, fold) - fold5_values(a, fold)
    rng = np.random.default_rng(seed)
    draws = strat_draws(rng, n_boot, fold)  # the same generator calls as the module, in a plain loop
    boot = loop_over_folds(diffs, draws, fold)
    ci = np.percentile(boot, [2.5, 97.5], axis=0).T
    signs = rng.integers(0, 2, size=(n_boot, len(diffs))) * 2 - 1  # then the sign flips
    p = [loop_sign_flip_p(diffs[:, j], signs) for j in range(7)]
    want_a, want_b = evaluate_sims(a, fold5=True)[-1], evaluate_sims(b, fold5=True)[-1]
    for j, name in enumerate(significance.ALL_METRICS):
        m = out['metrics'][name]
        assert m['ci95'] == pytest.approx(list(ci[j]), abs=1e-9), name
        assert m['diff'] == pytest.approx(diffs[:, j].mean(), abs=1e-9), name
        assert m['p'] == pytest.approx(p[j], abs=1e-12), name
    assert out['metrics']['rsum']['a'] == pytest.approx(want_a['rsum'])
    assert out['metrics']['rsum']['b'] == pytest.approx(want_b['rsum'])
    assert out['metrics']['t2i_r10']['b'] == pytest.approx(want_b['t2i']['r10'])


def test_fold5_resamples_hold_exactly_one_fold_of_each_fold(folds_of_40):
    """B beats A on every query of fold 0 and ties elsewhere. A resample with exactly 40 images of
    each fold has the same share of fold 0 every time, so the difference cannot vary: the interval
    is one point. Draws over all 200 images would vary the share of fold 0 and widen it."""
    fold = folds_of_40
    n = 5 * fold
    a = np.zeros((n, 5 * n), np.float32)
    a[np.repeat(np.arange(n), 5), np.arange(5 * n)] = -1.0  # A ranks every positive last
    b = a.copy()
    b[np.repeat(np.arange(fold), 5), np.arange(5 * fold)] = 1.0  # B ranks fold 0's positives first
    out = significance.compare(a, b, n_boot=200, seed=0, fold5=True)['metrics']
    for name in significance.ALL_METRICS:
        lo, hi = out[name]['ci95']
        assert out[name]['diff'] == pytest.approx(100.0 / 5 * (6 if name == 'rsum' else 1)), name
        assert lo == pytest.approx(out[name]['diff']) and hi == pytest.approx(out[name]['diff']), name
    # the same matrices over the whole split (no strata): the share of fold 0 varies
    lo, hi = significance.compare(a, b, n_boot=200, seed=0)['metrics']['rsum']['ci95']
    assert hi - lo > 10
    # one model's intervals: fold 0 all hits, the other folds none -> its 1K mean never varies
    ci = significance.intervals(b, n_boot=200, seed=0, fold5=True)['metrics']['rsum']
    assert ci['value'] == pytest.approx(120.0) and ci['ci95'] == pytest.approx([120.0, 120.0])
    assert np.diff(significance.intervals(b, n_boot=200, seed=0)['metrics']['rsum']['ci95'])[0] > 10


def test_fold5_draws_hold_1000_images_of_each_fold_per_resample():
    idx = significance.bootstrap_indices(5000, 50, np.random.default_rng(1), strata=1000)
    counts = np.stack([np.bincount(row // 1000, minlength=5) for row in idx])
    assert (counts == 1000).all()
    assert idx.min() >= 0 and idx.max() < 5000 and idx.shape == (50, 5000)
    with pytest.raises(ValueError, match='blocks of 1000'):
        significance.bootstrap_indices(4500, 5, np.random.default_rng(0), strata=1000)
    whole = significance.bootstrap_indices(300, 400, np.random.default_rng(0), strata=1000)  # a block >= n
    assert whole.shape == (400, 300) and whole.max() >= 250  # drawn over all of it


def test_fold5_intervals_equal_a_plain_loop_over_folds(folds_of_40):
    fold, n_boot, seed = folds_of_40, 200, 4
    sims = two_models(5 * fold, 8)[0]
    out = significance.intervals(sims, n_boot=n_boot, seed=seed, fold5=True)['metrics']
    values = fold5_values(sims, fold)
    boot = loop_over_folds(values, strat_draws(np.random.default_rng(seed), n_boot, fold), fold)
    ci = np.percentile(boot, [2.5, 97.5], axis=0).T
    for j, name in enumerate(significance.ALL_METRICS):
        assert out[name]['ci95'] == pytest.approx(list(ci[j]), abs=1e-9), name
        assert out[name]['value'] == pytest.approx(values[:, j].mean(), abs=1e-9), name


def test_whole_split_intervals_equal_a_plain_loop():
    n, n_boot, seed = 60, 200, 2
    sims = two_models(n, 3)[1]
    out = significance.intervals(sims, n_boot=n_boot, seed=seed)
    values = naive_image_values(*naive_ranks(sims))
    draws = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    boot = np.array([values[row].mean(0) for row in draws])
    ci = np.percentile(boot, [2.5, 97.5], axis=0).T
    assert out['bootstrap'] == n_boot
    for j, name in enumerate(significance.ALL_METRICS):
        assert out['metrics'][name]['ci95'] == pytest.approx(list(ci[j]), abs=1e-9), name


def test_one_seed_p_equals_a_naive_loop_over_the_same_flips():
    n, n_boot, seed = 50, 400, 9
    a, b = two_models(n, 5)
    out = significance.compare(a, b, n_boot=n_boot, seed=seed)
    diffs = naive_image_values(*naive_ranks(b)) - naive_image_values(*naive_ranks(a))
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(n_boot, n))  # the resamples come first from the generator
    signs = rng.integers(0, 2, size=(n_boot, n)) * 2 - 1
    boot = np.array([diffs[row].mean(0) for row in draws])
    ci = np.percentile(boot, [2.5, 97.5], axis=0).T
    for j, name in enumerate(significance.ALL_METRICS):
        m = out['metrics'][name]
        assert m['p'] == pytest.approx(loop_sign_flip_p(diffs[:, j], signs), abs=1e-12), name
        assert m['ci95'] == pytest.approx(list(ci[j]), abs=1e-9), name
        assert m['p'] * (1 + n_boot) == pytest.approx(round(m['p'] * (1 + n_boot)))  # a count over 1 + B


def test_p_counts_the_observed_labelling_and_is_never_below_one_over_permutations_plus_one():
    """Every image better in B: no sign flip reaches the observed mean, yet p stays 1 / (1 + B),
    the smallest value a permutation test with B draws can give (p = 0 is impossible)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((100, 500)).astype(np.float32)
    b = a.copy()
    b[np.repeat(np.arange(100), 5), np.arange(500)] += 100.0
    for n_boot in (1, 19, 250):
        out = significance.compare(a, b, n_boot=n_boot, seed=0)['metrics']
        assert out['rsum']['p'] == 1 / (1 + n_boot)
        assert min(m['p'] for m in out.values()) >= 1 / (1 + n_boot)
    diffs = np.full((30, 1), 2.0)
    assert significance.sign_flip_p(diffs, 99, np.random.default_rng(1))[0] >= 1 / 100


def test_sign_flip_p_is_two_sided_with_ties_extreme():
    """Three images each +1 (or each -1): of the 8 sign patterns, 2 reach |mean| 1 (all +, all -),
    so the exact two-sided p is 1/4. 40000 random flips come within 0.01 of it; a one-sided test
    would give 1/8, one that drops ties about 0."""
    for sign in (1.0, -1.0):
        p = significance.sign_flip_p(np.full((3, 1), sign), 40000, np.random.default_rng(2))[0]
        assert abs(p - 0.25) < 0.01
    diffs = np.array([[3.0, 0.0], [-1.0, 0.0], [2.0, 0.0], [0.5, 0.0]])
    signs = np.random.default_rng(5).integers(0, 2, size=(64, 4)) * 2 - 1
    got = significance.sign_flip_p(diffs, 64, np.random.default_rng(5))
    assert got[0] == pytest.approx(loop_sign_flip_p(diffs[:, 0], signs), abs=1e-12)
    assert got[1] == 1.0  # no difference at all


def test_per_image_values_are_the_protocol_per_image():
    sims = two_models(30, 12)[0]
    i2t, t2i, per_image = significance.query_ranks(sims)
    assert per_image == 5
    want = naive_image_values(*naive_ranks(sims))
    got = significance.with_rsum(significance.per_image_values(i2t, t2i, 5))
    assert got.shape == (30, 7) and got.dtype == np.float64
    np.testing.assert_allclose(got, want, atol=1e-9)
    assert significance.ALL_METRICS == ['i2t_r1', 'i2t_r5', 'i2t_r10', 't2i_r1', 't2i_r5', 't2i_r10', 'rsum']


def test_one_caption_per_image_matrices():
    rng = np.random.default_rng(13)
    latent = rng.standard_normal((40, 16))
    a = (latent + 0.5 * rng.standard_normal(latent.shape)) @ (latent + 1.5 * rng.standard_normal(latent.shape)).T
    b = (latent + 0.5 * rng.standard_normal(latent.shape)) @ (latent + 1.0 * rng.standard_normal(latent.shape)).T
    a, b = a.astype(np.float32), b.astype(np.float32)
    out = significance.compare(a, b, n_boot=100, seed=0)
    diffs = naive_image_values(*naive_ranks(b, 1), 1) - naive_image_values(*naive_ranks(a, 1), 1)
    draws = np.random.default_rng(0).integers(0, 40, size=(100, 40))
    ci = np.percentile([diffs[row].mean(0) for row in draws], [2.5, 97.5], axis=0).T
    assert out['metrics']['rsum']['ci95'] == pytest.approx(list(ci[-1]), abs=1e-9)
    assert out['metrics']['rsum']['a'] == pytest.approx(evaluate_sims(a)[0]['rsum'])
    assert out['queries']['t2i']['better'] + out['queries']['t2i']['worse'] + out['queries']['t2i']['same'] == 40


def test_queries_count_better_worse_and_same_per_query():
    a, b = two_models(40, 14)
    out = significance.compare([a, b], [b, b], n_boot=20, seed=0)['queries']  # two seed pairs, summed
    ia, ta = naive_ranks(a)
    ib, tb = naive_ranks(b)
    assert out['i2t'] == {'better': int((ib < ia).sum()), 'worse': int((ib > ia).sum()),
                          'same': int((ib == ia).sum()) + 40}
    assert out['t2i'] == {'better': int((tb < ta).sum()), 'worse': int((tb > ta).sum()),
                          'same': int((tb == ta).sum()) + 200}


def test_seed_pairs_add_the_bootstrap_variance_with_student_t_on_s_minus_1_df():
    """Several seed pairs: d = mean of the per-seed differences; se^2 = var(d_s) / S (ddof 1) plus
    the variance (ddof 1) over resamples of the seed-averaged difference, one image draw shared by
    every seed pair; interval d -/+ t_0.975(S-1) se, p = 2 sf(|d| / se)."""
    from scipy import stats
    n, n_boot, seed, s = 40, 150, 3, 3
    rng = np.random.default_rng(17)
    latent = rng.standard_normal((n, 16))
    a = [model_sims(latent, rng, 1.5) for _ in range(s)]
    b = [model_sims(latent, rng, 1.2) for _ in range(s)]
    m = significance.compare(a, b, n_boot=n_boot, seed=seed)['metrics']
    diffs = [naive_image_values(*naive_ranks(y)) - naive_image_values(*naive_ranks(x)) for x, y in zip(a, b)]
    draws = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    boot = np.array([np.mean([d[row].mean(0) for d in diffs], 0) for row in draws])
    per_seed = np.array([d.mean(0) for d in diffs])
    for j, name in enumerate(significance.ALL_METRICS):
        d = per_seed[:, j].mean()
        se = np.sqrt(per_seed[:, j].var(ddof=1) / s + boot[:, j].var(ddof=1))
        half = stats.t.ppf(0.975, s - 1) * se
        assert m[name]['diff'] == pytest.approx(d, abs=1e-9), name
        assert m[name]['per_seed'] == pytest.approx(list(per_seed[:, j]), abs=1e-9), name
        assert m[name]['ci95'] == pytest.approx([d - half, d + half], abs=1e-9), name
        assert m[name]['p'] == pytest.approx(2 * stats.t.sf(abs(d) / se, s - 1), abs=1e-12), name


def test_seed_pairs_fold5_resample_inside_the_folds(folds_of_40):
    """The several-seed path with --fold5: the bootstrap variance comes from draws inside each fold.
    B better only on fold 0, by the same amount in every seed pair: nothing varies, se = 0, the
    interval is one point and p is 1 (no test statistic). Draws over the whole split would vary."""
    fold = folds_of_40
    n = 5 * fold
    a = np.zeros((n, 5 * n), np.float32)
    a[np.repeat(np.arange(n), 5), np.arange(5 * n)] = -1.0
    b = a.copy()
    b[np.repeat(np.arange(fold), 5), np.arange(5 * fold)] = 1.0
    m = significance.compare([a, a], [b, b], n_boot=100, seed=0, fold5=True)['metrics']['rsum']
    assert m['diff'] == pytest.approx(120.0) and m['ci95'] == pytest.approx([120.0, 120.0])
    assert m['p'] == 1.0
    whole = significance.compare([a, a], [b, b], n_boot=100, seed=0)['metrics']['rsum']
    assert whole['ci95'][1] - whole['ci95'][0] > 10


def test_identical_seed_pairs_give_zero_interval_and_p_one():
    a = [embeddings_sims(30, np.random.default_rng(s), 1.5) for s in range(3)]
    out = significance.compare(a, [x.copy() for x in a], n_boot=50, seed=0)
    for name, m in out['metrics'].items():
        assert m['diff'] == 0 and m['ci95'] == [0.0, 0.0] and m['p'] == 1.0, name
    assert out['seeds'] == 3 and out['bootstrap'] == 50


def test_several_seed_pairs_a_real_improvement_gets_a_small_p():
    rng = np.random.default_rng(19)
    latent = rng.standard_normal((120, 16))
    a = [model_sims(latent, rng, 1.6) for _ in range(3)]
    b = [model_sims(latent, rng, 0.9) for _ in range(3)]
    m = significance.compare(a, b, n_boot=200, seed=0)['metrics']['rsum']
    assert m['ci95'][0] > 0 and m['p'] < 0.05


def test_formatted_tables_state_the_method_of_each_path():
    a, b = two_models(30, 1)
    one = significance.format_compare(significance.compare(a, b, n_boot=30, seed=0))
    assert 'sign-flip permutation' in one and '30 paired bootstrap resamples' in one
    three = significance.format_compare(significance.compare([a] * 3, [b, a, b], n_boot=30, seed=0))
    assert "Student's t over the 3 seed pairs (2 degrees of freedom)" in three
    assert len(one.splitlines()) == 1 + 7 + 2 + 1
    text = significance.format_intervals(significance.intervals(a, n_boot=30), 'full')
    assert text.count('[') == 7 and '30 bootstrap resamples' in text


def test_mismatched_shapes_are_a_user_error():
    a = embeddings_sims(20, np.random.default_rng(0), 1.5)
    with pytest.raises(UserError, match='different shapes'):
        significance.compare(a, a[:10, :50])
    with pytest.raises(UserError, match='one of each per seed'):
        significance.compare([a, a], [a])


def run_python(code, cwd):
    import subprocess
    import sys
    done = subprocess.run([sys.executable, '-c', code], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_eval_sims_and_importing_eval_load_no_scipy(tmp_path):
    """scipy (0.6 s of eval.py's imports) is needed only by a several-seed --compare; the model and
    data modules only with --checkpoint."""
    import os
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    save_sims(tmp_path / 'a.npy', embeddings_sims(20, np.random.default_rng(0), 1.5))
    heavy = ['scipy', 'lib.significance', 'lib.inference', 'transformers']
    out = run_python(
        'import sys\n'
        f'sys.path.insert(0, {root!r})\n'
        f'loaded = lambda: [m for m in {heavy!r} if m in sys.modules]\n'
        'import eval\n'
        'print("import", loaded())\n'
        f'eval.main(["--sims", {str(tmp_path / "a.npy")!r}])\n'
        'print("sims", loaded())\n'
        f'eval.main(["--sims", {str(tmp_path / "a.npy")!r}, "--ci", "--bootstrap", "10"])\n'
        'print("ci", "scipy" in sys.modules)\n', root)
    lines = out.splitlines()
    assert 'import []' in lines and 'sims []' in lines and 'ci False' in lines, out
