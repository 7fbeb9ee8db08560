"""What a resync of a group would reclaim, estimated on the host in seconds, without an appliance.

The way ``zdb -S`` simulates deduplication from block checksums: every 4 KiB
block of data a member's own overlay holds (its top qcow2 layer, read straight
from the file at the offsets ``qemu-img map`` gives) is hashed.  A block content
that every member's overlay holds is a file the members changed the same way
(the same upgrade made in each guest): a resync stores it once, in the new base,
instead of once per member, and reclaims ``members - 1`` copies of it.
Blocks of zeros, blocks only some members hold, and the filesystem metadata
each member rewrote differently count for nothing.

It is an estimate, in both directions: a file common to every member but
written at different offsets inside its blocks is missed (rare: ext4 writes
files block-aligned), and the new base's own metadata is not subtracted.
``vmshare resync --dry-run`` reads the views and gives the exact figure.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from dataclasses import dataclass

from .. import qemu_img

BLOCK = 4096
READ = 1 << 20  # bytes read from an overlay at a time
_ZERO = bytes(BLOCK)


@dataclass(frozen=True)
class Estimate:
    members: int  # overlays read
    bytes: int  # what a resync would reclaim, about
    blocks: int  # distinct block contents every member holds
    overlay_bytes: int  # data the members' overlays hold, together
    unread: int  # members whose overlay could not be read (left out: the estimate is 0 with fewer than 2)


def overlay_blocks(path: str) -> tuple[Counter[bytes], int]:
    """Digest -> copies of every non-zero 4 KiB data block ``path``'s own qcow2 layer holds, and its data bytes."""
    counts: Counter[bytes] = Counter()
    total = 0
    extents = [e for e in qemu_img.map(path, "qcow2", force_share=True)
               if e.depth == 0 and e.data and not e.zero and e.offset is not None]
    with open(path, "rb") as f:
        fd = f.fileno()
        for e in extents:
            total += e.length
            done = 0
            while done < e.length:
                chunk = os.pread(fd, min(READ, e.length - done), e.offset + done)
                if not chunk:
                    break
                for i in range(0, len(chunk) - BLOCK + 1, BLOCK):
                    block = chunk[i : i + BLOCK]
                    if block != _ZERO:
                        counts[hashlib.blake2b(block, digest_size=16).digest()] += 1
                done += len(chunk)
    return counts, total


def common_blocks(per_member: list[Counter[bytes]]) -> tuple[int, int]:
    """(distinct contents every member holds, copies a single base would spare); pure."""
    if len(per_member) < 2:
        return 0, 0
    first, *rest = sorted(per_member, key=len)
    distinct = spared = 0
    for digest, copies in first.items():
        least = min([copies] + [c.get(digest, 0) for c in rest])
        if least:
            distinct += 1
            spared += least * (len(per_member) - 1)
    return distinct, spared


def estimate(overlays: list[str]) -> Estimate:
    """The estimate for a group whose members' disks are ``overlays``."""
    counted, total, unread = [], 0, 0
    for path in overlays:
        try:
            counts, nbytes = overlay_blocks(path)
        except (OSError, qemu_img.ImageError):
            unread += 1
            continue
        counted.append(counts)
        total += nbytes
    distinct, spared = common_blocks(counted)
    return Estimate(len(counted), spared * BLOCK, distinct, total, unread)
