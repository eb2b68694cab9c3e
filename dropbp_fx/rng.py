"""Randomness a measurement must not disturb: every generator the model may draw from (torch CPU and CUDA,
Python's ``random``, numpy's global state)."""

from __future__ import annotations

import contextlib
import random

import torch


@contextlib.contextmanager
def same_randomness():
    """Every pass replays the same RNG state; the caller's state is restored afterwards."""
    states = (torch.get_rng_state(), random.getstate(),
              torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    try:
        import numpy as np
        np_state = np.random.get_state()
    except ImportError:  # pragma: no cover
        np, np_state = None, None

    def replay():
        torch.set_rng_state(states[0])
        random.setstate(states[1])
        if states[2] is not None:
            torch.cuda.set_rng_state_all(states[2])
        if np is not None:
            np.random.set_state(np_state)
    try:
        yield replay
    finally:
        replay()
