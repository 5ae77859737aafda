#!/usr/bin/env python
"""SimMIM masked-image-modeling pretraining with 🤗 Accelerate.

Runs anywhere Accelerate runs: plain `python` (one CPU or GPU), `accelerate launch` with DDP over GPUs and
nodes, mixed precision, FSDP (see `examples/accelerate_configs/`). With no data arguments it trains on a
small embedded set of real photos, so this works on a fresh machine without network:

    accelerate launch examples/run_pretraining.py --output_dir runs/demo

Real data: a local folder of images (`--train_dir`, read by `datasets`' imagefolder), or a Hub dataset
(`--dataset_name`, `--streaming` for sets too large to download first).

What it guarantees:
* Each sample's crop, flip and mask are a function of (seed, epoch, sample index) only, so resuming, the
  number of dataloader workers and the world size never change what a sample sees.
* Checkpoints (model, optimizer, scheduler, RNG, data position) are written atomically; resuming from
  step N gives the same weights as an uninterrupted run. SIGTERM saves a checkpoint and exits cleanly.
* Steps with a non-finite loss are skipped (warning), and the run stops after N in a row.
* The final model is a `save_pretrained` folder with the processor config, the model code (loadable with
  `trust_remote_code=True` without simmim_hf installed) and a model card; optionally pushed to the Hub.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

# Running `python examples/run_pretraining.py` from a source checkout without `pip install -e .` still works.
_REPO_ROOT = Path(__file__).resolve().parents[1]
if (_REPO_ROOT / "simmim_hf").is_dir() and str(_REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(_REPO_ROOT))

import datasets  # noqa: E402
import transformers  # noqa: E402
from accelerate import Accelerator, DistributedType  # noqa: E402
from accelerate.logging import get_logger  # noqa: E402
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed  # noqa: E402

from simmim_hf import SimMIMConfig, SimMIMForMaskedImageModeling  # noqa: E402
from simmim_hf.configuration_simmim import PRESETS, parse_config_overrides  # noqa: E402
from simmim_hf.data import decode_image  # noqa: E402
from simmim_hf.image_processing_simmim import SimMIMImageProcessor  # noqa: E402
from simmim_hf.optimization import SCHEDULES, LayerDecayLRScheduler, build_param_groups, parse_milestones  # noqa: E402
from simmim_hf.training_utils import (  # noqa: E402
    CheckpointManager,
    HubPusher,
    NonFiniteGuard,
    PreemptionHandler,
    atomic_write_text,
    content_key,
    enable_gradient_checkpointing,
    format_count,
    sample_seed,
    to_json,
    write_model_card,
)
from simmim_hf.visualization import save_reconstruction_grid  # noqa: E402

logger = get_logger(__name__)

MODEL_CARD_TEMPLATE = _REPO_ROOT / "model_cards" / "pretraining.md"
DEFAULT_PRESET = "vit-micro-p8-64"
# Output-folder entries that are not part of the model (never pushed as the model).
NOT_MODEL_PATTERNS = ["checkpoints/*", "logs/*", "reconstructions/*", "*.log"]


# ============================================================================================== arguments
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    g = p.add_argument_group("data")
    g.add_argument("--dataset_name", type=str, default=None,
                   help="Hub dataset id (e.g. 'timm/imagenet-1k-wds'). Without --dataset_name and --train_dir the "
                        "embedded sample images are used.")
    g.add_argument("--dataset_config_name", type=str, default=None, help="Config name of the Hub dataset.")
    g.add_argument("--train_split", type=str, default="train", help="Split of --dataset_name to train on.")
    g.add_argument("--validation_split", type=str, default=None,
                   help="Split of --dataset_name for the eval loss (default: 'validation' if it exists).")
    g.add_argument("--train_dir", type=str, default=None, help="Local folder of training images (imagefolder).")
    g.add_argument("--validation_dir", type=str, default=None, help="Local folder of validation images.")
    g.add_argument("--validation_split_percentage", type=float, default=0.0,
                   help="Hold out this percentage of the training set for the eval loss when there is no "
                        "validation split/folder (not with --streaming).")
    g.add_argument("--image_column_name", type=str, default=None,
                   help="Column holding the images (default: 'image', 'img' or the first Image column).")
    g.add_argument("--streaming", action="store_true",
                   help="Stream --dataset_name instead of downloading it (needs --max_train_steps).")
    g.add_argument("--shuffle_buffer_size", type=int, default=10_000, help="Shuffle buffer for --streaming.")
    g.add_argument("--max_train_samples", type=int, default=None, help="Truncate the training set (debugging).")
    g.add_argument("--sample_data_repeats", type=int, default=4,
                   help="Embedded data only: copies of each of its ~20 images per epoch (each copy gets its own "
                        "crop and mask).")
    g.add_argument("--cache_dir", type=str, default=None, help="Cache folder for datasets and models.")
    g.add_argument("--dataloader_num_workers", type=int, default=None,
                   help="Dataloader worker processes per training process (default: the CPU cores of this "
                        "process's share minus one, at most 8; 0 loads in the training process).")

    g = p.add_argument_group("model")
    g.add_argument("--preset", type=str, default=None, choices=sorted(PRESETS),
                   help=f"Named architecture (default {DEFAULT_PRESET} unless --config_name / "
                        "--model_name_or_path is given).")
    g.add_argument("--config_name", type=str, default=None, help="Path or Hub id of a SimMIMConfig to train from scratch.")
    g.add_argument("--model_name_or_path", type=str, default=None,
                   help="Continue pretraining from these weights (folder or Hub id).")
    g.add_argument("--config_overrides", type=str, default=None,
                   help="Config changes in transformers' update_from_string syntax, lists allowed, e.g. "
                        "'drop_path_rate=0.1,depths=[2,2,6,2]' (values parsed as JSON when possible).")
    g.add_argument("--trust_remote_code", action="store_true",
                   help="Allow model code from --model_name_or_path (needed for Hub checkpoints when simmim_hf "
                        "is not the installed source of the classes).")
    g.add_argument("--gradient_checkpointing", action="store_true",
                   help="Recompute activations in the backward pass (less memory, ~30%% slower).")

    g = p.add_argument_group("optimisation (defaults: the SimMIM paper)")
    g.add_argument("--per_device_train_batch_size", type=int, default=64, help="Batch size per process.")
    g.add_argument("--per_device_eval_batch_size", type=int, default=64, help="Eval batch size per process.")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1, help="Micro-batches per optimizer step.")
    g.add_argument("--base_learning_rate", type=float, default=1e-4,
                   help="Learning rate for a total batch of 512; scaled linearly by total batch / 512 (paper).")
    g.add_argument("--learning_rate", type=float, default=None,
                   help="Absolute peak learning rate (overrides --base_learning_rate scaling).")
    g.add_argument("--warmup_lr", type=float, default=5e-7, help="Warmup start lr for batch 512 (scaled alike).")
    g.add_argument("--min_lr", type=float, default=5e-6, help="Final lr of the cosine schedule for batch 512 (scaled alike).")
    g.add_argument("--weight_decay", type=float, default=0.05,
                   help="AdamW weight decay (none on biases, norms, tokens, position tables, LayerScale).")
    g.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW beta1.")
    g.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW beta2.")
    g.add_argument("--adam_epsilon", type=float, default=1e-8, help="AdamW epsilon.")
    g.add_argument("--lr_scheduler_type", type=str, default="cosine", choices=SCHEDULES, help="Schedule after warmup.")
    g.add_argument("--lr_milestones", type=str, default=None,
                   help="multistep: comma-separated epochs at which the lr is multiplied by --lr_gamma.")
    g.add_argument("--lr_gamma", type=float, default=0.1, help="multistep decay factor.")
    g.add_argument("--warmup_epochs", type=float, default=10, help="Linear warmup length in epochs.")
    g.add_argument("--warmup_steps", type=int, default=None, help="Linear warmup in optimizer steps (overrides --warmup_epochs).")
    g.add_argument("--max_grad_norm", type=float, default=5.0, help="Gradient clipping norm (0 disables clipping).")
    g.add_argument("--num_train_epochs", type=int, default=100, help="Training epochs.")
    g.add_argument("--max_train_steps", type=int, default=None, help="Total optimizer steps (overrides epochs).")
    g.add_argument("--max_consecutive_nonfinite", type=int, default=20,
                   help="Stop after this many optimizer steps in a row with a non-finite loss/gradient "
                        "(each one is skipped). 0 = never stop.")
    g.add_argument("--seed", type=int, default=42, help="Seed of the model init, shuffling, crops and masks.")
    g.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"],
                   help="Mixed precision (default: the accelerate config's).")
    g.add_argument("--cpu", action="store_true", help="Train on CPU even when a GPU is present.")

    g = p.add_argument_group("checkpoints, logging, output")
    g.add_argument("--output_dir", type=str, required=True, help="Where the model, checkpoints and logs go.")
    g.add_argument("--overwrite_output_dir", action="store_true",
                   help="Start over in a non-empty --output_dir: its earlier checkpoints are deleted first.")
    g.add_argument("--checkpointing_steps", type=int, default=None,
                   help="Save a resumable checkpoint every N optimizer steps (and always at the end).")
    g.add_argument("--checkpoints_total_limit", type=int, default=2, help="Keep at most this many checkpoints.")
    g.add_argument("--resume_from_checkpoint", type=str, default=None,
                   help="'latest' (newest complete checkpoint in --output_dir, if any) or a checkpoint folder.")
    g.add_argument("--logging_steps", type=int, default=10,
                   help="Log loss/lr/grad norm/images per second every N optimizer steps (the only host syncs).")
    g.add_argument("--eval_steps", type=int, default=None, help="Eval loss every N steps (and at the end).")
    g.add_argument("--visualize_steps", type=int, default=None,
                   help="Write a reconstruction PNG grid every N steps (always at the end).")
    g.add_argument("--num_visualize_images", type=int, default=8, help="Rows of the reconstruction grid.")
    g.add_argument("--report_to", type=str, default="tensorboard",
                   help="Trackers: 'tensorboard', 'wandb', 'all', 'none', or a comma-separated list.")
    g.add_argument("--run_name", type=str, default="simmim_pretraining", help="Tracker project / run name.")

    g = p.add_argument_group("Hub")
    g.add_argument("--push_to_hub", action="store_true",
                   help="Push the final model (weights, config, processor, code, model card). The token comes "
                        "from HF_TOKEN or `hf auth login`; it is never logged or written.")
    g.add_argument("--hub_model_id", type=str, default=None, help="Repo id (default: the --output_dir name).")
    g.add_argument("--hub_private_repo", action="store_true", help="Create the repo private.")
    g.add_argument("--hub_push_checkpoints", action="store_true",
                   help="Also push every checkpoint (in the background) under checkpoints/ in the repo.")

    g = p.add_argument_group("testing hooks (simulate failures)")
    g.add_argument("--debug_nonfinite_steps", type=str, default=None,
                   help="Comma-separated optimizer steps (1-based) whose loss is replaced by NaN.")
    g.add_argument("--debug_sigterm_at_step", type=int, default=None,
                   help="Send SIGTERM to this process after this optimizer step (preemption drill).")
    args = p.parse_args(argv)
    _validate_args(p, args)
    return args


def _validate_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    def fail(msg):
        parser.error(msg)

    if args.dataset_name and args.train_dir:
        fail("--dataset_name and --train_dir are exclusive: pass one source of training images.")
    if args.overwrite_output_dir and args.resume_from_checkpoint:
        fail("--overwrite_output_dir (start over, deleting earlier checkpoints) and --resume_from_checkpoint "
             f"({args.resume_from_checkpoint!r}) contradict each other: pass one.")
    if args.streaming and not args.dataset_name:
        fail("--streaming needs --dataset_name (a local --train_dir is read directly).")
    if args.streaming and args.max_train_steps is None:
        fail("--streaming needs --max_train_steps (a stream has no known length for epochs).")
    if args.streaming and args.validation_split_percentage:
        fail("--validation_split_percentage cannot split a stream; pass --validation_split.")
    if sum(x is not None for x in (args.preset, args.config_name, args.model_name_or_path)) > 1:
        fail("--preset, --config_name and --model_name_or_path are exclusive: pass one model source.")
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                 "num_train_epochs", "logging_steps", "sample_data_repeats"):
        if getattr(args, name) < 1:
            fail(f"--{name} must be >= 1; got {getattr(args, name)}.")
    for name in ("max_train_steps", "checkpointing_steps", "eval_steps", "visualize_steps", "checkpoints_total_limit"):
        value = getattr(args, name)
        if value is not None and value < 1:
            fail(f"--{name} must be >= 1 (or unset); got {value}.")
    if not 0.0 <= args.validation_split_percentage < 100.0:
        fail(f"--validation_split_percentage must lie in [0, 100); got {args.validation_split_percentage}.")
    if args.max_grad_norm < 0:
        fail(f"--max_grad_norm must be >= 0; got {args.max_grad_norm}.")
    if args.lr_scheduler_type == "multistep" and not args.lr_milestones:
        fail("--lr_scheduler_type multistep needs --lr_milestones (epochs), e.g. --lr_milestones 700.")
    if args.dataloader_num_workers is not None and args.dataloader_num_workers < 0:
        fail(f"--dataloader_num_workers must be >= 0; got {args.dataloader_num_workers}.")
    if args.hub_model_id and not args.push_to_hub:
        fail("--hub_model_id is only used with --push_to_hub.")
    if args.debug_nonfinite_steps:
        try:
            [int(float(x)) for x in args.debug_nonfinite_steps.split(",")]
        except ValueError:
            fail(f"--debug_nonfinite_steps must be comma-separated numbers; got {args.debug_nonfinite_steps!r}.")
    try:
        parse_milestones(args.lr_milestones)
    except ValueError as err:
        fail(f"--lr_milestones: {err}")


# =================================================================================================== data
def _sample_key(value, index: int | None) -> int:
    if index is not None:
        return index
    # Streaming: no global index; key the sample by its content so order and sharding do not matter.
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return content_key(value["bytes"])
        return content_key(str(value.get("path")))
    return content_key(repr(value))


class MIMDataset(Dataset):
    """Map-style view of a `datasets.Dataset`: item i is the raw image (decoded or None) with its index and
    the current epoch; the collator turns those into the per-sample seed. `set_epoch` is called before
    each epoch's iterator is created, so non-persistent workers see the new epoch."""

    def __init__(self, hf_dataset, image_column: str):
        self.ds = hf_dataset.cast_column(image_column, datasets.Image(decode=False))
        self.image_column = image_column
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, index: int) -> dict:
        value = self.ds[int(index)][self.image_column]
        return {"image": decode_image(value), "key": int(index), "epoch": self.epoch}


class StreamingMIMDataset(IterableDataset):
    """Iterable view of a streamed `datasets.IterableDataset` (already split by node); loops over epochs
    forever (the step budget ends training), reshuffling the shard order and buffer each epoch."""

    def __init__(self, hf_dataset, image_column: str, start_epoch: int = 0, skip_samples: int = 0):
        self.ds = hf_dataset.cast_column(image_column, datasets.Image(decode=False))
        self.image_column = image_column
        self.epoch = start_epoch
        self.skip_samples = skip_samples

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        epoch = self.epoch
        skip = self.skip_samples
        while True:
            self.ds.set_epoch(epoch)
            stream = self.ds.skip(skip) if skip else self.ds
            skip = 0
            for example in stream:
                value = example[self.image_column]
                yield {"image": decode_image(value), "key": _sample_key(value, None), "epoch": epoch}
            epoch += 1


class MIMCollator:
    """Batch raw images into `pixel_values` + `bool_masked_pos` with one processor call.

    Sample i is processed with seed `sample_seed(seed, epoch, key_i)`: its crop, flip and mask do not
    depend on the batch it lands in, the worker that loads it or the number of processes. Unreadable images
    are replaced by a readable one of the same batch (the batch size stays fixed, so DDP ranks stay in
    step) and counted in `num_unreadable`.

    Also usable as a `transformers.Trainer` data collator with `MIMDataset` (`remove_unused_columns=False`)."""

    def __init__(self, processor, seed: int, do_train: bool = True, return_extras: bool = True):
        self.processor = processor
        self.seed = int(seed)
        self.do_train = do_train
        self.return_extras = return_extras  # False for Trainer: it passes every batch key to the model

    def __call__(self, examples: list[dict]) -> dict:
        readable = [e for e in examples if e["image"] is not None]
        num_unreadable = len(examples) - len(readable)
        if not readable:
            raise RuntimeError(f"All {len(examples)} images of a batch are unreadable; check the dataset.")
        while len(readable) < len(examples):
            readable.append(readable[len(readable) % max(1, len(examples) - num_unreadable)])
        seeds = [sample_seed(self.seed, e["epoch"], e["key"]) for e in readable]
        batch = self.processor(
            [e["image"] for e in readable], seed=seeds, do_train=self.do_train, return_mask=True,
            return_tensors="pt",
        )
        out = {"pixel_values": batch["pixel_values"], "bool_masked_pos": batch["bool_masked_pos"]}
        if self.return_extras:
            out["num_unreadable"] = torch.tensor(num_unreadable)
            out["sample_keys"] = torch.tensor([e["key"] for e in readable], dtype=torch.long)
        return out


def _pick_image_column(features, requested: str | None, where: str) -> str:
    if requested:
        if requested not in features:
            raise ValueError(f"--image_column_name {requested!r} is not a column of {where}; columns: "
                             f"{list(features)}.")
        return requested
    for name in ("image", "img", "jpg", "png", "webp"):
        if name in features:
            return name
    for name, feature in features.items():
        if isinstance(feature, datasets.Image):
            return name
    raise ValueError(f"No image column found in {where} (columns: {list(features)}); pass --image_column_name.")


def load_data(args, accelerator):
    """Returns (train hf dataset, eval hf dataset or None, image column, description for the card)."""
    eval_ds = None
    if args.dataset_name:
        kwargs = dict(cache_dir=args.cache_dir, streaming=args.streaming)
        train_ds = datasets.load_dataset(args.dataset_name, args.dataset_config_name, split=args.train_split, **kwargs)
        split = args.validation_split
        if split is None and not args.validation_split_percentage:
            try:
                names = datasets.get_dataset_split_names(args.dataset_name, args.dataset_config_name)
            except Exception:  # noqa: BLE001 - offline or scripts: no eval then
                names = []
            split = "validation" if "validation" in names else None
        if split:
            eval_ds = datasets.load_dataset(args.dataset_name, args.dataset_config_name, split=split, **kwargs)
        description = f"[{args.dataset_name}](https://huggingface.co/datasets/{args.dataset_name})" + (
            f" ({args.dataset_config_name})" if args.dataset_config_name else "")
    elif args.train_dir:
        if not os.path.isdir(args.train_dir):
            raise FileNotFoundError(f"--train_dir {args.train_dir!r} is not a directory.")
        files = {"train": os.path.join(args.train_dir, "**")}
        if args.validation_dir:
            files["validation"] = os.path.join(args.validation_dir, "**")
        loaded = datasets.load_dataset("imagefolder", data_files=files, cache_dir=args.cache_dir)
        train_ds, eval_ds = loaded["train"], loaded.get("validation")
        description = f"local image folder ({len(train_ds)} images)"
    else:
        from simmim_hf import sample_data

        train_ds = sample_data.load_sample_dataset(repeats=args.sample_data_repeats)
        description = sample_data.describe()
    features = train_ds.features if train_ds.features is not None else {}
    column = _pick_image_column(features, args.image_column_name, args.dataset_name or args.train_dir or "the data")
    if args.max_train_samples is not None:
        train_ds = train_ds.take(args.max_train_samples) if args.streaming else train_ds.select(
            range(min(args.max_train_samples, len(train_ds))))
    if eval_ds is None and args.validation_split_percentage:
        split = train_ds.train_test_split(test_size=args.validation_split_percentage / 100.0, seed=args.seed)
        train_ds, eval_ds = split["train"], split["test"]
    return train_ds, eval_ds, column, description


def _default_num_workers(accelerator) -> int:
    # One core per process does the math; the spare cores decode and augment. At least one worker: loading
    # in the training process would stall every step.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
    return max(1, min(8, cores // max(1, local_processes) - 1))


# ================================================================================================ model
def build_model_and_processor(args):
    overrides = parse_config_overrides(args.config_overrides) if args.config_overrides else {}
    if args.model_name_or_path:
        model = SimMIMForMaskedImageModeling.from_pretrained(
            args.model_name_or_path, cache_dir=args.cache_dir, trust_remote_code=args.trust_remote_code)
        if overrides:
            raise ValueError("--config_overrides cannot change a pretrained model's architecture; use "
                             "--config_name or --preset to start from scratch.")
        config = model.config
        try:
            processor = SimMIMImageProcessor.from_pretrained(args.model_name_or_path, cache_dir=args.cache_dir)
        except (OSError, ValueError):
            processor = SimMIMImageProcessor.from_config(config)
        return model, processor, args.model_name_or_path
    if args.config_name:
        config = SimMIMConfig.from_pretrained(args.config_name, cache_dir=args.cache_dir)
        source = args.config_name
    else:
        source = args.preset or DEFAULT_PRESET
        config = SimMIMConfig.from_preset(source)
    if overrides:
        try:
            config = config.with_overrides(overrides)
        except ValueError as err:
            raise ValueError(f"--config_overrides: {err}") from None
        source += f" ({args.config_overrides})"
    model = SimMIMForMaskedImageModeling(config)
    processor = SimMIMImageProcessor.from_config(config)
    return model, processor, source


# ============================================================================================== training
def _trackers(report_to: str) -> list[str] | str | None:
    if report_to in (None, "", "none"):
        return None
    if report_to == "all":
        return "all"
    return [t.strip() for t in report_to.split(",") if t.strip()]


def _public_args(args) -> dict:
    """The run's arguments for logs, trackers and the output folder (nothing secret is an argument; the
    token only ever comes from the environment)."""
    return {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool)) or v is None}


@torch.no_grad()
def evaluate(model, dataloader, accelerator) -> float:
    model.eval()
    total = torch.zeros((), device=accelerator.device)
    count = torch.zeros((), device=accelerator.device)
    for batch in dataloader:
        out = model(pixel_values=batch["pixel_values"], bool_masked_pos=batch["bool_masked_pos"])
        n = torch.tensor(float(batch["pixel_values"].shape[0]), device=accelerator.device)
        total += out.loss.float() * n
        count += n
    stats = accelerator.reduce(torch.stack([total, count]), reduction="sum")
    model.train()
    return (stats[0] / stats[1].clamp(min=1)).item()


@torch.no_grad()
def visualize(model, vis_batch, processor, accelerator, path: Path, patch_size: int) -> None:
    model.eval()
    out = model(pixel_values=vis_batch["pixel_values"], bool_masked_pos=vis_batch["bool_masked_pos"])
    model.train()
    if accelerator.is_main_process:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_reconstruction_grid(
            path, vis_batch["pixel_values"], out.reconstruction.float(), vis_batch["bool_masked_pos"], patch_size,
            image_mean=processor.image_mean, image_std=processor.image_std,
        )


def main(argv=None) -> int:
    args = parse_args(argv)
    output_dir = Path(args.output_dir)

    # CPU when asked or when there is no accelerator at all. Without `cpu=True`, `accelerate launch
    # --multi_gpu` on a GPU-less machine would try NCCL; with it, the processes form a real gloo group.
    has_accel = torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available()) or \
        torch.backends.mps.is_available()
    accelerator = Accelerator(
        cpu=args.cpu or not has_accel,
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=_trackers(args.report_to),
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        # Shuffling as a pure function of (seed, epoch): resuming mid-epoch replays the same order.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, non_blocking=True),
        # The schedule counts optimizer updates; by default Accelerate would step it once per process.
        step_scheduler_with_optimizer=False,
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
                        datefmt="%m/%d/%Y %H:%M:%S", level=logging.INFO)
    logger.info(accelerator.state, main_process_only=False)
    if accelerator.is_local_main_process:
        datasets.utils.logging.set_verbosity_warning()
        transformers.utils.logging.set_verbosity_warning()
    else:
        datasets.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()

    # The Hub repo is created first, before the data, the model or anything in --output_dir: a deterministic
    # failure (offline mode, no / read-only token, bad --hub_model_id) stops here, not after hours of training.
    # Transient failures are retried in the background while training runs.
    pusher, repo_id, push_failed = None, None, False
    if args.push_to_hub and accelerator.is_main_process:
        pusher = HubPusher.for_training_run(args.hub_model_id or output_dir.resolve().name,
                                            private=args.hub_private_repo or None)
        repo_id = pusher.repo_id

    ckpt = CheckpointManager(accelerator, output_dir, args.checkpoints_total_limit)
    if args.overwrite_output_dir:
        ckpt.clear()  # starting over: no earlier checkpoint may be resumed or outrank this run's in rotation
    resume_path = ckpt.resolve(args.resume_from_checkpoint)
    # Checked on every rank (same filesystem), so no rank waits forever for one that raised. With nothing to
    # resume, a non-empty folder is only taken over when it is this script's own run that was stopped before
    # its first checkpoint (it wrote training_args.json); anything else needs --overwrite_output_dir.
    own_unfinished_run = args.resume_from_checkpoint == "latest" and (output_dir / "training_args.json").is_file()
    if output_dir.is_dir() and any(output_dir.iterdir()) and resume_path is None \
            and not args.overwrite_output_dir and not own_unfinished_run:
        raise ValueError(f"--output_dir {output_dir} is not empty and holds no checkpoint to resume. Pass "
                         "--overwrite_output_dir to start over in it (its files may be overwritten), or choose "
                         "another folder.")
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    set_seed(args.seed)

    # ------------------------------------------------------------------------------------ model + data
    model, processor, model_source = build_model_and_processor(args)
    config = model.config
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(model)

    with accelerator.main_process_first():  # one process downloads / prepares, the others reuse the cache
        train_hf, eval_hf, image_column, data_description = load_data(args, accelerator)
    num_workers = args.dataloader_num_workers if args.dataloader_num_workers is not None \
        else _default_num_workers(accelerator)
    loader_kwargs = dict(num_workers=num_workers, pin_memory=accelerator.device.type == "cuda",
                         # Non-persistent workers: each epoch's workers get the dataset with the new epoch.
                         persistent_workers=False,
                         prefetch_factor=4 if num_workers > 0 else None)
    train_collator = MIMCollator(processor, args.seed, do_train=True)
    # Eval: center crops and masks fixed by (seed, index), so successive evals are comparable.
    eval_collator = MIMCollator(processor, args.seed, do_train=False)

    if args.streaming:
        from datasets.distributed import split_dataset_by_node

        shuffled = train_hf.shuffle(seed=args.seed, buffer_size=args.shuffle_buffer_size)
        node_ds = split_dataset_by_node(shuffled, rank=accelerator.process_index, world_size=accelerator.num_processes)
        train_dataset = StreamingMIMDataset(node_ds, image_column)
        train_len = None
    else:
        train_dataset = MIMDataset(train_hf, image_column)
        train_len = len(train_dataset)
        if train_len < args.per_device_train_batch_size * accelerator.num_processes:
            raise ValueError(
                f"The training set has {train_len} images, fewer than one total batch "
                f"(--per_device_train_batch_size {args.per_device_train_batch_size} x {accelerator.num_processes} "
                "processes); lower the batch size.")
    # drop_last: every optimizer step sees full batches on every rank (constant lr-scaling batch, DDP in step).
    train_dataloader = DataLoader(train_dataset, batch_size=args.per_device_train_batch_size,
                                  shuffle=not args.streaming, drop_last=True, collate_fn=train_collator,
                                  generator=torch.Generator().manual_seed(args.seed), **loader_kwargs)
    eval_dataloader = None
    if eval_hf is not None:
        eval_dataset = MIMDataset(eval_hf, image_column) if not args.streaming else \
            StreamingMIMDataset(eval_hf, image_column)
        eval_dataloader = DataLoader(eval_dataset, batch_size=args.per_device_eval_batch_size,
                                     collate_fn=eval_collator, **loader_kwargs)

    # ------------------------------------------------------------------------------------ optimisation
    param_groups = build_param_groups(model, weight_decay=args.weight_decay)
    for group in param_groups:  # bookkeeping keys are not optimizer options
        group.pop("param_names", None)
    # fused AdamW: one kernel for all parameters, and it can skip a non-finite step without a host sync.
    fused = accelerator.distributed_type != DistributedType.FSDP
    optimizer = torch.optim.AdamW(param_groups, lr=args.base_learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  eps=args.adam_epsilon, weight_decay=args.weight_decay, fused=fused or None)
    if args.streaming:
        model, optimizer = accelerator.prepare(model, optimizer)
    else:
        model, optimizer, train_dataloader = accelerator.prepare(model, optimizer, train_dataloader)
        if eval_dataloader is not None:
            eval_dataloader = accelerator.prepare(eval_dataloader)

    num_processes = accelerator.num_processes
    total_batch_size = args.per_device_train_batch_size * num_processes * args.gradient_accumulation_steps
    if args.streaming:
        steps_per_epoch = num_epochs = None
        max_train_steps = args.max_train_steps
    else:
        # Accelerate steps the optimizer at the end of the dataloader even mid-accumulation, hence ceil.
        steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
        max_train_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
        num_epochs = math.ceil(max_train_steps / steps_per_epoch)
    scale = total_batch_size / 512.0  # the paper's linear scaling rule (official code: TOTAL_BATCH / 512)
    peak_lr = args.learning_rate if args.learning_rate is not None else args.base_learning_rate * scale
    lr_ratio = peak_lr / args.base_learning_rate if args.base_learning_rate else 1.0
    if args.warmup_steps is not None:
        warmup_steps = args.warmup_steps
    else:
        warmup_steps = round(args.warmup_epochs * (steps_per_epoch or 0))
    warmup_steps = min(warmup_steps, max_train_steps)
    milestones = parse_milestones(args.lr_milestones, steps_per_epoch)
    lr_scheduler = LayerDecayLRScheduler(
        optimizer, num_training_steps=max_train_steps, num_warmup_steps=warmup_steps,
        schedule=args.lr_scheduler_type, base_lr=peak_lr, warmup_lr=args.warmup_lr * lr_ratio,
        min_lr=args.min_lr * lr_ratio, milestones=milestones, gamma=args.lr_gamma,
    )
    lr_scheduler = accelerator.prepare(lr_scheduler)  # registered for save_state / load_state

    # A fixed batch for the reconstruction grid: the first images of the training set, eval crops.
    vis_examples = [train_dataset.ds[i] for i in range(min(args.num_visualize_images, train_len or 0))] \
        if train_len else []
    vis_batch = None
    if vis_examples:
        vis_batch = eval_collator([{"image": decode_image(e[image_column]), "key": i, "epoch": 0}
                                   for i, e in enumerate(vis_examples)])
        vis_batch = {k: v.to(accelerator.device) for k, v in vis_batch.items()}

    if accelerator.is_main_process:
        tracker_config = _public_args(args)
        tracker_config.update(total_batch_size=total_batch_size, peak_lr=peak_lr, max_train_steps=max_train_steps)
        accelerator.init_trackers(args.run_name, config=tracker_config)
        atomic_write_text(output_dir / "training_args.json", json.dumps(_public_args(args), indent=2))

    num_params = sum(p.numel() for p in model.parameters())
    logger.info("***** Running SimMIM pretraining *****")
    logger.info(f"  Model = {model_source} ({config.encoder_type}, {format_count(num_params)} parameters, "
                f"{config.image_size} px, mask {config.mask_patch_size} px x {config.mask_ratio})")
    logger.info(f"  Data = {data_description}; {train_len if train_len is not None else 'streamed'} training images"
                + (f", {len(eval_hf)} eval images" if eval_hf is not None and not args.streaming else ""))
    logger.info(f"  Epochs = {num_epochs}, steps per epoch = {steps_per_epoch}, total optimizer steps = {max_train_steps}")
    logger.info(f"  Batch per device = {args.per_device_train_batch_size}, processes = {num_processes}, "
                f"accumulation = {args.gradient_accumulation_steps}, total batch = {total_batch_size}")
    logger.info(f"  Peak lr = {peak_lr:.3g} ({'given' if args.learning_rate is not None else 'base lr x total batch / 512'}), "
                f"warmup {warmup_steps} steps, {args.lr_scheduler_type} schedule; dataloader workers = {num_workers}")

    # ------------------------------------------------------------------------------------ resume
    # What the saved position (batches into an epoch) and the lr schedule mean: resuming under other values
    # would skip or repeat data and follow another schedule, so `ckpt.load` refuses it by name.
    ckpt.settings = {"per_device_train_batch_size": args.per_device_train_batch_size, "num_processes": num_processes,
                     "gradient_accumulation_steps": args.gradient_accumulation_steps, "seed": args.seed,
                     "max_train_steps": max_train_steps, "train_samples": train_len, "streaming": bool(args.streaming),
                     "peak_lr": peak_lr, "warmup_steps": warmup_steps, "lr_scheduler_type": args.lr_scheduler_type,
                     "milestones": milestones}
    global_step, start_epoch, resume_batches = 0, 0, 0
    if resume_path is not None:
        logger.info(f"Resuming from checkpoint {resume_path}")
        state = ckpt.load(resume_path)
        global_step = int(state["step"])
        start_epoch = int(state.get("epoch", 0))
        resume_batches = int(state.get("batches_in_epoch", 0))
    elif args.resume_from_checkpoint == "latest":
        logger.info("Starting from scratch (no checkpoint to resume).")

    guard = NonFiniteGuard(args.max_consecutive_nonfinite, accelerator.device)
    guard_on_optimizer = NonFiniteGuard.supports(optimizer) and accelerator.scaler is None
    if not guard_on_optimizer and accelerator.scaler is None:
        logger.warning("The optimizer cannot skip steps without a host sync; non-finite steps are detected "
                       "at the logging interval only.")
    preemption = PreemptionHandler()
    nan_steps = {int(float(s)) for s in args.debug_nonfinite_steps.split(",")} if args.debug_nonfinite_steps else set()
    max_norm = args.max_grad_norm if args.max_grad_norm > 0 else float("inf")

    def save_checkpoint(epoch: int, batches_in_epoch: int) -> Path:
        path = ckpt.save(global_step, {"epoch": epoch, "batches_in_epoch": batches_in_epoch,
                                       "max_train_steps": max_train_steps})
        logger.info(f"Saved checkpoint {path}")
        if pusher is not None and args.hub_push_checkpoints:
            ckpt.protected.add(str(path))
            pusher.push(path, f"Checkpoint at step {global_step}", path_in_repo=f"checkpoints/{path.name}",
                        on_done=lambda p=str(path): ckpt.protected.discard(p))
        return path

    progress = None
    try:
        from tqdm.auto import tqdm

        progress = tqdm(total=max_train_steps, initial=global_step, disable=not accelerator.is_local_main_process,
                        desc="pretraining", dynamic_ncols=True)
    except ImportError:
        pass

    # Running sums on the device; read (one host sync) every --logging_steps.
    loss_sum = torch.zeros((), device=accelerator.device)
    loss_count = torch.zeros((), device=accelerator.device)
    unreadable = torch.zeros((), device=accelerator.device, dtype=torch.long)
    last_grad_norm = torch.zeros((), device=accelerator.device)
    last_log_time, images_since_log = time.perf_counter(), 0
    last_loss = float("nan")
    last_eval_loss = None
    stopped_early = preempted = False
    epoch = start_epoch
    batches_in_epoch = resume_batches

    model.train()
    while global_step < max_train_steps and not (stopped_early or preempted):
        if args.streaming:
            if epoch == start_epoch and resume_batches:
                train_dataset.skip_samples = resume_batches * args.per_device_train_batch_size
            train_dataset.set_epoch(epoch)
            active_dataloader = train_dataloader
        else:
            train_dataloader.set_epoch(epoch)
            train_dataset.set_epoch(epoch)
            active_dataloader = train_dataloader
            if epoch == start_epoch and resume_batches:
                # Replays the epoch's (seeded) order, dropping the batches already trained on.
                active_dataloader = accelerator.skip_first_batches(train_dataloader, resume_batches)
        batches_in_epoch = resume_batches if epoch == start_epoch else 0

        for batch in active_dataloader:
            if args.streaming:
                batch = {k: v.to(accelerator.device, non_blocking=True) for k, v in batch.items()}
            unreadable += batch["num_unreadable"].to(unreadable.device)
            if global_step == 0 and batches_in_epoch == 0:
                # Once per run (one sync): shows that every rank trains on its own shard.
                logger.info(f"First batch sample indices: {batch['sample_keys'].tolist()}", main_process_only=False)
            with accelerator.accumulate(model):
                outputs = model(pixel_values=batch["pixel_values"], bool_masked_pos=batch["bool_masked_pos"])
                loss = outputs.loss
                if nan_steps and (global_step + 1) in nan_steps:
                    loss = loss * float("nan")
                accelerator.backward(loss)
                finite = torch.isfinite(loss.detach())
                loss_sum += torch.where(finite, loss.detach().float(), 0.0)
                loss_count += finite.float()
                if accelerator.sync_gradients:
                    # After the gradient all-reduce: every rank gets the same norm, hence the same decision.
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)
                    found_inf = guard.update(grad_norm)
                    last_grad_norm = grad_norm.detach()
                    if guard_on_optimizer:
                        NonFiniteGuard.attach(optimizer, found_inf)
                    optimizer.step()
                    if guard_on_optimizer:
                        NonFiniteGuard.detach(optimizer)
                    lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
            batches_in_epoch += 1
            images_since_log += batch["pixel_values"].shape[0] * num_processes
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            if progress is not None:
                progress.update(1)

            if global_step % args.logging_steps == 0 or global_step == max_train_steps:
                stats = accelerator.reduce(torch.stack([loss_sum, loss_count, unreadable.float()]), reduction="sum")
                loss_total, count, bad_images = stats.tolist()  # the host sync of this interval
                now = time.perf_counter()
                images_per_sec = images_since_log / max(now - last_log_time, 1e-9)
                last_loss = loss_total / count if count else float("nan")
                lr = lr_scheduler.get_last_lr()[0]
                logs = {"train/loss": last_loss, "train/lr": lr, "train/grad_norm": last_grad_norm.float().item(),
                        "train/images_per_sec": images_per_sec, "train/epoch": epoch}
                if bad_images:
                    logger.warning(f"{int(bad_images)} unreadable image(s) replaced in the last "
                                   f"{args.logging_steps} steps.")
                    logs["train/unreadable_images"] = bad_images
                if guard.check():
                    logger.error(f"{args.max_consecutive_nonfinite} optimizer steps in a row had a non-finite "
                                 "loss/gradient; stopping (the weights are those before the first skipped step).")
                    stopped_early = True
                logs["train/skipped_steps"] = guard.total_skipped
                accelerator.log(logs, step=global_step)
                if progress is not None:
                    progress.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{images_per_sec:.0f}")
                logger.info(f"step {global_step}/{max_train_steps} epoch {epoch} loss {last_loss:.4f} lr {lr:.3e} "
                            f"grad_norm {logs['train/grad_norm']:.3f} images/s {images_per_sec:.1f}")
                loss_sum.zero_(); loss_count.zero_(); unreadable.zero_()
                last_log_time, images_since_log = now, 0

            if eval_dataloader is not None and args.eval_steps and global_step % args.eval_steps == 0:
                last_eval_loss = evaluate(model, eval_dataloader, accelerator)
                accelerator.log({"eval/loss": last_eval_loss}, step=global_step)
                logger.info(f"step {global_step}: eval loss {last_eval_loss:.4f}")
            if vis_batch is not None and args.visualize_steps and global_step % args.visualize_steps == 0:
                visualize(model, vis_batch, processor, accelerator,
                          output_dir / "reconstructions" / f"step_{global_step:07d}.png", config.patch_size)
            if args.checkpointing_steps and global_step % args.checkpointing_steps == 0:
                save_checkpoint(epoch, batches_in_epoch)
            if args.debug_sigterm_at_step is not None and global_step == args.debug_sigterm_at_step:
                os.kill(os.getpid(), 15)  # a real signal through the real handler
            if preemption.should_stop():
                logger.warning(f"Received signal {preemption.received}; saving a checkpoint at step {global_step} "
                               "and exiting. Resume with --resume_from_checkpoint latest.")
                if not (args.checkpointing_steps and global_step % args.checkpointing_steps == 0):
                    save_checkpoint(epoch, batches_in_epoch)
                preempted = True
            if stopped_early or preempted or global_step >= max_train_steps:
                break
        else:  # the epoch ran out
            epoch += 1
            batches_in_epoch = 0
            continue
        break
    if progress is not None:
        progress.close()
    preemption.restore()

    if preempted:
        if pusher is not None:
            pusher.wait(timeout=60)
        accelerator.end_training()
        logger.info("Preempted: exiting cleanly after saving the checkpoint.")
        return 0

    # ------------------------------------------------------------------------------------ finish
    # A resumable checkpoint at the end too (to extend the run, or after an early stop).
    if not (args.checkpointing_steps and global_step % args.checkpointing_steps == 0):
        save_checkpoint(epoch, batches_in_epoch)
    if eval_dataloader is not None:
        last_eval_loss = evaluate(model, eval_dataloader, accelerator)
        accelerator.log({"eval/loss": last_eval_loss}, step=global_step)
        logger.info(f"Final eval loss {last_eval_loss:.4f}")
    if vis_batch is not None:
        visualize(model, vis_batch, processor, accelerator, output_dir / "reconstruction.png", config.patch_size)

    accelerator.wait_for_everyone()
    if accelerator.distributed_type != DistributedType.FSDP:
        # Per-rank fingerprint of the final weights: identical on every rank if DDP kept them in sync.
        checksum = sum(p.detach().double().abs().sum() for p in model.parameters()).item()
        logger.info(f"Final weights checksum: {checksum:.12e}", main_process_only=False)
    state_dict = accelerator.get_state_dict(model)  # collective under FSDP (gathers the shards)
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.save_pretrained(output_dir, is_main_process=accelerator.is_main_process, state_dict=state_dict)
    if accelerator.is_main_process:
        processor.save_pretrained(output_dir)
        results = {"train_loss": last_loss, "eval_loss": last_eval_loss, "global_step": global_step,
                   "skipped_nonfinite_steps": guard.total_skipped, "stopped_early": stopped_early}
        atomic_write_text(output_dir / "all_results.json", to_json(results))
        _write_card(args, output_dir, config, model_source, data_description, num_params, num_epochs,
                    global_step, total_batch_size, num_processes, peak_lr, warmup_steps, accelerator,
                    last_loss, last_eval_loss, repo_id)
        logger.info(f"Saved the model to {output_dir}")
        if pusher is not None:
            pusher.push(output_dir, f"SimMIM pretraining: {global_step} steps", ignore_patterns=NOT_MODEL_PATTERNS)
            if not pusher.wait():
                push_failed = True
                logger.error(
                    f"Push to the Hub failed ({'; '.join(pusher.errors)}). The local folder {output_dir} is complete "
                    "(weights, config, processor, model code, model card, checkpoints); nothing was lost. Push it by "
                    f"hand once the problem is fixed:\n  {pusher.manual_push_command(output_dir, NOT_MODEL_PATTERNS)}\n"
                    "Exiting with status 1.")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 1 if stopped_early or push_failed else 0


def _write_card(args, output_dir, config, model_source, data_description, num_params, num_epochs, steps,
                total_batch_size, num_processes, peak_lr, warmup_steps, accelerator, final_loss, eval_loss,
                repo_id) -> None:
    architecture = (f"ViT, {config.num_hidden_layers} layers, width {config.hidden_size}"
                    if config.encoder_type == "vit" else
                    f"Swin, depths {config.depths}, embed dim {config.embed_dim}, window {config.window_size}")
    card_data = {"library_name": "transformers", "license": "apache-2.0", "pipeline_tag": "image-feature-extraction",
                 "tags": ["simmim", "masked-image-modeling", "self-supervised", config.encoder_type]}
    if args.dataset_name:
        card_data["datasets"] = [args.dataset_name]
    fields = dict(
        model_name=repo_id or output_dir.resolve().name, architecture=architecture, preset=model_source,
        num_parameters=format_count(num_params), image_size=config.image_size, patch_size=config.patch_size,
        mask_patch_size=config.mask_patch_size, mask_ratio=config.mask_ratio,
        mask_ratio_percent=round(100 * config.mask_ratio), dataset_description=data_description,
        epochs=num_epochs if num_epochs is not None else "streamed", steps=steps, total_batch_size=total_batch_size,
        num_processes=num_processes, per_device_batch_size=args.per_device_train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps, learning_rate=f"{peak_lr:.3g}",
        weight_decay=args.weight_decay, lr_scheduler=args.lr_scheduler_type, warmup_steps=warmup_steps,
        mixed_precision=accelerator.mixed_precision, final_loss=f"{final_loss:.4f}",
        eval_loss=f"{eval_loss:.4f}" if eval_loss is not None else None,
        repo_id=repo_id or "path/to/this/folder", small_data=not (args.dataset_name or args.train_dir),
    )
    template = MODEL_CARD_TEMPLATE
    if not template.is_file():  # installed without the repo's model_cards/: a minimal inline card
        template = output_dir / ".card_template.md"
        template.write_text("---\n{{ card_data }}\n---\n\n# {{ model_name }}\n\nSimMIM pretraining of "
                            "{{ architecture }} on {{ dataset_description }}: {{ steps }} steps, final loss "
                            "{{ final_loss }}.\n", encoding="utf-8")
    write_model_card(template, output_dir, card_data, **fields)
    if template.parent == output_dir:
        template.unlink()


if __name__ == "__main__":
    sys.exit(main())
