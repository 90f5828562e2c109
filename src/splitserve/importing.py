"""Importing the user's modules (services, torch model factories) by name."""

from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType


def add_working_directory_to_path() -> None:
    """Make the working directory's modules importable, as ``python -m`` does."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())


def import_user_module(name: str) -> ModuleType:
    """Import ``name``, modules of the working directory included."""
    add_working_directory_to_path()
    return importlib.import_module(name)
