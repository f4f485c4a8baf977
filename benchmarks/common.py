"""What the benchmarks share: device and version reporting, data readers, error metrics."""

from __future__ import annotations

import gzip
import importlib.metadata as md
import os
import platform
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

import lightning_fisher as lf
from lightning_fisher import _json as strict_json

#: the distributions every benchmark reports; a benchmark adds the ones it compares against
BASE_DISTRIBUTIONS = ("torch", "lightning")


def versions(*extra: str) -> dict[str, str | None]:
    """Python's version and those of torch, lightning, lightning-fisher and ``extra``
    distributions (``None`` where one is not installed)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in (*BASE_DISTRIBUTIONS, *extra):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    out["lightning-fisher"] = lf.__version__  # the code that ran, installed or not
    return out


def rank_environment(rank: int, world: int, port: int) -> None:
    """The environment variables a process of a one-host process group (and Lightning's
    strategies inside it) read: rank ``rank`` of ``world``, rendezvous on localhost:``port``."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        NODE_RANK="0",
    )


def join_process_group(rank: int, world: int, cpu: bool) -> torch.device:
    """Join the process group of ``rank_environment``: gloo with one CPU thread, or NCCL on GPU
    ``rank``; returns the rank's device."""
    if cpu:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=rank, world_size=world)
        return torch.device("cpu")
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=device)
    return device


def device_name(device: torch.device | str = "cpu") -> str:
    """The GPU's name, or the CPU's with its core and torch thread counts."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    return f"CPU ({cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def report_header(title: str, report: dict[str, Any]) -> list[str]:
    """The first lines of a Markdown report: its title, device and command, versions."""
    return [
        f"# {title}",
        "",
        f"Device: {report['device']}. Command: `{report['command']}`.",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v) + ".",
        "",
    ]


def write_json_md(path: str, report: dict[str, Any], lines: list[str]) -> str:
    """Write ``report`` to ``path.json`` (strict JSON) and ``lines`` to ``path.md``; returns
    ``path``."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".json", "w") as f:
        strict_json.dump(report, f, indent=1)
    with open(path + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def fmt(value: object, spec: str) -> str:
    """A report cell: ``value`` formatted with ``spec``, or ``-`` when it is missing."""
    return "-" if value is None else format(value, spec)


def max_rel_diff(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    """max over parameters of max |got - want| / max |want| (in float64)."""
    return max(
        float(
            (got[k].double() - want[k].double()).abs().max()
            / want[k].double().abs().max().clamp_min(1e-30)
        )
        for k in want
    )


def read_idx(path: str) -> np.ndarray:
    """An IDX file (gzipped): magic 0x0000 0x08 ndim, big-endian uint32 sizes, then uint8 data."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    if data[:3] != b"\x00\x00\x08":
        raise ValueError(f"{path} is not an unsigned-byte IDX file.")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)
