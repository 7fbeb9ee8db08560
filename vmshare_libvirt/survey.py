"""Disks -> inspections and manifests -> plan, in one appliance.

The survey attaches every usable target read-only to one libguestfs session,
inspects them, reads the metadata of every shareable filesystem, digests only
the files that can be common (same path, type and size in every member of a
candidate group), and computes the plan.  The session stays open so that
consolidation can keep using the same appliance.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

from . import plan as planmod
from .config import ApplianceSettings
from .guest.inspect import SUPPORTED_FS, inspect_disks
from .guest.manifest import FilesystemReader
from .guest.session import GuestSession
from .plan import Plan, Target

log = logging.getLogger(__name__)


class Survey:
    def __init__(self, settings: ApplianceSettings, progress: Callable[[str], None] | None = None):
        self.settings = settings
        self.progress = progress or (lambda _t: None)
        self.session: GuestSession | None = None
        self.readers: dict[tuple[str, int], FilesystemReader] = {}
        self.devices: dict[str, str] = {}  # target name -> appliance device
        self.timings: dict[str, float] = {}

    def open(self, targets: list[Target], formats: dict[str, str], extra_rw: list[tuple[str, str]] = ()) -> GuestSession:
        """Attach every unblocked target read-only (plus ``extra_rw`` disks) and launch."""
        start = time.monotonic()
        self.session = GuestSession(self.settings, self.progress)
        for t in targets:
            if t.blockers:
                continue
            self.devices[t.name] = self.session.add_disk(t.disk_path, formats[t.name], readonly=True)
        for path, fmt in extra_rw:
            self.session.add_disk(path, fmt, readonly=False)
        self.session.launch()
        self.timings["launch"] = time.monotonic() - start
        return self.session

    def inspect(self, targets: list[Target]) -> None:
        start = time.monotonic()
        by_device = {i.device: i for i in inspect_disks(self.session)}
        for t in targets:
            dev = self.devices.get(t.name)
            if dev is None:
                continue
            t.inspection = by_device[dev]
            t.blockers.extend((f.code, f.message) for f in t.inspection.findings)
        self.timings["inspect"] = time.monotonic() - start

    def reader(self, t: Target, partition: int) -> FilesystemReader:
        key = (t.name, partition)
        if key not in self.readers:
            dev = self.devices[t.name] + (str(partition) if partition else "")
            self.readers[key] = FilesystemReader(self.session, dev, name=f"{t.name} partition {partition}")
        return self.readers[key]

    def scan(self, t: Target) -> None:
        for fs in t.inspection.layout.filesystems:
            if fs.fstype in SUPPORTED_FS:
                self.progress(f"reading the file list of {t.name} partition {fs.partition}")
                t.manifests[fs.partition] = self.reader(t, fs.partition).scan()

    def run(self, targets: list[Target]) -> Plan:
        """Inspect, read manifests, digest candidates and plan.  The session must be open."""
        self.inspect(targets)
        start = time.monotonic()
        candidate_groups, excluded = planmod.group_targets(targets)
        for members in candidate_groups:
            for t in members:
                self.scan(t)
        self.timings["metadata"] = time.monotonic() - start
        start = time.monotonic()
        groups = []
        for members in candidate_groups:
            parts = sorted(set.intersection(*(set(t.manifests) for t in members)))
            for part in parts:
                needed = planmod.digest_candidates([t.manifests[part] for t in members])
                for t in members:
                    self.progress(f"digesting {len(needed)} candidate files of {t.name} partition {part}")
                    self.reader(t, part).digest(t.manifests[part], needed)
            gp, more = planmod.plan_group(members)
            excluded.extend(more)
            if gp is not None:
                groups.append(gp)
        self.timings["digests"] = time.monotonic() - start
        order = {t.name: i for i, t in enumerate(targets)}
        excluded.sort(key=lambda e: order.get(e.target, 0))
        return Plan(groups, excluded, targets)

    def close(self) -> None:
        if self.session is not None:
            self.session.close()
            self.session = None

    def abort(self) -> None:
        if self.session is not None:
            self.session.abort()
            self.session = None


def survey(targets: list[Target], formats: dict[str, str], settings: ApplianceSettings,
           progress: Callable[[str], None] | None = None) -> Plan:
    """A read-only survey: plan the targets and close the appliance."""
    usable = [t for t in targets if not t.blockers]
    if not usable:
        return Plan([], planmod.group_targets(targets)[1], targets)
    s = Survey(settings, progress)
    try:
        s.open(targets, formats)
        result = s.run(targets)
    except BaseException:
        s.abort()
        raise
    s.close()
    return result
