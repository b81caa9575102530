"""PyTorch networks, sized for CPU serving: a 2D U-Net per modality, the lesion encoder, the prototype
classifier, and the fine-tuning baseline's head. Export wrappers end segmentation in argmax (UINT8).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cspine.inference.specs import EMBEDDING_DIM, MODALITY_ORDER, ROI_CHANNELS


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class UNet2D(nn.Module):
    """A plain 2D U-Net. With ``coordinates``, two channels (row and column position in [-1, 1]) are
    appended to the input inside the network, so it can use where a structure lies (C2 is near the top
    of a radiograph) without changing the model's input tensor; such a model must be trained on whole
    images, the others can be trained on crops."""

    def __init__(
        self, in_channels: int, classes: int, widths: tuple[int, ...] = (12, 24, 48, 96), coordinates: bool = False
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.classes = classes
        self.widths = tuple(widths)
        self.coordinates = coordinates
        self.encoders = nn.ModuleList()
        c = in_channels + (2 if coordinates else 0)
        for w in widths:
            self.encoders.append(_block(c, w))
            c = w
        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for deep, shallow in zip(widths[::-1][:-1], widths[::-1][1:], strict=True):
            self.ups.append(nn.ConvTranspose2d(deep, shallow, 2, stride=2))
            self.decoders.append(_block(2 * shallow, shallow))
        self.head = nn.Conv2d(widths[0], classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_features(x)[0]

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits, and the deepest encoder feature map (the competence check pools it)."""
        if self.coordinates:
            n, _, h, w = x.shape
            rows = torch.linspace(-1.0, 1.0, h, dtype=x.dtype, device=x.device).view(1, 1, h, 1).expand(n, 1, h, w)
            cols = torch.linspace(-1.0, 1.0, w, dtype=x.dtype, device=x.device).view(1, 1, 1, w).expand(n, 1, h, w)
            x = torch.cat([x, rows, cols], dim=1)
        skips = []
        for i, encoder in enumerate(self.encoders):
            x = encoder(x)
            if i < len(self.encoders) - 1:
                skips.append(x)
                x = F.max_pool2d(x, 2)
        deepest = x
        for up, decoder in zip(self.ups, self.decoders, strict=True):
            x = decoder(torch.cat([up(x), skips.pop()], dim=1))
        return self.head(x), deepest


class SegExport(nn.Module):
    """What Triton serves: image → UINT8 label map (argmax inside the graph) and the deepest encoder
    features averaged over the image (``specs.SEG_FEATURES`` per slice, for the out-of-distribution score)."""

    def __init__(self, net: UNet2D) -> None:
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, deepest = self.net.forward_with_features(image)
        return torch.argmax(logits, dim=1).to(torch.uint8), deepest.mean(dim=(2, 3))


class LesionEncoder(nn.Module):
    """Lesion ROI [3, 64, 64] + modality one-hot → L2-normalised embedding [64].

    ``features`` (the convolutional trunk up to the last block) is split out so that the fine-tuning
    baseline can freeze it and train only what follows."""

    def __init__(self, widths: tuple[int, ...] = (32, 64, 96, 128), dim: int = EMBEDDING_DIM) -> None:
        super().__init__()
        self.widths = tuple(widths)
        layers: list[nn.Module] = []
        c = ROI_CHANNELS
        for w in widths[:-1]:
            layers += [_block(c, w), nn.MaxPool2d(2)]
            c = w
        self.trunk = nn.Sequential(*layers)
        self.last = nn.Sequential(_block(c, widths[-1]), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.project = nn.Sequential(
            nn.Linear(widths[-1] + len(MODALITY_ORDER), 128),
            nn.ReLU(inplace=True),
            nn.Linear(128, dim),
        )

    def features(self, roi: torch.Tensor) -> torch.Tensor:
        return self.trunk(roi)

    def head(self, features: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        """Unnormalised embedding from trunk features."""
        return self.project(torch.cat([self.last(features), modality], dim=1))

    def forward(self, roi: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.features(roi), modality), dim=1)


class ProtoClassifier(nn.Module):
    """Embeddings [N, D] and class prototypes [K, D] → probabilities [N, K]: a softmax over negative
    squared distances times a learned scale (1 / temperature)."""

    def __init__(self, scale: float = 10.0) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(float(scale)).log())

    def logits(self, embedding: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
        d2 = (embedding[:, None, :] - prototypes[None, :, :]).pow(2).sum(-1)
        return -self.log_scale.exp() * d2

    def forward(self, embedding: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(embedding, prototypes), dim=1)


class BaselineClassifier(nn.Module):
    """The conventional baseline: the same encoder with a linear head, trained with cross-entropy."""

    def __init__(self, encoder: LesionEncoder, classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.linear = nn.Linear(EMBEDDING_DIM, classes)

    def forward_features(self, features: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        return self.linear(F.relu(self.encoder.head(features, modality)))

    def forward(self, roi: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        return self.forward_features(self.encoder.features(roi), modality)
