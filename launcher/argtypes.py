"""argparse types shared by the CLIs: a bad value exits 2 with a message that names it."""
from __future__ import annotations

import argparse


def bounded(kind, low, high=None, low_open=False, what=""):
    """An argparse type: a number in [low, high] (low excluded when low_open); bad values exit 2 naming it."""
    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if v != v or (v <= low if low_open else v < low) or (high is not None and v > high):
            raise argparse.ArgumentTypeError(f"{text!r}: must be {what}")
        return v
    return parse


POSITIVE = bounded(int, 1, what="a positive integer (>= 1)")
