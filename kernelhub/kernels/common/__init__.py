"""The toolbox every family shares (families never import each other; they import this).

- `sizes`: powers of two, element sizes;
- `buckets`: shape buckets and the nearest-bucket distance;
- `shared_memory`: the one shared-memory model of a tile kernel;
- `constraints`: registers per thread, blocks against the problem, a tiled GEMM's set;
- `triton_helpers`: `@triton.jit` helpers (grouped tile order, the float32 dot);
- `library`: the `torch.library` registration of the public ops.

Every file here is part of every family's kernel version (`FamilySpec.kernel_version`): a change
to the toolbox marks the tuned rows of every family stale.
"""
