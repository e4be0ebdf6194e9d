"""Image files to uint8 arrays: decoding, antialiased resizing and image references.

`decode_image` is the one preprocessing path for dataset images and for images named in an
episode manifest; `read_image_ref` reads a file path or an `archive.zip::member` (`ZIP_SEP`)
inside a zip. Nothing here knows about datasets.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
ZIP_SEP = "::"  # "archive.zip::member/path.png" names an image inside a zip


def as_hw(size: int | tuple[int, int]) -> tuple[int, int]:
    """(H, W) of an image size given as an int (square) or an (H, W) pair."""
    return (int(size), int(size)) if np.isscalar(size) else (int(size[0]), int(size[1]))


def resize_array(image: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize a uint8 [H, W, C] image with antialiasing (PIL bilinear) to `size` = (H, W)."""
    from PIL import Image

    h, w = as_hw(size)
    if image.shape[:2] == (h, w):
        return image
    chans = [np.asarray(Image.fromarray(image[..., i]).resize((w, h), Image.Resampling.BILINEAR))
             for i in range(image.shape[-1])]
    return np.stack(chans, axis=-1)


def decode_image(data: bytes | Path | str, image_size: int | tuple[int, int] | None = None,
                 channels: int = 1) -> np.ndarray:
    """Decode an image file (bytes or path) to uint8 [H, W, channels], resized if asked.

    This is the one preprocessing path for dataset images and for images named in a manifest.
    """
    from PIL import Image

    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    src = io.BytesIO(data) if isinstance(data, bytes) else data
    with Image.open(src) as im:
        im = im.convert("L" if channels == 1 else "RGB")
        if image_size is not None:
            h, w = as_hw(image_size)
            if (im.height, im.width) != (h, w):
                im = im.resize((w, h), Image.Resampling.BILINEAR)
        arr = np.asarray(im, dtype=np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr


def read_image_ref(ref: str, image_size: int | tuple[int, int] | None, channels: int,
                   base: Path | None = None) -> np.ndarray:
    """Decode the image named by `ref`: a file path, or `archive.zip::member` inside a zip."""
    if ZIP_SEP in ref:
        archive, member = ref.split(ZIP_SEP, 1)
        apath = _resolve(archive, base)
        with zipfile.ZipFile(apath) as z:
            return decode_image(z.read(member), image_size, channels)
    return decode_image(_resolve(ref, base), image_size, channels)


def _resolve(p: str, base: Path | None) -> Path:
    path = Path(p).expanduser()
    if not path.is_absolute() and base is not None and not path.exists():
        path = base / path
    if not path.exists():
        raise FileNotFoundError(f"image file {p!r} not found (also looked in {base})")
    return path
