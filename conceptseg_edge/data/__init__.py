"""Data formats: ConceptWorld (synthetic episodes) and the official ConceptSeg all_meta.json layout."""
