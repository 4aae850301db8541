"""kernelhub.nn.Int8Linear and quantize_linear_layers: W8A8 layers, alone and in a random-weight Llama."""

import pytest
import torch
from torch import nn

from kernelhub.nn import Int8Linear, quantize_linear_layers
from kernelhub.nn.int8 import FBGEMM_MAX_ROWS, _prepacked_gemms_are_exact
from kernelhub.reference import int8_gemm as ref


def _linear(k=96, n=40, bias=True, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(k, n, bias=bias).to(dtype)


@pytest.mark.parametrize("shape", [(7, 96), (2, 5, 96), (3, 1, 4, 96)], ids=["2d", "3d", "4d"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_int8_linear_is_the_w8a8_computation_over_any_leading_dims(shape, bias):
    linear = _linear(bias=bias)
    layer = Int8Linear.from_float(linear)
    x = torch.randn(shape)
    with torch.no_grad():
        y = layer(x)
        q_w, s_w = ref.quantize_int8(linear.weight)
        q_x, s_x = ref.quantize_int8(x.reshape(-1, 96))
        expected = ref.int8_scaled_gemm(q_x, q_w.t(), s_x, s_w, linear.bias, torch.float32).view(*shape[:-1], 40)
        exact = linear(x)
    assert y.shape == (*shape[:-1], 40) and y.dtype == torch.float32
    torch.testing.assert_close(y, expected, rtol=1e-6, atol=1e-6)
    assert float((y - exact).norm() / exact.norm()) < 2e-2  # W8A8 rounding, per token and channel


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int8_linear_returns_the_input_dtype(dtype):
    layer = Int8Linear.from_float(_linear(dtype=dtype))
    with torch.no_grad():
        y = layer(torch.randn(4, 96).to(dtype))
    assert y.dtype == dtype and torch.isfinite(y).all()


def test_state_dict_round_trip_is_bit_exact():
    layer = Int8Linear.from_float(_linear())
    state = layer.state_dict()
    assert set(state) == {"weight_q", "weight_scale", "bias"}
    assert state["weight_q"].dtype == torch.int8 and state["weight_scale"].dtype == torch.float32
    again = Int8Linear(96, 40)
    again.load_state_dict(state)
    x = torch.randn(3, 96)
    with torch.no_grad():
        assert torch.equal(again(x), layer(x))


@pytest.mark.parametrize("cast", ["to-bfloat16", "half", "double", "to-cpu"])
def test_a_dtype_cast_of_the_model_keeps_the_float32_scales_and_bias(cast):
    """`model.to(torch.bfloat16)` after quantize_linear_layers is how a bf16 model is made: the
    layer's scales and bias stay float32 (rounded to 16 bits every output would change), and it
    computes what it computed before, at every number of rows (fbgemm's sizes and oneDNN's)."""
    layer = Int8Linear.from_float(_linear())
    cast_layer = {"to-bfloat16": lambda m: m.to(torch.bfloat16), "half": lambda m: m.half(),
                  "double": lambda m: m.double(), "to-cpu": lambda m: m.to("cpu")}[cast](Int8Linear.from_float(_linear()))
    assert cast_layer.weight_scale.dtype == cast_layer.bias.dtype == torch.float32
    assert cast_layer.weight_q.dtype == torch.int8
    with torch.no_grad():
        for rows in (1, 3, FBGEMM_MAX_ROWS + 12):
            x = torch.randn(rows, 96).to(torch.bfloat16)
            assert torch.equal(cast_layer(x), layer(x))
    no_bias = Int8Linear.from_float(_linear(bias=False)).to(torch.float16)
    assert no_bias.bias is None and no_bias.weight_scale.dtype == torch.float32


@pytest.mark.parametrize("copy_by", ["deepcopy", "torch.save"])
def test_a_layer_that_has_run_can_be_copied_and_pickled(copy_by):
    """After calls at every size (the packed weights made), the layer deep-copies and pickles; the
    copy computes what the original does, and follows its own buffers, not the original's packs."""
    import copy
    import io

    layer = Int8Linear.from_float(_linear())
    one, small, large = torch.randn(1, 96), torch.randn(3, 96), torch.randn(FBGEMM_MAX_ROWS + 12, 96)
    with torch.no_grad():
        before = layer(one), layer(small), layer(large)
        if copy_by == "deepcopy":
            twin = copy.deepcopy(layer)
        else:
            buffer = io.BytesIO()
            torch.save(layer, buffer)
            buffer.seek(0)
            twin = torch.load(buffer, weights_only=False)
        assert all(torch.equal(twin(x), y) for x, y in zip((one, small, large), before))
        twin.weight_q.neg_()  # the copy's own weight changes; the original's does not
        for x, y in zip((one, small), before):
            assert torch.equal(layer(x), y) and not torch.equal(twin(x), y)
    assert ("_packs" in layer.__dict__) == _prepacked_gemms_are_exact()  # the original keeps its packs


def test_torch_compile_traces_the_layer_without_graph_breaks():
    layer = Int8Linear.from_float(_linear())
    compiled = torch.compile(layer, fullgraph=True)  # a graph break would raise
    x = torch.randn(2, 3, 96)
    with torch.no_grad():  # traced: int8_scaled_gemm; eager on a CPU: a prepacked GEMM (same int32 sums)
        torch.testing.assert_close(compiled(x), layer(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("rows", [1, 7, FBGEMM_MAX_ROWS, FBGEMM_MAX_ROWS + 1, 63, 257])  # fbgemm, then oneDNN
@pytest.mark.usefixtures("cpu_quantiser")
def test_the_prepacked_cpu_path_is_the_same_w8a8_computation(rows, monkeypatch):
    import kernelhub.ops as ops

    layer = Int8Linear.from_float(_linear(k=300, n=70))
    x = torch.randn(rows, 300) * torch.rand(rows, 1) * 10
    x[0] = 0.0  # an all-zero row: scale 0, the bias alone
    if rows > 1:
        x[1, 3] = float("nan")  # scale NaN: NaN throughout, as the reference has it
    with torch.no_grad():
        q, s = ops.quantize_int8(x)
        expected = ops.int8_scaled_gemm(q, layer.weight_q.t(), s, layer.weight_scale, layer.bias, torch.float32)
        assert layer._prepacked_path(x) == _prepacked_gemms_are_exact()  # taken wherever it is exact
        y = layer(x)
        torch.testing.assert_close(y, expected, rtol=1e-6, atol=1e-6, equal_nan=True)
        assert torch.equal(y[0], layer.bias) and (rows == 1 or bool(y[1].isnan().all()))
        # new weights (load_state_dict copies into the buffers): the packed form follows them
        other = Int8Linear.from_float(_linear(k=300, n=70, seed=1))
        layer.load_state_dict(other.state_dict())
        torch.testing.assert_close(layer(x[2:]), other(x[2:]), rtol=0, atol=0)
        monkeypatch.setenv("KERNELHUB_BACKEND", "reference")  # another backend: never a prepacked GEMM
        assert not layer._prepacked_path(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.usefixtures("cpu_quantiser")
def test_one_token_is_the_same_w8a8_computation(dtype, bias):
    """A decode step's single row: fbgemm quantises `fl(q * s)` itself and fuses the scales and the
    bias, and gets the int32 sums of the reference's quantisation. Rows of any range, views, rows
    whose scale needs the reference's clamp or NaN handling, and a bias written after the first
    call all give int8_scaled_gemm's result."""
    import kernelhub.ops as ops

    layer = Int8Linear.from_float(_linear(k=301, n=67, bias=bias))
    generator = torch.Generator().manual_seed(3)

    def check(x):
        with torch.no_grad():
            q, s = ops.quantize_int8(x)
            expected = ops.int8_scaled_gemm(q, layer.weight_q.t(), s, layer.weight_scale, layer.bias, torch.float32)
            y = layer(x)
        assert y.shape == (1, 67) and y.dtype == x.dtype
        tolerance = 1e-6 if dtype == torch.float32 else 1e-2  # the output rounded to 16 bits
        torch.testing.assert_close(y.float(), expected.to(dtype).float(), rtol=tolerance, atol=tolerance,
                                   equal_nan=True)

    for magnitude in (1e-30, 1e-3, 1.0, 3e4):  # float16 holds 3e4; 1e-30 is zero in it
        check((torch.randn(1, 301, generator=generator) * magnitude).to(dtype))
    base = torch.randn(301, 5, generator=generator).to(dtype)
    check(base.t()[2:3])  # a column: stride 5
    check(base[:1, :1].expand(1, 301))  # one value throughout: stride 0
    check(torch.zeros(1, 301, dtype=dtype))  # scale 0: the bias alone
    check(torch.full((1, 301), 2.0**-140).to(dtype))  # a subnormal scale (zero in 16 bits): the clamp
    for bad in (float("nan"), float("inf")):
        x = torch.randn(1, 301, generator=generator).to(dtype)
        x[0, 7] = bad
        check(x)
    check(torch.randn(1, 301, generator=generator, requires_grad=True).to(dtype))  # no_grad: it runs
    if bias:
        with torch.no_grad():
            layer.bias.add_(1.0)  # written after the one-token pack was made: packed anew
        check(torch.randn(1, 301, generator=generator).to(dtype))
    if _prepacked_gemms_are_exact():
        assert ("fbgemm_bias" if bias else "fbgemm") in layer._packs


@pytest.mark.usefixtures("cpu_quantiser")
def test_threads_calling_one_layer_get_their_own_results():
    """The one-token path quantises into a per-thread scratch buffer: threads decoding through the
    same layers at once (two widths, as a model's layers alternate) each get their own token's
    result."""
    import threading

    layers = [Int8Linear.from_float(_linear(k=k, n=40)) for k in (96, 160)]
    tokens = [[torch.randn(1, layer.in_features) for _ in range(30)] for layer in layers]
    with torch.no_grad():
        expected = [[layer(x) for x in xs] for layer, xs in zip(layers, tokens)]
    mismatches = []

    def decode(offset):
        with torch.no_grad():
            for step in range(60):
                i = (step + offset) % 2
                j = (step // 2 + offset) % 30
                if not torch.equal(layers[i](tokens[i][j]), expected[i][j]):
                    mismatches.append((offset, step))

    threads = [threading.Thread(target=decode, args=(offset,)) for offset in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not mismatches


def test_a_layer_made_and_called_under_inference_mode():
    """inference_mode makes inference tensors, which have no version counter: the exactness probe,
    asked first there, gives the answer it gives outside; a layer built, reloaded and given new
    buffers there computes what int8_scaled_gemm computes, prepacked wherever that is exact."""
    import kernelhub.ops as ops

    _prepacked_gemms_are_exact.cache_clear()
    try:
        with torch.inference_mode():
            asked_inside = _prepacked_gemms_are_exact()
            layer = Int8Linear.from_float(_linear(k=300, n=70))
            for rows in (1, 3, FBGEMM_MAX_ROWS + 5):  # fbgemm (one token: with the bias), then oneDNN
                x = torch.randn(rows, 300)
                assert layer._prepacked_path(x) == asked_inside
                q, s = ops.quantize_int8(x)
                expected = ops.int8_scaled_gemm(q, layer.weight_q.t(), s, layer.weight_scale, layer.bias, torch.float32)
                torch.testing.assert_close(layer(x), expected, rtol=1e-6, atol=1e-6)
                other = Int8Linear.from_float(_linear(k=300, n=70, seed=rows))
                layer.load_state_dict(other.state_dict())  # copied into the buffers: the packed form follows
                torch.testing.assert_close(layer(x), other(x), rtol=0, atol=0)
                new = Int8Linear.from_float(_linear(k=300, n=70, seed=rows + 100))
                layer.weight_q = new.weight_q * 1  # an inference tensor put in its place
                layer.weight_scale = new.weight_scale * 1
                layer.bias = new.bias
                torch.testing.assert_close(layer(x), new(x), rtol=0, atol=0)
    finally:
        _prepacked_gemms_are_exact.cache_clear()
    assert asked_inside == _prepacked_gemms_are_exact()  # asked again, outside inference_mode


def test_a_new_buffer_at_the_address_of_the_old_is_packed_anew():
    """A new weight tensor is packed again even where it has the old one's address and version (as
    a tensor allocated where a freed one was would): here both view one numpy array, rewritten in
    between. The packed weights never outlive the buffers they were made from."""
    import kernelhub.ops as ops

    layer = Int8Linear.from_float(_linear())
    memory = layer.weight_q.numpy().copy()
    x = torch.randn(3, 96)
    with torch.no_grad():
        layer.weight_q = torch.from_numpy(memory)
        address, before, before_one = layer.weight_q.data_ptr(), layer(x), layer(x[:1])  # packed from this tensor
        memory[:] = -memory  # new values, written behind torch's back
        layer.weight_q = torch.from_numpy(memory)  # a new tensor: the same address, version 0
        assert layer.weight_q.data_ptr() == address and layer.weight_q._version == 0
        q, s = ops.quantize_int8(x)
        expected = ops.int8_scaled_gemm(q, layer.weight_q.t(), s, layer.weight_scale, layer.bias, torch.float32)
        torch.testing.assert_close(layer(x), expected, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(layer(x[:1]), expected[:1], rtol=1e-6, atol=1e-6)  # the one-token pack too
        assert not torch.equal(layer(x), before) and not torch.equal(layer(x[:1]), before_one)


@pytest.mark.parametrize("rows", [1, 3, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.usefixtures("cpu_quantiser")
def test_any_input_view_gives_the_result_of_its_contiguous_copy(rows, dtype):
    layer = Int8Linear.from_float(_linear(k=96, n=40))
    base = torch.randn(2, 96, rows + 1).to(dtype)
    views = {"transposed": base[0].t()[:rows], "expanded": base[0, :, :1].t().expand(rows, 96),
             "sliced": torch.randn(rows, 200).to(dtype)[:, 5:101],
             "overlapping": base.flatten().as_strided((rows, 96), (1, 1))}
    with torch.no_grad():
        for name, x in views.items():
            assert torch.equal(layer(x), layer(x.contiguous())), name


def test_bad_input_is_a_clear_error():
    layer = Int8Linear.from_float(_linear())
    with pytest.raises(ValueError, match=r"x: expected shape \[\*, in_features = 96\]"):
        layer(torch.randn(3, 95))
    with pytest.raises(TypeError, match="x: expected a float32, float16 or bfloat16"):
        layer(torch.ones(3, 96, dtype=torch.int32))
    with pytest.raises(TypeError, match="requires grad.*no_grad"):  # inference only: no backward
        layer(torch.randn(3, 96, requires_grad=True))
    with pytest.raises(TypeError, match="linear: expected a torch.nn.Linear"):
        Int8Linear.from_float(nn.Conv1d(3, 3, 1))
    with pytest.raises(ValueError, match="in_features"):
        Int8Linear(0, 4)


@pytest.mark.skipif(not _prepacked_gemms_are_exact(), reason="fbgemm's exact (VNNI/AMX) int8 GEMM is not here")
def test_fbgemm_quantising_itself_would_not_be_the_reference_rounding():
    """Why the layer hands fbgemm exact integers (scale 1), or for one token `fl(q * s)` with scale s
    (quotients within 2**-15 of the integers), instead of letting it quantise x itself with the
    row's scale: fbgemm adds the zero point before rounding, so a quotient just above a half rounds
    down where the reference's round-half-even of x / scale rounds up. Read through an identity
    weight, fbgemm's output is the integer it made of each input."""
    k = 8
    layer = Int8Linear(k, k, bias=False)
    layer.weight_q.copy_(torch.eye(k, dtype=torch.int8))
    layer.weight_scale.fill_(1.0)
    quotients = torch.tensor([[0.5 + 2**-20, 64.5 + 2**-17, 1.5 - 2**-22, 0.5, 1.5, 2.5, -2.5, 3.0]])
    with torch.no_grad():
        fbgemm = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
            quotients, 1.0, 128, layer._packed("fbgemm"))
    assert torch.equal(fbgemm[0, 3:], quotients[0, 3:].round())  # exact ties: half to even in both
    assert quotients[0, :3].round().tolist() == [1.0, 65.0, 1.0]  # the reference's rounding
    assert fbgemm[0, :3].tolist() == [0.0, 64.0, 2.0]  # fbgemm's: round(q + 128) - 128 in float32


def test_quantize_linear_layers_replaces_every_linear_but_the_skipped():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4)))
    quantize_linear_layers(model, skip=("2.1",))
    assert isinstance(model[0], Int8Linear) and isinstance(model[2][0], Int8Linear)
    assert type(model[2][1]) is nn.Linear  # skipped by its dotted name


class _AttentionBlock(nn.Module):
    """torch's MultiheadAttention (its out_proj a Linear subclass whose weight it reads) and an MLP."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(64, 4, batch_first=True)
        self.up, self.down = nn.Linear(64, 128), nn.Linear(128, 64)

    def forward(self, x):
        x = x + self.attn(x, x, x, need_weights=False)[0]
        return x + self.down(torch.relu(self.up(x)))


def test_linear_subclasses_are_left_and_shared_linears_replaced_everywhere():
    """MultiheadAttention's out_proj stays float (its parent reads its weight), the MLP's linears
    become Int8Linear, and the block runs within W8A8 rounding of float32. A linear under two
    names becomes one Int8Linear under both. A parent that reads a replaced linear's weight is told
    what to do."""
    torch.manual_seed(0)
    block = _AttentionBlock().eval()
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        exact = block(x)
        quantize_linear_layers(block)
        y = block(x)
    assert type(block.attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert isinstance(block.up, Int8Linear) and isinstance(block.down, Int8Linear)
    assert float((y - exact).norm() / exact.norm()) < 2e-2
    shared = nn.Linear(8, 8)
    model = nn.ModuleDict({"a": nn.Sequential(shared), "b": nn.Sequential(shared)})
    quantize_linear_layers(model)
    assert isinstance(model["a"][0], Int8Linear) and model["a"][0] is model["b"][0]
    assert isinstance(quantize_linear_layers(nn.Linear(8, 4)), Int8Linear)  # the model itself: returned
    encoder = quantize_linear_layers(nn.TransformerEncoderLayer(64, 4, 128, batch_first=True).eval())
    with torch.no_grad(), pytest.raises(AttributeError, match=r"no float `weight`.*skip="):
        encoder(x)  # its fast path reads linear1.weight (torch.ao's quantize_dynamic fails there too)
    assert not hasattr(block.up, "weight") and block.up.bias is not None


def test_a_random_llama_quantised():
    """A tiny random-weight Llama (2 layers: 7 linears each): 14 Int8Linear, lm_head untouched,
    logits within 5e-2 of float32 (random weights: a statement about the arithmetic, not about a
    trained model's accuracy), state dict round trip bit-exact."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                      attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 128, (2, 33), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        exact = model(ids).logits
        quantize_linear_layers(model)
        logits = model(ids).logits
    assert sum(isinstance(m, Int8Linear) for m in model.modules()) == 14
    assert type(model.lm_head) is nn.Linear
    assert float((logits - exact).norm() / exact.norm()) < 5e-2
    copy = quantize_linear_layers(transformers.LlamaForCausalLM(config).eval())
    copy.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(copy(ids).logits, logits)
