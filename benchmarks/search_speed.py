"""Search speed at archive scale: top-5 over N vectors (default 10^6) of the model's width.

Vectors are drawn around real embeddings (a shard folder, e.g. the demo's): each is a random real
tumor's vector plus Gaussian noise of `--noise` x the per-dimension sd, so that neighbourhoods are
clustered as in a real archive (uniform noise would make every method look alike). Printed, all
measured in this one run:
- exact search, one query at a time, against the memory-bandwidth bound: the time to read the N x D
  float32 vectors once (the faster of a numpy and a torch sum over the same array, one thread) ->
  ratio (goal <= 1.2x), for the fused distance + top-k scan the index uses (retrieval.flatscan) and
  for FAISS's IndexFlatL2, measured in `--rounds` interleaved rounds (this machine's timings drift by
  tens of percent when anything else runs): the median ratio and the range;
- the approximate index (IVF-Flat, about 4 sqrt(N) lists) at several nprobe: recall@5 against the
  exact top-5 and its speed-up over exact search (goal: recall >= 0.95 at >= 10x).

    .venv/bin/python benchmarks/search_speed.py --embeddings outputs/demo/embeddings [--n 1000000 --column roipool]
"""

from __future__ import annotations

import argparse
import math
import time

import faiss
import numpy as np
import torch

from embedder.shards import read_embeddings
from retrieval import flatscan


def median_time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--embeddings", required=True)
    p.add_argument("--column", default="embedding", help="the vectors drawn around (roipool: the paper's embedding)")
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--noise", type=float, default=0.3)
    p.add_argument("--threads", type=int, default=1, help="FAISS / numpy threads (1: one query, one core)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the exact vs bandwidth timing")
    args = p.parse_args()
    faiss.omp_set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    table = read_embeddings(args.embeddings)
    if args.column not in table.column_names:
        raise SystemExit(f"{args.embeddings}: no column {args.column!r} in the shards (e.g. embedding, roipool)")
    real = np.stack(table[args.column].to_numpy(zero_copy_only=False)).astype(np.float32)
    rng = np.random.default_rng(0)
    sd = real.std(0) * args.noise

    def draw(n: int) -> np.ndarray:
        return (real[rng.integers(len(real), size=n)] + rng.normal(0, 1, (n, real.shape[1])) * sd).astype(np.float32)

    x, q = draw(args.n), draw(args.queries)
    n, d = x.shape
    print(f"{n} vectors of {d} dims ({x.nbytes / 2**20:.0f} MiB) drawn around {len(real)} real embeddings; "
          f"{args.queries} queries; {args.threads} thread(s)")
    flat = faiss.IndexFlatL2(d)
    flat.add(x)
    xt = torch.from_numpy(x)
    if not flatscan.available():
        print("retrieval._flatscan is not compiled here: only FAISS's flat scan is measured")
    fused_fn = (lambda: [flatscan.top_k(x, q[i:i + 1], 5) for i in range(20)]) if flatscan.available() else None
    rounds = []
    for _ in range(args.rounds):  # interleaved: a slow spell of the machine slows both sides of a ratio
        read_np = median_time(lambda: float(x.sum()), 5)
        read_torch = median_time(lambda: float(xt.sum()), 5)
        bound = min(read_np, read_torch)
        exact = median_time(lambda: [flat.search(q[i:i + 1], 5) for i in range(20)], 3) / 20
        fused = median_time(fused_fn, 3) / 20 if fused_fn else float("nan")
        rounds.append((exact, fused, read_np, read_torch, exact / bound, fused / bound))
    exact_s, fused_s, read_np, read_torch, ratio, fused_ratio = (float(np.median(c)) for c in zip(*rounds, strict=True))
    read_s = min(read_np, read_torch)
    print(f"reading the vectors once: {1000 * read_s:.2f} ms ({x.nbytes / read_s / 2**30:.1f} GiB/s; numpy sum "
          f"{1000 * read_np:.2f} ms, torch sum {1000 * read_torch:.2f} ms)")
    for name, s, r, col in (("fused scan (retrieval.flatscan, what the index uses)", fused_s, fused_ratio, 5),
                            ("FAISS IndexFlatL2", exact_s, ratio, 4)):
        lo, hi = min(x_[col] for x_ in rounds), max(x_[col] for x_ in rounds)
        print(f"exact, {name}: {1000 * s:.2f} ms per query; / bandwidth bound = {r:.2f}x (median of "
              f"{args.rounds} rounds, {lo:.2f}-{hi:.2f}; goal <= 1.2x)")
    _, truth = flat.search(q, 5)
    if fused_fn:
        _, got = flatscan.top_k(x, q, 5)
        print(f"fused scan: the same top-5 as FAISS for {np.mean((got == truth).all(1)):.1%} of the {len(q)} queries")
    nlist = int(4 * math.sqrt(n))
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatL2(d), d, nlist)
    t0 = time.perf_counter()
    ivf.train(x[rng.choice(n, size=min(n, 64 * nlist), replace=False)])
    ivf.add(x)
    print(f"IVF-Flat with {nlist} lists built in {time.perf_counter() - t0:.0f} s")
    print("| nprobe | recall@5 | ms per query | speed-up over exact |")
    print("|---|---|---|---|")
    for nprobe in (1, 4, 16, 32, 64, 128):
        ivf.nprobe = nprobe
        _, got = ivf.search(q, 5)
        recall = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(got, truth, strict=True)])
        s = median_time(lambda: [ivf.search(q[i:i + 1], 5) for i in range(50)], 3) / 50
        print(f"| {nprobe} | {recall:.3f} | {1000 * s:.3f} | {exact_s / s:.1f}x |")


if __name__ == "__main__":
    main()
