"""Deployment: packed models from a searched configuration (export, load, size)."""

from rfq.deploy.export import load_packed, packed_size_bytes, save_packed, to_packed

__all__ = ["load_packed", "packed_size_bytes", "save_packed", "to_packed"]
