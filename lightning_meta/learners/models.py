"""Small reference networks for tasks that need no pretrained model."""

from __future__ import annotations

from torch import Tensor, nn


class MLP(nn.Module):
    """A ReLU multilayer perceptron: the MAML paper's sinusoid regressor is ``MLP(1, [40, 40], 1)``.

    The last ``nn.Linear`` (``net.<last>``) is the head used by ``fast_weights="head"``.
    """

    def __init__(self, in_features: int = 1, hidden_sizes: list[int] | None = None, out_features: int = 1) -> None:
        super().__init__()
        self.in_features = in_features
        self.hidden_sizes = [40, 40] if hidden_sizes is None else list(hidden_sizes)
        self.out_features = out_features
        layers: list[nn.Module] = []
        width = in_features
        for hidden in self.hidden_sizes:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, out_features))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
