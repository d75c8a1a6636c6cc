"""Training the supervised head (``anomalyd.model.head.Head``) on labelled images' cells.

Positives are the defect cells from masks; without masks (image-level labels, as a
technician gives them), a few of the cells of a defective image least like the good
parts, re-chosen by heads learnt from the other images (``HeadSettings.cross_fit``)
and optionally learnt as bags. Negatives are the good images' cells and the defective
images' cells away from the defect.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from anomalyd.model.head import LOGIT_SHIFT, Head, cell_inputs, merge_heads, mlp_logits


@dataclass(frozen=True)
class HeadSettings:
    hidden: int = 64  # 0: a linear head (logistic regression)
    use_distance: bool = True  # the cell's distance to the memory is an input
    steps: int = 1500
    batch: int = 2048
    lr: float = 3e-3
    weight_decay: float = 1e-4
    max_negatives: int = 200_000
    ring: int = 1  # cells around a labelled defect that are neither positive nor negative (masks are rough)
    # Without a mask (an image-level label) a defective image's defect is somewhere among its cells farthest
    # from the memory (a BSData pit: among the top 1024 of 7616 cells in 9 frames of 10, among the top 4 in 3):
    # those cells are neither negatives nor, but for the few chosen, positives; its other cells are negatives.
    unsure_cells: int = 1024
    unmasked_top: int = 4  # the chosen: first the unsure cells least like the good parts …
    unmasked_rounds: int = 2  # … then this many rounds of re-choosing them by the head's own score
    # Re-chosen by heads that did not learn the image's own chosen cells: the defective images without a mask
    # in this many parts, each part's cells chosen by a head learnt from the others' (0 or 1: one head learns
    # all and re-chooses in the images it learnt, which mostly confirms its first choice). BSData, 20 image
    # labels, three seeds: escapes at 2 % false rejects 24-33 % against 37-39 %, AUPRO 0.91 against 0.84;
    # with 75 (and bags) the same escapes (means 33 % both), AUPRO 0.95-0.97 against 0.86-0.92 (docs/accuracy.md).
    cross_fit: int = 2
    # Image labels also learnt as bags (multiple-instance learning), beside the chosen cells (bags alone with
    # ``unmasked_top = 0``): the highest logit among a defective image's unsure cells is trained towards a
    # defect, the highest among a good image's most unusual cells (ranked as the unsure ones) towards good,
    # so each good image's most defect-like spot (a droplet, soiling) is a negative however rare it is among
    # the cells drawn at random; ``bag_images`` of each per step, the loss ``bag_weight`` times. On by
    # default where at least ``bags_min_images`` defective images have no mask (BSData, three seeds: with
    # 75 image labels AUROC 0.945-0.953 against 0.906-0.939 and escapes at the threshold 32-34 % against
    # 39-53 %; with 20 the good-part frames of unseen views rose to 4-8 % false rejects against 1-2 %, the
    # few bags learnt the training views' good frames rather than the pit; docs/accuracy.md).
    bags: bool = True
    bags_min_images: int = 50
    bag_images: int = 4
    bag_weight: float = 1.0
    # A defective image without a mask whose every unsure cell the last re-choosing head (cross-fitted: one
    # that did not learn it) scores below even odds gives no positives: its chosen cells are a guess. Not
    # kept: BSData, seed 0, escapes at 2 % false rejects 33 % (all image labels) and 28 % (20) against 32 % and 26 %.
    drop_doubtful: bool = False
    # False: the good images' bags alone (each good image's most defect-like spot). Not kept: BSData, all image
    # labels, seed 0: 38 % escapes at 2 % false rejects and 4 % false rejects at the threshold against 32 % and 0 %.
    defect_bags: bool = True
    # Heads trained from as many seeds, their logits averaged (merge_heads: one wider head, the same format).
    # What an image-label head learns depends on its seed (which cells it ends up choosing), a mean less so.
    ensemble: int = 1
    hard_rounds: int = 0  # rounds of retraining with the good cells the head scored highest (hard negatives)
    hard_share: float = 0.02  # … the top 2 % of the good cells
    # The mean features of the (2·context+1)² cells around each cell are an input beside its own: a pit is a
    # compact blob on a clean ring, a droplet or soiling spreads (0: the cell alone).
    context: int = 0
    # A defect cell is drawn with weight (its image's defect cells)^-balance. 0 draws every defect cell alike,
    # so a 3000-pixel pit (50 cells) outweighs a 20-pixel one (1 cell) fifty times and the small pits, the ones
    # that escape, are barely learnt; 1 gives every defective image the same share (measured on BSData).
    balance: float = 1.0
    # The learning rate falls to 0 along a cosine over the steps, so the last steps average the noise of the
    # batches instead of leaving the head wherever the last few batches pushed it.
    lr_decay: bool = False


def near_defect(mask: np.ndarray, grid: tuple[int, int], width: int) -> np.ndarray:
    """Cells within ``width`` of a positive cell (2-D dilation of ``[N, h·w]`` masks)."""
    if width <= 0:
        return mask
    n = mask.shape[0]
    m = torch.from_numpy(mask.reshape(n, 1, *grid).astype(np.float32))
    grown = F.max_pool2d(m, 2 * width + 1, stride=1, padding=width)
    return grown.reshape(n, -1).numpy() > 0


def defect_cell_weights(positive: np.ndarray, balance: float) -> np.ndarray:
    """``[N, h·w]`` defect cells → each cell's drawing weight, (its image's defect cells)^-balance (0 elsewhere)."""
    per_image = np.maximum(positive.sum(axis=1, keepdims=True), 1).astype(np.float64)
    return np.where(positive, per_image**-balance, 0.0).ravel()


def top_cells(scores: np.ndarray, allowed: np.ndarray, top: int) -> np.ndarray:
    """``[N, h·w]`` → each row's ``top`` highest-scoring cells among the ``allowed`` ones, as a mask."""
    masked = np.where(allowed, scores, -np.inf)
    top = min(top, scores.shape[1])
    idx = np.argpartition(-masked, top - 1, axis=1)[:, :top]
    out = np.zeros(scores.shape, dtype=bool)
    np.put_along_axis(out, idx, True, axis=1)
    return out & allowed


def uses_bags(settings: HeadSettings, unmasked_images: int) -> bool:
    """Whether image labels are also learnt as bags: on, and enough defective images without a mask."""
    return settings.bags and unmasked_images > 0 and unmasked_images >= settings.bags_min_images


def cross_fit_parts(settings: HeadSettings, unmasked_images: int) -> int:
    """In how many parts image labels' cells are re-chosen (1: by one head that learnt them all; 0: not re-chosen)."""
    if not (unmasked_images and settings.unmasked_top and settings.unmasked_rounds):
        return 0
    return settings.cross_fit if 1 < settings.cross_fit <= unmasked_images else 1


def image_level_cells(dist: np.ndarray, settings: HeadSettings) -> tuple[np.ndarray, np.ndarray]:
    """Defective images without masks, ``[N, h·w]`` distances → (unsure cells, the first chosen as defect).

    Unsure: the ``unsure_cells`` farthest from the memory, where the defect is; the
    rest is good surface. Chosen: the ``unmasked_top`` farthest of them.
    """
    unsure = top_cells(dist, np.ones(dist.shape, bool), settings.unsure_cells)
    return unsure, top_cells(dist, unsure, settings.unmasked_top)


Bags = tuple[np.ndarray, np.ndarray]  # ([B, K] cell indices, [B] labels: 1 a defective image, 0 a good one)


@dataclass
class LearningCells:
    """What a head learns from, per cell ``[N, h·w]``: the defect cells (from masks, or chosen for image
    labels), the unsure cells (neither positive nor negative), and image labels' bags; ``rechoice_scores``
    ``[unmasked images, h·w]``: the last re-choosing heads' scores (None where nothing was re-chosen)."""

    positive: np.ndarray
    unsure: np.ndarray
    bags: Bags | None
    unmasked: np.ndarray
    rechoice_scores: np.ndarray | None = None


def train_head(
    cells: np.ndarray,
    dist: np.ndarray,
    positive: np.ndarray | None,
    defective: np.ndarray,
    settings: HeadSettings,
    grid: tuple[int, int] | None = None,
    seed: int = 0,
    masked: np.ndarray | None = None,
    unsure_dist: np.ndarray | None = None,
) -> Head:
    """Train on images' cells: ``cells [N, h·w, C]``, ``dist [N, h·w]``, ``defective [N]``.

    ``positive [N, h·w]`` marks defect cells (from masks) of the defective images
    that have one (``masked [N]``; default: every defective image when ``positive``
    is given, none when it is None). A defective image without a mask is an
    image-level label: its cells farthest from the memory are unsure (the defect is
    among them), a few of them stand for the defect, chosen first by distance and
    then by the head itself; with ``settings.bags`` also as bags (see HeadSettings).
    Negatives are every cell of the good images and the
    cells of defective images away from the defect (or from the unsure cells).
    ``unsure_dist [N, h·w]`` (default ``dist``) are the distances that find the
    unsure cells: fit gives those in all features where the search runs in a few
    principal components, which rank a faint defect's cells lower.
    """
    if settings.ensemble > 1:
        one = replace(settings, ensemble=1)
        return merge_heads([
            train_head(cells, dist, positive, defective, one, grid, seed + 1000 * k, masked, unsure_dist)
            for k in range(settings.ensemble)
        ])  # fmt: skip
    grid = (1, cells.shape[1]) if grid is None else grid
    x_all = cell_inputs(cells, dist, settings.use_distance, settings.context, grid)  # once for every head trained
    chosen = learning_cells(cells, dist, positive, defective, settings, grid, seed, masked, unsure_dist, x_all)
    return _train_on_cells(x_all, chosen.positive, chosen.unsure, settings, grid, seed, chosen.bags)


def learning_cells(
    cells: np.ndarray,
    dist: np.ndarray,
    positive: np.ndarray | None,
    defective: np.ndarray,
    settings: HeadSettings,
    grid: tuple[int, int],
    seed: int = 0,
    masked: np.ndarray | None = None,
    unsure_dist: np.ndarray | None = None,
    inputs: np.ndarray | None = None,
) -> LearningCells:
    """The cells ``train_head`` learns from (its arguments); image labels' cells chosen and re-chosen here.

    ``inputs``: the cells' head inputs (``cell_inputs`` of ``cells`` and ``dist``), made here if not given.
    """
    n, hw, _c = cells.shape
    if masked is None:
        masked = defective.copy() if positive is not None else np.zeros(n, bool)
    masked = masked & defective
    positive = np.zeros((n, hw), bool) if positive is None else positive & masked[:, None]
    unmasked = np.flatnonzero(defective & ~masked)
    unsure = np.zeros((n, hw), bool)
    ranked = dist if unsure_dist is None else unsure_dist
    bags: Bags | None = None
    if uses_bags(settings, len(unmasked)):
        good = np.flatnonzero(~defective)
        with_defects = unmasked if settings.defect_bags else unmasked[:0]
        bags = (
            np.concatenate([_bag_cells(ranked, with_defects, settings.unsure_cells),
                            _bag_cells(ranked, good, settings.unsure_cells)]),
            np.r_[np.ones(len(with_defects)), np.zeros(len(good))].astype(np.float32),
        )  # fmt: skip
    out = LearningCells(positive, unsure, bags, unmasked)
    if not len(unmasked):
        return out
    unsure[unmasked], first = image_level_cells(ranked[unmasked], settings)
    if not settings.unmasked_top:  # bags alone when no cells are chosen
        return out
    positive[unmasked] = first
    x_all = cell_inputs(cells, dist, settings.use_distance, settings.context, grid) if inputs is None else inputs
    x = torch.from_numpy(np.ascontiguousarray(x_all.reshape(n, hw, -1)[unmasked].reshape(len(unmasked) * hw, -1)))

    def learn(chosen: np.ndarray, some_bags: Bags | None) -> Head:
        return _train_on_cells(x_all, chosen, unsure, settings, grid, seed, some_bags)

    parts = cross_fit_parts(settings, len(unmasked))
    for _round in range(settings.unmasked_rounds):
        out.rechoice_scores = _rechoice_scores(learn, positive, bags, unmasked, x, parts, seed)
        positive[unmasked] = top_cells(out.rechoice_scores, unsure[unmasked], settings.unmasked_top)
    if settings.drop_doubtful and out.rechoice_scores is not None:
        best = np.where(unsure[unmasked], out.rechoice_scores, -np.inf).max(axis=1)
        doubtful = best < float(F.softplus(torch.tensor(LOGIT_SHIFT)))  # logit < 0 everywhere
        if not doubtful.all():
            positive[unmasked[doubtful]] = False
    return out


def _rechoice_scores(
    learn: Callable[[np.ndarray, Bags | None], Head],
    positive: np.ndarray,
    bags: Bags | None,
    unmasked: np.ndarray,
    x: torch.Tensor,
    parts: int,
    seed: int,
) -> np.ndarray:
    """The cell scores ``[len(unmasked), h·w]`` that re-choose the defect cells of the images without a mask.

    ``learn(positive, bags)`` trains a head; ``x`` are the unmasked images' cell inputs.
    """
    hw = positive.shape[1]
    if parts <= 1:
        return learn(positive, bags).cell_scores(x).reshape(len(unmasked), hw).numpy()
    scores = np.empty((len(unmasked), hw), np.float32)
    per_image = x.reshape(len(unmasked), hw, -1)
    order = np.random.default_rng(seed).permutation(len(unmasked))
    for part in np.array_split(order, parts):
        learnt = positive.copy()
        learnt[unmasked[part]] = False  # its unsure cells stay out of the negatives: it is not taught either way
        kept = bags
        if bags is not None and bags[1].any():  # the defective images' bags come first, as ``unmasked``
            keep = np.ones(len(bags[1]), bool)
            keep[part] = False
            kept = (bags[0][keep], bags[1][keep])
        head = learn(learnt, kept)
        mine = per_image[torch.from_numpy(part.astype(np.int64))].reshape(-1, x.shape[-1])
        scores[part] = head.cell_scores(mine).reshape(len(part), hw).numpy()
    return scores


def _bag_cells(ranked: np.ndarray, rows: np.ndarray, size: int) -> np.ndarray:
    """Each row's ``size`` highest-ranked cells, as indices into the flattened ``[N·h·w]`` cells."""
    hw = ranked.shape[1]
    size = min(size, hw)
    top = np.argpartition(-ranked[rows], size - 1, axis=1)[:, :size]
    return (rows[:, None] * hw + top).astype(np.int64)


def _train_on_cells(
    x_all: np.ndarray,
    positive: np.ndarray,
    unsure: np.ndarray,
    settings: HeadSettings,
    grid: tuple[int, int],
    seed: int,
    bags: Bags | None = None,
) -> Head:
    """One head from every cell's inputs ``x_all [N·h·w, D]`` (``cell_inputs``), its defect cells and unsure ones."""
    near = near_defect(positive, grid, settings.ring)
    if not positive.any() and bags is None:
        raise ValueError("no defect cells to learn from (are the masks empty?)")
    negative = ~near & ~unsure
    rng = np.random.default_rng(seed)
    neg_all = np.flatnonzero(negative.ravel())
    neg_idx = neg_all
    if len(neg_idx) > settings.max_negatives:
        neg_idx = rng.choice(neg_idx, settings.max_negatives, replace=False)
    pos_idx = np.flatnonzero(positive.ravel())
    pos_weight = torch.from_numpy(defect_cell_weights(positive, settings.balance)[pos_idx])
    x_pos = torch.from_numpy(x_all[pos_idx])
    x_neg = torch.from_numpy(x_all[neg_idx])
    x_bags = None
    if bags is not None:
        x_bags = (torch.from_numpy(x_all), torch.from_numpy(bags[0]), torch.from_numpy(bags[1]))
    head = _fit_mlp(x_pos, pos_weight, x_neg, None, settings, seed, x_bags)
    for _round in range(settings.hard_rounds):
        # Hard negatives: the good cells the head likes most (droplets, soiling, scratches of the
        # groove) are rare among random negatives; half of each batch now comes from them.
        logits = torch.cat(
            [head.logits(torch.from_numpy(x_all[neg_all[i : i + 65536]])) for i in range(0, len(neg_all), 65536)]
        )
        top = max(1, int(len(neg_all) * settings.hard_share))
        hard = neg_all[torch.topk(logits, top).indices.numpy()]
        head = _fit_mlp(x_pos, pos_weight, x_neg, torch.from_numpy(x_all[hard]), settings, seed)
    return head


def _fit_mlp(
    x_pos: torch.Tensor,
    pos_weight: torch.Tensor,
    x_neg: torch.Tensor,
    x_hard: torch.Tensor | None,
    settings: HeadSettings,
    seed: int,
    x_bags: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> Head:
    """``x_bags``: every cell's inputs, ``[B, K]`` bags of cell indices and their ``[B]`` image labels."""
    both = torch.cat([x_pos, x_neg])
    if x_bags is not None:
        both = torch.cat([both, x_bags[0][x_bags[1][x_bags[2] > 0].ravel()]])
    mean = both.mean(0)
    std = both.std(0).clamp_min(1e-6)
    d = both.shape[1]
    g = torch.Generator().manual_seed(seed)
    hidden = settings.hidden
    if hidden:
        w1 = (torch.randn(d, hidden, generator=g) * (2.0 / d) ** 0.5).requires_grad_()
        b1 = torch.zeros(hidden, requires_grad=True)
        w2 = (torch.randn(hidden, generator=g) * (1.0 / hidden) ** 0.5).requires_grad_()
        params = [w1, b1, w2]
    else:
        w1 = torch.zeros(d, 0)
        b1 = torch.zeros(0)
        w2 = torch.zeros(d, requires_grad=True)
        params = [w2]
    b2 = torch.zeros((), requires_grad=True)
    params.append(b2)
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, settings.steps) if settings.lr_decay else None
    half = settings.batch // 2
    quarter = half // 2

    def net(x: torch.Tensor) -> torch.Tensor:
        return mlp_logits(x, mean, std, w1, b1, w2, b2)  # the network the stored head runs

    with torch.enable_grad():
        for _step in range(settings.steps):
            # Balanced batches: as many defect cells as good ones, whatever their numbers; the defect
            # cells drawn by their weights (each defective image its share, see HeadSettings.balance).
            # With image labels as bags and no masks there are no defect cells: the good ones alone.
            n_pos = half if len(x_pos) else 0
            pi = torch.multinomial(pos_weight, n_pos, replacement=True, generator=g) if n_pos else None
            if x_hard is None:
                neg = x_neg[torch.randint(len(x_neg), (half,), generator=g)]
            else:
                neg = torch.cat(
                    [
                        x_neg[torch.randint(len(x_neg), (half - quarter,), generator=g)],
                        x_hard[torch.randint(len(x_hard), (quarter,), generator=g)],
                    ]
                )
            x = neg if pi is None else torch.cat([x_pos[pi], neg])
            y = torch.cat([torch.ones(n_pos), torch.zeros(half)])
            loss = F.binary_cross_entropy_with_logits(net(x), y)
            if x_bags is not None:
                loss = loss + settings.bag_weight * _bag_loss(net, x_bags, settings.bag_images, g)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if schedule is not None:
                schedule.step()
    arrays = {
        "mean": mean.numpy(),
        "std": std.numpy(),
        "w1": w1.detach().numpy(),
        "b1": b1.detach().numpy(),
        "w2": w2.detach().numpy(),
        "b2": b2.detach().numpy().reshape(1),
    }
    return Head(arrays, settings.use_distance, context=settings.context)


def _bag_loss(
    net: Callable[[torch.Tensor], torch.Tensor],
    x_bags: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    per_label: int,
    g: torch.Generator,
) -> torch.Tensor:
    """Multiple-instance loss on ``per_label`` defective and as many good bags: a bag's logit is its highest
    cell's. One defect cell makes an image defective; a good image must have none, so its most defect-like
    cell is pushed down (hard negatives, found per image)."""
    inputs, bags, labels = x_bags
    picked = torch.cat([
        (rows := torch.nonzero(labels == y).ravel())[torch.randint(len(rows), (per_label,), generator=g)]
        for y in (1, 0)
        if (labels == y).any()
    ])  # fmt: skip
    return F.binary_cross_entropy_with_logits(net(inputs[bags[picked]]).amax(1), labels[picked])
