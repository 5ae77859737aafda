"""Input-pipeline throughput per CPU core: JPEG bytes -> model-ready pretraining batch (crop, flip, mask, collate).

Each pipeline runs in a DataLoader with ONE worker process (one core doing the work, the main process only
receiving batches), so images/s is per core; multiply by the worker count for a machine. Inputs are JPEG bytes
(quality 90) made from the embedded photos at two sizes: 500x375 (ImageNet-like) and 1600x1200 (camera photos).

* `run_mim-style`: transformers' `run_mim.py` pipeline (its `set_transform` per image: decode by `datasets`,
  RandomResizedCrop + flip, `ViTImageProcessor` resize + rescale + normalise, numpy `MaskGenerator`), float32
  batches, as in `benchmarks/processor.py`.
* `simmim_hf before`: this package before the fast path: PIL decodes in the collator, the processor's float32
  output normalised in the worker, non-persistent workers.
* `simmim_hf now`: JPEGs decoded by libjpeg-turbo straight into numpy (`simplejpeg`) and cropped as views,
  reduced-size decoding where the crop allows (`smallest_decode_size`), uint8 batches (`return_uint8=True`)
  normalised on the device (`normalize_uint8`, timed separately: on a GPU it is one fused kernel over the
  batch), persistent workers.
* `decode only`: the decode alone (libjpeg-turbo, full size), the ceiling of any pipeline that decodes at full size.

    python benchmarks/data_pipeline.py                       # both sizes, 192 px, batch 64
    python benchmarks/data_pipeline.py --quick               # a smoke run
"""

from __future__ import annotations

import argparse
import io
import statistics
import time

import datasets
import PIL.Image
import torch
from processor import RunMimBaseline  # `python benchmarks/data_pipeline.py` puts this folder on sys.path

import simmim_hf.decoding
from simmim_hf import SimMIMConfig, SimMIMImageProcessor
from simmim_hf.data import EpochShuffleSampler, ImageRows, SimMIMCollator, create_dataloader
from simmim_hf.sample_data import load_sample_images


def jpeg_dataset(width: int, height: int, count: int) -> datasets.Dataset:
    photos = load_sample_images(shortest_edge=None)
    cells = []
    for i in range(count):
        photo = photos[i % len(photos)].resize((width, height), PIL.Image.BICUBIC)
        buffer = io.BytesIO()
        photo.save(buffer, "JPEG", quality=90)
        cells.append({"bytes": buffer.getvalue(), "path": None})
    return datasets.Dataset.from_dict({"image": cells}, features=datasets.Features({"image": datasets.Image(decode=False)}))


def run_mim_loader(dataset, config, batch_size):
    baseline = RunMimBaseline(config.image_size, config.patch_size, config.mask_patch_size, config.mask_ratio)
    decoded = dataset.cast_column("image", datasets.Image())

    def transform(examples):  # run_mim.py's preprocess_images: one image at a time
        out = [baseline([image]) for image in examples["image"]]
        return {"pixel_values": [o["pixel_values"][0] for o in out], "mask": [o["bool_masked_pos"][0] for o in out]}

    decoded.set_transform(transform)

    def collate(examples):
        return {"pixel_values": torch.stack([e["pixel_values"] for e in examples]),
                "bool_masked_pos": torch.stack([e["mask"] for e in examples]).bool()}

    return torch.utils.data.DataLoader(decoded, batch_size=batch_size, shuffle=True, collate_fn=collate,
                                       num_workers=1, drop_last=True)


class PilDecoding:
    """The collator as it was before the libjpeg-turbo path: PIL decodes every image. Runs in its own DataLoader
    worker, so switching the fast decoder off there leaves the other pipelines alone."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, rows):
        simmim_hf.decoding._simplejpeg = None
        return self.collator(rows)


class DecodeOnly:
    """The floor every pipeline stands on: the JPEG decode alone (libjpeg-turbo, as "now" decodes), no crop, mask
    or batch. Its images/s bounds what any CPU pipeline with full-size decoding can reach."""

    def __call__(self, rows):
        for row in rows:
            simmim_hf.decoding.decode_image(row["image"])
        return {"pixel_values": torch.empty(len(rows), 0)}


def decode_only_loader(dataset, batch_size):
    rows = ImageRows(dataset, "image")
    return create_dataloader(rows, batch_size, DecodeOnly(), sampler=EpochShuffleSampler(len(rows)), num_workers=1,
                             drop_last=True)


def simmim_loader(dataset, processor, batch_size, fast: bool):
    rows = ImageRows(dataset, "image")
    collator = SimMIMCollator(processor, seed=0, do_train=True, return_mask=True, return_uint8=fast,
                              reduced_decoding=fast)
    if fast:  # persistent workers (steady state here: the per-epoch restart they save is not in the timing)
        return create_dataloader(rows, batch_size, collator, sampler=EpochShuffleSampler(len(rows)), num_workers=1,
                                 drop_last=True)
    return torch.utils.data.DataLoader(rows, batch_size=batch_size, sampler=EpochShuffleSampler(len(rows)),
                                       collate_fn=PilDecoding(collator), num_workers=1, drop_last=True)


def images_per_second(loader, batches: int) -> float:
    iterator = iter(loader)
    next(iterator)  # worker start-up and the first batch are not steady state
    start, count = time.perf_counter(), 0
    for _ in range(batches):
        count += next(iterator)["pixel_values"].shape[0]
    return count / (time.perf_counter() - start)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="swin-base-w6-192", help="Sets the image, patch and mask sizes.")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=8, help="Timed batches per pipeline per round.")
    parser.add_argument("--rounds", type=int, default=3, help="Pipelines alternate; the median round is reported.")
    parser.add_argument("--sizes", default="500x375,1600x1200", help="Source JPEG sizes, comma-separated WxH.")
    parser.add_argument("--quick", action="store_true", help="A smoke run: 2 batches of 16, one round.")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_size, args.batches, args.rounds = 16, 2, 1
    torch.set_num_threads(1)
    config = SimMIMConfig.from_preset(args.preset)
    processor = SimMIMImageProcessor.from_config(config)
    print(f"preset={args.preset} ({config.image_size} px) batch={args.batch_size} batches={args.batches} "
          f"rounds={args.rounds}; one DataLoader worker per pipeline, images/s per core")
    for size in args.sizes.split(","):
        width, height = (int(v) for v in size.split("x"))
        dataset = jpeg_dataset(width, height, args.batch_size * (args.batches + 2))
        pipelines = {
            "run_mim-style": lambda: run_mim_loader(dataset, config, args.batch_size),
            "simmim_hf before": lambda: simmim_loader(dataset, processor, args.batch_size, fast=False),
            "simmim_hf now": lambda: simmim_loader(dataset, processor, args.batch_size, fast=True),
            "decode only": lambda: decode_only_loader(dataset, args.batch_size),
        }
        rates = {name: [] for name in pipelines}
        for _ in range(args.rounds):
            for name, make in pipelines.items():
                rates[name].append(images_per_second(make(), args.batches))
        batch = next(iter(simmim_loader(dataset, processor, args.batch_size, fast=True)))["pixel_values"]
        start = time.perf_counter()
        for _ in range(5):
            processor.normalize_uint8(batch)
        normalise_ms = (time.perf_counter() - start) / 5 / batch.shape[0] * 1e3
        median = {name: statistics.median(values) for name, values in rates.items()}
        print(f"\n{width}x{height} JPEG q90 -> {config.image_size} px")
        print(f"{'pipeline':<20}{'images/s/core':>15}{'vs before':>12}{'vs run_mim':>12}")
        for name, value in median.items():
            print(f"{name:<20}{value:>15.0f}{value / median['simmim_hf before']:>11.2f}x"
                  f"{value / median['run_mim-style']:>11.2f}x")
        print("(decode only: the JPEG decode alone, the ceiling of any pipeline that decodes at full size; "
              f"a 2x over 'before' needs {2 * median['simmim_hf before']:.0f} images/s)")
        print(f"(normalize_uint8 of that batch on this CPU: {normalise_ms:.3f} ms per image; on the accelerator it "
              "is one fused pass over the batch)")


if __name__ == "__main__":
    main()
