"""`StreamingImageRows`: a single pass for evaluation (`repeat=False`), and a resume that continues exactly where
an uninterrupted run would be, with or without DataLoader workers (each of which streams its own shards)."""

from __future__ import annotations

import collections
import itertools

import datasets
import pytest

from simmim_hf.data import StreamingImageRows, create_dataloader

NUM_ROWS, NUM_SHARDS, BATCH_SIZE = 12, 4, 2


def _stream(num_rows: int = NUM_ROWS, num_shards: int = NUM_SHARDS):
    features = datasets.Features({"image": datasets.Image(decode=False)})
    table = datasets.Dataset.from_dict({"image": [{"bytes": bytes([i]) * 3, "path": None} for i in range(num_rows)]},
                                       features=features)
    # Shuffled as the pretraining script does: shards and buffer reshuffle every epoch.
    return table.to_iterable_dataset(num_shards=num_shards).shuffle(seed=0, buffer_size=3)


def _row_id(row) -> int:
    return row["image"]["bytes"][0]


def _ids(rows):
    return [(_row_id(row), row["epoch"]) for row in rows]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_repeat_false_yields_every_row_once_and_stops(num_workers):
    rows = StreamingImageRows(_stream(), repeat=False)
    loader = create_dataloader(rows, BATCH_SIZE, _ids, num_workers=num_workers)
    seen = [row for batch in loader for row in batch]  # ends: the list is finite
    assert collections.Counter(seen) == collections.Counter((i, 0) for i in range(NUM_ROWS))


def test_workers_beyond_the_shard_count_idle_instead_of_failing():
    """A one-file evaluation split has one shard: with 2 workers, `datasets` gives the second none."""
    features = datasets.Features({"image": datasets.Image(decode=False)})
    one_shard = datasets.Dataset.from_dict({"image": [{"bytes": bytes([i]) * 3, "path": None} for i in range(5)]},
                                           features=features).to_iterable_dataset(num_shards=1)
    loader = create_dataloader(StreamingImageRows(one_shard, repeat=False), BATCH_SIZE, _ids, num_workers=2)
    assert sorted(row for batch in loader for row in batch) == [(i, 0) for i in range(5)]


def test_repeat_false_on_an_empty_stream_raises():
    with pytest.raises(RuntimeError, match="stream is empty"):
        list(StreamingImageRows(_stream().take(0), repeat=False))


def test_repeat_true_loops_over_epochs():
    rows = list(itertools.islice(iter(StreamingImageRows(_stream())), 2 * NUM_ROWS + 1))
    assert sorted(_ids(rows[:NUM_ROWS])) == [(i, 0) for i in range(NUM_ROWS)]
    assert sorted(_ids(rows[NUM_ROWS:2 * NUM_ROWS])) == [(i, 1) for i in range(NUM_ROWS)]
    assert rows[-1]["epoch"] == 2


def _batches(num_workers: int, resume_at: int, count: int, num_shards: int = NUM_SHARDS) -> list:
    """`count` batches of a fresh loader whose dataset was set `resume_at` batches into epoch 0."""
    rows = StreamingImageRows(_stream(num_shards=num_shards))
    rows.set_position(0, resume_at * BATCH_SIZE)  # before the iterator exists, as on a resume
    loader = create_dataloader(rows, BATCH_SIZE, _ids, num_workers=num_workers)
    return list(itertools.islice(iter(loader), count))


@pytest.mark.parametrize("num_workers, num_shards, resumes", [
    (0, NUM_SHARDS, (1, 4, 5, 8)),
    (2, NUM_SHARDS, (1, 4, 5, 8)),  # 1 and 5: batch `resume_at` came from worker 1, a fresh loader starts at 0
    (3, NUM_SHARDS, (1, 2, 7)),     # workers with 2, 1 and 1 shards run through their epochs at different paces
    (3, 2, (1, 3)),                 # the third worker has no shard and idles, in both runs
])
def test_a_resume_continues_the_uninterrupted_batches(num_workers, num_shards, resumes):
    total = 15  # 2.5 epochs of 6 batches: resumes inside the first, second and third epoch
    uninterrupted = _batches(num_workers, 0, total, num_shards)
    assert len(set(map(tuple, uninterrupted))) == total
    for resume_at in resumes:
        assert _batches(num_workers, resume_at, total - resume_at, num_shards) == uninterrupted[resume_at:], resume_at


def test_streamed_pretraining_evaluates_its_validation_split_and_finishes(tmp_path):
    """`--streaming` with a validation split: every evaluation is one pass (it used to loop forever)."""
    import json
    import signal

    from jobs import pretrain

    from simmim_hf.sample_data import load_sample_images

    for split, count in (("train", 8), ("validation", 3)):
        (tmp_path / "data" / split).mkdir(parents=True)
        for i, photo in enumerate(load_sample_images()[:count]):
            photo.resize((40, 40)).save(tmp_path / "data" / split / f"{i}.png")

    def hung(*_):
        raise TimeoutError("the streamed evaluation did not finish")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(240)
    try:
        pretrain(["--preset", "vit-nano-p4-32", "--dataset_name", tmp_path / "data", "--streaming",
                  "--max_train_steps", 4, "--eval_steps", 2, "--per_device_train_batch_size", 2,
                  "--per_device_eval_batch_size", 2, "--learning_rate", 1e-3, "--dataloader_num_workers", 0,
                  "--logging_steps", 2, "--report_to", "none", "--visualize_steps", 2, "--output_dir", tmp_path / "run"])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    results = json.loads((tmp_path / "run" / "all_results.json").read_text())
    assert results["global_step"] == 4 and 0 < results["eval_loss"] < 10  # a finite mean over the 3 images
    # Reconstruction pictures from the stream's first rows (a stream used to get none, silently).
    assert (tmp_path / "run" / "reconstruction.png").is_file()
    assert sorted(p.name for p in (tmp_path / "run" / "reconstructions").iterdir()) == \
        ["step_0000002.png", "step_0000004.png"]
    # Which worker reads which shards decides the stream's batches: resuming under another worker count is refused.
    with pytest.raises(ValueError, match=r"dataloader_num_workers: 0 in the checkpoint, 1 now"):
        pretrain(["--preset", "vit-nano-p4-32", "--dataset_name", tmp_path / "data", "--streaming",
                  "--max_train_steps", 4, "--per_device_train_batch_size", 2, "--learning_rate", 1e-3,
                  "--dataloader_num_workers", 1, "--report_to", "none", "--output_dir", tmp_path / "run",
                  "--resume_from_checkpoint", "latest"])
