"""Set-up run in every Ray worker process of a local run (``worker_process_setup_hook``).

``livetrain run`` starts a local Ray without its dashboard (~1 s and ~900 MiB
less on a laptop), so Ray's State API, which the dashboard serves, is not
there. Ray Train's ``PlacementGroupCleaner`` (a detached actor that would free
the training placement group if Train's controller died) asks that API once a
second whether the controller lives, and logs a warning each time it cannot:
a line a second on the user's console for the whole run. Its warnings are
raised to errors here; the pipeline removes its placement group itself when
it stops. On a cluster (``ray start``: dashboard on) nothing is changed.
"""

from __future__ import annotations

import logging

QUIET_LOGGERS = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",)
"""Loggers that warn only because a local Ray runs without its dashboard."""


def quiet_without_dashboard() -> None:
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
