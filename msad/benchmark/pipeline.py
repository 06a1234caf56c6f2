"""What the tools that train several models one after another share (tools/quickstart.py,
tools/compare_methods.py): the quickstart schedule scaled to another length, and reading a
training's progress from Detectron2's log lines."""
import argparse
import re

# Detectron2's CommonMetricPrinter line: "eta: [N day, ]H:MM:SS  iter: I ...".
ETA_LINE = re.compile(r"eta: (?:(\d+) day, )?(\d+):(\d\d):(\d\d)\s+iter: (\d+)")


def fmt(seconds):
    """M:SS (minutes may exceed 59), as the tools print durations and ETAs."""
    seconds = int(max(0, seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


def progress_of(line):
    """(iterations done, seconds left) from one Detectron2 log line, or None."""
    match = ETA_LINE.search(line)
    if not match:
        return None
    days, h, m, s, it = (int(g or 0) for g in match.groups())
    return it + 1, days * 86400 + h * 3600 + m * 60 + s


def schedule_overrides(iters):
    """The quickstart's 600-iteration schedule scaled to `iters`: LR step, warm-ups and
    checkpoints at the same fractions."""
    def at(fraction):
        return str(max(1, round(iters * fraction)))

    return ["SOLVER.MAX_ITER", str(iters), "SOLVER.STEPS", f"({at(5 / 6)},)",
            "SOLVER.WARMUP_ITERS", at(1 / 12), "SOLVER.CHECKPOINT_PERIOD", at(1 / 3),
            "MODEL.MSAD.KD_WARMUP_ITERS", at(1 / 6), "MODEL.THUMBDET.WARMUP_ITERS", at(1 / 6)]


def add_schedule_arguments(parser, iters, iters_default):
    """The options of a tool that trains every quickstart model: --iters (`iters`, said as
    `iters_default` in the help) and the config overrides for every model, last."""
    parser.add_argument("--iters", type=int, default=iters, help=(
        f"iterations per model, the LR step, warm-ups and checkpoints scaled alike (default: "
        f"{iters_default})"))
    parser.add_argument("overrides", nargs=argparse.REMAINDER,
                        help="config overrides for every model, e.g. SOLVER.IMS_PER_BATCH 8")


def check_at_least(parser, minimums, args):
    """Each option of `minimums` ({option: (least value, why)}) that `args` sets (not None) is
    at least its value; errors go through the argparse `parser` (exit 2)."""
    for option, (least, why) in minimums.items():
        value = getattr(args, option.lstrip("-").replace("-", "_"))
        if value is not None and value < least:
            parser.error(f"{option} must be at least {least}{why}, got {value}")


def checked_overrides(parser, overrides, set_by_tool):
    """Config overrides given after a tool's options, checked: KEY VALUE pairs, no option among
    them, none of the keys the tool sets itself (`set_by_tool`: {key: its option}).  Errors go
    through the argparse `parser` (exit 2)."""
    if overrides[:1] == ["--"]:
        overrides = overrides[1:]
    misplaced = [a for a in overrides if a.startswith("--")]
    if misplaced:
        parser.error(f"options go before the config overrides: {misplaced}")
    if len(overrides) % 2:
        parser.error(f"config overrides come in KEY VALUE pairs, got {overrides}")
    for key, flag in set_by_tool.items():
        if key in overrides[::2]:
            parser.error(f"set {key} with {flag}: the tool gives each model its own")
    return overrides
