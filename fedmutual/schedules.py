"""Schedules for loss weights such as FML's alpha and beta.

A schedule maps the round t (0-based) of a run of T rounds to a value.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Schedule(BaseModel):
    """constant: ``value``; linear and cosine: ``start`` -> ``end`` over the run;
    step: ``values`` held for equal fractions of the run (e.g. 0.1, 0.5, 0.9 for thirds)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["constant", "step", "linear", "cosine"] = "constant"
    value: float | None = Field(default=None, ge=0.0, le=1.0)
    start: float | None = Field(default=None, ge=0.0, le=1.0)
    end: float | None = Field(default=None, ge=0.0, le=1.0)
    values: list[float] | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_number(cls, data: object) -> object:
        if isinstance(data, (int, float)) and not isinstance(data, bool):
            return {"kind": "constant", "value": float(data)}
        return data

    @model_validator(mode="after")
    def _check(self) -> "Schedule":
        need = {"constant": ["value"], "linear": ["start", "end"], "cosine": ["start", "end"], "step": ["values"]}[self.kind]
        missing = [k for k in need if getattr(self, k) is None]
        if missing:
            raise ValueError(f"a {self.kind} schedule needs {' and '.join(missing)}")
        if self.kind == "step":
            if not self.values or any(not 0.0 <= v <= 1.0 for v in self.values):
                raise ValueError("a step schedule needs a non-empty list of values in [0, 1]")
        return self

    def at(self, t: int, total: int) -> float:
        """The value in round ``t`` (0-based) of ``total`` rounds."""
        if self.kind == "constant":
            return float(self.value)  # type: ignore[arg-type]
        if self.kind == "step":
            vals = self.values or []
            return float(vals[min(len(vals) - 1, t * len(vals) // max(total, 1))])
        frac = t / (total - 1) if total > 1 else 1.0
        a, b = float(self.start), float(self.end)  # type: ignore[arg-type]
        if self.kind == "linear":
            return a + (b - a) * frac
        return b + (a - b) * 0.5 * (1.0 + math.cos(math.pi * frac))
