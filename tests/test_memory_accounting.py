"""lib/memory_accounting.py against hand-counted bytes: live and peak bytes of a chain of
operations (a view and an in-place result share their storage), and what autograd keeps for the
backward pass, per module, weights excluded."""
import torch

from lib.memory_accounting import SavedActivations, TensorMemory

MB = 1000 * 250 * 4  # bytes of a 1000 x 250 float32 tensor


def test_live_and_peak_bytes_follow_the_tensors():
    x = torch.randn(1000, 250)
    memory = TensorMemory().track([x])
    with memory:
        y = x * 2              # x, y
        z = y * 3              # x, y, z: the peak
        del y                  # x, z
        flat = z.view(-1)      # a view: no new storage
        z.add_(1)              # in place: no new storage
        memory.mark('two')
        del z
        memory.mark('still two')  # flat keeps z's storage alive
        del flat
        memory.mark('one')
        w = torch.empty(0)
        w.resize_(1000, 250)   # a storage grown in place counts at its new size
        memory.mark('grown')
    assert memory.peak == 3 * MB
    assert memory.marks['two'] == (2 * MB, 3 * MB)  # (live, peak since the previous mark)
    assert memory.marks['still two'] == (2 * MB, 2 * MB)
    assert memory.marks['one'] == (MB, 2 * MB)
    assert memory.marks['grown'][0] == 2 * MB
    del w


def test_saved_activations_per_module_without_weights():
    torch.manual_seed(0)
    layer = torch.nn.Linear(250, 100)
    saved = SavedActivations({'linear': layer}, weights=list(layer.parameters()))
    x = torch.randn(64, 250, requires_grad=True)  # so that the Linear keeps its weight too
    with saved():
        out = torch.relu(layer(x))  # Linear keeps its input (and its weight); relu, outside it, its output
        (out * out).sum().backward()  # the product keeps out: the same storage, not counted again
    assert saved.by_part == {'linear': 64 * 250 * 4, 'loss and the rest': 64 * 100 * 4}
    assert layer.weight.grad is not None
    # the hooks are gone after the block
    assert not layer._forward_hooks and not layer._forward_pre_hooks
