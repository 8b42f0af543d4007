"""Set-up of the fork server behind :mod:`musetalk_warm.media.isolate`; imported there only.

Each child re-runs the parent's ``-m`` main module under ``__mp_main__`` although the
fork server imported it already (so children start fast); runpy's warning about that
would print once per decoded upload.
"""

import warnings

warnings.filterwarnings("ignore", r".* found in sys\.modules after import of package", RuntimeWarning, "runpy")
