"""lib/api.py and its page: docs/python_api.md's code, run as written, gives the similarities
eval.py writes for the same checkpoint (and those the version that wrote the checkpoint gave)."""
import os
import re
import shutil

import numpy as np
import pytest
import torch

import eval as eval_script
from lib import checkpoint as ckpt_lib
from lib.api import Matcher
from lib.errors import UserError
from lib.sims_file import load_sims

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, 'tests', 'fixtures', 'ckpt_5f4dd7a')  # written by 5f4dd7a (tests/fixtures/.../make.py)
PAGE = os.path.join(ROOT, 'docs', 'python_api.md')


def page_code():
    blocks = re.findall(r'```python\n(.*?)```', open(PAGE).read(), flags=re.S)
    assert len(blocks) == 1, 'docs/python_api.md should hold one python block'
    return blocks[0]


@pytest.fixture
def layout(tmp_path, monkeypatch):
    """The paths the page names, in a temporary folder: the fixture's checkpoint as
    runs/f30k/model_best.pth (its text model folder where it is on this machine) and its test split
    as data/f30k_precomp."""
    ckpt = ckpt_lib.read_checkpoint(os.path.join(FIXTURE, 'model_best.pth'))
    ckpt['config']['bert_path'] = os.path.join(FIXTURE, 'text_model')
    os.makedirs(tmp_path / 'runs' / 'f30k')
    ckpt_lib.save_atomic(ckpt, str(tmp_path / 'runs' / 'f30k' / 'model_best.pth'))
    os.makedirs(tmp_path / 'data' / 'f30k_precomp')
    for name in ('test_ims.npy', 'test_caps.txt'):
        shutil.copy(os.path.join(FIXTURE, 'data', 'tiny_precomp', name), tmp_path / 'data' / 'f30k_precomp' / name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_page():
    namespace = {}
    exec(compile(page_code(), PAGE, 'exec'), namespace)
    return namespace


def test_the_page_s_code_gives_eval_py_s_similarities(layout, capsys):
    page = run_page()
    printed = capsys.readouterr().out.strip()
    eval_script.main(['--checkpoint', 'runs/f30k/model_best.pth', '--data_path', 'data', '--dataset', 'f30k',
                      '--split', 'test', '--save_sims', 'eval_sims.npy', '--cache_dir', 'none'])
    sims = page['sims']
    assert sims.shape == (8, 40) and sims.dtype == np.float32
    assert np.array_equal(sims, load_sims('eval_sims.npy'))
    # the record of the version that wrote the checkpoint (its own eval.py)
    assert np.array_equal(sims, load_sims(os.path.join(FIXTURE, 'sims_5f4dd7a.npy')))
    # top_k: the k largest of each row, best first (the tiny split repeats captions: ties in any order)
    for matrix, scores, best in ((sims, None, page['best']), (sims.T, page['scores'], page['best_images'])):
        want = -np.sort(-matrix, axis=1)[:, :5]
        assert np.array_equal(np.take_along_axis(matrix, best, 1), want)
        assert all(len(set(row)) == 5 for row in best)
        if scores is not None:
            assert np.array_equal(scores, want)
    best_caption = {page['captions'][c] for c in np.flatnonzero(sims[0] == sims[0].max())}
    assert printed in best_caption


def test_padded_regions_and_one_caption_encode_as_alone(layout):
    """lengths: an image padded with junk regions encodes as the image without them; a caption
    alone as inside a list."""
    matcher = Matcher.load('runs/f30k/model_best.pth', 'cpu')
    regions = np.load('data/f30k_precomp/test_ims.npy')[:3]                  # (3, 6, D), every region valid
    captions = open('data/f30k_precomp/test_caps.txt').read().splitlines()[:4]
    padded = np.concatenate([regions, np.full((3, 4, regions.shape[2]), 7.0, np.float32)], axis=1)
    assert np.allclose(matcher.encode_images(padded, lengths=[6, 6, 6]), matcher.encode_images(regions), atol=1e-6)
    short = matcher.encode_images(regions[:1, :4])                            # image 0 with its first 4 regions
    assert np.allclose(matcher.encode_images(padded[:1], lengths=[4]), short, atol=1e-6)
    assert not np.allclose(matcher.encode_images(padded[:1]), short, atol=1e-3)  # the junk counts without lengths
    emb = matcher.encode_captions(captions)
    assert np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    assert np.allclose(matcher.encode_captions(captions[2]), emb[2:3], atol=1e-6)


def test_an_exported_folder_gives_the_same_similarities(layout):
    from tools import convert_checkpoint
    convert_checkpoint.main(['runs/f30k/model_best.pth', 'exported', '--to', 'safetensors'])
    regions = np.load('data/f30k_precomp/test_ims.npy')
    captions = open('data/f30k_precomp/test_caps.txt').read().splitlines()
    sims = [m.similarities(m.encode_images(regions), m.encode_captions(captions))
            for m in (Matcher.load('runs/f30k/model_best.pth', 'cpu'), Matcher.load('exported', 'cpu'))]
    assert np.array_equal(*sims)


def test_mistakes_are_user_errors(layout):
    matcher = Matcher.load('runs/f30k/model_best.pth', torch.device('cpu'))
    with pytest.raises(UserError, match='regions must be'):
        matcher.encode_images(np.zeros((2, 3, matcher.img_dim + 1), np.float32))
    with pytest.raises(UserError, match='lengths must'):
        matcher.encode_images(np.zeros((2, 3, matcher.img_dim), np.float32), lengths=[3, 4])
    with pytest.raises(UserError, match='k must be'):
        matcher.top_k(np.zeros((2, 3), np.float32), k=4)
