"""The FID Inception-v3 network (pool3, 2048-d features), without torchvision.

FID is defined on the features of one specific network: TensorFlow's 2015-12-05 Inception-v3
graph, which the official TTUR code uses. pytorch-fid (github.com/mseitzer/pytorch-fid,
``src/pytorch_fid/inception.py``, Apache License 2.0) ported its weights into
``pt_inception-2015-12-05-6726825d.pth`` and runs them through torchvision's ``Inception3``
(``torchvision/models/inception.py``, BSD 3-Clause License) with four blocks patched to match
TensorFlow. torchvision has no CPU build here, and the PyPI packages that ship this network
(``pytorch-fid``, ``torch-fidelity``) both require it, so this module writes the same network
out again in plain torch, following those two files:

* module names are torchvision's, so the standard file loads with ``strict=True`` (the
  1008-way ``fc`` of the TensorFlow graph is kept for that, though FID never uses it);
* ``BasicConv2d`` = conv (no bias) + BatchNorm (eps 0.001) + ReLU;
* pytorch-fid's patches: the average pools inside ``Mixed_5b..5d`` (FIDInceptionA),
  ``Mixed_6b..6e`` (FIDInceptionC) and ``Mixed_7b`` (FIDInceptionE_1) ignore the zero padding
  (``count_include_pad=False``), and ``Mixed_7c`` (FIDInceptionE_2) max-pools in its pool branch;
* input: images in [0, 1], resized bilinearly to 299x299 (``align_corners=False``), then
  scaled to [-1, 1]; output: the final average pool, (B, 2048).

The standard file is not bundled and never downloaded: :func:`load_fid_inception` reads a
local copy (docs/EVALUATION.md says where to get it). Imports torch only.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from introvae_dist.files import sha256_of_file
from introvae_dist.state_dict_check import state_dict_problems

#: Where pytorch-fid publishes the standard weights (also re-hosted by torch-fidelity under
#: the name weights-inception-2015-12-05-6726825d.pth).
FID_INCEPTION_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
)
FID_INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
#: sha256 and size of that file as other projects record them next to the URL above (the
#: name's 6726825d is torch.hub's sha256 prefix). A file with another hash still loads if
#: its tensors fit, but its FIDs are not comparable with published ones, and say so.
FID_INCEPTION_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
FID_INCEPTION_BYTES = 95_628_359
#: Feature-extractor id of the standard file (goes into cache keys and results).
STANDARD_ID = "pt_inception-2015-12-05"
FEATURE_DIM = 2048
INPUT_PX = 299


class InceptionWeightsError(ValueError):
    """The Inception weights file is missing or does not fit the network; names the file."""


class BasicConv2d(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, **conv: object) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **conv)  # type: ignore[arg-type]
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)), inplace=True)


def _avg_pool_3x3(x: torch.Tensor) -> torch.Tensor:
    # TensorFlow's average pool leaves the padding out of the average (pytorch-fid's patch).
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """Mixed_5b..5d: pytorch-fid's FIDInceptionA."""

    def __init__(self, in_channels: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = self.branch_pool(_avg_pool_3x3(x))
        return torch.cat([self.branch1x1(x), branch5x5, branch3x3dbl, branch_pool], 1)


class InceptionB(nn.Module):
    """Mixed_6a (unpatched)."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), branch3x3dbl, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):
    """Mixed_6b..6e: pytorch-fid's FIDInceptionC."""

    def __init__(self, in_channels: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            branch7x7dbl = layer(branch7x7dbl)
        return torch.cat([self.branch1x1(x), branch7x7, branch7x7dbl, self.branch_pool(_avg_pool_3x3(x))], 1)


class InceptionD(nn.Module):
    """Mixed_7a (unpatched)."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch3x3 = self.branch3x3_2(self.branch3x3_1(x))
        branch7x7x3 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([branch3x3, branch7x7x3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    """Mixed_7b (pytorch-fid's FIDInceptionE_1: average pool without padding) and Mixed_7c
    (FIDInceptionE_2: max pool, as in the TensorFlow graph)."""

    def __init__(self, in_channels: int, pool: str) -> None:
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool={pool!r}: expected 'avg' or 'max'")
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], 1)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat([self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], 1)
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.pool == "max" else _avg_pool_3x3(x)
        return torch.cat([self.branch1x1(x), branch3x3, branch3x3dbl, self.branch_pool(pooled)], 1)


class FIDInceptionV3(nn.Module):
    """Images (B, 3, H, W) in [0, 1] -> pool3 features (B, 2048), pytorch-fid's
    ``InceptionV3(output_blocks=[3])`` with ``resize_input`` and ``normalize_input``."""

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        # The TensorFlow graph's 1008-way classifier: in the file, unused for FID.
        self.fc = nn.Linear(FEATURE_DIM, 1008)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images, size=(INPUT_PX, INPUT_PX), mode="bilinear", align_corners=False)
        x = 2 * x - 1  # (B, 3, 299, 299) in [-1, 1]
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 192, 35, 35)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)  # ... (B, 2048, 8, 8)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)  # (B, 2048)


def load_fid_inception(path: str | Path, device: str | torch.device = "cpu") -> tuple[FIDInceptionV3, str]:
    """The network with the weights of ``path`` (eval mode, no gradients) and its feature
    extractor id: :data:`STANDARD_ID` for the standard file, else one naming the file's sha256.

    Raises:
        InceptionWeightsError: ``path`` is missing, not a torch file of tensors, or its tensors
            do not fit the network (missing, unexpected, wrong shape; names the first few).
    """
    path = Path(path)
    if not path.is_file():
        raise InceptionWeightsError(f"{path}: no such file{'' if not path.exists() else ' (a folder)'}; "
                                    + how_to_get_weights())
    digest = sha256_of_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and torch errors alike: not a weights file
        raise InceptionWeightsError(f"{path}: not a torch weights file ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InceptionWeightsError(f"{path}: expected a state dict of tensors, got {type(state).__name__}")
    network = FIDInceptionV3()
    check_state_dict(network, state, str(path))
    network.load_state_dict(state, strict=False)  # checked above; num_batches_tracked may be absent
    network.requires_grad_(False).eval().to(device)
    return network, (STANDARD_ID if digest == FID_INCEPTION_SHA256 else f"inception-v3-fid:sha256={digest[:16]}")


def check_state_dict(network: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise InceptionWeightsError unless ``state`` holds exactly the network's tensors with
    their shapes (BatchNorm's ``num_batches_tracked`` may be left out, as older files do)."""
    expected = {k: tuple(v.shape) for k, v in network.state_dict().items()}
    problems = state_dict_problems(expected, state, lambda k: k.endswith("num_batches_tracked"))
    if problems:
        raise InceptionWeightsError(f"{source}: not the FID Inception-v3 weights ({'; '.join(problems)}); "
                                    + how_to_get_weights())


def how_to_get_weights() -> str:
    return (f"FID needs the standard FID Inception weights {FID_INCEPTION_FILE} (sha256 "
            f"{FID_INCEPTION_SHA256[:16]}..., {FID_INCEPTION_BYTES:,} bytes): download {FID_INCEPTION_URL} on a "
            f"machine with network access and pass --inception PATH or set INTROVAE_DIST_INCEPTION=PATH "
            f"(see docs/EVALUATION.md)")

