"""The native data client, for the tests that run it."""

from __future__ import annotations

import shutil

import pytest

from kapow.commands.launcher import native_client


def native_client_or_skip() -> str:
    """
    The path of the built native client. Where a C compiler is installed the
    build must have made it, so its absence fails the test; only a machine
    without a compiler skips.
    """
    path = native_client()
    if path is None:
        if shutil.which("cc"):
            pytest.fail(
                "a C compiler is installed but the native client was not built: reinstall the package"
            )
        pytest.skip("no C compiler: the native client is not built")
    return path
