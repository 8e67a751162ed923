"""The module paths before the redesign into subpackages, kept working with a DeprecationWarning.

``import dicekern.trajectory`` (or a saved run's description naming ``"dicekern.examples:mlp"``)
imports the module at its new path, registers it under the old one, and warns with the new name.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {
    "dicekern.adapters": "dicekern.record.adapters",
    "dicekern.analysis": "dicekern.apps.analysis",
    "dicekern.baselines": "dicekern.apps.baselines",
    "dicekern.checks": "dicekern.core.checks",
    "dicekern.cli": "dicekern.apps.cli",
    "dicekern.demo": "dicekern.apps.demo",
    "dicekern.description": "dicekern.record.description",
    "dicekern.engine.builder": "dicekern.engine.plan",
    "dicekern.examples": "dicekern.apps.examples",
    "dicekern.extras": "dicekern.core.extras",
    "dicekern.gossip_torchrun": "dicekern.apps.torchrun",
    "dicekern.ground_truth": "dicekern.truth.ground_truth",
    "dicekern.influence": "dicekern.engine.queries",
    "dicekern.layout": "dicekern.core.layout",
    "dicekern.losses": "dicekern.core.losses",
    "dicekern.objectives": "dicekern.curvature",
    "dicekern.objectives.closed_form": "dicekern.curvature.closed_form",
    "dicekern.objectives.kernel": "dicekern.curvature.triton",
    "dicekern.objectives.torch_func": "dicekern.curvature.torch_func",
    "dicekern.online": "dicekern.engine.ledger",
    "dicekern.optim": "dicekern.core.optim",
    "dicekern.plots": "dicekern.apps.plots",
    "dicekern.reference": "dicekern.truth.walks",
    "dicekern.report": "dicekern.apps.report",
    "dicekern.restrict": "dicekern.engine.last_layer",
    "dicekern.rounds": "dicekern.record.rounds",
    "dicekern.snapshots": "dicekern.core.snapshots",
    "dicekern.storage": "dicekern.record.storage",
    "dicekern.topology": "dicekern.core.topology",
    "dicekern.trajectory": "dicekern.record.trajectory",
}


def warn_moved(old: str, new: str, stacklevel: int = 3) -> None:
    warnings.warn(f"{old} moved to {new}; the old name will be removed", DeprecationWarning, stacklevel=stacklevel)


class _Loader(importlib.abc.Loader):
    def __init__(self, old: str):
        self.old = old

    def create_module(self, spec):
        new = MOVED[self.old]
        warn_moved(self.old, new, stacklevel=6)
        return importlib.import_module(new)

    def exec_module(self, module) -> None:
        sys.modules[self.old] = module  # the new module itself, not a copy: one set of globals


class MovedModules(importlib.abc.MetaPathFinder):
    """Finds the old module paths of ``MOVED`` and loads the new modules under them."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, _Loader(fullname))


def install() -> None:
    if not any(isinstance(finder, MovedModules) for finder in sys.meta_path):
        sys.meta_path.append(MovedModules())
