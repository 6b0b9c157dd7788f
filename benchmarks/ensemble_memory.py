"""500 members of the normalized CNN trained on MNIST-5k in one process: memory and time.

    python benchmarks/ensemble_memory.py [--members 500] [--chunk 50] [--steps 3]

Builds ``Ensemble(normalized_cnn, M)`` and an ``EnsembleTrainer`` (batch 128 per member,
``chunk_size`` members per forward/backward pass) and runs a few optimizer steps of the
first epoch; prints the peak resident memory of the process and the seconds per step
(and the projected seconds per epoch). Activation memory grows with ``chunk`` (not with
M); parameters, gradients and momentum buffers grow with M (≈ 15 k params per member).
"""

from __future__ import annotations

import argparse
import math
import resource
import time

import torch

from scaleinv_kernels import FusedSGDWD
from scaleinv_kernels.data import load_mnist5k
from scaleinv_kernels.ensemble import Ensemble, EnsembleTrainer
from scaleinv_kernels.scale_invariance import normalized_cnn


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--members", type=int, default=500)
    p.add_argument("--chunk", type=int, default=50)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    args = p.parse_args()
    X, Y, _, _ = load_mnist5k()
    base = peak_rss_gib()
    t0 = time.perf_counter()
    ens = Ensemble(normalized_cnn, args.members, init="independent", seed=0)
    build = time.perf_counter() - t0
    params = sum(p.numel() for p in ens.parameters())
    opt = FusedSGDWD([p for p in ens.parameters() if p.requires_grad], lr=0.1, momentum=0.9,
                     weight_decay=5e-4)
    trainer = EnsembleTrainer(ens, opt, (X[: args.steps * args.batch_size],
                                         Y[: args.steps * args.batch_size]),
                              args.batch_size, chunk_size=args.chunk, progress=False)
    t0 = time.perf_counter()
    loss = trainer.train_epoch()
    per_step = (time.perf_counter() - t0) / args.steps
    steps_per_epoch = math.ceil(len(X) / args.batch_size)
    print(f"members {args.members}, chunk {args.chunk}, batch {args.batch_size}: "
          f"{params / 1e6:.1f} M parameters; built in {build:.1f} s")
    print(f"{per_step:.2f} s per step ({args.members / per_step:.0f} member-steps/s), "
          f"projected {per_step * steps_per_epoch / 60:.1f} min per MNIST-5k epoch "
          f"({steps_per_epoch} steps); loss finite: {bool(torch.isfinite(loss).all())}")
    print(f"peak RSS {peak_rss_gib():.2f} GiB (data + interpreter before: {base:.2f} GiB)")


if __name__ == "__main__":
    main()
