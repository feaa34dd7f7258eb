"""A trained model from Python (a notebook, another project): load, encode, score, retrieve.

    from lib.api import Matcher
    matcher = Matcher.load('runs/f30k/model_best.pth')
    sims = matcher.similarities(matcher.encode_images(regions), matcher.encode_captions(captions))

Encoding goes through eval.py's own code (lib.encoding), so the similarities are eval.py's.
docs/python_api.md shows the whole use; tests/test_python_api.py runs that page's code.
"""
from types import SimpleNamespace

import numpy as np
import torch

from lib.data import TextSpec, tokenize_captions
from lib.distributed import pick_device
from lib.errors import UserError
from lib.encoding import encode_captions, encode_images
from lib.models import load_model
from lib.precision import autocast


def as_numpy(x, name):
    x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if x.ndim != 2:
        raise UserError(f'{name} must be a 2-d array (rows x embedding size); got shape {x.shape}')
    return x.astype(np.float32, copy=False)


class Matcher:
    """A trained model in eval mode with its tokenizer. Embeddings and similarities are float32
    numpy arrays; embeddings are L2-normalised, so a similarity is a cosine."""

    def __init__(self, loaded, device, batch_size=128, precision='fp32'):
        self.model, self.config, self.tokenizer, self.options = loaded
        self.device, self.batch_size, self.precision = device, batch_size, precision
        self.text = TextSpec(self.tokenizer)

    @classmethod
    def load(cls, path, device=None, bert_path=None, batch_size=128, precision='fp32'):
        """Any model file this project reads: its checkpoints (every version), the authors'
        checkpoints, exported safetensors folders. device: 'cpu', 'cuda', 'cuda:1'; when None: a
        GPU when there is one. bert_path: the text model folder when the one the model names is
        not on this machine. precision: fp32, bf16 or fp16 autocast of the encoders."""
        device = pick_device(device)
        return cls(load_model(path, device, bert_path), device, batch_size, precision)

    @property
    def img_dim(self):
        return self.model.img_dim

    @torch.no_grad()
    def encode_images(self, regions, lengths=None):
        """(N, R, D) region features (numpy, memory-mapped or torch) -> (N, E) embeddings.
        lengths: (N,) valid regions per image, the rest padding; when None every region counts."""
        shape = tuple(regions.shape)
        if len(shape) != 3 or shape[2] != self.img_dim:
            raise UserError(f'regions must be (images, regions, {self.img_dim}) for this model; got {shape}')
        if lengths is None:  # eval.py's path
            return encode_images(self.model, regions, self.device, self.batch_size, self.precision)
        lengths = torch.as_tensor(np.asarray(lengths), dtype=torch.long)
        if lengths.shape != (shape[0],) or (len(lengths) and not 1 <= int(lengths.min()) <= int(lengths.max()) <= shape[1]):
            raise UserError(f'lengths must hold one count in 1..{shape[1]} per image ({shape[0]})')
        out = []
        for start in range(0, shape[0], self.batch_size):
            block = torch.as_tensor(np.asarray(regions[start:start + self.batch_size]), dtype=torch.float32)
            with autocast(self.device, self.precision):
                emb, _ = self.model.encode_image(block.to(self.device),
                                                 lengths[start:start + self.batch_size].to(self.device))
            out.append(emb.float().cpu())
        return torch.cat(out).numpy()

    def encode_captions(self, captions):
        """A list of strings -> (M, E) embeddings, tokenised as eval.py tokenises a caption file."""
        if isinstance(captions, str):
            captions = [captions]
        captions = list(captions)
        if not captions:
            return np.zeros((0, self.config.embed_size), np.float32)
        batch = SimpleNamespace(tokens=tokenize_captions(self.tokenizer, captions), text=self.text)
        with torch.no_grad():
            return encode_captions(self.model, batch, self.device, self.batch_size, self.precision)

    @staticmethod
    def similarities(img_emb, cap_emb):
        """(N, E) x (M, E) -> (N, M) cosine similarities, rows images, as eval.py's matrix."""
        return as_numpy(img_emb, 'img_emb') @ as_numpy(cap_emb, 'cap_emb').T

    @staticmethod
    def top_k(sims, k=5):
        """Per row of sims, the k best columns: (scores (rows, k), indices (rows, k)), best first.
        sims: images x captions gives captions per image; its transpose images per caption."""
        sims = torch.from_numpy(np.ascontiguousarray(as_numpy(sims, 'sims')))
        if not 1 <= k <= sims.shape[1]:
            raise UserError(f'k must be 1..{sims.shape[1]} (the number of columns); got {k}')
        scores, indices = sims.topk(k, dim=1)
        return scores.numpy(), indices.numpy()

