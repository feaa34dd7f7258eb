"""lib/extended_metrics.py: the eccv-caption package's metrics on our matrices. Its COCO 5K / 1K
R@K must be our protocol's; a matrix that puts every ECCV positive first must score mAP@R 100
(up to the two ECCV positives that are not among the 25,000 test captions); ids files are checked."""
import json

import numpy as np
import pytest
import torch

from lib import extended_metrics as ext
from lib.errors import UserError
from lib.metrics import evaluate_sims
from lib.sims_file import save_sims


@pytest.fixture(scope='module')
def random_5k():
    """A random 5000 x 25000 matrix with some signal on the own captions (no ties)."""
    rng = np.random.default_rng(0)
    sims = rng.random((5000, 25000), dtype=np.float32)
    own = np.arange(25000)
    sims[own // 5, own] += 0.6 * rng.random(25000, dtype=np.float32)
    return sims


@pytest.fixture(scope='module')
def extended_5k(random_5k):
    return ext.extended_metrics(random_5k)


def test_package_coco_recalls_equal_ours(random_5k, extended_5k):
    ours = evaluate_sims(random_5k, fold5=True)
    full, mean = ours[0], ours[-1]
    assert 5 < full['i2t']['r1'] < 95 and 5 < full['t2i']['r10'] < 95  # neither trivial nor hopeless
    for k in (1, 5, 10):
        for side in ('i2t', 't2i'):
            assert extended_5k[f'coco_5k_r{k}'][side] == pytest.approx(full[side][f'r{k}'], abs=1e-9), (k, side)
            assert extended_5k[f'coco_1k_r{k}'][side] == pytest.approx(mean[side][f'r{k}'], abs=1e-9), (k, side)


def test_keys_are_the_package_names_in_percent(extended_5k):
    assert set(extended_5k) == set(ext.KEYS)
    for key, v in extended_5k.items():
        assert set(v) == {'i2t', 't2i'} and all(0 <= x <= 100 for x in v.values()), key
    assert extended_5k['cxc_r1']['i2t'] <= extended_5k['cxc_r5']['i2t'] <= extended_5k['cxc_r10']['i2t']


def perfect_sims(direction):
    """A matrix where every ECCV positive of each query of `direction` scores above everything else."""
    m = ext.package_metrics()
    caption_ids, image_ids = ext.package_ids()
    cap_index = {int(c): j for j, c in enumerate(caption_ids)}
    img_index = {int(i): j for j, i in enumerate(image_ids)}
    sims = np.random.default_rng(1).random((5000, 25000), dtype=np.float32)
    for query, positives in m.eccv_gts[direction].items():
        if direction == 'i2t':
            cols = [cap_index[c] for c in positives if c in cap_index]
            sims[img_index[query], cols] += 2.0
        else:
            rows = [img_index[i] for i in positives if i in img_index]
            sims[rows, cap_index[query]] += 2.0
    return sims


def test_map_at_r_is_100_when_every_positive_ranks_first():
    m = ext.package_metrics()
    caption_ids, _ = ext.package_ids()
    known = set(caption_ids.tolist())
    t2i = ext.extended_metrics(perfect_sims('t2i'))
    assert t2i['eccv_map_at_r']['t2i'] == pytest.approx(100.0)
    assert t2i['eccv_rprecision']['t2i'] == pytest.approx(100.0)
    assert t2i['eccv_r1']['t2i'] == pytest.approx(100.0)
    i2t = ext.extended_metrics(perfect_sims('i2t'))
    # a query whose R positives include a caption outside the test split has at most R - 1 of them
    # in its top R: precision 1 at ranks 1..R-1 and a miss at R, so AP@R = (R - 1) / R
    per_query = [1.0 if set(p) <= known else (len(set(p)) - 1) / len(set(p)) for p in m.eccv_gts['i2t'].values()]
    assert sum(q < 1 for q in per_query) == 2
    assert i2t['eccv_map_at_r']['i2t'] == pytest.approx(100.0 * np.mean(per_query))
    assert i2t['eccv_r1']['i2t'] == pytest.approx(100.0)


def test_only_the_needed_top_is_passed(random_5k):
    i2t, t2i, i2t_1k, t2i_1k = ext.retrieved_items(random_5k[:, :])
    m = ext.package_metrics()
    assert len(i2t) == 5000 and len(t2i) == 25000 and len(i2t_1k) == 5000 and len(t2i_1k) == 25000
    assert max(map(len, i2t.values())) == max(len(set(v)) for v in m.eccv_gts['i2t'].values()) < 100
    assert min(map(len, i2t.values())) == 10 and {len(v) for v in t2i_1k.values()} == {10}
    caption_ids, image_ids = ext.package_ids()
    first = int(np.argmax(random_5k[0]))
    assert i2t[int(image_ids[0])][0] == caption_ids[first]


def test_other_shapes_are_refused():
    with pytest.raises(UserError, match=r'5000 x 25000.*\(1000, 5000\)'):
        ext.extended_metrics(np.zeros((1000, 5000), np.float32))


def write_ids(folder, name, ids):
    folder.mkdir(exist_ok=True)
    (folder / name).write_text(''.join(f'{i}\n' for i in ids))


def test_ids_files_are_checked(tmp_path):
    caption_ids, image_ids = ext.package_ids()
    assert ext.check_split_ids(str(tmp_path)) == []  # none present: the Karpathy order is assumed
    write_ids(tmp_path, 'testall_ids.txt', np.repeat(image_ids, 5))
    write_ids(tmp_path, 'testall_capids.txt', caption_ids)
    assert len(ext.check_split_ids(str(tmp_path))) == 2
    swapped = caption_ids.copy()
    swapped[[7, 12]] = swapped[[12, 7]]
    write_ids(tmp_path, 'testall_capids.txt', swapped)
    with pytest.raises(UserError, match=r'testall_capids.txt line 8: caption id .*2 lines differ'):
        ext.check_split_ids(str(tmp_path))
    write_ids(tmp_path, 'testall_capids.txt', caption_ids)
    write_ids(tmp_path, 'testall_ids.txt', np.repeat(image_ids, 5)[:100])
    with pytest.raises(UserError, match='has 100 ids'):
        ext.check_split_ids(str(tmp_path))
    (tmp_path / 'testall_ids.txt').write_text('12\nabc\n')
    with pytest.raises(UserError, match='not one integer id per line'):
        ext.check_split_ids(str(tmp_path))


def test_eval_eccv_cli(tmp_path, capsys, random_5k, extended_5k):
    import eval as eval_script
    save_sims(tmp_path / 'coco.npy', random_5k)
    eval_script.main(['--sims', str(tmp_path / 'coco.npy'), '--eccv', '--json', str(tmp_path / 'r.json')])
    assert 'ECCV mAP@R' in capsys.readouterr().out
    doc = json.loads((tmp_path / 'r.json').read_text())
    assert doc['extended'] == extended_5k
    save_sims(tmp_path / 'f30k.npy', random_5k[:1000, :5000])
    with pytest.raises(SystemExit) as err:
        eval_script.main(['--sims', str(tmp_path / 'f30k.npy'), '--eccv'])
    assert err.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and 'f30k.npy has shape (1000, 5000)' in lines[0]


def test_torch_topk_order_is_the_ranking():
    row = torch.tensor([[0.1, 0.9, 0.5, 0.7]])
    assert ext._top(row, 3).tolist() == [[1, 3, 2]]
