"""The building blocks of every typed params section (``components.config`` and the methods'
own sections in ``components.adaptation.configs``)."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

PositiveInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


class Section(BaseModel):
    """A frozen params section: unknown keys are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)
