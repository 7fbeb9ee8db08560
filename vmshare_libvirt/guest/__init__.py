"""Everything that reads or writes inside guest disks, through the libguestfs appliance.

Guest filesystems are never mounted on the host kernel (DESIGN.md 3.8).
"""
