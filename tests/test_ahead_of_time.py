"""Every Triton kernel variant compiled for Hopper (sm_90) and Ampere (sm_80) on this GPU-less machine (issue 14).

kernels.ahead_of_time compiles through Triton's NVIDIA backend (ptxas ships in the wheel) and reads the cubin
with the wheel's cuobjdump. It runs in a subprocess: this test session runs Triton in its interpreter, whose
kernels cannot be compiled.
"""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

GOLDEN = ROOT / "tests" / "golden" / "ahead_of_time.json"
REGENERATE = "python -m pytest tests/test_ahead_of_time.py --regenerate-golden"

# Every kernel, branch and dtype for both targets at the engine's image shapes (a multiple of 16 elements: the
# aligned path): every autotune config for Hopper, the machines the engine targets, and for Ampere the one with
# the most elements per thread (the most registers: where sm_80 spilled before, RESULTS.md); the unaligned path
# with the first config for Hopper. That is 360 compiles, most of a second each on this CPU, so their results
# are kept in tests/golden/ahead_of_time.json under a key of everything that decides a cubin (Triton's hash of
# the kernel source and specialisation, the options, the target, the Triton release). A run compiles the
# variants whose key is not stored (a changed kernel, another Triton) and, for each kernel and target, again
# the stored variant with the most registers, which must come out exactly as stored. The instruction mix
# (SASS), and every config and shape for both targets, are left to `python -m kernels.ahead_of_time`.
_COMPILE = """
import json, sys
from kernels import ahead_of_time as aot
stored = json.loads(sys.stdin.read())
reason = aot.unavailable()
if reason:
    print(json.dumps({"skip": reason})); sys.exit(0)
configs = aot.triton_support.ELEMENTWISE_CONFIGS
first = configs[0]
heaviest = max(configs, key=lambda c: c.kwargs["BLOCK"] // c.num_warps)
wanted = {}
for arch in (90, 80):
    for v in aot.variants():
        if v.shape.name == "odd":
            chosen = arch == 90 and v.config is first
        else:
            chosen = arch == 90 or v.config is heaviest
        if chosen:
            wanted[aot.compile_key(v, arch)] = (v, arch)
most_registers = {}
for key in wanted.keys() & stored.keys():
    row = stored[key]
    best = most_registers.get((row["kernel"], row["arch"]))
    if best is None or row["registers"] > stored[best]["registers"]:
        most_registers[(row["kernel"], row["arch"])] = key
recompiled = set(most_registers.values()) | (wanted.keys() - stored.keys())
rows = {key: aot.compile_variant(*wanted[key], sass=False) if key in recompiled else stored[key] for key in wanted}
h100 = aot.GPUS[0]
cifar = aot.SHAPES[0]
seconds = {dtype: aot.seconds_per_element("q_sample", {"FROM_UINT8": False}, dtype, cifar, h100) for dtype in ("fp32", "bf16")}
print(json.dumps({"rows": rows, "recompiled": sorted(recompiled), "q_sample_seconds_per_element_h100": seconds}))
"""


def _compile(stored: dict) -> dict:
    """The rows of every wanted variant, compiled where `stored` (key -> row) has none, and a few compiled again."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-W", "ignore", "-c", _COMPILE], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=900, input=json.dumps(stored))
    assert result.returncode == 0, result.stderr[-3000:]
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    if "skip" in answer:
        pytest.skip(answer["skip"])
    return answer


def _stored_rows(request) -> dict:
    if request.config.getoption("--regenerate-golden") or not GOLDEN.exists():
        return {}
    return json.loads(GOLDEN.read_text())["rows"]


def _write_golden(rows: dict) -> None:
    import triton

    header = json.dumps({"command": REGENERATE, "triton": triton.__version__})
    lines = ",\n".join(f"{json.dumps(key)}: {json.dumps(rows[key], sort_keys=True)}" for key in sorted(rows))
    GOLDEN.write_text(f'{{"produced_by": {header},\n"rows": {{\n{lines}\n}}}}\n')  # a row a line: diffs read well


@pytest.mark.slow
def test_every_variant_compiles_for_sm90_and_sm80_without_spills_and_vectorised(request):
    """One test (a fresh compile of every variant takes minutes; pytest-xdist would run a shared fixture once per
    worker)."""
    from kernels import ahead_of_time as aot

    stored = _stored_rows(request)
    answer = _compile(stored)
    rows, recompiled = answer["rows"], answer["recompiled"]
    rechecked = [key for key in recompiled if key in stored]
    # every kernel and target compiles again: its stored heaviest variant, or (a changed kernel) all its variants
    compiled_again = {(rows[key]["kernel"], rows[key]["arch"]) for key in recompiled}
    assert not stored or compiled_again == {(f.name, arch) for f in aot.families() for arch in (90, 80)}, \
        "each kernel's heaviest variant compiles again"
    assert {key: rows[key] for key in rechecked} == {key: stored[key] for key in rechecked}, f"the stored table is stale: {REGENERATE}"
    if request.config.getoption("--regenerate-golden"):
        _write_golden(rows)
    elif len(recompiled) > len(rechecked):
        warnings.warn(f"{len(recompiled) - len(rechecked)} variants compiled afresh (changed kernels or another "
                      f"Triton): `{REGENERATE}` stores them and makes this test fast again")
    compiled = list(rows.values())
    # 6 kernels: q_sample 2 branches, ddim_step 6, noise_loss 4, posterior_step 2, dpm_solver_step 6, unipc_step 4;
    # 3 dtypes; every config
    expected = sum(len(f.branches) for f in aot.families()) * len(aot.DATA_DTYPES)
    configs = len(aot.triton_support.ELEMENTWISE_CONFIGS)
    assert len([r for r in compiled if r["shape"] == "cifar" and r["arch"] == 90]) == expected * configs
    ampere = [r for r in compiled if r["shape"] == "cifar" and r["arch"] == 80]
    assert len(ampere) == expected and {(r["block"], r["num_warps"]) for r in ampere} == {(1024, 8)}
    assert len([r for r in compiled if r["shape"] == "odd"]) == expected
    spilled = [r for r in compiled if r["spill_bytes"]]  # ptxas's spill stores and loads (a stack frame alone is not)
    assert not spilled, spilled[:3]
    assert all(0 < r["registers"] <= 128 for r in compiled), max(r["registers"] for r in compiled)
    # At the engine's shapes every config that gives a thread 8 bytes or more of a quarter issues vector
    # loads or stores (.v2, .v4); the unaligned path cannot (a quarter may start anywhere).
    for row in compiled:
        per_thread = row["block"] // (32 * row["num_warps"]) * aot.ELEMENT_BYTES[row["dtype"]]
        if row["shape"] == "cifar" and per_thread >= 8:
            assert row["vector_ptx"], row
    assert not any(r["vector_ptx"] for r in compiled if r["shape"] == "odd")
    # q_sample's roofline on an H100 (the benchmark's target): float32 moves 8 bytes an element and is bound by
    # memory; bfloat16 moves 4, but drawing the noise costs more issue time than 4 bytes take to move.
    seconds = answer["q_sample_seconds_per_element_h100"]
    h100 = aot.GPUS[0]
    assert 8 / seconds["fp32"] == pytest.approx(h100.bandwidth)
    assert 0.2 * h100.bandwidth < 4 / seconds["bf16"] < h100.bandwidth


def test_hot_path_leaves_out_what_a_forward_conditional_branch_skips():
    from kernels.ahead_of_time import hot_path, read_sass

    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/              @!P0 BRA 0x40 ;
        /*0020*/                   IMAD R2, R2, R3, RZ ;
        /*0030*/              @P1 BRA 0x20 ;
        /*0040*/                   MUFU.LG2 R4, R4 ;
        /*0050*/                   STG.E.128 desc[UR4][R6.64], R8 ;
        /*0060*/                   EXIT ;
        /*0070*/                   BRA 0x70 ;
        /*0080*/                   NOP ;
    """
    rows = read_sass(sass)
    assert [opcode for _, _, opcode, _ in rows] == ["MOV", "BRA", "IMAD", "BRA", "MUFU.LG2", "STG.E.128", "EXIT"]
    assert rows[1][1] and not rows[0][1]  # predicated
    assert hot_path(rows) == 5  # the loop at 0x20-0x30 is skipped by the branch at 0x10
