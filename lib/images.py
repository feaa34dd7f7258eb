"""Image files: the folder listing, decoding and thumbnails shared by feature extraction, search
and the tools that show images."""
import os
import sys

import cv2
import numpy as np

from lib.errors import UserError

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')
PAD_GREY = (200, 200, 200)  # stands in for an unreadable image


def image_list_path(precomp_folder, split):
    """<split>_images.txt: the file names of a split's images, in the order of its features."""
    return os.path.join(precomp_folder, f'{split}_images.txt')


def list_images(folder, option='--images'):
    """The JPEG/PNG files of a folder, sorted by file name."""
    if not os.path.isdir(folder):
        raise UserError(f'{option} {folder} is not a folder')
    return sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS)
                  and os.path.isfile(os.path.join(folder, f)))


def read_image(path):
    """BGR uint8 array, or None when the file is missing or not an image OpenCV can decode.
    (np.fromfile + imdecode also works with non-ASCII paths, where cv2.imread does not.)"""
    try:
        data = np.fromfile(path, np.uint8)
        return cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    except (OSError, cv2.error):
        return None


def thumbnail(path, size):
    """The image letterboxed into a size x size square (grey when unreadable)."""
    cell = np.full((size, size, 3), PAD_GREY, np.uint8)
    image = read_image(path) if path else None
    if image is None:
        print(f'warning: cannot read image {path}; a grey square stands in for it', file=sys.stderr)
        return cell
    h, w = image.shape[:2]
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    small = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_AREA)
    top, left = (size - nh) // 2, (size - nw) // 2
    cell[top:top + nh, left:left + nw] = small
    return cell


def gallery_files(image_dir, precomp_folder, split, n_images):
    """The image files of a split, in its order: <split>_images.txt when the precomp folder has one,
    else the sorted images of image_dir."""
    from lib.data import load_captions  # one file name per line, read like captions
    listing = image_list_path(precomp_folder, split)
    names = load_captions(listing) if os.path.isfile(listing) else list_images(image_dir, '--image_dir')
    if len(names) != n_images:
        source = listing if os.path.isfile(listing) else f'sorted image files of {image_dir}'
        raise UserError(f'{source} names {len(names)} images but the gallery has {n_images}; --image_dir must '
                        'hold the images of the split, in its order')
    return [os.path.join(image_dir, n) for n in names]
