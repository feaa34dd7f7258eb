"""Model selection: model_best.pth is the epoch with the best validation rsum, and the final test
evaluates it (not the last epoch). Only the validation rsum is scripted (a later epoch scores
worse); training, checkpoints and the final test run as they are."""
import json

import numpy as np
import torch

import eval as eval_script
import train
from lib import training
from lib.evaluation import load_sims
from test_errors import bert_folder, make_data, train_argv

VAL_RSUMS = [10.0, 30.0, 20.0]  # per epoch: the second (checkpoint epoch 2) is the best


def test_the_best_epoch_is_saved_and_tested(tmp_path, monkeypatch):
    make_data(tmp_path)
    bert = bert_folder(tmp_path / 'bert')
    real_validate, scripted = training.validate, iter(VAL_RSUMS)

    def validate(model, split, *args, **kwargs):
        results, sims = real_validate(model, split, *args, **kwargs)
        if split.caps_path.endswith('dev_caps.txt'):  # model selection; the test split is untouched
            results[0]['rsum'] = next(scripted)
        return results, sims
    monkeypatch.setattr(training, 'validate', validate)
    train.main(train_argv(tmp_path, bert, 'run', '--num_epochs', '3', '--warmup', '100',
                          '--learning_rate', '1e-2', '--lr_schedules', '10'))
    run = tmp_path / 'run'
    best = torch.load(run / 'model_best.pth', weights_only=True)
    last = torch.load(run / 'checkpoint_last.pth', weights_only=True)
    assert (best['epoch'], best['best_rsum']) == (2, 30.0)
    assert (last['epoch'], last['best_rsum']) == (3, 30.0)
    saved = json.loads((run / 'results.json').read_text())
    assert saved['epoch'] == 2 and saved['checkpoint'] == 'model_best.pth'

    # the final test's matrix is model_best.pth's, as eval.py computes it, not checkpoint_last.pth's
    sims = {}
    for name in ('model_best.pth', 'checkpoint_last.pth'):
        out = str(tmp_path / f'{name}.npy')
        results = eval_script.main(['--checkpoint', str(run / name), '--device', 'cpu', '--save_sims', out])
        sims[name] = load_sims(out)
        if name == 'model_best.pth':
            assert saved['results'][0]['rsum'] == results[0]['rsum']
    tested = load_sims(str(run / 'results_tiny.npy'))
    np.testing.assert_allclose(tested, sims['model_best.pth'], atol=1e-5)
    assert np.abs(tested - sims['checkpoint_last.pth']).max() > 1e-3
