"""Search a gallery with a trained model: text-to-image (--query) or image-to-text (--image).

    python search.py --checkpoint runs/demo/model_best.pth --query "a dog on a beach" --k 5

The gallery is a split of a precomp set (default: the checkpoint's dataset, its test split). Its
image and caption embeddings are computed once and cached next to the checkpoint; the cache is
keyed on the checkpoint's and the split files' paths, sizes and modification times, so a changed
checkpoint or split is re-encoded, never served stale. With --image_dir (the split's images,
listed by <split>_images.txt of tools/extract_features.py or in sorted file-name order) a
contact sheet of the query and its top-k images is written to --sheet.
"""
import argparse
import json
import os
import sys
import textwrap
from types import SimpleNamespace

import cv2
import numpy as np

import arguments
from lib.data import (PrecompSplit, TextSpec, captions_per_image, load_captions, load_images, split_files,
                      tokenize_captions)
from lib.distributed import pick_device
from lib.errors import UserError, exit_on_user_error
from lib.encoding import encode_captions, encode_images
from lib.images import gallery_files, thumbnail
from lib.loading import model_from_checkpoint, read_model_file, saved_options, text_model_of
from lib.text_model import load_tokenizer
from lib.writing import atomic_write, make_folders

# contact sheet layout (pixels)
MARGIN = 10
LABEL_H = 26
LINE_H = 22
FONT, FONT_SCALE = cv2.FONT_HERSHEY_SIMPLEX, 0.5
BACKGROUND, INK = (255, 255, 255), (20, 20, 20)


def info(message):
    # stdout stays clean for --json
    print(message, file=sys.stderr)


# ----------------------------------------------------------------------------- gallery cache

def file_stamp(path):
    st = os.stat(path)
    return {'path': os.path.abspath(path), 'size': st.st_size, 'mtime_ns': st.st_mtime_ns}


def cache_file(checkpoint, dataset, split):
    stem = os.path.splitext(os.path.basename(checkpoint))[0]
    return os.path.join(os.path.dirname(os.path.abspath(checkpoint)), f'{stem}.search_{dataset}_{split}.npz')


def cache_key(checkpoint, ims_path, caps_path, bert_path):
    return json.dumps({'checkpoint': file_stamp(checkpoint), 'images': file_stamp(ims_path),
                       'captions': file_stamp(caps_path), 'bert_path': bert_path}, sort_keys=True)


def read_cache(path, key):
    """(image embeddings, caption embeddings) when the cache matches key, else None."""
    if not os.path.isfile(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z['key']) != key:
                return None
            return z['images'], z['captions']
    except (OSError, ValueError, KeyError) as err:
        info(f'warning: ignoring unreadable search cache {path} ({err})')
        return None


def write_cache(path, key, img_emb, cap_emb):
    """The cache is an optimisation: a failed write is a warning, and leaves no file behind."""
    try:
        with atomic_write(path, 'wb', what='the search cache') as f:
            np.savez(f, key=np.array(key), images=img_emb, captions=cap_emb)
    except UserError as err:
        info(f'warning: {err}; the next search encodes the gallery again')


class Session:
    """The checkpoint, its options and (built on first use) its model and tokenizer."""

    def __init__(self, checkpoint, device, bert_path):
        self.path, self.device = checkpoint, device
        self.ckpt = read_model_file(checkpoint)
        self.options = saved_options(self.ckpt)
        self.bert_path = text_model_of(checkpoint, self.ckpt, bert_path)
        self._model = self._tokenizer = None

    @property
    def model(self):
        if self._model is None:
            model, _ = model_from_checkpoint(self.ckpt, self.path, self.bert_path)
            self._model = model.to(self.device).eval()
        return self._model

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.bert_path)
        return self._tokenizer

    def encode_texts(self, texts, batch_size=128):
        # the gallery's own caption path (tokenisation, [CLS]/[SEP], no augmentation)
        batch = SimpleNamespace(tokens=tokenize_captions(self.tokenizer, texts), text=TextSpec(self.tokenizer))
        return encode_captions(self.model, batch, self.device, batch_size)


def gallery(session, data_path, dataset, split, batch_size):
    """-> (image embeddings (N, E), caption embeddings (M, E), captions, captions per image)."""
    ims_path, caps_path = split_files(data_path, dataset, split)
    images, captions = load_images(ims_path), load_captions(caps_path)
    path = cache_file(session.path, dataset, split)
    key = cache_key(session.path, ims_path, caps_path, session.bert_path)
    cached = read_cache(path, key)
    if cached is not None and cached[0].shape[0] <= len(images) and cached[1].shape[0] <= len(captions):
        img_emb, cap_emb = cached
        info(f'gallery: {len(img_emb)} images of {ims_path} (cached in {path})')
    else:
        info(f'encoding the gallery {ims_path} ({len(images)} images, {len(captions)} captions) once; '
             f'cached in {path}')
        split_data = PrecompSplit(data_path, dataset, split, session.tokenizer, show_progress=True)
        if split_data.feature_size != session.model.img_dim:
            raise UserError(f'{ims_path} has {split_data.feature_size}-d region features; {session.path} '
                            f'expects {session.model.img_dim}-d (extract them with the same backbone)')
        img_emb = encode_images(session.model, split_data.images, session.device, batch_size)
        cap_emb = encode_captions(session.model, split_data, session.device, batch_size)
        write_cache(path, key, img_emb, cap_emb)
    captions = captions[:len(cap_emb)]  # PrecompSplit caps dev at 5000 captions
    return img_emb, cap_emb, captions, captions_per_image(len(img_emb), len(captions), caps_path, ims_path)


def top_k(scores, k):
    order = np.argsort(-scores, kind='stable')[:k]
    return order, scores[order]


# ----------------------------------------------------------------------------- contact sheet

def wrap(text, width_px):
    """Lines of text that fit width_px in the sheet's font (ASCII only: Hershey fonts)."""
    text = text.encode('ascii', 'replace').decode()
    char_w = cv2.getTextSize('n', FONT, FONT_SCALE, 1)[0][0]
    return textwrap.wrap(text, max(8, width_px // char_w)) or ['']


def contact_sheet(header, cells, thumb):
    """header: text lines; cells: (image path, label) shown left to right as thumb x thumb squares."""
    width = len(cells) * (thumb + MARGIN) + MARGIN
    lines = [piece for line in header for piece in wrap(line, width - 2 * MARGIN)]
    top = MARGIN + LINE_H * len(lines)
    sheet = np.full((top + MARGIN + thumb + LABEL_H, width, 3), BACKGROUND, np.uint8)
    for i, line in enumerate(lines):
        cv2.putText(sheet, line, (MARGIN, MARGIN + LINE_H * (i + 1) - 6), FONT, FONT_SCALE, INK, 1, cv2.LINE_AA)
    for j, (path, label) in enumerate(cells):
        x, y = MARGIN + j * (thumb + MARGIN), top + MARGIN
        sheet[y:y + thumb, x:x + thumb] = thumbnail(path, thumb)
        cv2.putText(sheet, label, (x, y + thumb + LABEL_H - 8), FONT, FONT_SCALE, INK, 1, cv2.LINE_AA)
    return sheet


def write_sheet(path, sheet):
    make_folders(os.path.dirname(os.path.abspath(path)))
    ok, png = cv2.imencode('.png', sheet)
    if not ok:
        raise UserError(f'could not encode the contact sheet as PNG for {path}')
    with atomic_write(path, 'wb', what='the contact sheet') as f:
        f.write(png.tobytes())


# ----------------------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=arguments.HelpFormatter)
    p.add_argument('--checkpoint', required=True, help='model_best.pth of a run (ours or the authors\')')
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument('--query', help='text to search the gallery images with')
    what.add_argument('--image', type=int, help='index of a gallery image to search the captions with')
    p.add_argument('--k', type=int, default=5, help='results to show')
    p.add_argument('--data_path', default=None, help="folder that holds <dataset>_precomp/; when not given: the checkpoint's")
    p.add_argument('--dataset', default=None, help="dataset of the gallery; when not given: the checkpoint's")
    p.add_argument('--split', default=None, help="split of the gallery; when not given: the dataset's test split (COCO: testall)")
    p.add_argument('--bert_path', default=None, help="text model folder; when not given: the checkpoint's")
    p.add_argument('--device', default=None, help='cuda, cuda:N or cpu; when not given: cuda when present, else cpu')
    p.add_argument('--batch_size', type=int, default=128, help='batch size of encoding the gallery')
    p.add_argument('--json', action='store_true', help='print the results as one JSON document')
    p.add_argument('--image_dir', default=None, help='the split\'s images: also write a contact sheet')
    p.add_argument('--sheet', default=None,
                   help='contact sheet file; when not given: contact_sheet.png next to the checkpoint')
    p.add_argument('--thumb', type=int, default=160, help='thumbnail size of the contact sheet in pixels')
    args = p.parse_args(argv)
    if args.k < 1 or args.thumb < 16 or args.batch_size < 1:
        p.error('--k and --batch_size must be >= 1, --thumb >= 16')
    if args.query is not None and not args.query.strip():
        p.error('--query is empty')
    return args


@exit_on_user_error
def main(argv=None):
    opts = parse_args(argv)
    session = Session(opts.checkpoint, pick_device(opts.device), opts.bert_path)
    dataset = opts.dataset or session.options['dataset']
    data_path = opts.data_path or session.options['data_path']
    split = opts.split or arguments.test_split_of(dataset)
    img_emb, cap_emb, captions, per_image = gallery(session, data_path, dataset, split, opts.batch_size)
    k = min(opts.k, len(img_emb) if opts.query is not None else len(cap_emb))
    files = None
    if opts.image_dir:
        files = gallery_files(opts.image_dir, os.path.dirname(split_files(data_path, dataset, split)[0]),
                              split, len(img_emb))

    def name(i):
        return os.path.basename(files[i]) if files else None

    def own_captions(i):
        return captions[i * per_image:(i + 1) * per_image]

    if opts.query is not None:
        order, scores = top_k(img_emb @ session.encode_texts([opts.query])[0], k)
        results = [{'rank': r + 1, 'image': int(i), 'file': name(i), 'score': float(s), 'captions': own_captions(i)}
                   for r, (i, s) in enumerate(zip(order, scores))]
        header = [f'query: "{opts.query}"']
        cells = [(files[r['image']] if files else None, f"#{r['rank']}  {r['score']:.3f}") for r in results]
    else:
        if not 0 <= opts.image < len(img_emb):
            raise UserError(f'--image {opts.image} is outside the gallery (0 .. {len(img_emb) - 1})')
        order, scores = top_k(cap_emb @ img_emb[opts.image], k)
        results = [{'rank': r + 1, 'caption': int(c), 'image': int(c) // per_image, 'file': name(int(c) // per_image),
                    'score': float(s), 'text': captions[c], 'ground_truth': int(c) // per_image == opts.image}
                   for r, (c, s) in enumerate(zip(order, scores))]
        header = [f"#{r['rank']} {r['score']:.3f}{' (gt)' if r['ground_truth'] else ''}: {r['text']}" for r in results]
        cells = [(files[opts.image] if files else None, 'query')]
        cells += [(files[r['image']] if files else None, f"#{r['rank']}  {r['score']:.3f}") for r in results]

    sheet_path = None
    if files:
        sheet_path = opts.sheet or os.path.join(os.path.dirname(opts.checkpoint), 'contact_sheet.png')
        write_sheet(sheet_path, contact_sheet(header, cells, opts.thumb))
        info(f'contact sheet: {sheet_path}')

    if opts.json:
        doc = {'checkpoint': opts.checkpoint, 'dataset': dataset, 'split': split, 'n_images': len(img_emb),
               'mode': 'text' if opts.query is not None else 'image',
               'query': opts.query if opts.query is not None else opts.image,
               'k': k, 'results': results, 'sheet': sheet_path}
        print(json.dumps(doc, indent=2))
        return doc
    if opts.query is not None:
        print(f'query: "{opts.query}" ({dataset} {split}, {len(img_emb)} images)')
        for r in results:
            print(f"{r['rank']:>3}. image {r['image']}{' (' + r['file'] + ')' if r['file'] else ''}  score {r['score']:.4f}")
            for c in r['captions']:
                print(f'       {c}')
    else:
        print(f'query: image {opts.image}{" (" + name(opts.image) + ")" if files else ""} '
              f'({dataset} {split}); its captions:')
        for c in own_captions(opts.image):
            print(f'       {c}')
        for r in results:
            mark = ' ground truth' if r['ground_truth'] else ''
            print(f"{r['rank']:>3}. score {r['score']:.4f}  caption {r['caption']} (image {r['image']}{mark}): {r['text']}")
    return {'results': results, 'sheet': sheet_path}


if __name__ == '__main__':
    main()
