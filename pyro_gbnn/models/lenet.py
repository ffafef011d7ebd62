"""A small LeNet-style CNN for MNIST-sized images."""

from torch import Tensor, nn

from pyro_gbnn.errors import UsageError


def _feature_side(image_size: int) -> int:
    """Side of the last feature map: two rounds of (5x5 valid conv, 2x2 max-pool)."""
    return ((image_size - 4) // 2 - 4) // 2


class LeNet(nn.Module):
    """conv 5x5 (32) - pool - conv 5x5 (64) - pool - fc `hidden` - fc `num_classes`.

    The layout of the TensorFlow MNIST tutorial network, with the fully connected layer cut
    from 1024 to 256 units: at 28x28 the flattened features are 64*4*4 = 1024 and the whole
    network has about 0.32M parameters (instead of 3.3M), which keeps a Bayesian version
    cheap while still reaching about 99% test accuracy on MNIST.
    Input: (batch, in_channels, image_size, image_size) with image_size >= 16; output: logits.
    """

    def __init__(self, num_classes: int, in_channels: int = 1, image_size: int = 28, hidden: int = 256) -> None:
        super().__init__()
        side = _feature_side(image_size)
        if side < 1:
            raise UsageError(f"lenet needs image_size >= 16, got {image_size}")
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, kernel_size=5),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, kernel_size=5),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * side * side, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))
