"""The fully connected classifier of Blundell et al. (2015), "Weight Uncertainty in Neural Networks"."""

from torch import Tensor, nn


class MLP(nn.Module):
    """Flatten, then `depth` hidden ReLU layers of `hidden` units, then a linear read-out.

    Blundell et al. used 784-400-400-10 (and wider) on MNIST; the input size follows from
    `in_channels * image_size**2`, so the same network takes any square image.
    Input: (batch, in_channels, image_size, image_size); output: (batch, num_classes) logits.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 1,
        image_size: int = 28,
        hidden: int = 400,
        depth: int = 2,
    ) -> None:
        super().__init__()
        widths = [in_channels * image_size * image_size] + [hidden] * depth
        layers: list[nn.Module] = [nn.Flatten()]
        for n_in, n_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(n_in, n_out), nn.ReLU(inplace=True)]
        layers.append(nn.Linear(widths[-1], num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
