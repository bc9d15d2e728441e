"""Every exportable part, by family: the one list that says which parts exist.

Each family module (``sam2``, ``sam2_video``, ``ctm``, ``policy``) declares its ``PARTS`` (spec factories by part
name); they are imported here explicitly, so the registry never depends on which modules some
caller happened to import. The test suite checks that every registered part has an export test and
that no two families declare the same part name.
"""

from __future__ import annotations

from conceptseg_edge.export import ctm, policy, sam2, sam2_video, sam3
from conceptseg_edge.export.parts import PartFactory

FAMILIES = (sam2, sam2_video, ctm, policy, sam3)
PART_REGISTRY: dict[str, PartFactory] = {name: factory for family in FAMILIES for name, factory in family.PARTS.items()}
