"""The validated config object and its one env-var parser."""

from __future__ import annotations

import pytest

from prescore_backend.config import (TESTING_EXACT_VIA_SPARSE_ENV, ConfigError, PrescoreConfig,
                                     field_docs, testing_exact_via_sparse)


def test_defaults_are_valid_and_documented():
    cfg = PrescoreConfig()
    assert cfg.sink_tiles * cfg.tile_size == cfg.sink_tokens
    assert cfg.window_tiles * cfg.tile_size == cfg.window_tokens
    docs = field_docs()
    assert set(docs) == set(cfg.to_dict()) and all(docs.values())


def test_from_env_parses_types():
    cfg = PrescoreConfig.from_env({"PRESCORE_KEEP_RATIO": "0.25", "PRESCORE_TILE_SIZE": "32",
                                   "PRESCORE_SINK_TOKENS": "32", "PRESCORE_WINDOW_TOKENS": "128",
                                   "PRESCORE_METHOD": "kmeans",
                                   "UNRELATED": "x"})
    assert (cfg.keep_ratio, cfg.tile_size, cfg.method) == (0.25, 32, "kmeans")


def test_validation_switch_is_not_a_setting():
    """The tests' exact-via-sparse switch has no field, flag or docs; it parses as a bool."""
    assert "exact_via_sparse" not in PrescoreConfig().to_dict()
    assert testing_exact_via_sparse({TESTING_EXACT_VIA_SPARSE_ENV: "yes"})
    assert not testing_exact_via_sparse({})
    with pytest.raises(ConfigError, match="expected bool"):
        testing_exact_via_sparse({TESTING_EXACT_VIA_SPARSE_ENV: "maybe"})


@pytest.mark.parametrize("env,needle", [
    ({"PRESCORE_METHOD": "nope"}, "PRESCORE_METHOD / --prescore-method"),
    ({"PRESCORE_KEEP_RATIO": "0"}, "PRESCORE_KEEP_RATIO"),
    ({"PRESCORE_KEEP_RATIO": "1.5"}, "PRESCORE_KEEP_RATIO"),
    ({"PRESCORE_KEEP_RATIO": "abc"},
     "keep_ratio='abc' (PRESCORE_KEEP_RATIO / --prescore-keep-ratio): expected float"),
    ({"PRESCORE_TILE_SIZE": "16.0"}, "(PRESCORE_TILE_SIZE / --prescore-tile-size): expected int"),
    # beyond int64 in the plan: crashed the first step (seed: the engine's start), or wrapped
    # around (a min_seq_len of 2**63 made every short row sparse)
    ({"PRESCORE_SEED": str(2**64)}, "PRESCORE_SEED / --prescore-seed): must be an integer"),
    ({"PRESCORE_MIN_SEQ_LEN": str(2**63)}, "PRESCORE_MIN_SEQ_LEN / --prescore-min-seq-len)"),
    ({"PRESCORE_MAX_TOKENS": str(10**21)}, "PRESCORE_MAX_TOKENS"),
    ({"PRESCORE_SINK_TOKENS": str(16 * 10**20)}, "PRESCORE_SINK_TOKENS"),
    ({"PRESCORE_WINDOW_TOKENS": str(2**40)}, "must be an integer of at most 2147483647"),
    ({"PRESCORE_RESIDUAL_TILES": str(2**31)}, "PRESCORE_RESIDUAL_TILES"),
    ({"PRESCORE_MAX_TOKENS": str(-10**12)}, "must be >= 0"),  # each field's own lower bound
    ({"PRESCORE_SEED": str(-2**64)}, "PRESCORE_SEED / --prescore-seed): must be at least"),
    ({"PRESCORE_TILE_SIZE": "24"}, "PRESCORE_TILE_SIZE"),
    ({"PRESCORE_WINDOW_TOKENS": "40"}, "PRESCORE_WINDOW_TOKENS"),
    ({"PRESCORE_WINDOW_TOKENS": "16"}, "at least 2 tiles"),
    ({"PRESCORE_LSH_BITS": "11"}, "PRESCORE_LSH_BITS"),
    ({"PRESCORE_QUERY_AWARE": "oracle"}, "PRESCORE_QUERY_AWARE"),
    ({"PRESCORE_QUERY_CAP_RATIO": "2"}, "PRESCORE_QUERY_CAP_RATIO"),
    ({"PRESCORE_QUERY_CHANNELS": "3"}, "PRESCORE_QUERY_CHANNELS"),
    ({"PRESCORE_QUERY_CHANNELS": "-2"}, "even number"),
    ({"PRESCORE_AGGREGATE": "median"}, "PRESCORE_AGGREGATE"),
    # needs the whole context's top-k: crashed the first prefill's scoring before
    ({"PRESCORE_AGGREGATE": "topk_count", "PRESCORE_QUERY_CAP_RATIO": "0.5"},
     "PRESCORE_AGGREGATE / --prescore-aggregate): valid: max, sum, mean"),
    # the default ranking's key copy is read 16 tokens at a time (crashed mid-serving before)
    ({"PRESCORE_TILE_SIZE": "8", "PRESCORE_SINK_TOKENS": "16", "PRESCORE_WINDOW_TOKENS": "128"},
     "PRESCORE_TILE_SIZE / --prescore-tile-size): query_aware='sparq4'"),
])
def test_invalid_values_name_the_setting(env, needle):
    with pytest.raises(ConfigError) as e:
        PrescoreConfig.from_env(env)
    assert needle in str(e.value)


@pytest.mark.parametrize("changes,head_dim,want", [
    ({}, 64, 16),  # keep 1/8: 16 x (0.5 + 8/128) bytes = 28% of 32 bytes per token
    ({"keep_ratio": 1 / 16}, 64, 8),
    ({"keep_ratio": 0.25}, 64, 32),
    ({"keep_ratio": 1 / 32}, 64, 8),  # never fewer than 8
    ({"keep_ratio": 1.0}, 64, 8),
    ({}, 128, 32),  # the same share of a larger head
    ({"keep_ratio": 0.25}, 128, 64),
    ({"query_channels": 12}, 64, 12),  # an explicit count wins
    ({"query_channels": 96}, 64, 64),  # at most the head dim
    ({"max_tokens": 2048}, 64, 8),  # no ratio to follow
    ({"query_aware": "sparq"}, 64, 8),
    ({"low_tier_bits": 3}, 64, 8),  # the two tiers as evaluated
])
def test_ranking_channels_follow_the_budget(changes, head_dim, want):
    from prescore_backend.config import AUTO_CHANNEL_SHARE
    from prescore_backend.keycopy import scale_bytes_per_token

    cfg = PrescoreConfig(**changes)
    nc = cfg.ranking_channels(head_dim)
    assert nc == want
    if (not changes or list(changes) == ["keep_ratio"]) and cfg.keep_ratio < 1:
        # the rule: the most multiples of 8 whose bytes at block 128 (where the share was
        # fitted) stay within the share of the budget
        budget = cfg.keep_ratio * 2 * head_dim * 2
        cost = lambda c: c / 2 + scale_bytes_per_token(c, 128)  # noqa: E731
        assert nc == 8 or cost(nc) <= AUTO_CHANNEL_SHARE * budget
        assert nc + 8 > head_dim or cost(nc + 8) > AUTO_CHANNEL_SHARE * budget


@pytest.mark.parametrize("block,side_bytes", [(128, 8 + 1), (32, 8 + 4), (16, 8 + 8)])
def test_the_channels_scales_are_charged_at_the_cache_s_block_size(block, side_bytes):
    """The same 16 channels at keep 1/8 whatever the block size (re-fit at block 16:
    docs/results/selection_channels_block16.md), their per-block scales charged to the
    step's bytes at the cache's block size: 8 bytes of codes per token and KV head, and
    16 x 8 / block of scales, against a bf16 token's 256."""
    from prescore_backend.selection import side_read_fraction

    cfg = PrescoreConfig()
    assert cfg.ranking_channels(64) == 16
    assert side_read_fraction(cfg, 64, block_size=block) == pytest.approx(side_bytes / 256)


def test_small_tiles_with_other_rankings_are_accepted():
    cfg = PrescoreConfig(tile_size=8, query_aware="quest")
    assert cfg.tile_size == 8


def test_configuration_reference_is_current():
    """docs/configuration.md is generated from the fields' docs: regenerate it with
    `python -m prescore_backend.config > docs/configuration.md`."""
    from pathlib import Path

    from prescore_backend.config import flag_name, reference_markdown

    page = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
    assert page.read_text() == reference_markdown()
    for name in PrescoreConfig().to_dict():
        assert f"`{flag_name(name)}`" in page.read_text()
