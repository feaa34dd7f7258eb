"""The training data loader: batches read and augmented whole, not item by item.

TrainDataset.__getitems__ (torch's DataLoader calls it with a batch's indices) reads the batch's
regions from the memory-mapped array with one gather, draws the augmentation for the whole batch
(lib/augmentation.py) and pads the token ids from the tokenised captions in one go; collate passes
that batch through. __getitem__ (one caption) is the same code on a batch of one.
"""
import torch
import numpy as np
from torch.utils.data import DataLoader

from lib import augmentation as aug
from lib.data import advise_random_access, nonfinite_error, pad_batch
from lib.errors import UserError
from lib.resume import OffsetSampler, ignore_stop_signals


def caption_tokens(tokens, captions, text, seed=0, epoch=0, augment=False):
    """(B, L) int64 token ids ([CLS] + pieces + [SEP], 0-padded) and (B,) lengths of captions
    (indices into tokens, a TokenizedCaptions); augment: the word perturbation of spec section 2,
    drawn from (seed, epoch, caption). Pieces past text.max_len - 2 are cut, after deletion."""
    captions = np.asarray(captions, dtype=np.int64)
    B = len(captions)
    starts = tokens.offsets[captions]
    lens = tokens.offsets[captions + 1] - starts
    row = np.repeat(np.arange(B), lens)
    first = np.cumsum(lens) - lens
    pos = np.arange(len(row)) - first[row]  # piece position inside its caption
    src = starts[row] + pos
    ids = tokens.ids[src].astype(np.int64)
    if augment and len(ids):
        masked, replaced, deleted = aug.word_outcomes(seed, epoch, captions[row], tokens.word_index[src])
        ids[masked] = text.mask_id
        ids[replaced] = aug.random_tokens(seed, epoch, captions[row[replaced]], pos[replaced], text.vocab_size)
        keep = ~deleted
        row, ids = row[keep], ids[keep]
        lens = np.bincount(row, minlength=B)
        first = np.cumsum(lens) - lens
        pos = np.arange(len(row)) - first[row]
    body = np.minimum(lens, text.max_len - 2)
    inside = pos < text.max_len - 2
    out = np.zeros((B, int(body.max(initial=0)) + 2), np.int64)
    out[:, 0] = text.cls_id
    out[row[inside], pos[inside] + 1] = ids[inside]
    out[np.arange(B), body + 1] = text.sep_id
    return out, body + 2


class TrainDataset(torch.utils.data.Dataset):
    """One item per caption; a batch of captions -> the training batch dict (see collate).

    Augmentation comes from (seed, epoch, caption index) alone (lib/augmentation.py), so a run is
    repeatable and resumable whatever the number of workers or ranks.
    """

    def __init__(self, split, seed=0, size_augment=True, text_augment=True):
        advise_random_access(split.images)
        self.split = split
        self.seed = seed
        self.size_augment = size_augment
        self.text_augment = text_augment
        self.epoch = 0
        images = split.images
        self.n_regions = images.shape[1]
        # (images x regions, D) view of the memory map: one np.take gathers a batch's regions
        self.rows = np.asarray(images).reshape(-1, images.shape[2])
        # images found finite: each is scanned once per run; shared memory, so DataLoader workers
        # (forked or spawned) share what any of them scanned
        self.checked = torch.zeros(len(images), dtype=torch.bool).share_memory_()

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.split.tokens)

    def _check_finite(self, img):
        checked = self.checked.numpy()
        new = np.unique(img[~checked[img]])
        if len(new):
            finite = np.isfinite(np.asarray(self.split.images[new]).reshape(len(new), -1)).all(1)
            if not finite.all():
                raise nonfinite_error(self.split.ims_path, int(new[np.argmin(finite)]))
            checked[new] = True

    def __getitems__(self, indices):
        captions = np.asarray(indices, dtype=np.int64)
        img = captions // self.split.per_image
        self._check_finite(img)
        R = self.n_regions
        if self.size_augment:
            keep = aug.region_keep(self.seed, self.epoch, captions, R)
            n_kept = keep.sum(1)
            # kept regions first, in their order
            order = np.argsort(~keep, axis=1, kind='stable')[:, :int(n_kept.max())]
        else:
            n_kept = np.full(len(captions), R)
            order = np.broadcast_to(np.arange(R), (len(captions), R))
        regions = np.take(self.rows, (img[:, None] * R + order).ravel(), axis=0)
        regions = regions.reshape(len(captions), order.shape[1], -1).astype(np.float32, copy=False)
        regions[np.arange(order.shape[1]) >= n_kept[:, None]] = 0
        tokens, token_lengths = caption_tokens(self.split.tokens, captions, self.split.text, self.seed, self.epoch,
                                               self.text_augment)
        return {'regions': torch.from_numpy(regions), 'region_lengths': torch.from_numpy(n_kept.astype(np.int64)),
                'tokens': torch.from_numpy(tokens), 'token_lengths': torch.from_numpy(token_lengths),
                'caption_ids': torch.from_numpy(captions), 'img_ids': torch.from_numpy(img)}

    def __getitem__(self, index):
        """(regions, token ids, caption index, image index) of one caption, as numpy arrays."""
        batch = self.__getitems__([index])
        return (batch['regions'][0, :int(batch['region_lengths'][0])].numpy(),
                batch['tokens'][0, :int(batch['token_lengths'][0])].numpy(), index, int(batch['img_ids'][0]))


def collate(items):
    """A batch built by TrainDataset.__getitems__ passes through; a list of __getitem__ items
    is padded into the same dict."""
    if isinstance(items, dict):
        return items
    images, ids, cap_index, img_index = zip(*items)
    regions, region_lengths = pad_batch(images, np.float32)
    tokens, token_lengths = pad_batch(ids, np.int64)
    return {'regions': regions, 'region_lengths': region_lengths, 'tokens': tokens,
            'token_lengths': token_lengths, 'caption_ids': torch.tensor(cap_index),
            'img_ids': torch.tensor(img_index)}


def make_loader(split, args, env):
    """(DataLoader, dataset, sampler) of the training split for this rank (args: seed, size_augment,
    text_augment, batch_size (global), workers; env: rank, world_size, device)."""
    dataset = TrainDataset(split, args.seed, bool(args.size_augment), bool(args.text_augment))
    # one code path for 1 or N processes: each rank takes its share of every shuffled epoch
    sampler = OffsetSampler(dataset, num_replicas=env.world_size, rank=env.rank, shuffle=True,
                            seed=args.seed, drop_last=True)
    per_rank = args.batch_size // env.world_size
    if len(dataset) // env.world_size < per_rank:
        raise UserError(f'the training split has {len(dataset)} captions, fewer than one batch of '
                        f'{args.batch_size}; lower --batch_size')
    loader = DataLoader(dataset, batch_size=per_rank, sampler=sampler, num_workers=args.workers,
                        collate_fn=collate, drop_last=True, pin_memory=env.device.type == 'cuda',
                        worker_init_fn=ignore_stop_signals)
    # not persistent_workers: a persistent iterator skips the per-epoch draw of the workers' base
    # seed from the torch RNG, so a resumed run would no longer repeat a straight one bit for bit;
    # starting the workers again costs seconds per epoch
    return loader, dataset, sampler
