"""Per-request controls: parsing, admission checks and row bookkeeping."""

from __future__ import annotations

import pytest

from prescore_backend import requests as rq


def test_parse_controls():
    assert rq.parse_controls(None) is None
    assert rq.parse_controls({"other_plugin_key": 3}) is None
    c = rq.parse_controls({"prescore_keep_ratio": 0.25, "prescore_method": "kmeans",
                           "prescore_dense": False, "x": 1})
    assert c == rq.RequestControls(keep_ratio=0.25, method="kmeans", dense=False)
    assert rq.parse_controls({"prescore_max_tokens": 512}).max_tokens == 512


@pytest.mark.parametrize("args,needle", [
    ({"prescore_keep_ratio": 0}, "prescore_keep_ratio must be a number in (0, 1]"),
    ({"prescore_keep_ratio": 1.5}, "prescore_keep_ratio"),
    ({"prescore_keep_ratio": "0.5"}, "prescore_keep_ratio"),
    ({"prescore_keep_ratio": float("nan")}, "prescore_keep_ratio"),
    ({"prescore_max_tokens": -3}, "prescore_max_tokens"),
    ({"prescore_method": "magic"}, "prescore_method must be one of"),
    ({"prescore_dense": "yes"}, "prescore_dense"),
    ({"prescore_budget": 3}, "unknown prescore control 'prescore_budget'"),
])
def test_invalid_controls_are_refused(args, needle):
    with pytest.raises(ValueError) as e:
        rq.parse_controls(args)
    assert needle in str(e.value)


def test_processor_tracks_rows_through_adds_moves_and_removals():
    from vllm import SamplingParams
    from vllm.v1.sample.logits_processor import BatchUpdate
    from vllm.v1.sample.logits_processor.interface import MoveDirectionality as Mv

    cls = rq.PrescoreRequestControls
    with pytest.raises(ValueError):
        cls.validate_params(SamplingParams(extra_args={"prescore_keep_ratio": 7}))
    cls.validate_params(SamplingParams(extra_args={"prescore_keep_ratio": 0.5}))

    proc = cls(None, "cpu", False)
    assert proc.is_argmax_invariant()
    sp = lambda **kw: SamplingParams(extra_args=kw)  # noqa: E731
    proc.update_state(BatchUpdate(batch_size=3, removed=[], moved=[], added=[
        (0, sp(prescore_keep_ratio=0.5), None, []),
        (1, SamplingParams(), None, []),
        (2, sp(prescore_method="random"), None, []),
    ]))
    assert rq.ROWS.get(0).keep_ratio == 0.5 and rq.ROWS.get(1) is None
    proc.update_state(BatchUpdate(batch_size=3, removed=[], added=[],
                                  moved=[(0, 2, Mv.SWAP)]))
    assert rq.ROWS.get(2).keep_ratio == 0.5 and rq.ROWS.get(0).method == "random"
    proc.update_state(BatchUpdate(batch_size=2, removed=[2], added=[],
                                  moved=[(0, 1, Mv.UNIDIRECTIONAL)]))
    assert rq.ROWS.get(2) is None and rq.ROWS.get(0) is None
    assert rq.ROWS.get(1).method == "random"
    proc.update_state(None)  # no change in batch makeup
    assert rq.ROWS.get(1).method == "random"
    proc.update_state(BatchUpdate(batch_size=0, removed=[1], added=[], moved=[]))
    assert rq.ROWS.rows == {}


def test_logits_processor_entry_point_is_registered():
    import importlib.metadata

    eps = [ep for ep in importlib.metadata.entry_points(group="vllm.logits_processors")
           if ep.name == "prescore"]
    assert len(eps) == 1 and eps[0].load() is rq.PrescoreRequestControls
