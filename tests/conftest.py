import os

import pytest
import torch
from hypothesis import settings

# CI runs the default profile; `HYPOTHESIS_PROFILE=fuzz` runs a large budget with random seeds.
settings.register_profile("default", deadline=None, derandomize=True, print_blob=True)
settings.register_profile("fuzz", deadline=None, max_examples=int(os.environ.get("DROPBP_FUZZ_EXAMPLES", "2000")),
                          print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch: Dynamo's caches (and frames it decided to skip) do not leak."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
