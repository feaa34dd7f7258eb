"""GPU-only device bugs caught on a CPU: the training forward (relation module active) and the
evaluation encoders run on fake tensors that claim device='cuda' (torch's FakeTensorMode: shapes,
dtypes and devices are propagated, nothing is computed, no GPU is needed). A tensor created inside
the forward without `device=` lands on the CPU, and the first operation mixing it with a cuda
tensor raises, as it would on a real GPU."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.func import functional_call
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from conftest import tiny_args, tiny_bert
from lib.models import config_from_args, create_model

B, REGIONS, WORDS, IMG_DIM = 6, 5, 7, 24


def fake_cuda(model):
    """(fake mode, the model's parameters and buffers as fake cuda tensors)."""
    # a shape environment lets data-dependent shapes (boolean masks, nonzero) through symbolically
    mode = FakeTensorMode(allow_non_fake_inputs=False, shape_env=ShapeEnv())
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    with mode:
        return mode, {k: mode.from_tensor(v).to('cuda') for k, v in state.items()}


def cuda_batch():
    lengths = torch.tensor([5, 3, 5, 2, 4, 5], device='cuda')
    words = torch.tensor([7, 4, 6, 7, 3, 5], device='cuda')
    return {'regions': torch.randn(B, REGIONS, IMG_DIM, device='cuda'), 'region_lengths': lengths,
            'tokens': torch.randint(1, 1000, (B, WORDS), device='cuda'), 'token_lengths': words,
            'img_ids': torch.arange(B, device='cuda')}


# VSE∞ is left out: GPO's position weights depend on the values of the lengths (one GRU row per
# distinct set size, packed with lengths on the host, as pack_padded_sequence requires), which fake
# tensors cannot trace
@pytest.mark.parametrize('model_name', ['hrem'])
def test_training_forward_and_encoders_stay_on_the_device(model_name):
    args = tiny_args('--model', model_name, '--warmup', '0', '--dropout', '0')
    model = create_model(config_from_args(args, IMG_DIM), tiny_bert())
    mode, weights = fake_cuda(model)
    with mode:
        batch = cuda_batch()
        out = functional_call(model, weights, (batch, 1))  # step 1 > warmup 0: relations active for HREM
        assert out.loss.device.type == 'cuda'
        assert all(v.device.type == 'cuda' for v in out.parts.values())
        for encode, inputs in (('encode_image', (batch['regions'], batch['region_lengths'])),
                               ('encode_text', (batch['tokens'], batch['token_lengths']))):
            emb, local = _call_method(model, weights, encode, inputs)
            assert emb.device.type == 'cuda' and local.device.type == 'cuda'
            assert emb.shape == (B, model.config.embed_size)
    if model_name == 'hrem':
        assert set(out.parts) >= {'base', 'gnn', 'reg'}  # the relation module ran


def _call_method(model, weights, name, inputs):
    """functional_call of a method other than forward."""
    from torch.nn.utils.stateless import _reparametrize_module
    with _reparametrize_module(model, weights):
        return getattr(model, name)(*inputs)
