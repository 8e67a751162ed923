"""Which engine runs a query."""

from __future__ import annotations

from dicekern.checks import check_choice

BACKENDS = ("auto", "torch")


def resolve_backend(backend: str) -> str:
    """The engine that will run: only the torch engine exists so far, so "auto" means "torch"."""
    check_choice("backend", backend, BACKENDS)
    return "torch"
