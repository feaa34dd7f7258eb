"""Scale on CPU: float16 feature files (tools/convert_features.py and the loader), DataLoader
workers that follow the epoch, and the --tf32 / --compile refusals. The GPU paths are in
test_cuda.py."""
import os

import numpy as np
import pytest
import torch

import train  # noqa: F401
from conftest import tiny_args, tiny_bert
from lib.compile import check_compile
from lib.data import PrecompSplit
from lib.loader import TrainDataset, collate, make_loader
from lib.distributed import DistEnv
from lib.errors import UserError
from lib.encoding import encode_images
from lib.models import HREM, config_from_args
from lib.precision import set_tf32
from test_errors import assert_user_error, make_data, precomp, run_main, write_split
from tools import convert_features

CPU = torch.device('cpu')
FP16_EPS = 2.0 ** -11  # float16 keeps 11 significant bits: relative rounding error <= 2^-11
FP16_TINY = 2.0 ** -25  # half the smallest float16 subnormal: the absolute error near zero


def convert(root, out, *extra):
    return convert_features.main(['--data_path', str(root), '--dataset', 'tiny', '--out', str(out), *extra])


def test_float16_conversion_rounds_every_value_and_copies_the_text_files(tmp_path, tokenizer):
    make_data(tmp_path / 'src')
    (tmp_path / 'src' / 'tiny_precomp' / 'test_images.txt').write_text('a.jpg\nb.jpg\nc.jpg\nd.jpg\n')
    # values across float16's range: large, ordinary, tiny (subnormal) and zero
    wide = np.random.default_rng(1).random((4, 4, 16), dtype=np.float32) * np.float32(60000.0)
    wide[0, 0, :4] = [0.0, 1e-6, 3e-5, 65504.0]
    np.save(precomp(tmp_path / 'src', 'dev_ims.npy'), wide)
    dst = convert(tmp_path / 'src', tmp_path / 'out')

    assert sorted(os.listdir(dst)) == sorted(os.listdir(tmp_path / 'src' / 'tiny_precomp'))  # no .partial left
    for split in ('train', 'dev', 'test'):
        x = np.load(precomp(tmp_path / 'src', f'{split}_ims.npy'))
        y = np.load(os.path.join(dst, f'{split}_ims.npy'), mmap_mode='r')
        assert y.dtype == np.float16 and y.shape == x.shape
        err = np.abs(y.astype(np.float64) - x.astype(np.float64))
        assert (err <= np.abs(x) * FP16_EPS + FP16_TINY).all(), split
    for name in ('train_caps.txt', 'test_caps.txt', 'test_images.txt'):
        assert (tmp_path / 'out' / 'tiny_precomp' / name).read_bytes() == \
            (tmp_path / 'src' / 'tiny_precomp' / name).read_bytes()

    # the loader reads float16 as float32: training items and evaluation encoding
    split = PrecompSplit(str(tmp_path / 'out'), 'tiny', 'train', tokenizer)
    assert split.images.dtype == np.float16 and isinstance(split.images, np.memmap)
    split.check_finite()
    image, _, _, img_index = TrainDataset(split, size_augment=False, text_augment=False)[7]
    assert image.dtype == np.float32 and img_index == 1
    np.testing.assert_array_equal(image, split.images[1].astype(np.float32))
    assert collate([TrainDataset(split)[i] for i in range(3)])['regions'].dtype == torch.float32
    model = HREM(config_from_args(tiny_args(), 16), tiny_bert()).eval()
    ours = encode_images(model, split.images, CPU, batch_size=3)
    as_float32 = encode_images(model, np.asarray(split.images, np.float32), CPU, batch_size=3)
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours, as_float32)


def test_float16_conversion_refuses_values_beyond_its_range(tmp_path, capsys):
    make_data(tmp_path / 'src')
    images = np.ones((4, 4, 16), np.float32)
    images[3, 2, 5] = 70000.0
    write_split(tmp_path / 'src', 'train', 4, images=images)
    code, err = run_main(convert_features.main, ['--data_path', str(tmp_path / 'src'), '--dataset', 'tiny',
                                                 '--out', str(tmp_path / 'out')], capsys)
    assert_user_error(code, err, 'train_ims.npy: image 3 holds 70000, beyond the range of float16',
                      'keep these features in float32')
    assert not os.path.exists(tmp_path / 'out' / 'tiny_precomp' / 'train_ims.npy')
    assert not any(f.endswith('.partial') for f in os.listdir(tmp_path / 'out' / 'tiny_precomp'))
    # float32 holds it: the same files convert with --dtype float32
    convert(tmp_path / 'src', tmp_path / 'out32', '--dtype', 'float32')
    np.testing.assert_array_equal(np.load(tmp_path / 'out32' / 'tiny_precomp' / 'train_ims.npy'), images)


def test_float16_conversion_never_writes_over_its_source_or_existing_files(tmp_path, capsys):
    make_data(tmp_path)
    argv = ['--data_path', str(tmp_path), '--dataset', 'tiny']
    assert_user_error(*run_main(convert_features.main, argv + ['--out', str(tmp_path)], capsys),
                      'is the source folder; give a new folder')
    convert(tmp_path, tmp_path / 'out')
    assert_user_error(*run_main(convert_features.main, argv + ['--out', str(tmp_path / 'out')], capsys),
                      'already exists; choose another --out or pass --overwrite')
    convert(tmp_path, tmp_path / 'out', '--overwrite')


def test_workers_follow_the_epoch(tmp_path, tokenizer):
    make_data(tmp_path, train_images=6)
    split = PrecompSplit(str(tmp_path), 'tiny', 'train', tokenizer)
    args = tiny_args('--batch_size', '10', '--workers', '1', '--seed', '3')
    loader, dataset, sampler = make_loader(split, args, DistEnv(0, 1, 0, CPU))
    assert not loader.persistent_workers  # see make_loader: exact resume first
    batches = {}
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        batches[epoch] = list(loader)
        # the items as the main process computes them for this epoch
        order = list(sampler)
        expected = [collate([dataset[i] for i in order[s:s + 10]]) for s in range(0, 30, 10)]
        for got, ref in zip(batches[epoch], expected):
            for key in ref:
                assert torch.equal(got[key], ref[key]), (epoch, key)
    assert not torch.equal(batches[0][0]['caption_ids'], batches[1][0]['caption_ids'])


def test_tf32_is_refused_on_cpu(tmp_path, capsys):
    set_tf32(CPU, False)
    with pytest.raises(UserError, match='--tf32 is a CUDA matrix-product mode'):
        set_tf32(CPU, True)
    code, err = run_main(train.main, ['--device', 'cpu', '--tf32', '--data_path', str(tmp_path / 'none')], capsys)
    assert_user_error(code, err, '--tf32 is a CUDA matrix-product mode; drop it on CPU')


def test_compile_is_refused_clearly_without_a_cxx_compiler(tmp_path, capsys, monkeypatch):
    import torch._inductor.config as inductor_config
    monkeypatch.setattr(inductor_config.cpp, 'cxx', (None, str(tmp_path / 'no-such-c++')))
    with pytest.raises(UserError, match='torch.compile cannot build code for cpu'):
        check_compile(CPU)
    code, err = run_main(train.main, ['--device', 'cpu', '--compile', '--data_path', str(tmp_path / 'none')], capsys)
    assert_user_error(code, err, '--compile: torch.compile cannot build code for cpu', 'C++ compiler',
                      'drop --compile')
