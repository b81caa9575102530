"""Losses: segmentation with full or box (weak) tumor labels, and the prototypical-network episode loss.

Box supervision follows BoxInst (Tian et al., CVPR 2021) in 3D: a box says nothing about the pixels
inside it, so they are left out of the dense loss; instead (1) the projections of the predicted tumor
onto each axis of the box must fill the box exactly (a lesion touches every row, column and slice of its
tight box), and (2) neighbouring pixels inside the box that look alike should get the same answer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE = 255
NOT_TUMOR = 254  # a target pixel known not to be tumor, its structure unknown
_PAIR_OFFSETS = ((0, 2), (2, 0), (2, 2), (2, -2))  # dilated neighbours, as in BoxInst
PAIR_SIGMA = 0.1  # image similarity scale on normalised intensities
PAIR_THRESHOLD = 0.3  # pairs less alike than this are not pulled together
# A lesion fills a good part of its tight box (an ellipsoid fills π/6 ≈ 0.52); less than this share
# predicted inside a box is penalised (a size constraint, as in Kervadec et al., MIDL 2019).
MIN_BOX_FILL = 0.25
BOX_WEIGHT = 0.2  # the box terms regularise; stronger, they crowd out the anatomy the dense loss teaches


@dataclass(frozen=True)
class Box:
    """A lesion's box in batch coordinates: slices [k0, k1), rows [i0, i1), columns [j0, j1)."""

    k0: int
    k1: int
    i0: int
    i1: int
    j0: int
    j1: int


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """1 − mean soft Dice over the classes present (in the prediction or the target) where ``valid``."""
    probs = torch.softmax(logits, dim=1) * valid[:, None]
    one_hot = F.one_hot(target.clamp(max=logits.shape[1] - 1), logits.shape[1]).permute(0, 3, 1, 2).float()
    one_hot = one_hot * valid[:, None]
    inter = (probs * one_hot).sum(dim=(0, 2, 3))
    total = probs.sum(dim=(0, 2, 3)) + one_hot.sum(dim=(0, 2, 3))
    present = one_hot.sum(dim=(0, 2, 3)) > 0
    dice = (2 * inter + 1.0) / (total + 1.0)
    return 1.0 - dice[present].mean() if present.any() else logits.sum() * 0.0


def _projection_dice(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return 1.0 - (2 * (pred * target).sum() + 1e-6) / (pred.pow(2).sum() + target.pow(2).sum() + 1e-6)


def box_projection_loss(tumor: torch.Tensor, box: Box) -> torch.Tensor:
    """The predicted tumor probability [K, H, W] must fill the box's extent along each axis."""
    k, h, w = tumor.shape
    inside = tumor[box.k0 : box.k1]
    rows = torch.zeros(h, device=tumor.device)
    rows[box.i0 : box.i1] = 1.0
    cols = torch.zeros(w, device=tumor.device)
    cols[box.j0 : box.j1] = 1.0
    loss = _projection_dice(inside.amax(dim=(0, 2)), rows) + _projection_dice(inside.amax(dim=(0, 1)), cols)
    if box.k1 - box.k0 > 1:
        slices = tumor[:, box.i0 : box.i1, box.j0 : box.j1].amax(dim=(1, 2))
        target = torch.zeros(k, device=tumor.device)
        target[box.k0 : box.k1] = 1.0
        loss = loss + _projection_dice(slices, target)
    return loss


def box_fill_loss(tumor: torch.Tensor, box: Box) -> torch.Tensor:
    """Penalty when the predicted lesion fills less than ``MIN_BOX_FILL`` of its box."""
    fill = tumor[box.k0 : box.k1, box.i0 : box.i1, box.j0 : box.j1].mean()
    return F.relu(MIN_BOX_FILL - fill) / MIN_BOX_FILL


def pairwise_loss(tumor: torch.Tensor, image: torch.Tensor, box: Box) -> torch.Tensor:
    """Alike neighbours inside the box should agree on tumor / not tumor."""
    p = tumor[box.k0 : box.k1, box.i0 : box.i1, box.j0 : box.j1]
    img = image[box.k0 : box.k1, box.i0 : box.i1, box.j0 : box.j1]
    terms = []
    for di, dj in _PAIR_OFFSETS:
        if p.shape[1] <= abs(di) or p.shape[2] <= abs(dj):
            continue
        a_rows, b_rows = slice(0, p.shape[1] - di), slice(di, p.shape[1])
        a_cols, b_cols = (
            (slice(0, p.shape[2] - dj), slice(dj, p.shape[2]))
            if dj >= 0
            else (
                slice(-dj, p.shape[2]),
                slice(0, p.shape[2] + dj),
            )
        )
        pa, pb = p[:, a_rows, a_cols], p[:, b_rows, b_cols]
        similar = torch.exp(-(img[:, a_rows, a_cols] - img[:, b_rows, b_cols]).abs() / PAIR_SIGMA) >= PAIR_THRESHOLD
        if similar.any():
            same = pa * pb + (1 - pa) * (1 - pb)
            terms.append(-torch.log(same[similar].clamp_min(1e-6)).mean())
    return torch.stack(terms).mean() if terms else tumor.sum() * 0.0


BACKGROUND_WEIGHT = 0.2  # background is most of every image and easy; it would drown the structures


def seg_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    image: torch.Tensor,
    boxes: list[Box],
    tumor_class: int,
) -> torch.Tensor:
    """Class-weighted cross-entropy + soft Dice where labels are known (``IGNORE`` marks pixels inside
    lesion boxes; where only not-tumor is known, ``NOT_TUMOR``, the cross-entropy takes the log of the other
    classes' summed probability, weighted as a structure's pixel), plus, for each box, the projection and
    pairwise terms on the tumor probability."""
    not_tumor = target == NOT_TUMOR
    target = target.masked_fill(not_tumor, IGNORE).long()
    valid = target != IGNORE
    weight = torch.ones(logits.shape[1], device=logits.device)
    weight[0] = BACKGROUND_WEIGHT
    log_probs = F.log_softmax(logits, dim=1)
    known = target.clamp(max=logits.shape[1] - 1)
    pixel_weight = weight[known] * valid
    nll = -log_probs.gather(1, known[:, None])[:, 0]
    others = torch.cat([log_probs[:, :tumor_class], log_probs[:, tumor_class + 1 :]], dim=1)
    nll_not_tumor = -torch.logsumexp(others, dim=1)
    total_weight = pixel_weight.sum() + not_tumor.sum()
    loss = soft_dice_loss(logits, target, valid)
    if total_weight > 0:
        loss = loss + ((pixel_weight * nll).sum() + (nll_not_tumor * not_tumor).sum()) / total_weight
    if boxes:
        tumor = log_probs[:, tumor_class].exp()
        box_terms = [
            box_projection_loss(tumor, b) + box_fill_loss(tumor, b) + 0.5 * pairwise_loss(tumor, image, b)
            for b in boxes
        ]
        loss = loss + BOX_WEIGHT * torch.stack(box_terms).mean()
    return loss


def prototypical_loss(
    logits_fn, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor, query_labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Episode loss and accuracy: prototypes are the class means of the support embeddings."""
    classes = int(support_labels.max()) + 1
    prototypes = torch.stack([support[support_labels == c].mean(0) for c in range(classes)])
    logits = logits_fn(query, prototypes)
    loss = F.cross_entropy(logits, query_labels)
    accuracy = (logits.argmax(1) == query_labels).float().mean()
    return loss, accuracy
