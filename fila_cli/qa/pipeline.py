"""Running a generator ahead of its reader in a thread, a bounded number of items ahead.

``fila batch`` draws its prepared pages (rendered in the document worker, encoded by torch) from a
generator while the LLM answers them. Drawn in the same thread, the stages take turns: a page
costs render + encode + LLM. Drawn through a ``RunAhead``, the next page is rendered and encoded
while the LLM answers the current one, so a page costs about the slowest stage alone. Both torch's
matmuls and llama.cpp's decode release the GIL, and the render is another process.

    for item in RunAhead(prepare_everything(), depth=1):
        answer(item)  # item i+1 is being prepared meanwhile

``depth`` bounds what is made ahead: the producer asks the generator for its next item only when
fewer than ``depth`` items are waiting to be taken, so at most ``depth`` items exist besides the
one the reader holds (memory: ``depth`` pages of visual tokens).

The items arrive in the generator's order; an exception the generator raises is raised to the
reader in its place. ``close`` stops the producer at its next item and waits for it, so the
generator's ``finally`` blocks have run when ``close`` returns.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Generic, TypeVar

Item = TypeVar("Item")

# How often a producer waiting for room looks whether the reader has gone (seconds): the wait for
# ``close`` after Ctrl-C, not a cost on the way.
_POLL_S = 0.1


class _Finished:
    """The generator is exhausted (or raised ``error``)."""

    def __init__(self, error: BaseException | None = None):
        self.error = error


class RunAhead(Generic[Item]):
    """Iterate ``items`` in a producer thread, at most ``depth`` (>= 1) items ahead of the reader."""

    def __init__(self, items: Iterator[Item], depth: int, *, name: str = "fila-run-ahead"):
        if depth < 1:
            raise ValueError(f"depth must be at least 1 (got {depth}); iterate the generator itself for none")
        self._items = items
        self._room = threading.Semaphore(depth)  # items the producer may make before the reader takes one
        self._ready: queue.SimpleQueue = queue.SimpleQueue()  # made, not yet taken, in order
        self._closing = threading.Event()
        self._finished = False
        self._thread = threading.Thread(target=self._produce, name=name, daemon=True)
        self._thread.start()

    def _produce(self) -> None:
        try:
            while self._wait_for_room():
                try:
                    item = next(self._items)
                except StopIteration:
                    break
                self._ready.put(item)
            else:
                return  # closed: the reader wants nothing more
            self._ready.put(_Finished())
        except BaseException as error:  # the reader raises it where the item would have been
            self._ready.put(_Finished(error))
        finally:
            close = getattr(self._items, "close", None)
            if close is not None:
                close()  # run the generator's own clean-up in the thread that ran it

    def _wait_for_room(self) -> bool:
        while not self._closing.is_set():
            if self._room.acquire(timeout=_POLL_S):
                return not self._closing.is_set()
        return False

    def __iter__(self) -> RunAhead[Item]:
        return self

    def __next__(self) -> Item:
        if self._finished:
            raise StopIteration
        item = self._ready.get()
        if isinstance(item, _Finished):
            self._finished = True
            if item.error is not None:
                raise item.error
            raise StopIteration
        self._room.release()  # the reader holds it now: the producer may make the next one
        return item

    def waiting(self) -> bool:
        """Whether ``next`` would return at once: an item (or the end) is made and not yet taken."""
        return self._finished or not self._ready.empty()

    def close(self) -> None:
        """Stop making items and wait for the producer (it finishes the item in hand first)."""
        self._closing.set()
        self._thread.join()
        self._finished = True

    def __enter__(self) -> RunAhead[Item]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
