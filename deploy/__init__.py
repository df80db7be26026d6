"""Assembly, the driver loop, the Python API (`Trainer`) and the CLI."""

from rlfleet.deploy.trainer import Trainer

__all__ = ["Trainer"]
