"""Pictures as model inputs, by the recipe a model's description states (its ``image_input``),
so that a client needs no model code to send one."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image


def image_sample(image: Image.Image, model: Mapping[str, Any]) -> Any:
    """One input sample of ``model`` (its ``GET /v1/models/{name}`` answer) from a picture:
    transparency onto white; grey for an input shape (H, W) or (1, H, W), RGB channels first
    for (3, H, W); resized to H x W by area averaging; a mostly light picture inverted when the
    model wants light ink on a dark ground; pixel values 0-255 scaled to 0-``max_value``.
    ValueError when the model takes no pictures."""
    recipe = model.get("image_input")
    if recipe is None:
        raise ValueError(
            f"model {model['name']!r} takes no images (its description has no image_input); "
            "send a .json or .npy file"
        )
    shape = model["input_shape"]
    channels, height, width = _picture_shape(shape)
    mode = "L" if channels == 1 else "RGB"
    picture = _on_white(image).convert(mode).resize((width, height), Image.Resampling.BOX)
    pixels = np.asarray(picture, np.float32)
    if recipe["light_on_dark"] and pixels.mean() > 127.5:
        pixels = 255.0 - pixels
    values = pixels * (recipe["max_value"] / 255.0)
    if channels == 3:
        values = values.transpose(2, 0, 1)  # height, width, channel -> channel first
    values = values.reshape(shape)
    if not str(model["input_dtype"]).startswith(("float", "bfloat")):
        return np.rint(values).astype(np.int64).tolist()
    return values.round(4).tolist()


def _picture_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    """(channels, height, width) of a picture shaped as ``shape``."""
    if len(shape) == 2:
        return 1, shape[0], shape[1]
    if len(shape) == 3 and shape[0] in (1, 3):
        return shape[0], shape[1], shape[2]
    raise ValueError(f"input shape {list(shape)} is not (H, W), (1, H, W) or (3, H, W)")


def _on_white(image: Image.Image) -> Image.Image:
    """The picture with any transparency laid onto a white ground."""
    if image.mode not in ("RGBA", "LA", "PA") and "transparency" not in image.info:
        return image
    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
