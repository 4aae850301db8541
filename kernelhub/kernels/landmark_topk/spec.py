"""Landmark top-k registration: the tuned `landmark_topk` spec, with its top-k tolerance."""

from __future__ import annotations

import math

import torch

from kernelhub import checking, validation
from kernelhub.kernels.landmark_topk import space
from kernelhub.kernels.landmark_topk.kernel import landmark_topk_triton
from kernelhub.reference import landmark_topk as ref
from kernelhub.registry import FamilySpec, register

UNIT_ROUNDOFF = 2.0**-24  # float32


def make_inputs(shape, dtype: str, device, seed: int) -> dict:
    """A decode query `q [B, H_q, D]` and landmarks `[B, H_kv, C, D]` of `dtype`, generated on `device`.

    Landmarks are noise (logits about N(0, 1/4)) except about one chunk in 64 per KV head (at least
    one), which points along its group's mean query with a logit gain of roughly 3 to 6: the
    few clearly relevant chunks that make top-k selection meaningful. Shapes with k <= C // 2 also
    get an `exclude` mask: the first chunk (attention sink), the last (local window) and about one
    in eight at random (outliers), capped so that at least k chunks stay in every row.
    """
    b, h_q, h_kv, c, d, k = shape
    g = h_q // h_kv
    gen = checking.generator(device, seed)
    on = dict(device=device, generator=gen)
    q = torch.randn(b, h_q, d, **on)
    landmarks = torch.randn(b, h_kv, c, d, **on) * 0.5
    direction = q.reshape(b, h_kv, g, d).mean(dim=2)
    direction = direction / direction.norm(dim=-1, keepdim=True).clamp_min(1e-6)  # [B, H_kv, D]
    relevant = torch.randint(0, c, (b, h_kv, max(1, c // 64)), **on)
    gain = (3.0 + 3.0 * torch.rand(relevant.shape, **on)) * math.sqrt(g)  # q_j . direction ~ sqrt(D / g)
    weight = torch.zeros(b, h_kv, c, device=device).scatter_(2, relevant, gain)
    landmarks += weight[..., None] * direction[:, :, None, :]
    torch_dtype = getattr(torch, dtype)
    inputs = {"q": q.to(torch_dtype), "landmarks": landmarks.to(torch_dtype), "k": k, "exclude": None}
    if k <= c // 2:
        exclude = torch.rand(b, h_kv, c, **on) < 0.125
        exclude[..., 0] = True
        exclude[..., -1] = True
        exclude &= exclude.cumsum(dim=-1) <= c - k
        inputs["exclude"] = exclude
    return inputs


def reference(inputs: dict) -> torch.Tensor:
    return ref.landmark_topk(inputs["q"], inputs["landmarks"], inputs["k"], inputs["exclude"])


def launch(inputs: dict, config: dict, out: torch.Tensor) -> torch.Tensor:
    return landmark_topk_triton(inputs["q"], inputs["landmarks"], inputs["k"], config=config, out=out,
                                exclude=inputs["exclude"])


def new_output(inputs: dict) -> torch.Tensor:
    q, landmarks = inputs["q"], inputs["landmarks"]
    return torch.empty(q.shape[0], landmarks.shape[1], inputs["k"], dtype=torch.int64, device=q.device)


def score_tolerance(inputs: dict) -> float:
    """Relative error bound of one float32 probability computed two ways (kernel and reference).

    p_jc = exp(s_jc - m_j) / L_j with s_jc = q_j . l_c / sqrt(D), all in float32 (16-bit inputs are
    exact in float32 and so are their products). With u = 2**-24 and
    A = max_jc sum_d |q_jd l_cd| / sqrt(D), to first order:
    - a dot product of D terms is off by at most D u A in any summation order, so s_jc - m_j by
      2 D u A, and p_jc relatively by as much (exp turns absolute into relative error);
    - exp of an argument of size up to 2A adds 2 A u (argument reduction) and a few u;
    - L_j sums C terms: at most C u relative, in any order;
    - the division and the scale 1 / sqrt(D) a few u.
    So |p' - p| <= (2 (D + 1) A + C + 16) u p for each implementation, and twice that between two.
    """
    q = inputs["q"].to(torch.float32)
    landmarks = inputs["landmarks"].to(torch.float32)
    b, h_q, d = q.shape
    h_kv, c = landmarks.shape[1], landmarks.shape[2]
    q_abs = q.abs().reshape(b, h_kv, h_q // h_kv, d)
    a = float(torch.matmul(q_abs, landmarks.abs().transpose(-1, -2)).max()) / math.sqrt(d) if c else 0.0
    return 2 * (2 * (d + 1) * a + c + 16) * UNIT_ROUNDOFF


def compare(actual: torch.Tensor, expected: torch.Tensor, inputs: dict) -> str | None:
    """None if `actual` is a valid top-k whose scores match the reference's, else what is wrong.

    Valid: int64 [B, H_kv, k], every index in [0, C), distinct within its row, not excluded. Then the
    reference's scores of the chosen chunks, sorted, must equal those of the reference's own choice
    within `score_tolerance` (ties and near-ties may be broken either way, so indices are never
    compared), and the chosen chunks must come in descending score (same tolerance).
    """
    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        return (f"expected {validation.dtype_name(expected.dtype)} {tuple(expected.shape)}, got "
                f"{validation.dtype_name(actual.dtype)} {tuple(actual.shape)}")
    q, landmarks, exclude = inputs["q"], inputs["landmarks"], inputs["exclude"]
    c = landmarks.shape[2]
    actual = actual.to(q.device)
    bad = (actual < 0) | (actual >= c)
    if bool(bad.any()):
        where = [int(i) for i in bad.nonzero()[0]]
        return f"index out of range [0, {c}) at {where}: {int(actual[tuple(where)])}"
    ordered = actual.sort(dim=-1).values
    repeated = ordered[..., 1:] == ordered[..., :-1]
    if bool(repeated.any()):
        b, h, i = (int(v) for v in repeated.nonzero()[0])
        return f"chunk {int(ordered[b, h, i])} chosen twice in row [{b}, {h}]"
    if exclude is not None:
        chosen_excluded = exclude.gather(-1, actual)
        if bool(chosen_excluded.any()):
            where = [int(i) for i in chosen_excluded.nonzero()[0]]
            return f"excluded chunk {int(actual[tuple(where)])} chosen at {where}"
    got = ref.selected_scores(q, landmarks, actual, exclude).double()
    want = ref.selected_scores(q, landmarks, expected.to(q.device), exclude).double()
    rtol = score_tolerance(inputs)
    got_sorted = got.sort(dim=-1, descending=True).values
    want_sorted = want.sort(dim=-1, descending=True).values
    off = (got_sorted - want_sorted).abs() > rtol * torch.maximum(got_sorted, want_sorted) + 1e-30
    if bool(off.any()):
        b, h, i = (int(v) for v in off.nonzero()[0])
        return (f"{int(off.sum())} selected scores differ from the reference's (rtol={rtol:.3g}); first in row "
                f"[{b}, {h}] at rank {i}: got {float(got_sorted[b, h, i]):.9g}, "
                f"expected {float(want_sorted[b, h, i]):.9g}")
    rises = got[..., 1:] > got[..., :-1] * (1 + rtol) + 1e-30
    if bool(rises.any()):
        b, h, i = (int(v) for v in rises.nonzero()[0])
        return (f"not in descending score order in row [{b}, {h}]: rank {i} scores {float(got[b, h, i]):.9g}, "
                f"rank {i + 1} {float(got[b, h, i + 1]):.9g}")
    return None


SPEC = register(FamilySpec.from_space(
    space, name="landmark_topk",
    summary="ShadowKV landmark chunk selection: group-max softmax over chunk landmarks, top-k per KV head",
    make_inputs=make_inputs, reference=reference, launch=launch, new_output=new_output, compare=compare,
))
