"""``python -m lorakit_ext <verb>``: the command line over the same core the WebUI tabs and HTTP routes use.

Each verb lives beside the code it drives, in a module with ``add_arguments(parser)`` and ``run(args) -> int``;
this file only routes, and imports a verb's module only when that verb runs, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from lorakit_ext.errors import LorakitError

# verb -> (module, one-line help). The verbs are public interface: keep them stable.
VERBS: dict[str, tuple[str, str]] = {
    "info": ("lorakit_ext.formats.info", "print what a network file holds, as JSON"),
    "train": ("lorakit_ext.train.cli", "train a LoRA / LoCon / LoHa from a kohya-style dataset folder"),
    "copier": ("lorakit_ext.slider.cli_copier", "slider LoRA by the copier method (A applied, B trained on top)"),
    "difference": ("lorakit_ext.slider.cli_difference", "slider LoRA by the difference method (B x 1 + A x -1)"),
    "slider": ("lorakit_ext.slider.cli_paired", "slider LoRA trained on image pairs at +w / -w"),
    "merge": ("lorakit_ext.merge.cli_merge", "merge LoRAs with ratios, exactly or re-compressed"),
    "merge-into": ("lorakit_ext.merge.cli_merge_into", "merge LoRAs into a checkpoint"),
    "extract": ("lorakit_ext.merge.cli_extract", "extract a LoRA from a tuned checkpoint minus its base"),
    "resize": ("lorakit_ext.merge.cli_resize", "re-compress a LoRA to a new (or dynamic) rank"),
    "demo": ("lorakit_ext.slider.demo", "the copier slider on the toy world: LoRA, weight grid PNG, metrics JSON"),
    "toy": ("lorakit_ext.toy.cli", "the toy model: export it for the WebUI"),
    "ui": ("lorakit_ext.ui.standalone", "serve the three tabs on 127.0.0.1 outside the WebUI"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser_for(argv)
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # told by the verb's own parser, so the usage shown is the verb's
        parser.verb_parsers[args.verb].error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return importlib.import_module(args._module).run(args)
    except LorakitError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def build_parser_for(argv: list[str]) -> argparse.ArgumentParser:
    """The parser with the arguments of the verb named in ``argv`` (the only one whose module gets imported)."""
    parser = argparse.ArgumentParser(prog="python -m lorakit_ext", description=__doc__.splitlines()[0])
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    parser.verb_parsers = {}
    for verb, (module_name, help_text) in VERBS.items():
        sub = parser.verb_parsers[verb] = verbs.add_parser(verb, help=help_text, description=help_text)
        sub.set_defaults(_module=module_name)
        if argv and argv[0] == verb:
            importlib.import_module(module_name).add_arguments(sub)
    return parser
