"""What a classification request carries, checked: image bytes from a JSON or multipart body, opened safely.

Framework-free (the LitServe and Ray Serve servers both use it). Every problem is a :class:`BadRequestError` with
the HTTP status to answer and a reason the client can act on; nothing here can stop a server.
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Mapping
from typing import Any

from PIL import Image, UnidentifiedImageError

from ..errors import AdaptiveDepthError

__all__ = ["DEFAULT_MAX_PIXELS", "IMAGE_FIELD", "BadRequestError", "image_bytes", "open_image"]

IMAGE_FIELD = "image"
DEFAULT_MAX_PIXELS = 40_000_000  # 40 megapixels: a large photo; an image that decodes bigger is refused unread
_FORMS = 'send a JSON object {"image": "<base64 image bytes>"} or a multipart form with an "image" file'


class BadRequestError(AdaptiveDepthError, ValueError):
    """A request the server cannot answer; ``status_code`` is the HTTP status to reply with (4xx).

    Args:
        status_code: 400 (malformed), 413 (too large), 415 (wrong content type).
        reason: what is wrong and how to fix it.
    """

    def __init__(self, status_code: int, reason: str) -> None:
        super().__init__(reason)
        self.status_code = status_code
        self.reason = reason


def image_bytes(payload: Any) -> bytes:
    """The encoded image of a request body: ``{"image": base64}`` (JSON) or an ``image`` file (multipart form).

    Raises:
        BadRequestError: the body has no ``image`` field, or its value is not base64 or a file.
    """
    if not isinstance(payload, Mapping) and not hasattr(payload, "get"):
        raise BadRequestError(400, f"the request body is a {type(payload).__name__}, not an object: {_FORMS}")
    value = payload.get(IMAGE_FIELD)
    if value is None:
        keys = sorted(str(k) for k in payload.keys())  # noqa: SIM118 (a form is no Mapping but has keys())
        raise BadRequestError(400, f"the request has no {IMAGE_FIELD!r} field (it has {keys}): {_FORMS}")
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as e:
            raise BadRequestError(400, f"the {IMAGE_FIELD!r} field is not valid base64 ({e}): {_FORMS}") from e
    file = getattr(value, "file", None)  # an uploaded file of a multipart form
    if file is not None:
        file.seek(0)
        return file.read()
    raise BadRequestError(400, f"the {IMAGE_FIELD!r} field is a {type(value).__name__}: {_FORMS}")


def open_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode an image, refusing one larger than ``max_pixels`` before its pixels are decoded.

    Raises:
        BadRequestError: 400 if PIL cannot read it (not an image, truncated), 413 if it is too large.
    """
    if not data:
        raise BadRequestError(400, f"the image is empty: {_FORMS}")
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only
        width, height = image.size
        if width * height > max_pixels:
            raise BadRequestError(
                413,
                f"the image is {width}x{height} = {width * height} pixels, more than this server's limit of "
                f"{max_pixels}; send a smaller image",
            )
        image.load()
    except BadRequestError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise BadRequestError(400, f"the image cannot be read ({type(e).__name__}: {e}); send a JPEG, PNG, ...") from e
    return image
