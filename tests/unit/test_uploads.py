"""The background upload runs one upload at a time, in order."""

import threading

import pytest

from workers.uploads import Uploads

pytestmark = pytest.mark.unit


def test_one_upload_in_flight_the_next_waits_for_it():
    uploads, release, order = Uploads(), threading.Event(), []

    def slow():
        release.wait(5)
        order.append("first")

    uploads.start(slow)
    starting = threading.Thread(target=uploads.start, args=(lambda: order.append("second"),))
    starting.start()
    starting.join(0.2)
    assert starting.is_alive() and order == []  # start() waits while the first is in flight
    release.set()
    starting.join(5)
    uploads.wait()
    assert order == ["first", "second"]
