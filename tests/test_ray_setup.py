"""Ray's notices of what we chose are kept off the console, and nothing else of Ray's is."""

import logging

from trainer.ray_setup import NOTICES, quiet_notices


def test_only_the_named_notices_are_dropped(caplog):
    quiet_notices()
    quiet_notices()  # twice: one filter per logger
    caplog.set_level(logging.WARNING)
    for name, prefix in NOTICES.items():
        log = logging.getLogger(name)
        assert len(log.filters) == 1
        log.warning(prefix + ". To enable, set ...")
        log.warning("something else went wrong")
    kept = "Progress bars disabled (a logger not named: kept)"
    logging.getLogger("ray.data").warning(kept)
    assert [r.getMessage() for r in caplog.records] == ["something else went wrong"] * len(NOTICES) + [kept]
