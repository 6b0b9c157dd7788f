"""``scaleinv <experiment>``: run one of the paper's experiments, write JSON and a figure.

    scaleinv <experiment> [--preset smoke|quick|full] [--data mnist5k|mnist|cifar10]
             [--data-root DIR] [--out DIR] [--device cpu|cuda] [--seed N] [--resume]
             [--init shared|independent]

(also ``python -m scaleinv_kernels.experiments ...``). Writes
``<out>/<experiment>/result.json`` and ``figure.png``; long runs checkpoint to
``<out>/<experiment>/checkpoint.pt`` and continue from it with ``--resume``.

Experiments with ``DISTRIBUTED = True`` (fig4-equilibrium) also run under
``torchrun --nproc_per_node=N -m scaleinv_kernels.experiments ...``: their ensemble
members are split over the ranks, and only rank 0 writes the result, figure and
checkpoints (see :mod:`scaleinv_kernels.ensemble.distributed`).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

import torch

from scaleinv_kernels.ensemble.distributed import close_distributed, init_distributed
from scaleinv_kernels.experiments.common import PRESET_NAMES, RunContext, write_result

#: command name → module (imported lazily, so ``--help`` stays fast)
EXPERIMENTS = {
    "fig1-toy": "scaleinv_kernels.experiments.fig1_toy",
    "fig1-fullbatch": "scaleinv_kernels.experiments.fig1_fullbatch",
    "fig2-small-lr": "scaleinv_kernels.experiments.fig2_small_lr",
    "fig3-swa": "scaleinv_kernels.experiments.fig3_swa",
    "fig4-equilibrium": "scaleinv_kernels.experiments.fig4_equilibrium",
    "explr": "scaleinv_kernels.experiments.explr",
    "equilibrium-norm": "scaleinv_kernels.experiments.equilibrium_norm",
    "mixing-time": "scaleinv_kernels.experiments.mixing_time",
}
DATASETS = ("mnist5k", "mnist", "cifar10")


def load_experiment(name: str):
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; choose one of {sorted(EXPERIMENTS)}")
    return importlib.import_module(EXPERIMENTS[name])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scaleinv", description=__doc__.split("\n\n")[0])
    p.add_argument("experiment", choices=sorted(EXPERIMENTS))
    p.add_argument("--preset", choices=PRESET_NAMES, default="quick",
                   help="smoke: seconds (tests); quick: minutes on a 2-core CPU (default); "
                        "full: paper scale, for a GPU")
    p.add_argument("--data", choices=DATASETS, default=None,
                   help="mnist5k (embedded, default) or an existing torchvision-format "
                        "folder of MNIST / CIFAR-10 under --data-root (never downloaded)")
    p.add_argument("--data-root", type=Path, default=None)
    p.add_argument("--out", type=Path, default=Path("out"), help="results go to OUT/<exp>/")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT/<exp>/checkpoint.pt if present")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice, one per core); use 1 "
                        "when other jobs share the CPU — oversubscribed small convolutions "
                        "run several times slower")
    p.add_argument("--init", choices=("shared", "independent"), default=None,
                   help="ensemble experiments (fig4-equilibrium, mixing-time): every member "
                        "from one initialization, or each from its own (default: the "
                        "preset's)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    module = load_experiment(args.experiment)
    if args.threads is not None:
        if args.threads < 1:
            print("scaleinv: --threads must be >= 1", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"scaleinv: --device {args.device} but CUDA is not available here",
              file=sys.stderr)
        return 2
    config = dict(module.PRESETS[args.preset])
    if args.init is not None:
        if "init" not in config:
            print(f"scaleinv: {args.experiment} has no ensemble initialization to choose "
                  "(--init applies to fig4-equilibrium and mixing-time)", file=sys.stderr)
            return 2
        config["init"] = args.init
    uses_data = getattr(module, "USES_DATA", True)
    data = (args.data or config.get("data", "mnist5k")) if uses_data else None
    if args.data is not None and not uses_data:
        print(f"scaleinv: {args.experiment} does not use a data set (--data ignored)",
              file=sys.stderr)
    if data not in (None, "mnist5k") and args.data_root is None:
        print(f"scaleinv: --data {data} needs --data-root DIR (an existing torchvision-format "
              "folder; nothing is downloaded)", file=sys.stderr)
        return 2
    info = init_distributed(device)  # single process unless torchrun set WORLD_SIZE > 1
    finished = False  # the ranks meet at a barrier before leaving only after a full run
    try:
        if info.distributed and not getattr(module, "DISTRIBUTED", False):
            print(f"scaleinv: {args.experiment} does not support several processes "
                  f"(WORLD_SIZE={info.world_size}); run it without torchrun", file=sys.stderr)
            return 2
        requested, device = device, info.device  # cuda → cuda:LOCAL_RANK under torchrun
        out = args.out / args.experiment
        ctx = RunContext(name=args.experiment, preset=args.preset, config=config, out=out,
                         device=device, seed=args.seed, data=data, data_root=args.data_root,
                         resume=args.resume, progress=not args.no_progress, dist=info)
        if info.is_main:
            out.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        result = module.run(ctx)
        runtime = time.perf_counter() - t0
        finished = True
    finally:
        close_distributed(info, synchronize=finished)
    if not info.is_main:
        return 0  # the main rank writes everything
    result = {"experiment": args.experiment, "preset": args.preset, "seed": args.seed,
              "device": str(requested), "data": data, "config": config, **result,
              "runtime_s": runtime}
    write_result(result, out)
    module.plot(result, out / "figure.png")
    ctx.checkpoint_path.unlink(missing_ok=True)  # finished: nothing to resume
    print(f"scaleinv {args.experiment}: wrote {out / 'result.json'} and "
          f"{out / 'figure.png'} ({runtime:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
