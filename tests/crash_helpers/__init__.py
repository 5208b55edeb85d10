"""Callbacks that the crash tests put into a ``lightning-aquila fit`` configuration.

The subprocess imports them as ``crash_helpers.<Name>`` (the tests put ``tests/`` on its
``PYTHONPATH``); they record what a run did and inject a crash, and change nothing else.
"""

from crash_helpers.callbacks import CrashOnce, KillServerAt, StepRecorder

__all__ = ["CrashOnce", "KillServerAt", "StepRecorder"]
