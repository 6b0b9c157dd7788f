"""Shared pieces of the FusedSGDWD benchmarks.

* two parameter sets: the 62 tensors of a CIFAR ResNet-18 (11.17 M params) and 2 000
  1-D tensors of 1..4096 elements (sizes from a fixed seed);
* the variants being compared, each a callable that owns its param/grad copies and
  its optimizer and performs one optimizer step on fixed gradients per call;
* a triad ``a = b + s*c`` (the bandwidth ceiling, measured in the same run);
* an interleaved timer (round-robin over the variants, median and IQR of repeats);
* the table formatter and the target checks used by ``report.py``.

All of it works on any device; ``gpu_suite.py`` reuses the cases and variants on CUDA.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from scaleinv_kernels import FusedSGDWD

# Hyper-parameters of every variant: fp32, momentum 0.9, weight decay 5e-4.
LR = 0.01
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
# Bytes an SGD-with-momentum step has to move per fp32 parameter: read w, g, buf and
# write w, buf = 5 * 4 B.
BYTES_PER_PARAM = 20

# ----------------------------------------------------------------------------------
# parameter sets
# ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """A named list of parameter shapes."""

    key: str
    title: str
    shapes: tuple[tuple[str, tuple[int, ...]], ...]

    @property
    def n_tensors(self) -> int:
        return len(self.shapes)

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for _, s in self.shapes)

    @property
    def bytes_per_step(self) -> int:
        return BYTES_PER_PARAM * self.numel

    def tensors(self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                seed: int = 0) -> tuple[list[Tensor], list[Tensor]]:
        """(params, grads): one separate allocation per tensor, deterministic values.

        Params ~ N(0, 0.05²), grads ~ N(0, 1e-3²): small enough that thousands of
        repeated steps on the same grads stay finite and far from denormals.
        """
        gen = torch.Generator().manual_seed(seed)
        flat_p = torch.randn(self.numel, generator=gen).mul_(0.05)
        flat_g = torch.randn(self.numel, generator=gen).mul_(1e-3)
        params, grads, start = [], [], 0
        for _, shape in self.shapes:
            n = math.prod(shape)
            params.append(flat_p[start:start + n].view(shape).to(device, dtype, copy=True))
            grads.append(flat_g[start:start + n].view(shape).to(device, dtype, copy=True))
            start += n
        return params, grads


def _bn(name: str, c: int) -> list[tuple[str, tuple[int, ...]]]:
    return [(f"{name}.weight", (c,)), (f"{name}.bias", (c,))]


def _conv(name: str, c_out: int, c_in: int, k: int) -> list[tuple[str, tuple[int, ...]]]:
    return [(f"{name}.weight", (c_out, c_in, k, k))]


def resnet18_cifar_shapes(num_classes: int = 10) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """Parameter shapes of the CIFAR ResNet-18 (3x3 stem, no max-pool, 4 stages of two
    BasicBlocks, 1x1 conv + BN shortcut where the shape changes, 512 -> classes fc),
    in ``named_parameters()`` order. 62 tensors, 11 173 962 params for 10 classes."""
    shapes = _conv("conv1", 64, 3, 3) + _bn("bn1", 64)
    c_in = 64
    for stage, c_out in enumerate((64, 128, 256, 512), start=1):
        for block in range(2):
            pre = f"layer{stage}.{block}"
            shapes += _conv(f"{pre}.conv1", c_out, c_in, 3) + _bn(f"{pre}.bn1", c_out)
            shapes += _conv(f"{pre}.conv2", c_out, c_out, 3) + _bn(f"{pre}.bn2", c_out)
            if c_in != c_out:  # first block of stages 2-4: stride-2 projection shortcut
                shapes += _conv(f"{pre}.shortcut.0", c_out, c_in, 1)
                shapes += _bn(f"{pre}.shortcut.1", c_out)
            c_in = c_out
    shapes += [("linear.weight", (num_classes, 512)), ("linear.bias", (num_classes,))]
    return tuple(shapes)


def many_tensor_shapes(n: int = 2000, max_numel: int = 4096,
                       seed: int = 1234) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """``n`` 1-D tensors with sizes drawn uniformly from 1..max_numel (fixed seed)."""
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, max_numel + 1, (n,), generator=gen).tolist()
    return tuple((f"t{i}", (s,)) for i, s in enumerate(sizes))


def resnet18_case() -> Case:
    return Case("resnet18", "(a) CIFAR ResNet-18: 62 tensors", resnet18_cifar_shapes())


def many_tensors_case() -> Case:
    return Case("tensors2000", "(b) 2 000 tensors of 1..4096 elements", many_tensor_shapes())


def tiny_case() -> Case:
    """A few odd shapes for quick correctness checks."""
    return Case("tiny", "tiny", (("a", (3, 5)), ("b", (1,)), ("c", (7, 3, 3, 3)),
                                 ("d", (257,)), ("e", (2, 1, 33))))


CASES: dict[str, Callable[[], Case]] = {"resnet18": resnet18_case,
                                        "tensors2000": many_tensors_case}

# ----------------------------------------------------------------------------------
# variants
# ----------------------------------------------------------------------------------

VARIANTS: dict[str, str] = {
    "sgd_single": "torch SGD single-tensor",
    "sgd_foreach": "torch SGD foreach",
    "sgd_fused": "torch SGD fused",
    "sgd_fused_norms": "torch SGD fused + _foreach_norm(p), _foreach_norm(g)",
    "fsgd_nostats": "FusedSGDWD track_stats=False",
    "fsgd_stats": "FusedSGDWD track_stats=True",
}
REF_NORMS = "sgd_fused_norms"  # baselines of the ratio columns
REF_FUSED = "sgd_fused"


class Variant:
    """One optimizer configuration on its own copies of the params and grads.

    Calling it performs one ``step()`` on the fixed grads (the momentum buffers and the
    params keep evolving, as in training). With ``prime=True`` (default) one step is taken
    at construction so that timing starts in the steady state (buffers allocated).
    """

    def __init__(self, key: str, params: Sequence[Tensor], grads: Sequence[Tensor],
                 prime: bool = True) -> None:
        if key not in VARIANTS:
            raise KeyError(f"unknown variant {key!r}; choose one of {list(VARIANTS)}")
        self.key = key
        self.label = VARIANTS[key]
        self.params = [p.detach().clone().requires_grad_(True) for p in params]
        for p, g in zip(self.params, grads, strict=True):
            p.grad = g.detach().clone()
        self.grads = [p.grad for p in self.params]
        hp = dict(lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
        if key == "sgd_single":
            self.optimizer = torch.optim.SGD(self.params, foreach=False, **hp)
        elif key == "sgd_foreach":
            self.optimizer = torch.optim.SGD(self.params, foreach=True, **hp)
        elif key in ("sgd_fused", "sgd_fused_norms"):
            self.optimizer = torch.optim.SGD(self.params, fused=True, **hp)
        else:
            self.optimizer = FusedSGDWD(self.params, track_stats=key == "fsgd_stats", **hp)
        self.with_norms = key == "sgd_fused_norms"
        self.norms: tuple[list[Tensor], list[Tensor]] | None = None
        if prime:
            self()

    @torch.no_grad()
    def __call__(self) -> None:
        if self.with_norms:  # per-tensor ‖w‖ (before the update) and ‖g‖, as FusedSGDWD
            self.norms = (torch._foreach_norm(self.params), torch._foreach_norm(self.grads))
        self.optimizer.step()


def make_variants(case: Case, keys: Sequence[str] = tuple(VARIANTS),
                  device: str | torch.device = "cpu", prime: bool = True) -> dict[str, Variant]:
    params, grads = case.tensors(device)
    return {k: Variant(k, params, grads, prime=prime) for k in keys}


# ----------------------------------------------------------------------------------
# bandwidth ceilings and cache flushing
# ----------------------------------------------------------------------------------


class Triad:
    """``a = b + s*c`` with torch ops over ``mib`` MiB per array (fp32).

    Bytes counted: what the kernel asks for, b and c read and a written (12 B per
    element, the STREAM convention). A CPU without streaming stores also reads ``a``
    before writing it (write-allocate), so the DRAM traffic is really 16 B/element, and
    an in-place step (whose 20 B/param need no such extra read) can run *below* the
    triad floor. :meth:`axpy` (``a += s*c``, in place, 12 B/element, no write-allocate)
    shows the bandwidth such in-place kernels can reach.
    """

    def __init__(self, mib: int = 256, device: str | torch.device = "cpu") -> None:
        n = mib * 2**20 // 4
        gen = torch.Generator().manual_seed(7)
        self.b = torch.randn(n, generator=gen).to(device)
        self.c = torch.randn(n, generator=gen).to(device)
        self.a = torch.zeros(n, device=device)  # touched: no first-touch faults timed
        self.bytes = 3 * 4 * n

    def __call__(self) -> None:
        torch.add(self.b, self.c, alpha=0.5, out=self.a)

    def axpy(self) -> None:
        """``a += 0.5 c``; 12 B/element (a read and written, c read)."""
        self.a.add_(self.c, alpha=0.5)


def last_level_cache_bytes() -> int | None:
    """Size of the CPU's L3 as the kernel reports it (None when unknown)."""
    try:
        text = open("/sys/devices/system/cpu/cpu0/cache/index3/size").read().strip()
    except OSError:
        return None
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


class CacheFlush:
    """Reads a buffer of twice the last-level cache (at least 512 MiB, at most 2 GiB) so
    the next call starts with the optimizer's data in DRAM, as after a forward/backward
    pass in training."""

    def __init__(self, mib: int | None = None) -> None:
        if mib is None:
            llc = last_level_cache_bytes() or 256 * 2**20
            mib = min(2048, max(512, 2 * llc // 2**20))
        self.mib = mib
        self.buf = torch.ones(mib * 2**20 // 4)

    def __call__(self) -> None:
        self.buf.sum()


# ----------------------------------------------------------------------------------
# interleaved timing
# ----------------------------------------------------------------------------------


@dataclass
class Timing:
    """Seconds per call of one entry, one sample per repeat."""

    key: str
    samples: list[float]
    calls_per_repeat: int
    quartiles: tuple[float, float, float] | None = None  # given instead of samples

    @property
    def median(self) -> float:
        if self.quartiles is not None:
            return self.quartiles[1]
        return statistics.median(self.samples)

    @property
    def iqr(self) -> tuple[float, float]:
        if self.quartiles is not None:
            return self.quartiles[0], self.quartiles[2]
        if len(self.samples) < 2:
            return self.samples[0], self.samples[0]
        q = statistics.quantiles(self.samples, n=4, method="inclusive")
        return q[0], q[2]


def paired_ratio(num: Timing, den: Timing) -> tuple[float, float, float]:
    """Median and quartiles over the rounds of ``num``'s sample / ``den``'s sample of the
    SAME round of :func:`interleaved` (the two ran seconds apart): a speed-up that a slow
    spell of the machine, hitting a few rounds of every entry, moves much less than the
    ratio of the two medians."""
    if num.quartiles is not None or den.quartiles is not None:
        raise ValueError("paired_ratio needs per-round samples, not quartiles")
    if len(num.samples) != len(den.samples):
        raise ValueError(f"paired_ratio: {num.key} has {len(num.samples)} rounds, "
                         f"{den.key} {len(den.samples)}")
    r = [a / b for a, b in zip(num.samples, den.samples)]
    if len(r) < 2:
        return r[0], r[0], r[0]
    q = statistics.quantiles(r, n=4, method="inclusive")
    return statistics.median(r), q[0], q[2]


def interleaved(entries: dict[str, Callable[[], None]], repeats: int = 9,
                min_time: float = 0.25, warmup: int = 2, max_calls: int = 10**6,
                flush: Callable[[], None] | None = None,
                sync: Callable[[], None] = lambda: None) -> dict[str, Timing]:
    """Time every entry ``repeats`` times, round-robin (the starting entry rotates each
    round so that no entry always follows the same neighbour). Each repeat runs an entry
    ``k`` times, ``k`` calibrated from the warm-up so that the timed calls of a repeat
    last at least ``min_time`` seconds (at most ``max_calls``); the sample is the mean
    time per call of that repeat.

    Without ``flush`` the ``k`` calls run back to back ("warm": data left in cache by
    the previous call). With ``flush``, ``flush()`` runs before every call and only the
    call is timed ("cold")."""
    if repeats < 1:
        raise ValueError("repeats must be >= 1")

    def timed(fn: Callable[[], None], k: int) -> float:
        total = 0.0
        if flush is None:
            sync()
            t0 = time.perf_counter()
            for _ in range(k):
                fn()
            sync()
            return time.perf_counter() - t0
        for _ in range(k):
            flush()
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            total += time.perf_counter() - t0
        return total

    calls: dict[str, int] = {}
    for key, fn in entries.items():
        for _ in range(warmup):
            fn()
        once = max(timed(fn, 1), 1e-9)
        calls[key] = max(1, min(max_calls, math.ceil(min_time / once)))
    samples: dict[str, list[float]] = {k: [] for k in entries}
    keys = list(entries)
    for r in range(repeats):
        for key in keys[r % len(keys):] + keys[:r % len(keys)]:
            samples[key].append(timed(entries[key], calls[key]) / calls[key])
    return {k: Timing(k, samples[k], calls[k]) for k in keys}


# ----------------------------------------------------------------------------------
# the CPU suite, the table and the targets
# ----------------------------------------------------------------------------------

MODES = {
    "cold": "last-level cache flushed before every step (data in DRAM, as in training)",
    "warm": "steps back to back (data partly left in cache by the previous step)",
}


@dataclass
class CaseResult:
    case: Case
    timings: dict[str, Timing]


@dataclass
class SuiteResult:
    mode: str
    cases: list[CaseResult]
    triad: Timing
    axpy: Timing
    triad_bytes: int

    @property
    def triad_gbps(self) -> float:
        return self.triad_bytes / self.triad.median / 1e9

    @property
    def axpy_gbps(self) -> float:
        return self.triad_bytes / self.axpy.median / 1e9


def run_suite(case_keys: Sequence[str] = tuple(CASES),
              variant_keys: Sequence[str] = tuple(VARIANTS), repeats: int = 9,
              modes: Sequence[str] = ("cold", "warm"), min_time: float = 0.25,
              cold_min_time: float = 0.02, cold_max_calls: int = 5, triad_mib: int = 256,
              flush_mib: int | None = None,
              log: Callable[[str], None] = lambda s: None) -> list[SuiteResult]:
    """Interleaved CPU suite, one :class:`SuiteResult` per mode. Per case and mode, the
    variants, the triad and the in-place axpy share one round-robin; the ceiling
    samples of all cases of a mode are pooled."""
    for m in modes:
        if m not in MODES:
            raise ValueError(f"unknown mode {m!r}; choose from {list(MODES)}")
    triad = Triad(triad_mib)
    flush = CacheFlush(flush_mib) if "cold" in modes else None
    per_mode: dict[str, tuple[list[CaseResult], list[float], list[float]]] = {
        m: ([], [], []) for m in modes}
    for ck in case_keys:
        case = CASES[ck]()
        log(f"{case.title}: building {len(variant_keys)} variants "
            f"({case.n_tensors} tensors, {case.numel / 1e6:.2f} M params)")
        variants = make_variants(case, variant_keys)
        entries: dict[str, Callable[[], None]] = dict(variants)
        entries["triad"] = triad
        entries["axpy"] = triad.axpy
        for m in modes:
            if m == "cold":
                assert flush is not None
                log(f"{case.title}: cold, {repeats} interleaved repeats, {flush.mib} MiB "
                    "read before every call")
                timings = interleaved(entries, repeats=repeats, min_time=cold_min_time,
                                      max_calls=cold_max_calls, flush=flush)
            else:
                log(f"{case.title}: warm, {repeats} interleaved repeats of >= {min_time} s")
                timings = interleaved(entries, repeats=repeats, min_time=min_time)
            results, triad_s, axpy_s = per_mode[m]
            triad_s += timings.pop("triad").samples
            axpy_s += timings.pop("axpy").samples
            results.append(CaseResult(case, timings))
        del variants, entries
    return [SuiteResult(m, res, Timing("triad", t, 0), Timing("axpy", a, 0), triad.bytes)
            for m, (res, t, a) in per_mode.items()]


def floor_seconds(case: Case, gbps: float) -> float:
    """Time to move the step's 20 B/param at ``gbps``."""
    return case.bytes_per_step / (gbps * 1e9)


def format_case_table(res: CaseResult, ceiling_gbps: float | None,
                      stat: Callable[[Timing], float] = lambda t: t.median) -> str:
    """Markdown table of one case: median ms, IQR, speed-ups, GB/s and, given a ceiling
    (triad GB/s), time / floor."""
    case, tim = res.case, res.timings
    floor = floor_seconds(case, ceiling_gbps) if ceiling_gbps else None
    title = (f"**{case.title}** — {case.numel / 1e6:.2f} M params, "
             f"{case.bytes_per_step / 1e6:.1f} MB moved per step")
    head = ("| variant | median ms | IQR ms | × vs fused+norms | × vs fused | "
            f"GB/s @{BYTES_PER_PARAM} B/param |")
    rule = "|---|---:|---:|---:|---:|---:|"
    if floor is not None:
        title += f", triad floor {floor * 1e3:.2f} ms"
        head += " time / triad floor |"
        rule += "---:|"
    rows = [title, "", head, rule]
    for key, t in tim.items():
        m = stat(t)
        lo, hi = t.iqr
        vs_norms = stat(tim[REF_NORMS]) / m if REF_NORMS in tim else float("nan")
        vs_fused = stat(tim[REF_FUSED]) / m if REF_FUSED in tim else float("nan")
        row = (f"| {VARIANTS.get(key, key)} | {m * 1e3:.3f} | {lo * 1e3:.3f}–{hi * 1e3:.3f}"
               f" | {vs_norms:.2f} | {vs_fused:.2f} | {case.bytes_per_step / m / 1e9:.1f} |")
        if floor is not None:
            row += f" {m / floor:.2f} |"
        rows.append(row)
    return "\n".join(rows)


@dataclass
class Target:
    description: str
    value: float
    bound: float
    higher_is_better: bool

    @property
    def passed(self) -> bool:
        return self.value >= self.bound if self.higher_is_better else self.value <= self.bound


def check_targets(result: SuiteResult, ceiling_gbps: float | None = None,
                  subject: str = "fsgd_stats") -> list[Target]:
    """The performance targets for ``subject`` (FusedSGDWD with stats), on the cases run."""
    gbps = result.triad_gbps if ceiling_gbps is None else ceiling_gbps
    out: list[Target] = []
    for res in result.cases:
        tim = res.timings
        if subject not in tim:
            continue
        t = tim[subject].median
        tag = "(a)" if res.case.key == "resnet18" else "(b)"
        speed_norms = {"resnet18": 2.0, "tensors2000": 5.0}.get(res.case.key)
        floor_factor = {"resnet18": 1.15, "tensors2000": 1.5}.get(res.case.key)
        if REF_NORMS in tim and speed_norms:
            out.append(Target(f"{tag} FusedSGDWD+stats ≥ {speed_norms:g}× faster than torch "
                              "fused + norms", tim[REF_NORMS].median / t, speed_norms, True))
        if REF_FUSED in tim and res.case.key == "resnet18":
            out.append(Target(f"{tag} FusedSGDWD+stats ≥ 1.2× faster than torch fused "
                              "(no norms)", tim[REF_FUSED].median / t, 1.2, True))
        if floor_factor:
            out.append(Target(f"{tag} FusedSGDWD+stats within {floor_factor:g}× of the "
                              "triad floor", t / floor_seconds(res.case, gbps),
                              floor_factor, False))
    return out


def format_targets(by_mode: dict[str, Sequence[Target]]) -> str:
    """One row per target, one measured/result pair of columns per mode."""
    modes = list(by_mode)
    head = "| target | bound | " + " | ".join(f"{m}: measured | {m}: result" for m in modes)
    rows = [head + " |", "|---|---:|" + "---:|---|" * len(modes)]
    first = by_mode[modes[0]]
    for i, t in enumerate(first):
        row = f"| {t.description} | {'≥' if t.higher_is_better else '≤'} {t.bound:g} |"
        for m in modes:
            tm = by_mode[m][i]
            row += f" {tm.value:.2f} | {'PASS' if tm.passed else 'FAIL'} |"
        rows.append(row)
    return "\n".join(rows)
