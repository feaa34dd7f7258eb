"""tools/extract_features.py: a folder of images + captions -> the precomp layout train.py reads."""
import json
import os
import shutil

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train
from lib.text_model import DEMO_TEXT_MODEL
from tools import extract_features

# (file name, BGR colour, shape); sorted file-name order is the caption order
IMAGES = [('a_red.png', (0, 0, 230), 'circle'), ('b_green.png', (0, 200, 0), 'square'),
          ('c_blue.png', (230, 0, 0), 'circle'), ('d_yellow.png', (0, 230, 230), 'square'),
          ('e_white.png', (250, 250, 250), 'circle'), ('f_purple.png', (160, 30, 140), 'square')]
EXTRACT = ['--backbone', 'resnet18', '--weights', 'none', '--workers', '0', '--device', 'cpu']


def draw(colour, shape, h, w):
    image = np.full((h, w, 3), 40, np.uint8)
    if shape == 'circle':
        cv2.circle(image, (w // 2, h // 2), min(h, w) // 3, colour, -1)
    else:
        cv2.rectangle(image, (w // 4, h // 4), (3 * w // 4, 3 * h // 4), colour, -1)
    return image


def make_folder(folder, images=IMAGES):
    os.makedirs(folder, exist_ok=True)
    captions = []
    for n, (name, colour, shape) in enumerate(images):
        cv2.imwrite(os.path.join(folder, name), draw(colour, shape, 90 + 10 * n, 140 - 7 * n))
        colour_name = name.split('_')[1].split('.')[0]
        captions += [f'a {colour_name} {shape} number {k}' for k in range(5)]
    return captions


def write_lines(path, lines):
    with open(path, 'w') as f:
        f.write('\n'.join(lines) + '\n')


def read_lines(path):
    with open(path) as f:
        return f.read().splitlines()


@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp('own')
    captions = make_folder(root / 'images')
    write_lines(root / 'caps.txt', captions)
    out = root / 'data' / 'own_precomp'
    extract_features.main(['--images', str(root / 'images'), '--captions', str(root / 'caps.txt'),
                           '--out', str(out), '--split', 'test', '--batch_size', '4', *EXTRACT])
    return root, out, captions


def reference_regions(path):
    """Independent of the tool: torchvision's own PNG decoding (RGB), the weights' transform, the
    ResNet stages called by name, and 7x7 -> 6x6 adaptive pooling written as a 2x2 stride-1 average."""
    import torchvision
    torch.manual_seed(0)  # the tool's default --seed
    net = torchvision.models.resnet18(weights=None).eval()
    transform = torchvision.models.ResNet18_Weights.DEFAULT.transforms()
    x = transform(torchvision.io.read_image(str(path)))[None]
    with torch.no_grad():
        x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        x = net.layer4(net.layer3(net.layer2(net.layer1(x))))
        assert x.shape[-2:] == (7, 7)
        x = F.avg_pool2d(x, 2, stride=1)
    return x[0].permute(1, 2, 0).reshape(36, -1).numpy()


def test_layout_and_values_match_a_reference(shapes):
    root, out, captions = shapes
    feats = np.load(out / 'test_ims.npy')
    assert feats.shape == (len(IMAGES), 36, 512) and feats.dtype == np.float32
    assert np.isfinite(feats).all() and feats.min() >= 0  # post-ReLU, like BUTD features
    assert read_lines(out / 'test_caps.txt') == captions
    assert read_lines(out / 'test_images.txt') == [name for name, _, _ in IMAGES]
    for i in (0, 3, 5):  # in the first batch, the second one, and the last (partial) batch
        np.testing.assert_allclose(feats[i], reference_regions(root / 'images' / IMAGES[i][0]), rtol=1e-4, atol=1e-4)
    # the blue and the red image differ only by channel order: BGR must have become RGB
    assert not np.allclose(feats[0], feats[2], atol=1e-3)


def test_index_file_sets_the_order(shapes, tmp_path):
    root, out, captions = shapes
    order = [3, 0, 5]
    write_lines(tmp_path / 'index.txt', [IMAGES[i][0] for i in order])
    write_lines(tmp_path / 'caps.txt', [c for i in order for c in captions[5 * i:5 * i + 5]])
    extract_features.main(['--images', str(root / 'images'), '--captions', str(tmp_path / 'caps.txt'),
                           '--index', str(tmp_path / 'index.txt'), '--out', str(tmp_path / 'out'), *EXTRACT])
    reference = np.load(out / 'test_ims.npy')
    np.testing.assert_allclose(np.load(tmp_path / 'out' / 'test_ims.npy'), reference[order], rtol=1e-5, atol=1e-5)


def broken_folder(shapes, tmp_path):
    """The shapes folder plus a file that is no image, sorted third, with its own captions."""
    root, _, captions = shapes
    folder = tmp_path / 'images'
    shutil.copytree(root / 'images', folder)
    (folder / 'c_broken.png').write_bytes(b'this is not a PNG')
    broken_caps = [f'caption of the broken file {k}' for k in range(5)]
    # sorted order: a, b, c_blue, c_broken, d, e, f
    write_lines(tmp_path / 'caps.txt', captions[:15] + broken_caps + captions[15:])
    return folder


def test_unreadable_image_skipped_with_its_captions(shapes, tmp_path, capsys):
    _, out, captions = shapes
    folder = broken_folder(shapes, tmp_path)
    extract_features.main(['--images', str(folder), '--captions', str(tmp_path / 'caps.txt'), '--out',
                           str(tmp_path / 'out'), '--on_error', 'skip', '--batch_size', '2', *EXTRACT])
    assert 'c_broken.png' in capsys.readouterr().err
    # the broken file's rows and captions are gone; every other image keeps its own
    np.testing.assert_allclose(np.load(tmp_path / 'out' / 'test_ims.npy'), np.load(out / 'test_ims.npy'),
                               rtol=1e-5, atol=1e-5)
    assert read_lines(tmp_path / 'out' / 'test_caps.txt') == captions
    assert read_lines(tmp_path / 'out' / 'test_images.txt') == [name for name, _, _ in IMAGES]


def test_unreadable_image_fails_the_run_by_default(shapes, tmp_path, capsys):
    folder = broken_folder(shapes, tmp_path)
    with pytest.raises(SystemExit) as exc:
        extract_features.main(['--images', str(folder), '--captions', str(tmp_path / 'caps.txt'),
                               '--out', str(tmp_path / 'out'), *EXTRACT])
    assert exc.value.code == 2
    assert 'c_broken.png' in capsys.readouterr().err
    assert os.listdir(tmp_path / 'out') == []  # nothing half-written


def test_caption_count_must_be_five_per_image(shapes, tmp_path, capsys):
    root, _, captions = shapes
    write_lines(tmp_path / 'caps.txt', captions[:-1])
    with pytest.raises(SystemExit) as exc:
        extract_features.main(['--images', str(root / 'images'), '--captions', str(tmp_path / 'caps.txt'),
                               '--out', str(tmp_path / 'out'), *EXTRACT])
    assert exc.value.code == 2
    assert f'{len(captions) - 1} captions for {len(IMAGES)} images' in capsys.readouterr().err


def test_train_accepts_the_extracted_set(shapes, tmp_path):
    root, out, _ = shapes
    data = tmp_path / 'data'
    extract_features.main(['--images', str(root / 'images'), '--captions', str(root / 'caps.txt'),
                           '--out', str(data / 'own_precomp'), '--split', 'train', *EXTRACT])
    for split in ('dev', 'test'):
        for kind in ('ims.npy', 'caps.txt'):
            shutil.copy(out / f'test_{kind}', data / 'own_precomp' / f'{split}_{kind}')
    run = tmp_path / 'run'
    train.main(['--dataset', 'own', '--data_path', str(data), '--bert_path', DEMO_TEXT_MODEL,
                '--embed_size', '32', '--nhead', '4', '--batch_size', '8', '--num_epochs', '1', '--max_steps', '1',
                '--workers', '0', '--device', 'cpu', '--logger_name', str(run)])
    with open(run / 'results.json') as f:
        results = json.load(f)
    assert results['split'] == 'test' and results['results'][0]['n_images'] == len(IMAGES)
