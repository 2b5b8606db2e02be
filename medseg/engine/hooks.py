"""Test hooks: let a test stop a training process at an exact moment (to SIGKILL it there).

``MEDSEG_TEST_HOOK=checkpoint_write`` (or ``data_ready``, ``validation``, ``epoch_end``, ``step:N``) makes the process print
``medseg-test-hook: <name>`` to stderr and sleep ``MEDSEG_TEST_HOOK_SECONDS`` (default 60) when it
reaches that point. Unset, a hook costs one dictionary lookup.
"""

from __future__ import annotations

import os
import sys
import time


def test_hook(name: str) -> None:
    wanted = os.environ.get("MEDSEG_TEST_HOOK")
    if wanted and wanted == name:
        print(f"medseg-test-hook: {name}", file=sys.stderr, flush=True)
        time.sleep(float(os.environ.get("MEDSEG_TEST_HOOK_SECONDS", "60")))
