"""`emoq export --checkpoint CKPT --out BUNDLE [--fp16] [--no-verify] [--no-int8] [--device auto|cpu|cuda]`,
`emoq export --verify BUNDLE [--device ...]` and
`emoq export --add-variant int8 --bundle BUNDLE --out NEW [--calibration CORPUS] [--accuracy CORPUS]`.

Heavy imports (torch, onnx, vLLM) happen inside `run`, because every `emoq` invocation loads
every command's `register`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("export", help="export a checkpoint to a verified serving bundle (stage 2: the full "
                                             "model, or a text-only one without the audio graph; stage 1: former + "
                                             "auxiliary head, no LLM), or re-verify a bundle")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--checkpoint", help="checkpoint directory or run folder (uses best/) from `emoq train "
                                           "stage2` or `stage1`")
    mode.add_argument("--verify", metavar="BUNDLE", help="check a bundle's manifest, hashes and parity")
    mode.add_argument("--add-variant", choices=("int8",),
                      help="write a copy of --bundle at --out with this precision variant built, measured and "
                           "recorded (no re-export; needs a CPU with VNNI/AMX-INT8)")
    p.add_argument("--bundle", help="with --add-variant: the bundle to copy (left as it is)")
    p.add_argument("--calibration", default=None, metavar="CORPUS",
                   help="with --add-variant: calibrate on this corpus's train split (e.g. synthetic:100, the "
                        "demo's); default: the demo's clips in three voices")
    p.add_argument("--accuracy", default=None, metavar="CORPUS",
                   help="with --add-variant, for trained bundles: the variant must stay within 1 point of the "
                        "fp32 graphs' accuracy on this corpus's test split (e.g. synthetic:100 for the demo bundle)")
    p.add_argument("--no-int8", action="store_true",
                   help="with --checkpoint: skip the int8 variant (built by default where the CPU has VNNI/AMX-INT8)")
    p.add_argument("--out", help="bundle directory to create (with --checkpoint or --add-variant)")
    p.add_argument("--fp16", action="store_true", help="also write an fp16 audio encoder for the CUDA EP "
                                                       "(not for a text-only model: it has no audio graph)")
    p.add_argument("--no-verify", action="store_true", help="skip the parity check (manifest says 'unverified')")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu",
                   help="where the reference model and the parity run compute (the bundle's "
                        "files are the same either way); on cuda the fp16 graph's parity is measured on the CUDA EP")
    p.add_argument("--backend", choices=("vllm", "transformers"), default="vllm",
                   help="LLM engine the parity check runs the bundle with (default: vllm, the serving engine)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from emoq_serve.bundle import BundleError
    from export.verify import ParityError

    try:
        if args.verify:
            from export.verify import verify_bundle

            from emoq_serve.device import resolve_device

            report = verify_bundle(args.verify, backend=args.backend, device=resolve_device(args.device).type)
            print(json.dumps({"bundle": args.verify, "ok": True, "parity": report}, indent=2))
            return 0
        if not args.out:
            print("emoq export: --out BUNDLE is required with --checkpoint or --add-variant", file=sys.stderr)
            return 2
        if args.add_variant:
            return _add_variant(args)
        from emoq_serve.model.emoq import EmoQStage1, checkpoint_folder, read_checkpoint_config
        from emoq_serve.model.stage2 import EmoQStage2
        from export.exporter import bundle_size_bytes, export_bundle

        folder = checkpoint_folder(args.checkpoint)
        model = (EmoQStage1 if read_checkpoint_config(folder)[1] == 1 else EmoQStage2).load(folder)
        manifest = export_bundle(model, args.out, fp16=args.fp16,
                                 verify=not args.no_verify, backend=args.backend, device=args.device,
                                 int8=not args.no_int8)
        print(json.dumps({"bundle": args.out, "bundle_id": manifest["bundle_id"],
                          "size_bytes": bundle_size_bytes(args.out), "parity": manifest["parity"]}, indent=2))
        return 0
    except (BundleError, ParityError, FileExistsError, FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"emoq export: FAILED: {e}", file=sys.stderr)
        return 1


def _add_variant(args: argparse.Namespace) -> int:
    if not args.bundle:
        print("emoq export: --bundle BUNDLE is required with --add-variant", file=sys.stderr)
        return 2
    from export.quantize import add_int8_variant, calibration_examples, held_out

    manifest = add_int8_variant(args.bundle, args.out,
                                calibration=calibration_examples(args.calibration) if args.calibration else None,
                                test=held_out(args.accuracy) if args.accuracy else None, backend=args.backend)
    parity = manifest["parity"]
    print(json.dumps({"bundle": args.out, "bundle_id": manifest["bundle_id"], "variants": parity["variants"],
                      "variants_off": parity["variants_off"], "variant_accuracy": parity.get("variant_accuracy", {}),
                      "variant_builds": parity.get("variant_builds", {})}, indent=2))
    return 0
