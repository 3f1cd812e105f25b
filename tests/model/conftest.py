"""Fixtures for the model tests (helpers live in tiny_models.py)."""
import pytest
from tiny_models import TINY_CONFIGS, make_hf_model


@pytest.fixture(params=sorted(TINY_CONFIGS))
def hf_checkpoint(request, tmp_path):
    """(hf_model, checkpoint_dir) for each tiny config, saved with `save_pretrained` (safetensors)."""
    model = make_hf_model(request.param)
    path = tmp_path / request.param
    model.save_pretrained(path)
    return model, str(path)
