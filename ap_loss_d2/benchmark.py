"""Time and memory of classification losses side by side (the paper's Sec. 4.3 / Fig. 11).

``python -m ap_loss_d2.benchmark [--images 1 2 4 8] [--positives 500 2000] [--device all]``

For every (device, batch size, number of positives) the same inputs are fed to

* ``focal``: ``torchvision.ops.sigmoid_focal_loss`` (alpha 0.25, gamma 2, sum over the
  non-ignored anchors, divided by the number of positives, as in RetinaNet);
* ``ce_ohem``: softmax CE with 3:1 online hard negative mining (:mod:`ap_loss_d2.losses.ohem`);
* ``ap_loss`` and ``auc_loss``: :mod:`ap_loss_d2.losses.ranking` (linear step, delta 1);
* ``ap_positive_loop``: the authors'-style loop over positives
  (:mod:`ap_loss_d2.losses.positive_loop`). It is timed on the first ``--loop-positives`` K
  positives (ascending score) only and extrapolated linearly to all |P|:
  ``fixed + (time_K - fixed) * |P| / K`` with ``fixed`` the time of the same call processing 0
  positives (selection of N^, sort, backward); rows say so. Its memory is that of the K run.

Inputs: logits ~ N(0, 1) float32 of shape (images, anchors, classes) requiring grad; the
``--positives`` positives are the total of the batch, placed at distinct random anchors (one
class each); ~1% of the other anchors are ignored (all their classes). Each loss gets its
targets pre-built in its own format (binary one-hot for focal, per-anchor labels for OHEM,
ternary per anchor-class for the ranking losses); building them is not timed.

Time: median wall-clock of forward + backward over ``--repeats`` runs after ``--warmup`` runs
(CUDA synchronised). Memory: extra peak memory of one forward + backward above what is
allocated before it (logits, targets; ``logits.grad`` cleared), measured in a second pass:
on CUDA ``torch.cuda.max_memory_allocated``; on CPU, in a fresh process per loss and
configuration, the peak resident set size (``VmHWM``, reset through ``/proc/self/clear_refs``) with glibc's mmap threshold lowered to
64 KiB so that every tensor buffer is mapped at allocation and unmapped when freed. The gradient
buffer of the logits (1x logits) is part of every loss's extra memory.

Outputs in ``--out`` (default ``output/benchmark``): ``benchmark.json`` and ``benchmark.png``
(time vs batch size per loss), plus a table on stdout.
"""
import argparse
import ctypes
import json
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

LOSSES = ("focal", "ce_ohem", "ap_loss", "auc_loss", "ap_positive_loop")
LABELS = {
    "focal": "Focal loss",
    "ce_ohem": "CE + OHEM 3:1",
    "ap_loss": "AP-loss (ranking.py)",
    "auc_loss": "AUC-loss (ranking.py)",
    "ap_positive_loop": "AP-loss, loop on positives",
}
CPU_MEMORY_METHOD = (
    "peak resident set size (VmHWM reset via /proc/self/clear_refs) minus resident size before "
    "the run, each loss and configuration in a fresh process; glibc M_MMAP_THRESHOLD lowered to "
    "64 KiB so tensor buffers are unmapped when freed"
)
CUDA_MEMORY_METHOD = "torch.cuda.max_memory_allocated() minus torch.cuda.memory_allocated() before"
LOOP_EXTRAPOLATION = ("fixed + (time_K - fixed) * |P| / K, K = loop_positives, fixed = time "
                      "of the same call with 0 positives processed")
QUICK = dict(images=[1, 2], anchors=600, classes=4, positives=[12, 30], repeats=2, warmup=1,
             loop_positives=4)


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------
def make_inputs(images, anchors, classes, positives, device, seed):
    """Logits and the targets of every loss for one configuration."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(images, anchors, classes, generator=g)
    n_anchor_total = images * anchors
    positives = min(positives, n_anchor_total)
    perm = torch.randperm(n_anchor_total, generator=g)
    pos_anchor = perm[:positives]
    rest = perm[positives:]
    n_ign = int(round(0.01 * n_anchor_total))
    ign_anchor = rest[:n_ign]

    labels = torch.full((n_anchor_total,), classes, dtype=torch.long)  # background = K
    labels[pos_anchor] = torch.randint(0, classes, (positives,), generator=g)
    labels[ign_anchor] = -1
    labels = labels.view(images, anchors)

    valid = labels >= 0
    fg = valid & (labels < classes)
    onehot = torch.zeros(images, anchors, classes)
    onehot[fg] = torch.nn.functional.one_hot(labels[fg], classes).float()
    ternary = onehot.to(torch.int8)
    ternary[~valid] = -1

    logits = logits.to(device).requires_grad_(True)
    return {
        "logits": logits,
        "labels": labels.to(device),  # (N, A): -1 ignored, 0..K-1 class, K background
        "valid": valid.to(device),
        "onehot": onehot.to(device),  # (N, A, K) float 0/1
        "ternary": ternary.to(device),  # (N, A, K) int8 1 / 0 / -1
        "num_pos": positives,
    }


def make_loss_fns(inp, loop_positives):
    from torchvision.ops import sigmoid_focal_loss

    from ap_loss_d2.losses import ap_loss, auc_loss
    from ap_loss_d2.losses.ohem import ce_ohem_loss
    from ap_loss_d2.losses.positive_loop import ap_loss_positive_loop

    x, num_pos = inp["logits"], inp["num_pos"]
    norm = max(num_pos, 1)
    loop_k = min(loop_positives, num_pos) if loop_positives > 0 else num_pos

    def focal():
        v = inp["valid"]
        return sigmoid_focal_loss(x[v], inp["onehot"][v], alpha=0.25, gamma=2.0,
                                  reduction="sum") / norm

    return {
        "focal": focal,
        "ce_ohem": lambda: ce_ohem_loss(x, inp["labels"], neg_pos_ratio=3.0),
        "ap_loss": lambda: ap_loss(x, inp["ternary"], delta=1.0),
        "auc_loss": lambda: auc_loss(x, inp["ternary"], delta=1.0),
        "ap_positive_loop": lambda: ap_loss_positive_loop(x, inp["ternary"], delta=1.0,
                                                          max_positives=loop_k),
        "ap_positive_loop_fixed": lambda: ap_loss_positive_loop(x, inp["ternary"], delta=1.0,
                                                                max_positives=0),
    }, loop_k


# ---------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------
def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_fwd_bwd(fn, x, device, repeats, warmup):
    def once():
        x.grad = None
        _sync(device)
        t0 = time.perf_counter()
        fn().backward()
        _sync(device)
        return time.perf_counter() - t0

    for _ in range(warmup):
        once()
    times = [once() for _ in range(repeats)]
    x.grad = None
    return statistics.median(times), times


class CpuPeakMemory:
    """Extra peak resident memory of a call (see CPU_MEMORY_METHOD). ``ok`` False if unusable."""

    def __init__(self):
        self.ok = False
        self.why = ""
        if platform.system() != "Linux":
            self.why = "not Linux"
            return
        try:
            self.libc = ctypes.CDLL("libc.so.6")
            self.libc.mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD: disables the dynamic threshold
            self._reset()
            self._read("VmHWM")
            self.ok = True
        except Exception as e:  # noqa: BLE001  (any failure: report memory as unavailable)
            self.why = f"{type(e).__name__}: {e}"

    @staticmethod
    def _read(key):
        with open("/proc/self/status") as f:
            m = re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M)
        return int(m.group(1)) * 1024

    def _reset(self):
        self.libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS (VmHWM) to the current RSS

    def measure(self, call):
        self._reset()
        base = self._read("VmRSS")
        call()
        return max(self._read("VmHWM") - base, 0)


def measure_extra_memory(fn, x, device, cpu_mem):
    def call():
        out = fn()
        out.backward()
        _sync(device)
        del out

    x.grad = None
    if device.startswith("cuda"):
        _sync(device)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        call()
        extra = torch.cuda.max_memory_allocated() - base
    elif cpu_mem is not None and cpu_mem.ok:
        call()  # warm (first-call allocations of thread pools etc.)
        x.grad = None
        extra = cpu_mem.measure(call)
    else:
        extra = None
    x.grad = None
    return extra


def memory_probe(probe):
    """Extra peak bytes of one loss's forward + backward for one configuration (dict)."""
    inp = make_inputs(probe["images"], probe["anchors"], probe["classes"], probe["positives"],
                      probe["device"], probe["seed"])
    fns, _ = make_loss_fns(inp, probe["loop_positives"])
    cpu_mem = CpuPeakMemory() if probe["device"] == "cpu" else None
    return measure_extra_memory(fns[probe["loss"]], inp["logits"], probe["device"], cpu_mem)


def _memory_in_subprocess(probe):
    out = subprocess.run(
        [sys.executable, "-m", "ap_loss_d2.benchmark", "--memory-probe", json.dumps(probe)],
        check=True, stdout=subprocess.PIPE, text=True,
    ).stdout
    value = json.loads(out.strip().splitlines()[-1])["extra_bytes"]
    return None if value is None else int(value)


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------
def run(args):
    devices = resolve_devices(args.device)
    configs = [(d, n, p) for d in devices for n in args.images for p in args.positives]
    results = []
    log(f"[benchmark] {len(configs)} configurations x {len(LOSSES)} losses; anchors "
        f"{args.anchors}, classes {args.classes}, repeats {args.repeats} (+{args.warmup} warm-up)"
        f", torch threads {torch.get_num_threads()}")

    # Pass 1: time (before the CPU memory probe changes the allocator's mmap threshold).
    for ci, (device, images, positives) in enumerate(configs):
        inp = make_inputs(images, args.anchors, args.classes, positives, device,
                          args.seed + 1000 * images + positives)
        fns, loop_k = make_loss_fns(inp, args.loop_positives)
        x = inp["logits"]
        stats = {}
        from ap_loss_d2.losses import ap_loss

        ap_loss(x.detach(), inp["ternary"], delta=1.0, stats=stats)
        row = {
            "device": device, "images": images, "anchors": args.anchors,
            "classes": args.classes, "positives": inp["num_pos"], "numel": x.numel(),
            "logits_mb": x.numel() * x.element_size() / 2**20,
            "num_neg_nontrivial": int(stats.get("num_neg_nontrivial", -1)),
            "losses": {},
        }
        for name in LOSSES:
            if name not in args.losses:
                continue
            log(f"[benchmark] ({ci + 1}/{len(configs)}) {device} images={images} "
                f"|P|={inp['num_pos']}: timing {name} ...")
            med, times = time_fwd_bwd(fns[name], x, device, args.repeats, args.warmup)
            entry = {"time_s": med, "times_s": times, "extrapolated": False}
            if name == "ap_positive_loop" and loop_k < inp["num_pos"]:
                # time(k) = fixed + k * per_positive: the fixed part (selection of N^, sort,
                # backward) is timed with 0 positives processed, the rest scaled by |P| / K.
                fixed, _ = time_fwd_bwd(fns["ap_positive_loop_fixed"], x, device,
                                        args.repeats, args.warmup)
                per_pos = max(med - fixed, 0.0) / max(loop_k, 1)
                entry.update(time_s=fixed + per_pos * inp["num_pos"], timed_s=med,
                             timed_positives=loop_k, fixed_s=fixed, per_positive_s=per_pos,
                             extrapolated=True,
                             note=f"(extrapolated from {loop_k} of {inp['num_pos']} positives)")
            results_line = f"{entry['time_s'] * 1e3:10.2f} ms"
            log(f"[benchmark]     {name}: {results_line} {entry.get('note', '')}")
            row["losses"][name] = entry
        focal_t = row["losses"].get("focal", {}).get("time_s")
        for entry in row["losses"].values():
            entry["ratio_to_focal"] = entry["time_s"] / focal_t if focal_t else None
        results.append(row)
        del inp, fns, x

    # Pass 2: memory. On CPU each (configuration, loss) is measured in a fresh process: the
    # resident-set method is only meaningful without the heap history of the other runs.
    cpu_mem = None
    if not args.no_memory and "cpu" in devices:
        cpu_mem = CpuPeakMemory()
        if not cpu_mem.ok:
            log(f"[benchmark] CPU memory measurement unavailable: {cpu_mem.why}")
    if not args.no_memory:
        for ci, row in enumerate(results):
            device = row["device"]
            seed = args.seed + 1000 * row["images"] + row["positives"]
            log(f"[benchmark] ({ci + 1}/{len(results)}) {device} images={row['images']} "
                f"|P|={row['positives']}: memory ...")
            for name, entry in row["losses"].items():
                probe = dict(loss=name, device=device, images=row["images"], anchors=args.anchors,
                             classes=args.classes, positives=row["positives"], seed=seed,
                             loop_positives=args.loop_positives)
                if device == "cpu":
                    extra = _memory_in_subprocess(probe) if cpu_mem.ok else None
                else:
                    extra = memory_probe(probe)
                entry["extra_peak_mb"] = None if extra is None else extra / 2**20
                entry["extra_peak_x_logits"] = None if extra is None else extra / (row["numel"] * 4)

    report = {
        "config": {
            "images": args.images, "anchors": args.anchors, "classes": args.classes,
            "positives": args.positives, "positives_are": "total per batch",
            "repeats": args.repeats, "warmup": args.warmup, "devices": devices,
            "loop_positives": args.loop_positives, "delta": 1.0, "seed": args.seed,
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(),
            "cuda_device": (torch.cuda.get_device_name(0) if "cuda" in devices else None),
            "time": "median wall-clock of forward+backward (s)",
            "positive_loop_extrapolation": LOOP_EXTRAPOLATION,
        },
        "memory_method": {
            "cpu": (None if args.no_memory else
                    (CPU_MEMORY_METHOD if cpu_mem is not None and cpu_mem.ok else
                     f"unavailable ({cpu_mem.why})" if cpu_mem is not None else None)),
            "cuda": CUDA_MEMORY_METHOD if ("cuda" in devices and not args.no_memory) else None,
        },
        "losses": [n for n in LOSSES if n in args.losses],
        "results": results,
    }
    return report


def resolve_devices(device):
    cuda = torch.cuda.is_available()
    if device == "all":
        return ["cpu"] + (["cuda"] if cuda else [])
    if device == "cuda" and not cuda:
        raise SystemExit("--device cuda requested but CUDA is not available")
    return [device]


def format_table(report):
    lines = []
    hdr = (f"{'device':6} {'imgs':>4} {'|P|':>6} {'|N^|':>9}  {'loss':28} {'time ms':>11} "
           f"{'x focal':>8} {'extra MB':>9} {'x logits':>8}")
    lines.append(hdr)
    lines.append("-" * len(hdr))
    for row in report["results"]:
        for name, e in row["losses"].items():
            mb = e.get("extra_peak_mb")
            xl = e.get("extra_peak_x_logits")
            ratio = e.get("ratio_to_focal")
            lines.append(
                f"{row['device']:6} {row['images']:>4} {row['positives']:>6} "
                f"{row['num_neg_nontrivial']:>9}  {LABELS[name]:28} {e['time_s'] * 1e3:>11.2f} "
                f"{(f'{ratio:.2f}' if ratio is not None else '-'):>8} "
                f"{(f'{mb:.1f}' if mb is not None else '-'):>9} "
                f"{(f'{xl:.2f}' if xl is not None else '-'):>8}"
                + (f"  {e['note']}" if e.get("note") else ""))
    mm = report["memory_method"]
    lines.append("")
    lines.append("time: median wall-clock of forward+backward; extra memory: peak above the "
                 "inputs during one forward+backward (includes the 1x logits gradient).")
    for dev in ("cpu", "cuda"):
        if mm.get(dev):
            lines.append(f"memory ({dev}): {mm[dev]}")
    return "\n".join(lines)


def plot(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["device"], r["positives"]) for r in report["results"]})
    fig, axes = plt.subplots(1, len(groups), figsize=(max(6.5 * len(groups), 7.0), 4.8),
                             squeeze=False)
    for ax, (device, positives) in zip(axes[0], groups):
        rows = sorted((r for r in report["results"]
                       if r["device"] == device and r["positives"] == positives),
                      key=lambda r: r["images"])
        for name in report["losses"]:
            xs = [r["images"] for r in rows if name in r["losses"]]
            ys = [r["losses"][name]["time_s"] for r in rows if name in r["losses"]]
            extrap = any(r["losses"][name].get("extrapolated") for r in rows if name in r["losses"])
            ax.plot(xs, ys, marker="o", linestyle="--" if extrap else "-",
                    label=LABELS[name] + (" (extrapolated)" if extrap else ""))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks([r["images"] for r in rows])
        ax.set_xticklabels([str(r["images"]) for r in rows])
        ax.set_xlabel("batch size (images)")
        ax.set_ylabel("forward + backward time (s)")
        ax.set_title(f"{device}, {positives} positives / batch")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    cfg = report["config"]
    fig.suptitle(f"Time cost of classification losses, forward + backward\n"
                 f"({cfg['anchors']} anchors x {cfg['classes']} classes per image, median of "
                 f"{cfg['repeats']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m ap_loss_d2.benchmark", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, nargs="+", default=[1, 2, 4, 8],
                   help="batch sizes (images per batch)")
    p.add_argument("--anchors", type=int, default=49104, help="anchors per image")
    p.add_argument("--classes", type=int, default=20, help="foreground classes")
    p.add_argument("--positives", type=int, nargs="+", default=[500, 2000],
                   help="positives per batch (total over its images)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    p.add_argument("--device", choices=["cpu", "cuda", "all"], default="all",
                   help="'all': CPU, and CUDA when available")
    p.add_argument("--out", default="output/benchmark", help="output directory")
    p.add_argument("--loop-positives", type=int, default=64,
                   help="time the positive loop on this many positives and extrapolate "
                        "linearly to |P| (0: run all positives)")
    p.add_argument("--losses", nargs="+", choices=LOSSES, default=list(LOSSES))
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-memory", action="store_true", help="skip the memory pass")
    p.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)  # internal: one probe
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes (a smoke test): " + ", ".join(f"{k}={v}"
                                                                for k, v in QUICK.items()))
    args = p.parse_args(argv)
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    if "focal" not in args.losses:
        args.losses = ["focal"] + list(args.losses)  # ratios are relative to focal
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_probe:
        print(json.dumps({"extra_bytes": memory_probe(json.loads(args.memory_probe))}))
        return None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    report = run(args)
    report["config"]["wall_s"] = time.perf_counter() - t0
    table = format_table(report)
    print(table, flush=True)
    (out / "benchmark.json").write_text(json.dumps(report, indent=2))
    (out / "benchmark.txt").write_text(table + "\n")
    plot(report, out / "benchmark.png")
    log(f"[benchmark] wrote {out / 'benchmark.json'}, {out / 'benchmark.png'}, "
        f"{out / 'benchmark.txt'} ({report['config']['wall_s']:.1f} s)")
    return report


if __name__ == "__main__":
    main()
