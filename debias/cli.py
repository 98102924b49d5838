"""The ``debias`` command line: explicit subcommands, each with runnable examples in ``--help``."""

from __future__ import annotations

import argparse
import sys
import textwrap

from generators.config import UserError

EXAMPLES = {
    "sample": """
        debias sample --config configs/experiments/smoke-janus.yaml --out runs/smoke
        debias sample --config configs/experiments/smoke-sd.yaml --out runs/sd --images-per-prompt 16
        debias sample --config configs/experiments/smoke-janus.yaml --out runs/s --set generator.batch_size=2
        accelerate launch --multi_gpu --num_processes 2 -m debias.cli sample --config C --out runs/x
    """,
    "audit": """
        debias audit --config configs/experiments/smoke-janus.yaml --out runs/smoke-janus
        debias audit --config configs/experiments/lab.yaml --out runs/lab --adapter runs/fix/adapter
        debias audit --config configs/experiments/smoke-sd.yaml --images my_images/ --out runs/closed-model
        debias audit --config configs/experiments/lab.yaml --out runs/g2 --set generator.sampling.guidance_scale=2
    """,
    "synth": """
        debias synth --config configs/experiments/lab.yaml --out runs/lab-synth
        debias synth --config configs/experiments/smoke-janus.yaml --out runs/synth --per-cell 4
        debias synth --config configs/experiments/lab.yaml --out runs/s --set synth.attribute=race
        debias synth --config configs/experiments/train-sd15.yaml --out runs/sd15-synth   # a diffusion pipeline
    """,
    "sweep": """
        debias sweep --config configs/experiments/lab.yaml --out runs/guidance --guidance 1.01 2 4
    """,
    "calibrate": """
        debias calibrate --classifier clip-vit-large-patch14 --data labelled_faces/ --out runs/calib
        debias calibrate --classifier configs/classifiers/tiny.yaml --data faces.jsonl --out runs/calib
        debias calibrate --classifier lab --data hf:some/fairface-like-dataset --split validation --out runs/calib
    """,
    "compare": """
        debias compare runs/before runs/after --out runs/compare
    """,
    "locate": """
        debias locate --config configs/experiments/lab.yaml --out runs/lab-locate
        debias locate --config configs/experiments/smoke-janus.yaml --out runs/locate --audit runs/smoke-janus
        debias locate --config configs/experiments/lab.yaml --out runs/l --set "locate.probes=[controlled]"
    """,
    "train": """
        debias train --config configs/experiments/lab.yaml --out runs/lab-train --set train.dataset=runs/lab-synth/dataset
        debias train --config configs/experiments/lab.yaml --out runs/t --set method=sft --set sft.max_steps=50
        debias train --config C --out runs/t --set train.num_processes=2          # re-launches under accelerate
        debias train --config C --out runs/t --set train.accelerate_config=deepspeed-zero2
        debias train --config configs/experiments/train-sd15.yaml --out runs/sd15-train   # diffusion: sft then bpo
        debias train --config train-smoke-sd --out runs/sd --set method=sft+dpo --set diffusion.sft.steps=50
    """,
    "demo": """
        debias demo --out runs/demo                      # the README's main job (lab world, CPU, minutes)
        debias demo --out runs/demo --images-per-prompt 64
        debias demo --out runs/demo-sft --set train.method=sft
        debias demo --world diffusion --out runs/demo-sd  # the same loop on the diffusion lab world
    """,
    "lab": """
        debias lab build --out generators/lab/weights         # rebuild the shipped world (~10 min on 2 cores)
        debias lab build --out /tmp/world --quick          # a reduced world in about a minute
        debias lab build --world diffusion --out generators/lab/weights   # the diffusion world into weights/sd
        debias lab build --world diffusion --out /tmp/world --quick       # reduced; builds the CLIP first if absent
        debias audit --config configs/experiments/lab-sd.yaml --out runs/lab-sd  # audit the diffusion world
    """,
    "methods": """
        debias methods --out runs/methods                 # SFT, SFT+BPO, BPO, freq on the lab world, one table
        debias methods --world diffusion --out runs/methods-sd   # SFT, SFT+BPO, Diffusion-DPO, alignment
    """,
    "export": """
        debias export runs/lab --out runs/lab-dataset                 # one row per image, no image column
        debias export runs/lab --out runs/lab-dataset --images        # with the PNGs
        debias export runs/lab --out runs/lab-dataset --push-to-hub my-user/lab-audit
    """,
    "card": """
        debias card --adapter runs/demo/train/bpo/adapter --before runs/demo/before --after runs/demo/after --out M
        debias card --adapter runs/t/bpo/adapter --before runs/b --after runs/a --compare runs/c --out runs/model
        debias card --adapter runs/t/bpo/adapter --before runs/b --after runs/a --out runs/model --push-to-hub me/fix
    """,
    "config": """
        debias config --explain            # every experiment config key with its help text
        debias config --check configs/experiments/smoke-janus.yaml
        debias config --check configs/experiments/lab.yaml --set generator.sampling.guidance_scale=2
    """,
}


def _overrides(args, **sugar) -> dict:
    """The ``--set KEY=VALUE`` overrides of a command, after its short flags (``sugar``: dotted key -> value)."""
    from generators.config import parse_sets

    return {**{k: v for k, v in sugar.items() if v is not None}, **parse_sets(args.set)}


def _experiment(args, bare: str | None = None, **sugar):
    from debias.config import load_config

    return load_config(args.config, _overrides(args, **sugar), bare=bare)


def _sample(args) -> None:
    from audit.sample import run_sample

    config = _experiment(args, images_per_prompt=args.images_per_prompt)
    store, keys = run_sample(config, args.out, progress=not args.quiet)
    print(f"{len(keys)} images in {store.samples}")


def _audit(args) -> None:
    from audit.run import run_audit

    config = _experiment(args, images_per_prompt=args.images_per_prompt, **{
        "generator.adapter": args.adapter, "generator.merge_adapter": True if args.merge_adapter else None})
    metrics = run_audit(config, args.out, images_dir=args.images, progress=not args.quiet)
    for name, block in metrics["attributes"].items():
        lo, hi = block["rd_ci"] if block["rd_ci"] else (None, None)
        if block["rd"] is not None:
            print(f"{name:12s} RD {block['rd']:.3f}  [{lo:.3f}, {hi:.3f}]  (lower is better)")
    print(f"report: {args.out}/report.html")


def _synth(args) -> None:
    from debias.synth import run_synth

    config = _experiment(args, **{"synth.per_cell": args.per_cell})
    manifest = run_synth(config, args.out, progress=not args.quiet)
    print(f"{manifest['n_rows']} rows ({manifest['attribute']}, {len(manifest['groups'])} groups, "
          f"{manifest['n_prompts']} prompts), acceptance {manifest['acceptance_rate']:.2f}, "
          f"{len(manifest['shortfalls'])} cells short -> {manifest['dataset']}")


def _sweep(args) -> None:
    from debias.sweep import run_guidance_sweep

    config = _experiment(args, images_per_prompt=args.images_per_prompt)
    table = run_guidance_sweep(config, args.out, args.guidance, progress=not args.quiet)
    print(table["markdown"])


def _calibrate(args) -> None:
    from audit.calibrate import run_calibrate

    path = run_calibrate(args.classifier, args.data, args.out, image_column=args.image_column, split=args.split)
    print(f"calibration written to {path}; use it in an audit with metrics.calibration: {path}")


def _compare(args) -> None:
    from audit.compare import run_compare

    result = run_compare(args.before, args.after, args.out)
    for name, block in result["attributes"].items():
        m, test = block["matched"], block["test"]
        if m["rd_before"] is not None and m["rd_after"] is not None:
            print(f"{name:12s} mean RD {m['rd_before']:.3f} -> {m['rd_after']:.3f} on {m['n_prompts']} matched "
                  f"prompts (Wilcoxon p = {test['p_value']:.3g})")
    print(f"report: {args.out}/compare.html")


def _locate(args) -> None:
    from debias.locate.run import read_audit, run_locate

    config = _experiment(args)
    audit = read_audit(args.audit, "--audit") if args.audit else None
    result = run_locate(config, config.locate, args.out, audit_metrics=audit)
    for line in result.get("summary", {}).get("lines", []):
        print(line)
    print(f"report: {args.out}/locate.html")


def _train(args) -> None:
    from debias.train.launch import main_train
    from generators.config import to_dict

    # `--set method=sft` means train.method: the train section's keys may drop their prefix here.
    config = _experiment(args, bare="train")
    config.check()  # the experiment's inputs, as every command checks them, before training plans its own
    main_train(to_dict(config), args.out)


def _demo(args) -> None:
    from debias.demo import run_demo

    summary = run_demo(args.out, progress=not args.quiet, world=args.world,
                       overrides=_overrides(args, images_per_prompt=args.images_per_prompt))
    b, a, p = summary["before"], summary["after"], summary["planted"]
    print(f"gender RD: planted {p['gender_rd']:.3f}, before {b['gender_rd']:.3f}, after {a['gender_rd']:.3f} "
          f"({summary['gender_rd_ratio']:.0%} of before)")
    print(f"race RD:   planted {p['race_rd']:.3f}, before {b['race_rd']:.3f}, after {a['race_rd']:.3f}")
    print(f"HTML report: {args.out}/index.html")


def _lab_build(args) -> int:
    from debias.lab.build import main as build_main

    # The builder prints its own one-line error; its exit code is the command's.
    return build_main(["--out", args.out, "--world", args.world, *(["--quick"] if args.quick else [])])


def _methods(args) -> None:
    from debias.methods import run_methods

    table = run_methods(args.out, progress=not args.quiet, overrides=_overrides(args), world=args.world)
    print(table["markdown"])


def _export(args) -> None:
    from audit.export import DISK_FILES, export_audit, push_to_hub

    out = export_audit(args.run, args.out, images=args.images)
    print(f"data set written to {out} (datasets.load_from_disk('{out}'), or the parquet file under data/)")
    if args.push_to_hub:
        print(f"pushed to {push_to_hub(out, args.push_to_hub, 'dataset', ignore=DISK_FILES)}")


def _card(args) -> None:
    from audit.export import push_to_hub
    from debias.share import write_model_card

    out = write_model_card(args.adapter, args.out, args.before, args.after, compare=args.compare,
                           train_dir=args.train)
    print(f"adapter and model card written to {out} (README.md; load with generator.adapter: {out})")
    if args.push_to_hub:
        print(f"pushed to {push_to_hub(out, args.push_to_hub, 'model')}")


def _config(args) -> None:
    from debias.config import ExperimentConfig, load_config
    from generators.config import explain

    if args.check:
        # The same checks as `debias audit` runs before it loads anything: the two never disagree.
        load_config(args.check, _overrides(args)).check()
        print(f"{args.check}: ok")
    else:
        from debias.train.diffusion import DiffusionTrainConfig

        # The diffusion stage sections are free mappings checked against DiffusionTrainConfig: list its keys too.
        from debias.train.diffusion_stages import SET_BY_RUNNER

        stage = [line for line in explain(DiffusionTrainConfig, "train.diffusion.<stage>.")
                 if line.split(" ")[0].rsplit(".", 1)[-1] not in SET_BY_RUNNER]  # those `debias train` sets itself
        print("\n".join([*explain(ExperimentConfig), *stage]))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="debias", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Audit, locate and remove demographic bias in text-to-image generators.",
        epilog="Run `debias COMMAND --help` for examples of each command.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def sets(p: argparse.ArgumentParser, help: str = "override a config key, e.g. images_per_prompt=16 or "
                                                       "generator.sampling.guidance_scale=2 (repeatable)") -> None:
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=help)

    def experiment(p: argparse.ArgumentParser, help: str = "experiment YAML, or a name in configs/experiments/ "
                                                           "(e.g. lab, smoke-janus)",
                   set_help: str | None = None) -> None:
        p.add_argument("--config", required=True, help=help)
        sets(p, *([set_help] if set_help else []))

    def world(p: argparse.ArgumentParser) -> None:
        from debias.demo import WORLDS

        p.add_argument("--world", choices=list(WORLDS), default="janus",
                       help="janus: the tiny unified model (default); diffusion: the tiny Stable Diffusion pipeline")

    def command(name: str, help: str, func) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, formatter_class=argparse.RawDescriptionHelpFormatter,
                           epilog="examples:\n" + textwrap.indent(textwrap.dedent(EXAMPLES.get(name, "")).strip(), "  "))
        p.set_defaults(func=func)
        return p

    p = command("sample", "sample images per prompt into a resumable run folder", _sample)
    experiment(p)
    p.add_argument("--out", required=True, help="run folder; re-running resumes it")
    p.add_argument("--images-per-prompt", type=int, default=None, help="override images_per_prompt")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = command("audit", "sample (or import) images, classify faces, compute bias metrics and write a report", _audit)
    experiment(p)
    p.add_argument("--out", required=True, help="run folder; re-running resumes every stage")
    p.add_argument("--images", default=None, help="audit pre-generated images instead of sampling: one sub-folder "
                                                     "per prompt, or a manifest.jsonl with file and prompt")
    p.add_argument("--adapter", default=None, help="PEFT adapter to apply to the generator (from `debias train`)")
    p.add_argument("--merge-adapter", action="store_true", help="merge the adapter into the weights")
    p.add_argument("--images-per-prompt", type=int, default=None, help="override images_per_prompt")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = command("synth", "build a classifier-verified, demographically balanced training set with the generator",
                _synth)
    experiment(p, "experiment YAML with a synth: section")
    p.add_argument("--out", required=True, help="output folder (dataset/, synth.json); re-running resumes")
    p.add_argument("--per-cell", type=int, default=None, help="override synth.per_cell")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = command("sweep", "audit the same prompts and seeds at several guidance scales, one table", _sweep)
    experiment(p)
    p.add_argument("--out", required=True, help="folder; one audit run per scale inside")
    p.add_argument("--guidance", type=float, nargs="+", required=True, help="guidance scales to audit")
    p.add_argument("--images-per-prompt", type=int, default=None, help="override images_per_prompt")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = command("calibrate", "measure a classifier's accuracy and confusion matrix on labelled images", _calibrate)
    p.add_argument("--classifier", required=True, help="name in configs/classifiers/, or a classifier YAML")
    p.add_argument("--data", required=True, help="labelled images: root/<attribute>/<class>/*.png, a CSV/JSONL "
                                                 "manifest, a saved HF dataset, or hf:NAME")
    p.add_argument("--out", required=True, help="folder for calibration.json")
    p.add_argument("--image-column", default=None, help="image/path column of a manifest or dataset")
    p.add_argument("--split", default=None, help="dataset split")

    p = command("compare", "compare two audits on matched prompts and seeds (paired statistics)", _compare)
    p.add_argument("before", help="run folder of the audit before the change")
    p.add_argument("after", help="run folder of the audit after the change")
    p.add_argument("--out", required=True, help="folder for compare.json / compare.html / compare.md")

    p = command("locate", "probe whether bias comes from the language model or the vision side", _locate)
    experiment(p, "experiment YAML with a locate: section")
    p.add_argument("--out", required=True, help="folder for locate.json / locate.html / locate.md")
    p.add_argument("--audit", default=None, help="an audit run folder, for the partial-alignment table")

    p = command("train", "fine-tune the generator with LoRA: an image-token model's language model (SFT, balanced "
                         "preference loss, freq; TRL) or a diffusion pipeline's UNet / text encoder (SFT, balanced "
                         "preference loss, Diffusion-DPO; train.diffusion)", _train)
    experiment(p, "experiment YAML with generator: and train: sections",
               "override a config key, e.g. train.sft.max_steps=50; train keys may drop 'train.' (method=sft)")
    p.add_argument("--out", default=None, help="run folder (default: train.output_dir); re-running resumes")

    p = command("demo", "the whole audit -> locate -> fix -> compare loop on a built-in lab world", _demo)
    p.add_argument("--out", required=True, help="demo folder; re-running resumes")
    world(p)
    p.add_argument("--images-per-prompt", type=int, default=None, help="override the lab config's images per prompt")
    sets(p, "override a key of the lab experiment config, e.g. train.sft.epochs=4")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = command("lab", "build the lab world (tiny VQ + Janus + CLIP trained on a synthetic world)", _lab_build)
    p.add_argument("action", choices=["build"], help="what to do")
    p.add_argument("--out", required=True, help="folder for the world's weights")
    p.add_argument("--quick", action="store_true", help="a reduced world in about a minute (CI check)")
    # Checked by the builder, so `debias lab build` and `python -m debias.lab.build` give the same one-line error.
    p.add_argument("--world", default="janus", help="janus (default: the tiny Janus world) or diffusion (a tiny "
                                                    "Stable Diffusion pipeline into DIR/sd, reusing DIR/clip)")

    p = command("methods", "compare every fix method on a lab world in one table", _methods)
    p.add_argument("--out", required=True, help="folder; one sub-folder per method")
    world(p)
    sets(p, "override a key of the lab experiment config, e.g. images_per_prompt=64")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = command("export", "export an audit as a Hugging Face data set: one row per image (prompt, seed, "
                          "probabilities, face / abstain / nsfw flags)", _export)
    p.add_argument("run", help="audit run folder (written by `debias audit`)")
    p.add_argument("--out", required=True, help="folder for the data set (README.md, data/*.parquet, arrow files)")
    p.add_argument("--images", action="store_true", help="add an image column with the PNGs")
    p.add_argument("--push-to-hub", metavar="REPO", default=None,
                   help="then upload the folder as a (private) Hub data set repository, e.g. my-user/my-audit")

    p = command("card", "package a fixed model to share: its LoRA adapter plus a model card (README.md) with the "
                        "before / after audit", _card)
    p.add_argument("--adapter", required=True, help="adapter folder from `debias train` (RUN/<stage>/adapter)")
    p.add_argument("--before", required=True, help="audit run folder of the base model")
    p.add_argument("--after", required=True, help="audit run folder of the model with the adapter (same seeds)")
    p.add_argument("--compare", default=None, help="`debias compare` folder of the two audits (adds the paired test)")
    p.add_argument("--train", default=None, help="training run folder (default: the one the adapter sits in)")
    p.add_argument("--out", required=True, help="folder to write (adapter files + README.md)")
    p.add_argument("--push-to-hub", metavar="REPO", default=None,
                   help="then upload the folder as a (private) Hub model repository, e.g. my-user/my-fix")

    p = command("config", "explain or check experiment configs", _config)
    p.add_argument("--explain", action="store_true", help="print every config key with its help (default)")
    p.add_argument("--check", metavar="YAML", help="validate a config file and exit")
    sets(p, "override a key before checking, e.g. generator.device=cpu")
    return parser


def _quiet_libraries() -> None:
    """Keep library chatter (weight-loading bars, the no-torchvision notice) out of our progress output."""
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    import warnings

    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_libraries()
    # Library warnings are held back while the command runs: on bad input the error is the only line on stderr;
    # otherwise they are shown once, after the command's own output.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        try:
            rc = args.func(args)
        except UserError as err:
            print(f"debias {args.command}: error: {err}", file=sys.stderr)
            return 2
    if rc:
        return rc
    for w in caught:
        warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    return 0


if __name__ == "__main__":
    sys.exit(main())
