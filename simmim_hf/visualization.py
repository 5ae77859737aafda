"""Reconstruction grids for masked image modeling (PIL only, no matplotlib).

One row per image, four columns:

    original | masked input | reconstruction | reconstruction pasted into the visible pixels

The last column is what SimMIM is judged on: the visible pixels are the input, only the masked area is
predicted, so pasting the prediction into the masked area shows how well it continues the image.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .modeling_simmim import pixel_mask  # the loss's definition: the grid greys exactly the pixels the loss counts

COLUMNS = ("original", "masked input", "reconstruction", "pasted into visible")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _to_uint8(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    # (B, C, H, W) normalized -> (B, H, W, 3) uint8; single-channel images are shown in gray.
    images = images.detach().float().cpu()
    mean_t = torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1)
    if images.shape[1] == mean_t.shape[1]:
        images = images * std_t + mean_t
    if images.shape[1] == 1:
        images = images.repeat(1, 3, 1, 1)
    array = (images.clamp(0, 1) * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return array


def reconstruction_grid(
    pixel_values: torch.Tensor,
    reconstruction: torch.Tensor,
    bool_masked_pos: torch.Tensor,
    patch_size: int,
    image_mean: Sequence[float] = IMAGENET_MEAN,
    image_std: Sequence[float] = IMAGENET_STD,
    max_images: int = 8,
    min_cell_size: int = 128,
    padding: int = 4,
    mask_color: tuple[int, int, int] = (127, 127, 127),
):
    """Build the grid as a `PIL.Image`.

    Args:
        pixel_values, reconstruction: (B, C, H, W), normalized with `image_mean` / `image_std` (what the
            processor emits and the model regresses).
        bool_masked_pos: (B, (H/p)*(W/p)), True = masked, at the model patch size `patch_size`.
        max_images: rows to draw (the first images of the batch).
        min_cell_size: cells are upscaled (nearest neighbour, an integer factor) to at least this many
            pixels so 32 px test images stay legible.
    """
    from PIL import Image

    if pixel_values.shape != reconstruction.shape:
        raise ValueError(f"pixel_values {tuple(pixel_values.shape)} and reconstruction "
                         f"{tuple(reconstruction.shape)} must have the same shape.")
    n = min(max_images, pixel_values.shape[0])
    _, _, height, width = pixel_values.shape
    mask = pixel_mask(bool_masked_pos[:n].cpu(), height, width, patch_size)  # (n, 1, H, W)
    original = _to_uint8(pixel_values[:n], image_mean, image_std)
    recon = _to_uint8(reconstruction[:n], image_mean, image_std)
    m = mask.permute(0, 2, 3, 1).numpy().astype(bool)  # (n, H, W, 1)
    masked_input = np.where(m, np.array(mask_color, dtype=np.uint8), original)
    pasted = np.where(m, recon, original)

    scale = max(1, -(-min_cell_size // max(height, width)))
    cell_h, cell_w = height * scale, width * scale
    columns = (original, masked_input, recon, pasted)
    grid = Image.new("RGB", (len(columns) * (cell_w + padding) + padding, n * (cell_h + padding) + padding),
                     (255, 255, 255))
    for row in range(n):
        for col, array in enumerate(columns):
            cell = Image.fromarray(array[row]).resize((cell_w, cell_h), Image.Resampling.NEAREST)
            grid.paste(cell, (padding + col * (cell_w + padding), padding + row * (cell_h + padding)))
    return grid


def save_reconstruction_grid(path, *args, **kwargs):
    """`reconstruction_grid(...)` saved as PNG at `path`; returns the path."""
    grid = reconstruction_grid(*args, **kwargs)
    grid.save(path, format="PNG")
    return path


__all__ = ["COLUMNS", "pixel_mask", "reconstruction_grid", "save_reconstruction_grid"]
