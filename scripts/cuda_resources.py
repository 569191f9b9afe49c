#!/usr/bin/env python3
"""Resources of every CUDA kernel as ptxas reports them, for sm_80 and sm_90.

Compiles each csrc/**/*.cu with nvcc (warnings are errors), reads the ``-Xptxas -v`` report of
every kernel (registers, shared memory, stack frame, spill stores and loads, barriers) and
writes one sorted line per kernel and architecture to csrc/cuda_resources.txt, so that a
change in register pressure or a new spill shows up in review.

    python scripts/cuda_resources.py            # regenerate csrc/cuda_resources.txt
    python scripts/cuda_resources.py --check    # also fail on warnings, and on spills or a
                                                # stack frame in the kernels of csrc/hot_kernels.txt

csrc/hot_kernels.txt holds one pattern per line, matched against the demangled kernel name
(e.g. ``gk::(anonymous)::normal_kernel<float>``): a glob, or a regular expression after
``re:``; a leading ``!`` excludes the kernels it matches; ``#`` starts a comment. A pattern
that matches no kernel fails the check too, so that a renamed kernel is not dropped silently.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
DEFAULT_OUT = CSRC / "cuda_resources.txt"
HOT_KERNELS = CSRC / "hot_kernels.txt"
ARCHS = ("80", "90")
WORKERS = 2

ENTRY = re.compile(r"^ptxas info\s*: Compiling entry function '(\S+)' for 'sm_(\d+)'")
PROPERTIES = re.compile(r"^ptxas info\s*: Function properties for (\S+)")
FRAME = re.compile(r"^\s+(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
USAGE = re.compile(r"^ptxas info\s*: Used (\d+) registers")
# Informational lines of the ptxas report; anything else nvcc prints is a diagnostic.
REPORT = re.compile(r"^(ptxas info\s*:|\s+\d+ bytes stack frame)")


@dataclass
class Kernel:
    source: str
    mangled: str
    arch: str
    registers: int = 0
    smem: int = 0
    stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    barriers: int = 0
    name: str = ""


@dataclass
class Compiled:
    source: str
    returncode: int
    diagnostics: list[str]
    kernels: list[Kernel]


def find_nvcc() -> Optional[str]:
    """nvcc from $CUDACXX, PATH or /usr/local/cuda/bin, or None."""
    candidates = [os.environ.get("CUDACXX"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def nvcc_command(nvcc: str, source: Path) -> list[str]:
    gencode = [f for arch in ARCHS for f in ("-gencode", f"arch=compute_{arch},code=sm_{arch}")]
    return [nvcc, *gencode, "-std=c++17", f"-I{CSRC}", "--expt-relaxed-constexpr", "-Werror", "all-warnings",
            "-Xcompiler=-Wall,-Wextra,-Wshadow,-Werror", "-Xptxas", "-v", "-c", "-o", os.devnull, str(source)]


def parse_report(source: str, lines: list[str]) -> list[Kernel]:
    """The kernels of one ptxas report. Functions that a kernel calls without inlining get a
    properties block too; only the blocks of the entry function being compiled are kept."""
    kernels: list[Kernel] = []
    current: Optional[Kernel] = None
    in_entry = False
    for line in lines:
        if m := ENTRY.match(line):
            current = Kernel(source, m.group(1), f"sm_{m.group(2)}")
            kernels.append(current)
        elif m := PROPERTIES.match(line):
            in_entry = current is not None and m.group(1) == current.mangled
        elif current is None or not in_entry:
            continue
        elif m := FRAME.match(line):
            current.stack, current.spill_stores, current.spill_loads = map(int, m.groups())
        elif m := USAGE.match(line):
            current.registers = int(m.group(1))
            current.smem = int(m.group(1)) if (m := re.search(r"(\d+) bytes smem", line)) else 0
            current.barriers = int(m.group(1)) if (m := re.search(r"used (\d+) barriers", line)) else 0
    return kernels


def compile_file(nvcc: str, source: Path) -> Compiled:
    result = subprocess.run(nvcc_command(nvcc, source), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    lines = result.stdout.splitlines()
    relative = source.relative_to(ROOT).as_posix()
    diagnostics = [line for line in lines if line.strip() and not REPORT.match(line)]
    return Compiled(relative, result.returncode, diagnostics, parse_report(relative, lines))


def demangle(kernels: list[Kernel], cxxfilt: str) -> None:
    """Sets each kernel's readable name: no parameters, `(anonymous)` for the anonymous
    namespace (whose mangled name carries a hash of the file), and no spaces, so that the
    report splits into columns on white space."""
    mangled = "".join(k.mangled + "\n" for k in kernels)
    names = subprocess.run([cxxfilt, "-p"], input=mangled, stdout=subprocess.PIPE, text=True, check=True).stdout
    for kernel, name in zip(kernels, names.splitlines()):
        name = name.replace("(anonymous namespace)", "(anonymous)")
        kernel.name = re.sub(r"_GLOBAL__N__\w+", "(anonymous)", name).replace(", ", ",")


def format_table(kernels: list[Kernel], nvcc_version: str) -> str:
    header = ["# kernel", "arch", "registers", "smem", "stack", "spill_st", "spill_ld", "barriers", "source"]
    rows = [[k.name, k.arch, str(k.registers), str(k.smem), str(k.stack), str(k.spill_stores), str(k.spill_loads),
             str(k.barriers), k.source] for k in sorted(kernels, key=lambda k: (k.source, k.name, k.arch))]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        # Names left-aligned, numbers right-aligned, the source last.
        out = [cells[0].ljust(widths[0]), cells[1].ljust(widths[1])]
        out += [c.rjust(w) for c, w in zip(cells[2:-1], widths[2:-1])]
        return "  ".join([*out, cells[-1]])

    lines = [
        "# Resources of every CUDA kernel, one line per kernel and architecture, as reported by",
        f"# ptxas -v of {nvcc_version}. smem (static shared memory), stack (stack frame)",
        "# and spill stores/loads are in bytes. Generated by scripts/cuda_resources.py: after",
        "# changing a kernel, regenerate with `python scripts/cuda_resources.py` and review the diff.",
        "#",
        line(header),
        *(line(r) for r in rows),
    ]
    return "\n".join(lines) + "\n"


def hot_patterns(path: Path) -> list[tuple[bool, str]]:
    """(excluded, pattern) for each pattern line of hot_kernels.txt."""
    patterns = []
    for raw in path.read_text().splitlines():
        text = raw.split("#", 1)[0].strip()
        if text:
            patterns.append((text.startswith("!"), text.removeprefix("!").strip()))
    return patterns


def matches(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.search(pattern[3:].strip(), name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def is_hot(name: str, patterns: list[tuple[bool, str]]) -> bool:
    included = any(matches(p, name) for excluded, p in patterns if not excluded)
    return included and not any(matches(p, name) for excluded, p in patterns if excluded)


def nvcc_release(nvcc: str) -> str:
    out = subprocess.run([nvcc, "--version"], stdout=subprocess.PIPE, text=True).stdout
    m = re.search(r"release [\d.]+, V[\d.]+", out)
    return f"nvcc {m.group(0)}" if m else "nvcc (unknown version)"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true",
                        help="fail on any warning and on spills or a stack frame in a hot kernel")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="table to write (default: csrc/cuda_resources.txt)")
    args = parser.parse_args(argv)

    nvcc, cxxfilt = find_nvcc(), shutil.which("c++filt")
    if nvcc is None or cxxfilt is None:
        print("cuda_resources: needs nvcc (on PATH, $CUDACXX or /usr/local/cuda/bin) and c++filt", file=sys.stderr)
        return 2
    sources = sorted(CSRC.rglob("*.cu"))
    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        results = list(pool.map(lambda s: compile_file(nvcc, s), sources))

    problems = [f"{r.source}: {d}" for r in results for d in r.diagnostics]
    failed = [f"{r.source}: nvcc failed (exit {r.returncode})" for r in results if r.returncode != 0]
    if failed:
        print("\n".join(problems + failed), file=sys.stderr)
        return 1

    kernels = [k for r in results for k in r.kernels]
    demangle(kernels, cxxfilt)
    args.out.write_text(format_table(kernels, nvcc_release(nvcc)))
    print(f"cuda_resources: {len(kernels)} kernel builds from {len(sources)} files written to {args.out}")
    if not args.check:
        if problems:
            print("\n".join(problems), file=sys.stderr)
        return 0

    patterns = hot_patterns(HOT_KERNELS)
    for excluded, pattern in patterns:
        if not excluded and not any(matches(pattern, k.name) for k in kernels):
            problems.append(f"{HOT_KERNELS.name}: '{pattern}' matches no kernel")
    for k in sorted(kernels, key=lambda k: (k.name, k.arch)):
        if is_hot(k.name, patterns) and (k.stack or k.spill_stores or k.spill_loads):
            problems.append(f"hot kernel {k.name} ({k.arch}): {k.stack} bytes stack frame, "
                            f"{k.spill_stores} bytes spill stores, {k.spill_loads} bytes spill loads")
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 1
    print("cuda_resources: no warnings; no spills or stack frames in the hot kernels")
    return 0


if __name__ == "__main__":
    sys.exit(main())
