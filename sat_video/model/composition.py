"""Resolve the mixins of a model into one callable per hook, checking composition as it goes.

``HookTable.build`` is pure: it either returns a complete new table or raises, so a model that fails
to add a mixin keeps its previous table untouched.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

from sat_video.common.errors import HookConflictError, MissingHookError
from sat_video.model.hooks import HOOKS, Composition, HookSpec, Mixin


class _Chain:
    """Calls each link on the previous link's output. A class rather than a closure so that
    ``copy.deepcopy(model)`` rebinds the links to the copied mixins."""

    def __init__(self, spec: HookSpec, links: list[Callable]):
        self.count, self.links = spec.threaded_args, links

    def __call__(self, *args, **kwargs):
        for link in self.links:
            out = link(*args, **kwargs)
            args = ((out,) if self.count == 1 else tuple(out)) + args[self.count:]
        return args[0] if self.count == 1 else args[: self.count]


class _Missing:
    def __init__(self, spec: HookSpec):
        self.spec = spec

    def __call__(self, *args, **kwargs):
        raise MissingHookError(
            f"no mixin provides the required hook '{self.spec.name}'; add one (for example {self.spec.example}) "
            "under model.dit.mixins"
        )


def _check_sharded(mixins: Mapping[str, Mixin], splitters: list[str]) -> None:
    """A mixin that splits the sequence needs every other mixin to run on a part of it."""
    splitter = next((name for name in splitters if name in mixins), None)
    if splitter is None:
        return
    unfit = [name for name, mixin in mixins.items() if name != splitter and not type(mixin).runs_sharded]
    if unfit:
        raise HookConflictError(
            f"mixin '{splitter}' splits the sequence across ranks, but mixin '{unfit[0]}' "
            f"({type(mixins[unfit[0]]).__name__}) does not declare runs_sharded = True: its hooks may need the whole "
            "token grid (attention within frames, a per-token table). Drop it, run with sequence_parallel_size 1, "
            "or make its hooks use ctx.shard and declare runs_sharded"
        )


class HookTable:
    """The resolved implementation of every hook, plus where each part came from.

    Attributes are the hook names of :data:`sat_video.model.hooks.HOOKS`, each a callable with that hook's
    signature (without ``self``), so a table is the :class:`~sat_video.model.context.BlockHooks` a forward context
    carries. ``origins[name]`` lists the contributors in call-nesting order.
    """

    def __init__(self, resolved: Mapping[str, Callable], origins: Mapping[str, list[str]]):
        for name, fn in resolved.items():
            setattr(self, name, fn)
        self.origins = dict(origins)

    @classmethod
    def build(cls, mixins: Mapping[str, Mixin], defaults: Mapping[str, Callable]) -> HookTable:
        """Compose ``mixins`` (in insertion order) over ``defaults``; raise :class:`HookConflictError`
        when two mixins replace the same hook."""
        resolved, origins = {}, {}
        for spec in HOOKS:
            providers = [(name, m) for name, m in mixins.items() if spec.name in m.implemented_hooks()]
            if spec.composition is Composition.CHAIN:
                providers.sort(key=lambda item: item[1].chain_priority.get(spec.name, 0))  # stable: ties keep insertion order
                links = [getattr(m, spec.name) for _, m in providers]
                resolved[spec.name] = _Chain(spec, links)
                origins[spec.name] = [name for name, _ in providers]
                continue

            wrappers = [(n, m) for n, m in providers if getattr(getattr(type(m), spec.name), "wraps_previous", False)]
            replacers = [(n, m) for n, m in providers if (n, m) not in wrappers]
            if len(replacers) > 1:
                (first, _), (second, _) = replacers[:2]
                raise HookConflictError(
                    f"mixins '{first}' and '{second}' both replace hook '{spec.name}'; remove one, or "
                    f"decorate the later one's {spec.name} with @wraps_previous to wrap instead"
                )
            if replacers:
                impl, chain = getattr(replacers[0][1], spec.name), [replacers[0][0]]
            elif spec.name in defaults:
                impl, chain = defaults[spec.name], ["default"]
            else:
                impl, chain = _Missing(spec), ["<missing>"]
            for name, mixin in wrappers:
                impl = functools.partial(getattr(mixin, spec.name), inner=impl)
                chain.append(name)
            resolved[spec.name] = impl
            origins[spec.name] = chain
        _check_sharded(mixins, origins["split_sequence"])
        return cls(resolved, origins)

    def describe(self) -> str:
        """One line per hook: its composition and contributors (outermost wrapper last)."""
        width = max(len(spec.name) for spec in HOOKS)
        lines = []
        for spec in HOOKS:
            chain = self.origins[spec.name] or ["(none)"]
            lines.append(f"{spec.name:<{width}}  {spec.composition.value:<7}  {' -> '.join(chain)}")
        return "\n".join(lines)
