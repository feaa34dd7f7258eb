"""The built-in demo set: synthetic region features in the precomp layout, with captions that
name what the regions encode.

Every image shows a scene and one to three objects, each with a colour. A region vector is the
sum of fixed random prototypes (object + colour, or scene) plus noise; other regions are noise.
Captions describe the scene and some of the objects, so images that share objects or scenes
but differ in colours are hard negatives. Generation is deterministic (fixed seed).
"""
import json
import os

import numpy as np

from lib.writing import atomic_write, make_folders

OBJECTS = ['dog', 'cat', 'horse', 'bird', 'man', 'woman', 'child', 'car', 'bicycle', 'boat', 'ball', 'umbrella']
COLORS = ['red', 'blue', 'green', 'black', 'white', 'yellow', 'brown', 'orange']
SCENES = ['beach', 'street', 'park', 'kitchen', 'field', 'forest', 'lake', 'snow']

SPLITS = {'train': 1000, 'dev': 500, 'test': 1000}
N_REGIONS = 16
FEATURE_SIZE = 512
NOISE = 1.0
SEED = 1234
RECIPE_FILE = 'recipe.json'

TEMPLATES_ONE = ['a {c0} {o0} in the {s}', 'a photo of a {c0} {o0} at the {s}', 'there is a {c0} {o0} near the {s}',
                 'the {s} with a {c0} {o0}', 'a {o0} that is {c0} in a {s}']
TEMPLATES_TWO = ['a {c0} {o0} and a {c1} {o1} in the {s}', 'a {c1} {o1} next to a {c0} {o0} at the {s}',
                 'the {s} with a {c0} {o0} and a {c1} {o1}', 'a {o0} and a {o1} in a {s}, the {o0} is {c0}',
                 'a {c0} {o0} near a {o1} in the {s}']


def _image(rng):
    n_obj = int(rng.integers(1, 4))
    objects = rng.choice(len(OBJECTS), n_obj, replace=False)
    colors = rng.integers(0, len(COLORS), n_obj)
    return int(rng.integers(len(SCENES))), list(objects), list(colors)


def _regions(rng, protos, scene, objects, colors):
    obj_p, col_p, scene_p = protos
    feats = NOISE * rng.standard_normal((N_REGIONS, FEATURE_SIZE))
    slots = rng.permutation(N_REGIONS)
    feats[slots[:2]] += scene_p[scene]                      # two scene regions
    for j, (o, c) in enumerate(zip(objects, colors)):      # two regions per object
        feats[slots[2 + 2 * j:4 + 2 * j]] += obj_p[o] + col_p[c]
    return np.maximum(feats, 0)  # BUTD features are post-ReLU, non-negative


def _captions(rng, scene, objects, colors):
    words = [(OBJECTS[o], COLORS[c]) for o, c in zip(objects, colors)]
    out = []
    for _ in range(5):
        if len(words) == 1 or rng.random() < 0.3:
            (o0, c0), = [words[int(rng.integers(len(words)))]]
            t = TEMPLATES_ONE[int(rng.integers(len(TEMPLATES_ONE)))]
            out.append(t.format(o0=o0, c0=c0, s=SCENES[scene]))
        else:
            i, j = rng.choice(len(words), 2, replace=False)
            t = TEMPLATES_TWO[int(rng.integers(len(TEMPLATES_TWO)))]
            out.append(t.format(o0=words[i][0], c0=words[i][1], o1=words[j][0], c1=words[j][1], s=SCENES[scene]))
    return out


def make_demo(folder, sizes=None):
    """Write <folder>/{train,dev,test}_{ims.npy,caps.txt} (`sizes`: images per split, default
    SPLITS; tests use smaller ones). Returns the folder."""
    rng = np.random.default_rng(SEED)
    protos = (rng.standard_normal((len(OBJECTS), FEATURE_SIZE)), rng.standard_normal((len(COLORS), FEATURE_SIZE)),
              rng.standard_normal((len(SCENES), FEATURE_SIZE)))
    make_folders(folder, 'the demo data folder')
    for split, n in (sizes or SPLITS).items():
        feats = np.empty((n, N_REGIONS, FEATURE_SIZE), np.float32)
        caps = []
        for i in range(n):
            scene, objects, colors = _image(rng)
            feats[i] = _regions(rng, protos, scene, objects, colors)
            caps += _captions(rng, scene, objects, colors)
        # each file written then renamed, so an interrupted first run never leaves half a file
        with atomic_write(os.path.join(folder, f'{split}_ims.npy'), 'wb', what='the demo set') as f:
            np.save(f, feats)
        with atomic_write(os.path.join(folder, f'{split}_caps.txt'), 'w', what='the demo set') as f:
            f.write('\n'.join(caps) + '\n')
    # written last: an interrupted build leaves no stamp and is redone by ensure_demo
    with atomic_write(os.path.join(folder, RECIPE_FILE), 'w', what='the demo set') as f:
        f.write(recipe())
    return folder


def recipe():
    """How the demo set is generated (not its sizes, which tests choose); stored beside it so that
    a set made by an older recipe (another NOISE, say) is rebuilt instead of silently reused."""
    return json.dumps({'n_regions': N_REGIONS, 'feature_size': FEATURE_SIZE, 'noise': NOISE, 'seed': SEED},
                      sort_keys=True)


def ensure_demo(data_path):
    """Create data_path/demo_precomp on first use, and again when the recipe has changed."""
    folder = os.path.join(data_path, 'demo_precomp')
    stamp = os.path.join(folder, RECIPE_FILE)
    files = [os.path.join(folder, f'{s}_{k}') for s in SPLITS for k in ('ims.npy', 'caps.txt')]
    current = all(os.path.isfile(f) for f in files) and os.path.isfile(stamp)
    if current:
        with open(stamp) as f:
            current = f.read() == recipe()
    if not current:
        print(f'creating the demo set in {folder} (deterministic, a few seconds)')
        make_demo(folder)
    return folder
