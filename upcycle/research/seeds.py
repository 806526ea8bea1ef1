"""The one parser of seed lists (`compare --seeds`, `replicate --seeds / --mllm-seeds`).

A repeated seed would be trained once and counted twice, so a mean over seeds would carry a std of 0 that no
replication measured; a negative or fractional seed is not one the trainers accept. Both are refused here, in one
line naming the flag, before any work starts.
"""

from __future__ import annotations

from encoder.utils.errors import UserError


def parse_seeds(text: str, flag: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2]: distinct whole numbers >= 0, in the order given. Raises UserError otherwise."""
    parts = [part.strip() for part in str(text).split(",")]
    junk = [part for part in parts if not (part.isascii() and part.isdigit())]  # no sign, point or blank
    if junk:
        raise UserError(f"{flag} {text!r}: {junk[0]!r} is not a seed; give distinct whole numbers >= 0 separated "
                        "by commas, e.g. 0,1,2")
    seeds = [int(part) for part in parts]
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise UserError(f"{flag} {text!r}: seed {repeated[0]} is given more than once (a repeat would count one run "
                        "twice and shrink the spread over seeds); give distinct seeds, e.g. 0,1,2")
    return seeds
