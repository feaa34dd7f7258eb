"""Rewrite a precomp dataset's region features in another floating type (float16 by default).

    python tools/convert_features.py --data_path data --dataset coco --out data/fp16

writes data/fp16/coco_precomp/ with every split's <split>_ims.npy in --dtype and the folder's
text files (captions, image lists) copied. float16 halves the bytes read per training step and
the page cache a dataset needs (COCO's 33 GB train_ims.npy becomes 16.5 GB); train.py and eval.py
read float16 and float32 files alike and compute in float32. float16 keeps 11 significant bits
(relative rounding error <= 2^-11) and values up to 65504: a file with larger values is refused.

The source is memory-mapped and converted a block of images at a time, so memory stays bounded
whatever the file size; each output file is written under a temporary name and renamed when
complete, so an interrupted conversion never leaves a truncated array under the final name.
"""
import argparse
import glob
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

import arguments  # noqa: E402
from lib.data import load_images  # noqa: E402
from lib.errors import UserError, exit_on_user_error  # noqa: E402
from lib.writing import atomic_write, make_folders  # noqa: E402

DTYPES = ('float16', 'float32')
BLOCK_BYTES = 64 * 2**20  # source bytes converted at a time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=arguments.HelpFormatter)
    p.add_argument('--data_path', required=True, help='folder that holds <dataset>_precomp/')
    p.add_argument('--dataset', required=True, help='name of the dataset (<dataset>_precomp/)')
    p.add_argument('--out', required=True, help='new folder; <out>/<dataset>_precomp/ is written')
    p.add_argument('--dtype', default='float16', choices=DTYPES, help='floating type of the written features')
    p.add_argument('--overwrite', action='store_true', help='replace files already in the output folder')
    return p.parse_args(argv)


def out_of_range(block, dtype):
    """Index (within block) and value of the first image holding a value the dtype cannot hold."""
    bad = np.abs(block) > np.finfo(dtype).max  # inf is beyond the range too; NaN stays NaN
    if not bad.any():
        return None
    image = int(np.nonzero(bad.reshape(len(block), -1).any(1))[0][0])
    return image, float(block[image][bad[image]][0])


def convert_array(src_path, dst_path, dtype):
    """Stream one (N, R, D) feature file into dst_path as dtype; atomic."""
    images = load_images(src_path)
    per_block = max(1, BLOCK_BYTES // (images[0].size * images.dtype.itemsize))
    with atomic_write(dst_path, 'wb', what='converted features') as f:
        np.lib.format.write_array_header_1_0(
            f, {'descr': np.lib.format.dtype_to_descr(np.dtype(dtype)), 'fortran_order': False,
                'shape': images.shape})
        name = os.path.basename(src_path)
        for start in tqdm(range(0, len(images), per_block), desc=name, unit='block', dynamic_ncols=True):
            block = np.asarray(images[start:start + per_block])
            bad = out_of_range(block, dtype)
            if bad is not None:
                raise UserError(f'{src_path}: image {start + bad[0]} holds {bad[1]:g}, beyond the range of '
                                f'{dtype} (|x| <= {np.finfo(dtype).max:g}); keep these features in float32 '
                                '(or rescale them before converting)')
            f.write(np.ascontiguousarray(block, dtype=dtype).tobytes())


def copy_atomic(src, dst):
    with open(src, 'rb') as source, atomic_write(dst, 'wb') as f:
        shutil.copyfileobj(source, f)


@exit_on_user_error
def main(argv=None):
    args = parse_args(argv)
    src = os.path.join(args.data_path, f'{args.dataset}_precomp')
    dst = os.path.join(args.out, f'{args.dataset}_precomp')
    arrays = sorted(glob.glob(os.path.join(src, '*_ims.npy')))
    if not arrays:
        raise UserError(f'{src} holds no <split>_ims.npy file; check --data_path and --dataset')
    if os.path.isdir(dst) and os.path.samefile(src, dst):
        raise UserError(f'--out {args.out} is the source folder; give a new folder (the source stays as it is)')
    texts = sorted(glob.glob(os.path.join(src, '*.txt')))
    targets = [os.path.join(dst, os.path.basename(p)) for p in arrays + texts]
    existing = [t for t in targets if os.path.exists(t)]
    if existing and not args.overwrite:
        raise UserError(f'{existing[0]} already exists; choose another --out or pass --overwrite')
    make_folders(dst, 'the output folder')
    for path in arrays:
        convert_array(path, os.path.join(dst, os.path.basename(path)), args.dtype)
    for path in texts:
        copy_atomic(path, os.path.join(dst, os.path.basename(path)))
    print(f'wrote {len(arrays)} feature file(s) as {args.dtype} and {len(texts)} text file(s) to {dst}')
    return dst


if __name__ == '__main__':
    main()
