import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import save_tiny_model, tiny_gemma3_config  # noqa: E402

# Tiny models: one thread avoids OpenMP hand-off costs that dwarf their matmuls on a small, shared CPU.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_gemma3_dir(tmp_path_factory) -> Path:
    """Tiny random Gemma 3 with a 96-token word-level vocabulary."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny_g3"), tiny_gemma3_config(), seed=1)


@pytest.fixture(scope="session")
def tiny_gemma3_draft_dir(tmp_path_factory) -> Path:
    """A second tiny Gemma 3 with the same vocabulary, usable as a separate draft model."""
    cfg = tiny_gemma3_config(num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"])
    return save_tiny_model(tmp_path_factory.mktemp("tiny_g3_draft"), cfg, seed=7)


@pytest.fixture(scope="session")
def tiny_gemma3_realtok_dir(tmp_path_factory) -> Path:
    """Tiny random Gemma 3 with the default model's real tokenizer (vocab 262144): fast plumbing tests."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny_g3_tok"), tiny_gemma3_config(), seed=2, real_tokenizer=True)


@pytest.fixture(scope="session")
def default_engine():
    from gemmaspec.engine import Engine

    return Engine.load("default", drafter="none", dtype="float32", device="cpu")
