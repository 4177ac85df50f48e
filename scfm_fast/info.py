"""``python -m scfm_fast.info``: versions and which fast paths are usable here, and why not."""

from __future__ import annotations

import importlib
import platform
from importlib import metadata


def _version(mod: str, dist: str | None = None) -> str:
    try:
        importlib.import_module(mod)
    except Exception as e:  # noqa: BLE001 - report any import failure
        return f"not available ({type(e).__name__}: {e})"
    try:
        return metadata.version(dist or mod)
    except metadata.PackageNotFoundError:
        return "installed"


#: the two parts of the report: the tokenizer part never imports torch (``scfm info --part tokenizer``
#: starts in well under a second); the model part imports it when it runs
PARTS = ("tokenizer", "model")


def tokenizer_info() -> dict:
    """Versions, the compiled core and the tokenizer backends (imports no torch)."""
    from . import __version__

    d: dict = {"scfm_fast": __version__, "python": platform.python_version(), "platform": platform.platform()}
    for mod in ("numpy", "numba", "pyarrow", "anndata", "zarr", "h5py"):
        d[mod] = _version(mod)
    try:
        from . import _ext

        d["compiled_core"] = _ext.core.build_info() if _ext.core is not None else f"not built ({_ext.core_error})"
    except Exception as e:  # noqa: BLE001
        d["compiled_core"] = f"not available ({e})"
    try:
        from .tokenizer.rank import available_backends

        d["tokenizer_backends"] = available_backends()
    except Exception as e:  # noqa: BLE001
        d["tokenizer_backends"] = {"error": str(e)}
    return d


def model_info() -> dict:
    """torch, Triton, flash-attn, CUDA and the attention backends (imports torch)."""
    d: dict = {}
    for mod in ("torch", "triton", "flash_attn"):
        d[mod] = _version(mod, "flash-attn" if mod == "flash_attn" else None)
    try:
        import torch

        d["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "not available"
    except Exception as e:  # noqa: BLE001
        d["cuda"] = f"not available ({e})"
    try:
        from .kernels.attention import backend_report

        d["attention_backends"] = backend_report()
    except Exception as e:  # noqa: BLE001
        d["attention_backends"] = [{"name": "?", "usable": False, "reasons": [str(e)]}]
    return d


def info_dict(*, parts: tuple[str, ...] = PARTS) -> dict:
    """Versions, tokenizer backends and attention backends, as a dict (only the ``parts`` asked for)."""
    _check_parts(parts)
    d: dict = {}
    if "tokenizer" in parts:
        d.update(tokenizer_info())
    if "model" in parts:
        d.update(model_info())
    return d


def info_text(*, parts: tuple[str, ...] = PARTS) -> str:
    """The report :func:`info_dict` gives, as text."""
    _check_parts(parts)
    lines = ["scfm_fast environment", "====================="]
    if "tokenizer" in parts:
        d = tokenizer_info()
        lines += [f"{k:>12}: {v}" for k, v in d.items() if k != "tokenizer_backends"]
        lines.append("tokenizer backends (rank-value core):")
        for name, why in d["tokenizer_backends"].items():
            lines.append(f"  {name:<10} {'usable' if why is None else 'unavailable: ' + str(why)}")
    if "model" in parts:
        d = model_info()
        lines += [f"{k:>12}: {v}" for k, v in d.items() if k != "attention_backends"]
        lines.extend(_attention_lines(d["attention_backends"]))
    return "\n".join(lines)


def _check_parts(parts: tuple[str, ...]) -> None:
    bad = [p for p in parts if p not in PARTS]
    if bad or not parts:
        msg = f"info parts {list(parts)}: use one or both of {list(PARTS)}"
        raise ValueError(msg)


def _attention_lines(rows: list[dict]) -> list[str]:
    """The attention report: for which inputs, which backend ``auto`` picks, and why the others are out."""
    first = rows[0] if rows else {}
    what = f"{first.get('device', '?')}, {first.get('dtype', '?')}, head_dim {first.get('head_dim', '?')}"
    chosen = next((b.get("name") for b in rows if b.get("usable")), None)
    lines = [f"attention backends for {what} (auto picks the first usable: {chosen or 'none'}):"]
    for b in rows:
        if b.get("usable"):
            status = "usable, chosen" if b.get("name") == chosen else "usable"
        else:
            status = "unavailable: " + "; ".join(b.get("reasons", []))
        lines.append(f"  {b.get('name', '?'):<12} {status}")
    return lines


if __name__ == "__main__":
    print(info_text())
