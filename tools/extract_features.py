"""Turn a folder of images and their captions into the precomp layout that train.py and eval.py read.

    python tools/extract_features.py --images DIR --captions FILE --out data/<name>_precomp --split test

Regions are the cells of a torchvision ResNet's last convolutional grid (2048 channels for
ResNet-50 and deeper, 512 for ResNet-18/34). At the standard 224 px crop that grid is 7x7; it is
average-pooled to --grid x --grid cells (default 6x6 = 36 regions, the region count of the BUTD
features the method was designed and tuned for; --grid 7 keeps the native cells). Values are
post-ReLU, non-negative, like BUTD features. Preprocessing is the one of the backbone's torchvision
weights (resize, centre crop, ImageNet mean/std), also with --weights none (a random backbone).

Captions: five lines per image, images in sorted file-name order (or in the order of --index).
Writes <out>/<split>_ims.npy (float32, N x regions x channels, written batch by batch into a
memory-mapped file), <out>/<split>_caps.txt and <out>/<split>_images.txt (the file names of the
images kept, in order: search.py uses it to show the images).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import arguments  # noqa: E402
from lib.data import load_captions  # noqa: E402
from lib.distributed import pick_device  # noqa: E402
from lib.errors import UserError, exit_on_user_error  # noqa: E402
from lib.writing import make_folders, reported, reserve  # noqa: E402
from lib.images import list_images, read_image  # noqa: E402

CAPTIONS_PER_IMAGE = 5
BACKBONES = ('resnet18', 'resnet34', 'resnet50', 'resnet101', 'resnet152',
             'resnext50_32x4d', 'resnext101_32x8d', 'wide_resnet50_2', 'wide_resnet101_2')
COPY_CHUNK = 256  # images per block when compacting the array after skipped images


def read_index(path):
    if not os.path.isfile(path):
        raise UserError(f'--index {path} does not exist')
    with open(path, encoding='utf-8') as f:
        return [line.strip() for line in f if line.strip()]


class ImageFiles(torch.utils.data.Dataset):
    """(index, preprocessed CHW float tensor or None when unreadable)."""

    def __init__(self, paths, transform):
        self.paths, self.transform = paths, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        bgr = read_image(self.paths[i])
        if bgr is None:
            return i, None
        rgb = torch.from_numpy(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)).permute(2, 0, 1)
        return i, self.transform(rgb)


def collate(items):
    good = [(i, x) for i, x in items if x is not None]
    bad = [i for i, x in items if x is None]
    if not good:
        return None, None, bad
    return [i for i, _ in good], torch.stack([x for _, x in good]), bad


def build_backbone(name, weights):
    """-> (ResNet trunk without pooling and classifier, its channel count, the weights' preprocessing)."""
    import torchvision
    if name not in BACKBONES:
        raise UserError(f'--backbone {name} is not supported; choose one of {", ".join(BACKBONES)}')
    pretrained = torchvision.models.get_model_weights(name).DEFAULT
    try:
        model = torchvision.models.get_model(name, weights=pretrained if weights == 'default' else None)
    except (OSError, RuntimeError) as err:
        cached = os.path.join(torch.hub.get_dir(), 'checkpoints', os.path.basename(pretrained.url))
        raise UserError(f'could not load the pretrained {name} weights ({type(err).__name__}: {err}). '
                        f'Without network access, copy {pretrained.url} to {cached}, '
                        'or pass --weights none for a random backbone') from err
    trunk = torch.nn.Sequential(*list(model.children())[:-2])  # drop global pooling and fc
    return trunk, model.fc.in_features, pretrained.transforms()


def grid_regions(trunk, images, grid):
    """(B, 3, H, W) -> (B, grid * grid, C): the last conv map pooled to grid x grid, row-major."""
    fmap = trunk(images)
    if min(fmap.shape[-2:]) < grid:
        raise UserError(f'--grid {grid} is larger than the backbone\'s {fmap.shape[-2]}x{fmap.shape[-1]} '
                        'feature map; use a smaller --grid')
    return torch.nn.functional.adaptive_avg_pool2d(fmap, grid).flatten(2).transpose(1, 2)


def check_outputs(out, split, overwrite):
    targets = [os.path.join(out, f'{split}_{k}') for k in ('ims.npy', 'caps.txt', 'images.txt')]
    existing = [t for t in targets if os.path.exists(t)]
    if existing and not overwrite:
        raise UserError(f'{existing[0]} already exists; pick another --out / --split or pass --overwrite')
    return targets


def compact(path, keep_rows, shape):
    """Copy the first keep_rows rows of a .npy file into a new file, block by block."""
    src = np.load(path, mmap_mode='r')
    dst_path = path + '.compact'
    dst = np.lib.format.open_memmap(dst_path, mode='w+', dtype=np.float32, shape=(keep_rows,) + shape)
    with open(dst_path, 'r+b') as f:
        reserve(f, os.path.getsize(dst_path))
    for start in range(0, keep_rows, COPY_CHUNK):
        end = min(start + COPY_CHUNK, keep_rows)
        dst[start:end] = src[start:end]
    dst.flush()
    del src, dst
    os.replace(dst_path, path)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=arguments.HelpFormatter)
    p.add_argument('--images', required=True, help='folder of JPEG/PNG images')
    p.add_argument('--captions', required=True,
                   help='text file, five captions per image, images in sorted file-name order (or --index order)')
    p.add_argument('--out', required=True, help='output folder, e.g. data/<name>_precomp (then --dataset <name>)')
    p.add_argument('--split', default='test', help='split name: train, dev, test, ...')
    p.add_argument('--index', default=None, help='file listing the image file names (relative to --images), '
                                                  'one per line, in caption order')
    p.add_argument('--backbone', default='resnet50', choices=BACKBONES,
                   help='torchvision ResNet whose last convolutional grid gives the regions')
    p.add_argument('--weights', default='default', choices=['default', 'none'],
                   help="'default': torchvision's pretrained ImageNet weights; 'none': random weights")
    p.add_argument('--grid', type=int, default=6, help='regions = grid x grid cells of the last conv map')
    p.add_argument('--batch_size', type=int, default=32, help='images per forward pass')
    p.add_argument('--workers', type=int, default=min(4, os.cpu_count() or 1), help='image decoding processes')
    p.add_argument('--on_error', default='fail', choices=['fail', 'skip'],
                   help='an unreadable image stops the run, or is skipped together with its captions')
    p.add_argument('--device', default=None, help='cuda, cuda:N or cpu; when not given: cuda when present, else cpu')
    p.add_argument('--seed', type=int, default=0, help='seed of the random backbone (--weights none)')
    p.add_argument('--overwrite', action='store_true', help='replace an existing split in --out')
    args = p.parse_args(argv)
    if args.grid < 1 or args.batch_size < 1 or args.workers < 0:
        p.error('--grid and --batch_size must be >= 1, --workers >= 0')
    return args


@exit_on_user_error
def main(argv=None):
    args = parse_args(argv)
    names = read_index(args.index) if args.index else list_images(args.images)
    if not names:
        raise UserError(f'no images to extract: {args.index or args.images} lists no .jpg/.jpeg/.png file')
    captions = load_captions(args.captions)
    if len(captions) != CAPTIONS_PER_IMAGE * len(names):
        order = f'the order of --index {args.index}' if args.index else f'sorted file-name order of {args.images}'
        raise UserError(f'{args.captions} has {len(captions)} captions for {len(names)} images; it needs '
                        f'exactly {CAPTIONS_PER_IMAGE} lines per image, images in {order}')
    ims_path, caps_path, list_path = check_outputs(args.out, args.split, args.overwrite)

    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    trunk, channels, transform = build_backbone(args.backbone, args.weights)
    trunk = trunk.to(device).eval()
    loader = torch.utils.data.DataLoader(ImageFiles([os.path.join(args.images, n) for n in names], transform),
                                         batch_size=args.batch_size, num_workers=args.workers,
                                         collate_fn=collate, pin_memory=device.type == 'cuda')
    shape = (args.grid * args.grid, channels)
    make_folders(args.out, 'the output folder')
    tmp = ims_path + '.partial'
    kept, skipped = [], []
    try:
        with reported(ims_path, 'features'):  # the array's room is reserved: no SIGBUS later
            # the array lives on disk: a large collection never needs to fit in RAM
            feats = np.lib.format.open_memmap(tmp, mode='w+', dtype=np.float32, shape=(len(names),) + shape)
            with open(tmp, 'r+b') as f:
                reserve(f, os.path.getsize(tmp))
        bar = tqdm(loader, desc=f'{args.backbone} on {device}', unit='batch', dynamic_ncols=True)
        with torch.inference_mode():
            for index, images, bad in bar:
                for i in bad:
                    path = os.path.join(args.images, names[i])
                    if args.on_error == 'fail':
                        raise UserError(f'cannot read image {path} (missing, empty or not a JPEG/PNG that '
                                        'OpenCV decodes); fix or remove it, or pass --on_error skip')
                    tqdm.write(f'warning: skipping unreadable image {path} and its {CAPTIONS_PER_IMAGE} captions',
                               file=sys.stderr)
                    skipped.append(names[i])
                if images is None:
                    continue
                regions = grid_regions(trunk, images.to(device, non_blocking=True), args.grid)
                feats[len(kept):len(kept) + len(index)] = regions.float().cpu().numpy()
                kept.extend(index)
                bar.set_postfix(skipped=len(skipped))
        with reported(ims_path, 'features'):
            feats.flush()
            del feats
            if not kept:
                raise UserError(f'none of the {len(names)} images could be read; nothing was written')
            if skipped:
                compact(tmp, len(kept), shape)
            kept_captions = [c for i in kept for c in captions[CAPTIONS_PER_IMAGE * i:CAPTIONS_PER_IMAGE * (i + 1)]]
            for path, lines in ((caps_path, kept_captions), (list_path, [names[i] for i in kept])):
                with open(path + '.partial', 'w', encoding='utf-8') as f:
                    f.write('\n'.join(lines) + '\n')
            for path in (ims_path, caps_path, list_path):  # all three appear together, or none
                os.replace(path + '.partial', path)
    finally:
        for path in (ims_path, caps_path, list_path):
            for leftover in (path + '.partial', path + '.partial.compact'):
                if os.path.exists(leftover):
                    os.unlink(leftover)
    print(f'wrote {ims_path} ({len(kept)}, {shape[0]}, {shape[1]}) float32, {caps_path} '
          f'({len(kept_captions)} captions), {list_path}')
    if skipped:
        print(f'skipped {len(skipped)} unreadable image(s): {", ".join(skipped)}', file=sys.stderr)


if __name__ == '__main__':
    main()
