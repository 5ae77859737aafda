"""Throughput of the SimMIM pretraining transform + mask on one CPU core.

Compares `SimMIMImageProcessor` with the pipeline transformers' `run_mim.py` example builds, reproduced
here without torchvision (which this project does not depend on): the example's RandomResizedCrop /
RandomHorizontalFlip done with PIL and python's `random` exactly as torchvision does them, then
`ViTImageProcessor` (PIL backend) for resize + rescale + normalise, then the example's numpy
`MaskGenerator` once per image, then `torch.stack` as in its collate function. The two pipelines run
alternately, in rounds, on the same decoded JPEGs (500x375, as typical ImageNet photos), so drifts in
machine load hit both; the median round is reported.

    python benchmarks/processor.py                      # 192 px (Swin recipe) and 224 px (ViT recipe)
    python benchmarks/processor.py --sizes 192 --rounds 3 --batches 2
"""

from __future__ import annotations

import argparse
import io
import math
import random
import statistics
import time

import numpy as np
import PIL.Image
import torch
from transformers import ViTImageProcessorPil
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PILImageResampling

from simmim_hf import SimMIMImageProcessor  # noqa: E402


# ------------------------------------------------------------------------------------------ baseline
class MaskGenerator:
    """transformers/examples/pytorch/image-pretraining/run_mim.py `MaskGenerator`, verbatim in behaviour."""

    def __init__(self, input_size=192, mask_patch_size=32, model_patch_size=4, mask_ratio=0.6):
        self.input_size, self.mask_patch_size = input_size, mask_patch_size
        self.model_patch_size, self.mask_ratio = model_patch_size, mask_ratio
        self.rand_size = self.input_size // self.mask_patch_size
        self.scale = self.mask_patch_size // self.model_patch_size
        self.token_count = self.rand_size**2
        self.mask_count = int(np.ceil(self.token_count * self.mask_ratio))

    def __call__(self):
        mask_idx = np.random.permutation(self.token_count)[: self.mask_count]
        mask = np.zeros(self.token_count, dtype=int)
        mask[mask_idx] = 1
        mask = mask.reshape((self.rand_size, self.rand_size))
        mask = mask.repeat(self.scale, axis=0).repeat(self.scale, axis=1)
        return torch.tensor(mask.flatten())


def random_resized_crop_box(width, height, scale=(0.67, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision `RandomResizedCrop.get_params` (python `random` instead of torch draws)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * random.uniform(*scale)
        aspect = math.exp(random.uniform(*log_ratio))
        w, h = int(round(math.sqrt(target_area * aspect))), int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top, left = random.randint(0, height - h), random.randint(0, width - w)
            return left, top, left + w, top + h
    return 0, 0, width, height


class RunMimBaseline:
    def __init__(self, size, patch_size, mask_patch_size, mask_ratio):
        self.processor = ViTImageProcessorPil(
            size={"height": size, "width": size}, resample=PILImageResampling.BILINEAR,
            image_mean=IMAGENET_DEFAULT_MEAN, image_std=IMAGENET_DEFAULT_STD,
        )
        self.mask_generator = MaskGenerator(size, mask_patch_size, patch_size, mask_ratio)

    def __call__(self, images):
        crops = []
        for image in images:
            image = image.convert("RGB") if image.mode != "RGB" else image
            image = image.crop(random_resized_crop_box(*image.size))
            if random.random() < 0.5:
                image = image.transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT)
            crops.append(image)
        pixel_values = self.processor(crops, return_tensors="pt")["pixel_values"]  # resize + rescale + normalise
        masks = torch.stack([self.mask_generator() for _ in images])
        return {"pixel_values": pixel_values, "bool_masked_pos": masks}


# ------------------------------------------------------------------------------------------ harness
def photos(count: int) -> list[PIL.Image.Image]:
    """Decoded 500x375 JPEGs: scikit-learn's two sample photos (if installed) or a synthetic scene."""
    try:
        from sklearn.datasets import load_sample_images

        sources = [PIL.Image.fromarray(a) for a in load_sample_images().images]
    except ImportError:
        yy, xx = np.mgrid[0:375, 0:500]
        scene = np.stack([128 + 100 * np.sin(xx / 17.0), 128 + 100 * np.cos(yy / 23.0), (xx + yy) % 256], -1)
        noise = np.random.default_rng(0).normal(0, 12, scene.shape)
        sources = [PIL.Image.fromarray(np.clip(scene + noise, 0, 255).astype(np.uint8))]
    decoded = []
    for i in range(count):
        source = sources[i % len(sources)].resize((500, 375), PIL.Image.BICUBIC)
        if i % 2:
            source = source.transpose(PIL.Image.Transpose.ROTATE_180)
        buffer = io.BytesIO()
        source.save(buffer, format="JPEG", quality=90)
        decoded.append(PIL.Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
    return decoded


def images_per_second(fn, images, batch_size, batches) -> float:
    start = time.perf_counter()
    for b in range(batches):
        out = fn(images[(b * batch_size) % len(images):][:batch_size])
    elapsed = time.perf_counter() - start
    assert out["pixel_values"].shape[0] == batch_size
    return batch_size * batches / elapsed


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[192, 224])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=4, help="batches per pipeline per round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    torch.set_num_threads(1)
    random.seed(0)
    np.random.seed(0)
    images = photos(args.batch_size)
    print(f"torch threads: {torch.get_num_threads()}, batch {args.batch_size}, {args.batches} batches x "
          f"{args.rounds} rounds, inputs: {len(images)} decoded {images[0].size[0]}x{images[0].size[1]} JPEGs")
    # The paper's recipes: Swin at 192 px (patch 4), ViT-B at 224 px (patch 16); 32 px mask units, 60 %.
    patch = {192: 4, 224: 16}
    for size in args.sizes:
        patch_size = patch.get(size, 16)
        ours = SimMIMImageProcessor(size=size, patch_size=patch_size, mask_patch_size=32, mask_ratio=0.6)
        generator = torch.Generator().manual_seed(0)
        pipelines = {
            "run_mim (ViTImageProcessorPil + MaskGenerator)": RunMimBaseline(size, patch_size, 32, 0.6),
            "SimMIMImageProcessor": lambda batch: ours(batch, return_tensors="pt", generator=generator),
        }
        for fn in pipelines.values():  # warm-up
            images_per_second(fn, images, args.batch_size, 1)
        rates = {name: [] for name in pipelines}
        for _ in range(args.rounds):
            for name, fn in pipelines.items():
                rates[name].append(images_per_second(fn, images, args.batch_size, args.batches))
        medians = {name: statistics.median(r) for name, r in rates.items()}
        base, new = medians.values()
        print(f"\n{size} px (model patch {patch_size}):")
        for name, r in rates.items():
            print(f"  {name:48s} {medians[name]:8.1f} img/s  (rounds: {', '.join(f'{x:.0f}' for x in r)})")
        print(f"  speed-up: {new / base:.2f}x")


if __name__ == "__main__":
    main()
