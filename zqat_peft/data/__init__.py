"""Models, text corpora and zero-shot task data that can be fetched without Hugging Face Hub access.

See :mod:`zqat_peft.data.assets` for the sources and the cache layout; :mod:`zqat_peft.data.archives` downloads
and unpacks them, :mod:`zqat_peft.data.corpora` turns them into split text.
"""

from .assets import (
    ASSETS,
    DEFAULT_MODEL,
    MODELS,
    SPLITS,
    TASKS,
    TEXT_CORPORA,
    asset_path,
    cache_dir,
    check_model_source,
    check_text_source,
    fetch,
    hub_reachable,
    is_complete,
    load_model_and_tokenizer,
    load_text,
    model_asset,
    resolve_model_path,
    task_data_dir,
)
from .corpora import clean_wiki_markup, extract_wiki_articles, read_r_lazyload, split_documents

__all__ = [
    "ASSETS",
    "DEFAULT_MODEL",
    "MODELS",
    "SPLITS",
    "TASKS",
    "TEXT_CORPORA",
    "asset_path",
    "cache_dir",
    "check_model_source",
    "check_text_source",
    "clean_wiki_markup",
    "extract_wiki_articles",
    "fetch",
    "hub_reachable",
    "is_complete",
    "load_model_and_tokenizer",
    "load_text",
    "model_asset",
    "read_r_lazyload",
    "resolve_model_path",
    "split_documents",
    "task_data_dir",
]
