"""Builds the package's Triton kernels for a GPU without a GPU, to catch on a CPU machine what the interpreter
cannot: code that does not compile for the device, or compiles into register spills or too much shared memory.

Each public launcher (vocab_head_triton, step_triton, the fused norms) is called on meta tensors of a supported shape (shapes
and dtypes only: no memory, no device; launchers treat them as GPU tensors); its kernel launches are recorded
instead of run, specialised as Triton's JIT specialises them (ints equal to 1 become constants, ints and
pointers divisible by 16 get that hint), and compiled by Triton's own compiler and ptxas for the target
architecture. cuobjdump then reads the cubin's registers, stack, local memory and shared memory.

    python -m pipeline.kernels.aot                  # every supported launch, sm_90 (H100 / H200)
    python -m pipeline.kernels.aot --arch 80        # another architecture
    python -m pipeline.kernels.aot --json out.json  # the table as JSON too
    python -m pipeline.kernels.aot --jobs 1         # one cuobjdump at a time (default: one per CPU)

Needs triton's CUDA backend (its bundled ptxas and cuobjdump), and TRITON_INTERPRET unset: an interpreted
kernel has nothing to compile.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

# Per-SM limits of the architectures we build for (CUDA programming guide, compute capabilities table).
REGISTERS_PER_SM = 65536
MAX_REGISTERS_PER_THREAD = 255
MAX_SHARED_BYTES = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
_TORCH_TO_TRITON = {
    "float32": "fp32",
    "float16": "fp16",
    "bfloat16": "bf16",
    "float64": "fp64",
    "int64": "i64",
    "int32": "i32",
    "int16": "i16",
    "int8": "i8",
    "uint8": "u8",
    "bool": "i1",
}


@dataclass(frozen=True)
class Launch:
    """One kernel launch as the JIT would compile it."""

    module: str  # where the kernel is defined
    kernel: str
    case: str  # the launcher call it came from, e.g. "vocab_head N=8192 V=262144 D=2816 bf16"
    signature: dict[str, str]  # arg name -> Triton type or "constexpr"
    constexprs: dict[str, object]  # arg name -> value (declared constexprs and specialised ints)
    divisible_by_16: tuple[str, ...]  # args with the tt.divisibility=16 hint
    num_warps: int
    num_stages: int | None

    def key(self) -> tuple:
        """Launches with equal keys compile to the same binary."""
        return (
            self.module,
            self.kernel,
            tuple(sorted(self.signature.items())),
            tuple(sorted((k, repr(v)) for k, v in self.constexprs.items())),
            self.divisible_by_16,
            self.num_warps,
            self.num_stages,
        )

    def variant(self) -> str:
        """The compile-time settings that tell launches of one kernel apart."""
        flags = [f"{k}={v}" for k, v in sorted(self.constexprs.items()) if self.signature[k] == "constexpr"]
        pointers = sorted({t for t in self.signature.values() if t.startswith("*")})
        return " ".join([*flags, f"warps={self.num_warps}", "/".join(pointers)])


@dataclass
class Build:
    """A compiled launch and what its cubin needs of an SM."""

    kernel: str
    cases: list[str]
    variant: str
    arch: int
    num_warps: int
    registers: int
    stack_bytes: int
    local_bytes: int  # spills and stack arrays in local memory (device memory behind L1)
    shared_bytes: int
    sass_instructions: int
    spill_instructions: int  # STL / LDL in the SASS
    opcodes: dict[str, int] = field(default_factory=dict)

    @property
    def threads(self) -> int:
        return 32 * self.num_warps

    def problems(self) -> list[str]:
        """What would fail or run slowly on the device: spills, too many registers, too much shared memory."""
        out = []
        if self.registers > MAX_REGISTERS_PER_THREAD or self.registers * self.threads > REGISTERS_PER_SM:
            out.append(f"{self.registers} registers x {self.threads} threads exceed one SM")
        if self.local_bytes or self.spill_instructions:
            out.append(f"{self.local_bytes} B local memory, {self.spill_instructions} spill instructions")
        limit = MAX_SHARED_BYTES.get(self.arch)
        if limit is not None and self.shared_bytes > limit:
            out.append(f"{self.shared_bytes} B shared memory > {limit} B on sm_{self.arch}")
        return out


# Every @triton.jit kernel the package launches, by module (tests/kernels/test_aot.py checks the list).
KERNELS = {
    "pipeline.kernels.vocab_head.triton_head": ("_head_chunk_kernel",),
    "pipeline.kernels.step.triton_step": ("_step_kernel",),
    "pipeline.kernels.norms.triton_norms": ("_attention_tail_kernel", "_ffn_tail_kernel", "_head_kernel"),
    "pipeline.kernels.attention.triton_attention": ("_canvas_attention_kernel",),
    "pipeline.kernels.experts.triton_experts": ("_gelu_mul_kernel", "_combine_kernel"),
    "pipeline.kernels.experts.triton_gemm": ("_expert_gemm_kernel",),
}


@contextlib.contextmanager
def recording(module, *names: str, calls: list | None = None) -> Iterator[list[tuple[str, tuple, dict]]]:
    """Replaces the kernels `module.<name>` by recorders; yields the list of (name, args, kwargs) launched
    (`calls`, if given, is appended to instead)."""
    kernels = {name: getattr(module, name) for name in names}
    calls = [] if calls is None else calls

    class _Recorder:
        def __init__(self, name: str) -> None:
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append((self.name, args, kwargs))

    for name in names:
        setattr(module, name, _Recorder(name))
    try:
        yield calls
    finally:
        for name, kernel in kernels.items():
            setattr(module, name, kernel)


@contextlib.contextmanager
def recording_all() -> Iterator[list[tuple[str, tuple, dict]]]:
    """Every kernel of KERNELS recorded instead of launched; yields the shared list of (name, args, kwargs)."""
    calls: list[tuple[str, tuple, dict]] = []
    with contextlib.ExitStack() as stack:
        for module_name, names in KERNELS.items():
            stack.enter_context(recording(importlib.import_module(module_name), *names, calls=calls))
        yield calls


def _specialise(module: str, kernel, case: str, args: tuple, kwargs: dict) -> Launch:
    """The signature, constants and hints Triton's JIT derives from one call's arguments."""
    import torch

    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    params = dict(zip(kernel.arg_names, args, strict=False)) | kwargs
    if set(params) != set(kernel.arg_names):
        raise TypeError(f"{kernel.__name__}: call binds {sorted(params)}, kernel takes {kernel.arg_names}")
    signature: dict[str, str] = {}
    constexprs: dict[str, object] = {}
    divisible: list[str] = []
    for index, name in enumerate(kernel.arg_names):
        value = params[name]
        if index in kernel.constexprs:
            signature[name], constexprs[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + _TORCH_TO_TRITON[str(value.dtype).removeprefix("torch.")]
            if (value.storage_offset() * value.element_size()) % 16 == 0:  # allocations are 256-B aligned
                divisible.append(name)
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            if value == 1:
                signature[name], constexprs[name] = "constexpr", 1
                continue
            signature[name] = "i32" if -(2**31) <= value < 2**31 else ("u64" if value >= 2**63 else "i64")
            if value % 16 == 0:
                divisible.append(name)
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{kernel.__name__}: argument {name}={value!r} has no Triton type here")
    return Launch(
        module=module,
        kernel=kernel.__name__,
        case=case,
        signature=signature,
        constexprs=constexprs,
        divisible_by_16=tuple(divisible),
        num_warps=int(options.get("num_warps", 4)),
        num_stages=options.get("num_stages"),
    )


def record(module, names: str | tuple[str, ...], case: str, call: Callable[[], object]) -> list[Launch]:
    """The launches of the kernels `module.<name>` made by `call()` (on meta tensors)."""
    names = (names,) if isinstance(names, str) else names
    for name in names:
        kernel = getattr(module, name)
        if not hasattr(kernel, "arg_names") or type(kernel).__name__ == "InterpretedFunction":
            raise RuntimeError(
                f"{module.__name__}.{name} is not a compilable @triton.jit kernel (TRITON_INTERPRET=1 when the "
                "module was imported?): run the build in a process without TRITON_INTERPRET"
            )
    with recording(module, *names) as calls:
        call()
    if not calls:
        raise RuntimeError(f"{case}: the launcher made no launch of {', '.join(names)}")
    return [
        _specialise(module.__name__, getattr(module, name), case, args, dict(kwargs))
        for name, args, kwargs in calls
    ]


def supported_launches() -> list[Launch]:
    """Every distinct launch the launchers make at the shapes canvasflow supports, deduplicated."""
    import torch

    from pipeline.kernels.attention import triton_attention
    from pipeline.kernels.experts import triton_experts, triton_gemm
    from pipeline.kernels.norms import triton_norms
    from pipeline.kernels.step import triton_step
    from pipeline.kernels.vocab_head import triton_head

    def head(num, vocab, dim, dtype, *, sample=True, soft=True, softcap=30.0):
        def call():
            hidden = torch.empty(num, dim, dtype=dtype, device="meta")
            embedding = torch.empty(vocab, dim, dtype=dtype, device="meta")
            temperature = torch.empty(num, dtype=torch.float32, device="meta")
            state = torch.empty(num, dtype=torch.int64, device="meta") if sample else None
            triton_head.vocab_head_triton(
                hidden,
                embedding,
                softcap=softcap,
                temperature=temperature,
                sample_state=state,
                want_soft=soft,
            )

        name = f"vocab_head N={num} V={vocab} D={dim} {str(dtype).removeprefix('torch.')}"
        flags = f"{' sample' if sample else ''}{' soft' if soft else ''}{' softcap' if softcap else ''}"
        return record(triton_head, "_head_chunk_kernel", name + flags, call)

    def step(batch, length, depth):
        def call():
            tokens = [torch.empty(batch, length, dtype=torch.int64, device="meta") for _ in range(4)]
            entropy = torch.empty(batch, length, dtype=torch.float32, device="meta")
            history = torch.empty(batch, depth, length, dtype=torch.int64, device="meta")
            current, sampled, argmax, noise = tokens
            triton_step.step_triton(
                current, sampled, argmax, entropy, noise, history, entropy_bound=0.1, confidence_threshold=0.1
            )

        return record(triton_step, "_step_kernel", f"step B={batch} L={length} S={depth}", call)

    def layer_norms(num, dim, heads, dtype):
        """The fused norms of one layer: the two tails, and q / k / v per head (head_dim, heads) of both
        attention kinds."""

        def rows():
            return [torch.empty(num, dim, dtype=dtype, device="meta") for _ in range(3)]

        def vector(n=dim):
            return torch.empty(n, dtype=dtype, device="meta")

        def tails():
            a, b, c = rows()
            triton_norms.attention_tail_triton(a, b, vector(), vector(), vector(), vector(), dim**-0.5, 1e-6)
            for nxt in (vector(), None):
                triton_norms.ffn_tail_triton(a, b, c, vector(), vector(), vector(), vector(1), 1e-6, nxt)

        def per_head():
            for head_dim, count in heads:
                x = torch.empty(1, num, count, head_dim, dtype=dtype, device="meta")
                trig = torch.empty(1, num, head_dim, dtype=dtype, device="meta")
                triton_norms.head_norm_rope_triton(x, vector(head_dim), trig, trig, 1e-6)  # q, k
                triton_norms.head_norm_rope_triton(x, None, None, None, 1e-6)  # v
                cache = torch.empty(
                    4, count, 1024, head_dim, dtype=dtype, device="meta"
                )  # k, v into the cache
                slots = torch.empty(1, dtype=torch.int64, device="meta")
                positions = torch.empty(1, num, dtype=torch.int64, device="meta")
                store = dict(cache=cache, slots=slots, positions=positions)
                triton_norms.head_norm_rope_triton(x, vector(head_dim), trig, trig, 1e-6, **store)
                triton_norms.head_norm_rope_triton(x, None, None, None, 1e-6, **store)
            rows = torch.empty(1, num, 1, dim, dtype=dtype, device="meta")  # rms_norm: the first input norm
            triton_norms.head_norm_rope_triton(rows, vector(), None, None, 1e-6)

        name = f"layer norms N={num} D={dim} {str(dtype).removeprefix('torch.')}"
        tail_kernels = ("_attention_tail_kernel", "_ffn_tail_kernel")
        return record(triton_norms, tail_kernels, name, tails) + record(
            triton_norms, "_head_kernel", name + f" heads {heads}", per_head
        )

    def canvas_attention(batch, tokens, heads, kv_heads, head_dim, dtype, causal=False):
        def call():
            q = torch.empty(batch, tokens, heads, head_dim, dtype=dtype, device="meta")
            cache = torch.empty(batch, kv_heads, 1024, head_dim, dtype=dtype, device="meta")
            index = torch.empty(batch, dtype=torch.int64, device="meta")
            for window in (None, 1024) if causal else ():  # the encoder's full and sliding layers
                triton_attention.canvas_attention_triton(
                    q, cache, cache, index, index, index, scale=1.0, causal=(index, index, window)
                )
            if not causal:
                triton_attention.canvas_attention_triton(q, cache, cache, index, index, index, scale=1.0)

        kind = "causal (encoder)" if causal else "canvas"
        name = f"{kind} attention B={batch} T={tokens} H={heads}/{kv_heads} d={head_dim} {dtype}"
        return record(triton_attention, "_canvas_attention_kernel", name.replace("torch.", ""), call)

    def expert_pieces(num, top_k, dim, expert_dim, mlp_dim, num_experts, dtype, tiles=(None,)):
        """The experts' elementwise kernels and grouped GEMM; the GEMM at each of `tiles` (None: its default)."""

        def call():
            gate_up = torch.empty(num * top_k, 2 * expert_dim, dtype=dtype, device="meta")
            triton_experts.gelu_mul_triton(*gate_up.chunk(2, dim=-1))  # the experts' halves, strided
            dense = torch.empty(num, mlp_dim, dtype=dtype, device="meta")
            triton_experts.gelu_mul_triton(dense, dense)  # the dense MLP's two products
            ys = torch.empty(num * top_k, dim, dtype=dtype, device="meta")
            inverse = torch.empty(num * top_k, dtype=torch.int64, device="meta")
            weights = torch.empty(num, top_k, dtype=torch.float32, device="meta")
            triton_experts.combine_triton(ys, inverse, weights)

        def products():
            x = torch.empty(num, dim, dtype=dtype, device="meta")
            rows = torch.empty(num * top_k, dtype=torch.int64, device="meta")
            offsets = torch.empty(num_experts, dtype=torch.int32, device="meta")
            gate_up = torch.empty(num_experts, 2 * expert_dim, dim, dtype=dtype, device="meta")
            down = torch.empty(num_experts, dim, expert_dim, dtype=dtype, device="meta")
            for t in tiles:
                hidden = triton_gemm.expert_gemm_triton(x, rows, gate_up, offsets, gelu=True, tiles=t)
                triton_gemm.expert_gemm_triton(hidden, None, down, offsets, gelu=False, tiles=t)

        name = f"experts N={num} k={top_k} D={dim} I={expert_dim} {dtype}".replace("torch.", "")
        return record(triton_experts, ("_gelu_mul_kernel", "_combine_kernel"), name, call) + record(
            triton_gemm, "_expert_gemm_kernel", f"{name} E={num_experts}", products
        )

    gemma_vocab, gemma_dim = 262_144, 2816  # DiffusionGemma-26B-A4B
    launches: list[Launch] = []
    for num in (256, 2048, 8192):  # the canvas positions of 1, 8 and 32 rows
        launches += head(num, gemma_vocab, gemma_dim, torch.bfloat16)
    launches += head(8192, gemma_vocab, gemma_dim, torch.bfloat16, sample=False, soft=False, softcap=None)
    launches += head(8192, gemma_vocab, gemma_dim, torch.float16, soft=False)
    launches += head(2048, gemma_vocab, gemma_dim, torch.float32)
    launches += head(256, 128, 64, torch.float32)  # the shipped tiny model: one chunk, one small block
    for length, depth in ((256, 1), (32, 0), (1024, 2), (triton_step.MAX_CANVAS_LENGTH, 1)):
        launches += step(32, length, depth)
    # 26B-A4B: 16 query heads; sliding layers 8 kv heads of 256, global layers 2 of 512. Tiny: 4 and 2 of 32.
    launches += layer_norms(8192, gemma_dim, ((256, 16), (256, 8), (512, 16), (512, 2)), torch.bfloat16)
    launches += layer_norms(64, 128, ((32, 4), (32, 2)), torch.float32)
    launches += canvas_attention(32, 256, 16, 8, 256, torch.bfloat16)  # 26B-A4B sliding layers
    launches += canvas_attention(32, 256, 16, 2, 512, torch.bfloat16)  # 26B-A4B global layers
    for tokens in (128, 256):  # 26B-A4B's encoder: a prompt, a finished canvas
        launches += canvas_attention(32, tokens, 16, 8, 256, torch.bfloat16, causal=True)
        launches += canvas_attention(32, tokens, 16, 2, 512, torch.bfloat16, causal=True)
    launches += canvas_attention(32, 256, 8, 4, 128, torch.bfloat16)  # bench_generate's small shape
    launches += canvas_attention(32, 160, 32, 32, 128, torch.bfloat16)  # LLaDA-8B's cached window
    launches += canvas_attention(32, 160, 28, 4, 128, torch.bfloat16)  # Dream-7B's
    launches += canvas_attention(8, 32, 4, 2, 32, torch.float32)  # the shipped tiny model
    launches += canvas_attention(8, 32, 4, 2, 32, torch.float32, causal=True)
    # 26B-A4B at batch 32, the GEMM also at benchmarks/bench_experts.py's tile candidates; tiny
    candidates = (None, *triton_gemm.TILE_CANDIDATES.values())
    launches += expert_pieces(8192, 8, gemma_dim, 704, 2112, 128, torch.bfloat16, tiles=candidates)
    launches += expert_pieces(64, 2, 128, 64, 256, 16, torch.float32)
    unique: dict[tuple, Launch] = {}
    cases: dict[tuple, list[str]] = {}
    for launch in launches:
        unique.setdefault(launch.key(), launch)
        cases.setdefault(launch.key(), [])
        if launch.case not in cases[launch.key()]:
            cases[launch.key()].append(launch.case)
    return [Launch(**{**asdict(launch), "case": "; ".join(cases[key])}) for key, launch in unique.items()]


def _tool(name: str) -> str:
    """Path of a CUDA binary utility bundled with triton's NVIDIA backend (or on PATH)."""
    import triton.backends.nvidia

    bundled = Path(triton.backends.nvidia.__file__).parent / "bin" / name
    if bundled.exists():
        return str(bundled)
    return name


def _compile(launch: Launch, arch: int):
    """Triton's compiled kernel for `launch` on sm_<arch> (from Triton's cache when it was built before)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = getattr(importlib.import_module(launch.module), launch.kernel)
    source = ASTSource(
        fn=kernel,
        signature=launch.signature,
        constexprs=launch.constexprs,
        attrs={(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in launch.divisible_by_16},
    )
    options = {"num_warps": launch.num_warps}
    if launch.num_stages is not None:
        options["num_stages"] = launch.num_stages
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def _read_cubin(cubin: bytes) -> tuple[str, str]:
    """cuobjdump's resource usage and SASS of a cubin."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        return _run(_tool("cuobjdump"), "-res-usage", str(path)), _run(_tool("cuobjdump"), "-sass", str(path))


def _build(launch: Launch, arch: int, compiled, usage: str, sass: str) -> Build:
    resources = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    opcodes: dict[str, int] = {}
    for op in re.findall(r"^\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass, re.M):
        opcodes[op] = opcodes.get(op, 0) + 1
    return Build(
        kernel=launch.kernel,
        cases=launch.case.split("; "),
        variant=launch.variant(),
        arch=arch,
        num_warps=launch.num_warps,
        registers=int(resources["REG"]),
        stack_bytes=int(resources["STACK"]),
        local_bytes=int(resources["LOCAL"]),
        # cuobjdump's SHARED is the static part; Triton's dynamic shared memory is in the metadata.
        shared_bytes=int(resources["SHARED"]) + int(compiled.metadata.shared),
        sass_instructions=sum(opcodes.values()),
        spill_instructions=sum(n for op, n in opcodes.items() if op.startswith(("STL", "LDL"))),
        opcodes=dict(sorted(opcodes.items(), key=lambda kv: -kv[1])),
    )


def build(launch: Launch, arch: int = 90) -> Build:
    """Compiles `launch` for sm_<arch> with Triton's compiler and reads the cubin's resource usage."""
    compiled = _compile(launch, arch)
    return _build(launch, arch, compiled, *_read_cubin(compiled.asm["cubin"]))


def build_all(launches: list[Launch], arch: int = 90, jobs: int | None = None) -> Iterator[Build]:
    """build() of each launch, in order, yielded as they are ready. The launches are compiled one after the
    other in this thread while up to `jobs` (default: the CPU count) cuobjdump processes read the cubins
    already compiled: disassembling a cubin takes cuobjdump some 0.4 s whatever its size, most of the time of
    a build that Triton's cache holds. Identical cubins (launches whose hints change no instruction) are read
    once."""
    with ThreadPoolExecutor(max_workers=max(1, jobs or os.cpu_count() or 1)) as pool:
        reads: dict[bytes, Future] = {}
        pending: deque = deque()
        for launch in launches:
            compiled = _compile(launch, arch)
            cubin = compiled.asm["cubin"]
            key = hashlib.sha256(cubin).digest()
            if key not in reads:
                reads[key] = pool.submit(_read_cubin, cubin)
            pending.append((launch, compiled, reads[key]))
            while pending and pending[0][2].done():
                done, done_compiled, read = pending.popleft()
                yield _build(done, arch, done_compiled, *read.result())
        while pending:
            done, done_compiled, read = pending.popleft()
            yield _build(done, arch, done_compiled, *read.result())


def _run(*command: str) -> str:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.kernels.aot",
        description="Compile every supported launch of the Triton kernels for a GPU target, without a GPU, "
        "and report registers, spills and shared memory. Exit 1 if any launch would spill or not fit.",
    )
    parser.add_argument(
        "--arch", type=int, default=90, help="compute capability x 10 (default 90: H100/H200)"
    )
    parser.add_argument("--json", type=Path, help="also write the builds to this JSON file")
    parser.add_argument(
        "--jobs", type=int, default=None, help="cuobjdump processes at a time (default: the CPU count)"
    )
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("TRITON_INTERPRET=1 is set: interpreted kernels cannot be compiled; unset it")
    import triton

    builds = []
    print(f"triton {triton.__version__}, target sm_{args.arch}", flush=True)
    header = (
        f"{'kernel':<20} {'warps':>5} {'regs':>5} {'local':>6} {'shared':>7} {'sass':>6}  variant / cases"
    )
    print(header)
    for b in build_all(supported_launches(), args.arch, args.jobs):
        builds.append(b)
        flags = "  ".join(b.problems())
        print(
            f"{b.kernel:<22} {b.num_warps:>5} {b.registers:>5} {b.local_bytes:>6} {b.shared_bytes:>7} "
            f"{b.sass_instructions:>6}  {b.variant}\n{'':<55}{'; '.join(b.cases)}"
            + (f"\n{'':<55}PROBLEM: {flags}" if flags else ""),
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps([asdict(b) | {"problems": b.problems()} for b in builds], indent=1))
    bad = [b for b in builds if b.problems()]
    print(f"{len(builds)} builds, {len(bad)} with problems")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
