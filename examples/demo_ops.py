"""A Llama-3-8B linear layer through int8: quantise activations, int8 GEMM with fused dequantisation.

Prints the error against the bfloat16/float32 layer it replaces and the time of each path on
this machine (CUDA if present, else the CPU path). Run: python examples/demo_ops.py
"""

import torch

import kernelhub.ops as ops
from kernelhub.tuning.timing import time_launch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def median_ms(fn) -> float:
    return time_launch(fn, torch.device(DEVICE)).median_ms


def main() -> None:
    device = DEVICE
    torch.manual_seed(0)
    tokens, hidden, out_features = 128, 4096, 4096  # Llama-3-8B attention output projection
    x = torch.randn(tokens, hidden, device=device)
    weight = torch.randn(out_features, hidden, device=device) / hidden**0.5

    q_weight, w_scale = ops.quantize_int8(weight)  # per output channel, once at load time
    q_x, x_scale = ops.quantize_int8(x)  # per token, every call
    y_int8 = ops.int8_scaled_gemm(q_x, q_weight.t(), x_scale, w_scale, out_dtype=torch.float32)
    y_ref = x @ weight.t()
    rel_err = float((y_int8 - y_ref).norm() / y_ref.norm())

    t_fp32 = median_ms(lambda: x @ weight.t())
    t_int8 = median_ms(lambda: ops.int8_scaled_gemm(q_x, q_weight.t(), x_scale, w_scale, out_dtype=torch.float32))
    t_quant = median_ms(lambda: ops.quantize_int8(x))
    print(f"[{tokens}x{hidden}] @ [{hidden}x{out_features}] on {device}")
    print(f"  relative error of int8 vs float32: {rel_err:.4f}")
    print(f"  float32 matmul           {t_fp32:8.3f} ms")
    print(f"  int8_scaled_gemm         {t_int8:8.3f} ms  ({t_fp32 / t_int8:.1f}x)")
    print(f"  quantize_int8 (x)        {t_quant:8.3f} ms")


if __name__ == "__main__":
    main()
