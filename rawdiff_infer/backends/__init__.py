"""Backends: one small class per runtime, one contract (see base.Backend)."""

from .base import Backend, BackendError

__all__ = ["Backend", "BackendError"]
