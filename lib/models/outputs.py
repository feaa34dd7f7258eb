"""What a model's training forward returns, whatever the model."""
from dataclasses import dataclass

import torch


@dataclass
class Outputs:
    """The loss and its parts (for logging)."""
    loss: torch.Tensor
    parts: dict
