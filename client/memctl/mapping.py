"""``MemctlMapping``: the store seen as a ``MutableMapping[str, bytes]``.

The shape Dask's ``data=`` hook and zict expect: ``m[key] = value`` puts,
``m[key]`` gets, ``del m[key]`` deletes, iteration lists keys page by page. The
bulk methods (``update``, ``get_many``, ``delete_many``) travel as batches.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from typing import Any

from .client import Client


class MemctlMapping(MutableMapping[str, bytes]):
    """A dict-like view of the caller's scope in a memctl daemon."""

    def __init__(self, client: Client):
        self.client = client

    def __getitem__(self, key: str) -> bytes:
        return self.client.get(key)

    def __setitem__(self, key: str, value: bytes) -> None:
        self.client.put(key, value)

    def __delitem__(self, key: str) -> None:
        if not self.client.delete(key):
            raise KeyError(key)

    def update(self, other: Any = (), /, **kwargs: bytes) -> None:
        """Store many values in as few messages as carry them (``Client.put_many``)."""
        pairs = dict(other.items() if isinstance(other, Mapping) else other)
        pairs.update(kwargs)
        self.client.put_many(pairs)

    def get_many(self, keys: Iterable[str]) -> dict[str, bytes]:
        """The values of ``keys`` that exist, in one batch (``Client.get_many``)."""
        return self.client.get_many(keys)

    def delete_many(self, keys: Iterable[str]) -> int:
        """Remove ``keys`` in one batch; how many existed."""
        return self.client.delete_many(keys)

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        try:
            self.client.stat(key)
        except KeyError:
            return False
        return True

    def __iter__(self) -> Iterator[str]:
        return (info.key for info in self.client.list_keys())

    def __len__(self) -> int:
        # Counted by listing: the caller's scope may be a worker's, not the service's.
        return sum(1 for _ in self.client.list_keys())

    def __repr__(self) -> str:
        return f"MemctlMapping({self.client.address!r})"
