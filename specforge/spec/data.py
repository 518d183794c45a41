"""The `data:` section: where images come from, how they are split, normalised and augmented.

The pipeline that executes it is shared by every backend, so the same spec and seed give the
same batches, pixel for pixel, whichever backend trains.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from specforge.spec.layers import SpecModel

Fraction = Annotated[float, Field(ge=0, lt=1)]


class Cifar10Source(SpecModel):
    """CIFAR-10 in its official python format (`cifar-10-batches-py/` or the `.tar.gz`)."""

    type: Literal["cifar10"]
    path: str | None = Field(None, description="Local folder or .tar.gz; default: the cache.")
    download: bool = Field(False, description="Download into the cache when missing.")


class ImageFolderSource(SpecModel):
    """Folders with one subfolder per class (PNG/JPEG), resized to the model's input."""

    type: Literal["image_folder"]
    train: str = Field(description="Training images folder, e.g. `train`.")
    test: str | None = Field(None, description="Test images folder, e.g. `test`.")


class NpzSource(SpecModel):
    """Arrays in an .npz file: images (N, H, W, C) uint8 or float, labels (N,) int."""

    type: Literal["npz"]
    path: str
    x_key: str = "x"
    y_key: str = "y"


class DigitsSource(SpecModel):
    """scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes); no download."""

    type: Literal["digits"]


class SyntheticSource(SpecModel):
    """Random images of the model's input shape with learnable labels; for tests."""

    type: Literal["synthetic"]
    samples: int = Field(512, ge=1, le=10_000_000)
    classes: int = Field(10, ge=1, le=100_000)


Source = Annotated[
    Cifar10Source | ImageFolderSource | NpzSource | DigitsSource | SyntheticSource,
    Field(discriminator="type"),
]


class Split(SpecModel):
    """Fractions held out from the training data. The seed document's 80/20 is
    `validation: 0.2` for a source with its own test set (its `train/` and `test/`
    folders), or `test: 0.2` for a source without one. With `stratify`, each class is rounded
    on its own, so very small classes can leave a part empty."""

    validation: Fraction = 0.0
    test: Fraction | None = Field(None, description="Only for sources without a test set.")
    stratify: bool = Field(False, description="Keep class proportions in every part.")

    @model_validator(mode="after")
    def _leaves_training_data(self) -> Split:
        if self.validation + (self.test or 0.0) >= 1:
            raise ValueError("validation + test must leave some training data (sum < 1)")
        return self


Deviation = Annotated[float, Field(gt=0)]


class Normalize(SpecModel):
    """x = (pixel * scale - mean) / std, per channel."""

    scale: float = Field(1 / 255, gt=0)
    mean: Annotated[list[float], Field(min_length=1)] | float = Field(
        0.0, description="One value for every channel, or a list of one per input channel.")
    std: Annotated[list[Deviation], Field(min_length=1)] | Deviation = Field(
        1.0, description="Above 0: one value for every channel, or a list of one per input "
                         "channel.")


class Augment(SpecModel):
    """Random training-time transforms, drawn from specforge's seeded generator."""

    rotation: float = Field(0.0, ge=0, le=180, description="Max rotation, degrees.")
    width_shift: Fraction = Field(0.0, description="Max horizontal shift, fraction of width.")
    height_shift: Fraction = Field(0.0, description="Max vertical shift, fraction of height.")
    zoom: Fraction = Field(0.0, description="Scale drawn from [1 - zoom, 1 + zoom].")
    horizontal_flip: bool = False
    vertical_flip: bool = False
    fill_mode: Literal["nearest", "constant", "reflect"] = "nearest"
    fill_value: float = 0.0
    crop_padding: int = Field(0, ge=0, le=1_024,
                              description="Random crop after padding each side by this.")


class Data(SpecModel):
    """Data source, split, preprocessing and batching."""

    source: Source
    split: Split = Field(default_factory=Split)
    normalize: Normalize = Field(default_factory=Normalize)
    augment: Augment = Field(default_factory=Augment)
    batch_size: Annotated[int, Field(ge=1, le=1_000_000)] | Literal["full"] = Field(
        32, description="Samples per step, or `full` for full-batch gradient descent.")
    shuffle: bool = True
    workers: Annotated[int, Field(ge=0, le=256)] | Literal["auto"] = Field(
        "auto", description="Processes that prepare training batches ahead of the step "
        "(decoding, augmentation, normalisation); 0: in the training process, one batch "
        "after another; `auto`: training on a GPU, one per core left over, at most 4; on "
        "the CPU, 0 (training's threads use every core). The batches are the same "
        "whatever the number.")
    prefetch: int = Field(2, ge=1, le=64,
                          description="Batches each worker prepares ahead of the step.")
