"""The extension points' registries: one per kind, each filled beside the definitions it names.

| registry | filled in | config field |
|---|---|---|
| `ADVANTAGE_ESTIMATORS` | `learner/algos/estimators.py`, `group_estimators.py` | `algorithm.advantage_estimator` |
| `POLICY_LOSSES` | `learner/algos/policy_losses.py` | `algorithm.policy_loss` |
| `ROLLOUT_BACKENDS` | `rollout/vllm_worker.py`, `rollout/hf_worker.py` | `rollout.backend` |
| `REWARD_SOURCES` | a plugin's module (the built-in sources have their own fields) | `reward.sources[].name` |
| `WEIGHT_SYNC` | `weight_sync/object_store.py`, `weight_sync/broadcast.py` | `rollout.weight_sync` |

The registries live here, at the bottom layer, so that the config can check a name against
them; `common` imports none of the modules that fill them, so each registry also lists its
built-in names (a test checks them against the filled registry). A name registered from outside
the package is accepted once its module is imported: list the module in the config's `plugins`
(imported before the config is validated, and by every actor that builds from the config).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from typing import Annotated, Any

from pydantic import AfterValidator


class UnknownNameError(KeyError):
    """A registry lookup of a name that is not there; the message lists the valid names."""

    def __str__(self) -> str:
        return str(self.args[0])


class Registry(dict):
    """A plain dict of named alternatives whose missing key names the valid ones."""

    def __init__(self, kind: str, builtin: Iterable[str] = ()):
        super().__init__()
        self.kind = kind
        self.builtin = tuple(builtin)
        """The names the package itself registers (known before their modules are imported)."""

    def __missing__(self, key: str):
        raise UnknownNameError(f"unknown {self.kind} {key!r}; valid names: {', '.join(self.names())}")

    def names(self) -> list[str]:
        """Built-in names, then those registered from outside, sorted."""
        return [*self.builtin, *sorted(set(self) - set(self.builtin))]

    def check(self, name: str) -> str:
        """`name` when it is built in or registered; else ValueError listing the valid names
        (for a config validator: pydantic names the field)."""
        if name not in self.builtin and name not in self:
            raise ValueError(f"unknown {self.kind} {name!r}; valid names: {', '.join(self.names())} "
                             "(a name registered by your own module needs that module in `plugins`)")
        return name

    def register(self, name: str, info: Any = None) -> Callable[[Any], Any]:
        """A decorator that adds a function or class under `name`, its capabilities as `.info`."""

        def add(obj: Any) -> Any:
            if info is not None:
                obj.info = info
            self[name] = obj
            return obj

        return add


def import_plugins(modules: Iterable[str]) -> None:
    """Import each module (it registers its extensions as a side effect of being imported)."""
    for i, module in enumerate(modules):
        try:
            importlib.import_module(module)
        except Exception as err:
            raise ValueError(f"plugins[{i}]: {module!r} could not be imported ({type(err).__name__}: {err})") from err


ADVANTAGE_ESTIMATORS = Registry("advantage estimator", builtin=(
    "gae", "grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline", "grpo_passk", "opo", "gpg",
    "remax", "gdpo", "optimal_token_baseline", "tir_optimal_token_baseline",
))
POLICY_LOSSES = Registry("policy loss", builtin=(
    "ppo", "gspo", "cispo", "gpg", "sapo", "dppo_tv", "dppo_kl", "clip_cov", "kl_cov", "geo_mean", "dro", "reinforce",
))
ROLLOUT_BACKENDS = Registry("rollout backend", builtin=("vllm", "hf"))
REWARD_SOURCES = Registry("reward source")
"""Sources named in `reward.sources` (the reward model, rules and remote scorer have their own fields)."""
WEIGHT_SYNC = Registry("weight-sync method", builtin=("object_store", "broadcast"))



def name_in(registry: Registry) -> Any:
    """A config field type: a name checked against `registry` (built-in or registered)."""
    return Annotated[str, AfterValidator(registry.check)]


EstimatorName = name_in(ADVANTAGE_ESTIMATORS)
PolicyLossName = name_in(POLICY_LOSSES)
BackendName = name_in(ROLLOUT_BACKENDS)
WeightSyncName = name_in(WEIGHT_SYNC)
RewardSourceName = name_in(REWARD_SOURCES)

# Built-in estimators that compare the responses of one prompt with each other (they need
# samples_per_prompt >= 2); a registered one says so in its `info.group_relative`.
GROUP_ESTIMATORS = frozenset({
    "grpo", "dr_grpo", "rloo", "reinforce_pp_baseline", "grpo_passk", "opo", "gpg", "gdpo",
    "optimal_token_baseline", "tir_optimal_token_baseline",
})


def group_relative(estimator: str) -> bool:
    """Whether the estimator needs several responses per prompt."""
    if estimator in GROUP_ESTIMATORS:
        return True
    entry = ADVANTAGE_ESTIMATORS.get(estimator)
    return bool(entry is not None and getattr(getattr(entry, "info", None), "group_relative", False))
