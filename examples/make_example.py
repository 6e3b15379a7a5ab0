"""Write the bundled example: a small CNN as a torch.export archive and calibration images.

    python examples/make_example.py   # writes examples/tiny_cnn.pt2, examples/calib.safetensors
    evagraph compile examples/tiny_cnn.pt2 --data examples/calib.safetensors \\
        --budget 4 --rho 2 -o examples/out

The weights are random and the "images" are smooth random fields (no download needed); the
point is the pipeline: conv and linear layers, a shared input, a classifier head left alone.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn


class TinyCNN(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.conv1 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(32, 32, 3, padding=2, dilation=2)
        self.proj = nn.Linear(32, 64)
        self.gate = nn.Linear(32, 64)  # reads the same input as proj: one decomposition
        self.head = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.stem(x))
        h = F.relu(self.conv1(h))
        h = h + F.relu(self.conv2(h))
        h = h.mean(dim=(2, 3))
        h = self.proj(h) * torch.sigmoid(self.gate(h))
        return self.head(h)


def images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Smooth random 'images': low-resolution noise upsampled, so pixels correlate."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, 3, size // 8, size // 8, generator=g)
    return F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def main(out_dir: str = str(Path(__file__).parent)) -> None:
    torch.manual_seed(0)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = TinyCNN().eval()
    batch = torch.export.Dim("batch", min=1, max=4096)
    example = images(8)
    exported = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    torch.export.save(exported, str(out / "tiny_cnn.pt2"))
    save_file({"x": images(256, seed=1)}, str(out / "calib.safetensors"))
    print(f"wrote {out / 'tiny_cnn.pt2'} and {out / 'calib.safetensors'}")


if __name__ == "__main__":
    main(*sys.argv[1:])
