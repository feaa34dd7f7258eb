"""HREM: the two encoders, the instance-level relation module and the training objective."""
from dataclasses import dataclass

import torch
import torch.nn as nn

from graph_lib import InstanceRelation
from lib.encoders import ImageEncoder, TextEncoder, l2norm
from lib.losses import MatchingLoss


@dataclass
class Outputs:
    """What one training forward produces: the loss and its parts (for logging)."""
    loss: torch.Tensor
    parts: dict


class HREM(nn.Module):
    def __init__(self, args, img_dim, bert):
        super().__init__()
        transformer = args.fragment_transformer
        self.img_enc = ImageEncoder(img_dim, args.embed_size, args.nhead, args.dropout, args.residual_weight,
                                    bool(args.mlp_last_bn), transformer in ('both', 'image'))
        self.txt_enc = TextEncoder(bert, args.embed_size, args.nhead, args.dropout, args.residual_weight,
                                   transformer in ('both', 'text'))
        # --instance_relation 0: the fragment-level model alone, no relation module at all
        self.relation = InstanceRelation(
            args.embed_size, args.nhead, args.dropout, args.num_layers_enc, args.topk, args.threshold,
            args.mask_weight, args.sigma, bool(args.connection_relation), bool(args.relevance_relation),
        ) if args.instance_relation else None
        self.base_loss = MatchingLoss(args.base_loss, args.margin, args.trip_cutoff)
        self.gnn_loss = MatchingLoss(args.gnn_loss, args.margin, args.trip_cutoff)
        self.warmup = args.warmup
        self.reg_loss_weight = args.reg_loss_weight
        self.cross_loss = bool(args.cross_loss)
        self.norm_input = bool(args.norm_input)

    @property
    def img_dim(self):
        return self.img_enc.fc.fc.in_features

    def encode_image(self, regions, lengths):
        """-> (B, E) L2-normalised embedding, (B, R, E) local features."""
        g, x = self.img_enc(regions, lengths)
        return l2norm(g), x

    def encode_text(self, tokens, lengths):
        """-> (B, E) L2-normalised embedding, (B, L, E) word features."""
        g, x = self.txt_enc(tokens, lengths)
        return l2norm(g), x

    def relations_active(self, step):
        return self.relation is not None and step >= self.warmup

    def forward(self, batch, step, max_violation=True, gather=None):
        """Loss of one batch at optimizer step `step` (0-based).

        L = l(v, t) before `warmup` steps (and always without a relation module); afterwards
        L = l(v, t) + l(v, t^) + l(v^, t) + l(v^, t^) + reg_loss_weight * KL
        (without the cross terms l(v, t^), l(v^, t) when cross_loss is off).
        `gather` (distributed training, lib.distributed.GlobalBatch) pads this rank's batch to
        the global sizes and turns per-rank tensors into global-batch tensors; the global part
        then draws random numbers from a stream shared by all ranks.
        """
        if gather is not None:
            batch = gather.pad_batch(batch)
        img_raw, regions = self.img_enc(batch['regions'], batch['region_lengths'])
        cap_raw, words = self.txt_enc(batch['tokens'], batch['token_lengths'])
        img, cap = l2norm(img_raw), l2norm(cap_raw)
        active = self.relations_active(step)
        if not active:  # local features only feed the relation module
            regions = words = None
        if not active or self.norm_input:  # so do the embeddings before normalisation (--norm_input 0)
            img_raw = cap_raw = None
        local = (img, cap, regions, words, batch['img_ids'], batch['token_lengths'], img_raw, cap_raw)
        if gather is None:
            return self.batch_loss(*local, step, max_violation)
        with gather.shared_rng(step):
            return self.batch_loss(*gather(*local), step, max_violation)

    def batch_loss(self, img, cap, regions, words, img_ids, word_lengths, img_raw, cap_raw, step, max_violation):
        # losses and relations in fp32 whatever --precision the encoders ran in
        with torch.autocast(device_type=img.device.type, enabled=False):
            img, cap = img.float(), cap.float()
            base = self.base_loss(img, cap, img_ids, max_violation)
            parts = {'base': base.detach()}
            loss = base
            if self.relations_active(step):
                nodes = None if img_raw is None else (img_raw.float(), cap_raw.float())
                img_hat, cap_hat, reg = self.relation(img, cap, regions.float(), words.float(), word_lengths, nodes)
                # in the authors' order: the trip loss draws its negatives from the random stream
                pairs = [(img, cap_hat), (img_hat, cap)] if self.cross_loss else []
                gnn = sum(self.gnn_loss(v, t, img_ids, max_violation) for v, t in pairs + [(img_hat, cap_hat)])
                loss = loss + gnn + self.reg_loss_weight * reg
                parts.update(gnn=gnn.detach(), reg=reg.detach())
        parts['total'] = loss.detach()
        return Outputs(loss, parts)


def parameter_groups(model, args):
    """The authors' AdamW groups: text head, BERT at bert_lr_factor x lr, image encoder,
    relation module at graph_lr_factor x lr."""
    lr = args.learning_rate

    def trainable(module):
        return [p for p in module.parameters() if p.requires_grad]
    bert = trainable(model.txt_enc.bert)
    bert_ids = {id(p) for p in bert}
    text_head = [p for p in trainable(model.txt_enc) if id(p) not in bert_ids]
    groups = [
        {'params': text_head, 'lr': lr, 'name': 'text'},
        {'params': bert, 'lr': lr * args.bert_lr_factor, 'name': 'bert'},
        {'params': trainable(model.img_enc), 'lr': lr, 'name': 'image'},
    ]
    if model.relation is not None:
        groups.append({'params': trainable(model.relation), 'lr': lr * args.graph_lr_factor, 'name': 'relation'})
    return groups


def build_optimizer(model, args):
    # on CUDA one fused kernel updates every parameter (the default launches several per tensor
    # group); CPU keeps the default implementation, whose results the CPU runs and tests pin
    fused = next(model.parameters()).device.type == 'cuda'
    optimizer = torch.optim.AdamW(parameter_groups(model, args), lr=args.learning_rate,
                                  weight_decay=args.weight_decay, fused=fused or None)
    # step decay by epoch: lr x decay_rate at each epoch of lr_schedules (stepped once per epoch)
    milestones, rate = sorted(args.lr_schedules), args.decay_rate
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda epoch: rate ** sum(epoch >= m for m in milestones))
    return optimizer, scheduler
