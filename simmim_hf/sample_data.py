"""The embedded default dataset: a small set of real photographs that ships with installed packages.

The pretraining script falls back to it when no `--dataset_name` / `--train_dir` is given, so the main job
runs on a fresh machine with no network. The images are read straight from the package folders of
scikit-image (`skimage/data`, ~18 photos and scans shipped inside the wheel, no download) and
scikit-learn (`sklearn/datasets/images`, two photos); neither package is imported, only its data files
are opened, so this costs no import time. Install them with `pip install simmim_hf[examples]`.

Only files that ship inside the wheels are listed here: scikit-image fetches its other datasets from the
network on first use, which this module must never do.

The images keep their own terms: their sources and licences are listed in `skimage/data/README.txt` and
`sklearn/datasets/images/README.txt` inside those packages (scikit-learn's two photos are CC BY 2.0, by Flickr
users danielbuechele and vultilion); the pretraining card of a run on them says so.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterable

# (package, path inside the package, what it shows). Synthetic drawings (chessboard, logo, phantom, ...)
# and near-duplicates (motorcycle_right) are left out: MIM should see natural image statistics.
SAMPLE_IMAGES: tuple[tuple[str, str, str], ...] = (
    ("skimage", "data/astronaut.png", "portrait of astronaut Eileen Collins"),
    ("skimage", "data/brick.png", "brick wall texture"),
    ("skimage", "data/camera.png", "cameraman"),
    ("skimage", "data/cell.png", "microscopy of a cell"),
    ("skimage", "data/chelsea.png", "cat (Chelsea)"),
    ("skimage", "data/clock_motion.png", "wall clock with motion blur"),
    ("skimage", "data/coffee.png", "cup of coffee"),
    ("skimage", "data/coins.png", "Greek coins"),
    ("skimage", "data/grass.png", "grass texture"),
    ("skimage", "data/gravel.png", "gravel texture"),
    ("skimage", "data/hubble_deep_field.jpg", "Hubble eXtreme Deep Field"),
    ("skimage", "data/ihc.png", "immunohistochemistry stain"),
    ("skimage", "data/moon.png", "surface of the moon"),
    ("skimage", "data/motorcycle_left.png", "motorcycle (stereo left view)"),
    ("skimage", "data/page.png", "scanned page of text"),
    ("skimage", "data/retina.jpg", "human retina"),
    ("skimage", "data/rocket.jpg", "rocket launch"),
    ("skimage", "data/text.png", "photographed text"),
    ("sklearn", "datasets/images/china.jpg", "Chinese temple"),
    ("sklearn", "datasets/images/flower.jpg", "flower"),
)

INSTALL_HINT = "pip install scikit-image scikit-learn  (or: pip install simmim_hf[examples])"


def _package_dir(package: str) -> str | None:
    # find_spec locates the package without importing it (importing skimage/sklearn takes seconds).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def sample_image_files() -> list[str]:
    """Paths of the embedded images that are present on this machine (possibly fewer than
    `SAMPLE_IMAGES` if only one of the two packages is installed)."""
    files = []
    for package, rel_path, _ in SAMPLE_IMAGES:
        root = _package_dir(package)
        if root is not None:
            path = os.path.join(root, *rel_path.split("/"))
            if os.path.isfile(path):
                files.append(path)
    if not files:
        raise RuntimeError(
            "No embedded sample images found: neither scikit-image nor scikit-learn is installed. "
            f"Install them ({INSTALL_HINT}) or pass --train_dir / --dataset_name."
        )
    return files


def load_sample_images(shortest_edge: int | None = 160) -> list:
    """The embedded images as RGB `PIL.Image`s, downscaled so that the shorter side is at most
    `shortest_edge` (None keeps the original size; the originals are 300 to 1411 px and decoding
    them at every step would make a tiny CPU run data-bound)."""
    from PIL import Image

    images = []
    for path in sample_image_files():
        with Image.open(path) as im:
            im = im.convert("RGB")  # grayscale scans become 3-channel, as every SimMIM model expects
            if shortest_edge is not None and min(im.size) > shortest_edge:
                scale = shortest_edge / min(im.size)
                size = (max(1, round(im.size[0] * scale)), max(1, round(im.size[1] * scale)))
                im = im.resize(size, Image.Resampling.BICUBIC)
            images.append(im.copy())
    return images


def load_sample_dataset(repeats: int = 1, shortest_edge: int | None = 160, image_column: str = "image"):
    """A `datasets.Dataset` with one `Image` column holding the embedded images, each repeated `repeats`
    times (consecutive copies get different sample indices, hence different crops and masks, so an epoch
    of a few dozen images has some variety without a dataloader restart every two steps)."""
    import datasets

    if repeats < 1:
        raise ValueError(f"`repeats` must be >= 1; got repeats={repeats}.")
    images = load_sample_images(shortest_edge)
    names = [os.path.basename(p) for p in sample_image_files()]
    ds = datasets.Dataset.from_dict(
        {image_column: images, "file_name": names},
        features=datasets.Features({image_column: datasets.Image(), "file_name": datasets.Value("string")}),
    )
    if repeats > 1:
        ds = datasets.concatenate_datasets([ds] * repeats)
    return ds


def describe(files: Iterable[str] | None = None) -> str:
    """One line for logs and model cards."""
    files = list(files) if files is not None else sample_image_files()
    return (
        f"embedded sample images ({len(files)} real photos and scans shipped inside the scikit-image "
        "and scikit-learn wheels)"
    )


DIGITS_DESCRIPTION = ("scikit-learn's handwritten digits (1,797 8x8 grayscale images, 10 classes, shipped in the "
                      "scikit-learn wheel), upsampled bicubically to RGB at the model size")


def load_digits_dataset(image_size: int):
    """The embedded labelled default of fine-tuning: scikit-learn's digits as RGB PIL images at `image_size`,
    with a `ClassLabel` column `label`."""
    import datasets
    import numpy as np
    from PIL import Image

    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise RuntimeError(f"The embedded digits need scikit-learn: {INSTALL_HINT}; or pass --dataset_name / "
                           "--train_dir.") from err
    digits = load_digits()
    # 17 grey levels (0..16) -> 0..255; bicubic upsampling gives smooth strokes instead of 8x8 blocks.
    pixels = np.clip(np.round(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    images = [Image.fromarray(a, mode="L").resize((image_size, image_size), Image.Resampling.BICUBIC).convert("RGB")
              for a in pixels]
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=[str(i) for i in range(10)])})
    return datasets.Dataset.from_dict({"image": images, "label": digits.target.tolist()}, features=features)


__all__ = ["DIGITS_DESCRIPTION", "SAMPLE_IMAGES", "describe", "load_digits_dataset", "load_sample_dataset",
           "load_sample_images", "sample_image_files"]
