"""ShadowKV decode cache, composed from kernelhub's three ShadowKV families.

Prefill splits a sequence of S tokens into
- candidate chunks: the first `n_chunks * chunk_size` tokens, cut into chunks of `chunk_size`.
  Their pre-RoPE keys are kept as a rank-r factorisation `a [B, S_c, r] @ basis [B, r, H_kv*D]`
  on the compute device, their values are offloaded (chunk-major) to `offload_device`, and each
  chunk gets a landmark (mean of its post-RoPE keys);
- outlier chunks: per KV head, the `outliers` candidate chunks least similar to their landmark;
  their exact post-RoPE keys and values stay on the compute device and they are never selected;
- the local window: every token after the last candidate chunk (`local` tokens at least, up to
  `local + chunk_size - 1`), kept exact.

Decode of the token at position p = S + t:
1. RoPE the query and the new key at p; the new key and value join the generated tokens (exact);
2. `landmark_topk` picks `budget // chunk_size` candidate chunks per KV head (outliers excluded);
3. `reconstruct_keys` rebuilds their post-RoPE keys from the factorisation, `sparse_gather`
   fetches their values (reusing the chunks fetched at the previous step);
4. attention (scale 1/sqrt(D), GQA) over outliers + local window + selected chunks + generated
   tokens. Every token of the sequence is in at most one of these sets, so with full rank and a
   budget that covers every candidate chunk, decode equals dense attention.
"""

from __future__ import annotations

import math

import torch

import kernelhub.ops as ops
from kernelhub.kernels.lowrank_keys.ops import MAX_HEAD_DIM, check_gram_method
from kernelhub.reference.rope import apply_rope, rope_rows, undo_rope
from kernelhub.validation import dtype_name


def _gather_tokens(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x [B, H, S, D] at per-head token positions [B, H, n] -> [B, H, n, D]."""
    return torch.gather(x, 2, positions[..., None].expand(*positions.shape, x.shape[-1]))


def _chunk_tokens(chunk_idx: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Token positions of chunks: [B, H, k] -> [B, H, k * chunk_size], chunk by chunk."""
    offsets = torch.arange(chunk_size, device=chunk_idx.device)
    return (chunk_idx[..., None] * chunk_size + offsets).flatten(-2)


def _nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _appended(seq: torch.Tensor, buffer: torch.Tensor | None, token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(seq + token, its buffer): `seq [B, H, n, D]` with `token [B, H, D]` after it, written into
    the spare room of `buffer` when seq is a prefix view of it, else into a new buffer of twice the
    length (seq copied once): over a long generation each token is copied O(1) times, not every step.
    Nothing is written inside seq, so seq stays valid whatever happens after."""
    batch, heads, n, dim = seq.shape
    if (buffer is None or buffer.shape[2] <= n or buffer.data_ptr() != seq.data_ptr()
            or buffer.shape[:2] != seq.shape[:2] or buffer.dtype != seq.dtype or buffer.device != seq.device):
        buffer = seq.new_empty(batch, heads, max(16, 2 * (n + 1)), dim)
        buffer[:, :, :n] = seq
    buffer[:, :, n] = token
    return buffer[:, :, :n + 1], buffer


_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_count(name: str, value, low: int) -> int:
    """An int (not a bool) >= low."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
    return value


def _check_device(name: str, value) -> torch.device | None:
    if value is None:
        return None
    try:
        return torch.device(value)
    except (TypeError, RuntimeError) as exc:
        raise ValueError(f"{name}: expected a torch.device or a device string, got {value!r} ({exc})") from None


def _check_float_tensor(name: str, value, ndim: int, meaning: str) -> torch.Tensor:
    """A float16/bfloat16/float32 tensor of `ndim` dimensions (`meaning` spells its shape)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor {meaning}, got {type(value).__name__}")
    if value.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name}: expected dtype float16, bfloat16 or float32, got {dtype_name(value.dtype)}")
    if value.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor {meaning}, got shape {tuple(value.shape)}")
    return value


def _check_finite_keys(name: str, k: torch.Tensor) -> None:
    """The keys are factorised together, so one NaN or Inf would corrupt every reconstructed key."""
    finite = torch.isfinite(k)
    if not bool(finite.all()):
        raise ValueError(f"{name}: expected finite keys, found {int((~finite).sum())} NaN or Inf values")


def _check_positive(name: str, value) -> float:
    """A finite number > 0 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name}: expected a finite number > 0, got {value!r}")
    return float(value)


class ShadowKVCache:
    """A long-context KV cache with low-rank keys on the device and values offloaded.

    rank: rank of the pre-RoPE key factorisation (clamped to what the prefill allows).
    chunk_size: tokens per chunk. budget: tokens selected per KV head per decode step.
    outliers: exact chunks kept per KV head. local: exact trailing tokens kept.
    rope_theta: the RoPE base (finite, > 0); inv_freq: a model's own inverse frequencies
    `[D / 2]` instead (Llama-3.1's rescaled ones: `kernelhub.reference.rope`), which then also
    fix D. scale: the attention's softmax scale (default 1 / sqrt(D)). gram: how the prefill factors
    the keys, `kernelhub.ops.lowrank_keys(gram=)` ("float32", the optimum; "int8", near it and about
    twice as fast on a CPU without AMX). device: compute device
    (default: the prefill tensors' device). offload_device: where the candidate chunks' values
    live ("cpu"; pinned when the compute device is CUDA).

    Keys come in before RoPE (`prefill`, `decode`) or after it (`prefill_post_rope`,
    `decode_post_rope`: what a transformers model hands its cache; the pre-RoPE keys the
    factorisation needs are recovered by rotating back, exact up to float32 rounding).

    Every argument is checked before anything changes: a `prefill` or `decode` that raises
    leaves the cache exactly as it was (the new state is built aside and installed whole).
    """

    def __init__(self, rank: int = 160, chunk_size: int = 8, budget: int = 2048, outliers: int = 48,
                 local: int = 32, rope_theta: float = 500000.0, device: torch.device | str | None = None,
                 offload_device: torch.device | str = "cpu", *, inv_freq: torch.Tensor | None = None,
                 scale: float | None = None, gram: str = "float32"):
        self.rank = _check_count("rank", rank, 1)
        self.gram = check_gram_method(gram)
        self.chunk_size = _check_count("chunk_size", chunk_size, 1)
        self.budget = _check_count("budget", budget, 0)
        self.outliers = _check_count("outliers", outliers, 0)
        self.local = _check_count("local", local, 0)
        self.rope_theta = _check_positive("rope_theta", rope_theta)
        if inv_freq is not None:
            if not isinstance(inv_freq, torch.Tensor) or inv_freq.dim() != 1 or not inv_freq.is_floating_point():
                raise ValueError(f"inv_freq: expected a 1-D float tensor [D / 2], got {inv_freq!r:.80}")
            if not bool(torch.isfinite(inv_freq).all()) or not bool((inv_freq > 0).all()):
                raise ValueError("inv_freq: expected finite, positive inverse frequencies")
        self.inv_freq = inv_freq
        self.scale = None if scale is None else _check_positive("scale", scale)
        self.compute_device = _check_device("device", device)  # None: each prefill's own device
        self.offload_device = _check_device("offload_device", offload_device)
        self.device = self.compute_device
        self._prefilled = False
        # On the CPU, the selected values are written into the same tensor step after step: a fresh
        # tensor of tens of MB costs more than the copy into it there (its pages are faulted in on
        # first touch; a GPU's caching allocator has no such cost).
        self._scratch: dict[str, torch.Tensor] = {}

    # -- RoPE ----------------------------------------------------------------------------------

    def _rope_rows(self, positions: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 (cos, sin) `[n, D]` at `positions [n]`: the model's inverse frequencies, or rope_theta's."""
        return rope_rows(positions, head_dim, self.rope_theta, inv_freq=self.inv_freq)

    def _rope_at(self, x: torch.Tensor, position: int) -> torch.Tensor:
        """RoPE of `x [B, H, D]` at one position, float32."""
        cos, sin = self._rope_rows(torch.tensor([position], device=self.device), self.head_dim)
        return apply_rope(x, torch.zeros(x.shape[:2], dtype=torch.long, device=self.device), cos, sin)

    # -- prefill -----------------------------------------------------------------------------

    def prefill(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Build the cache from pre-RoPE keys `k` and values `v`, both [B, H_kv, S, D] of one float
        dtype (float16, bfloat16 or float32), positions 0..S-1; the keys finite. Replaces any earlier prefill."""
        self._check_prefill("k", k, v)
        self._install(self._build(k, None, v, self.compute_device or k.device))

    def prefill_post_rope(self, k_rope: torch.Tensor, v: torch.Tensor) -> None:
        """`prefill` from post-RoPE keys `k_rope` (RoPE at positions 0..S-1, as this cache applies it),
        as a transformers model's attention hands them to its cache."""
        self._check_prefill("k_rope", k_rope, v)
        self._install(self._build(None, k_rope, v, self.compute_device or k_rope.device))

    def _check_prefill(self, name: str, k: torch.Tensor, v: torch.Tensor) -> None:
        _check_float_tensor(name, k, 4, "[B, H_kv, S, D]")
        _check_float_tensor("v", v, 4, "[B, H_kv, S, D]")
        if v.dtype != k.dtype:
            raise TypeError(f"v: expected the dtype of {name} ({dtype_name(k.dtype)}), got {dtype_name(v.dtype)}")
        if v.shape != k.shape:
            raise ValueError(f"{name}, v: expected two [B, H_kv, S, D] tensors of one shape, got "
                             f"{tuple(k.shape)} and {tuple(v.shape)}")
        if min(k.shape) < 1:
            raise ValueError(f"{name}: every dimension of [B, H_kv, S, D] must be >= 1, got {tuple(k.shape)}")
        head_dim = k.shape[3]
        if head_dim % 2 or head_dim > MAX_HEAD_DIM:
            raise ValueError(f"{name}: head dimension D = {head_dim}; RoPE needs D even, and D must be in "
                             f"[2, {MAX_HEAD_DIM}]")
        if self.inv_freq is not None and 2 * self.inv_freq.numel() != head_dim:
            raise ValueError(f"{name}: head dimension D = {head_dim}, but inv_freq holds {self.inv_freq.numel()} "
                             f"frequencies (D / 2)")
        if k.device != v.device:
            raise ValueError(f"v is on {v.device} but {name} is on {k.device}: pass both on one device")
        _check_finite_keys(name, k)

    def _install(self, state: dict) -> None:
        vars(self).update(state)  # installed whole, after every step of the build succeeded
        self._prefilled = True

    def _build(self, k: torch.Tensor | None, k_rope: torch.Tensor | None, v: torch.Tensor,
               device: torch.device) -> dict:
        """The whole per-prefill state, as attribute name -> value, from the pre-RoPE keys `k` or the
        post-RoPE ones `k_rope` (the other is derived); nothing on `self` changes here."""
        given = k if k is not None else k_rope
        batch, heads, seq, head_dim = given.shape
        dtype = given.dtype
        v = v.to(device)
        positions = torch.arange(seq, device=device).expand(batch, heads, seq)
        cos, sin = self._rope_rows(torch.arange(seq, device=device), head_dim)  # prefill only: not kept
        if k is not None:
            k = k.to(device)
            k_rope = apply_rope(k, positions, cos, sin).to(dtype)  # [B, H_kv, S, D]
        else:
            k_rope = k_rope.to(device)
            k = undo_rope(k_rope, positions, cos, sin).to(dtype)
        del cos, sin
        state = dict(device=device, dtype=dtype, batch=batch, heads=heads, head_dim=head_dim, seq_len=seq,
                     steps=0, _resident_idx=None, _resident_values=None, _gen_k_buffer=None, _gen_v_buffer=None,
                     _scratch={})

        # Candidate chunks end where the local window (at least `local` tokens) begins.
        n_chunks = max(0, seq - self.local) // self.chunk_size
        candidate_end = n_chunks * self.chunk_size
        n_outliers = min(self.outliers, n_chunks)
        state.update(n_chunks=n_chunks, n_select=min(self.budget // self.chunk_size, n_chunks - n_outliers),
                     local_k=k_rope[:, :, candidate_end:], local_v=v[:, :, candidate_end:],
                     gen_k=k.new_empty(batch, heads, 0, head_dim), gen_v=v.new_empty(batch, heads, 0, head_dim))
        if n_chunks == 0:  # a short prefill: everything is in the local window
            empty = k.new_empty(batch, heads, 0, head_dim)
            state.update(effective_rank=0, a=None, basis=None, landmarks=None, exclude=None, values=None,
                         outlier_idx=None, outlier_k=empty, outlier_v=empty)
            return state

        effective_rank = min(self.rank, candidate_end, heads * head_dim)
        a, basis = ops.lowrank_keys(k[:, :, :candidate_end], effective_rank, gram=self.gram)
        landmarks = ops.landmarks(k_rope[:, :, :candidate_end], self.chunk_size)
        outlier_idx = ops.outlier_chunks(k_rope[:, :, :candidate_end], landmarks, n_outliers,
                                         chunk_size=self.chunk_size)
        outlier_tokens = _chunk_tokens(outlier_idx, self.chunk_size)
        exclude = torch.zeros(batch, heads, n_chunks, dtype=torch.bool, device=device)
        exclude.scatter_(2, outlier_idx, True)

        values = v[:, :, :candidate_end].reshape(batch, heads, n_chunks, self.chunk_size, head_dim)
        state.update(effective_rank=effective_rank, a=a, basis=basis, landmarks=landmarks, exclude=exclude,
                     values=self._offloaded(values, device), outlier_idx=outlier_idx,
                     outlier_k=_gather_tokens(k_rope, outlier_tokens), outlier_v=_gather_tokens(v, outlier_tokens))
        return state

    def _offloaded(self, values: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Chunk-major values `[B, H_kv, C, chunk, D]` in offload memory, for a cache computing on
        `device`: a selected chunk is one block, pinned host memory when the device is a GPU."""
        values = values.to(self.offload_device).contiguous()
        if device.type == "cuda" and self.offload_device.type == "cpu":
            values = values.pin_memory()
        return values

    # -- decode ------------------------------------------------------------------------------

    def decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention output `[B, H_q, D]` in q's dtype of the next token: pre-RoPE query `q [B, H_q, D]`,
        its pre-RoPE key and value `k`, `v [B, H_kv, D]` (float16, bfloat16 or float32), at position
        S + (decode calls so far)."""
        self._check_decode("q", q, "k", k, v)
        q, k, v = q.to(self.device), k.to(self.device), v.to(self.device)
        position = self.seq_len + self.steps
        return self._attend(self._rope_at(q, position), self._rope_at(k, position), v, q.dtype)

    def decode_post_rope(self, q_rope: torch.Tensor, k_rope: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """`decode` from the post-RoPE query and key at position S + (decode calls so far), as a
        transformers model's attention holds them."""
        self._check_decode("q_rope", q_rope, "k_rope", k_rope, v)
        dtype = q_rope.dtype
        return self._attend(q_rope.to(self.device, torch.float32), k_rope.to(self.device, torch.float32),
                            v.to(self.device), dtype)

    def _check_decode(self, q_name: str, q: torch.Tensor, k_name: str, k: torch.Tensor, v: torch.Tensor) -> None:
        if not self._prefilled:
            raise RuntimeError("ShadowKVCache.decode: call prefill(k, v) first")
        batch, heads, head_dim = self.batch, self.heads, self.head_dim
        _check_float_tensor(q_name, q, 3, "[B, H_q, D]")
        if q.shape[0] != batch or q.shape[2] != head_dim or q.shape[1] < 1 or q.shape[1] % heads:
            raise ValueError(f"{q_name}: expected [B={batch}, H_q, D={head_dim}] with H_q a multiple of "
                             f"H_kv={heads}, got {tuple(q.shape)}")
        for name, t in ((k_name, k), ("v", v)):
            _check_float_tensor(name, t, 3, "[B, H_kv, D]")
            if tuple(t.shape) != (batch, heads, head_dim):
                raise ValueError(f"{name}: expected [B, H_kv, D] = {(batch, heads, head_dim)}, got {tuple(t.shape)}")

    def _attend(self, q_rope: torch.Tensor, k_rope: torch.Tensor, v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """One decode step from the post-RoPE float32 query and key; advances the cache only once it succeeded."""
        gen_k, gen_k_buffer = _appended(self.gen_k, self._gen_k_buffer, k_rope.to(self.dtype))
        gen_v, gen_v_buffer = _appended(self.gen_v, self._gen_v_buffer, v.to(self.dtype))

        parts_k = [self.outlier_k, self.local_k]
        parts_v = [self.outlier_v, self.local_v]
        resident_idx, resident_values = self._resident_idx, self._resident_values
        if self.n_select > 0:
            chunk_idx = ops.landmark_topk(q_rope.to(self.landmarks.dtype), self.landmarks, self.n_select,
                                          exclude=self.exclude)
            tokens = _chunk_tokens(chunk_idx, self.chunk_size)  # [B, H_kv, n]
            # Only the RoPE rows of the selected tokens are built, not a table of every position:
            # at 128K context the tables would outweigh the rest of the resident cache.
            cos, sin = self._rope_rows(tokens.flatten(), self.head_dim)
            rows = torch.arange(tokens.numel(), device=self.device).view(tokens.shape)
            shape = (*tokens.shape, self.head_dim)
            on_cpu = self.device.type == "cpu"
            parts_k.append(ops.reconstruct_keys(self.a, self.basis, tokens, cos, sin, rope_positions=rows))
            if on_cpu:  # the values are in the compute device's memory already: no transfer to save
                selected_v = ops.sparse_gather(self.values, chunk_idx, device=self.device,
                                               out=self._scratch_tensor("selected_v", shape, self.values.dtype))
                resident_values = None  # nothing kept for the next step
            else:  # chunks the last step selected too are not transferred again
                selected_v = resident_values = ops.sparse_gather(self.values, chunk_idx, resident_idx=resident_idx,
                                                                 resident=resident_values, device=self.device)
            resident_idx = chunk_idx
            parts_v.append(selected_v)
        parts_k.append(gen_k)
        parts_v.append(gen_v)
        out = _gqa_attention_over_parts(q_rope, parts_k, parts_v, self.scale).to(dtype)
        # The step is complete: only now does the cache advance.
        self.gen_k, self.gen_v, self.steps = gen_k, gen_v, self.steps + 1
        self._gen_k_buffer, self._gen_v_buffer = gen_k_buffer, gen_v_buffer
        self._resident_idx, self._resident_values = resident_idx, resident_values
        return out

    def _scratch_tensor(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """The reused per-step tensor `name` of `shape` and `dtype` on the compute device."""
        t = self._scratch.get(name)
        if t is None or tuple(t.shape) != tuple(shape) or t.dtype != dtype or t.device != self.device:
            t = self._scratch[name] = torch.empty(shape, dtype=dtype, device=self.device)
        return t

    @property
    def selected_chunks(self) -> torch.Tensor | None:
        """int64 [B, H_kv, budget // chunk_size]: the chunks the last decode step selected."""
        return self._resident_idx if self._prefilled else None

    @property
    def length(self) -> int:
        """Tokens the cache holds: the prefill and every decoded token (0 before a prefill)."""
        return self.seq_len + self.steps if self._prefilled else 0

    # -- what generation asks of a cache -------------------------------------------------------

    def select_batch(self, indices: torch.Tensor) -> None:
        """Keep (and reorder, or repeat) the sequences `indices [B']` of the batch: beam search's reorder."""
        if not self._prefilled:
            return
        indices = indices.to(torch.int64)
        if indices.dim() != 1 or (indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.batch)):
            raise ValueError(f"indices: expected a 1-D tensor of sequence indices in [0, {self.batch}), got "
                             f"{indices.tolist()}")
        state = {}
        for name in ("a", "basis", "landmarks", "exclude", "outlier_idx", "outlier_k", "outlier_v", "local_k",
                     "local_v", "gen_k", "gen_v", "_resident_idx", "_resident_values", "values"):
            t = getattr(self, name)
            state[name] = None if t is None else t.index_select(0, indices.to(t.device))
        if state["values"] is not None:
            state["values"] = self._offloaded(state["values"], self.device)
        state.update(batch=indices.numel(), _gen_k_buffer=None, _gen_v_buffer=None)
        vars(self).update(state)

    def crop_generated(self, tokens: int) -> None:
        """Forget the last `tokens` decoded tokens (assisted generation's rollback); the prefill stays."""
        if isinstance(tokens, bool) or not isinstance(tokens, int) or not 0 <= tokens <= self.steps:
            raise ValueError(f"tokens: expected an int in [0, {self.steps}] (the decoded tokens; the prefill of a "
                             f"ShadowKV cache cannot be cropped), got {tokens!r}")
        if tokens:
            self.gen_k, self.gen_v = self.gen_k[:, :, :-tokens], self.gen_v[:, :, :-tokens]
            self.steps -= tokens

    # -- memory ------------------------------------------------------------------------------

    def resident_bytes(self) -> int:
        """Bytes the cache keeps on the compute device."""
        if not self._prefilled:
            return 0
        generated = [buffer if buffer is not None and buffer.data_ptr() == seq.data_ptr() else seq
                     for seq, buffer in ((self.gen_k, self._gen_k_buffer), (self.gen_v, self._gen_v_buffer))]
        return _nbytes(self.a, self.basis, self.landmarks, self.exclude, self.outlier_k, self.outlier_v,
                       self.local_k, self.local_v, *generated, self._resident_idx, self._resident_values,
                       *self._scratch.values())  # on the CPU: the selected values

    def offloaded_bytes(self) -> int:
        """Bytes of values kept in `offload_device` memory."""
        return _nbytes(self.values) if self._prefilled else 0


def gqa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(scale * q k^T) v for one query token per head, in float32 (scale default 1 / sqrt(D)).

    q [B, H_q, D] post-RoPE, k and v [B, H_kv, T, D]; query head j reads KV head j // (H_q // H_kv).
    """
    return _gqa_attention_over_parts(q, [k], [v], scale)


def _gqa_attention_over_parts(q: torch.Tensor, parts_k: list[torch.Tensor], parts_v: list[torch.Tensor],
                              scale: float | None) -> torch.Tensor:
    """`gqa_attention(q, cat(parts_k), cat(parts_v))` without building the concatenations: the
    scores of each part side by side, one softmax, then each part's share of the output summed."""
    batch, q_heads, head_dim = q.shape
    kv_heads = parts_k[0].shape[1]
    q = q.to(torch.float32).view(batch, kv_heads, q_heads // kv_heads, head_dim)  # [B, H_kv, G, D]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    scores = torch.cat([torch.matmul(q, k.to(torch.float32).transpose(-1, -2)) for k in parts_k], dim=-1)
    weights = scores.mul_(scale).softmax(dim=-1)  # [B, H_kv, G, T]
    out, start = None, 0
    for v in parts_v:
        share = torch.matmul(weights[..., start:start + v.shape[2]], v.to(torch.float32))  # [B, H_kv, G, D]
        out = share if out is None else out.add_(share)
        start += v.shape[2]
    return out.view(batch, q_heads, head_dim)
