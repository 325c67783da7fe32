"""Triton's interpreter without its redundant re-patching: the same kernels, the same numbers, ~4x faster.

Under TRITON_INTERPRET=1 every call of a @triton.jit helper from inside a kernel (`_inv_rms`, `rounded`,
`to_elem`, ...: tens per program) runs `interpreter._patch_lang`, which walks every member of
triton.language, its tensor class and math module with inspect.getmembers to install the interpreter's
builtins. Inside a launch they are already installed (the launch patched them before running the first
program, and restores them after the last), so the nested walk finds nothing left to patch: in the tiny
models' norm kernels it was 70% of the interpreted time. `install()` skips it when every language module the
helper sees was patched by the current launch; a helper that sees one the launch did not patch (tl.core, say)
is patched as before. Nothing else changes: every program of every launch still runs every op.

It also runs `triton_math.round_bf16` (float32 -> nearest bfloat16, by hand because the interpreter's cast
truncates: a kernel's every bfloat16 store on the CPU) as one numpy expression of the same bit arithmetic
instead of ten interpreted ops: it was half the time of the bfloat16 model tests with fused norms. Only the
interpreter runs round_bf16 (compiled kernels cast with the GPU's rounding); tests/kernels/test_triton_math.py
checks the numpy one against the interpreted body and against torch, bit for bit.

Installed by tests/conftest.py when the kernels run interpreted. A Triton whose interpreter lacks these
internals (another version) is left alone: the tests are slower, not different.
"""

from __future__ import annotations

import inspect

import numpy as np

_installed = False


def round_bf16_numpy(x):
    """triton_math.round_bf16 on the interpreter's numpy data: the same bit arithmetic in one expression."""
    import triton.language as tl
    from triton.runtime.interpreter import TensorHandle

    data = np.asarray(x.handle.data, dtype=np.float32)
    bits = data.view(np.uint32)
    nearest = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
    out = np.where(data != data, data, nearest.view(np.float32))  # a NaN stays NaN (not inf)
    return tl.core.tensor(TensorHandle(out, tl.float32), x.type)


def native_functions() -> dict:
    """{the @triton.jit helper's Python function: what the interpreter runs instead}."""
    from pipeline.kernels import triton_math

    return {triton_math.round_bf16.fn: round_bf16_numpy}


def install() -> bool:
    """Installs the shortcut once; False if this Triton's interpreter does not have the expected shape."""
    global _installed
    if _installed:
        return True
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except Exception:
        return False
    grid_executor = getattr(interpreter, "GridExecutor", None)
    patch_lang = getattr(interpreter, "_patch_lang", None)
    scope_class = getattr(interpreter, "_LangPatchScope", None)
    if grid_executor is None or patch_lang is None or scope_class is None:
        return False

    launches: list[set[int]] = []  # per launch in progress: ids of the language modules patched by it
    langs_of: dict[tuple[int, int], frozenset[int]] = {}

    def languages(fn) -> frozenset[int]:
        """The ids of triton.language / triton.language.core that fn's globals hold (what _patch_lang
        patches for fn), cached per globals dict and size (the interpreter adds names to them)."""
        namespace = fn.__globals__
        key = (id(namespace), len(namespace))
        found = langs_of.get(key)
        if found is None:
            found = frozenset(
                id(v) for v in namespace.values() if inspect.ismodule(v) and (v is tl or v is tl.core)
            )
            langs_of[key] = found
        return found

    def fast_patch_lang(fn):
        if launches:
            langs = languages(fn)
            if langs and langs <= launches[-1]:
                return scope_class()  # already patched by this launch: nothing to do, nothing to restore
            launches[-1].update(langs)
        return patch_lang(fn)

    launch = grid_executor.__call__

    def call(self, *args, **kwargs):
        launches.append(set())
        try:
            return launch(self, *args, **kwargs)
        finally:
            launches.pop()

    interpreted = getattr(interpreter, "InterpretedFunction", None)
    rewritten = getattr(interpreted, "rewritten_fn", None)
    if isinstance(rewritten, dict):  # a helper's call runs rewritten_fn[fn], rewritten from fn on first use
        rewritten.update(native_functions())
    interpreter._patch_lang = fast_patch_lang
    grid_executor.__call__ = call
    _installed = True
    return True
