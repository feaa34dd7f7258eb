"""Loading a trained model from any file this project reads (lib.models.load_model)."""
import dataclasses
import os

from lib import checkpoint as ckpt_lib
from lib.errors import UserError
from lib.text_model import load_text_backbone, load_tokenizer


def model_from_checkpoint(ckpt, source, bert_path=None, relation=False):
    """(model holding the checkpoint's weights, its config). Every key and shape is checked
    (lib.checkpoint.load_module_state); the relation module is left as built unless relation=True."""
    from lib.models import config_from_dict, create_model
    config = config_from_dict(ckpt['config'])
    if bert_path is not None:
        config = dataclasses.replace(config, bert_path=bert_path)
    try:
        bert = load_text_backbone(config.bert_path, pretrained=False)
    except UserError as err:
        if bert_path is not None:
            raise
        # e.g. an authors' checkpoint names a folder on their machine
        raise UserError(f'{source} names its text model {config.bert_path!r} in its saved options, which is '
                        f'not usable here ({err}); pass --bert_path with a local copy, e.g. '
                        'data/bert-base-uncased') from err
    hidden = ckpt_lib.architecture(ckpt)['text_hidden']
    if bert.config.hidden_size != hidden:
        raise UserError(f'{source} was trained with a text model of hidden size {hidden}, but '
                        f'{config.bert_path} has {bert.config.hidden_size}; pass the matching --bert_path')
    model = create_model(config, bert)
    ckpt_lib.load_model_weights(model, ckpt, source, relation=relation)
    return model, config


def read_model_file(path):
    """A .pth checkpoint (ours, any version, or the authors') or an exported folder, in the layout of
    lib.checkpoint.read_checkpoint."""
    if os.path.isdir(path):
        from lib.exported import read_exported
        return read_exported(path)
    return ckpt_lib.read_checkpoint(path)


def saved_options(ckpt):
    """The training options of the run that wrote ckpt over the current defaults: what a
    checkpoint lacks (an authors' one, an older one) takes its default (e.g. its dataset)."""
    import arguments
    return {**vars(arguments.get_train_parser().parse_args([])), **ckpt['options']}


def text_model_of(path, ckpt, bert_path=None):
    """The text model folder for config and vocabulary: the one given, an export's own, or the config's."""
    if bert_path is not None:
        return bert_path
    if os.path.isdir(path):
        return os.path.join(path, 'text_model')
    return ckpt['config']['bert_path']


def load_model(path, device='cpu', bert_path=None):
    """-> lib.models.LoadedModel: the model in eval mode on `device`, its config, its tokenizer and
    the options of the run that wrote it. `path`: a .pth checkpoint (ours, any version, or the
    authors') or a folder of exported weights (lib/exported.py)."""
    from lib.models import LoadedModel
    ckpt = read_model_file(path)
    model, config = model_from_checkpoint(ckpt, path, text_model_of(path, ckpt, bert_path), relation=True)
    return LoadedModel(model.to(device).eval(), config, load_tokenizer(config.bert_path), saved_options(ckpt))
