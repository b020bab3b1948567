"""Comparisons of results computed along different kernel paths: another batch around the same item, other shapes,
another process count, cache vs no cache, our sampler vs diffusers'.

Such results agree only up to float32 rounding, and which way each product rounds depends on the CPU's BLAS /
oneDNN kernels (MKL picks a code path by CPU and shape). So these tests compare relative to the scale of the
quantity, never bitwise, and carry the `numerics` marker: CI reruns them under another kernel path
(MKL_CBWR=COMPATIBLE ATEN_CPU_CAPABILITY=default) so that a kernel-dependent assertion fails on every machine.
"""

from __future__ import annotations

import torch


def assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    """|actual - expected| <= rel · max|expected| everywhere (float32 rounding is ~1e-7 of the scale)."""
    scale = expected.detach().abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=0, atol=rel * scale)
