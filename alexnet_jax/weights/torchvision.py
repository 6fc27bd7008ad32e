"""Where torchvision AlexNet weights come from: the IMAGENET1K_V1 record, torch hub, files.

`.pth`/`.pt` files in torch's zip format (every `torch.save` since torch 1.6, torchvision's
weights among them) are read without torch, by `weights.torch_file`: its own unpickler
allows what torch's `weights_only=True` allows and runs nothing else. torch (the
`convert` extra) is needed only for files in torch's legacy format, read with
`torch.load(..., weights_only=True)` when torch is installed; either way a pickle that
tries to run code is refused, never executed. torch hub's cache folder is found as torch
finds it ($TORCH_HOME, or $XDG_CACHE_HOME/torch, or ~/.cache/torch), so the hash-checked
download shares torch's cache with or without torch.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import sys
import urllib.request
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alexnet_jax.errors import first_line
from alexnet_jax.models.alexnet import MIN_SIZE
from alexnet_jax.transforms.preprocess import CROP_SIZE, MEAN_RGB, RESIZE_SIZE, STDDEV_RGB
from alexnet_jax.weights.torch_file import TorchFileError, is_torch_zip, read_torch_file


def url_file_name(url: str) -> str:
    """The last part of a URL or path: the name torch hub caches a download under."""
    return url.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class WeightsRecord:
    """Everything known about one published set of weights, in one place."""

    name: str
    url: str
    sha256_prefix: str  # torch hub checks the file's sha256 against this prefix of its name
    num_params: int
    min_size: int
    acc1: float  # ImageNet-1k validation, as torchvision reports it
    acc5: float
    num_classes: int = 1000
    resize_size: int = RESIZE_SIZE
    crop_size: int = CROP_SIZE
    mean: tuple[float, float, float] = MEAN_RGB
    std: tuple[float, float, float] = STDDEV_RGB

    @property
    def file_name(self) -> str:
        return url_file_name(self.url)

    def is_file_of(self, path: str | os.PathLike) -> bool:
        """Whether the file at `path` is these weights: its own sha256 starts with the record's prefix."""
        digest = hashlib.sha256()
        with Path(path).open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest().startswith(self.sha256_prefix)


# torchvision.models.AlexNet_Weights.IMAGENET1K_V1
IMAGENET1K_V1 = WeightsRecord(
    name="IMAGENET1K_V1",
    url="https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
    sha256_prefix="7be5be79",
    num_params=61_100_840,
    min_size=MIN_SIZE,
    acc1=56.522,
    acc5=79.066,
)

_HASH_IN_NAME = re.compile(r"-([a-f0-9]*)\.")  # torch hub's rule for the hash prefix in a file name
_DOWNLOAD_TIMEOUT_S = 60


class WeightsError(RuntimeError):
    """Weights that cannot be had or read; the message says what to do."""


def require_torch(what: str = "running the torch reference"):
    """torch, imported; **Raises:** WeightsError saying that `what` needs it and how to install it."""
    try:
        import torch
    except ImportError as e:
        raise WeightsError(f"{what} needs torch ({e}); install it with: pip install 'alexnet-jax[convert]'") from e
    return torch


def hub_checkpoint_dir() -> Path:
    """torch hub's cache folder for downloaded weights ($TORCH_HOME/hub/checkpoints), with or without torch.

    With torch imported, `torch.hub.get_dir()` (which `torch.hub.set_dir` may have moved);
    otherwise torch's own rule: $TORCH_HOME, else $XDG_CACHE_HOME/torch, else ~/.cache/torch.
    """
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "hub"):
        return Path(torch.hub.get_dir()) / "checkpoints"
    home = os.getenv("TORCH_HOME", os.path.join(os.getenv("XDG_CACHE_HOME", "~/.cache"), "torch"))
    return Path(os.path.expanduser(home)) / "hub" / "checkpoints"


def hash_prefix(url_or_name: str) -> str | None:
    """The sha256 prefix torch hub reads from a file name like `alexnet-owt-7be5be79.pth`."""
    match = _HASH_IN_NAME.search(url_file_name(url_or_name))
    return match.group(1) if match else None


def fetch_state_dict(url: str = IMAGENET1K_V1.url, *, progress: bool = True) -> tuple[dict[str, Any], Path]:
    """Download (or take from torch hub's cache) a state_dict, checking its hash prefix.

    The file lands where `torch.hub.load_state_dict_from_url` keeps it
    ($TORCH_HOME/hub/checkpoints/<name>) under torch hub's rule: the sha256 of the file
    must start with the hex part of its name. The download is ours rather than torch
    hub's only for its timeout: torch hub's urlopen has none, and setting one means
    changing the socket default for the whole process.
    **Returns:** (state_dict, path of the cached file).
    **Raises:** WeightsError with one line saying why and what to do instead.
    """
    expected = hash_prefix(url)
    if expected is None:
        raise WeightsError(f"{url}: the file name carries no sha256 prefix (name-<hash>.pth), so it cannot be checked")
    cached = hub_checkpoint_dir() / url_file_name(url)
    if not cached.exists():
        cached.parent.mkdir(parents=True, exist_ok=True)
        _download(url, cached, expected, progress)
    try:
        return dict(load_checkpoint(cached)), cached
    except WeightsError as e:
        raise WeightsError(f"could not read the cached {e}") from e


def _download(url: str, dst: Path, expected_prefix: str, progress: bool) -> None:
    """`url` to `dst` through a temporary file beside it, kept only when its sha256 starts with `expected_prefix`."""
    from tqdm import tqdm

    tmp = dst.with_name(f".{dst.name}.{secrets.token_hex(4)}.partial")
    digest = hashlib.sha256()
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "torch.hub"})
        with urllib.request.urlopen(request, timeout=_DOWNLOAD_TIMEOUT_S) as response, tmp.open("wb") as f:
            size = response.headers.get("Content-Length")
            with tqdm(
                total=int(size) if size else None,
                disable=not progress,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=dst.name,
            ) as bar:
                while block := response.read(1 << 20):
                    f.write(block)
                    digest.update(block)
                    bar.update(len(block))
    except (OSError, ValueError) as e:  # URLError and socket timeouts are OSErrors; ValueError: a bad URL
        tmp.unlink(missing_ok=True)
        reason = getattr(e, "reason", None) or e
        raise WeightsError(
            f"could not download {url} ({reason}). Without network, fetch that file on another machine "
            f"and pass --checkpoint PATH, or put it in {dst.parent}/"
        ) from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if not digest.hexdigest().startswith(expected_prefix):
        tmp.unlink()
        raise WeightsError(
            f"{url}: downloaded file failed its sha256 check and was discarded "
            f"(sha256 {digest.hexdigest()[: len(expected_prefix)]}..., expected {expected_prefix}...)"
        )
    os.replace(tmp, dst)


def _unwrap(obj: Any, path: Path) -> Mapping[str, Any]:
    """A state_dict, or the one a training checkpoint keeps under 'state_dict' or 'model'."""
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, Mapping):
                return inner
        if obj and all(isinstance(k, str) for k in obj) and all(hasattr(v, "shape") for v in obj.values()):
            return obj
    what = type(obj).__name__
    if isinstance(obj, Mapping):
        keys = ", ".join(map(str, list(obj)[:5]))
        what = f"a dict without tensors under 'state_dict' or 'model' (keys: {keys or 'none'})"
    raise WeightsError(f"{path}: not a state_dict: found {what}")


def load_checkpoint(path: str | os.PathLike) -> Mapping[str, Any]:
    """Read a torchvision state_dict from `.pth`/`.pt` (torch.save) or `.safetensors`, without torch.

    torch's zip format is read by `weights.torch_file` (numpy arrays, no torch needed); the
    legacy format by torch, when installed. A training checkpoint dict holding the
    state_dict under `state_dict` or `model` is unwrapped.
    **Raises:** WeightsError naming the file and the problem (missing, truncated,
    not a state_dict, a pickle that wants to run code).
    """
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"{path}: no such file")
    if path.is_dir():
        raise WeightsError(f"{path}: is a folder, not a weights file")
    if path.suffix == ".safetensors":
        return _unwrap(_load_safetensors(path), path)
    try:
        torch = None if is_torch_zip(path) else _torch_or_none()
        if torch is None:
            return _unwrap(read_torch_file(path), path)
    except TorchFileError as e:
        raise WeightsError(f"{path}: {e}") from None
    except OSError as e:
        raise WeightsError(f"{path}: cannot read the file ({e.strerror or e})") from None
    # torch's legacy format, or not a torch file at all, with torch installed: its loader says which.
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pickle-protocol chatter; failures are reported below
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for bad files; each gets one line
        raise WeightsError(f"{path}: {_why_unreadable(e)}") from e
    return _unwrap(obj, path)


def _torch_or_none():
    try:
        return require_torch()
    except WeightsError:
        return None


def _why_unreadable(e: Exception) -> str:
    text = str(e)
    if "Weights only load failed" in text:
        # torch's weights-only unpickler stopped before running anything it does not allow.
        wanted = re.search(r"GLOBAL ([\w.]+)", text)
        if wanted:
            return f"refused: the file asks to run code ({wanted.group(1)}); it was not executed"
        opcode = re.search(r"Unsupported operand \d+", text)
        detail = f" ({opcode.group(0)})" if opcode else ""
        return (
            "refused: corrupt, or a pickle with instructions that torch's weights-only loader does not "
            f"allow{detail}; nothing in it was executed"
        )
    if isinstance(e, (zipfile.BadZipFile, EOFError)) or "zip archive" in text or "PytorchStreamReader" in text:
        return f"truncated or corrupt ({first_line(e)})"
    return f"not a readable PyTorch file ({first_line(e)})"


def _load_safetensors(path: Path) -> dict[str, Any]:
    try:
        from safetensors.numpy import load_file
    except ImportError as e:
        raise WeightsError(f"{path}: reading .safetensors needs safetensors: pip install safetensors") from e
    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001 - header and size errors from a bad file
        raise WeightsError(f"{path}: truncated or corrupt safetensors file ({first_line(e)})") from e
