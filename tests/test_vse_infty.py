"""VSE∞ (lib/models/vse_infty.py, lib/models/gpo.py): GPO pooling against a naive per-sample
implementation, the VSE++ loss with diagonal positives against a per-row loop, a short training
that learns, and a checkpoint in the VSE∞ authors' module names converted and evaluated."""
import math

import pytest
import torch

from lib.losses import MatchingLoss
from lib.models.gpo import GPO
from test_authors_checkpoint import bert_dir  # noqa: F401 (fixture: BERT-base sizes, uncased vocabulary)

# --- GPO against a naive reference -----------------------------------------------------------


def naive_pe(n, size):
    """The Transformer's sinusoidal encoding, element by element."""
    pe = torch.zeros(n, size, dtype=torch.float64)
    for pos in range(n):
        for i in range(0, size, 2):
            angle = pos / (10000 ** (i / size))
            pe[pos, i], pe[pos, i + 1] = math.sin(angle), math.cos(angle)
    return pe.float()


def naive_gpo(gpo, x, lengths):
    """One sample at a time: sort that sample's valid rows per dimension, run the GRU on its n
    positions alone (no padding, no packing), average the directions, softmax(score / 0.1)."""
    pooled, weights = [], []
    for xi, n in zip(x, lengths.tolist()):
        ordered = xi[:n].sort(dim=0, descending=True).values
        out, _ = gpo.gru(naive_pe(n, gpo.pe_size)[None])
        half = out.shape[-1] // 2
        score = gpo.linear((out[0, :, :half] + out[0, :, half:]) / 2).squeeze(-1)
        w = torch.softmax(score / 0.1, dim=0)
        pooled.append((ordered * w[:, None]).sum(0))
        weights.append(torch.cat([w, torch.zeros(x.shape[1] - n)]))
    return torch.stack(pooled), torch.stack(weights)


@pytest.mark.parametrize('lengths', [[5, 1, 3, 5, 2, 3], [7, 7, 7], [1], [2, 6, 4]])
def test_gpo_equals_naive_per_sample_reference(lengths, one_thread):
    torch.manual_seed(0)
    gpo = GPO()
    lengths = torch.tensor(lengths)
    x = torch.randn(len(lengths), 8, 12)  # padding beyond the longest sample too
    x[torch.arange(8)[None, :] >= lengths[:, None]] = 1e3  # padded rows hold large junk: never sorted in
    pooled, weights = gpo(x, lengths)
    ref_pooled, ref_weights = naive_gpo(gpo, x, lengths)
    assert torch.allclose(weights, ref_weights, atol=1e-6, rtol=0)
    assert torch.allclose(pooled, ref_pooled, atol=1e-6, rtol=0)
    assert torch.allclose(weights.sum(1), torch.ones(len(lengths)))


def test_gpo_gradients_equal_reference(one_thread):
    torch.manual_seed(1)
    gpo = GPO()
    lengths = torch.tensor([4, 2, 6, 4, 1])
    x = torch.randn(5, 6, 10, requires_grad=True)
    gpo(x, lengths)[0].pow(2).sum().backward()
    ours = [x.grad.clone()] + [p.grad.clone() for p in gpo.parameters()]
    x.grad = None
    gpo.zero_grad()
    naive_gpo(gpo, x, lengths)[0].pow(2).sum().backward()
    ref = [x.grad] + [p.grad for p in gpo.parameters()]
    for a, b in zip(ours, ref):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def test_gpo_state_keys_are_the_authors():
    assert sorted(GPO().state_dict()) == sorted(
        ['gru.weight_ih_l0', 'gru.weight_hh_l0', 'gru.bias_ih_l0', 'gru.bias_hh_l0', 'gru.weight_ih_l0_reverse',
         'gru.weight_hh_l0_reverse', 'gru.bias_ih_l0_reverse', 'gru.bias_hh_l0_reverse', 'linear.weight'])


# --- VSE++ loss with diagonal positives -------------------------------------------------------


def loop_vse(sims, margin, max_violation):
    """Row i: image i against every caption j != i; column j: caption j against every image i != j."""
    n = len(sims)
    total = 0.0
    for i in range(n):
        costs = [max(0.0, margin + sims[i][j] - sims[i][i]) for j in range(n) if j != i]
        total += max(costs) if max_violation else sum(costs)
    for j in range(n):
        costs = [max(0.0, margin + sims[i][j] - sims[j][j]) for i in range(n) if i != j]
        total += max(costs) if max_violation else sum(costs)
    return total


@pytest.mark.parametrize('max_violation', [True, False])
def test_vse_loss_with_diagonal_positives_equals_loop(max_violation):
    torch.manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(7, 16), dim=1)
    cap = torch.nn.functional.normalize(img + 0.8 * torch.randn(7, 16), dim=1)
    img_ids = torch.tensor([0, 0, 1, 2, 2, 2, 3])  # repeated images: negatives under the diagonal rule
    loss = MatchingLoss('vse', 0.2, positives='diagonal')(img, cap, img_ids, max_violation)
    expected = loop_vse((img @ cap.t()).tolist(), 0.2, max_violation)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # HREM's image-id positives give a different number on the same batch
    hrem = MatchingLoss('vse', 0.2)(img, cap, img_ids, max_violation)
    assert abs(hrem.item() - expected) > 1e-3


# --- a checkpoint in the VSE∞ authors' module names -------------------------------------------
# Their release (woodfrog/vse_infty, BUTD regions + BERT-base): the image encoder holds fc, mlp and
# gpool at its top level; the text encoder bert, linear and gpool. Built here from those names and
# the documented shapes; the expected similarities come from a per-sample float64 forward written
# below from the raw state tensors.

E, D, HIDDEN, R = 1024, 2048, 768, 5
N_IMAGES = 4
CAPTIONS = ['a dog runs on the beach', 'Two men are playing football in a park.', 'a red car',
            'a woman riding a horse near the lake, at night', 'children skateboarding in the street',
            'a cat sleeping on a bed', 'an old man reading a newspaper', 'birds', 'a boy jumps into the water',
            'people walking in the snow with umbrellas', 'a black dog and a white dog play', 'a girl in a red dress',
            'the kitchen is clean', 'a man cooks dinner in the kitchen', 'a bus drives down the road',
            'a group of people stand outside a building', 'a child eats ice cream', 'a horse in a green field',
            'two women sit on a bench', 'a small boat on the river']
THEIR_OPT = dict(data_path='/data/coco_precomp', data_name='f30k_precomp', margin=0.2, num_epochs=25, batch_size=128,
                 word_dim=300, embed_size=E, grad_clip=2.0, learning_rate=5e-4, lr_update=15, workers=10,
                 log_step=200, val_step=500, logger_name='runs/f30k_butd_region_bert', max_violation=False,
                 img_dim=D, no_imgnorm=False, no_txtnorm=False, vse_mean_warmup_epochs=1, precomp_enc_type='basic',
                 backbone_source='detector', embedding_warmup_epochs=2, optim='adam', text_enc_type='bert')


def their_gpo_names():
    gru = torch.nn.GRU(32, 32, 1, batch_first=True, bidirectional=True)
    names = {f'gpool.gru.{k}': tuple(v.shape) for k, v in gru.state_dict().items()}
    return {**names, 'gpool.linear.weight': (1, 32)}


def their_shapes(bert_state):
    img = {'fc.weight': (E, D), 'fc.bias': (E,), 'mlp.layers.0.weight': (E // 2, D), 'mlp.layers.0.bias': (E // 2,),
           'mlp.layers.1.weight': (E, E // 2), 'mlp.layers.1.bias': (E,), **their_gpo_names()}
    for i, size in enumerate((E // 2, E)):
        img.update({f'mlp.bns.{i}.{k}': (size,) for k in ('weight', 'bias', 'running_mean', 'running_var')})
        img[f'mlp.bns.{i}.num_batches_tracked'] = ()
    txt = {**{f'bert.{k}': tuple(v.shape) for k, v in bert_state.items()},
           'linear.weight': (E, HIDDEN), 'linear.bias': (E,), **their_gpo_names()}
    return img, txt


def random_state(shapes, seed):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        if name.endswith('num_batches_tracked'):
            out[name] = torch.tensor(4321)
        elif name.endswith('running_var'):
            out[name] = 0.5 + 1.5 * torch.rand(shape, generator=g)
        elif len(shape) == 2:
            out[name] = torch.randn(shape, generator=g) / math.sqrt(shape[1])
        else:
            out[name] = 0.2 * torch.randn(shape, generator=g) + (1.0 if name.endswith('bns.0.weight') else 0.0)
    return out


def ref_gpo(x, sd):
    """GPO of one set (n, E) in float64 from the raw GRU / linear tensors: the GRU equations written out."""
    n = x.shape[0]
    pe = naive_pe(n, 32).double()

    def run(seq, suffix):
        w_ih, w_hh = sd[f'gpool.gru.weight_ih_l0{suffix}'], sd[f'gpool.gru.weight_hh_l0{suffix}']
        b_ih, b_hh = sd[f'gpool.gru.bias_ih_l0{suffix}'], sd[f'gpool.gru.bias_hh_l0{suffix}']
        h, outs = torch.zeros(32, dtype=torch.float64), []
        for p in seq:
            ri, zi, ni = (w_ih @ p + b_ih).chunk(3)
            rh, zh, nh = (w_hh @ h + b_hh).chunk(3)
            r, z = torch.sigmoid(ri + rh), torch.sigmoid(zi + zh)
            h = (1 - z) * torch.tanh(ni + r * nh) + z * h
            outs.append(h)
        return torch.stack(outs)
    out = (run(pe, '') + run(pe.flip(0), '_reverse').flip(0)) / 2
    w = torch.softmax((out @ sd['gpool.linear.weight'][0]) / 0.1, dim=0)
    g = (x.sort(dim=0, descending=True).values * w[:, None]).sum(0)
    return g / (g.pow(2).sum().sqrt() + 1e-8)


def ref_sims(img_state, txt_state, images, bert_dir):
    import torch.nn.functional as F
    from transformers import AutoTokenizer, BertConfig, BertModel
    sd = {k: v.double() for k, v in img_state.items()}
    v = torch.as_tensor(images, dtype=torch.float64)
    h = F.linear(v, sd['mlp.layers.0.weight'], sd['mlp.layers.0.bias'])
    h = (h - sd['mlp.bns.0.running_mean']) / (sd['mlp.bns.0.running_var'] + 1e-5).sqrt() * sd['mlp.bns.0.weight'] \
        + sd['mlp.bns.0.bias']
    x = F.linear(v, sd['fc.weight'], sd['fc.bias']) + F.linear(h.relu(), sd['mlp.layers.1.weight'],
                                                               sd['mlp.layers.1.bias'])
    img = torch.stack([ref_gpo(xi, sd) for xi in x])
    tok = AutoTokenizer.from_pretrained(bert_dir)
    bert = BertModel(BertConfig.from_pretrained(bert_dir))
    bert.load_state_dict({k[5:]: v for k, v in txt_state.items() if k.startswith('bert.')})
    bert = bert.double().eval()
    sd = {k: v.double() for k, v in txt_state.items() if not k.startswith('bert.')}
    caps = []
    for caption in CAPTIONS:
        ids = torch.tensor([tok(caption)['input_ids']])  # [CLS] + word pieces + [SEP]
        hidden = bert(input_ids=ids).last_hidden_state[0]
        caps.append(ref_gpo(F.linear(hidden, sd['linear.weight'], sd['linear.bias']), sd))
    return (img @ torch.stack(caps).T).numpy()


@pytest.fixture(scope='module')
def their_checkpoint(tmp_path_factory, bert_dir):
    """(path, data_path, expected test sims) of a VSE∞ authors'-format model_best.pth."""
    import argparse

    import numpy as np
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    bert_state = BertModel(BertConfig.from_pretrained(bert_dir)).state_dict()
    img_shapes, txt_shapes = their_shapes(bert_state)
    img = random_state(img_shapes, 1)
    txt = {**{f'bert.{k}': v for k, v in bert_state.items()}, **random_state({k: s for k, s in txt_shapes.items() if not k.startswith('bert.')}, 2)}
    root = tmp_path_factory.mktemp('vse')
    path = root / 'model_best.pth'
    torch.save({'model': [img, txt], 'opt': argparse.Namespace(**THEIR_OPT), 'epoch': 24, 'best_rsum': 513.5,
                'Eiters': 56000}, path)
    folder = root / 'data' / 'f30k_precomp'
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split in ('train', 'dev', 'test'):
        np.save(folder / f'{split}_ims.npy', np.abs(rng.standard_normal((N_IMAGES, R, D))).astype(np.float32))
        (folder / f'{split}_caps.txt').write_text('\n'.join(CAPTIONS) + '\n')
    with torch.no_grad():
        expected = ref_sims(img, txt, np.load(folder / 'test_ims.npy'), bert_dir)
    return str(path), str(root / 'data'), expected


def test_model_has_the_authors_keys_and_shapes_after_renaming(bert_dir, their_checkpoint):
    """Every key and shape of their release maps onto ours (position_ids aside), none left over."""
    from transformers import BertConfig, BertModel

    from lib.models import VSEInfty, VSEInftyConfig, authors_model
    their = torch.load(their_checkpoint[0], weights_only=False)['model']
    name, parts = authors_model({'img_enc': their[0], 'txt_enc': their[1]})
    assert name == 'vse_infty'
    model = VSEInfty(VSEInftyConfig(img_dim=D, embed_size=E), BertModel(BertConfig.from_pretrained(bert_dir)))
    for ours, theirs in ((model.img_enc, parts['img_enc']), (model.txt_enc, parts['txt_enc'])):
        assert {k: tuple(v.shape) for k, v in ours.state_dict().items() if 'position_ids' not in k} == \
            {k: tuple(v.shape) for k, v in theirs.items() if 'position_ids' not in k}


def test_their_checkpoint_evaluates_to_their_forward(tmp_path, bert_dir, their_checkpoint):
    import json

    import numpy as np

    import eval as eval_script
    from lib.models import load_model
    path, data_path, expected = their_checkpoint
    assert expected.std() > 0.01  # the random model is not degenerate
    loaded = load_model(path, bert_path=bert_dir)
    assert loaded.config.model == 'vse_infty' and loaded.config.embed_size == E and loaded.config.img_dim == D
    sims_file, json_file = tmp_path / 'results_f30k.npy', tmp_path / 'r.json'
    eval_script.main(['--checkpoint', path, '--data_path', data_path, '--dataset', 'f30k', '--bert_path', bert_dir,
                      '--save_sims', str(sims_file), '--json', str(json_file), '--device', 'cpu'])
    saved = np.load(sims_file, allow_pickle=True).tolist()
    np.testing.assert_allclose(saved['sims'], expected, atol=1e-5, rtol=0)
    assert json.loads(json_file.read_text())['results'][0]['n_images'] == N_IMAGES


# --- a short training that learns -------------------------------------------------------------

def test_short_vse_infty_training_ranks_far_above_chance(tmp_path, monkeypatch):
    """train.py --model vse_infty end to end on a small demo set with the real MiniLM: the test
    split is ranked far above chance, the loss falls, and the checkpoint is a VSE∞ one."""
    import json

    from lib import demo_data
    from lib.models import load_model
    from test_learning import TEST_IMAGES, chance
    import train
    monkeypatch.setattr(demo_data, 'NOISE', 2.0)
    monkeypatch.setattr(demo_data, 'N_REGIONS', 16)
    demo_data.make_demo(str(tmp_path / 'demo_precomp'), sizes={'train': 120, 'dev': 10, 'test': TEST_IMAGES})
    run = tmp_path / 'run'
    train.main(['--model', 'vse_infty', '--data_path', str(tmp_path), '--logger_name', str(run),
                '--embed_size', '64', '--batch_size', '32', '--num_epochs', '1', '--max_steps', '18',
                '--learning_rate', '2e-3', '--log_step', '1', '--workers', '0', '--device', 'cpu', '--seed', '0'])
    result = json.loads((run / 'results.json').read_text())['results'][0]
    i2t_chance, t2i_chance = chance(TEST_IMAGES)
    assert result['rsum'] > 2 * (sum(i2t_chance.values()) + sum(t2i_chance.values())), result
    losses = [float(line.split('total ')[1].split()[0]) for line in (run / 'train.log').read_text().splitlines()
              if ' step ' in line and 'total ' in line]
    assert len(losses) == 18 and sum(losses[-4:]) < 0.7 * sum(losses[:4]), losses
    assert load_model(str(run / 'checkpoint_last.pth')).config.model == 'vse_infty'
