"""Feature files stay memory-mapped: nothing is read into RAM up front."""
import os

import numpy as np

from lib.data import PrecompSplit
from lib.loader import TrainDataset


def test_features_are_memory_mapped(tmp_path, tokenizer):
    folder = tmp_path / 'tiny_precomp'
    folder.mkdir()
    features = np.random.default_rng(0).random((30, 4, 8), dtype=np.float32)
    np.save(folder / 'train_ims.npy', features)
    np.save(folder / 'dev_ims.npy', features)
    for split in ('train', 'dev'):
        (folder / f'{split}_caps.txt').write_text('a dog on the beach\n' * 150)

    train = PrecompSplit(str(tmp_path), 'tiny', 'train', tokenizer)
    dev = PrecompSplit(str(tmp_path), 'tiny', 'dev', tokenizer, max_captions=50)
    for split in (train, dev):
        assert isinstance(split.images, np.memmap) and split.images.mode == 'r'
        assert os.path.samefile(split.images.filename, folder / f'{split.ims_path.split(os.sep)[-1]}')
    assert dev.images.shape == (10, 4, 8)  # the capped dev split is a view of the same mapping

    image, _, _, img_index = TrainDataset(train, size_augment=False, text_augment=False)[7]
    assert img_index == 1
    assert image.dtype == np.float32  # read on demand; collate copies it into the batch
    np.testing.assert_array_equal(image, features[1])
