"""Low-rank key cache: what the spaces of its two tuned kernels share (gram_space.py for
`lowrank_gram`, reconstruct_space.py for `reconstruct_keys`): dtypes, the bucket rule, the operand
size the estimates assume, and the models the shape sets come from.

Nearest-bucket rule (when no config is stored for a call's own bucket): among tuned buckets with
the same exact axes and dtype, take the one fewest doublings away on the axes that set the
amount of parallel work (B and S for the Gram, B and n for the reconstruction), at most
`MAX_DOUBLINGS` in total; on a tie, the larger one (kernels/common/buckets.py).

Shared-memory estimates follow kernels/common/shared_memory.py's model (pipeline stages or the
epilogue's layout conversion, whichever is larger, + 1 KiB static) with 4-byte (float32)
operands, the widest dtype of both kernels, so a config the constraints accept runs in every
dtype: the spaces have no dtype axis. Margin, held against the compiler on sm_80 and sm_90 by
tests/test_compile_agreement.py: never below its figure; at most one stage + 1 KiB above it where
the stages decide, three quarters of the epilogue + 1 KiB where that does.

DEFAULTs depend on the dtype where float32's FMA dots would spill with the 16-bit tiling.
"""

from __future__ import annotations

from kernelhub.kernels.common.sizes import element_bytes

DTYPES = ("float16", "bfloat16", "float32")
MAX_DOUBLINGS = 2
OPERAND_BYTES = element_bytes("float32")  # the widest operand dtype

# Models ShadowKV was evaluated on, as (H_kv, D): Llama-3-8B-1M / Llama-3.1-8B, Yi-9B-200K and
# Qwen2-7B-128K, GLM-4-9B-1M. ShadowKV's setting: rank 160, sparse budget 2048 tokens per KV head.
LLAMA3_8B = (8, 128)
YI_9B = (4, 128)
GLM4_9B = (2, 128)
SHADOWKV_RANK = 160
SHADOWKV_BUDGET = 2048
CONTEXTS = (8192, 32768, 131072)
