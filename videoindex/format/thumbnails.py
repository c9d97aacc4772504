"""Clip thumbnails: one small JPEG per clip (the middle frame), stored in ``clips.thumbnail`` and shown by
the report. PIL only, so readers that draw thumbnails load no decoder and no torch."""

from __future__ import annotations

import io

import numpy as np

THUMBNAIL_SHORT_SIDE = 96


def thumbnail_jpeg(frame: np.ndarray) -> bytes:
    """uint8[H,W,3] -> JPEG bytes, short side THUMBNAIL_SHORT_SIDE."""
    from PIL import Image

    image = Image.fromarray(frame)
    scale = THUMBNAIL_SHORT_SIDE / min(image.size)
    image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=80)
    return buf.getvalue()
