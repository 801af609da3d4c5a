"""Collectives for ranking the entries of all processes together (exactly).

The ranking losses need, besides each process's own entries, only:

1. every positive score of the global batch (``all_gather``, padded to the largest count):
   ``8 * max_r |P_r| * world_size`` bytes received plus one int64 per process;
2. the per-positive sums ``b_i = sum_{j in N^} f(s_j - s_i)`` over every process's negatives,
   which are additive across processes (``all_reduce`` of ``8 * |P|`` bytes, float64);
3. two counts (non-trivial negatives, and all negatives for AUC): ``all_reduce`` of int64s.

Negatives never travel. Everything derived from these (precision, interpolation, the
per-positive weights) is computed identically on every rank, so the loss value is identical
on every rank and each rank's gradient equals its slice of the gradient of one process ranking
the concatenated batch.

Bytes per process and iteration: ``8`` (its positive count) + ``8 * max_r |P_r|`` (its padded
positive scores) to the all-gathers, ``8 * |P|`` (the b_i) + ``8``-``16`` (counts) to the
all-reduces; a ring all-reduce puts about ``2 (W - 1) / W`` times its buffer on the wire. E.g.
RetinaNet at 8 images x 49,104 anchors x 20 classes on W = 8 processes with |P| = 2,000 (250
per process): 8 + 2,000 + 16,000 + 16 = ~18 KB of buffers, ~30 KB on the wire, against ~31 MB
for gathering the logits.
With ``group=None`` or a single process every function here is a no-op.

Ranking sets (``images_per_ranking_set``): :func:`ranking_set_layout` maps a set size onto the
images per process and the processes, :func:`ranking_set_group` creates (once, identically on
every rank) the groups of consecutive ranks that rank together, and :func:`scale_gradient`
makes DistributedDataParallel's average over processes the mean over ranking sets.
"""
import torch


def _world(group):
    if group is None or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return 1
    return torch.distributed.get_world_size(group)


def resolve_group(rank_across_processes: bool):
    """The group to pass as ``process_group``: WORLD when asked and distributed, else None."""
    if rank_across_processes and torch.distributed.is_available() and torch.distributed.is_initialized():
        if torch.distributed.get_world_size() > 1:
            return torch.distributed.group.WORLD
    return None


def gather_positive_scores(p_local, group):
    """(all positive scores of the group in rank order, offset of this rank's scores)."""
    world = _world(group)
    if world == 1:
        return p_local, 0
    counts = torch.zeros(world, dtype=torch.int64, device=p_local.device)
    mine = torch.tensor([p_local.numel()], dtype=torch.int64, device=p_local.device)
    torch.distributed.all_gather_into_tensor(counts, mine, group=group)
    counts = counts.tolist()
    rank = torch.distributed.get_rank(group)
    biggest = max(counts)
    if biggest == 0:
        return p_local, 0
    padded = torch.zeros(biggest, dtype=p_local.dtype, device=p_local.device)
    padded[: p_local.numel()] = p_local
    everything = torch.empty(world * biggest, dtype=p_local.dtype, device=p_local.device)
    torch.distributed.all_gather_into_tensor(everything, padded, group=group)
    parts = [everything[r * biggest : r * biggest + c] for r, c in enumerate(counts)]
    return torch.cat(parts), sum(counts[:rank])


def all_reduce_sum(x, group):
    if _world(group) == 1:
        return x
    x = x.clone()
    torch.distributed.all_reduce(x, group=group)
    return x


def all_reduce_count(n: int, group, device) -> int:
    if _world(group) == 1:
        return int(n)
    t = torch.tensor([n], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(t, group=group)
    return int(t.item())


# --- Ranking sets: which images are ranked together -------------------------------------------


def ranking_set_layout(images_per_set: int, images_per_process: int, world_size: int):
    """How a ranking set of ``images_per_set`` images maps onto processes.

    Args:
        images_per_set: images ranked together; 0 = each process ranks its own images.
        images_per_process: images each process holds per iteration.
        world_size: number of processes.

    Returns:
        ``(sets_per_process, processes_per_set)``: a process splits its images into
        ``sets_per_process`` consecutive sets ranked separately, or ``processes_per_set``
        consecutive ranks rank their images together (at most one of the two exceeds 1).

    Raises:
        ValueError saying why, with the valid set sizes, when the set does not divide evenly.
    """
    for name, value in (("images per process", images_per_process), ("processes", world_size)):
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if int(images_per_set) != images_per_set or images_per_set < 0:
        raise ValueError(f"the ranking set size must be an integer >= 0, got {images_per_set!r}")
    n, s, w = int(images_per_process), int(images_per_set), int(world_size)
    if s == 0:
        return 1, 1
    if n % s == 0:
        return n // s, 1
    if s % n == 0 and w % (s // n) == 0:
        return 1, s // n
    valid = sorted({d for d in range(1, n + 1) if n % d == 0} | {n * g for g in range(1, w + 1) if w % g == 0})
    if s % n == 0:
        why = (
            f"{s} images need {s // n} processes per set, and the {w} processes do not split "
            f"into whole sets of {s // n}"
        )
    else:
        why = (
            f"{s} images is neither a divisor of the {n} images of a process (several sets per "
            f"process) nor a multiple of them (several processes per set)"
        )
    choices = ", ".join(str(v) for v in [0] + valid)
    raise ValueError(
        f"a ranking set of {s} images does not fit {n} images per process x {w} processes: "
        f"{why}. Valid set sizes here: {choices} (0 = each process ranks its own images)"
    )


# groups of consecutive ranks, created once per (default group, processes per set)
_SET_GROUPS = {}


def ranking_set_group(processes_per_set: int):
    """The process group of this rank's ranking set: ranks ``[k G, (k + 1) G)`` for
    ``G = processes_per_set``. None when ``G == 1`` or not distributed; the whole world when
    ``G`` equals the world size.

    Collective on first use for a given ``G``: every rank must call it (in the same order),
    since ``torch.distributed.new_group`` is. The groups are cached.
    """
    g = int(processes_per_set)
    if g <= 1 or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    world = torch.distributed.get_world_size()
    if world % g != 0:
        raise ValueError(f"{g} processes per ranking set do not divide the {world} processes")
    if g == world:
        return torch.distributed.group.WORLD
    default = torch.distributed.group.WORLD
    cached = _SET_GROUPS.get(g)
    if cached is not None and cached[0] is default:
        return cached[1]
    rank = torch.distributed.get_rank()
    mine = None
    for start in range(0, world, g):  # identical calls, in the same order, on every rank
        group = torch.distributed.new_group(list(range(start, start + g)))
        if start <= rank < start + g:
            mine = group
    _SET_GROUPS[g] = (default, mine)
    return mine


def group_size(group) -> int:
    """Processes in ``group`` (1 for None / not distributed)."""
    return _world(group)


class _ScaleGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def scale_gradient(x, factor):
    """``x`` unchanged in the forward pass; its gradient multiplied by ``factor`` backward.

    Used for cross-process ranking under DistributedDataParallel: each of the ``G`` processes of
    a ranking set backpropagates its slice of the set's gradient and DDP then averages over all
    processes, so the loss's gradient is scaled by ``G`` to make the averaged update the mean,
    over ranking sets, of each set's full gradient (the loss value is left as it is).
    """
    if factor == 1:
        return x
    return _ScaleGradient.apply(x, factor)
