"""Time and memory of classification losses side by side (the paper's Sec. 4.3 / Fig. 11).

``python -m tools.benchmark [--images 1 2 4 8] [--positives 500 2000] [--device all]
[--anchors 32736 49104] [--output-dir output/benchmark]``

``python -m tools.benchmark --breakdown [--device cuda]``: the paper's Fig. 10, see
:func:`breakdown`.

Anchors per image (``--anchors``, default both, the paper's first): 32,736 = 6 anchors per
location of a 512x512 image over P3-P7 (the paper's RetinaNet, Sec. 4.1: 2 scales x 3 ratios)
and 49,104 = 9 per location (Detectron2's RetinaNet default, issue 15's target size). Every
output row names which. These are synthetic logits (N(0, 1): the early-training regime); the
costs measured during training are ``--breakdown`` below and ``studies.cost
--run-dir`` (from the training log).

For every (device, anchors, classes, batch size, number of positives) the same inputs are fed
to

* ``focal``: ``torchvision.ops.sigmoid_focal_loss`` (alpha 0.25, gamma 2) as Detectron2's
  RetinaNet calls it: over the non-ignored anchors (boolean-mask indexing), summed, divided by
  the number of positives;
* ``focal_plain``: the same focal loss over all entries (no mask): the cheaper baseline. Every
  loss's time is given relative to both;
* ``ce_ohem``: softmax CE with 3:1 online hard negative mining (:mod:`ap_loss_d2.losses.ohem`);
* ``ap_loss`` and ``auc_loss``: :mod:`ap_loss_d2.losses.ranking` (linear step, delta 1) with
  int8 targets and the default kernel of the device, and ``ap_loss_float32_targets`` /
  ``ap_loss_int64_targets``: the same AP-loss given a float32 one-hot-style or an int64 target
  tensor (what users often hold); ``ap_loss_grid`` / ``ap_loss_sync_free``: AP-loss with the
  kernel forced (``kernel=``; ``"grid"`` is the CPU default, ``"sync_free"`` the one used on
  accelerators);
* with ``--reference-kernel FILE`` also ``ap_loss_reference`` / ``auc_loss_reference``: the
  ``ap_loss``/``auc_loss`` of another version of ``ranking.py`` (e.g.
  ``git show main:ap_loss_d2/losses/ranking.py > /tmp/ranking_main.py``), loaded as a module
  of this package, timed side by side on the same inputs;
* ``ap_positive_loop``: the authors'-style loop over positives
  (:mod:`tools.positive_loop`). It is timed on the first ``--loop-positives`` K
  positives (ascending score) only and extrapolated linearly to all |P|:
  ``fixed + (time_K - fixed) * |P| / K`` with ``fixed`` the time of the same call processing 0
  positives (selection of N^, sort, backward); rows say so. Its memory is that of the K run.

Inputs: logits ~ N(0, 1) float32 of shape (images, anchors, classes) requiring grad; the
``--positives`` positives are the total of the batch, placed at distinct random anchors (one
class each); ~1% of the other anchors are ignored (all their classes). Each loss gets its
targets pre-built in its own format (binary one-hot for focal, per-anchor labels for OHEM,
ternary per anchor-class for the ranking losses); building them is not timed.

Time: wall-clock of forward + backward over ``--repeats`` rounds after ``--warmup`` rounds
(CUDA synchronised): the median and the [min, max] of the rounds. Each round runs every loss
once, in a new random order, so that all losses see the same load of a shared machine; the ratios
to focal loss are also given per round (median and [min, max]). The report starts with the
torch thread count and the machine's load average (``os.getloadavg()``) at start and at the
end: on a shared machine the ratios move with the load. Memory: extra peak memory of one forward +
backward above what is allocated before it (logits, targets; ``logits.grad`` cleared), measured in a second pass:
on CUDA ``torch.cuda.max_memory_allocated``; on CPU, in a fresh process per loss and
configuration, the peak resident set size (``VmHWM``, reset through ``/proc/self/clear_refs``) with glibc's mmap threshold lowered to
64 KiB so that every tensor buffer is mapped at allocation and unmapped when freed. The gradient
buffer of the logits (1x logits) is part of every loss's extra memory.

For ``ap_loss`` the forward alone (``forward_time_s``) and the call under ``torch.no_grad()``
(``no_grad_time_s``, the loss value only) are timed too.

Host synchronisations (CUDA only): every loss's forward + backward is run once more under
``torch.cuda.set_sync_debug_mode("warn")`` and the warnings it raises are counted
(``host_syncs``): each one stalls the launch queue. On the CPU they are not measured
(``null``; a CPU has no queue to stall).

Outputs in ``--output-dir`` (default ``output/benchmark``): ``benchmark.json``, ``benchmark.txt``
and ``benchmark.png`` (time and extra peak memory vs batch size per loss: Fig. 11 and 9), plus the table on stdout.
``--device cuda`` needs a GPU (a clear message and exit status 2 otherwise).
"""
import argparse
import ctypes
import importlib.util
import json
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

LOSSES = ("focal", "focal_plain", "ce_ohem", "ap_loss", "ap_loss_float32_targets",
          "ap_loss_int64_targets", "auc_loss", "ap_loss_grid", "ap_loss_sync_free",
          "ap_positive_loop")
REFERENCE_LOSSES = ("ap_loss_reference", "auc_loss_reference")
LABELS = {
    "focal": "Focal loss, masked (RetinaNet)",
    "focal_plain": "Focal loss, all entries",
    "ce_ohem": "CE + OHEM 3:1",
    "ap_loss": "AP-loss, int8 targets",
    "ap_loss_float32_targets": "AP-loss, float32 targets",
    "ap_loss_int64_targets": "AP-loss, int64 targets",
    "auc_loss": "AUC-loss, int8 targets",
    "ap_loss_grid": "AP-loss, grid kernel",
    "ap_loss_sync_free": "AP-loss, sync-free kernel",
    "ap_positive_loop": "AP-loss, loop on positives",
    "ap_loss_reference": "AP-loss, reference file",
    "auc_loss_reference": "AUC-loss, reference file",
}
ANCHOR_NAMES = {
    49104: "9 anchors/location at 512x512 (Detectron2 default; issue 15 target)",
    32736: "6 anchors/location at 512x512 (the paper's RetinaNet)",
}


def anchor_name(anchors):
    return ANCHOR_NAMES.get(anchors, "custom")
CPU_MEMORY_METHOD = (
    "peak resident set size (VmHWM reset via /proc/self/clear_refs) minus resident size before "
    "the run, each loss and configuration in a fresh process; glibc M_MMAP_THRESHOLD lowered to "
    "64 KiB so tensor buffers are unmapped when freed"
)
CUDA_MEMORY_METHOD = "torch.cuda.max_memory_allocated() minus torch.cuda.memory_allocated() before"
LOOP_EXTRAPOLATION = ("fixed + (time_K - fixed) * |P| / K, K = loop_positives, fixed = time "
                      "of the same call with 0 positives processed")
QUICK = dict(images=[1, 2], anchors=[600], classes=[4], positives=[12, 30], repeats=2, warmup=1,
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
        "ternary_f32": ternary.float().to(device),  # the same labels as float32
        "ternary_i64": ternary.long().to(device),  # and as int64
        "num_pos": positives,
    }


def load_reference_kernel(path):
    """The module of another version of ``ranking.py`` (``--reference-kernel``), imported as
    ``ap_loss_d2.losses._reference_ranking`` so that its relative imports resolve."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"--reference-kernel {path}: no such file (e.g. git show "
                         "main:ap_loss_d2/losses/ranking.py > /tmp/ranking_main.py)")
    spec = importlib.util.spec_from_file_location("ap_loss_d2.losses._reference_ranking", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_loss_fns(inp, loop_positives, reference=None):
    from torchvision.ops import sigmoid_focal_loss

    from ap_loss_d2.losses import ap_loss, auc_loss
    from ap_loss_d2.losses.ohem import ce_ohem_loss
    from tools.positive_loop import ap_loss_positive_loop

    x, num_pos = inp["logits"], inp["num_pos"]
    norm = max(num_pos, 1)
    loop_k = min(loop_positives, num_pos) if loop_positives > 0 else num_pos

    def focal():
        v = inp["valid"]
        return sigmoid_focal_loss(x[v], inp["onehot"][v], alpha=0.25, gamma=2.0,
                                  reduction="sum") / norm

    def focal_plain():
        return sigmoid_focal_loss(x, inp["onehot"], alpha=0.25, gamma=2.0, reduction="sum") / norm

    def ap_int8(kernel="auto"):
        return ap_loss(x, inp["ternary"], delta=1.0, kernel=kernel)

    fns = {
        "focal": focal,
        "focal_plain": focal_plain,
        "ap_loss_grid": lambda: ap_int8("grid"),
        "ap_loss_sync_free": lambda: ap_int8("sync_free"),
        "ce_ohem": lambda: ce_ohem_loss(x, inp["labels"], neg_pos_ratio=3.0),
        "ap_loss": ap_int8,
        "ap_loss_float32_targets": lambda: ap_loss(x, inp["ternary_f32"], delta=1.0),
        "ap_loss_int64_targets": lambda: ap_loss(x, inp["ternary_i64"], delta=1.0),
        "auc_loss": lambda: auc_loss(x, inp["ternary"], delta=1.0),
        "ap_positive_loop": lambda: ap_loss_positive_loop(x, inp["ternary"], delta=1.0,
                                                          max_positives=loop_k),
        "ap_positive_loop_fixed": lambda: ap_loss_positive_loop(x, inp["ternary"], delta=1.0,
                                                                max_positives=0),
    }
    if reference is not None:
        fns["ap_loss_reference"] = lambda: reference.ap_loss(x, inp["ternary"], delta=1.0)
        fns["auc_loss_reference"] = lambda: reference.auc_loss(x, inp["ternary"], delta=1.0)
    return fns, loop_k


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


def count_cuda_syncs(fn, x):
    """Host synchronisations of one forward + backward on CUDA: the warnings of
    ``torch.cuda.set_sync_debug_mode("warn")`` (each synchronising CUDA call raises one)."""
    x.grad = None
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn().backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    x.grad = None
    return sum("synchroniz" in str(w.message) for w in caught)


def time_interleaved(timers, x, device, repeats, warmup):
    """{key: [seconds per round]} for ``timers`` {key: (fn, mode)}, mode ``"fb"`` (forward +
    backward), ``"fwd"`` (forward alone, autograd recording) or ``"no_grad"`` (forward under
    ``torch.no_grad()``). Every round runs every call once, in a new random order (seeded), so
    that the losses share the machine's load changes (side by side in one process) and no call
    always follows the same one (the state a call leaves, e.g. freed memory, varies)."""
    def once(fn, mode):
        x.grad = None
        _sync(device)
        t0 = time.perf_counter()
        if mode == "fb":
            fn().backward()
        elif mode == "no_grad":
            with torch.no_grad():
                fn()
        else:
            fn()
        _sync(device)
        return time.perf_counter() - t0

    keys = list(timers)
    out = {k: [] for k in keys}
    rng = random.Random(0)
    for r in range(warmup + repeats):
        order = rng.sample(keys, len(keys))
        for k in order:
            t = once(*timers[k])
            if r >= warmup:
                out[k].append(t)
    x.grad = None
    return out


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
    reference = (load_reference_kernel(probe["reference_kernel"])
                 if probe.get("reference_kernel") else None)
    fns, _ = make_loss_fns(inp, probe["loop_positives"], reference)
    cpu_mem = CpuPeakMemory() if probe["device"] == "cpu" else None
    return measure_extra_memory(fns[probe["loss"]], inp["logits"], probe["device"], cpu_mem)


def _memory_in_subprocess(probe):
    out = subprocess.run(
        [sys.executable, "-m", "tools.benchmark", "--memory-probe", json.dumps(probe)],
        cwd=Path(__file__).resolve().parents[1], check=True, stdout=subprocess.PIPE, text=True,
    ).stdout
    value = json.loads(out.strip().splitlines()[-1])["extra_bytes"]
    return None if value is None else int(value)


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------
def _spread(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def machine_state():
    """Threads torch uses, CPUs, and the 1/5/15-minute load averages now."""
    return {"torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "loadavg": [round(v, 2) for v in os.getloadavg()]}


def run(args):
    devices = resolve_devices(args.device)
    reference = load_reference_kernel(args.reference_kernel) if args.reference_kernel else None
    names = [n for n in LOSSES + REFERENCE_LOSSES if n in args.losses]
    if reference is not None:
        names += [n for n in REFERENCE_LOSSES if n not in names]
    configs = [(d, a, k, n, p) for d in devices for a in args.anchors for k in args.classes
               for n in args.images for p in args.positives]
    results = []
    start_state = machine_state()
    log(f"[benchmark] {len(configs)} configurations x {len(names)} losses; anchors "
        f"{args.anchors}, classes {args.classes}, repeats {args.repeats} (+{args.warmup} warm-up)"
        f"; torch threads {start_state['torch_threads']} of {start_state['cpu_count']} CPUs, "
        f"load average {start_state['loadavg']} at start")

    # Pass 1: time (before the CPU memory probe changes the allocator's mmap threshold).
    for ci, (device, anchors, classes, images, positives) in enumerate(configs):
        inp = make_inputs(images, anchors, classes, positives, device,
                          args.seed + 1000 * images + positives)
        fns, loop_k = make_loss_fns(inp, args.loop_positives, reference)
        x = inp["logits"]
        stats = {}
        from ap_loss_d2.losses import ap_loss

        ap_loss(x.detach(), inp["ternary"], delta=1.0, stats=stats)
        row = {
            "device": device, "images": images, "anchors": anchors,
            "anchors_are": anchor_name(anchors), "classes": classes, "positives": inp["num_pos"],
            "numel": x.numel(), "logits_mb": x.numel() * x.element_size() / 2**20,
            "num_neg_nontrivial": int(stats["num_neg_nontrivial"]),
            "losses": {},
        }
        timers = {("fb", n): (fns[n], "fb") for n in names}
        if "ap_loss" in names:  # what a call without backward costs
            timers[("fwd", "ap_loss")] = (fns["ap_loss"], "fwd")
            timers[("no_grad", "ap_loss")] = (fns["ap_loss"], "no_grad")
        loop_extrapolated = "ap_positive_loop" in names and loop_k < inp["num_pos"]
        if loop_extrapolated:
            timers[("fb", "ap_positive_loop_fixed")] = (fns["ap_positive_loop_fixed"], "fb")
        log(f"[benchmark] ({ci + 1}/{len(configs)}) {device} anchors={anchors} classes={classes} "
            f"images={images} |P|={inp['num_pos']}: timing {len(timers)} calls interleaved, "
            f"{args.repeats} rounds ...")
        times = time_interleaved(timers, x, device, args.repeats, args.warmup)
        for name in names:
            rounds = times[("fb", name)]
            spread = _spread(rounds)
            entry = {"time_s": spread["median"], "min_s": spread["min"], "max_s": spread["max"],
                     "times_s": rounds, "extrapolated": False, "host_syncs": None}
            if device.startswith("cuda") and name != "ap_positive_loop":  # (syncs per positive)
                entry["host_syncs"] = count_cuda_syncs(fns[name], x)
            if name == "ap_loss":
                entry["forward_time_s"] = statistics.median(times[("fwd", name)])
                entry["no_grad_time_s"] = statistics.median(times[("no_grad", name)])
            if name == "ap_positive_loop" and loop_extrapolated:
                # time(k) = fixed + k * per_positive: the fixed part (selection of N^, sort,
                # backward) is timed with 0 positives processed, the rest scaled by |P| / K.
                fixed = statistics.median(times[("fb", "ap_positive_loop_fixed")])
                per_pos = max(spread["median"] - fixed, 0.0) / max(loop_k, 1)
                entry.update(time_s=fixed + per_pos * inp["num_pos"], timed_s=spread["median"],
                             min_s=None, max_s=None, timed_positives=loop_k, fixed_s=fixed,
                             per_positive_s=per_pos, extrapolated=True,
                             note=f"(extrapolated from {loop_k} of {inp['num_pos']} positives)")
            log(f"[benchmark]     {name}: {entry['time_s'] * 1e3:10.2f} ms "
                f"{entry.get('note', '')}")
            row["losses"][name] = entry
        for base in ("focal", "focal_plain"):
            base_t = row["losses"][base]["time_s"] if base in row["losses"] else None
            for name, entry in row["losses"].items():
                entry[f"ratio_to_{base}"] = entry["time_s"] / base_t if base_t else None
                per_round = (None if entry["extrapolated"] or base_t is None else
                             _spread([a / b for a, b in zip(entry["times_s"],
                                                            times[("fb", base)])]))
                entry[f"ratio_to_{base}_rounds"] = per_round
        # per-round ratios: this version against the reference file's (the grid kernel
        # against the reference's CPU default), the sync-free kernel against the grid one
        for name, twin, key in (("ap_loss", "ap_loss_reference", "reference"),
                                ("auc_loss", "auc_loss_reference", "reference"),
                                ("ap_loss_grid", "ap_loss_reference", "reference"),
                                ("ap_loss_sync_free", "ap_loss_grid", "grid")):
            if name in row["losses"] and twin in row["losses"]:
                row["losses"][name][f"ratio_to_{key}_rounds"] = _spread(
                    [a / b for a, b in zip(times[("fb", name)], times[("fb", twin)])])
        results.append(row)
        del inp, fns, x
    end_state = machine_state()
    log(f"[benchmark] load average {end_state['loadavg']} at the end of the timing pass")

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
                probe = dict(loss=name, device=device, images=row["images"],
                             anchors=row["anchors"], classes=row["classes"],
                             positives=row["positives"], seed=seed,
                             loop_positives=args.loop_positives,
                             reference_kernel=args.reference_kernel)
                if device == "cpu":
                    extra = _memory_in_subprocess(probe) if cpu_mem.ok else None
                else:
                    extra = memory_probe(probe)
                entry["extra_peak_mb"] = None if extra is None else extra / 2**20
                entry["extra_peak_x_logits"] = None if extra is None else extra / (row["numel"] * 4)

    report = {
        "config": {
            "images": args.images, "anchors": args.anchors,
            "anchors_are": {str(a): anchor_name(a) for a in args.anchors},
            "classes": args.classes,
            "positives": args.positives, "positives_are": "total per batch",
            "repeats": args.repeats, "warmup": args.warmup, "devices": devices,
            "loop_positives": args.loop_positives, "delta": 1.0, "seed": args.seed,
            "torch": torch.__version__, "torch_threads": start_state["torch_threads"],
            "cpu_count": start_state["cpu_count"], "loadavg_start": start_state["loadavg"],
            "loadavg_end": end_state["loadavg"],
            "cpu": platform.processor() or platform.machine(),
            "cuda_device": (torch.cuda.get_device_name(0) if "cuda" in devices else None),
            "time": "wall-clock of forward+backward (s): median (time_s) and [min_s, max_s] "
                    "of interleaved rounds",
            "host_syncs": "CUDA: warnings of torch.cuda.set_sync_debug_mode('warn') in one "
                          "forward+backward; CPU: not measured (null)",
            "reference_kernel": args.reference_kernel,
            "positive_loop_extrapolation": LOOP_EXTRAPOLATION,
        },
        "memory_method": {
            "cpu": (None if args.no_memory else
                    (CPU_MEMORY_METHOD if cpu_mem is not None and cpu_mem.ok else
                     f"unavailable ({cpu_mem.why})" if cpu_mem is not None else None)),
            "cuda": CUDA_MEMORY_METHOD if ("cuda" in devices and not args.no_memory) else None,
        },
        "losses": names,
        "labels": {n: LABELS[n] for n in names},
        "results": results,
    }
    return report


def resolve_devices(device):
    cuda = torch.cuda.is_available()
    if device == "all":
        return ["cpu"] + (["cuda"] if cuda else [])
    if device == "cuda" and not cuda:
        log("[benchmark] --device cuda: CUDA is not available on this machine (torch "
            f"{torch.__version__}, torch.cuda.is_available() is False); run on a GPU machine "
            "or use --device cpu")
        raise SystemExit(2)
    return [device]


def _ratio_cell(e, base):
    r = e.get(f"ratio_to_{base}_rounds")
    if r:
        return f"{r['median']:.2f} [{r['min']:.2f}, {r['max']:.2f}]"
    ratio = e.get(f"ratio_to_{base}")
    return f"{ratio:.2f}" if ratio is not None else "-"


def format_table(report):
    cfg = report["config"]
    lines = [f"torch {cfg['torch']}, {cfg['torch_threads']} thread(s) of {cfg['cpu_count']} "
             f"CPUs; load average (1/5/15 min) {cfg['loadavg_start']} at start, "
             f"{cfg['loadavg_end']} after timing" + (f"; GPU {cfg['cuda_device']}"
                                                     if cfg.get("cuda_device") else "")]
    hdr = (f"{'device':6} {'anchors':>7} {'K':>3} {'imgs':>4} {'|P|':>6} {'|N^|':>9}  "
           f"{'loss':31} {'median ms':>10} {'[min, max] ms':>17} {'x focal (masked)':>22} "
           f"{'x focal (all)':>22} {'syncs':>5} {'extra MB':>9} {'x logits':>8}")
    lines += [hdr, "-" * len(hdr)]
    for row in report["results"]:
        for name, e in row["losses"].items():
            mb = e.get("extra_peak_mb")
            xl = e.get("extra_peak_x_logits")
            syncs = e.get("host_syncs")
            span = (f"[{e['min_s'] * 1e3:.2f}, {e['max_s'] * 1e3:.2f}]"
                    if e.get("min_s") is not None else "-")
            lines.append(
                f"{row['device']:6} {row['anchors']:>7} {row['classes']:>3} {row['images']:>4} "
                f"{row['positives']:>6} {row['num_neg_nontrivial']:>9}  {LABELS[name]:31} "
                f"{e['time_s'] * 1e3:>10.2f} {span:>17} {_ratio_cell(e, 'focal'):>22} "
                f"{_ratio_cell(e, 'focal_plain'):>22} "
                f"{(str(syncs) if syncs is not None else '-'):>5} "
                f"{(f'{mb:.1f}' if mb is not None else '-'):>9} "
                f"{(f'{xl:.2f}' if xl is not None else '-'):>8}"
                + (f"  {e['note']}" if e.get("note") else ""))
    mm = report["memory_method"]
    lines.append("")
    lines.append("Synthetic logits (N(0, 1), random positives: the early-training regime), not "
                 "a training run; for costs measured during training see --breakdown and "
                 "studies.cost --run-dir.")
    lines.append("time: wall-clock of forward+backward, median and [min, max] of interleaved "
                 "rounds; x focal: median of the per-round ratios [min, max] to focal loss masked "
                 "as in RetinaNet, and over all entries; syncs: host synchronisations per call "
                 "(CUDA sync debug mode; '-': not measured on the CPU); extra memory: peak above "
                 "the inputs during one forward+backward (includes the 1x logits gradient).")
    for a, name in report["config"].get("anchors_are", {}).items():
        lines.append(f"anchors {a}: {name}")
    for row in report["results"]:
        e = row["losses"].get("ap_loss", {})
        if "no_grad_time_s" in e:
            lines.append(
                f"AP-loss without backward ({row['device']}, {row['anchors']} anchors, "
                f"{row['images']} images, |P| {row['positives']}): forward "
                f"{e['forward_time_s'] * 1e3:.1f} ms, under torch.no_grad "
                f"{e['no_grad_time_s'] * 1e3:.1f} ms, forward+backward {e['time_s'] * 1e3:.1f} ms")
    for row in report["results"]:
        for key, what in (("reference", "reference file's"), ("grid", "grid kernel's")):
            versus = [f"{LABELS[n]} {r['median']:.2f} [{r['min']:.2f}, {r['max']:.2f}]"
                      for n, e in row["losses"].items() if (r := e.get(f"ratio_to_{key}_rounds"))]
            if versus:
                lines.append(f"time / {what}, per round ({row['device']}, {row['anchors']} "
                             f"anchors, {row['classes']} classes, {row['images']} images, |P| "
                             f"{row['positives']}): " + "; ".join(versus))
    for dev in ("cpu", "cuda"):
        if mm.get(dev):
            lines.append(f"memory ({dev}): {mm[dev]}")
    return "\n".join(lines)


def plot(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["device"], r["anchors"], r["classes"], r["positives"])
                     for r in report["results"]})
    fig, axes = plt.subplots(2, len(groups), figsize=(max(6.5 * len(groups), 7.0), 8.8), squeeze=False)
    for col, (device, anchors, classes, positives) in enumerate(groups):
        rows = sorted((r for r in report["results"] if r["device"] == device
                       and r["anchors"] == anchors and r["classes"] == classes
                       and r["positives"] == positives), key=lambda r: r["images"])
        for ax, key, ylabel in ((axes[0][col], "time_s", "forward + backward time (s) (Fig. 11)"),
                                (axes[1][col], "extra_peak_mb", "extra peak memory (MB) (Fig. 9)")):
            for name in report["losses"]:
                pts = [(r["images"], r["losses"][name].get(key)) for r in rows if name in r["losses"]]
                pts = [(x, y) for x, y in pts if y is not None]
                extrap = key == "time_s" and any(r["losses"][name].get("extrapolated") for r in rows
                                                 if name in r["losses"])
                if pts:
                    ax.plot(*zip(*pts), marker="o", linestyle="--" if extrap else "-",
                            label=LABELS[name] + (" (extrapolated)" if extrap else ""))
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks([r["images"] for r in rows])
            ax.set_xticklabels([str(r["images"]) for r in rows])
            ax.set_xlabel("batch size (images)")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{device}, {anchors} anchors/img, {classes} classes, {positives} positives "
                         "/ batch", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            if ax.get_lines():
                ax.legend(fontsize=8)
    cfg = report["config"]
    fig.suptitle(f"Time and memory cost of classification losses, forward + backward\n"
                 f"({cfg['torch_threads']} thread(s), load average {cfg['loadavg_start'][0]} at "
                 "start; anchors per image: "
                 + "; ".join(f"{a} = {n}" for a, n in cfg.get("anchors_are", {}).items())
                 + f"; median of {cfg['repeats']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Training-iteration breakdown (Fig. 10)
# ---------------------------------------------------------------------------------------------
PAPER_CONFIG = "configs/VOC-Detection/retinanet_R_50_FPN_160e_voc0712_ap.yaml"
BREAKDOWN_PARTS = (
    ("net_forward", "network forward (to the loss)"),
    ("loss_forward", "classification loss forward"),
    ("other_forward", "rest of the forward (box loss)"),
    ("bwd_to_loss", "backward before the loss"),
    ("loss_backward", "classification loss backward"),
    ("net_backward", "network backward"),
)


def _breakdown_batch(images, size, num_classes, device, seed):
    from detectron2.structures import Boxes, Instances

    g = torch.Generator().manual_seed(seed)
    batch = []
    for _ in range(images):
        n = 3
        xy = torch.rand(n, 2, generator=g) * size * 0.6
        wh = 0.1 * size + torch.rand(n, 2, generator=g) * size * 0.3
        inst = Instances((size, size))
        inst.gt_boxes = Boxes(torch.cat([xy, (xy + wh).clamp(max=size - 1)], dim=1))
        inst.gt_classes = torch.randint(0, num_classes, (n,), generator=g)
        batch.append({"image": (torch.rand(3, size, size, generator=g) * 255).to(device),
                      "height": size, "width": size, "instances": inst.to(device)})
    return batch


def breakdown(args):
    """Time of the classification loss as a share of one RetinaNet R50-FPN training iteration
    (the paper's Fig. 10): the model of ``--config-file`` (default :data:`PAPER_CONFIG`, the
    paper's VOC AP-loss config, ``MODEL.WEIGHTS ""``: random init, nothing downloaded; the loss
    ``--cls-loss`` when given) on random ``--size`` x ``--size`` images with 3 random boxes
    each. Each iteration is cut into the parts of :data:`BREAKDOWN_PARTS` by synchronised clock
    reads in forward hooks of the model's classification-loss module and in gradient hooks on
    its output and its logits. Writes ``breakdown.{json,txt,png}``."""
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    from ap_loss_d2.engine import get_ap_loss_cfg

    if args.device == "cuda" and not torch.cuda.is_available():
        resolve_devices("cuda")  # the clean message and exit status
    device = "cuda" if args.device in ("cuda", "all") and torch.cuda.is_available() else "cpu"
    images = args.images[0] if args.images else (8 if device == "cuda" else 2)
    iters = args.iters or (5 if device == "cuda" else 2)
    config = Path(args.config_file or Path(__file__).resolve().parents[1] / PAPER_CONFIG)
    cfg = get_ap_loss_cfg()
    cfg.merge_from_file(str(config))
    # the batch's images form one ranking set (8 on CUDA: the paper's set)
    cfg.merge_from_list(
        ["MODEL.WEIGHTS", "", "MODEL.DEVICE", device, "MODEL.CLS_LOSS.IMAGES_PER_RANKING_SET", images]
        + (["MODEL.CLS_LOSS.NAME", args.cls_loss] if args.cls_loss else [])
    )
    torch.manual_seed(args.seed)
    model = build_model(cfg)
    model.train()
    loss_name = cfg.MODEL.CLS_LOSS.NAME
    num_classes = cfg.MODEL.RETINANET.NUM_CLASSES
    batch = _breakdown_batch(images, args.size, num_classes, device, args.seed)
    log(f"[breakdown] {type(model).__name__} ({config.name}, loss {loss_name!r}) on {device}: "
        f"{images} images {args.size}x{args.size}, {iters} timed iterations (+{args.warmup})")

    clock = {}

    def mark(key):
        _sync(device)
        clock[key] = time.perf_counter()

    def before_loss(module, args, kwargs):
        logits, labels = args[0], args[1]
        mark("loss_start")
        clock["numel"] = logits.numel()
        clock["positives"] = int(((labels >= 0) & (labels < logits.shape[-1])).sum())
        if logits.requires_grad:
            logits.register_hook(lambda g: (mark("loss_bwd_end"), None)[1])

    def after_loss(module, args, kwargs, out):
        mark("loss_end")
        if out.requires_grad:
            out.register_hook(lambda g: (mark("loss_bwd_start"), None)[1])

    rows = []
    # the model's loss module, timed by module and tensor hooks (any registered loss)
    handles = [
        model.cls_loss.register_forward_pre_hook(before_loss, with_kwargs=True),
        model.cls_loss.register_forward_hook(after_loss, with_kwargs=True),
    ]
    try:
        with EventStorage():
            for it in range(args.warmup + iters):
                clock.clear()
                model.zero_grad(set_to_none=True)
                mark("start")
                losses = model(batch)
                total = sum(losses.values())
                mark("fwd_end")
                total.backward()
                mark("end")
                if it < args.warmup:
                    continue
                c = clock
                rows.append({
                    "net_forward": c["loss_start"] - c["start"],
                    "loss_forward": c["loss_end"] - c["loss_start"],
                    "other_forward": c["fwd_end"] - c["loss_end"],
                    "bwd_to_loss": c["loss_bwd_start"] - c["fwd_end"],
                    "loss_backward": c["loss_bwd_end"] - c["loss_bwd_start"],
                    "net_backward": c["end"] - c["loss_bwd_end"],
                    "iteration": c["end"] - c["start"],
                    "numel": c["numel"], "positives": c["positives"],
                })
    finally:
        for handle in handles:
            handle.remove()

    med = {k: statistics.median(r[k] for r in rows) for k, _ in BREAKDOWN_PARTS}
    med["iteration"] = statistics.median(r["iteration"] for r in rows)
    loss_time = med["loss_forward"] + med["loss_backward"]
    report = {
        "config": {"config_file": str(config), "loss": loss_name, "device": device,
                   "cuda_device": torch.cuda.get_device_name(0) if device == "cuda" else None,
                   "images": images, "size": args.size, "iters": iters, "warmup": args.warmup,
                   **machine_state(), "torch": torch.__version__,
                   "time": "median over iterations (s), device synchronised at every mark"},
        "ranked_entries": rows[0]["numel"], "positives": rows[0]["positives"],
        "median_s": med, "loss_share": loss_time / med["iteration"], "iterations": rows,
    }
    lines = [f"RetinaNet training iteration on {device} ({images} x {args.size}x{args.size}, "
             f"{report['ranked_entries']:,} ranked entries, {report['positives']} positives, "
             f"median of {iters})"]
    for key, label in BREAKDOWN_PARTS:
        lines.append(f"  {label:34} {med[key] * 1e3:10.1f} ms  {med[key] / med['iteration']:6.1%}")
    lines.append(f"  {'iteration':34} {med['iteration'] * 1e3:10.1f} ms")
    lines.append(f"classification loss ({loss_name}) forward+backward: {loss_time * 1e3:.1f} ms "
                 f"= {report['loss_share']:.1%} of the iteration (paper Fig. 10: about 1/3)")
    table = "\n".join(lines)
    print(table, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "breakdown.json").write_text(json.dumps(report, indent=2))
    (out / "breakdown.txt").write_text(table + "\n")
    _plot_breakdown(report, out / "breakdown.png")
    log(f"[breakdown] wrote {out / 'breakdown.json'}, {out / 'breakdown.txt'}, "
        f"{out / 'breakdown.png'}")
    return report


def _plot_breakdown(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    med = report["median_s"]
    fig, ax = plt.subplots(figsize=(8, 2.6))
    left = 0.0
    for key, label in BREAKDOWN_PARTS:
        w = med[key] * 1e3
        ax.barh([0], [w], left=left, label=label,
                hatch="//" if key.startswith("loss") else None)
        left += w
    ax.set_yticks([])
    ax.set_xlabel("time (ms)")
    cfg = report["config"]
    ax.set_title(f"RetinaNet R50-FPN training iteration, {cfg['device']}, {cfg['images']} x "
                 f"{cfg['size']}px: loss share {report['loss_share']:.1%}", fontsize=9)
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.35))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _int_at_least(low):
    """argparse type: an int >= ``low`` (a clear usage error otherwise)."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is too small: give an integer >= {low}")
        return value
    parse.__name__ = f"integer >= {low}"
    return parse


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m tools.benchmark", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    positive, natural = _int_at_least(1), _int_at_least(0)
    p.add_argument("--images", type=positive, nargs="+", default=None,
                   help="batch sizes (images per batch); default 1 2 4 8 (--breakdown: 8 on "
                        "CUDA, 2 on CPU)")
    p.add_argument("--anchors", type=positive, nargs="+", default=[32736, 49104],
                   help="anchors per image: 32736 = 6 per location at 512x512 (the paper's "
                        "RetinaNet), 49104 = 9 per location (issue 15's target)")
    p.add_argument("--classes", type=positive, nargs="+", default=[20],
                   help="foreground classes (several: one configuration each)")
    p.add_argument("--positives", type=positive, nargs="+", default=[500, 2000],
                   help="positives per batch (total over its images)")
    p.add_argument("--repeats", type=positive, default=5,
                   help="timed rounds (median and [min, max] reported)")
    p.add_argument("--warmup", type=natural, default=1, help="untimed rounds first")
    p.add_argument("--device", choices=["cpu", "cuda", "all"], default="all",
                   help="'all': CPU, and CUDA when available (--breakdown: CUDA when available)")
    p.add_argument("--output-dir", "--out", dest="out", default="output/benchmark",
                   help="output directory")
    p.add_argument("--breakdown", action="store_true",
                   help="time of the classification loss as a share of a RetinaNet R50-FPN "
                        "training iteration (the paper's Fig. 10) instead of the loss table")
    p.add_argument("--config-file", default=None,
                   help="--breakdown: the model config (default: the paper's VOC AP-loss "
                        "config, configs/VOC-Detection/retinanet_R_50_FPN_160e_voc0712_ap.yaml)")
    p.add_argument("--cls-loss", default=None,
                   help="--breakdown: MODEL.CLS_LOSS.NAME to train with instead of the "
                        "config's (e.g. focal, for the focal-loss share)")
    p.add_argument("--size", type=_int_at_least(32), default=512,
                   help="--breakdown: image side (pixels)")
    p.add_argument("--iters", type=positive, default=None,
                   help="--breakdown: timed iterations (default 5 on CUDA, 2 on CPU)")
    p.add_argument("--loop-positives", type=natural, default=64,
                   help="time the positive loop on this many positives and extrapolate "
                        "linearly to |P| (0: run all positives)")
    p.add_argument("--losses", nargs="+", choices=LOSSES, default=list(LOSSES))
    p.add_argument("--reference-kernel", default=None, metavar="FILE",
                   help="another version of ap_loss_d2/losses/ranking.py whose ap_loss and "
                        "auc_loss are timed side by side (rows ap_loss_reference, "
                        "auc_loss_reference)")
    p.add_argument("--threads", type=positive, default=None, help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-memory", action="store_true", help="skip the memory pass")
    p.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)  # internal: one probe
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes (a smoke test): " + ", ".join(f"{k}={v}"
                                                                for k, v in QUICK.items()))
    args = p.parse_args(argv)
    if args.images is None and not args.breakdown:
        args.images = [1, 2, 4, 8]
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    for base in ("focal_plain", "focal"):  # ratios are relative to both
        if base not in args.losses:
            args.losses = [base] + list(args.losses)
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_probe:
        print(json.dumps({"extra_bytes": memory_probe(json.loads(args.memory_probe))}))
        return None
    if args.breakdown:
        return breakdown(args)
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
