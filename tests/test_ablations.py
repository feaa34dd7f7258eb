"""The paper's ablation switches and the authors' --cross_loss / --norm_input: each removes or
changes exactly the part it names, checked against references computed by hand."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

import arguments
import train
from graph_lib import InstanceRelation
from lib import checkpoint as ckpt_lib
from lib.models import HREM, config_from_args
from lib.optim import build_optimizer
from conftest import tiny_args, tiny_bert
from test_errors import bert_folder, make_data, train_argv
from test_relations import fake_batch, make_inputs

B = 6


def twin_modules(**switches):
    """The full relation module and one with `switches`, holding the same weights."""
    full = InstanceRelation(16, nhead=4, dropout=0.0, topk=4, threshold=0.5, mask_weight=1.7).eval()
    other = InstanceRelation(16, nhead=4, dropout=0.0, topk=4, threshold=0.5, mask_weight=1.7, **switches).eval()
    other.load_state_dict(full.state_dict(), strict=False)  # without relevance it lacks the MLPs
    return full, other


def gnn_with_mask(module, img, cap, mask):
    """The instance Transformer over the 2B nodes with a hand-made additive mask."""
    return F.normalize(module.transformer(torch.cat([img, cap])[None], mask=mask)[0], dim=-1)


def test_without_connections_every_node_attends_to_every_node():
    torch.manual_seed(0)
    full, other = twin_modules(connection=False)
    inputs = make_inputs(B)
    c_full, r_full, reg_full = full.relations(*inputs)
    c, r, reg = other.relations(*inputs)
    assert not c_full.all() and c.all()  # only the connections changed
    torch.testing.assert_close(r, r_full)
    torch.testing.assert_close(reg, reg_full)
    img, cap = inputs[:2]
    img_hat, cap_hat, _ = other(*inputs)
    want = gnn_with_mask(full, img, cap, 1.7 * r_full)  # relevance bias everywhere, no -inf
    torch.testing.assert_close(torch.cat([img_hat, cap_hat]), want)


def test_without_relevance_connected_pairs_get_an_equal_bias():
    torch.manual_seed(0)
    full, other = twin_modules(relevance=False)
    assert not hasattr(other, 'mlp_t2i') and not hasattr(other, 'mlp_i2t')
    inputs = make_inputs(B)
    c_full, r_full, _ = full.relations(*inputs)
    c, r, reg = other.relations(*inputs)
    torch.testing.assert_close(c, c_full)  # only the relevance changed
    assert (r == 0).all() and reg.item() == 0
    assert r_full.std() > 0
    img, cap = inputs[:2]
    img_hat, cap_hat, _ = other(*inputs)
    hand_mask = torch.zeros(2 * B, 2 * B).masked_fill(~c_full, float('-inf'))
    torch.testing.assert_close(torch.cat([img_hat, cap_hat]), gnn_with_mask(full, img, cap, hand_mask))
    # and it differs from the full module, whose relevance shapes the attention
    assert not torch.allclose(torch.cat(full(*inputs)[:2]), torch.cat([img_hat, cap_hat]), atol=1e-4)


def model_and_embeddings(*options):
    args = tiny_args('--base_loss', 'vse', '--gnn_loss', 'vse', '--dropout', '0', '--warmup', '5', '--topk', '3',
                     '--reg_loss_weight', '7', *options)
    model = HREM(config_from_args(args, 24), tiny_bert())
    batch = fake_batch()
    img_raw, regions = model.img_enc(batch['regions'], batch['region_lengths'])
    cap_raw, words = model.txt_enc(batch['tokens'], batch['token_lengths'])
    return model, batch, (img_raw, cap_raw, regions, words)


def test_without_instance_relations_the_loss_is_the_base_loss_and_nothing_else_is_built():
    model, batch, (img_raw, cap_raw, _, _) = model_and_embeddings('--instance_relation', '0')
    assert model.relation is None
    base = model.base_loss(F.normalize(img_raw, dim=-1), F.normalize(cap_raw, dim=-1), batch['img_ids'])
    out = model(batch, step=100)  # long after the warm-up
    assert out.loss.item() == pytest.approx(base.item(), rel=1e-5)
    assert set(out.parts) == {'base', 'total'}
    optimizer, _ = build_optimizer(model, tiny_args('--instance_relation', '0'))
    assert [g['name'] for g in optimizer.param_groups] == ['text', 'bert', 'image']
    assert ckpt_lib.make_checkpoint(model, tiny_args(), 1, 0, 0.0)['model']['relation'] is None


def test_the_full_model_steps_its_relation_module():
    model, batch, _ = model_and_embeddings()
    model(batch, step=100).loss.backward()
    grads = [p.grad for p in model.relation.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0


@pytest.mark.parametrize('cross_loss', [1, 0])
@pytest.mark.parametrize('norm_input', [1, 0])
def test_objective_with_cross_loss_and_norm_input(cross_loss, norm_input):
    model, batch, (img_raw, cap_raw, regions, words) = model_and_embeddings(
        '--cross_loss', str(cross_loss), '--norm_input', str(norm_input))
    img, cap = img_raw / img_raw.norm(dim=1, keepdim=True), cap_raw / cap_raw.norm(dim=1, keepdim=True)
    ids, lengths = batch['img_ids'], batch['token_lengths']
    connect, relevance, reg = model.relation.relations(img, cap, regions, words, lengths)
    # the authors' GraphLoss: the Transformer's input is the normalised or the raw embedding
    nodes = (img, cap) if norm_input else (img_raw, cap_raw)
    img_hat, cap_hat = model.relation.attend(*nodes, connect, relevance)
    loss = model.base_loss
    want = loss(img, cap, ids) + loss(img_hat, cap_hat, ids) + 7 * reg
    if cross_loss:
        want = want + loss(img, cap_hat, ids) + loss(img_hat, cap, ids)
    got = model(batch, step=5)
    assert got.loss.item() == pytest.approx(want.item(), rel=1e-5)
    # the raw embeddings are not unit vectors, so the two inputs really differ
    assert not torch.allclose(img_raw.norm(dim=1), torch.ones(B), atol=1e-2)


def maxk_reference(x, n):
    """Per dimension, the mean of the two largest of the first n rows (one sample)."""
    top = x[:n].sort(dim=0, descending=True).values[:min(2, n)]
    return top.mean(dim=0)


@pytest.mark.parametrize('where', ['both', 'image', 'text', 'none'])
def test_fragment_transformer_switch(where):
    model, batch, (img_raw, cap_raw, regions, words) = model_and_embeddings('--fragment_transformer', where)
    assert (model.img_enc.aggr is not None) == (where in ('both', 'image'))
    assert (model.txt_enc.aggr is not None) == (where in ('both', 'text'))
    keys = set(model.img_enc.state_dict()) | set(model.txt_enc.state_dict())
    assert any(k.startswith('aggr.') for k in keys) == (where != 'none')
    # an encoder without its Transformer pools with MaxK alone
    for raw, local, lengths, has in ((img_raw, regions, batch['region_lengths'], model.img_enc.aggr),
                                     (cap_raw, words, batch['token_lengths'], model.txt_enc.aggr)):
        maxk = torch.stack([maxk_reference(local[i], int(n)) for i, n in enumerate(lengths)])
        if has is None:
            torch.testing.assert_close(raw, maxk)
        else:
            assert not torch.allclose(raw, maxk, atol=1e-4)


def test_help_groups_the_ablation_switches():
    text = arguments.get_train_parser().format_help()
    section = text[text.index('ablations'):]
    section = section[:section.index('\n\n')]
    for option in ('--instance_relation', '--connection_relation', '--relevance_relation', '--cross_loss',
                   '--fragment_transformer'):
        assert option in section
    assert '--intra_connect' not in text


@pytest.fixture(scope='module')
def ablated_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp('ablations')
    make_data(root)
    bert = bert_folder(root / 'bert')
    runs = {}
    for name, options in (('no_relations', ['--instance_relation', '0']),
                          ('maxk_only', ['--fragment_transformer', 'none', '--relevance_relation', '0'])):
        train.main(train_argv(root, bert, name, '--warmup', '2', *options))
        runs[name] = root / name
    return runs


def test_ablated_runs_train_save_and_evaluate(ablated_runs):
    import eval as eval_script
    for name, folder in ablated_runs.items():
        ckpt = ckpt_lib.read_checkpoint(str(folder / 'model_best.pth'))
        assert (ckpt['model']['relation'] is None) == (name == 'no_relations')
        results = eval_script.main(['--checkpoint', str(folder / 'model_best.pth'), '--device', 'cpu'])
        assert os.path.isfile(folder / 'results.json')
        saved = json.load(open(folder / 'results.json'))['results'][0]
        assert results[0]['rsum'] == pytest.approx(saved['rsum'], abs=1e-6)


def test_trip_losses_draw_their_negatives_in_the_authors_order():
    """The trip loss samples negatives from the random stream, so the order of the four terms
    decides the numbers: l(v, t), then l(v, t^), l(v^, t), l(v^, t^) as in the authors' GraphLoss."""
    model, batch, _ = model_and_embeddings('--base_loss', 'trip', '--gnn_loss', 'trip')
    ids, lengths = batch['img_ids'], batch['token_lengths']
    torch.manual_seed(5)
    got = model(batch, step=5).loss
    torch.manual_seed(5)
    img_raw, regions = model.img_enc(batch['regions'], batch['region_lengths'])
    cap_raw, words = model.txt_enc(batch['tokens'], lengths)
    img, cap = F.normalize(img_raw, dim=-1, eps=0), F.normalize(cap_raw, dim=-1, eps=0)
    loss = model.relation_loss
    base = model.base_loss(img, cap, ids)
    img_hat, cap_hat, reg = model.relation(img, cap, regions, words, lengths)
    first, second, third = loss(img, cap_hat, ids), loss(img_hat, cap, ids), loss(img_hat, cap_hat, ids)
    assert got.item() == pytest.approx((base + (first + second + third) + 7 * reg).item(), rel=1e-6)
