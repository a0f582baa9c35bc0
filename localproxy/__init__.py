"""localproxy: a local mail-encryption proxy for unchanged mail clients."""

__version__ = "0.1.0"
