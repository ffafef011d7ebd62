"""Wide ResNets of Zagoruyko & Komodakis (2016), "Wide Residual Networks", for 32x32 images."""

from torch import Tensor, nn

from pyro_gbnn.errors import UsageError


class WideBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3, dropout, BN-ReLU-conv3x3, plus the shortcut.

    Where the width or stride changes, the shortcut is a 1x1 conv applied to the
    pre-activated input, as in the authors' code.
    """

    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        pre = self.relu(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(self.dropout(self.relu(self.bn2(out))))
        return out + (x if self.shortcut is None else self.shortcut(pre))


class WideResNet(nn.Module):
    """WRN-depth-width: a 16-filter 3x3 conv, then three stages at 16k/32k/64k filters.

    Each stage has (depth - 4) / 6 blocks; the last two halve the feature map. A final
    BN-ReLU and global average pooling feed the linear classifier.
    Input: (batch, in_channels, H, W), H = W = 32 by design; output: (batch, num_classes).
    """

    def __init__(
        self,
        depth: int,
        width: int,
        num_classes: int,
        in_channels: int = 3,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise UsageError(f"Wide ResNet depth must be 6n+4 with n >= 1 (16, 22, 28, 40), got {depth}")
        if width < 1:
            raise UsageError(f"Wide ResNet width must be a positive integer, got {width}")
        if not 0.0 <= dropout < 1.0:
            raise UsageError(f"dropout must be in [0, 1), got {dropout}")
        blocks_per_stage = (depth - 4) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        stages: list[nn.Module] = []
        in_planes = 16
        for planes, stride in ((16 * width, 1), (32 * width, 2), (64 * width, 2)):
            blocks = []
            for i in range(blocks_per_stage):
                blocks.append(WideBlock(in_planes, planes, stride if i == 0 else 1, dropout))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.bn = nn.BatchNorm2d(in_planes)
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        return self.fc(self.avgpool(self.relu(self.bn(x))).flatten(1))


def wide_resnet(depth: int, width: int, num_classes: int, in_channels: int = 3, dropout: float = 0.0) -> WideResNet:
    """WRN-`depth`-`width`; WRN-28-10 has about 36.5M parameters at 10 classes."""
    return WideResNet(depth, width, num_classes, in_channels, dropout)
