"""Hand-computed checks for components.metrics."""

import json
import math

import numpy as np
import pytest

from components.metrics import (
    ConfusionMatrix,
    mask_iou_stats,
    query_type_metrics,
    referring_metrics,
    semantic_metrics,
)


def _row(k: int, n: int = 10) -> np.ndarray:
    """1 x n mask whose first k pixels are foreground."""
    m = np.zeros((1, n), dtype=bool)
    m[0, :k] = True
    return m


def _empty(shape=(2, 2)) -> np.ndarray:
    return np.zeros(shape, dtype=bool)


def _full(shape=(2, 2)) -> np.ndarray:
    return np.ones(shape, dtype=bool)


# --------------------------------------------------------------------------
# mask_iou_stats
# --------------------------------------------------------------------------


def test_mask_iou_stats_counts():
    pred = np.array([[1, 1], [1, 0]], dtype=bool)
    gt = np.array([[1, 1], [0, 0]], dtype=bool)
    # intersection: the top row (2 px); union: top row + (1, 0) (3 px)
    assert mask_iou_stats(pred, gt) == (2, 3)
    assert mask_iou_stats(_empty(), _empty()) == (0, 0)


def test_mask_iou_stats_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(2, 2\).*\(3, 3\)"):
        mask_iou_stats(_empty((2, 2)), _empty((3, 3)))


# --------------------------------------------------------------------------
# referring_metrics: IoU-based scores
# --------------------------------------------------------------------------


def test_oiou_differs_from_miou():
    # sample 0: gt = all 4 px, pred = 1 px   -> I=1, U=4, IoU=1/4
    # sample 1: gt = top row, pred = 3 px    -> I=2, U=3, IoU=2/3
    # oIoU = (1 + 2) / (4 + 3) = 3/7; mIoU = (1/4 + 2/3) / 2 = 11/24
    pred0 = np.array([[1, 0], [0, 0]], dtype=bool)
    pred1 = np.array([[1, 1], [1, 0]], dtype=bool)
    gt1 = np.array([[1, 1], [0, 0]], dtype=bool)
    out = referring_metrics([pred0, pred1], [_full(), gt1])
    assert out["oiou"] == pytest.approx(3 / 7)
    assert out["miou"] == pytest.approx(11 / 24)
    assert out["n"] == 2
    # Neither gt is empty, so the one-to-zero accuracy is not reported.
    assert "zero_acc" not in out


def test_precision_thresholds_are_inclusive():
    # gt = 10 px; pred = first k px inside it -> IoU = k/10 exactly.
    # IoUs: 0.4, 0.5, 0.7, 0.9
    # prec@0.5: {0.5, 0.7, 0.9} -> 3/4; prec@0.7: {0.7, 0.9} -> 2/4;
    # prec@0.9: {0.9} -> 1/4
    preds = [_row(4), _row(5), _row(7), _row(9)]
    gts = [_row(10)] * 4
    out = referring_metrics(preds, gts)
    assert out["prec@0.5"] == pytest.approx(0.75)
    assert out["prec@0.7"] == pytest.approx(0.5)
    assert out["prec@0.9"] == pytest.approx(0.25)
    # mIoU = (0.4 + 0.5 + 0.7 + 0.9) / 4 = 0.625; oIoU = 25 / 40
    assert out["miou"] == pytest.approx(0.625)
    assert out["oiou"] == pytest.approx(0.625)


def test_custom_thresholds_build_keys():
    out = referring_metrics([_row(5)], [_row(10)], thresholds=(0.3, 0.6))
    # IoU = 0.5: >= 0.3 but < 0.6
    assert out["prec@0.3"] == 1.0
    assert out["prec@0.6"] == 0.0
    assert "prec@0.5" not in out


def test_both_empty_counts_as_iou_one_and_zero_hit():
    # sample 0: perfect 1 px match -> IoU 1, I=1, U=1
    # sample 1: both empty         -> IoU 1 by convention, I=U=0
    # oIoU = 1/1; mIoU = 1; the only empty-gt sample is answered correctly.
    gt0 = np.array([[1, 0], [0, 0]], dtype=bool)
    out = referring_metrics([gt0.copy(), _empty()], [gt0, _empty()])
    assert out["oiou"] == pytest.approx(1.0)
    assert out["miou"] == pytest.approx(1.0)
    assert out["prec@0.9"] == pytest.approx(1.0)
    assert out["zero_acc"] == pytest.approx(1.0)


def test_all_samples_empty():
    # Total union is 0 -> oIoU 0.0; every sample IoU 1 -> mIoU 1; no GT -> map 0.
    out = referring_metrics([_empty(), _empty()], [_empty(), _empty()])
    assert out["oiou"] == 0.0
    assert out["miou"] == 1.0
    assert out["zero_acc"] == 1.0
    assert out["map"] == 0.0


def test_prediction_on_empty_gt_lowers_zero_acc():
    # sample 0: both empty            -> IoU 1, correct rejection
    # sample 1: 1 px pred, empty gt   -> I=0, U=1, IoU 0, false alarm
    # zero_acc = 1/2; mIoU = (1 + 0) / 2; oIoU = 0 / 1
    pred1 = np.array([[0, 1], [0, 0]], dtype=bool)
    out = referring_metrics([_empty(), pred1], [_empty(), _empty()])
    assert out["zero_acc"] == pytest.approx(0.5)
    assert out["miou"] == pytest.approx(0.5)
    assert out["oiou"] == 0.0


def test_accepts_integer_masks():
    out = referring_metrics([_row(5).astype(np.uint8)], [_row(10).astype(np.uint8)])
    assert out["miou"] == pytest.approx(0.5)


def test_output_is_json_safe_and_silent(capsys):
    out = referring_metrics([_row(7), _empty((1, 10))], [_row(10), _empty((1, 10))])
    json.dumps(out)
    assert all(isinstance(v, float) and math.isfinite(v) for v in out.values())
    # pycocotools' progress prints must not leak into logs.
    assert capsys.readouterr().out == ""


# --------------------------------------------------------------------------
# referring_metrics: COCO mAP
# --------------------------------------------------------------------------


def test_map_perfect_predictions():
    # Every GT matched at every IoU threshold with precision 1 -> AP 1.
    # The both-empty sample adds neither a GT nor a detection.
    preds = [_row(3), _row(10), _empty((1, 10))]
    gts = [_row(3), _row(10), _empty((1, 10))]
    assert referring_metrics(preds, gts)["map"] == pytest.approx(1.0)


def test_map_one_hit_one_miss_ranked_first():
    # Two GTs. Ranked detections: TP (0.9), then FP with IoU 0 (0.8).
    # After det 1: recall 1/2, precision 1; after det 2: recall 1/2, prec 1/2.
    # COCO samples precision at recall 0.00, 0.01, ..., 1.00 (101 points):
    # the 51 points <= 0.5 get precision 1, the 50 above are unreachable -> 0.
    # AP = 51/101 at every IoU threshold, hence also for the mean.
    gt1 = _row(3)
    pred1 = np.zeros((1, 10), dtype=bool)
    pred1[0, 5:8] = True  # disjoint from gt1 -> IoU 0
    preds = [_row(10), pred1]
    gts = [_row(10), gt1]
    out = referring_metrics(preds, gts, scores=[0.9, 0.8])
    assert out["map"] == pytest.approx(51 / 101)

    # Swapped scores: FP first (recall 0, precision 0), then TP (recall 1/2,
    # precision 1/2). The interpolated precision (max over higher recall) is
    # 1/2 on the same 51 recall points -> AP = 25.5/101, half of the above.
    swapped = referring_metrics(preds, gts, scores=[0.8, 0.9])
    assert swapped["map"] == pytest.approx(25.5 / 101)


def test_map_partial_iou_counts_for_low_thresholds_only():
    # gt = 3 px, pred = 4 px covering it -> IoU = 3/4 = 0.75.
    # Thresholds 0.50, 0.55, ..., 0.75 (6 of 10) match with AP 1; for
    # 0.80..0.95 the detection is a FP and the GT is missed -> AP 0.
    # mAP = 6/10.
    out = referring_metrics([_row(4)], [_row(3)])
    assert out["miou"] == pytest.approx(0.75)
    assert out["map"] == pytest.approx(0.6)


def test_map_false_positive_on_empty_gt():
    # sample 0: perfect detection; sample 1: detection on an empty GT (FP).
    # FP ranked first (0.9 > 0.5): recall 0 / prec 0, then recall 1 / prec 1/2;
    # interpolated precision is 1/2 at all 101 recall points -> AP 0.5.
    preds = [_row(4), _row(2)]
    gts = [_row(4), _empty((1, 10))]
    assert referring_metrics(preds, gts, scores=[0.5, 0.9])["map"] == pytest.approx(0.5)
    # FP ranked last: precision 1 is reached at full recall first -> AP 1.
    assert referring_metrics(preds, gts, scores=[0.9, 0.5])["map"] == pytest.approx(1.0)


def test_map_empty_prediction_misses_gt():
    # sample 1 has no detection, so at most half of the GTs can be recalled:
    # precision 1 for recall <= 0.5 -> AP = 51/101 (as in the ranked case).
    preds = [_row(4), _empty((1, 10))]
    gts = [_row(4), _row(4)]
    out = referring_metrics(preds, gts)
    assert out["map"] == pytest.approx(51 / 101)
    assert out["miou"] == pytest.approx(0.5)


def test_map_no_detections_is_zero():
    assert referring_metrics([_empty()], [_full()])["map"] == 0.0


# --------------------------------------------------------------------------
# referring_metrics: validation
# --------------------------------------------------------------------------


def test_length_mismatch_raises():
    with pytest.raises(ValueError, match="2 preds vs 1 gts"):
        referring_metrics([_empty(), _empty()], [_empty()])
    with pytest.raises(ValueError, match="1 scores vs 2 preds"):
        referring_metrics([_empty(), _empty()], [_empty(), _empty()], scores=[0.5])


def test_shape_mismatch_mentions_index_and_shapes():
    with pytest.raises(ValueError, match=r"sample 1.*\(2, 2\).*\(3, 3\)"):
        referring_metrics([_empty(), _empty((2, 2))], [_empty(), _empty((3, 3))])


def test_empty_input_raises():
    with pytest.raises(ValueError, match="at least one sample"):
        referring_metrics([], [])


def test_non_2d_mask_raises():
    with pytest.raises(ValueError, match="sample 0.*2-D"):
        referring_metrics([np.zeros((1, 2, 2), bool)], [np.zeros((1, 2, 2), bool)])


# --------------------------------------------------------------------------
# ConfusionMatrix / semantic_metrics
# --------------------------------------------------------------------------

# 4 classes; class 3 only appears as a prediction on the ignored pixel.
GT = np.array([[0, 0, 1], [1, 2, 255]], dtype=np.uint8)
PRED = np.array([[0, 1, 1], [1, 2, 3]], dtype=np.uint8)
# Counted (gt, pred) pairs: (0,0) (0,1) (1,1) (1,1) (2,2)
# class 0: TP 1, gt 2, pred 1 -> union 2 -> IoU 1/2
# class 1: TP 2, gt 2, pred 3 -> union 3 -> IoU 2/3
# class 2: TP 1, gt 1, pred 1 -> union 1 -> IoU 1
# class 3: absent -> NaN
# mIoU = (1/2 + 2/3 + 1) / 3 = 13/18; pixel acc = 4/5


def test_confusion_matrix_hand_example():
    cm = ConfusionMatrix(num_classes=4, ignore_index=255)
    cm.update(PRED, GT)
    expected = np.zeros((4, 4), dtype=np.int64)
    expected[0, 0] = 1
    expected[0, 1] = 1
    expected[1, 1] = 2
    expected[2, 2] = 1
    np.testing.assert_array_equal(cm.matrix, expected)
    iou = cm.per_class_iou()
    np.testing.assert_allclose(iou[:3], [1 / 2, 2 / 3, 1.0])
    assert np.isnan(iou[3])
    assert cm.miou() == pytest.approx(13 / 18)
    assert cm.pixel_accuracy() == pytest.approx(4 / 5)


def test_confusion_matrix_as_dict_omits_absent_class():
    cm = ConfusionMatrix(4)
    cm.update(PRED, GT)
    out = cm.as_dict(["road", "car", "person", "sky"])
    assert out == pytest.approx(
        {
            "miou": 13 / 18,
            "pixel_acc": 0.8,
            "iou/road": 0.5,
            "iou/car": 2 / 3,
            "iou/person": 1.0,
        }
    )
    assert "iou/sky" not in out
    assert set(cm.as_dict()) == {"miou", "pixel_acc", "iou/0", "iou/1", "iou/2"}


def test_confusion_matrix_accumulates_updates():
    # Feeding the two rows separately must equal one update with both.
    cm = ConfusionMatrix(4)
    cm.update(PRED[:1], GT[:1])
    cm.update(PRED[1:], GT[1:])
    assert cm.miou() == pytest.approx(13 / 18)
    cm.reset()
    assert cm.matrix.sum() == 0


def test_confusion_matrix_false_positive_class_counts_as_zero():
    # gt all class 0, pred marks one pixel as class 1:
    # class 0: TP 3, union 4 -> 3/4; class 1: TP 0, union 1 -> 0
    # mIoU = (3/4 + 0) / 2 = 3/8
    cm = ConfusionMatrix(2)
    cm.update(np.array([[0, 0], [0, 1]]), np.zeros((2, 2), dtype=int))
    np.testing.assert_allclose(cm.per_class_iou(), [0.75, 0.0])
    assert cm.miou() == pytest.approx(3 / 8)


def test_confusion_matrix_empty_is_zero_not_nan():
    cm = ConfusionMatrix(3)
    cm.update(np.array([[1]]), np.array([[255]]))  # only an ignored pixel
    assert cm.as_dict() == {"miou": 0.0, "pixel_acc": 0.0}


def test_confusion_matrix_bad_labels_raise():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match=r"gt labels \[3\]"):
        cm.update(np.zeros((1, 2), int), np.array([[0, 3]]))
    with pytest.raises(ValueError, match=r"gt labels \[-1\]"):
        cm.update(np.zeros((1, 2), int), np.array([[0, -1]]))
    with pytest.raises(ValueError, match=r"pred labels \[7\]"):
        cm.update(np.array([[0, 7]]), np.zeros((1, 2), int))
    with pytest.raises(ValueError, match="shape mismatch"):
        cm.update(np.zeros((2, 2), int), np.zeros((2, 3), int))
    with pytest.raises(ValueError, match="num_classes"):
        ConfusionMatrix(0)
    with pytest.raises(ValueError, match="expected 3 class names"):
        cm.as_dict(["a", "b"])


def test_semantic_metrics_wrapper():
    out = semantic_metrics([PRED], [GT], num_classes=4, class_names=["a", "b", "c", "d"])
    assert out["miou"] == pytest.approx(13 / 18)
    assert out["pixel_acc"] == pytest.approx(0.8)
    assert "iou/d" not in out
    json.dumps(out)


def test_semantic_metrics_errors_mention_index():
    with pytest.raises(ValueError, match="2 preds vs 1 gts"):
        semantic_metrics([PRED, PRED], [GT], num_classes=4)
    with pytest.raises(ValueError, match=r"sample 1: gt labels \[9\]"):
        semantic_metrics([PRED, PRED], [GT, np.full_like(GT, 9)], num_classes=4)


def test_query_type_metrics_by_hand():
    def box(r0, r1, c0, c1):
        m = np.zeros((4, 4), bool)
        m[r0:r1, c0:c1] = True
        return m

    empty = np.zeros((4, 4), bool)
    gts = [box(0, 2, 0, 2), box(0, 4, 0, 2), empty, empty, empty]
    preds = [box(0, 2, 0, 1), box(0, 4, 0, 2), empty, box(0, 1, 0, 1), empty]
    types = ["one", "many", "zero", "zero", "zero"]
    out = query_type_metrics(preds, gts, types)
    # one: 2 / 4; many: 8 / 8; targets: (2 + 8) / (4 + 8), mean of 0.5 and 1
    assert out["one/oiou"] == pytest.approx(0.5) and out["one/n"] == 1
    assert out["many/oiou"] == pytest.approx(1.0) and out["many/miou"] == pytest.approx(1.0)
    assert out["targets/oiou"] == pytest.approx(10 / 12)
    assert out["targets/miou"] == pytest.approx(0.75) and out["targets/n"] == 2
    # zero: right when nothing at all is predicted: 2 of 3
    assert out["zero/acc"] == pytest.approx(2 / 3) and out["zero/n"] == 3


def test_query_type_metrics_leave_out_absent_groups_and_refuse_unknown_types():
    m = np.ones((2, 2), bool)
    assert set(query_type_metrics([m], [m], ["one"])) == {
        "one/oiou",
        "one/miou",
        "one/n",
        "targets/oiou",
        "targets/miou",
        "targets/n",
    }
    with pytest.raises(ValueError, match="unknown query type 'some'"):
        query_type_metrics([m], [m], ["some"])
    with pytest.raises(ValueError, match="length mismatch"):
        query_type_metrics([m], [m, m], ["one"])
