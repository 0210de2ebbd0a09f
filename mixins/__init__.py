"""The built-in mixins and frozen stages; importing this package imports every module in it, which registers them by
name (a new module joins by being here, with no list to keep)."""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__, prefix=f"{__name__}."):
    importlib.import_module(_module.name)
