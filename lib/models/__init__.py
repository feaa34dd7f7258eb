"""The models of this codebase, one registry and one way to build or load each.

    config = config_from_args(args, img_dim)      # the command line -> the model's config
    model = create_model(config)                  # a fresh model (text backbone from config.bert_path)
    loaded = load_model('runs/f30k/model_best.pth', device)   # any checkpoint this project reads

A model is a class registered with `register_model(name, config_cls)`; see docs/adding_a_model.md
for what it provides. The checkpoint formats are handled in lib/checkpoint.py (pickled .pth, ours
and the authors') and lib/exported.py (safetensors folders).
"""
import dataclasses
from typing import NamedTuple

from lib.errors import UserError
from lib.models.hrem import HREM, HREMConfig
from lib.models.outputs import Outputs

MODELS = {}  # name -> (config class, model class)


def register_model(name, config_cls):
    """Class decorator: make a model buildable by name (--model NAME, config.model == NAME)."""
    def register(model_cls):
        MODELS[name] = (config_cls, model_cls)
        return model_cls
    return register


register_model('hrem', HREMConfig)(HREM)
from lib.models.vse_infty import VSEInfty, VSEInftyConfig  # noqa: E402  (its module imports nothing from here)
register_model('vse_infty', VSEInftyConfig)(VSEInfty)


def model_names():
    return sorted(MODELS)


def entry(name):
    if name not in MODELS:
        raise UserError(f'unknown model {name!r}; known models: {", ".join(model_names())}')
    return MODELS[name]


def authors_model(parts):
    """(name, encoder states in our names) of an authors' checkpoint's {'img_enc', 'txt_enc'} states:
    the registered model whose class recognises them (is_authors_state), else hrem with the states as
    they are (HREM's names are its authors')."""
    for name, (_, model_cls) in MODELS.items():
        claims = getattr(model_cls, 'is_authors_state', None)
        if claims is not None and claims(parts):
            return name, model_cls.authors_state_dict(parts)
    return 'hrem', parts


def config_from_dict(values, model=None):
    """The config of `model` (default: values['model'], else hrem) from a dict that may hold other
    keys too (a run's options, the authors' opt): fields it lacks take the config's defaults."""
    name = model or values.get('model') or 'hrem'
    config_cls, _ = entry(name)
    fields = {f.name for f in dataclasses.fields(config_cls)}
    return config_cls(**{k: v for k, v in values.items() if k in fields and k != 'model'})


def config_from_args(args, img_dim):
    """The one place where command-line options become a model configuration."""
    return config_from_dict({**vars(args), 'img_dim': img_dim}, getattr(args, 'model', 'hrem'))


def create_model(config, text_backbone=None, pretrained=True):
    """A fresh model of config.model. text_backbone: a transformers BertModel; when None it is
    read from config.bert_path (with its pretrained weights unless pretrained=False)."""
    _, model_cls = entry(config.model)
    if text_backbone is None:
        from lib.text_model import load_text_backbone
        text_backbone = load_text_backbone(config.bert_path, pretrained=pretrained)
    return model_cls(config, text_backbone)


class LoadedModel(NamedTuple):
    """A trained model in eval mode on its device, its config, its tokenizer and the options of the
    run that wrote it (an empty dict for exported weights)."""
    model: object
    config: object
    tokenizer: object
    options: dict


def load_model(path, device='cpu', bert_path=None):
    """Load a model from any file this project reads: its own checkpoints (every format version),
    the authors' checkpoints, and exported safetensors folders (lib/exported.py). The text model's
    architecture and vocabulary come from bert_path (default: the config's); weights from the file."""
    from lib.loading import load_model as load
    return load(path, device, bert_path)


__all__ = ['MODELS', 'register_model', 'model_names', 'authors_model', 'config_from_dict', 'config_from_args', 'create_model',
           'load_model', 'LoadedModel', 'HREM', 'HREMConfig', 'VSEInfty', 'VSEInftyConfig', 'Outputs']
