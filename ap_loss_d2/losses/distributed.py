"""Collectives for ranking the entries of all processes together (exactly), and the process
groups of ranking sets.

The ranking losses need, besides each process's own entries, only every positive score of the
global batch (``all_gather``, padded to the largest count), the per-positive sums over every
process's negatives (additive: ``all_reduce`` of ``8 |P|`` bytes) and two counts. Negatives never
travel; the loss value is identical on every rank and each rank's gradient is its slice of the
single-process gradient of the concatenated batch (bytes per iteration: docs/ranking_sets.md).
With ``group=None`` or a single process every function here is a no-op.
"""
import torch


def group_size(group) -> int:
    """Processes in ``group`` (1 for None / not distributed)."""
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
    world = group_size(group)
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
    if group_size(group) == 1:
        return x
    x = x.clone()
    torch.distributed.all_reduce(x, group=group)
    return x


def all_reduce_count(n: int, group, device) -> int:
    if group_size(group) == 1:
        return int(n)
    t = torch.tensor([n], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(t, group=group)
    return int(t.item())


def ranking_set_layout(images_per_set: int, images_per_process: int, world_size: int):
    """``(sets_per_process, processes_per_set)`` for sets of ``images_per_set`` images (0: each
    process ranks its own) over ``world_size`` processes of ``images_per_process`` images: a
    process splits its images into consecutive sets, or consecutive ranks rank their images
    together (at most one of the two exceeds 1). ValueError saying why, with the valid sizes,
    when the set does not divide evenly."""
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
    why = (
        f"{s} images need {s // n} processes per set, and the {w} processes do not split into whole sets of {s // n}"
        if s % n == 0 else f"{s} images is neither a divisor of the {n} images of a process (several sets per "
        "process) nor a multiple of them (several processes per set)"
    )
    choices = ", ".join(str(v) for v in [0] + valid)
    raise ValueError(
        f"a ranking set of {s} images does not fit {n} images per process x {w} processes: "
        f"{why}. Valid set sizes here: {choices} (0 = each process ranks its own images)"
    )


# groups of consecutive ranks, created once per (default group, processes per set)
_SET_GROUPS = {}


def ranking_set_group(processes_per_set: int):
    """The process group of this rank's ranking set, ranks ``[k G, (k + 1) G)`` for
    ``G = processes_per_set`` (None when ``G == 1`` or not distributed). Collective on first use
    for a ``G`` (``new_group``: every rank calls it, in the same order); cached."""
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


class _ScaleGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def scale_gradient(x, factor):
    """``x`` in the forward pass, its gradient times ``factor`` backward. The ``G`` processes
    ranking a set each backpropagate their slice of its gradient and DDP averages over processes:
    scaling by ``G`` makes the update the mean over sets of each set's full gradient."""
    if factor == 1:
        return x
    return _ScaleGradient.apply(x, factor)
