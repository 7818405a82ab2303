"""Request checking of the serving path, without Ray."""

from __future__ import annotations

import numpy as np
import pytest

from livetrain.serving.predictor import BadRequest, instances_to_array

F = ["a", "b", "c"]


def test_rows_as_lists_and_objects_give_the_same_array():
    a = instances_to_array([[1, 2, 3.5]], F, 10)
    b = instances_to_array([{"c": 3.5, "a": 1, "b": 2}], F, 10)
    assert a.dtype == np.float32 and np.array_equal(a, b)


@pytest.mark.parametrize(
    "instances, message",
    [
        ([], "empty"),
        ("x", "must be a list"),
        ([[1, 2]], "has 2 features, expected 3"),
        ([[1, 2, "x"]], "'x' is not a number"),
        ([[1, 2, True]], "True is not a number"),
        ([[1, 2, float("nan")]], "not finite"),
        ([{"a": 1, "b": 2}], "missing features \\['c'\\]"),
        ([[1, 2, 3]] * 11, "too many instances"),
    ],
)
def test_bad_instances_are_explained(instances, message):
    with pytest.raises(BadRequest, match=message):
        instances_to_array(instances, F, 10)
