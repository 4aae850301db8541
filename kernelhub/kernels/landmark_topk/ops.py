"""Landmark chunk selection public ops (ShadowKV): validate -> backend -> best stored config -> launch.

Re-exported by `kernelhub.ops`; see there for backends and torch.library registration.

    landmarks(k_rope)                        chunk means, once per prefill (torch on every backend)
    outlier_chunks(k_rope, landmarks, n)     chunks their landmark summarises worst (torch on every backend)
    landmark_topk(q, landmarks, k)           the chunks to fetch at a decode step (the Triton kernel)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kernelhub import backend, configs, validation
from kernelhub.device import device_for_tensor
from kernelhub.kernels.common.library import kernel_op
from kernelhub.kernels.landmark_topk.spec import SPEC as LANDMARK_TOPK
from kernelhub.kernels.landmark_topk.kernel import landmark_topk_triton
from kernelhub.reference import landmark_topk as ref

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    return value


def _check_chunk_size(chunk_size) -> int:
    if _check_int("chunk_size", chunk_size) < 1:
        raise ValueError(f"chunk_size: expected >= 1, got {chunk_size}")
    return chunk_size


# ----------------------------------------------------------------------------------------------
# landmarks
# ----------------------------------------------------------------------------------------------

def _fake_landmarks(k_rope, chunk_size):
    b, h, s, d = k_rope.shape
    return k_rope.new_empty((b, h, s // chunk_size, d))


@kernel_op("landmarks", fake=_fake_landmarks)
def _landmarks(k_rope: torch.Tensor, chunk_size: int) -> torch.Tensor:
    if backend.choose(k_rope) == "reference":
        return ref.landmarks(k_rope, chunk_size)
    b, h, s, d = k_rope.shape
    c = s // chunk_size
    chunks = k_rope[:, :, :c * chunk_size].reshape(b, h, c, chunk_size, d)
    # mean(dtype=float32) accumulates in float32 without a float32 copy of the whole cache.
    return chunks.mean(dim=3, dtype=torch.float32).to(k_rope.dtype)


def landmarks(k_rope: torch.Tensor, chunk_size: int = 8) -> torch.Tensor:
    """Chunk landmarks: post-RoPE keys `k_rope [B, H_kv, S, D]` -> `[B, H_kv, C, D]`, C = S // chunk_size.

    k_rope: float16, bfloat16 or float32, any strides. The landmark of chunk c is the mean of keys
    c * chunk_size .. (c + 1) * chunk_size - 1, computed in float32 and returned in k_rope.dtype.
    Only full chunks count: the last S % chunk_size tokens form no chunk (ShadowKV keeps the most
    recent tokens exact in its local window). Needs S >= chunk_size. Equivalent to

        C = S // chunk_size
        k_rope[:, :, :C * chunk_size].float().reshape(B, H_kv, C, chunk_size, D).mean(3).to(k_rope.dtype)
    """
    validation.tensor("k_rope", k_rope, dtypes=_FLOAT_DTYPES, ndim=4)
    _check_chunk_size(chunk_size)
    if k_rope.shape[2] < chunk_size:
        raise ValueError(f"k_rope: S = {k_rope.shape[2]} tokens is fewer than chunk_size = {chunk_size}, "
                         "so there is no full chunk")
    return _landmarks(k_rope, chunk_size)


# ----------------------------------------------------------------------------------------------
# outlier chunks
# ----------------------------------------------------------------------------------------------

def _fake_outlier_chunks(k_rope, landmarks, n, chunk_size):
    return landmarks.new_empty((landmarks.shape[0], landmarks.shape[1], n), dtype=torch.int64)


@kernel_op("outlier_chunks", fake=_fake_outlier_chunks)
def _outlier_chunks(k_rope: torch.Tensor, landmarks: torch.Tensor, n: int, chunk_size: int) -> torch.Tensor:
    if backend.choose(k_rope) == "reference":
        return ref.outlier_chunks(k_rope, landmarks, n, chunk_size)
    b, h, c, d = landmarks.shape
    keys = k_rope[:, :, :c * chunk_size].reshape(b, h, c, chunk_size, d).to(torch.float32)
    cos = F.cosine_similarity(keys, landmarks.to(torch.float32).unsqueeze(3), dim=-1, eps=1e-8)
    return torch.topk(cos.amin(dim=-1), n, dim=-1, largest=False, sorted=True).indices


def outlier_chunks(k_rope: torch.Tensor, landmarks: torch.Tensor, n: int, *, chunk_size: int = 8) -> torch.Tensor:
    """The n chunks per KV head whose keys their landmark summarises worst -> int64 `[B, H_kv, n]`.

    k_rope [B, H_kv, S, D] and landmarks [B, H_kv, C, D] (from `landmarks(k_rope, chunk_size)`, so
    C = S // chunk_size), float16/bfloat16/float32; 0 <= n <= C. A chunk's score is the lowest cosine
    similarity between one of its keys and its landmark (float32); the result lists the n lowest,
    ascending score (ties in either order). ShadowKV keeps these chunks exact on the GPU and passes
    them to `landmark_topk` as `exclude`. Equivalent to

        keys = k_rope[:, :, :C * chunk_size].float().reshape(B, H_kv, C, chunk_size, D)
        cos = torch.nn.functional.cosine_similarity(keys, landmarks.float()[:, :, :, None], dim=-1)
        torch.topk(cos.amin(-1), n, largest=False).indices

    Memory: a float32 copy of k_rope's full chunks (computed once per prefill).
    """
    validation.tensor("k_rope", k_rope, dtypes=_FLOAT_DTYPES, ndim=4)
    validation.tensor("landmarks", landmarks, dtypes=_FLOAT_DTYPES, ndim=4)
    _check_chunk_size(chunk_size)
    b, h, s, d = k_rope.shape
    validation.shape("landmarks", landmarks, (b, h, s // chunk_size, d), "[B, H_kv, S // chunk_size, D]")
    c = landmarks.shape[2]
    if not 0 <= _check_int("n", n) <= c:
        raise ValueError(f"n: expected 0 <= n <= C = {c}, got {n}")
    validation.same_device(k_rope=k_rope, landmarks=landmarks)
    return _outlier_chunks(k_rope, landmarks, n, chunk_size)


# ----------------------------------------------------------------------------------------------
# landmark top-k
# ----------------------------------------------------------------------------------------------

def _check_topk_arguments(q, landmarks, k, exclude) -> tuple[int, int, int]:
    """Everything but the data-dependent check of k against `exclude`; returns (B, H_kv, C)."""
    validation.tensor("q", q, dtypes=_FLOAT_DTYPES, ndim=3)
    validation.tensor("landmarks", landmarks, dtypes=_FLOAT_DTYPES, ndim=4)
    if landmarks.dtype != q.dtype:
        raise TypeError(f"landmarks: expected dtype {validation.dtype_name(q.dtype)} (the dtype of q), "
                        f"got {validation.dtype_name(landmarks.dtype)}")
    b, h_q, d = q.shape
    lb, h_kv, c, ld = landmarks.shape
    if lb != b or ld != d:
        raise ValueError(f"landmarks: expected shape [B, H_kv, C, D] with B = {b} and D = {d} from q "
                         f"[B, H_q, D]; got {tuple(landmarks.shape)}")
    if d == 0:
        raise ValueError("q: head dimension D = q.shape[2] = 0; the scores q . L / sqrt(D) need D >= 1")
    if h_kv == 0 or h_q % h_kv:
        raise ValueError(f"q: H_q = {h_q} query heads must be a multiple of H_kv = {h_kv} "
                         "(landmarks.shape[1]) KV heads")
    if not 1 <= _check_int("k", k) <= c:
        raise ValueError(f"k: expected 1 <= k <= C = {c} chunks, got {k}")
    if exclude is not None:
        validation.tensor("exclude", exclude, dtypes=(torch.bool,), ndim=3)
        validation.shape("exclude", exclude, (b, h_kv, c), "[B, H_kv, C]")
    validation.same_device(q=q, landmarks=landmarks, exclude=exclude)
    return b, h_kv, c


def _check_k_after_exclude(k: int, exclude: torch.Tensor | None, c: int) -> None:
    """k <= the chunks left in every row: reads the per-row count back, one device sync."""
    if exclude is None or exclude.numel() == 0:
        return
    left = c - exclude.sum(dim=-1)  # [B, H_kv]
    fewest = int(left.min())
    if k > fewest:
        row = [int(i) for i in (left == fewest).nonzero()[0]]
        raise ValueError(f"k: {k} chunks requested but row {row} has only {fewest} of C = {c} chunks "
                         "left after exclude")


def _cpu_landmark_topk(q, landmarks, k, exclude) -> torch.Tensor:
    """One batched matmul per KV head group (no [B, H_q, C, D] expansion), softmax, group max, topk."""
    b, h_q, d = q.shape
    _, h_kv, c, _ = landmarks.shape
    qg = q.reshape(b, h_kv, h_q // h_kv, d).to(torch.float32)  # query head j = h * g + i
    s = torch.matmul(qg, landmarks.to(torch.float32).transpose(-1, -2))  # [B, H_kv, g, C]
    s.mul_(1.0 / math.sqrt(d))
    if exclude is not None:
        s.masked_fill_(exclude[:, :, None, :], float("-inf"))
    score = torch.softmax(s, dim=-1).amax(dim=2)  # [B, H_kv, C]
    if exclude is not None:
        score.masked_fill_(exclude, float("-inf"))
    return torch.topk(score, k, dim=-1, sorted=True).indices


def _fake_landmark_topk(q, landmarks, k, exclude):
    return q.new_empty((q.shape[0], landmarks.shape[1], k), dtype=torch.int64)


@kernel_op("landmark_topk", fake=_fake_landmark_topk)
def _landmark_topk(q: torch.Tensor, landmarks: torch.Tensor, k: int, exclude: torch.Tensor | None,
                   out: torch.Tensor | None) -> torch.Tensor:
    _check_k_after_exclude(k, exclude, landmarks.shape[2])
    path = backend.choose(q)
    if path in ("reference", "cpu"):
        if path == "reference":
            result = ref.landmark_topk(q, landmarks, k, exclude)
        else:
            result = _cpu_landmark_topk(q, landmarks, k, exclude)
        return result if out is None else out.copy_(result)
    b, h_q, d = q.shape
    _, h_kv, c, _ = landmarks.shape
    if out is None:
        out = torch.empty((b, h_kv, k), dtype=torch.int64, device=q.device)
    shape = (b, h_q, h_kv, c, d, k)
    config = configs.best_config(LANDMARK_TOPK, shape, validation.dtype_name(q.dtype), device_for_tensor(q))
    return landmark_topk_triton(q, landmarks, k, config=config, out=out, exclude=exclude)


def landmark_topk(q: torch.Tensor, landmarks: torch.Tensor, k: int, *, exclude: torch.Tensor | None = None,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """The k chunks per KV head whose landmarks the decode query scores highest -> int64 `[B, H_kv, k]`.

    q [B, H_q, D]: the post-RoPE decode query; landmarks [B, H_kv, C, D] of q's dtype (float16,
    bfloat16 or float32), from `landmarks`; H_q a multiple of H_kv (MHA, GQA, MQA): query head j
    belongs to KV head j // (H_q // H_kv). exclude: optional bool [B, H_kv, C], chunks already
    resident (outliers, the local window), removed before the softmax and never returned.
    1 <= k <= C, and with `exclude`, k <= the chunks left in every row: checking that reads the
    per-row count back from the device, one synchronisation per call. D >= 1. out: optional int64
    [B, H_kv, k] (any strides; it may overlap neither itself nor an input). Rows are sorted by
    descending score; ties may come in either order. Equivalent to

        g = H_q // H_kv
        s = torch.einsum("bhgd,bhcd->bhgc", q.view(B, H_kv, g, D).float(), landmarks.float()) / sqrt(D)
        s = s.masked_fill(exclude[:, :, None, :], -inf)        # if exclude is given
        score = torch.softmax(s, dim=-1).amax(dim=2)           # [B, H_kv, C], max over the group
        torch.topk(score.masked_fill(exclude, -inf), k, dim=-1).indices

    in float32. The Triton kernel never stores the [B, H_q, C] probabilities.
    """
    b, h_kv, _ = _check_topk_arguments(q, landmarks, k, exclude)
    validation.out_tensor(out, shape=(b, h_kv, k), dtype=torch.int64, device=q.device,
                          inputs={"q": q, "landmarks": landmarks, "exclude": exclude})
    return _landmark_topk(q, landmarks, k, exclude, out)
