"""Ray actor options come from the config's per-role resources."""

from __future__ import annotations

import pytest

from rlfleet.common.config import RoleResources
from rlfleet.deploy.actors.assembly import actor_options

pytestmark = pytest.mark.unit


def test_actor_options_from_role_resources():
    res = RoleResources(num_cpus=2, num_gpus=0.5, resources={"rollout": 1})
    assert actor_options(res) == {"num_cpus": 2, "num_gpus": 0.5, "resources": {"rollout": 1}}
    assert actor_options(RoleResources(), max_restarts=3) == {"num_cpus": 1, "num_gpus": 0, "max_restarts": 3}
