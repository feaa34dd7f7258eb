"""tools/plot_relations.py: the heatmaps show exactly the connection and relevance the trained
relation module computes on the batch, and the figure is written (with thumbnails when the
split's images are given)."""
import json
import os
import time

import cv2
import numpy as np
import pytest
import torch
from transformers import BertModel

import train
from lib.models import HREM, HREMConfig
from lib.text_model import load_tokenizer
from test_errors import bert_folder, make_data, precomp, run_main, train_argv
from tools import plot_relations, results_table

EVAL_IMAGES = 8


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A tiny run whose relation module trained for a few steps (relations on from step 2)."""
    root = tmp_path_factory.mktemp('relations')
    make_data(root, eval_images=EVAL_IMAGES)
    bert = bert_folder(root / 'bert')
    before = time.time()
    train.main(train_argv(root, bert, 'run', '--warmup', '2', '--seed', '1'))
    return root, bert, str(root / 'run' / 'model_best.pth'), time.time() - before


def reference_graph(ckpt_path, bert, ims_path, caps_path, images, captions):
    """Direct route: a model built by hand from the checkpoint's state dicts, captions tokenised
    by the tokenizer itself ([CLS] ... [SEP], zero padding), then relations() once."""
    ckpt = torch.load(ckpt_path, weights_only=True)
    config = HREMConfig(**ckpt['config'])
    model = HREM(config, BertModel.from_pretrained(bert))
    for part in ('img_enc', 'txt_enc', 'relation'):
        getattr(model, part).load_state_dict(ckpt['model'][part])
    model.eval()
    lines = open(caps_path).read().splitlines()
    enc = load_tokenizer(bert)([lines[c] for c in captions], padding=True, return_tensors='pt')
    regions = torch.from_numpy(np.load(ims_path)[images])
    with torch.no_grad():
        img, local = model.encode_image(regions, torch.full((len(images),), regions.shape[1]))
        lengths = enc['attention_mask'].sum(1)
        cap, words = model.encode_text(enc['input_ids'], lengths)
        connect, relevance, _ = model.relation.relations(img, cap, local, words, lengths)
    return connect.numpy(), relevance.numpy()


def test_heatmaps_show_the_module_s_matrices(trained, tmp_path):
    root, bert, ckpt, _ = trained
    out = tmp_path / 'figs' / 'relations.png'
    graph, images, captions = plot_relations.main(['--checkpoint', ckpt, '--out', str(out), '--batch_size', '4',
                                                   '--batch_index', '1', '--examples', '0', '3'])
    assert list(images) == [4, 5, 6, 7] and list(captions) == [20, 25, 30, 35]
    connect, relevance = reference_graph(ckpt, bert, precomp(root, 'test_ims.npy'), precomp(root, 'test_caps.txt'),
                                         images, captions)
    fig = plot_relations.draw(graph, ['caption'] * 4, images, [0, 3])
    shown = {ax.get_label(): ax.images[0].get_array() for ax in fig.axes if ax.images}
    b = 4
    blocks = {'image-image': (slice(0, b), slice(0, b)), 'image-text': (slice(0, b), slice(b, 2 * b)),
              'text-image': (slice(b, 2 * b), slice(0, b)), 'text-text': (slice(b, 2 * b), slice(b, 2 * b))}
    for name, (rows, cols) in blocks.items():
        np.testing.assert_array_equal(shown[f'connect/{name}'], connect[rows, cols])
        np.testing.assert_allclose(shown[f'relevance/{name}'], relevance[rows, cols], rtol=1e-5, atol=1e-6)
    # blocks that are compared share a colour scale: intra-modal (0, 1], cross-modal the range of both
    clim = {ax.get_label(): ax.images[0].get_clim() for ax in fig.axes if ax.images}
    assert clim['relevance/image-image'] == clim['relevance/text-text'] == (0, 1)
    cross = np.concatenate([relevance[:b, b:].ravel(), relevance[b:, :b].ravel()])
    np.testing.assert_allclose(clim['relevance/image-text'], (cross.min(), cross.max()), rtol=1e-5)
    assert clim['relevance/image-text'] == clim['relevance/text-image']
    # the threshold keeps int(4 * 0.5) = 2 connections per row in every block
    assert (connect.reshape(2, b, 2, b).sum(3) >= 2).all()
    image = cv2.imread(str(out))
    assert image is not None and image.std() > 10


def test_default_output_is_next_to_the_checkpoint(trained):
    _, _, ckpt, _ = trained
    plot_relations.main(['--checkpoint', ckpt, '--batch_size', '4', '--examples', '0'])
    assert cv2.imread(os.path.join(os.path.dirname(ckpt), 'relations.png')) is not None


def test_pick_batch_consecutive_and_seeded(trained):
    root, bert, _, _ = trained
    split = plot_relations.PrecompSplit(str(root), 'tiny', 'test', load_tokenizer(bert))
    images, captions = plot_relations.pick_batch(split, 3, batch_index=1)
    assert list(images) == [3, 4, 5] and list(captions) == [15, 20, 25]
    images, captions = plot_relations.pick_batch(split, 4, seed=7)
    assert len(set(images)) == 4 and all(c // 5 == i for i, c in zip(images, captions))


def test_thumbnails_from_image_dir(trained, tmp_path):
    _, _, ckpt, _ = trained
    folder = tmp_path / 'images'
    folder.mkdir()
    for i in range(EVAL_IMAGES):  # sorted file-name order is the split's order
        cv2.imwrite(str(folder / f'{i:02d}.png'), np.full((20, 30, 3), 30 * i, np.uint8))
    out = tmp_path / 'thumbs.png'
    plot_relations.main(['--checkpoint', ckpt, '--out', str(out), '--batch_size', '8', '--examples', '1',
                         '--image_dir', str(folder), '--k', '2'])
    assert cv2.imread(str(out)) is not None


def test_authors_checkpoint_is_refused(trained, tmp_path, capsys):
    from lib import checkpoint as ckpt_lib
    _, _, ckpt, _ = trained
    theirs = tmp_path / 'authors.pth'
    torch.save(ckpt_lib.to_authors(ckpt_lib.read_checkpoint(ckpt)), theirs)
    code, err = run_main(plot_relations.main, ['--checkpoint', str(theirs), '--out', str(tmp_path / 'x.png')], capsys)
    assert code == 2 and 'holds no relation module' in err and not os.path.exists(tmp_path / 'x.png')


def test_results_json_records_the_wall_time_and_the_table_reads_it(trained, capsys):
    root, _, _, elapsed = trained
    doc = json.loads((root / 'run' / 'results.json').read_text())
    assert 0 < doc['wall_time_s'] <= elapsed + 0.1  # train.main's own span, inside the test's
    results_table.main([str(root / 'run'), '--json'])
    (row,) = json.loads(capsys.readouterr().out)
    assert row['results'] == doc['results'] and row['wall_time_s'] == doc['wall_time_s']
    assert row['epoch'] == doc['epoch'] == 1
