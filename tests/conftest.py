"""Session-scoped fixtures shared by all tests: the packaged real models, loaded once.

The models load from the dequantized cache that `python -m experiments.fetch` (run by
`make install`) fills. Without it the first test that uses a model spends 20 to 90 s
dequantizing it. The hub is switched off for the whole session, so no test reaches
the network. A test that needs the hub's offline behaviour sets it itself.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path  # noqa: E402 - HF_HUB_OFFLINE must be set before huggingface_hub loads

import pytest  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from experiments.models import LoadedModel, ModelConfig, as_model_config, load_model  # noqa: E402

CONFIG_DIR = Path(__file__).resolve().parents[1] / "config"


def compose_preset(group: str, preset: str) -> ModelConfig:
    """Compose config/<group>/<preset>.yaml with Hydra and validate it into a `ModelConfig`."""
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(overrides=[f"+{group}={preset}"])
    return as_model_config(cfg[group])


@pytest.fixture(scope="session")
def smollm2() -> LoadedModel:
    """SmolLM2-135M-Instruct in float32 on CPU, from the packaged GGUF file."""
    return load_model(compose_preset("model", "smollm2-135m-instruct"))


@pytest.fixture(scope="session")
def smollm2_int8() -> LoadedModel:
    """SmolLM2-135M-Instruct with int8 linear layers, on CPU."""
    return load_model(compose_preset("draft", "smollm2-135m-instruct-int8"))


@pytest.fixture(scope="session")
def smollm2_int4() -> LoadedModel:
    """The default draft: SmolLM2-135M-Instruct with int4 linear layers, on CPU."""
    return load_model(compose_preset("draft", "smollm2-135m-instruct-int4"))


@pytest.fixture(scope="session")
def gemma3_270m() -> LoadedModel:
    """Gemma 3 270M base in float32 on CPU, assembled from the packaged GGUF parts."""
    return load_model(compose_preset("model", "gemma3-270m"))
