"""The trainer's compact CNN: a small ResNet with BatchNorm that maps a grayscale face
crop to an embedding."""

from torch import nn


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and an identity (or 1x1 projected) shortcut."""

    def __init__(self, in_channels, out_channels, stride):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.body(x) + self.shortcut(x))


class EmbeddingNet(nn.Module):
    """Stem (stride 2), four residual stages (32, 64, 128, 256 channels; the last three
    halve the resolution), global average pooling, then a linear layer and BatchNorm to
    the embedding (about 1.2 M parameters, 40 M multiply-adds for a 56 x 48 crop)."""

    def __init__(self, embedding_size=128, widths=(32, 64, 128, 256)):
        super().__init__()
        layers = [nn.Conv2d(1, widths[0], 3, 2, 1, bias=False), nn.BatchNorm2d(widths[0]),
                  nn.ReLU(inplace=True)]
        channels = widths[0]
        for stage, width in enumerate(widths):
            layers.append(BasicBlock(channels, width, 1 if stage == 0 else 2))
            channels = width
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.embed = nn.Sequential(nn.Dropout(0.2), nn.Linear(channels, embedding_size),
                                   nn.BatchNorm1d(embedding_size))

    def forward(self, images):
        return self.embed(self.features(images))
