"""The SCAN "precomp" layout: reading, validating, tokenising, augmenting and batching.

<data_path>/<dataset>_precomp/<split>_ims.npy   float (N_images, R, D), memory-mapped; float16 files
                                                (tools/convert_features.py) are read as float32
<data_path>/<dataset>_precomp/<split>_caps.txt  one caption per line; caption i belongs to image
                                                i // 5 (five per image) or i (one per image)
"""
import mmap
import os
from dataclasses import dataclass

import numpy as np
import torch

from lib.errors import UserError

DEV_CAPTION_CAP = 5000  # the authors evaluate dev on its first 5000 captions (1000 images)

# Word-level text augmentation (training only): a word is perturbed with this probability,
# then masked / replaced by a random token / deleted with these shares.
WORD_PERTURB_PROB = 0.2
MASK_SHARE, RANDOM_SHARE = 0.5, 0.1  # the remaining 0.4 deletes the word
REGION_DROP_PROB = 0.2


def split_files(data_path, dataset, split):
    folder = os.path.join(data_path, f'{dataset}_precomp')
    return os.path.join(folder, f'{split}_ims.npy'), os.path.join(folder, f'{split}_caps.txt')


def load_images(path):
    """Memory-map a region-feature array and check its shape and values' type."""
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        raise UserError(f'data folder {folder} does not exist; check --data_path and --dataset '
                        '(the features are read from <data_path>/<dataset>_precomp/, see README "Data")')
    if not os.path.isfile(path):
        raise UserError(f'missing feature file {path}; see README "Data" for the precomp layout '
                        '(or check --data_path / --dataset)')
    try:
        images = np.load(path, mmap_mode='r')
    except (ValueError, OSError) as err:
        raise UserError(f'{path} is not a readable .npy array ({err}); re-create or re-download it') from err
    if images.ndim != 3:
        raise UserError(f'{path} has shape {images.shape}; expected (n_images, n_regions, feature_size)')
    if not np.issubdtype(images.dtype, np.floating):
        raise UserError(f'{path} holds {images.dtype} values; region features must be floating point')
    if images.shape[0] == 0 or images.shape[1] == 0:
        raise UserError(f'{path} has shape {images.shape}: no images or no regions')
    return images


def load_captions(path):
    if not os.path.isfile(path):
        raise UserError(f'missing caption file {path}; see README "Data" for the precomp layout')
    with open(path, encoding='utf-8') as f:
        captions = [line.rstrip('\n').strip() for line in f]
    empty = [i + 1 for i, c in enumerate(captions) if not c]
    if empty:
        shown = ', '.join(map(str, empty[:5])) + (' ...' if len(empty) > 5 else '')
        raise UserError(f'{path} has {len(empty)} empty caption line(s) (line {shown}); '
                        'every line must hold one caption')
    return captions


def nonfinite_error(ims_path, image_index):
    return UserError(f'{ims_path} holds NaN or infinite values (image {image_index}); re-extract the '
                     'features or remove that image and its captions')


def captions_per_image(n_images, n_captions, caps_path, ims_path):
    if n_captions == 5 * n_images:
        return 5
    if n_captions == n_images:
        return 1
    raise UserError(f'{caps_path} has {n_captions} captions for {n_images} images in {ims_path}; '
                    'the caption count must equal the image count or be five times it')


@dataclass
class TokenizedCaptions:
    """All captions tokenised once, as flat word-piece ids with the word each piece belongs to."""
    ids: np.ndarray        # int32, every caption's pieces concatenated (no [CLS]/[SEP])
    word_index: np.ndarray  # int32, per piece: index of its word inside its caption
    offsets: np.ndarray    # int64, caption c is ids[offsets[c]:offsets[c + 1]]

    def __len__(self):
        return len(self.offsets) - 1

    def pieces(self, c):
        s, e = self.offsets[c], self.offsets[c + 1]
        return self.ids[s:e], self.word_index[s:e]


TOKENIZE_CHUNK = 10000  # captions per tokenizer call: bounds the tokenizer's temporary memory


def tokenize_captions(tokenizer, captions):
    # Words are split as BERT's basic tokenizer does (whitespace and punctuation); word_ids()
    # of the fast tokenizer says which word each piece came from (transformers 4.x and 5.x).
    ids, words, lengths = [], [], []
    for start in range(0, len(captions), TOKENIZE_CHUNK):
        enc = tokenizer(list(captions[start:start + TOKENIZE_CHUNK]), add_special_tokens=False)
        for i, piece_ids in enumerate(enc['input_ids']):
            ids.append(np.asarray(piece_ids, np.int32))
            words.append(np.asarray(enc.word_ids(i), np.int32))
            lengths.append(len(piece_ids))
    offsets = np.concatenate(([0], np.cumsum(lengths, dtype=np.int64)))
    return TokenizedCaptions(np.concatenate(ids) if ids else np.zeros(0, np.int32),
                             np.concatenate(words) if words else np.zeros(0, np.int32), offsets)


class TextSpec:
    """What caption encoding needs to know about the tokenizer."""

    def __init__(self, tokenizer, max_len=512):
        self.cls_id = tokenizer.cls_token_id
        self.sep_id = tokenizer.sep_token_id
        self.mask_id = tokenizer.mask_token_id
        self.vocab_size = len(tokenizer)
        self.max_len = min(max_len, tokenizer.model_max_length)

    def encode(self, piece_ids, word_index, rng=None):
        """[CLS] + pieces + [SEP]; with an rng, each word is masked/replaced/deleted with prob 0.2."""
        piece_ids = piece_ids.astype(np.int64)
        if rng is not None and len(piece_ids):
            n_words = int(word_index.max()) + 1
            u = rng.random(n_words)
            perturbed = u < WORD_PERTURB_PROB
            share = u / WORD_PERTURB_PROB
            masked = perturbed & (share < MASK_SHARE)
            replaced = perturbed & (share >= MASK_SHARE) & (share < MASK_SHARE + RANDOM_SHARE)
            deleted = perturbed & (share >= MASK_SHARE + RANDOM_SHARE)
            piece_ids = piece_ids.copy()
            piece_ids[masked[word_index]] = self.mask_id
            replace_at = replaced[word_index]
            piece_ids[replace_at] = rng.integers(0, self.vocab_size, int(replace_at.sum()))
            piece_ids = piece_ids[~deleted[word_index]]
        piece_ids = piece_ids[:self.max_len - 2]
        return np.concatenate(([self.cls_id], piece_ids, [self.sep_id]))


class PrecompSplit:
    """One split of a precomp dataset: memory-mapped regions and tokenised captions."""

    def __init__(self, data_path, dataset, split, tokenizer, max_captions=None):
        self.ims_path, self.caps_path = split_files(data_path, dataset, split)
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
        self.tokens = tokenize_captions(tokenizer, captions)
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
        for start in range(0, self.n_images, chunk):
            block = np.asarray(self.images[start:start + chunk])
            if not np.isfinite(block).all():
                bad = start + int(np.nonzero(~np.isfinite(block).reshape(len(block), -1).all(1))[0][0])
                raise nonfinite_error(self.ims_path, bad)


def advise_random_access(images):
    """Training reads images in random order: tell the kernel not to read ahead, so resident
    memory holds the images actually read rather than megabytes around each of them."""
    file_map = getattr(images, '_mmap', None)  # np.memmap (and its slices) keep the mapping here
    if file_map is not None and hasattr(mmap, 'MADV_RANDOM'):
        file_map.madvise(mmap.MADV_RANDOM)


class TrainDataset(torch.utils.data.Dataset):
    """One item per caption: (regions, token ids, caption index, image index).

    Augmentation randomness comes from (seed, epoch, caption index), so a run is repeatable
    and resumable whatever the number of workers.
    """

    def __init__(self, split, seed=0, size_augment=True, text_augment=True):
        advise_random_access(split.images)
        self.split = split
        self.seed = seed
        self.size_augment = size_augment
        self.text_augment = text_augment
        # in shared memory: persistent DataLoader workers keep their copy of the dataset across
        # epochs, and must see the epoch that set_epoch gives in the main process
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    @property
    def epoch(self):
        return int(self._epoch)

    def set_epoch(self, epoch):
        self._epoch.fill_(epoch)

    def __len__(self):
        return len(self.split.tokens)

    def __getitem__(self, index):
        rng = np.random.default_rng([self.seed, self.epoch, index])
        img_index = self.split.image_of_caption(index)
        image = np.asarray(self.split.images[img_index], dtype=np.float32)
        if not np.isfinite(image).all():  # one image per item: cheap, unlike scanning a 33 GB array up front
            raise nonfinite_error(self.split.ims_path, img_index)
        if self.size_augment:
            keep = rng.random(len(image)) > REGION_DROP_PROB
            if not keep.any():  # never hand an image with no region to the encoder
                keep[rng.integers(len(image))] = True
            image = image[keep]
        ids = self.split.text.encode(*self.split.tokens.pieces(index), rng if self.text_augment else None)
        return image, ids, index, img_index


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


def collate(items):
    images, ids, cap_index, img_index = zip(*items)
    regions, region_lengths = pad_batch(images, np.float32)
    tokens, token_lengths = pad_batch(ids, np.int64)
    return {'regions': regions, 'region_lengths': region_lengths, 'tokens': tokens,
            'token_lengths': token_lengths, 'caption_ids': torch.tensor(cap_index),
            'img_ids': torch.tensor(img_index)}
