"""Everything between a dataset and a model-ready batch, for pretraining and fine-tuning alike.

* **Loading**: `load_pretraining_data` (embedded photos, image folder, Hub dataset, stream) and
  `load_classification_data` (embedded digits, class folders, Hub dataset with labels); `find_image_column`.
* **Rows**: `ImageRows` (map-style) and `StreamingImageRows` (a stream) hand out raw image cells with their
  stable index and epoch; images are decoded in the collator (`decode_image`), so one corrupt file costs one
  sample (replaced and counted) instead of a crashed worker.
* **Order**: `EpochShuffleSampler` shuffles as a pure function of (seed, epoch) and sends the epoch along with
  every index, so DataLoader workers can persist across epochs and still know the epoch of what they load.
* **Processing**: `SimMIMCollator` (DataLoader `collate_fn`) or `SimMIMTransform` (`Dataset.set_transform`)
  run the processor with per-sample seeds: sample `index` in epoch `e` gets `sample_seed(seed, e, index)`, so
  its crop, flip and mask depend on nothing else (not the batch, the number of workers or processes, a resume).

Masks must be fresh every epoch, so processing always runs on the fly (never through `Dataset.map`, whose results
are cached). Outside the scripts::

    rows = ImageRows(dataset, image_column="image")
    sampler = EpochShuffleSampler(len(rows), seed=0)
    loader = DataLoader(rows, batch_size=64, sampler=sampler, num_workers=8, persistent_workers=True,
                        collate_fn=SimMIMCollator(processor, seed=0, do_train=True, return_mask=True))
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for batch in loader: ...

Without per-sample seeds the processor draws from torch's global generator; `seed_worker` then makes the
workers of different ranks draw different streams.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import random
import signal
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, Sampler

from .decoding import decode_image, smallest_decode_size
from .image_processing_simmim import SimMIMImageProcessor
# The pretraining script's per-sample seed (a hash of (base_seed, epoch, index)): one definition, so this
# transform and `examples/run_pretraining.py` give a sample the same crop, flip and mask.
from .training_utils import content_key, sample_seed

logger = logging.getLogger(__name__)


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
        # In shared memory: persistent DataLoader workers hold a copy of this object made at their start, and
        # `set_epoch` in the training process must still reach them.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch the per-sample seeds are drawn for (call before creating the epoch's iterator; it
        reaches persistent DataLoader workers too)."""
        self._epoch.fill_(int(epoch))


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
        count_unreadable (`bool`): add `unreadable` to the batch (turn off for `transformers.Trainer`).
        reduced_decoding (`bool`): decode JPEGs much larger than the crops need at a reduced size
            (`smallest_decode_size`); the result differs from a full decode by the resampling only.
        **processor_kwargs: per-call processor arguments, e.g. `do_train=True, return_mask=False`.

    A row's `epoch` key (set by `ImageRows` / `StreamingImageRows`) takes precedence over `set_epoch`, so the
    seeds stay right in persistent DataLoader workers, which hold a copy of the collator made at their start.

    Returns a dict with `pixel_values`, `bool_masked_pos` (when masks are produced), the kept columns and
    `unreadable` (a bool `(B,)` tensor: which rows of this batch were replaced; per sample, so that an
    evaluation gathered across processes can drop the rows repeated to even out the last batch).
    """

    def __init__(self, processor: SimMIMImageProcessor, seed: int | None = None, image_column: str = "image",
                 index_column: str = "index", keep_columns: Sequence[str] = (), count_unreadable: bool = True,
                 reduced_decoding: bool = True, **processor_kwargs):
        super().__init__(processor, seed, image_column, index_column, keep_columns, processor_kwargs)
        self.count_unreadable = count_unreadable  # False for `transformers.Trainer`: it passes every key to the model
        do_train = processor_kwargs.get("do_train", processor.do_train)
        # The reduction is sized for the crops the processor will take: with this call's geometry, if it has one.
        geometry = {key: value for key, value in processor_kwargs.items()
                    if key in ("size", "crop_scale", "crop_ratio", "crop_pct")}
        sizing = type(processor).from_dict({**processor.to_dict(), **geometry}) if geometry else processor
        self.smallest_size = smallest_decode_size(sizing, do_train) if reduced_decoding else None

    def __call__(self, rows: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        if len(rows) == 0:
            raise ValueError("`rows` is empty; got an empty batch.")
        images = [decode_image(row[self.image_column], self.smallest_size) for row in rows]
        # Each position keeps its own (epoch, index) seed, so a replacement is a fresh view (crop, flip, mask) of
        # the image it borrows, not a copy of that image's sample.
        seeds = None
        if self.seed is not None:
            seeds = [sample_seed(self.seed, int(row.get("epoch", self.epoch)), int(row[self.index_column]))
                     for row in rows]
        try:
            out, chosen = self._process(images, seeds)
        except ValueError:  # an image the processor rejects (e.g. float data outside [0, 1]) is unreadable too
            for i, image in enumerate(images):
                if image is not None and not self._accepts(image, seeds[i] if seeds else None):
                    images[i] = None
            out, chosen = self._process(images, seeds)
        for column in self.keep_columns:
            out["labels" if column == "label" else column] = torch.as_tensor([rows[i][column] for i in chosen])
        if self.count_unreadable:
            out["unreadable"] = torch.tensor([image is None for image in images])
        return out

    def _process(self, images: list, seeds: list | None) -> tuple[dict, list[int]]:
        """The processed batch with every unreadable image (None) replaced by a readable one of the batch, and
        which image each position holds."""
        readable = [i for i, image in enumerate(images) if image is not None]
        if not readable:
            raise RuntimeError(f"All {len(images)} images of a batch are unreadable; check the dataset.")
        chosen = [i if images[i] is not None else readable[i % len(readable)] for i in range(len(images))]
        return dict(self.processor([images[i] for i in chosen], return_tensors="pt", seed=seeds,
                                   **self.processor_kwargs)), chosen

    def _accepts(self, image, seed) -> bool:
        try:
            self.processor([image], return_tensors="pt", seed=None if seed is None else [seed], **self.processor_kwargs)
        except ValueError:
            return False
        return True


# ================================================================================================== rows
class EpochShuffleSampler(Sampler):
    """Yields `(epoch, index)` for every index of a dataset of `num_samples` rows, in an order that depends only
    on (seed, epoch) (a fresh permutation per epoch; `shuffle=False` keeps 0..n-1). A resumed run, which starts
    at a later epoch, sees exactly the uninterrupted run's order, and the epoch travels with each index to the
    worker that loads it. Every rank draws the same order; `accelerate` shards it into per-rank batches."""

    def __init__(self, num_samples: int, seed: int = 0, shuffle: bool = True):
        if num_samples < 1:
            raise ValueError(f"`num_samples` must be >= 1; got {num_samples}.")
        self.num_samples, self.seed, self.shuffle, self.epoch = int(num_samples), int(seed), shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, 0))
            order = torch.randperm(self.num_samples, generator=generator).tolist()
        else:
            order = range(self.num_samples)
        epoch = self.epoch
        return ((epoch, index) for index in order)


def _undecoded(hf_dataset, image_column: str):
    import datasets

    if image_column not in hf_dataset.column_names:
        raise ValueError(f"`image_column` {image_column!r} is not a column of the dataset; columns: "
                         f"{hf_dataset.column_names}.")
    return hf_dataset.cast_column(image_column, datasets.Image(decode=False))


class ImageRows(Dataset):
    """Map-style rows of a `datasets.Dataset` for `SimMIMCollator`: item `(epoch, index)` (from
    `EpochShuffleSampler`; a plain `index` means epoch 0) is `{"image": <undecoded cell>, "index": index,
    "epoch": epoch, <keep_columns>}`, with the image column renamed to "image"."""

    def __init__(self, hf_dataset, image_column: str = "image", keep_columns: Sequence[str] = ()):
        self.dataset = _undecoded(hf_dataset, image_column)
        self.image_column = image_column
        self.keep_columns = tuple(keep_columns)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item) -> dict:
        return self.__getitems__([item])[0]

    def __getitems__(self, items: Sequence) -> list[dict]:
        """A whole batch in one Arrow read (the DataLoader calls this when it exists)."""
        epochs, indices = zip(*((item if isinstance(item, tuple) else (0, item)) for item in items))
        indices = [int(index) for index in indices]
        columns = self.dataset[indices]
        return [{"image": columns[self.image_column][k], "index": index, "epoch": int(epoch),
                 **{column: columns[column][k] for column in self.keep_columns}}
                for k, (epoch, index) in enumerate(zip(epochs, indices))]


class StreamingImageRows(IterableDataset):
    """Rows of a streamed `datasets.IterableDataset` (already split per process), looping over its epochs
    forever (the step budget ends training) and reshuffling shards and buffer each epoch. With no global index,
    a row's `index` is a hash of its content, so order and sharding do not change what a sample sees.
    `set_position(epoch, skip)` starts the next iteration `skip` rows into `epoch` (skipping across epochs).

    `repeat=False` (evaluation) makes one iteration a single pass over the stream, at epoch 0 unless
    `set_position` says otherwise, without reshuffling for a next epoch; an empty stream raises either way.

    With DataLoader workers each worker streams its own shards and a fresh loader takes batches from the A
    workers that have shards in turn (batch k from worker k % A). Resuming B = `skip // batch_size` batches in,
    worker w therefore plays the part of the uninterrupted run's worker (w + B) % A: it reads that worker's
    shards and skips the batches that worker produced, so the resumed loader yields the uninterrupted batches
    in their order, and any later resume holds the same arithmetic. This needs the loader's `batch_size`
    (given here, or filled in by `create_dataloader`); with no workers or a single one, exactly `skip` rows are
    skipped."""

    def __init__(self, hf_dataset, image_column: str = "image", *, repeat: bool = True,
                 batch_size: int | None = None):
        self.dataset = _undecoded(hf_dataset, image_column)
        self.image_column = image_column
        self.repeat = bool(repeat)
        if batch_size is not None and int(batch_size) < 1:
            raise ValueError(f"`batch_size` must be >= 1; got {batch_size}.")
        self.batch_size = None if batch_size is None else int(batch_size)
        self.epoch, self.skip = 0, 0

    def set_position(self, epoch: int, skip: int = 0) -> None:
        """Start the next iteration `skip` rows (in total, over all DataLoader workers) into `epoch`."""
        self.epoch, self.skip = int(epoch), int(skip)

    def _worker_part(self, info, num_shards: int) -> tuple[int, int]:
        """(the uninterrupted run's worker this DataLoader worker stands in for, the rows it skips): see the
        class docstring. Workers beyond the shard count idle, in both runs, and keep their own id."""
        if info is None or info.num_workers == 1 or self.skip == 0 or info.id >= num_shards:
            return (0 if info is None else info.id), self.skip
        if self.batch_size is None:
            raise RuntimeError(
                f"StreamingImageRows cannot resume {self.skip} rows into the stream with {info.num_workers} "
                "DataLoader workers without the batch size; pass `batch_size` (or build the loader with "
                "`create_dataloader`).")
        active = min(info.num_workers, num_shards)
        batches, rest = divmod(self.skip, self.batch_size)
        part = (info.id + batches) % active
        produced = -(-(batches - part) // active) if batches > part else 0
        # A partial batch (not what the training loop passes) belongs to the worker whose turn is next: worker 0.
        return part, produced * self.batch_size + (rest if info.id == 0 else 0)

    @staticmethod
    def _key(value) -> int:
        if isinstance(value, dict):
            return content_key(value["bytes"]) if value.get("bytes") is not None else content_key(str(value.get("path")))
        return content_key(repr(value))

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        dataset = self.dataset
        if info is not None:
            # `datasets` keeps the epoch in shared memory, common to all workers: one worker moving on to its next
            # epoch would change the shard order another is about to read. A copy has an epoch of its own.
            dataset = copy.deepcopy(dataset)
        part, skip = self._worker_part(info, dataset.num_shards)
        epoch = self.epoch
        while True:
            dataset.set_epoch(epoch)
            produced = 0
            for row in _iterate_as_worker(dataset, info, part):
                produced += 1
                if skip:
                    skip -= 1
                    continue
                value = row[self.image_column]
                yield {"image": value, "index": self._key(value), "epoch": epoch}
            if produced == 0:
                if info is not None and part >= dataset.num_shards:  # more workers than shards: this one idles
                    return
                raise RuntimeError("The stream is empty: no rows.")
            if not self.repeat:
                return
            epoch += 1


def _iterate_as_worker(dataset, info, part: int):
    """Iterate a `datasets.IterableDataset` in this DataLoader worker as worker `part` would: `datasets` picks a
    worker's shards (and seeds its shuffle buffer) by `torch.utils.data.get_worker_info().id`, so that id reads
    `part` while the dataset works, and this worker's own id everywhere else."""
    if info is None or part == info.id:
        yield from dataset
        return
    from torch.utils.data._utils import worker as torch_worker

    stand_in, rows = dataclasses.replace(info, id=part), iter(dataset)
    while True:
        torch_worker._worker_info = stand_in
        try:
            row = next(rows)
        except StopIteration:
            return
        finally:
            torch_worker._worker_info = info
        yield row


def _leave_stop_signals_to_the_trainer(worker_id: int) -> None:
    """DataLoader `worker_init_fn`. A stop signal sent to the whole process group (SLURM's `scancel` and
    `--signal`, `kill -- -PGID`) reaches the workers too: one killed by it makes the training process raise
    mid-checkpoint. The workers ignore it; the training process saves and exits, and its exit ends them."""
    for name in ("SIGTERM", "SIGUSR1"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)


def create_dataloader(rows, batch_size: int, collate_fn, *, num_workers: int = 0, sampler=None,
                      drop_last: bool = False, pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader over `ImageRows` / `StreamingImageRows` whose workers persist across epochs (the epoch comes
    with each index, see `EpochShuffleSampler`) and prefetch a few batches each. Without a sampler the rows are
    read in order as epoch 0 (evaluation: the same crops and masks every time).

    The loader has its own generator: creating an iterator draws the workers' base seed from it rather than from
    torch's global generator, whose stream (drop path, augmentation) a resumed run must replay exactly."""
    if isinstance(rows, StreamingImageRows) and rows.batch_size is None:
        rows.batch_size = int(batch_size)  # to resume with several workers (`StreamingImageRows.set_position`)
    return torch.utils.data.DataLoader(
        rows, batch_size=batch_size, sampler=sampler, collate_fn=collate_fn, drop_last=drop_last,
        generator=torch.Generator().manual_seed(0), worker_init_fn=_leave_stop_signals_to_the_trainer,
        num_workers=num_workers, persistent_workers=num_workers > 0, prefetch_factor=4 if num_workers > 0 else None,
        pin_memory=pin_memory)


# =============================================================================================== loading
IMAGE_COLUMN_NAMES = ("image", "img", "jpg", "jpeg", "png", "webp")


def find_image_column(features, requested: str | None = None, where: str = "the dataset") -> str:
    """`requested` if it is a column, else the first of `IMAGE_COLUMN_NAMES` present, else the first `Image`
    feature; a ValueError listing the columns otherwise."""
    import datasets

    features = features or {}
    if requested:
        if requested not in features:
            raise ValueError(f"--image_column_name {requested!r} is not a column of {where}; columns: {list(features)}.")
        return requested
    for name in IMAGE_COLUMN_NAMES:
        if name in features:
            return name
    for name, feature in features.items():
        if isinstance(feature, datasets.Image):
            return name
    raise ValueError(f"No image column found in {where} (columns: {list(features)}); pass --image_column_name.")


def _hub_description(args) -> str:
    config = f" ({args.dataset_config_name})" if args.dataset_config_name else ""
    if Path(args.dataset_name).exists():  # `load_dataset` also reads a local folder: no Hub page to link
        return f"local dataset `{Path(args.dataset_name).name}`{config}"
    return f"[{args.dataset_name}](https://huggingface.co/datasets/{args.dataset_name}){config}"


def _image_folder(args):
    import datasets

    for name in ("train_dir", "validation_dir"):
        folder = getattr(args, name)
        if folder is not None and not Path(folder).is_dir():
            raise FileNotFoundError(f"--{name} {folder!r} is not a directory.")
    files = {"train": str(Path(args.train_dir) / "**")}
    if args.validation_dir:
        files["validation"] = str(Path(args.validation_dir) / "**")
    return datasets.load_dataset("imagefolder", data_files=files, cache_dir=args.cache_dir)


def _truncate(dataset, limit: int | None, streaming: bool = False):
    if limit is None:
        return dataset
    return dataset.take(limit) if streaming else dataset.select(range(min(limit, len(dataset))))


def load_pretraining_data(args):
    """(train, eval or None, image column, description) from the `DataArguments` (+ `streaming`,
    `sample_data_repeats`) fields: a Hub dataset (`streaming` for sets too large to download), an image folder
    or, with neither, the embedded photos. Without an evaluation split, `validation_split_percentage` holds out
    part of the training set."""
    import datasets

    streaming = getattr(args, "streaming", False)
    eval_ds = None
    if args.dataset_name:
        kwargs = dict(cache_dir=args.cache_dir, streaming=streaming)
        train_ds = datasets.load_dataset(args.dataset_name, args.dataset_config_name, split=args.train_split, **kwargs)
        split = args.validation_split
        if split is None:  # the dataset's own validation split comes first; the percentage only stands in for one
            try:
                names = datasets.get_dataset_split_names(args.dataset_name, args.dataset_config_name)
            except Exception:  # noqa: BLE001 - offline or a loading script: no evaluation then
                names = []
            split = "validation" if "validation" in names and args.train_split != "validation" else None
        if split:
            eval_ds = datasets.load_dataset(args.dataset_name, args.dataset_config_name, split=split, **kwargs)
        description = _hub_description(args)
    elif args.train_dir:
        loaded = _image_folder(args)
        train_ds, eval_ds = loaded["train"], loaded.get("validation")
        description = "local image folder"
    else:
        from . import sample_data

        repeats = getattr(args, "sample_data_repeats", 1)
        train_ds = sample_data.load_sample_dataset()
        if args.validation_split_percentage:
            # Split the photos, then repeat: a held-out copy of a training photo would not be held out.
            split = train_ds.train_test_split(test_size=args.validation_split_percentage / 100.0, seed=args.seed)
            train_ds, eval_ds = split["train"], split["test"]
        if repeats > 1:
            train_ds = datasets.concatenate_datasets([train_ds] * repeats)
        description = sample_data.describe()
    column = find_image_column(train_ds.features, args.image_column_name,
                               args.dataset_name or args.train_dir or "the data")
    train_ds = _truncate(train_ds, args.max_train_samples, streaming)
    if eval_ds is None and args.validation_split_percentage:
        split = train_ds.train_test_split(test_size=args.validation_split_percentage / 100.0, seed=args.seed)
        train_ds, eval_ds = split["train"], split["test"]
    if eval_ds is not None:
        eval_ds = _truncate(eval_ds, args.max_eval_samples, streaming)
    return train_ds, eval_ds, column, description


def _as_class_labels(raw):
    """The `label` column of every split as one `ClassLabel`: strings (class names) are numbered in sorted order,
    integers keep their values (0..max over all splits, so a class seen only in evaluation still has an id),
    and splits, class count and stratification then agree."""
    import datasets

    if isinstance(raw[next(iter(raw))].features["label"], datasets.ClassLabel):
        return raw
    values = set().union(*(split.unique("label") for split in raw.values()))
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        if min(values) < 0:
            raise ValueError(f"--label_column_name: integer labels must be class ids >= 0; got values down to "
                             f"{min(values)}.")
        names = [str(i) for i in range(int(max(values)) + 1)]
    elif all(isinstance(v, str) for v in values):
        names = sorted(values)
    else:
        raise ValueError("--label_column_name: labels must be class ids (integers >= 0) or class names (strings); "
                         f"got values of types {sorted({type(v).__name__ for v in values})}.")
    return raw.cast_column("label", datasets.ClassLabel(names=names))


def _stratified_split(dataset, test_fraction: float, seed: int):
    import datasets

    stratify = "label" if isinstance(dataset.features.get("label"), datasets.ClassLabel) else None
    return dataset.train_test_split(test_size=test_fraction, seed=seed, stratify_by_column=stratify)


def load_classification_data(args, image_size: int):
    """(train, eval, label names, description), each set with columns `image` and `label`, from the
    `DataArguments` (+ `label_column_name`, `train_label_fraction`, `data_seed`) fields: a Hub dataset, class
    folders, or the embedded digits at `image_size`. Without an evaluation split a stratified
    `validation_split_percentage` is held out; `train_label_fraction` keeps a stratified part of the training
    labels. Both splits depend on `data_seed` only."""
    import datasets

    if args.dataset_name or args.train_dir:
        raw = datasets.load_dataset(args.dataset_name, args.dataset_config_name, cache_dir=args.cache_dir) \
            if args.dataset_name else _image_folder(args)
        description = _hub_description(args) if args.dataset_name else "local image folder"
        if args.train_split not in raw:
            raise ValueError(f"--train_split {args.train_split!r} not found; the dataset has {list(raw)}.")
        columns = raw[args.train_split].column_names
        image_column = find_image_column(raw[args.train_split].features, args.image_column_name, description)
        if args.label_column_name not in columns:
            if args.train_dir and not args.dataset_name:  # imagefolder labels by sub-folder: there were none
                raise ValueError(f"--train_dir {args.train_dir} has no class sub-folders: put each class's images in "
                                 "a sub-folder named after it (train_dir/<class>/image.jpg).")
            raise ValueError(f"--label_column_name {args.label_column_name!r} is not a column of the dataset; "
                             f"columns: {columns}.")
        # Only the two columns the job uses: another column may already be called "label".
        raw = raw.select_columns(list(dict.fromkeys([image_column, args.label_column_name])))
        raw = raw.rename_columns({k: v for k, v in ((image_column, "image"), (args.label_column_name, "label"))
                                  if k != v})
        raw = _as_class_labels(raw)
        # Never "test" unless asked for: the evaluation split selects best/, which must not be chosen on test data.
        val_name = args.validation_split or ("validation" if "validation" in raw and args.train_split != "validation"
                                             else None)
        if val_name is None and "test" in raw and args.train_split != "test":
            logger.info("The dataset's 'test' split is left alone (it would select best/); a stratified "
                        f"{args.validation_split_percentage:g} % of --train_split is held out for evaluation. "
                        "Pass --validation_split test to evaluate (and select) on it.")
        if val_name is not None:
            if val_name not in raw:
                raise ValueError(f"--validation_split {val_name!r} not found; the dataset has {list(raw)}.")
            train, evaluation = raw[args.train_split], raw[val_name]
        else:
            split = _stratified_split(raw[args.train_split], args.validation_split_percentage / 100.0, args.data_seed)
            train, evaluation = split["train"], split["test"]
    else:
        from .sample_data import DIGITS_DESCRIPTION, load_digits_dataset

        share = args.validation_split_percentage
        description = DIGITS_DESCRIPTION + f"; stratified {100 - share:g}/{share:g} split"
        split = _stratified_split(load_digits_dataset(image_size), share / 100.0, args.data_seed)
        train, evaluation = split["train"], split["test"]
    train, evaluation = train.select_columns(["image", "label"]), evaluation.select_columns(["image", "label"])

    names = list(train.features["label"].names)
    if args.train_label_fraction < 1.0:
        train = train.train_test_split(train_size=args.train_label_fraction, seed=args.data_seed,
                                       stratify_by_column="label")["train"]
    if args.max_train_samples is not None:
        train = _truncate(train.shuffle(seed=args.data_seed), args.max_train_samples)
    return train, _truncate(evaluation, args.max_eval_samples), names, description


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


__all__ = [
    "EpochShuffleSampler",
    "ImageRows",
    "SimMIMCollator",
    "SimMIMTransform",
    "StreamingImageRows",
    "create_dataloader",
    "decode_image",
    "find_image_column",
    "load_classification_data",
    "load_pretraining_data",
    "sample_seed",
    "seed_worker",
    "simmim_collate_fn",
    "smallest_decode_size",
]
