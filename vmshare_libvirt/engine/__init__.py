"""The multi-step operations that write disks: consolidate, recover, rollback, commit.

The engine is the only writer of guest disks and bases.  Every step is
journaled in the state store before it acts (DESIGN.md 3.6).
"""
