"""Task families of the MIL benchmark (issue #23): every task is a family ``make(draw, scale, out)`` whose
generator seed is derived from (family name, draw). Tuning draws 0-4, held-out draws 100-104.

    base.py      Family / Cohort, draw seeds, the cohort writer
    pools.py     cached instance pools (texture and digit groups)
    tiles.py     real-H&E tiles: crops, atypia, per-centre stain shift, encoder
    witness.py   texture2, texture4, digits4 and the witness grid (width, share, classes, balance)
    camelyon.py  c17: the CAMELYON-17-shaped cohort (official split + LOCO)
    bracs.py     bracs: the BRACS-shaped cohort (7 subtypes, 3-class grouping)

Import with ``bench/`` on ``sys.path`` (``bench/mil_benchmark.py`` does).
"""

from __future__ import annotations

from . import bracs, camelyon, witness
from .base import HELD_OUT_DRAWS, HELD_OUT_MIN, TUNING_DRAWS, Cohort, Family, draw_seed, is_held_out

FAMILIES: dict[str, Family] = {f.name: f for mod in (witness, camelyon, bracs) for f in mod.FAMILIES}

__all__ = ["FAMILIES", "HELD_OUT_DRAWS", "HELD_OUT_MIN", "TUNING_DRAWS", "Cohort", "Family", "draw_seed",
           "is_held_out", "parse_task"]


def parse_task(token: str) -> tuple[str, str]:
    """``family`` or ``family:protocol`` -> (family, protocol); the protocol defaults to the family's first."""
    name, _, protocol = token.partition(":")
    if name not in FAMILIES:
        raise ValueError(f"unknown family {name!r}; choose from {sorted(FAMILIES)}")
    fam = FAMILIES[name]
    protocol = protocol or fam.protocols[0]
    if protocol not in fam.protocols:
        raise ValueError(f"family {name!r} has no protocol {protocol!r}; choose from {list(fam.protocols)}")
    return name, protocol
