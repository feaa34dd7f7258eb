"""Instance-level relations (training only): which instances of a batch attend to which, and how
strongly, and the Transformer that runs over the 2B instances as one sequence.

Nodes are the B image embeddings followed by the B caption embeddings. For every block of the
2B x 2B graph ([[i2i, i2t], [t2i, t2t]], rows are queries) there is
- a connection (bool): each row keeps its top floor(B * threshold) entries;
- a relevance (real): exp(-||e_i - e_j|| / sigma) within a modality; across modalities, an MLP
  over the top-K region-word matching scores plus their mean.
The attention mask is mask_weight * relevance where connected and -inf elsewhere.
"""
import contextlib
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F


def pad_positions(x, length):
    """Zero-pad (B, L, E) along L to at least `length` positions."""
    return F.pad(x, (0, 0, 0, length - x.shape[1])) if x.shape[1] < length else x


def region_word_scores(regions, words, word_lengths, topk):
    """Cross-modal matching scores for every (caption, image) pair of the batch at once.

    regions: (Bi, R, E) pre-transformer region features, padded regions included (as the
    authors, who do not mask them here); words: (Bc, L, E) word features; word_lengths: (Bc,).

    Returns t2i_topk (Bc, Bi, K), t2i_mean (Bc, Bi), i2t_topk (Bi, Bc, K), i2t_mean (Bi, Bc),
    equal to the authors' per-caption loop:
    - word axis: a caption of n words uses its first max(K, n) positions (padding tokens fill
      short captions up to K) for the word-axis normalisation and the top-K, its n words for
      the mean and for the max over words;
    - cosine word-region matrix, LeakyReLU(0.1); t2i: L2-normalise along words, max over
      regions; i2t: L2-normalise along regions, max over the caption's words.
    """
    bi, n_regions, dim = regions.shape
    regions = F.normalize(regions, dim=-1)
    words = pad_positions(words, topk)  # zero words fill captions up to K when L < K
    pos = torch.arange(words.shape[1], device=words.device)
    in_caption = pos[None, :] < word_lengths[:, None]                     # (Bc, L)
    in_window = pos[None, :] < word_lengths.clamp(min=topk)[:, None]      # (Bc, L)

    # one matrix product over the words inside their caption's window only (padding beyond
    # max(K, n) would be computed and masked for nothing); layout (Bc, L, Bi, R)
    sim = regions.new_zeros(*in_window.shape, bi, n_regions)
    packed = F.normalize(words[in_window], dim=-1) @ regions.reshape(-1, dim).t()
    sim[in_window] = F.leaky_relu(packed, negative_slope=0.1).view(-1, bi, n_regions)

    # text-to-image: one score per word (best region), then top-K and mean over the caption
    per_word = F.normalize(sim, dim=1).amax(dim=3)                        # (Bc, L, Bi)
    t2i_mean = (per_word * in_caption[..., None]).sum(1) / word_lengths[:, None].to(sim.dtype)
    t2i_topk = per_word.masked_fill(~in_window[..., None], float('-inf')).topk(topk, dim=1).values
    t2i_topk = t2i_topk.transpose(1, 2)                                   # (Bc, Bi, K)

    # image-to-text: one score per region (best word of the caption), then top-K and mean
    per_region = F.normalize(sim, dim=3).masked_fill(~in_caption[..., None, None], float('-inf'))
    per_region = per_region.amax(dim=1)                                   # (Bc, Bi, R)
    i2t_mean = per_region.mean(-1).t()
    # zero scores stand in for missing regions when an image has fewer than K
    per_region = F.pad(per_region, (0, max(0, topk - per_region.shape[-1])))
    i2t_topk = per_region.topk(topk, dim=-1).values.transpose(0, 1)
    return t2i_topk, t2i_mean, i2t_topk, i2t_mean


def top_proportion(scores, k):
    """Boolean mask of the entries >= the k-th largest of each row (ties kept)."""
    return scores >= scores.topk(k, dim=1).values[:, -1:]


def relevance_mlp(topk):
    return nn.Sequential(nn.Linear(topk, topk), nn.ReLU(inplace=True), nn.Linear(topk, 1))


def kl_rows(target_logits, logits):
    """KL(softmax(logits) || softmax(target_logits)) per row, averaged over rows."""
    return F.kl_div(F.log_softmax(target_logits, dim=-1), F.softmax(logits, dim=-1), reduction='batchmean')


class InstanceRelation(nn.Module):
    """The instance-level relation module. `connection` and `relevance` are the paper's ablation
    switches: without connections every node attends to every node; without relevance connected
    pairs get an equal (zero) attention bias, and the relevance MLPs and the regulariser that
    constrains them are not built."""

    def __init__(self, embed_size, nhead=16, dropout=0.1, num_layers=1, topk=10, threshold=0.5,
                 mask_weight=1.0, sigma=1.0, connection=True, relevance=True):
        super().__init__()
        layer = nn.TransformerEncoderLayer(embed_size, nhead, dim_feedforward=embed_size, dropout=dropout,
                                           batch_first=True)
        self.transformer = nn.TransformerEncoder(layer, num_layers=num_layers, enable_nested_tensor=False)
        if relevance:
            self.mlp_t2i = relevance_mlp(topk)
            self.mlp_i2t = copy.deepcopy(self.mlp_t2i)  # the authors start both MLPs from the same weights
        self.topk, self.threshold, self.mask_weight = topk, threshold, mask_weight
        self.sigma, self.connection, self.relevance = sigma, connection, relevance

    def relations(self, img, cap, regions, words, word_lengths):
        """Connection (bool) and relevance (float) of the 2B x 2B graph, and the KL regulariser."""
        n = img.shape[0]
        k = int(n * self.threshold)
        with torch.no_grad():
            # as the authors' code: image rows ranked by img @ img.T, caption rows by cap @ cap.T;
            # a node always keeps itself (rounding can put a near-duplicate above it)
            sim_ii, sim_tt = img @ img.t(), cap @ cap.t()
            sim_ii.fill_diagonal_(float('inf'))
            sim_tt.fill_diagonal_(float('inf'))
            c_ii, c_tt = top_proportion(sim_ii, k), top_proportion(sim_tt, k)

        t2i_topk, t2i_mean, i2t_topk, i2t_mean = region_word_scores(
            regions.detach(), words.detach(), word_lengths, self.topk)
        c_t2i, c_i2t = top_proportion(t2i_mean, k), top_proportion(i2t_mean, k)
        connect = torch.cat([torch.cat([c_ii, c_i2t], 1), torch.cat([c_t2i, c_tt], 1)], 0)
        if not self.connection:
            connect = torch.ones_like(connect)
        if not self.relevance:
            return connect, img.new_zeros(connect.shape), img.new_zeros(())

        r_t2i = self.mlp_t2i(t2i_topk).squeeze(-1) + t2i_mean
        r_i2t = self.mlp_i2t(i2t_topk).squeeze(-1) + i2t_mean
        r_ii = torch.exp(-torch.cdist(img, img) / self.sigma)
        r_tt = torch.exp(-torch.cdist(cap, cap) / self.sigma)

        guide = torch.exp(-torch.cdist(img, cap) / self.sigma).detach()
        reg = kl_rows(guide, r_i2t) + kl_rows(guide.t(), r_t2i)
        relevance = torch.cat([torch.cat([r_ii, r_i2t], 1), torch.cat([r_t2i, r_tt], 1)], 0)
        return connect, relevance, reg

    def forward(self, img, cap, regions, words, word_lengths, nodes=None):
        """Normalised embeddings (B, E) -> relation-enhanced (v^, t^) and the KL regulariser.

        The relations are computed from the normalised embeddings; the Transformer runs over
        `nodes` = (image nodes, caption nodes), by default the same normalised embeddings
        (the authors' --norm_input 0 passes the embeddings before normalisation).
        """
        connect, relevance, reg = self.relations(img, cap, regions, words, word_lengths)
        img_hat, cap_hat = self.attend(*(nodes or (img, cap)), connect, relevance)
        return img_hat, cap_hat, reg

    def attend(self, img, cap, connect, relevance):
        """One masked Transformer pass over the 2B nodes: a node attends only to its connections."""
        mask = (self.mask_weight * relevance).masked_fill(~connect, float('-inf'))
        nodes = torch.cat([img, cap], 0)[None]
        with standard_attention_path():
            # is_causal=False: never causal, and torch would otherwise compare the mask with a causal
            # one, a data-dependent check (it fails on fake tensors; a sync per step on CUDA)
            out = self.transformer(nodes, mask=mask.to(nodes.dtype), is_causal=False)[0]
        return F.normalize(out, dim=-1).split(img.shape[0])


@contextlib.contextmanager
def standard_attention_path():
    """PyTorch's inference fast path of TransformerEncoderLayer (eval mode, no grad) reads an
    additive float mask as a boolean one and returns NaN (torch 2.14); training never takes it,
    but inspecting a trained module does. The standard path computes the same numbers."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)
