"""The library's interface as Python mirrors it, and the check of that mirror at load.

``layer.py`` hands C two structs by pointer (``LayerStruct``, ``StepStruct``), written here field
by field after ``csrc/decode_layer.h``; ``bind`` sets each kernel's argument types after its C
prototype (``SIGNATURES``). Nothing in ctypes checks either against the C side, and a mismatch
would not fail: the kernels would read the wrong bytes. So the library reports its interface
(``csrc/abi.c``): a version (``pdm_abi_version``, bumped with any change to a prototype or struct)
and each mirrored struct's size and field offsets as the compiler laid them out
(``pdm_abi_struct``). ``mismatch`` compares both with this module; ``build.load`` refuses a library
that differs (the models then keep their PyTorch expressions, and the reason is logged).
"""

from __future__ import annotations

import ctypes

ABI_VERSION = 1  # PDM_ABI_VERSION in csrc/abi.h

_F, _I, _P = ctypes.c_float, ctypes.c_int64, ctypes.c_void_p

# each kernel's argument types, in the order of its C prototype in csrc/
_CTYPES = {"P": ctypes.c_void_p, "I": ctypes.c_int64, "F": ctypes.c_float, "N": ctypes.c_int}
SIGNATURES = {
    "pdm_rms_norm": "P I P F I I P N",
    "pdm_silu_mul": "P I I P N",
    "pdm_qk_norm_rope": "P I I I I I P P P I P F P F P P N",
    "pdm_decode_attention": "P I I I I P I P I P P I F P N",
    "pdm_prefill_attention": "P I I I I P I I I I P I I P P P I F P N",
    "pdm_linear": "P I I I P I P P N",
    "pdm_linear_add": "P I I I P I P P N",
    "pdm_decode_layer": "P P I P P",
    "pdm_decode_scratch_floats": "I I I I I I",
    "pdm_argmax": "P I I I P N",
    "pdm_store_kv": "P I I P I P I P I I",
}

# these return 0, or an error code for an index outside what the caller passed; the scratch size
# is a count; the others return nothing
RESTYPES = {
    name: ctypes.c_int
    for name in (
        "pdm_qk_norm_rope",
        "pdm_prefill_attention",
        "pdm_decode_attention",
        "pdm_store_kv",
        "pdm_decode_layer",
    )
}
RESTYPES["pdm_decode_scratch_floats"] = ctypes.c_int64


class LayerStruct(ctypes.Structure):
    """``pdm_layer_weights`` in csrc/decode_layer.h (the same fields in the same order)."""

    _fields_ = [
        *[(name, _I) for name in ("hidden", "heads", "kv_heads", "head_dim", "inter")],
        ("input_norm", _P), ("post_norm", _P), ("input_eps", _F), ("post_eps", _F),
        ("q_norm", _P), ("k_norm", _P), ("q_eps", _F), ("k_eps", _F),
        ("qkv", _P), ("qkv_bias", _P), ("o", _P), ("o_bias", _P),
        ("gate_up", _P), ("gate_up_bias", _P), ("down", _P), ("down_bias", _P),
        ("scale", _F),
    ]  # fmt: skip


class StepStruct(ctypes.Structure):
    """``pdm_decode_step`` in csrc/decode_layer.h."""

    _fields_ = [
        ("batch", _I), ("positions", _P), ("cos", _P), ("sin", _P), ("max_positions", _I),
        ("pool", _P), ("pool_rows", _I), ("slot_rows", _P), ("lens", _P), ("width", _I),
        ("scratch", _P), ("threads", ctypes.c_int), ("attention_threads", ctypes.c_int),
    ]  # fmt: skip


# the C struct each mirror stands for
MIRRORS: dict[str, type[ctypes.Structure]] = {"pdm_layer_weights": LayerStruct, "pdm_decode_step": StepStruct}


class _Field(ctypes.Structure):
    """``pdm_abi_field`` in csrc/abi.h."""

    _fields_ = [("name", ctypes.c_char_p), ("offset", ctypes.c_int64), ("size", ctypes.c_int64)]


def _c_layout(lib: ctypes.CDLL, struct: str) -> tuple[int, list[tuple[str, int, int]]] | None:
    """The size and ``(name, offset, size)`` fields of ``struct`` as the library reports them."""
    size = ctypes.c_int64()
    table = lib.pdm_abi_struct(struct.encode(), ctypes.byref(size))
    if not table:
        return None
    fields = []
    for i in range(1024):  # a NULL name ends the table; the bound only guards against a broken one
        entry = table[i]
        if entry.name is None:
            break
        fields.append((entry.name.decode(), entry.offset, entry.size))
    return size.value, fields


def _struct_mismatch(struct: str, c_layout: tuple[int, list[tuple[str, int, int]]] | None) -> str | None:
    """What differs between C's ``struct`` and its ctypes mirror, or None."""
    if c_layout is None:
        return f"the library does not report struct {struct}"
    c_size, c_fields = c_layout
    mirror = MIRRORS[struct]
    py_fields = [
        (name, getattr(mirror, name).offset, getattr(mirror, name).size) for name, *_ in mirror._fields_
    ]
    if [f[0] for f in c_fields] != [f[0] for f in py_fields]:
        return (
            f"{struct} has fields {[f[0] for f in c_fields]} in C but {[f[0] for f in py_fields]} in Python"
        )
    for (name, c_off, c_len), (_, py_off, py_len) in zip(c_fields, py_fields, strict=True):
        if (c_off, c_len) != (py_off, py_len):
            return (
                f"{struct}.{name} is {c_len} bytes at offset {c_off} in C "
                f"but {py_len} bytes at offset {py_off} in Python"
            )
    if c_size != ctypes.sizeof(mirror):
        return f"{struct} is {c_size} bytes in C but {ctypes.sizeof(mirror)} in Python"
    return None


def mismatch(lib: ctypes.CDLL) -> str | None:
    """Why ``lib``'s interface differs from this module's mirror of it, or None when it matches."""
    try:
        version_fn, struct_fn = lib.pdm_abi_version, lib.pdm_abi_struct
    except AttributeError:
        return "the library exports no ABI report (pdm_abi_version, pdm_abi_struct)"
    version_fn.argtypes, version_fn.restype = [], ctypes.c_int64
    struct_fn.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_int64)]
    struct_fn.restype = ctypes.POINTER(_Field)
    version = version_fn()
    if version != ABI_VERSION:
        return f"the library's ABI version is {version}, this Python mirror's {ABI_VERSION}"
    for struct in MIRRORS:
        reason = _struct_mismatch(struct, _c_layout(lib, struct))
        if reason:
            return reason
    return None


def bind(lib: ctypes.CDLL) -> None:
    """Sets the argument and result types of every kernel ``lib`` exports (after ``mismatch``)."""
    for name, argtypes in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes = [_CTYPES[code] for code in argtypes.split()]
        fn.restype = RESTYPES.get(name)
