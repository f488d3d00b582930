"""Upload decoding with limits: byte cap while reading, pixel cap from the header before decoding."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator

import numpy as np
from PIL import Image, UnidentifiedImageError
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request

from service.errors import ApiError

#: Content types accepted for a raw-body upload, and the Pillow formats they may hold.
RAW_TYPES = {
    "image/png": "PNG",
    "image/jpeg": "JPEG",
    "image/jpg": "JPEG",
    "image/bmp": "BMP",
    "image/x-ms-bmp": "BMP",
    "image/tiff": "TIFF",
}
ALLOWED_FORMATS = {"PNG", "JPEG", "BMP", "TIFF"}


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";")[0].strip().lower()


async def read_form(request: Request, *, max_files: int, limit_setting: str) -> FormData:
    """The multipart form of ``request``, with parser refusals as JSON errors.

    Starlette refuses a malformed body, more than ``max_files`` files or more than 16
    fields with a bare 400; here they are 422 ``too_many_images`` (naming the limit and the
    setting behind it) or 400 ``invalid_multipart``, like every other refusal of the service.
    """
    try:
        return await request.form(max_files=max_files, max_fields=16)
    except (HTTPException, MultiPartException) as exc:
        detail = str(getattr(exc, "detail", None) or getattr(exc, "message", exc))
        if "too many files" in detail.lower():
            raise ApiError(
                422,
                "too_many_images",
                f"at most {max_files} image file(s) per request ({limit_setting})",
                max_files=max_files,
            ) from None
        raise ApiError(400, "invalid_multipart", f"the multipart body could not be read: {detail}") from None


async def read_capped(chunks: AsyncIterator[bytes], max_bytes: int) -> bytes:
    """Read a body stream, refusing (413) as soon as it passes ``max_bytes``."""
    buf = bytearray()
    async for chunk in chunks:
        buf.extend(chunk)
        if len(buf) > max_bytes:
            raise too_large_bytes(max_bytes)
    return bytes(buf)


def too_large_bytes(max_bytes: int) -> ApiError:
    """413 ``payload_too_large``: the code of every byte limit (``image_too_large`` is for pixels)."""
    return ApiError(
        413,
        "payload_too_large",
        f"the image is larger than the limit of {max_bytes} bytes (ZSI_MAX_IMAGE_BYTES)",
        max_bytes=max_bytes,
    )


def decode_image(data: bytes, *, max_pixels: int, max_bytes: int, name: str = "image") -> np.ndarray:
    """Decode PNG/JPEG/BMP/TIFF bytes into ``HWC uint8 RGB``.

    Checks, in order: empty, byte size, a known image header, format, pixel count (read
    from the header, BEFORE decoding the pixels), then decodes (truncated files -> 400).
    Grey, palette, alpha and 16-bit images are converted to 8-bit RGB (16-bit: top 8 bits).
    The EXIF/TIFF orientation tag is never applied, for any format: pixels as stored.
    """
    if not data:
        raise ApiError(400, "empty_body", f"{name}: the upload is empty")
    if len(data) > max_bytes:
        raise too_large_bytes(max_bytes)
    try:
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise ApiError(
            413,
            "image_too_large",
            f"{name}: more pixels than the limit of {max_pixels}",
            max_pixels=max_pixels,
        ) from None
    except UnidentifiedImageError:
        raise ApiError(400, "not_an_image", f"{name}: not a PNG, JPEG, BMP or TIFF image") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ApiError(400, "invalid_image", f"{name}: unreadable image header ({exc})") from None
    with im:
        if im.format not in ALLOWED_FORMATS:
            raise ApiError(
                415,
                "unsupported_image_format",
                f"{name}: {im.format} images are not accepted; send PNG, JPEG, BMP or TIFF",
            )
        w, h = im.size
        if w * h > max_pixels:
            raise ApiError(
                413,
                "image_too_large",
                f"{name}: {w}x{h} = {w * h} pixels is more than the limit of {max_pixels}",
                width=w,
                height=h,
                max_pixels=max_pixels,
            )
        if w < 2 or h < 2:
            raise ApiError(400, "image_too_small", f"{name}: {w}x{h} is too small (at least 2x2)")
        try:
            arr = _to_rgb(as_stored(im))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise ApiError(
                400, "truncated_image", f"{name}: the image data is truncated or corrupt ({exc})"
            ) from None
    return arr


#: EXIF/TIFF Orientation tag, and the transpose that UNDOES what ``ImageOps.exif_transpose`` does.
_ORIENTATION_TAG = 0x0112
_UNDO = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,  # exif_transpose rotates by 270
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,  # exif_transpose rotates by 90
}


def _stored_orientation(im: Image.Image) -> int:
    """The orientation tag Pillow itself applies on load (TIFF only; 1 = none)."""
    if im.format != "TIFF":
        return 1  # Pillow leaves JPEG/PNG/BMP pixels as stored
    value = getattr(im, "tag_v2", {}).get(_ORIENTATION_TAG, 1)
    return value if isinstance(value, int) else 1


def as_stored(im: Image.Image) -> Image.Image:
    """``im`` (just opened by Pillow) loaded, with its pixels as stored: the one orientation rule
    of the project (never applied, any format), also for code that opens image files itself
    (evaluation). Pillow reads a TIFF's tag at open and rotates while loading, so the tag is
    read first. Raises what ``Image.load`` raises for a truncated or corrupt file."""
    orientation = _stored_orientation(im)
    im.load()
    return _undo_orientation(im, orientation)


def _undo_orientation(im: Image.Image, orientation: int) -> Image.Image:
    """Pixels as stored, for every format: the orientation tag is never applied.

    A line camera's frames have a fixed geometry, and the anomaly map and the regions
    must be in the pixel grid the camera sent (the one the plant archives and the golden
    images share); a tag written by some encoder must not rotate them. Pillow applies a
    TIFF's tag while loading, so it is undone here.
    """
    undo = _UNDO.get(orientation)
    return im if undo is None else im.transpose(undo)


def _to_rgb(im: Image.Image) -> np.ndarray:
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(im)
        if a.dtype.itemsize > 1:
            top = 65535 if im.mode.startswith("I;16") or a.max(initial=0) > 255 else 255
            a = np.clip(a.astype(np.float64) * (255.0 / top), 0, 255).round().astype(np.uint8)
        return np.ascontiguousarray(np.repeat(a[..., None], 3, axis=2))
    if im.mode == "F":
        a = np.nan_to_num(np.asarray(im, dtype=np.float64))
        scale = 255.0 if a.max(initial=0) <= 1.0 else 1.0  # [0, 1] floats or [0, 255] floats
        a = np.clip(a * scale, 0, 255).round().astype(np.uint8)
        return np.ascontiguousarray(np.repeat(a[..., None], 3, axis=2))
    if im.mode != "RGB":
        im = (
            im.convert("RGBA").convert("RGB") if "A" in im.getbands() or im.mode == "P" else im.convert("RGB")
        )
    return np.array(im, dtype=np.uint8)  # a writable copy
