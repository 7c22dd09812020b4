"""Segmentation metrics for referring (query-based) and semantic segmentation.

Conventions:
    * Referring masks are 2-D ``(H, W)`` arrays; any non-zero value is foreground.
      One sample is one (prediction, ground truth) pair for a single query.
    * Per-sample IoU of a sample whose prediction and ground truth are both empty
      is 1.0 (a correct "no target" answer, as in DMMI-style one-to-zero queries).
    * IoU thresholds are inclusive: a sample with IoU exactly ``t`` counts as a hit.
    * Semantic label maps are integer ``(H, W)`` arrays; the confusion matrix is
      indexed ``[gt, pred]`` and pixels whose ground truth equals ``ignore_index``
      are skipped.
    * Returned dictionaries contain plain Python floats and never NaN, so they can
      be logged to MLflow or dumped to JSON as-is.

This module depends only on numpy and pycocotools.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

__all__ = [
    "ConfusionMatrix",
    "mask_iou_stats",
    "referring_metrics",
    "semantic_metrics",
]

_COCO_MAX_DETS = [1, 10, 100]


def mask_iou_stats(pred: np.ndarray, gt: np.ndarray) -> tuple[int, int]:
    """Counts intersection and union pixels of two binary masks.

    Args:
        pred: Predicted mask of shape ``(H, W)``; non-zero means foreground.
        gt: Ground-truth mask of the same shape as ``pred``.

    Returns:
        ``(intersection, union)`` pixel counts.

    Raises:
        ValueError: If the two shapes differ.
    """
    pred = np.asarray(pred, dtype=bool)
    gt = np.asarray(gt, dtype=bool)
    if pred.shape != gt.shape:
        raise ValueError(f"shape mismatch: pred {pred.shape} vs gt {gt.shape}")
    inter = int(np.logical_and(pred, gt).sum())
    union = int(np.logical_or(pred, gt).sum())
    return inter, union


def _encode(mask: np.ndarray) -> dict:
    # pycocotools' RLE encoder requires a Fortran-ordered uint8 array.
    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))


def _coco_map(
    preds: Sequence[np.ndarray],
    gts: Sequence[np.ndarray],
    scores: Sequence[float],
) -> float:
    """COCO mask AP averaged over IoU 0.50:0.05:0.95 (area "all", 100 dets)."""
    images, gt_anns, dets = [], [], []
    for i, (pred, gt) in enumerate(zip(preds, gts, strict=True)):
        height, width = gt.shape
        images.append({"id": i, "height": height, "width": width})
        if gt.any():
            rle = _encode(gt)
            gt_anns.append(
                {
                    "id": len(gt_anns) + 1,  # COCO treats id 0 as "unmatched".
                    "image_id": i,
                    "category_id": 1,
                    "segmentation": rle,
                    "area": float(mask_utils.area(rle)),
                    "bbox": mask_utils.toBbox(rle).tolist(),
                    "iscrowd": 0,
                }
            )
        if pred.any():
            dets.append(
                {
                    "image_id": i,
                    "category_id": 1,
                    "segmentation": _encode(pred),
                    "score": float(scores[i]),
                }
            )
    # Without GT there is nothing to recall, and without detections recall is
    # zero; both give AP 0. COCO.loadRes also cannot handle an empty list.
    if not gt_anns or not dets:
        return 0.0

    # pycocotools prints progress unconditionally; keep training logs clean.
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = {
            "images": images,
            "annotations": gt_anns,
            "categories": [{"id": 1, "name": "object"}],
        }
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(dets)
        evaluator = COCOeval(coco_gt, coco_dt, iouType="segm")
        evaluator.params.maxDets = list(_COCO_MAX_DETS)
        evaluator.evaluate()
        evaluator.accumulate()

    params = evaluator.params
    area_idx = params.areaRngLbl.index("all")
    det_idx = params.maxDets.index(100)
    # precision has shape [iou_thr, recall_thr, category, area, max_dets];
    # -1 marks undefined entries, which COCO's own summary also skips.
    precision = evaluator.eval["precision"][:, :, :, area_idx, det_idx]
    valid = precision[precision > -1]
    return float(valid.mean()) if valid.size else 0.0


def referring_metrics(
    preds: Sequence[np.ndarray],
    gts: Sequence[np.ndarray],
    scores: Sequence[float] | None = None,
    thresholds: Sequence[float] = (0.5, 0.7, 0.9),
) -> dict[str, float]:
    """Computes referring / query-based segmentation metrics.

    Each element of ``preds`` / ``gts`` is one sample (one query on one image).
    A sample whose prediction and ground truth are both empty has IoU 1.0.

    Args:
        preds: Predicted binary masks, each ``(H, W)``.
        gts: Ground-truth binary masks, same shape as the matching prediction.
        scores: Confidence per sample used to rank detections for ``map``;
            ``None`` gives every prediction a score of 1.0.
        thresholds: IoU thresholds for the ``prec@t`` keys (inclusive).

    Returns:
        A dict with:
            ``oiou``: total intersection / total union (0.0 if the union is 0).
            ``miou``: mean per-sample IoU.
            ``prec@{t}``: fraction of samples with IoU >= ``t``, per threshold.
            ``map``: COCO mask AP over IoU 0.50:0.05:0.95, with each sample as
                one image, non-empty GT as one annotation and non-empty
                prediction as one detection. An empty GT with a non-empty
                prediction is a false positive. 0.0 if no sample has a
                non-empty GT or no prediction is non-empty.
            ``zero_acc``: among samples with empty GT, the fraction whose
                prediction is also empty; only present if such samples exist.
            ``n``: number of samples.

    Raises:
        ValueError: If inputs are empty, lengths differ, a mask is not 2-D, or
            a prediction/GT pair has different shapes.
    """
    if len(preds) != len(gts):
        raise ValueError(f"length mismatch: {len(preds)} preds vs {len(gts)} gts")
    if scores is not None and len(scores) != len(preds):
        raise ValueError(f"length mismatch: {len(scores)} scores vs {len(preds)} preds")
    if len(preds) == 0:
        raise ValueError("referring_metrics needs at least one sample")

    pred_masks, gt_masks = [], []
    inters, unions, ious = [], [], []
    zero_hits = zero_total = 0
    for i, (pred, gt) in enumerate(zip(preds, gts, strict=True)):
        pred = np.asarray(pred, dtype=bool)
        gt = np.asarray(gt, dtype=bool)
        if pred.shape != gt.shape:
            raise ValueError(f"sample {i}: shape mismatch: pred {pred.shape} vs gt {gt.shape}")
        if gt.ndim != 2:
            raise ValueError(f"sample {i}: masks must be 2-D (H, W), got {gt.shape}")
        inter, union = mask_iou_stats(pred, gt)
        inters.append(inter)
        unions.append(union)
        # union == 0 means both masks are empty: a correct "no target" answer.
        ious.append(inter / union if union else 1.0)
        if not gt.any():
            zero_total += 1
            zero_hits += int(not pred.any())
        pred_masks.append(pred)
        gt_masks.append(gt)

    total_union = sum(unions)
    iou_arr = np.asarray(ious, dtype=np.float64)
    out: dict[str, float] = {
        "oiou": sum(inters) / total_union if total_union else 0.0,
        "miou": float(iou_arr.mean()),
    }
    for t in thresholds:
        out[f"prec@{t}"] = float((iou_arr >= t).mean())
    det_scores = [1.0] * len(pred_masks) if scores is None else list(scores)
    out["map"] = _coco_map(pred_masks, gt_masks, det_scores)
    if zero_total:
        out["zero_acc"] = zero_hits / zero_total
    out["n"] = float(len(pred_masks))
    return out


QUERY_TYPES = ("one", "many", "zero")


def query_type_metrics(preds, gts, query_types) -> dict[str, float]:
    """DMMI's layout (its Table 2) of referring results by what a query refers to.

    ``one/…`` and ``many/…`` (one-to-one, one-to-many queries) and ``targets/…`` (both
    together): ``oiou`` and ``miou`` as in :func:`referring_metrics`, and ``n``; ``zero/acc``:
    among one-to-zero queries (those whose ground truth is empty), the fraction predicted all
    background, and ``zero/n``. A group with no sample is left out.

    Raises:
        ValueError: If the lengths differ or a query type is not one of ``QUERY_TYPES``.
    """
    if not len(preds) == len(gts) == len(query_types):
        raise ValueError(
            f"length mismatch: {len(preds)} preds, {len(gts)} gts, {len(query_types)} types"
        )
    unknown = sorted(set(query_types) - set(QUERY_TYPES))
    if unknown:
        raise ValueError(f"unknown query type {unknown[0]!r}; expected one of {QUERY_TYPES}")
    stats = []
    for pred, gt in zip(preds, gts, strict=True):
        pred, gt = np.asarray(pred, dtype=bool), np.asarray(gt, dtype=bool)
        stats.append((*mask_iou_stats(pred, gt), bool(pred.any())))
    out: dict[str, float] = {}
    groups = {"one": ("one",), "many": ("many",), "targets": ("one", "many")}
    for name, kinds in groups.items():
        rows = [st for st, t in zip(stats, query_types, strict=True) if t in kinds]
        if rows:
            inter = sum(r[0] for r in rows)
            union = sum(r[1] for r in rows)
            out[f"{name}/oiou"] = inter / union if union else 0.0
            out[f"{name}/miou"] = float(np.mean([i / u if u else 1.0 for i, u, _ in rows]))
            out[f"{name}/n"] = float(len(rows))
    zero = [st for st, t in zip(stats, query_types, strict=True) if t == "zero"]
    if zero:
        out["zero/acc"] = float(np.mean([not any_fg for _, _, any_fg in zero]))
        out["zero/n"] = float(len(zero))
    return out


class ConfusionMatrix:
    """Accumulates a pixel confusion matrix for multi-class segmentation.

    The matrix is indexed ``[gt, pred]``. Pixels whose ground truth equals
    ``ignore_index`` are skipped.

    Attributes:
        num_classes: Number of classes ``C``; valid labels are ``0..C-1``.
        ignore_index: Ground-truth label excluded from all statistics.
        matrix: ``(C, C)`` int64 counts.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        """Initializes an empty matrix.

        Args:
            num_classes: Number of classes; must be positive.
            ignore_index: Ground-truth label to skip.

        Raises:
            ValueError: If ``num_classes`` is not positive.
        """
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)

    def reset(self) -> None:
        """Clears all accumulated counts."""
        self.matrix[:] = 0

    def update(self, pred: np.ndarray, gt: np.ndarray) -> None:
        """Adds one pair of label maps to the matrix.

        Args:
            pred: Predicted integer label map.
            gt: Ground-truth integer label map with the same shape.

        Raises:
            ValueError: If shapes differ, or a non-ignored pixel has a ground
                truth or predicted label outside ``[0, num_classes)``.
        """
        pred = np.asarray(pred)
        gt = np.asarray(gt)
        if pred.shape != gt.shape:
            raise ValueError(f"shape mismatch: pred {pred.shape} vs gt {gt.shape}")
        # int64 avoids uint8 overflow in the flat index below.
        gt = gt.astype(np.int64).ravel()
        pred = pred.astype(np.int64).ravel()
        keep = gt != self.ignore_index
        gt, pred = gt[keep], pred[keep]
        c = self.num_classes
        bad_gt = (gt < 0) | (gt >= c)
        if bad_gt.any():
            raise ValueError(
                f"gt labels {np.unique(gt[bad_gt]).tolist()} outside [0, {c}) "
                f"and not ignore_index={self.ignore_index}"
            )
        bad_pred = (pred < 0) | (pred >= c)
        if bad_pred.any():
            # Out-of-range predictions would silently land in another cell.
            raise ValueError(f"pred labels {np.unique(pred[bad_pred]).tolist()} outside [0, {c})")
        counts = np.bincount(gt * c + pred, minlength=c * c)
        self.matrix += counts.reshape(c, c)

    def per_class_iou(self) -> np.ndarray:
        """Returns the IoU of each class.

        Returns:
            ``(C,)`` float array; NaN for classes absent from both prediction
            and ground truth.
        """
        tp = np.diag(self.matrix).astype(np.float64)
        union = self.matrix.sum(axis=0) + self.matrix.sum(axis=1) - tp
        iou = np.full(self.num_classes, np.nan)
        present = union > 0
        iou[present] = tp[present] / union[present]
        return iou

    def miou(self) -> float:
        """Returns the mean IoU over present classes (0.0 if none is present)."""
        iou = self.per_class_iou()
        present = ~np.isnan(iou)
        return float(iou[present].mean()) if present.any() else 0.0

    def pixel_accuracy(self) -> float:
        """Returns correct / counted pixels (0.0 if no pixel was counted)."""
        total = self.matrix.sum()
        return float(np.trace(self.matrix) / total) if total else 0.0

    def as_dict(self, class_names: Sequence[str] | None = None) -> dict[str, float]:
        """Summarizes the matrix as a flat, NaN-free dict.

        Args:
            class_names: Name per class; defaults to the class indices.

        Returns:
            ``{"miou": ..., "pixel_acc": ..., "iou/<name>": ...}`` where classes
            absent from both prediction and ground truth are omitted.

        Raises:
            ValueError: If ``class_names`` does not have ``num_classes`` entries.
        """
        if class_names is None:
            class_names = [str(k) for k in range(self.num_classes)]
        if len(class_names) != self.num_classes:
            raise ValueError(f"expected {self.num_classes} class names, got {len(class_names)}")
        out = {"miou": self.miou(), "pixel_acc": self.pixel_accuracy()}
        for name, iou in zip(class_names, self.per_class_iou(), strict=True):
            if not np.isnan(iou):
                out[f"iou/{name}"] = float(iou)
        return out


def semantic_metrics(
    preds: Sequence[np.ndarray],
    gts: Sequence[np.ndarray],
    num_classes: int,
    ignore_index: int = 255,
    class_names: Sequence[str] | None = None,
) -> dict[str, float]:
    """Computes semantic segmentation metrics over a set of label maps.

    Args:
        preds: Predicted integer label maps.
        gts: Ground-truth integer label maps, paired with ``preds``.
        num_classes: Number of classes.
        ignore_index: Ground-truth label to skip.
        class_names: Optional name per class for the ``iou/<name>`` keys.

    Returns:
        The dict from :meth:`ConfusionMatrix.as_dict`.

    Raises:
        ValueError: If lengths differ or any pair is invalid for
            :meth:`ConfusionMatrix.update`.
    """
    if len(preds) != len(gts):
        raise ValueError(f"length mismatch: {len(preds)} preds vs {len(gts)} gts")
    cm = ConfusionMatrix(num_classes, ignore_index)
    for i, (pred, gt) in enumerate(zip(preds, gts, strict=True)):
        try:
            cm.update(pred, gt)
        except ValueError as err:
            raise ValueError(f"sample {i}: {err}") from err
    return cm.as_dict(class_names)
