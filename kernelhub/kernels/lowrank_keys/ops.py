"""Low-rank key cache public ops (ShadowKV): validate -> backend -> best stored config -> launch.

Re-exported by `kernelhub.ops`; see there for backends and torch.library registration.

`lowrank_keys` factors the merged pre-RoPE keys through their Gram matrix rather than an SVD of
the [S, H_kv * D] key matrix: G_b = K_b^T K_b is one long GEMM (the Triton kernel; S up to 128K
is split across programs), then `torch.linalg.eigh` of the small [HD, HD] matrix, then one more
GEMM, a_b = K_b V_r. The eigendecomposition runs in float32: G itself is rounded to float32, so a
float64 solver could not recover what that rounding lost (directions whose singular value is
below about sqrt(u) = 2.4e-4 of the largest are unresolved either way: the Gram squares the
condition number), float32 `eigh` is backward stable to the same order, and float64 runs at
1/32 to 1/64 of the float32 rate on most GPUs other than the A100/H100 class.

Keys beyond about 1e19 are finite but their float32 Gram matrix is not: then G is recomputed from
the keys scaled by a power of two (exact), whose eigenvectors are the same; keys holding NaN or
Inf are refused. Only G is checked on the common path, never the [B, H_kv, S, D] keys.
"""

from __future__ import annotations

import torch

from kernelhub import backend, configs, validation
from kernelhub.device import device_for_tensor
from kernelhub.kernels.common.library import kernel_op
from kernelhub.kernels.lowrank_keys import cpu as lowrank_cpu
from kernelhub.kernels.lowrank_keys.gram_space import PROJECT_CONFIG
from kernelhub.kernels.lowrank_keys.kernel import gram_triton, project_triton, reconstruct_keys_triton
from kernelhub.kernels.lowrank_keys.spec import GRAM_SPEC, RECONSTRUCT_SPEC
from kernelhub.reference import lowrank_keys as lowrank_ref

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INDEX_DTYPES = (torch.int32, torch.int64)
# The widest head the DEFAULT reconstruction tiles fit in every GPU's shared memory.
MAX_HEAD_DIM = 256


# ----------------------------------------------------------------------------------------------
# lowrank_keys
# ----------------------------------------------------------------------------------------------

# What `lowrank_keys(gram=)` takes: the Gram matrix of the keys in float32, or of the keys quantised
# to int8 per channel (the CPU's faster method; see kernelhub/kernels/lowrank_keys/cpu.py).
GRAM_METHODS = ("float32", "int8")


def check_gram_method(gram: object) -> str:
    """`gram` if it is one of GRAM_METHODS, else a ValueError naming it (also ShadowKVCache's check)."""
    if not isinstance(gram, str) or gram not in GRAM_METHODS:
        raise ValueError(f"gram: expected one of {', '.join(map(repr, GRAM_METHODS))}, got {gram!r}")
    return gram


def _check_lowrank_args(k, rank, gram) -> None:
    validation.tensor("k", k, dtypes=_FLOAT_DTYPES, ndim=4)
    check_gram_method(gram)
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"rank: expected an int, got {type(rank).__name__}")
    _, heads, seq, head_dim = k.shape
    limit = min(seq, heads * head_dim)
    if not 1 <= rank <= limit:
        raise ValueError(f"rank: expected 1 <= rank <= min(S, H_kv * D) = min({seq}, {heads * head_dim}) = "
                         f"{limit}, got {rank}")


def _basis_from_gram(gram: torch.Tensor, rank: int, dtype: torch.dtype) -> torch.Tensor:
    """Top-`rank` eigenvectors of float32 `gram [B, HD, HD]`, by descending eigenvalue, as the rows
    of `basis [B, rank, HD]` in `dtype` (eigh reads the lower triangle)."""
    _, vectors = torch.linalg.eigh(gram)  # ascending eigenvalues
    top = vectors[..., -rank:].flip(-1)  # [B, HD, rank]
    return top.transpose(1, 2).to(dtype).contiguous()


def _refuse_non_finite(k: torch.Tensor) -> None:
    if not bool(torch.isfinite(k).all()):
        raise ValueError("k: holds NaN or Inf; the low-rank factorisation of non-finite keys is undefined")


def _unit_scaled(k: torch.Tensor) -> torch.Tensor:
    """float32 `k` times a power of two per sequence, so that max |k[b]| < 1: exact (only the
    exponents change), and the eigenvectors of the Gram matrix do not change with its scale."""
    absmax = k.abs().amax(dim=(1, 2, 3), keepdim=True).to(torch.float32)  # [B, 1, 1, 1]
    _, exponent = torch.frexp(absmax)  # absmax = mantissa * 2**exponent, mantissa in [0.5, 1)
    return torch.ldexp(k.to(torch.float32), -exponent)


def _finite_gram(k: torch.Tensor, gram: torch.Tensor, gram_of) -> torch.Tensor:
    """`gram` (G of `k`, float32 [B, HD, HD]) when it is finite; otherwise G of `k` scaled to
    |k| < 1 by `gram_of` (keys beyond about 1e19 are finite but their float32 Gram overflows), or
    a ValueError when `k` itself holds NaN or Inf. The check reads only G, not k, on the common path.
    """
    if bool(torch.isfinite(gram).all()):
        return gram
    _refuse_non_finite(k)
    return gram_of(_unit_scaled(k))


# Columns per block row of the CPU Gram matrix: wide enough that each block row is an efficient GEMM,
# narrow enough that the lower block triangle skips most of the upper half (HD = 1024: 5/8 of the work).
_GRAM_BLOCK = 256


def _merged_gram(keys: torch.Tensor) -> torch.Tensor:
    """float32 merged keys `[B, S, HD]` -> their Gram matrix `[B, HD, HD]`, its lower triangle only
    (what `eigh` reads; above the diagonal blocks it is 0). Block row i is `keys_i^T @ keys[..., :end_i]`:
    with n blocks, (n + 1) / 2n of the full product's work."""
    hd = keys.shape[-1]
    if hd <= _GRAM_BLOCK:
        return keys.transpose(1, 2) @ keys
    gram = keys.new_zeros(keys.shape[0], hd, hd)
    for start in range(0, hd, _GRAM_BLOCK):
        stop = min(hd, start + _GRAM_BLOCK)
        gram[:, start:stop, :stop] = keys[..., start:stop].transpose(1, 2) @ keys[..., :stop]
    return gram


def _lowrank_keys_cpu(k: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same method with torch's float32 GEMMs (the merged keys are copied once)."""
    keys = lowrank_ref.merge_heads(k).to(torch.float32)  # [B, S, HD]
    gram = _finite_gram(k, _merged_gram(keys), lambda scaled: _merged_gram(lowrank_ref.merge_heads(scaled)))
    basis = _basis_from_gram(gram, rank, k.dtype)
    a = keys @ basis.to(torch.float32).transpose(1, 2)  # [B, S, rank]
    return a.to(k.dtype), basis


def _lowrank_keys_cpu_int8(k: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The basis from the Gram matrix of the int8 keys, a projected from the keys (cpu.py)."""
    gram = lowrank_cpu.int8_gram(k)
    if gram is None:
        _refuse_non_finite(k)
    basis = _basis_from_gram(gram, rank, k.dtype)
    return lowrank_cpu.project_heads(k, basis.to(torch.float32)).to(k.dtype), basis


def _lowrank_keys_triton(k: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    batch, heads, seq, head_dim = k.shape
    hd = heads * head_dim
    gram = torch.empty((batch, hd, hd), dtype=torch.float32, device=k.device)

    def gram_of(keys: torch.Tensor) -> torch.Tensor:
        dtype = validation.dtype_name(keys.dtype)
        config = configs.best_config(GRAM_SPEC, tuple(keys.shape), dtype, device_for_tensor(keys))
        return gram_triton(keys, config=config, out=gram)

    gram = _finite_gram(k, gram_of(k), gram_of)
    basis = _basis_from_gram(gram, rank, k.dtype)
    a = torch.empty((batch, seq, rank), dtype=k.dtype, device=k.device)
    project_triton(k, basis, config=PROJECT_CONFIG, out=a)
    return a, basis


def _fake_lowrank_keys(k, rank, gram="float32"):
    batch, heads, seq, head_dim = k.shape
    return k.new_empty((batch, seq, rank)), k.new_empty((batch, rank, heads * head_dim))


@kernel_op("lowrank_keys", fake=_fake_lowrank_keys)
def _lowrank_keys(k: torch.Tensor, rank: int, gram: str = "float32") -> tuple[torch.Tensor, torch.Tensor]:
    _, heads, seq, head_dim = k.shape
    if seq <= heads * head_dim:  # few tokens: the float32 Gram is cheap, and exact at rank = S (see lowrank_keys)
        gram = "float32"
    path = backend.choose(k)
    if path == "reference":
        _refuse_non_finite(k)
        if gram == "int8":
            return lowrank_ref.lowrank_keys_int8_gram(k, rank)
        return lowrank_ref.lowrank_keys(k, rank)
    if path == "cpu":
        return _lowrank_keys_cpu_int8(k, rank) if gram == "int8" else _lowrank_keys_cpu(k, rank)
    return _lowrank_keys_triton(k, rank)  # a GPU's float32 Gram, for either method (see lowrank_keys)


def lowrank_keys(k: torch.Tensor, rank: int, *, gram: str = "float32") -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-`rank` factorisation of pre-RoPE keys merged over KV heads (ShadowKV's key cache).

    k: `[B, H_kv, S, D]`, float16, bfloat16 or float32, any strides (a slice of a cache is read in
    place), finite (NaN or Inf is a ValueError; finite keys of any magnitude work). rank: int in
    `[1, min(S, H_kv * D)]`.
    Returns `a [B, S, rank]` and `basis [B, rank, H_kv * D]`, both in k.dtype, basis with
    orthonormal rows (the top right singular vectors), such that `a[b] @ basis[b]` is the best
    rank-`rank` approximation of the merged keys `K_b` in the least-squares sense. Equivalent to

        K = k.transpose(1, 2).reshape(B, S, H_kv * D).double()         # K[b, s, h * D + d] = k[b, h, s, d]
        U, sigma, Vh = torch.linalg.svd(K, full_matrices=False)
        a, basis = (U[..., :rank] * sigma[:, None, :rank]).to(k.dtype), Vh[:, :rank].to(k.dtype)

    up to the signs of the factors (compare `a @ basis`, unique when sigma[rank-1] > sigma[rank]),
    computed as eigenvectors V_r of the float32 Gram matrix K^T K, `basis = V_r^T` and
    `a = K @ basis^T` (float32 accumulation). See the module docstring for its accuracy.

    gram: "float32" (the above), or "int8", for long prefills: the basis from the Gram matrix of
    the keys quantised to int8 per channel (`kernelhub.reference.lowrank_keys.lowrank_keys_int8_gram`),
    a still projected from the keys themselves; near the optimum, not at it (within 0.1% of its
    error from S = 2K on the benchmark's keys), and 2x faster at S = 32K to 128K on a CPU with VNNI
    but no AMX (README "Measured"; without VNNI the int8 product is exact in float64 and no faster).
    With no more tokens than H_kv * D the float32 Gram is computed for either: it is cheap there,
    and the quantised keys' span is not the keys' (at rank = S the int8 basis would not rebuild
    them). On a GPU (the Triton path) the float32 Gram on its tensor cores is computed for either.
    """
    _check_lowrank_args(k, rank, gram)
    return _lowrank_keys(k, rank, gram)


# ----------------------------------------------------------------------------------------------
# reconstruct_keys
# ----------------------------------------------------------------------------------------------

def _check_reconstruct_args(a, basis, positions, cos, sin, rope_positions) -> tuple[int, int, int, int, int, int]:
    """Validates everything; returns the shape (B, S, H_kv, n, D, rank)."""
    validation.tensor("a", a, dtypes=_FLOAT_DTYPES, ndim=3)
    validation.tensor("basis", basis, dtypes=(a.dtype,), ndim=3)
    validation.tensor("positions", positions, dtypes=_INDEX_DTYPES, ndim=3)
    validation.tensor("cos", cos, dtypes=(torch.float32,), ndim=2)
    validation.tensor("sin", sin, dtypes=(torch.float32,), ndim=2)
    if rope_positions is not None:
        validation.tensor("rope_positions", rope_positions, dtypes=_INDEX_DTYPES, ndim=3)
    batch, seq, rank = a.shape
    hd = basis.shape[2]
    if tuple(basis.shape[:2]) != (batch, rank):
        raise ValueError(f"basis: expected shape [B, rank, H_kv * D] with B = a.shape[0] = {batch} and "
                         f"rank = a.shape[2] = {rank}, got {tuple(basis.shape)}")
    heads, n = positions.shape[1], positions.shape[2]
    if positions.shape[0] != batch:
        raise ValueError(f"positions: expected shape [B, H_kv, n] with B = a.shape[0] = {batch}, "
                         f"got {tuple(positions.shape)}")
    if heads == 0 or hd % heads:
        raise ValueError(f"positions: H_kv = positions.shape[1] = {heads} must divide basis.shape[2] = "
                         f"H_kv * D = {hd}")
    head_dim = hd // heads
    if head_dim == 0 or head_dim % 2 or head_dim > MAX_HEAD_DIM:
        raise ValueError(f"basis: head dimension D = basis.shape[2] / H_kv = {hd} / {heads} = {head_dim}; "
                         f"RoPE needs D even, and D must be in [2, {MAX_HEAD_DIM}]")
    if cos.shape[1] != head_dim:
        raise ValueError(f"cos: expected shape [P, D] with D = {head_dim}, got {tuple(cos.shape)}")
    if sin.shape != cos.shape:
        raise ValueError(f"sin: expected the shape of cos {tuple(cos.shape)}, got {tuple(sin.shape)}")
    if rope_positions is None and cos.shape[0] < seq:
        raise ValueError(f"cos: the tables have {cos.shape[0]} positions but a holds S = {seq} tokens; "
                         "they must cover every position in [0, S) (or pass rope_positions)")
    if rope_positions is not None and rope_positions.shape != positions.shape:
        raise ValueError(f"rope_positions: expected the shape of positions {tuple(positions.shape)}, "
                         f"got {tuple(rope_positions.shape)}")
    validation.same_device(a=a, basis=basis, positions=positions, cos=cos, sin=sin, rope_positions=rope_positions)
    # Reading the values costs a device sync on a GPU; on the CPU it is cheap, so check there.
    if positions.device.type == "cpu" and positions.numel() and not torch.compiler.is_compiling():
        for name, t, limit, meaning in (("positions", positions, seq, "S"),
                                        ("rope_positions", rope_positions, cos.shape[0], "P")):
            if t is None:
                continue
            low, high = int(t.min()), int(t.max())
            if low < 0 or high >= limit:
                raise ValueError(f"{name}: expected values in [0, {meaning}) = [0, {limit}), "
                                 f"got values in [{low}, {high}]")
    return batch, seq, heads, n, head_dim, rank


def _in_order(rows: torch.Tensor, table_rows: int) -> bool:
    """Whether `rows` is 0, 1, ..., table_rows - 1 (then indexing a table by it is a view of it)."""
    return (rows.numel() == table_rows
            and torch.equal(rows.flatten(), torch.arange(table_rows, device=rows.device)))


def _reconstruct_keys_cpu(a, basis, positions, cos, sin, rope_positions, out) -> torch.Tensor:
    """Gather + float32 matmul + RoPE, all torch, into `out` (allocated if None), one sequence at a
    time: at B = 4, H_kv = 8 and 2048 tokens a whole-batch temporary is 34 MB, above the 32 MB
    beyond which glibc maps every allocation afresh (each step's temporaries would then be
    page-faulted in anew, as measured on ShadowKV's B = 4 decode); one sequence's are a quarter.

    RoPE is applied half by half, `x1 * cos1 - x2 * sin1` and `x2 * cos2 + x1 * sin2` (1, 2: the
    halves of the D channels), which is `x * cos + rotate_half(x) * sin` exactly (adding a negated
    product is subtracting it) without building rotate_half(x).
    """
    batch, heads, n = positions.shape
    rank = a.shape[2]
    head_dim = basis.shape[2] // heads
    half = head_dim // 2
    positions = positions.to(torch.int64)
    rope_rows = positions if rope_positions is None else rope_positions.to(torch.int64)
    in_order = _in_order(rope_rows, cos.shape[0])  # tables of exactly these tokens' rows, in order (ShadowKV's)
    if out is None:
        out = torch.empty((batch, heads, n, head_dim), dtype=a.dtype, device=a.device)
    in_place = out.dtype == torch.float32  # then RoPE writes into out itself
    for b in range(batch):
        rows = a[b][positions[b]]  # [H_kv, n, rank]
        per_head = basis[b].reshape(rank, heads, head_dim).transpose(0, 1)  # [H_kv, rank, D]
        keys = torch.matmul(rows.to(torch.float32), per_head.to(torch.float32))  # [H_kv, n, D]
        if in_order:
            c = cos[b * heads * n:(b + 1) * heads * n].view(heads, n, head_dim)
            s = sin[b * heads * n:(b + 1) * heads * n].view(heads, n, head_dim)
        else:
            c, s = cos[rope_rows[b]], sin[rope_rows[b]]  # [H_kv, n, D]
        x1, x2 = keys[..., :half], keys[..., half:]
        rotated = out[b] if in_place else torch.empty_like(keys)
        torch.sub(x1 * c[..., :half], x2 * s[..., :half], out=rotated[..., :half])
        torch.add(x2 * c[..., half:], x1 * s[..., half:], out=rotated[..., half:])
        if not in_place:
            out[b].copy_(rotated)  # rounded once to a's dtype
    return out


def _fake_reconstruct_keys(a, basis, positions, cos, sin, rope_positions):
    batch, heads, n = positions.shape
    return a.new_empty((batch, heads, n, basis.shape[2] // heads))


@kernel_op("reconstruct_keys", fake=_fake_reconstruct_keys)
def _reconstruct_keys(a: torch.Tensor, basis: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor, rope_positions: torch.Tensor | None,
                      out: torch.Tensor | None) -> torch.Tensor:
    path = backend.choose(a)
    if path == "reference":
        result = lowrank_ref.reconstruct_keys(a, basis, positions, cos, sin, rope_positions)
        return result if out is None else out.copy_(result)
    if path == "cpu":
        return _reconstruct_keys_cpu(a, basis, positions, cos, sin, rope_positions, out)
    batch, heads, n = positions.shape
    head_dim = basis.shape[2] // heads
    if out is None:
        out = torch.empty((batch, heads, n, head_dim), dtype=a.dtype, device=a.device)
    shape = (batch, a.shape[1], heads, n, head_dim, a.shape[2])
    config = configs.best_config(RECONSTRUCT_SPEC, shape, validation.dtype_name(a.dtype), device_for_tensor(a))
    return reconstruct_keys_triton(a, basis, positions, cos, sin, config=config, out=out,
                                   rope_positions=rope_positions)


def reconstruct_keys(a: torch.Tensor, basis: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor, *, rope_positions: torch.Tensor | None = None,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """Post-RoPE keys of chosen tokens, rebuilt from the low-rank factors of `lowrank_keys`.

    a: `[B, S, rank]` and basis: `[B, rank, H_kv * D]`, one float dtype (float16, bfloat16 or
    float32); positions: int32 or int64 `[B, H_kv, n]`, token positions per KV head, in [0, S), in
    any order and with repeats; cos, sin: float32 `[P, D]` RoPE tables
    (`kernelhub.reference.rope.rope_tables`, P >= S). All on one device, any strides.
    rope_positions: optional int32/int64 `[B, H_kv, n]`, the rows of cos and sin to use for each
    token instead of its position, in [0, P): for tables holding only the chosen tokens' rows
    (`rope_rows(positions.flatten())` with `rope_positions = arange(n_total).view(positions.shape)`),
    which at long context are much smaller than whole tables; then P >= S is not required.
    out: optional `[B, H_kv, n, D]` of a's dtype to write into (any strides; it may overlap
    neither itself nor an input).
    Returns `[B, H_kv, n, D]` in a's dtype, computed in float32. Equivalent to

        p, q = positions[b, h, i], rope_positions[b, h, i]  # q = p without rope_positions
        x = a[b, p].float() @ basis[b, :, h * D:(h + 1) * D].float()             # [D]
        out[b, h, i] = (x * cos[q] + rotate_half(x) * sin[q]).to(a.dtype)         # rotate-half RoPE

    Index values are range-checked only for CPU tensors (on a GPU the check would cost a device
    sync): on a GPU an index out of range reads out of bounds. P >= S (without rope_positions) is
    always checked.
    """
    batch, _, heads, n, head_dim, _ = _check_reconstruct_args(a, basis, positions, cos, sin, rope_positions)
    validation.out_tensor(out, shape=(batch, heads, n, head_dim), dtype=a.dtype, device=a.device,
                          inputs={"a": a, "basis": basis, "positions": positions, "cos": cos, "sin": sin,
                                  "rope_positions": rope_positions})
    return _reconstruct_keys(a, basis, positions, cos, sin, rope_positions, out)
