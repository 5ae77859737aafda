"""Checkpoint conversion: official SimMIM fixtures and transformers' ViT/Swin MIM models reproduce their outputs
in simmim_hf; pickled checkpoints are read without running pickled code; bad input fails with clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    SwinConfig,
    SwinForMaskedImageModeling,
    ViTConfig,
    ViTForMaskedImageModeling,
    ViTModel,
)

from simmim_hf import SimMIMForMaskedImageModeling
from simmim_hf.convert import (
    UnsafeCheckpointError,
    convert_official_checkpoint,
    convert_transformers_checkpoint,
    load_checkpoint_file,
    main,
)

FIXTURES = Path(__file__).parent / "fixtures"
REPO_ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-5


# ---------------------------------------------------------------------------------------------- helpers
def tiny_transformers_model(kind: str) -> torch.nn.Module:
    """A random tiny transformers MIM model with every parameter perturbed, so that zero-initialised biases,
    mask token and position embeddings all take part in the comparison."""
    torch.manual_seed(0)
    if kind == "vit":
        config = ViTConfig(image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, encoder_stride=4)
        model = ViTForMaskedImageModeling(config)
    else:
        config = SwinConfig(image_size=32, patch_size=2, embed_dim=16, depths=[2, 2, 2], num_heads=[2, 4, 8],
                            window_size=4, encoder_stride=8, use_absolute_embeddings=True)
        model = SwinForMaskedImageModeling(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model.eval()


def transformers_inputs(model) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    grid = model.config.image_size // model.config.patch_size
    pixel_values = torch.randn(2, 3, model.config.image_size, model.config.image_size, generator=generator)
    bool_masked_pos = torch.rand(2, grid * grid, generator=generator) < 0.6
    return pixel_values, bool_masked_pos


def assert_same_outputs(reference, converted: SimMIMForMaskedImageModeling, pixel_values, bool_masked_pos):
    with torch.no_grad():
        expected = reference(pixel_values, bool_masked_pos=bool_masked_pos)
        actual = converted(pixel_values, bool_masked_pos=bool_masked_pos)
    assert (expected.reconstruction - actual.reconstruction).abs().max().item() <= TOLERANCE
    assert abs(expected.loss.item() - actual.loss.item()) <= TOLERANCE


def assert_reproduces_fixture(model: SimMIMForMaskedImageModeling, name: str) -> None:
    io = load_file(FIXTURES / f"{name}.io.safetensors")
    bool_masked_pos = io["mask"].flatten(1).bool()  # (B, H/p, W/p) 0/1 -> (B, (H/p)*(W/p))
    model.eval()
    with torch.no_grad():
        encoder = model.simmim(io["pixel_values"], bool_masked_pos=bool_masked_pos)
        output = model(io["pixel_values"], bool_masked_pos=bool_masked_pos)
    assert (encoder.feature_map - io["encoder_output"]).abs().max().item() <= TOLERANCE
    assert (output.reconstruction - io["reconstruction"]).abs().max().item() <= TOLERANCE
    assert abs(output.loss.item() - io["loss"].item()) <= TOLERANCE


def cli(*args: str) -> subprocess.Popen:
    """Start `python -m simmim_hf.convert ...` in a fresh process (offline, this checkout importable)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen([sys.executable, "-m", "simmim_hf.convert", *args], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def cli_outputs(tmp_path_factory) -> dict[str, Path]:
    """All command-line conversions of this module, run in parallel (each process pays the import time)."""
    root = tmp_path_factory.mktemp("cli")
    jobs = {}
    for name in ("vit_tiny", "swin_tiny"):
        jobs[name] = cli("--source", "official", "--checkpoint", str(FIXTURES / f"{name}.pth"),
                         "--output", str(root / name), "--mask_patch_size", "8")
    for kind in ("vit", "swin"):
        tiny_transformers_model(kind).save_pretrained(root / f"hf_{kind}")
        jobs[kind] = cli("--source", "transformers", "--checkpoint", str(root / f"hf_{kind}"),
                         "--output", str(root / f"converted_{kind}"))
    for name, job in jobs.items():
        stdout, stderr = job.communicate(timeout=300)
        assert job.returncode == 0, f"conversion {name} failed:\n{stdout}\n{stderr}"
    return {
        "vit_tiny": root / "vit_tiny", "swin_tiny": root / "swin_tiny",
        "vit": root / "converted_vit", "swin": root / "converted_swin",
    }


# ---------------------------------------------------------------------------------------------- official
@pytest.mark.parametrize("name", ["vit_tiny", "swin_tiny"])
def test_official_cli_reproduces_fixture(cli_outputs, name):
    folder = cli_outputs[name]
    config = json.loads((folder / "config.json").read_text())
    assert config["mask_patch_size"] == 8
    assert set(config["auto_map"]) >= {
        "AutoConfig", "AutoModel", "AutoModelForMaskedImageModeling", "AutoModelForImageClassification"
    }
    assert (folder / "model.safetensors").is_file() and (folder / "modeling_simmim.py").is_file()
    assert not list(folder.glob("*.bin")), "weights must be safetensors only"
    assert_reproduces_fixture(SimMIMForMaskedImageModeling.from_pretrained(folder), name)


@pytest.mark.parametrize("name", ["vit_tiny", "swin_tiny"])
def test_official_architecture_is_inferred(name):
    spec = json.loads((FIXTURES / f"{name}.json").read_text())["spec"]
    encoder = spec["enc"]
    config = convert_official_checkpoint(FIXTURES / f"{name}.pth", mask_patch_size=spec["mask_patch"]).config
    assert config.encoder_type == spec["kind"]
    assert (config.image_size, config.patch_size) == (spec["img"], spec["model_patch"])
    assert config.encoder_stride == spec["encoder_stride"]
    if spec["kind"] == "vit":
        assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (
            encoder["embed_dim"], encoder["depth"], encoder["num_heads"])
        assert config.use_shared_relative_position_bias == encoder["use_shared_rel_pos_bias"]
        assert config.use_absolute_position_embeddings == encoder["use_abs_pos_emb"]
        assert config.layer_scale_init_value > 0 and not config.use_key_bias
    else:
        assert (config.embed_dim, config.depths, config.num_heads, config.window_size) == (
            encoder["embed_dim"], encoder["depths"], encoder["num_heads"], encoder["window_size"])
        assert config.use_absolute_position_embeddings == encoder["ape"] and config.use_key_bias


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_official_state_dict_in_other_formats(tmp_path, suffix):
    state_dict = load_checkpoint_file(FIXTURES / "swin_tiny.pth")["model"]
    path = tmp_path / f"swin{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state_dict.items()}, path)
    else:
        torch.save(state_dict, path)
    assert_reproduces_fixture(convert_official_checkpoint(path, mask_patch_size=8), "swin_tiny")


def test_a_checkpoint_with_numpy_scalars_loads(tmp_path):
    """Official training checkpoints may carry `max_accuracy` as a numpy scalar: torch.save (pickle protocol 2)
    stores its bytes through `_codecs.encode`, which the safe loader must accept."""
    import numpy as np

    checkpoint = load_checkpoint_file(FIXTURES / "vit_tiny.pth")
    path = tmp_path / "with_numpy.pth"
    torch.save({**checkpoint, "max_accuracy": np.float64(83.8), "epoch": np.int64(799)}, path)
    loaded = load_checkpoint_file(path)
    assert loaded["max_accuracy"] == 83.8 and loaded["epoch"] == 799
    assert_reproduces_fixture(convert_official_checkpoint(path), "vit_tiny")


def test_yacs_config_read_as_plain_dict_without_yacs():
    checkpoint = load_checkpoint_file(FIXTURES / "vit_tiny.pth")
    assert type(checkpoint["config"]) is dict and type(checkpoint["config"]["DATA"]) is dict
    assert checkpoint["config"]["DATA"]["IMG_SIZE"] == 32
    assert "yacs" not in sys.modules


class _Exploit:
    """Unpickling this would run a shell command that creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("where", ["top_level", "inside_config"])
def test_malicious_pickle_is_refused(tmp_path, where):
    marker = tmp_path / "pwned"
    state_dict = load_checkpoint_file(FIXTURES / "vit_tiny.pth")["model"]
    payload = {"model": state_dict, "exploit": _Exploit(marker)} if where == "top_level" else \
        {"model": state_dict, "config": {"DATA": {"IMG_SIZE": _Exploit(marker)}}}
    path = tmp_path / "evil.pth"
    torch.save(payload, path)

    with pytest.raises(UnsafeCheckpointError, match=r"evil\.pth.*(posix|os|nt)\.system"):
        convert_official_checkpoint(path)
    with pytest.raises(ValueError, match="Refusing to load"):
        main(["--source", "official", "--checkpoint", str(path), "--output", str(tmp_path / "out")])
    assert not marker.exists(), "the pickled command ran"
    assert not (tmp_path / "out").exists()


def test_tampered_index_buffer_is_detected(tmp_path):
    """The stored relative position index must equal the one simmim_hf derives for the inferred architecture."""
    state_dict = load_checkpoint_file(FIXTURES / "vit_tiny.pth")["model"]
    state_dict["encoder.rel_pos_bias.relative_position_index"] = state_dict[
        "encoder.rel_pos_bias.relative_position_index"].flip(0).contiguous()
    path = tmp_path / "tampered.safetensors"
    save_file(state_dict, path)
    with pytest.raises(ValueError, match="relative_position_index.*does not match"):
        convert_official_checkpoint(path, mask_patch_size=8)


# ---------------------------------------------------------------------------------------------- transformers
@pytest.mark.parametrize("kind", ["vit", "swin"])
def test_transformers_function_equivalence(kind):
    reference = tiny_transformers_model(kind)
    converted = convert_transformers_checkpoint(reference)
    assert converted.config.encoder_type == kind
    if kind == "vit":
        assert converted.config.use_absolute_position_embeddings and converted.config.use_key_bias
        assert converted.config.layer_scale_init_value == 0 and converted.config.pooling == "cls"
        assert converted.config.layer_norm_eps == reference.config.layer_norm_eps
    assert_same_outputs(reference, converted, *transformers_inputs(reference))


@pytest.mark.parametrize("kind", ["vit", "swin"])
def test_transformers_cli_from_saved_folder(cli_outputs, kind):
    reference = tiny_transformers_model(kind)
    converted = SimMIMForMaskedImageModeling.from_pretrained(cli_outputs[kind])
    assert_same_outputs(reference, converted, *transformers_inputs(reference))


def test_transformers_function_from_saved_folder(tmp_path):
    reference = tiny_transformers_model("swin")
    reference.save_pretrained(tmp_path)
    assert_same_outputs(reference, convert_transformers_checkpoint(tmp_path), *transformers_inputs(reference))


# ---------------------------------------------------------------------------------------------- errors
def test_unknown_source_is_rejected(tmp_path):
    with pytest.raises(ValueError, match=r"`--source` must be one of \('official', 'transformers'\); got 'timm'"):
        main(["--source", "timm", "--checkpoint", str(FIXTURES / "vit_tiny.pth"), "--output", str(tmp_path)])


def test_missing_file_is_rejected(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(ValueError, match=r"nope\.pth.*does not exist"):
        convert_official_checkpoint(missing)
    with pytest.raises(ValueError, match="not a transformers model folder"):
        convert_transformers_checkpoint(tmp_path)


def test_unrecognised_state_dict_is_rejected(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"backbone.conv1.weight": torch.zeros(4, 3, 3, 3)}, path)
    with pytest.raises(ValueError, match="not a SimMIM pretraining state dict"):
        convert_official_checkpoint(path)

    not_a_state_dict = tmp_path / "list.pth"
    torch.save([1, 2, 3], not_a_state_dict)
    with pytest.raises(ValueError, match="holds no state dict"):
        convert_official_checkpoint(not_a_state_dict)

    extra = load_checkpoint_file(FIXTURES / "vit_tiny.pth")["model"]
    extra["encoder.head.weight"] = torch.zeros(10, 64)
    with_extra = tmp_path / "extra.safetensors"
    save_file(extra, with_extra)
    with pytest.raises(ValueError, match=r"no counterpart in simmim_hf.*encoder\.head\.weight"):
        convert_official_checkpoint(with_extra, mask_patch_size=8)

    with pytest.raises(ValueError, match="must be a ViTForMaskedImageModeling or SwinForMaskedImageModeling"):
        convert_transformers_checkpoint(ViTModel(ViTConfig(image_size=32, patch_size=4, hidden_size=32,
                                                           num_hidden_layers=1, num_attention_heads=2)))


def test_overrides_contradicting_the_weights_are_rejected():
    with pytest.raises(ValueError, match=r"image_size=64 contradicts.*image_size=32"):
        convert_official_checkpoint(FIXTURES / "vit_tiny.pth", image_size=64)
    with pytest.raises(ValueError, match="mask_patch_size"):
        convert_official_checkpoint(FIXTURES / "vit_tiny.pth", mask_patch_size=6)


def test_transformers_configs_that_cannot_convert_exactly():
    vit = ViTForMaskedImageModeling(ViTConfig(image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=1,
                                              num_attention_heads=2, intermediate_size=64, encoder_stride=16))
    with pytest.raises(ValueError, match="encoder_stride=16 but the encoder downsamples by 4"):
        convert_transformers_checkpoint(vit)
    swin = SwinForMaskedImageModeling(SwinConfig(image_size=32, patch_size=2, embed_dim=16, depths=[2, 2, 2],
                                                 num_heads=[2, 4, 8], window_size=4, encoder_stride=8,
                                                 layer_norm_eps=1e-6))
    with pytest.raises(ValueError, match="layer_norm_eps"):
        convert_transformers_checkpoint(swin)


def test_folders_the_transformers_conversion_must_refuse(tmp_path):
    """A ViT/Swin folder without the SimMIM decoder (it would convert with a random decoder), an output folder
    that is not empty (e.g. the source itself), and a --layer_norm_eps that contradicts the checkpoint."""
    from transformers import ViTForImageClassification

    small = dict(image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                 intermediate_size=64, encoder_stride=4)
    ViTForImageClassification(ViTConfig(**small, num_labels=3)).save_pretrained(tmp_path / "classifier")
    with pytest.raises(ValueError, match="without the SimMIM decoder"):
        convert_transformers_checkpoint(tmp_path / "classifier")
    ViTForMaskedImageModeling(ViTConfig(**small)).save_pretrained(tmp_path / "mim")
    source_files = {p.name: p.read_bytes() for p in (tmp_path / "mim").iterdir()}
    with pytest.raises(ValueError, match="exists and is not empty.*--overwrite"):
        main(["--source", "transformers", "--checkpoint", str(tmp_path / "mim"), "--output", str(tmp_path / "mim")])
    assert {p.name: p.read_bytes() for p in (tmp_path / "mim").iterdir()} == source_files
    with pytest.raises(ValueError, match="--layer_norm_eps` applies to --source official only"):
        main(["--source", "transformers", "--checkpoint", str(tmp_path / "mim"), "--output", str(tmp_path / "out"),
              "--layer_norm_eps", "0.01"])
    main(["--source", "transformers", "--checkpoint", str(tmp_path / "mim"), "--output", str(tmp_path / "out")])
    main(["--source", "transformers", "--checkpoint", str(tmp_path / "mim"), "--output", str(tmp_path / "out"),
          "--overwrite"])
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_a_one_channel_model_converts_without_a_processor(tmp_path):
    small = dict(image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                 intermediate_size=64, encoder_stride=4, num_channels=1)
    ViTForMaskedImageModeling(ViTConfig(**small)).save_pretrained(tmp_path / "grey")
    main(["--source", "transformers", "--checkpoint", str(tmp_path / "grey"), "--output", str(tmp_path / "out")])
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert not (tmp_path / "out" / "preprocessor_config.json").exists()  # SimMIMImageProcessor makes RGB only


def test_the_converted_processor_keeps_the_sources_normalisation(tmp_path):
    """A transformers folder saved with its processor (here mean = std = 0.5): the converted model is fed the same
    normalised pixels, so its config and processor keep those statistics."""
    from transformers import ViTImageProcessorPil

    small = dict(image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                 intermediate_size=64, encoder_stride=4)
    ViTForMaskedImageModeling(ViTConfig(**small)).save_pretrained(tmp_path / "src")
    ViTImageProcessorPil(image_mean=[0.5] * 3, image_std=[0.5] * 3, size=32).save_pretrained(tmp_path / "src")
    main(["--source", "transformers", "--checkpoint", str(tmp_path / "src"), "--output", str(tmp_path / "out")])
    saved = json.loads((tmp_path / "out" / "preprocessor_config.json").read_text())
    assert saved["image_mean"] == saved["image_std"] == [0.5, 0.5, 0.5]


def test_damaged_official_files_get_a_clear_error(tmp_path):
    """A partial download, a corrupt safetensors header, a state dict missing an architecture key and a config
    with the wrong shape: each a ValueError naming the problem, not a raw OSError / SafetensorError / KeyError."""
    from safetensors.torch import save_file

    from simmim_hf.convert import convert_official_checkpoint, load_checkpoint_file

    data = (FIXTURES / "vit_tiny.pth").read_bytes()
    (tmp_path / "partial.pth").write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match="truncated or not one"):
        convert_official_checkpoint(tmp_path / "partial.pth")
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x00\x01garbage")
    with pytest.raises(ValueError, match="as a safetensors file"):
        convert_official_checkpoint(tmp_path / "corrupt.safetensors")
    checkpoint = load_checkpoint_file(FIXTURES / "vit_tiny.pth")
    state_dict = {k: v.contiguous() for k, v in (checkpoint.get("model", checkpoint)).items()
                  if k != "encoder.blocks.0.mlp.fc1.weight"}
    save_file(state_dict, tmp_path / "incomplete.safetensors")
    with pytest.raises(ValueError, match="lacks 'encoder.blocks.0.mlp.fc1.weight'"):
        convert_official_checkpoint(tmp_path / "incomplete.safetensors")
    from simmim_hf.convert import _official_config_hints

    assert _official_config_hints({"DATA": [1, 2], "MODEL": {"TYPE": "vit"}}) == {"encoder_type": "vit"}
