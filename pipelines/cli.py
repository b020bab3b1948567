"""`diffalign <command> [CONFIG.yaml] [a.b=value ...] [--resume latest|PATH]`.

One literal dict maps a command to the program that runs it. Bad input (a DiffalignError, or a missing/unreadable
file) prints one line naming the item and exits 2; set DIFFALIGN_DEBUG=1 for the traceback.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys

COMMANDS = {
    "train": ("pipelines.train", "align a model with a preference objective (no config: the toy world)"),
    "generate": ("pipelines.generate", "generate images with a base model and LoRAs; writes a manifest and a grid"),
    "cache": ("pipelines.cache", "encode a preference dataset once into VAE latents + text embeddings"),
    "export": ("pipelines.export", "convert a LoRA: diffusers -> kohya/A1111/ComfyUI (format=kohya) and back"),
    "score": ("pipelines.score", "score an image folder or generate manifest with reward models; per-image JSONL"),
    "compare": ("pipelines.compare", "aligned vs base images paired by prompt and seed: win rates, deltas, report"),
    "online": ("pipelines.online", "on-policy alignment rounds: sample, score, pair, train (D3PO, DRAGON, DRO)"),
    "serve-reward": ("pipelines.serve_reward", "serve one scorer over HTTP for the `remote` scorer (POST /score)"),
}

USAGE = "usage: diffalign <command> [CONFIG.yaml] [key=value ...]\n\ncommands:\n" + "\n".join(
    f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()
)


def split_args(args: list[str]) -> tuple[str | None, list[str], dict[str, str]]:
    """-> (config path or None, dotted overrides, --flags with values)."""
    config, overrides, flags = None, [], {}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--"):
            name, _, value = arg[2:].partition("=")
            if not value:
                if i + 1 >= len(args):
                    raise SystemExit(f"diffalign: error: --{name} needs a value")
                value = args[i + 1]
                i += 1
            flags[name] = value
        elif "=" in arg:
            overrides.append(arg)
        elif config is None:
            config = arg
        else:
            raise SystemExit(f"diffalign: error: unexpected argument '{arg}' (overrides look like key=value)")
        i += 1
    return config, overrides, flags


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        argv = ["train"]  # the embedded default: align the toy model
    if argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(command, list(COMMANDS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        print(f"diffalign: error: unknown command '{command}'{hint}\n\n{USAGE}", file=sys.stderr)
        return 2
    config, overrides, flags = split_args(rest)
    from diffalign.errors import DiffalignError

    module = importlib.import_module(COMMANDS[command][0])
    known = [p for p in inspect.signature(module.run).parameters if p not in ("config", "overrides")]
    for name in flags:
        if name not in known:
            options = ", ".join(f"--{k}" for k in known) or "none"
            print(f"diffalign: error: {command}: unknown option --{name} (options: {options})", file=sys.stderr)
            return 2
    try:
        module.run(config, overrides, **flags)
    except (DiffalignError, OSError) as err:
        if os.environ.get("DIFFALIGN_DEBUG"):
            raise
        message = " ".join(str(err).split())  # one line, even if a library's message had several
        print(f"diffalign: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
