"""The ``mmcore`` command.

mmcore info      version, torch/Triton/CUDA, whether mmcore._C loaded, and each op's backends
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys


def _info(args) -> int:
    import torch

    import mmcore
    from mmcore import _extension
    from mmcore.ops import _dispatch

    triton_version = None
    if importlib.util.find_spec("triton") is not None:
        import triton

        triton_version = triton.__version__
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    report = {
        "mmcore": mmcore.__version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "extension": "loaded" if _extension.C_ERROR is None else _extension.C_ERROR,
        "extension_cuda": _extension.cuda_built(),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "triton": triton_version,
        "triton_interpret": _dispatch.triton_interpret(),
        "backends": {name: {d: op.available(d) for d in devices} for name, op in sorted(_dispatch.ops().items())},
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"mmcore {report['mmcore']}  (python {report['python']}, torch {report['torch']})")
    print(f"  C++ extension mmcore._C : {report['extension']}")
    print(f"  CUDA kernels built      : {'yes' if report['extension_cuda'] else 'no'}")
    print(f"  CUDA device             : {report['cuda_device'] or 'none'}")
    triton_line = report["triton"] or "not installed"
    if report["triton"] and report["triton_interpret"]:
        triton_line += " (TRITON_INTERPRET=1: CPU interpreter)"
    print(f"  Triton                  : {triton_line}")
    print("  backends that can run here, in default order:")
    width = max(len(n) for n in report["backends"])
    for name, per_device in report["backends"].items():
        cols = "   ".join(f"{d}: {', '.join(b) or '-'}" for d, b in per_device.items())
        print(f"    {name:<{width}}  {cols}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mmcore", description=__doc__.split("\n")[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="print the version and which backends can run here")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(func=_info)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
