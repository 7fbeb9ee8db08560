"""vmshare_libvirt: share the common files of libvirt guests in one read-only base image."""

__version__ = "0.1.0"
