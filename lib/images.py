"""Image files: the folder listing and decoding shared by feature extraction and search."""
import os

import cv2
import numpy as np

from lib.errors import UserError

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')


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
