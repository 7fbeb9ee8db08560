"""Run independent appliance work side by side.

Under TCG an appliance keeps one host core busy; with several cores, members
split across appliances finish sooner.  Each batch gets its own libguestfs
handle (a handle must only be used by one thread at a time); the Python
binding releases the GIL while a call runs.
"""

from __future__ import annotations

import threading
from typing import Callable, Sequence, TypeVar

T = TypeVar("T")


def batches(items: Sequence[T], parallel: int, weight: Callable[[T], int], first_extra: int = 0) -> list[list[T]]:
    """Split ``items`` into at most ``parallel`` non-empty batches of similar total weight.

    Items keep their relative order inside a batch; the first item always
    lands in the first batch, which starts with ``first_extra`` of other work.
    """
    count = max(1, min(parallel, len(items)))
    out: list[list[int]] = [[] for _ in range(count)]
    load = [first_extra] + [0] * (count - 1)
    order = sorted(range(len(items)), key=lambda i: (i != 0, -weight(items[i])))
    for i in order:
        k = 0 if i == 0 else load.index(min(load))
        out[k].append(i)
        load[k] += weight(items[i]) + 1
    return [[items[i] for i in sorted(b)] for b in out if b]


def run(fn: Callable[[T], None], work: Sequence[T]) -> None:
    """Call ``fn(w)`` for every ``w`` in its own thread (inline when there is one); re-raise the first error."""
    if len(work) == 1:
        fn(work[0])
        return
    errors: list[BaseException] = []

    def guarded(w: T) -> None:
        try:
            fn(w)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(w,), name=f"vmshare-{i}") for i, w in enumerate(work)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise errors[0]
