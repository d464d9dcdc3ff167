"""Garbage-collector settings for a long-lived server process holding many sockets.

Measured on one instance holding 1,000 idle sockets and broadcasting to them 50 times a second
(a probe script outside the repo, timing collections with `gc.callbacks`): with CPython's
defaults, each broadcast's short-lived objects (a few per socket, alive at once) pushed the
young generation over its 700-object threshold hundreds of times in 20 s; survivors were
promoted, and every ~10 s a full collection walked the whole heap (about 235,000 objects)
for 140-310 ms, stalling every delivery behind it. Two changes removed those stalls:

- `gc.freeze()` once the app is built: the ~74,000 objects of imported modules and the app
  itself live as long as the process, so no collection needs to walk them again;
- a young-generation threshold of 20,000: young collections then happen when the heap grows
  (sockets connecting), not on every broadcast. None ran during that 20 s of broadcasts; one
  young collection takes ~12 ms at this size. Cyclic garbage waits a little longer; reference
  counting still frees everything else at once.

REST emits leave cyclic garbage (Quart's request objects), so under 15 s of back-to-back emits on
200 sockets the defaults ran a full collection every ~2.5 s (17-30 ms each) plus 70 middle ones
(up to 6 ms); with these settings, five young collections of ~13 ms and no full one.
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 20_000


def settle() -> None:
    """Freeze what exists now (call once the app is built) and make young collections rarer."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, older, oldest)
