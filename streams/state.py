"""Table state: one typed codec for the values every stage keeps in its Faust tables.

A stage's state is a frozen dataclass deriving from :class:`TableState`; Faust stores
table values as JSON in a changelog topic, and :func:`converter` turns a state into
JSON-ready values by its type hints and back: datetimes as epoch milliseconds (what
Avro's timestamp-millis keeps on the topics), enum members as their values, nested
dataclasses as objects, lists and string-keyed dicts item by item, and a whole event
(a :class:`schemas.events.Record` with an Avro schema) as its :class:`schemas.codec.Codec`
bytes in base64, validated and encoded exactly as on its topic. :class:`TypedTable` is
a Faust table whose values are one state class; a state class holding a type the codec
cannot store fails when its table is declared, at worker start.
"""

from __future__ import annotations

import base64
import dataclasses
import enum
import functools
import types
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Generic, Self, TypeVar, Union, get_args, get_origin, get_type_hints

from schemas.codec import Codec
from schemas.events import Record

if TYPE_CHECKING:
    from streams.context import StreamContext

S = TypeVar("S", bound="TableState")
E = TypeVar("E")
R = TypeVar("R")

#: turn one value into JSON-ready data, and back; the codec serves the events inside
Dump = Callable[[Any, Codec], Any]
Load = Callable[[Any, Codec], Any]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MILLISECOND = timedelta(milliseconds=1)
#: events in state are self-describing Avro when no registry codec is given
_SELF_DESCRIBING = Codec()


class TableState:
    """Base of every stage's table state: ``to_dict`` / ``from_dict`` through the one codec.

    ``codec`` encodes the events a state holds (the worker passes its own, so events in
    tables are framed like those on its topics); omitted, single-object Avro encoding.
    """

    def to_dict(self, codec: Codec | None = None) -> dict[str, Any]:
        dump, _ = converter(type(self))
        return dump(self, codec or _SELF_DESCRIBING)

    @classmethod
    def from_dict(cls, data: dict[str, Any], codec: Codec | None = None) -> Self:
        _, load = converter(cls)
        return load(data, codec or _SELF_DESCRIBING)


@functools.cache
def converter(hint: Any) -> tuple[Dump, Load]:
    """How a value of type ``hint`` is stored; TypeError naming the type if it cannot be."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        present = [arg for arg in args if arg is not type(None)]
        if len(present) != 1 or len(args) != 2:
            raise TypeError(f"table state holds {hint}: only 'X | None' unions can be stored")
        dump, load = converter(present[0])
        return (lambda v, c: None if v is None else dump(v, c)), (lambda v, c: None if v is None else load(v, c))
    if origin is list:
        dump, load = converter(args[0])
        return (lambda v, c: [dump(x, c) for x in v]), (lambda v, c: [load(x, c) for x in v])
    if origin is dict:
        if args[0] is not str:
            raise TypeError(f"table state holds {hint}: JSON object keys are strings")
        dump, load = converter(args[1])
        return (lambda v, c: {k: dump(x, c) for k, x in v.items()}), (lambda v, c: {k: load(x, c) for k, x in v.items()})
    if hint is datetime:
        return (lambda v, c: (v - _EPOCH) // _MILLISECOND), (lambda v, c: _EPOCH + v * _MILLISECOND)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return (lambda v, c: v.value), (lambda v, c: hint(v))
    if isinstance(hint, type) and issubclass(hint, Record) and hint.SCHEMA:
        return (lambda v, c: base64.b64encode(c.encode(v)).decode("ascii")), (lambda v, c: c.decode(base64.b64decode(v), hint))
    if dataclasses.is_dataclass(hint):
        return _dataclass_converter(hint)
    if hint in (str, int, float, bool):
        return (lambda v, c: v), (lambda v, c: v)
    raise TypeError(f"table state holds {hint!r}, which the state codec cannot store")


def _dataclass_converter(cls: type) -> tuple[Dump, Load]:
    hints = get_type_hints(cls)
    fields = {f.name: converter(hints[f.name]) for f in dataclasses.fields(cls)}

    def dump(value: Any, codec: Codec) -> dict[str, Any]:
        return {name: to(getattr(value, name), codec) for name, (to, _) in fields.items()}

    def load(data: dict[str, Any], codec: Codec) -> Any:
        # a field missing from stored state takes its default: a state class may grow a
        # field without its changelog being thrown away
        return cls(**{name: back(data[name], codec) for name, (_, back) in fields.items() if name in data})

    return dump, load


class TypedTable(Generic[S]):
    """A Faust table keyed by string whose values are one :class:`TableState` class.

    Faust allows writes only inside stream iteration: stages write from the runner's
    handlers, the assembly clock only reads.
    """

    def __init__(self, table: Any, state: type[S], codec: Codec) -> None:
        converter(state)  # a state the codec cannot store fails here, at worker start
        self.table, self.state, self.codec = table, state, codec

    @classmethod
    def declare(cls, ctx: StreamContext, name: str, state: type[S]) -> TypedTable[S]:
        return cls(ctx.app.Table(name, partitions=ctx.settings.kafka.partitions), state, ctx.codec)

    def get(self, key: str) -> S | None:
        data = self.table.get(key)
        return None if data is None else self.state.from_dict(data, self.codec)

    def __getitem__(self, key: str) -> S:
        return self.state.from_dict(self.table[key], self.codec)

    def __setitem__(self, key: str, value: S) -> None:
        self.table[key] = value.to_dict(self.codec)

    def __delitem__(self, key: str) -> None:
        del self.table[key]

    def keys(self) -> list[str]:
        return list(self.table.keys())

    def items(self) -> Iterator[tuple[str, S]]:
        for key, data in list(self.table.items()):
            yield key, self.state.from_dict(data, self.codec)

    def apply(self, key: str, step: Callable[[S | None, E], tuple[S, R]], event: E) -> tuple[S, R]:
        """Run a stage's pure ``step(state, event)`` on the state under ``key``; store what it returns."""
        current = self.get(key)
        state, result = step(current, event)
        if state != current:
            self[key] = state
        return state, result
