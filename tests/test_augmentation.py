"""Training-time augmentations of spec section 2 with the real MiniLM (BERT uncased) tokenizer."""
import numpy as np
import pytest
import torch

from lib.data import PrecompSplit, TextSpec, tokenize_captions
from lib.loader import TrainDataset, caption_tokens, collate, make_loader
from conftest import write_precomp

N_DRAWS = 20000


def test_word_ids_group_the_pieces_of_a_word(tokenizer):
    caps = ['A snowboarder jumps over unbelievably tall rails, ok?', 'two dogs']
    tok = tokenize_captions(tokenizer, caps)
    assert len(tok) == 2
    for c, caption in enumerate(caps):
        ids, words = tok.pieces(c)
        assert ids.tolist() == tokenizer(caption, add_special_tokens=False)['input_ids']
        pieces = tokenizer.convert_ids_to_tokens(ids.tolist())
        # a continuation piece belongs to the word of the piece before it; any other piece starts a word
        expected, w = [], -1
        for p in pieces:
            w += 0 if p.startswith('##') else 1
            expected.append(w)
        assert words.tolist() == expected
    assert tokenizer.convert_ids_to_tokens(tok.pieces(0)[0].tolist())[1:4] == ['snow', '##board', '##er']


def augmented(tokenizer, caption, n, seed=0, epoch=0):
    """n augmented copies of one caption (caption indices 0..n-1: n independent draws)."""
    tok = tokenize_captions(tokenizer, [caption] * n)
    return caption_tokens(tok, np.arange(n), TextSpec(tokenizer), seed, epoch, augment=True)


def outcomes(tokenizer, caption, n):
    """Classify what happened to a one-word caption in each of n draws."""
    spec = TextSpec(tokenizer)
    ids = np.array(tokenizer(caption, add_special_tokens=False)['input_ids'])
    out, lengths = augmented(tokenizer, caption, n)
    counts = {'kept': 0, 'masked': 0, 'replaced': 0, 'deleted': 0}
    for row, length in zip(out, lengths):
        assert row[0] == spec.cls_id and row[length - 1] == spec.sep_id and (row[length:] == 0).all()
        body = row[1:length - 1]
        if len(body) == 0:
            counts['deleted'] += 1
        elif (body == ids).all():
            counts['kept'] += 1
        elif (body == spec.mask_id).all():
            counts['masked'] += 1
        else:
            # a replaced word: every piece replaced (none kept, none masked)
            assert len(body) == len(ids) and not (body == ids).any() and not (body == spec.mask_id).any()
            counts['replaced'] += 1
    return {k: v / n for k, v in counts.items()}


def test_word_perturbation_shares_whole_words(tokenizer):
    assert len(tokenizer('snowboarder', add_special_tokens=False)['input_ids']) == 3
    got = outcomes(tokenizer, 'snowboarder', N_DRAWS)
    want = {'kept': 0.8, 'masked': 0.2 * 0.5, 'replaced': 0.2 * 0.1, 'deleted': 0.2 * 0.4}
    for k, p in want.items():
        assert abs(got[k] - p) < 5 * np.sqrt(p * (1 - p) / N_DRAWS), (k, got[k], p)


def test_words_are_perturbed_independently(tokenizer):
    spec = TextSpec(tokenizer)
    n = 4000
    out, lengths = augmented(tokenizer, 'one two three four five six seven eight nine ten', n)
    lengths = lengths - 2
    masks = (out == spec.mask_id).sum(1)
    deleted = 10 - np.mean(lengths)
    assert abs(deleted / 10 - 0.08) < 0.01 and abs(np.mean(masks) / 10 - 0.1) < 0.01
    assert np.var(lengths) == pytest.approx(10 * 0.08 * 0.92, rel=0.15)  # binomial: independent words
    # replacement tokens cover the vocabulary uniformly (mean of U{0..V-1})
    replaced = out[(out != 0) & (out != spec.mask_id) & (out != spec.cls_id) & (out != spec.sep_id)]
    replaced = replaced[~np.isin(replaced, tokenizer('one two three four five six seven eight nine ten')['input_ids'])]
    assert len(replaced) > 500
    assert abs(replaced.mean() / (spec.vocab_size - 1) - 0.5) < 5 * np.sqrt(1 / 12 / len(replaced))


def test_augmentation_is_deterministic_and_adds_special_tokens(tokenizer):
    spec = TextSpec(tokenizer)
    caption = 'a snowboarder jumps over unbelievably tall rails'
    plain = spec.encode(*tokenize_captions(tokenizer, [caption]).pieces(0))
    assert plain.tolist() == tokenizer(caption)['input_ids']
    out, lengths = augmented(tokenizer, caption, 30, seed=5)
    again, _ = augmented(tokenizer, caption, 30, seed=5)
    assert np.array_equal(out, again)
    draws = {tuple(r[:n]) for r, n in zip(out.tolist(), lengths)}
    assert len(draws) > 5
    assert not np.array_equal(out, augmented(tokenizer, caption, 30, seed=5, epoch=1)[0])


# ------------------------------------------------- a naive per-sample reference of the batch code
MASK64 = 2**64 - 1


def naive_mix(x):
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & MASK64
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def naive_uniform(seed, epoch, caption, stream, position):
    """The documented hash in Python integers, one draw at a time."""
    h = naive_mix((seed + 0x9E3779B97F4A7C15) & MASK64)
    for field in (epoch, caption, stream, position):
        h = naive_mix(((h ^ field) + 0x9E3779B97F4A7C15) & MASK64)
    return (h >> 11) / 2**53


def naive_item(split, seed, epoch, c, max_len):
    """One caption's (regions, token ids), word by word and region by region."""
    from lib import augmentation as aug
    image = np.asarray(split.images[c // split.per_image])
    keep = [naive_uniform(seed, epoch, c, aug.REGION, r) >= 0.2 for r in range(len(image))]
    if not any(keep):
        keep[min(int(naive_uniform(seed, epoch, c, aug.FALLBACK, 0) * len(image)), len(image) - 1)] = True
    ids, words = split.tokens.pieces(c)
    body = []
    for p, (piece, word) in enumerate(zip(ids.tolist(), words.tolist())):
        u = naive_uniform(seed, epoch, c, aug.WORD, word)
        if u < 0.2 * 0.5:
            body.append(split.text.mask_id)
        elif u < 0.2 * 0.6:
            body.append(int(naive_uniform(seed, epoch, c, aug.TOKEN, p) * split.text.vocab_size))
        elif u >= 0.2:
            body.append(piece)
    return image[np.array(keep)], [split.text.cls_id] + body[:max_len - 2] + [split.text.sep_id]


@pytest.mark.parametrize('max_len', [512, 7])
def test_batch_augmentation_equals_a_naive_per_sample_reference(tmp_path, tokenizer, max_len):
    caps = [f'a dog number {i} runs on a snowboarder beach {"far " * (i % 5)}away' for i in range(5 * 60)]
    write_precomp(tmp_path, 'toy', 'train', 60, caps, regions=3, dim=4)  # 3 regions: some drop all (0.8%)
    split = PrecompSplit(str(tmp_path), 'toy', 'train', tokenizer)
    split.text.max_len = max_len
    data = TrainDataset(split, seed=11)
    data.set_epoch(2)
    order = np.random.default_rng(0).permutation(len(data))
    for start in range(0, len(order), 64):
        batch = data.__getitems__(order[start:start + 64].tolist())
        for b, c in enumerate(order[start:start + 64]):
            regions, ids = naive_item(split, 11, 2, int(c), max_len)
            n, t = int(batch['region_lengths'][b]), int(batch['token_lengths'][b])
            np.testing.assert_array_equal(batch['regions'][b, :n].numpy(), regions)
            assert (batch['regions'][b, n:] == 0).all()
            assert batch['tokens'][b, :t].tolist() == ids and (batch['tokens'][b, t:] == 0).all()
            assert batch['img_ids'][b] == c // 5 and batch['caption_ids'][b] == c


def test_the_same_caption_gets_the_same_augmentation_in_any_batch_worker_or_rank(split):
    """Batches cut differently (as workers and ranks cut an epoch) give each caption the same draw."""
    data = TrainDataset(split, seed=4)
    data.set_epoch(3)
    whole = data.__getitems__(list(range(len(data))))
    for size in (1, 3, 64):
        order = np.random.default_rng(size).permutation(len(data))
        for start in range(0, len(order), size):
            part = data.__getitems__(order[start:start + size].tolist())
            for b, c in enumerate(order[start:start + size]):
                for key, lengths in (('regions', 'region_lengths'), ('tokens', 'token_lengths')):
                    n = int(whole[lengths][c])
                    assert int(part[lengths][b]) == n
                    assert torch.equal(part[key][b, :n], whole[key][c, :n])


def test_the_loader_with_workers_gives_the_batches_of_one_process(split):
    from types import SimpleNamespace
    from lib.distributed import DistEnv
    batches = {}
    for workers in (0, 2):
        args = SimpleNamespace(seed=1, size_augment=1, text_augment=1, batch_size=16, workers=workers)
        loader, dataset, sampler = make_loader(split, args, DistEnv(0, 1, 0, torch.device('cpu')))
        sampler.set_epoch(1)
        dataset.set_epoch(1)
        batches[workers] = list(loader)
    assert len(batches[0]) == len(batches[2]) == 200 // 16
    for a, b in zip(batches[0], batches[2]):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def split(tmp_path, tokenizer):
    caps = [f'a dog number {i} runs on a snowboarder beach' for i in range(5 * 40)]
    write_precomp(tmp_path, 'toy', 'train', 40, caps, regions=50, dim=6)
    return PrecompSplit(str(tmp_path), 'toy', 'train', tokenizer)


def test_size_augmentation_drops_a_fifth_of_the_regions(split):
    data = TrainDataset(split, seed=3)
    images = split.images
    kept = 0
    for index in range(len(data)):
        regions, ids, cap, img = data[index]
        assert cap == index and img == index // 5
        original = np.asarray(images[img])
        # the kept regions are rows of the image, in their order
        rows = [int(np.flatnonzero((original == r).all(1))[0]) for r in regions]
        assert rows == sorted(rows) and len(set(rows)) == len(rows) >= 1
        kept += len(regions)
    frac_dropped = 1 - kept / (len(data) * 50)
    assert abs(frac_dropped - 0.2) < 5 * np.sqrt(0.16 / (len(data) * 50))
    # repeatable per (seed, epoch, index), different across epochs
    again = TrainDataset(split, seed=3)
    assert all(np.array_equal(data[i][0], again[i][0]) and np.array_equal(data[i][1], again[i][1]) for i in range(10))
    again.set_epoch(1)
    assert any(len(data[i][0]) != len(again[i][0]) for i in range(10))


def test_size_augmentation_never_drops_every_region(tmp_path, tokenizer):
    write_precomp(tmp_path, 'toy', 'train', 400, [f'cap {i}' for i in range(400)], regions=1, dim=3)
    data = TrainDataset(PrecompSplit(str(tmp_path), 'toy', 'train', tokenizer), text_augment=False)
    assert all(len(data[i][0]) == 1 for i in range(len(data)))  # about 80 draws would drop it


def test_augmentations_can_be_switched_off(split):
    data = TrainDataset(split, size_augment=False, text_augment=False)
    for i in range(0, len(data), 17):
        regions, ids, _, img = data[i]
        np.testing.assert_array_equal(regions, split.images[img])
        assert ids.tolist() == split.text.encode(*split.tokens.pieces(i)).tolist()


def test_collate_pads_and_carries_lengths(split):
    data = TrainDataset(split, seed=0)
    items = [data[i] for i in (0, 7, 13, 42)]
    batch = collate(items)
    r_len, t_len = batch['region_lengths'], batch['token_lengths']
    assert r_len.tolist() == [len(it[0]) for it in items] and t_len.tolist() == [len(it[1]) for it in items]
    assert batch['regions'].shape == (4, int(r_len.max()), 6) and batch['tokens'].dtype == torch.long
    for b, (regions, ids, cap, img) in enumerate(items):
        torch.testing.assert_close(batch['regions'][b, :len(regions)], torch.as_tensor(regions))
        assert (batch['regions'][b, len(regions):] == 0).all()
        assert batch['tokens'][b, :len(ids)].tolist() == ids.tolist()
        assert (batch['tokens'][b, len(ids):] == 0).all()
    assert batch['img_ids'].tolist() == [0, 1, 2, 8] and batch['caption_ids'].tolist() == [0, 7, 13, 42]


def test_batches_own_their_memory(split):
    data = TrainDataset(split, size_augment=False, text_augment=False)
    batch = data.__getitems__([0, 5])
    before = np.array(split.images[:2])
    batch['regions'] += 1  # writable, and not a view of the memory map
    np.testing.assert_array_equal(split.images[:2], before)
    assert collate(batch) is batch  # built whole: collate passes it through


def test_captions_longer_than_the_text_model_limit_are_truncated(tokenizer):
    """[CLS] + the first limit - 2 pieces + [SEP], as the tokenizer's own truncation gives; with
    augmentation too; and a text encoder with exactly that many positions takes it."""
    from conftest import tiny_bert
    from lib.encoders import TextEncoder
    limit = tokenizer.model_max_length
    caption = ' '.join(['a snowboarder jumps over the rails'] * 120)  # about 720 pieces
    spec = TextSpec(tokenizer)
    ids, words = tokenize_captions(tokenizer, [caption]).pieces(0)
    assert len(ids) > limit
    want = tokenizer(caption, truncation=True, max_length=limit)['input_ids']
    assert len(want) == limit
    assert spec.encode(ids, words).tolist() == want
    tok = tokenize_captions(tokenizer, [caption] * 5)
    out, lengths = caption_tokens(tok, np.arange(5), spec, augment=True)
    augmented = [row[:n] for row, n in zip(out, lengths)]
    assert all(len(a) == limit and a[0] == spec.cls_id and a[-1] == spec.sep_id for a in augmented)
    bert = tiny_bert()
    assert bert.config.max_position_embeddings == limit
    encoder = TextEncoder(bert, 32, 4, 0.0, 0.8).eval()
    tokens = torch.tensor(np.stack([spec.encode(ids, words)] + augmented[:1]))
    emb, _ = encoder(tokens, torch.tensor([limit, limit]))
    assert emb.shape == (2, 32) and torch.isfinite(emb).all()


def test_tokenising_across_chunk_boundaries_equals_one_call(tokenizer, monkeypatch):
    import lib.data.tokens
    caps = [f'caption {i}: a snowboarder jumps over {"tall " * (i % 4)}rails' for i in range(11)]
    monkeypatch.setattr(lib.data.tokens, 'TOKENIZE_CHUNK', 3)  # chunks of 3, 3, 3, 2
    got = tokenize_captions(tokenizer, caps)
    one = tokenizer(caps, add_special_tokens=False)  # the reference: one call for all
    assert len(got) == len(caps)
    for c in range(len(caps)):
        ids, words = got.pieces(c)
        assert ids.tolist() == one['input_ids'][c], c
        assert words.tolist() == one.word_ids(c), c


def test_each_image_is_scanned_for_nan_once_and_named_when_bad(tmp_path, tokenizer):
    from lib.errors import UserError
    feats = write_precomp(tmp_path, 'toy', 'train', 10, [f'cap {i}' for i in range(50)], regions=4, dim=3)
    feats[7, 3, 2] = np.inf  # in one region only: the whole image is scanned, kept regions or not
    np.save(tmp_path / 'toy_precomp' / 'train_ims.npy', feats)
    data = TrainDataset(PrecompSplit(str(tmp_path), 'toy', 'train', tokenizer))
    data.__getitems__([0, 1, 12, 13, 49])
    assert np.flatnonzero(data.checked.numpy()).tolist() == [0, 2, 9]
    with pytest.raises(UserError, match=r'train_ims.npy holds NaN or infinite values \(image 7\)'):
        data.__getitems__([3, 36])
    assert not data.checked[7]
