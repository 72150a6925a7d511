"""`synesthesia export RUN [--onnx] [--push-to-hub REPO_ID]`.

Works on a student run's export folder (``<run>/export``, written by ``train``) or on
the folder itself. With ``--onnx`` it adds ``model.onnx`` (``pixel_values`` →
``logits``, batch dimension dynamic; needs the ``onnx`` extra) and checks it with
onnxruntime against the torch model. With ``--push-to-hub`` it uploads the folder to
the Hugging Face Hub as a timm model with its model card. Prints the folder's files
as JSON.
"""

from __future__ import annotations

import json


def add_arguments(parser):
    parser.add_argument("folder", metavar="RUN", help="student run folder or its export folder")
    parser.add_argument(
        "--onnx", action="store_true", help="write model.onnx (logits only, dynamic batch) and check it"
    )
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    parser.add_argument(
        "--push-to-hub", default=None, metavar="REPO_ID", help="upload the export to this Hub repo"
    )
    parser.add_argument("--private", action="store_true", help="with --push-to-hub: a private repo")


def check_onnx(path, model, batch: int = 3, atol: float = 1e-4) -> float:
    """Run ``path`` with onnxruntime on a random batch; its largest difference from ``model``'s logits."""
    import onnxruntime
    import torch

    from synesthesia import UserError

    rgb = torch.randn(
        batch, 3, model.image_size, model.image_size, generator=torch.Generator().manual_seed(0)
    )
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"pixel_values": rgb.numpy()})
    with torch.no_grad():
        expected = model.model(rgb)
    error = float((torch.from_numpy(logits) - expected).abs().max())
    if error > atol:
        raise UserError(f"{path}: onnxruntime's logits differ from torch's by {error:.2e} (> {atol})")
    return error


def run(args) -> int:
    from pathlib import Path

    from synesthesia import UserError
    from synesthesia.train.export import export_onnx, load_student, push_to_hub

    folder = Path(args.folder)
    if (folder / "export" / "config.json").is_file():
        folder = folder / "export"
    if not folder.is_dir():
        raise UserError(f"{args.folder} is not a folder")
    model = load_student(folder)
    result: dict = {"export": str(folder)}
    if "synesthesia" not in model.export_config:  # an export from before the timm format
        model.save_pretrained(folder)
        result["rewritten"] = "timm format"
    if args.onnx:
        try:
            import onnxruntime  # noqa: F401
            import onnxscript  # noqa: F401
        except ImportError:
            raise UserError(
                "--onnx needs onnx, onnxscript and onnxruntime: pip install 'synesthesia[onnx]'"
            ) from None
        path = export_onnx(model, folder / "model.onnx", opset=args.opset)
        result["onnx_max_abs_diff"] = check_onnx(path, model)
    if args.push_to_hub:
        commit = push_to_hub(folder, args.push_to_hub, private=args.private or None)
        result["pushed"] = str(getattr(commit, "commit_url", commit))
    result["files"] = sorted(p.name for p in folder.iterdir())
    print(json.dumps(result, indent=2))
    return 0
