"""HREM library code: data, encoders, relations, losses, evaluation, checkpoints."""
