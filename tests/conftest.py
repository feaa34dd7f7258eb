"""Shared fixtures: the repository on sys.path (plain `pytest` works too), the real MiniLM
tokenizer, a tiny random BERT and tiny training options."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@pytest.fixture(scope='session', autouse=True)
def private_token_cache(tmp_path_factory):
    """The token cache's default folder ($XDG_CACHE_HOME/hrem/tokens) in a temporary folder: tests
    that train on large splits (tests/test_coco.py) leave nothing in the user's ~/.cache."""
    saved = os.environ.get('XDG_CACHE_HOME')
    os.environ['XDG_CACHE_HOME'] = str(tmp_path_factory.mktemp('xdg_cache'))
    yield
    if saved is None:
        os.environ.pop('XDG_CACHE_HOME', None)
    else:
        os.environ['XDG_CACHE_HOME'] = saved


@pytest.fixture(scope='session')
def tokenizer():
    from lib.text_model import DEMO_TEXT_MODEL, load_tokenizer
    return load_tokenizer(DEMO_TEXT_MODEL)


def tiny_bert(hidden=32, seed=0):
    """A randomly initialised 1-layer BERT (real uncased vocabulary size, no dropout)."""
    from transformers import BertConfig, BertModel
    torch.manual_seed(seed)
    return BertModel(BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=1,
                                num_attention_heads=2, intermediate_size=2 * hidden,
                                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def tiny_args(*extra):
    """Training options of the demo profile with a tiny embedding (and any extra CLI options)."""
    import arguments
    return arguments.parse_train_args(['--embed_size', '32', '--nhead', '4', *extra])


def write_precomp(data_path, dataset, split, n_images, captions, regions=4, dim=8, seed=0):
    """Write <data_path>/<dataset>_precomp/<split>_{ims.npy,caps.txt}; returns the features."""
    import numpy as np
    folder = os.path.join(str(data_path), f'{dataset}_precomp')
    os.makedirs(folder, exist_ok=True)
    feats = np.random.default_rng(seed).random((n_images, regions, dim), dtype=np.float32)
    np.save(os.path.join(folder, f'{split}_ims.npy'), feats)
    with open(os.path.join(folder, f'{split}_caps.txt'), 'w') as f:
        f.write('\n'.join(captions) + '\n')
    return feats


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` need a GPU: skipped where torch sees none (the CPU suite is unchanged)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason='needs a CUDA GPU (run bash bench/gpu_check.sh on a GPU machine)')
    for item in items:
        if item.get_closest_marker('cuda'):
            item.add_marker(skip)


@pytest.fixture
def one_thread():
    """Tiny tensors gain nothing from threads; on a busy machine they only make steps wait."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
