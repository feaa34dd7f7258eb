"""HREM: the two encoders, the instance-level relation module and the training objective."""
from dataclasses import dataclass

import torch
import torch.nn as nn

from graph_lib import InstanceRelation
from lib.encoders import ImageEncoder, TextEncoder
from lib.losses import MatchingLoss


@dataclass
class Outputs:
    """What one training forward produces: the loss and its parts (for logging)."""
    loss: torch.Tensor
    parts: dict


class HREM(nn.Module):
    def __init__(self, args, img_dim, bert):
        super().__init__()
        self.img_enc = ImageEncoder(img_dim, args.embed_size, args.nhead, args.dropout, args.residual_weight,
                                    bool(args.mlp_last_bn))
        self.txt_enc = TextEncoder(bert, args.embed_size, args.nhead, args.dropout, args.residual_weight)
        self.relation = InstanceRelation(args.embed_size, args.nhead, args.dropout, args.num_layers_enc,
                                         args.topk, args.threshold, args.mask_weight, args.sigma,
                                         args.intra_connect)
        self.base_loss = MatchingLoss(args.base_loss, args.margin, args.trip_cutoff)
        self.gnn_loss = MatchingLoss(args.gnn_loss, args.margin, args.trip_cutoff)
        self.warmup = args.warmup
        self.reg_loss_weight = args.reg_loss_weight

    @property
    def img_dim(self):
        return self.img_enc.fc.fc.in_features

    def encode_image(self, regions, lengths):
        return self.img_enc(regions, lengths)

    def encode_text(self, tokens, lengths):
        return self.txt_enc(tokens, lengths)

    def forward(self, batch, step, max_violation=True, gather=None):
        """Loss of one batch at optimizer step `step` (0-based).

        L = l(v, t) before `warmup` steps; afterwards
        L = l(v, t) + l(v, t^) + l(v^, t) + l(v^, t^) + reg_loss_weight * KL.
        `gather` (distributed training, lib.distributed.GlobalBatch) pads this rank's batch to
        the global sizes and turns per-rank tensors into global-batch tensors; the global part
        then draws random numbers from a stream shared by all ranks.
        """
        if gather is not None:
            batch = gather.pad_batch(batch)
        img, regions = self.encode_image(batch['regions'], batch['region_lengths'])
        cap, words = self.encode_text(batch['tokens'], batch['token_lengths'])
        if step < self.warmup:  # local features only feed the relation module
            regions = words = None
        local = (img, cap, regions, words, batch['img_ids'], batch['token_lengths'])
        if gather is None:
            return self.batch_loss(*local, step, max_violation)
        with gather.shared_rng(step):
            return self.batch_loss(*gather(*local), step, max_violation)

    def batch_loss(self, img, cap, regions, words, img_ids, word_lengths, step, max_violation):
        # losses and relations in fp32 whatever --precision the encoders ran in
        with torch.autocast(device_type=img.device.type, enabled=False):
            img, cap = img.float(), cap.float()
            base = self.base_loss(img, cap, img_ids, max_violation)
            parts = {'base': base.detach()}
            loss = base
            if step >= self.warmup:
                img_hat, cap_hat, reg = self.relation(img, cap, regions.float(), words.float(), word_lengths)
                gnn = (self.gnn_loss(img, cap_hat, img_ids, max_violation)
                       + self.gnn_loss(img_hat, cap, img_ids, max_violation)
                       + self.gnn_loss(img_hat, cap_hat, img_ids, max_violation))
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
    return [
        {'params': text_head, 'lr': lr, 'name': 'text'},
        {'params': bert, 'lr': lr * args.bert_lr_factor, 'name': 'bert'},
        {'params': trainable(model.img_enc), 'lr': lr, 'name': 'image'},
        {'params': trainable(model.relation), 'lr': lr * args.graph_lr_factor, 'name': 'relation'},
    ]


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
