"""One base class for every error that means "the harness could not do its job" (exit 2).

The command line maps exactly this class to exit 2 with one line; everything else that goes
wrong is a bug and shows as one. A failing config is never an exception: it is a report (exit 1).
"""

from __future__ import annotations


class HarnessError(Exception):
    """Usage, environment or host trouble the user can fix; the message names what and where."""
