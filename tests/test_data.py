"""The precomp layout: caption ratios, the dev cap, memory-mapped features."""
import numpy as np
import pytest

from lib.data import PrecompSplit
from lib.errors import UserError
from conftest import write_precomp


@pytest.mark.parametrize('per_image', [5, 1])
def test_caption_ratio_maps_captions_to_images(tmp_path, tokenizer, per_image):
    n = 6
    caps = [f'caption {c} of image {c // per_image}' for c in range(n * per_image)]
    feats = write_precomp(tmp_path, 'toy', 'test', n, caps)
    split = PrecompSplit(str(tmp_path), 'toy', 'test', tokenizer)
    assert split.per_image == per_image and split.n_images == n and len(split.tokens) == n * per_image
    for c in range(n * per_image):
        img = split.image_of_caption(c)
        assert split.captions[c].endswith(f'image {img}')
        np.testing.assert_array_equal(split.images[img], feats[img])


@pytest.mark.parametrize('n_caps', [12, 4, 31])
def test_other_ratios_are_a_user_error_naming_the_file(tmp_path, tokenizer, n_caps):
    write_precomp(tmp_path, 'toy', 'train', 6, [f'c {i}' for i in range(n_caps)])
    with pytest.raises(UserError) as err:
        PrecompSplit(str(tmp_path), 'toy', 'train', tokenizer)
    assert 'train_caps.txt' in str(err.value) and str(n_caps) in str(err.value)


def test_dev_keeps_its_first_5000_captions(tmp_path, tokenizer):
    caps = [f'c {i}' for i in range(5 * 1003)]
    feats = write_precomp(tmp_path, 'toy', 'dev', 1003, caps, regions=2, dim=3)
    write_precomp(tmp_path, 'toy', 'test', 1003, caps, regions=2, dim=3)
    dev = PrecompSplit(str(tmp_path), 'toy', 'dev', tokenizer)
    assert dev.n_images == 1000 and len(dev.captions) == 5000 and len(dev.tokens) == 5000
    assert dev.captions == caps[:5000]
    np.testing.assert_array_equal(dev.images, feats[:1000])
    test = PrecompSplit(str(tmp_path), 'toy', 'test', tokenizer)  # other splits are whole
    assert test.n_images == 1003 and len(test.captions) == 5015


def test_images_are_memory_mapped(tmp_path, tokenizer):
    write_precomp(tmp_path, 'toy', 'train', 3, ['a'] * 15)
    split = PrecompSplit(str(tmp_path), 'toy', 'train', tokenizer)
    assert isinstance(split.images, np.memmap) and split.feature_size == 8
