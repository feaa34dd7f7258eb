"""HREM: the two encoders, the instance-level relation module and the training objective."""
from dataclasses import dataclass

import torch

from graph_lib import InstanceRelation
from lib.encoders import ImageEncoder, TextEncoder, l2norm
from lib.models.base import EncoderPair
from lib.losses import MatchingLoss
from lib.models.outputs import Outputs


@dataclass
class HREMConfig:
    """Everything that decides HREM's architecture and objective (nothing about the run: data,
    schedule, device). Built from the command line by lib.models.config_from_args, saved in every
    checkpoint as 'config'; the authors' `opt` maps into it (lib.checkpoint.from_authors)."""
    img_dim: int = 2048                # region feature size (read off the data or the weights)
    embed_size: int = 1024
    bert_path: str = 'data/bert-base-uncased'  # text model: architecture and vocabulary
    nhead: int = 16
    dropout: float = 0.1
    residual_weight: float = 0.8
    mlp_last_bn: int = 0
    fragment_transformer: str = 'both'
    # instance-level relations
    instance_relation: int = 1
    connection_relation: int = 1
    relevance_relation: int = 1
    num_layers_enc: int = 1
    topk: int = 10
    threshold: float = 0.5
    mask_weight: float = 1.0
    sigma: float = 1.0
    norm_input: int = 1
    warmup: int = 8000                 # optimizer steps before the relation module starts
    # objective
    base_loss: str = 'trip'
    gnn_loss: str = 'trip'             # the authors' option name: loss on the relation-enhanced pairs
    margin: float = 0.2
    trip_cutoff: float = 1.7
    reg_loss_weight: float = 10.0
    cross_loss: int = 1
    model: str = 'hrem'


class HREM(EncoderPair):
    def __init__(self, config, text_backbone):
        super().__init__()
        self.config = args = config
        transformer = args.fragment_transformer
        self.img_enc = ImageEncoder(args.img_dim, args.embed_size, args.nhead, args.dropout, args.residual_weight,
                                    bool(args.mlp_last_bn), transformer in ('both', 'image'))
        self.txt_enc = TextEncoder(text_backbone, args.embed_size, args.nhead, args.dropout, args.residual_weight,
                                   transformer in ('both', 'text'))
        # --instance_relation 0: the fragment-level model alone, no relation module at all
        self.relation = InstanceRelation(
            args.embed_size, args.nhead, args.dropout, args.num_layers_enc, args.topk, args.threshold,
            args.mask_weight, args.sigma, bool(args.connection_relation), bool(args.relevance_relation),
        ) if args.instance_relation else None
        self.base_loss = MatchingLoss(args.base_loss, args.margin, args.trip_cutoff)
        self.relation_loss = MatchingLoss(args.gnn_loss, args.margin, args.trip_cutoff)
        self.warmup = args.warmup
        self.reg_loss_weight = args.reg_loss_weight
        self.cross_loss = bool(args.cross_loss)
        self.norm_input = bool(args.norm_input)

    def start_note(self):
        """What the training log says about this model's schedule at the start."""
        if self.relation is None:
            return 'no instance-level relations'
        return f'relations start at step {self.warmup}'

    def parameter_groups(self, lr, bert_lr_factor=0.1, graph_lr_factor=1.0):
        """The authors' AdamW groups: text head, BERT at bert_lr_factor x lr, image encoder,
        relation module at graph_lr_factor x lr."""
        def trainable(module):
            return [p for p in module.parameters() if p.requires_grad]
        bert = trainable(self.txt_enc.bert)
        bert_ids = {id(p) for p in bert}
        text_head = [p for p in trainable(self.txt_enc) if id(p) not in bert_ids]
        groups = [
            {'params': text_head, 'lr': lr, 'name': 'text'},
            {'params': bert, 'lr': lr * bert_lr_factor, 'name': 'bert'},
            {'params': trainable(self.img_enc), 'lr': lr, 'name': 'image'},
        ]
        if self.relation is not None:
            groups.append({'params': trainable(self.relation), 'lr': lr * graph_lr_factor, 'name': 'relation'})
        return groups

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
                gnn = sum(self.relation_loss(v, t, img_ids, max_violation) for v, t in pairs + [(img_hat, cap_hat)])
                loss = loss + gnn + self.reg_loss_weight * reg
                parts.update(gnn=gnn.detach(), reg=reg.detach())
        parts['total'] = loss.detach()
        return Outputs(loss, parts)

