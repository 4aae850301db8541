"""kernelhub's kernels as `torch.nn` layers: W8A8 int8 linears and tensor-parallel linears."""

from kernelhub.nn.int8 import Int8Linear, quantize_linear_layers
from kernelhub.nn.parallel import ColumnParallelLinear, RowParallelLinear

__all__ = ["ColumnParallelLinear", "Int8Linear", "RowParallelLinear", "quantize_linear_layers"]
