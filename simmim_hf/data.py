"""`datasets` / DataLoader integration for SimMIM pretraining: an on-the-fly transform, a collate
function and the seeding recipe.

Masks must be fresh every epoch, so the processor runs on the fly through `Dataset.set_transform`
(never through `Dataset.map`, whose results are cached: every epoch would see the same crops and masks).

Two ways to make the stream reproducible and different across DataLoader workers and ranks:

1. Per-sample seeds (recommended): give the dataset an index column and a base seed. Sample `index` in
   epoch `e` is processed with `seed = sample_seed(base_seed, e, index)`, so what a sample sees depends
   only on (base_seed, epoch, index): not on the batch it lands in, the number of workers, the world
   size or a resume point. Different ranks draw different indices, hence different streams::

       dataset = dataset.add_column("index", list(range(len(dataset))))
       transform = SimMIMTransform(processor, seed=base_seed, index_column="index")
       dataset.set_transform(transform)
       loader = DataLoader(dataset, batch_size=..., collate_fn=simmim_collate_fn, num_workers=...)
       for epoch in range(epochs):
           transform.set_epoch(epoch)   # before the loader's iterator is created (workers copy the transform)
           for batch in loader: ...

   Workers receive a copy of the transform when the epoch's iterator starts, so `set_epoch` must be
   called before `iter(loader)` and `persistent_workers` must stay `False`.

2. Without per-sample seeds the processor draws from torch's global generator. PyTorch already seeds it
   differently in every worker (`base_seed + worker_id`), but `base_seed` comes from the main process's
   generator, which is identical on every rank after `set_seed(seed)`; `seed_worker` mixes in the rank::

       DataLoader(..., worker_init_fn=functools.partial(seed_worker, rank=accelerator.process_index))
"""

from __future__ import annotations

import io
import os
import random
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from .image_processing_simmim import SimMIMImageProcessor
# The pretraining script's per-sample seed (a hash of (base_seed, epoch, index)): one definition, so this
# transform and `examples/run_pretraining.py` give a sample the same crop, flip and mask.
from .training_utils import sample_seed


class _SeededProcessing:
    """What `SimMIMTransform` and `SimMIMCollator` share: the processor, its per-call arguments, and the epoch
    of the per-sample seeds `sample_seed(seed, epoch, index)`."""

    def __init__(self, processor: SimMIMImageProcessor, seed: int | None, image_column: str,
                 index_column: str | None, keep_columns: Sequence[str], processor_kwargs: dict):
        for name in ("seed", "generator", "return_tensors"):
            if name in processor_kwargs:
                raise ValueError(f"`{name}` is managed by {type(self).__name__}; got {name}={processor_kwargs[name]!r}.")
        self.processor = processor
        self.image_column = image_column
        self.seed = seed
        self.index_column = index_column
        self.keep_columns = tuple(keep_columns)
        self.processor_kwargs = processor_kwargs
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch the per-sample seeds are drawn for (call before creating the epoch's iterator)."""
        self.epoch = int(epoch)


class SimMIMTransform(_SeededProcessing):
    r"""
    On-the-fly transform for `Dataset.set_transform`: runs the processor on a batch of rows.

    Args:
        processor (`SimMIMImageProcessor`): the processor to apply.
        image_column (`str`, defaults to `"image"`): column holding the images.
        seed (`int`, *optional*): base seed for per-sample seeds `sample_seed(seed, epoch, index)`; requires
            `index_column`. Without it the processor draws from torch's global generator.
        index_column (`str`, *optional*): column holding each row's stable dataset index.
        keep_columns (`Sequence[str]`, defaults to `()`): other columns to pass through (e.g. `"label"`).
        **processor_kwargs: per-call processor arguments, e.g. `do_train=False, return_mask=True`.

    Returns (from `__call__`): a dict with `pixel_values` (float `(B, 3, H, W)`), `bool_masked_pos` (bool
    `(B, N)`, when masks are produced) and the kept columns.
    """

    def __init__(
        self,
        processor: SimMIMImageProcessor,
        image_column: str = "image",
        seed: int | None = None,
        index_column: str | None = None,
        keep_columns: Sequence[str] = (),
        **processor_kwargs,
    ):
        if seed is not None and index_column is None:
            raise ValueError(f"`index_column` is required with seed={seed!r}: per-sample seeds are derived from "
                             f"each row's dataset index; got index_column=None.")
        super().__init__(processor, seed, image_column, index_column, keep_columns, processor_kwargs)

    def __call__(self, batch: Mapping[str, list]) -> dict:
        for column in (self.image_column, *self.keep_columns, *((self.index_column,) if self.seed is not None else ())):
            if column not in batch:
                raise ValueError(f"SimMIMTransform: column {column!r} is missing; the batch has {sorted(batch)}.")
        seeds = None
        if self.seed is not None:
            seeds = [sample_seed(self.seed, self.epoch, int(i)) for i in batch[self.index_column]]
        out = dict(self.processor(batch[self.image_column], return_tensors="pt", seed=seeds, **self.processor_kwargs))
        for column in self.keep_columns:
            out[column] = batch[column]
        return out


def decode_image(value):
    """Decode one image cell: a `datasets.Image(decode=False)` value ({'bytes', 'path'}), a path or a PIL image.
    Returns an RGB PIL image, or None when the file cannot be read (truncated, corrupt, missing).

    Decoding in the collator rather than inside `datasets` lets one corrupt file cost one sample (replaced and
    counted) instead of crashing a dataloader worker hours into a run."""
    from PIL import Image

    try:
        if isinstance(value, Image.Image):
            return value.convert("RGB")
        data, path = (value.get("bytes"), value.get("path")) if isinstance(value, dict) else (None, value)
        image = Image.open(io.BytesIO(data)) if data is not None else Image.open(path)
        image.load()  # force the full decode now: truncated files fail here, not in the processor
        return image.convert("RGB")
    except Exception:  # noqa: BLE001 - PIL raises many types (OSError, SyntaxError, ValueError, ...)
        return None


class SimMIMCollator(_SeededProcessing):
    r"""
    DataLoader `collate_fn` over raw dataset rows: decode the images (`decode_image`), replace unreadable ones
    by readable rows of the same batch (image and kept columns together, so labels stay right; the batch size
    stays fixed so DDP ranks stay in step), and run the processor with per-sample seeds.

    Args:
        processor (`SimMIMImageProcessor`): the processor to apply.
        seed (`int`, *optional*): base seed of the per-sample seeds `sample_seed(seed, epoch, row[index_column])`.
        image_column, index_column (`str`): row keys of the image cell and of the stable dataset index.
        keep_columns (`Sequence[str]`): other row keys to stack into tensors (`"label"` becomes `labels`).
        **processor_kwargs: per-call processor arguments, e.g. `do_train=True, return_mask=False`.

    Returns a dict with `pixel_values`, `bool_masked_pos` (when masks are produced), the kept columns and
    `num_unreadable` (a 0-d tensor: how many rows of this batch were replaced).
    """

    def __init__(self, processor: SimMIMImageProcessor, seed: int | None = None, image_column: str = "image",
                 index_column: str = "index", keep_columns: Sequence[str] = (), **processor_kwargs):
        super().__init__(processor, seed, image_column, index_column, keep_columns, processor_kwargs)

    def __call__(self, rows: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        if len(rows) == 0:
            raise ValueError("`rows` is empty; got an empty batch.")
        images = [decode_image(row[self.image_column]) for row in rows]
        readable = [i for i, image in enumerate(images) if image is not None]
        if not readable:
            raise RuntimeError(f"All {len(rows)} images of a batch are unreadable; check the dataset.")
        chosen = [i if images[i] is not None else readable[i % len(readable)] for i in range(len(rows))]
        seeds = None
        if self.seed is not None:
            seeds = [sample_seed(self.seed, self.epoch, int(rows[i][self.index_column])) for i in chosen]
        out = dict(self.processor([images[i] for i in chosen], return_tensors="pt", seed=seeds,
                                  **self.processor_kwargs))
        for column in self.keep_columns:
            out["labels" if column == "label" else column] = torch.as_tensor([rows[i][column] for i in chosen])
        out["num_unreadable"] = torch.tensor(len(rows) - len(readable))
        return out


def simmim_collate_fn(examples: Sequence[Mapping]) -> dict[str, torch.Tensor]:
    """Stack per-example outputs of `SimMIMTransform` into the model's batch dict: `pixel_values` float
    `(B, 3, H, W)`, `bool_masked_pos` bool `(B, N)` (if present) and any other keys (e.g. `labels` from a
    `"label"` column, renamed as transformers models expect)."""
    if len(examples) == 0:
        raise ValueError("`examples` is empty; got an empty batch.")
    batch = {}
    for key in examples[0]:
        values = [example[key] for example in examples]
        name = "labels" if key == "label" else key
        batch[name] = torch.stack([torch.as_tensor(v) for v in values])
    return batch


def _current_rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", 0))


def seed_worker(worker_id: int, rank: int | None = None) -> None:
    """DataLoader `worker_init_fn`: reseed torch, numpy and `random` in this worker from (the DataLoader's
    per-epoch worker seed, which already includes `worker_id`; the process rank).

    `rank` defaults to `torch.distributed.get_rank()` or the `RANK` environment variable. The worker seed is
    drawn anew each epoch from the main process's generator, so streams also differ across epochs while
    remaining reproducible under a fixed `set_seed`.
    """
    info = torch.utils.data.get_worker_info()
    base = info.seed if info is not None else torch.initial_seed()
    rank = _current_rank() if rank is None else rank
    state = np.random.SeedSequence([int(base), int(rank), int(worker_id)]).generate_state(2, np.uint32)
    seed = (int(state[0]) << 32) | int(state[1])
    torch.manual_seed(seed)
    np.random.seed(int(state[0]))
    random.seed(seed)


__all__ = ["SimMIMCollator", "SimMIMTransform", "decode_image", "sample_seed", "seed_worker", "simmim_collate_fn"]
