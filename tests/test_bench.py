"""Tests of the benchmark harness, ``python -m genkernels bench``: quick runs end to end, the
JSON it writes, the printed tables, and the case list (the same cases feed
``benchmarks/test_ops.py``)."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys

import pytest
import torch

from genkernels import bench
from genkernels.__main__ import main

QUICK = ["bench", "--quick", "--device", "cpu", "--repeat", "1"]
CPU_QUICK = bench.Settings.make(torch.device("cpu"), quick=True, repeat=1)


def _matmul_case(**overrides) -> bench.Case:
    """A small case outside the standard list, declaring flops."""
    fields = dict(
        name="matmul",
        shape="({n}, {n})",
        inputs=lambda device, n: (torch.randn(n, n, device=device), torch.randn(n, n, device=device)),
        genkernels=torch.mm,
        reference=lambda a, b: a @ b,
        bytes_moved=lambda n: 3 * bench.F32 * n * n,
        flops=lambda n: 2.0 * n**3,
        full=dict(n=64),
        quick=dict(n=32),
        tiny=dict(n=4),
        target=bench.Target(speedup=0.01),
    )
    fields.update(overrides)
    return bench.Case(**fields)


def test_quick_run_prints_tables_and_writes_json(tmp_path, capsys):
    path = tmp_path / "out.json"
    assert main([*QUICK, "--json", str(path)]) == 0
    out = capsys.readouterr().out

    assert out.index("ceilings: copy") < out.index("genkernels ms")  # ceilings come first
    for column in ("shape", "eager ms", "vs eager", "compiled ms", "vs compiled", "GB/s", "% copy BW", "GFLOP/s", "target"):
        assert column in out
    assert "per-call overhead" in out
    for case in bench.CASES:
        rows = [line for line in out.splitlines() if line.split()[:1] == [case.name]]
        if "cpu" not in case.devices:  # listed, with a note, but not timed
            assert len(rows) == 1 and f"{case.name}: not run on cpu" in out
            continue
        assert len(rows) == 2 + (case.common is not None)  # main, overhead (and share) tables
    assert ">= 8x, >= 50% BW" in out

    data = json.loads(path.read_text())
    assert {"machine", "settings", "ceilings", "cases"} <= set(data)
    machine = data["machine"]
    assert machine["cpu"] and machine["threads"] >= 1 and machine["torch"] == torch.__version__
    assert machine["allocator"] in ("glibc", "tcmalloc", "jemalloc", "mimalloc", "system", "unknown")
    assert machine["genkernels"]["version"]
    assert data["settings"] == {"device": "cpu", "quick": True, "repeat": 1, "compile": False, "statistic": "min"}
    assert data["ceilings"]["copy_gbps"] > 0 and data["ceilings"]["matmul_gflops"] > 0

    assert [c["name"] for c in data["cases"]] == [c.name for c in bench.CASES]
    for c in data["cases"]:
        if c["notes"] == ["not run on cpu"]:
            assert c["genkernels"] is None and c["eager"] is None
            continue
        for impl in ("genkernels", "eager"):
            assert 0 < c[impl]["min_ms"] <= c[impl]["median_ms"]
            assert c[impl]["repeats"] == 1 and c[impl]["number"] >= 1
        assert c["compiled"] is None and c["speedup_compiled"] is None
        assert c["speedup_eager"] > 0
        assert (c["bytes"] > 0 and c["gbps"] > 0 and c["bandwidth_fraction"] > 0) or c["common"]["min_ms"] > 0
        assert c["target_met"] is None  # targets are for the full sizes
        assert set(c["overhead_us"]) == {"genkernels", "eager"}


def test_command_line_in_a_subprocess(tmp_path):
    path = tmp_path / "out.json"
    done = subprocess.run(
        [sys.executable, "-m", "genkernels", *QUICK, "--filter", "RANDN", "--json", str(path)],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "randn_like" in done.stdout and "reparameterize" not in done.stdout
    assert [c["name"] for c in json.loads(path.read_text())["cases"]] == ["randn_like"]


def test_filter_without_match_fails(capsys):
    assert main([*QUICK, "--filter", "no-such-case"]) == 1
    assert "no case matches" in capsys.readouterr().err


def test_models_flag_runs_the_model_cases(capsys):
    assert main([*QUICK, "--models", "--filter", "vae_train"]) == 0
    out = capsys.readouterr().out
    assert "genkernels backend against the torch backend" in out
    assert [line.split()[:2] for line in out.splitlines() if line.startswith("vae_train_step")][-1] == ["vae_train_step", "steps"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available")
def test_cuda_without_cuda_fails(capsys):
    assert main([*QUICK, "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_cases_are_well_formed():
    names = [c.name for c in bench.CASES]
    assert len(set(names)) == len(names)
    for case in bench.CASES:
        for scale in ("full", "quick", "tiny"):
            size = case.size(scale)
            case.shape.format(**size)
            assert case.bytes_moved(**size) > 0 or case.common is not None  # loops: no byte count


@pytest.mark.parametrize("case", bench.CASES, ids=lambda c: c.name)
def test_case_computes_what_its_reference_does(case):
    args = case.inputs(torch.device("cpu"), **case.quick)
    ours, theirs = case.genkernels(*args), case.reference(*args)
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    assert torch.isfinite(ours).all()
    if case.exact:
        # 16-bit cases: a few units in the last place of the largest value (rounding differs).
        low = ours.dtype in (torch.float16, torch.bfloat16)
        atol = 4 * torch.finfo(ours.dtype).eps * theirs.abs().max().item() if low else 1e-4
        torch.testing.assert_close(ours, theirs, rtol=0.0 if low else 1e-4, atol=atol)


@pytest.mark.parametrize("case", bench.CASES, ids=lambda c: c.name)
def test_tiny_size_has_16_elements(case):
    args = case.inputs(torch.device("cpu"), **case.tiny)
    tensors = [a for a in args if isinstance(a, torch.Tensor)] + [case.genkernels(*args)]
    assert max(t.numel() for t in tensors) == 16


def test_measure_repeats_and_calls():
    calls = []
    timing = bench.measure(lambda: calls.append(1), bench.Settings(torch.device("cpu"), repeat=4, warmup_s=0.0, batch_s=0.0))
    assert timing.repeats == 4 and timing.number == 1
    assert len(calls) == 2 + 4  # two warm-up calls, then one per repeat
    assert 0 <= timing.min_ms <= timing.median_ms


def test_flops_speedups_and_targets_are_derived(monkeypatch, capsys):
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)  # stands in for inductor
    settings = bench.Settings(torch.device("cpu"), quick=False, repeat=2, compile=True, warmup_s=0.0, batch_s=0.001)
    ceilings = bench.Ceilings(copy_bytes=1, copy_gbps=1.0, matmul_n=1, matmul_gflops=1.0)
    result = bench.run_case(_matmul_case(), settings, ceilings)

    assert result.shape == "(64, 64)" and result.flops == 2.0 * 64**3
    assert result.compiled is not None and result.compile_s is not None
    assert result.speedup_compiled == pytest.approx(result.compiled.min_ms / result.genkernels.min_ms)
    assert result.gflops == pytest.approx(result.flops / (result.genkernels.min_ms * 1e-3) / 1e9)
    assert result.bandwidth_fraction == pytest.approx(result.gbps)
    assert result.target_met is True

    bench.print_results([result], settings)
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("matmul"))
    cells = re.split(r"\s{2,}", row)
    assert len(cells) == 11 and cells[1] == "(64, 64)"
    assert cells[4].endswith("x") and cells[6].endswith("x")  # vs eager, vs compiled
    assert cells[9] != "-" and cells[10] == ">= 0.01x met"  # GFLOP/s, target


def test_compile_failure_is_a_note(monkeypatch, capsys):
    def broken(fn, **kwargs):
        raise RuntimeError("no C++ compiler found\nmore detail")

    monkeypatch.setattr(torch, "compile", broken)
    settings = dataclasses.replace(CPU_QUICK, compile=True)
    result = bench.run_case(_matmul_case(), settings)
    assert result.compiled is None and result.speedup_compiled is None
    assert result.notes == ["compile failed: RuntimeError: no C++ compiler found"]
    bench.print_results([result], settings)
    assert "matmul: compile failed: RuntimeError" in capsys.readouterr().out


def test_targets():
    target = bench.Target(speedup=8, bandwidth=0.5)
    assert str(target) == ">= 8x, >= 50% BW"
    assert target.met(9.0, 0.6) is True
    assert target.met(9.0, 0.4) is False
    assert target.met(None, 0.6) is None
    assert bench.Target().met(1.0, 1.0) is None and str(bench.Target()) == ""


def test_bench_is_not_imported_by_genkernels_and_imports_nothing_heavy():
    code = (
        "import sys, genkernels\n"
        "assert 'genkernels.bench' not in sys.modules\n"
        "import genkernels.bench\n"
        "heavy = [m for m in ('torch._dynamo', 'torch._inductor', 'pytest_benchmark') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("case", bench.MODEL_CASES, ids=lambda c: c.name)
def test_model_case_backends_compute_the_same(case):
    fast, slow = case.inputs(torch.device("cpu"), **case.quick)
    torch.manual_seed(0)
    ours = case.genkernels(fast, slow)
    torch.manual_seed(0)
    theirs = case.reference(fast, slow)
    if ours.dtype == torch.long:  # generated tokens
        assert torch.equal(ours, theirs)
    else:  # the loss of the first training step
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
