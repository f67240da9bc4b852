"""sitecustomize for the Petals 2.2 interop venv built by tests/interop/petals_venv.sh.

Petals 2.2.0.post1 pins hivemind==1.1.10.post2, whose build downloads p2pd from
the internet (impossible here), so that venv has hivemind 1.1.12 instead.
hivemind 1.1.12 no longer re-exports its helpers at the top level, while Petals
does ``from hivemind import PeerID, MSGPackSerializer, get_logger, nested_flatten,
anext, ...``.  This module puts those names back onto the ``hivemind`` module.

It is lazy on purpose: a meta path finder waits for the first ``import hivemind``
and patches the module right after its ``__init__`` ran, so interpreters that
never import hivemind (pip, the smoke checks) pay nothing.  Importing hivemind
eagerly here would cost every interpreter start about a second (it imports torch).

Failures never break interpreter start-up, but they are not hidden either: they are
reported on stderr with the reason, and ``import petals`` will then fail loudly.
"""

import importlib
import sys
import types

# Kept cheap on purpose: this file runs at every interpreter start of the venv. Nothing here
# imports importlib.abc or importlib.util (they pull in typing: ~15 ms per start).

# Modules whose public names hivemind <= 1.1.10 re-exported via star imports and
# which Petals 2.2 imports from the top-level ``hivemind`` package.
_SOURCE_MODULES = ("hivemind.p2p", "hivemind.compression", "hivemind.moe.expert_uid")


def _warn(message):
    sys.stderr.write(f"[jaxseq petals sitecustomize] {message}\n")


def _public_names(module):
    """What ``from module import *`` would give: ``__all__`` or non-underscore, non-module names."""
    names = getattr(module, "__all__", None)
    if names is None:
        names = [
            name
            for name, value in vars(module).items()
            if not name.startswith("_") and not isinstance(value, types.ModuleType)
        ]
    return names


def reexport_hivemind_names(hivemind):
    """Set on ``hivemind`` every public name of the old re-exported modules that it lacks.

    Returns the list of names that were added.
    """
    import pkgutil  # noqa: PLC0415 - only needed once hivemind is imported

    import hivemind.utils as hm_utils  # noqa: PLC0415

    module_names = list(_SOURCE_MODULES)
    module_names += [
        f"hivemind.utils.{info.name}" for info in pkgutil.iter_modules(hm_utils.__path__) if not info.ispkg
    ]
    added = []
    for module_name in module_names:
        module = importlib.import_module(module_name)
        for name in _public_names(module):
            if not hasattr(hivemind, name) and hasattr(module, name):
                setattr(hivemind, name, getattr(module, name))
                added.append(name)
    return added


class _HivemindReexportFinder:
    """One-shot meta path finder: lets the other finders locate ``hivemind``, then hooks its loader."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "hivemind":
            return None
        # Remove ourselves first: the lookup below must not recurse into this finder,
        # and hivemind is only imported once per interpreter.
        try:
            sys.meta_path.remove(self)
        except ValueError:
            pass
        spec = None
        for finder in list(sys.meta_path):  # what the import system would do without us
            find_spec = getattr(finder, "find_spec", None)
            if find_spec is not None:
                spec = find_spec(fullname, path, target)
                if spec is not None:
                    break
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        original_exec_module = spec.loader.exec_module

        def exec_module(module):
            original_exec_module(module)  # errors in hivemind itself propagate unchanged
            try:
                reexport_hivemind_names(module)
            except Exception as exc:  # noqa: BLE001 - report, and let the import itself succeed
                _warn(f"could not re-export hivemind helpers for Petals 2.2: {type(exc).__name__}: {exc}")

        # Patch this spec's own loader instance (FileFinder makes one per spec), so the
        # module keeps its ordinary loader type for resources and reloads.
        spec.loader.exec_module = exec_module
        return spec


def _install():
    if "hivemind" in sys.modules:  # imported before site ran (unusual): patch in place
        reexport_hivemind_names(sys.modules["hivemind"])
    else:
        sys.meta_path.insert(0, _HivemindReexportFinder())


try:
    _install()
except Exception as _exc:  # noqa: BLE001 - never break interpreter start-up
    _warn(f"could not install the hivemind re-export hook: {type(_exc).__name__}: {_exc}")
