"""Regression tests for issue 10: the Hub push fails fast on deterministic errors and a run whose final push
failed exits non-zero (after saving everything locally); `all_results.json` is valid JSON when a value is not
finite; the converter's default masking unit leaves enough units at small resolutions and its errors name the
problem. CPU only, no network (`HF_HUB_OFFLINE=1`; uploads go to fakes or to the stand-in of tests/jobs.py)."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from huggingface_hub import errors as hub_errors
from safetensors.torch import save_file

from jobs import HubStandin, finetune, pretrain
from simmim_hf.training_utils import HubPusher

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"


def http_error(status: int, cls=hub_errors.HfHubHTTPError):
    """A huggingface_hub HTTP error as `hf_raise_for_status` raises it (only the parts it reads)."""
    response = SimpleNamespace(status_code=status, headers={}, request=None)
    return cls(f"{status} Client Error: simulated", response=response)


class FakeApi:
    """Stands in for `HfApi`: `create_errors` / `upload_errors` are raised by successive calls, then success."""

    def __init__(self, create_errors=(), upload_errors=()):
        self.create_errors, self.upload_errors = list(create_errors), list(upload_errors)
        self.create_threads, self.uploads = [], 0

    def create_repo(self, repo_id, **kwargs):
        self.create_threads.append(threading.current_thread())
        if self.create_errors:
            raise self.create_errors.pop(0)
        return SimpleNamespace(repo_id=repo_id if "/" in repo_id else f"u/{repo_id}")  # the user's namespace

    def upload_folder(self, **kwargs):
        self.uploads += 1
        self.upload_repo_ids = getattr(self, "upload_repo_ids", []) + [kwargs["repo_id"]]
        if self.upload_errors:
            raise self.upload_errors.pop(0)
        return "https://huggingface.co/u/r/commit/0"


# ------------------------------------------------------------------------------------------- Hub: error kinds
@pytest.mark.parametrize("err, transient", [
    (hub_errors.OfflineModeIsEnabled("offline mode is enabled"), False),  # a ConnectionError, but never passes
    (hub_errors.HFValidationError("Repo id must be in the form 'namespace/repo_name'"), False),
    (http_error(401), False),
    (http_error(403), False),
    (http_error(404, hub_errors.RepositoryNotFoundError), False),
    (http_error(400, hub_errors.BadRequestError), False),
    (http_error(409), False),
    (http_error(429), True),
    (http_error(500), True),
    (http_error(503), True),
    (ConnectionError("connection reset"), True),
    (TimeoutError("read timed out"), True),
])
def test_hub_error_kinds(err, transient):
    assert HubPusher.is_transient(err) is transient


# --------------------------------------------------------------------------------- Hub: create_repo at start-up
@pytest.mark.parametrize("err, hint", [
    (hub_errors.OfflineModeIsEnabled("Cannot reach the Hub: offline mode is enabled."), "HF_HUB_OFFLINE"),
    (http_error(401), "hf auth login"),
    (http_error(403), "permissions"),
    (http_error(404, hub_errors.RepositoryNotFoundError), "repo id"),
    (hub_errors.HFValidationError("Repo id must be in the form 'repo_name' or 'namespace/repo_name'"), "repo id"),
])
def test_deterministic_create_repo_error_raises_at_once(err, hint):
    api = FakeApi(create_errors=[err] * 10)
    with pytest.raises(HubPusher.PushError, match=rf"(?s)Cannot create the Hub repo 'u/r'.*{hint}"):
        HubPusher("u/r", api=api, max_retries=5, backoff_seconds=0.01)
    assert len(api.create_threads) == 1, "a deterministic error must not be retried"


def test_real_hfapi_in_offline_mode_fails_fast():
    """The issue's case: HF_HUB_OFFLINE=1 made a 3-step run spend over 2 minutes in create_repo retries."""
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    start = time.monotonic()
    with pytest.raises(HubPusher.PushError, match="HF_HUB_OFFLINE"):
        HubPusher("tester/simmim-offline")
    assert time.monotonic() - start < 5


@pytest.mark.parametrize("first_try_fails", [False, True])
def test_a_bare_repo_name_uploads_to_the_namespaced_repo(tmp_path, first_try_fails):
    """`--hub_model_id name` (or the output folder's name): uploads go to the "user/name" the Hub created, also
    when create_repo only succeeded on a background retry."""
    api = FakeApi(create_errors=[ConnectionError("down")] if first_try_fails else [])
    pusher = HubPusher("r", api=api, max_retries=3, backoff_seconds=0.01)
    (tmp_path / "f.txt").write_text("x")
    pusher.push(tmp_path, "m")
    assert pusher.wait(timeout=30) is True
    assert api.upload_repo_ids == ["u/r"] and pusher.repo_id == "u/r"


def test_transient_create_repo_error_is_retried_in_the_background(tmp_path):
    api = FakeApi(create_errors=[ConnectionError("down"), http_error(503)])
    pusher = HubPusher("u/r", api=api, max_retries=5, backoff_seconds=0.01)  # returns: training may start
    (tmp_path / "f.txt").write_text("x")
    pusher.push(tmp_path, "m")
    assert pusher.wait(timeout=30) is True
    assert len(api.create_threads) == 3 and api.uploads == 1
    assert api.create_threads[0] is threading.main_thread()
    assert all(t is not threading.main_thread() for t in api.create_threads[1:]), "retries must not block start-up"


# -------------------------------------------------------------------------------------------- Hub: uploads
def test_deterministic_upload_error_is_not_retried_and_reported(tmp_path):
    (tmp_path / "f.txt").write_text("x")
    api = FakeApi(upload_errors=[http_error(403)] * 10)
    pusher = HubPusher("u/r", api=api, max_retries=5, backoff_seconds=0.01)
    pusher.push(tmp_path, "m")
    assert pusher.wait(timeout=30) is False
    assert api.uploads == 1, "a deterministic error must not be retried"
    assert pusher.failed and "HTTP 403" in pusher.errors[0]
    assert (tmp_path / "f.txt").read_text() == "x"


def test_rate_limit_and_server_errors_are_retried(tmp_path):
    (tmp_path / "f.txt").write_text("x")
    api = FakeApi(upload_errors=[http_error(429), http_error(502)])
    pusher = HubPusher("u/r", api=api, max_retries=3, backoff_seconds=0.01)
    pusher.push(tmp_path, "m")
    assert pusher.wait(timeout=30) is True and api.uploads == 3 and not pusher.errors


def test_manual_push_command_names_repo_folder_and_excludes():
    pusher = HubPusher("u/r", api=FakeApi())
    assert pusher.manual_push_command("/out dir", ["checkpoints/*", "*.log"]) == \
        "hf upload u/r '/out dir' --exclude 'checkpoints/*' --exclude '*.log'"


# ------------------------------------------------------------------------------------- scripts: start-up abort
def test_pretraining_aborts_before_training_when_the_repo_cannot_be_created(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        pretrain(["--preset", "vit-nano-p4-32", "--output_dir", out, "--max_train_steps", "3", "--report_to", "none",
                  "--push_to_hub", "--hub_model_id", "tester/simmim-offline"])
    message = str(exit_info.value.code)
    assert "--push_to_hub" in message and "--hub_model_id" in message and "HF_HUB_OFFLINE" in message
    assert not out.exists(), "nothing may be written before the Hub repo exists"


def test_finetune_aborts_before_training_when_the_repo_cannot_be_created(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        finetune(["--preset", "vit-nano-p4-32", "--output_dir", out, "--cpu", "--num_train_epochs", "1",
                  "--max_train_samples", "16", "--max_eval_samples", "16",
                  "--push_to_hub", "--hub_model_id", "tester/simmim-offline"])
    assert "--push_to_hub" in str(exit_info.value.code) and "HF_HUB_OFFLINE" in str(exit_info.value.code)
    assert not out.exists()


# ------------------------------------------------------------------------- scripts: failed push, NaN results
def test_pretraining_whose_push_failed_exits_1_after_saving_and_writes_valid_json(tmp_path, monkeypatch, caplog):
    """Every upload fails (transiently) and no step is finite: exit 1 (not 0), the folder complete, and
    all_results.json with null (not a bare NaN) for the loss."""
    from simmim_hf import run_pretraining

    out, record = tmp_path / "out", tmp_path / "hub"
    hub = HubStandin(record, monkeypatch, failures=10**6, backoff_seconds=0.01)
    monkeypatch.setattr(run_pretraining, "masked_image_modeling_loss",
                        lambda model, batch, state: model(**{k: batch[k] for k in ("pixel_values", "bool_masked_pos")}
                                                          ).loss * float("nan"))
    with caplog.at_level("ERROR"):
        rc = pretrain(["--output_dir", out, "--preset", "vit-nano-p4-32", "--per_device_train_batch_size", "4",
                       "--sample_data_repeats", "1", "--validation_split_percentage", "20", "--max_train_steps", "2",
                       "--warmup_steps", "1", "--logging_steps", "1", "--report_to", "none",
                       "--dataloader_num_workers", "0", "--num_visualize_images", "2", "--max_consecutive_nonfinite",
                       "5", "--push_to_hub", "--hub_model_id", "tester/simmim-nano"])
    assert rc == 1
    for name in ("model.safetensors", "config.json", "preprocessor_config.json", "README.md", "all_results.json"):
        assert (out / name).is_file(), name
    assert hub.uploads > 1 and not hub.commits  # retried, and nothing reached the stand-in Hub
    assert "Push to the Hub failed" in caplog.text and f"The local folder {out} is complete" in caplog.text
    assert f"hf upload tester/simmim-nano {out} --exclude 'checkpoints/*'" in caplog.text

    text = (out / "all_results.json").read_text()
    assert "NaN" not in text
    results = json.loads(text)  # strict JSON
    assert results["train_loss"] is None and results["skipped_nonfinite_steps"] == 2
    assert results["stopped_early"] is False  # so the exit status 1 is the failed push


def test_pushed_checkpoints_replace_each_other_in_last_checkpoint(tmp_path, monkeypatch):
    """--hub_push_checkpoints kept every checkpoint under checkpoints/<name> in the repo, so a run started over
    (or resumed before a divergence) left the discarded checkpoints there beside the new ones."""
    out, record = tmp_path / "out", tmp_path / "hub"
    HubStandin(record, monkeypatch, failures=0)
    args = ["--output_dir", out, "--preset", "vit-nano-p4-32", "--per_device_train_batch_size", "4",
            "--sample_data_repeats", "1", "--warmup_steps", "1", "--logging_steps", "1", "--report_to", "none",
            "--dataloader_num_workers", "0", "--learning_rate", "1e-3", "--checkpointing_steps", "2",
            "--push_to_hub", "--hub_model_id", "tester/ckpt", "--hub_push_checkpoints"]
    assert pretrain([*args, "--max_train_steps", "4"]) == 0
    repo = record / "tester" / "ckpt"

    def pushed_step():
        return json.loads((repo / "last-checkpoint" / "checkpoint_complete.json").read_text())["step"]

    assert pushed_step() == 4 and not (repo / "checkpoints").exists()
    assert pretrain([*args, "--max_train_steps", "3", "--overwrite_output_dir"]) == 0
    assert pushed_step() == 3 and not (repo / "checkpoints").exists()


def test_finetune_whose_push_failed_returns_1_and_writes_valid_json(tmp_path, monkeypatch):
    import huggingface_hub

    from simmim_hf import run_finetune

    uploads = []

    def create_repo(self, repo_id, **kwargs):
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, **kwargs):
        uploads.append(kwargs["folder_path"])
        raise http_error(403)

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    evaluate_classifier = run_finetune.evaluate_classifier

    def diverged(*args, **kwargs):  # a diverged run: non-finite eval loss
        return {**evaluate_classifier(*args, **kwargs), "loss": float("nan")}

    monkeypatch.setattr(run_finetune, "evaluate_classifier", diverged)
    out = tmp_path / "out"
    from jobs import reset_accelerate

    reset_accelerate()
    rc = run_finetune.main(["--preset", "vit-nano-p4-32", "--output_dir", str(out), "--cpu", "--num_train_epochs", "1",
                            "--warmup_epochs", "0", "--per_device_train_batch_size", "16", "--max_train_samples", "16",
                            "--max_eval_samples", "16", "--seed", "3", "--push_to_hub", "--hub_model_id", "tester/ft"])
    assert rc == 1 and uploads == [str(out / "best")]
    assert (out / "best" / "model.safetensors").is_file() and (out / "best" / "README.md").is_file()
    assert 'from_pretrained("tester/ft"' in (out / "best" / "README.md").read_text()  # the repo pushed to
    text = (out / "all_results.json").read_text()
    assert "NaN" not in text
    final = json.loads(text)
    assert final["best"]["loss"] is None and final["history"][0]["loss"] is None


# --------------------------------------------------------------------------------------- converter: masking
@pytest.mark.parametrize("image_size, patch_size", [(32, 4), (32, 2), (48, 4), (64, 4), (128, 4), (96, 16)])
def test_default_mask_patch_size_leaves_enough_units(image_size, patch_size):
    from simmim_hf.convert import _default_mask_patch_size

    unit = _default_mask_patch_size(image_size, patch_size)
    assert unit % patch_size == 0 and image_size % unit == 0 and image_size // unit >= 4


@pytest.mark.parametrize("image_size, patch_size, expected",
                         [(192, 4, 32), (224, 16, 32), (384, 16, 32), (192, 32, 32), (224, 14, 28)])
def test_default_mask_patch_size_is_the_papers_at_high_resolution(image_size, patch_size, expected):
    from simmim_hf.convert import _default_mask_patch_size

    assert _default_mask_patch_size(image_size, patch_size) == expected


def test_default_mask_patch_size_refuses_too_few_units():
    from simmim_hf.convert import _default_mask_patch_size

    with pytest.raises(ValueError, match=r"2x2 masking units.*--mask_patch_size"):
        _default_mask_patch_size(32, 16)


def test_converted_32px_model_masks_the_configured_ratio(tmp_path):
    from PIL import Image
    from transformers import ViTConfig, ViTForMaskedImageModeling

    from simmim_hf.convert import convert_official_checkpoint, convert_transformers_checkpoint, save_converted
    from simmim_hf.image_processing_simmim import SimMIMImageProcessor

    torch.manual_seed(0)
    hf = ViTForMaskedImageModeling(ViTConfig(image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, intermediate_size=64, encoder_stride=4))
    images = [Image.new("RGB", (40, 36), (10 * i, 100, 200)) for i in range(8)]
    for name, model in (("transformers", convert_transformers_checkpoint(hf)),
                        ("official", convert_official_checkpoint(FIXTURES / "vit_tiny.pth"))):
        save_converted(model, tmp_path / name)
        processor = SimMIMImageProcessor.from_pretrained(tmp_path / name)
        assert processor.mask_patch_size < 32, name
        mask = processor(images, do_train=True, return_tensors="pt", seed=list(range(8)))["bool_masked_pos"]
        assert abs(mask.float().mean().item() - model.config.mask_ratio) < 0.05, (name, mask.float().mean())


# ----------------------------------------------------------------------------------------- converter: errors
def test_wrong_shape_tensor_is_a_value_error_naming_it(tmp_path):
    from simmim_hf.convert import convert_official_checkpoint, load_checkpoint_file

    state_dict = load_checkpoint_file(FIXTURES / "vit_tiny.pth")["model"]
    state_dict["encoder.blocks.1.mlp.fc2.weight"] = torch.zeros(64, 128)  # (64, 256) in the fixture
    path = tmp_path / "bad_shape.safetensors"
    save_file(state_dict, path)
    with pytest.raises(ValueError, match=r"'encoder\.blocks\.1\.mlp\.fc2\.weight'.*expected shape \(64, 256\), "
                                         r"got \(64, 128\)"):
        convert_official_checkpoint(path, mask_patch_size=8)


def test_directory_or_file_passed_as_the_wrong_kind_of_checkpoint(tmp_path):
    from simmim_hf.convert import main

    out = str(tmp_path / "out")
    with pytest.raises(ValueError, match=r"is a directory.*\.pth") as info:
        main(["--source", "official", "--checkpoint", str(tmp_path), "--output", out])
    assert "does not exist" not in str(info.value)
    with pytest.raises(ValueError, match=r"is a file; --source transformers expects a model folder"):
        main(["--source", "transformers", "--checkpoint", str(FIXTURES / "vit_tiny.pth"), "--output", out])
    with pytest.raises(ValueError, match="does not exist"):
        main(["--source", "official", "--checkpoint", str(tmp_path / "missing.pth"), "--output", out])
