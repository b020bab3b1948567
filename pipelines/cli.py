"""`diffalign <command> [CONFIG.yaml] [a.b=value ...] [--resume latest|PATH] [--print-config] [-h]`.

One literal dict maps a command to the program that runs it, its config class, one runnable example and its
--flags. `diffalign <command> --help` prints the usage, the example and every config key of the command (grouped by
section, with type, default and doc, generated from the dataclasses); `--print-config` prints the resolved config
and exits. Bad input (a DiffalignError, or a missing/unreadable file) prints one line naming the item and exits 2;
set DIFFALIGN_DEBUG=1 for the traceback.

Fast answers: help, a bad flag and a bad config value answer from COMMANDS and diffalign.config alone (torch, but
not diffusers, transformers or open_clip); the program module, which imports those, is imported only to run.
"""

from __future__ import annotations

import difflib
import importlib
import os
import sys
from typing import NamedTuple, NoReturn

from diffalign.errors import DiffalignError

# Before torch (and its OpenMP runtime, libgomp) loads. With the default wait, a thread that finished a parallel
# region spins (GOMP_SPINCOUNT, unthrottled when threads <= cores) and the region's end barrier spins too; on cores
# other jobs share, a descheduled team member then costs its spinning partner a scheduler time slice per region,
# so a phase made of many short regions slows 10x or more: the tiny SD3's text encoders (each op just over ATen's
# grain) went from 36 ms to 0.4-2.6 s per call at load 5-9, and while diffalign still ran them in every training
# step and sampling chunk its on-line epochs swung 5.8-44 s where flow_grpo's (encoders once per batch) stayed at
# 1.0-1.6 s (docs/results.md, "OpenMP's wait policy"). PASSIVE sleeps instead. A value the user set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


class Command(NamedTuple):
    module: str  # the program: its run(config, overrides, **options) does the work
    config: str  # its config class in diffalign.config
    what: str  # one line for the command list
    example: str  # one runnable command line
    options: dict[str, str] = {}  # the --flags run() takes besides config and overrides -> how help shows the value
    positional: str = ""  # the key a bare argument that is not a YAML file sets (`serve-reward NAME`)


COMMANDS = {
    "train": Command(
        "diffalign.pipelines.train",
        "RunConfig",
        "align a model with a preference objective (no config: the toy world)",
        "diffalign train train.max_steps=20 eval.max_prompts=4 train.output_dir=runs/toy-dpo",
        options={"resume": "latest|PATH"},
    ),
    "generate": Command(
        "diffalign.pipelines.generate",
        "GenerateConfig",
        "generate images with a base model and LoRAs; writes a manifest and a grid",
        'diffalign generate prompt="a small red circle at the top left" images_per_prompt=4 output_dir=outputs/base',
    ),
    "cache": Command(
        "diffalign.pipelines.cache",
        "RunConfig",
        "encode a preference dataset once into VAE latents + text embeddings",
        "diffalign cache data.cache_dir=cache/toy",
    ),
    "export": Command(
        "diffalign.pipelines.export",
        "ExportConfig",
        "convert a LoRA: diffusers -> kohya/A1111/ComfyUI (format=kohya) and back",
        "diffalign export src=runs/toy-dpo/lora out=toy_dpo_kohya.safetensors format=kohya",
    ),
    "score": Command(
        "diffalign.pipelines.score",
        "ScoreConfig",
        "score an image folder or generate manifest with reward models; per-image JSONL",
        "diffalign score images=outputs/base scorers=[toy_aesthetic,toy_fidelity]",
    ),
    "compare": Command(
        "diffalign.pipelines.compare",
        "CompareConfig",
        "aligned vs base images paired by prompt and seed: win rates, deltas, report",
        "diffalign compare base=outputs/base aligned=outputs/aligned scorers=[toy_aesthetic,toy_fidelity]",
    ),
    "online": Command(
        "diffalign.pipelines.online",
        "OnlineConfig",
        "on-policy alignment in rounds: sample, score, train (GRPO, DiffusionNFT, D3PO, DRAGON, DRO)",
        "diffalign online configs/toy_dragon.yaml online.rounds=2",
        options={"resume": "latest|PATH"},
    ),
    "serve-reward": Command(
        "diffalign.pipelines.serve_reward",
        "ServeRewardConfig",
        "serve one scorer over HTTP for the `remote` scorer (POST /score)",
        "diffalign serve-reward scorer=toy_aesthetic port=8765",
        positional="scorer",
    ),
}

USAGE = (
    "usage: diffalign <command> [CONFIG.yaml] [key=value ...] [--print-config] [-h]\n\ncommands:\n"
    + "\n".join(f"  {name:<12} {spec[2]}" for name, spec in COMMANDS.items())
    + "\n\n`diffalign <command> --help` lists the command's config keys with their types, defaults and meaning.\n"
    "example (align the shipped toy model on a CPU, a few minutes):\n  diffalign train"
)
HELP_FLAGS = ("-h", "--help")
SWITCHES = ("print-config",)  # flags without a value
YAML = (".yaml", ".yml")


def split_args(args: list[str]) -> tuple[str | None, list[str], dict[str, str]]:
    """-> (config path or None, dotted overrides, --flags with values; a switch maps to "1")."""
    config, overrides, flags = None, [], {}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--"):
            name, eq, value = arg[2:].partition("=")
            if name in SWITCHES and not eq:
                value = "1"
            elif not eq:
                if i + 1 >= len(args) or args[i + 1].startswith("--"):
                    raise DiffalignError(f"--{name} needs a value")
                value = args[i + 1]
                i += 1
            flags[name] = value
        elif "=" in arg:
            overrides.append(arg)
        elif config is None:
            config = arg
        else:
            raise DiffalignError(f"unexpected argument '{arg}' (overrides look like key=value)")
        i += 1
    return config, overrides, flags


def config_class(command: str) -> type:
    import diffalign.config

    return getattr(diffalign.config, COMMANDS[command].config)


def command_help(command: str) -> str:
    from diffalign.config import describe

    spec = COMMANDS[command]
    options = "".join(f" [--{name} {value}]" for name, value in spec.options.items())
    return (
        f"usage: diffalign {command} [CONFIG.yaml] [key=value ...]{options} [--print-config] [-h]\n\n{spec.what}\n\n"
        f"example:\n  {spec.example}\n\n"
        'config keys (in CONFIG.yaml, or key=value; lists key=[a,b], mappings key="{a: 1}"):\n\n'
        + describe(config_class(command))
    )


def main(argv: list[str] | None = None) -> int:
    """The CLI: the exit code (0, 2 for bad input, 130 / 143 after a stop signal)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return _main(argv)
    try:
        code = _main(argv)
    except SystemExit as stop:  # a stop signal's checkpointed exit (130 / 143)
        code = stop.code if isinstance(stop.code, int) else 1
    leave_launched_process(code)


def leave_launched_process(code: int) -> NoReturn:
    """End a process of a multi-process launch (`accelerate launch`, WORLD_SIZE > 1) once its program has returned:
    flush and os._exit, skipping the interpreter's finalisation. There, gloo's worker threads, still referenced by
    FSDP2's device mesh after destroy_process_group, can abort a finished run's process (SIGABRT, "terminate called
    without an active exception"; seen once in CI on an FSDP2 run whose files were all written), and the launcher
    then reports the whole run failed. Every file is written and closed, and the trackers finished, by then."""
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        argv = ["train"]  # the embedded default: align the toy model
    if argv[0] in (*HELP_FLAGS, "help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        close = difflib.get_close_matches(command, list(COMMANDS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        print(f"diffalign: error: unknown command '{command}'{hint}\n\n{USAGE}", file=sys.stderr)
        return 2
    if any(arg in HELP_FLAGS for arg in rest):
        print(command_help(command))
        return 0
    try:
        spec = COMMANDS[command]
        config, overrides, flags = split_args(rest)
        if spec.positional and config is not None and not config.endswith(YAML):
            config, overrides = None, [f"{spec.positional}={config}", *overrides]
        print_only = flags.pop("print-config", None)
        for name in flags:
            if name not in spec.options:
                options = ", ".join(f"--{k}" for k in [*spec.options, *SWITCHES])
                raise DiffalignError(f"{command}: unknown option --{name} (options: {options}, -h)")
        from diffalign.config import load_config

        # A bad value answers here, before the program's imports (diffusers, transformers, ...); the program loads
        # the config again from the same arguments.
        cfg = load_config(config_class(command), config, overrides)
        if print_only:
            return print_config(cfg)
        importlib.import_module(spec.module).run(config, overrides, **flags)
    except (DiffalignError, OSError) as err:
        if os.environ.get("DIFFALIGN_DEBUG"):
            raise
        message = " ".join(str(err).split())  # one line, even if a library's message had several
        print(f"diffalign: error: {message}", file=sys.stderr)
        return 2
    return 0


def print_config(cfg) -> int:
    """Print the resolved config (every key, defaults filled in) as YAML, without running anything."""
    import yaml

    from diffalign.config import to_dict

    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
