"""search.py on a tiny model trained here: a gallery of coloured shapes whose captions name them."""
import json
import os
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

import search
import train
from conftest import ROOT, tiny_bert
from lib.models import load_model
from lib.text_model import DEMO_TEXT_MODEL

COLORS = {'red': (0, 0, 230), 'green': (0, 200, 0), 'blue': (230, 0, 0), 'yellow': (0, 230, 230)}  # BGR
SHAPES = ['circle', 'square', 'triangle']
PAIRS = [(c, s) for c in COLORS for s in SHAPES]  # image i shows PAIRS[i]
TEMPLATES = ['a {c} {s}', 'a picture of a {c} {s}', 'a {s} that is {c}', 'one {c} {s} on a plain background',
             'the {s} is {c}']
QUERY_IMAGE = PAIRS.index(('green', 'triangle'))


def region_features(seed=0, regions=4, dim=32):
    """Each image's regions: its colour's and its shape's prototype plus noise (post-ReLU)."""
    rng = np.random.default_rng(seed)
    colour, shape = rng.standard_normal((len(COLORS), dim)), rng.standard_normal((len(SHAPES), dim))
    c = [list(COLORS).index(p[0]) for p in PAIRS]
    s = [SHAPES.index(p[1]) for p in PAIRS]
    noise = 0.3 * rng.standard_normal((len(PAIRS), regions, dim))
    return np.maximum(colour[c][:, None] + shape[s][:, None] + noise, 0).astype(np.float32)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A run trained on the gallery itself (train = dev = test), with a tiny random BERT that uses
    the MiniLM vocabulary (the real MiniLM needs minutes of CPU for the same steps)."""
    root = tmp_path_factory.mktemp('search')
    folder = root / 'data' / 'toy_precomp'
    folder.mkdir(parents=True)
    captions = [t.format(c=c, s=s) for c, s in PAIRS for t in TEMPLATES]
    for split in ('train', 'dev', 'test'):
        np.save(folder / f'{split}_ims.npy', region_features())
        (folder / f'{split}_caps.txt').write_text('\n'.join(captions) + '\n')
    bert = root / 'bert'
    tiny_bert().save_pretrained(bert)
    shutil.copy(os.path.join(DEMO_TEXT_MODEL, 'vocab.txt'), bert)
    images = root / 'images'  # the gallery's pictures, sorted file-name order = split order
    images.mkdir()
    for i, (c, s) in enumerate(PAIRS):
        cv2.imwrite(str(images / f'{i:02d}_{c}_{s}.png'), np.full((60 + 5 * i, 90 - 3 * i, 3), COLORS[c], np.uint8))
    train.main(['--dataset', 'toy', '--data_path', str(root / 'data'), '--bert_path', str(bert),
                '--embed_size', '32', '--nhead', '4', '--batch_size', '12', '--num_epochs', '6',
                '--lr_schedules', '100', '--learning_rate', '2e-3', '--bert_lr_factor', '1', '--warmup', '1000',
                '--text_augment', '0', '--size_augment', '0', '--workers', '0', '--device', 'cpu',
                '--logger_name', str(root / 'run')])
    return root, root / 'run' / 'model_best.pth', captions


def run_search(capsys, checkpoint, *extra):
    doc = search.main(['--checkpoint', str(checkpoint), '--json', '--device', 'cpu', *extra])
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(json.dumps(doc))  # stdout holds exactly one JSON document
    return printed


def reference_scores(checkpoint, query, feats):
    """Cosine scores computed without search.py: the model's encoders on the raw arrays, the
    query tokenised by the tokenizer's own [CLS] ... [SEP] path."""
    model, _, tokenizer, _ = load_model(str(checkpoint), torch.device('cpu'))
    with torch.no_grad():
        x = torch.from_numpy(feats)
        img, _ = model.encode_image(x, torch.full((len(x),), x.shape[1]))
        ids = tokenizer(query, return_tensors='pt')['input_ids']
        txt, _ = model.encode_text(ids, torch.tensor([ids.shape[1]]))
    return (img @ txt[0]).numpy()


def test_text_query_finds_its_image_first(trained, capsys):
    root, checkpoint, captions = trained
    doc = run_search(capsys, checkpoint, '--query', 'a green triangle', '--k', '3')
    assert doc['mode'] == 'text' and doc['split'] == 'test' and doc['n_images'] == len(PAIRS)
    first = doc['results'][0]
    assert first['image'] == QUERY_IMAGE and first['rank'] == 1
    assert first['captions'] == captions[5 * QUERY_IMAGE:5 * QUERY_IMAGE + 5]
    expected = reference_scores(checkpoint, 'a green triangle', region_features())
    order = np.argsort(-expected, kind='stable')[:3]
    assert [r['image'] for r in doc['results']] == order.tolist()
    np.testing.assert_allclose([r['score'] for r in doc['results']], expected[order], atol=1e-5)


def test_image_query_finds_its_own_captions(trained, capsys):
    _, checkpoint, captions = trained
    doc = run_search(capsys, checkpoint, '--image', str(QUERY_IMAGE), '--k', '6')
    first = doc['results'][0]
    assert first['ground_truth'] and first['image'] == QUERY_IMAGE
    assert first['text'] == captions[first['caption']] and first['caption'] // 5 == QUERY_IMAGE
    assert [r['score'] for r in doc['results']] == sorted((r['score'] for r in doc['results']), reverse=True)


def test_cache_is_reused_and_never_stale(trained, capsys, monkeypatch, tmp_path):
    root, checkpoint, _ = trained
    run = tmp_path / 'run'
    shutil.copytree(checkpoint.parent, run)  # a private copy: this test rewrites the gallery
    data = tmp_path / 'data'
    shutil.copytree(root / 'data', data)
    ckpt = run / 'model_best.pth'
    args = ['--query', 'a green triangle', '--data_path', str(data)]
    run_search(capsys, ckpt, *args)
    assert os.path.isfile(search.cache_file(str(ckpt), 'toy', 'test'))

    calls = []
    real_encode = search.encode_images
    monkeypatch.setattr(search, 'encode_images', lambda *a, **k: calls.append(1) or real_encode(*a, **k))
    assert run_search(capsys, ckpt, *args)['results'][0]['image'] == QUERY_IMAGE
    assert calls == []  # served from the cache

    # the gallery changes (same size, images in reverse order): the cache must not be used
    reversed_feats = region_features()[::-1].copy()
    np.save(data / 'toy_precomp' / 'test_ims.npy', reversed_feats)
    doc = run_search(capsys, ckpt, *args)
    assert calls == [1]
    assert doc['results'][0]['image'] == len(PAIRS) - 1 - QUERY_IMAGE

    # a new checkpoint file in the same place (newer time stamp) is re-encoded too
    stat = os.stat(ckpt)
    os.utime(ckpt, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    run_search(capsys, ckpt, *args)
    assert calls == [1, 1]


def test_contact_sheet(trained, capsys, tmp_path):
    root, checkpoint, _ = trained
    sheet_path = tmp_path / 'sheet.png'
    k, thumb = 3, 96
    doc = run_search(capsys, checkpoint, '--query', 'a green triangle', '--k', str(k), '--image_dir',
                     str(root / 'images'), '--sheet', str(sheet_path), '--thumb', str(thumb))
    assert doc['sheet'] == str(sheet_path)
    default = run_search(capsys, checkpoint, '--query', 'a green triangle', '--image_dir', str(root / 'images'))
    assert default['sheet'] == os.path.join(os.path.dirname(checkpoint), 'contact_sheet.png')  # next to the model
    assert os.path.isfile(default['sheet'])
    assert doc['results'][0]['file'] == f'{QUERY_IMAGE:02d}_green_triangle.png'
    sheet = cv2.imread(str(sheet_path))
    header = search.MARGIN + search.LINE_H  # one line of query text
    assert sheet.shape == (header + search.MARGIN + thumb + search.LABEL_H, k * (thumb + search.MARGIN) + search.MARGIN, 3)
    # each thumbnail cell shows its image: the centre pixel has the colour of the ranked image
    for j, r in enumerate(doc['results']):
        x = search.MARGIN + j * (thumb + search.MARGIN) + thumb // 2
        y = header + search.MARGIN + thumb // 2
        colour = PAIRS[r['image']][0]
        np.testing.assert_allclose(sheet[y, x], COLORS[colour], atol=2)


def test_command_line_json(trained):
    _, checkpoint, _ = trained
    proc = subprocess.run([sys.executable, 'search.py', '--checkpoint', str(checkpoint), '--query', 'a red circle',
                           '--k', '2', '--json', '--device', 'cpu'], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc['results'][0]['image'] == PAIRS.index(('red', 'circle')) and len(doc['results']) == 2


def test_image_index_outside_the_gallery(trained, capsys):
    _, checkpoint, _ = trained
    with pytest.raises(SystemExit) as exc:
        search.main(['--checkpoint', str(checkpoint), '--image', str(len(PAIRS)), '--device', 'cpu'])
    assert exc.value.code == 2 and '--image 12' in capsys.readouterr().err
