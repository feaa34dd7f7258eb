"""Training data loader throughput: this project's loader (lib/loader.py) beside the authors'
dataset + collate (reimplemented below from their release, marked), on the same held-out data.

Writes --images images of --regions x --img_dim float32 regions in the precomp layout to a
temporary folder (five captions per image, drawn from the BERT uncased vocabulary's whole words,
lengths like Flickr30K's: 6 to ~80 word pieces, median ~13), then times whole epochs of batches
of --batch_size with the paper's augmentation, for each --workers value. No model: samples/s is
what the loader alone delivers. Prints one line per (loader, workers).

    python bench/loader.py                       # 2,000 images, batch 128, workers 0 and 2
"""
import argparse
import json
import os
import random
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import arguments  # noqa: E402
from lib.data import PrecompSplit  # noqa: E402
from lib.distributed import DistEnv  # noqa: E402
from lib.loader import make_loader  # noqa: E402
from lib.text_model import DEMO_TEXT_MODEL, load_tokenizer  # noqa: E402


def write_data(folder, o, tokenizer):
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(folder, 'bench_precomp'))
    ims = np.lib.format.open_memmap(os.path.join(folder, 'bench_precomp', 'train_ims.npy'), 'w+', np.float32,
                                    (o.images, o.regions, o.img_dim))
    for s in range(0, o.images, 250):  # in chunks: the array need not fit in memory
        ims[s:s + 250] = rng.random((len(ims[s:s + 250]), o.regions, o.img_dim), dtype=np.float32)
    ims.flush()
    del ims
    words = [w for w in tokenizer.get_vocab() if w.isalpha() and w.islower() and len(w) > 2]
    # caption lengths in words: Flickr30K's run from ~5 to ~70 words, most 8 to 18
    lengths = np.clip(rng.lognormal(np.log(12), 0.35, 5 * o.images).astype(int), 5, 70)
    caps = [' '.join(rng.choice(words, n)) + ' .' for n in lengths]
    with open(os.path.join(folder, 'bench_precomp', 'train_caps.txt'), 'w') as f:
        f.write('\n'.join(caps) + '\n')


# ------------------------------------------------------------------------------------------------
# THE AUTHORS' LOADER, reimplemented for comparison (not used by this project): their
# PrecompRegionDataset.__getitem__ and collate_fn (HREM / VSE-infinity data.py). Per item: the
# caption split into words and each word into pieces (their basic_tokenizer + wordpiece_tokenizer,
# which transformers 5 removed; the fast tokenizer's pre-tokenizer and tokenize() stand in), one
# random.random() per word, a random vocabulary token by random.choice(list(vocab)), regions dropped
# with np.random.rand(n) > 0.2, torch.Tensor copies; collate sorts by caption length and pads.
class AuthorsPrecompDataset(torch.utils.data.Dataset):
    def __init__(self, folder, tokenizer):
        with open(os.path.join(folder, 'train_caps.txt')) as f:
            self.captions = [line.strip() for line in f]
        self.images = np.load(os.path.join(folder, 'train_ims.npy'), mmap_mode='r')
        self.tokenizer = tokenizer
        self.vocab = tokenizer.get_vocab()
        self.im_div = 5

    def __len__(self):
        return len(self.captions)

    def basic_tokenize(self, text):
        backend = self.tokenizer.backend_tokenizer
        return [w for w, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(text))]

    def process_caption(self, tokens):
        output, deleted = [], []
        for token in tokens:
            sub_tokens = self.tokenizer.tokenize(token)
            prob = random.random()
            if prob < 0.20:
                prob /= 0.20
                if prob < 0.5:
                    output += ['[MASK]'] * len(sub_tokens)
                elif prob < 0.6:
                    output += [random.choice(list(self.vocab.keys())) for _ in sub_tokens]
                else:
                    for sub_token in sub_tokens:
                        output.append(sub_token)
                        deleted.append(len(output) - 1)
            else:
                output += sub_tokens
        if deleted:
            output = [output[i] for i in range(len(output)) if i not in deleted]
        return torch.Tensor(self.tokenizer.convert_tokens_to_ids(['[CLS]'] + output + ['[SEP]']))

    def __getitem__(self, index):
        img_index = index // self.im_div
        target = self.process_caption(self.basic_tokenize(self.captions[index]))
        image = self.images[img_index]
        image = image[np.where(np.random.rand(image.shape[0]) > 0.20)]
        return torch.Tensor(image), target, index, img_index


def authors_collate_fn(data):
    data.sort(key=lambda x: len(x[1]), reverse=True)
    images, captions, ids, img_ids = zip(*data)
    img_lengths = [len(image) for image in images]
    all_images = torch.zeros(len(images), max(img_lengths), images[0].size(-1))
    for i, image in enumerate(images):
        all_images[i, :img_lengths[i]] = image[:img_lengths[i]]
    lengths = [len(cap) for cap in captions]
    targets = torch.zeros(len(captions), max(lengths)).long()
    for i, cap in enumerate(captions):
        targets[i, :lengths[i]] = cap[:lengths[i]]
    return all_images, torch.Tensor(img_lengths), targets, lengths, ids
# ------------------------------------------------------------------------------------------------


def ours(folder, o, workers, tokenizer):
    split = PrecompSplit(folder, 'bench', 'train', tokenizer)
    args = argparse.Namespace(seed=0, size_augment=1, text_augment=1, batch_size=o.batch_size, workers=workers)
    loader, dataset, sampler = make_loader(split, args, DistEnv(0, 1, 0, torch.device('cpu')))
    return loader, lambda epoch: (sampler.set_epoch(epoch), dataset.set_epoch(epoch))


def authors(folder, o, workers, tokenizer):
    dataset = AuthorsPrecompDataset(os.path.join(folder, 'bench_precomp'), tokenizer)
    loader = torch.utils.data.DataLoader(dataset, batch_size=o.batch_size, shuffle=True, num_workers=workers,
                                         collate_fn=authors_collate_fn, drop_last=True)
    return loader, lambda epoch: None


def measure(build, folder, o, workers, tokenizer):
    """Median samples/s of --epochs epochs (one more first, untimed: page cache), each timed
    from its first batch on."""
    loader, set_epoch = build(folder, o, workers, tokenizer)
    rates = []
    for epoch in range(o.epochs + 1):
        set_epoch(epoch)
        n, start = -1, None
        for batch in loader:
            if start is None:  # timed from the first batch: workers' start-up (once per epoch) left out
                n, start = 0, time.perf_counter()
                continue
            n += len(batch['caption_ids']) if isinstance(batch, dict) else len(batch[4])
            if o.max_batches and n >= o.max_batches * o.batch_size:
                break
        if epoch:
            rates.append(n / (time.perf_counter() - start))
    return float(np.median(rates))


def copy_floor(o, repeat=20):
    """samples/s of one plain copy of a batch's bytes (memory to memory, one thread): no loader
    that hands over a batch in new memory can beat it; shows how loaded the machine is."""
    src = np.random.default_rng(0).random((o.batch_size * o.regions, o.img_dim), dtype=np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - start)
    return o.batch_size / float(np.median(times))


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=arguments.HelpFormatter)
    p.add_argument('--images', type=int, default=2000, help='images written (five captions each)')
    p.add_argument('--regions', type=int, default=36, help='regions per image')
    p.add_argument('--img_dim', type=int, default=2048, help='region feature size')
    p.add_argument('--batch_size', type=int, default=128, help='captions per batch')
    p.add_argument('--workers', type=int, nargs='+', default=[0, 2], help='DataLoader worker counts to time')
    p.add_argument('--epochs', type=int, default=2, help='timed epochs per measurement (after one untimed)')
    p.add_argument('--max_batches', type=int, default=0, help='stop an epoch after this many batches (0: whole)')
    p.add_argument('--loaders', nargs='+', default=['ours', 'authors'], choices=['ours', 'authors'],
                   help="which loaders to time: this project's, the authors' dataset + collate (reimplemented)")
    p.add_argument('--bert_path', default=DEMO_TEXT_MODEL, help='tokenizer (BERT uncased vocabulary)')
    p.add_argument('--json', action='store_true',
                   help='end with one JSON line {"<loader>": {"<workers>": samples/s}} (bench/bench.py reads it)')
    return p.parse_args(argv)


def main(argv=None):
    o = parse(argv)
    tokenizer = load_tokenizer(o.bert_path)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        write_data(folder, o, tokenizer)
        print(f'{o.images} images x {o.regions} x {o.img_dim} float32 ({o.images * o.regions * o.img_dim * 4 / 1e9:.2f} GB), '
              f'{5 * o.images} captions, batch {o.batch_size}, augmentation on')
        print(f'copy floor        : {copy_floor(o):8.0f} samples/s (one memcpy of a full batch of regions)', flush=True)
        rates = {}
        for name in o.loaders:
            for workers in o.workers:
                rate = measure({'ours': ours, 'authors': authors}[name], folder, o, workers, tokenizer)
                rates.setdefault(name, {})[str(workers)] = rate
                print(f'{name:8s} workers {workers}: {rate:8.0f} samples/s', flush=True)
    if o.json:
        print(json.dumps(rates))


if __name__ == '__main__':
    main()
