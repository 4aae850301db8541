"""Sparse gather public op: validate -> where the output lives -> backend -> best stored config -> launch.

Re-exported by `kernelhub.ops`; see there for backends and torch.library registration.
"""

from __future__ import annotations

import warnings

import torch

from kernelhub import backend, configs, validation
from kernelhub.device import device_for_tensor
from kernelhub.kernels.common.library import kernel_op
from kernelhub.kernels.sparse_gather.spec import SPEC as SPARSE_GATHER
from kernelhub.kernels.sparse_gather.kernel import sparse_gather_triton
from kernelhub.reference import sparse_gather as ref

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INDEX_DTYPES = (torch.int64, torch.int32)
_CPU = torch.device("cpu")
# What Triton's CUDA launcher says when it cannot map a host pointer into the device's address space.
_HOST_POINTER_REFUSED = "cannot be accessed from Triton"


def _output_device(chunk_idx: torch.Tensor, out, device) -> torch.device:
    """`out`'s device if given, else `device` if given, else `chunk_idx`'s device."""
    if device is not None:
        device = validation.device("device", device)
    if out is not None:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"out: expected a torch.Tensor, got {type(out).__name__}")
        if device is not None and device != out.device:
            raise ValueError(f"device: {device} differs from out's device {out.device}; pass one or make them agree")
        return out.device
    return device if device is not None else chunk_idx.device


def _check_inputs(values, chunk_idx, out, resident_idx, resident, device) -> torch.device:
    """Shapes, dtypes and devices (metadata only: no data is read, so this also runs while tracing).
    Returns the device of the output."""
    validation.tensor("values", values, dtypes=_FLOAT_DTYPES, ndim=5)
    validation.tensor("chunk_idx", chunk_idx, dtypes=_INDEX_DTYPES, ndim=3)
    batch, heads, _, chunk, d = values.shape
    k = chunk_idx.shape[-1]
    validation.shape("chunk_idx", chunk_idx, (batch, heads, k), "[B, H_kv, k]")
    target = _output_device(chunk_idx, out, device)
    if values.device != target and not (values.device == _CPU and target.type == "cuda"):
        raise ValueError(f"values is on {values.device} but the output is on {target}: values must be on the "
                         f"output device, or in host memory (pinned, for speed) when the output is on a GPU")
    if chunk_idx.device not in (target, _CPU):
        raise ValueError(f"chunk_idx is on {chunk_idx.device} but the output is on {target}")
    if (resident_idx is None) != (resident is None):
        raise ValueError("resident_idx and resident go together: pass both (the previous step's chunk_idx and "
                         "output) or neither")
    if resident_idx is not None:
        validation.tensor("resident_idx", resident_idx, dtypes=_INDEX_DTYPES, ndim=3)
        k_prev = resident_idx.shape[-1]
        validation.shape("resident_idx", resident_idx, (batch, heads, k_prev), "[B, H_kv, k_prev]")
        if not isinstance(resident, torch.Tensor):
            raise TypeError(f"resident: expected a torch.Tensor, got {type(resident).__name__}")
        validation.refuse_autograd("resident", resident)
        if resident.dtype != values.dtype:
            raise TypeError(f"resident: expected dtype {validation.dtype_name(values.dtype)} (that of values), "
                            f"got {validation.dtype_name(resident.dtype)}")
        if resident.dim() != 4:
            raise ValueError(f"resident: expected a 4-D tensor, got shape {tuple(resident.shape)}")
        validation.shape("resident", resident, (batch, heads, k_prev * chunk, d), "[B, H_kv, k_prev*chunk, D]")
        for name, t in (("resident_idx", resident_idx), ("resident", resident)):
            if t.device != target:
                raise ValueError(f"{name} is on {t.device} but the output is on {target}: the resident set "
                                 f"lives where the outputs do")
    validation.out_tensor(out, shape=(batch, heads, k * chunk, d), dtype=values.dtype, device=target,
                          inputs={"values": values, "chunk_idx": chunk_idx, "resident_idx": resident_idx,
                                  "resident": resident},
                          advice={"resident": "the previous step's output becomes this step's resident, so "
                                              "alternate between two output buffers"})
    return target


def _check_index_range(chunk_idx: torch.Tensor, num_chunks: int) -> None:
    """Every index in [0, C). Only for indices in host memory: on a GPU the check would cost a sync
    (there the kernel writes NaN rows for an index out of range instead of reading out of bounds)."""
    if chunk_idx.device.type != "cpu" or chunk_idx.numel() == 0:
        return
    bad = (chunk_idx < 0) | (chunk_idx >= num_chunks)
    if bool(bad.any()):
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"chunk_idx: indices must lie in [0, C) = [0, {num_chunks}); "
                         f"chunk_idx{list(first)} = {int(chunk_idx[first])} ({int(bad.sum())} out of range)")


def _gather_cpu(values: torch.Tensor, chunk_idx: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """`index_select` of rows of the `[B*H_kv*C, chunk*D]` table, into `out` when it allows.

    About 20x faster on CPU than the reference's advanced indexing. Falls back to the latter where
    `values` cannot be viewed as that table (a strided view of the cache).
    """
    batch, heads, num_chunks, chunk, d = values.shape
    k = chunk_idx.shape[-1]
    try:
        table = values.view(batch * heads * num_chunks, chunk * d)
    except RuntimeError:
        return out.copy_(ref.sparse_gather(values, chunk_idx))
    head_base = torch.arange(batch * heads, dtype=torch.int64).view(batch, heads, 1) * num_chunks
    rows = (head_base + chunk_idx).reshape(-1)  # [B*H_kv*k], rows of the table
    try:
        dest = out.view(batch * heads * k, chunk * d)
    except RuntimeError:
        return out.copy_(torch.index_select(table, 0, rows).view(out.shape))
    torch.index_select(table, 0, rows, out=dest)
    return out


_warned_refused = False


def _gather_from_host(values, chunk_idx, resident_idx, resident, out, config) -> torch.Tensor:
    """`values` in host memory, `out` on a GPU.

    Pinned `values`: the kernel reads the missed chunks straight from host memory (zero-copy, UVA)
    and the hits from `resident`. Otherwise (pageable memory, or a driver that refuses the host
    pointer): gather every selected chunk on the host into a pinned staging buffer and copy it
    asynchronously (`resident` is not used; the copy is ordered on the current stream, and the
    caching host allocator keeps the staging buffer alive until it completes).
    """
    global _warned_refused
    if values.is_pinned():
        try:
            return sparse_gather_triton(values, chunk_idx, config=config, out=out, resident_idx=resident_idx,
                                        resident=resident)
        except ValueError as exc:  # raised while binding arguments, before anything is launched
            if _HOST_POINTER_REFUSED not in str(exc):
                raise
            if not _warned_refused:
                _warned_refused = True
                warnings.warn(f"kernelhub.sparse_gather: Triton cannot read pinned host memory here ({exc}); "
                              f"gathering on the host and copying instead", RuntimeWarning, stacklevel=4)
    staging = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
    _gather_cpu(values, chunk_idx.cpu(), staging)
    return out.copy_(staging, non_blocking=True)


def _fake_sparse_gather(values, chunk_idx, resident_idx, resident, device):
    batch, heads, _, chunk, d = values.shape
    return values.new_empty((batch, heads, chunk_idx.shape[-1] * chunk, d), device=device)


@kernel_op("sparse_gather", fake=_fake_sparse_gather)
def _sparse_gather(values: torch.Tensor, chunk_idx: torch.Tensor, resident_idx: torch.Tensor | None,
                   resident: torch.Tensor | None, device: torch.device, out: torch.Tensor | None) -> torch.Tensor:
    batch, heads, num_chunks, chunk, d = values.shape
    k = chunk_idx.shape[-1]
    _check_index_range(chunk_idx, num_chunks)
    chunk_idx = chunk_idx.to(device)
    path = backend.choose(chunk_idx)  # now on `device`
    if path == "reference":  # the reference needs no resident set: it is the same numbers
        result = ref.sparse_gather(values, chunk_idx).to(device)
        return result if out is None else out.copy_(result)
    if out is None:
        out = torch.empty((batch, heads, k * chunk, d), dtype=values.dtype, device=device)
    if path == "cpu":  # host to host: a chunk costs the same copied from `resident` or from `values`
        return _gather_cpu(values, chunk_idx, out) if out.numel() else out
    shape = (batch, heads, num_chunks, chunk, d, k)
    config = configs.best_config(SPARSE_GATHER, shape, validation.dtype_name(values.dtype), device_for_tensor(out))
    if device.type != "cuda":  # Triton's interpreter on CPU tensors
        return sparse_gather_triton(values, chunk_idx, config=config, out=out, resident_idx=resident_idx,
                                    resident=resident)
    with torch.cuda.device(device):
        if values.device != device:
            return _gather_from_host(values, chunk_idx, resident_idx, resident, out, config)
        return sparse_gather_triton(values, chunk_idx, config=config, out=out, resident_idx=resident_idx,
                                    resident=resident)


def sparse_gather(
    values: torch.Tensor,
    chunk_idx: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    resident_idx: torch.Tensor | None = None,
    resident: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Gather the selected chunks of a chunk-major value cache (ShadowKV's value fetch).

    values: `[B, H_kv, C, chunk, D]`, float16/bfloat16/float32/float64, any strides; on the output
        device, or in host memory when the output is on a GPU (pin it: `values.pin_memory()`, or
        the gather goes through a host staging copy).
    chunk_idx: int64 or int32 `[B, H_kv, k]`, each in [0, C); repeats and any order allowed; on
        the output device or the CPU.
    out: optional `[B, H_kv, k*chunk, D]` of `values.dtype` to write into.
    resident_idx, resident: optional, together: the previous step's `chunk_idx` (int64/int32
        `[B, H_kv, k_prev]`) and output (`[B, H_kv, k_prev*chunk, D]`, `values.dtype`), on the
        output device. A selected chunk that `resident_idx` names (same b, h) is copied from
        `resident` on the device instead of fetched from `values`: about 60% of them in ShadowKV.
        `resident` must hold what `resident_idx` says, i.e. those chunks of `values` must not have
        changed since they were gathered (appending new chunks to the cache is fine); then the
        result is identical with or without it. Entries outside [0, C) never match (use -1 for an
        empty slot). Read by the Triton kernel (on the GPU; in the interpreter with
        KERNELHUB_BACKEND=triton); the CPU path, the reference and the host staging fallback
        (unpinned `values`) gather everything from `values` and ignore it.
    device: where the output lives when `out` is not given (default: `chunk_idx`'s device).

    Returns `[B, H_kv, k*chunk, D]` (`out` if given) on `out`'s device, else `device`, else
    `chunk_idx`'s device. Equivalent to the following PyTorch code:

        b = torch.arange(B)[:, None, None]
        h = torch.arange(H_kv)[None, :, None]
        out = values[b, h, chunk_idx].flatten(2, 3).to(device)
        # out[b, h, i*chunk + t] = values[b, h, chunk_idx[b, h, i], t]

    Threading the resident set from step to step: the output of step t is the resident of step
    t + 1, and `out` must not overlap `resident` (checked), so alternate two buffers:

        bufs = [torch.empty(B, H_kv, k * chunk, D, dtype=values.dtype, device="cuda") for _ in range(2)]
        prev_idx = None
        for step, idx in enumerate(selections):          # idx [B, H_kv, k] on the GPU
            v = sparse_gather(values, idx, out=bufs[step % 2], resident_idx=prev_idx,
                              resident=None if prev_idx is None else bufs[(step - 1) % 2])
            prev_idx = idx

    Indices are range-checked when `chunk_idx` is in host memory. On the GPU that would cost a
    sync, so it is not done: an index outside [0, C) there yields NaN rows, never an out-of-bounds
    read. On the GPU the gather is asynchronous like a non_blocking copy: do not modify the host
    `values` it reads before the stream has passed it.
    """
    target = _check_inputs(values, chunk_idx, out, resident_idx, resident, device)
    return _sparse_gather(values, chunk_idx, resident_idx, resident, target, out)
