"""The lists `pipeline report` keeps (marks, alert rows, lifecycle), under one budget of bytes for all sessions.

Each list has a cap of its own (1,500 marks per track, ...) and knows the bytes it holds; when all lists
together (and what is charged beside them: keywords, never dropped) hold more than the budget, every cap
is halved (also for lists made later) until they fit, so memory is bounded whatever the number of
sessions, lanes and texts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Budget:
    """Bytes held by all kept lists together; past `limit`, every list's cap is halved until they fit."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.level = 0  # every cap is its base >> level (at least 1)
        self._top = 0  # the level at which every cap is 1
        self._lists: list[Kept[Any]] = []

    def add(self, kept: Kept[Any]) -> None:
        self._lists.append(kept)
        self._top = max(self._top, kept.base.bit_length() - 1)

    def charge(self, size: int) -> None:
        """Count bytes held outside the lists (they are never dropped: the lists make room)."""
        self.used += size
        self.settle()

    def settle(self) -> None:
        """Halve every cap until all lists together fit in `limit` (or every cap is 1)."""
        while self.used > self.limit and self.level < self._top:
            self.level += 1
            for kept in self._lists:
                kept.fit()


class Kept(Generic[T]):
    """Items of one list, at most `cap` of them, and the bytes they hold (`cost` of each)."""

    __slots__ = ("base", "budget", "cost", "items", "seen", "size")

    def __init__(self, base: int, cost: Callable[[T], int], budget: Budget) -> None:
        self.base = base
        self.cost = cost
        self.budget = budget
        self.items: list[T] = []
        self.seen = 0  # items offered, kept or not
        self.size = 0  # bytes held by `items`
        budget.add(self)

    @property
    def cap(self) -> int:
        return max(1, self.base >> self.budget.level)

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[T]:
        return iter(self.items)

    def _keep(self, items: list[T], size: int) -> None:
        self.budget.used += size - self.size
        self.items, self.size = items, size

    def add(self, item: T) -> None:
        """Offer an item: kept or only counted."""
        raise NotImplementedError

    def fit(self) -> None:
        """Drop items until at most `cap` are left."""
        raise NotImplementedError


class Track(Kept[T]):
    """Items thinned evenly (the marks of one channel on one lane, lifecycle entries): past `cap` every other
    one is dropped, and from then on only every 2nd (then 4th, ...) new item is kept."""

    __slots__ = ("stride",)

    def __init__(self, base: int, cost: Callable[[T], int], budget: Budget) -> None:
        super().__init__(base, cost, budget)
        self.stride = 1

    @property
    def marks(self) -> list[T]:
        return self.items

    def add(self, item: T) -> None:
        self.seen += 1
        if (self.seen - 1) % self.stride:
            return
        self.items.append(item)
        self._keep(self.items, self.size + self.cost(item))
        self.fit()
        self.budget.settle()

    def fit(self) -> None:
        while len(self.items) > self.cap:
            self.stride *= 2
            self._keep(self.items[::2], self.size - sum(map(self.cost, self.items[1::2])))


class Earliest(Kept[T]):
    """The first `cap` items (alert rows); later ones are only counted."""

    __slots__ = ()

    def add(self, item: T) -> None:
        self.seen += 1
        if len(self.items) < self.cap:
            self.items.append(item)
            self._keep(self.items, self.size + self.cost(item))
            self.budget.settle()

    def fit(self) -> None:
        if len(self.items) > self.cap:
            self._keep(self.items[:self.cap], self.size - sum(map(self.cost, self.items[self.cap:])))
