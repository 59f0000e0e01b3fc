"""Item-text embeddings: encoders (transformers sentence encoder, hashing encoder) and an on-disk cache."""

from fedmerge.text.cache import EmbeddingCache, default_cache_root, encode_catalog, encode_texts, text_key
from fedmerge.text.encoder import (
    HashingEncoder,
    SentenceEncoder,
    TextEncoder,
    default_model_path,
    get_encoder,
    mean_pool,
)

__all__ = [
    "EmbeddingCache",
    "HashingEncoder",
    "SentenceEncoder",
    "TextEncoder",
    "default_cache_root",
    "default_model_path",
    "encode_catalog",
    "encode_texts",
    "get_encoder",
    "mean_pool",
    "text_key",
]
