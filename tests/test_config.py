"""Settings: defaults, QALLOC_* environment overrides, typed errors."""

from __future__ import annotations

import pytest

from ray_qalloc.config import load_settings
from ray_qalloc.exceptions import ConfigError


def test_environment_overrides_nested_and_json(tmp_path):
    s = load_settings({"QALLOC_DATA_DIR": str(tmp_path), "QALLOC_LIMITS__MAX_QUBITS": "40",
                       "QALLOC_POOL": "aer_mps,qpu_fez",
                       "QALLOC_SCHEDULER": '{"reserved": {"aer_mps": 1}, "aging_s": 60}'})
    assert s.data_dir == tmp_path and s.limits.max_qubits == 40 and s.pool == ["aer_mps", "qpu_fez"]
    assert s.scheduler == {"reserved": {"aer_mps": 1}, "aging_s": 60}
    assert s.resolved_store_url.endswith("jobs.db") and s.models_dir == tmp_path / "models"


@pytest.mark.parametrize("env, word", [({"QALLOC_LIMITS__MAX_QUBITS": "-3"}, "limits.max_qubits"),
                                       ({"QALLOC_NO_SUCH": "1"}, "QALLOC_NO_SUCH"),
                                       ({"QALLOC_SCHEDULER": "{not json"}, "JSON"),
                                       ({"QALLOC_SCHEDULER": '{"reservd": {}}'}, "reservd")])
def test_bad_settings_are_typed_errors(env, word):
    with pytest.raises(ConfigError, match=word) as info:
        load_settings(env)
    assert "To fix" in str(info.value)


def test_explicit_arguments_win_over_the_environment(tmp_path):
    s = load_settings({"QALLOC_DATA_DIR": "/nowhere"}, data_dir=tmp_path)
    assert s.data_dir == tmp_path
