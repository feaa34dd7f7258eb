"""The SCAN "precomp" layout on disk: where a dataset's split files are (and the usual unpacking
mistakes that put them elsewhere), and checks of the feature and caption files.

<data_path>/<dataset>_precomp/<split>_ims.npy   float (N_images, R, D), memory-mapped; float16 files
                                                (tools/convert_features.py) are read as float32
<data_path>/<dataset>_precomp/<split>_caps.txt  one caption per line; caption i belongs to image
                                                i // 5 (five per image) or i (one per image)
"""
import mmap
import os
from typing import NamedTuple

import numpy as np

from lib.errors import UserError
from lib.progress import progress

SPLIT_SUFFIXES = ('_ims.npy', '_caps.txt')
PRECOMP_SUFFIX = '_precomp'
SEARCH_DEPTH = 3  # folder levels below --data_path searched for misplaced split files
# folder names that say which dataset a misplaced folder holds
DATASET_ALIASES = {'f30k': ('f30k', 'flickr'), 'coco': ('coco',)}
# Feature types that training, evaluation and tools/check_data.py accept: every image is read as
# float32, so float64 works (at twice the disk and page cache; the checker warns) and float16 halves them.
FEATURE_DTYPES = ('float16', 'float32', 'float64')


class LayoutMistake(NamedTuple):
    what: str
    fix: str
    folder: str  # where the split files lie instead


def precomp_folder(data_path, dataset):
    return os.path.join(data_path, f'{dataset}{PRECOMP_SUFFIX}')


def split_paths(folder, split):
    return os.path.join(folder, f'{split}_ims.npy'), os.path.join(folder, f'{split}_caps.txt')


def split_files(data_path, dataset, split):
    return split_paths(precomp_folder(data_path, dataset), split)


def _split_names(file_names):
    return {n[:-len(s)] for n in file_names for s in SPLIT_SUFFIXES if n.endswith(s) and len(n) > len(s)}


def splits_in(folder):
    """Names of the splits that have a feature or a caption file in folder."""
    try:
        return _split_names(os.listdir(folder))
    except OSError:
        return set()


def _folders_with_splits(data_path):
    found = []
    for root, dirs, files in os.walk(data_path, followlinks=True):  # data folders are often links
        dirs.sort()
        if root != data_path and os.path.relpath(root, data_path).count(os.sep) + 1 >= SEARCH_DEPTH:
            dirs[:] = []
        if _split_names(files):
            found.append(os.path.normpath(root))
    return found


def layout_mistake(data_path, dataset, unnamed=True):
    """LayoutMistake(what is wrong, the fix, the folder) when the split files of a dataset are not in
    <data_path>/<dataset>_precomp/ but where a usual unpacking mistake put them; else None.
    unnamed: also consider split files in a folder whose name does not say which dataset they are."""
    data_path = os.path.normpath(data_path)
    expected = precomp_folder(data_path, dataset)
    name = f'{dataset}{PRECOMP_SUFFIX}'
    if splits_in(expected):
        return None
    if os.path.basename(data_path) == name and splits_in(data_path):
        return LayoutMistake(f'--data_path {data_path} is the {name} folder itself',
                             f'pass --data_path {os.path.dirname(data_path) or "."} (the folder above it)', data_path)
    aliases = DATASET_ALIASES.get(dataset, (dataset.lower(),))

    def another_dataset(folder_name):  # '<name>_precomp' of a dataset whose name is not this one's
        return (folder_name.endswith(PRECOMP_SUFFIX) and folder_name != name
                and not any(a in folder_name.lower() for a in aliases))
    candidates = [f for f in _folders_with_splits(data_path)
                  if not any(map(another_dataset, os.path.relpath(f, data_path).split(os.sep)))]
    named = [f for f in candidates if any(a in os.path.relpath(f, data_path).lower() for a in aliases)]
    if named:
        found = named[0]
    elif unnamed and (len(candidates) == 1 and dataset not in DATASET_ALIASES or candidates == [data_path]):
        found = candidates[0]
    else:
        return None
    if found == data_path:
        return LayoutMistake(f'the split files lie directly in {data_path}: one folder level too shallow',
                             f'mkdir {expected} && mv {data_path}/*_ims.npy {data_path}/*_caps.txt {expected}/',
                             found)
    move = f'mv {found}/* {expected}/' if os.path.isdir(expected) else f'mv {found} {expected}'
    inside = found.startswith(expected + os.sep)
    levels = os.path.relpath(found, expected if inside else data_path).count(os.sep) + inside
    if inside or os.path.basename(found) == name:
        fix = move + (' and delete the emptied folder' if inside else '')
        if os.path.basename(found) == name:
            fix += f', or pass --data_path {os.path.dirname(found)}'
        return LayoutMistake(f'the split files lie in {found}: {levels} folder level{"s" * (levels > 1)} too deep',
                             fix, found)
    if os.path.dirname(found) == data_path:
        return LayoutMistake(f'the {dataset} split files lie in {found}: the folder is misnamed',
                             f'{move} (it must be named {name})', found)
    return LayoutMistake(f'the {dataset} split files lie in {found}, not in {expected}', move, found)


def _layout_hint(folder):
    """': <mistake>; fix: <fix>' for a <data_path>/<dataset>_precomp folder that lacks its files."""
    base = os.path.basename(folder)
    if not base.endswith(PRECOMP_SUFFIX):
        return ''
    mistake = layout_mistake(os.path.dirname(folder) or '.', base[:-len(PRECOMP_SUFFIX)])
    return f': {mistake.what}; fix: {mistake.fix}' if mistake else ''


def npy_header(f):
    """(shape, dtype) from the header of an open .npy file; leaves f at the first data byte."""
    version = np.lib.format.read_magic(f)
    read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                   (2, 0): np.lib.format.read_array_header_2_0}.get(version)
    if read_header is None:
        raise ValueError(f'unsupported .npy version {version}')
    shape, _, dtype = read_header(f)
    return shape, dtype


def read_npy_header(path):
    """(shape, dtype) of a .npy file, read from its header alone;
    raises UserError for a file that is not a .npy array or holds fewer bytes than its header says."""
    try:
        with open(path, 'rb') as f:
            shape, dtype = npy_header(f)
            offset = f.tell()
    except (ValueError, OSError, EOFError) as err:
        raise UserError(f'{path} is not a readable .npy array ({err}); re-create or re-download it') from err
    expected = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    size = os.path.getsize(path)
    if size < expected:
        raise UserError(f'{path} is truncated: {size} of the {expected} bytes its header announces '
                        f'(shape {shape}); the download or unpacking stopped early. Unpack it again from a '
                        'complete archive (check the archive\'s size or checksum)')
    return shape, dtype


def load_images(path):
    """Memory-map a region-feature array and check its shape and values' type."""
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        raise UserError(f'data folder {folder} does not exist{_layout_hint(folder)}; check --data_path and '
                        '--dataset (the features are read from <data_path>/<dataset>_precomp/, see docs/data.md)')
    if not os.path.isfile(path):
        raise UserError(f'missing feature file {path}{_layout_hint(folder)}; see docs/data.md for the precomp '
                        'layout (or check --data_path / --dataset)')
    read_npy_header(path)
    try:
        images = np.load(path, mmap_mode='r')
    except (ValueError, OSError) as err:
        raise UserError(f'{path} is not a readable .npy array ({err}); re-create or re-download it') from err
    if images.ndim != 3:
        raise UserError(f'{path} has shape {images.shape}; expected (n_images, n_regions, feature_size)')
    if images.dtype.name not in FEATURE_DTYPES:
        raise UserError(f'{path} holds {images.dtype} values; region features must be '
                        f'{", ".join(FEATURE_DTYPES[:-1])} or {FEATURE_DTYPES[-1]}')
    if images.shape[0] == 0 or images.shape[1] == 0:
        raise UserError(f'{path} has shape {images.shape}: no images or no regions')
    return images


def read_caption_lines(path):
    """Every line of a caption file, stripped (also of Windows line ends), blank ones included."""
    if not os.path.isfile(path):
        raise UserError(f'missing caption file {path}; see docs/data.md for the precomp layout')
    try:
        with open(path, encoding='utf-8') as f:
            return [line.rstrip('\n').strip() for line in f]
    except UnicodeDecodeError as err:
        raise UserError(f'{path} is not UTF-8 text ({err.reason} at byte {err.start}); re-extract it from the '
                        'archive, or convert it with iconv -t utf-8') from err


def check_caption_lines(path, captions):
    empty = [i + 1 for i, c in enumerate(captions) if not c]
    trailing = next((i for i, c in enumerate(reversed(captions)) if c), len(captions))
    if empty and len(empty) == trailing < len(captions):
        raise UserError(f'{path} ends with {trailing} blank line(s) after its {len(captions) - trailing} captions; '
                        f"delete them: sed -i '/^[[:space:]]*$/d' {path}")
    if empty:
        shown = ', '.join(map(str, empty[:5])) + (' ...' if len(empty) > 5 else '')
        raise UserError(f'{path} has {len(empty)} empty caption line(s) (line {shown}); '
                        'every line must hold one caption')


def load_captions(path):
    captions = read_caption_lines(path)
    check_caption_lines(path, captions)
    return captions


def nonfinite_error(ims_path, image_index):
    return UserError(f'{ims_path} holds NaN or infinite values (image {image_index}); re-extract the '
                     'features or remove that image and its captions')


def find_nonfinite(images, chunk=512, show_progress=False, desc='scanning for NaN/inf'):
    """Index of the first image holding NaN or inf, or None; read in chunks, so a memory-mapped
    array stays on disk."""
    with progress(total=len(images), enabled=show_progress, desc=desc, unit='image', unit_scale=True) as bar:
        for start in range(0, len(images), chunk):
            block = np.asarray(images[start:start + chunk])
            if not np.isfinite(block).all():
                return start + int(np.nonzero(~np.isfinite(block).reshape(len(block), -1).all(1))[0][0])
            bar.update(len(block))
    return None


def check_feature_sizes(splits):
    """Every split (anything with ims_path and feature_size) must have the first one's feature size."""
    for split in splits[1:]:
        if split.feature_size != splits[0].feature_size:
            raise UserError(f'{split.ims_path} has feature size {split.feature_size}, '
                            f'{splits[0].ims_path} has {splits[0].feature_size}')


def captions_per_image(n_images, n_captions, caps_path, ims_path):
    if n_captions == 5 * n_images:
        return 5
    if n_captions == n_images:
        return 1
    raise UserError(f'{caps_path}: {5 * n_images} = 5 x {n_images} images expected (five captions per image of '
                    f'{ims_path}, or {n_images}, one each), {n_captions} found; take the caption file from the '
                    'same archive as the features (caption i describes image i // 5)')


def advise_random_access(images):
    """Training reads images in random order: tell the kernel not to read ahead, so resident
    memory holds the images actually read rather than megabytes around each of them."""
    file_map = getattr(images, '_mmap', None)  # np.memmap (and its slices) keep the mapping here
    if file_map is not None and hasattr(mmap, 'MADV_RANDOM'):
        file_map.madvise(mmap.MADV_RANDOM)
