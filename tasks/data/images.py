"""Image files to uint8 arrays: decoding, antialiased resizing and image references.

`decode_image` is the one preprocessing path for dataset images and for images named in an
episode manifest; `read_image_ref` reads a file path or an `archive.zip::member` (`ZIP_SEP`)
inside a zip. Files that are not readable images raise `ImageDecodeError` (a ValueError) naming
the file. Nothing here knows about datasets.
"""

from __future__ import annotations

import io
import zipfile
import zlib
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
ZIP_SEP = "::"  # "archive.zip::member/path.png" names an image inside a zip
ZIP_READ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError)  # a corrupt member of a zip


class ImageDecodeError(ValueError):
    """A file that is not a readable image (corrupt, truncated, or another kind of file)."""


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
                 channels: int = 1, name: str | None = None) -> np.ndarray:
    """Decode an image file (bytes or path) to uint8 [H, W, channels], resized if asked.

    This is the one preprocessing path for dataset images and for images named in a manifest.
    A file that is not a readable image raises `ImageDecodeError` naming `name` (or the path).
    """
    from PIL import Image, UnidentifiedImageError

    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    src = io.BytesIO(data) if isinstance(data, bytes) else data
    try:
        with Image.open(src) as im:
            im = im.convert("L" if channels == 1 else "RGB")
            if image_size is not None:
                h, w = as_hw(image_size)
                if (im.height, im.width) != (h, w):
                    im = im.resize((w, h), Image.Resampling.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - PIL raises many kinds for corrupt files
        what = name or (src if isinstance(src, (str, Path)) else "image bytes")
        why = "not in an image format PIL reads" if isinstance(e, UnidentifiedImageError) else \
            f"{type(e).__name__}: {e}"
        raise ImageDecodeError(f"{what} is not a readable image ({why})") from e
    return arr[..., None] if arr.ndim == 2 else arr


def read_image_ref(ref: str, image_size: int | tuple[int, int] | None, channels: int,
                   base: Path | None = None) -> np.ndarray:
    """Decode the image named by `ref`: a file path, or `archive.zip::member` inside a zip."""
    if ZIP_SEP in ref:
        archive, member = ref.split(ZIP_SEP, 1)
        apath = _resolve(archive, base)
        if not zipfile.is_zipfile(apath):
            raise ValueError(f"{apath} (in {ref!r}) is not a zip file; `archive.zip::member` "
                             "names a file inside a zip")
        with zipfile.ZipFile(apath) as z:
            try:
                data = z.read(member)
            except KeyError:
                raise FileNotFoundError(f"image {member!r} not found in the zip {apath}") from None
            except ZIP_READ_ERRORS as e:
                raise ImageDecodeError(f"{apath}{ZIP_SEP}{member} cannot be read from the zip "
                                       f"({type(e).__name__}: {e})") from e
        return decode_image(data, image_size, channels, f"{apath}{ZIP_SEP}{member}")
    return decode_image(_resolve(ref, base), image_size, channels)


def _resolve(p: str, base: Path | None) -> Path:
    path = Path(p).expanduser()
    if not path.is_absolute() and base is not None and not path.exists():
        path = base / path
    if not path.exists():
        also = f" (also looked in {base})" if base is not None else ""
        raise FileNotFoundError(f"image file {p!r} not found{also}")
    return path
