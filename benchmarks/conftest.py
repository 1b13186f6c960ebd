"""Benchmarks run under pytest-benchmark (``make bench``); the summary tables print last."""

from __future__ import annotations

import pytest

from benchmarks.common import RESULTS, summary_tables


def pytest_addoption(parser):
    parser.addoption("--nanogpt", default=None, help="path to a nanoGPT checkout, to benchmark its model.py too")


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter):
    if RESULTS:
        terminalreporter.write_line("")
        for line in summary_tables(RESULTS).splitlines():
            terminalreporter.write_line(line)
