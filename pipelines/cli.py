"""The `vqgen` command line: compare, sample, evaluate, push."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from stage1_tokenizer.data import DataError


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def _sample(args: argparse.Namespace) -> None:
    from .pipeline import VQPipeline

    pipe = VQPipeline.from_pretrained(args.pipeline, revision=args.revision)
    labels = args.class_labels
    if labels is not None and len(labels) == 1:
        labels = labels * args.num_samples
    out = pipe.generate(num_samples=args.num_samples, class_labels=labels, guidance_scale=args.guidance_scale,
                        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    path = out.save(args.out)
    print(f"wrote {path}")


def _evaluate(args: argparse.Namespace) -> None:
    from .evaluate import evaluate_pipeline_folder

    metrics = evaluate_pipeline_folder(Path(args.pipeline), dataset=args.dataset, num_samples=args.num_samples,
                                       seed=args.seed, guidance_scale=args.guidance_scale)
    out = Path(args.pipeline) / "eval_metrics.json"
    out.write_text(json.dumps(metrics, indent=2))
    print(json.dumps(metrics, indent=2))
    print(f"wrote {out}")


def _push(args: argparse.Namespace) -> None:
    from .pipeline import VQPipeline

    from huggingface_hub.errors import HfHubHTTPError

    pipe = VQPipeline.from_pretrained(args.pipeline)
    try:
        url = pipe.push_to_hub(args.repo_id, private=args.private, token=args.token)
    except HfHubHTTPError as error:  # e.g. 401 without a token, 403 without write access: one line, not a traceback
        reason = " ".join(line.strip() for line in str(error).splitlines()
                          if line.strip() and not line.startswith("For more information"))
        hint = " (pass --token or set HF_TOKEN)" if "401" in reason else ""
        raise ValueError(f"could not push to {args.repo_id!r}: {reason}{hint}") from error
    print(f"pushed {args.pipeline} to {args.repo_id}: {url}")


def _compare(args: argparse.Namespace) -> None:
    from stage1_tokenizer.arguments import parse_arguments

    from .budgets import CompareArguments
    from .compare import run_compare

    run_compare(parse_arguments(CompareArguments, args.arguments, prog="vqgen compare"))


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree for all subcommands."""
    parser = argparse.ArgumentParser(prog="vqgen", description="Two-stage VQ-VAE / VQGAN + GPT-prior toolkit.")
    sub = parser.add_subparsers(dest="command", required=True)

    # Its flags are CompareArguments' fields, parsed by HfArgumentParser (`vqgen compare --help` lists them).
    compare = sub.add_parser("compare", add_help=False, prefix_chars="\0",
                             help="train VQ-VAE and VQGAN under one budget and write a comparison report "
                                  "(`vqgen compare --help` for its options)")
    compare.add_argument("arguments", nargs=argparse.REMAINDER)
    compare.set_defaults(func=_compare)

    sample = sub.add_parser("sample", help="sample from a pipeline folder or Hub repo")
    sample.add_argument("pipeline")
    sample.add_argument("--num-samples", type=_positive_int, default=16)
    sample.add_argument("--class-labels", type=int, nargs="+", help="one label for all samples, or one per sample")
    sample.add_argument("--guidance-scale", type=float, default=1.0)
    sample.add_argument("--temperature", type=float, default=1.0)
    sample.add_argument("--top-k", type=int)
    sample.add_argument("--top-p", type=float)
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--revision")
    sample.add_argument("--out", default="samples.png", help="PNG grid for images (a .txt file for text)")
    sample.set_defaults(func=_sample)

    evaluate = sub.add_parser("evaluate", help="reconstruction and generation metrics for a pipeline folder")
    evaluate.add_argument("pipeline")
    evaluate.add_argument("--dataset", help="data set to compare against (default: the one it was trained on)")
    evaluate.add_argument("--num-samples", type=_positive_int, default=1000)
    evaluate.add_argument("--guidance-scale", type=float, default=1.0)
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.set_defaults(func=_evaluate)

    push = sub.add_parser("push", help="upload a pipeline folder to the Hugging Face Hub")
    push.add_argument("pipeline")
    push.add_argument("repo_id")
    push.add_argument("--private", action="store_true")
    push.add_argument("--token", help="Hub token (default: HF_TOKEN or the cached login)")
    push.set_defaults(func=_push)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Run a subcommand; bad input ends in a one-line `error:` message and exit status 2."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (DataError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
