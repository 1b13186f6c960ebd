"""Benchmarks run under pytest-benchmark (``make bench``); the summary tables print last."""

from __future__ import annotations

import pytest

from benchmarks.common import FULL, RESULTS, summary_tables


def pytest_addoption(parser):
    parser.addoption("--nanogpt", default=None, help="path to a nanoGPT checkout, to benchmark its model.py too")


def pytest_configure(config):
    config.addinivalue_line("markers", "full: a long side-by-side run, only under make bench-full (GPT_BENCH_FULL=1)")


def pytest_collection_modifyitems(config, items):
    if FULL:
        return
    skip = pytest.mark.skip(reason="a long run: make bench-full (GPT_BENCH_FULL=1) runs it")
    for item in items:
        if item.get_closest_marker("full"):
            item.add_marker(skip)


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter):
    if RESULTS:
        terminalreporter.write_line("")
        for line in summary_tables(RESULTS).splitlines():
            terminalreporter.write_line(line)
