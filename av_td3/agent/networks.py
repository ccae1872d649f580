"""Networks: a CNN encoder sized for the configured image, an actor and a twin critic.

Every network exposes ``parts() -> {"cnn": [...], "mlp": [...]}`` so the gradient monitor and the clipping see
exactly the parameters of each part; the CNN and MLP of one network live in one optimizer.
"""

from __future__ import annotations

import torch
from torch import nn


def _conv_stack(in_channels: int, height: int, width: int) -> nn.Sequential:
    """Nature-CNN (8/4, 4/2, 3/1) for images of 64 px and more; a compact stride-2 stack for small images,
    where the Nature kernels would shrink the map to nothing."""
    if min(height, width) >= 64:
        layers = [(32, 8, 4), (64, 4, 2), (64, 3, 1)]
    else:
        layers = [(32, 3, 2), (32, 3, 2), (32, 3, 1)]
    modules: list[nn.Module] = []
    c = in_channels
    for out, k, s in layers:
        modules += [nn.Conv2d(c, out, kernel_size=k, stride=s), nn.ReLU()]
        c = out
    return nn.Sequential(*modules, nn.Flatten())


class Encoder(nn.Module):
    """uint8-scaled images [B, stack, H, W] (floats in [0, 1]) → features [B, features_dim]."""

    def __init__(self, stack: int, height: int, width: int, features_dim: int) -> None:
        super().__init__()
        self.convs = _conv_stack(stack, height, width)
        with torch.no_grad():
            n_flat = self.convs(torch.zeros(1, stack, height, width)).shape[1]
        # LayerNorm + tanh bounds the features, which keeps early critic targets from blowing up (DrQ-v2 trunk).
        self.trunk = nn.Sequential(nn.Linear(n_flat, features_dim), nn.LayerNorm(features_dim), nn.Tanh())
        self.features_dim = features_dim

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.trunk(self.convs(image))


def mlp(in_dim: int, out_dim: int, hidden_dim: int, hidden_layers: int) -> nn.Sequential:
    modules: list[nn.Module] = []
    d = in_dim
    for _ in range(hidden_layers):
        modules += [nn.Linear(d, hidden_dim), nn.ReLU()]
        d = hidden_dim
    modules.append(nn.Linear(d, out_dim))
    return nn.Sequential(*modules)


class Actor(nn.Module):
    """(image features, state) → tanh action. ``encoder`` is None when the encoder is shared with the critic:
    then the caller passes (detached) features instead of images."""

    def __init__(self, encoder: Encoder | None, features_dim: int, state_dim: int, action_dim: int,
                 hidden_dim: int, hidden_layers: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = mlp(features_dim + state_dim, action_dim, hidden_dim, hidden_layers)

    def forward(self, features: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.head(torch.cat([features, state], dim=1)))

    def parts(self) -> dict[str, list[nn.Parameter]]:
        cnn = list(self.encoder.parameters()) if self.encoder is not None else []
        return {"cnn": cnn, "mlp": list(self.head.parameters())}


class Critic(nn.Module):
    """One CNN encoder feeding ``num_q`` Q heads (2 = TD3's twin critics, 1 = DDPG)."""

    def __init__(self, encoder: Encoder, state_dim: int, action_dim: int, hidden_dim: int, hidden_layers: int,
                 num_q: int) -> None:
        super().__init__()
        self.encoder = encoder
        in_dim = encoder.features_dim + state_dim + action_dim
        self.heads = nn.ModuleList(mlp(in_dim, 1, hidden_dim, hidden_layers) for _ in range(num_q))

    def forward(self, features: torch.Tensor, state: torch.Tensor, action: torch.Tensor) -> list[torch.Tensor]:
        x = torch.cat([features, state, action], dim=1)
        return [head(x).squeeze(1) for head in self.heads]

    def q1(self, features: torch.Tensor, state: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return self.heads[0](torch.cat([features, state, action], dim=1)).squeeze(1)

    def parts(self) -> dict[str, list[nn.Parameter]]:
        return {"cnn": list(self.encoder.parameters()), "mlp": list(self.heads.parameters())}
