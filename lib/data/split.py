"""One split of a precomp dataset (memory-mapped regions, tokenised captions), and padding."""
import os

import numpy as np
import torch

from lib.data.files import (captions_per_image, find_nonfinite, load_captions, load_images, nonfinite_error,
                            split_files)
from lib.data.tokens import TextSpec, cached_tokenize

DEV_CAPTION_CAP = 5000  # the authors evaluate dev on its first 5000 captions (1000 images)


class PrecompSplit:
    """One split of a precomp dataset: memory-mapped regions and tokenised captions."""

    def __init__(self, data_path, dataset, split, tokenizer, max_captions=None, show_progress=False, cache_dir=None):
        """show_progress: progress bars while tokenising and scanning (rank 0 only); cache_dir: the
        token cache's folder (None: none), and self.cache_note says what it did."""
        self.ims_path, self.caps_path = split_files(data_path, dataset, split)
        self.show_progress = show_progress
        self.images = load_images(self.ims_path)
        captions = load_captions(self.caps_path)
        self.per_image = captions_per_image(len(self.images), len(captions), self.caps_path, self.ims_path)
        if split == 'dev' and max_captions is None:
            max_captions = DEV_CAPTION_CAP
        if max_captions is not None and max_captions < len(captions):
            # keep whole images: the first max_captions captions and the images they belong to
            n_images = max_captions // self.per_image
            captions = captions[:n_images * self.per_image]
            self.images = self.images[:n_images]
        self.captions = captions
        self.tokens, self.cache_note = cached_tokenize(tokenizer, captions, self.caps_path, cache_dir, show_progress,
                                                       f'tokenising {split} captions')
        self.text = TextSpec(tokenizer)

    @property
    def n_images(self):
        return len(self.images)

    @property
    def feature_size(self):
        return self.images.shape[2]

    def image_of_caption(self, c):
        return c // self.per_image

    def check_finite(self, chunk=512):
        """Fail on NaN/inf features (checked in chunks: the array stays memory-mapped)."""
        bad = find_nonfinite(self.images, chunk, self.show_progress, f'scanning {os.path.basename(self.ims_path)}')
        if bad is not None:
            raise nonfinite_error(self.ims_path, bad)


def pad_batch(arrays, dtype):
    """Arrays whose first dimension varies -> zero-padded (B, max n, ...) tensor and the lengths.

    Regions pad with zero vectors, token ids with 0 ([PAD]). Filled in numpy: the rows may be
    read-only views of the memory-mapped array.
    """
    lengths = [len(a) for a in arrays]
    out = np.zeros((len(arrays), max(lengths), *np.shape(arrays[0])[1:]), dtype)
    for i, a in enumerate(arrays):
        out[i, :len(a)] = a
    return torch.from_numpy(out), torch.tensor(lengths)
