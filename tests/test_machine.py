"""The instruction-set limits that `make test` uses for its second pass are really in force."""

import os

import pytest
import torch

LEVELS = {"default": 0, "avx2": 1, "avx512": 2}


@pytest.mark.trained       # so it runs in both passes: the second one proves its limit took effect
def test_the_instruction_set_limit_is_in_force():
    asked = os.environ.get("ATEN_CPU_CAPABILITY", "").lower()
    active = torch.backends.cpu.get_cpu_capability().lower()
    # PyTorch runs the asked level, or a lower one where the CPU lacks it; unasked, whatever it found.
    assert active and (asked not in LEVELS or LEVELS.get(active, 0) <= LEVELS[asked]), (asked, active)
