"""Pure-PyTorch references, one module per kernel family: the specification each kernel is checked against."""
