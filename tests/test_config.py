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
    ({"PRESCORE_KEEP_RATIO": "abc"}, "PRESCORE_KEEP_RATIO='abc': expected float"),
    ({"PRESCORE_TILE_SIZE": "24"}, "PRESCORE_TILE_SIZE"),
    ({"PRESCORE_WINDOW_TOKENS": "40"}, "PRESCORE_WINDOW_TOKENS"),
    ({"PRESCORE_WINDOW_TOKENS": "16"}, "at least 2 tiles"),
    ({"PRESCORE_LSH_BITS": "11"}, "PRESCORE_LSH_BITS"),
    ({"PRESCORE_QUERY_AWARE": "oracle"}, "PRESCORE_QUERY_AWARE"),
    ({"PRESCORE_QUERY_CAP_RATIO": "2"}, "PRESCORE_QUERY_CAP_RATIO"),
    ({"PRESCORE_QUERY_CHANNELS": "3"}, "PRESCORE_QUERY_CHANNELS"),
    ({"PRESCORE_QUERY_CHANNELS": "0"}, "even number"),
    ({"PRESCORE_AGGREGATE": "median"}, "PRESCORE_AGGREGATE"),
])
def test_invalid_values_name_the_setting(env, needle):
    with pytest.raises(ConfigError) as e:
        PrescoreConfig.from_env(env)
    assert needle in str(e.value)
