"""Ahead-of-time kernel health check: compile every registered Triton kernel config for the
consumer and datacenter archs we support, without a GPU, and fail on register spills or on
shared memory above the arch's per-block limit.

Registers and spills come from Triton's bundled ``ptxas -v`` on the generated PTX; shared
memory from Triton's compiled metadata. Run ``python -m swkernels.health`` (or
``swengine doctor --kernels``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

from swkernels.registry import KernelSpec, registered


@dataclass(frozen=True)
class Arch:
    capability: int
    gpus: str
    max_shared_bytes: int  # opt-in dynamic shared memory per block
    bf16: bool


ARCHS: dict[int, Arch] = {
    75: Arch(75, "T4, RTX 20xx", 64 * 1024, False),
    80: Arch(80, "A100, A800", 163 * 1024, True),
    86: Arch(86, "RTX 30xx, A10G, A40", 99 * 1024, True),
    89: Arch(89, "RTX 40xx, L4, L40S", 99 * 1024, True),
    90: Arch(90, "H100, H200", 227 * 1024, True),
}


@dataclass
class HealthResult:
    op: str
    kernel: str
    config: str
    arch: int
    dtype: str
    registers: int
    spill_stores: int
    spill_loads: int
    shared_bytes: int
    shared_limit: int
    ok: bool
    problem: str


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def _ptxas_usage(ptx: str, arch: int) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) for the PTX's single kernel."""
    from triton.backends.nvidia.compiler import get_ptxas

    target = re.search(r"^\.target\s+(\S+)", ptx, re.M)
    gpu_name = target.group(1).split(",")[0] if target else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run(
            [get_ptxas(arch).path, "-v", f"--gpu-name={gpu_name}", src, "-o", os.path.join(tmp, "k.cubin")],
            capture_output=True,
            text=True,
        )
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed for {gpu_name}: {proc.stderr.strip()[:500]}")
    regs = _PTXAS_REGS.search(proc.stderr)
    spills = _PTXAS_SPILL.search(proc.stderr)
    return (
        int(regs.group(1)) if regs else 0,
        int(spills.group(1)) if spills else 0,
        int(spills.group(2)) if spills else 0,
    )


def check_spec(spec: KernelSpec, arch: int, dtype: str) -> HealthResult:
    """Compile one spec for one arch and dtype and judge it."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    limit = ARCHS[arch].max_shared_bytes
    signature = {k: v.replace("{dtype}", dtype) for k, v in spec.signature.items()}
    base = dict(op=spec.op, kernel=spec.kernel_name, config=spec.label, arch=arch, dtype=dtype, shared_limit=limit)
    fn = spec.kernel
    while not isinstance(fn, triton.runtime.jit.JITFunction) and hasattr(fn, "fn"):
        fn = fn.fn  # unwrap an Autotuner/heuristics wrapper
    try:
        src = ASTSource(fn=fn, signature=signature, constexprs=dict(spec.constexprs))
        compiled = triton.compile(
            src,
            target=GPUTarget("cuda", arch, 32),
            options={"num_warps": spec.num_warps, "num_stages": spec.num_stages},
        )
        regs, st, ld = _ptxas_usage(compiled.asm["ptx"], arch)
        shared = int(compiled.metadata.shared)
    except Exception as exc:  # a config that does not compile is a failure, not a crash
        msg = str(exc).strip().splitlines()
        return HealthResult(**base, registers=0, spill_stores=0, spill_loads=0, shared_bytes=0, ok=False,
                            problem=f"compile error: {msg[0] if msg else type(exc).__name__}")
    problems = []
    if st or ld:
        problems.append(f"spills {st} B stores / {ld} B loads")
    if shared > limit:
        problems.append(f"shared memory {shared} B > {limit} B limit")
    return HealthResult(**base, registers=regs, spill_stores=st, spill_loads=ld, shared_bytes=shared,
                        ok=not problems, problem="; ".join(problems))


def _jobs(specs: list[KernelSpec], archs: list[int]) -> list[tuple[KernelSpec, int, str]]:
    jobs = []
    for spec in specs:
        for arch in archs:
            if arch < spec.min_arch:
                continue
            for dtype in spec.dtypes if any("{dtype}" in v for v in spec.signature.values()) else ("-",):
                if dtype == "bf16" and not ARCHS[arch].bf16:
                    continue  # T4-class GPUs train in fp16; bf16 kernels never launch there
                jobs.append((spec, arch, dtype))
    return jobs


def check(specs: list[KernelSpec] | None = None, archs: list[int] | None = None,
          ops: list[str] | None = None, workers: int | None = None) -> list[HealthResult]:
    """Check registered (or given) kernel specs on the given archs (default: all five)."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        if specs is not None:
            raise RuntimeError("kernel health needs real (not interpreted) kernels: unset TRITON_INTERPRET")
        return _check_in_subprocess(archs, ops)
    archs = archs or sorted(ARCHS)
    unknown = [a for a in archs if a not in ARCHS]
    if unknown:
        raise ValueError(f"unknown arch {unknown}; known: {sorted(ARCHS)}")
    specs = registered() if specs is None else specs
    if ops:
        specs = [s for s in specs if s.op in ops]
    jobs = _jobs(specs, archs)
    with ThreadPoolExecutor(max_workers=workers or min(4, os.cpu_count() or 1)) as pool:
        return list(pool.map(lambda job: check_spec(*job), jobs))


def _check_in_subprocess(archs: list[int] | None, ops: list[str] | None) -> list[HealthResult]:
    """Triton's interpreter replaces @jit functions at import; compile in a clean process."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "swkernels.health", "--json"]
    for a in archs or []:
        cmd += ["--arch", str(a)]
    for o in ops or []:
        cmd += ["--op", o]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"kernel health subprocess failed: {proc.stderr.strip()[-2000:]}")
    return [HealthResult(**r) for r in json.loads(proc.stdout)]


def format_table(results: list[HealthResult]) -> str:
    head = f"{'kernel config':<52} {'arch':>5} {'dtype':>5} {'regs':>5} {'spill':>6} {'smem KB':>8}  status"
    lines = [head, "-" * len(head)]
    for r in results:
        status = "ok" if r.ok else f"FAIL: {r.problem}"
        lines.append(f"{r.config:<52} {'sm_' + str(r.arch):>5} {r.dtype:>5} {r.registers:>5} "
                     f"{r.spill_stores + r.spill_loads:>6} {r.shared_bytes / 1024:>8.1f}  {status}")
    bad = sum(not r.ok for r in results)
    lines.append(f"{len(results)} compiled, {bad} failing")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, action="append", help="compute capability, e.g. 86 (repeatable)")
    parser.add_argument("--op", action="append", help="only this op (repeatable)")
    parser.add_argument("--json", action="store_true", help="print results as JSON")
    args = parser.parse_args(argv)
    results = check(archs=args.arch, ops=args.op)
    if args.json:
        print(json.dumps([asdict(r) for r in results]))
    else:
        print(format_table(results))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
