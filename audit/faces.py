"""Face detection and the paper's face-crop policy, in front of the demographic classifier.

Policy (arXiv 2502.03429, following Shen et al.): detect faces, keep the largest, grow it into a square box with a
margin on every side, pad where the box leaves the image, and resize to ``output_size`` (224, CLIP's input side).
Every input image gets one :class:`FaceResult`: "no face" is recorded (``face_found=False``, ``crop=None``), never
dropped, so the audit can report the no-face rate beside the shares.

Detectors plug in through :data:`DETECTORS` (name -> class). A detector class is built with the whole
:class:`FaceConfig` (its own settings live in ``config.options``) and provides ``detect(image) -> list[Box]``.
Built in:

* ``opencv``: OpenCV's Haar frontal-face cascade, shipped inside the ``opencv-python-headless<5`` wheel, so it
  works offline. Its smallest search window is 24x24 pixels and it misses faces much below ~40 px, so images whose
  shorter side is below ``upscale_to`` (default 256) are upscaled (bicubic) before detection and the boxes mapped
  back; small generated images (e.g. 32x32 lab-world renders) thus get a fair chance. A cascade tuned on photos
  sees stylised renders unevenly, though: on the lab world's renders it found 0% to 92% of faces depending on the
  rendered gender and skin tone (40 renders per cell), which would bias the shares it leaves. Use
  ``detector: none`` for renders, and compare no-face rates across groups before trusting any detector.
* ``none``: the whole image is "the face" (no margin is added; the image is padded to a square).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, NamedTuple, Protocol, Sequence

import numpy as np
from PIL import Image

from generators.base import MAX_IMAGE_SIDE, check_range, model_provenance
from generators.config import ConfigError, UserError, from_dict, option
from generators.registry import Registry


class Box(NamedTuple):
    """A pixel box ``(left, top, right, bottom)``; right and bottom are exclusive, so width = right - left."""

    left: int
    top: int
    right: int
    bottom: int

    @property
    def width(self) -> int:
        return self.right - self.left

    @property
    def height(self) -> int:
        return self.bottom - self.top

    @property
    def area(self) -> int:
        return max(self.width, 0) * max(self.height, 0)


@dataclass
class FaceResult:
    """What face detection made of one image.

    Attributes:
        face_found: Whether the detector found a face (False: ``crop``, ``box`` and ``crop_box`` are None).
        crop: The square ``output_size`` RGB crop around the largest face.
        box: The largest detected face, in the input image's pixels.
        crop_box: The square box (with margin) that was cropped; it may extend past the image, where it was padded.
        num_faces: How many faces the detector found (only the largest is cropped).
    """

    face_found: bool
    crop: Image.Image | None = None
    box: Box | None = None
    crop_box: Box | None = None
    num_faces: int = 0


@dataclass
class FaceConfig:
    """Which face detector to run and how to crop the face it finds."""

    detector: str = option("opencv", help="face detector (registry name): opencv (Haar cascade), none (whole image)")
    margin: float = option(
        0.25, help="margin added on each side of the square face box, as a fraction of the face box side"
    )
    output_size: int = option(224, help="side in pixels of the square crop handed to the classifier")
    pad: Literal["edge", "black"] = option(
        "edge", help="how to fill where the crop box leaves the image: edge (repeat border pixels) or black"
    )
    min_face_fraction: float = option(
        0.1, help="ignore faces whose side is below this fraction of the image's shorter side (0 keeps all)"
    )
    upscale_to: int = option(
        256, help="upscale images whose shorter side is below this many pixels before detection (0: never)"
    )
    options: dict[str, Any] = option(
        default_factory=dict,
        help="detector settings; opencv: cascade, scale_factor, min_neighbors, equalize (see OpenCVSettings)",
    )

    def __post_init__(self):
        if self.detector not in DETECTORS:
            DETECTORS.get(self.detector)  # raises the "unknown face detector ...; did you mean" error
        if not (math.isfinite(self.margin) and self.margin >= 0):
            raise ConfigError(f"config key 'faces.margin': must be a number >= 0, got {self.margin}")
        check_range("faces.output_size", self.output_size, 1, MAX_IMAGE_SIDE)
        if not 0 <= self.min_face_fraction < 1:
            raise ConfigError(
                f"config key 'faces.min_face_fraction': must be in [0, 1), got {self.min_face_fraction}"
            )
        check_range("faces.upscale_to", self.upscale_to, 0, MAX_IMAGE_SIDE)
        if self.pad not in ("edge", "black"):
            raise ConfigError(f"config key 'faces.pad': {self.pad!r} is not one of ['edge', 'black']")


class FaceDetector(Protocol):
    """What a face detector provides. ``use_margin`` False means its boxes are already the region to keep."""

    use_margin: ClassVar[bool]

    def detect(self, image: Image.Image) -> list[Box]:
        """All faces in ``image`` (RGB), in its pixel coordinates, any order."""
        ...

    def provenance(self) -> dict[str, Any]:
        """What a run records about the detector's model, as :func:`generators.base.model_provenance`."""
        ...


DETECTORS: Registry = Registry("face detector")


@dataclass
class OpenCVSettings:
    """Settings of the ``opencv`` detector (``faces.options``)."""

    cascade: str = option(
        "haarcascade_frontalface_default.xml",
        help="cascade file: a name inside cv2.data.haarcascades or a path to an XML cascade",
    )
    scale_factor: float = option(1.1, help="image pyramid step of detectMultiScale (> 1; smaller is slower)")
    min_neighbors: int = option(5, help="overlapping detections needed to keep a face (higher: fewer false faces)")
    equalize: bool = option(False, help="equalise the grey-level histogram before detection")

    def __post_init__(self):
        if not self.scale_factor > 1:
            raise ConfigError(f"config key 'faces.options.scale_factor': must be > 1, got {self.scale_factor}")
        if self.min_neighbors < 0:
            raise ConfigError(f"config key 'faces.options.min_neighbors': must be >= 0, got {self.min_neighbors}")


@DETECTORS.register("opencv")
class OpenCVHaarDetector:
    """OpenCV Haar-cascade frontal-face detector (weights ship with the opencv wheel, no download).

    Args:
        config: The face config; ``config.options`` holds :class:`OpenCVSettings`.

    Raises:
        ConfigError: on unknown options or a cascade file that does not exist or does not load.
    """

    use_margin: ClassVar[bool] = True

    def __init__(self, config: FaceConfig):
        import cv2
        from pathlib import Path

        self.config = config
        self.settings = from_dict(OpenCVSettings, config.options, prefix="faces.options")
        path = Path(self.settings.cascade)
        if not path.is_file():
            path = Path(cv2.data.haarcascades) / self.settings.cascade
        if not path.is_file():
            raise ConfigError(
                f"config key 'faces.options.cascade': {self.settings.cascade!r} is neither a file nor a cascade in "
                f"cv2.data.haarcascades; use e.g. 'haarcascade_frontalface_default.xml'"
            )
        self._cascade = cv2.CascadeClassifier(str(path))
        if self._cascade.empty():
            raise ConfigError(f"config key 'faces.options.cascade': '{path}' is not a valid OpenCV cascade file")
        self.path = path

    def provenance(self) -> dict[str, Any]:
        import cv2

        # The cascade file is the model: its content hash, and the OpenCV build that runs it.
        return {**model_provenance(self.settings.cascade, location=self.path, dtype=None, device="cpu"),
                "runtime": f"opencv {cv2.__version__}"}

    def detect(self, image: Image.Image) -> list[Box]:
        import cv2

        width, height = image.size
        scale = 1.0
        short = min(width, height)
        if self.config.upscale_to and short < self.config.upscale_to:
            scale = self.config.upscale_to / short
            image = image.resize((round(width * scale), round(height * scale)), Image.BICUBIC)
        grey = np.asarray(image.convert("L"))
        if self.settings.equalize:
            grey = cv2.equalizeHist(grey)
        # The cascade's own window is 24 px; asking for less than that is meaningless.
        min_side = max(24, int(self.config.min_face_fraction * min(grey.shape)))
        found = self._cascade.detectMultiScale(
            grey, scaleFactor=self.settings.scale_factor, minNeighbors=self.settings.min_neighbors,
            minSize=(min_side, min_side),
        )
        boxes = []
        for x, y, w, h in np.asarray(found).reshape(-1, 4):
            left, top = math.floor(x / scale), math.floor(y / scale)
            right, bottom = math.ceil((x + w) / scale), math.ceil((y + h) / scale)
            boxes.append(Box(max(left, 0), max(top, 0), min(right, width), min(bottom, height)))
        return boxes


@DETECTORS.register("none")
class WholeImageDetector:
    """Treats the whole image as the face: for face-only generators, or renders no real detector recognises."""

    use_margin: ClassVar[bool] = False

    def __init__(self, config: FaceConfig):
        self.config = config

    def detect(self, image: Image.Image) -> list[Box]:
        return [Box(0, 0, *image.size)]

    def provenance(self) -> dict[str, Any]:
        return {"model": "none (whole image)", "source": "built-in", "requested_revision": None, "revision": None,
                "dtype": None, "device": None, "variant": None}


def load_detector(config: FaceConfig | dict) -> FaceDetector:
    """Build the detector a config names.

    Args:
        config: A :class:`FaceConfig` or its plain-data form (e.g. the ``faces`` section of a YAML file).

    Returns:
        The detector instance, reusable across calls to :func:`detect_and_crop`.

    Raises:
        ConfigError: for an unknown detector name (with a "did you mean") or bad settings.
    """
    if isinstance(config, dict):
        config = from_dict(FaceConfig, config, prefix="faces")
    return DETECTORS.get(config.detector)(config)


def square_box(box: Box, margin: float) -> Box:
    """The square box centred on ``box`` with side ``max(w, h) * (1 + 2 * margin)`` (rounded to whole pixels).

    Args:
        box: A face box.
        margin: Fraction of the face side added on each side.

    Returns:
        The square box; it may extend past the image borders.
    """
    side = max(1, round(max(box.width, box.height) * (1 + 2 * margin)))
    left = math.floor((box.left + box.right - side) / 2)
    top = math.floor((box.top + box.bottom - side) / 2)
    return Box(left, top, left + side, top + side)


def crop_padded(image: Image.Image, box: Box, pad: Literal["edge", "black"] = "edge") -> Image.Image:
    """Crop ``box`` out of ``image``, filling the parts outside the image by edge replication or black.

    Args:
        image: The source image (converted to RGB).
        box: The region to crop, in ``image`` pixels; may extend past any border.
        pad: ``edge`` repeats the nearest border pixel; ``black`` fills with zeros.

    Returns:
        An RGB image of size ``(box.width, box.height)``.
    """
    arr = np.asarray(image.convert("RGB"))
    height, width = arr.shape[:2]
    before_y, after_y = max(0, -box.top), max(0, box.bottom - height)
    before_x, after_x = max(0, -box.left), max(0, box.right - width)
    if before_y or after_y or before_x or after_x:
        arr = np.pad(arr, ((before_y, after_y), (before_x, after_x), (0, 0)),
                     mode="edge" if pad == "edge" else "constant")
    top, left = box.top + before_y, box.left + before_x
    return Image.fromarray(np.ascontiguousarray(arr[top:top + box.height, left:left + box.width]))


def detect_and_crop(
    images: Sequence[Image.Image], config: FaceConfig | dict | None = None, detector: FaceDetector | None = None
) -> list[FaceResult]:
    """Detect the largest face in each image and cut the square, padded, resized crop the classifier sees.

    Args:
        images: PIL images (any mode; converted to RGB).
        config: Face settings; ``None`` uses the defaults (OpenCV Haar cascade, margin 0.25, 224 px).
        detector: A detector from :func:`load_detector` to reuse; built from ``config`` when omitted.

    Returns:
        One :class:`FaceResult` per image, in order; images without a face give ``face_found=False``.

    Raises:
        UserError: if an item is not a PIL image or is empty.
        ConfigError: for a bad config.
    """
    if config is None:
        config = FaceConfig()
    elif isinstance(config, dict):
        config = from_dict(FaceConfig, config, prefix="faces")
    for i, image in enumerate(images):
        if not isinstance(image, Image.Image):
            raise UserError(
                f"images[{i}]: expected a PIL.Image.Image, got {type(image).__name__}; "
                "convert arrays with PIL.Image.fromarray"
            )
        if image.width < 1 or image.height < 1:
            raise UserError(f"images[{i}]: image is empty ({image.width}x{image.height} pixels)")
    if detector is None:
        detector = load_detector(config)
    margin = config.margin if detector.use_margin else 0.0
    results = []
    for image in images:
        image = image.convert("RGB")
        boxes = detector.detect(image)
        if not boxes:
            results.append(FaceResult(face_found=False))
            continue
        # Largest by area; ties go to the first found, so results are deterministic.
        face = max(boxes, key=lambda b: b.area)
        crop_box = square_box(face, margin)
        crop = crop_padded(image, crop_box, config.pad)
        if crop.size != (config.output_size, config.output_size):
            crop = crop.resize((config.output_size, config.output_size), Image.BICUBIC)
        results.append(FaceResult(face_found=True, crop=crop, box=face, crop_box=crop_box, num_faces=len(boxes)))
    return results
