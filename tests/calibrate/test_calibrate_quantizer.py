"""The fast calibration/reference quantizer implements exactly the quant package's HIGGS semantics."""

from __future__ import annotations

import pytest
import torch

from aquakv_gguf import quant
from aquakv_gguf.calibrate.quantizer import RowQuantizer, bits_to_points


@pytest.mark.parametrize("n_points", [16, 64, 256])
def test_nearest_point_search_is_exactly_the_exhaustive_argmax(n_points: int) -> None:
    grid = quant.gaussian_grid(n_points)
    fast, ref = RowQuantizer(grid, 64), quant.HiggsQuantizer(grid, 64)
    g = torch.Generator().manual_seed(n_points)
    gt = torch.from_numpy(grid.copy())
    i, j = torch.randint(0, n_points, (20000,), generator=g), torch.randint(0, n_points, (20000,), generator=g)
    y = torch.cat([
        torch.randn(100000, 2, generator=g) * 1.5,
        torch.randn(2000, 2, generator=g) * 10,          # outside the lookup table
        (gt[i] + gt[j]) / 2,                             # on Voronoi boundaries: ties go to the lowest index
        gt,                                              # the grid points themselves
    ])
    assert torch.equal(fast.nearest(y), ref.nearest(y).long())


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_quantize_matches_the_quant_package(bits: int) -> None:
    grid = quant.gaussian_grid(bits_to_points(bits))
    fast, ref = RowQuantizer(grid, 64), quant.HiggsQuantizer(grid, 64)
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(3000, 192, generator=g) * (torch.rand(192, generator=g) * 4) + 0.5
    codes, scales = fast.encode(x)
    codes_ref, scales_ref = ref.encode(x)
    assert torch.equal(scales, scales_ref)
    # The Hadamard transform is a GEMM here and butterflies there: y may differ in the last bit,
    # which can move a point sitting on a cell boundary.
    assert (codes == codes_ref).float().mean().item() > 0.9999
    torch.testing.assert_close(fast.decode(codes, scales), ref.decode(codes, scales), rtol=1e-5, atol=1e-5)
    x_hat = fast(x)
    same = (codes == codes_ref).all(dim=1)
    torch.testing.assert_close(x_hat[same], ref.quantize(x)[same], rtol=1e-5, atol=1e-5)
    rel = ((x_hat - x).pow(2).sum() / x.pow(2).sum()).item()
    assert rel < {2: 0.12, 3: 0.035, 4: 0.01}[bits]


def test_zero_groups_and_bad_group_sizes() -> None:
    q = RowQuantizer(quant.gaussian_grid(16), 64)
    x = torch.zeros(4, 128)
    assert torch.equal(q(x), x)
    with pytest.raises(ValueError):
        RowQuantizer(quant.gaussian_grid(16), 48)
    assert bits_to_points(2) == 16 and bits_to_points(3) == 64 and bits_to_points(4) == 256
