"""Where a checkpoint comes from: a local folder, a hub repo id (snapshot_download restricted to the
files dbrxq needs; offline from the cache), or the demo model shipped in the package; and the
tokenizer files that travel with a checkpoint.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
from pathlib import Path

from dbrxq.core.errors import CheckpointError
from dbrxq.core.untrusted import MAX_TOKENIZER_BYTES, inside
from dbrxq.formats.checkpoint import INDEX_NAME

# Tokenizer files dbrxq reads or carries along. Never code: the hub's DBRX repos also hold a tiktoken.py
# for transformers' trust_remote_code, which a copy in an output folder would let `import tiktoken` run.
TOKENIZER_PATTERNS = ["tokenizer.json", "tokenizer_config.json", "*.tiktoken", "*.tiktoken.json",
                      "special_tokens_map.json", "generation_config.json"]


# What a hub download fetches by default: weights, their index, config and tokenizer -- never
# the other formats some repos also carry (*.bin, *.pt, GGUF...).
DEFAULT_ALLOW_PATTERNS = ["config.json", "*.safetensors", INDEX_NAME, *TOKENIZER_PATTERNS]


_REPO_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# -- locating a checkpoint ------------------------------------------------------------------
def resolve_model_dir(path_or_repo_id: str | os.PathLike, *, revision: str | None = None,
                      allow_patterns: list[str] | None = None, cache_dir: str | os.PathLike | None = None,
                      token: str | bool | None = None) -> Path:
    """Return a local folder holding the checkpoint, downloading it from the hub if needed.

    Args:
        path_or_repo_id: an existing local folder (returned as is) or a hub repo id ("org/name").
        revision: hub branch, tag or commit (default: main).
        allow_patterns: files to fetch from the hub; default :data:`DEFAULT_ALLOW_PATTERNS`.
        cache_dir: hub cache folder (default: huggingface_hub's, i.e. ``HF_HUB_CACHE``).
        token: hub token for gated/private repos (default: the logged-in one).

    Returns:
        The folder (for a hub repo, its snapshot in the cache).

    Raises:
        CheckpointError: not a folder nor a repo id, repo not found or gated, or offline and
            not cached.
    """
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        return path
    name = str(path_or_repo_id)
    if path.exists() or not _REPO_ID_RE.match(name):
        raise CheckpointError(f"{name} is not a folder and not a hub repo id (expected 'org/name')")
    from huggingface_hub import errors as hf_errors
    from huggingface_hub import snapshot_download
    # A relative path with a typo looks like "org/name" too: every hub failure below says that no
    # such local folder exists either.
    nolocal = f"no local folder {name} (from {Path.cwd()}) and "
    try:
        folder = snapshot_download(name, revision=revision, cache_dir=cache_dir, token=token,
                                   allow_patterns=allow_patterns or DEFAULT_ALLOW_PATTERNS)
    # Order matters: GatedRepoError subclasses RepositoryNotFoundError.
    except hf_errors.GatedRepoError:
        raise CheckpointError(f"hub repo {name} is gated: accept its license on huggingface.co and log in "
                              f"(`hf auth login`) or pass a token") from None
    except hf_errors.RepositoryNotFoundError:
        raise CheckpointError(f"{nolocal}hub repo {name} not found (or private: log in or pass a token); "
                              f"check the path or the id") from None
    except hf_errors.RevisionNotFoundError:
        raise CheckpointError(f"hub repo {name} has no revision {revision!r}") from None
    except hf_errors.LocalEntryNotFoundError:
        offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "on", "yes", "true")
        how = ("HF_HUB_OFFLINE is set (offline mode): unset it and connect to download it" if offline
               else "the hub cannot be reached: connect to download it")
        raise CheckpointError(f"{nolocal}hub repo {name} is not (completely) in the local cache; {how}, "
                              f"or check the path") from None
    except (hf_errors.HFValidationError, ValueError) as e:
        raise CheckpointError(f"{name} is not a valid hub repo id: {str(e).splitlines()[0]}") from None
    except (hf_errors.HfHubHTTPError, OSError) as e:
        raise CheckpointError(f"{nolocal}hub repo {name}: download failed ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None
    return Path(folder)


def tokenizer_files(folder: Path) -> list[Path]:
    """The files of ``folder`` matching TOKENIZER_PATTERNS that dbrxq copies along: each a regular
    file of at most 64 MiB inside the folder (a link leaving it is refused, not followed)."""
    out = []
    for p in sorted(Path(folder).iterdir()):
        if not any(fnmatch.fnmatch(p.name, pat) for pat in TOKENIZER_PATTERNS):
            continue
        inside(folder, p, str(p))
        if not p.is_file():
            raise CheckpointError(f"{p}: not a regular file; refused")
        if p.stat().st_size > MAX_TOKENIZER_BYTES:
            raise CheckpointError(f"{p}: {p.stat().st_size} bytes, more than a tokenizer file may have; refused")
        out.append(p)
    return out


def copy_tokenizer_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[Path]:
    """Copy the files matching ``TOKENIZER_PATTERNS`` from `src` to `dst`.

    Returns:
        The copied files (under `dst`).

    Raises:
        CheckpointError: `src` is not a folder or holds none of them.
    """
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise CheckpointError(f"{src}: tokenizer folder not found")
    files = tokenizer_files(src)
    if not files:
        raise CheckpointError(f"{src}: no tokenizer files ({', '.join(TOKENIZER_PATTERNS)})")
    return [Path(shutil.copy2(p, dst / p.name)) for p in files]


DEFAULT_MODEL_DIR = Path(__file__).parent.parent / "assets" / "tiny"


DEMO_NAME = "demo"


def resolve_model_name(path_or_repo_id: str | Path | None) -> str | Path:
    """The embedded demo model's folder for None or the name "demo" (unless a local folder of that
    name exists, which wins); anything else unchanged (a folder or a hub repo id)."""
    if path_or_repo_id is None or (str(path_or_repo_id) == DEMO_NAME and not Path(DEMO_NAME).exists()):
        return default_model_dir()
    return path_or_repo_id


def default_model_dir() -> Path:
    """The small DBRX-architecture checkpoint shipped inside the package."""
    return DEFAULT_MODEL_DIR
