"""The optional compiled CPU kernel of weight-mode targeting.

Weight-mode targeted dropout ranks every row of every targeted weight at each optimizer step. On
CPU, :func:`lowest_k_abs_bracketed` does that ranking in two passes over each row (count against
the bracket while collecting the few values inside it, then write the mask), in C++ with SSE2
lanes (x86-64) and OpenMP over rows, instead of the dozen whole-tensor operations of
:func:`hf_tdrop.masking.lowest_k_bracketed`; the mask is the same, bit for bit (same ranking in
float32, same tie rule, same brackets), so it changes speed only, never a result.

The kernel ships as C++ source (``hf_tdrop/csrc``) and is compiled on first use with the machine's
C++ compiler (``$CXX``, else ``c++``, ``g++`` or ``clang++``; about a second) into a cache folder:
``$HF_TDROP_CACHE``, else ``$XDG_CACHE_HOME/hf_tdrop``, else ``~/.cache/hf_tdrop``. Without a
compiler the torch implementation is used and one warning says why; with ``HF_TDROP_NATIVE=0`` in
the environment it is used without trying to compile. It is called through ``ctypes`` (no torch headers, no build step at install).

Trust model: loading a shared library runs its code, so the cache must be writable by you alone.
The kernel refuses (and the torch implementation is used, with one warning naming the reason) a
cache folder or library file that is not owned by the current user or that the group or others
may write to. At build time the library's SHA-256 is written beside it (``<library>.sha256``, by
the same user, atomically); a cached library whose contents do not match its record is rebuilt
before it is loaded. Point ``HF_TDROP_CACHE`` only at a folder of your own.

Rows containing NaN: the kernel orders NaN above +inf (by the bits of ``|w|``) and always selects
``k`` entries per row, NaN last; the torch implementation's choice in such rows differs (for
example, none in an all-NaN row). "Same masks" holds for rows without NaN; a NaN weight means
training has already diverged.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Optional

import torch

logger = logging.getLogger(__name__)

ENV_SWITCH = "HF_TDROP_NATIVE"
"""Environment variable: ``0`` (or ``false``, ``no``, ``off``) turns the compiled kernel off."""
ENV_CACHE = "HF_TDROP_CACHE"
"""Environment variable: the folder the compiled kernel is cached in."""
SOURCE = Path(__file__).parent / "csrc" / "lowest_k_abs.cpp"
ABI_VERSION = 2
_BASE_FLAGS = ["-O3", "-ffp-contract=off", "-std=c++17", "-shared", "-fPIC"]
_FLAG_SETS = (_BASE_FLAGS + ["-fopenmp"], _BASE_FLAGS)  # then without OpenMP (one thread per call)
_OFF_VALUES = {"0", "false", "no", "off"}
_ERRORS = {-1: "rejected its arguments", -2: "ran out of memory", -3: "failed with an internal error"}

_lock = threading.Lock()
_library: Optional[ctypes.CDLL] = None
_attempted = False
_reason: Optional[str] = None


def enabled() -> bool:
    """Whether the environment allows the compiled kernel (``HF_TDROP_NATIVE`` is not ``0``/``false``/``no``/``off``)."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in _OFF_VALUES


def cache_dir() -> Path:
    """Where the compiled kernel is kept (see the module docstring)."""
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hf_tdrop"


def _compiler() -> Optional[str]:
    if os.environ.get("CXX"):
        return os.environ["CXX"]
    for name in ("c++", "g++", "clang++"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _library_path(compiler: str, flags: list[str]) -> Path:
    digest = hashlib.sha256()
    digest.update(SOURCE.read_bytes())
    digest.update("\0".join([compiler, *flags, platform.machine(), platform.system()]).encode())
    return cache_dir() / f"lowest_k_abs-{digest.hexdigest()[:16]}.so"


def _check_private(path: Path, what: str) -> None:
    """Refuse ``path`` unless it is owned by the current user and neither group- nor world-writable
    (a library there would run with our rights). No-op where the OS has no user ids."""
    if not hasattr(os, "getuid"):
        return
    info = path.stat()
    if info.st_uid != os.getuid():
        raise RuntimeError(f"the kernel {what} {path} is not owned by the current user; refusing to use it")
    if info.st_mode & 0o022:
        raise RuntimeError(f"the kernel {what} {path} is writable by group or others; refusing to use it "
                           f"(chmod go-w it, or point {ENV_CACHE} at a folder of your own)")


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _record_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _verified(path: Path) -> bool:
    """Whether the cached library at ``path`` is ours, private, and matches its recorded hash."""
    if not path.exists():
        return False
    _check_private(path, "library")
    record = _record_path(path)
    if not record.exists():
        return False
    _check_private(record, "hash record")
    return record.read_text(encoding="ascii").strip() == _digest(path)


def _write_atomically(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _build(compiler: str) -> Path:
    """Compile the kernel into the cache, or return the verified cached build (see the trust model
    in the module docstring). Atomic: concurrent processes never load a partial file."""
    errors = []
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    _check_private(folder, "cache folder")
    for flags in _FLAG_SETS:
        path = _library_path(compiler, flags)
        if _verified(path):
            return path
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
        os.close(fd)
        try:
            done = subprocess.run([compiler, *flags, str(SOURCE), "-o", tmp], capture_output=True, text=True, timeout=300)
            if done.returncode == 0:
                os.chmod(tmp, 0o755)
                digest = _digest(Path(tmp))
                os.replace(tmp, path)
                _write_atomically(_record_path(path), digest.encode("ascii"))
                if not _verified(path):  # another process replaced it in between: load neither
                    raise RuntimeError(f"the cached kernel {path} changed while it was being built")
                return path
            errors.append(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}")
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    raise RuntimeError(f"{compiler} failed: {errors[-1]}")


def _load() -> ctypes.CDLL:
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C++ compiler found (set $CXX, or install g++ or clang++)")
    return _bind(ctypes.CDLL(str(_build(compiler))))


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Declare the kernel's C signatures on a loaded library (after checking its ABI version)."""
    lib.tdrop_abi_version.restype = ctypes.c_int64
    if lib.tdrop_abi_version() != ABI_VERSION:
        raise RuntimeError("the cached kernel does not match this version of hf_tdrop")
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.tdrop_lowest_k_abs.restype = i64
    lib.tdrop_lowest_k_abs.argtypes = [ptr, i64, i64, i64, i64, i64, ptr, ptr, i64, ptr, i64, i64, ptr, ptr, ctypes.c_int]
    return lib


def library() -> Optional[ctypes.CDLL]:
    """The loaded kernel, compiling it on the first call of the process; None when it is off or
    cannot be built (the reason: :func:`unavailable_reason`, also logged once as a warning)."""
    global _library, _attempted, _reason
    if not enabled():
        return None
    if _attempted:
        return _library
    with _lock:
        if not _attempted:
            try:
                _library = _load()
            except (OSError, RuntimeError, subprocess.SubprocessError) as err:
                _reason = str(err)
                logger.warning(
                    "hf_tdrop: the compiled CPU kernel of weight-mode targeting is unavailable (%s); using the "
                    "torch implementation (same masks, slower). Set %s=0 to skip this attempt.", _reason, ENV_SWITCH)
            _attempted = True
    return _library


def available() -> bool:
    """Whether :func:`lowest_k_abs_bracketed` can run (the kernel is on and compiled)."""
    return library() is not None


def unavailable_reason() -> Optional[str]:
    """Why the kernel is not available, or None if it is (or was not tried yet)."""
    if not enabled():
        return f"turned off by {ENV_SWITCH}={os.environ.get(ENV_SWITCH)}"
    return _reason


def supports(w2d: torch.Tensor) -> bool:
    """Whether :func:`lowest_k_abs_bracketed` takes ``w2d``: a plain (not a subclass such as
    ``DTensor``) 2-D CPU tensor in float32, bfloat16 or float16 (ranked in float32, as the torch
    implementation ranks them), with rows of fewer than ``2**31`` entries. Does not check
    :func:`available`."""
    return (
        type(w2d) in (torch.Tensor, torch.nn.Parameter)
        and w2d.dim() == 2
        and w2d.device.type == "cpu"
        and w2d.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and w2d.shape[1] < 2**31
    )


def lowest_k_abs_bracketed(
    w2d: torch.Tensor, k: int, lower: Optional[torch.Tensor], upper: Optional[torch.Tensor], margin: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """The ``k`` smallest ``|w|`` of every row of ``w2d [rows, n]`` (``1 <= k < n``; see
    :func:`supports`): ``(mask, new_lower, new_upper, failed)``.

    ``mask`` is bool ``[rows, n]`` with the strides of ``w2d``, equal to
    ``masking.lowest_k(w2d.abs(), k)``. ``lower``/``upper`` (float32 ``[rows]``, or None) are the
    previous call's bracket around each row's ``k``-th value; ``new_lower``/``new_upper`` are the
    bracket for the next call, ``margin`` ranks on each side, and ``failed`` counts the rows the
    given bracket did not hold for (every row without one). Raises ``RuntimeError`` if the kernel
    is not :func:`available`.
    """
    lib = library()
    if lib is None:
        raise RuntimeError(f"the compiled kernel is unavailable: {unavailable_reason()}")
    if not isinstance(w2d, torch.Tensor) or not supports(w2d):
        what = (f"a {type(w2d).__name__}" if not isinstance(w2d, torch.Tensor)
                else f"a {w2d.dim()}-D {w2d.dtype} tensor on {w2d.device.type}")
        raise ValueError(f"`w2d` must be a plain 2-D CPU float32/bfloat16/float16 tensor, got {what}.")
    rows, n = w2d.shape
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < n:
        raise ValueError(f"`k` must be an integer in [1, {n - 1}] for rows of {n} entries, got {k!r}.")
    if isinstance(margin, bool) or not isinstance(margin, int) or not 0 <= margin <= 2**40:
        raise ValueError(f"`margin` must be an integer in [0, 2**40], got {margin!r}.")
    if (lower is None) != (upper is None):
        raise ValueError("`lower` and `upper` must be given together (the previous call's bracket) or both be None.")
    if lower is not None:
        for name, bound in (("lower", lower), ("upper", upper)):
            if (not isinstance(bound, torch.Tensor) or bound.device.type != "cpu" or bound.dtype != torch.float32
                    or tuple(bound.shape) != (rows,)):
                got = (f"{tuple(bound.shape)} {bound.dtype} on {bound.device.type}" if isinstance(bound, torch.Tensor)
                       else type(bound).__name__)
                raise ValueError(f"`{name}` must be a float32 CPU tensor of shape ({rows},) (one bound per row), "
                                 f"got {got}.")
        lower = lower.contiguous()
        upper = upper.contiguous()
    w = w2d.detach()
    if w.dtype != torch.float32:
        w = w.float()  # keeps a transposed view's strides
    mask = torch.empty_like(w, dtype=torch.bool)
    new_lower = torch.empty(rows, dtype=torch.float32)
    new_upper = torch.empty(rows, dtype=torch.float32)
    failed = lib.tdrop_lowest_k_abs(
        w.data_ptr(), rows, n, w.stride(0), w.stride(1), k,
        None if lower is None else lower.data_ptr(), None if upper is None else upper.data_ptr(), margin,
        mask.data_ptr(), mask.stride(0), mask.stride(1), new_lower.data_ptr(), new_upper.data_ptr(),
        torch.get_num_threads(),
    )
    if failed < 0:
        reason = _ERRORS.get(failed, f"returned error code {failed}")
        raise RuntimeError(f"the compiled kernel {reason} (shape {tuple(w.shape)}, k={k}, margin={margin})")
    return mask, new_lower, new_upper, int(failed)
