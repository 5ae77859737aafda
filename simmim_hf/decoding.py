"""Decoding image files for the input pipeline: `decode_image` (JPEGs through libjpeg-turbo straight into numpy,
upright by their EXIF/XMP orientation, reduced in the DCT where the transform's crops allow; PIL for everything
else) and `smallest_decode_size` (how far a decode may be reduced without making the processor upsample)."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np

from .image_processing_simmim import SimMIMImageProcessor, eval_resize_shape


def decode_image(value, smallest_size=None):
    """Decode one image cell: a `datasets.Image(decode=False)` value ({'bytes', 'path'}), a path or a PIL image.
    Returns None when the file cannot be read (truncated, corrupt, missing); otherwise, upright (the EXIF
    orientation applied, as `datasets` does when it decodes):

    * a JPEG in RGB, YCbCr or grey: a uint8 `(H, W, 3)` RGB array, decoded by libjpeg-turbo through `simplejpeg`
      straight into numpy (the same pixels as PIL's decode, without PIL's image object and the copy out of it:
      the processor crops a view of it);
    * anything else (PNG, WebP, CMYK JPEG, ..., or any JPEG without `simplejpeg`): the PIL image in its own mode
      (the processor converts modes, compositing transparency onto white).

    `smallest_size(width, height) -> (width, height) or None`: the smallest (upright) size the transform can use
    without upsampling; a JPEG is then decoded at the largest reduction (1/2, 1/4, 1/8, done by libjpeg in the
    DCT) that keeps it at least that large, which skips most of the decoding work for photos much larger than
    the model's input.

    Decoding in the collator rather than inside `datasets` lets one corrupt file cost one sample (replaced and
    counted) instead of crashing a dataloader worker hours into a run."""
    from PIL import Image, ImageOps

    if isinstance(value, Image.Image):
        return value
    try:
        data, path = (value.get("bytes"), value.get("path")) if isinstance(value, dict) else (None, value)
        if data is None:
            data = _read_file(path)
        if _simplejpeg is not None and data[:3] == _JPEG_MAGIC:
            orientation = _jpeg_exif_orientation(data)
            pixels = _decode_jpeg(data, smallest_size, transposed=orientation >= 5)
            if pixels is not None:
                return _orient(pixels, orientation)
        image = Image.open(io.BytesIO(data))
        orientation = _orientation(image)
        if smallest_size is not None and image.format == "JPEG":
            target = _stored_target(smallest_size, *image.size, transposed=orientation >= 5)
            if target is not None:
                image.draft(image.mode, target)
        image.load()  # force the full decode now: truncated files fail here, not in the processor
        return ImageOps.exif_transpose(image) if orientation != 1 else image
    except Exception:  # noqa: BLE001 - PIL raises many types (OSError, SyntaxError, ValueError, ...)
        return None


def _read_file(path) -> bytes:
    """A local file's bytes, or (as `datasets.Image` does) a remote or archived one's through `datasets`' `xopen`:
    a streamed image folder's cells are paths such as `zip://img.jpg::<archive>` or `hf://datasets/...`."""
    from datasets.utils.file_utils import is_local_path, xopen

    if is_local_path(str(path)):
        return Path(path).read_bytes()
    with xopen(str(path), "rb") as file:
        return file.read()


try:  # libjpeg-turbo straight into numpy; PIL decodes JPEGs where it is missing
    import simplejpeg as _simplejpeg
except ImportError:  # pragma: no cover - a dependency of the package; kept optional for vendored installs
    _simplejpeg = None

_JPEG_MAGIC = b"\xff\xd8\xff"
_EXIF_ORIENTATION = 0x0112
# EXIF orientation -> the array operation that makes an (H, W, C) image upright (PIL's `exif_transpose`).
_UPRIGHT = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),
}


def _orientation(image) -> int:
    orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    return orientation if orientation in _UPRIGHT else 1


def _jpeg_exif_orientation(data: bytes) -> int:
    """Orientation of a JPEG (1: as stored), from its EXIF or XMP block as PIL's `getexif` reads it. Most files
    carry neither, and a byte search of the header says so without parsing; PIL parses the others."""
    header = data[:_jpeg_header_end(data)]  # both blocks precede the start-of-scan marker
    if b"Exif\x00\x00" not in header and b"http://ns.adobe.com/xap/1.0/" not in header:
        return 1
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            return _orientation(image)
    except Exception:  # noqa: BLE001 - a damaged EXIF block does not make the pixels unreadable
        return 1


def _jpeg_header_end(data: bytes) -> int:
    """Offset of a JPEG's start-of-scan marker, found by walking the marker segments by their lengths: a segment's
    payload (an ICC profile, a thumbnail) is not byte-stuffed and may itself hold the bytes FF DA."""
    position = 2
    while position + 4 <= len(data) and data[position] == 0xFF and data[position + 1] != 0xDA:
        if data[position + 1] == 0xFF:  # fill byte before a marker
            position += 1
        else:
            position += 2 + int.from_bytes(data[position + 2:position + 4], "big")
    return position


def _orient(pixels: np.ndarray, orientation: int) -> np.ndarray:
    return np.ascontiguousarray(_UPRIGHT[orientation](pixels)) if orientation != 1 else pixels


def _stored_target(smallest_size, width: int, height: int, transposed: bool):
    """`smallest_size` of the upright image, in the stored orientation (width and height swap for 90-degree
    orientations)."""
    if not transposed:
        return smallest_size(width, height)
    target = smallest_size(height, width)
    return None if target is None else (target[1], target[0])


def _decode_jpeg(data: bytes, smallest_size=None, transposed: bool = False):
    """RGB uint8 `(H, W, 3)` of a JPEG as stored, reduced by 2, 4 or 8 in the DCT where `smallest_size` allows
    (PIL's `draft` rule: the largest power of two that keeps both sides at least the target); None where
    simplejpeg cannot produce RGB (CMYK/YCCK, or a file it rejects): the caller falls back to PIL, which also
    tells the corrupt files from the merely unusual ones."""
    try:
        height, width, colorspace, _ = _simplejpeg.decode_jpeg_header(data)
        if colorspace not in ("YCbCr", "Gray", "RGB"):
            return None
        options = {}
        target = _stored_target(smallest_size, width, height, transposed) if smallest_size is not None else None
        if target is not None:
            scale = min(width // max(target[0], 1), height // max(target[1], 1))
            factor = next(f for f in (8, 4, 2, 1) if scale >= f)
            if factor > 1:  # the exact 1/factor size (ceil), which simplejpeg picks as the smallest size >= it
                options = dict(min_width=-(-width // factor), min_height=-(-height // factor))
        return _simplejpeg.decode_jpeg(data, colorspace="RGB", **options)
    except Exception:  # noqa: BLE001 - ValueError for corrupt data; PIL gets the final say
        return None


def smallest_decode_size(processor: SimMIMImageProcessor, do_train: bool):
    """For `decode_image`: the smallest image size at which every crop `processor` can take (training:
    RandomResizedCrop over `crop_scale` x `crop_ratio`; evaluation: the resize before the center crop) still
    covers the output size, so a reduced decode never makes the processor upsample."""
    out_h, out_w = processor.size["height"], processor.size["width"]

    def train(width: int, height: int):
        area = processor.crop_scale[0] * width * height
        # The narrowest and the flattest crop the sampler can draw (a crop never exceeds the image).
        crop_w = min(width, math.sqrt(area * processor.crop_ratio[0]))
        crop_h = min(height, math.sqrt(area / processor.crop_ratio[1]))
        shrink = min(crop_w / out_w, crop_h / out_h)
        return (math.ceil(width / shrink), math.ceil(height / shrink)) if shrink >= 2 else None

    def evaluate(width: int, height: int):
        resized_h, resized_w = eval_resize_shape(height, width, (out_h, out_w), processor.crop_pct)
        return (resized_w, resized_h) if min(width / resized_w, height / resized_h) >= 2 else None

    return train if do_train else evaluate
