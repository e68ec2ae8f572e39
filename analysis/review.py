"""Which objects a reader should see besides the CTC calls: the borderline ones.

A reader confirms every CTC call; a CTC that the machine missed can only be
counted if the reader sees it. An object is *borderline* when it is a
cytokeratin object with a nucleus that fails exactly one rule of the CTC
definition, and that one by less than `DetectionSettings.review_margin` of the
rule's threshold:

- ``nucleus_inside``: the nucleus lies slightly less than `min_nucleus_inside`
  inside the cytokeratin area;
- ``size``: the object is slightly too small (at most `min_ctc_diameter_um`),
  or larger but not within the blur's uncertainty (``diameter_low_um``);
- ``cd45``: CD45 is at or slightly above `max_cd45_snr` (the membrane band's
  median), or lights at or slightly above `min_cd45_membrane_cover` of the
  sectors around the cell (its weak-membrane rule), and whichever of the two
  it fails, it fails narrowly; a double positive by another CD45 rule fails it
  outright;
- ``shape``: solidity or axis ratio slightly below `min_solidity` /
  `min_axis_ratio`.

Debris, fragments without a nucleus, objects with less cytokeratin than the
faintest the detector finds (`ck_smooth_snr`) and objects counted in the next
field (their nucleus' centre beyond the field's edge) are never borderline: no
reader decision changes what they are. `review_flag` works on a finished object row
(its features), so it is the same wherever a record is read.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from analysis.settings import DetectionSettings

__all__ = ["REVIEW_RULES", "review_flag"]

#: the rules an object can narrowly fail, as the flag names them
REVIEW_RULES = ("nucleus_inside", "size", "cd45", "shape")

#: a double positive's reasons from the membrane band's rules, which have a margin
_BAND_REASONS = {"CD45 positive", "CD45 on the membrane all around the cell"}

#: labels whose objects are never shown for review: no decision changes them
_NEVER = {"CTC", "DEBRIS", "WBC"}


def _num(o: Mapping[str, Any], key: str) -> float:
    v = o.get(key)
    return float(v) if isinstance(v, int | float) else math.nan


def review_flag(o: Mapping[str, Any], st: DetectionSettings) -> str:
    """The one rule that `o` fails narrowly (see the module docstring), or
    ``""``."""
    if o.get("label") in _NEVER or o.get("reason") in {"no nucleus", ""}:
        return ""
    if str(o.get("reason", "")).startswith("nucleus cut"):
        return ""
    if _num(o, "ck_snr") < st.ck_smooth_snr:  # no cytokeratin: fails outright
        return ""
    m = st.review_margin
    inside = _num(o, "nucleus_inside")
    diameter = _num(o, "diameter_um")
    cd45 = _num(o, "cd45_snr")
    solidity = _num(o, "solidity")
    ratio = _num(o, "axis_ratio")
    if math.isnan(inside) or math.isnan(diameter) or inside <= 0:
        return ""
    failed: dict[str, bool] = {}  # rule -> failed narrowly
    if inside < st.min_nucleus_inside:
        failed["nucleus_inside"] = inside >= st.min_nucleus_inside * (1 - m)
    if diameter <= st.min_ctc_diameter_um:
        failed["size"] = diameter > st.min_ctc_diameter_um * (1 - m)
    elif _num(o, "diameter_low_um") <= st.min_ctc_diameter_um:
        failed["size"] = True  # larger, but not within the blur's uncertainty
    elif diameter > st.max_ctc_diameter_um:
        failed["size"] = False  # far beyond any cell
    double = o.get("label") == "DOUBLE_POSITIVE"
    cover = _num(o, "cd45_membrane_cover")
    band_fails = not math.isnan(cd45) and cd45 >= st.max_cd45_snr
    membrane_fails = not math.isnan(cover) and cover >= st.min_cd45_membrane_cover
    if double or band_fails or membrane_fails:
        # only the membrane band's rules (`cd45_snr`, `cd45_membrane_cover`)
        # have a margin here; CD45 found by the other rules (around the
        # nucleus, against the cell's cytokeratin) fails the definition outright
        by_band = o.get("reason") in _BAND_REASONS
        failed["cd45"] = (
            (not double or by_band)
            and (not band_fails or cd45 < st.max_cd45_snr * (1 + m))
            and (not membrane_fails or cover < st.min_cd45_membrane_cover * (1 + m))
        )
    single = _num(o, "cluster_size") in (1.0, math.nan) or o.get("cluster_size") == 1
    low_solid = single and not math.isnan(solidity) and solidity < st.min_solidity
    low_ratio = not math.isnan(ratio) and ratio < st.min_axis_ratio
    if low_solid or low_ratio:
        failed["shape"] = (not low_solid or solidity >= st.min_solidity * (1 - m)) and (
            not low_ratio or ratio >= st.min_axis_ratio * (1 - m)
        )
    if len(failed) != 1:
        return ""
    ((rule, narrow),) = failed.items()
    return rule if narrow else ""
