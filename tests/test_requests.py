"""Per-request controls: parsing, admission checks and row bookkeeping."""

from __future__ import annotations

import pytest
import torch

from prescore_backend import requests as rq


def test_parse_controls():
    assert rq.parse_controls(None) is None
    assert rq.parse_controls({"other_plugin_key": 3}) is None
    c = rq.parse_controls({"prescore_keep_ratio": 0.25, "prescore_method": "kmeans",
                           "prescore_dense": False, "x": 1})
    assert c == rq.RequestControls(keep_ratio=0.25, method="kmeans", dense=False)
    assert rq.parse_controls({"prescore_max_tokens": 512}).max_tokens == 512
    assert rq.parse_controls({"prescore_streaming": True}).streaming
    assert rq.parse_controls({"prescore_max_tokens": 2**31 - 1}).max_tokens == 2**31 - 1
    # the pairs that do not contradict: a ratio or a token count with StreamingLLM, dense
    # with its own scorer for the blocks it fills, a control set to false beside any other
    assert rq.parse_controls({"prescore_max_tokens": 64, "prescore_streaming": True})
    assert rq.parse_controls({"prescore_dense": True, "prescore_method": "kmeans"}).dense
    assert rq.parse_controls({"prescore_dense": False, "prescore_keep_ratio": 0.5})
    assert rq.parse_controls({"prescore_streaming": False, "prescore_dense": True}).dense


def test_streaming_is_refused_where_the_tiles_are_ranked_by_their_prescores(monkeypatch):
    """prescore_streaming reads the tiles' pre-scores as their positions: a server whose
    selection reads its scorer's pre-scores (query_cap_ratio < 1) or keeps two tiers refuses
    it at admission; the default accepts it."""
    for env, ok in (({}, True), ({"PRESCORE_QUERY_CAP_RATIO": "0.5"}, False),
                    ({"PRESCORE_LOW_TIER_BITS": "3"}, False)):
        for k in ("PRESCORE_QUERY_CAP_RATIO", "PRESCORE_LOW_TIER_BITS"):
            monkeypatch.delenv(k, raising=False)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        rq._server_streams.cache_clear()
        assert rq.parse_controls({"prescore_streaming": False}).streaming is False
        if ok:
            assert rq.parse_controls({"prescore_streaming": True}).streaming
        else:
            with pytest.raises(ValueError, match="prescore_streaming needs a server"):
                rq.parse_controls({"prescore_streaming": True})
    rq._server_streams.cache_clear()


@pytest.mark.parametrize("args,needle", [
    ({"prescore_keep_ratio": 0}, "prescore_keep_ratio must be a number in (0, 1]"),
    ({"prescore_keep_ratio": 1.5}, "prescore_keep_ratio"),
    ({"prescore_keep_ratio": "0.5"}, "prescore_keep_ratio"),
    ({"prescore_keep_ratio": float("nan")}, "prescore_keep_ratio"),
    ({"prescore_keep_ratio": 10**400}, "prescore_keep_ratio must be a number in (0, 1]"),
    ({"prescore_max_tokens": -3}, "prescore_max_tokens"),
    ({"prescore_method": "magic"}, "prescore_method must be one of"),
    ({"prescore_dense": "yes"}, "prescore_dense"),
    ({"prescore_streaming": "yes"}, "prescore_streaming must be true or false"),
    ({"prescore_budget": 3}, "unknown prescore control 'prescore_budget'"),
    # beyond int64 tiles at small tiles (the plan's budgets are int64 tensors)
    ({"prescore_max_tokens": 2**64 - 1}, "prescore_max_tokens must be an integer in [1, "),
    ({"prescore_max_tokens": 2**31}, "prescore_max_tokens"),
    # misspelt keys are refused, not ignored
    ({"prescore-keep-ratio": 0.25}, "did you mean 'prescore_keep_ratio'"),
    ({"Prescore_Dense": True}, "unknown prescore control 'Prescore_Dense'"),
    # contradicting pairs are refused, not one of them silently dropped
    ({"prescore_keep_ratio": 0.5, "prescore_max_tokens": 64},
     "prescore_keep_ratio and prescore_max_tokens contradict"),
    ({"prescore_dense": True, "prescore_keep_ratio": 0.5}, "prescore_dense and prescore_keep"),
    ({"prescore_dense": True, "prescore_max_tokens": 64}, "prescore_dense and prescore_max"),
    ({"prescore_dense": True, "prescore_streaming": True}, "prescore_dense and prescore_stre"),
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


def test_processor_serves_model_runner_v2_slots():
    """vLLM's default on GPUs, Model Runner V2, loads only subclasses of its own interface
    (else every start fails) and hands each request's slot to ``add_request``; the builder maps
    a step's batch rows to slots through ``CommonAttentionMetadata.req_idx``."""
    import numpy as np
    from vllm import SamplingParams
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as V2
    from vllm.v1.worker.gpu.sample.logits_processor.loader import _load_v2_logitsprocs_plugins

    cls = rq.PrescoreRequestControls
    assert issubclass(cls, V2) and cls in _load_v2_logitsprocs_plugins()
    proc = cls(None, object())  # V2 signature: (vllm_config, req_states)
    sp = lambda **kw: SamplingParams(extra_args=kw)  # noqa: E731
    assert proc.add_request(5, sp(prescore_keep_ratio=0.25)) is False  # logits unchanged
    assert proc.add_request(2, sp(prescore_dense=True)) is False
    proc.add_request(7, SamplingParams())
    logits = torch.randn(3, 11)
    assert proc.apply(logits, None) is logits
    got = rq.ROWS.for_batch(3, np.array([7, 5, 2]))
    assert got.keys() == {1, 2} and got[1].keep_ratio == 0.25 and got[2].dense
    proc.add_request(5, SamplingParams())  # slot 5 reused by a request without controls
    assert rq.ROWS.for_batch(3, np.array([7, 5, 2])).keys() == {2}
    rq.ROWS.clear()
