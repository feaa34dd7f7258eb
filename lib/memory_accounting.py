"""Memory of a training step, per part, counted from the tensors themselves (not from a device
allocator, so a CPU run gives the figures of a GPU run without its caching and workspaces).

`TensorMemory` is a TorchDispatchMode: every tensor an operation returns is recorded by its
storage (views and in-place results share one), the live total goes down when the last tensor of
a storage is freed, and the highest total is kept. Tensors that exist before the mode starts
(weights, the batch) are registered with `track`.

`SavedActivations` counts what autograd keeps for the backward pass (saved_tensors_hooks), each
storage once, attributed to the named part (a module) whose forward saved it, the innermost when parts nest.
Weights, gradients and optimizer state are the parameters' own bytes.
"""
import contextlib
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def storage_key(t):
    return t.untyped_storage()._cdata


def storage_bytes(t):
    return t.untyped_storage().nbytes()


class TensorMemory(TorchDispatchMode):
    """Live bytes of the tracked tensors' storages and their peak (`live`, `peak`); `mark(name)`
    records the live total at a point of the step and the peak since the previous mark
    (`marks[name] = (live, peak of the phase)`)."""

    def __init__(self):
        super().__init__()
        self.refs = {}  # storage key -> [bytes, number of live tensors using it]
        self.live = self.peak = self.phase_peak = 0
        self.marks = {}

    def track(self, tensors):
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.device.type != 'meta':
                self._add(t)
        return self

    def _add(self, t):
        key = storage_key(t)
        entry = self.refs.get(key)
        if entry is None:
            entry = self.refs[key] = [storage_bytes(t), 0]
            self.live += entry[0]
        elif storage_bytes(t) > entry[0]:  # resized in place (resize_, set_)
            self.live += storage_bytes(t) - entry[0]
            entry[0] = storage_bytes(t)
        self.peak = max(self.peak, self.live)
        self.phase_peak = max(self.phase_peak, self.live)
        entry[1] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key):
        entry = self.refs.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self.refs[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._add(t)
        return out

    def mark(self, name):
        self.marks[name] = (self.live, self.phase_peak)
        self.phase_peak = self.live


class SavedActivations:
    """Bytes autograd saves for the backward pass, per part: `by_part[name]` (each storage counted
    once, for the first part that saved it). Parts are the modules named in `parts` ({part: module});
    tensors saved outside them go to `other`. Storages of `weights` are not counted."""

    def __init__(self, parts, weights=(), other='loss and the rest'):
        self.parts, self.other = parts, other
        self.weights = {storage_key(w) for w in weights}  # a weight saved for backward is not an activation
        self.by_part = {name: 0 for name in [*parts, other]}
        self.seen = set()
        self.stack = []
        self.hooks = []

    def _pack(self, t):
        if isinstance(t, torch.Tensor) and t.device.type != 'meta':
            key = storage_key(t)
            if key not in self.seen and key not in self.weights:
                self.seen.add(key)
                self.by_part[self.stack[-1] if self.stack else self.other] += storage_bytes(t)
        return t

    @contextlib.contextmanager
    def __call__(self):
        for name, module in self.parts.items():
            # the hooks return None: a forward hook's return value would replace the module's output
            self.hooks.append(module.register_forward_pre_hook(lambda *_, n=name: self.stack.append(n) and None))
            self.hooks.append(module.register_forward_hook(lambda *_: self.stack.pop() and None))
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
                yield self
        finally:
            for hook in self.hooks:
                hook.remove()
            self.hooks.clear()


def parameter_bytes(module, trainable_only=False):
    return sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad or not trainable_only)


def optimizer_state_bytes(optimizer):
    return sum(v.numel() * v.element_size() for state in optimizer.state.values()
               for v in state.values() if isinstance(v, torch.Tensor))
