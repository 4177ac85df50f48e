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


def info_dict() -> dict:
    """Versions, tokenizer backends and attention backends, as a dict."""
    from . import __version__

    d: dict = {"scfm_fast": __version__, "python": platform.python_version(), "platform": platform.platform()}
    for mod in ("numpy", "numba", "torch", "triton", "flash_attn", "pyarrow", "anndata", "zarr", "h5py"):
        d[mod] = _version(mod, "flash-attn" if mod == "flash_attn" else None)
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


def info_text() -> str:
    d = info_dict()
    lines = ["scfm_fast environment", "====================="]
    for k, v in d.items():
        if k in ("tokenizer_backends", "attention_backends"):
            continue
        lines.append(f"{k:>12}: {v}")
    lines.append("tokenizer backends (rank-value core):")
    for name, why in d["tokenizer_backends"].items():
        lines.append(f"  {name:<10} {'usable' if why is None else 'unavailable: ' + str(why)}")
    lines.extend(_attention_lines(d["attention_backends"]))
    return "\n".join(lines)


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
