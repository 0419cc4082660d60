"""Model families the guard supports, and how a pipeline (directory or object) finds its own.

    family_for_directory(path)    # from model_index.json's `_class_name`
    adapter_for(pipe)             # from the pipeline object's class → a FamilyAdapter over it

An unsupported class is an `UnsupportedModel` error that names it and the supported ones.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from memguard.errors import InvalidInput, MissingResource
from memguard.families.base import FamilyAdapter, PromptEncoding
from memguard.families.sd import StableDiffusionFamily
from memguard.families.sdxl import StableDiffusionXLFamily

FAMILIES: tuple[type[FamilyAdapter], ...] = (StableDiffusionFamily, StableDiffusionXLFamily)

__all__ = ["FAMILIES", "FamilyAdapter", "PromptEncoding", "StableDiffusionFamily", "StableDiffusionXLFamily",
           "UnsupportedModel", "adapter_for", "family_for_class", "family_for_directory", "supported_classes"]


class UnsupportedModel(InvalidInput):
    """The pipeline's class is not one of the supported model families."""

    def __init__(self, class_name: str, where: str = ""):
        super().__init__("model", f"{where}{class_name or '(no class name)'} is not a supported model family; "
                                  f"supported: {supported_classes()}")
        self.class_name = class_name


def supported_classes() -> str:
    return ", ".join(f"{c} ({f.description})" for f in FAMILIES for c in f.pipeline_classes)


def family_for_class(class_name: str, where: str = "") -> type[FamilyAdapter]:
    for family in FAMILIES:
        if class_name in family.pipeline_classes:
            return family
    raise UnsupportedModel(class_name, where)


def pipeline_class_name(model_dir: str | os.PathLike) -> str:
    """model_index.json's `_class_name` of a diffusers pipeline directory."""
    index = Path(model_dir) / "model_index.json"
    try:
        return str(json.loads(index.read_text()).get("_class_name", ""))
    except FileNotFoundError as exc:
        raise MissingResource(f"no diffusers pipeline at {model_dir} (model_index.json missing)") from exc
    except (OSError, ValueError, AttributeError) as exc:
        raise MissingResource(f"{index}: unreadable ({exc})") from exc


def family_for_directory(model_dir: str | os.PathLike) -> type[FamilyAdapter]:
    return family_for_class(pipeline_class_name(model_dir), f"{Path(model_dir) / 'model_index.json'}: ")


def adapter_for(pipe) -> FamilyAdapter:
    """The FamilyAdapter of a pipeline object, from its class (or the nearest supported base class)."""
    for cls in type(pipe).__mro__:
        for family in FAMILIES:
            if cls.__name__ in family.pipeline_classes:
                return family(pipe)
    raise UnsupportedModel(type(pipe).__name__, "pipeline object: ")
