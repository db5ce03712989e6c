"""The ``data`` section: where images come from, the demo data set, and how the two views are cropped
and warped."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import ConfigDict, Field, field_validator

from schemas.spec.constants import MAX_SEED, URL_SCHEMES
from schemas.spec.fields import (
    Pair,
    SpecModel,
    StorageOptionValue,
    check_range_pair,
    check_required_url,
    fail,
    kind_required,
    refuse_credentials,
)


class DemoDataSpec(SpecModel):
    """A synthetic dataset, so a demo or a test runs without downloading images."""

    num_images: int = Field(512, ge=1, le=1_000_000, description="Number of synthetic images to generate.")
    image_size: int = Field(
        160, ge=16, le=4096, description="Side length in pixels of each generated image; >= data.crop_size."
    )
    seed: int = Field(0, ge=0, le=MAX_SEED, description="Seed of the generator; same seed, same images.")


class RotationSpec(SpecModel):
    """Random rotation by an angle drawn uniformly from [-degrees, degrees]."""

    model_config = ConfigDict(json_schema_extra=kind_required)

    kind: Literal["rotation"] = Field("rotation", description="Transform type tag.")
    degrees: float = Field(ge=0, le=180, description="Maximum absolute rotation angle in degrees.")


class AffineSpec(SpecModel):
    """Random affine warp (torchvision RandomAffine semantics)."""

    model_config = ConfigDict(json_schema_extra=kind_required)

    kind: Literal["affine"] = Field("affine", description="Transform type tag.")
    degrees: float = Field(ge=0, le=180, description="Maximum absolute rotation angle in degrees.")
    translate: Pair = Field(
        (0.0, 0.0),
        description="Maximum horizontal and vertical shift as fractions of the image size, each in [0, 1].",
    )
    scale: Pair = Field((1.0, 1.0), description="Range (lo, hi) of the scale factor, 0 < lo <= hi.")
    shear: float = Field(0.0, ge=0, lt=90, description="Maximum absolute x-shear angle in degrees.")

    @field_validator("translate")
    @classmethod
    def _translate_in_unit(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= v <= 1.0 for v in value):
            raise fail("translate_range", "each translate fraction must be in [0, 1]")
        return value

    @field_validator("scale")
    @classmethod
    def _scale_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        return check_range_pair(value, 0.0, None)


class PerspectiveSpec(SpecModel):
    """Random perspective distortion (torchvision RandomPerspective semantics and defaults)."""

    model_config = ConfigDict(json_schema_extra=kind_required)

    kind: Literal["perspective"] = Field("perspective", description="Transform type tag.")
    distortion_scale: float = Field(0.5, ge=0, le=1, description="How far corners may move, in [0, 1].")
    p: float = Field(0.5, ge=0, le=1, description="Probability of applying the distortion.")


class ElasticSpec(SpecModel):
    """Random elastic warp (torchvision ElasticTransform semantics and defaults)."""

    model_config = ConfigDict(json_schema_extra=kind_required)

    kind: Literal["elastic"] = Field("elastic", description="Transform type tag.")
    alpha: float = Field(50.0, ge=0, description="Magnitude of the displacement field, in pixels.")
    sigma: float = Field(5.0, gt=0, description="Smoothness (Gaussian sigma) of the displacement field.")


SpatialTransformSpec = Annotated[
    Union[RotationSpec, AffineSpec, PerspectiveSpec, ElasticSpec],  # noqa: UP007 (explicit union for the tag)
    Field(discriminator="kind"),
]
"""One general spatial transform, selected by ``kind``; pixel correspondences are tracked through it."""


class DataSpec(SpecModel):
    """Where images come from and how the two views are cropped."""

    root: str = Field(
        min_length=1,
        max_length=4096,
        description="Training images: a folder (searched recursively) or a packed dataset (pixpro pack), "
        f"as a local path or an fsspec URL ({', '.join(s + '://' for s in URL_SCHEMES)}).",
    )
    storage_options: dict[str, StorageOptionValue] = Field(
        default_factory=dict,
        description="fsspec storage options for a data.root URL (endpoint_url, client_kwargs, ...); "
        "credentials are refused: they come from the environment, as for checkpoints.",
    )
    cache: Literal["none", "memory", "disk"] = Field(
        "none",
        description="Keep the encoded bytes of samples once read: memory (per loader process) or disk "
        "(cache_dir on node-local storage, shared by the node's ranks); bounded by cache_gb.",
    )
    cache_gb: float = Field(8.0, gt=0, le=1e6, description="Size bound of the cache, in GB.")
    cache_dir: str | None = Field(
        None,
        min_length=1,
        max_length=4096,
        description="Node-local folder of the disk cache (default: $TMPDIR/pixpro-cache/<run name>).",
    )
    demo: DemoDataSpec | None = Field(
        None,
        description="If set, a synthetic demo dataset is generated into root when root does not exist.",
    )
    crop_size: int = Field(
        224,
        ge=32,
        le=4096,
        description="Side length in pixels of each random-resized crop; the backbone's last feature map "
        "must be at least 2x2 (e.g. >= 33 for ResNets, >= 64 for ConvNeXt and VGG).",
    )
    crop_scale: Pair = Field(
        (0.08, 1.0),
        description="RandomResizedCrop area fraction range (lo, hi), 0 < lo <= hi <= 1; the official "
        "scripts pass 0.08 although the option default is 0.2.",
    )
    spatial: list[SpatialTransformSpec] = Field(
        default_factory=list,
        description="Extra spatial transforms after crop and flip, in order; pixels brought in from "
        "outside the image are marked invalid and never pair.",
    )
    batch_size: int = Field(
        128,
        ge=2,
        le=65536,
        description="Images per rank per optimizer step; >= 2 (the projector's BatchNorm always trains).",
    )
    num_workers: int = Field(8, ge=0, le=256, description="DataLoader worker processes per rank.")
    augment_on: Literal["worker", "device"] = Field(
        "worker",
        description="Where colour jitter, grey, blur and solarize run: in the DataLoader workers, or batched "
        "on the training device (workers then only decode, crop and flip, and send uint8 views). The views "
        "are the same either way (bitwise on CPU); 'device' needs about half the CPU cores per GPU.",
    )

    @field_validator("crop_scale")
    @classmethod
    def _crop_scale_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        return check_range_pair(value, 0.0, 1.0)

    @field_validator("root")
    @classmethod
    def _root_url(cls, value: str) -> str:
        return check_required_url(value)

    @field_validator("storage_options", mode="before")
    @classmethod
    def _no_credentials(cls, value: Any) -> Any:
        return refuse_credentials(value)
