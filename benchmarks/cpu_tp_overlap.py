"""Overlapped GEMM collectives against the sequential reference: CPU, gloo, local ranks, one thread each.

    python benchmarks/cpu_tp_overlap.py
    python benchmarks/cpu_tp_overlap.py --world 2 --dtype float32 --markdown benchmarks/results/cpu_tp_overlap.md
    python benchmarks/cpu_tp_overlap.py --quick        # 3 reps, CHUNKS 1 and 2

Per shape, on W local ranks (kernelhub.local_world), every figure is the slowest rank's median over
`--reps` calls, each started after a barrier (harness.time_ranks):
- T_gemm: the rank's whole GEMM alone (all_gather_gemm: [W*M_local, K] @ [K, N];
  gemm_reduce_scatter: [M, K_local] @ [K_local, N]);
- T_comm: the collective alone (all_gather_single of a; reduce_scatter_single of the partial; the
  torch 2.11 names are all_gather_into_tensor and reduce_scatter_tensor);
- T_p2p: the overlapped op's own transfers alone (its schedule with the GEMM left out, at the best
  CHUNKS): the communication that overlapping has to hide;
- T_sequential: the reference (collective, then GEMM, or GEMM, then collective);
- T_overlapped: the overlapped schedule with each CHUNKS value (the best one is reported, and the
  DEFAULT config's as T_default); the ops' per-call signature exchange is in the last table;
- E = (T_gemm + T_p2p - T_overlapped) / min(T_gemm, T_p2p): 1 when the shorter of the two is
  entirely hidden, 0 when nothing overlaps. It is measured against T_p2p, not T_comm: the
  reference collective's algorithm differs (gloo's reduce-scatter moves more data than the op's
  direct transfers), and E should count overlap, not a better algorithm.
A last table gives the per-call cost of the ops' signature exchange on a tiny shape.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

import kernelhub.ops as ops
from kernelhub import backend
from kernelhub.kernels.loader import get_family
from kernelhub.kernels.tp_overlap import overlap
from kernelhub.local_world import LocalWorld
from kernelhub.reference import tp_overlap as ref

from harness import BenchmarkParser, fixed, markdown_table, publish, ratio, time_ranks, times

# (op, M_local or M, N, K or K_local) at W = 2: shapes where one rank's GEMM and its
# communication take similar time on this kind of machine, and a GEMM-bound and a comm-bound one.
SHAPES = [
    ("all_gather_gemm", 512, 64, 2048),
    ("all_gather_gemm", 1024, 128, 1024),
    ("all_gather_gemm", 512, 256, 1024),
    ("gemm_reduce_scatter", 1024, 2048, 64),
    ("gemm_reduce_scatter", 2048, 1024, 128),
    ("gemm_reduce_scatter", 1024, 1024, 256),
]


def chunk_gemm(a: torch.Tensor) -> overlap.Gemm:
    """The GEMM the ops run on `a`'s chunks: torch's on the CPU, the Triton chunk GEMM (tp_gemm) on a GPU."""
    return overlap.chunk_gemm(get_family("tp_gemm"), a, backend.choose(a))


def measure_shape(op: str, rows: int, n: int, k: int, dtype: str, reps: int, chunk_choices: list[int],
                  device_type: str = "cpu") -> dict:
    """On every rank: the timings of one shape (every rank returns the same, slowest-rank figures).

    device_type "cuda": rank r computes on GPU r (nccl ranks; benchmarks/gpu_tp_overlap.py)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")
    spec = get_family(op)
    shape = (world, rows, n, k)
    inputs = spec.make_inputs(shape, dtype, device, seed=0)
    a, b = inputs["a"], inputs["b"]
    out = spec.new_output(inputs)
    time = lambda fn: time_ranks(fn, device, reps=reps).median_ms  # noqa: E731
    gemm = chunk_gemm(a)
    no_gemm = lambda x, w, into: None  # noqa: E731
    if op == "all_gather_gemm":
        full = torch.empty(world * rows, k, dtype=a.dtype, device=device)
        t_gemm = time(lambda: gemm(full, b, out))
        t_comm = time(lambda: ref.all_gather_single(full, a))
        t_seq = time(lambda: ref.all_gather_gemm(a, b))
        p2p = lambda chunks: overlap.all_gather_gemm(a, b, out, full, group=None, chunks=chunks, order=0, gemm=no_gemm)  # noqa: E731
    else:
        partial = a @ b
        t_gemm = time(lambda: gemm(a, b, partial))
        t_comm = time(lambda: ref.reduce_scatter_single(out, partial))
        t_seq = time(lambda: ref.gemm_reduce_scatter(a, b))
        p2p = lambda chunks: overlap.gemm_reduce_scatter(a, b, out, group=None, chunks=chunks, gemm=no_gemm)  # noqa: E731
    default = spec.default_config(shape, dtype)
    by_chunks = {}
    for chunks in chunk_choices:
        config = dict(default, CHUNKS=chunks)
        if spec.space.infeasibility(config, shape, 0) is None or config == default:
            by_chunks[chunks] = time(lambda: spec.launch(inputs, config, out))
    best_chunks = min(by_chunks, key=by_chunks.get)
    t_over = by_chunks[best_chunks]
    t_p2p = time(lambda: p2p(best_chunks))
    return {"op": op, "W": world, "rows": rows, "N": n, "K": k, "dtype": dtype,
            "T_gemm": t_gemm, "T_comm": t_comm, "T_p2p": t_p2p, "T_sequential": t_seq,
            "T_default": by_chunks[default["CHUNKS"]], "T_overlapped": t_over, "CHUNKS": best_chunks,
            "speedup": ratio(t_seq, t_over), "E": (t_gemm + t_p2p - t_over) / min(t_gemm, t_p2p)}


def signature_cost(reps: int) -> dict:
    """Per-call cost of the ops layer on a tiny shape, against the bare overlapped schedule."""
    a, b = torch.ones(2, 8), torch.ones(8, 8)
    out = torch.empty(2 * dist.get_world_size(), 8)
    gathered = torch.empty(2 * dist.get_world_size(), 8)
    time = lambda fn: time_ranks(fn, "cpu", reps=reps).median_ms  # noqa: E731
    bare = time(lambda: overlap.all_gather_gemm(a, b, out, gathered, group=None, chunks=1, order=0, gemm=chunk_gemm(a)))
    full = time(lambda: ops.all_gather_gemm(a, b))
    return {"bare schedule ms": bare, "kernelhub.ops ms": full, "per-call overhead ms": full - bare}


def main(argv: list[str] | None = None) -> None:
    collective = get_family("all_gather_gemm")
    parser = BenchmarkParser(__file__, __doc__, reps=15, quick={"reps": 3, "chunks": [1, 2]})
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=collective.dtypes)
    parser.add_argument("--chunks", type=int, nargs="+", default=list(collective.space.params["CHUNKS"]))
    args = parser.parse_args(argv)

    rows = []
    with LocalWorld(args.world, threads=1, job_timeout_s=1800) as world:
        for op, r, n, k in SHAPES:
            rows_arg = r if op == "all_gather_gemm" else r * args.world // 2
            rows.append(world.run(measure_shape, op, rows_arg, n, k, args.dtype, args.reps, args.chunks)[0])
        overhead = world.run(signature_cost, max(args.reps, 50))[0]
    columns = ["op", "W", "rows", "N", "K", "dtype", "T_gemm", "T_comm", "T_p2p", "T_sequential", "T_default",
               "T_overlapped", "CHUNKS", "speedup", "E"]
    fmt = {c: fixed(3) for c in ("T_gemm", "T_comm", "T_p2p", "T_sequential", "T_default", "T_overlapped")}
    fmt.update({"speedup": times, "E": fixed(2)})
    text = (f"{args.world} ranks (gloo, one thread each); times in ms (slowest rank's median).\n"
            "rows = M_local for all_gather_gemm, M for gemm_reduce_scatter; T_default = kernelhub's DEFAULT "
            "config, T_overlapped = the best CHUNKS.\n\n"
            + markdown_table(rows, columns, fmt) + "\n\n"
            + markdown_table([overhead], list(overhead), {c: fixed(3) for c in overhead}))
    publish(text, args, threads="1 per rank")


if __name__ == "__main__":
    main()
