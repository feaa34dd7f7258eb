"""--grad_checkpointing: the text backbone recomputed in the backward pass gives the same loss and
gradients as a plain step (dropout on: the recomputation must draw the same masks), keeps far
fewer bytes for the backward pass, is refused for a backbone without support, and runs end to
end in train.py (also switched on when a run is resumed)."""
import json
import os

import pytest
import torch
from transformers import BertConfig, BertModel

from conftest import tiny_args
from lib.errors import UserError
from lib.models import config_from_args, create_model
from lib.text_model import enable_grad_checkpointing
from test_errors import bert_folder, make_data, train_argv

B, REGIONS, WORDS, IMG_DIM = 6, 5, 9, 24


def bert_with_dropout(seed=0):
    torch.manual_seed(seed)
    return BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2))


def batch():
    g = torch.Generator().manual_seed(1)
    return {'regions': torch.rand(B, REGIONS, IMG_DIM, generator=g),
            'region_lengths': torch.tensor([5, 3, 5, 2, 4, 5]),
            'tokens': torch.randint(1000, 2000, (B, WORDS), generator=g),
            'token_lengths': torch.tensor([9, 4, 6, 9, 3, 5]), 'img_ids': torch.arange(B)}


def step(model_name, checkpointing):
    """(loss, {name: grad}, bytes the text backbone keeps for the backward pass) of one training
    step with dropout, relations active for HREM."""
    args = tiny_args('--model', model_name, '--warmup', '0', '--dropout', '0.2')
    model = create_model(config_from_args(args, IMG_DIM), bert_with_dropout())
    if checkpointing:
        enable_grad_checkpointing(model)
    model.train()
    kept, bert_kept = [], []  # (storage id, bytes) of every tensor saved for backward; the encoder's share

    def pack(t):
        kept.append((t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()))
        return t
    torch.manual_seed(5)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        encoder = model.txt_enc.bert.encoder
        hooks = [encoder.register_forward_pre_hook(lambda *_: kept.clear()),
                 encoder.register_forward_hook(lambda *_: bert_kept.append(sum(dict(kept).values())))]
        out = model(batch(), 1)
        for hook in hooks:
            hook.remove()
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), grads, bert_kept[0]


@pytest.mark.parametrize('model_name', ['hrem', 'vse_infty'])
def test_same_loss_and_gradients_with_far_less_kept(model_name):
    loss, grads, kept = step(model_name, False)
    loss_ckpt, grads_ckpt, kept_ckpt = step(model_name, True)
    assert torch.equal(loss, loss_ckpt)
    assert grads.keys() == grads_ckpt.keys()
    assert any(n.startswith('txt_enc.bert.encoder') for n in grads)
    differ = [n for n in grads if not torch.equal(grads[n], grads_ckpt[n])]
    assert not differ, f'{len(differ)} gradients differ, e.g. {differ[:3]}'
    # the checkpointed encoder keeps each layer's input only, not its attention maps and hidden states
    assert kept_ckpt < kept / 4, (kept, kept_ckpt)


def test_a_backbone_without_support_is_refused():
    args = tiny_args()
    model = create_model(config_from_args(args, IMG_DIM), bert_with_dropout())
    model.txt_enc.bert.supports_gradient_checkpointing = False
    with pytest.raises(UserError, match='--grad_checkpointing: the text model BertModel does not support'):
        enable_grad_checkpointing(model)


def test_train_py_with_grad_checkpointing_matches_a_plain_run(tmp_path):
    import train
    from lib.checkpoint import read_checkpoint
    make_data(tmp_path)
    bert = bert_folder(tmp_path / 'bert')
    weights = {}
    for name, extra in (('plain', []), ('ckpt', ['--grad_checkpointing'])):
        train.main(train_argv(tmp_path, bert, name, '--seed', '2', '--warmup', '2', *extra))
        with open(os.path.join(tmp_path, name, 'options.json')) as f:
            assert json.load(f)['grad_checkpointing'] is bool(extra)
        weights[name] = read_checkpoint(os.path.join(tmp_path, name, 'checkpoint_last.pth'))['model']
    plain, ckpt = (dict(_flat(weights[k])) for k in ('plain', 'ckpt'))
    assert plain.keys() == ckpt.keys() and any('bert' in k for k in plain)
    assert all(torch.equal(plain[k], ckpt[k]) for k in plain)


def _flat(tree, prefix=''):
    """(dotted key, tensor) of a nested dict of tensors."""
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flat(value, f'{prefix}{key}.')
        else:
            yield f'{prefix}{key}', value
