"""The building blocks of the spec's models: frozen pydantic models that forbid unknown fields,
and dicts that refuse changes, so that a validated spec stays what was validated."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, StrictBool


class FrozenDict(dict):  # type: ignore[type-arg]
    """A dict that refuses changes, so that a validated spec stays what was validated."""

    def _immutable(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("a validated spec cannot be changed; build a new one")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = __ior__ = _immutable

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (dict(self),))

    def __deepcopy__(self, memo: dict[int, Any]) -> FrozenDict:
        return self


def frozen_dict(value: dict[str, Any]) -> dict[str, Any]:
    return FrozenDict(value)


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


ParamValue = StrictBool | int | float | str | list[float]
Parameters = Annotated[dict[str, ParamValue], AfterValidator(frozen_dict)]
