"""The installation: what info() reports, the command line, and the link-time independence from torch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import genkernels
from genkernels import _backend


def test_info_fields():
    info = genkernels.info()
    assert info["version"] == genkernels.__version__
    assert info["modules"]["_C"] is True
    assert info["cpu_isa"] in info["cpu_isas_built"]
    assert info["cpu_threads"] == torch.get_num_threads()
    assert isinstance(info["cuda_available"], bool)
    if info["modules"]["_C_cuda"]:
        assert set(info["cuda_archs"]) >= {"sm_80", "sm_86", "sm_89", "sm_90"}
    else:
        assert info["cuda_archs"] == []


def test_info_command():
    out = subprocess.run([sys.executable, "-m", "genkernels", "info"], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["version"] == genkernels.__version__


@pytest.mark.skipif(_backend._C_cuda is None, reason="the CUDA module is built only where nvcc exists")
def test_cuda_module_imports_without_a_driver():
    """With no GPU the CUDA module still imports; info says CUDA cannot run now."""
    env = {"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"}
    script = "import genkernels, json; print(json.dumps(genkernels.info()))"
    info = json.loads(subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True).stdout)
    assert info["modules"]["_C_cuda"] is True and info["cuda_available"] is False


def test_compiled_modules_do_not_link_torch():
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("readelf is not installed")
    modules = list(Path(genkernels.__file__).parent.glob("_C*.so"))
    assert modules
    for module in modules:
        needed = subprocess.run([readelf, "-d", str(module)], capture_output=True, text=True, check=True).stdout
        for lib in ("libtorch", "libc10", "libcudart.so"):
            assert lib not in needed, f"{module.name} links {lib}"


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux's /proc")
def test_cpu_kernels_run_on_torchs_openmp_threads():
    """One OpenMP runtime in the process, and a parallel kernel starts no threads of its own: it
    runs on the threads PyTorch's CPU ops use (common/parallel.h)."""
    script = """
import os, re, torch, genkernels
torch.set_num_threads(2)
x = torch.randn(1 << 20)
(x + 1).sum()  # starts PyTorch's OpenMP threads
before = len(os.listdir("/proc/self/task"))
genkernels.randn_like(x)
after = len(os.listdir("/proc/self/task"))
runtimes = {line.split()[-1] for line in open("/proc/self/maps") if re.search(r"/lib[gi]?omp[^/]*$", line.strip())}
print(before, after, len(runtimes))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    before, after, runtimes = map(int, out)
    assert runtimes == 1
    assert after == before


def test_unsupported_device_gives_clear_error():
    with pytest.raises(ValueError, match="cpu and cuda"):
        _backend.launch_for(torch.empty(2, device="meta"))


class _Recorder(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _through_dispatcher(monkeypatch, call) -> bool:
    """Whether `call` reaches the registered op of add_positional_encoding (its custom op's
    `op`), rather than calling the implementation directly."""
    from genkernels import positional

    calls = []
    op = positional._add_positional_encoding.op
    monkeypatch.setattr(positional._add_positional_encoding, "op", lambda *a: calls.append(1) or op(*a))
    call()
    return bool(calls)


def test_eager_inference_calls_the_kernel_directly(monkeypatch):
    x = torch.randn(2, 5, 8)
    direct = genkernels.add_positional_encoding(x, offset=3)
    assert not _through_dispatcher(monkeypatch, lambda: genkernels.add_positional_encoding(x))
    with torch.no_grad():
        assert not _through_dispatcher(monkeypatch, lambda: genkernels.add_positional_encoding(x.requires_grad_()))
    x.requires_grad_(False)
    with _Recorder() as recorder:
        via_op = genkernels.add_positional_encoding(x, offset=3)
    assert "genkernels.add_positional_encoding.default" in recorder.ops
    torch.testing.assert_close(direct, via_op, rtol=0, atol=0)


def test_eager_training_calls_the_kernel_under_autograd(monkeypatch):
    """An input that needs a gradient: the kernel runs directly under an autograd.Function made of
    the op's registered backward, and the gradients equal those through the op."""
    x = torch.randn(2, 5, 8)
    direct_x, op_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    assert not _through_dispatcher(monkeypatch, lambda: (genkernels.add_positional_encoding(direct_x, x_scale=1.5) ** 2).sum().backward())
    (torch.ops.genkernels.add_positional_encoding(op_x, 0, 10000.0, True, 1.5) ** 2).sum().backward()
    torch.testing.assert_close(direct_x.grad, op_x.grad, rtol=0, atol=0)


def test_calls_that_need_the_dispatcher_go_through_the_op(monkeypatch):
    x = torch.randn(2, 5, 8)
    assert _through_dispatcher(monkeypatch, lambda: genkernels.add_positional_encoding(torch.nn.Parameter(x)))
    with torch.profiler.profile():
        assert _through_dispatcher(monkeypatch, lambda: genkernels.add_positional_encoding(x))
    with torch._subclasses.FakeTensorMode() as mode:
        fake = mode.from_tensor(x)
        assert _through_dispatcher(monkeypatch, lambda: genkernels.add_positional_encoding(fake))
    assert _through_dispatcher(monkeypatch, lambda: torch.func.vmap(genkernels.add_positional_encoding)(x[:, None]))
    assert _through_dispatcher(monkeypatch, lambda: torch.jit.trace(genkernels.add_positional_encoding, (x,)))
