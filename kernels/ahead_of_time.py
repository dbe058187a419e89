"""Every Triton kernel variant the engine can launch, compiled for NVIDIA GPUs on a machine without one.

    python -m kernels.ahead_of_time                       # sm_90 and sm_80: the resource and roofline table
    python -m kernels.ahead_of_time --arch 90 --json F    # one target, and the rows as JSON

Triton compiles ahead of time without a device: `triton.compile(ASTSource(...), target=GPUTarget("cuda", 90,
32))` gives PTX and a cubin (the Triton wheel ships ptxas). ptxas -v's report, which Triton prints when asked,
gives registers, the stack frame and spills; the wheel's cuobjdump gives the cubin's SASS. The stack frame is
not a spill: with Triton 3.6's ptxas it holds sin/cos's wide-argument reduction table, on a path that never
runs (see below); Triton 3.9's keeps that table in registers.

A variant is one op's kernel for one dtype it accepts, one constexpr branch, one autotune config and one
shape, with the argument specialisation Triton's JIT applies
at that shape: every pointer 16-byte aligned (CUDA allocations are), every integer that is a multiple of 16
marked divisible by 16, and `EVEN` as the launch computes it. The shapes are CIFAR-10's 3 x 32 x 32 (every
preset's images: a multiple of 16 elements) and an odd 3 x 7 x 7 (the general, unaligned path).

The roofline of a variant, per element of a sample, on each GPU of its architecture:
- memory: the bytes it must read and write (its operands' element sizes) at the GPU's DRAM bandwidth;
- issue: its SASS instructions per element at 4 warp-instructions per cycle per SM. The count is the hot
  path: instructions that a forward conditional branch skips are left out, which for these kernels are
  exactly sin/cos's wide-argument reduction (Box-Muller's angles lie in [0, 2 pi), so it never runs);
  the full static count is reported beside it;
- SFU: its MUFU instructions (log2, sqrt, reciprocal) at 16 per cycle per SM.
The slowest of the three bounds the kernel; `bound` names it.

Run with TRITON_INTERPRET unset: the interpreter replaces @triton.jit functions with Python ones, which
cannot be compiled (tests/test_ahead_of_time.py runs this module in a subprocess for that reason).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import io
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

from kernels import ddim_step, dpm_solver_step, noise_loss, posterior_step, q_sample, unipc_step
from kernels import triton_support
from kernels.triton_support import triton

ELEMENT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "u8": 1}
DATA_DTYPES = ("fp32", "bf16", "fp16")
NUM_TIMESTEPS = 1000


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    numel: int  # elements per sample
    width: int  # the last dimension (q_sample_uint8 mirrors along it)


SHAPES = (Shape("cifar", 3 * 32 * 32, 32), Shape("odd", 3 * 7 * 7, 7))


@dataclasses.dataclass(frozen=True)
class GPU:
    name: str
    arch: int
    bandwidth: float  # DRAM bytes/s
    sms: int
    clock: float  # boost clock, Hz


GPUS = (GPU("H100 SXM", 90, 3.35e12, 132, 1.98e9), GPU("H200", 90, 4.8e12, 132, 1.98e9),
        GPU("A100 SXM 80GB", 80, 2.039e12, 108, 1.41e9))


@dataclasses.dataclass(frozen=True)
class Family:
    """One Triton kernel: its constexpr branches and, per branch and data dtype, its pointers' types and traffic."""

    name: str
    kernel: Any  # the triton.autotune'd kernel
    branches: tuple[dict, ...]
    pointers: Callable[[dict, str], dict[str, str]]  # (branch, dtype) -> {pointer argument: Triton type}
    traffic: Callable[[dict, str], int]  # (branch, dtype) -> bytes read and written per element


def _q_sample_pointers(branch, dtype):
    source = "u8" if branch["FROM_UINT8"] else dtype  # the float launch passes x0 as the (unread) flip pointer
    return {"x0_ptr": source, "flip_ptr": "u8" if branch["FROM_UINT8"] else dtype, "out_ptr": dtype}


def _noise_loss_pointers(branch, dtype):  # forward: partial sums out; an unread operand is passed the prediction
    return {"prediction_ptr": dtype, "x0_ptr": dtype, "grad_loss_ptr": "fp32" if branch["BACKWARD"] else dtype,
            "out_ptr": dtype if branch["BACKWARD"] else "fp32"}


_DDIM_BRANCHES = tuple({"CLIP": clip, "CLIPPED_EPS": clipped, "NOISE": noise}
                       for clip, clipped in ((False, False), (True, False), (True, True)) for noise in (False, True))
_LOSS_BRANCHES = tuple({"HAS_X0": x0, "BACKWARD": backward} for x0 in (False, True) for backward in (False, True))


def _three_operands(branch, dtype):  # x_t and eps in, x_prev out
    return {"x_ptr": dtype, "eps_ptr": dtype, "out_ptr": dtype}


def _data_operands(kernel):
    """Every pointer of `kernel` but the per-sample indices and the weights takes the data dtype (the solvers)."""
    names = [name for name in kernel.fn.arg_names if name.endswith("_ptr")]
    return lambda branch, dtype: {name: dtype for name in names if name not in INDEX_POINTERS | {"coefficients_ptr"}}


# The solvers' branches the engine launches: 2M (one earlier x0), 3M (two), 2M SDE (one, and noise); UniPC-2, -3.
_DPM_BRANCHES = tuple({"HISTORY": history, "NOISE": noise, "CLIP": clip}
                      for history, noise in ((1, False), (2, False), (1, True)) for clip in (False, True))
_UNIPC_BRANCHES = tuple({"HISTORY": history, "CLIP": clip} for history in (2, 3) for clip in (False, True))


def families() -> tuple[Family, ...]:
    """The engine's six Triton kernels (call only where Triton is installed)."""
    return (Family("q_sample", q_sample._q_sample_kernel, ({"FROM_UINT8": False}, {"FROM_UINT8": True}),
                   _q_sample_pointers, lambda b, d: ELEMENT_BYTES["u8" if b["FROM_UINT8"] else d] + ELEMENT_BYTES[d]),
            Family("ddim_step", ddim_step._ddim_step_kernel, _DDIM_BRANCHES, _three_operands,
                   lambda b, d: 3 * ELEMENT_BYTES[d]),
            Family("noise_loss", noise_loss._noise_loss_kernel, _LOSS_BRANCHES, _noise_loss_pointers,
                   lambda b, d: (1 + b["HAS_X0"] + b["BACKWARD"]) * ELEMENT_BYTES[d]),
            Family("posterior_step", posterior_step._posterior_step_kernel, ({"CLIP": False}, {"CLIP": True}),
                   _three_operands, lambda b, d: 3 * ELEMENT_BYTES[d]),
            # reads x_t, the output and the earlier x0s; writes x_next and x0
            Family("dpm_solver_step", dpm_solver_step._dpm_solver_step_kernel, _DPM_BRANCHES,
                   _data_operands(dpm_solver_step._dpm_solver_step_kernel),
                   lambda b, d: (4 + b["HISTORY"]) * ELEMENT_BYTES[d]),
            # reads x_t, the output, x_last and the earlier x0s; writes x_corrected, x_next and x0
            Family("unipc_step", unipc_step._unipc_step_kernel, _UNIPC_BRANCHES,
                   _data_operands(unipc_step._unipc_step_kernel), lambda b, d: (6 + b["HISTORY"]) * ELEMENT_BYTES[d]))


def branch_flags(branch: dict) -> str:
    """The constexprs a branch sets: the names of the true flags, NAME=value for the integer ones (HISTORY)."""
    return ",".join(name if value is True else f"{name}={value}" for name, value in branch.items()
                    if value is not False) or "-"


INDEX_POINTERS = {"t_ptr", "t_prev_ptr", "keys_ptr"}  # per-sample int64; every other pointer is a float32 table


@dataclasses.dataclass(frozen=True)
class Variant:
    family: Family
    branch: dict
    dtype: str
    shape: Shape
    config: Any  # triton.Config

    @property
    def label(self) -> str:
        flags = branch_flags(self.branch)
        return (f"{self.family.name}[{flags}] {self.dtype} {self.shape.name} "
                f"BLOCK={self.config.kwargs['BLOCK']} warps={self.config.num_warps}")

    def scalars(self) -> dict[str, int | float]:
        numel = self.shape.numel
        smallest_block = min(config.kwargs["BLOCK"] for config in triton_support.ELEMENTWISE_CONFIGS)
        return {"numel": numel, "width": self.shape.width, "num_timesteps": NUM_TIMESTEPS, "eta": 0.5,
                "grad_scale": 2.0 / numel, "partials_per_sample": triton.cdiv(triton.cdiv(numel, 4), smallest_block)}

    def source(self):
        """The ASTSource the JIT would build for this launch: signature, constexprs and divisibility."""
        fn = self.family.kernel.fn
        constexprs = {**self.branch, "EVEN": triton_support.even(self.shape.numel), **self.config.kwargs}
        pointers, scalars = self.family.pointers(self.branch, self.dtype), self.scalars()
        signature, attrs = {}, {}
        for index, name in enumerate(fn.arg_names):
            if name in constexprs:
                signature[name] = "constexpr"
            elif name.endswith("_ptr"):
                signature[name] = "*" + ("i64" if name in INDEX_POINTERS else pointers.get(name, "fp32"))
                attrs[(index,)] = [["tt.divisibility", 16]]
            elif isinstance(scalars[name], float):
                signature[name] = "fp32"
            else:
                signature[name] = "i32"
                if scalars[name] % 16 == 0:
                    attrs[(index,)] = [["tt.divisibility", 16]]
        return triton.compiler.ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)

    def elements_per_thread(self) -> float:
        return 4 * self.config.kwargs["BLOCK"] / (32 * self.config.num_warps)  # a counter covers 4 elements


def variants() -> list[Variant]:
    return [Variant(family, branch, dtype, shape, config) for family in families() for branch in family.branches
            for dtype in DATA_DTYPES for shape in SHAPES for config in triton_support.ELEMENTWISE_CONFIGS]


# ----------------------------------------------------------------------------- compiling and reading the cubin


def nvidia_tool(name: str) -> Path | None:
    """ptxas, cuobjdump: the Triton wheel's own copies, else the CUDA toolkit's on PATH."""
    try:
        import triton.backends.nvidia as nvidia
    except ImportError:
        return None
    bundled = Path(nvidia.__file__).parent / "bin" / name
    found = bundled if bundled.exists() else shutil.which(name)
    return Path(found) if found else None


def unavailable() -> str | None:
    """Why kernels cannot be compiled for NVIDIA GPUs here, or None."""
    if triton is None:
        return "triton is not installed"
    if "nvidia" not in getattr(triton.backends, "backends", {}):
        return "this Triton has no NVIDIA backend"
    missing = [tool for tool in ("ptxas", "cuobjdump") if nvidia_tool(tool) is None]
    return f"{', '.join(missing)} not found" if missing else None


_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def read_sass(sass: str) -> list[tuple[int, bool, str, str]]:
    """(address, predicated, opcode, operands) per instruction, the padding NOPs and the final self-branch dropped."""
    rows = [(int(m[1], 16), bool(m[2]), m[3], m[4].strip()) for m in _INSTRUCTION.finditer(sass)]
    while rows and (rows[-1][2] == "NOP" or (rows[-1][2] == "BRA" and not rows[-1][1])):
        rows.pop()
    return rows


def hot_path(rows) -> int:
    """Instructions left when every forward conditional branch skips what it can (see the module docstring)."""
    skipped = set()
    for address, predicated, opcode, operands in rows:
        target = re.match(r"(?:`\()?(0x[0-9a-f]+)", operands)
        if predicated and opcode == "BRA" and target and int(target[1], 16) > address:
            skipped.update(a for a, *_ in rows if address < a < int(target[1], 16))
    return sum(1 for address, *_ in rows if address not in skipped)


def _cuobjdump(cubin: bytes, *options: str) -> str:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "kernel.cubin"
        path.write_bytes(cubin)
        return subprocess.run([str(nvidia_tool("cuobjdump")), *options, str(path)], capture_output=True, text=True,
                              check=True).stdout


_PTXAS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads"
                    r"[\s\S]*?Used (\d+) registers")


def _compile_with_ptxas_log(source, arch: int, options: dict):
    """triton.compile, also returning what ptxas -v said of it (Triton prints that log when asked: both knobs exist
    in Triton 3.6 and 3.9). The cache is bypassed, since a cached kernel runs no ptxas."""
    from triton.backends.compiler import GPUTarget

    nvidia, compilation = triton.knobs.nvidia, triton.knobs.compilation
    saved = nvidia.dump_ptxas_log, compilation.always_compile
    nvidia.dump_ptxas_log, compilation.always_compile = True, True
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    finally:
        nvidia.dump_ptxas_log, compilation.always_compile = saved
    report = _PTXAS.search(log.getvalue())
    if report is None:
        raise RuntimeError(f"no ptxas report for {source.name} on sm_{arch}:\n{log.getvalue()[-2000:]}")
    stack, spill_stores, spill_loads, registers = map(int, report.groups())
    return kernel, {"registers": registers, "spill_bytes": spill_stores + spill_loads, "stack_bytes": stack}


def _widest(rows, prefix: str) -> int:
    """The widest global access (bits) among instructions starting with `prefix` (LDG, STG)."""
    widths = [int(w) if w else 32 for _, _, opcode, _ in rows if opcode.startswith(prefix)
              for w in [next(iter(re.findall(r"\.(64|128)\b", opcode)), "")]]
    return max(widths, default=0)


def _compile_options(config) -> dict:
    return {"num_warps": config.num_warps, "num_stages": config.num_stages,
            **({"maxnreg": config.maxnreg} if getattr(config, "maxnreg", None) else {})}


def compile_key(variant: Variant, arch: int) -> str:
    """What decides a variant's cubin: the kernel's source and specialisation (Triton's own hash of them), the
    compile options, the target and the Triton release (which ships the ptxas). Equal keys, equal cubins."""
    text = json.dumps([variant.source().hash(), _compile_options(variant.config), arch, triton.__version__])
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def compile_variant(variant: Variant, arch: int, sass: bool = True) -> dict:
    """Compile for sm_`arch`: registers, spills and stack from ptxas, shared memory, vector accesses in the PTX, and
    with `sass` the instruction mix of the cubin (the slower part: the tests read the rest only)."""
    kernel, resources = _compile_with_ptxas_log(variant.source(), arch, _compile_options(variant.config))
    row = {"kernel": variant.family.name, "branch": variant.branch, "dtype": variant.dtype, "shape": variant.shape.name,
           "block": variant.config.kwargs["BLOCK"], "num_warps": variant.config.num_warps, "arch": arch, **resources,
           "shared_bytes": kernel.metadata.shared, "bytes_per_element": variant.family.traffic(variant.branch, variant.dtype),
           "vector_ptx": bool(re.search(r"(ld|st)\.global(\.nc)?\.v[24]", kernel.asm["ptx"]))}
    if sass:
        rows, per_element = read_sass(_cuobjdump(kernel.asm["cubin"], "-sass")), variant.elements_per_thread()
        row.update(widest_load_bits=_widest(rows, "LDG"), widest_store_bits=_widest(rows, "STG"),
                   instructions=len(rows), hot_instructions_per_element=round(hot_path(rows) / per_element, 2),
                   mufu_per_element=round(sum(1 for r in rows if r[2].startswith("MUFU")) / per_element, 2))
    return row


def roofline(row: dict, gpu: GPU) -> dict:
    """Elements/s under each bound on `gpu`, the binding one, and its effective bandwidth (GB/s)."""
    bounds = {"memory": gpu.bandwidth / row["bytes_per_element"],
              "issue": gpu.sms * gpu.clock * 4 * 32 / row["hot_instructions_per_element"],
              "sfu": gpu.sms * gpu.clock * 16 / row["mufu_per_element"] if row["mufu_per_element"] else float("inf")}
    bound = min(bounds, key=bounds.get)
    return {"gpu": gpu.name, "bound": bound, "elements_per_s": bounds[bound],
            "roofline_gb_per_s": round(bounds[bound] * row["bytes_per_element"] / 1e9, 1),
            "memory_gb_per_s": round(gpu.bandwidth / 1e9, 1),
            "issue_gb_per_s": round(bounds["issue"] * row["bytes_per_element"] / 1e9, 1)}


def compile_all(archs=(90, 80), select: Callable[[Variant], bool] = lambda v: True, progress=None) -> list[dict]:
    """Every variant for every architecture, each row with its rooflines on that architecture's GPUs."""
    rows = []
    for arch in archs:
        for variant in filter(select, variants()):
            row = compile_variant(variant, arch)
            row["rooflines"] = [roofline(row, gpu) for gpu in GPUS if gpu.arch == arch]
            rows.append(row)
            if progress:
                progress(variant, row)
    return rows


def seconds_per_element(name: str, branch: dict, dtype: str, shape: Shape, gpu: GPU) -> float:
    """The kernel's roofline at `shape` on `gpu`: the least time per element any autotune config allows."""
    family = next(f for f in families() if f.name == name)
    return min(1.0 / roofline(compile_variant(Variant(family, branch, dtype, shape, config), gpu.arch), gpu)["elements_per_s"]
               for config in triton_support.ELEMENTWISE_CONFIGS)


# ----------------------------------------------------------------------------- the table


def markdown(rows: list[dict]) -> str:
    """One line per kernel, branch, dtype, shape and architecture: the autotune configs' range of registers, and
    the best config's roofline (the autotuner picks among them on the device)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        flags = branch_flags(row["branch"])
        groups.setdefault((row["kernel"], flags, row["dtype"], row["shape"], row["arch"]), []).append(row)
    lines = ["| kernel [branch] | dtype | shape | sm | registers | spills | widest load / store (bits) | "
             "instructions / element (hot) | MUFU / element | bytes / element | roofline (GPU: GB/s, bound) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for (kernel, flags, dtype, shape, arch), group in groups.items():
        best = min(group, key=lambda r: r["hot_instructions_per_element"])
        registers = sorted({r["registers"] for r in group})
        roofs = "; ".join(f"{roof['gpu']}: {roof['roofline_gb_per_s']:.0f}, {roof['bound']}" for roof in best["rooflines"])
        lines.append(f"| {kernel} [{flags}] | {dtype} | {shape} | {arch} | {registers[0]}-{registers[-1]} | "
                     f"{max(r['spill_bytes'] for r in group)} | {best['widest_load_bits']} / {best['widest_store_bits']} | "
                     f"{best['hot_instructions_per_element']} | {best['mufu_per_element']} | {best['bytes_per_element']} | "
                     f"{roofs} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80], help="compute capabilities (default 90 80)")
    parser.add_argument("--kernel", nargs="*", default=None, help="only these kernels (default: all)")
    parser.add_argument("--json", type=Path, default=None, help="write every variant's row here")
    parser.add_argument("--markdown", type=Path, default=None, help="write the table here (default: print it)")
    args = parser.parse_args(argv)
    if triton_support.interpreting():
        parser.error("TRITON_INTERPRET is set: the interpreter's kernels cannot be compiled; unset it")
    reason = unavailable()
    if reason:
        print(f"cannot compile for NVIDIA GPUs here: {reason}", file=sys.stderr)
        return 2
    select = (lambda v: v.family.name in args.kernel) if args.kernel else (lambda v: True)
    rows = compile_all(tuple(args.arch), select, progress=lambda v, row: print(
        f"sm_{row['arch']} {v.label}: {row['registers']} registers, {row['spill_bytes']} B spilled", file=sys.stderr))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    table = markdown(rows)
    if args.markdown:
        args.markdown.write_text(table)
    else:
        print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
