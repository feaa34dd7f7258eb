"""What every model of the registry shares: an image and a text encoder whose pooled outputs are
L2-normalised into the joint space (the drivers evaluate any model through these)."""
import torch.nn as nn

from lib.encoders import l2norm


class EncoderPair(nn.Module):
    """Subclasses set self.img_enc (whose first layer is fc.fc) and self.txt_enc; each returns
    (pooled (B, E), local features)."""

    @property
    def img_dim(self):
        return self.img_enc.fc.fc.in_features

    def encode_image(self, regions, lengths):
        """-> (B, E) L2-normalised embedding, (B, R, E) region features."""
        g, x = self.img_enc(regions, lengths)
        return l2norm(g), x

    def encode_text(self, tokens, lengths):
        """-> (B, E) L2-normalised embedding, (B, L, E) word features."""
        g, x = self.txt_enc(tokens, lengths)
        return l2norm(g), x
