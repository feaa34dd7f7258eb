"""Image and text encoders with fragment-level relations (the only part used at test time).

Module names mirror the authors' state keys (fc.fc, fc.mlp.layers/bns, aggr.layers.0, bert,
linear), so their checkpoints load without renaming.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

MAXK = 2  # MaxK pooling keeps the mean of the 2 largest values per dimension


def l2norm(x, dim=-1, eps=1e-8):
    """x / (||x|| + eps), the authors' normalisation (eps added to the norm, not clamped)."""
    return x / (x.pow(2).sum(dim=dim, keepdim=True).sqrt() + eps)


def valid_mask(lengths, max_len):
    """(B,) lengths -> (B, max_len) bool, True on valid positions."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


def maxk_pool(x, lengths, k=MAXK):
    """Per dimension, the mean of the min(k, n) largest values over the n valid positions."""
    valid = valid_mask(lengths, x.shape[1])
    k_eff = min(k, x.shape[1])
    top = x.masked_fill(~valid[..., None], float('-inf')).topk(k_eff, dim=1).values  # (B, k, E)
    used = lengths.clamp(max=k_eff)
    top = top.masked_fill(~valid_mask(used, k_eff)[..., None], 0.0)
    return top.sum(dim=1) / used[:, None].to(x.dtype)


def mean_pool(x, lengths):
    valid = valid_mask(lengths, x.shape[1])
    return (x * valid[..., None].to(x.dtype)).sum(dim=1) / lengths[:, None].to(x.dtype)


def autocast_dtype(device_type):
    if hasattr(torch, 'get_autocast_dtype'):  # torch >= 2.4
        return torch.get_autocast_dtype(device_type)
    return torch.get_autocast_cpu_dtype() if device_type == 'cpu' else torch.get_autocast_gpu_dtype()


def init_linear(module):
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        nn.init.zeros_(module.bias)


class MLP(nn.Module):
    """Linear -> BN -> ReLU -> ... -> Linear, applied to (B, N, D) as B*N rows.

    BatchNorm sees every row, padded regions included, as in the authors' code.
    """

    def __init__(self, in_dim, hidden_dim, out_dim, num_layers=2, last_bn=False):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        # the authors create a BN for the output too (it is in their state dict) but never apply it;
        # unused, it is frozen so that no parameter without a gradient reaches the optimizer or DDP
        self.bns = nn.ModuleList(nn.BatchNorm1d(b) for b in dims[1:])
        self.bns[-1].requires_grad_(last_bn)
        self.last_bn = last_bn

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        for i, (layer, bn) in enumerate(zip(self.layers, self.bns)):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(bn(x))
            elif self.last_bn:
                x = bn(x)
        return x.reshape(*shape[:-1], x.shape[-1])


class FCMLP(nn.Module):
    """x = FC(v) + MLP(v) per region."""

    def __init__(self, in_dim, embed_size, last_bn=False):
        super().__init__()
        self.fc = nn.Linear(in_dim, embed_size)
        self.mlp = MLP(in_dim, embed_size // 2, embed_size, 2, last_bn=last_bn)
        self.apply(init_linear)

    def forward(self, v):
        device = v.device.type
        if torch.is_autocast_enabled(device):
            # convert the regions (the largest input, B x R x D) once: under autocast each of the two
            # linears would convert them again; the same rounding, so the same numbers
            v = v.to(autocast_dtype(device))
        return self.fc(v) + self.mlp(v)


def fragment_transformer(embed_size, nhead, dropout):
    """One post-norm Transformer layer over regions or words (key padding masked)."""
    layer = nn.TransformerEncoderLayer(embed_size, nhead, dim_feedforward=embed_size, dropout=dropout,
                                       batch_first=True)
    return nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)


class FragmentPooling(nn.Module):
    """g = w * MaxK(x) + (1 - w) * mean(Transformer(x)), or MaxK(x) alone without a Transformer.

    Both encoders end with this; its Transformer is registered as `aggr` on the encoder (None
    for the --fragment_transformer ablation). Returns g before L2 normalisation: the authors'
    --norm_input 0 feeds it to the instance-level Transformer.
    """

    def __init__(self, residual_weight):
        super().__init__()
        self.residual_weight = residual_weight

    def forward(self, x, lengths, aggr):
        g0 = maxk_pool(x, lengths)
        if aggr is None:
            return g0
        y = aggr(x, src_key_padding_mask=~valid_mask(lengths, x.shape[1]))
        g1 = mean_pool(y, lengths)
        w = self.residual_weight
        return w * g0 + (1 - w) * g1


class ImageEncoder(nn.Module):
    def __init__(self, img_dim, embed_size, nhead=16, dropout=0.1, residual_weight=0.8, mlp_last_bn=False,
                 transformer=True):
        super().__init__()
        self.fc = FCMLP(img_dim, embed_size, last_bn=mlp_last_bn)
        self.aggr = fragment_transformer(embed_size, nhead, dropout) if transformer else None
        self.pool = FragmentPooling(residual_weight)

    def forward(self, regions, lengths):
        """(B, R, D) regions, (B,) counts -> (B, E) embedding before L2 normalisation, (B, R, E) local
        features."""
        x = self.fc(regions)
        return self.pool(x, lengths, self.aggr), x


class TextEncoder(nn.Module):
    def __init__(self, bert, embed_size, nhead=16, dropout=0.1, residual_weight=0.8, transformer=True):
        super().__init__()
        self.bert = bert
        # the pooler is kept for checkpoint compatibility but unused: freeze it so that no
        # parameter without a gradient reaches the optimizer or DDP
        for p in getattr(bert, 'pooler', nn.Identity()).parameters():
            p.requires_grad_(False)
        self.linear = nn.Linear(bert.config.hidden_size, embed_size)
        self.aggr = fragment_transformer(embed_size, nhead, dropout) if transformer else None
        self.pool = FragmentPooling(residual_weight)

    def forward(self, tokens, lengths):
        """(B, L) ids padded with 0, (B,) lengths -> (B, E) embedding before L2 normalisation,
        (B, L, E) word features."""
        hidden = self.bert(input_ids=tokens, attention_mask=(tokens != 0).long()).last_hidden_state
        x = self.linear(hidden)
        return self.pool(x, lengths, self.aggr), x
