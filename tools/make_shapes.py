"""A small image collection to try tools/extract_features.py and search.py on: coloured shapes on
plain backgrounds, five captions per image that name them.

    python tools/make_shapes.py --out data/shapes_images

Writes <out>/<split>/NNNN.png and <out>/<split>_caps.txt for the splits train, dev and test.
Each split holds every (colour, shape) pair --per_pair times (train) or once (dev, test), with
random size, position, aspect ratio and background, so a query such as "a green triangle" has
exactly one answer in the test split. Deterministic for a given --seed.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

import arguments  # noqa: E402
from lib.errors import exit_on_user_error  # noqa: E402
from lib.writing import atomic_write, make_folders  # noqa: E402

COLORS = {'red': (40, 40, 220), 'green': (50, 170, 50), 'blue': (220, 80, 30), 'yellow': (30, 220, 240),
          'purple': (160, 40, 140), 'orange': (20, 130, 250)}  # BGR
SHAPES = ('circle', 'square', 'triangle', 'star')
BACKGROUNDS = {'white': (250, 250, 250), 'black': (15, 15, 15), 'grey': (128, 128, 128)}
TEMPLATES = ('{a} {c} {s} on a {b} background', 'a picture of {a} {c} {s}', 'a {s} that is {c}',
             'one {c} {s} in the middle of a {b} image', 'a {b} background with {a} {c} {s}')


def draw_shape(image, shape, color, centre, radius):
    x, y = centre
    if shape == 'circle':
        cv2.circle(image, centre, radius, color, -1, cv2.LINE_AA)
        return
    if shape == 'square':
        points = [(x - radius, y - radius), (x + radius, y - radius), (x + radius, y + radius), (x - radius, y + radius)]
    else:
        # triangle: 3 corners; star: 10 corners, every other one pulled inwards
        k = np.arange(3 if shape == 'triangle' else 10)
        angles = -np.pi / 2 + 2 * np.pi * k / len(k)
        radii = radius * (np.where(k % 2, 0.45, 1.0) if shape == 'star' else 1.0)
        points = np.stack([x + radii * np.cos(angles), y + radii * np.sin(angles)], 1)
    cv2.fillPoly(image, [np.round(np.asarray(points)).astype(np.int32)], color, cv2.LINE_AA)


def make_image(rng, color, shape, background):
    h, w = int(rng.integers(96, 160)), int(rng.integers(96, 160))
    image = np.full((h, w, 3), BACKGROUNDS[background], np.uint8)
    radius = int(min(h, w) * rng.uniform(0.25, 0.35))
    # keep the shape inside the centre crop that the extractor's preprocessing takes
    centre = (int(w / 2 + rng.uniform(-0.1, 0.1) * w), int(h / 2 + rng.uniform(-0.1, 0.1) * h))
    draw_shape(image, shape, COLORS[color], centre, radius)
    return image


def make_split(folder, captions_path, rng, copies):
    make_folders(folder)
    pairs = [(c, s) for c in COLORS for s in SHAPES for _ in range(copies)]
    order = rng.permutation(len(pairs))
    captions = []
    for n, p in enumerate(order):
        color, shape = pairs[p]
        background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
        # cv2.imwrite reports a failed write (a full disk) only by returning False
        with atomic_write(os.path.join(folder, f'{n:04d}.png'), 'wb', what='image') as f:
            f.write(cv2.imencode('.png', make_image(rng, color, shape, background))[1].tobytes())
        article = 'an' if color[0] in 'aeiou' else 'a'
        captions += [t.format(a=article, c=color, s=shape, b=background) for t in TEMPLATES]
    with atomic_write(captions_path, 'w', encoding='utf-8') as f:
        f.write('\n'.join(captions) + '\n')
    return len(order)


@exit_on_user_error
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=arguments.HelpFormatter)
    p.add_argument('--out', required=True, help='output folder')
    p.add_argument('--per_pair', type=int, default=10, help='training images per (colour, shape) pair')
    p.add_argument('--seed', type=int, default=0, help='seed of the drawing (positions, sizes, captions)')
    args = p.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    for split, copies in (('train', args.per_pair), ('dev', 1), ('test', 1)):
        n = make_split(os.path.join(args.out, split), os.path.join(args.out, f'{split}_caps.txt'), rng, copies)
        print(f'{os.path.join(args.out, split)}: {n} images, {os.path.join(args.out, split + "_caps.txt")}')


if __name__ == '__main__':
    main()
