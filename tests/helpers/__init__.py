"""Test helpers: tiny random-weight checkpoints and a ComfyUI server runner.

Import them as ``from helpers.checkpoints import ...`` (pytest puts ``tests/`` on ``sys.path`` because
``tests/conftest.py`` lives there).
"""
