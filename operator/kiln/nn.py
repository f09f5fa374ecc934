"""The network Kiln trains and serves, built from an artifact's ``ModelConfig``.

Imports torch: only the trainer and the model server (the ``train`` / ``serve`` extras) use it;
the operator never imports this module.
"""

from __future__ import annotations

import torch
from torch import nn

from kiln.artifact import ModelConfig


class MLPClassifier(nn.Module):
    """Feed-forward classifier with the preprocessing baked in.

    Input: float tensor of shape ``(batch, inputSize)``; output: logits ``(batch, numClasses)``.
    The normalisation constants are registered buffers, so they are saved with the weights and
    the server cannot apply a different transformation from the trainer's.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.architecture != "mlp":
            raise ValueError(f"unsupported architecture {config.architecture!r}")
        if len(config.inputMean) != config.inputSize or len(config.inputStd) != config.inputSize:
            raise ValueError("inputMean and inputStd must have inputSize entries")
        if any(s <= 0 for s in config.inputStd):
            raise ValueError("inputStd entries must be > 0")
        self.config = config
        self.input_mean: torch.Tensor
        self.input_std: torch.Tensor
        self.register_buffer("input_mean", torch.tensor(config.inputMean, dtype=torch.float32))
        self.register_buffer("input_std", torch.tensor(config.inputStd, dtype=torch.float32))
        layers: list[nn.Module] = []
        width = config.inputSize
        for h in config.hiddenSizes:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if config.dropout:
                layers.append(nn.Dropout(config.dropout))
            width = h
        layers.append(nn.Linear(width, config.numClasses))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.input_mean) / self.input_std)


def build_model(config: ModelConfig) -> MLPClassifier:
    """Build an untrained network for ``config``.

    Raises:
        ValueError: for an unknown architecture or inconsistent preprocessing constants.
    """
    return MLPClassifier(config)
