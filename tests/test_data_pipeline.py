"""The fast input path: uint8 batches normalised on the device (bit-identical to the CPU normalisation) and
reduced-size JPEG decoding that never makes the processor upsample."""

from __future__ import annotations

import collections
import io
import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from simmim_hf import SimMIMConfig, SimMIMImageProcessor
from simmim_hf.data import SimMIMCollator
from simmim_hf.decoding import decode_image, smallest_decode_size


def _photo(width: int, height: int, seed: int = 0) -> Image.Image:
    # Smooth structure plus noise: a JPEG of it is photo-like (neither flat nor pure noise).
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([(x * 255 / width), (y * 255 / height), ((x + y) % 64) * 4], axis=-1)
    return Image.fromarray(np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8))


def _jpeg(image: Image.Image, quality: int = 90) -> dict:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return {"bytes": buffer.getvalue(), "path": None}


@pytest.fixture(scope="module")
def processor():
    return SimMIMImageProcessor.from_config(SimMIMConfig.from_preset("vit-micro-p8-64"))


@pytest.mark.parametrize("do_train", [True, False])
def test_uint8_batches_normalised_on_the_device_equal_the_cpu_path(processor, do_train):
    images = [_photo(90, 70, seed) for seed in range(3)]
    floats = processor(images, do_train=do_train, return_tensors="pt", seed=[1, 2, 3])
    raw = processor(images, do_train=do_train, return_tensors="pt", seed=[1, 2, 3], return_uint8=True)
    assert raw["pixel_values"].dtype == torch.uint8 and raw["pixel_values"].shape == floats["pixel_values"].shape
    assert torch.equal(processor.normalize_uint8(raw["pixel_values"]), floats["pixel_values"])
    # Its constants are made once per device: no host-to-device copy (a sync on a GPU) at every training step.
    from simmim_hf.image_processing_simmim import _uint8_normalization

    hits = _uint8_normalization.cache_info().hits
    assert torch.equal(processor.normalize_uint8(raw["pixel_values"]), floats["pixel_values"])
    assert _uint8_normalization.cache_info().hits == hits + 1
    if do_train:
        assert torch.equal(raw["bool_masked_pos"], floats["bool_masked_pos"])
    other = SimMIMImageProcessor.from_config(SimMIMConfig.from_preset("vit-micro-p8-64"), image_mean=0.5,
                                             image_std=0.25, do_rescale=True)
    assert torch.equal(other.normalize_uint8(raw["pixel_values"]),
                       other(images, do_train=do_train, return_tensors="pt", seed=[1, 2, 3])["pixel_values"])


def test_uint8_output_rounds_deeper_images_to_8_bits_and_is_never_saved(processor, tmp_path):
    # A 16-bit image (medical, scientific folders) is resized at its depth, then rounded: the training batch is
    # its float batch to half a grey level, not a crash of the run.
    deep = np.random.default_rng(0).integers(0, 65535, (40, 40, 3), dtype=np.uint16)
    raw = processor([deep], return_tensors="pt", return_uint8=True, seed=[4])["pixel_values"]
    floats = processor([deep], return_tensors="pt", seed=[4])["pixel_values"]
    half_level = 0.5 / 255 / min(processor.image_std)
    assert raw.dtype == torch.uint8 and (processor.normalize_uint8(raw) - floats).abs().max() <= half_level + 1e-6
    with pytest.raises(ValueError, match="uint8"):
        processor.normalize_uint8(torch.zeros(1, 3, 64, 64))
    processor.save_pretrained(tmp_path)
    loaded = SimMIMImageProcessor.from_pretrained(tmp_path)
    assert "return_uint8" not in loaded.to_dict() and loaded([_photo(70, 70)], return_tensors="pt")[
        "pixel_values"].dtype == torch.float32


@pytest.mark.parametrize("do_train", [True, False])
def test_reduced_decoding_never_leaves_a_crop_smaller_than_the_output(processor, do_train):
    smallest = smallest_decode_size(processor, do_train)
    out = processor.size["height"]
    rng = np.random.default_rng(0)
    for _ in range(200):
        width, height = int(rng.integers(64, 2000)), int(rng.integers(64, 2000))
        target = smallest(width, height)
        if target is None:
            continue
        assert target[0] <= width / 2 and target[1] <= height / 2  # only worth it from a 2x reduction
        if do_train:  # the smallest RandomResizedCrop on the target-sized image still covers the output
            area = processor.crop_scale[0] * target[0] * target[1]
            assert math.sqrt(area * processor.crop_ratio[0]) >= out - 1e-6 or target[0] <= out
            assert math.sqrt(area / processor.crop_ratio[1]) >= out - 1e-6 or target[1] <= out
        else:  # the evaluation resize only shrinks
            assert min(target) >= int(out / processor.crop_pct)


def _size(decoded) -> tuple[int, int]:
    """(width, height) of what `decode_image` returns: a PIL image or an (H, W, 3) array."""
    return decoded.size if isinstance(decoded, Image.Image) else (decoded.shape[1], decoded.shape[0])


def _pil_decode(cell: dict, draft=None) -> np.ndarray:
    image = Image.open(io.BytesIO(cell["bytes"]))
    if draft is not None:
        image.draft(image.mode, draft)
    return np.asarray(image.convert("RGB"))


def test_a_large_jpeg_is_decoded_reduced_and_processes_like_the_full_decode(processor):
    cell = _jpeg(_photo(1024, 768))
    full = decode_image(cell)
    reduced = decode_image(cell, smallest_decode_size(processor, do_train=False))
    assert _size(full) == (1024, 768) and _size(reduced) in {(512, 384), (256, 192), (128, 96)}
    a = processor([full], do_train=False, return_tensors="pt")["pixel_values"]
    b = processor([reduced], do_train=False, return_tensors="pt")["pixel_values"]
    assert (a - b).abs().mean() < 0.05  # normalised units: the two downsamplings agree closely
    small = _jpeg(_photo(100, 80))  # too small to reduce: the full decode
    assert _size(decode_image(small, smallest_decode_size(processor, do_train=True))) == (100, 80)
    png = io.BytesIO()
    _photo(1024, 768).save(png, "PNG")
    assert decode_image({"bytes": png.getvalue(), "path": None}, smallest_decode_size(processor, True)).size == (1024, 768)


def test_jpegs_decode_to_the_same_pixels_as_pil_full_and_reduced(processor, tmp_path):
    """The libjpeg-turbo fast path returns RGB arrays equal to PIL's decode (and PIL's `draft` reduction);
    a grey JPEG comes back as RGB; a path reads like bytes."""
    cell = _jpeg(_photo(700, 500, seed=1))
    full = decode_image(cell)
    assert isinstance(full, np.ndarray) and full.dtype == np.uint8 and full.shape == (500, 700, 3)
    np.testing.assert_array_equal(full, _pil_decode(cell))
    smallest = smallest_decode_size(processor, do_train=True)
    reduced = decode_image(cell, smallest)
    assert reduced.shape[0] < 500  # reduced in the DCT, exactly as PIL's draft mode reduces it
    np.testing.assert_array_equal(reduced, _pil_decode(cell, smallest(700, 500)))
    grey = _jpeg(_photo(90, 60).convert("L"))
    np.testing.assert_array_equal(decode_image(grey), _pil_decode(grey))
    (tmp_path / "a.jpg").write_bytes(cell["bytes"])
    np.testing.assert_array_equal(decode_image(str(tmp_path / "a.jpg")), full)
    np.testing.assert_array_equal(decode_image({"bytes": None, "path": str(tmp_path / "a.jpg")}), full)
    assert decode_image(str(tmp_path / "missing.jpg")) is None


def test_jpegs_the_fast_path_cannot_take_fall_back_to_pil(processor, monkeypatch):
    cmyk = io.BytesIO()
    _photo(80, 60).convert("CMYK").save(cmyk, "JPEG", quality=90)
    decoded = decode_image({"bytes": cmyk.getvalue(), "path": None})
    assert isinstance(decoded, Image.Image) and decoded.mode == "CMYK"  # the processor converts it to RGB
    assert processor([decoded], return_tensors="pt")["pixel_values"].shape == (1, 3, 64, 64)
    cell = _jpeg(_photo(120, 90))
    truncated = {"bytes": cell["bytes"][: len(cell["bytes"]) // 2], "path": None}
    assert decode_image(truncated) is None  # neither decoder accepts it: the collator replaces and counts it
    import simmim_hf.decoding as decoding

    monkeypatch.setattr(decoding, "_simplejpeg", None)  # without simplejpeg: PIL, same pixels
    pil = decode_image(cell)
    assert isinstance(pil, Image.Image)
    np.testing.assert_array_equal(np.asarray(pil), _pil_decode(cell))


def test_collator_uses_reduced_decoding_and_stays_per_sample_deterministic(processor):
    rows = [{"image": _jpeg(_photo(1200, 900, seed)), "index": seed, "epoch": 0} for seed in range(4)]
    fast = SimMIMCollator(processor, seed=5, do_train=True, return_mask=True, return_uint8=True)
    slow = SimMIMCollator(processor, seed=5, do_train=True, return_mask=True, return_uint8=True, reduced_decoding=False)
    a, b = fast(rows), fast(rows[::-1])
    assert torch.equal(a["pixel_values"], b["pixel_values"].flip(0)) and a["pixel_values"].dtype == torch.uint8
    c = slow(rows)
    assert torch.equal(a["bool_masked_pos"], c["bool_masked_pos"])  # masks do not depend on the decode
    assert 0 < (a["pixel_values"].float() - c["pixel_values"].float()).abs().mean() < 12  # crops of the same area


def test_processor_from_config_takes_the_configs_normalisation():
    config = SimMIMConfig.from_preset("vit-nano-p4-32", image_mean=[0.5, 0.5, 0.5], image_std=[0.25, 0.25, 0.25])
    processor = SimMIMImageProcessor.from_config(config)
    assert list(processor.image_mean) == [0.5] * 3 and list(processor.image_std) == [0.25] * 3
    default = SimMIMImageProcessor.from_config(SimMIMConfig.from_preset("vit-nano-p4-32"))
    assert list(default.image_mean) == pytest.approx([0.485, 0.456, 0.406])


@pytest.mark.parametrize("fast", [True, False])
def test_decoded_images_are_upright_as_datasets_decodes_them(processor, monkeypatch, fast):
    """EXIF orientation (phone photos) is applied, exactly as `datasets.Image` applies it when it decodes, in the
    fast path and in PIL's; a reduced decode of a rotated photo is sized for the upright image."""
    import datasets

    import simmim_hf.decoding as decoding

    if not fast:
        monkeypatch.setattr(decoding, "_simplejpeg", None)
    stored = _photo(90, 60, seed=2)
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        buffer = io.BytesIO()
        stored.save(buffer, "JPEG", quality=95, exif=exif.tobytes())
        cell = {"bytes": buffer.getvalue(), "path": None}
        expected = np.asarray(datasets.Image().decode_example(dict(cell)).convert("RGB"))
        decoded = decode_image(cell)
        assert isinstance(decoded, np.ndarray) == fast
        np.testing.assert_array_equal(np.asarray(decoded.convert("RGB")) if not fast else decoded, expected)
    xmp = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
           b'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>')
    buffer = io.BytesIO()
    stored.save(buffer, "JPEG", quality=95, xmp=xmp)  # the orientation in XMP only, which PIL's getexif also reads
    cell = {"bytes": buffer.getvalue(), "path": None}
    expected = np.asarray(datasets.Image().decode_example(dict(cell)).convert("RGB"))
    assert expected.shape == (90, 60, 3)
    decoded = decode_image(cell)
    np.testing.assert_array_equal(np.asarray(decoded.convert("RGB")) if not fast else decoded, expected)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown portrait
    buffer = io.BytesIO()
    _photo(1600, 600).save(buffer, "JPEG", quality=90, exif=exif.tobytes())
    smallest = smallest_decode_size(processor, do_train=True)
    decoded = decode_image({"bytes": buffer.getvalue(), "path": None}, smallest)
    width, height = _size(decoded)
    target = smallest(600, 1600)
    assert (width, height) != (600, 1600) and height > width and width >= target[0] and height >= target[1]


def test_the_orientation_is_found_behind_a_segment_holding_the_start_of_scan_bytes():
    """A segment's payload is not byte-stuffed: an ICC profile before the EXIF block may hold FF DA. Cutting the
    header at the first FF DA missed the orientation and left the image sideways."""
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    _photo(60, 40).save(buffer, "JPEG", exif=exif.tobytes())
    jpeg = buffer.getvalue()
    payload = b"ICC_PROFILE\x00\x01\x01" + bytes(100) + b"\xff\xda" + bytes(100)
    data = jpeg[:2] + b"\xff\xe2" + (len(payload) + 2).to_bytes(2, "big") + payload + jpeg[2:]
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    assert expected.shape == (60, 40, 3)
    np.testing.assert_array_equal(decode_image({"bytes": data, "path": None}), expected)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")  # PIL's, as when datasets decodes the same file
def test_a_damaged_exif_block_does_not_make_a_jpeg_unreadable():
    cell = _jpeg(_photo(60, 40))
    payload = b"Exif\x00\x00MM\x00\x2a\xff\xff\xff\xff garbage"
    segment = b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload
    damaged = {"bytes": cell["bytes"][:2] + segment + cell["bytes"][2:], "path": None}
    decoded = decode_image(damaged)
    assert decoded is not None
    np.testing.assert_array_equal(np.asarray(decoded), np.asarray(decode_image(cell)))


def test_finetuning_never_selects_on_a_test_split_unless_asked(tmp_path):
    """A dataset with train and test splits only: the evaluation set (which picks best/) is held out of train; the
    test split is used only with --validation_split test."""
    from simmim_hf.arguments import FinetuningArguments, parse_args
    from simmim_hf.data import load_classification_data

    for split, count in (("train", 10), ("test", 4)):
        for label in ("a", "b"):
            folder = tmp_path / "data" / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                _photo(20, 20, seed=i).save(folder / f"{i}.png")
    base = ["--dataset_name", str(tmp_path / "data"), "--output_dir", str(tmp_path / "out"),
            "--preset", "vit-nano-p4-32", "--validation_split_percentage", "20"]
    train, evaluation, _, _ = load_classification_data(parse_args(FinetuningArguments, base), 32)[:4]
    assert (len(train), len(evaluation)) == (16, 4)  # 20 % of the 20 training images, stratified
    train, evaluation, _, _ = load_classification_data(
        parse_args(FinetuningArguments, [*base, "--validation_split", "test"]), 32)[:4]
    assert (len(train), len(evaluation)) == (20, 8)


def test_finetuning_labels_that_are_names_or_plain_integers_become_one_class_list(tmp_path):
    """String labels (class names), a label column chosen beside an existing `label` column, and a class that only
    the evaluation split has: one class list for both splits, and the label fraction stays stratified."""
    import datasets

    from simmim_hf.arguments import FinetuningArguments, parse_args
    from simmim_hf.data import load_classification_data

    def split(species):
        images = [_photo(20, 20, seed=i) for i in range(len(species))]
        return datasets.Dataset.from_dict({"img": images, "species": species, "label": list(range(len(species))),
                                           "size": [i * 10 for i in range(len(species))]}).cast_column(
            "img", datasets.Image())

    (tmp_path / "data").mkdir()
    split(["fish", "cat", "dog", "owl"] * 4).to_parquet(str(tmp_path / "data" / "train.parquet"))
    split(["cat", "bird", "dog"]).to_parquet(str(tmp_path / "data" / "validation.parquet"))
    args = parse_args(FinetuningArguments, ["--dataset_name", str(tmp_path / "data"), "--output_dir",
                                            str(tmp_path / "out"), "--preset", "vit-nano-p4-32", "--label_column_name",
                                            "species", "--train_label_fraction", "0.5"])
    train, evaluation, names, _ = load_classification_data(args, 32)
    assert names == ["bird", "cat", "dog", "fish", "owl"] and train.column_names == ["image", "label"]
    assert [names[i] for i in evaluation["label"]] == ["cat", "bird", "dog"]
    assert sorted(collections.Counter(train["label"]).values()) == [2, 2, 2, 2]  # stratified: 2 of each 4
    args.label_column_name, args.train_label_fraction = "size", 1.0  # plain integers keep their values as ids
    assert len(load_classification_data(args, 32)[2]) == 151


def test_a_streamed_archive_of_images_decodes(processor, tmp_path):
    """A streamed image folder in an archive (or on the Hub) gives cells with a `zip://...` / `hf://...` path and
    no bytes: they are read as `datasets` reads them, not reported unreadable."""
    import zipfile

    import datasets

    from simmim_hf.data import StreamingImageRows

    with zipfile.ZipFile(tmp_path / "images.zip", "w") as archive:
        for i in range(3):
            archive.writestr(f"{i}.jpg", _jpeg(_photo(70, 60, seed=i))["bytes"])
    stream = datasets.load_dataset("imagefolder", data_files={"train": str(tmp_path / "images.zip")}, split="train",
                                   streaming=True)
    rows = list(StreamingImageRows(stream, repeat=False))
    assert rows[0]["image"]["bytes"] is None and rows[0]["image"]["path"].startswith("zip://")
    batch = SimMIMCollator(processor, seed=0, do_train=True, return_mask=True)(rows)
    assert batch["pixel_values"].shape == (3, 3, 64, 64) and int(batch["unreadable"].sum()) == 0


def test_reduced_decoding_follows_the_collators_own_output_size(processor):
    """A per-call `size` (or crop setting) given to the collator sizes the reduced decode too: an 800 px JPEG
    for a 384 px output is not decoded at 100 px and upsampled."""
    cell = _jpeg(_photo(800, 800))
    collator = SimMIMCollator(processor, seed=0, do_train=False, size={"height": 384, "width": 384})
    target = collator.smallest_size(800, 800)
    assert target is None or min(target) >= int(384 / processor.crop_pct)
    decoded = decode_image(cell, collator.smallest_size)
    assert min(_size(decoded)) >= 384
    assert collator([{"image": cell, "index": 0, "epoch": 0}])["pixel_values"].shape == (1, 3, 384, 384)


def test_pretraining_evaluates_on_a_datasets_own_validation_split_even_with_a_percentage(tmp_path):
    """--validation_split_percentage holds out part of train only where the dataset has no validation split (it
    carved one out of train even when the dataset had its own)."""
    from simmim_hf.arguments import PretrainingArguments, parse_args
    from simmim_hf.data import load_pretraining_data

    for split, count in (("train", 20), ("validation", 5)):
        (tmp_path / "data" / split).mkdir(parents=True)
        for i in range(count):
            _photo(40, 40, seed=i).save(tmp_path / "data" / split / f"{i}.png")
    for percentage in ("0", "10"):
        args = parse_args(PretrainingArguments, ["--output_dir", str(tmp_path / "o"), "--dataset_name",
                                                 str(tmp_path / "data"), "--cache_dir", str(tmp_path / "cache"),
                                                 "--validation_split_percentage", percentage])
        train, evaluation, _, _ = load_pretraining_data(args)
        assert (len(train), len(evaluation)) == (20, 5), percentage
