"""Read-only attributes of the tier classes, declared once.

A tier class (``DiskStorage``, ``HostStorage``) declares each read-only
attribute with one :class:`ReadOnly` line (its type, where its value comes
from, its docs); the class's ``READ_ONLY`` tuple lists them, in order, and a
manager's :class:`~dynblock.manager.TierView` exposes exactly those.
"""

from __future__ import annotations

from typing import Any, Callable, Generic, Optional, Tuple, TypeVar, overload

T = TypeVar("T")


class ReadOnly(Generic[T]):
    """A read-only attribute: ``getter(instance)``, or by default the
    attribute of the same name of the instance's native object (the one its
    class names in ``_NATIVE``)."""

    def __init__(self, getter: Optional[Callable[[Any], T]] = None, doc: Optional[str] = None) -> None:
        self._getter = getter
        self.__doc__ = doc
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name
        listed: Tuple[str, ...] = owner.__dict__.get("READ_ONLY", ())
        owner.READ_ONLY = listed + (name,)  # type: ignore[attr-defined]

    @overload
    def __get__(self, obj: None, objtype: Optional[type] = None) -> "ReadOnly[T]": ...

    @overload
    def __get__(self, obj: object, objtype: Optional[type] = None) -> T: ...

    def __get__(self, obj: Optional[object], objtype: Optional[type] = None) -> Any:
        if obj is None:
            return self
        if self._getter is not None:
            return self._getter(obj)
        return getattr(getattr(obj, type(obj)._NATIVE), self.name)  # type: ignore[attr-defined]

    def __set__(self, obj: object, value: Any) -> None:
        raise AttributeError(f"{self.name} is read-only")
