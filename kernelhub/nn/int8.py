"""W8A8 linear layers: int8 weights quantised once, int8 activations quantised per call.

    y = x W^T + b   ~=   (q_x @ q_W^T) * s_x[:, None] * s_W[None, :] + b

with `q_W, s_W = quantize_int8(W)` per output channel (once, at conversion) and
`q_x, s_x = quantize_int8(x)` per token (every call), through `kernelhub.ops` (the Triton kernels
on a GPU, oneDNN's int8 GEMM on the CPU). An eager CPU call where the prepacked int8 GEMMs sum
exactly (VNNI or AMX) multiplies the same int8 values with a prepacked copy of q_W instead:
fbgemm's for at most FBGEMM_MAX_ROWS tokens (decode; for one token with the scales and bias fused
into its epilogue), oneDNN's u8 x s8 above (q_x + 128 with zero point 128); the int32 sums are
those of `int8_scaled_gemm`, and the float epilogue agrees within float32 rounding. Per-token
activation scales are about twice as accurate as torch.ao's per-tensor dynamic ones on LLM
activations, whose rows differ widely in range.
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch import nn

import kernelhub.ops as ops
from kernelhub import backend, validation
from kernelhub.kernels.int8_gemm.cpu import quantize_int8_cpu, quantize_rows_scratch, quantize_token_scaled
from kernelhub.reference import int8_gemm as int8_ref

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Up to this many rows (tokens) a CPU call multiplies with fbgemm's prepacked weight, above it with
# oneDNN's. Chosen by timing the two GEMMs alone at Llama/Qwen shapes on the 2-core AVX512-VNNI VM
# (an ad-hoc comparison, not kept as a benchmark): fbgemm led at M <= 8, oneDNN from M = 16.
# benchmarks/cpu_w8a8.py measures the layer, and the GEMM it calls alone, against torch.ao.
FBGEMM_MAX_ROWS = 8


@functools.cache
def _prepacked_gemms_are_exact() -> bool:
    """Whether fbgemm's and oneDNN's prepacked u8 x s8 GEMMs are here and sum exactly, checked once
    on full-range operands through both (`_prepacked_product` at 1 and FBGEMM_MAX_ROWS + 9 rows),
    and through the one-token path (`_prepacked_gemm`), whose input fbgemm quantises itself.
    With VNNI or AMX they multiply-add into int32; without (AVX2, AVX-512 without VNNI, or
    `ONEDNN_MAX_CPU_ISA` set to one of those for oneDNN) they add pairs of products in saturating
    int16, which full-range activations overflow (torch.ao's `reduce_range` exists for that)."""
    if not {"fbgemm", "x86"} & set(torch.backends.quantized.supported_engines):
        return False
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")):
        return False
    in_features, out_features = 64, 9
    # Normal tensors whatever mode the first call comes in (the answer is cached for every mode).
    with torch.inference_mode(False), torch.no_grad():
        weight = torch.full((out_features, in_features), 127, dtype=torch.int8)
        weight[1::2, 1::2] = -127  # odd output channels alternate in sign along K, even ones stay at 127
        probe = Int8Linear(in_features, out_features, bias=True)  # a zero bias: the one token's pack holds it
        probe.weight_q.copy_(weight)
        probe.weight_scale.fill_(1.0)
        try:
            for rows in (1, FBGEMM_MAX_ROWS + 9):
                q = torch.full((rows, in_features), 127.0)
                q[1:, ::3] = -127.0
                exact = q.double() @ weight.double().t()  # integers below 2**24: exact in float32 too
                given = q if rows <= FBGEMM_MAX_ROWS else (q + 128).to(torch.uint8)
                if not torch.equal(probe._prepacked_product(given).double(), exact):
                    return False
            # One token of awkward scale, with values between the extremes: its sums, from the
            # reference's quantisation, come back from the float product within float32 rounding.
            token = torch.full((1, in_features), 127.0)
            token[:, ::3], token[:, 1::5] = -127.0, 41.0
            token_q, token_scale = int8_ref.quantize_int8(token * 0.0173)
            exact = token_q.double() @ weight.double().t()
            if not torch.equal((probe._prepacked_gemm(token * 0.0173).double() / token_scale.double()).round(), exact):
                return False
        except RuntimeError:  # an engine that cannot run here
            return False
    return True


# The packed weights a CPU layer may make, each from the buffers named: oneDNN's (above
# FBGEMM_MAX_ROWS rows; the scales are passed per call), fbgemm's with the weight scales (2 to
# FBGEMM_MAX_ROWS rows, and one token of a layer without bias), and fbgemm's with the bias too (one
# token of a layer with bias: fbgemm fuses it).
_PACKED_FROM = {"onednn": ("weight_q",), "fbgemm": ("weight_q", "weight_scale"),
                "fbgemm_bias": ("weight_q", "weight_scale", "bias")}


def _pack(form: str, weight_q: torch.Tensor, weight_scale: torch.Tensor | None = None,
          bias: torch.Tensor | None = None):
    """The `form`'s packed weight (`_PACKED_FROM`) of int8 `weight_q [N, K]`, float32
    `weight_scale [N]` and `bias [N]`: oneDNN's with its int64 zero points, or fbgemm's."""
    zero_points = torch.zeros(weight_q.shape[0], dtype=torch.int64)
    if form == "onednn":
        return torch.ops.onednn.qlinear_prepack(weight_q, None), zero_points
    with warnings.catch_warnings():  # quantized tensors are deprecated in torch; fbgemm still takes them
        warnings.simplefilter("ignore")
        weight = torch._make_per_channel_quantized_tensor(weight_q, weight_scale.double(), zero_points, 0)
        return torch.ops.quantized.linear_prepack(weight, None if bias is None else bias.to(torch.float32))


class Int8Linear(nn.Module):
    """`nn.Linear` with int8 weights and dynamic per-token int8 activations (W8A8).

    Input `[*, in_features]` of float32, float16 or bfloat16, any leading dimensions; output
    `[*, out_features]` in the input's dtype. Buffers (in the state dict): `weight_q` int8
    `[out_features, in_features]`, `weight_scale` float32 `[out_features]`, `bias` `[out_features]`
    (float32, or None). Build one with `from_float(linear)`; inference only (no backward: call the
    model under `torch.no_grad()` or `torch.inference_mode()`).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 device: torch.device | str | None = None):
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
        self.in_features, self.out_features = in_features, out_features
        # Normal tensors even when built under torch.inference_mode(): their version counters say
        # when the packed weights are stale (`_packed`); from_float and load_state_dict copy into them.
        with torch.inference_mode(False):
            self.register_buffer("weight_q", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
            self.register_buffer("weight_scale", torch.zeros(out_features, dtype=torch.float32, device=device))
            self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float32, device=device) if bias else None)

    @classmethod
    def from_float(cls, linear: nn.Linear) -> Int8Linear:
        """The W8A8 form of `linear` (its weight quantised per output channel, its bias kept in float32)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected a torch.nn.Linear, got {type(linear).__name__}")
        weight = linear.weight.detach()
        if weight.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"linear: expected a float32, float16 or bfloat16 weight, got {weight.dtype}")
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device=weight.device)
        with torch.no_grad():
            q, scale = ops.quantize_int8(weight)
            layer.weight_q.copy_(q)
            layer.weight_scale.copy_(scale)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias.detach().to(torch.float32))
        return layer

    def __getattr__(self, name: str):
        if name == "weight":  # asked of every linear by some parents (nn.TransformerEncoderLayer's fast path)
            raise AttributeError(
                "Int8Linear has no float `weight`: it holds `weight_q` (int8) and `weight_scale` (float32). "
                "A module that reads its linears' weights cannot run on Int8Linear: leave its linears "
                "float with quantize_linear_layers(model, skip=(...)), named by attribute or dotted name")
        return super().__getattr__(name)

    def __getstate__(self):
        """The packed weights are a cache of the buffers, not state: copies and pickles
        (`copy.deepcopy`, `torch.save(model)`) leave them out, and the copy packs its own at first
        use (oneDNN's packed weight is an opaque tensor, which neither can copy)."""
        state = super().__getstate__().copy()
        state.pop("_packs", None)
        return state

    def _apply(self, fn, recurse=True):
        """Moves (`.to(device)`, `.cuda()`) apply to every buffer; dtype casts (`model.to(torch.bfloat16)`,
        `.half()`) leave the float32 scales and bias as they are: rounded to 16 bits they would change
        every output (and oneDNN's GEMM refuses them)."""
        kept = {name: self._buffers[name] for name in ("weight_scale", "bias") if self._buffers.get(name) is not None}
        super()._apply(fn, recurse)
        for name, original in kept.items():
            if self._buffers[name].dtype != torch.float32:
                self._buffers[name] = original.to(device=self._buffers[name].device)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"x: expected a float32, float16 or bfloat16 tensor, got "
                            f"{getattr(x, 'dtype', type(x).__name__)}")
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"x: expected shape [*, in_features = {self.in_features}], got {tuple(x.shape)}")
        validation.refuse_autograd("x", x)
        # A decode step's call costs little more than its GEMM, so no op is spent where none is needed
        # (each costs tens of microseconds when the model's other weights have evicted it from the cache).
        flat = x.dim() == 2
        rows = x if flat else x.reshape(-1, self.in_features)  # [M, K]: the tokens of every leading dimension
        if self._prepacked_path(rows):
            y = self._prepacked_gemm(rows)
            if y.dtype != x.dtype:
                y = y.to(x.dtype)
        else:
            q, scale = ops.quantize_int8(rows)
            y = ops.int8_scaled_gemm(q, self.weight_q.t(), scale, self.weight_scale, self.bias, out_dtype=x.dtype)
        return y if flat else y.view(*x.shape[:-1], self.out_features)

    def _prepacked_path(self, rows: torch.Tensor) -> bool:
        """Whether this call multiplies with a prepacked weight: an eager CPU call (not traced, not
        forced to another backend) of at least one row, where the prepacked GEMMs sum exactly."""
        return (rows.shape[0] > 0 and rows.is_cpu and not torch.compiler.is_compiling()
                and backend.choose(rows) == "cpu" and _prepacked_gemms_are_exact())

    # The methods below read buffers from `self._buffers`, where `_packed` also puts the tracked
    # copies of inference tensors, not through nn.Module.__getattr__ (a Python call per buffer).

    def _prepacked_gemm(self, rows: torch.Tensor) -> torch.Tensor:
        """float32 `(q @ weight_q^T) * scale[:, None] * weight_scale + bias` of `rows`' per-token
        quantisation, through the prepacked GEMM for its number of rows (`_prepacked_product`).

        One token (a decode step) whose scale is normal and finite goes to fbgemm as `fl(q * s)`
        with input scale s: fbgemm quantises it back to exactly q + 128 and fuses s, weight_scale
        and the bias into its epilogue, so the call makes no torch op besides the GEMM."""
        if rows.shape[0] == 1:
            token = quantize_token_scaled(rows)
            if token is not None:
                scaled, scale = token
                packed = self._packed("fbgemm" if self._buffers["bias"] is None else "fbgemm_bias")
                return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(scaled, scale, 128, packed)
        if rows.shape[0] <= FBGEMM_MAX_ROWS:  # q and its scales in scratch: no allocation but the GEMM's
            q, scale = quantize_rows_scratch(rows)
        else:
            q, scale = quantize_int8_cpu(rows, torch.uint8)
            scale = scale[:, None]
        y = self._prepacked_product(q)
        bias = self._buffers["bias"]
        return y.mul_(scale) if bias is None else torch.addcmul(bias, y, scale, out=y)

    def _prepacked_product(self, q: torch.Tensor) -> torch.Tensor:
        """float32 `(q @ weight_q^T) * weight_scale` for q `[M, K]` as `_prepacked_gemm` makes it (exact
        float32 values for fbgemm, up to FBGEMM_MAX_ROWS rows; uint8 q + 128 for oneDNN, above). Each
        GEMM's own input quantisation (scale 1, zero point 128) is then the identity."""
        if q.shape[0] <= FBGEMM_MAX_ROWS:
            return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(q, 1.0, 128, self._packed("fbgemm"))
        weight, zero_points = self._packed("onednn")
        return torch.ops.onednn.qlinear_pointwise(q, 1.0, 128, weight, self._buffers["weight_scale"], zero_points,
                                                  None, 1.0, 0, torch.float32, "none", [], "")

    def _packed(self, form: str):
        """A packed weight (see _PACKED_FROM), made at first use and again whenever a buffer it is
        made from changed (load_state_dict, a copy into it); not part of the state dict. A layer
        called at several sizes holds several: each is one more copy of the int8 weight."""
        buffers, names = self._buffers, _PACKED_FROM[form]
        packs = self.__dict__.setdefault("_packs", {})
        # An entry is (key, pack, sources): the tensors it was made from (so that a replaced buffer
        # cannot be freed and its address reused by the next), where their data is, and how often
        # they had been written. It stands while the buffers are those tensors, unwritten since.
        entry = packs.get(form)
        if entry is not None:  # a plain loop: a generator's frame is more code to run cold (see forward)
            key, pack, sources = entry
            for name, source, (pointer, version) in zip(names, sources, key):
                if buffers[name] is not source or source._version != version or source.data_ptr() != pointer:
                    break
            else:
                return pack
        for name in names:
            if buffers[name].is_inference():  # made or moved under inference_mode: no version counter
                with torch.inference_mode(False):  # the same values in a tensor with one
                    buffers[name] = buffers[name].clone()
        sources = tuple(buffers[name] for name in names)
        key = tuple((source.data_ptr(), source._version) for source in sources)
        packs[form] = (key, _pack(form, *sources), sources)
        return packs[form][1]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, W8A8"


def quantize_linear_layers(model: nn.Module, *, skip: tuple[str, ...] = ("lm_head",)) -> nn.Module:
    """Replace every `nn.Linear` of `model` by its `Int8Linear`, in place, and return `model`.

    skip: linears left as they are, named by their attribute name (`lm_head`) or full dotted name
    (`model.layers.0.mlp.down_proj`). The output head stays float by default: its logits decide
    every token, and it is one layer of many.

    Only modules whose type is `nn.Linear` itself are replaced, as torch.ao's `quantize_dynamic`
    does: a subclass may compute something else, or be read by its parent (torch's
    `nn.MultiheadAttention` reads its `out_proj.weight` directly). A linear registered under several
    names becomes one Int8Linear under all of them. A `model` that is itself an `nn.Linear` cannot be
    replaced in place: its Int8Linear is returned.
    """
    if isinstance(skip, str):
        skip = (skip,)
    if type(model) is nn.Linear:
        return Int8Linear.from_float(model)
    targets = [(name, module) for name, module in model.named_modules(remove_duplicate=False)
               if type(module) is nn.Linear and name.rsplit(".", 1)[-1] not in skip and name not in skip]
    converted: dict[int, Int8Linear] = {}
    for name, module in targets:
        parent_name, _, attribute = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if id(module) not in converted:
            converted[id(module)] = Int8Linear.from_float(module)
        setattr(parent, attribute, converted[id(module)])
    return model
