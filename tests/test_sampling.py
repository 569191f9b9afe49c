"""Philox noise, reparameterised sampling and the Gaussian KL term."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

import genkernels
from genkernels import _C, reference

from tolerances import low_precision_tol

# Published known-answer vectors of Philox4x32-10 (Random123's kat_vectors): counter, key, output.
PHILOX_KAT = [
    ([0, 0, 0, 0], [0, 0], [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
    ([0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2, [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
    (
        [0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344],
        [0xA4093822, 0x299F31D0],
        [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1],
    ),
]


@pytest.mark.parametrize("counter, key, expected", PHILOX_KAT)
def test_philox_known_answers(counter, key, expected):
    assert _C.philox4x32_10(counter, key) == expected
    assert reference.philox4x32_10(torch.tensor(counter), tuple(key)).tolist() == expected


def seed_tensor(seed: int, offset: int, device: torch.device) -> torch.Tensor:
    return torch.tensor([seed, offset], dtype=torch.int64, device=device)


def normals(n: int, seed: int, offset: int, device: torch.device, dtype=torch.float32) -> torch.Tensor:
    return torch.ops.genkernels.normal(torch.empty(n, dtype=dtype, device=device), seed_tensor(seed, offset, device))


@pytest.mark.parametrize("n", [0, 1, 3, 4, 5, 1023, 1025, 4099])
def test_normal_stream_matches_reference(backend, n):
    seed, offset = -0x123456789ABCDEF, 2**40 + 7
    z = normals(n, seed, offset, backend.device)
    expected = reference.normal(n, seed, offset)
    # Box-Muller in float32 with the project's own log and sincos: a few ulp of |z| <= 5.8.
    torch.testing.assert_close(z.cpu().double(), expected, rtol=0, atol=4e-6)


def test_normal_large_block_boundaries():
    """The CPU kernel works in blocks of 1024 normals; the stream is one function of the index."""
    n = 3 * 1024 + 17
    z = normals(n, 5, 9, torch.device("cpu"))
    for start in (1000, 1024, 2047, 3072):
        torch.testing.assert_close(z[start:start + 10].double(), reference.normal(n, 5, 9)[start:start + 10], rtol=0, atol=4e-6)


def test_cpu_and_cuda_kernels_draw_identical_bits():
    """The same seed gives bit-identical noise on the CPU kernels and the CUDA kernels."""
    if genkernels._backend._C_emu is None and not torch.cuda.is_available():
        pytest.skip("needs the emulated CUDA module (GENKERNELS_EMULATION=ON) or a GPU")
    cpu = normals(4099, 77, 3, torch.device("cpu"))
    mu, logvar = torch.randn(4099), torch.randn(4099)
    seed = seed_tensor(11, 0, torch.device("cpu"))
    z_cpu = torch.ops.genkernels.reparameterize(mu, logvar, seed)
    if torch.cuda.is_available():
        cuda = normals(4099, 77, 3, torch.device("cuda")).cpu()
        z_cuda = torch.ops.genkernels.reparameterize(mu.cuda(), logvar.cuda(), seed.cuda()).cpu()
    else:
        with genkernels.emulated_cuda():
            cuda = normals(4099, 77, 3, torch.device("cpu"))
            z_cuda = torch.ops.genkernels.reparameterize(mu, logvar, seed)
    assert torch.equal(cpu, cuda)
    assert torch.equal(z_cpu, z_cuda)


def test_every_cpu_instruction_set_draws_identical_bits():
    """Each CPU build (baseline, AVX2, AVX-512) gives the same noise and samples."""
    script = (
        "import torch, genkernels, hashlib;"
        "z = torch.ops.genkernels.normal(torch.empty(5000), torch.tensor([3, 4]));"
        "mu = torch.linspace(-3, 3, 5000); r = torch.ops.genkernels.reparameterize(mu, mu.flip(0), torch.tensor([5, 6]));"
        "t = genkernels.sinusoidal_encoding(torch.arange(300), 130);"
        "print(genkernels._C.cpu_isa(), hashlib.sha256(z.numpy().tobytes() + r.numpy().tobytes() + t.numpy().tobytes()).hexdigest())"
    )
    digests = {}
    for isa in _C.cpu_isas_built.split(","):
        env = dict(os.environ, GENKERNELS_CPU_ISA=isa)
        out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True).stdout.split()
        digests[out[0]] = out[1]
    assert len(set(digests.values())) == 1, digests


def test_noise_is_standard_normal():
    from scipy import stats

    z = normals(1_000_000, 2024, 0, torch.device("cpu")).double()
    n = z.numel()
    assert abs(z.mean().item()) < 5 / n**0.5
    assert abs(z.var().item() - 1) < 5 * (2 / n) ** 0.5
    assert abs(stats.skew(z.numpy())) < 5 * (6 / n) ** 0.5
    assert abs(stats.kurtosis(z.numpy())) < 5 * (24 / n) ** 0.5
    assert stats.kstest(z.numpy(), "norm").pvalue > 1e-3


def test_box_muller_pairs_are_isotropic():
    # The two normals of one transform (elements 2i, 2i + 1) are a standard normal point of the
    # plane: its angle uniform on the circle (every one of the eight symmetries that carry the
    # arc drawn, and no seam where their images meet), its squared radius exponential of mean 2.
    from scipy import stats

    z = normals(2_000_000, 77, 3, torch.device("cpu")).double().reshape(-1, 2)
    angle = torch.atan2(z[:, 1], z[:, 0]).numpy()
    counts = torch.histc(torch.from_numpy(angle), bins=64, min=-math.pi, max=math.pi).numpy()
    assert stats.chisquare(counts).pvalue > 1e-3
    assert stats.kstest(angle, "uniform", args=(-math.pi, 2 * math.pi)).pvalue > 1e-3
    assert stats.kstest((z**2).sum(1).numpy(), "expon", args=(0, 2)).pvalue > 1e-3


def test_seeds_and_offsets_give_independent_streams():
    n = 200_000
    streams = [normals(n, 1, 0, torch.device("cpu")), normals(n, 2, 0, torch.device("cpu")),
               normals(n, 1, 1, torch.device("cpu")), normals(n, 1, 2**32, torch.device("cpu"))]
    bound = 5 / n**0.5
    for i in range(len(streams)):
        for j in range(i + 1, len(streams)):
            corr = torch.corrcoef(torch.stack([streams[i], streams[j]]))[0, 1].item()
            assert abs(corr) < bound, (i, j, corr)
    # Neighbouring elements (same counter, pairs of one Box-Muller transform) are uncorrelated too.
    z = streams[0]
    for lag in (1, 2, 3, 4):
        assert abs(torch.corrcoef(torch.stack([z[:-lag], z[lag:]]))[0, 1].item()) < bound


def test_manual_seed_and_generators_reproduce():
    torch.manual_seed(123)
    a = genkernels.randn(1000)
    torch.manual_seed(123)
    b = genkernels.randn(1000)
    assert torch.equal(a, b)
    assert not torch.equal(genkernels.randn(1000), genkernels.randn(1000))
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(genkernels.randn_like(a, generator=g1), genkernels.randn_like(a, generator=g2))


def test_randn_shapes_and_dtypes(backend):
    assert genkernels.randn(2, 3, device=backend.device).shape == (2, 3)
    assert genkernels.randn((4, 0), device=backend.device).shape == (4, 0)
    assert genkernels.randn([], device=backend.device).shape == ()
    for dtype in backend.float_dtypes():
        z = genkernels.randn(5000, dtype=dtype, device=backend.device)
        assert z.dtype == dtype and abs(z.float().mean().item()) < 0.1 and abs(z.float().std().item() - 1) < 0.1
    x = torch.empty(3, 4, dtype=torch.float64, device=backend.device)
    assert genkernels.randn_like(x).dtype == torch.float64


@pytest.mark.parametrize("shapes", [((1000,), (1000,)), ((4, 1, 3), (5, 3)), ((0, 3), (0, 3)), ((), ()), ((7, 9), (1,))])
def test_reparameterize_matches_reference(backend, shapes):
    for dtype in backend.float_dtypes():
        mu = torch.randn(shapes[0], device=backend.device).to(dtype)
        logvar = torch.randn(shapes[1], device=backend.device).to(dtype)
        z, eps = genkernels.reparameterize(mu, logvar, return_noise=True)
        assert z.shape == torch.broadcast_shapes(mu.shape, logvar.shape) and z.dtype == dtype
        expected = reference.reparameterize(mu.double(), logvar.double(), eps.double())
        tol = {torch.float32: 1e-6, torch.float64: 1e-14}.get(dtype) or 4 * low_precision_tol(dtype)
        torch.testing.assert_close(z.double(), expected, rtol=tol, atol=tol)


def test_reparameterize_non_contiguous(backend):
    mu = torch.randn(6, 8, device=backend.device).t()
    logvar = torch.randn(8, 6, device=backend.device)[:, ::1]
    g = torch.Generator().manual_seed(0)
    z, eps = genkernels.reparameterize(mu, logvar, generator=g, return_noise=True)
    torch.testing.assert_close(z, reference.reparameterize(mu, logvar, eps), rtol=1e-6, atol=1e-6)
    assert torch.equal(genkernels.reparameterize(mu.contiguous(), logvar, generator=torch.Generator().manual_seed(0)), z)


def test_reparameterize_gradients():
    mu = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    logvar = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    sample = lambda m, lv: genkernels.reparameterize(m, lv, generator=torch.Generator().manual_seed(1))  # noqa: E731
    assert torch.autograd.gradcheck(sample, (mu, logvar))
    # Broadcast parameters receive the summed gradient.
    mu1 = torch.randn(1, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(sample, (mu1, logvar))


@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "batchmean"])
def test_gaussian_kl_matches_reference(backend, reduction):
    for dtype in backend.float_dtypes():
        mu = torch.randn(37, 129, device=backend.device).to(dtype)
        logvar = torch.randn(37, 129, device=backend.device).to(dtype)
        out = genkernels.gaussian_kl(mu, logvar, reduction=reduction)
        expected = reference.gaussian_kl(mu.double(), logvar.double(), reduction=reduction)
        assert out.dtype == dtype and out.shape == expected.shape
        tol = {torch.float32: 2e-6, torch.float64: 1e-13}.get(dtype) or 8 * low_precision_tol(dtype)
        torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)


def test_gaussian_kl_empty_and_broadcast(backend):
    empty = torch.empty(0, 3, device=backend.device)
    assert genkernels.gaussian_kl(empty, empty).item() == 0
    assert genkernels.gaussian_kl(empty, empty, reduction="none").shape == (0, 3)
    mu, logvar = torch.randn(5, 3, device=backend.device), torch.zeros(1, device=backend.device)
    torch.testing.assert_close(genkernels.gaussian_kl(mu, logvar), reference.gaussian_kl(mu, logvar.expand(5, 3)))


def test_gaussian_kl_sum_does_not_depend_on_threads():
    mu, logvar = torch.randn(100_003), torch.randn(100_003)
    threads = torch.get_num_threads()
    try:
        sums = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            sums.append(genkernels.gaussian_kl(mu, logvar).item())
    finally:
        torch.set_num_threads(threads)
    assert sums[0] == sums[1] == sums[2]


@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "batchmean"])
def test_gaussian_kl_gradcheck(reduction):
    mu = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    logvar = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda m, lv: genkernels.gaussian_kl(m, lv, reduction=reduction), (mu, logvar))


@pytest.mark.parametrize(
    "call, error, words",
    [
        (lambda: genkernels.reparameterize(torch.ones(3, dtype=torch.int64), torch.ones(3)), TypeError, ["mu", "int64"]),
        (lambda: genkernels.reparameterize(torch.ones(3), torch.ones(3).double()), TypeError, ["logvar", "float64"]),
        (lambda: genkernels.reparameterize(torch.ones(3), torch.ones(4)), ValueError, ["broadcastable", "(3,)", "(4,)"]),
        (lambda: genkernels.reparameterize(torch.ones(3), "x"), TypeError, ["logvar", "torch.Tensor", "str"]),
        (lambda: genkernels.reparameterize(torch.ones(3), torch.ones(3), generator=5), TypeError, ["generator", "int"]),
        (lambda: genkernels.reparameterize(torch.ones(3, device="meta"), torch.ones(3)), ValueError, ["mu", "meta"]),
        (lambda: genkernels.gaussian_kl(torch.ones(3), torch.ones(3), reduction="avg"), ValueError, ["reduction", "avg"]),
        (lambda: genkernels.gaussian_kl(torch.ones(()), torch.ones(()), reduction="batchmean"), ValueError, ["batchmean"]),
        (lambda: genkernels.randn(2, -1), ValueError, ["size", "-1"]),
        (lambda: genkernels.randn(2, dtype=torch.int32), TypeError, ["dtype", "torch.int32"]),
        (lambda: genkernels.randn_like(torch.ones(2, dtype=torch.bfloat16)), TypeError, ["x", "bfloat16"]),
    ],
)
def test_bad_arguments(call, error, words):
    with pytest.raises(error) as info:
        call()
    for word in words:
        assert word in str(info.value)


def test_kernels_recheck_their_arguments():
    """The C++ layer rejects what the Python layer would never pass, instead of touching memory."""
    x = torch.empty(4)
    with pytest.raises(ValueError, match="negative"):
        _C.normal(1, 0, x.data_ptr(), -1, 0, torch.zeros(2, dtype=torch.int64).data_ptr())
    with pytest.raises(ValueError, match="null"):
        _C.reparameterize(1, 0, x.data_ptr(), 0, x.data_ptr(), 4, 0, torch.zeros(2, dtype=torch.int64).data_ptr())
    with pytest.raises(ValueError, match="dtype"):
        _C.gaussian_kl(1, 0, x.data_ptr(), x.data_ptr(), x.data_ptr(), 4, 99, False)
    with pytest.raises(ValueError, match="bfloat16"):
        _C.gaussian_kl(1, 0, x.data_ptr(), x.data_ptr(), x.data_ptr(), 4, 3, False)
    with pytest.raises(ValueError, match="dim"):
        _C.sinusoidal_encoding(1, 0, x.data_ptr(), x.data_ptr(), 1, 0, 0, 1.0, 1.0, 1.0, True, False)


def test_opcheck():
    ops = torch.ops.genkernels
    seed = torch.tensor([1, 2])
    torch.library.opcheck(ops.normal.default, (torch.empty(3, 5), seed))
    mu = torch.randn(4, 6, requires_grad=True)
    logvar = torch.randn(4, 6, requires_grad=True)
    torch.library.opcheck(ops.reparameterize.default, (mu, logvar, seed))
    for reduction in ("none", "sum", "mean", "batchmean"):
        torch.library.opcheck(ops.gaussian_kl.default, (mu, logvar, reduction))


def test_compile_fullgraph():
    def vae_loss(mu: torch.Tensor, logvar: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        z = genkernels.reparameterize(mu, logvar)
        return (z - x).square().sum() + genkernels.gaussian_kl(mu, logvar, reduction="batchmean")

    mu = torch.randn(8, 16, requires_grad=True)
    logvar = torch.randn(8, 16, requires_grad=True)
    loss = torch.compile(vae_loss, fullgraph=True)(mu, logvar, torch.randn(8, 16))
    loss.backward()
    assert mu.grad is not None and logvar.grad is not None and torch.isfinite(loss)
