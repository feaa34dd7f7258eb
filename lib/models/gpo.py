"""GPO, the Generalized Pooling Operator of VSE∞ (Chen et al., CVPR 2021; HREM_SPEC.md section 11).

A set of n vectors is pooled by sorting each dimension's n values in descending order and taking
a weighted sum over the sorted positions. The weight of sorted position k depends on the set size
n alone: positional encodings of 0..n-1 -> bidirectional GRU over the n positions (the two
directions averaged) -> linear -> softmax(score / 0.1) over the n positions.

Batched with masks: padded positions never enter the sort and get zero weight; the GRU runs once
per distinct length in the batch (weights depend on n alone), as packed sequences, so that each
length's GRU sees exactly its n positions, as the authors' per-sample packing does.
"""
import math

import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

PE_SIZE = 32       # size of the positional encodings (the authors' GPO(32, 32))
HIDDEN_SIZE = 32   # GRU hidden size
TEMPERATURE = 0.1  # softmax temperature of the position weights
PAD_VALUE = -10000.0  # the authors' fill for padded positions (before the sort and in the scores)


def positional_encoding(length, size, device=None):
    """(length, size): sin on even, cos on odd dimensions, the Transformer formula."""
    if size % 2:
        raise ValueError(f'positional encoding size {size} must be even')
    position = torch.arange(length, dtype=torch.float32, device=device)[:, None]
    div = torch.exp(torch.arange(0, size, 2, dtype=torch.float32, device=device) * -(math.log(10000.0) / size))
    pe = torch.zeros(length, size, device=device)
    pe[:, 0::2] = torch.sin(position * div)
    pe[:, 1::2] = torch.cos(position * div)
    return pe


class GPO(nn.Module):
    """Module names (gru, linear) are the authors': their state keys load unchanged."""

    def __init__(self, pe_size=PE_SIZE, hidden_size=HIDDEN_SIZE):
        super().__init__()
        self.pe_size = pe_size
        self.gru = nn.GRU(pe_size, hidden_size, num_layers=1, batch_first=True, bidirectional=True)
        self.linear = nn.Linear(hidden_size, 1, bias=False)

    def position_weights(self, lengths, max_len):
        """(B,) set sizes -> (B, max_len) weights: softmax over each set's n positions, 0 beyond."""
        sizes, which = lengths.unique(return_inverse=True)  # sorted ascending, one GRU row per size
        n_max = int(sizes[-1])
        if n_max > max_len:
            raise ValueError(f'a length {n_max} exceeds the {max_len} positions given')
        valid = torch.arange(n_max, device=lengths.device)[None, :] < sizes[:, None]  # (U, n_max)
        pe = positional_encoding(n_max, self.pe_size, lengths.device)
        pe = pe[None].expand(len(sizes), -1, -1) * valid[..., None]
        packed = pack_padded_sequence(pe, sizes.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = pad_packed_sequence(self.gru(packed)[0], batch_first=True, total_length=n_max)
        half = out.shape[-1] // 2
        out = (out[..., :half] + out[..., half:]) / 2
        scores = self.linear(out).squeeze(-1).masked_fill(~valid, PAD_VALUE)
        weights = torch.softmax(scores / TEMPERATURE, dim=1)
        # padded weights are exactly 0 (exp(-1e5) underflows); positions beyond every set too
        weights = nn.functional.pad(weights, (0, max_len - n_max))
        return weights[which]

    def forward(self, x, lengths):
        """(B, L, E) features, (B,) set sizes (1..L) -> (B, E) pooled, (B, L) position weights."""
        weights = self.position_weights(lengths, x.shape[1])
        valid = torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]
        ordered = x.masked_fill(~valid[..., None], PAD_VALUE).sort(dim=1, descending=True).values
        ordered = ordered.masked_fill(~valid[..., None], 0.0)
        pooled = (ordered * weights[..., None].to(ordered.dtype)).sum(dim=1)
        return pooled, weights
