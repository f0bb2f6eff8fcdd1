"""Progress bars: never the "IProgress not found" warning, plain text for papermill logs."""

from __future__ import annotations

import warnings

import pytest

from lungs_utils import progress


@pytest.mark.parametrize("mode", ["auto", "plain", "off"])
def test_bar_iterates_without_widget_warnings(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LUNGS_PROGRESS", mode)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # tqdm.auto without ipywidgets would warn here
        assert list(progress.bar(range(5), desc="x")) == [0, 1, 2, 3, 4]


def test_off_disables_and_plain_hides_nested_bars(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LUNGS_PROGRESS", "off")
    assert progress.bar(range(2)).disable
    monkeypatch.setenv("LUNGS_PROGRESS", "plain")
    assert progress.bar(range(2), leave=False).disable and not progress.bar(range(2)).disable
