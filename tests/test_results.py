"""Result records: JSON-safe, published under the course's MIME type, read back from a notebook."""
import math

import pytest
import torch

from reglab.results import MIME, read_results, to_json_safe


def test_records_become_json_safe():
    record = to_json_safe({"a": (1, 2.5), "nan": math.nan, "t": torch.tensor(3.0), "nested": {"inf": math.inf}})
    assert record == {"a": [1, 2.5], "nan": None, "t": 3.0, "nested": {"inf": None}}


def test_unsupported_values_are_refused_with_their_path():
    with pytest.raises(TypeError, match=r"record\['x'\] is a object"):
        to_json_safe({"x": object()})
    with pytest.raises(TypeError, match="non-string key 1"):
        to_json_safe({1: 2})


def test_read_results_merges_records_from_outputs():
    nb = {"cells": [
        {"cell_type": "markdown", "source": "x"},
        {"cell_type": "code", "outputs": [{"output_type": "display_data", "data": {MIME: {"a": 1, "b": 1}}}]},
        {"cell_type": "code", "outputs": [{"output_type": "stream", "text": "{}"},
                                          {"output_type": "display_data", "data": {MIME: {"b": 2}}}]}]}
    assert read_results(nb) == {"a": 1, "b": 2}
