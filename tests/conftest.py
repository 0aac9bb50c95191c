"""Fixtures of the ml-mdm conversion tests (test_convert_mlmdm*.py)."""

from __future__ import annotations

import sys
import types

import pytest

from .mlmdm_fakes import (
    FAKE_CLASSES,
    TrapModule,
    save_mlmdm_checkpoint,
    synthetic_state_dict,
    tiny_mlmdm_config,
    write_yaml,
)


@pytest.fixture
def fake_mlmdm_modules(monkeypatch):
    """Register the stand-in classes under ml-mdm's old module names (for pickling only)."""
    monkeypatch.setitem(sys.modules, "models", types.ModuleType("models"))
    for module, classes in FAKE_CLASSES.items():
        mod = types.ModuleType(module)
        for name, cls in classes.items():
            cls.__module__, cls.__qualname__ = module, name
            setattr(mod, name, cls)
        monkeypatch.setitem(sys.modules, module, mod)
    yield
    # monkeypatch removes the modules again: conversion must not need them.


@pytest.fixture
def tiny_checkpoint(tmp_path, fake_mlmdm_modules, monkeypatch, request):
    levels = getattr(request, "param", 2)
    config = tiny_mlmdm_config(levels)
    tensors = synthetic_state_dict(config)
    save_mlmdm_checkpoint(tmp_path / "vis_model.pth", config, tensors)
    for module in ["models", *FAKE_CLASSES]:
        monkeypatch.setitem(sys.modules, module, TrapModule(module))
    return tmp_path / "vis_model.pth", write_yaml(tmp_path / "tiny.yaml", config), config, tensors
