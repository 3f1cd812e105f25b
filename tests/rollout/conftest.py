"""Fixtures of the rollout tests: a scripted policy model that calls the tool `<q>`."""
import pytest
import torch

from arpo.rollout.toy_policy import tool_chain_policy


@pytest.fixture(scope="session")
def policy():
    """(model, tokenizer): hidden 64, 2 layers — small and fast, context-dependent through attention noise."""
    return tool_chain_policy("q", seed=0, hidden_size=64, layers=2, heads=4, kv_heads=2, intermediate_size=96,
                             noise=0.01)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)
    yield
