"""Shared fixtures: tiny random LLaVA models and a small synthetic data set, built once per session.

How the tests are laid out (for whoever adds one):

* **Tests mirror the source tree.** ``tests/prune_core/`` tests ``prune_core/``, ``tests/exporter/``,
  ``tests/calib/``, ``tests/graph_passes/`` and ``tests/engines/`` the stages, ``tests/workflows/``
  ``prune_export/workflows/``, ``tests/benchmarks/`` the scripts in ``benchmarks/``; the CLI tests
  (``prune_export/cli.py``, the top of the tool) and the architecture test sit at the top of ``tests/``.
  There are no ``__init__.py`` files among the tests and pytest runs in its default ``prepend`` import
  mode, so every test file's basename must be unique across the whole tree.
* **Fixtures live in conftest.py files.** This one is found from every folder; a folder's own conftest.py
  (``engines/``, ``calib/``, ``graph_passes/``) serves that folder only.
* **Everything else tests share lives in the package ``tests/helpers/``**: ``helpers`` itself (random test
  images, the questions asked of them, plan-kind tables), ``helpers.cli`` (run a command, check a one-line
  error), ``helpers.engine_graphs``, ``helpers.fake_tensorrt``, ``helpers.calib_stubs`` and
  ``helpers.ort_session``.
* **One import rule for helpers:** import them at module level, by the package name, with ``from``::

      from helpers import random_image
      from helpers.cli import assert_clean_error, run

  never inside a function, never as ``tests.helpers...``, and never from another test module. This works
  from every folder because pytest puts ``tests/`` on ``sys.path`` when it imports this conftest.py
  (``prepend`` mode: the first folder without ``__init__.py``), which it does before any test module.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)
#: The project's packages come before the test folders of the same names (tests/graph_passes, ...), also
#: when pytest is started as a bare ``pytest`` (``python -m pytest`` already puts the working folder first).
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path[:1]:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from exporter.demo import build_demo_model

    return build_demo_model(tmp_path_factory.mktemp("models") / "tiny", "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_gqa_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from exporter.demo import build_demo_model

    return build_demo_model(tmp_path_factory.mktemp("models") / "tiny_gqa", "tiny", seed=1, kv_heads=2)


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from exporter.demo import build_demo_data

    return build_demo_data(tmp_path_factory.mktemp("data"), samples=4, seed=0)


@pytest.fixture(scope="session")
def tiny_adapter(tiny_model: Path):
    from exporter.adapters import load_adapter

    return load_adapter(tiny_model)


@pytest.fixture()
def config_only(tiny_model: Path, tmp_path: Path) -> Path:
    """A folder holding only config.json (no weights, no tokenizer)."""
    folder = tmp_path / "config_only"
    folder.mkdir()
    shutil.copy(tiny_model / "config.json", folder / "config.json")
    return folder
