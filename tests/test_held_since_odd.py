"""The oldest hold the sinks report (Sink.holding_since), with a plugin sink answering oddly: a NaN made
`min()` return NaN whatever a parquet sink held (NaN compares false), so the controller saved its newest
checkpoint and a kill -9 lost the parquet file's rows again; an infinity stopped the saving for good."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import pytest

from pipeline.runtime.local import LocalRuntime


class Holds:
    def __init__(self, value: Any) -> None:
        self.value = value

    def holding_since(self) -> Any:
        if isinstance(self.value, Exception):
            raise self.value
        return self.value


def held(*values: Any) -> float | None:
    rt = SimpleNamespace(b=SimpleNamespace(sinks=[SimpleNamespace(sink=Holds(v)) for v in values]))
    return LocalRuntime._held_since(rt)  # type: ignore[arg-type]


@pytest.mark.parametrize("odd", [math.nan, math.inf, -math.inf, "12", True, 10**400, None, RuntimeError("bug")])
def test_an_odd_answer_neither_hides_nor_fakes_what_a_parquet_sink_holds(odd: Any) -> None:
    assert held(odd, 100.0) == 100.0
    assert held(100.0, odd) == 100.0
    assert held(odd) is None
