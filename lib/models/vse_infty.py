"""VSE∞ (GPO; Chen, Hu, Song, Xie, CVPR 2021), the baseline HREM was built on (HREM_SPEC.md section 11).

The same encoders as HREM up to pooling (image: FC + MLP residual per region; text: BERT's last
hidden states -> linear), then GPO pooling on each side (lib/models/gpo.py) instead of MaxK and the
fragment Transformer, then L2 normalisation. No instance-level relations. Loss: VSE++ with the
diagonal as the only positives, summed over negatives during the first vse_mean_warmup_epochs
epochs (the training loop passes max_violation=False then), hardest negative afterwards.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn

from lib.encoders import FCMLP, TextEncoder
from lib.models.base import EncoderPair
from lib.losses import MatchingLoss
from lib.models.gpo import GPO, HIDDEN_SIZE, PE_SIZE
from lib.models.outputs import Outputs


@dataclass
class VSEInftyConfig:
    """Everything that decides VSE∞'s architecture and objective (nothing about the run)."""
    img_dim: int = 2048                # region feature size (read off the data or the weights)
    embed_size: int = 1024
    bert_path: str = 'data/bert-base-uncased'  # text model: architecture and vocabulary
    mlp_last_bn: int = 0               # as HREM's: the authors create the BN but never apply it
    gpo_pe_size: int = PE_SIZE
    gpo_hidden: int = HIDDEN_SIZE
    margin: float = 0.2
    model: str = 'vse_infty'


class GPOImageEncoder(nn.Module):
    """x = FC(v) + MLP(v) per region (HREM's front, lib/encoders.FCMLP), pooled by GPO."""

    def __init__(self, config):
        super().__init__()
        self.fc = FCMLP(config.img_dim, config.embed_size, last_bn=bool(config.mlp_last_bn))
        self.gpool = GPO(config.gpo_pe_size, config.gpo_hidden)

    def forward(self, regions, lengths):
        """-> (B, E) pooled embedding before L2 normalisation, (B, R, E) region features."""
        x = self.fc(regions)
        return self.gpool(x, lengths)[0], x


class GPOTextEncoder(TextEncoder):
    """HREM's text encoder (BERT -> linear) without its fragment Transformer, pooled by GPO.
    State keys bert.*, linear.*, gpool.* are the authors'."""

    def __init__(self, config, bert):
        super().__init__(bert, config.embed_size, transformer=False)
        del self.pool  # MaxK pooling: replaced by GPO
        self.gpool = GPO(config.gpo_pe_size, config.gpo_hidden)

    def forward(self, tokens, lengths):
        """(B, L) ids padded with 0, (B,) lengths -> (B, E) pooled embedding before L2
        normalisation, (B, L, E) word features."""
        hidden = self.bert(input_ids=tokens, attention_mask=(tokens != 0).long()).last_hidden_state
        x = self.linear(hidden)
        return self.gpool(x, lengths)[0], x


class VSEInfty(EncoderPair):
    relation = None  # no instance-level relations (checkpoints save relation: None)

    def __init__(self, config, text_backbone):
        super().__init__()
        self.config = config
        self.img_enc = GPOImageEncoder(config)
        self.txt_enc = GPOTextEncoder(config, text_backbone)
        self.loss = MatchingLoss('vse', config.margin, positives='diagonal')

    def start_note(self):
        """What the training log says about this model's schedule at the start."""
        return 'no instance-level relations (VSE∞: GPO pooling, VSE++ loss)'

    def parameter_groups(self, lr, bert_lr_factor=0.1, graph_lr_factor=None):
        """The authors' AdamW groups: BERT at bert_lr_factor x lr, everything else at lr
        (graph_lr_factor: HREM's relation module, which this model has not)."""
        def trainable(module):
            return [p for p in module.parameters() if p.requires_grad]
        bert = trainable(self.txt_enc.bert)
        bert_ids = {id(p) for p in bert}
        return [
            {'params': [p for p in trainable(self.txt_enc) if id(p) not in bert_ids], 'lr': lr, 'name': 'text'},
            {'params': bert, 'lr': lr * bert_lr_factor, 'name': 'bert'},
            {'params': trainable(self.img_enc), 'lr': lr, 'name': 'image'},
        ]

    def forward(self, batch, step, max_violation=True, gather=None):
        """VSE++ loss of one batch; max_violation False sums over the negatives (first epoch).
        `gather` (distributed training): the loss sees the global batch, as one process would."""
        if gather is not None:
            batch = gather.pad_batch(batch)
        img, _ = self.encode_image(batch['regions'], batch['region_lengths'])
        cap, _ = self.encode_text(batch['tokens'], batch['token_lengths'])
        img_ids = batch['img_ids']
        if gather is not None:
            img, cap, img_ids = gather(img, cap, img_ids)
        with torch.autocast(device_type=img.device.type, enabled=False):  # the loss in fp32
            loss = self.loss(img.float(), cap.float(), img_ids, max_violation)
        return Outputs(loss, {'base': loss.detach(), 'total': loss.detach()})

    # the authors' image module names (woodfrog/vse_infty EncoderImageAggr: fc, mlp, gpool) -> ours
    AUTHORS_IMAGE_PREFIXES = (('fc.', 'fc.fc.'), ('mlp.', 'fc.mlp.'))

    @classmethod
    def is_authors_state(cls, parts):
        """True for the encoder states of a VSE∞ authors' checkpoint ({'img_enc', 'txt_enc'})."""
        img = parts.get('img_enc') or {}
        return 'gpool.linear.weight' in img and 'fc.weight' in img

    @classmethod
    def authors_state_dict(cls, parts):
        """The authors' encoder states -> ours. Their text encoder's names (bert, linear, gpool)
        are ours; their image encoder keeps fc and mlp at the top, ours nests them in fc (FCMLP)."""
        def rename(key):
            for theirs, ours in cls.AUTHORS_IMAGE_PREFIXES:
                if key.startswith(theirs):
                    return ours + key[len(theirs):]
            return key
        return {**parts, 'img_enc': {rename(k): v for k, v in parts['img_enc'].items()},
                'txt_enc': dict(parts['txt_enc'])}
