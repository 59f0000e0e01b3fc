"""Domain data: the Domain abstraction and its loaders (MergeRec Amazon format, generic CSV/JSONL, synthetic)."""

from fedmerge.data.domain import Domain, ItemCatalog, Split, interaction_matrix, item_text

__all__ = ["Domain", "ItemCatalog", "Split", "interaction_matrix", "item_text"]
