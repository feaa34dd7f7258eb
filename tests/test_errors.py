"""Bad input gets one clear message (the file, what is wrong, the fix), exit status 2, no traceback.

The helpers at the top (tiny precomp data, a tiny BERT folder, running an entry point) are also
used by test_resume.py, test_faults.py and test_security.py.
"""
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import arguments
import eval as eval_script
import train
from lib import checkpoint as ckpt_lib
from lib.models import HREM, config_from_args
from lib.optim import build_optimizer
from lib.text_model import DEMO_TEXT_MODEL, load_text_backbone
from conftest import tiny_bert as tiny_bert_model, write_precomp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ['red', 'blue', 'dog', 'cat', 'man', 'boat', 'park', 'beach', 'runs', 'sits', 'a', 'the']
DIM = 16


# ----------------------------------------------------------------------------- helpers

def write_split(root, split, n_images, images=None, captions=None, dim=DIM, seed=0):
    """<root>/tiny_precomp/<split>_{ims.npy,caps.txt}; random unless images / captions are given."""
    if captions is None:
        rng = np.random.default_rng(seed)
        captions = [' '.join(rng.choice(WORDS, 5)) for _ in range(5 * n_images)]
    write_precomp(root, 'tiny', split, n_images, captions, dim=dim, seed=seed)
    if images is not None:
        np.save(precomp(root, f'{split}_ims.npy'), images)


def make_data(root, train_images=4, eval_images=4):
    """<root>/tiny_precomp with train, dev and test splits (five captions per image)."""
    for seed, (split, n) in enumerate([('train', train_images), ('dev', eval_images), ('test', eval_images)]):
        write_split(root, split, n, seed=seed)


def precomp(root, name):
    return os.path.join(str(root), 'tiny_precomp', name)


def bert_folder(folder, hidden=32):
    """A BERT folder (config, weights, the real uncased vocabulary) small enough for a test."""
    os.makedirs(folder, exist_ok=True)
    shutil.copy(os.path.join(DEMO_TEXT_MODEL, 'vocab.txt'), folder)
    tiny_bert_model(hidden).save_pretrained(folder)
    return str(folder)


def train_argv(root, bert, run='run', *extra):
    """Tiny CPU training options: 4 images x 5 captions, batch 4 -> 5 steps per epoch."""
    return ['--data_path', str(root), '--dataset', 'tiny', '--bert_path', bert, '--embed_size', '32',
            '--nhead', '4', '--batch_size', '4', '--workers', '0', '--device', 'cpu', '--num_epochs', '1',
            '--eval_batch_size', '8', '--logger_name', os.path.join(str(root), run), *extra]


def save_checkpoint(path, root, bert, embed_size=32, img_dim=DIM, resumable=False):
    """An untrained model's checkpoint in this project's format (enough for evaluation; with
    resumable, also optimizer and schedule state)."""
    args = arguments.parse_train_args(train_argv(root, bert, 'run', '--embed_size', str(embed_size)))
    model = HREM(config_from_args(args, img_dim), load_text_backbone(bert, pretrained=False))
    optim = build_optimizer(model, args) if resumable else ()
    torch.save(ckpt_lib.make_checkpoint(model, args, 1, 5, 0.0, *optim), path)
    return str(path)


def run_main(main, argv, capsys):
    """Call an entry point in-process; return (exit status, stderr)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(argv)
    return exc.value.code, capsys.readouterr().err


def run_script(script, argv, env=None, timeout=300):
    """Run `python <script> ...` from the repository root; return (exit status, stderr)."""
    proc = subprocess.run([sys.executable, script, *argv], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, 'HF_HUB_OFFLINE': '1', **(env or {})}, timeout=timeout)
    return proc.returncode, proc.stderr


def assert_user_error(code, err, *fragments):
    """Exit status 2, no traceback, and a last line `error: ...` that holds every fragment."""
    assert code == 2, err
    assert 'Traceback' not in err, err
    last = err.strip().splitlines()[-1]
    assert re.match(r'(\S+\.py: )?error: ', last), err  # ours, or argparse's `train.py: error: ...`
    for fragment in fragments:
        assert fragment in last, (fragment, last)
    return last


@pytest.fixture(scope='module')
def bert(tmp_path_factory):
    return bert_folder(tmp_path_factory.mktemp('bert'))


@pytest.fixture
def data(tmp_path):
    make_data(tmp_path)
    return tmp_path


# ----------------------------------------------------------------------------- data files

def test_missing_data_folder_subprocess(tmp_path, bert):
    missing = tmp_path / 'nowhere'
    code, err = run_script('train.py', train_argv(missing, bert))
    assert_user_error(code, err, f'data folder {missing / "tiny_precomp"} does not exist',
                      '--data_path', '--dataset')
    assert not os.path.exists(missing / 'run')


def test_missing_split_file(data, bert, capsys):
    os.unlink(precomp(data, 'dev_caps.txt'))
    code, err = run_main(train.main, train_argv(data, bert), capsys)
    assert_user_error(code, err, f'missing caption file {precomp(data, "dev_caps.txt")}', 'precomp layout')
    os.unlink(precomp(data, 'test_ims.npy'))
    os.unlink(precomp(data, 'dev_ims.npy'))
    code, err = run_main(train.main, train_argv(data, bert), capsys)
    assert_user_error(code, err, f'missing feature file {precomp(data, "dev_ims.npy")}')
    assert not os.path.exists(data / 'run'), 'validated before the run folder is created'


def test_caption_count_neither_equal_nor_five_times(data, bert, capsys):
    write_split(data, 'dev', 4, captions=['a red dog'] * 7)
    code, err = run_main(train.main, train_argv(data, bert), capsys)
    assert_user_error(code, err, f'{precomp(data, "dev_caps.txt")}: 20 = 5 x 4 images expected',
                      'or 4, one each), 7 found', 'take the caption file from the same archive as the features')


@pytest.mark.parametrize('blank', ['', '   \t '])
def test_empty_or_whitespace_caption_line(data, bert, capsys, blank):
    captions = ['a red dog'] * 20
    captions[2] = blank
    write_split(data, 'test', 4, captions=captions)
    code, err = run_main(train.main, train_argv(data, bert), capsys)
    assert_user_error(code, err, f'{precomp(data, "test_caps.txt")} has 1 empty caption line(s) (line 3)',
                      'every line must hold one caption')


@pytest.mark.parametrize('images, expected', [
    (np.zeros((4, DIM), np.float32), 'has shape (4, 16); expected (n_images, n_regions, feature_size)'),
    (np.zeros((4, 4, DIM), np.int64), 'holds int64 values; region features must be float16, float32 or float64'),
])
def test_feature_array_not_3d_or_not_float(data, bert, capsys, images, expected):
    write_split(data, 'dev', 4, images=images)
    code, err = run_main(train.main, train_argv(data, bert), capsys)
    assert_user_error(code, err, precomp(data, 'dev_ims.npy'), expected)


def test_feature_size_differs_between_splits(data, bert, capsys):
    write_split(data, 'dev', 4, dim=8)
    code, err = run_main(train.main, train_argv(data, bert), capsys)
    assert_user_error(code, err, f'{precomp(data, "dev_ims.npy")} has feature size 8',
                      f'{precomp(data, "train_ims.npy")} has 16')


def test_feature_size_differs_from_checkpoint(data, bert, capsys):
    ckpt = save_checkpoint(data / 'm.pth', data, bert, img_dim=24)
    code, err = run_main(eval_script.main, ['--checkpoint', ckpt, '--device', 'cpu'], capsys)
    assert_user_error(code, err, f'{ckpt} expects 24-d region features', f'{precomp(data, "test_ims.npy")} has 16')
    code, err = run_main(train.main, train_argv(data, bert, 'run', '--init_from', ckpt), capsys)
    assert_user_error(code, err, f'{ckpt} expects 24-d region features', f'{precomp(data, "train_ims.npy")} has 16')
    assert not os.path.exists(data / 'run')


@pytest.mark.parametrize('value', [np.nan, np.inf])
def test_nonfinite_features_of_evaluated_split(data, bert, capsys, value):
    images = np.random.default_rng(0).random((4, 4, DIM)).astype(np.float32)
    images[2, 1, 3] = value
    write_split(data, 'test', 4, images=images)
    ckpt = save_checkpoint(data / 'm.pth', data, bert)
    expected = f'{precomp(data, "test_ims.npy")} holds NaN or infinite values (image 2); re-extract'
    code, err = run_main(eval_script.main, ['--checkpoint', ckpt, '--device', 'cpu'], capsys)
    assert_user_error(code, err, expected)
    code, err = run_main(train.main, train_argv(data, bert), capsys)  # before training starts
    assert_user_error(code, err, expected)
    assert not os.path.exists(data / 'run')


def nan_in_train_split(data):
    images = np.random.default_rng(0).random((4, 4, DIM)).astype(np.float32)
    images[3, 0, 0] = np.nan
    write_split(data, 'train', 4, images=images)
    return f'{precomp(data, "train_ims.npy")} holds NaN or infinite values (image 3); re-extract'


def test_nonfinite_training_features_in_process(data, bert, capsys):
    expected = nan_in_train_split(data)
    code, err = run_main(train.main, train_argv(data, bert), capsys)
    assert_user_error(code, err, expected)


def test_nonfinite_training_features_in_a_worker(data, bert, capsys):
    """Raised inside a DataLoader worker, the error still arrives as the same single line."""
    expected = nan_in_train_split(data)
    code, err = run_main(train.main, train_argv(data, bert, 'run', '--workers', '1'), capsys)
    last = assert_user_error(code, err, expected)
    assert 'DataLoader worker' not in last


# ----------------------------------------------------------------------------- checkpoints and text models

def test_truncated_checkpoint_subprocess(data, bert):
    ckpt = save_checkpoint(data / 'm.pth', data, bert)
    with open(ckpt, 'rb') as f:
        head = f.read(4000)
    with open(ckpt, 'wb') as f:
        f.write(head)
    code, err = run_script('eval.py', ['--checkpoint', ckpt, '--device', 'cpu'])
    assert_user_error(code, err, f'{ckpt} is not a readable checkpoint (truncated or not a .pth file',
                      'use another checkpoint')


def test_not_a_checkpoint(data, capsys):
    other = str(data / 'other.pth')
    torch.save({'weights': torch.zeros(3)}, other)
    code, err = run_main(eval_script.main, ['--checkpoint', other, '--device', 'cpu'], capsys)
    assert_user_error(code, err, f'{other} is not an HREM checkpoint', 'pass a model_best.pth or checkpoint_last.pth')
    text = data / 'notes.pth'
    text.write_text('not a checkpoint at all')
    code, err = run_main(eval_script.main, ['--checkpoint', str(text), '--device', 'cpu'], capsys)
    assert_user_error(code, err, f'{text} is not a readable checkpoint')
    code, err = run_main(eval_script.main, ['--checkpoint', str(data / 'absent.pth'), '--device', 'cpu'], capsys)
    assert_user_error(code, err, f'checkpoint {data / "absent.pth"} does not exist')


def test_checkpoint_of_another_embedding_size(data, bert, capsys):
    ckpt = save_checkpoint(data / 'm.pth', data, bert, embed_size=32)
    code, err = run_main(train.main, train_argv(data, bert, 'run', '--init_from', ckpt, '--embed_size', '64'),
                         capsys)
    assert_user_error(code, err, f'{ckpt} has embedding size 32, this run --embed_size 64; pass --embed_size 32')
    assert not os.path.exists(data / 'run'), 'checked before anything is built'


def test_checkpoint_of_another_bert_size(data, bert, tmp_path_factory, capsys):
    ckpt = save_checkpoint(data / 'm.pth', data, bert)
    wider = bert_folder(tmp_path_factory.mktemp('bert48'), hidden=48)
    code, err = run_main(eval_script.main, ['--checkpoint', ckpt, '--bert_path', wider, '--device', 'cpu'], capsys)
    assert_user_error(code, err, f'{ckpt} was trained with a text model of hidden size 32',
                      f'{wider} has 48', 'pass the matching --bert_path')


def test_checkpoint_with_missing_keys(data, bert, capsys):
    ckpt = save_checkpoint(data / 'm.pth', data, bert)
    state = torch.load(ckpt, weights_only=True)
    del state['model']['txt_enc']['linear.bias']
    torch.save(state, ckpt)
    code, err = run_main(eval_script.main, ['--checkpoint', ckpt, '--device', 'cpu'], capsys)
    assert_user_error(code, err, f"{ckpt}: text encoder weights do not fit this model: missing keys ['linear.bias']")


@pytest.mark.parametrize('missing', ['config.json', 'vocab.txt'])
def test_bert_folder_without_config_or_vocabulary(data, bert, tmp_path, capsys, missing):
    broken = shutil.copytree(bert, tmp_path / 'broken_bert')
    os.unlink(broken / missing)
    code, err = run_main(train.main, train_argv(data, str(broken)), capsys)
    assert_user_error(code, err, f'text model folder {broken} lacks {missing}', '--bert_path')


def test_hub_name_without_network_subprocess(data):
    code, err = run_script('train.py', train_argv(data, 'hrem-test-no-such-model'), env={'HF_HUB_OFFLINE': '1'})
    assert_user_error(code, err, "could not load the text model 'hrem-test-no-such-model'",
                      'no network?', 'pass --bert_path')
    assert not os.path.exists(data / 'run')


# ----------------------------------------------------------------------------- contradicting options

def test_fold5_on_a_split_that_is_not_5000_images(data, bert, capsys):
    ckpt = save_checkpoint(data / 'm.pth', data, bert)
    code, err = run_main(eval_script.main, ['--checkpoint', ckpt, '--device', 'cpu', '--fold5'], capsys)
    assert_user_error(code, err, f'--fold5 needs the 5000-image COCO testall split; {precomp(data, "test_ims.npy")} '
                                 'has 4 images', 'Drop --fold5')


def test_batch_size_below_two(data, bert, capsys):
    code, err = run_main(train.main, train_argv(data, bert, 'run', '--batch_size', '1'), capsys)
    assert_user_error(code, err, '--batch_size 1: a batch needs at least 2 pairs')
    assert not os.path.exists(data / 'run')


@pytest.mark.parametrize('threshold', ['0', '1.5', '-0.2'])
def test_threshold_outside_zero_one(data, bert, capsys, threshold):
    code, err = run_main(train.main, train_argv(data, bert, 'run', '--threshold', threshold), capsys)
    assert_user_error(code, err, 'argument --threshold', f'{float(threshold)} is outside (0.0, 1.0]')


def test_resume_with_init_from(data, bert, capsys):
    ckpt = save_checkpoint(data / 'm.pth', data, bert)
    code, err = run_main(train.main, train_argv(data, bert, 'run', '--resume', ckpt, '--init_from', ckpt), capsys)
    assert_user_error(code, err, '--resume continues a run, --init_from starts a new one', 'give one of them')


def test_resume_a_checkpoint_without_optimizer_state(data, bert, capsys):
    ckpt = save_checkpoint(data / 'm.pth', data, bert)  # make_checkpoint without an optimizer
    code, err = run_main(train.main, train_argv(data, bert, 'run', '--resume', ckpt), capsys)
    assert_user_error(code, err, f'{ckpt} cannot be resumed (no optimizer state)', 'use --init_from')


def test_resume_cannot_change_the_runs_options(data, bert, capsys):
    ckpt = save_checkpoint(data / 'm.pth', data, bert, resumable=True)
    code, err = run_main(train.main, ['--resume', ckpt, '--batch_size', '8', '--num_epochs', '3'], capsys)
    assert_user_error(code, err, '--resume continues the run with its own options; --batch_size cannot change '
                                 '(the run used 4)', 'may change: --device, --workers')


def test_dataset_must_be_a_plain_name(data, bert, capsys):
    code, err = run_main(train.main, train_argv(data, bert, 'run', '--dataset', '../tiny'), capsys)
    assert_user_error(code, err, "--dataset '../tiny' must be a plain name", '--data_path')
