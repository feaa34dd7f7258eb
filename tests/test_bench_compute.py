"""bench/bench.py's flops and memory parts at tiny sizes, against invariants and hand counts: the
step's FLOPs exceed its forward pass's, the evaluation totals add up from their parts, the image
encoder's forward is at least its first linear layer (2 x regions x D x E per image); a step leaves
memory as it found it (the update frees the gradients), the peak is at least the live total, and
--grad_checkpointing keeps less of the text backbone."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B, E, R, D, N = 8, 64, 12, 32, 12
TINY = ['--text', 'tiny', '--batch_size', str(B), '--embed_size', str(E), '--nhead', '4', '--regions', str(R),
        '--img_dim', str(D), '--tokens', str(N), '--repeat', '1', '--threads', '1']


@pytest.fixture(scope='module')
def results():
    run = subprocess.run([sys.executable, os.path.join(ROOT, 'bench', 'bench.py'), '--parts', 'flops', 'memory',
                          '--loader_images', '40', *TINY], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout)['results']


def test_flops_add_up(results):
    f = results['flops']
    assert f['step_flops'] > 2 * f['forward_flops'] > 0  # backward costs about twice the forward
    assert sum(f['forward_flops_by_module'].values()) <= f['forward_flops']
    assert f['forward_flops_by_module']['HREM.img_enc'] >= 2 * B * R * D * E
    assert f['eval_flops_per_image'] >= 2 * R * D * E
    for name, n in (('f30k_1k_test', 1000), ('coco_5k_test', 5000)):
        expected = n * f['eval_flops_per_image'] + 5 * n * f['eval_flops_per_caption'] + 2 * E * n * 5 * n
        assert f['eval_flops'][name] == pytest.approx(expected)
    assert f['achieved_flops_per_s'] == pytest.approx(f['step_flops'] / f['step_s'])
    assert f['loader_samples_per_s'] > 0 and f['limited_by'] in ('the step', 'the loader')


def test_memory_balances(results):
    variants = results['memory']['variants']
    assert set(variants) == {'ours', 'grad_checkpointing', 'loop'}
    for v in variants.values():
        live = v['live_bytes']
        # within 1%: a few small tensors (kilobytes here, 2 MB of 1.6 GB at the paper's sizes) outlive the step
        assert live['after the update'] == pytest.approx(live['before the step'], rel=0.01)
        assert live['after forward'] > live['before the step'] * 1.01
        assert live['before the step'] >= v['weights_bytes'] + v['optimizer_state_bytes']
        assert v['peak_bytes'] >= max(live.values())
        assert v['gradient_bytes'] <= v['weights_bytes']
    plain, ckpt = variants['ours'], variants['grad_checkpointing']
    assert ckpt['saved_for_backward_bytes']['text backbone'] < plain['saved_for_backward_bytes']['text backbone']
    assert ckpt['saved_for_backward_bytes']['image encoder'] == plain['saved_for_backward_bytes']['image encoder']
