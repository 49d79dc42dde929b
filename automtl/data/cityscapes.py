"""CityScapes (7 or 19 classes, depth) in MTAN's preprocessed .npy layout::

    root/{train,val}/image/{i}.npy                (H, W, 3) float in [0, 1] (or uint8 0-255, divided by 255)
    root/{train,val}/label_7/{i}.npy or label_19  (H, W)    class id, -1 for void
    root/{train,val}/depth/{i}.npy                (H, W, 1) float (disparity), 0 where unknown
"""
from __future__ import annotations

import os
from typing import Sequence, Union

from ..errors import DataError
from .nyuv2 import NpyScenes

CLASS_NAMES = {
    7: ("flat", "construction", "object", "nature", "sky", "human", "vehicle"),
    19: (
        "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
        "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
        "motorcycle", "bicycle",
    ),
}  # fmt: skip


class CityScapes(NpyScenes):
    """CityScapes with the 7-class (default) or 19-class labels, and depth; void becomes 255."""

    name = "cityscapes"

    def __init__(
        self,
        root: Union[str, os.PathLike],
        split: str = "train",
        classes: int = 7,
        tasks: Sequence[str] = ("segmentation", "depth"),
    ):
        if classes not in CLASS_NAMES:
            raise DataError(f"cityscapes has 7- and 19-class labels, not {str(classes)[:20]}; its segmentation task needs "
                            "7 or 19 classes (--task segmentation:segmentation:19 on the command line, classes=19 in "
                            "Python)")
        self.classes = classes
        self.class_names = CLASS_NAMES[classes]
        # per instance: the label folder depends on the class count
        self.layout = {"segmentation": (f"label_{classes}", "segmentation"), "depth": ("depth", "depth")}
        super().__init__(root, split, tasks)
