"""tools/plot_curves.py: reads the loss / rsum events that train.py writes and draws a PNG."""
import json

import cv2
import numpy as np
import pytest
from torch.utils.tensorboard import SummaryWriter

from tools import plot_curves


def write_run(folder, losses, rsums, purge_step=None):
    writer = SummaryWriter(str(folder), purge_step=purge_step)
    for step, value in losses.items():
        writer.add_scalar('train/loss', value, step)
    for step, value in rsums.items():
        writer.add_scalar('val/rsum', value, step)
    writer.close()


def test_reads_the_logged_values(tmp_path):
    losses = {s: 10.0 / (s + 1) for s in range(30)}
    rsums = {9: 100.0, 19: 250.5, 29: 300.25}
    write_run(tmp_path / 'a', losses, rsums)
    curves = plot_curves.read_scalars(str(tmp_path / 'a'))
    assert list(curves['train/loss'][0]) == list(losses)
    np.testing.assert_allclose(curves['train/loss'][1], list(losses.values()), rtol=1e-6)
    assert list(curves['val/rsum'][0]) == [9, 19, 29]
    np.testing.assert_allclose(curves['val/rsum'][1], [100.0, 250.5, 300.25])


def test_resumed_run_keeps_the_replayed_steps_only(tmp_path):
    # a run killed after step 9 and resumed from a checkpoint of step 5 (train.py's purge_step)
    write_run(tmp_path / 'r', {s: 1.0 for s in range(10)}, {})
    write_run(tmp_path / 'r', {s: 2.0 for s in range(5, 8)}, {}, purge_step=5)
    steps, values = plot_curves.read_scalars(str(tmp_path / 'r'))['train/loss']
    assert list(steps) == list(range(8))
    assert list(values) == [1.0] * 5 + [2.0] * 3


def test_smooth_is_a_trailing_mean():
    values = np.array([1.0, 3.0, 5.0, 7.0, 9.0])
    expected = [np.mean(values[max(0, i - 1):i + 1]) for i in range(len(values))]
    np.testing.assert_allclose(plot_curves.smooth(values, 2), expected)


def test_png_of_two_runs(tmp_path):
    write_run(tmp_path / 'a', {s: 5.0 - 0.1 * s for s in range(20)}, {9: 10.0, 19: 20.0})
    write_run(tmp_path / 'b', {s: 6.0 - 0.2 * s for s in range(20)}, {})  # no validation yet
    out = tmp_path / 'figs' / 'curves.png'
    plot_curves.main([str(tmp_path / 'a'), str(tmp_path / 'b'), '--out', str(out)])
    image = cv2.imread(str(out))
    assert image is not None and image.shape == (420, 1600, 3)  # figsize (16, 4.2) at 100 dpi
    assert image.std() > 10  # something is drawn


def test_default_output_is_inside_the_first_run_folder(tmp_path):
    write_run(tmp_path / 'a', {s: 5.0 - 0.1 * s for s in range(20)}, {})
    plot_curves.main([str(tmp_path / 'a')])
    assert cv2.imread(str(tmp_path / 'a' / 'curves.png')) is not None


def test_folder_without_events_is_a_user_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        plot_curves.main([str(tmp_path), '--out', str(tmp_path / 'x.png')])
    assert exc.value.code == 2
    assert str(tmp_path) in capsys.readouterr().err


def write_parts_run(folder, warmup, reg_weight):
    """Events as lib/engine.py logs them: the parts, and the total = base + gnn + weight x KL."""
    writer = SummaryWriter(str(folder))
    for step in range(30):
        base, gnn, kl = 3.0 - 0.05 * step, 6.0 - 0.1 * step, 0.02 + 0.001 * step
        writer.add_scalar('train/loss_base', base, step)
        total = base
        if step >= warmup:
            writer.add_scalar('train/loss_gnn', gnn, step)
            writer.add_scalar('train/loss_reg', kl, step)
            total += gnn + reg_weight * kl
        writer.add_scalar('train/loss', total, step)
    writer.close()
    (folder / 'options.json').write_text(json.dumps({'reg_loss_weight': reg_weight, 'warmup': warmup}))


def test_loss_parts_add_up_and_the_warmup_step_is_found(tmp_path):
    write_parts_run(tmp_path / 'p', warmup=12, reg_weight=10.0)
    curves = plot_curves.read_scalars(str(tmp_path / 'p'))
    parts = plot_curves.loss_parts(curves, plot_curves.reg_weight(str(tmp_path / 'p')))
    assert set(parts) == {'base', 'gnn', 'reg'}
    assert plot_curves.warmup_step(parts) == 12
    steps, total = curves['train/loss']
    summed = parts['base'][1].astype(np.float64).copy()
    for name in ('gnn', 'reg'):  # the relation parts exist from the warm-up step on
        assert list(parts[name][0]) == list(range(12, 30))
        summed[12:] += parts[name][1]
    np.testing.assert_allclose(summed, total, rtol=1e-5)


def test_png_with_loss_parts(tmp_path):
    write_parts_run(tmp_path / 'p', warmup=12, reg_weight=10.0)
    write_run(tmp_path / 'q', {s: 4.0 for s in range(20)}, {19: 5.0})  # an older run without parts
    out = tmp_path / 'parts.png'
    plot_curves.main([str(tmp_path / 'p'), str(tmp_path / 'q'), '--out', str(out)])
    assert cv2.imread(str(out)).std() > 10
